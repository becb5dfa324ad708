"""Hyperparameter sweeps: Ray Tune drives the same training driver (`ecomray.train.driver.fit`) as `jobs.train`.

A sweep is data (`conf/sweep/<name>.yaml`, the `sweep` key of the config):

    name: tiny                  # Tune run folder <paths.runs>/<name>; re-running the same name resumes it
    metric: null                # default train.monitor; mode default train.mode
    num_samples: 1              # samples of the space (each grid point is crossed with every sample)
    search: random              # random | optuna (OptunaSearch; no grid entries)
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: none}
    time_budget_s: 600
    fixed: {train.epochs: 3}    # dotted overrides applied to every trial
    points_to_evaluate: []      # optional: configurations (a value for every space key) tried first
    space:                      # dotted config paths -> one distribution each
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also uniform [lo, hi], randint [lo, hi), choice [...], grid [...]

Each trial runs `fit(trial_cfg, callbacks=[TuneReportCallback()], register=False, evaluate=False)`; its Train
checkpoints (each holding the best weights so far) go under `<sweep dir>/trials/<trial id>`. Trials never
register. After the sweep `run_sweep` writes `trials.csv`, `curves.png`, `experiment/<name>_best.yaml`,
`summary.json`, scores the best trial's best weights on val and test, registers that one version with its sweep
lineage and points the `best` alias at it.

One concern per file: `spec.py` (the sweep as data), `resources.py` (what a trial holds; releasing stopped
trials' workers), `trial.py` (the trainable), `results.py` (table and curves), `export.py` (the winner as an
experiment file), `sweep.py` (run_sweep).
"""

from ecomray.train.tune.resources import max_concurrent_trials, trial_resources
from ecomray.train.tune.spec import apply_overrides, get_path, param_space, sweep_spec
from ecomray.train.tune.sweep import run_sweep

__all__ = ["run_sweep", "sweep_spec", "param_space", "apply_overrides", "get_path", "trial_resources",
           "max_concurrent_trials"]
