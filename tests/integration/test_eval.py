"""jobs/eval.py end to end on a tiny random model: real Ray, vLLM, sandbox and grader; result files; resume."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from jobs import eval as eval_job  # noqa: E402

RECORD_KEYS = {"benchmark", "problem_id", "sample", "prompt", "response", "extracted", "gold", "correct", "tool_calls"}


@pytest.fixture(scope="module")
def argv(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return out, [
        "--checkpoint", str(tiny_model_dir),
        "--benchmarks", "aime24,synthetic:test",
        "--out", str(out),
        "model.max_model_len=1024",
        "prompt.max_prompt_tokens=192",
        "rollout.max_response_tokens=48",
        "rollout.engine.max_num_seqs=16",
        "sandbox.num_workers=1",
        "eval.chunk_size=2",
        "eval.max_in_flight=2",
        "wandb.mode=disabled",
    ]  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_writes_results_and_resumes(ray_cluster, argv):
    """One evaluation, greedy and sampled (eval.n adds sampled responses to the greedy one, SimpleTIR's avg@k, k kept
    tiny here): both decodings stored, the table has avg@2 and pass@k beside acc, results.json records the sampling
    settings; then a rerun and a smaller slice come from the file without generating."""
    out, args = argv
    args = [*args, "eval.n=2", "eval.temperature=0.9", "eval.top_p=0.8"]
    first = eval_job.main([*args, "eval.limit=3"])
    assert first["run"]["generated_problems"] == 12  # 6 problems x (greedy pass + sampled pass)

    records = lines(out / "trajectories.jsonl")
    assert len(records) == 6 + 12
    assert all(RECORD_KEYS <= r.keys() for r in records)
    by_decoding = {d: [r for r in records if r["decoding"] == d] for d in ("greedy", "sampled")}
    greedy, sampled = by_decoding["greedy"], by_decoding["sampled"]
    keys = {(r["benchmark"], r["problem_id"]) for r in greedy}
    assert len(greedy) == 6 and len(keys) == 6 and sum(b == "aime24" for b, _ in keys) == 3
    assert len(sampled) == 12 and {(r["benchmark"], r["problem_id"]) for r in sampled} == keys
    assert {r["sample"] for r in sampled} == {0, 1}
    assert all(r["prompt"].endswith("Assistant:\n") and r["gold"] for r in records)
    assert all(len(r["response_ids"]) <= 48 and isinstance(r["correct"], bool) for r in records)

    results = json.loads((out / "results.json").read_text())
    rows = results["benchmarks"]
    assert {"aime24", "synthetic:test"} <= set(rows)
    assert all(r.startswith("synthetic:test[synthetic/") for r in set(rows) - {"aime24", "synthetic:test"})  # families
    assert rows["aime24"]["problems"] == 3 and rows["synthetic:test"]["problems"] == 3
    assert 0.0 <= rows["aime24"]["acc"] <= 1.0 and "response/length_mean" in rows["aime24"]
    for name in ("aime24", "synthetic:test"):
        assert {"acc", "avg@2", "pass@1", "pass@2"} <= rows[name].keys()
        mine = [r["correct"] for r in sampled if r["benchmark"] == name]
        assert rows[name]["avg@2"] == pytest.approx(sum(mine) / len(mine)), name
    assert results["average"]["over"] == ["aime24"]  # the synthetic split is not one of ToRL's five
    assert results["average_all"]["over"] == ["aime24", "synthetic:test"]
    table = (out / "results.txt").read_text()
    assert "aime24" in table and "sampled: n = 2 per problem, temperature 0.9, top_p 0.8" in table
    assert json.loads((out / "run.json").read_text())["greedy"] is True
    setup = results["setup"]
    assert [setup[k] for k in ("greedy", "n", "temperature", "top_p", "top_k")] == [True, 2, 0.9, 0.8, -1]
    health = results["sandbox_health"]  # the same health as training's gate, over the evaluation's calls
    assert health["probe"] == "passed" and health["level"] == "ok" and health["sandbox_failures"] == 0

    # A finished evaluation reruns without generating anything (no actors started) and reports the same table;
    # a smaller slice is scored from the same file. (Torn-line recovery is covered in tests/unit/test_evaluation.py.)
    before = (out / "trajectories.jsonl").read_bytes()
    again = eval_job.main([*args, "eval.limit=3"])
    assert again["run"]["generated_problems"] == 0
    assert (out / "trajectories.jsonl").read_bytes() == before
    assert again["benchmarks"]["aime24"] == rows["aime24"]
    assert again["sandbox_health"]["probe"] == "not run (resumed)"
    fewer = eval_job.main([*args, "eval.limit=2"])
    assert fewer["run"]["generated_problems"] == 0 and fewer["benchmarks"]["aime24"]["problems"] == 2

    # Resuming into the same directory with another setup would mix two evaluations in one table.
    with pytest.raises(eval_job.ConfigError, match="different evaluation setup"):
        eval_job.main([*args, "eval.limit=3", "tool.max_calls=2"])
