"""The cluster path, as docs/cluster.md tells users to take it, on a real two-node Ray cluster on this machine: a head
and a worker node started with `ray start` (their own resources; only the worker has `worker_node`), the tiny
pipeline submitted with `ray job submit --working-dir .` (a working directory only: a pip list would download at run
time), its Train workers placed on the worker node; then a Serve app deployed with `serve deploy` and hot-swapped
through its config, a bad version included, under load.

Slow (a cluster start, a job, a deploy: a few minutes on 2 cores); it runs in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve.settings import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, no_local_ray: None) -> Any:
    """`ray start --head` (1 CPU, the dashboard for jobs and `serve deploy`) + `ray start --address` (2 CPUs and the
    custom resource `worker_node`), in their own temp folder; the token exported as the docs say."""
    tmp = tmp_path_factory.mktemp("cluster")
    # Ray's own folder must be short: its Unix sockets live under it and AF_UNIX paths stop at 107 bytes
    ray_tmp = Path(tempfile.mkdtemp(prefix="ecr-", dir="/tmp"))
    # every port explicit and distinct: two nodes on one machine would both take Ray's default agent port (52365),
    # and any other Ray on the machine may hold the defaults
    gcs, dash, client, agent_head, agent_worker = _free_ports(5)
    # the project's environment activated, as on every node of a real cluster (`python` in a job is that one)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(BIN.parent)}
    env.pop("RAY_ADDRESS", None)
    try:
        _run([str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--num-cpus", "1",
              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", str(ray_tmp / "ray"),
              "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_head),
              "--node-ip-address", "127.0.0.1", "--disable-usage-stats"], env)
        token = _run([str(BIN / "ray"), "get-auth-token"], env, check=False).stdout.strip().splitlines()
        if token:
            env.update(RAY_AUTH_TOKEN=token[-1], RAY_AUTH_MODE="token")
        _run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2",
              "--resources", json.dumps({"worker_node": 1}), "--node-ip-address", "127.0.0.1",
              "--dashboard-agent-listen-port", str(agent_worker), "--disable-usage-stats"], env)
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
        _wait_listening(env["RAY_ADDRESS"] + "/api/version")
        yield {"env": env, "tmp": tmp, "gcs": f"127.0.0.1:{gcs}", "dashboard": env["RAY_ADDRESS"]}
    finally:
        _stop_cluster(ray_tmp, client_port=client)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open at once while choosing)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _stop_cluster(tmp: Path, client_port: int | None = None) -> None:
    """Stop this cluster's processes only: those that name its temp folder on their command line, the Ray client
    server on its port, and their children. `ray stop` would kill every Ray process on the machine, the local Ray of
    this very test session included."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            args = p.info["cmdline"] or []
            client = client_port is not None and "ray.util.client.server" in args and f"--port={client_port}" in args
            if p.pid != os.getpid() and (client or any(str(tmp) in a for a in args)):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in list(mine):   # and their children: Ray's agents retitle themselves (`ray::DashboardAgent`), so their
        try:               # command line no longer names the folder, and they outlived the test at 30% of a core
            mine += [c for c in p.children(recursive=True) if c not in mine]
        except psutil.NoSuchProcess:
            continue
    for p in mine:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_pipeline_submitted_as_a_job_trains_on_the_worker_node(cluster: Any) -> None:
    env, home = cluster["env"], cluster["tmp"] / "home"
    runtime_env = {"excludes": [".venv/", "runs/", "outputs/", "multirun/", "benchmarks/work/", ".git/"],
                   "env_vars": {"ECOMRAY_HOME": str(home)}}
    cmd = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "-m", "jobs.pipeline", "dataset.synthetic.users=300", "train.epochs=2",
           "+scaling.resources_per_worker.worker_node=0.01", "deploy.port=0",
           "pipeline.stages=[prepare,train,evaluate,deploy]"]
    deadline = time.time() + 120
    while True:             # the head's job agent comes up a few seconds after the dashboard
        out = _run(cmd, env, timeout=900, check=False)
        if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    log = out.stdout + out.stderr
    assert "succeeded" in log.lower(), log[-3000:]
    # the registry got the version, and Serve answered the stored example request
    versions = sorted((home / "registry" / "next_item_synthetic").glob("v0*"))
    assert versions, log[-2000:]
    assert "POST /v1/recommend" in log and "-> 200" in log
    # the Train workers ran on the worker node (the only node with the worker_node resource)
    actors = json.loads(_run([str(BIN / "ray"), "list", "actors", "--format", "json", "--limit", "1000",
                              "--filter", "class_name=RayTrainWorker", "--address", cluster["dashboard"]],
                             env).stdout)
    nodes = json.loads(_run([str(BIN / "ray"), "list", "nodes", "--format", "json", "--address",
                             cluster["dashboard"]], env).stdout)
    worker = {n["node_id"] for n in nodes if "worker_node" in (n.get("resources_total") or {})}
    assert actors and worker and {a["node_id"] for a in actors} <= worker, (actors, nodes)


def test_serve_deploy_hot_swap_to_a_bad_version_keeps_serving(cluster: Any) -> None:
    """`jobs.deploy deploy.write_config=...` then `serve deploy`, as docs/serving.md says; a second version swapped
    in by editing user_config.version; then a missing version and a path out of the registry, under load: every
    request answered, the old version kept, the failed swap reported by /v1/models."""
    from ecomray.config import compose
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit

    env, home = cluster["env"], cluster["tmp"] / "serve-home"
    cfg = compose("train", [f"paths.root={home}", "experiment=tiny", "scaling=inproc", "train.epochs=1",
                            "dataset.synthetic.users=300"])
    prepare(cfg)
    v1, v2 = fit(cfg)["version"], fit({**cfg, "seed": 7, "run_name": "second"})["version"]
    port = free_port()
    config = cluster["tmp"] / "serve_config.yaml"
    _run([sys.executable, "-m", "jobs.deploy", "experiment=tiny", f"paths.root={home}", f"deploy.port={port}",
          f"deploy.endpoints={{recommend: {{model: next_item_synthetic, ref: {v1}}}}}",
          "serve.routes={recommend: {num_replicas: 2}}", f"deploy.write_config={config}"], env)
    serve_bin = str(BIN / "serve")
    # the pipeline job above left Serve's proxy up on the port it chose; a config's http_options apply only when
    # Serve starts, so start it afresh (docs/cluster.md says so too)
    _run([serve_bin, "shutdown", "-y", "-a", cluster["dashboard"]], env, check=False)
    _run([serve_bin, "deploy", str(config), "-a", cluster["dashboard"]], env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
    except AssertionError as err:
        status = _run([serve_bin, "status", "-a", cluster["dashboard"]], env, check=False)
        raise AssertionError(f"{err}\n{status.stdout[-4000:]}{status.stderr[-2000:]}") from None
    spec = yaml.safe_load(config.read_text())
    history = spec["applications"][0]["args"]["app"]["endpoints"]["recommend"]
    body = {"history": [], "k": 3}
    seen: list[tuple[int, str]] = []

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while not stop.is_set():
                r = await client.post("/v1/recommend", json=body)
                seen.append((r.status_code, r.json().get("model", {}).get("version", "?")))

    def swap(version: str) -> None:
        spec["applications"][0]["deployments"][0]["user_config"]["version"] = version
        config.write_text(yaml.safe_dump(spec))
        _run([serve_bin, "deploy", str(config), "-a", cluster["dashboard"]], env)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(load(stop))
        await asyncio.sleep(1.0)
        for version in (v2, "v9999", "../../../etc"):
            await asyncio.get_running_loop().run_in_executor(None, swap, version)
            await asyncio.sleep(4.0)
        stop.set()
        await task

    asyncio.run(main())
    assert seen and all(s == 200 for s, _ in seen), sorted({s for s, _ in seen})
    assert seen[-1][1] == v2 and v1 in {v for _, v in seen}
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["loaded"][0]
    assert models["version"] == v2 and models["failed_swap"]["ref"] in ("v9999", "../../../etc")
    assert len(models["replicas"]) == 2 and {r["version"] for r in models["replicas"]} == {v2}
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert history["version"] == v1
    _run([serve_bin, "shutdown", "-y", "-a", cluster["dashboard"]], env, check=False)


def _wait_listening(url: str, timeout: float = 60) -> None:
    """Until the dashboard answers at all (any status: it wants the token)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered (see the dashboard logs)")


def _wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} never became healthy")
