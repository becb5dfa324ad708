"""The Serve app: unit tests of the guard middleware and the generic model server without Serve, then one Serve
instance per module (tiny models trained in-process, a free loopback port) for the HTTP tests: end to end against
offline predict, fallback and warnings, 422/413/503, category filters, hot swap, schema fuzzing, and a replica
killed under load."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from ecomray import registry
from ecomray.inference import load_model
from ecomray.runtime import UserError
from serve.middleware import Guard, GuardSettings
from serve.settings import check_bind, free_port, is_loopback
from tests.test_prepare import DATASETS
from tests.test_train_next_item import compose_cfg

HAVE_SHOPPERS = os.path.exists(os.path.join(DATASETS, "online_shoppers_intention", "online_shoppers_intention.csv"))


# ---------------------------------------------------------------------------------------------------------------
# Unit tests: no Ray, no Serve.

async def _ok_app(scope: dict, receive: Any, send: Any) -> None:
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-model-version", b"m:v0001")]})
    await send({"type": "http.response.body", "body": json.dumps({"got": len(body)}).encode()})


async def _boom_app(scope: dict, receive: Any, send: Any) -> None:
    raise RuntimeError("bug")


def _client(app: Any, **settings: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=Guard(app, GuardSettings(**settings))),
                             base_url="http://test")


def test_guard_api_key_body_cap_and_catch_all() -> None:
    async def main() -> None:
        async with _client(_ok_app, api_key="s3cret", max_body_bytes=100) as c:
            assert (await c.post("/v1/recommend", json={})).status_code == 401
            assert (await c.post("/v1/recommend", json={}, headers={"X-API-Key": "wrong"})).status_code == 401
            r = await c.post("/v1/recommend", json={"a": 1}, headers={"X-API-Key": "s3cret"})
            assert r.status_code == 200 and r.json() == {"got": len(b'{"a":1}')}
            assert (await c.get("/healthz")).status_code == 200          # the health probe needs no key
            big = {"x": "y" * 200}
            r = await c.post("/v1/recommend", json=big, headers={"X-API-Key": "s3cret"})
            assert r.status_code == 413 and "100-byte" in r.json()["detail"]

            async def chunks():                                             # no Content-Length: streamed body
                for _ in range(5):
                    yield b"x" * 40
            r = await c.post("/v1/recommend", content=chunks(), headers={"X-API-Key": "s3cret"})
            assert r.status_code == 413

            async def small():
                yield b"x" * 40
            r = await c.post("/v1/recommend", content=small(), headers={"X-API-Key": "s3cret"})
            assert r.status_code == 200 and r.json() == {"got": 40}
        async with _client(_boom_app) as c:
            r = await c.get("/v1/models")
            assert r.status_code == 500 and "internal error" in r.json()["detail"]

    asyncio.run(main())


def test_guard_logs_a_disconnect_as_499_and_escapes_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that went away mid-upload was logged and counted as a 500 (error-rate alerts); a percent-decoded
    newline in the path wrote a second, forged request line into the log."""
    import logging

    guard = Guard(_ok_app, GuardSettings())
    recorded: list[int] = []
    guard._record = lambda route, status, version, ms: recorded.append(status)   # type: ignore[method-assign]
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> None:
        parts = [{"type": "http.request", "body": b'{"hist', "more_body": True}, {"type": "http.disconnect"}]

        async def receive() -> dict:
            return parts.pop(0)

        await guard({"type": "http", "method": "POST", "path": "/v1/recommend",
                     "headers": [(b"content-type", b"application/json")]}, receive, send)
        assert sent == []
        forged = "/x\nrequest route=POST /v1/recommend status=200 latency_ms=1.00 model_version=forged"
        parts.append({"type": "http.request", "body": b""})
        await guard({"type": "http", "method": "GET", "path": forged, "headers": []}, receive, send)

    # The Guard's log lines, caught on a logger of the test's own: after Serve has run in this process (the full
    # suite), Serve's logging setup kept them from caplog however it was attached (the test depended on which tests
    # ran before it)
    caught: list[logging.LogRecord] = []
    own = logging.Logger("guard-under-test", logging.INFO)
    own.addHandler(type("Catch", (logging.Handler,), {"emit": lambda self, record: caught.append(record)})())
    # (the very globals the Guard's code reads, whichever module object it came from)
    monkeypatch.setitem(Guard.__call__.__globals__, "logger", own)
    asyncio.run(main())
    assert recorded == [499, 200]
    lines = [r.getMessage() for r in caught if r.getMessage().startswith("request route=")]
    assert "status=499" in lines[0] and len(lines) == 2 and "\n" not in lines[1] and "\\n" in lines[1]


def test_bind_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(UserError, match="API key"):
        check_bind("0.0.0.0", None)
    from jobs.deploy import start

    from jobs.deploy import serve_config

    for port in (99999, -1, "http", True, None):          # refused before Ray or Serve starts (was an OverflowError)
        with pytest.raises(UserError, match=r"deploy.port=.*a TCP port, 0-65535"):
            start({"deploy": {"host": "127.0.0.1", "port": port}, "serve": {}})
        with pytest.raises(UserError, match=r"deploy.port=.*a TCP port, 0-65535"):   # and in a written serve config
            serve_config({"deploy": {"host": "127.0.0.1", "port": port}, "serve": {}})
    from serve.settings import endpoint_table

    for bad, says in (([["recommend"]], "deploy.endpoints=.*a mapping of route"), (5, "deploy.endpoints=5"),
                      ({"recommend": ["a"]}, r"deploy.endpoints.recommend=\['a'\]: a model name")):
        with pytest.raises(UserError, match=says):      # an AttributeError traceback before
            endpoint_table({"deploy": {"endpoints": bad}})
    # a port something already listens on: Serve's proxy failed to bind after Ray had started (a traceback); the
    # deploy job now asks before Ray starts
    import socket

    from jobs.deploy import _port_taken

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert "in use" in (_port_taken("127.0.0.1", busy.getsockname()[1]) or "")
        free = busy.getsockname()[1]
    assert _port_taken("127.0.0.1", free) is None
    # IPv6: free_port bound an IPv4 socket to "::1" (a traceback), and the printed URL lacked brackets
    from serve.settings import client_url, free_port

    assert client_url("::1", 8000, "/app") == "http://[::1]:8000/app"
    assert client_url("::", 8000) == client_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert client_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            return                                              # no IPv6 loopback on this machine
        assert 0 < free_port("::1") < 65536


def test_replica_versions_of_a_route_leave_a_nested_routes_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route `score` listed the KV board under `.../score/`, which holds `score/propensity`'s reports too: it read
    them as its own dead replicas and deleted them, so /v1/models lost the nested route's versions."""
    import ray
    import ray.experimental.internal_kv as kv

    from serve.endpoint import BOARD, replica_versions
    from serve.settings import endpoint_table

    board = {f"{BOARD}/app/score/r1".encode(): json.dumps({"version": "v0001", "ts": 0}).encode(),
             f"{BOARD}/app/score/propensity/r2".encode(): json.dumps({"version": "v0002", "ts": 0}).encode()}
    monkeypatch.setattr(kv, "_internal_kv_list", lambda prefix: [k for k in board if k.startswith(prefix.encode())])
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: board.get(key))
    monkeypatch.setattr(kv, "_internal_kv_del", lambda key: board.pop(key))
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces: [
        {"name": "SERVE_REPLICA::app#model_score#r1"}, {"name": "SERVE_REPLICA::app#model_score_propensity#r2"}])
    assert [e["version"] for e in replica_versions("app", "score")] == ["v0001"]
    assert [e["version"] for e in replica_versions("app", "score/propensity")] == ["v0002"]
    assert len(board) == 2
    # two routes that would be one Serve deployment (model_a_b) are refused
    with pytest.raises(UserError, match=r"routes 'a/b' and 'a_b' differ only in '/' against '_'"):
        endpoint_table({"deploy": {"endpoints": {"a/b": "m1", "a_b": "m2"}}})


def test_ingress_refuses_non_loopback_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.app import Ingress

    monkeypatch.delenv("ECOMRAY_API_KEY", raising=False)
    user_cls = Ingress.func_or_class.__mro__[1]           # the class under Serve's ASGI wrapper
    with pytest.raises(UserError, match="API key"):
        user_cls.__init__(object.__new__(user_cls), {}, settings={"host": "0.0.0.0"})
    user_cls.__init__(object.__new__(user_cls), {}, settings={"host": "0.0.0.0", "api_key": "k"})


def test_with_a_key_the_pages_open_and_the_api_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A browser opens the playground and the API reference without custom headers; everything else needs the
    key, and the OpenAPI document declares it so Swagger UI's Authorize button sends it."""
    from serve.app import Ingress, build_fastapi

    monkeypatch.delenv("ECOMRAY_API_KEY", raising=False)
    user_cls = Ingress.func_or_class.__mro__[1]
    ingress = object.__new__(user_cls)
    user_cls.__init__(ingress, {}, settings={"host": "0.0.0.0", "api_key": "k", "endpoints": {
        "recommend": {"model": "m", "unavailable": "not trained"}}})

    async def main() -> None:
        transport = httpx.ASGITransport(app=build_fastapi(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for path in ("/", "/playground", "/docs", "/openapi.json", "/healthz",
                         "/static-offline-docs/swagger-ui.css"):
                assert (await c.get(path)).status_code != 401, path
            for path in ("/v1/models", "/v1/examples", "/docs2", "/static-offline-docsx/a"):
                assert (await c.get(path)).status_code == 401, path
            assert (await c.post("/v1/recommend", json={})).status_code == 401
            r = await c.post("/v1/recommend", json={}, headers={"X-API-Key": "k"})
            assert r.status_code == 503 and "not trained" in r.json()["detail"]
            spec = (await c.get("/openapi.json")).json()
            assert spec["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header",
                                                                       "name": "X-API-Key"}
            assert spec["paths"]["/v1/recommend"]["post"]["security"] == [{"apiKey": []}]
        ingress.guard.docs_without_key = False                       # serve.docs_without_key=false (cluster)
        transport = httpx.ASGITransport(app=build_fastapi(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            for path in ("/docs", "/openapi.json", "/static-offline-docs/swagger-ui.css"):
                assert (await c.get(path)).status_code == 401, path
            assert (await c.get("/openapi.json", headers={"X-API-Key": "k"})).status_code == 200
            assert (await c.get("/playground")).status_code == 200

    asyncio.run(main())


def test_an_app_the_cluster_cannot_hold_is_named_before_serve_waits() -> None:
    """Serve waits, silently, for replicas no node can hold (`serve=cluster` on a laptop): the deploy job reads the
    app's minimum replicas against the nodes first."""
    from serve.settings import placement_problems, replica_demand

    args = {"serve": {"common": {"ray_actor_options": {"num_cpus": 0.25}, "autoscaling_config": {"min_replicas": 1}},
                      "ingress": {"ray_actor_options": {"num_cpus": 2}, "autoscaling_config": {"min_replicas": 2}}},
            "endpoints": {"recommend": {"version": "v0001", "deployment": {
                              "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}, "num_replicas": 2}},
                          "canary": {"version": "v0002", "inline": True},
                          "gone": {"unavailable": "not in the registry"}}}
    demand = replica_demand(args)
    assert demand == {"ingress": ({"CPU": 2.0}, 2), "/v1/recommend": ({"CPU": 2.0, "GPU": 1.0}, 2)}
    laptop = [{"CPU": 2.0, "memory": 8e9}]
    assert placement_problems(demand, laptop) == [
        "ingress needs 2 replica(s) of {'CPU': 2.0}, the nodes can hold 1",
        "/v1/recommend needs 2 replica(s) of {'CPU': 2.0, 'GPU': 1.0}, the nodes can hold 0"]
    gpu_nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert placement_problems(demand, gpu_nodes) == []                # 2 + 2 CPUs per node, one GPU each
    small = {"ingress": ({"CPU": 1.0}, 1), "/v1/a": ({"CPU": 1.0}, 1), "/v1/b": ({"CPU": 0.5}, 1)}
    assert placement_problems(small, laptop) == [                     # each fits alone, not all together
        "all minimum replicas together need more than the cluster has ({'CPU': '2.5 > 2'})"]
    local = {"serve": {"common": {"ray_actor_options": {"num_cpus": 0.25}}}, "endpoints": {
        r: {"version": "v1", "deployment": {"ray_actor_options": {"num_cpus": 0.25},
                                            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}}
        for r in ("recommend", "sentiment", "ctr")}}
    assert placement_problems(replica_demand(local), laptop) == []    # what serve=local deploys on 2 CPUs


# ---------------------------------------------------------------------------------------------------------------
# Trained tiny models (module-scoped: trained once, in-process).

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from ecomray.data.prepare import run as prepare
    from ecomray.train.driver import fit

    root = tmp_path_factory.mktemp("serve")
    cfg = compose_cfg("deploy", root, "experiment=tiny", "scaling=inproc", "train.epochs=2",
                      "dataset.synthetic.users=400")
    prepare(cfg)
    out = {"cfg": cfg, "root": root, "recommend": fit(cfg)}
    if HAVE_SHOPPERS:
        pcfg = compose_cfg("deploy", root, "experiment=tiny_propensity", f"paths.datasets={DATASETS}",
                           "train.epochs=2")
        prepare(pcfg)
        out["propensity"] = fit(pcfg)
    scfg = compose_cfg("deploy", root, "experiment=tiny_sentiment")   # the generated review table: no download
    prepare(scfg)
    out["sentiment"] = fit(scfg)
    return out


def _server(reg: str, name: str, version: str | None = None, **options: Any):
    from serve.endpoint import ModelServer

    return ModelServer(reg, name, registry.resolve(reg, name, version), "recommend",
                       {"max_history": 50, **options})


def test_model_server_health_bad_swaps_and_path_safety(trained: dict[str, Any]) -> None:
    """A hot swap to a ref that is missing, outside the registry or broken never takes the route down: the
    loaded version keeps serving and describe() names the failed ref."""
    cfg = trained["cfg"]
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    rec = _server(reg, name)
    rec.check_health()
    v1 = rec.loaded.version
    with pytest.raises(UserError, match="invalid registry name"):
        _server(reg, "../" + name)
    for bad in ("../../etc", "v9999", "no-such-alias"):
        asyncio.run(rec.reconfigure({"ref": bad}))
        assert rec.loaded.version == v1 and rec.describe()["failed_swap"]["ref"] == bad
        rec.check_health()
    asyncio.run(rec.reconfigure({"version": v1}))                 # a good config clears the failure
    assert rec.describe()["failed_swap"] is None
    rec.loaded = None
    with pytest.raises(RuntimeError, match="no model loaded"):
        rec.check_health()


def test_a_replica_leases_a_version_before_loading_it(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """`jobs.registry gc` skips leased versions; the lease used to be taken only after the load, so a gc during a
    load could delete the version being read. A load that fails gives its lease back."""
    from serve import endpoint

    cfg = trained["cfg"]
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    seen: list[set[str]] = []
    real_load = endpoint.load_model
    monkeypatch.setattr(endpoint.ModelServer, "_board_key", lambda self: "board/app/recommend/replica-1")
    monkeypatch.setattr(endpoint, "load_model", lambda *a, **k: (seen.append(registry.leased(reg, name)),
                                                                 real_load(*a, **k))[1])
    rec = _server(reg, name)
    assert seen == [{rec.loaded.version}]
    def broken(*a: Any, **k: Any) -> Any:
        seen.append(registry.leased(reg, name))
        raise RuntimeError("damaged")

    _, other = _second_version(reg, name)
    monkeypatch.setattr(endpoint, "load_model", broken)
    with pytest.raises(RuntimeError, match="damaged"):
        rec._load(other)
    assert seen[-1] == {rec.loaded.version, other}        # leased while it loaded
    assert registry.leased(reg, name) == {rec.loaded.version}   # and given back when the load failed
    with pytest.raises(UserError, match="v0999 is not in the registry"):   # gone (gc): no lease, no load
        rec._load("v0999")
    assert registry.leased(reg, name) == {rec.loaded.version} and len(seen) == 2
    registry.release(reg, name, rec.loaded.version, "replica-1")
    shutil.rmtree(os.path.join(reg, name, other))         # the other tests see the versions they trained


def test_swaps_that_would_break_a_route_are_refused_and_late_replicas_start(trained: dict[str, Any],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review of the serving code:
    - a hot swap to a version that takes other request fields (a CTR model over other fields) was made: the ingress
      kept the deployed version's schema, every request then failed (500) and /healthz said ok;
    - a replica started after a swap (autoscaling, a restart) is built with the deployed version, which gc may have
      deleted: its constructor failed, so the route could neither scale nor recover;
    - failed_swap (GET /v1/models) showed the server's registry folder;
    - a batching typo in user_config made reconfigure raise (Serve stops such a replica), half applied."""
    from pydantic import create_model

    from ecomray.tasks import next_item
    from serve import endpoint

    cfg = trained["cfg"]
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    real_api = next_item.api
    monkeypatch.setattr(next_item, "api", lambda meta, limits: (
        (create_model("Other", shop=(str, ...)), real_api(meta, limits)[1]) if meta.get("other_fields")
        else real_api(meta, limits)))
    old = registry.load(reg, name, None)
    other = registry.register(reg, name, old["state_dict"], old["config"], old["metrics"],
                              {**old["meta"], "other_fields": True}, old["lineage"])
    rec = _server(reg, name, old["version"])
    asyncio.run(rec.reconfigure({"version": other}))
    assert rec.loaded.version == old["version"]
    failed = rec.describe()["failed_swap"]
    assert failed["ref"] == other and "request schema differs" in failed["error"] and "deploy.rollout" in failed["error"]
    # a damaged version's error names <registry>, not the server's folder
    os.remove(os.path.join(reg, name, other, "meta.json"))
    asyncio.run(rec.reconfigure({"version": other}))
    assert reg not in rec.describe()["failed_swap"]["error"] and "<registry>" in rec.describe()["failed_swap"]["error"]
    shutil.rmtree(os.path.join(reg, name, other))
    # batching typos: refused whole, the replica keeps its settings and keeps serving
    before = rec.batch_stats()
    for bad in ({"max_batch_size": 0}, {"batch_wait_timeout_s": -1, "max_batch_size": 4}, {"in_thread": "false"},
                {"max_batch_size": "32x"}, {"max_batchsize": 4}):
        asyncio.run(rec.reconfigure({"batching": bad}))
        assert rec.describe()["failed_swap"]["ref"] == "batching"
        assert {k: rec.batch_stats()[k] for k in ("max_batch_size", "batch_wait_timeout_s")} == \
            {k: before[k] for k in ("max_batch_size", "batch_wait_timeout_s")}
    # ... also when the config carries the version too, as every written serve config does (it was cleared)
    asyncio.run(rec.reconfigure({"version": old["version"], "ref": None, "batching": {"max_batch_size": 0}}))
    assert rec.describe()["failed_swap"]["ref"] == "batching"
    assert asyncio.run(rec({"history": _histories(trained, 1)[0], "k": 3}))["status"] == 200
    # a replica whose deployed version gc deleted starts, and loads the served version on its first reconfigure
    monkeypatch.setattr(endpoint.ModelServer, "_board_key", lambda self: "board/app/recommend/replica-9")
    late = endpoint.ModelServer(reg, name, "v0999", "recommend", {"max_history": 50})
    assert late.loaded is None and "v0999 is not in the registry" in late.describe()["failed_swap"]["error"]
    asyncio.run(late.reconfigure({"version": old["version"]}))
    assert late.loaded.version == old["version"] and late.describe()["failed_swap"] is None
    late.check_health()
    registry.release(reg, name, old["version"], "replica-9")


def test_exclude_history_covers_the_part_past_max_history(trained: dict[str, Any]) -> None:
    """Only the most recent max_history items are scored, but with exclude_history none of the history may come
    back: the older part used to be recommended (all 10 of the model's favourites, put first in the history)."""
    cfg = trained["cfg"]
    rec = _server(cfg["paths"]["registry"], trained["recommend"]["name"])     # max_history 50
    recent = rec.loaded.meta["item_ids"][:50]
    top = [i["item_id"] for i in asyncio.run(rec({"history": recent, "k": 10}))["body"]["items"]]
    out = asyncio.run(rec({"history": top + recent, "k": 10}))["body"]
    got = [i["item_id"] for i in out["items"]]
    assert len(got) == 10 and not set(got) & set(top + recent), got
    assert "only the most recent 50 are used" in out["warnings"][0]
    kept = asyncio.run(rec({"history": top + recent, "k": 10, "exclude_history": False}))["body"]["items"]
    alone = asyncio.run(rec({"history": recent, "k": 10, "exclude_history": False}))["body"]["items"]
    assert kept == alone                                        # not excluded: the scored part alone decides


def _second_version(reg: str, name: str) -> tuple[dict, str]:
    """Register a perturbed copy of the newest version: a different model to swap to."""
    old = registry.load(reg, name, None)
    g = torch.Generator().manual_seed(0)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in old["state_dict"].items()}
    return old, registry.register(reg, name, state, old["config"], old["metrics"], old["meta"], old["lineage"])


def test_reconfigure_swaps_in_place_without_failing_requests(trained: dict[str, Any]) -> None:
    """The family class itself (no Serve): requests keep flowing while reconfigure() loads another version; each
    request is answered whole by one version, and the swap happens once."""
    cfg = trained["cfg"]
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    old, new_version = _second_version(reg, name)
    rec = _server(reg, name, old["version"])
    hist = _histories(trained, 1)[0]
    seen: list[str] = []

    async def main() -> dict:
        async def client(n: int) -> None:
            for _ in range(n):
                out = await rec({"history": hist, "k": 5})
                assert out["status"] == 200 and len(out["body"]["items"]) == 5
                seen.append(out["body"]["model"]["version"])
                await asyncio.sleep(0.002)

        flow = asyncio.gather(*(client(40) for _ in range(4)))
        await asyncio.sleep(0.05)
        await rec.reconfigure({"version": new_version})
        await flow
        return (await rec({"history": hist, "k": 5}))["body"]

    out = asyncio.run(main())      # one event loop: the batcher's queue lives on the loop that first used it
    assert len(seen) == 160 and seen[0] == old["version"] and seen[-1] == new_version
    first_new = seen.index(new_version)
    # after the swap only requests already in flight (at most one per client) finish on the old version
    assert seen[first_new:].count(old["version"]) <= 4 and seen[-20:] == [new_version] * 20
    _, (want,) = _offline(trained, new_version, [hist], k=5)
    assert [i["item_id"] for i in out["items"]] == [i for i, _ in want]
    stats = rec.describe()["batching"]          # every request went through a batch, and the counts add up
    assert stats["requests"] == 161 and sum(stats["sizes"].values()) == stats["batches"]
    assert sum(int(k) * v for k, v in stats["sizes"].items()) == 161 and stats["max_batch_size"] == 16


def test_batcher_forms_a_batch_when_the_model_is_free() -> None:
    """Requests that arrive while a batch runs all wait for the next one (up to max_batch_size), not for a batch
    formed the moment the previous one started; every caller gets its own result; sizes are counted."""
    import threading

    from serve.batcher import Batcher

    seen: list[list[int]] = []
    threads: set[str] = set()

    def fn(items: list[int]) -> list[int]:
        seen.append(list(items))
        threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return [i * 10 for i in items]

    async def main(in_thread: bool) -> list[int]:
        seen.clear()
        b = Batcher(fn, max_batch_size=8, in_thread=in_thread, name="t")
        first = asyncio.ensure_future(b(0))
        await asyncio.sleep(0.01)                   # the first batch ([0]) is running
        rest = [asyncio.ensure_future(b(i)) for i in range(1, 12)]
        await asyncio.sleep(0)
        rest[0].cancel()                            # a caller that went away takes no room in a batch
        out = await asyncio.gather(first, *rest[1:])
        assert b.stats.snapshot()["sizes"] == {"1": 1, "8": 1, "2": 1}
        b.close()
        return out

    for in_thread in (True, False):
        threads.clear()
        assert asyncio.run(main(in_thread)) == [0] + [i * 10 for i in range(2, 12)]
        assert seen == [[0], list(range(2, 10)), [10, 11]]
        assert (threading.current_thread().name in threads) is not in_thread


def test_a_batch_function_that_raises_stopiteration_fails_its_batch_not_the_batcher() -> None:
    """asyncio refuses StopIteration as a future's exception: in the thread, the batch's requests (and every later
    one) waited for ever; on the loop, the consumer died and what it had queued was abandoned."""
    from serve.batcher import Batcher

    def fn(items: list[int]) -> list[int]:
        if 0 in items:
            raise StopIteration("from a family's next()")
        return [i * 10 for i in items]

    async def main(in_thread: bool) -> None:
        b = Batcher(fn, max_batch_size=4, in_thread=in_thread, name="t")
        bad = await asyncio.wait_for(asyncio.gather(b(0), return_exceptions=True), 5)
        assert isinstance(bad[0], RuntimeError) and "StopIteration" in str(bad[0])
        assert await asyncio.wait_for(b(7), 5) == 70          # the batcher goes on
        b.close()

    for in_thread in (True, False):
        asyncio.run(main(in_thread))


def test_batcher_runs_a_lone_fast_request_on_the_loop_and_a_slow_one_in_its_thread() -> None:
    """With nothing else queued, the thread hop only adds latency: a lone request runs on the event loop once a lone
    request has been seen to take under LONE_ON_LOOP_BELOW_S; a slow model's lone requests stay in the thread."""
    import threading

    from serve.batcher import Batcher

    where: list[bool] = []
    delay = {"s": 0.0}

    def fn(items: list[int]) -> list[int]:
        where.append(threading.current_thread() is threading.main_thread())
        time.sleep(delay["s"])
        return items

    async def main() -> None:
        b = Batcher(fn, max_batch_size=8, name="t")
        b.LONE_ON_LOOP_BELOW_S = 0.05               # wide margins: a busy test machine must not decide the outcome
        for i in range(3):
            assert await b(i) == i                   # fast lone requests: the first in the thread, then the loop
        delay["s"] = 0.2                            # the model got slow: this lone one still runs on the loop
        assert await b(3) == 3
        assert await b(4) == 4                      # ... and having measured it, the next goes to the thread
        b.close()

    asyncio.run(main())
    assert where == [False, True, True, True, False]

def test_batcher_wait_errors_and_reconfigure() -> None:
    from serve.batcher import Batcher

    def fn(items: list[Any]) -> list[Any]:
        if "boom" in items:
            raise RuntimeError("boom")
        return [len(items)] * len(items)

    async def main() -> None:
        b = Batcher(fn, max_batch_size=4, batch_wait_timeout_s=0.2, name="t")
        t = time.perf_counter()
        first = asyncio.ensure_future(b("a"))
        await asyncio.sleep(0.05)                   # within the wait: joins the first batch
        assert await asyncio.gather(first, b("b")) == [2, 2]
        assert time.perf_counter() - t >= 0.2 - 0.01
        # a full batch does not wait
        t = time.perf_counter()
        assert await asyncio.gather(*(b(x) for x in "wxyz")) == [4] * 4
        assert time.perf_counter() - t < 0.15
        with pytest.raises(RuntimeError, match="boom"):       # the batch's callers get the error, the batcher lives
            await asyncio.gather(b("boom"), b("c"))
        b.configure(max_batch_size=1, batch_wait_timeout_s=0.0)
        assert await asyncio.gather(*(b(x) for x in "pqr")) == [1, 1, 1]
        assert b.settings() == {"max_batch_size": 1, "batch_wait_timeout_s": 0.0, "in_thread": True}
        with pytest.raises(ValueError):
            b.configure(max_batch_size=0)
        b.close()

    asyncio.run(main())


def test_deploy_with_no_model_for_any_route_is_one_error(trained: dict[str, Any]) -> None:
    """It used to start Ray and Serve, print every route as not deployed and wait on Ctrl-C, serving only 503s."""
    import jobs.deploy as deploy_job

    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["deploy"]["endpoints"] = {"recommend": {"model": "no_such_model"}, "sentiment": {"model": "nor_this"}}
    with pytest.raises(UserError, match=r"nothing to serve: no route has a model \(/v1/recommend: no versions"):
        deploy_job.start(cfg)


def test_serve_config_with_no_model_is_one_error_naming_the_registry(trained: dict[str, Any], tmp_path: Path) -> None:
    """`deploy.write_config` run in a shell that lacks the job's ECOMRAY_HOME read an empty registry and wrote a
    config with no deployments, without a word: `serve deploy` of it then answered 503 on every route."""
    import jobs.deploy as deploy_job

    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["paths"]["registry"] = str(tmp_path / "registry")
    with pytest.raises(UserError, match=rf"nothing to serve: .* in the registry {re.escape(str(tmp_path))}/registry "
                                        r"\(paths.root, or the ECOMRAY_HOME"):
        deploy_job.serve_config(cfg)
    assert deploy_job.serve_config(json.loads(json.dumps(trained["cfg"])))["applications"][0]["deployments"]


def test_bad_serve_deployment_options_are_one_error_naming_the_key(trained: dict[str, Any],
                                                                   capsys: pytest.CaptureFixture) -> None:
    """`num_replicas: two` used to be a ValueError traceback from the placement check (or from Serve, inside the
    app); each Serve option is now typed before anything starts, and the error names the setting."""
    import jobs.deploy as deploy_job

    def config(serve: dict[str, Any]) -> dict[str, Any]:
        cfg = json.loads(json.dumps(trained["cfg"]))
        cfg["serve"] = {**cfg["serve"], **serve}
        return deploy_job.serve_config(cfg)

    for serve, match in [({"routes": {"recommend": {"num_replicas": "two"}}}, r"serve.routes.recommend\).num_replicas='two'"),
                         ({"routes": {"recommend": {"max_ongoing_requests": 0}}}, r"max_ongoing_requests=0: an integer >= 1"),
                         ({"routes": {"recommend": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}}},
                          r"min_replicas=3 is above max_replicas=2"),
                         ({"common": {"health_check_period_s": -1}}, r"\(the ingress\).health_check_period_s=-1"),
                         ({"routes": {"recommend": {"max_queued_requests": 0}}}, r"max_queued_requests=0: an integer >= 1, or -1"),
                         ({"ingress": {"retries": "once"}}, r"serve.ingress.retries='once': an integer >= 0"),
                         ({"max_body_bytes": 1.5}, r"serve.max_body_bytes=1.5"),
                         ({"body_timeout_s": 0}, r"serve.body_timeout_s=0: a number of seconds > 0")]:
        with pytest.raises(UserError, match=match):
            config(serve)
    capsys.readouterr()
    config({"common": {"graceful_shutdown_timeout_s": 0, "graceful_shutdown_wait_loop_s": 0}})   # Serve takes 0 there
    config({"routes": {"recommend": {"num_replicas": 2, "max_ongoing_requests": 4, "batching": {"max_batch_size": 8}}}})
    assert "/v1/recommend has max_ongoing_requests=4 below batching.max_batch_size=8" in capsys.readouterr().out


def test_deploy_says_a_task_serve_override_does_not_apply(trained: dict[str, Any], tmp_path: Path) -> None:
    """Batching and limits come from the version's saved `task.serve`; a `task.serve.*` override on the deploy
    command line used to be dropped silently. The job now says so, and names the knob that does apply."""
    import subprocess
    import sys

    import yaml

    from jobs.deploy import task_serve_overrides

    def deploy(*extra: str) -> tuple[str, dict]:
        out = tmp_path / "serve_config.yaml"
        cmd = [sys.executable, "-m", "jobs.deploy", "experiment=tiny", "dataset.synthetic.users=400",
               f"paths.root={trained['root']}", f"deploy.write_config={out}", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout, yaml.safe_load(out.read_text())

    quiet, config = deploy()
    assert "changes nothing here" not in quiet
    noted, same = deploy("task.serve.batching.max_batch_size=64")
    assert "task.serve.batching.max_batch_size=64 changes nothing here" in noted and "serve.routes" in noted
    assert same == config                                       # the saved settings still apply
    assert task_serve_overrides(["+task.serve.x=1", "task.serve={}", "task.name=x", "task.server=1", "serve.a=1"]) \
        == ["+task.serve.x=1", "task.serve={}"]

def test_endpoint_table_refuses_a_name_outside_the_registry(trained: dict[str, Any]) -> None:
    from serve.app import build_app
    from serve.settings import app_args

    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["deploy"]["endpoints"] = {"recommend": {"model": "../outside"}}
    with pytest.raises(UserError, match="invalid registry name"):
        app_args(cfg)
    cfg["deploy"]["endpoints"] = {"recommend": {"model": "no_such_model"}}
    args = app_args(cfg)        # a model that is simply missing: the route answers 503, no error
    assert "no versions" in args["endpoints"]["recommend"]["unavailable"]
    build_app({"app": args})
    args["endpoints"] = {"recommend": {"model": "../outside", "version": "v0001", "module": "x", "options": {}}}
    with pytest.raises(UserError, match="invalid registry name"):
        build_app({"app": args})    # a hand-written serve config is checked too
    cfg["deploy"]["endpoints"] = {"Bad Route!": {"model": "x"}}
    with pytest.raises(UserError, match="route"):
        app_args(cfg)
    # one family twice, under two routes (a canary), is a config change
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    _, newer = _second_version(reg, name)
    first = registry.versions(reg, name)[0]
    cfg["deploy"]["endpoints"] = {"recommend": {"model": f"{name}:{first}"},
                                  "recommend_canary": {"model": name, "ref": newer}}
    args = app_args(cfg)
    assert [args["endpoints"][r]["version"] for r in ("recommend", "recommend_canary")] == [first, newer]
    assert args["endpoints"]["recommend_canary"]["module"] == "ecomray.tasks.next_item"


# ---------------------------------------------------------------------------------------------------------------
# One Serve instance for the HTTP tests.

@pytest.fixture(scope="module")
def app(ray_session, trained: dict[str, Any]) -> dict[str, Any]:
    from ray import serve

    from jobs.deploy import start

    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["deploy"]["port"] = free_port()
    endpoints = {"recommend": {"model": trained["recommend"]["name"]},
                 "sentiment": {"model": trained["sentiment"]["name"]},
                 "score/propensity": {"model": trained["propensity"]["name"] if "propensity" in trained
                                      else "propensity_shoppers"}}     # missing without the dataset: a 503 route
    cfg["deploy"]["endpoints"] = endpoints
    cfg["serve"]["max_body_bytes"] = 200_000
    # the reliability test kills one of the two recommend replicas
    cfg["serve"]["routes"] = {"recommend": {"num_replicas": 2, "max_history": 50}}
    info = start(cfg)
    info["cfg"] = cfg
    yield info
    serve.shutdown()


def _offline(trained: dict[str, Any], version: str, histories: list[list[str]], k: int = 10,
             exclude: bool = True) -> tuple[Any, list]:
    cfg = trained["cfg"]
    loaded = load_model(cfg["paths"]["registry"], trained["recommend"]["name"], version)
    return loaded, loaded.task.predict(loaded.model, loaded.meta, histories, k=k, exclude_history=exclude)


def _histories(trained: dict[str, Any], n: int = 5) -> list[list[str]]:
    from ecomray.tasks.next_item import build_data

    data = build_data(trained["cfg"], 0, 1)
    return [[data.item_ids[i - 1] for i in s[:-1]] for s in data.seqs[:n]]


def test_recommend_end_to_end_equals_offline_predict(app: dict[str, Any], trained: dict[str, Any]) -> None:
    for hist in _histories(trained, 3):
        r = httpx.post(f"{app['url']}/v1/recommend", json={"history": hist, "k": 7, "user_id": "u1"})
        assert r.status_code == 200, r.text
        out = r.json()
        _, (want,) = _offline(trained, out["model"]["version"], [hist], k=7)
        assert [i["item_id"] for i in out["items"]] == [i for i, _ in want]
        np.testing.assert_allclose([i["score"] for i in out["items"]], [s for _, s in want], rtol=1e-4, atol=1e-4)
        assert out["fallback"] is False and out["warnings"] == [] and out["user_id"] == "u1"
        assert not set(hist) & {i["item_id"] for i in out["items"]}          # history excluded
        assert r.headers["x-model-version"] == f"{out['model']['name']}:{out['model']['version']}"
    # history kept: the offline call with exclude_history=False agrees too
    hist = _histories(trained, 1)[0]
    out = httpx.post(f"{app['url']}/v1/recommend", json={"history": hist, "k": 5, "exclude_history": False}).json()
    _, (want,) = _offline(trained, out["model"]["version"], [hist], k=5, exclude=False)
    assert [i["item_id"] for i in out["items"]] == [i for i, _ in want]
    # GET /v1/models shows the answering replica's batching: settings (the task's) and batch sizes so far
    rec = next(m for m in httpx.get(f"{app['url']}/v1/models").json()["loaded"] if m["route"] == "recommend")
    b = rec["batching"]
    assert b["max_batch_size"] == 32 and b["in_thread"] is True
    assert sum(int(k) * v for k, v in b["sizes"].items()) == b["requests"] and b["busy_s"] >= 0


def test_fallback_unknown_ids_and_truncation(app: dict[str, Any], trained: dict[str, Any]) -> None:
    url = f"{app['url']}/v1/recommend"
    out = httpx.post(url, json={"history": [], "k": 4}).json()
    loaded, _ = _offline(trained, out["model"]["version"], [[]])
    assert out["fallback"] is True and [i["item_id"] for i in out["items"]] == loaded.meta["popular"][:4]
    assert all(i["score"] is None for i in out["items"])
    out = httpx.post(url, json={"history": ["nope-1", "nope-2"], "k": 3}).json()
    assert out["fallback"] is True and any("2 unknown item id(s)" in w and "nope-1" in w for w in out["warnings"])
    hist = _histories(trained, 1)[0]
    out = httpx.post(url, json={"history": ["ghost", *hist], "k": 5}).json()
    _, (want,) = _offline(trained, out["model"]["version"], [hist], k=5)
    assert out["fallback"] is False and [i["item_id"] for i in out["items"]] == [i for i, _ in want]
    assert len(out["warnings"]) == 1 and "'ghost'" in out["warnings"][0]
    # a k past the rest of the catalogue: every other item and a warning, never the history (it came last, unscored)
    everything = len(loaded.meta["item_ids"])
    out = httpx.post(url, json={"history": hist, "k": min(everything, 1000)}).json()
    assert not set(hist) & {i["item_id"] for i in out["items"]}
    assert len(out["items"]) == min(everything, 1000) - len(set(hist)) or everything > 1000 + len(set(hist))
    assert all(i["score"] is not None for i in out["items"])
    long = (hist * 60)[:120]                                    # max_history is 50 in this app
    out = httpx.post(url, json={"history": long, "k": 5}).json()
    assert any("only the most recent 50" in w for w in out["warnings"])
    _, (want,) = _offline(trained, out["model"]["version"], [long[-50:]], k=5)
    assert [i["item_id"] for i in out["items"]] == [i for i, _ in want]


def test_bad_input_is_422_413_or_503_never_500(app: dict[str, Any]) -> None:
    url = app["url"]
    cases = [
        (b'{"history": ["a", ', "json_invalid"),
        (json.dumps({"history": ["a"], "k": 0}).encode(), "k"),
        (json.dumps({"history": ["a"], "k": 1001}).encode(), "k"),
        (json.dumps({"history": ["a"], "k": "5"}).encode(), "k"),
        (json.dumps({"history": [1, 2]}).encode(), "history"),
        (json.dumps({"history": "a"}).encode(), "history"),
        (json.dumps({"history": ["a"], "kk": 3}).encode(), "kk"),
        (json.dumps({"history": ["a"], "filters": {"category": 3}}).encode(), "filters"),
        (b"[]", "body"),
    ]
    for body, where in cases:
        r = httpx.post(f"{url}/v1/recommend", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
        detail = r.json()["detail"]
        assert detail and all("loc" in d and "msg" in d for d in detail)
        assert any(where in [str(x) for x in d["loc"]] or where == d.get("type") for d in detail), (body, detail)
    r = httpx.post(f"{url}/v1/recommend", json={"history": ["x" * 200] * 1200})
    assert r.status_code == 413
    r = httpx.post(f"{url}/v1/score/propensity", json={"rows": [{"PageValues": "lots"}]})
    assert r.status_code in (422, 503) and r.status_code != 500
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["route"] for m in models["loaded"]][0] == "recommend"
    assert {m["route"] for m in models["loaded"]} | set(models["unavailable"]) == {"recommend", "score/propensity",
                                                                                 "sentiment"}
    health = httpx.get(f"{url}/healthz")
    assert health.status_code == 200 and health.json()["routes"]["recommend"] == "ok"
    assert httpx.head(f"{url}/healthz").status_code == 200          # (load balancers' probes)
    assert httpx.get(f"{url}/docs").status_code == 200
    # the server's folders are not in a 503 (an undeployed route's reason shows `<registry>`, not the path)
    assert str(app["cfg"]["paths"]["registry"]) not in json.dumps(models["unavailable"])
    # lists nested 900 deep, and 60k numbers as categories (under this app's 200 KB body cap): 422s naming the
    # place, with at most 20 details (the edge walk copied the path at every level: seconds on the event loop)
    deep: Any = "x"
    for _ in range(900):
        deep = [deep]
    r = httpx.post(f"{url}/v1/recommend", json={"history": ["a"], "x": [deep] * 100}, timeout=30)
    assert r.status_code == 422 and any(d["loc"] == ["body", "x"] for d in r.json()["detail"]), r.text
    r = httpx.post(f"{url}/v1/recommend", json={"history": ["a"], "filters": {"category": [1] * 60_000}}, timeout=30)
    assert r.status_code == 422 and 0 < len(r.json()["detail"]) <= 20, r.text
    # bodies the JSON parser itself gives up on: a 422 json_invalid saying why (FastAPI's was a bare 400)
    for body, says in ((b'{"history": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nested deeper"),
                       (b'{"history": [], "k": ' + b"1" * 5000 + b"}", "more digits"),
                       (b'{"history": ["\xff\xfe"]}', "not UTF-8")):
        r = httpx.post(f"{url}/v1/recommend", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid", r.text
        assert says in r.json()["detail"][0]["msg"]
    r = httpx.post(f"{url}/v1/recommend", content=gzip.compress(b'{"history": ["a"]}'),
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and "uncompressed" in r.json()["detail"]
    assert httpx.get(f"{url}/healthz", headers={"content-encoding": "gzip"}).status_code == 200   # no body, no 415
    # a body in another charset was read as UTF-8 (UTF-16: "not UTF-8"; Latin-1 accents: wrong text or a 422)
    r = httpx.post(f"{url}/v1/recommend", content='{"history": ["é"]}'.encode("utf-16"),
                   headers={"content-type": "application/json; charset=UTF-16"})
    assert r.status_code == 415 and "'utf-16'" in r.json()["detail"] and "UTF-8" in r.json()["detail"], r.text
    r = httpx.post(f"{url}/v1/recommend", content=b'{"history": ["a"]}',
                   headers={"content-type": 'application/json; charset="UTF-8"'})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/v1/recommend", json={"history": ["a"], "filters": {"category": ["c"] * 1001}})
    assert r.status_code == 422 and r.json()["detail"][-1]["loc"][:3] == ["body", "filters", "category"], r.text


def test_deploy_once_fails_when_its_sample_request_fails(app: dict[str, Any]) -> None:
    """`deploy.once` (the pipeline's last stage) printed a 422 and exited 0: a smoke test passed on an error."""
    from jobs.deploy import _one_request

    with pytest.raises(UserError, match=r"the sample request POST /v1/\S+ answered 422"):
        _one_request({"deploy": {"request": {"k": 0}}}, {"url": app["url"], "headers": {}})
    assert _one_request({"deploy": {}}, {"url": app["url"], "headers": {}})


def test_category_filter_from_the_prepared_shards(app: dict[str, Any], trained: dict[str, Any]) -> None:
    import polars as pl

    folder = Path(trained["cfg"]["paths"]["data"]) / trained["cfg"]["dataset"]["name"] / "shards"
    cats = pl.read_parquet(str(folder / "*.parquet")).group_by("item_id").agg(pl.col("category").mode().min())
    cat_of = dict(zip(cats["item_id"].to_list(), cats["category"].to_list()))
    hist = _histories(trained, 1)[0]
    wanted = cat_of[hist[-1]]
    out = httpx.post(f"{app['url']}/v1/recommend",
                     json={"history": hist, "k": 5, "filters": {"category": wanted}}).json()
    assert out["items"] and all(cat_of[i["item_id"]] == wanted for i in out["items"])
    _, (full,) = _offline(trained, out["model"]["version"], [hist], k=len(cat_of))
    assert [i["item_id"] for i in out["items"]] == [i for i, _ in full if cat_of[i] == wanted][:5]


@pytest.mark.skipif(not HAVE_SHOPPERS, reason="needs the shoppers table in ECOMRAY_DATASETS")
def test_propensity_end_to_end_equals_offline_predict(app: dict[str, Any], trained: dict[str, Any]) -> None:
    import polars as pl

    pcfg_reg = trained["cfg"]["paths"]["registry"]
    folder = Path(trained["cfg"]["paths"]["data"]) / "shoppers" / "shards"
    df = pl.read_parquet(str(folder / "*.parquet")).sort("_file", "_row").head(20)
    loaded = load_model(pcfg_reg, trained["propensity"]["name"])
    feats = list(loaded.meta["stats"]["numeric"]) + list(loaded.meta["stats"]["categorical"])
    rows = df.select(feats).to_dicts()
    r = httpx.post(f"{app['url']}/v1/score/propensity", json={"rows": rows})
    assert r.status_code == 200, r.text
    want = loaded.task.predict(loaded.model, loaded.meta, df.select(feats).to_arrow())
    np.testing.assert_allclose(r.json()["probabilities"], want, rtol=1e-5, atol=1e-6)
    bad = dict(rows[0])
    del bad["PageValues"]
    r = httpx.post(f"{app['url']}/v1/score/propensity", json={"rows": [rows[1], bad]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "rows", 1, "PageValues"]
    r = httpx.post(f"{app['url']}/v1/score/propensity", json={"rows": (rows * 13)[:257]})    # 257 > max_rows 256
    assert r.status_code == 422


def test_schema_contract_all_checks(app: dict[str, Any]) -> None:
    """schemathesis over /openapi.json with every check it has (status codes, content types, response schemas,
    positive data accepted, negative data rejected, no 5xx), positive and negative generation, bounded examples:
    the OpenAPI contract is exactly what the server does. The one documented exception: the 503 of a route whose
    model is not in the registry (its body can't match a schema it has none of), and the 413 of a generated body
    over `serve.max_body_bytes` (schemathesis counts only 4xx codes it knows as a rejection)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.core.failures import Failure, FailureGroup

    schema = schemathesis.openapi.from_url(f"{app['url']}/openapi.json")
    not_deployed = {f"/v1/{r}" for r in httpx.get(f"{app['url']}/v1/models").json()["unavailable"]}
    counts: dict[int, int] = {}
    bad: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
                    continue        # nothing to break in a GET without parameters
                @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case: Any) -> None:
                    r = case.call(base_url=app["url"], session=session, timeout=30)
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1
                    if r.status_code == 503 and case.path in not_deployed:
                        return
                    if r.status_code == 413:    # a generated body over serve.max_body_bytes: rejected, as documented
                        sent = len(r.request.body or b"")
                        assert sent > app["cfg"]["serve"]["max_body_bytes"], f"413 for a {sent}-byte body"
                        return
                    try:
                        case.validate_response(r)
                    except (Failure, FailureGroup) as err:
                        bad.append(f"{case.method} {case.path} {case.body!r:.200} -> {r.status_code} "
                                   f"{r.text[:200]}: {str(err)[:300]}")

                check()
    total = sum(counts.values())
    print(f"\n[contract] {total} cases, status counts {dict(sorted(counts.items()))}, failures {len(bad)}")
    assert total >= 300 and not bad, "\n".join(bad[:5])


def test_poisoned_requests_fail_alone(app: dict[str, Any], trained: dict[str, Any]) -> None:
    """Valid requests interleaved with poisoned ones (a lone surrogate, a number beyond 2**53 or not finite), sent
    concurrently so they share model batches: every valid one 200, every poisoned one 422 naming its field."""
    url = app["url"]
    good_texts = [{"texts": ["质量很好，非常满意！", f"第{n}次购买"]} for n in range(60)]
    poisons = [(f"{url}/v1/sentiment", {"texts": ["ok", "bad \ud800 text"]}, ["body", "texts", 1]),
               (f"{url}/v1/recommend", {"history": ["\udfff"], "k": 3}, ["body", "history", 0])]
    raw = [(f"{url}/v1/recommend", b'{"history": [], "k": 10' + b"0" * 400 + b"}", "k"),
           (f"{url}/v1/recommend", b'{"history": [], "k": 1e999}', "k")]
    if "propensity" in trained:
        loaded = load_model(trained["cfg"]["paths"]["registry"], trained["propensity"]["name"])
        row = {f: 1.0 for f in loaded.meta["stats"]["numeric"]} | {f: "2" for f in loaded.meta["stats"]["categorical"]}
        first = next(iter(loaded.meta["stats"]["numeric"]))
        cat = next(iter(loaded.meta["stats"]["categorical"]))
        poisons.append((f"{url}/v1/score/propensity", {"rows": [row, row | {cat: "x\ud800"}]}, ["body", "rows", 1, cat]))
        raw.append((f"{url}/v1/score/propensity", json.dumps({"rows": [row]}).replace(
            f'"{first}": 1.0', f'"{first}": 1' + "0" * 400).encode(), first))

    async def main() -> list[tuple[str, int, Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            async def post(kind: str, u: str, body: Any) -> tuple[str, int, Any]:
                raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()   # \uXXXX escapes
                r = await client.post(u, content=raw_body, headers={"content-type": "application/json"})
                return kind, r.status_code, r.json()
            jobs = []
            for n, body in enumerate(good_texts):
                jobs.append(post("good", f"{url}/v1/sentiment", body))
                if n % 6 == 0:
                    u, b, _ = poisons[n // 6 % len(poisons)]
                    jobs.append(post(f"poison{n // 6 % len(poisons)}", u, b))
                if n % 10 == 0:
                    u, b, _ = raw[n // 10 % len(raw)]
                    jobs.append(post(f"raw{n // 10 % len(raw)}", u, b))
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert [s for k, s, _ in results if k == "good"] == [200] * len(good_texts)
    for kind, status, body in results:
        if kind.startswith("poison"):
            assert status == 422 and body["detail"][0]["loc"] == poisons[int(kind[6:])][2], (kind, body)
        elif kind.startswith("raw"):
            assert status == 422 and raw[int(kind[3:])][2] in [str(x) for x in body["detail"][0]["loc"]], (kind, body)


def test_errors_never_echo_the_input_and_docs_work_offline(app: dict[str, Any]) -> None:
    url = app["url"]
    key = "k" * 150_000
    r = httpx.post(f"{url}/v1/recommend", json={"history": [], key: 1})
    assert r.status_code == 422 and len(r.content) < 2_000 and key not in r.text
    r = httpx.post(f"{url}/v1/sentiment", json={"texts": ["x" * 150_000]})
    assert r.status_code == 422 and len(r.content) < 2_000
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200
    import re

    refs = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", docs.text)
    assert refs and not [u for u in refs if u.startswith(("http:", "https:", "//"))], refs
    for u in refs:
        if u.endswith((".js", ".css")):
            assert httpx.get(f"{url}{u}").status_code == 200, u


def _replicas(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"])


@pytest.mark.slow
def test_replica_killed_under_load(app: dict[str, Any], trained: dict[str, Any]) -> None:
    """5,000 requests at concurrency 8 against 2 recommend replicas; one replica is killed after 1,000. >= 99.9%
    succeed as the client sees them, and Serve starts a replacement."""
    import ray

    before = _replicas("model_recommend")
    assert len(before) == 2, before
    hists = _histories(trained, 20)
    total, concurrency, kill_at = 5000, 8, 1000
    status: list[int] = []
    killed: list[str] = []

    async def main() -> None:
        sent = 0
        async with httpx.AsyncClient(base_url=app["url"], timeout=30,
                                     limits=httpx.Limits(max_connections=concurrency)) as client:
            async def worker() -> None:
                nonlocal sent
                while sent < total:
                    n = sent
                    sent += 1
                    if n == kill_at and not killed:
                        victim = before[0]
                        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                        killed.append(victim)
                    try:
                        r = await client.post("/v1/recommend", json={"history": hists[n % len(hists)], "k": 10})
                        status.append(r.status_code)
                    except httpx.HTTPError:
                        status.append(-1)

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=240)

    t0 = time.time()
    asyncio.run(main())
    seconds = time.time() - t0
    ok = sum(s == 200 for s in status)
    print(f"\n[reliability] {len(status)} requests in {seconds:.1f}s, {ok} ok "
          f"({ok / len(status):.4%}), statuses {sorted(set(status))}, killed {killed}")
    assert len(status) == total and killed
    assert ok / total >= 0.999
    deadline = time.time() + 90
    while time.time() < deadline:
        now = _replicas("model_recommend")
        if len(now) == 2 and killed[0] not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and killed[0] not in now, now


def test_redeploy_new_version_without_failed_requests(app: dict[str, Any], trained: dict[str, Any]) -> None:
    from ray import serve

    from serve.app import build_app
    from serve.settings import app_args

    cfg = app["cfg"]
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    old, new_version = _second_version(reg, name)
    hist = _histories(trained, 1)[0]
    seen: list[tuple[int, str]] = []

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=app["url"], timeout=30) as client:
            while not stop.is_set():
                r = await client.post("/v1/recommend", json={"history": hist, "k": 5})
                seen.append((r.status_code, r.json().get("model", {}).get("version", "?")))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(load(stop))
        await asyncio.sleep(1.0)
        args = app_args(cfg)
        args["endpoints"]["recommend"]["version"] = new_version
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: serve.run(build_app({"app": args}), name=cfg["deploy"]["app_name"],
                                    route_prefix=cfg["deploy"]["route_prefix"]))
        deadline = time.time() + 30
        while time.time() < deadline and (not seen or seen[-1][1] != new_version):
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        stop.set()
        await task

    asyncio.run(main())
    versions = [v for _, v in seen]
    assert all(s == 200 for s, _ in seen), [s for s, _ in seen if s != 200][:5]
    assert old["version"] in versions and versions[-1] == new_version
    _, (want,) = _offline(trained, new_version, [hist], k=5)
    out = httpx.post(f"{app['url']}/v1/recommend", json={"history": hist, "k": 5}).json()
    assert [i["item_id"] for i in out["items"]] == [i for i, _ in want]


def test_deploy_once_answers_one_request_and_removes_its_app(app: dict[str, Any]) -> None:
    """What the pipeline runs: deploy, one /v1/recommend over HTTP, then take the app down (here beside the
    module's app, on the running Serve, so under its own name and route prefix)."""
    from ray import serve

    from jobs.deploy import run

    cfg = json.loads(json.dumps(app["cfg"]))
    cfg["deploy"].update(once=True, app_name="once", route_prefix="/once", request={"k": 4})
    cfg["serve"]["routes"] = {"recommend": {"num_replicas": 1}}
    cfg["deploy"]["endpoints"] = {"recommend": cfg["deploy"]["endpoints"]["recommend"],
                                  "missing": {"model": "no_such_model"}}
    seen_503: list[int] = []

    import jobs.deploy as deploy_job

    original = deploy_job._one_request

    def one_request_and_probe(plain: dict, info: dict) -> dict:   # while the app is up: a route with no model
        r = httpx.post(info["url"] + "/v1/missing", json={"anything": 1})
        seen_503.append(r.status_code)
        assert "is not available" in r.json()["detail"]
        assert httpx.post(info["url"] + "/v1/sentiment", json={"texts": ["great"]}).status_code == 404
        return original(plain, info)

    deploy_job._one_request = one_request_and_probe
    try:
        out = run(cfg)
    finally:
        deploy_job._one_request = original
    assert seen_503 == [503]
    assert out["url"].endswith("/once") and len(out["response"]["items"]) == 4
    assert out["response"]["fallback"] is False and out["response"]["model"]["name"] == "next_item_synthetic"
    assert "once" not in serve.status().applications
    assert set(out["models"]["unavailable"]) == {"missing"}
    assert httpx.get(f"{app['url']}/healthz").status_code == 200          # the other app is untouched


def test_sentiment_end_to_end_equals_offline_predict(app: dict[str, Any], trained: dict[str, Any]) -> None:
    texts = ["质量很好，非常满意！", "质量太差，非常失望，不会再买。", "一般般" * 40]
    r = httpx.post(f"{app['url']}/v1/sentiment", json={"texts": texts})
    assert r.status_code == 200, r.text
    out = r.json()
    loaded = load_model(trained["cfg"]["paths"]["registry"], trained["sentiment"]["name"], out["model"]["version"])
    want = loaded.task.predict(loaded.model, loaded.meta, texts)
    assert [x["label"] for x in out["results"]] == [w["label"] for w in want]
    for got, w in zip(out["results"], want):
        np.testing.assert_allclose([got["probs"][k] for k in w["probs"]], list(w["probs"].values()), rtol=1e-4,
                                   atol=1e-5)
    assert any("truncated" in w for w in out["warnings"])          # the third text is over the model's max_chars
    for body in ({"texts": ["ok", "  "]}, {"texts": []}, {"texts": ["x"] * 65}, {"texts": ["x" * 5001]},
                 {"texts": "not a list"}):
        r = httpx.post(f"{app['url']}/v1/sentiment", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text[:200])


def test_playground_page_in_a_real_browser(app: dict[str, Any], browser: Any) -> None:
    """The playground in headless Chromium: a panel per deployed route, filled from the version's stored examples;
    sending the recommend sample renders the items, and a pasted review gets its sentiment."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{app['url']}/playground")
    wait = WebDriverWait(browser, 30)
    panel = wait.until(ec.presence_of_element_located((By.ID, "panel-recommend")))
    assert json.loads(panel.find_element(By.CSS_SELECTOR, "textarea.body").get_attribute("value"))["history"]
    panel.find_element(By.CSS_SELECTOR, "button.send").click()
    table = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#panel-recommend .answer table[data-key=items]"))
    assert len(table.find_elements(By.TAG_NAME, "tr")) > 1 and "item_id" in table.text
    sentiment = browser.find_element(By.ID, "panel-sentiment")
    area = sentiment.find_element(By.CSS_SELECTOR, "textarea.body")
    area.clear()
    area.send_keys(json.dumps({"texts": ["质量太差，非常失望，不会再买。"]}, ensure_ascii=False))
    sentiment.find_element(By.CSS_SELECTOR, "button.send").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#panel-sentiment .answer[data-status='200'] table"))
    assert any(lab in answer.text for lab in ("negative", "positive"))


def test_promotion_rolls_out_to_every_replica_and_survives_a_restart(app: dict[str, Any],
                                                                    trained: dict[str, Any]) -> None:
    """One source of truth for the served version: promoting does not change what the running app serves (even when
    a replica restarts) until `jobs.deploy deploy.rollout=true`; after it every replica serves the promoted version,
    a replica killed then restarted too, and /v1/models lists each replica's version."""
    import ray

    from jobs.deploy import rollout
    from jobs.registry import promote

    cfg = json.loads(json.dumps(app["cfg"]))
    reg, name = cfg["paths"]["registry"], trained["recommend"]["name"]
    cfg["deploy"]["endpoints"]["recommend"] = {"model": name, "ref": "prod"}
    url = f"{app['url']}/v1/recommend"
    hist = _histories(trained, 1)[0]

    def versions(n: int = 40) -> set[str]:
        return {httpx.post(url, json={"history": hist, "k": 3}, timeout=30).json()["model"]["version"]
                for _ in range(n)}

    first = registry.versions(reg, name)[0]
    promote(reg, name, first, "prod")
    rollout(cfg)                                              # serve prod = the first version everywhere
    assert versions() == {first}
    _, newer = _second_version(reg, name)
    promote(reg, name, newer, "prod")
    victim = _replicas("model_recommend")[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline and (len(_replicas("model_recommend")) != 2 or victim in _replicas("model_recommend")):
        time.sleep(1)
    assert versions() == {first}                              # promoted, not rolled out: the restart changes nothing
    rollout(cfg)
    assert versions() == {newer}
    models = httpx.get(f"{app['url']}/v1/models").json()["loaded"]
    rec = next(m for m in models if m["route"] == "recommend")
    assert rec["version"] == newer and len(rec["replicas"]) == 2
    assert {r["version"] for r in rec["replicas"]} == {newer}
    # a rollout onto a version whose weights are damaged failed to deploy and left the route answering 503 for
    # good; it is refused before anything changes (the weights' checksum, not only the metadata, is checked)
    _, broken = _second_version(reg, name)
    with open(os.path.join(reg, name, broken, "model.pt"), "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    cfg["deploy"]["endpoints"]["recommend"]["ref"] = broken
    with pytest.raises(UserError, match=r"rollout refused, the running app is unchanged: /v1/recommend: .*"
                                        r"model.pt does not match its registered checksum"):
        rollout(cfg)
    assert versions(10) == {newer}
    shutil.rmtree(os.path.join(reg, name, broken))


def test_text_of_only_invisible_characters_is_blank() -> None:
    """A text of zero-width spaces, joiners or control characters (NUL) says nothing: 422, as whitespace is (they
    were classified, and copy was written for them, with no warning)."""
    from pydantic import ValidationError

    from ecomray.tasks import sentiment

    request, _ = sentiment.api({}, {})
    for blank in ("\u200b", "\x00\x00", " \u2060\ufeff\u200d ", "\x7f"):
        with pytest.raises(ValidationError):
            request.model_validate({"texts": [blank]})
    assert request.model_validate({"texts": ["\u200b好"]}).texts == ["\u200b好"]


def test_a_503_reason_shows_no_server_folder(tmp_path: Path) -> None:
    """Registry errors name the registry's folder; a client reading a 503 gets `<registry>` instead: the folder as
    configured, absolute or reached through a link, and paths below it, but never part of a model's name."""
    from serve.settings import _without_folders

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    link = str(tmp_path / "link")
    assert _without_folders(f"no model 'm' in registry {link} (models: [])", link) == \
        "no model 'm' in registry <registry> (models: [])"
    assert _without_folders(f"m v0001 is damaged ({real}/m/v0001): run migrate", link) == \
        "m v0001 is damaged (<registry>): run migrate"
    assert _without_folders("no versions of model 'real_estate' in registry real", "real") == \
        "no versions of model 'real_estate' in registry <registry>"
