"""python -m jobs.pipeline [experiment=tiny]: prepare -> train -> evaluate, end to end, on one config."""
from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from ecomray.runtime import to_plain, user_errors


def run(cfg: DictConfig | dict) -> dict:
    plain = to_plain(cfg)
    stages = list(plain["pipeline"]["stages"])
    results: dict = {}
    t0 = time.time()
    for stage in stages:
        print(f"\n=== pipeline: {stage} ===", flush=True)
        if stage == "prepare":
            from ecomray.data.prepare import run as prepare

            results["prepare"] = prepare(plain)
        elif stage == "train":
            from ecomray.train.driver import fit

            results["train"] = fit(plain)
        elif stage == "evaluate":
            from jobs.evaluate import run as evaluate

            version = (results.get("train") or {}).get("version")
            results["evaluate"] = evaluate({**plain, "evaluate": {**plain.get("evaluate", {}),
                                                                  **({"version": version} if version else {})}})
        else:
            raise ValueError(f"unknown pipeline stage {stage!r}")
    print(f"\n=== pipeline done in {time.time() - t0:.1f}s: {', '.join(stages)} ===", flush=True)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
