"""Serve under sustained load, on loopback, with 2 replicas: a mix of 500+ valid, invalid, streaming and tool-heavy
requests (some snippets run past the sandbox timeout), then a replica killed (SIGKILL, as the OOM killer would) in
the middle of more load.

What must hold: every valid request is answered and every invalid one gets its 4xx; after the kill only requests that
were on the dead replica fail, each with a 5xx (or an in-band error on a stream already started), none hangs and none
is dropped without a status; Serve brings the replica back; and when the app is shut down nothing it started is left
running (engine cores, sandbox workers and their zygotes, the dead replica's too).

Timing is judged within the run, so a slower machine passes too: a request counts as hung when it lasted more than
HANG_RATIO times the run's median answered request (the client's own timeout is only a backstop).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter

import httpx
import psutil
import pytest
from test_serve import (  # tests/integration is on sys.path
    API_KEY,
    MODEL,
    Q_MUL,
    Q_SLEEP,
    app_overrides,
    check_mul,
    free_port,
    teach,
)

from torl.data.prompts import build_prompt

APP = "torl-load"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CLIENT_TIMEOUT_S = 300.0  # a backstop: a request still open after this is a hang on any machine
HANG_RATIO = 20  # this many times the run's median answered request is a hang (the slowest of the 520 took 6.3x)


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from actors.serve import build_app, start_serve
    from torl.config_load import load_config

    _wait_for_no_serve(ray_cluster)  # a previous module's Serve may still be shutting down on this cluster
    model_dir = teach(tiny_model_dir, tmp_path_factory.mktemp("taught") / MODEL)
    port = free_port()
    cfg = load_config(
        overrides=[
            *app_overrides(model_dir, port),
            "rollout.num_cpus=0.5",
            "sandbox.num_cpus=0.25",
            "sandbox.timeout_s=1.5",  # the 4 s sleep snippet times out
            "serve.min_replicas=2",
            "serve.max_replicas=2",
        ]
    )
    start_serve(cfg)
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _wait_for_no_serve(ray, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return
        time.sleep(0.5)
    raise AssertionError("the previous Serve instance's controller is still there")


# -- the request mix ---------------------------------------------------------------------------------------------
def _chat(question: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0, **kw}


VALID = {  # name -> (route, body, stream)
    "chat_tool": ("/v1/chat/completions", _chat(Q_MUL, max_tokens=120), False),
    "chat_stream": ("/v1/chat/completions", _chat(Q_MUL, max_tokens=120, stream=True), True),
    "completion": ("/v1/completions", {"model": MODEL, "prompt": build_prompt(Q_MUL, "tir_base_0309"),
                                       "temperature": 0, "max_tokens": 120}, False),
    "no_tools": ("/v1/chat/completions", _chat(Q_MUL, max_tokens=30, max_tool_calls=0), False),
}  # fmt: skip
TIMEOUT = ("/v1/chat/completions", _chat(Q_SLEEP, max_tokens=60), False)
INVALID = {  # name -> (route, body or raw bytes, headers, expected status)
    "no_messages": ("/v1/chat/completions", {"model": MODEL}, HEADERS, 400),
    "bad_temperature": ("/v1/chat/completions", _chat(Q_MUL, temperature=9), HEADERS, 400),
    "bad_json": ("/v1/chat/completions", b"{not json", HEADERS, 400),
    "bad_key": ("/v1/chat/completions", _chat(Q_MUL), {"Authorization": "Bearer wrong"}, 401),
    "unknown_route": ("/v1/nothing", _chat(Q_MUL), HEADERS, 404),
    "too_many_tokens": ("/v1/chat/completions", _chat(Q_MUL, max_tokens=100000), HEADERS, 400),
}


async def _send(http: httpx.AsyncClient, kind: str, route: str, body, headers: dict, stream: bool) -> dict:
    """One request; returns what happened: status, whether the answer was complete, the error if any."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {**headers, "Content-Type": "application/json"}
    t0 = time.perf_counter()
    result = await _exchange(http, kind, route, content, hdrs, stream)
    return {**result, "latency": time.perf_counter() - t0}


async def _exchange(http: httpx.AsyncClient, kind: str, route: str, content: bytes, hdrs: dict, stream: bool) -> dict:
    try:
        if not stream:
            r = await http.post(route, content=content, headers=hdrs)
            try:
                data = r.json()
            except ValueError:  # a proxy's plain-text error page
                data = None
            ok = r.status_code == 200 and isinstance(data, dict) and "choices" in data
            return {"kind": kind, "status": r.status_code, "ok": ok, "body": r.text[:400], "json": data}
        events, lines = [], []
        async with http.stream("POST", route, content=content, headers=hdrs) as r:
            try:
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: "):
                        events.append(line[6:])
            except httpx.RemoteProtocolError as exc:  # the body cut short: every HTTP client reports it as an error
                return {"kind": kind, "status": r.status_code, "ok": False, "body": repr(exc), "cut": True}
        errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
        ok = r.status_code == 200 and events[-1:] == ["[DONE]"] and not errors
        body = (errors or events[-2:] or ["\n".join(lines)])[0]  # no events: an error page before the stream began
        return {"kind": kind, "status": r.status_code, "ok": ok, "body": body[:400]}
    except httpx.TimeoutException as exc:
        return {"kind": kind, "status": "hang", "ok": False, "body": repr(exc)}
    except httpx.HTTPError as exc:  # the connection dropped before any status: the request was lost
        return {"kind": kind, "status": "dropped", "ok": False, "body": repr(exc)}


def _assert_no_hang(results: list[dict]) -> None:
    """No request lasted more than HANG_RATIO times the run's median answered one, nor reached the client's timeout."""
    latencies = sorted(r["latency"] for r in results)
    answered = sorted(r["latency"] for r in results if r["ok"])
    median = answered[len(answered) // 2]
    print(f"latency: median {median:.2f} s, max {latencies[-1]:.2f} s ({latencies[-1] / median:.1f}x)")  # noqa: T201
    assert not [r for r in results if r["status"] == "hang"], "a request hung"
    assert latencies[-1] < HANG_RATIO * median, f"a request took {latencies[-1]:.1f} s, the median {median:.2f} s"


def _plan(n: int, seed: int, invalid_share: float = 0.3, timeouts: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    plan = [("timeout", *TIMEOUT[:2], HEADERS, TIMEOUT[2])] * timeouts
    while len(plan) < n:
        if rng.random() < invalid_share:
            name = rng.choice(sorted(INVALID))
            route, body, headers, _ = INVALID[name]
            plan.append((name, route, body, headers, False))
        else:
            name = rng.choice(sorted(VALID))
            route, body, stream = VALID[name]
            plan.append((name, route, body, HEADERS, stream))
    rng.shuffle(plan)
    return plan


async def _load(base: str, plan: list[tuple], concurrency: int, on_progress=None) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    done: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=CLIENT_TIMEOUT_S, limits=limits) as http:

        async def one(req: tuple) -> None:
            async with gate:
                done.append(await _send(http, *req))
                if on_progress is not None:
                    on_progress(len(done))

        await asyncio.gather(*(one(r) for r in plan))
    return done


# -- processes ---------------------------------------------------------------------------------------------------
def _ours(pattern: str) -> list[psutil.Process]:
    """This test cluster's processes whose command line contains ``pattern`` (descendants of this process)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if pattern in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _replicas() -> list[psutil.Process]:
    return _ours(f"ServeReplica:{APP}:OpenAIServer")


def _app_processes() -> set[int]:
    """Every process the app runs: replicas and what they started (engine cores), sandbox workers and zygotes."""
    roots = _replicas() + _ours("ray::SandboxWorker")
    pids = {p.pid for p in roots}
    for p in roots:
        try:
            pids |= {c.pid for c in p.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return pids


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


def _replica_actors() -> dict[int, object]:
    """pid -> handle of each running replica of the app (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    handles = [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#OpenAIServer#")
    ]
    pids = ray.get([h.__ray_call__.remote(lambda _: os.getpid()) for h in handles], timeout=30)
    return dict(zip(pids, handles, strict=True))


def _wait_replicas(n: int, timeout_s: float = 180) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            replicas = status.deployments["OpenAIServer"].replica_states
            if replicas.get("RUNNING", 0) == n and len(_replicas()) == n:
                return
        time.sleep(1.0)
    raise AssertionError(f"Serve did not get back to {n} running replicas: {serve.status().applications.get(APP)}")


# -- the tests ---------------------------------------------------------------------------------------------------
def test_520_mixed_requests_on_two_replicas(app):
    plan = _plan(520, seed=0, timeouts=12)
    t0 = time.perf_counter()
    results = asyncio.run(_load(app, plan, concurrency=24))
    wall = time.perf_counter() - t0
    by_kind = Counter(r["kind"] for r in results)
    print(f"\n{len(results)} requests in {wall:.1f} s ({len(results) / wall:.1f}/s): {dict(by_kind)}")  # noqa: T201 - the figures
    assert len(results) == 520
    _assert_no_hang(results)
    for r in results:
        if r["kind"] in INVALID:
            assert r["status"] == INVALID[r["kind"]][3], r
        else:
            assert r["ok"], r  # every valid request answered, the timed-out snippets included
    timed_out = [r["json"]["choices"][0]["torl"]["tool_calls"] for r in results if r["kind"] == "timeout"]
    assert len(timed_out) == 12 and all(calls[0]["status"] == "timeout" for calls in timed_out), timed_out[:1]
    health = httpx.get(app + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    resp = httpx.post(app + "/v1/chat/completions", json=VALID["chat_tool"][1], headers=HEADERS, timeout=60).json()
    check_mul(resp["choices"][0]["message"]["content"], resp["choices"][0]["torl"])


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(app, ray_cluster):
    from ray import serve

    _wait_replicas(2)
    victim = _replicas()[0]
    victim_tree = {victim.pid} | {c.pid for c in victim.children(recursive=True)}
    assert any("EngineCore" in " ".join(psutil.Process(p).cmdline()) for p in victim_tree - {victim.pid})
    plan = _plan(200, seed=1, invalid_share=0.0)
    actors = _replica_actors()
    assert victim.pid in actors and len(actors) == 2, (victim.pid, list(actors))
    killed: list[float] = []
    on_replica: dict[str, int] = {}  # requests each replica was executing at the kill

    def kill_at(done: int) -> None:
        if done == 40 and not killed:
            import ray

            counts = ray.get([h.get_num_ongoing_requests.remote() for h in actors.values()], timeout=10)
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(time.perf_counter())
            on_replica.update(
                ("victim" if pid == victim.pid else "survivor", n) for pid, n in zip(actors, counts, strict=True)
            )

    results = asyncio.run(_load(app, plan, concurrency=16, on_progress=kill_at))
    assert killed, "the replica was never killed"
    failed = [r for r in results if not r["ok"]]
    statuses = Counter(str(r["status"]) for r in failed)
    print(f"\n{len(failed)} of {len(results)} failed after the kill: {statuses}; in flight then: {on_replica}")  # noqa: T201
    _assert_no_hang(results)
    for r in failed:  # a 5xx; a stream whose 200 was already sent ends with an in-band error event, or (its replica
        # dead, nothing left to send one) its chunked body is cut short, which every HTTP client reports as an error
        server_error = isinstance(r["status"], int) and r["status"] >= 500
        started = r["kind"] == "chat_stream" and r["status"] == 200 and (r.get("cut") or "error" in r["body"])
        assert server_error or started, r
    # Only what the dead replica was executing: the requests it held when it died. The survivor's all succeeded, and
    # none that came after the kill was lost (Serve routes them to the survivor).
    assert 0 < on_replica["victim"] and on_replica["survivor"] > 0, on_replica
    assert len(failed) <= on_replica["victim"], f"{len(failed)} requests failed; the dead replica held {on_replica}"

    _wait_replicas(2)  # Serve replaced it
    assert not _alive(victim_tree), f"the dead replica left processes behind: {_alive(victim_tree)}"
    resp = httpx.post(app + "/v1/chat/completions", json=VALID["chat_tool"][1], headers=HEADERS, timeout=60).json()
    check_mul(resp["choices"][0]["message"]["content"], resp["choices"][0]["torl"])

    # Shut down: nothing the app started is left (engine cores, sandbox workers, zygotes).
    pids = _app_processes()
    assert len(pids) >= 6, f"expected replicas, engines, sandbox workers and zygotes, found {len(pids)} processes"
    serve.delete(APP)
    deadline = time.monotonic() + 60
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(pids), [psutil.Process(p).cmdline() for p in _alive(pids)]
