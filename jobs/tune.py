"""python -m jobs.tune experiment=<name> sweep=<name>: a Ray Tune sweep (conf/sweep/) over the training driver; the
best trial's model is registered with its sweep lineage and gets the `best` alias."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecomray.runtime import to_plain, user_errors
from ecomray.train.tune import run_sweep


def run(cfg: DictConfig | dict) -> dict:
    """Works on a Hydra config or a plain dict with `sweep` and `tune` keys (the pipeline's tune stage). Returns
    {"name", "version", "alias", "best_trial", "metric", "value", "sweep_dir", ...}."""
    return run_sweep(to_plain(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
