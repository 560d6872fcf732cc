"""Generator actor: the tool loop over a vLLM engine, one asyncio task per trajectory (``torl.rollout.tool_loop``'s
driver).

Each trajectory awaits the engine for a round, then awaits the sandbox pool for its tool call while the engine keeps
decoding every other trajectory (continuous batching), then continues from the exact token ids so far. Batches for
training and evaluation (``generate``) and the serving stream (``generate_stream``) go through the same driver,
``run_async``; the stream only listens to its events. The engine, its weight versions and weight updates are the
base class's (``actors/engine.py``).

Not here: the loop's logic, budget, masks and metrics (``torl.rollout.tool_loop``, ``torl.rollout.metrics``), the TIR
text protocol (``torl.rollout.tool_protocol``), sandboxing (``actors.sandbox``), grading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray

from actors.engine import Engine
from torl.config import Config
from torl.rollout.metrics import BatchStats, batch_metrics, tool_warnings
from torl.rollout.sampling import SamplingOverrides
from torl.rollout.tool_loop import (
    Finished,
    GenRequest,
    LoopSettings,
    Retokenizer,
    RoundOutput,
    RoundRequest,
    StreamEvent,
    ToolLoop,
    run_async,
    run_sync,
)
from torl.rollout.types import ExecResult, Trajectory

log = logging.getLogger(__name__)


class Generator(Engine):
    """Runs the tool loop on its engine: ``generate`` for a batch, ``generate_stream`` for one served trajectory."""

    def __init__(self, cfg: Config, model_path: str, sandbox: Any | None = None, log_dir: str | None = None) -> None:
        """``sandbox``: the ``SandboxPool`` tool calls run in (None: tools off); ``log_dir``: see ``Engine``."""
        super().__init__(cfg, model_path, log_dir)
        self.sandbox = sandbox

    # -- public API -----------------------------------------------------------------------------------------------
    def _loops(self, requests: list[GenRequest], settings: LoopSettings) -> list[ToolLoop]:
        loops = []
        for r in requests:
            if r.n < 1:
                raise ValueError(f"GenRequest {r.problem_id}: n must be >= 1, got {r.n}")
            for i in range(r.n):
                traj = Trajectory(
                    problem_id=r.problem_id, group=r.group, prompt_ids=list(r.prompt_ids), answer=r.answer
                )
                loops.append(
                    ToolLoop(traj, i, settings, self._encode, self._decode, step=r.step, retokenizer=self._retok())
                )
        return loops

    def _retok(self) -> Retokenizer | None:
        """ToRL's text round trip (tool.compat_retokenise): offsets, plain text as vLLM gives it, the EOS text."""
        if not self.cfg.tool.compat_retokenise:
            return None
        tok = self.tokenizer

        def encode_offsets(text: str) -> tuple[list[int], list[tuple[int, int]]]:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

        return Retokenizer(encode_offsets, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _check_tools(self, settings: LoopSettings) -> None:
        if settings.tool.enabled and settings.tool.max_calls > 0 and self.sandbox is None:
            raise ValueError(
                "tool.enabled with tool.max_calls > 0 needs a sandbox pool; pass one or set tool.enabled=false"
            )

    async def generate(
        self,
        requests: list[GenRequest],
        greedy: bool = False,
        tools: bool | None = None,
        max_calls: int | None = None,
        mode: str | None = None,
        sampling: SamplingOverrides | None = None,
    ) -> tuple[list[Trajectory], dict[str, float]]:
        """Sample ``n`` trajectories per request (greedy for evaluation); returns them in request order + metrics.

        ``tools``/``max_calls``/``mode`` ("async" or "sync") override the config for this call (benchmarks, ablations);
        ``sampling`` replaces ``greedy`` with the evaluation's own decoding (eval.temperature/top_p/top_k).
        """
        mode = mode or self.cfg.rollout.mode
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        await self.start()
        settings = LoopSettings.from_config(self.cfg, max_calls=max_calls, tools=tools)
        self._check_tools(settings)
        loops = self._loops(requests, settings)
        persistent = settings.tool.session == "persistent"
        sessions = {id(lp): uuid.uuid4().hex if persistent else None for lp in loops}

        over = sampling if sampling is not None else SamplingOverrides(greedy=greedy)

        async def gen(lp: ToolLoop, req: RoundRequest) -> RoundOutput:
            return await self.round(lp, req, over)

        async def tool(lp: ToolLoop, code: str) -> ExecResult:
            return await self.sandbox.run(code, session=sessions[id(lp)])

        async def one(lp: ToolLoop) -> Trajectory:
            try:
                return await run_async(lp, gen, tool)
            finally:
                if persistent and lp.calls:
                    await self.sandbox.close_session(sessions[id(lp)])

        t0 = time.perf_counter()
        idle0 = self._idle_total()
        if mode == "sync":
            try:
                trajs = await run_sync(loops, gen, tool)
            finally:
                if persistent:
                    await asyncio.gather(
                        *(
                            self.sandbox.close_session(s)
                            for lp, s in zip(loops, sessions.values(), strict=True)
                            if lp.calls
                        )
                    )
        else:
            trajs = list(await asyncio.gather(*(one(lp) for lp in loops)))
        metrics = batch_metrics(trajs, BatchStats(time.perf_counter() - t0, loops))
        metrics["rollout/policy_version"] = float(self._version)
        # Idle is only meaningful while a batch runs; before the first call the open span is the actor's start-up.
        metrics["time/engine_idle_tools"] = self._idle_total() - idle0
        for msg in tool_warnings(metrics, settings.tool):
            log.warning("TOOLS NOT FIRING: %s", msg)
        return trajs, metrics

    def sandbox_stats(self) -> dict[str, float]:
        """This generator's sandbox client's health since it started (``SandboxPool.stats``); empty without tools."""
        return self.sandbox.stats() if self.sandbox is not None else {}

    async def generate_stream(
        self, prompt_ids: list[int], overrides: SamplingOverrides | dict | None = None, max_calls: int | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Run one trajectory and yield its events as they happen (for serving), through the same driver as training.

        Events (``torl.rollout.tool_loop``): ``TextDelta`` (model text; only with ``overrides.stream``; stop strings
        held back), ``ToolStarted``, ``ToolFinished`` (the recorded ``ToolCall``), ``Observation`` (the exact inserted
        text), and last ``Finished`` with the trajectory and the client-facing text, which ends before a matched
        client stop string (the trajectory keeps every sampled token). ``overrides`` may be a plain dict (a Ray
        caller); a misspelled key is an error. From Ray call it with ``.options(num_returns="streaming")``.
        """
        over = overrides if isinstance(overrides, SamplingOverrides) else SamplingOverrides.from_dict(overrides)
        await self.start()
        base = LoopSettings.from_config(self.cfg, max_calls=max_calls)
        settings = dataclasses.replace(base, max_response_tokens=over.max_tokens or base.max_response_tokens)
        self._check_tools(settings)
        lp = ToolLoop(
            Trajectory(problem_id=uuid.uuid4().hex, group=0, prompt_ids=list(prompt_ids)),
            0,
            settings,
            self._encode,
            self._decode,
            retokenizer=self._retok(),
        )
        session = uuid.uuid4().hex if settings.tool.session == "persistent" else None
        events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        rounds: list[tuple[int, RoundOutput]] = []  # (response length before the round, its output)

        async def gen(lp: ToolLoop, req: RoundRequest) -> RoundOutput:
            start = len(lp.traj.response_ids)
            out = await self.round(lp, req, over, events.put)
            rounds.append((start, out))
            return out

        async def tool(lp: ToolLoop, code: str) -> ExecResult:
            return await self.sandbox.run(code, session=session)

        async def drive() -> None:
            try:
                traj = await run_async(lp, gen, tool, events.put)
                text = traj.text
                if rounds and _client_stop(lp, rounds[-1][1], over.stop):
                    # OpenAI: the matched stop string is not part of the text (vLLM cut it from the round's text).
                    start, last = rounds[-1]
                    traj.finish_reason = "stop"
                    text = self._decode(traj.response_ids[:start]) + last.text
                await events.put(Finished(traj, text))
            except Exception as exc:  # surfaced to the consumer, not lost in a task
                await events.put(exc)
            finally:
                if session is not None and lp.calls:
                    await self.sandbox.close_session(session)

        task = asyncio.create_task(drive())
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    raise RuntimeError(f"generate_stream failed: {ev!r}") from ev
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            if not task.done():
                task.cancel()  # the consumer went away: cancelling the engine iteration aborts the request


def _client_stop(lp: ToolLoop, last: RoundOutput, stops: tuple[str, ...]) -> bool:
    """Whether the trajectory ended at one of the client's stop strings (not EOS, not the tool stop string)."""
    return (
        lp.traj.finish_reason == "eos"
        and last.finish_reason == "stop"
        and isinstance(last.stop_reason, str)
        and last.stop_reason in stops
    )


GeneratorActor = ray.remote(Generator)
