"""Serve benchmark: requests/s and p50/p99 latency through the OpenAI endpoint vs the bare vLLM engine, one run.

The same greedy, no-tool requests (ToRL-templated questions, ``--max-tokens`` each) go (1) straight to a vLLM
``AsyncLLM`` built exactly as the generator builds it, in this process, with no HTTP, Serve or tool loop, and
(2) to ``POST /v1/completions`` of the Serve app (``max_tool_calls: 0``) over loopback HTTP, at 1, 8 and 32
concurrent clients. Both sides ask the engine for the same work: greedy, same max_tokens, no logprobs, final output
only (what the server asks for a non-streaming request); greedy decoding makes them generate the same tokens
(checked). Prints a table and the Serve overhead ratio (bare requests/s over Serve requests/s; target <= 1.3 at 32).

    python bench/serve.py [--model DIR] [--requests 64] [--max-tokens 64] [--clients 1,8,32] [--http-floor]

``--http-floor`` adds a third side: the replica's request path for ``/v1/completions`` (validation, tokenization,
the generator, the response JSON) on a plain uvicorn + FastAPI server in a process of its own with its own engine,
without Ray Serve. Its ratio to the bare engine is what any Python HTTP front end of ours costs on this machine; the
rest of Serve's ratio is Serve's proxy and replica machinery.

``--model`` defaults to the project's small base model (models/torl-tiny-base) if built, else a random Qwen2 of
the same shape. Both engines start together and stay up, and the two sides alternate level by level, so each ratio
compares runs made seconds apart (this machine's speed drifts by +-10 % over minutes); they never serve at once (2
cores). A level sends at least 8 requests per client, so a level's figure is not dominated by its ramp-up and tail.
The HTTP client is aiohttp in this process (~0.5 ms of CPU per request; httpx cost several times that and capped the
Serve figure).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as in a 1-CPU Ray actor (the Serve engine replica)


def model_dir(arg: str, tmp: str) -> str:
    if arg:
        return arg
    base = REPO / "models" / "torl-tiny-base"
    if (base / "config.json").is_file():
        return str(base)
    from torl.models.modeling import ModelShape, build_random_checkpoint

    # The base model recipe's shape (configs/base_model.yaml): hidden 128, 4 layers, head_dim 32.
    shape = ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512)
    print("models/torl-tiny-base not built; using a random model of its shape")
    return str(build_random_checkpoint(Path(tmp) / "model", shape=shape, seed=0, vocab_size=768))


def bench_config(path: str, port: int, ingress: str = "proxy"):
    from torl.config_load import load_config

    return load_config(
        overrides=[
            f"serve.ingress={ingress}",
            f"model.path={path}",
            "model.max_model_len=1024",
            "prompt.max_prompt_tokens=256",
            "rollout.max_response_tokens=512",
            f"serve.port={port}",
            "serve.model_name=m",
        ]
    )


def floor_server(path: str, port: int) -> None:
    """``--http-floor``'s server: the replica's /v1/completions path on uvicorn + FastAPI, one process, no Serve."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from actors.generator import Generator
    from actors.serve import _choice, serve_limits
    from torl.rollout.tool_loop import Finished
    from torl.serving import openai_api as api

    cfg = bench_config(path, port)
    state: dict = {}
    limits = serve_limits(cfg, cfg.serve.model_name)  # as the replica's

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        gen = Generator(cfg, path, None)
        await gen.start()
        state.update(gen=gen, tok=gen.tokenizer, eos=gen.tokenizer.eos_token)
        yield
        await gen.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    async def completions(request: Request):
        # As OpenAIServer.completions + _respond + _complete for a non-streaming single-choice request.
        try:
            api.check_api_key(request.headers.get("authorization"), "")
            req, plan = api.parse_completion(api.parse_body(await request.body(), limits), limits)
            ids = state["tok"].encode(req.prompt)
            sampling = plan.sampling(len(ids), limits)
        except api.APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        async for ev in state["gen"].generate_stream(ids, sampling, plan.max_tool_calls):
            if isinstance(ev, Finished):
                choice = _choice(ev, state["eos"])
        return api.completion_response(api.new_id("cmpl"), "m", [choice], len(ids), plan, req.prompt)

    # This module's annotations are strings and Request is a local name: resolve it for FastAPI's injection.
    completions.__annotations__["request"] = Request
    app.post("/v1/completions")(completions)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def wait_ready(base: str, proc, timeout_s: float = 600) -> None:
    import aiohttp

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(base) as http:
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"--http-floor server exited with {proc.returncode}")
            try:
                async with http.get("/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError("--http-floor server did not come up")


def prompts(tok, n: int) -> list[list[int]]:
    from torl.data.prompts import build_prompt

    questions = [f"What is {17 + 7 * i} times {23 + 3 * i}? Then add {i}." for i in range(n)]
    return [tok.encode(build_prompt(q, "tir_base_0309")) for q in questions]


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    lat = sorted(latencies)
    return {
        "rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
    }


async def drive(one, work: list, clients: int) -> tuple[dict[str, float], list[int]]:
    """``clients`` workers pull from ``work`` until it is empty; returns the latency summary and tokens per request."""
    queue = list(enumerate(work))
    latencies: list[float] = [0.0] * len(work)
    tokens: list[int] = [0] * len(work)

    async def worker() -> None:
        while queue:
            i, item = queue.pop()
            t0 = time.perf_counter()
            tokens[i] = await one(item)
            latencies[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return summary(latencies, time.perf_counter() - t0), tokens


def per_level(n: int, clients: int) -> int:
    return max(n, 8 * clients)


async def compare(
    cfg, path: str, base: str, work: list, texts: list[str], levels: list[int], args, serve_up, floor: str = ""
) -> dict:
    """Per level: the bare engine, then the Serve endpoint (then the HTTP floor server, if ``floor``), on the same
    requests (cycled to the level's count). ``serve_up`` blocks until the Serve app (started meanwhile) is ready."""
    import aiohttp
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from actors.generator import Generator

    gen = Generator(cfg, path, None)
    await gen.start()  # the engine exactly as a Serve replica builds it
    await asyncio.to_thread(serve_up)
    engine = gen.engine
    # What the server asks of the engine for a non-streaming request with no tools (Generator._sampling).
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
    counter = iter(range(10**9))

    async def bare(ids: list[int]) -> int:
        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"bench-{next(counter)}"):
            final = out
        return len(final.outputs[0].token_ids)

    results = {}
    connector = aiohttp.TCPConnector(limit=max(levels) + 4)
    timeout = aiohttp.ClientTimeout(total=300)
    try:
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as http:

            async def post(url: str, text: str) -> int:
                body = {"model": "m", "prompt": text, "max_tokens": args.max_tokens, "temperature": 0}
                async with http.post(url, json={**body, "max_tool_calls": 0}) as r:
                    r.raise_for_status()
                    return (await r.json())["usage"]["completion_tokens"]

            async def served(text: str) -> int:
                return await post("/v1/completions", text)

            async def floored(text: str) -> int:
                return await post(f"{floor}/v1/completions", text)

            await drive(bare, work[:16], 8)  # warm-up
            await drive(served, texts[:16], 8)
            if floor:
                await drive(floored, texts[:16], 8)
            for c in levels:
                n = per_level(args.requests, c)
                results[c] = (await drive(bare, cycle(work, n), c), await drive(served, cycle(texts, n), c))
                if floor:
                    results[c] += (await drive(floored, cycle(texts, n), c),)
    finally:
        await gen.shutdown()
    return results


def cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least 8 per client)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--http-floor", action="store_true", help="also measure the no-Serve HTTP floor (see above)")
    ap.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy", help="serve.ingress of the Serve side")
    ap.add_argument("--floor-server", default="", help=argparse.SUPPRESS)  # internal: run that server on this model
    args = ap.parse_args()
    if args.floor_server:
        floor_server(args.floor_server, args.port + 1)
        return 0
    levels = [int(c) for c in args.clients.split(",")]

    from transformers import AutoTokenizer

    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    path = model_dir(args.model, tmp)
    tok = AutoTokenizer.from_pretrained(path)
    work = prompts(tok, args.requests)
    texts = [tok.decode(ids) for ids in work]
    assert [tok.encode(t) for t in texts] == work, "prompt text does not round-trip to the same ids"
    cfg = bench_config(path, args.port, args.ingress)

    from ray import serve

    from actors.cluster import init_ray
    from actors.serve import build_app, start_serve

    init_ray(num_cpus=4)
    t0 = time.time()
    threads = concurrent.futures.ThreadPoolExecutor(1)
    floor_proc = None
    floor = ""
    try:
        if args.http_floor:
            floor = f"http://127.0.0.1:{args.port + 1}"
            cmd = [sys.executable, __file__, "--floor-server", path, "--port", str(args.port)]
            kv = str(cfg.rollout.engine.cpu_kvcache_gb)  # as build_app gives the replica
            floor_proc = subprocess.Popen(cmd, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv})
        start_serve(cfg)
        # The replica's engine starts while this process builds the bare one (nothing is measured yet).
        serving = threads.submit(serve.run, build_app(cfg), name="bench", route_prefix="/")
        if floor_proc is not None:
            asyncio.run(wait_ready(floor, floor_proc))
        base = f"http://127.0.0.1:{args.port}"
        results = asyncio.run(compare(cfg, path, base, work, texts, levels, args, serving.result, floor))
    finally:
        threads.shutdown()
        if floor_proc is not None:
            floor_proc.terminate()
            floor_proc.wait(60)
        serve.shutdown()
        import ray

        ray.shutdown()
    print(f"measured in {time.time() - t0:.0f} s", flush=True)

    counts = ", ".join(f"{per_level(args.requests, c)} at {c}" for c in levels)
    print(
        f"\nmodel {path}; requests per level: {counts}; greedy, max_tokens {args.max_tokens}, no tools; "
        f"serve.ingress={args.ingress}"
    )
    print(f"{'clients':>7} | {'bare req/s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'serve req/s':>11} {'p50 ms':>8} "
          f"{'p99 ms':>8} | overhead (bare/serve req/s)")  # fmt: skip
    report = {}
    for c in levels:
        (b, btok), (s, stok), *floored = results[c]
        same = btok == stok and all(ftok == btok for _, ftok in floored)
        ratio = b["rps"] / s["rps"]
        report[c] = {
            "bare": b,
            "serve": s,
            "overhead": ratio,
            "same_tokens": same,
            "tokens_mean": sum(btok) / len(btok),
        }
        note = "" if same else "  (token counts differ!)"
        if floored:
            f = floored[0][0]
            report[c].update(http_floor=f, floor_overhead=b["rps"] / f["rps"])
            note = f"  | HTTP floor {f['rps']:.1f} req/s, p50 {f['p50_ms']:.0f} ms: {b['rps'] / f['rps']:.2f}x{note}"
        print(f"{c:>7} | {b['rps']:>10.1f} {b['p50_ms']:>8.0f} {b['p99_ms']:>8.0f} | {s['rps']:>11.1f} "
              f"{s['p50_ms']:>8.0f} {s['p99_ms']:>8.0f} | {ratio:.2f}x{note}")  # fmt: skip
    top = max(levels)
    verdict = "meets" if report[top]["overhead"] <= 1.3 else "misses"
    print(f"\nServe overhead at {top} clients: {report[top]['overhead']:.2f}x ({verdict} the <= 1.3x target)")
    print(json.dumps({str(k): v for k, v in report.items()}))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
