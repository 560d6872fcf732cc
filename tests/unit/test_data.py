"""Data loading: every shared dataset with SOURCES.md's row counts, dedup, AIME25 cleanup, and bad-file errors."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torl.data.problems import (
    BENCHMARKS,
    DataError,
    EmptyField,
    FieldNames,
    Problem,
    is_null_answer,
    load_benchmark,
    load_problems,
    shared_data_dir,
)

# SOURCES.md row counts (raw rows, before dedup).
RAW_ROWS = {
    "torl/test.parquet": 374,
    "aime24/test.jsonl": 30,
    "aime25/test.jsonl": 30,
    "amc23/test.jsonl": 40,
    "math500/test.jsonl": 500,
    "olympiadbench/test.jsonl": 675,
    "train_limr": 1389,  # the DatasetDict directory loads its train split
    "train_limr/train": 1389,
    "train_limr/test": 272,
}


@pytest.mark.parametrize("spec, rows", sorted(RAW_ROWS.items()))
def test_every_shared_dataset_loads_with_sources_row_counts(spec, rows):
    problems = load_problems(spec, dedup=False)
    assert len(problems) == rows
    assert all(isinstance(p, Problem) and p.question and p.answer for p in problems)


def test_math_hard_has_two_empty_and_two_null_answers():
    # SOURCES.md: 8,523 rows, 2 with an empty ground truth; rows 3380 and 7997 hold the text "None" (MATH: 9 and 2).
    with pytest.raises(DataError, match=r"train_math_hard/train.parquet row \d+: empty answer"):
        load_problems("train_math_hard/train.parquet")
    problems = load_problems("train_math_hard/train.parquet", skip_bad_rows=True, dedup=False)
    assert len(problems) == 8523 - 4
    assert {p.source for p in problems} == {"ToRL"}
    assert not any(is_null_answer(p.answer) for p in problems)
    assert not any(p.question.startswith("If $(x + y)^2 = 1$ and $xy = -4$") for p in problems)  # row 3380


@pytest.mark.parametrize(
    "answer", ["None", "null", "NaN", " none ", "\\text{None}", "$\\text{ null }$", "\\mathrm{nan}"]
)
def test_null_answers_written_as_text_count_as_empty(tmp_path, answer):
    f = _write_jsonl(tmp_path / "n.jsonl", [{"question": "q0", "answer": "1"}, {"question": "q1", "answer": answer}])
    with pytest.raises(EmptyField, match=r"n.jsonl row 1: empty answer \(.*a missing value written as text\)"):
        load_problems(f)


@pytest.mark.parametrize("answer", ["0", "\\text{none of them}", "\\text{(N)}", "n", "\\emptyset", "\\text{no}"])
def test_values_that_look_empty_are_kept(tmp_path, answer):
    f = _write_jsonl(tmp_path / "v.jsonl", [{"question": "q", "answer": answer}])
    assert load_problems(f)[0].answer == answer
    assert not is_null_answer(answer)


@pytest.mark.parametrize(
    "name, count, sources",
    [
        ("aime24", 30, {"aime24"}),
        ("aime25", 30, {"aime25"}),
        ("amc23", 40, {"amc23"}),
        ("math500", 500, {"math500"}),
        ("olympiadbench", 675, {"olympiadbench"}),
        ("torl_val", 194, {"aime24", "aime25", "math500"}),  # 30 + 30 + 134 after dropping ToRL's 4x AIME copies
    ],
)
def test_load_benchmark(name, count, sources):
    problems = load_benchmark(name)
    assert len(problems) == count
    assert {p.source for p in problems} == sources
    assert len({p.id for p in problems}) == count
    assert load_problems(name) == problems  # a benchmark name is also a valid data spec (data.val_files)


def test_torl_parquet_uses_user_turn_and_ground_truth():
    first = load_benchmark("torl_val")[0]
    assert first.question.startswith("Every morning Aya goes for a $9$-kilometer-long walk")
    assert "Please reason step by step" not in first.question  # the system message is ignored (ToRL)
    assert first.answer == "204"


def test_answer_formats_are_normalised_to_strings():
    assert load_benchmark("amc23")[0].answer == "27"  # stored as 27.0
    assert load_benchmark("aime25")[0].answer == "70"  # stored as an int
    assert "025" in {p.answer for p in load_benchmark("aime24")}  # zero padding kept; grading compares numbers
    assert load_benchmark("olympiadbench")[1].answer == "$\\frac{1}{2 n+2}$"  # final_answer[0], $ kept


def test_aime25_corrupted_rows_get_clean_text():
    raw = [json.loads(line) for line in (shared_data_dir() / "aime25/test.jsonl").open()]
    assert ["\f" in r["problem"] for r in raw].count(True) == 2  # rows 18 and 27 in the file
    problems = load_benchmark("aime25")
    assert not any("\f" in p.question for p in problems)
    assert "\\frac" in problems[18].question and "\\frac" in problems[27].question
    assert problems[18].answer == str(raw[18]["answer"])
    assert problems[0].question == raw[0]["problem"]  # clean rows keep their own text


def test_limr_dedups_aime_copies_in_test_split():
    problems = load_problems("train_limr/test")
    assert len(problems) == 272 - 90  # 120 AIME rows are 30 problems x 4
    assert {p.source for p in problems} == {"aime", "math", "pad"}


def test_all_benchmarks_are_listed():
    assert set(BENCHMARKS) == {"aime24", "aime25", "math500", "olympiadbench", "amc23", "torl_val"}
    with pytest.raises(DataError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k")


def test_shared_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("TORL_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("TORL_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="TORL_DATA_DIR"):
        shared_data_dir()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generic_jsonl_question_answer(tmp_path):
    f = _write_jsonl(tmp_path / "mine.jsonl", [{"question": "1+1?", "answer": 2}, {"problem": "2+2?", "answer": "4"}])
    problems = load_problems(f)
    assert problems == [Problem("mine/0", "mine", "1+1?", "2"), Problem("mine/1", "mine", "2+2?", "4")]


def test_generic_parquet(tmp_path):
    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": ["1", "2"], "id": ["x", "y"]}), f)
    assert [p.id for p in load_problems(f)] == [f"{tmp_path.name}/x", f"{tmp_path.name}/y"]


def test_missing_column_names_file_and_row(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "solution": "s"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 0: no question field .* or answer field .*fields are"):
        load_problems(f)


def test_empty_answer_raises_or_is_skipped_with_count(tmp_path, caplog):
    rows = [{"question": "q0", "answer": "1"}, {"question": "q1", "answer": ""}, {"question": "", "answer": "3"}]
    f = _write_jsonl(tmp_path / "some.jsonl", rows)
    with pytest.raises(DataError, match="some.jsonl row 1: empty answer"):
        load_problems(f)
    with caplog.at_level(logging.WARNING, logger="torl.data.problems"):
        problems = load_problems(f, skip_bad_rows=True)
    assert [p.question for p in problems] == ["q0"]
    assert "skipped 2 bad rows" in caplog.text


def test_torl_schema_missing_ground_truth(tmp_path):
    f = tmp_path / "t.parquet"
    table = pa.table(
        {
            "data_source": ["x"],
            "prompt": [[{"role": "system", "content": "s"}, {"role": "user", "content": "what?"}]],
            "reward_model": [{"ground_truth": "", "style": "rule"}],
        }
    )
    pq.write_table(table, f)
    with pytest.raises(DataError, match="t.parquet row 0: empty answer"):
        load_problems(f)


def test_bad_json_line_and_missing_file(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        load_problems(f)
    with pytest.raises(DataError, match="data file not found"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported data format"):
        load_problems(_write_jsonl(tmp_path / "x.csv", []))


def test_synthetic_spec_dispatches_to_tasks():
    problems = load_problems("synthetic:test:5", seed=3)
    assert len(problems) == 5 and all(p.question and p.answer for p in problems)
    assert problems == load_problems("synthetic:test:5", seed=3)
    with pytest.raises(DataError, match="bad synthetic spec"):
        load_problems("synthetic:test:many")


def test_synthetic_spec_keeps_the_families_asked_for():
    """``synthetic:<split>[:<n>]:families=a,b:easy=s`` draws only those families, ``s`` of them easy; the plain spec
    is unchanged by the options (the CPU default's data stays what its runs measured) (#33)."""
    some = load_problems("synthetic:test:40:families=comb,lin", seed=3)
    assert len(some) == 40 and {p.source for p in some} == {"synthetic/comb", "synthetic/lin"}
    assert load_problems("synthetic:train:families=sum", seed=0)[0].source == "synthetic/sum"
    assert load_problems("synthetic:test:5", seed=3) == load_problems("synthetic:test:5", seed=3)
    assert {p.source for p in load_problems("synthetic:test:60", seed=3)} > {"synthetic/comb", "synthetic/lin"}
    half = load_problems("synthetic:test:200:easy=0.5:families=comb,lin,sum", seed=1)
    assert 80 <= sum(p.level == "easy" for p in half) <= 120 and len({p.source for p in half}) == 3
    assert sum(p.level == "easy" for p in load_problems("synthetic:test:200", seed=1)) <= 80
    bad_specs = ("synthetic:test:families=comb,dice", "synthetic:test:families=", "synthetic:test:5:6")
    for bad in (*bad_specs, "synthetic:test:easy=1.5", "synthetic:test:easy=x", "synthetic:test:easy=0.5:easy=0.2"):
        with pytest.raises(DataError, match="bad synthetic spec"):
            load_problems(bad)


def test_configured_fields_with_dotted_paths(tmp_path):
    rows = [{"meta": {"uid": "a1"}, "body": {"text": "1+1?"}, "sol": [{"final": 2}]}]
    f = _write_jsonl(tmp_path / "custom.jsonl", rows)
    with pytest.raises(DataError, match="custom.jsonl row 0: no question field"):
        load_problems(f)  # nothing to detect
    fields = FieldNames(question="body.text", answer="sol.0.final", id="meta.uid")
    assert load_problems(f, fields=fields) == [Problem("custom/a1", "custom", "1+1?", "2")]
    with pytest.raises(DataError, match=r"custom.jsonl row 0: no field 'sol.1.final'"):
        load_problems(f, fields=FieldNames(question="body.text", answer="sol.1.final"))


def test_json_array_file_and_directory_of_parquet(tmp_path):
    f = tmp_path / "probs.json"
    f.write_text(json.dumps([{"problem": "a?", "answer": "1"}, {"problem": "b?", "answer": "2"}]))
    assert [p.question for p in load_problems(f)] == ["a?", "b?"]
    f.write_text(json.dumps([{"problem": "a?", "answer": "1"}, 3]))
    with pytest.raises(DataError, match=r"probs.json row 1: expected a JSON object"):
        load_problems(f)
    d = tmp_path / "pool"
    d.mkdir()
    for i, name in enumerate(["part-b.parquet", "part-a.parquet"]):
        pq.write_table(pa.table({"question": [f"q{i}?"], "answer": [str(i)]}), d / name)
    assert [p.question for p in load_problems(d)] == ["q1?", "q0?"]  # files in name order
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .arrow, .parquet or .jsonl files"):
        load_problems(tmp_path / "empty")


def test_empty_fields_are_their_own_error_class(tmp_path):
    f = _write_jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": ""}])
    with pytest.raises(EmptyField, match="e.jsonl row 0: empty answer"):
        load_problems(f)
