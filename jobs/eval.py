"""Tool-integrated evaluation of a checkpoint on math benchmarks, through the same tool loop as training.

    python jobs/eval.py --checkpoint DIR [--benchmarks aime24,math500,...] [--out DIR] [preset.yaml] [key=value ...]

``DIR`` is a Hugging Face checkpoint (config.json) or a training output dir (its latest complete checkpoint is used).
Benchmarks: aime24, aime25, math500, olympiadbench, amc23, torl_val (ToRL's 374-row validation file), any
parquet/jsonl path, or synthetic:<split>. Greedy by default (ToRL validates greedily,
docs/torl-behaviour.md ("Evaluation")); ``eval.n=32`` also samples 32 responses per problem at eval.temperature /
eval.top_p (SimpleTIR's 1.0 / 0.7) and reports avg@32 and pass@k beside greedy accuracy, the settings in
results.json (``setup``); ``eval.greedy=false`` leaves the greedy pass out. Problems stream through the generators
in small chunks with a bounded number in flight; each finished problem is graded and appended to
``<out>/trajectories.jsonl`` at once, so an interrupted run resumes where it stopped.
Outputs: trajectories.jsonl, results.json, results.txt (the table), pass_rates.jsonl (per problem: samples, correct,
pass rate; jobs/prepare_data.py balances difficulty with it), run.json (the setup a resume must match) and W&B when
enabled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.run import spawn_rollout_actors, stop_rollout_actors  # noqa: E402
from jobs.setup_run import check_resources  # noqa: E402
from torl.config import Config, ConfigError, replace, to_dict  # noqa: E402
from torl.config_help import format_help  # noqa: E402
from torl.config_load import load_config, split_cli  # noqa: E402
from torl.evaluation import (  # noqa: E402
    GREEDY,
    SAMPLED,
    EvalRecord,
    ResultStore,
    check_run_meta,
    default_ks,
    finished_keys,
    flat_metrics,
    format_table,
    summarize,
    write_pass_rates,
)
from torl.rollout.sampling import SamplingOverrides  # noqa: E402
from torl.rollout.types import ToolCall  # noqa: E402
from torl.sandbox.health import SandboxUnhealthy, health_report  # noqa: E402

NAMED_BENCHMARKS = ("aime24", "aime25", "math500", "olympiadbench", "amc23", "torl_val")


@dataclass
class Item:
    """One problem ready to generate: its benchmark, the problem, and the prompt as text and ids."""

    benchmark: str
    problem: object  # torl.data.problems.Problem
    prompt: str
    prompt_ids: list[int]

    @property
    def key(self) -> tuple[str, str]:
        return (self.benchmark, self.problem.id)


def parse_args(argv: list[str]) -> tuple[Config, str]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
        epilog=format_help(Config),  # every config field, for the key=value overrides
    )
    ap.add_argument("--checkpoint", default="", help="HF checkpoint dir or training output dir (else model.path)")
    ap.add_argument("--benchmarks", default="", help="comma-separated names, paths or synthetic:<split>")
    ap.add_argument("--out", default="", help="output directory (default runs/eval/<checkpoint name>)")
    args, rest = ap.parse_known_args(argv)
    files, overrides = split_cli(rest)
    if args.benchmarks:
        overrides.append(f"eval.benchmarks={args.benchmarks}")
    if args.out:
        overrides.append(f"eval.output_dir={args.out}")
    cfg = load_config(files, overrides)
    checkpoint = resolve_checkpoint(args.checkpoint or cfg.model.path)
    cfg = replace(cfg, model=replace(cfg.model, path=checkpoint))
    if not cfg.eval.benchmarks:
        raise ConfigError("no benchmarks given (--benchmarks aime24,math500 or eval.benchmarks=...)")
    return cfg, checkpoint


def resolve_checkpoint(path: str) -> str:
    if not path:
        raise ConfigError("--checkpoint DIR is required (a Hugging Face checkpoint directory)")
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO / p).exists():
        p = REPO / p
    if not p.exists():
        raise ConfigError(f"checkpoint {path!r} does not exist")
    if not (p / "config.json").is_file():
        from torl.infra.checkpoint import latest_checkpoint

        latest = latest_checkpoint(p)
        if latest is None or not (Path(latest) / "config.json").is_file():
            raise ConfigError(f"{p}: neither a Hugging Face checkpoint (config.json) nor a run dir with checkpoints")
        p = Path(latest)
    return str(p.resolve())


def load_items(cfg: Config, tokenizer) -> tuple[list[Item], dict[str, int]]:
    """Template and tokenize every benchmark's problems; skip (and count) prompts that would not fit the context."""
    from torl.data.problems import DataError, load_benchmark, load_problems
    from torl.data.prompts import build_prompt

    max_prompt = min(cfg.eval.max_prompt_tokens, cfg.model.max_model_len - cfg.rollout.max_response_tokens)
    items: list[Item] = []
    skipped: dict[str, int] = {}
    for bench in cfg.eval.benchmarks:
        try:
            problems = load_benchmark(bench) if bench in NAMED_BENCHMARKS else load_problems(bench)
        except (DataError, FileNotFoundError) as exc:
            raise ConfigError(
                f"benchmark {bench!r}: {exc} (use one of {', '.join(NAMED_BENCHMARKS)}, synthetic:<split>[:n], "
                "or the path of a parquet/jsonl file)"
            ) from exc
        if cfg.eval.limit:
            problems = problems[: cfg.eval.limit]
        if not problems:
            raise ConfigError(f"benchmark {bench!r} has no problems")
        dup = [pid for pid, c in Counter(p.id for p in problems).items() if c > 1]
        if dup:  # results are keyed by (benchmark, id): duplicate ids would overwrite each other on resume
            raise ConfigError(f"benchmark {bench!r}: duplicate problem ids {dup[:5]}")
        skipped[bench] = 0
        for p in problems:
            prompt = build_prompt(p.question, cfg.prompt.template, tokenizer)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt:  # ToRL's validation loader drops prompts over val_max_prompt_length too
                skipped[bench] += 1
                continue
            items.append(Item(bench, p, prompt, ids))
    return items, skipped


def weights_fingerprint(checkpoint: str) -> str:
    """Size and mtime of the weight files: a model rebuilt in the same directory must not resume old results."""
    files = sorted(Path(checkpoint).glob("*.safetensors")) or sorted(Path(checkpoint).glob("*.bin"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def run_meta(cfg: Config) -> dict:
    """The settings a resumed run must share with the first one for its table to be one evaluation."""
    r = cfg.rollout
    meta = {
        "checkpoint": cfg.model.path,
        "weights": weights_fingerprint(cfg.model.path),
        "template": cfg.prompt.template,
        "tool_enabled": cfg.tool.enabled,
        "max_calls": cfg.tool.max_calls,
        "session": cfg.tool.session,
        "greedy": cfg.eval.greedy,
        "n": cfg.eval.n,
        "max_response_tokens": r.max_response_tokens,
        "max_model_len": cfg.model.max_model_len,
        "reward": to_dict(cfg.reward),
    }
    if cfg.eval.n:
        meta.update(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, top_k=cfg.eval.top_k, seed=r.seed)
    return meta


def passes(cfg: Config) -> list[tuple[str, int, SamplingOverrides]]:
    """(decoding, samples per problem, sampling) of each pass the evaluation makes: greedy, sampled, or both."""
    e = cfg.eval
    out = [(GREEDY, 1, SamplingOverrides(greedy=True))] if e.greedy else []
    if e.n:
        out.append((SAMPLED, e.n, SamplingOverrides(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)))
    return out


def to_records(chunk: list[Item], trajs: list, verdicts: list, n: int, decoding: str) -> list[EvalRecord]:
    """Attach verdicts and turn a finished chunk's trajectories (``group`` = index in the chunk) into records."""
    from torl.rl.grading import extract_boxed

    records, seen = [], Counter()
    for t, (reward, correct) in zip(trajs, verdicts, strict=True):
        t.reward, t.correct = reward, correct
        it = chunk[t.group]
        record = EvalRecord.from_trajectory(
            t,
            benchmark=it.benchmark,
            sample=seen[t.group],
            source=it.problem.source,
            question=it.problem.question,
            prompt=it.prompt,
            extracted=extract_boxed(t.text),
            level=it.problem.level,
            decoding=decoding,
        )
        records.append(record)
        seen[t.group] += 1
    if len(records) != n * len(chunk) or any(seen[g] != n for g in range(len(chunk))):
        raise RuntimeError(f"generator returned {len(records)} trajectories for {len(chunk)} problems x n={n}")
    return records


def stream(cfg: Config, generators: list, grader, work: dict[str, list[Item]], store: ResultStore) -> dict[str, float]:
    """Keep ``max_in_flight`` chunked generate calls per generator running; grade and store each as it finishes.
    ``work`` maps each pass's decoding to the problems it still has to generate."""
    import ray

    from torl.infra.progress import Progress
    from torl.rollout.metrics import engine_counts
    from torl.rollout.tool_loop import GenRequest

    size = cfg.eval.chunk_size
    chunks = [
        (decoding, n, over, todo[i : i + size])
        for decoding, n, over in passes(cfg)
        for todo in [work.get(decoding, [])]
        for i in range(0, len(todo), size)
    ]
    limit = cfg.eval.max_in_flight * len(generators)
    inflight: dict = {}
    totals: Counter = Counter()
    bar = Progress(sum(map(len, work.values())), "eval", unit="problem")
    submitted = 0
    while chunks or inflight:
        while chunks and len(inflight) < limit:
            decoding, n, over, chunk = job = chunks.pop(0)
            reqs = [GenRequest(it.problem.id, g, it.prompt_ids, it.problem.answer, n) for g, it in enumerate(chunk)]
            inflight[generators[submitted % len(generators)].generate.remote(reqs, sampling=over)] = job
            submitted += 1
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        decoding, n, _, chunk = inflight.pop(ref)
        trajs, metrics = ray.get(ref)
        # Counts add up over chunks; rates and ratios are recomputed from the records.
        totals.update(engine_counts(metrics))
        verdicts = ray.get(grader.grade.remote([t.grade_item() for t in trajs]))
        records = to_records(chunk, trajs, verdicts, n, decoding)
        store.append(records)
        totals["correct"] += sum(r.correct for r in records)
        totals["samples"] += len(records)
        bar.update(len(chunk), acc=f"{totals['correct'] / totals['samples']:.3f}")
    bar.close()
    return dict(totals)


def start_actors(cfg: Config, checkpoint: str, log_dir: str | None = None):
    import ray

    from actors.cluster import init_ray

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    check_resources(cfg, ray.cluster_resources(), learner=False)
    # A pool name of its own, so an evaluation can run beside a training job on the same cluster.
    name = f"torl_eval_sandbox_{os.getpid()}_{time.time_ns()}"
    sandbox, generators, grader, placement = spawn_rollout_actors(cfg, checkpoint, sandbox_name=name, log_dir=log_dir)
    try:
        ray.get([g.start.remote() for g in generators])
    except BaseException:
        stop_rollout_actors(sandbox, generators, grader, placement)
        raise
    return sandbox, generators, grader, placement


def log_wandb(cfg: Config, out: Path, summary: dict, records: list[EvalRecord]) -> None:
    if cfg.wandb.mode == "disabled":
        return
    from jobs.tracking import Tracker

    tracker = Tracker(cfg.wandb, str(out), to_dict(cfg), job="eval")
    tracker.log(0, flat_metrics(summary))
    if tracker.run is not None:
        import wandb

        cols = ["benchmark", "acc", "code_ratio", "exec_success", "acc_with_code", "acc_without_code"]
        cols += ["effective_code_ratio", "acc_first_failed", "calls_per_response", "problems"]
        keys = ["acc", "tool/code_ratio", "tool/exec_success", "acc/with_code", "acc/without_code"]
        keys += ["tool/effective_code_ratio", "tool/acc_first_failed", "tool/calls_per_response", "problems"]
        rows = [[b] + [r.get(k) for k in keys] for b, r in summary["benchmarks"].items()]
        sample = [[r.benchmark, r.problem_id, r.response, r.extracted, r.gold, r.correct] for r in records[:64]]
        traj_cols = ["benchmark", "id", "response", "extracted", "gold", "correct"]
        tables = {"eval/table": wandb.Table(columns=cols, data=rows)}
        tables["eval/trajectories"] = wandb.Table(columns=traj_cols, data=sample)
        tracker.run.log(tables)
    tracker.finish()


def sandbox_summary(cfg: Config, records: list[EvalRecord], ran: bool) -> dict:
    """The sandbox's health over the evaluation's tool calls, as training's gate judges it (torl.sandbox.health),
    and whether the start-up probe ran (it stops the evaluation before any problem when it fails)."""
    if not cfg.tool.enabled:
        return {"probe": "off (tools off)"}
    calls = [ToolCall(**c) for r in records for c in r.tool_calls]
    probe = "passed" if ran and cfg.sandbox.probe else ("off" if not cfg.sandbox.probe else "not run (resumed)")
    return {"probe": probe, **health_report(calls, cfg.sandbox)}


def main(argv: list[str]) -> dict:
    cfg, checkpoint = parse_args(argv)
    out = Path(cfg.eval.output_dir or REPO / "runs" / "eval" / Path(checkpoint).name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or checkpoint)
    items, skipped = load_items(cfg, tokenizer)
    try:
        check_run_meta(out / "run.json", run_meta(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    store = ResultStore(out / "trajectories.jsonl")
    stored = store.load()
    work = {}
    for decoding, n, _ in passes(cfg):
        done = finished_keys(stored, n, decoding)
        work[decoding] = [it for it in items if it.key not in done]
    todo = sum(map(len, work.values()))
    print(
        f"[torl] eval {checkpoint}: {len(items)} problems in {len(cfg.eval.benchmarks)} benchmarks "
        f"({' + '.join(f'{d} {len(w)}' for d, w in work.items())} to generate), "
        f"{sum(skipped.values())} skipped as too long -> {out}"
    )

    totals: dict[str, float] = {}
    if todo:
        import ray

        started_ray = not ray.is_initialized()
        sandbox = generators = grader = placement = None
        try:
            t0 = time.perf_counter()
            sandbox, generators, grader, placement = start_actors(cfg, checkpoint, str(out / "logs"))
            t1 = time.perf_counter()
            totals = stream(cfg, generators, grader, work, store)
            totals["startup_s"], totals["wall_s"] = t1 - t0, time.perf_counter() - t1
        finally:
            stop_rollout_actors(sandbox, generators or [], grader, placement)
            if started_ray:
                ray.shutdown()

    wanted = {it.key for it in items}
    decodings = {decoding for decoding, _, _ in passes(cfg)}
    records = [r for r in store.load() if r.key[:2] in wanted and r.decoding in decodings]
    ks = cfg.eval.pass_k or (default_ks(cfg.eval.n) if cfg.eval.n > 1 else ())
    max_calls = cfg.tool.max_calls if cfg.tool.enabled else 0
    summary = summarize(records, list(cfg.eval.benchmarks), ks, max_calls=max_calls)
    summary["checkpoint"] = checkpoint
    summary["skipped_too_long"] = skipped
    summary["setup"] = run_meta(cfg)
    summary["run"] = {"generated_problems": todo, **totals}  # wall_s: streaming only, after startup_s
    summary["sandbox_health"] = sandbox_summary(cfg, records, ran=bool(todo))
    if summary["sandbox_health"].get("level") == "failing":
        print(f"[torl] warning: the sandbox failed: {summary['sandbox_health']}", file=sys.stderr)
    if totals.get("wall_s"):
        summary["run"]["problems_per_s"] = todo / totals["wall_s"]
        summary["run"]["tokens_per_s"] = totals.get("rollout/tokens", 0.0) / totals["wall_s"]
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = format_table(summary)
    (out / "results.txt").write_text(table + "\n")
    write_pass_rates(out / "pass_rates.jsonl", records)
    print(table)
    log_wandb(cfg, out, summary, records)
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as exc:
        print(f"[torl] error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SandboxUnhealthy as exc:  # the start-up probe failed: nothing was evaluated against a broken tool
        print(f"[torl] sandbox unhealthy, not evaluated: {exc}", file=sys.stderr)
        sys.exit(1)
