"""python -m jobs.prepare dataset=<name>: validate, quarantine, shard and split a dataset."""
import hydra
from omegaconf import DictConfig

from ecomray.data.prepare import run as prepare
from ecomray.runtime import to_plain, user_errors


def run(cfg: DictConfig | dict):
    return prepare(to_plain(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
