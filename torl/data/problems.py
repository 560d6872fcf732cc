"""Loading math problems into one record, ``Problem(id, source, question, answer)``, from every format we meet.

Formats: veRL/ToRL parquet (``prompt[1].content`` is the question, ToRL's template ignores the system message;
``reward_model.ground_truth`` the answer; ``extra_info.id`` dedups ToRL's 4 copies of each AIME problem), the five
benchmark jsonl files (``problem``/``question`` and ``answer``/``final_answer`` fields), LIMR's ``save_to_disk``
arrow directory (read with pyarrow, no ``datasets``), generic jsonl/parquet with question/answer fields, and
``synthetic:<split>`` from ``torl.data.tasks``. Other field names are named with ``FieldNames`` (dotted paths reach
into nested fields). AIME25's corrupted rows (a form feed where ``\\f`` of ``\\frac`` was)
are replaced by the clean text from ToRL's parquet.

Not here: prompt templating (``torl/data/prompts.py``), tokenisation, length filtering and batching.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, str] = {
    "aime24": "aime24/test.jsonl",
    "aime25": "aime25/test.jsonl",
    "math500": "math500/test.jsonl",
    "olympiadbench": "olympiadbench/test.jsonl",
    "amc23": "amc23/test.jsonl",
    "torl_val": "torl/test.parquet",  # ToRL's validation set: AIME24 + AIME25 + MATH500 level 5, deduplicated
}
_QUESTION_FIELDS = ("problem", "question", "context")  # first present, non-empty one wins
_ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "solution_answer")
_ID_FIELDS = ("id", "unique_id", "idx", "uid")
_GENERIC_STEMS = {"test", "train", "val", "validation", "dev", "data"}
# A missing value some export wrote out as text: "None", "null", "nan", bare or in $...$ / \text{...}. Two rows of
# the MATH levels 3-5 file carry "None" where MATH's answers are 9 and 2; math-verify parses it as the product
# N*o*n*e, which verifies against itself, so the row would pass every answer check and reward each correct response
# -1. Such an answer counts as empty.
_NULL_ANSWER = re.compile(r"^\$?\s*(?:\\(?:text|textrm|mathrm)\s*\{\s*)?(?:none|null|nan)\s*\}?\s*\$?$", re.IGNORECASE)


def is_null_answer(answer: str) -> bool:
    """Whether an answer is a stringified missing value rather than a value.

    >>> [is_null_answer(a) for a in ("None", "\\\\text{ null }", "$NaN$", "\\\\text{none of these}", "0")]
    [True, True, True, False, False]
    """
    return bool(_NULL_ANSWER.match(answer.strip()))


class DataError(ValueError):
    """A data file the loader cannot use; the message names the file (and row)."""


class EmptyField(DataError):
    """A row whose question or answer field is present but empty: a bad row, not a bad file (data preparation
    counts these instead of stopping)."""


@dataclass(frozen=True)
class FieldNames:
    """Where a row keeps its question, answer and id when the defaults do not fit ("" = detect as usual).

    Dotted paths reach into nested fields and lists: ``reward_model.ground_truth``, ``messages.1.content``.
    """

    question: str = ""
    answer: str = ""
    id: str = ""


@dataclass(frozen=True)
class Problem:
    id: str  # unique within a load: "<source>/<id in the file>" (row index when the file has no id)
    source: str  # data_source / benchmark name, e.g. "aime24", "math500", "ToRL"
    question: str
    answer: str  # gold answer as stored (OlympiadBench keeps its "$...$"); graded by torl.rl.grading
    level: str = ""  # difficulty as the data gives it (MATH's "level" 1-5, synthetic "easy"/"hard"); "" = unknown


def shared_data_dir() -> Path:
    """The shared data directory: ``$TORL_DATA_DIR`` if set, else ``shared/data`` beside the repository."""
    env = os.environ.get("TORL_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    if not path.is_dir():
        how = "TORL_DATA_DIR points to" if env else "expected the shared data directory at"
        raise DataError(f"{how} {path}, which does not exist; set TORL_DATA_DIR to the directory holding SOURCES.md")
    return path


def load_benchmark(name: str, skip_bad_rows: bool = False) -> list[Problem]:
    """One of ``BENCHMARKS`` (aime24, aime25, math500, olympiadbench, amc23, torl_val) from ``shared_data_dir()``."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return load_problems(shared_data_dir() / BENCHMARKS[name], skip_bad_rows=skip_bad_rows)


def load_problems(
    spec: str | Path, skip_bad_rows: bool = False, dedup: bool = True, seed: int = 0, fields: FieldNames = FieldNames()
) -> list[Problem]:
    """Problems from a file, a directory of them, a ``BENCHMARKS`` name or ``synthetic:<split>[:n]``.

    Relative paths that do not exist are also looked up under ``shared_data_dir()`` (so ``math500/test.jsonl`` works
    anywhere). Rows without a question or answer raise ``DataError`` naming file and row, or are skipped and counted
    when ``skip_bad_rows``. ``dedup`` drops repeated ids (ToRL's parquet repeats each AIME problem 4 times).
    ``seed`` only matters for synthetic splits; ``fields`` names non-standard question/answer/id fields.
    """
    spec_str = str(spec)
    if spec_str.startswith("synthetic:"):
        return _load_synthetic(spec_str, seed)
    if spec_str in BENCHMARKS and not Path(spec_str).exists():  # a benchmark name, e.g. data.val_files=[torl_val]
        return load_benchmark(spec_str, skip_bad_rows=skip_bad_rows)
    path = resolve_path(Path(spec_str))
    rows = read_rows(path)
    problems: list[Problem] = []
    bad = dupes = 0
    seen: set[str] = set()
    for index, row in enumerate(rows):
        try:
            problem = row_to_problem(row, index, path, fields)
        except DataError:
            if not skip_bad_rows:
                raise
            bad += 1
            continue
        if dedup and problem.id in seen:
            dupes += 1
            continue
        seen.add(problem.id)
        problems.append(problem)
    if bad:
        log.warning("%s: skipped %d bad rows (no question or no answer)", path, bad)
    if dupes:
        log.info("%s: dropped %d repeated rows (same id)", path, dupes)
    if path.name == "test.jsonl" and path.parent.name == "aime25":
        problems = _clean_aime25(problems, path)
    if not problems:
        raise DataError(f"{path}: no usable problems")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


def resolve_path(path: Path) -> Path:
    """``path`` itself when it exists, else the same relative path under ``shared_data_dir()``."""
    if path.exists():
        return path
    if not path.is_absolute():
        try:
            candidate = shared_data_dir() / path
        except DataError:
            candidate = None
        if candidate is not None and candidate.exists():
            return candidate
    raise DataError(f"data file not found: {path}")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a data file or directory as a dict; ``DataError`` names the file (and line) it cannot read."""
    if path.is_dir():
        return [row for f in data_files(path) for row in read_rows(f)]
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with(path, b"["):
        return _read_json_array(path)
    if suffix in (".jsonl", ".json"):
        return list(_read_jsonl(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".arrow":
        return _read_arrow_file(path)
    raise DataError(f"{path}: unsupported data format (use .jsonl, .parquet, .arrow or a save_to_disk directory)")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            yield row


def _starts_with(path: Path, first: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(first)


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    """A ``.json`` file holding one list of row objects (how some released prompt sets are stored)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {index}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_arrow_file(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        try:
            table = ipc.open_stream(source).read_all()  # datasets' save_to_disk writes the streaming format
        except pa.ArrowInvalid:
            table = ipc.open_file(source).read_all()
    return table.to_pylist()


def data_files(path: Path) -> list[Path]:
    """The files behind a data path: itself, or for a directory its shards in name order. A ``datasets.save_to_disk``
    directory holds ``*.arrow`` shards (a DatasetDict: those of its train split); other directories hold parquet or
    jsonl files (``train_math_hard/``)."""
    if not path.is_dir():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{path}: DatasetDict without a train split ({splits}); point at a split directory")
        path = path / "train"
    for pattern in ("*.arrow", "*.parquet", "*.jsonl"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise DataError(f"{path}: directory holds no .arrow, .parquet or .jsonl files")


# ---------------------------------------------------------------------------------------------------------------
# Rows -> Problem


def _text(value: Any) -> str:
    """A field value as answer/question text: lists of one item unwrapped, integral floats without ".0"."""
    if isinstance(value, list | tuple):
        value = ",".join(_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC23 stores 27 as 27.0
    if isinstance(value, bool) or value is None:
        return ""
    return str(value).strip()


def _source_of(row: dict[str, Any], path: Path) -> str:
    for key in ("data_source", "source"):
        if isinstance(row.get(key), str) and row[key]:
            return row[key]
    stem = path.stem if path.is_file() else path.name
    if stem in _GENERIC_STEMS or stem.startswith("data-"):
        parent = path.parent
        while parent.name in _GENERIC_STEMS and parent.parent != parent:
            parent = parent.parent
        return parent.name
    return stem


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    """The value at a dotted path (``reward_model.ground_truth``, ``messages.1.content``); DataError if absent."""
    value: Any = row
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise DataError(f"{where}: no field {name!r}; fields are {sorted(row)}")
    return value


def _standard_fields(row: dict[str, Any]) -> tuple[str | None, str | None, Any]:
    """(question, answer, id) from the field names torl knows; None for a question or answer field the row lacks."""
    if "prompt" in row and "reward_model" in row:  # veRL/ToRL schema
        # ToRL's tir_base_0309 uses prompt[1].content (the user turn) and ignores the system message.
        user = [m for m in row["prompt"] or [] if isinstance(m, dict) and m.get("role") == "user"]
        question = _text(user[-1].get("content")) if user else ""
        answer = _text((row["reward_model"] or {}).get("ground_truth"))
        return question, answer, (row.get("extra_info") or {}).get("id")
    question = next((_text(row[k]) for k in _QUESTION_FIELDS if _text(row.get(k))), "")
    answer = next((_text(row[k]) for k in _ANSWER_FIELDS if _text(row.get(k))), "")
    raw_id = next((row[k] for k in _ID_FIELDS if row.get(k) is not None and row.get(k) != ""), None)
    return (
        question if any(k in row for k in _QUESTION_FIELDS) else None,
        answer if any(k in row for k in _ANSWER_FIELDS) else None,
        raw_id,
    )


def row_to_problem(row: dict[str, Any], index: int, path: Path, fields: FieldNames = FieldNames()) -> Problem:
    """One row as a ``Problem``: ``DataError`` naming file and row when a field is missing, ``EmptyField`` when the
    question or answer is empty."""
    where = f"{path} row {index}"
    question, answer, raw_id = _standard_fields(row)
    if fields.question:
        question = _text(_field(row, fields.question, where))
    if fields.answer:
        answer = _text(_field(row, fields.answer, where))
    if fields.id:
        raw_id = _field(row, fields.id, where)
    if question is None or answer is None:
        raise DataError(
            f"{where}: no question field ({'/'.join(_QUESTION_FIELDS)}) or answer field "
            f"({'/'.join(_ANSWER_FIELDS)}); fields are {sorted(row)} (name yours with question_field/answer_field)"
        )
    if not question:
        raise EmptyField(f"{where}: empty question")
    if not answer:
        raise EmptyField(f"{where}: empty answer")
    if is_null_answer(answer):
        raise EmptyField(f"{where}: empty answer ({answer!r}, a missing value written as text)")
    source = _source_of(row, path)
    return Problem(
        id=f"{source}/{raw_id if raw_id is not None else index}",
        source=source,
        question=question,
        answer=answer,
        level=_text(row.get("level")),  # MATH/MATH500 rows carry one; metrics report accuracy and code use per level
    )


# ---------------------------------------------------------------------------------------------------------------
# Special cases


def _clean_aime25(problems: list[Problem], path: Path) -> list[Problem]:
    """Replace AIME25 texts that contain a form feed (rows 18 and 27: ``\\f`` of ``\\frac`` un-escaped) by ToRL's
    clean text of the same problem; ToRL's AIME25 rows are in the same order with the same answers."""
    if not any("\f" in p.question for p in problems):
        return problems
    torl_file = path.parent.parent / "torl" / "test.parquet"
    if not torl_file.is_file():
        log.warning("%s: corrupted rows kept (no %s to take clean text from)", path, torl_file)
        return problems
    clean = [p for p in load_problems(torl_file) if p.source == "aime25"]
    if len(clean) != len(problems):
        raise DataError(f"{path}: {len(problems)} rows but {torl_file} has {len(clean)} AIME25 problems")
    out = []
    for mine, theirs in zip(problems, clean, strict=True):
        if "\f" in mine.question:
            if _text(mine.answer) != _text(theirs.answer):
                raise DataError(f"{path}: {mine.id} answer {mine.answer} != {theirs.answer} in {torl_file}")
            mine = Problem(mine.id, mine.source, theirs.question, mine.answer, mine.level)
        out.append(mine)
    return out


def _load_synthetic(spec: str, seed: int) -> list[Problem]:
    """``synthetic:<split>[:<n>][:families=<a>,<b>][:easy=<share>]`` from ``torl.data.tasks.make_split`` (imported
    lazily).

    ``families`` keeps only those task families and ``easy`` sets the share of easy items (default
    ``tasks.EASY_FRAC``): the selective-tool-use preset trains on the families whose easy items the base model answers
    reliably without code, half of them easy."""
    usage = "use synthetic:<split>[:<n>][:families=<a>,<b>][:easy=<share>]"
    split, *rest = spec.split(":")[1:] or [""]
    if not split or len(rest) > 3:
        raise DataError(f"bad synthetic spec {spec!r}; {usage}")
    n, options = None, {}
    for i, part in enumerate(rest):
        key, sep, value = part.partition("=")
        if sep and key in ("families", "easy") and key not in options:
            options[key] = value
        elif not sep and i == 0:
            try:
                n = int(part)
            except ValueError as exc:
                raise DataError(f"bad synthetic spec {spec!r}: {part!r} is not a count; {usage}") from exc
        else:
            raise DataError(f"bad synthetic spec {spec!r}: {part!r}; {usage}")
    try:
        from torl.data import tasks
    except ImportError as exc:
        raise DataError(f"{spec}: synthetic tasks need torl.data.tasks, which is not available ({exc})") from exc
    try:
        families = tuple(f for f in options["families"].split(",") if f) if "families" in options else None
        easy = float(options.get("easy", tasks.EASY_FRAC))
        return list(tasks.make_split(split, n=n, seed=seed, families=families, easy_frac=easy))
    except ValueError as exc:
        raise DataError(f"bad synthetic spec {spec!r}: {exc}") from exc
