"""One trial: Tune's trainable is the training driver itself (`ecomray.train.driver.fit`) with the trial's values."""

from __future__ import annotations

import os
from typing import Any

from ecomray.train.loop import REPORT_METRIC
from ecomray.train.tune.resources import pg_file
from ecomray.train.tune.spec import apply_overrides


def trial_cfg(base: dict, values: dict[str, Any], trial_id: str, sweep_dir: str, metric: str | None = None) -> dict:
    cfg = apply_overrides(base, values)
    cfg["paths"] = {**cfg["paths"], "runs": os.path.join(sweep_dir, "trials")}
    cfg["run_name"] = trial_id
    cfg["_tune_trial"] = True       # Tune writes the trial's TensorBoard files itself
    if metric:
        cfg[REPORT_METRIC] = metric  # the loop checks that its reports carry it (`sweep.metric`)
    return cfg


def trial(config: dict, base_cfg: dict, sweep_dir: str, metric: str | None = None) -> None:
    """Tune's trainable: the training driver with this trial's values, metrics forwarded to Tune every epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ecomray.runtime import quiet_termination
    from ecomray.train.driver import fit

    quiet_termination()         # a stopped trial ends without a traceback on the console
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_cfg(base_cfg, config, trial_id, sweep_dir, metric)
    # Ray is already up in a trial (fit's init_ray is a no-op); the Train run is named by the trial, so a resumed
    # trial resumes its Train run from its last checkpoint.
    fit({**cfg, "_pg_file": pg_file(sweep_dir, trial_id)}, callbacks=[TuneReportCallback()], register=False,
        evaluate=False, train_fn=trial_loop)


def trial_loop(cfg: dict) -> None:
    """The one training loop, after rank 0 has noted its worker group's placement group (`ReleaseStoppedWorkers`)."""
    import ray.train
    from ray.util import get_current_placement_group

    from ecomray.runtime import is_uri, quiet_termination

    quiet_termination()         # this worker is ended with its trial
    pg = get_current_placement_group()
    # (on object-store run folders there is no file to append to: Ray Train's own cleaner is all there is)
    if pg is not None and ray.train.get_context().get_world_rank() == 0 and not is_uri(cfg["_pg_file"]):
        os.makedirs(os.path.dirname(cfg["_pg_file"]), exist_ok=True)
        with open(cfg["_pg_file"], "a") as fh:
            fh.write(pg.id.hex() + "\n")
    from ecomray.train.loop import train_loop

    train_loop({k: v for k, v in cfg.items() if k != "_pg_file"})
