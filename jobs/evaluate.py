"""python -m jobs.evaluate experiment=<name> [evaluate.version=...] [evaluate.split=val|test]: re-score a version."""
import hydra
from omegaconf import DictConfig

from ecomray.evaluation import evaluate_version
from ecomray.runtime import to_plain, user_errors


def run(cfg: DictConfig | dict) -> dict:
    return evaluate_version(to_plain(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
