"""Everything the training driver sets up before its loop: config, model, data, actors, resume state.

All checks that can fail on user input (config, model path, data files, lengths) run before any actor starts, so
a mistake costs a second and prints one clear line. ``Run`` also holds the few driver-side operations the loop
calls (draw a batch, fan out a rollout, push weights, save), keeping jobs/train.py a readable loop.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torl import preflight
from torl.checkpoint import run_identity
from torl.config import Config, ConfigError, check_training_sampling, load_config, replace, split_cli, to_dict
from torl.data import load_problems
from torl.metrics import merge_batch_metrics
from torl.paths import resolve
from torl.prompts import build_prompt
from torl.sampler import EncodedProblem, PromptSampler, SamplerState, encode_problems
from torl.storage import Storage, StorageError, is_uri
from torl.types import Trajectory

if TYPE_CHECKING:  # annotations only: importing these starts nothing, but pulls in Ray and torch
    from ray.actor import ActorHandle

    from actors.learner import LearnerGroup
    from actors.sandbox import SandboxPool
    from jobs.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = REPO / "configs" / "tiny_cpu.yaml"


def with_absolute_paths(cfg: Config) -> Config:
    """Anchor relative model/output/storage paths at the checkout (``TORL_HOME``), so every actor sees the same
    files. Storage URIs (``s3://...``) are left as they are."""

    def anchored(path: str) -> str:
        return path if not path or is_uri(path) else str(resolve(path))

    model = replace(cfg.model, path=anchored(cfg.model.path))
    t = cfg.trainer
    trainer = replace(t, output_dir=str(resolve(t.output_dir)), storage_path=anchored(t.storage_path))
    return replace(cfg, model=model, trainer=trainer)


def open_run_storage(cfg: Config) -> Storage | None:
    """``trainer.storage_path`` opened and probed (torl/storage.py), or None when output_dir is the storage. A
    wrong URI, bucket, endpoint or credential stops the run here with one line, before anything starts."""
    from torl.storage import open_storage

    if not cfg.trainer.storage_path:
        return None
    storage = open_storage(cfg.trainer.storage_path)
    return None if storage.same_place(cfg.trainer.output_dir) else storage


def storage_env(cfg: Config) -> dict[str, str]:
    """The driver's storage credentials that the actors reaching the storage get (torl/storage.py)."""
    import os

    from torl.storage import credential_env

    return credential_env(os.environ, local_cluster=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))


def fetch_model(uri: str) -> str:
    """This node's copy of the model at storage URI ``uri`` (downloaded into the cache unless unchanged there)."""
    from torl.storage import model_cache_dir

    cache = model_cache_dir()
    try:
        storage = Storage(uri)
        say = f"[torl] downloading {storage.location()} into {cache} (once per node; cached afterwards)"
        local = storage.download_model(cache, on_download=lambda: print(say))
    except StorageError as exc:
        raise StorageError(f"model.path={uri!r}: {exc}") from exc
    return str(local)


def stage_model(cfg: Config, uri: str) -> None:
    """Download the model at ``uri`` on every other node of the cluster, into the same cache path as here, before
    any actor loads it (the generators and learners get this node's path). Nodes that join later lack it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not nodes:
        return
    env = storage_env(cfg)
    task = ray.remote(num_cpus=0)(fetch_model)
    opts = {"runtime_env": {"env_vars": env}} if env else {}
    strategies = [NodeAffinitySchedulingStrategy(n, soft=False) for n in nodes]
    ray.get([task.options(scheduling_strategy=s, **opts).remote(uri) for s in strategies])


def ensure_model(cfg: Config) -> str:
    """Return the model directory, building the project's base model first if the preset names a recipe."""
    if not cfg.model.path:
        raise ConfigError("model.path is required (a Hugging Face checkpoint directory)")
    if is_uri(cfg.model.path):  # in a storage: this node's cached copy (the other nodes get theirs: stage_model)
        return fetch_model(cfg.model.path)
    path = Path(cfg.model.path)
    if cfg.model.recipe:
        from torl.pretrain import cached_fingerprint, load_recipe, verify_manifest

        recipe_file = str(resolve(cfg.model.recipe)) if not Path(cfg.model.recipe).is_file() else cfg.model.recipe
        recipe = load_recipe([recipe_file], [f"output_dir={path}"])
        # The shipped model is used as is when the recipe still names it and its files are intact; otherwise the
        # recipe is built (a changed recipe, or a model directory that was never built).
        if cached_fingerprint(path) != recipe.fingerprint() or verify_manifest(path):
            print(f"[torl] building the base model {path} from {cfg.model.recipe} (once; cached afterwards)")
            subprocess.run(
                [sys.executable, str(REPO / "jobs" / "make_base_model.py"), recipe_file, f"output_dir={path}"],
                check=True,
                cwd=REPO,
            )
    if not (path / "config.json").is_file() and cfg.model.convert_from:
        print(f"[torl] converting {cfg.model.convert_from} into {path} (once; cached afterwards)")
        script = str(REPO / "jobs" / "convert_model.py")
        subprocess.run([sys.executable, script, cfg.model.convert_from, str(path)], check=True, cwd=REPO)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path {cfg.model.path!r}: no Hugging Face checkpoint (config.json) at {path}")
    return str(path)


def check_resources(cfg: Config, available: Mapping[str, float], learner: bool = True) -> None:
    """Fail fast when the actors cannot all be placed: Ray would otherwise wait for resources forever.

    ``learner=False`` counts only the rollout actors (evaluation starts no learner)."""
    failed = [r for r in preflight.resource_rows(cfg, available, learner) if r.status == "FAIL"]
    if failed:
        raise ConfigError("; ".join(f"the Ray cluster is too small: {r.message()}" for r in failed))


def run_preflight(cfg: Config, model_path: str, resources: Mapping[str, float] | None, total_steps: int = 0) -> None:
    """Print the preflight table (torl/preflight.py) and stop, naming the fields to change, on what will not fit.

    ``resources``: Ray's cluster totals; None for preflight.only, which counts this machine or the preflight.*
    overrides. With preflight.enabled=false only the actor counts are checked."""
    if not (cfg.preflight.enabled or cfg.preflight.only):
        check_resources(cfg, resources or {})
        return
    from torl.checkpoint import list_checkpoints

    report = preflight.check(
        cfg,
        _model_shape(model_path),
        preflight.detect_hardware(cfg, resources),
        existing_checkpoints=len(list_checkpoints(cfg.trainer.output_dir)),
        total_steps=total_steps,
    )
    print(report.table())
    report.raise_on_failure()


def _model_shape(model_path: str) -> preflight.ModelShape:
    """The preflight's model shape; for a storage URI (preflight.only: nothing downloaded) from its config.json."""
    if is_uri(model_path):
        import json

        try:
            return preflight.ModelShape.from_hf_config(json.loads(Storage(model_path).read_text("config.json")))
        except StorageError:
            pass  # a known model name still gives the shape; otherwise model_shape says what is missing
    return preflight.model_shape(model_path)


def spawn_rollout_actors(
    cfg: Config, model_path: str, sandbox_name: str = "torl_sandbox", log_dir: str | None = None
) -> tuple[Any, list, Any]:
    """The sandbox pool (if tools are on), the generator actors and the grader, as training and evaluation use them.
    The engines' routine logs go to files in ``log_dir`` (the run's ``logs/``), not the terminal.

    The engines start building right away (``start`` is idempotent: callers ``ray.get`` it when they need the
    engines, meanwhile doing other set-up). If anything fails, what was already started is stopped.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.grader import GraderActor
    from actors.sandbox import SandboxPool

    sandbox, generators, grader = None, [], None
    try:
        sandbox = SandboxPool.create(cfg.sandbox, name=sandbox_name) if cfg.tool.enabled else None
        for _ in range(cfg.rollout.num_generators):
            generators.append(spawn_generator(cfg, model_path, sandbox, log_dir))
        # On the caller's node (the job's driver): grading is light, and a grader on another node would make that
        # node's loss end the run (the driver has no replacement for it). Hard affinity: a soft one let Ray place
        # some actors elsewhere although this node had room (2 of 4 in a test on two nodes).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        grader = GraderActor.options(scheduling_strategy=here).remote(cfg.reward)
    except BaseException:
        stop_rollout_actors(sandbox, generators, grader)
        raise
    return sandbox, generators, grader


def spawn_generator(cfg: Config, model_path: str, sandbox: Any, log_dir: str | None) -> ActorHandle:
    """One generator actor; its engine starts building at once (``start`` is idempotent)."""
    from actors.generator import GeneratorActor

    ro = cfg.rollout
    options = {"num_cpus": ro.num_cpus, "num_gpus": ro.num_gpus, "resources": dict(ro.resources)}
    generator = GeneratorActor.options(**options).remote(cfg, model_path, sandbox, log_dir)
    generator.start.remote()
    return generator


def dead_generator(exc: BaseException, index: int | None = None) -> int | None:
    """Which generator a failed call lost (``index``: the one the call went to), or None when the failure is not a
    dead generator. Dead: its actor died (killed, OOM, node lost), or its vLLM engine process did (the live actor
    then raises vLLM's EngineDeadError for every call), or a weight push reported one (``GeneratorDied``, possibly
    through the learner). Other errors are bugs or bad input and stop the run."""
    import ray

    from torl.types import GeneratorDied

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


def stop_rollout_actors(sandbox: Any, generators: list, grader: Any) -> None:
    """Stop the engines cleanly (vLLM's engine process goes with them), then kill the actors and the sandbox pool."""
    import ray

    try:
        ray.get([g.shutdown.remote() for g in generators] + ([grader.shutdown.remote()] if grader else []), timeout=60)
    except Exception as exc:  # noqa: BLE001 - a stuck engine must not keep the job alive
        print(f"[torl] generator shutdown: {exc}")
    for actor in [*generators, grader]:
        if actor is not None:
            ray.kill(actor)
    if sandbox is not None:
        sandbox.shutdown()


def load_encoded(cfg: Config, specs: tuple[str, ...], tokenizer, limit: int = 0) -> tuple[list[EncodedProblem], int]:
    problems = [p for spec in specs for p in load_problems(spec, skip_bad_rows=cfg.data.skip_bad_rows)]
    if limit:
        problems = problems[:limit]

    def render(question: str) -> str:
        return build_prompt(question, cfg.prompt.template, tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    max_len = cfg.prompt.max_prompt_tokens - cfg.prompt.filter_margin
    return encode_problems(problems, render, encode, max_len)


def push_weights(cfg: Config, learner: LearnerGroup, generators: list[ActorHandle], version: int) -> None:
    """The learner's current weights to every generator, which tags the tokens it samples next ``version``."""
    import ray

    if cfg.rollout.weight_sync == "collective":
        learner.push_weights(version)
        return
    from torl.types import GeneratorDied

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
        from torl.rollout import GenRequest

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
        self.generators[index] = spawn_generator(self.cfg, self.model_path, self.sandbox, log_dir)
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
        from torl.checkpoint import step_dir

        failed = None
        try:
            self.learner.save(step_dir(self.cfg.trainer.output_dir, step), extra)
        except StorageError as exc:
            failed = exc
        self.upload_run_files()
        if failed is not None:
            raise failed

    def upload_run_files(self) -> None:
        """Copy metrics.jsonl and the run's other small files to the storage, if any (torl/storage.RUN_FILES)."""
        if self.storage is not None:
            self.storage.upload_files(self.cfg.trainer.output_dir)

    def close(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()
        stop_rollout_actors(self.sandbox, self.generators, self.grader)
        self.tracker.finish()
        try:
            self.upload_run_files()
        except StorageError as exc:
            print(f"[torl] warning: the run's files were not stored: {exc}", file=sys.stderr)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, found and checked against the run's identity before any actor starts."""

    ckpt: str | Path
    stored: bool  # in the run's storage: each learner node loads its copy of it (downloaded if missing)
    shown: str | Path  # how messages name it: the storage location, or the local directory


def find_resume_point(cfg: Config, storage: Storage | None, identity: dict[str, Any]) -> ResumePoint | None:
    """The checkpoint ``trainer.resume`` picks, or None to start afresh; a checkpoint another run wrote is refused.

    Only its trainer_state.json is read, so this runs before Ray and the actors start: a refused resume costs
    seconds, not an engine and learner start-up that is thrown away."""
    from torl.checkpoint import identity_differences, latest_checkpoint, read_trainer_state

    trainer = cfg.trainer
    if trainer.resume == "never":
        return None
    # With a storage, the newest checkpoint there.
    name = storage.latest() if storage is not None and trainer.resume == "auto" else None
    stored = name is not None
    ckpt: str | Path | None = Path(trainer.output_dir) / name if stored else None
    if not stored:
        ckpt = latest_checkpoint(trainer.output_dir) if trainer.resume == "auto" else trainer.resume
        if ckpt and storage is not None and trainer.resume == "auto":
            print(f"[torl] warning: no checkpoint in {storage.location()}; resuming from this node's {ckpt}")
    if not ckpt:
        return None
    state = storage.read_trainer_state(name) if stored else read_trainer_state(ckpt)
    shown = storage.location(name) if stored else ckpt
    saved = state.get("identity")
    if saved is None:
        print(f"[torl] warning: {shown} records no run identity (written by an older torl); resuming unchecked")
    elif (diffs := identity_differences(saved, identity)) and not trainer.resume_force:
        raise ConfigError(
            f"{shown} was written by a different run:\n  " + "\n  ".join(diffs) + "\nResume anyway with "
            "trainer.resume_force=true, or start afresh with trainer.resume=never or another trainer.output_dir"
        )
    return ResumePoint(ckpt, stored, shown)


def _resume(run: Run, point: ResumePoint | None) -> None:
    """Load ``point`` (found by ``find_resume_point``) into the started actors, or start the run's log afresh."""
    if point is None:
        run.tracker.keep_steps_before(0)
        return
    extra = run.learner.load(str(point.ckpt), stored=point.stored)
    run.start_step = int(extra["step"])
    run.sampler.state = SamplerState(**extra["sampler"])
    run.restored_rollouts = [
        ([Trajectory.from_dict(t) for t in r["trajectories"]], r["metrics"]) for r in extra.get("rollouts_ahead", [])
    ]
    run.push_weights(run.start_step)
    run.tracker.keep_steps_before(run.start_step + 1)  # the steps after the checkpoint are redone: logged once
    print(f"[torl] resumed from {point.shown} at step {run.start_step}")


def load_run_config(argv: list[str]) -> Config:
    """The training job's config from presets and overrides (the CPU default without a preset), with absolute paths;
    sampling settings its off-policy correction cannot honour are refused here (``check_training_sampling``)."""
    files, overrides = split_cli(argv)
    cfg = load_config(files or [str(DEFAULT_PRESET)], overrides)
    check_training_sampling(cfg)
    return with_absolute_paths(cfg)


def prepare_run(argv: list[str], job: str = "train") -> Run:
    cfg = load_run_config(argv)
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is required (e.g. data.train_files=[synthetic:train] or a parquet path)")
    storage = open_run_storage(cfg)
    model_path = ensure_model(cfg)
    identity = run_identity(to_dict(cfg), model_path, cfg.model.tokenizer_path or model_path)
    resume_point = find_resume_point(cfg, storage, identity)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or model_path)
    t0 = time.perf_counter()
    train, dropped = load_encoded(cfg, cfg.data.train_files, tokenizer)
    val, _ = load_encoded(cfg, cfg.data.val_files, tokenizer, limit=cfg.data.val_limit)
    print(
        f"[torl] {len(train)} training prompts ({dropped} dropped as too long), {len(val)} validation prompts "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    sampler = PromptSampler(train, cfg.data.batch_size, cfg.data.seed, cfg.data.shuffle)
    total = cfg.trainer.total_steps or cfg.trainer.total_epochs * sampler.steps_per_epoch

    from actors.cluster import init_ray

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    import ray

    from actors.learner import LearnerGroup
    from jobs.tracking import Tracker

    if is_uri(cfg.model.path):
        stage_model(cfg, cfg.model.path)
    run_preflight(cfg, model_path, ray.cluster_resources(), total)  # before any actor starts
    if storage is not None and cfg.trainer.resume != "never":  # the run's rows so far, e.g. written on another node
        storage.download_files(cfg.trainer.output_dir)
    tracker = Tracker(cfg.wandb, cfg.trainer.output_dir, to_dict(cfg), job=job)
    run = Run(cfg, model_path, sampler, val, tracker, total_steps=total, storage=storage, identity=identity)
    try:
        log_dir = str(Path(cfg.trainer.output_dir) / "logs")
        run.sandbox, run.generators, run.grader = spawn_rollout_actors(cfg, model_path, log_dir=log_dir)
        run.learner = LearnerGroup(cfg, model_path)  # built while the engines start
        ray.get([g.start.remote() for g in run.generators])
        if cfg.rollout.weight_sync == "collective":
            run.learner.connect_generators(run.generators)
        _resume(run, resume_point)
    except BaseException:
        run.close()
        raise
    return run
