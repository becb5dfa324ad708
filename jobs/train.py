"""python -m jobs.train experiment=<name>: Ray Train on a prepared dataset; the best model goes to the registry."""
import hydra
from omegaconf import DictConfig

from ecomray.runtime import to_plain, user_errors
from ecomray.train.driver import fit


def run(cfg: DictConfig | dict) -> dict:
    return fit(to_plain(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
