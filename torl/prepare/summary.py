"""What a preparation run did, in numbers a user checks before training: counts per source and per filter, the
answer-type mix and the length distribution of what was kept, and where the overlaps with evaluation sets are."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torl.rl.grading import normalize_answer, parse_number

ANSWER_TYPES = ("integer", "decimal", "fraction", "tuple/interval", "list", "matrix", "text", "expression")
_TEXT = re.compile(r"^(?:\\text\{[^{}]*\}|[A-Za-z][A-Za-z ]+)$")


def answer_type(answer: str) -> str:
    """One of ``ANSWER_TYPES``, from the answer's surface form (what the grader will have to compare)."""
    s = normalize_answer(answer)
    number = parse_number(s)
    if number is not None:
        if "." in s or "e" in s.lower():
            return "decimal"
        return "integer" if number.denominator == 1 and "/" not in s and "frac" not in s else "fraction"
    if "\\begin{" in s:
        return "matrix"
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and "," in s:
        return "tuple/interval"
    if "," in s or "\\cup" in s:
        return "list"
    if _TEXT.match(s):
        return "text"
    return "expression"


def distribution(values: Sequence[int]) -> dict[str, int]:
    """min, p50, p90, p99, max (nearest-rank percentiles); {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"min": ordered[0], "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1]}


def format_summary(summary: dict[str, Any]) -> str:
    """The saved summary as the text a user reads (also summary.txt)."""
    sources = summary["sources"]
    names = list(sources)
    width = max([len("filter")] + [len(n) for n in names + list(summary["filters"])])
    col = max([8] + [len(n) + 2 for n in names])

    def line(label: str, cells: list[Any]) -> str:
        return f"  {label:<{width}}" + "".join(f"{c!s:>{col}}" for c in cells)

    out = [f"[torl] prepared {summary['rows']} problems -> {summary['output']}", line("", names + ["total"])]
    out.append(line("read", [sources[n]["rows"] for n in names] + [sum(s["rows"] for s in sources.values())]))
    for stage, counts in summary["filters"].items():
        out.append(line(stage, [-counts["by_source"].get(n, 0) for n in names] + [-counts["total"]]))
    out.append(line("kept", [sources[n]["kept"] for n in names] + [summary["rows"]]))
    decon = summary.get("decontamination") or {}
    if decon:
        out.append(
            "  similarity to evaluation sets (training questions; copies: similar, same numbers, equivalent answer;"
            f" {summary.get('boilerplate_sentences', 0)} boilerplate sentences left out):"
        )
        for name, row in decon.items():
            out.append(
                f"    {name:<18} {row['similar']:>5} of the pool similar to its {row['problems']} problems"
                f" ({row['copies']} copies)"
            )
    for key in ("duplicates", "limr", "balance"):
        if summary.get(key):
            out.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in summary[key].items()))
    if summary["rows"]:
        mix = summary["answer_types"]
        out.append("  answer types: " + ", ".join(f"{k} {v}" for k, v in mix.items() if v))
        for key, dist in summary["lengths"].items():
            if dist:
                out.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in dist.items()))
    out.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    return "\n".join(out)
