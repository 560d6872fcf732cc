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
from torl.config import Config, ConfigError, load_config, replace, split_cli, to_dict
from torl.data import load_problems
from torl.paths import resolve
from torl.prompts import build_prompt
from torl.rollout import merge_batch_metrics
from torl.sampler import EncodedProblem, PromptSampler, SamplerState, encode_problems

if TYPE_CHECKING:  # annotations only: importing these starts nothing, but pulls in Ray and torch
    from ray.actor import ActorHandle

    from actors.learner import LearnerGroup
    from actors.sandbox import SandboxPool
    from jobs.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESET = REPO / "configs" / "tiny_cpu.yaml"


def with_absolute_paths(cfg: Config) -> Config:
    """Anchor relative model/output paths at the checkout (``TORL_HOME``), so every actor sees the same files."""
    model = replace(cfg.model, path=str(resolve(cfg.model.path)) if cfg.model.path else "")
    trainer = replace(cfg.trainer, output_dir=str(resolve(cfg.trainer.output_dir)))
    return replace(cfg, model=model, trainer=trainer)


def ensure_model(cfg: Config) -> str:
    """Return the model directory, building the project's base model first if the preset names a recipe."""
    if not cfg.model.path:
        raise ConfigError("model.path is required (a Hugging Face checkpoint directory)")
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
        preflight.model_shape(model_path),
        preflight.detect_hardware(cfg, resources),
        existing_checkpoints=len(list_checkpoints(cfg.trainer.output_dir)),
        total_steps=total_steps,
    )
    print(report.table())
    report.raise_on_failure()


def spawn_rollout_actors(
    cfg: Config, model_path: str, sandbox_name: str = "torl_sandbox", log_dir: str | None = None
) -> tuple[Any, list, Any]:
    """The sandbox pool (if tools are on), the generator actors and the grader, as training and evaluation use them.
    The engines' routine logs go to files in ``log_dir`` (the run's ``logs/``), not the terminal.

    The engines start building right away (``start`` is idempotent: callers ``ray.get`` it when they need the
    engines, meanwhile doing other set-up). If anything fails, what was already started is stopped.
    """
    from actors.grader import GraderActor
    from actors.sandbox import SandboxPool

    sandbox, generators, grader = None, [], None
    try:
        sandbox = SandboxPool.create(cfg.sandbox, name=sandbox_name) if cfg.tool.enabled else None
        for _ in range(cfg.rollout.num_generators):
            generators.append(spawn_generator(cfg, model_path, sandbox, log_dir))
        grader = GraderActor.remote(cfg.reward)
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
    identity: dict[str, Any] = field(default_factory=dict)  # what a checkpoint must share to resume (checkpoint.py)
    version: int = 0  # the weights the generators hold (the last push)
    generator_restarts: int = 0
    start_step: int = 0  # the step a resumed run continues from
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
        return [Shard(i, part, greedy, self.generators[i].generate.remote(part, greedy)) for i, part in parts if part]

    def collect(self, shards: list[Shard]) -> tuple[list, dict[str, float]]:
        """The shards' trajectories and merged metrics. A shard whose generator died is rolled out again, whole, by
        its replacement (seeds are derived per request, so it samples what the dead one would have)."""
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
                    self.replace_generator(shard.index, exc)
                    self.push_weights(self.version)
                    shard.ref = self.generators[shard.index].generate.remote(shard.requests, shard.greedy)
        trajs = [t for ts, _ in results for t in ts]
        return trajs, merge_batch_metrics([m for _, m in results])

    def replace_generator(self, index: int, cause: BaseException) -> None:
        """A new generator in place of dead generator ``index`` (the caller pushes it the weights); at most
        ``trainer.max_actor_restarts`` times per run, so a fault that repeats stops the run with its cause."""
        import ray

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
        ray.get(self.generators[index].start.remote())
        if self.cfg.rollout.weight_sync == "collective":
            self.learner.connect_generators(self.generators)  # a new group: the old one lost a member

    def fault_metrics(self) -> dict[str, float]:
        return {"faults/generator_restarts": float(self.generator_restarts)}

    def push_weights(self, version: int) -> None:
        """Every generator to weights ``version``, replacing any that died on the way (bounded, see below)."""
        while True:
            try:
                push_weights(self.cfg, self.learner, self.generators, version)
                break
            except Exception as exc:
                index = dead_generator(exc)
                if index is None:
                    raise
                self.replace_generator(index, exc)
        self.version = version

    def save(self, step: int, resume_state: SamplerState) -> None:
        extra = {
            "step": step,
            "sampler": {"epoch": resume_state.epoch, "position": resume_state.position},
            "identity": self.identity,
        }
        self.learner.save(str(Path(self.cfg.trainer.output_dir) / f"step_{step:06d}"), extra)

    def close(self) -> None:
        if self.learner is not None:
            self.learner.shutdown()
        stop_rollout_actors(self.sandbox, self.generators, self.grader)
        self.tracker.finish()


def _resume(run: Run) -> None:
    from torl.checkpoint import identity_differences, latest_checkpoint, read_trainer_state

    cfg = run.cfg.trainer
    if cfg.resume == "never":
        run.tracker.keep_steps_before(0)
        return
    ckpt = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if not ckpt:
        run.tracker.keep_steps_before(0)
        return
    saved = read_trainer_state(ckpt).get("identity")
    if saved is None:
        print(f"[torl] warning: {ckpt} records no run identity (written by an older torl); resuming unchecked")
    elif (diffs := identity_differences(saved, run.identity)) and not cfg.resume_force:
        raise ConfigError(
            f"{ckpt} was written by a different run:\n  " + "\n  ".join(diffs) + "\nResume anyway with "
            "trainer.resume_force=true, or start afresh with trainer.resume=never or another trainer.output_dir"
        )
    extra = run.learner.load(str(ckpt))
    run.start_step = int(extra["step"])
    run.sampler.state = SamplerState(**extra["sampler"])
    run.push_weights(run.start_step)
    run.tracker.keep_steps_before(run.start_step + 1)  # the steps after the checkpoint are redone: logged once
    print(f"[torl] resumed from {ckpt} at step {run.start_step}")


def load_run_config(argv: list[str]) -> Config:
    """The job's config from presets and overrides (the CPU default without a preset), with absolute paths."""
    files, overrides = split_cli(argv)
    return with_absolute_paths(load_config(files or [str(DEFAULT_PRESET)], overrides))


def prepare_run(argv: list[str], job: str = "train") -> Run:
    cfg = load_run_config(argv)
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is required (e.g. data.train_files=[synthetic:train] or a parquet path)")
    model_path = ensure_model(cfg)

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

    run_preflight(cfg, model_path, ray.cluster_resources(), total)  # before any actor starts
    tracker = Tracker(cfg.wandb, cfg.trainer.output_dir, to_dict(cfg), job=job)
    run = Run(cfg, model_path, sampler, val, tracker, total_steps=total)
    run.identity = run_identity(to_dict(cfg), model_path, cfg.model.tokenizer_path or model_path)
    try:
        log_dir = str(Path(cfg.trainer.output_dir) / "logs")
        run.sandbox, run.generators, run.grader = spawn_rollout_actors(cfg, model_path, log_dir=log_dir)
        run.learner = LearnerGroup(cfg, model_path)  # built while the engines start
        ray.get([g.start.remote() for g in run.generators])
        if cfg.rollout.weight_sync == "collective":
            run.learner.connect_generators(run.generators)
        _resume(run)
    except BaseException:
        run.close()
        raise
    return run
