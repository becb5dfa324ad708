"""ecomray: e-commerce content-marketing models as Hydra-configured Ray jobs."""

__version__ = "0.1.0"
