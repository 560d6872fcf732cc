"""The training file: veRL's RL parquet schema as ToRL uses it, so the same file trains torl, ToRL and veRL.

Columns (docs/torl-behaviour.md ("Training data")): ``data_source``; ``prompt``, a list of {role, content}
turns, system then user (ToRL's template reads ``prompt[1].content``, veRL's loader applies the chat template to the
list); ``ability``; ``reward_model`` {``ground_truth``, ``style`` = "rule"}; ``extra_info`` {``id``, ``split``,
``index``, ``origin``}. ToRL's own files spell the style key ``stype``; nothing in either codebase reads it, and
``style`` is veRL's name. ``extra_info.id`` is the content id, so torl's loader names each problem
``<data_source>/<id>``, the id its per-problem rewards and pass rates are recorded under.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        (
            "extra_info",
            pa.struct([("id", pa.string()), ("split", pa.string()), ("index", pa.int64()), ("origin", pa.string())]),
        ),
    ]
)


@dataclass(frozen=True)
class TrainingRow:
    """What one output row needs; the rest is fixed by the schema."""

    data_source: str
    uid: str
    question: str
    answer: str
    origin: str  # "<source file> row <i>": where the problem came from


def to_verl_row(row: TrainingRow, index: int, system_prompt: str, ability: str) -> dict[str, Any]:
    return {
        "data_source": row.data_source,
        "prompt": [{"content": system_prompt, "role": "system"}, {"content": row.question, "role": "user"}],
        "ability": ability,
        "reward_model": {"ground_truth": row.answer, "style": "rule"},
        "extra_info": {"id": row.uid, "split": "train", "index": index, "origin": row.origin},
    }


def write_training_file(rows: list[TrainingRow], path: Path, system_prompt: str, ability: str) -> None:
    """Write the parquet file atomically (a temporary file renamed into place: no half-written training file)."""
    table = pa.Table.from_pylist(
        [to_verl_row(r, i, system_prompt, ability) for i, r in enumerate(rows)], schema=SCHEMA
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
