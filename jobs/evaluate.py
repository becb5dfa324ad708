"""python -m jobs.evaluate experiment=<name> [evaluate.version=...] [evaluate.split=val|test]: re-score a version."""
import hydra
from omegaconf import DictConfig

from ecomray.evaluation import evaluate_version
from ecomray.runtime import to_plain, user_errors

# Sections a version brings with it: a command-line override of them changes nothing in its scoring.
VERSION_SECTIONS = ("task", "model", "optim", "train", "dataset")


def ignored_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides (`HydraConfig.get().overrides.task`) of settings the version's own saved config
    replaces (`task.eval_sampled=100` was dropped without a word; `evaluate.task` is the knob that applies)."""
    keys = [(o, o.lstrip("+~").split("=", 1)[0]) for o in overrides]
    # (a group choice such as dataset=x, and task.name / dataset.name, pick the default model name: they apply)
    return [o for o, k in keys if "." in k and k.split(".")[0] in VERSION_SECTIONS
            and k not in ("task.name", "dataset.name")]


def run(cfg: DictConfig | dict, overrides: list[str] | None = None) -> dict:
    ignored = ignored_overrides(overrides or [])
    if ignored:
        print(f"[evaluate] note: {' '.join(ignored)} changes nothing here: a version is scored with the settings "
              f"saved with it; scoring settings go in evaluate.task, e.g. 'evaluate.task={{eval_sampled: 100}}'",
              flush=True)
    return evaluate_version(to_plain(cfg))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
