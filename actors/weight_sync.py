"""New weights from the learner to every engine over one collective group, through vLLM's weight-transfer API.

Not an actor: the transport the learner and generator actors share. Learner rank 0 and every engine worker of
every generator form one group (rank 0 = the learner, then each generator's workers in turn); a push is one
broadcast stream that reaches all generators at once. The trainer side is a vLLM ``TrainerWeightTransferEngine``
driven through a ``VLLMWeightSyncClient`` (here ``GeneratorFleet``, which fans the four control calls out to the
generator actors); the engine side is vLLM's ``WeightTransferEngine`` inside each engine worker process. On GPUs both
are vLLM's own ``nccl`` engines. On CPU vLLM ships none, so torl registers ``torl_gloo`` through the same factories
(``register``, loaded in vLLM's processes as a ``vllm.general_plugins`` entry point): CPU tests drive exactly the
protocol a GPU run uses, with gloo where NCCL would be.

What travels: parameters in the engine's dtype, layer by layer, each gathered from its FSDP2 shards only when its
turn comes and dropped after its bucket is sent, so no process holds a full state dict, nothing is written to disk
and nothing goes through Ray's object store. Every collective has a timeout (``rollout.weight_sync_timeout_s``), and
a generator that dies mid-push fails the push with its name (docs/platform-notes.md §12).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Self

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    materialize_full_tensor,
)

from torl.config import Config
from torl.infra.weight_buckets import TensorMeta, bucket_bytes_of, pack, plan_buckets, unpack
from torl.rollout.types import GeneratorDied

log = logging.getLogger(__name__)

GLOO = "torl_gloo"


def backend_for(cfg: Config) -> str:
    """The weight-transfer backend both ends use: vLLM's NCCL engine when the engines run on GPUs, else torl's gloo."""
    return "nccl" if cfg.rollout.num_gpus > 0 else GLOO


def engine_workers(cfg: Config) -> int:
    """Engine worker processes per generator, each one rank of the group (one per tensor-parallel shard)."""
    return cfg.rollout.engine.tensor_parallel_size


def open_group(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """A gloo group of its own (not torch's global one, which the learner's FSDP and the engine each already use).

    Rank 0 hosts the rendezvous store. ``timeout_s`` bounds the rendezvous and every collective on the group.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore("torl-weights", store), rank, world_size, timeout)


def _broadcast(group: dist.ProcessGroup, buffer: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


# ---- engine side (inside each vLLM worker process) -------------------------------------------------------------
@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    """What an engine worker needs to join the group; ``rank_offset`` is its generator's first rank."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int
    timeout_s: float


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One push's tensors in send order; both ends cut the same buckets from it (``torl.infra.weight_buckets``)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def metas(self) -> list[TensorMeta]:
        return [
            TensorMeta(n, getattr(torch, d), tuple(s))
            for n, d, s in zip(self.names, self.dtype_names, self.shapes, strict=True)
        ]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives buckets broadcast by learner rank 0 and loads them through vLLM's layerwise reload.

    Layerwise reload (as vLLM's NCCL engine uses) takes checkpoint-format names, re-runs each layer's weight
    processing once all its tensors arrived, and needs no file.
    """

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: dist.ProcessGroup | None = None
        self.bucket_bytes = 0

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.group = open_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a machine without one; gloo
        # broadcasts into CPU memory are complete when they return.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("torl_gloo weight transfer not initialised: call init_weight_transfer_engine first")
        metas = update_info.metas()
        for bucket in plan_buckets(metas, self.bucket_bytes):
            buffer = torch.empty(bucket_bytes_of(metas, bucket), dtype=torch.uint8)
            _broadcast(self.group, buffer)
            tensors = unpack(buffer, [metas[i] for i in bucket])
            self.model.load_weights([(metas[i].name, t) for i, t in zip(bucket, tensors, strict=True)])

    def shutdown(self) -> None:
        self.group = None


# ---- trainer side (learner rank 0 sends; other ranks join the FSDP gathers) -----------------------------------
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int
    timeout_s: float


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Streams the source in buckets over the gloo group while the engines receive (the NCCL engine's round trip)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, info: GlooTrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=info.is_sender)
        self.info = info
        self.group: dist.ProcessGroup | None = None

    @classmethod
    def trainer_init(
        cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None
    ) -> Self:
        if source is None:
            raise ValueError("torl_gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = GlooInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,
            world_size=init_info.world_size,
            bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s,
        )
        # The engines block in the rendezvous until rank 0 opens it, so both happen at once.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = open_group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
            )
            joined.result()
        return engine

    def send_weights(self) -> None:
        assert self.source is not None
        metas = [TensorMeta(m.name, m.dtype, tuple(m.shape)) for m in self.source.metadata()]
        if not self.is_sender:
            for _ in self.source:  # the FSDP gathers are collectives: every rank walks the parameters in step
                pass
            return
        assert self.group is not None, "trainer_init must run before send_weights"
        update = GlooUpdateInfo(
            names=[m.name for m in metas],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in metas],
            shapes=[list(m.shape) for m in metas],
        )
        pairs = iter(self.source)
        try:
            self.client.start_weight_update()
            run_beside(lambda: self.client.update_weights(asdict(update)), lambda: self._stream(metas, pairs))
            self.client.finish_weight_update()
        finally:
            for _ in pairs:  # a failed push still finishes the gathers, or the other learner ranks wait forever
                pass

    def _stream(self, metas: list[TensorMeta], pairs: Iterator[tuple[str, torch.Tensor]]) -> None:
        for bucket in plan_buckets(metas, self.info.bucket_bytes):
            tensors = []
            for i in bucket:
                name, tensor = next(pairs)
                expected = metas[i]
                if name != expected.name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
                    raise ValueError(
                        f"weight source yielded {name} {tensor.dtype} {tuple(tensor.shape)}, declared {expected}"
                    )
                tensors.append(tensor.to("cpu"))
            _broadcast(self.group, pack(tensors))
            del tensors

    def shutdown(self) -> None:
        self.group = None


def run_beside(receivers: Any, send: Any) -> None:
    """Run ``receivers`` (the engines' blocking receive calls) on a thread while ``send`` broadcasts here.

    When the send fails, the receivers' error usually says why (a generator died), so it is the one raised; a
    receiver failing first is raised without waiting for the send to time out.
    """
    pool = ThreadPoolExecutor(max_workers=1)
    future: Future = pool.submit(receivers)
    try:
        if future.done():
            future.result()
        try:
            send()
        except Exception as exc:
            try:
                future.result(timeout=30)
            except Exception as receiver_exc:
                raise receiver_exc from exc
            raise
        future.result()
    finally:
        pool.shutdown(wait=False)  # a receiver stuck in a dead collective must not turn the error into a hang


# ---- the learner's parameters as a weight source -----------------------------------------------------------------
class LearnerWeights(WeightSource):
    """The learner's parameters, each cast to the engine's dtype on ``device`` and then gathered from its shards.

    The cast comes first, on each rank's shard, so the all-gather carries the engine's dtype (bf16: half the bytes of
    the fp32 master weights), and a ``cpu_offload`` shard is moved to the compute device first, so the gather runs
    over NCCL rather than gloo. ``named_parameters`` lists a tied embedding once; with ``tied`` the engine still gets
    ``lm_head.weight`` (the same gathered tensor, sent again), because vLLM's layerwise reload otherwise keeps a
    stale head silently (docs/platform-notes.md §5, §12).
    """

    def __init__(
        self, module: torch.nn.Module, dtype: torch.dtype, tied: bool, device: torch.device | None = None
    ) -> None:
        """``device``: where each shard is cast and gathered (None: where it is)."""
        self.module = module
        self.dtype = dtype
        self.tied = tied
        self.device = device

    def _wire(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def _head_after(self, name: str, params: dict[str, torch.Tensor]) -> bool:
        """Whether the tied head follows this tensor (right after the embedding, so the embedding is not kept)."""
        return self.tied and name == "model.embed_tokens.weight" and "lm_head.weight" not in params

    def metadata(self) -> list[ParamMeta]:
        params = dict(self.module.named_parameters())
        out = []
        for name, p in params.items():
            out.append(ParamMeta(name, self._wire(p), tuple(p.shape)))
            if self._head_after(name, params):
                out.append(ParamMeta("lm_head.weight", self._wire(p), tuple(p.shape)))
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        params = dict(self.module.named_parameters())
        for name, p in params.items():
            full = materialize_full_tensor(p.detach().to(device=self.device, dtype=self._wire(p)))
            yield name, full
            if self._head_after(name, params):
                yield "lm_head.weight", full


# ---- the control plane: learner rank 0 -> every generator actor ------------------------------------------------
class GeneratorFleet:
    """A ``VLLMWeightSyncClient`` over all generator actors: each call goes to every generator and waits for all.

    Each generator gets its own ``rank_offset`` in the group. ``version`` is set before a push; the generators tag
    the tokens sampled after it. A dead or failing generator raises an error naming it, within ``timeout_s``.
    """

    def __init__(self, generators: list[Any], workers_each: int, timeout_s: float) -> None:
        self.generators = generators
        self.workers_each = workers_each
        self.timeout_s = timeout_s
        self.version = 0

    @property
    def world_size(self) -> int:
        return 1 + self.workers_each * len(self.generators)

    def _all(self, what: str, calls: list[Any]) -> None:
        import ray

        deadline = time.monotonic() + self.timeout_s
        for i, ref in enumerate(calls):
            try:
                ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as exc:
                raise TimeoutError(
                    f"generator {i} did not finish {what} within rollout.weight_sync_timeout_s={self.timeout_s}"
                ) from exc
            except ray.exceptions.RayActorError as exc:
                message = f"generator {i} died during {what} (weight push v{self.version}): {exc}"
                raise GeneratorDied(i, message) from exc
            except ray.exceptions.RayTaskError as exc:
                if type(exc.cause).__name__ == "EngineDeadError":
                    message = f"generator {i}'s engine died during {what} (weight push v{self.version}): {exc}"
                    raise GeneratorDied(i, message) from exc
                raise RuntimeError(f"generator {i} failed during {what} (weight push v{self.version}): {exc}") from exc

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        first = init_info["rank_offset"]
        calls = [
            g.init_weight_transfer.remote({**init_info, "rank_offset": first + i * self.workers_each})
            for i, g in enumerate(self.generators)
        ]
        self._all("joining the weight-transfer group", calls)

    def start_weight_update(self) -> None:
        self._all("pausing for new weights", [g.begin_weight_update.remote(self.version) for g in self.generators])

    def update_weights(self, update_info: Any) -> None:
        calls = [g.receive_weights.remote(update_info, self.version) for g in self.generators]
        self._all("receiving weights", calls)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Nothing left: each generator's receive call finishes its engine's update as soon as its data is in."""


def register() -> None:
    """Register ``torl_gloo`` with vLLM's engine and trainer factories (idempotent: vLLM loads plugins per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, engine in (
        (WeightTransferEngineFactory, GlooWeightTransferEngine),
        (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine),
    ):
        try:
            factory.register_engine(GLOO, engine)
        except ValueError:  # already registered in this process
            pass


def connect(
    cfg: Config, fleet: GeneratorFleet, source: WeightSource, rank: int, master: tuple[str, int]
) -> TrainerWeightTransferEngine:
    """This learner rank's end of the group (called on every rank; rank 0 rendezvous with all engines)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    register()
    info = trainer_init_info(cfg, fleet.world_size, rank, master)
    return WeightTransferTrainerFactory.trainer_init(info, client=fleet, source=source)


def trainer_init_info(cfg: Config, world_size: int, rank: int, master: tuple[str, int]) -> TrainerInitInfo:
    """The trainer-side init info for this run's backend: vLLM's NCCL one on GPUs, torl's gloo one on CPU.

    Apart so that a CPU test can build the GPU branch against the installed vLLM (tests/integration/test_vllm_api.py):
    nothing else on CPU reaches it.
    """
    bucket = cfg.rollout.weight_sync_bucket_mb << 20
    host, port = master
    if backend_for(cfg) == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(
            master_address=host,
            master_port=port,
            world_size=world_size,
            packed=True,
            packed_buffer_size_bytes=bucket,
            rank=rank,
        )
    return GlooTrainerInitInfo(
        master_address=host,
        master_port=port,
        world_size=world_size,
        bucket_bytes=bucket,
        timeout_s=cfg.rollout.weight_sync_timeout_s,
        rank=rank,
    )
