"""Evaluation bookkeeping: records, the resumable JSONL store, pass@k, tables and ToRL's unweighted average."""

import json

import pytest

from torl.evaluation import (
    SAMPLED,
    EvalRecord,
    ResultStore,
    check_run_meta,
    default_ks,
    finished_keys,
    flat_metrics,
    format_table,
    pass_at_k,
    problem_pass_rates,
    read_pass_rates,
    sample_accuracy,
    summarize,
    write_pass_rates,
)
from torl.rollout.types import ToolCall, Trajectory


def rec(
    bench: str,
    pid: str,
    correct: bool,
    sample: int = 0,
    calls: int = 0,
    source: str = "",
    n_tok: int = 5,
    decoding: str = "greedy",
):
    tool_calls = [
        {"code": "print(2)", "observation": "2", "status": "ok", "exec_s": 0.1, "queue_s": 0.0} for _ in range(calls)
    ]
    return EvalRecord(
        benchmark=bench,
        problem_id=pid,
        sample=sample,
        source=source or bench,
        question="1+1?",
        prompt="User: 1+1?\nAssistant:\n",
        response="\\boxed{2}" if correct else "\\boxed{3}",
        extracted="2" if correct else "3",
        gold="2",
        correct=correct,
        reward=1.0 if correct else -1.0,
        finish_reason="eos",
        response_ids=list(range(n_tok)),
        loss_mask=[1] * n_tok,
        tool_calls=tool_calls,
        decoding=decoding,
    )


def test_record_roundtrip_through_trajectory():
    traj = Trajectory(
        problem_id="7",
        group=0,
        prompt_ids=[1],
        response_ids=[5, 6, 7],
        logprobs=[0.0] * 3,
        loss_mask=[1, 0, 1],
        versions=[0, -1, 0],
        tool_calls=[ToolCall("print(1)", "1", "ok", 0.2, 0.0)],
        finish_reason="length",
        text="```python\nprint(1)\n```\n```output\n1\n```\n",
        answer="1",
        reward=-1.0,
        correct=False,
    )
    r = EvalRecord.from_trajectory(traj, benchmark="b", sample=0, source="s", question="q", prompt="p", extracted=None)
    back = EvalRecord.from_dict(json.loads(json.dumps(r.__dict__))).to_trajectory()
    assert back.response_ids == traj.response_ids and back.loss_mask == traj.loss_mask
    assert back.tool_calls == traj.tool_calls
    assert (back.finish_reason, back.text, back.correct, back.reward) == ("length", traj.text, False, -1.0)


def test_from_dict_rejects_foreign_lines():
    with pytest.raises(ValueError, match="lacks"):
        EvalRecord.from_dict({"step": 3, "acc": 0.5})


def test_store_append_load_and_torn_line(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    assert store.load() == []
    store.append([rec("a", "1", True), rec("a", "2", False)])
    store.append([])
    with open(store.path, "a") as f:
        f.write('{"benchmark": "a", "problem_id": "3", "sam')  # killed mid-write
    loaded = store.load()
    assert [r.problem_id for r in loaded] == ["1", "2"]
    assert store.path.read_text().endswith("\n")  # torn tail cut, so the next append starts a clean line
    store.append([rec("a", "3", True)])
    assert [r.problem_id for r in store.load()] == ["1", "2", "3"]


def test_store_reports_corruption_in_the_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("not json\n" + json.dumps(rec("a", "1", True).__dict__) + "\n")
    with pytest.raises(ValueError, match="r.jsonl:1"):
        ResultStore(path).load()


def test_finished_keys_need_all_samples():
    records = [rec("a", "1", True, s) for s in range(4)] + [rec("a", "2", True, s) for s in range(2)]
    assert finished_keys(records, n=4) == {("a", "1")}
    assert finished_keys(records, n=1) == {("a", "1"), ("a", "2")}


def test_finished_keys_count_each_decoding_apart():
    # The greedy response of a problem does not stand in for its first sample, nor the other way round.
    records = [rec("a", "1", True)] + [rec("a", "2", True, s, decoding=SAMPLED) for s in range(2)]
    assert finished_keys(records, n=1) == {("a", "1")}
    assert finished_keys(records, n=2, decoding=SAMPLED) == {("a", "2")}
    assert finished_keys(records, n=1, decoding=SAMPLED) == {("a", "2")}


def test_run_meta_written_then_checked(tmp_path):
    meta = {"checkpoint": "/m", "greedy": True, "n": 1}
    check_run_meta(tmp_path / "meta.json", meta)
    check_run_meta(tmp_path / "meta.json", dict(meta))  # same setup resumes
    with pytest.raises(ValueError, match="greedy: True -> False"):
        check_run_meta(tmp_path / "meta.json", {**meta, "greedy": False})


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (4, 2, 1, 0.5), (4, 2, 2, 1 - 1 / 6), (4, 3, 2, 1.0), (10, 0, 5, 0.0)],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_bad_k():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_default_ks():
    assert default_ks(1) == (1,)
    assert default_ks(8) == (1, 2, 4, 8)
    assert default_ks(6) == (1, 2, 4, 6)


def test_summarize_greedy_average_is_unweighted_over_torl_benchmarks():
    records = [rec("aime24", str(i), i < 1) for i in range(4)]  # 25 %
    records += [rec("math500", str(i), i < 3, calls=1) for i in range(4)]  # 75 %
    records += [rec("synthetic:test", str(i), True) for i in range(2)]  # 100 %, not a ToRL benchmark
    s = summarize(records, ["aime24", "math500", "synthetic:test"], ks=(1,))
    rows = s["benchmarks"]
    assert rows["aime24"]["acc"] == 0.25 and rows["aime24"]["pass@1"] == 0.25 and rows["aime24"]["problems"] == 4
    assert rows["math500"]["tool/code_ratio"] == 1.0 and "acc/without_code" not in rows["math500"]
    assert s["average"] == {"acc": 0.5, "over": ["aime24", "math500"]}  # not weighted by problem count
    assert s["average_all"]["acc"] == pytest.approx((0.25 + 0.75 + 1.0) / 3)
    table = format_table(s)
    assert "aime24" in table and "25.0%" in table and "average" in table and "pass@1" in table
    flat = flat_metrics(s)
    assert flat["eval/average/acc"] == 0.5 and flat["eval/math500/acc"] == 0.75


def test_summarize_sampling_pass_and_avg_at_k_and_sources():
    records = [rec("torl_val", "x", s < 1, sample=s, source="aime24") for s in range(4)]  # 1 of 4 correct
    records += [rec("torl_val", "y", False, sample=s, source="math500") for s in range(4)]
    records.append(rec("torl_val", "y", True, sample=3, source="math500"))  # a rerun's record replaces sample 3
    s = summarize(records, ["torl_val"], ks=default_ks(4))
    row = s["benchmarks"]["torl_val"]
    assert row["acc"] == row["avg@4"] == pytest.approx(0.25)
    assert row["pass@1"] == pytest.approx(0.25) and row["pass@4"] == 1.0
    assert s["benchmarks"]["torl_val[aime24]"]["acc"] == 0.25
    assert s["benchmarks"]["torl_val[math500]"]["acc"] == 0.25
    assert "average" not in s  # torl_val itself is not one of the five
    assert s["average_all"]["over"] == ["torl_val"]


@pytest.mark.parametrize(
    ("correct", "avg", "pass2"),
    [
        # avg@n averages each problem's own share: (3/4 + 0/4 + 1/4) / 3, not the pooled 4/12 of a weighted mean
        # when counts differ, and pass@2 is 1 - C(n-c, 2)/C(n, 2) per problem: (1 + 0 + 1/2) / 3.
        ([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], 1 / 3, (1 + 0 + 0.5) / 3),
        ([[1, 1], [0, 1], [0, 0]], 0.5, (1 + 1 + 0) / 3),
    ],
)
def test_sample_accuracy_is_the_mean_of_per_problem_shares(correct, avg, pass2):
    groups = [[rec("b", str(i), bool(c), sample=s) for s, c in enumerate(cs)] for i, cs in enumerate(correct)]
    n = len(correct[0])
    got = sample_accuracy(groups, ks=(1, 2, n + 1))
    assert got == {f"avg@{n}": pytest.approx(avg), "pass@1": pytest.approx(avg), "pass@2": pytest.approx(pass2)}


def test_sample_accuracy_with_uneven_counts_names_the_smallest():
    groups = [[rec("b", "1", True, sample=s) for s in range(4)], [rec("b", "2", False, sample=s) for s in range(2)]]
    assert sample_accuracy(groups) == {"avg@2": 0.5}  # 4/4 and 0/2: each problem's own share, labelled by the fewest
    with pytest.raises(ValueError, match="no problems"):
        sample_accuracy([])


def test_greedy_and_sampled_side_by_side():
    # Two ToRL benchmarks, each with a greedy response and 4 samples per problem: the row keeps the greedy acc and
    # tool metrics, adds avg@4 and pass@k from the samples, and the average carries both.
    records = [rec("aime24", "1", True), rec("aime24", "2", False, calls=1)]
    records += [rec("aime24", "1", s < 3, sample=s, decoding=SAMPLED, calls=1) for s in range(4)]  # 3/4
    records += [rec("aime24", "2", s < 1, sample=s, decoding=SAMPLED, calls=2) for s in range(4)]  # 1/4
    records += [rec("amc23", "1", False)] + [rec("amc23", "1", False, sample=s, decoding=SAMPLED) for s in range(4)]
    s = summarize(records, ["aime24", "amc23"], ks=default_ks(4))
    row = s["benchmarks"]["aime24"]
    assert row["acc"] == 0.5 and row["problems"] == 2
    assert row["avg@4"] == pytest.approx(0.5) and row["pass@1"] == pytest.approx(0.5) and row["pass@4"] == 1.0
    assert row["pass@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert row["tool/code_ratio"] == 0.5  # greedy responses only (every sample used the tool)
    assert s["average"] == {"acc": 0.25, "avg@4": pytest.approx(0.25), "over": ["aime24", "amc23"]}
    flat = flat_metrics(s)
    assert flat["eval/average/avg@4"] == pytest.approx(0.25) and flat["eval/aime24/avg@4"] == pytest.approx(0.5)
    s["setup"] = {"max_calls": 1, "greedy": True, "n": 4, "temperature": 1.0, "top_p": 0.7, "top_k": -1, "seed": 3}
    lines = format_table(s).splitlines()
    header = lines[0].split()
    assert header[:5] == ["benchmark", "n", "acc", "avg@4", "pass@1"]
    assert lines[2].split()[:4] == ["aime24", "2", "50.0%", "50.0%"]
    assert next(line for line in lines if line.startswith("average ")).split()[:4] == [
        "average",
        "2",
        "25.0%",
        "25.0%",
    ]
    assert lines[-1] == "sampled: n = 4 per problem, temperature 1.0, top_p 0.7, top_k -1, seed 3"
    # Sampled only: acc is avg@n, the tool metrics come from the samples.
    only = summarize([r for r in records if r.decoding == SAMPLED], ["aime24"], ks=(1,))["benchmarks"]["aime24"]
    assert only["acc"] == only["avg@4"] == pytest.approx(0.5) and only["tool/code_ratio"] == 1.0


def test_pass_rates_come_from_the_samples_when_there_are_any():
    records = [rec("t", "a", True), rec("t", "b", False)]
    records += [rec("t", "a", s < 1, sample=s, decoding=SAMPLED) for s in range(4)]
    rows = {r["problem_id"]: r for r in problem_pass_rates(records)}
    assert (rows["a"]["decoding"], rows["a"]["pass_rate"], rows["a"]["samples"]) == (SAMPLED, 0.25, 4)
    assert (rows["b"]["decoding"], rows["b"]["pass_rate"]) == ("greedy", 0.0)


def test_benchmark_without_records_is_left_out():
    s = summarize([rec("aime24", "1", True)], ["aime24", "amc23"])
    assert list(s["benchmarks"]) == ["aime24"]


def test_eval_pass_rates_round_trip(tmp_path):
    records = [rec("train.parquet", "ds/a", c, sample=i) for i, c in enumerate([True, False, True, True])]
    records += [rec("train.parquet", "ds/b", False, sample=i) for i in range(4)]
    rows = problem_pass_rates(records)
    assert [(r["problem_id"], r["samples"], r["correct"], r["pass_rate"]) for r in rows] == [
        ("ds/a", 4, 3, 0.75),
        ("ds/b", 4, 0, 0.0),
    ]
    write_pass_rates(tmp_path / "pass_rates.jsonl", records)
    assert read_pass_rates(tmp_path) == {"ds/a": 0.75, "ds/b": 0.0}
    (tmp_path / "pass_rates.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="pass_rates.jsonl:1"):
        read_pass_rates(tmp_path)


def test_table_shows_recovery_effective_code_levels_and_budget():
    records = [rec("synthetic:test", "a", True, calls=1), rec("synthetic:test", "b", False)]
    records[0].response = "```python\nprint(2)\n```\n```output\n2\n```\n\\boxed{2}"
    records[0].tool_calls = [dict(records[0].tool_calls[0], status="error", observation="NameError")]
    records[0].tool_calls.append({"code": "print(2)", "observation": "2", "status": "ok", "exec_s": 0, "queue_s": 0})
    records[0].level, records[1].level = "hard", "easy"
    s = summarize(records, ["synthetic:test"], max_calls=2)
    row = s["benchmarks"]["synthetic:test"]
    assert row["tool/acc_first_failed"] == 1.0 and row["tool/effective_code_ratio"] == 1.0
    assert row["level/hard/acc"] == 1.0 and row["level/easy/acc"] == 0.0 and row["level/easy/code_ratio"] == 0.0
    assert row["tool/at_budget"] == 0.5
    s["setup"] = {"max_calls": 2}
    lines = format_table(s).splitlines()
    assert "eff_code" in lines[0] and "acc_fail1" in lines[0]
    hard = next(line for line in lines if line.strip().startswith("level hard")).split()
    assert hard[2:5] == ["1", "100.0%", "100.0%"]  # n, acc, code ratio of the hard level
    assert lines[-1] == "tool budget C = 2 calls per response"
    assert EvalRecord.from_dict(json.loads(json.dumps(records[0].__dict__))).level == "hard"
