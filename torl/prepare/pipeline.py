"""The preparation passes in order, each with a progress bar, and the ledger that accounts for every row.

Order: read (rows with an empty question or answer are counted, a row the reader cannot understand stops the run
naming file and row) -> proof -> multiple_choice -> unverifiable -> too_long -> duplicate -> near_duplicate ->
contaminated -> limr -> balance. Quality filters come before deduplication, so when two copies of a problem differ
the usable one survives (math-verify then checks the duplicates' answers too: a few seconds). Every row read ends up
either in the output or in exactly one filter's count, and the run checks that it did.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torl.config import to_dict
from torl.data.problem_rewards import load_problem_rewards, reward_curves
from torl.data.problems import (
    DataError,
    EmptyField,
    FieldNames,
    Problem,
    data_files,
    load_problems,
    read_rows,
    resolve_path,
    row_to_problem,
)
from torl.evaluation import read_pass_rates
from torl.infra.paths import resolve
from torl.infra.progress import Progress
from torl.prepare import balance as balancing
from torl.prepare import checks, limr
from torl.prepare.config import PrepareConfig, SourceConfig
from torl.prepare.similarity import CopyIndex, Overlap, near_duplicates
from torl.prepare.summary import ANSWER_TYPES, answer_type, distribution, format_summary
from torl.prepare.text import (
    common_sentences,
    content_id,
    ngrams,
    numbers,
    question_key,
    without_sentences,
    words,
)
from torl.prepare.verl_format import TrainingRow, write_training_file
from torl.rl.grading import is_equivalent, quick_equivalent

_GENERIC_NAMES = {"train", "test", "data", "val", "validation", "dev"}


@dataclass
class Item:
    """One problem on its way through the passes."""

    problem: Problem
    source: str  # the configured source name
    origin: str  # "<file> row <i>"
    key: str  # question_key: equal keys are exact duplicates
    uid: str = ""  # content id, unique within the run
    data_source: str = ""
    prompt_tokens: int | None = None

    @property
    def train_id(self) -> str:
        """The id torl's loader gives this problem when reading the output file (``<data_source>/<uid>``)."""
        return f"{self.data_source}/{self.uid}"


@dataclass
class Ledger:
    """Counts per pass and source, the rejected rows with their reasons, notes for the summary, pass timings."""

    sources: list[str]
    read: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def open(self, stage: str) -> None:
        self.dropped.setdefault(stage, Counter())

    def reject(self, stage: str, source: str, origin: str, detail: str, question: str, answer: str, pid: str = ""):
        self.dropped.setdefault(stage, Counter())[source] += 1
        self.rejects.append(
            {
                "stage": stage,
                "detail": detail,
                "source": source,
                "origin": origin,
                "id": pid,
                "question": question,
                "answer": answer,
            }
        )

    def reject_item(self, stage: str, item: Item, detail: str) -> None:
        self.reject(stage, item.source, item.origin, detail, item.problem.question, item.problem.answer, item.train_id)


def source_path(spec: str) -> Path:
    """A source as given if it exists, else relative to the checkout, else under the shared data directory."""
    given = Path(spec).expanduser()
    if given.exists():
        return given
    anchored = resolve(spec)
    return anchored if anchored.exists() else resolve_path(given)


def source_name(src: SourceConfig, path: Path) -> str:
    if src.name:
        return src.name
    if path.is_file() and path.stem not in _GENERIC_NAMES:
        return path.stem
    return path.name if path.is_dir() else path.parent.name


def read_source(src: SourceConfig, name: str, path: Path, ledger: Ledger) -> list[Item]:
    """Every row of one source as an Item; rows with an empty question or answer go to the ledger (the raw row stands
    in for the question in rejects). Rows are numbered per file, so an origin or an error names the shard of a row."""
    fields = FieldNames(src.question_field, src.answer_field, src.id_field)
    items = []
    for file in data_files(path):
        rows = read_rows(file)
        with Progress(len(rows), f"read {name}" + (f" {file.name}" if file != path else ""), unit="row") as bar:
            for index, row in enumerate(rows):
                origin = f"{file} row {index}"
                try:
                    problem = row_to_problem(row, index, file, fields)
                except EmptyField as exc:
                    text = json.dumps(row, ensure_ascii=False, default=str)[:500]
                    ledger.reject("empty", name, origin, str(exc).rsplit(": ", 1)[-1], text, "")
                else:
                    items.append(Item(problem, name, origin, question_key(problem.question)))
                bar.update(1)
        ledger.read[name] += len(rows)
    return items


def assign_ids(items: list[Item], data_source: str) -> None:
    """Content ids (the same problem gets the same id in every run); a repeated question gets ``-2``, ``-3``, ..."""
    seen: Counter = Counter()
    for it in items:
        base = content_id(it.key)
        seen[base] += 1
        it.uid = base if seen[base] == 1 else f"{base}-{seen[base]}"
        it.data_source = data_source or it.source


def filter_each(stage: str, items: list[Item], ledger: Ledger, why: Callable[[Item], str | None]) -> list[Item]:
    """One pass that judges problems one at a time."""
    ledger.open(stage)
    kept = []
    with Progress(len(items), stage, unit="problem") as bar:
        for it in items:
            reason = why(it)
            if reason:
                ledger.reject_item(stage, it, reason)
            else:
                kept.append(it)
            bar.update(1)
    return kept


def load_tokenizer(name: str) -> Any:
    if name == "qwen2.5":
        from torl.models.qwen_tokenizer import qwen_tokenizer

        return qwen_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if not path.exists() and resolve(name).exists():  # a directory in the checkout, named relative to it
        path = resolve(name)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"filters.tokenizer {name!r}: cannot load a tokenizer from it ({exc})") from exc


def count_prompt_tokens(items: list[Item], cfg: PrepareConfig) -> None:
    """Templated prompt length of every item, in batches (the tokenizer is fast on lists)."""
    from torl.data.prompts import build_prompt

    tok = load_tokenizer(cfg.filters.tokenizer)
    batch = 256
    with Progress(len(items), "tokenize", unit="problem") as bar:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            prompts = [build_prompt(it.problem.question, cfg.filters.template) for it in chunk]
            for it, ids in zip(chunk, tok(prompts, add_special_tokens=False)["input_ids"], strict=True):
                it.prompt_tokens = len(ids)
            bar.update(len(chunk))


def drop_exact_duplicates(items: list[Item], ledger: Ledger) -> list[Item]:
    ledger.open("duplicate")
    first: dict[str, Item] = {}
    kept, conflicts = [], 0
    with Progress(len(items), "duplicate", unit="problem") as bar:
        for it in items:
            original = first.get(it.key)
            if original is None:
                first[it.key] = it
                kept.append(it)
            else:
                detail = f"same question as {original.origin}"
                if quick_equivalent(it.problem.answer, original.problem.answer) is not True:
                    conflicts += 1
                    detail += f" (answers differ: {it.problem.answer!r} vs kept {original.problem.answer!r})"
                ledger.reject_item("duplicate", it, detail)
            bar.update(1)
    ledger.notes["duplicates"] = {"answer_conflicts": conflicts}
    return kept


def drop_near_duplicates(items: list[Item], cfg: PrepareConfig, ledger: Ledger) -> list[Item]:
    ledger.open("near_duplicate")
    n, threshold = cfg.filters.near_duplicate_ngram, cfg.filters.near_duplicate_threshold
    sets = [ngrams(words(it.problem.question), n) for it in items]
    with Progress(len(items), "near_duplicate", unit="problem") as bar:
        found = near_duplicates(
            sets,
            threshold,
            tick=lambda: bar.update(1),
            accept=lambda i, j: quick_equivalent(items[i].problem.answer, items[j].problem.answer) is True,
        )
    for i, (j, sim) in found.items():
        ledger.reject_item("near_duplicate", items[i], f"{sim:.2f} similar to {items[j].origin}, same answer")
    return [it for i, it in enumerate(items) if i not in found]


def answers_agree(a: str, b: str) -> bool:
    """Whether two gold answers mean the same (cheap checks, then math-verify either way round)."""
    return quick_equivalent(a, b) is True or is_equivalent(a, b) or is_equivalent(b, a)


def is_copy(train: Problem, bench: Problem) -> bool:
    """A similar pair is one problem when both state the same numbers and their answers agree; else a variant."""
    return numbers(train.question) == numbers(bench.question) and answers_agree(train.answer, bench.answer)


def drop_contaminated(items: list[Item], cfg: PrepareConfig, ledger: Ledger) -> list[Item]:
    """Drop copies of evaluation problems: a character similarity of at least ``decontamination.threshold`` between
    the two texts without typesetting and boilerplate, the same numbers and equivalent answers (``keep_variants``;
    else similarity alone). Count per evaluation set how many training questions are similar to one of its problems
    and how many of those are copies."""
    ledger.open("contaminated")
    dc = cfg.decontamination
    by_key: dict[tuple[str, str], Problem] = {}
    report: dict[str, dict[str, int]] = {}
    eval_sets: dict[str, list[Problem]] = {}
    for spec in dc.against:
        name = Path(spec).name if Path(spec).is_absolute() else spec  # benchmark names and short paths as given
        try:
            eval_sets[name] = load_problems(spec)
        except DataError as exc:
            raise DataError(f"decontamination.against {spec!r}: {exc}") from exc
        report[name] = {"problems": len(eval_sets[name]), "similar": 0, "copies": 0}
    # Boilerplate: sentences of many distinct questions (the evaluation sets repeat each other's problems).
    distinct = {question_key(q): q for q in [it.problem.question for it in items]}
    distinct.update((question_key(p.question), p.question) for ps in eval_sets.values() for p in ps)
    boilerplate = (
        common_sentences(distinct.values(), dc.boilerplate_min_questions)
        if dc.boilerplate_min_questions
        else frozenset()
    )
    index = CopyIndex()
    with Progress(sum(map(len, eval_sets.values())), "index evaluation sets", unit="problem") as bar:
        for name, eval_problems in eval_sets.items():
            for p in eval_problems:
                index.add(name, p.id, without_sentences(p.question, boilerplate))
                by_key[(name, p.id)] = p
                bar.update(1)
    kept = []
    with Progress(len(items), "contaminated", unit="problem") as bar:
        for it in items:
            similar = index.similar(without_sentences(it.problem.question, boilerplate), dc.threshold)
            copies: dict[str, Overlap] = {}  # per evaluation set, the most similar problem this one copies
            for o in similar:  # best first: a variant may score above the copy it sits beside
                if o.eval_set not in copies and (
                    not dc.keep_variants or is_copy(it.problem, by_key[(o.eval_set, o.problem_id)])
                ):
                    copies[o.eval_set] = o
            for name in {o.eval_set for o in similar}:
                report[name]["similar"] += 1
                report[name]["copies"] += name in copies
            if copies:
                parts = [f"{o.problem_id} ({o.score:.2f})" for o in copies.values()]
                same = ", same answer and numbers" if dc.keep_variants else ""
                ledger.reject_item("contaminated", it, "copy of " + ", ".join(parts) + same)
            else:
                kept.append(it)
            bar.update(1)
    ledger.notes["decontamination"] = report
    ledger.notes["boilerplate_sentences"] = len(boilerplate)
    return kept


def select_limr(items: list[Item], cfg: PrepareConfig, ledger: Ledger) -> list[Item]:
    """Keep the problems with a high LIMR score in the training run that logged ``limr.rewards``."""
    ledger.open("limr")
    lc = cfg.limr
    curves = reward_curves(load_problem_rewards(source_path(lc.rewards)))
    scores = limr.lim_scores(curves, lc.min_points)
    ids = {it.train_id for it in items}
    if not ids & curves.keys():
        raise DataError(
            f"limr.rewards {lc.rewards}: none of the {len(items)} problems appears in it; it must come from a "
            f"training run on this preparation's output (ids are <data_source>/<content id>, e.g. {min(ids)})"
        )
    chosen = set(limr.select({pid: s for pid, s in scores.items() if pid in ids}, lc.min_score, lc.max_keep))
    kept = []
    with Progress(len(items), "limr", unit="problem") as bar:
        for it in items:
            pid = it.train_id
            if pid in chosen:
                kept.append(it)
            elif pid not in scores:
                times = len(curves.get(pid, []))
                ledger.reject_item("limr", it, f"not scored: sampled {times} times (limr.min_points={lc.min_points})")
            elif scores[pid] < lc.min_score:
                ledger.reject_item("limr", it, f"score {scores[pid]:.3f} < limr.min_score={lc.min_score}")
            else:
                ledger.reject_item("limr", it, f"score {scores[pid]:.3f} outside the best limr.max_keep={lc.max_keep}")
            bar.update(1)
    matched = [scores[it.train_id] for it in items if it.train_id in scores]
    ledger.notes["limr"] = {
        "problems_logged": len(curves),
        "longest_curve": max((len(c) for c in curves.values()), default=0),
        "scored": len(matched),
        "mean_score": round(sum(matched) / len(matched), 4) if matched else None,
        "kept": len(kept),
    }
    return kept


def balance_difficulty(items: list[Item], cfg: PrepareConfig, ledger: Ledger) -> list[Item]:
    ledger.open("balance")
    bc = cfg.balance
    try:
        rates = read_pass_rates(source_path(bc.pass_rates))
    except ValueError as exc:
        raise DataError(f"balance.pass_rates: {exc}") from exc
    ids = [it.train_id for it in items]
    if not set(ids) & rates.keys():
        raise DataError(
            f"balance.pass_rates {bc.pass_rates}: none of the {len(items)} problems appears in it; evaluate this "
            "preparation's output file with jobs/eval.py (ids are <data_source>/<content id>)"
        )
    with Progress(len(items), "balance", unit="problem") as bar:
        kept_ids, dropped = balancing.balance(
            ids, rates, bc.bins, bc.per_bin, bc.drop_solved, bc.drop_unsolved, bc.keep_unmeasured, bc.seed
        )
        bar.update(len(items))
    for it in items:
        if it.train_id in dropped:
            ledger.reject_item("balance", it, dropped[it.train_id])
    kept_set = set(kept_ids)
    histogram = Counter(balancing.pass_rate_bin(rates[i], bc.bins) for i in kept_ids if i in rates)
    ledger.notes["balance"] = {
        "measured": sum(i in rates for i in ids),
        "kept_per_bin": [histogram.get(b, 0) for b in range(bc.bins)],
    }
    return [it for it in items if it.train_id in kept_set]


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run every pass, write the training file (and rejects on request) and the summary; return the summary."""
    t_start = time.perf_counter()
    out = resolve(cfg.output.path)
    paths = [(src, source_path(src.path)) for src in cfg.sources]
    names = [source_name(src, path) for src, path in paths]
    if len(set(names)) != len(names):
        raise DataError(f"sources: two sources share a name ({names}); set sources[i].name")
    ledger = Ledger(names)

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        ledger.seconds[stage] = time.perf_counter() - t0

    items: list[Item] = []
    ledger.open("empty")
    for (src, path), name in zip(paths, names, strict=True):
        with timed(f"read {name}"):
            items += read_source(src, name, path, ledger)
    assign_ids(items, cfg.output.data_source)
    f = cfg.filters
    if f.proof:
        with timed("proof"):
            items = filter_each(
                "proof", items, ledger, lambda it: checks.proof_style(it.problem.question, it.problem.answer)
            )
    if f.multiple_choice:
        with timed("multiple_choice"):
            items = filter_each(
                "multiple_choice",
                items,
                ledger,
                lambda it: checks.multiple_choice(it.problem.question, it.problem.answer),
            )
    if f.unverifiable:
        with timed("unverifiable"):
            items = filter_each(
                "unverifiable", items, ledger, lambda it: checks.unverifiable(it.problem.answer, f.answer_timeout_s)
            )
    if f.tokenizer and f.max_prompt_tokens > 0:
        with timed("too_long"):
            count_prompt_tokens(items, cfg)
            items = filter_each("too_long", items, ledger, lambda it: too_long(it, f.max_prompt_tokens))
    if f.exact_duplicates:
        with timed("duplicate"):
            items = drop_exact_duplicates(items, ledger)
    if f.near_duplicate_threshold > 0:
        with timed("near_duplicate"):
            items = drop_near_duplicates(items, cfg, ledger)
    if cfg.decontamination.against:
        with timed("contaminated"):
            items = drop_contaminated(items, cfg, ledger)
    if cfg.limr.rewards:
        with timed("limr"):
            items = select_limr(items, cfg, ledger)
    if cfg.balance.pass_rates:
        with timed("balance"):
            items = balance_difficulty(items, cfg, ledger)

    read, dropped = sum(ledger.read.values()), sum(sum(c.values()) for c in ledger.dropped.values())
    if read != len(items) + dropped:
        raise RuntimeError(f"row accounting is off: {read} read, {len(items)} kept + {dropped} dropped")
    if not items:
        raise DataError("every problem was filtered out; see the counts above (output.rejects=true lists why)")
    rows = [TrainingRow(it.data_source, it.uid, it.problem.question, it.problem.answer, it.origin) for it in items]
    with timed("write"):
        write_training_file(rows, out, cfg.output.system_prompt, cfg.output.ability)
        check_readable(out, len(rows))
        if cfg.output.rejects:
            with open(out.parent / "rejects.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ledger.rejects)
    ledger.seconds["total"] = time.perf_counter() - t_start
    summary = build_summary(cfg, out, items, ledger)
    (out.parent / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out.parent / "summary.txt").write_text(format_summary(summary) + "\n")
    return summary


def too_long(it: Item, limit: int) -> str | None:
    return f"{it.prompt_tokens} prompt tokens > {limit}" if it.prompt_tokens and it.prompt_tokens > limit else None


def check_readable(path: Path, rows: int) -> None:
    """Read the written file back with the training job's own loader: it must see every row, each once."""
    problems = load_problems(path)
    if len(problems) != rows:
        raise RuntimeError(f"{path}: wrote {rows} rows but torl's loader reads {len(problems)} problems")


def build_summary(cfg: PrepareConfig, out: Path, items: list[Item], ledger: Ledger) -> dict[str, Any]:
    kept = Counter(it.source for it in items)
    mix = Counter(answer_type(it.problem.answer) for it in items)
    tokens = [it.prompt_tokens for it in items if it.prompt_tokens is not None]
    return {
        "output": str(out),
        "rows": len(items),
        "sources": {
            name: {"path": str(source_path(src.path)), "rows": ledger.read[name], "kept": kept[name]}
            for name, src in zip(ledger.sources, cfg.sources, strict=True)
        },
        "filters": {stage: {"total": sum(c.values()), "by_source": dict(c)} for stage, c in ledger.dropped.items()},
        **ledger.notes,
        "answer_types": {t: mix[t] for t in ANSWER_TYPES},
        "lengths": {
            "question_chars": distribution([len(it.problem.question) for it in items]),
            "prompt_tokens": distribution(tokens),
        },
        "seconds": {k: round(v, 2) for k, v in ledger.seconds.items()},
        "config": to_dict(cfg),
    }
