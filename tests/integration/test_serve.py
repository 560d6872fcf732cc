"""The Serve app end to end on loopback: official openai client, raw HTTP for bad input, 32 concurrent requests.

One app start per module (the engine takes ~20 s). The tiny random model is first taught, in a few seconds of
overfitting, to answer two questions with a ```python block, so real tool calls go through vLLM and the sandbox:
"What is 6 times 7?" runs ``print(6*7)``; "Sleep for a while." runs a 4 s sleep (used to kill the sandbox mid-call).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
from memorize import memorize

from torl.data.prompts import build_prompt
from torl.rollout.tool_loop import observation_insert

API_KEY = "test-key-123"
MODEL = "tiny-tir"
Q_MUL = "What is 6 times 7?"
Q_SLEEP = "Sleep for a while."
Q_SESSION = "Set x, then read it."
EXAMPLES = [  # (question, [(code, output), ...], the rest)
    (Q_MUL, [("print(6*7)", "42")], "The answer is \\boxed{42}."),
    (Q_SLEEP, [("import time\ntime.sleep(4)\nprint('woke')", "woke")], "Done \\boxed{1}."),
    (Q_SESSION, [("x = 6*7\nprint(x)", "42"), ("print(x+1)", "43")], "So \\boxed{43}."),
]


def teach(src: Path, dst: Path) -> Path:
    """Overfit ``src`` on EXAMPLES, tokenized exactly as the tool loop builds the context (observation spliced in),
    until greedy decoding replays them by a clear margin on any CPU (tests/integration/memorize.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    batch = []
    for question, calls, rest in EXAMPLES:
        ids = tok.encode(build_prompt(question, "tir_base_0309"))
        labels = [-100] * len(ids)
        for code, body in calls:
            round_text = f"```python\n{code}\n```\n"
            call = tok.encode(round_text + "```output", add_special_tokens=False)
            obs = tok.encode(observation_insert(round_text, "", body, "```output"), add_special_tokens=False)
            ids, labels = ids + call + obs, labels + call + [-100] * len(obs)
        tail = tok.encode(rest, add_special_tokens=False) + [tok.eos_token_id]
        batch.append((torch.tensor([ids + tail]), torch.tensor([labels + tail])))
    memorize(model, batch, lr=3e-3)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def app_overrides(model_dir: Path, port: int) -> list[str]:
    """The taught model behind the app on ``port``, small limits, one sandbox worker, the test's key and name."""
    return [
        f"model.path={model_dir}",
        "model.max_model_len=512",
        "prompt.max_prompt_tokens=128",
        "rollout.max_response_tokens=256",
        "sandbox.num_workers=1",
        f"serve.port={port}",
        f"serve.api_key={API_KEY}",
        "serve.max_tool_calls=2",
        f"serve.model_name={MODEL}",
    ]


class Server(str):
    """The app's base URL, and its tool.session mode."""

    def __new__(cls, base: str, session: str) -> Server:
        url = super().__new__(cls, base)
        url.session = session
        return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[("proxy", "stateless"), ("haproxy", "persistent")], ids=lambda p: p[0])
def server(request, ray_cluster, tiny_model_dir, tmp_path_factory):
    """The app behind each ingress (serve.ingress): Ray's Python proxy with stateless tool calls, and HAProxy with
    direct ingress and persistent interpreter sessions (tool.session). Yields (base URL, session mode)."""
    from ray import serve

    from actors.serve import build_app, start_serve
    from torl.config_load import load_config

    model_dir = teach(tiny_model_dir, tmp_path_factory.mktemp("taught") / MODEL)
    port = free_port()
    cfg = load_config(
        overrides=[
            *app_overrides(model_dir, port),
            "sandbox.timeout_s=8",
            f"serve.ingress={request.param[0]}",
            f"tool.session={request.param[1]}",
            f"serve.haproxy_stats_port={free_port()}",  # Ray's fixed defaults could be taken on a shared machine
            f"serve.haproxy_metrics_port={free_port()}",
        ]
    )
    start_serve(cfg)
    serve.run(build_app(cfg), name="torl-test", route_prefix="/")
    yield Server(f"http://127.0.0.1:{port}", request.param[1])
    serve.shutdown()


def client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def chat_mul(base: str, **kw):
    messages = [{"role": "user", "content": Q_MUL}]
    return client(base).chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def check_mul(text: str, torl: dict) -> None:
    assert text.startswith("```python\nprint(6*7)\n```\n```output\n42\n```\n"), text
    assert torl["answer"] == "42", text
    assert text.endswith("\\boxed{42}."), text  # EOS ended it, and its token text is not in the content
    (call,) = torl["tool_calls"]
    assert (call["code"], call["output"], call["status"]) == ("print(6*7)", "42", "ok")
    assert call["latency_s"] >= call["exec_s"] > 0


def test_health_and_models(server):
    health = httpx.get(server + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["sandbox"]["level"] == "ok"  # as training's gate judges it
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_runs_the_tool_and_returns_answer(server):
    resp = chat_mul(server)
    choice = resp.choices[0]
    check_mul(choice.message.content, choice.model_extra["torl"])
    assert choice.finish_reason == "stop"
    assert resp.usage.completion_tokens > 10 and resp.usage.prompt_tokens > 10


def test_completions_with_template_text(server):
    prompt = build_prompt(Q_MUL, "tir_base_0309")
    resp = client(server).completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=200)
    choice = resp.choices[0]
    check_mul(choice.text, choice.model_extra["torl"])


def test_client_stop_string_ends_generation_before_it(server):
    # "42" is also in the tool output, which is spliced in, not generated: only the model's own "42" stops it.
    resp = chat_mul(server, stop=["42"])
    choice = resp.choices[0]
    assert choice.message.content.startswith("```python\nprint(6*7)\n```\n```output\n42\n```\n")
    assert choice.message.content.endswith("\\boxed{"), choice.message.content
    assert choice.finish_reason == "stop" and choice.model_extra["torl"]["answer"] is None


def test_a_session_keeps_variables_between_a_requests_calls(server):
    """Persistent: the second call reads the x the first one set; stateless: it fails with NameError."""
    messages = [{"role": "user", "content": Q_SESSION}]
    resp = client(server).chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=200, extra_body={"max_tool_calls": 2}
    )
    first, second = resp.choices[0].model_extra["torl"]["tool_calls"]
    assert (first["code"], first["output"], first["status"]) == ("x = 6*7\nprint(x)", "42", "ok")
    if server.session == "persistent":
        assert (second["output"], second["status"]) == ("43", "ok")
    else:
        assert second["status"] == "error" and "NameError" in second["output"]


def test_tool_budget_override_zero_runs_nothing(server):
    resp = chat_mul(server, max_tokens=40, extra_body={"max_tool_calls": 0})
    torl = resp.choices[0].model_extra["torl"]
    assert torl["tool_calls"] == [] and torl["max_tool_calls"] == 0
    assert "```output\n42" not in resp.choices[0].message.content  # no execution spliced in


def test_streaming_emits_tokens_and_tool_output(server):
    stream = chat_mul(server, stream=True, stream_options={"include_usage": True})
    deltas, tool_events, finish, usage, final = [], [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            torl = (choice.model_extra or {}).get("torl")
            if torl and "tool_call" in torl:
                tool_events.append(torl["tool_call"])
            if choice.finish_reason:
                finish, final = choice.finish_reason, torl
    text = "".join(deltas)
    assert len(deltas) > 5  # token by token, not one blob
    check_mul(text, final)
    assert finish == "stop" and usage.completion_tokens > 10
    assert [(e["code"], e["output"]) for e in tool_events] == [("print(6*7)", "42")]


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "What", "max_tokens": 5, "stream": True, "max_tool_calls": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


BAD = [
    ("malformed json", b'{"model": "tiny-tir", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("negative max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
     400, "max_tokens"),
    ("huge max_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
     400, "max_tokens"),
    ("prompt + max_tokens beyond context", {"model": MODEL, "messages": [{"role": "user", "content": "7 " * 300}],
                                            "max_tokens": 250}, 400, "max_tokens"),
    ("at the edge is fine", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 256,
                             "max_tool_calls": 0}, None, None),
    ("over-long prompt", {"model": MODEL, "messages": [{"role": "user", "content": "7 " * 3000}]}, 400, "messages"),
    ("bad type temperature", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature"),
    ("bad type content", {"model": MODEL, "messages": [{"role": "user", "content": 12}]}, 400, "messages[0].content"),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("tool budget over cap", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tool_calls": 99},
     400, "max_tool_calls"),
]  # fmt: skip


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_in_openai_shape(server, name, body, status, param):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=30, **kw)
    if status is None:  # a valid request at the edge must succeed (prompt + max_tokens within the context)
        assert r.status_code == 200, r.text
        return
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param, err


def test_completions_bad_input_and_unknown_route(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server + "/v1/completions", json={"model": MODEL}, headers=headers, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}, headers=headers)
    assert r.status_code == 400
    r = httpx.get(server + "/v1/nothing-here", headers=headers, timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_api_key_required(server):
    from openai import AuthenticationError, OpenAI

    bad = OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(AuthenticationError):
        bad.models.list()
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_32_concurrent_requests_all_complete(server):
    from openai import AsyncOpenAI

    async def run() -> list:
        async with AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            messages = [{"role": "user", "content": Q_MUL}]
            calls = [c.chat.completions.create(model=MODEL, messages=messages, temperature=0) for _ in range(32)]
            return await asyncio.gather(*calls)

    t0 = time.perf_counter()
    results = asyncio.run(run())
    assert len(results) == 32
    for resp in results:
        check_mul(resp.choices[0].message.content, resp.choices[0].model_extra["torl"])
    assert time.perf_counter() - t0 < 120


def test_sandbox_worker_crash_gives_tool_error_not_failed_server(server, ray_cluster):
    """Kill the sandbox worker actor while it runs the 4 s snippet: that call reports a sandbox error."""
    import concurrent.futures

    ray = ray_cluster
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("torl_serve_sandbox_")]
    assert named, "the serve app's sandbox workers were not found"
    workers = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named]
    messages = [{"role": "user", "content": Q_SLEEP}]
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(
            client(server).chat.completions.create, model=MODEL, messages=messages, temperature=0, max_tokens=120
        )
        deadline = time.monotonic() + 30
        while not any(ray.get(w.load.remote())["running"] for w in workers):
            assert time.monotonic() < deadline and not fut.done(), "the sleep snippet never started"
            time.sleep(0.1)
        for w in workers:
            ray.kill(w, no_restart=False)  # a crash: Ray restarts the worker for later requests
        resp = fut.result(timeout=60)
    (call,) = resp.choices[0].model_extra["torl"]["tool_calls"]
    assert call["status"] == "sandbox_error" and "time.sleep(4)" in call["code"]
    for w in workers:  # wait until Ray has restarted the worker (requests sent meanwhile get sandbox errors too)
        deadline = time.monotonic() + 60
        while True:
            try:
                ray.get(w.load.remote(), timeout=10)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                assert time.monotonic() < deadline, "sandbox worker did not come back"
                time.sleep(0.5)
    after = chat_mul(server).choices[0]  # the server and (restarted) sandbox keep serving
    check_mul(after.message.content, after.model_extra["torl"])


def test_serve_yaml_proxy_env_matches_start_serve():
    """`serve run configs/serve.yaml` must configure the proxy as `jobs/serve.py` (start_serve) does."""
    import yaml

    from actors.serve import PROXY_ENV

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "serve.yaml").read_text())
    env = cfg["controller_options"]["runtime_env"]["env_vars"]
    assert {k: env.get(k) for k in PROXY_ENV} == PROXY_ENV
