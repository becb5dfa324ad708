"""python -m jobs.opinion dataset=<reviews dataset> opinion.model=<registry name>[:version]: score a review table and
write a Markdown opinion report with PNG plots (ecomray/opinion.py)."""
import hydra
from omegaconf import DictConfig

from ecomray.opinion import run as opinion
from ecomray.runtime import to_plain, user_errors


def run(cfg: DictConfig | dict) -> dict:
    return opinion(to_plain(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="opinion")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
