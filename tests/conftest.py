from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest


PLUGIN_DIR = Path(tempfile.mkdtemp(prefix="ecomray-test-plugins-"))


def pytest_configure(config: pytest.Config) -> None:
    """Before any test (and so before any Ray starts): a folder on the import path of this process and, through
    PYTHONPATH, of every Ray worker and Serve replica, where a test writes code that is not part of the project
    (tests/test_protocol.py's throwaway family)."""
    sys.path.insert(0, str(PLUGIN_DIR))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), os.environ.get("PYTHONPATH")) if p)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(PLUGIN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def plugin_dir() -> Path:
    return PLUGIN_DIR


@pytest.fixture(scope="session")
def _ray_at_exit():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_at_exit):
    """One local Ray for the tests that need real Ray workers (2 CPUs, like the CI machine), shared across modules
    and started again after a module that needed the machine to itself (`no_local_ray`)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray


@pytest.fixture(scope="module")
def no_local_ray():
    """For tests that start Ray in other processes (a job in a subprocess, `ray start` nodes): the test session's own
    Ray is stopped first. Two Ray instances on one machine confuse Ray's address discovery (Ray Train's placement
    group cleaner then prints tracebacks) and its log routing; a user's machine runs one."""
    import ray

    ray.shutdown()
    yield


def write_fake_events_shards(folder: str | os.PathLike[str], rows: list[tuple[str, str, str]], shards: int = 2,
                             name: str = "fake") -> dict:
    """Write `rows` of (user_id, item_id, event), in time order per user, as a prepared events shard set in the data
    plane's layout: `manifest.json` + `shards/part-XXXXX.parquet`, a user's rows in one shard sorted by (ts, _file,
    _row), with `_file`, `_row` and a row-level leave-one-out `split` column. Returns the manifest."""
    folder = Path(folder)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    users = sorted({u for u, _, _ in rows})
    count: dict[str, int] = {}
    records = []
    for k, (u, i, e) in enumerate(rows):
        n = count[u] = count.get(u, 0) + 1
        records.append({"user_id": u, "item_id": i, "event": e, "ts": t0 + timedelta(minutes=n), "price": 1.0,
                        "category": "c", "session_id": f"{u}-s", "quantity": 1, "_file": 0, "_row": k})
    df = pl.DataFrame(records).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    pos = pl.int_range(pl.len()).over("user_id", order_by=["ts", "_file", "_row"])
    size = pl.len().over("user_id")
    df = df.with_columns(split=pl.when(pos == size - 1).then(pl.lit("test"))
                         .when(pos == size - 2).then(pl.lit("val")).otherwise(pl.lit("train")))
    entries = []
    for s in range(shards):
        part = df.filter(pl.col("user_id").is_in(users[s::shards])).sort(["user_id", "ts", "_file", "_row"])
        f = f"shards/part-{s:05d}.parquet"
        part.write_parquet(folder / f)
        entries.append({"file": f, "rows": part.height})
    manifest = {"dataset": name, "schema": {"name": "events"}, "split": {"strategy": "leave_one_out"},
                "shards": entries, "rows_in": len(rows), "rows_out": len(rows), "rows_quarantined": 0,
                "reasons": {}, "sources": [], "licence": "test fixture", "research_only": False,
                "hash": "0" * 64, "ecomray_version": "test"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Selenium, with Debian's chromium and chromium-driver (.ci/run installs them when it
    runs as root). The driver path is given explicitly: Selenium would otherwise try to download one."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no browser: {CHROMIUM} and {CHROMEDRIVER} are needed "
                    "(apt-get install chromium chromium-driver; .ci/run does when it runs as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1600"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
