"""python -m jobs.tune experiment=<name> sweep=<name>: a Ray Tune sweep (conf/sweep/) over the training driver; the
best trial's model is registered with its sweep lineage and gets the `best` alias."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ecomray.runtime import to_plain, user_errors
from ecomray.train.tune import run_sweep


def run(cfg: DictConfig | dict) -> dict:
    """Works on a Hydra config or a plain dict with a `sweep` key (the pipeline's tune stage). Returns
    {"name", "version", "alias", "best_trial", "metric", "value", "sweep_dir", ...}."""
    plain = to_plain(cfg)
    choices = _hydra_choices()
    if choices:  # which config groups the run used: the exported experiment file overrides the same ones
        plain["tune"] = {**(plain.get("tune") or {}), "choices": choices}
    return run_sweep(plain)


def _hydra_choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v and not k.startswith("hydra")}


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
