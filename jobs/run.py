"""A training run on the driver: the ``Run`` object, the actors it starts, and what the loop asks of them.

``Run`` holds the config, the prompt sampler, the held-out set and the actor handles (sandbox pool, generators,
grader, learner group), and the operations the loop calls: draw a prompt batch, fan a rollout out over the
generators and collect it (a generator that died is replaced and its shard rolled out again), push weights, save a
checkpoint. ``prepare_run`` (jobs/setup_run.py) builds it once; the loop that drives it is jobs/loop.py.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torl.config import Config
from torl.data.sampler import EncodedProblem, PromptSampler, SamplerState
from torl.infra.storage import Storage, StorageError
from torl.rollout.metrics import merge_batch_metrics

if TYPE_CHECKING:  # annotations only: importing these starts nothing, but pulls in Ray and torch
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

    from actors.learner_group import LearnerGroup
    from actors.sandbox import SandboxPool
    from jobs.tracking import Tracker


def spawn_rollout_actors(
    cfg: Config, model_path: str, sandbox_name: str = "torl_sandbox", log_dir: str | None = None
) -> tuple[Any, list, Any, PlacementGroup]:
    """The sandbox pool (if tools are on), the generator actors, the grader and the generators' placement group
    (``generator_placement``), as training and evaluation use them. The engines' routine logs go to files in
    ``log_dir`` (the run's ``logs/``), not the terminal.

    The engines start building right away (``start`` is idempotent: callers ``ray.get`` it when they need the
    engines, meanwhile doing other set-up). If anything fails, what was already started is stopped.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.grader import GraderActor
    from actors.sandbox import SandboxPool

    sandbox, generators, grader, placement = None, [], None, None
    try:
        sandbox = SandboxPool.create(cfg.sandbox, name=sandbox_name) if cfg.tool.enabled else None
        placement = generator_placement(cfg)
        for i in range(cfg.rollout.num_generators):
            generators.append(spawn_generator(cfg, model_path, sandbox, log_dir, placement, i))
        # On the caller's node (the job's driver): grading is light, and a grader on another node would make that
        # node's loss end the run (the driver has no replacement for it). Hard affinity: a soft one let Ray place
        # some actors elsewhere although this node had room (2 of 4 in a test on two nodes).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        grader = GraderActor.options(scheduling_strategy=here).remote(cfg.reward)
    except BaseException:
        stop_rollout_actors(sandbox, generators, grader, placement)
        raise
    return sandbox, generators, grader, placement


def generator_placement(cfg: Config) -> PlacementGroup:
    """One bundle per generator (its ``rollout.num_cpus``, ``num_gpus`` and ``resources``) in one placement group,
    packed: on one node while one has room, so a weight push from learner rank 0 reaches every engine on as few nodes
    as the cluster allows (placed by Ray one at a time, the generators of a two-node cluster could straddle both). A
    replacement takes the dead generator's bundle; a lost node's bundles move with Ray's rescheduling of the group.
    Not awaited: the engines start as soon as it is placed."""
    from ray.util.placement_group import placement_group

    ro = cfg.rollout
    bundle = {"CPU": ro.num_cpus, **({"GPU": ro.num_gpus} if ro.num_gpus else {}), **ro.resources}
    return placement_group([dict(bundle) for _ in range(ro.num_generators)], strategy="PACK")


def spawn_generator(
    cfg: Config, model_path: str, sandbox: Any, log_dir: str | None, placement: PlacementGroup, index: int
) -> ActorHandle:
    """Generator ``index`` in its bundle of ``placement``; its engine starts building at once (``start`` is
    idempotent)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.generator import GeneratorActor

    ro = cfg.rollout
    options = {
        "num_cpus": ro.num_cpus,
        "num_gpus": ro.num_gpus,
        "resources": dict(ro.resources),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=index),
    }
    generator = GeneratorActor.options(**options).remote(cfg, model_path, sandbox, log_dir)
    generator.start.remote()
    return generator


def dead_generator(exc: BaseException, index: int | None = None) -> int | None:
    """Which generator a failed call lost (``index``: the one the call went to), or None when the failure is not a
    dead generator. Dead: its actor died (killed, OOM, node lost), or its vLLM engine process did (the live actor
    then raises vLLM's EngineDeadError for every call), or a weight push reported one (``GeneratorDied``, possibly
    through the learner). Other errors are bugs or bad input and stop the run."""
    import ray

    from torl.rollout.types import GeneratorDied

    if isinstance(exc, GeneratorDied):
        return exc.index
    if isinstance(exc, ray.exceptions.RayActorError):
        return index
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, GeneratorDied):
            return exc.cause.index
        if type(exc.cause).__name__ == "EngineDeadError":
            return index
    return None


def stop_rollout_actors(sandbox: Any, generators: list, grader: Any, placement: PlacementGroup | None) -> None:
    """Stop the engines cleanly (vLLM's engine process goes with them), then kill the actors, release the generators'
    placement group and stop the sandbox pool."""
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        ray.get([g.shutdown.remote() for g in generators] + ([grader.shutdown.remote()] if grader else []), timeout=60)
    except Exception as exc:  # noqa: BLE001 - a stuck engine must not keep the job alive
        print(f"[torl] generator shutdown: {exc}")
    for actor in [*generators, grader]:
        if actor is not None:
            ray.kill(actor)
    if placement is not None:
        remove_placement_group(placement)
    if sandbox is not None:
        sandbox.shutdown()


def push_weights(cfg: Config, learner: LearnerGroup, generators: list[ActorHandle], version: int) -> None:
    """The learner's current weights to every generator, which tags the tokens it samples next ``version``."""
    import ray

    if cfg.rollout.weight_sync == "collective":
        learner.push_weights(version)
        return
    from torl.rollout.types import GeneratorDied

    ref = learner.state_dict_ref()
    for i, call in enumerate([g.update_weights.remote(ref, version) for g in generators]):
        try:
            ray.get(call)
        except ray.exceptions.RayActorError as exc:
            raise GeneratorDied(i, f"generator {i} died during weight push v{version}: {exc}") from exc


@dataclass
class Shard:
    """One generator's part of a rollout, kept so a replacement generator can roll it out again."""

    index: int  # which generator
    requests: list  # GenRequest
    greedy: bool
    actor: ActorHandle  # the GeneratorActor it went to: its death is news only while it is still generator ``index``
    ref: Any  # ObjectRef to the generator's (trajectories, metrics)


@dataclass
class Run:
    """One training run's state on the driver: config, data, the actors, and where the step count starts and ends."""

    cfg: Config
    model_path: str
    sampler: PromptSampler
    val: list[EncodedProblem]
    tracker: Tracker
    sandbox: SandboxPool | None = None  # None when tools are off
    generators: list[ActorHandle] = field(default_factory=list)  # GeneratorActor handles
    placement: PlacementGroup | None = None  # the generators' bundles (generator_placement)
    learner: LearnerGroup | None = None
    grader: ActorHandle | None = None  # GraderActor handle
    storage: Storage | None = None  # trainer.storage_path; None: output_dir is the storage
    identity: dict[str, Any] = field(default_factory=dict)  # what a checkpoint must share to resume (checkpoint.py)
    version: int = 0  # the weights the generators hold (the last push)
    generator_restarts: int = 0
    start_step: int = 0  # the step a resumed run continues from
    restored_rollouts: list = field(default_factory=list)  # (trajectories, metrics) a checkpoint kept for later steps
    total_steps: int = 0

    def draw(self) -> tuple[list[EncodedProblem], SamplerState]:
        """Next prompt batch, and the sampler state *before* it (what a checkpoint must restore to redo it)."""
        before = copy.copy(self.sampler.state)
        return self.sampler.next_batch(), before

    def generate(
        self, batch: list[EncodedProblem], greedy: bool = False, n: int | None = None, step: int = 0
    ) -> list[Shard]:
        """Fan ``batch`` out over the generators; ``step`` (the training step it serves) seeds its sampling."""
        from torl.rollout.tool_loop import GenRequest

        n = n or self.cfg.rollout.n
        requests = [
            GenRequest(e.problem.id, i, e.prompt_ids, answer=e.problem.answer, n=n, step=step)
            for i, e in enumerate(batch)
        ]
        parts = [(i, requests[i :: len(self.generators)]) for i in range(len(self.generators))]
        return [
            Shard(i, part, greedy, self.generators[i], self.generators[i].generate.remote(part, greedy))
            for i, part in parts
            if part
        ]

    def collect(self, shards: list[Shard]) -> tuple[list, dict[str, float]]:
        """The shards' trajectories and merged metrics. A shard whose generator died is rolled out again, whole, by
        the live generator in its place, which holds the current weights (``version``): replaced here if this is the
        first call to meet the death, or left alone if a weight push or another shard met it first (pipelined, every
        rollout in flight on the dead actor fails; one death is one replacement). Seeds are derived per request, so
        on-policy the replacement samples what the dead one would have; pipelined, the lost shard had started on
        older weights, so it is sampled afresh on the current ones and its tokens carry that newer version."""
        import ray

        results = []
        for shard in shards:
            while True:
                try:
                    results.append(ray.get(shard.ref))
                    break
                except Exception as exc:
                    if dead_generator(exc, shard.index) is None:
                        raise
                    if self.replace_generator(shard.index, exc, shard.actor):
                        self.push_weights(self.version)
                    shard.actor = self.generators[shard.index]
                    shard.ref = shard.actor.generate.remote(shard.requests, shard.greedy)
        trajs = [t for ts, _ in results for t in ts]
        return trajs, merge_batch_metrics([m for _, m in results])

    def replace_generator(self, index: int, cause: BaseException, dead: ActorHandle) -> bool:
        """A new generator in place of ``dead``, generator ``index`` (the caller pushes it the weights); at most
        ``trainer.max_actor_restarts`` times per run, so a fault that repeats stops the run with its cause. False,
        and nothing done, when ``dead`` was already replaced: the failure is an older call's on the same death, and
        the live generator must not pay for it."""
        import ray

        if self.generators[index] is not dead:
            return False
        limit = self.cfg.trainer.max_actor_restarts
        if self.generator_restarts >= limit:
            raise RuntimeError(
                f"generator {index} died and {self.generator_restarts} generator(s) were already replaced in this run"
                f" (trainer.max_actor_restarts={limit}); stopping. Last cause: {cause}"
            ) from cause
        self.generator_restarts += 1
        n = self.generator_restarts
        print(f"[torl] generator {index} died ({type(cause).__name__}); replacing it ({n} of {limit} replacements)")
        ray.kill(self.generators[index], no_restart=True)
        log_dir = str(Path(self.cfg.trainer.output_dir) / "logs")
        self.generators[index] = spawn_generator(
            self.cfg, self.model_path, self.sandbox, log_dir, self.placement, index
        )
        try:
            ray.get(self.generators[index].start.remote())
        except ray.exceptions.RayActorError as exc:
            # A lost node is declared dead only once its health checks fail, seconds after its actors stop
            # answering; a replacement placed there in between dies with it. It counts as another replacement.
            return self.replace_generator(index, exc, self.generators[index])
        if self.cfg.rollout.weight_sync == "collective":
            self.learner.connect_generators(self.generators)  # a new group: the old one lost a member
        return True

    def health_metrics(self) -> dict[str, float]:
        """Every step: replaced actors, the sandbox's isolation and queues, and the grader's counters (totals)."""
        import ray

        out = {"faults/generator_restarts": float(self.generator_restarts)}
        try:
            parts = ray.get(
                [g.sandbox_stats.remote() for g in self.generators] + [self.grader.stats.remote()], timeout=60
            )
        except Exception as exc:  # noqa: BLE001 - a generator that died since the push is replaced at the next one
            print(f"[torl] warning: health metrics skipped this step: {exc}", file=sys.stderr)
            return out
        out.update(parts[-1])
        if self.sandbox is not None:
            out.update(merge_batch_metrics(parts[:-1]))
            out.update(self.sandbox.isolation_metrics())  # sandbox/isolation: 2 full, 1 partial, 0 none
        return out

    def push_weights(self, version: int) -> None:
        """Every generator to weights ``version``, replacing any that died on the way (bounded, see below)."""
        while True:
            pushed = list(self.generators)
            try:
                push_weights(self.cfg, self.learner, pushed, version)
                break
            except Exception as exc:
                index = dead_generator(exc)
                if index is None:
                    raise
                self.replace_generator(index, exc, pushed[index])
        self.version = version

    def save(self, step: int, resume_state: SamplerState, ahead: list | None = None) -> None:
        """A checkpoint after ``step``: the learner's state, the sampler state to continue from, and ``ahead``, the
        finished rollouts (trajectories, metrics) of later steps that the resumed run trains on first."""
        extra = {
            "step": step,
            "sampler": {"epoch": resume_state.epoch, "position": resume_state.position},
            "identity": self.identity,
            "rollouts_ahead": [
                {"trajectories": [t.to_dict() for t in trajs], "metrics": metrics} for trajs, metrics in ahead or []
            ],
        }
        from torl.infra.checkpoint import step_dir

        failed = None
        try:
            self.learner.save(step_dir(self.cfg.trainer.output_dir, step), extra)
        except StorageError as exc:
            failed = exc
        self.upload_run_files()
        if failed is not None:
            raise failed

    def upload_run_files(self) -> None:
        """Copy metrics.jsonl and the run's other small files to the storage, if any (torl/infra/storage.RUN_FILES)."""
        if self.storage is not None:
            self.storage.upload_files(self.cfg.trainer.output_dir)

    def close(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()
        stop_rollout_actors(self.sandbox, self.generators, self.grader, self.placement)
        self.tracker.finish()
        try:
            self.upload_run_files()
        except StorageError as exc:
            print(f"[torl] warning: the run's files were not stored: {exc}", file=sys.stderr)
