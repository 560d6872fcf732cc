"""Evaluation bookkeeping: per-sample result records, a resumable JSONL store, per-benchmark tables and averages.

Pure logic behind ``jobs/eval.py``: a record holds everything needed to inspect one sample (prompt, response with
tool outputs, extracted answer, gold, verdict, tool calls) and to recompute every metric, so the tables of a resumed
run are built from the file, not from memory. ToRL scores validation as accuracy per data source and averages the
sources unweighted (``avg_acc``, docs/torl-behaviour.md ("Reward and grading", "Evaluation")); ToRL's numbers are
greedy. Later papers sample instead: SimpleTIR (arXiv 2509.02479) reports avg@32, the accuracy averaged over 32
samples per problem at temperature 1.0 and top-p 0.7. A record says which decoding produced it, so one run can hold
both and its table puts them side by side (greedy ``acc``, sampled ``avg@n`` and the unbiased pass@k). Not here:
generation, grading, Ray (see jobs/eval.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torl.rollout.metrics import rollout_metrics
from torl.rollout.types import ToolCall, Trajectory

log = logging.getLogger(__name__)

# The five benchmarks of ToRL's Table 1; their unweighted mean is the paper's "Avg." column.
TORL_BENCHMARKS = ("aime24", "aime25", "math500", "olympiadbench", "amc23")
GREEDY, SAMPLED = "greedy", "sampled"  # EvalRecord.decoding


@dataclass
class EvalRecord:
    """One graded sample of one problem (one JSONL line)."""

    benchmark: str  # the benchmark name or data spec it came from (e.g. "aime24", "synthetic:test", a path)
    problem_id: str
    sample: int  # 0..n-1 within the problem
    source: str  # Problem.source (a data_source inside multi-source files such as ToRL's test.parquet)
    question: str
    prompt: str  # the templated prompt text the model saw
    response: str  # decoded response, tool outputs included
    extracted: str | None  # last \boxed{} content, None when there is none
    gold: str
    correct: bool
    reward: float
    finish_reason: str
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 0 marks inserted observation tokens
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # ToolCall fields
    gen_s: float = 0.0
    tool_s: float = 0.0
    level: str = ""  # Problem.level (difficulty as the data gives it; "" = unknown)
    decoding: str = GREEDY  # GREEDY: the one greedy response; SAMPLED: one of eval.n samples (eval.temperature/top_p)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.benchmark, self.problem_id, self.decoding)

    @classmethod
    def from_trajectory(
        cls,
        traj: Trajectory,
        *,
        benchmark: str,
        sample: int,
        source: str,
        question: str,
        prompt: str,
        extracted: str | None,
        level: str = "",
        decoding: str = GREEDY,
    ) -> EvalRecord:
        return cls(
            benchmark=benchmark,
            problem_id=traj.problem_id,
            sample=sample,
            source=source,
            question=question,
            prompt=prompt,
            response=traj.text,
            extracted=extracted,
            gold=traj.answer,
            correct=bool(traj.correct),
            reward=float(traj.reward),
            finish_reason=traj.finish_reason,
            response_ids=list(traj.response_ids),
            loss_mask=list(traj.loss_mask),
            tool_calls=[asdict(c) for c in traj.tool_calls],
            gen_s=traj.gen_s,
            tool_s=traj.tool_s,
            level=level,
            decoding=decoding,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRecord:
        names = {f for f in cls.__dataclass_fields__}
        missing = {"benchmark", "problem_id", "sample", "correct"} - data.keys()
        if missing:
            raise ValueError(f"result record lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_trajectory(self) -> Trajectory:
        """The fields metrics read (ids, mask, tool calls, text, verdict); logprobs and versions are not stored."""
        return Trajectory(
            problem_id=self.problem_id,
            group=0,
            prompt_ids=[],
            response_ids=list(self.response_ids),
            loss_mask=list(self.loss_mask),
            tool_calls=[ToolCall(**c) for c in self.tool_calls],
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            text=self.response,
            answer=self.gold,
            reward=self.reward,
            correct=self.correct,
            gen_s=self.gen_s,
            tool_s=self.tool_s,
        )


class ResultStore:
    """Append-only JSONL of ``EvalRecord`` lines; what it holds on restart is skipped (resume by benchmark + id).

    All samples of a problem are appended in one write and flushed to disk, so a killed run leaves at worst one torn
    final line, which ``load`` cuts off (and logs) so later appends start on a clean line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> list[EvalRecord]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        complete, newline, torn = raw.rpartition(b"\n")
        if torn:  # every write ends with a newline, so text after the last one is a torn write: cut it off
            log.warning("%s: dropping a torn final line (%d bytes)", self.path, len(torn))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete) + len(newline))
        records: list[EvalRecord] = []
        for i, line in enumerate(complete.split(b"\n") if complete else []):
            if not line.strip():
                continue
            try:
                records.append(EvalRecord.from_dict(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as exc:
                raise ValueError(f"{self.path}:{i + 1}: not a result record ({exc})") from exc
        return records

    def append(self, records: Iterable[EvalRecord]) -> None:
        text = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def latest_records(records: Iterable[EvalRecord]) -> dict[tuple[str, str, str], list[EvalRecord]]:
    """Group by (benchmark, problem_id, decoding), keeping the last record per sample index (a rerun's wins)."""
    by_sample: dict[tuple[str, str, str], dict[int, EvalRecord]] = defaultdict(dict)
    for r in records:
        by_sample[r.key][r.sample] = r
    return {k: [v[s] for s in sorted(v)] for k, v in by_sample.items()}


def finished_keys(records: Iterable[EvalRecord], n: int, decoding: str = GREEDY) -> set[tuple[str, str]]:
    """(benchmark, problem_id) of the problems that already have all ``n`` samples (0..n-1) of ``decoding``."""
    return {
        (bench, pid)
        for (bench, pid, dec), rs in latest_records(records).items()
        if dec == decoding and {r.sample for r in rs} >= set(range(n))
    }


def problem_pass_rates(records: Iterable[EvalRecord]) -> list[dict[str, Any]]:
    """One row per problem: benchmark, problem_id, source, decoding, samples, correct, pass_rate (the share of its
    samples that were correct), from its sampled records where it has them (a pass rate needs samples), else its
    greedy one. Data preparation balances difficulty with these (``torl/prepare/balance.py``)."""
    groups = latest_records(records)
    rows = []
    for (bench, pid, dec), rs in groups.items():
        if dec == GREEDY and (bench, pid, SAMPLED) in groups:
            continue
        correct = sum(r.correct for r in rs)
        rows.append(
            {
                "benchmark": bench,
                "problem_id": pid,
                "source": rs[0].source,
                "decoding": dec,
                "samples": len(rs),
                "correct": correct,
                "pass_rate": correct / len(rs),
            }
        )
    return rows


def write_pass_rates(path: str | Path, records: Iterable[EvalRecord]) -> None:
    """``pass_rates.jsonl`` beside an evaluation's results: ``problem_pass_rates`` one JSON line each."""
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in problem_pass_rates(records)), encoding="utf-8")


def read_pass_rates(path: str | Path) -> dict[str, float]:
    """``{problem_id: pass_rate}`` from a ``pass_rates.jsonl`` or the evaluation directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "pass_rates.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no pass-rate file (jobs/eval.py writes pass_rates.jsonl in its output directory)")
    rates = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rates[str(row["problem_id"])] = float(row["pass_rate"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: not a pass-rate row ({exc})") from exc
    return rates


def check_run_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Write the settings that make results comparable, or check them against an earlier run in the same place.

    Resuming with a different checkpoint, decoding or tool budget would silently mix two evaluations in one table.
    """
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"{path.parent} holds results of a different evaluation setup ({details}); "
                "use another output directory or delete it"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def default_ks(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n, and n itself: the usual pass@k ladder."""
    ks = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
    return tuple(sorted(set(ks) | {n}))


def sample_accuracy(groups: Sequence[Sequence[EvalRecord]], ks: Sequence[int] = ()) -> dict[str, float]:
    """``avg@n``, the per-problem share of correct samples averaged over problems (SimpleTIR's avg@32: n is the
    smallest sample count among the problems, normally every problem's), and the unbiased ``pass@k`` for each k no
    larger than n. One sample per problem: ``avg@1`` is plain accuracy."""
    if not groups:
        raise ValueError("no problems to score")
    n = min(len(g) for g in groups)
    row = {f"avg@{n}": sum(sum(r.correct for r in g) / len(g) for g in groups) / len(groups)}
    for k in ks:
        if k <= n:
            row[f"pass@{k}"] = sum(pass_at_k(len(g), sum(r.correct for r in g), k) for g in groups) / len(groups)
    return row


def benchmark_metrics(
    groups: Sequence[Sequence[EvalRecord]], ks: Sequence[int] = (), max_calls: int = 0
) -> dict[str, float]:
    """One table row from one decoding's records: ``acc`` (per-problem share correct, averaged = accuracy when
    greedy, avg@n when sampling), ``avg@n`` (n > 1) and ``pass@k`` as ``sample_accuracy``, ``problems``, and
    ``rollout_metrics`` (with the records' difficulty levels and the tool budget ``max_calls``)."""
    accuracy = sample_accuracy(groups, ks)
    avg_key = next(k for k in accuracy if k.startswith("avg@"))
    row: dict[str, float] = {"problems": float(len(groups)), "acc": accuracy[avg_key]}
    row.update((k, v) for k, v in accuracy.items() if k != "avg@1")
    levels = {r.problem_id: r.level for g in groups for r in g if r.level}
    row.update(rollout_metrics([r.to_trajectory() for g in groups for r in g], levels=levels, max_calls=max_calls))
    return row


def summarize(
    records: Iterable[EvalRecord],
    benchmarks: Sequence[str],
    ks: Sequence[int] = (),
    average_over=TORL_BENCHMARKS,
    max_calls: int = 0,
) -> dict[str, Any]:
    """Per-benchmark rows (in ``benchmarks`` order), per-source sub-rows for multi-source files, and averages.

    A row's ``acc`` and tool metrics come from the greedy records when there are any, else from the samples; with
    both, the samples add ``avg@n`` and ``pass@k`` beside the greedy ``acc``. ``average`` is ToRL's avg: the
    unweighted mean of ``acc`` (and of ``avg@n``) over the evaluated benchmarks among ``average_over`` (the paper's
    five); ``average_all`` is the unweighted mean over every evaluated benchmark (ToRL's validation ``avg_acc`` over
    data sources). Sub-rows ``bench[source]`` are shown but never averaged.
    """
    by_bench: dict[str, dict[str, list[list[EvalRecord]]]] = defaultdict(lambda: defaultdict(list))
    for (bench, _, decoding), rs in latest_records(records).items():
        by_bench[bench][decoding].append(rs)

    def row(by_decoding: dict[str, list[list[EvalRecord]]]) -> dict[str, float]:
        greedy, sampled = by_decoding.get(GREEDY, []), by_decoding.get(SAMPLED, [])
        if not greedy:
            return benchmark_metrics(sampled, ks, max_calls)
        out = benchmark_metrics(greedy, () if sampled else ks, max_calls)
        if sampled:
            out.update(sample_accuracy(sampled, ks))
        return out

    rows: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        if bench not in by_bench:
            continue
        rows[bench] = row(by_bench[bench])
        sources = sorted({g[0].source for groups in by_bench[bench].values() for g in groups})
        if len(sources) > 1:
            for src in sources:
                rows[f"{bench}[{src}]"] = row(
                    {dec: [g for g in groups if g[0].source == src] for dec, groups in by_bench[bench].items()}
                )
    out: dict[str, Any] = {"benchmarks": rows}
    main = [b for b in benchmarks if b in by_bench]
    torl = [b for b in main if b in average_over]
    for key, over in (("average", torl), ("average_all", main)):
        if over:
            shared = [
                k for k in rows[over[0]] if (k == "acc" or k.startswith("avg@")) and all(k in rows[b] for b in over)
            ]
            out[key] = {k: sum(rows[b][k] for b in over) / len(over) for k in shared} | {"over": over}
    return out


# Columns of the printed table: (metric key, header, format). Missing values (empty buckets) print as "-".
TABLE_COLUMNS = [
    ("problems", "n", "{:.0f}"),
    ("acc", "acc", "{:.1%}"),
    ("tool/code_ratio", "code", "{:.1%}"),
    ("tool/exec_success", "exec_ok", "{:.1%}"),
    ("acc/with_code", "acc_code", "{:.1%}"),
    ("acc/without_code", "acc_nocode", "{:.1%}"),
    ("tool/effective_code_ratio", "eff_code", "{:.1%}"),
    ("tool/acc_first_failed", "acc_fail1", "{:.1%}"),  # accuracy when the first call failed
    ("tool/calls_per_response", "calls", "{:.2f}"),
    ("response/length_mean", "len", "{:.0f}"),
    ("response/cutoff_rate", "cutoff", "{:.1%}"),
]


def format_table(summary: dict[str, Any]) -> str:
    """A fixed-width text table of ``summarize``'s rows, pass@k columns included, and the averages below it."""
    rows = summary["benchmarks"]
    sampled_cols = [
        k
        for prefix in ("avg@", "pass@")
        for k in sorted(
            {k for r in rows.values() for k in r if k.startswith(prefix)}, key=lambda s: int(s.split("@")[1])
        )
    ]
    cols = TABLE_COLUMNS[:2] + [(k, k, "{:.1%}") for k in sampled_cols] + TABLE_COLUMNS[2:]
    header = ["benchmark"] + [h for _, h, _ in cols]
    body = []
    for name, r in rows.items():
        body.append([name] + [fmt.format(r[k]) if k in r else "-" for k, _, fmt in cols])
        for level in sorted(
            {k.split("/")[1] for k in r if k.startswith("level/")}
        ):  # by difficulty (torl.rollout.metrics)
            sub = {"problems": r[f"level/{level}/n"], "acc": r[f"level/{level}/acc"]}
            sub["tool/code_ratio"] = r[f"level/{level}/code_ratio"]
            body.append([f"  level {level}"] + [fmt.format(sub[k]) if k in sub else "" for k, _, fmt in cols])
    for key in ("average", "average_all"):
        if key in summary:
            avg = summary[key]
            body.append(
                [key, str(len(avg["over"]))] + [fmt.format(avg[k]) if k in avg else "" for k, _, fmt in cols[1:]]
            )
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in [header] + body
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "setup" in summary:  # calls per response only compare between runs of the same tool budget
        setup = summary["setup"]
        lines.append(f"tool budget C = {setup['max_calls']} calls per response")
        if setup.get("n"):  # avg@n and pass@k only compare between runs that sampled alike
            lines.append(
                f"sampled: n = {setup['n']} per problem, temperature {setup['temperature']}, top_p {setup['top_p']}, "
                f"top_k {setup['top_k']}, seed {setup['seed']}" + ("" if setup.get("greedy") else " (no greedy pass)")
            )
    return "\n".join(lines)


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``eval/<bench>/<metric>`` and ``eval/average/acc`` for W&B and metrics.jsonl."""
    out = {f"eval/{b}/{k}": v for b, row in summary["benchmarks"].items() for k, v in row.items()}
    for key in ("average", "average_all"):
        out.update((f"eval/{key}/{k}", v) for k, v in summary.get(key, {}).items() if k != "over")
    return out
