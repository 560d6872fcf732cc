"""Everything the training driver sets up before its loop: config, model, data, preflight, storage, resume state.

All checks that can fail on user input (config, model path, data files, lengths) run before any actor starts, so
a mistake costs a second and prints one clear line. ``prepare_run`` then starts the actors and returns the ``Run``
(jobs/run.py) that the loop (jobs/loop.py) drives.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.run import Run, spawn_rollout_actors
from torl.config import Config, ConfigError, check_training_sampling, replace, to_dict
from torl.config_load import load_config, split_cli
from torl.data.problems import load_problems
from torl.data.prompts import build_prompt
from torl.data.sampler import EncodedProblem, PromptSampler, SamplerState, encode_problems
from torl.infra import preflight
from torl.infra.checkpoint import run_identity
from torl.infra.hardware import detect_hardware
from torl.infra.model_sizes import ModelShape, model_shape
from torl.infra.paths import resolve
from torl.infra.storage import Storage, StorageError, is_uri
from torl.rollout.types import Trajectory

if TYPE_CHECKING:  # annotations only: importing these starts nothing, but pulls in Ray and torch
    pass

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
    """``trainer.storage_path`` opened and probed (torl/infra/storage.py), or None when output_dir is the storage. A
    wrong URI, bucket, endpoint or credential stops the run here with one line, before anything starts."""
    from torl.infra.storage import open_storage

    if not cfg.trainer.storage_path:
        return None
    storage = open_storage(cfg.trainer.storage_path)
    return None if storage.same_place(cfg.trainer.output_dir) else storage


def storage_env(cfg: Config) -> dict[str, str]:
    """The driver's storage credentials that the actors reaching the storage get (torl/infra/storage.py)."""
    import os

    from torl.infra.storage import credential_env

    return credential_env(os.environ, local_cluster=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))


def fetch_model(uri: str) -> str:
    """This node's copy of the model at storage URI ``uri`` (downloaded into the cache unless unchanged there)."""
    from torl.infra.storage import model_cache_dir

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
        from torl.models.pretrain import cached_fingerprint, load_recipe, verify_manifest

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
    """Print the preflight table (torl/infra/preflight.py) and stop, naming the fields to change, on what will not fit.

    ``resources``: Ray's cluster totals; None for preflight.only, which counts this machine or the preflight.*
    overrides. With preflight.enabled=false only the actor counts are checked."""
    if not (cfg.preflight.enabled or cfg.preflight.only):
        check_resources(cfg, resources or {})
        return
    from torl.infra.checkpoint import list_checkpoints

    report = preflight.check(
        cfg,
        _model_shape(model_path),
        detect_hardware(cfg, resources),
        existing_checkpoints=len(list_checkpoints(cfg.trainer.output_dir)),
        total_steps=total_steps,
    )
    print(report.table())
    report.raise_on_failure()


def _model_shape(model_path: str) -> ModelShape:
    """The preflight's model shape; for a storage URI (preflight.only: nothing downloaded) from its config.json."""
    if is_uri(model_path):
        import json

        try:
            return ModelShape.from_hf_config(json.loads(Storage(model_path).read_text("config.json")))
        except StorageError:
            pass  # a known model name still gives the shape; otherwise model_shape says what is missing
    return model_shape(model_path)


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
    from torl.infra.checkpoint import identity_differences, latest_checkpoint, read_trainer_state

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

    from actors.learner_group import LearnerGroup
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
        run.sandbox, run.generators, run.grader, run.placement = spawn_rollout_actors(cfg, model_path, log_dir=log_dir)
        run.learner = LearnerGroup(cfg, model_path)  # built while the engines start
        ray.get([g.start.remote() for g in run.generators])
        if cfg.rollout.weight_sync == "collective":
            run.learner.connect_generators(run.generators)
        _resume(run, resume_point)
    except BaseException:
        run.close()
        raise
    return run
