"""Build a training file from raw problem sources: filtered, deduplicated, decontaminated, optionally LIMR-selected.

    python jobs/prepare_data.py configs/data_math_hard_limr.yaml [key=value ...]

Reads every source (veRL/ToRL parquet, jsonl/json with configurable fields, save_to_disk directories), drops proofs,
multiple-choice leftovers, answers the grader cannot check, prompts over the token limit, exact and near duplicates
and questions that overlap an evaluation set, and writes one parquet file in the veRL/ToRL schema beside
summary.json/summary.txt (and rejects.jsonl with output.rejects=true). Train on it with
``python jobs/train.py data.train_files=[<output.path>]``.

LIMR selection (ToRL's last step, docs/torl-behaviour.md ("Training data")): train on the prepared pool for a few
epochs (the run writes problem_rewards.jsonl), then rerun this job with ``limr.rewards=<run dir>``. Difficulty
balancing: ``python jobs/eval.py --checkpoint M --benchmarks <output.path> eval.greedy=false eval.n=8
eval.top_p=1.0`` (top-p as in training), then rerun with ``balance.pass_rates=<eval dir>``. Problems keep their ids
across runs (a hash of the normalised question).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torl.config import ConfigError  # noqa: E402
from torl.config_help import format_help, wants_help  # noqa: E402
from torl.config_load import split_cli  # noqa: E402
from torl.data.problems import DataError  # noqa: E402


def source_help() -> str:
    """The fields of one ``sources`` entry (``--help`` lists nested sections, not the items of a list)."""
    from torl.config_help import sections
    from torl.prepare.config import SourceConfig

    lines = ["", "sources: each entry is a mapping of"]
    for fd in sections(SourceConfig)[0][2]:
        lines += [f"  {fd.key} ({fd.type}, default {fd.default})", f"      {fd.help}"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from torl.prepare.config import PrepareConfig, load_prepare_config

    if wants_help(argv):
        print(format_help(PrepareConfig, usage=__doc__.strip()) + source_help())
        return 0
    t0 = time.perf_counter()
    try:
        cfg = load_prepare_config(*split_cli(argv))
        from torl.prepare.pipeline import prepare
        from torl.prepare.summary import format_summary

        summary = prepare(cfg)
    except (ConfigError, DataError) as exc:
        print(f"[torl] {'config' if isinstance(exc, ConfigError) else 'data'} error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    out = Path(summary["output"])
    print(f"[torl] summary {out.parent / 'summary.txt'} ({time.perf_counter() - t0:.0f} s)")
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"[torl] next: python jobs/train.py <preset.yaml> data.train_files=[{shown}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
