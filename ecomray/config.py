"""Compose a job's config outside `@hydra.main` (Serve's app builder, benchmarks, tests): the same `conf/` tree the
jobs use (`ECOMRAY_CONF` points elsewhere), the same overrides, resolved to plain dicts (`runtime.to_plain`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ecomray.runtime import to_plain

CONF_DIR = os.environ.get("ECOMRAY_CONF") or str(Path(__file__).resolve().parents[1] / "conf")


def compose(job: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """`conf/<job>.yaml` with Hydra overrides, resolved."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return to_plain(hydra_compose(job, overrides=list(overrides), return_hydra_config=True))
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return to_plain(hydra_compose(job, overrides=list(overrides), return_hydra_config=True))
