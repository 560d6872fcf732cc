"""jobs/prepare_data.py end to end on small fixture files (no Ray): three source formats, every filter, the output the
training loader reads, the rejects file, the summary, LIMR selection from a reward log and pass-rate balancing; the
templated prompt length, decontamination against every evaluation set, and the shared preset's output."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from jobs.prepare_data import main  # noqa: E402
from torl.data.problem_rewards import record_problem_rewards  # noqa: E402
from torl.data.problems import Problem, load_problems  # noqa: E402
from torl.data.prompts import build_prompt  # noqa: E402
from torl.prepare.config import load_prepare_config  # noqa: E402
from torl.prepare.pipeline import (  # noqa: E402
    Item,
    Ledger,
    count_prompt_tokens,
    drop_contaminated,
    filter_each,
    too_long,
)
from torl.rollout.types import Trajectory  # noqa: E402

TOKENIZER = REPO / "models" / "torl-tiny-base"  # shipped with the repository
EVAL_PROBLEM = "Let $ABCD$ be a square of side 7. Point $E$ lies on $CD$ with $DE=2$. Find the area of triangle $ABE$."
_MARBLES = (
    "A bag holds {} red, 5 blue and 4 green marbles, all of the same size and weight. Two marbles are drawn at random,"
    " one after the other, without replacement. In how many ways can both drawn marbles be {}?"
)
PLAIN = _MARBLES.format(3, "red")
SIMILAR = _MARBLES.format("three", "red")  # one word changed: a near duplicate
VARIANT = _MARBLES.format(3, "green")  # the same wording, another problem
LONG = "Consider the sequence defined by $a_1 = 1$ and $a_{n+1} = a_n + n$ for every positive integer $n$. " * 12 + "?"

POOL = [  # (question, answer, the filter that drops it or None)
    ("What is $2+3$?", "5", None),
    ("Prove that $\\sqrt{2}$ is irrational.", "Proof", "proof"),
    ("Which is prime? (A) 4 (B) 6 (C) 7 (D) 8", "7", "multiple_choice"),
    ("What is $1+1$?", "", "empty"),
    ("Compute $x$ when $2x = 1$.", "\\frac{1}{2", "unverifiable"),
    (LONG, "67", "too_long"),
    ("What is $2 + 3$ ?", "5", "duplicate"),
    (EVAL_PROBLEM.replace("side 7", "side length 7"), "49/2", "contaminated"),
    (PLAIN, "3", None),
    ("Find the remainder when $7^{100}$ is divided by 5.", "1", None),
]
EXTRA = [  # jsonl with its own field names
    {"uid": "x1", "body": {"text": SIMILAR}, "sol": {"final": 3}, "drop": "near_duplicate"},
    {"uid": "x2", "body": {"text": VARIANT}, "sol": {"final": 6}, "drop": None},  # another answer: another problem
    {"uid": "x3", "body": {"text": "How many positive divisors does 36 have?"}, "sol": {"final": 9}, "drop": None},
]
ARROW = [{"problem": "Evaluate $\\lfloor 3.7 \\rfloor + \\lceil 2.1 \\rceil$.", "answer": "6"}]


def write_sources(tmp: Path) -> Path:
    pool = tmp / "pool.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "data_source": "fixture",
                    "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": q}],
                    "ability": "math",
                    "reward_model": {"ground_truth": a, "style": "rule"},
                }
                for q, a, _ in POOL
            ]
        ),
        pool,
    )
    (tmp / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EXTRA))
    arrow_dir = tmp / "saved" / "train"
    arrow_dir.mkdir(parents=True)
    table = pa.Table.from_pylist(ARROW)
    with ipc.new_stream(str(arrow_dir / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (tmp / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')  # a DatasetDict, as LIMR's
    (tmp / "bench.jsonl").write_text(json.dumps({"problem": EVAL_PROBLEM, "answer": "49/2"}) + "\n")
    preset = tmp / "preset.yaml"
    preset.write_text(
        f"""
sources:
  - path: {pool}
    name: pool
  - path: {tmp / "extra.jsonl"}
    name: extra
    question_field: body.text
    answer_field: sol.final
    id_field: uid
  - path: {tmp / "saved"}
filters:
  tokenizer: {TOKENIZER}
  max_prompt_tokens: {prompt_limit()}
decontamination:
  against: [aime24, {tmp / "bench.jsonl"}]  # the copy is in the second set
output:
  path: {tmp / "out" / "train.parquet"}
  rejects: true
"""
    )
    return preset


def prompt_limit() -> int:
    """Room for every fixture prompt but the long one, in the shipped tokenizer's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    normal = max(len(tok(build_prompt(q), add_special_tokens=False)["input_ids"]) for q, _, why in POOL if q != LONG)
    assert len(tok(build_prompt(LONG), add_special_tokens=False)["input_ids"]) > normal + 20
    return normal + 10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepare")
    preset = write_sources(tmp)
    assert main([str(preset)]) == 0
    return tmp, preset


def test_every_filter_drops_its_row_and_the_rest_is_kept(prepared):
    tmp, _ = prepared
    out = tmp / "out"
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_stage = {}
    for r in rejects:
        by_stage.setdefault(r["stage"], []).append(r)
    expected = {why for _, _, why in POOL if why} | {r["drop"] for r in EXTRA if r["drop"]}
    assert set(by_stage) == expected
    assert all(len(v) == 1 for v in by_stage.values())
    assert by_stage["contaminated"][0]["detail"].startswith("copy of bench/0 (0.9")
    assert "similar to" in by_stage["near_duplicate"][0]["detail"]
    assert "pool.parquet row 0" in by_stage["duplicate"][0]["detail"]
    assert by_stage["empty"][0]["origin"].endswith("pool.parquet row 3")

    summary = json.loads((out / "summary.json").read_text())
    read = sum(s["rows"] for s in summary["sources"].values())
    assert read == len(POOL) + len(EXTRA) + len(ARROW)
    assert read == summary["rows"] + sum(f["total"] for f in summary["filters"].values())  # nothing silently lost
    assert summary["sources"]["saved"]["kept"] == 1  # a save_to_disk source is named after its directory
    assert summary["decontamination"]["bench.jsonl"] == {"problems": 1, "similar": 1, "copies": 1}
    assert summary["decontamination"]["aime24"]["similar"] == 0
    assert summary["answer_types"]["integer"] == summary["rows"]
    assert "prepared 6 problems" in (out / "summary.txt").read_text()


def test_output_is_what_torl_and_verl_read(prepared):
    tmp, _ = prepared
    path = tmp / "out" / "train.parquet"
    problems = load_problems(path)  # the training job's loader
    questions = [p.question for p in problems]
    assert questions == [POOL[0][0], PLAIN, POOL[9][0], VARIANT, EXTRA[2]["body"]["text"], ARROW[0]["problem"]]
    assert [p.answer for p in problems] == ["5", "3", "1", "6", "9", "6"]
    assert {p.source for p in problems} == {"pool", "extra", "saved"}
    table = pq.read_table(path)
    torl_schema = pq.read_schema(REPO.parent / "shared" / "data" / "torl" / "test.parquet")
    for column in ("data_source", "prompt", "ability"):
        assert table.schema.field(column).type == torl_schema.field(column).type
    row = table.slice(0, 1).to_pylist()[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["reward_model"] == {"ground_truth": "5", "style": "rule"}
    assert set(row["extra_info"]) == {"id", "split", "index", "origin"} and row["extra_info"]["split"] == "train"


def test_ids_are_stable_across_runs(prepared, tmp_path):
    tmp, preset = prepared
    again = tmp_path / "again.parquet"
    assert main([str(preset), f"output.path={again}", "output.rejects=false"]) == 0
    assert [p.id for p in load_problems(again)] == [p.id for p in load_problems(tmp / "out" / "train.parquet")]
    assert not (tmp_path / "rejects.jsonl").exists()


def test_limr_selection_and_pass_rate_balancing(prepared, tmp_path):
    tmp, preset = prepared
    ids = [p.id for p in load_problems(tmp / "out" / "train.parquet")]
    run = tmp_path / "run"
    correct = {
        ids[0]: [0, 2, 4],
        ids[1]: [4, 4, 4],
        ids[2]: [0, 0, 0],
    }  # of 4 samples at steps 1-3: only ids[0] learns
    for step in (1, 2, 3):
        trajs = [Trajectory(pid, 0, [1], correct=i < c[step - 1]) for pid, c in correct.items() for i in range(4)]
        record_problem_rewards(run, step, trajs)
    out = tmp_path / "limr.parquet"
    assert main([str(preset), f"limr.rewards={run}", f"output.path={out}"]) == 0
    assert [p.id for p in load_problems(out)] == [ids[0]]  # LIMR score 21/29 (tests/unit/test_limr.py); others 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["filters"]["limr"]["total"] == 5 and summary["limr"]["scored"] == 3  # 3 never sampled: dropped

    rates = tmp_path / "eval"
    rates.mkdir()
    rows = [{"problem_id": pid, "pass_rate": r} for pid, r in zip(ids, [1.0, 0.0, 0.25, 0.5, 0.75, 0.5], strict=True)]
    (rates / "pass_rates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "balanced.parquet"
    assert main([str(preset), f"balance.pass_rates={rates}", "balance.bins=2", f"output.path={out}"]) == 0
    kept = [p.id for p in load_problems(out)]
    assert ids[0] not in kept and ids[1] not in kept and len(kept) == 2  # one per difficulty bin


def test_errors_name_the_file_and_row(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "1"}\n{"text": "no fields"}\n')
    assert main([f"sources=[{{path: {bad}}}]", f"output.path={tmp_path / 'o.parquet'}"]) == 2
    assert "bad.jsonl row 1: no question field" in capsys.readouterr().err
    bad.write_text('{"question": "q?", "answer": "1"}\n{oops\n')
    assert main([f"sources=[{{path: {bad}}}]"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["filters.near_duplicate_threshold=2"]) == 2
    assert "config error" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "question_field" in capsys.readouterr().out


def _items(problems: list[tuple[str, str]]) -> list[Item]:
    return [Item(Problem(f"t/{i}", "t", q, a), "t", f"t row {i}", q) for i, (q, a) in enumerate(problems)]


def test_prompt_length_is_the_templated_prompts(tmp_path):
    """The length filter counts the prompt the training job builds (filters.template), not the bare question."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    question = POOL[9][0]
    for template in ("tir_base_0309", "tir_base_0307"):
        cfg = load_prepare_config(
            [], ["sources=[{path: x}]", f"filters.tokenizer={TOKENIZER}", f"filters.template={template}"]
        )
        items = _items([(question, "1")])
        count_prompt_tokens(items, cfg)
        assert items[0].prompt_tokens == len(
            tok(build_prompt(question, template), add_special_tokens=False)["input_ids"]
        )
    assert len(tok(build_prompt(question, "tir_base_0307"))["input_ids"]) != len(
        tok(build_prompt(question))["input_ids"]
    )
    assert items[0].prompt_tokens > 3 * len(tok(question)["input_ids"])  # the template's instruction dominates


def test_prompt_length_limit_is_inclusive(tmp_path):
    """filters.max_prompt_tokens is the longest prompt kept (ToRL keeps a prompt of exactly max_prompt_length - 10)."""
    question = POOL[9][0]
    cfg = load_prepare_config([], ["sources=[{path: x}]", f"filters.tokenizer={TOKENIZER}"])
    items = _items([(question, "1")])
    count_prompt_tokens(items, cfg)
    n = items[0].prompt_tokens
    assert filter_each("too_long", items, Ledger(["t"]), lambda it: too_long(it, n)) == items
    ledger = Ledger(["t"])
    assert filter_each("too_long", items, ledger, lambda it: too_long(it, n - 1)) == []
    assert ledger.rejects[0]["detail"] == f"{n} prompt tokens > {n - 1}"


def test_decontamination_checks_every_set_and_only_copies(tmp_path):
    """A copy in the last of three evaluation sets is found; variants (a number changed, with the answer changed or
    not, or a word changed with the answer) are kept unless decontamination.keep_variants=false; problems sharing
    only MATH's factorial reminder stay unless boilerplate counts."""
    reminder = (
        "(Reminder: The number $n!$ is the product of the integers from 1 to $n$.  For example, "
        "$5!=5\\cdot 4\\cdot3\\cdot2\\cdot 1= 120$.)"
    )
    sets = {
        "a.jsonl": [("What is the largest prime factor of $97!$?  " + reminder, "97")],
        "b.jsonl": [("How many ordered pairs $(x,y)$ of positive integers satisfy $xy = 36$?", "9")],
        "c.jsonl": [
            ("How many integers are in the solution set of $|x-2|\\leq5.6$ ?", "11"),
            ("How many zeroes are at the end of $42!$ (42 factorial)?  " + reminder, "9"),
            # closer to pool row 0 than its copy c/0 is, but another problem: the copy must still be found
            ("How many integers are there in the solution set of $|x-2| \\leq 5.7$?", "11"),
        ],
    }
    for name, rows in sets.items():
        (tmp_path / name).write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in rows))
    pool = [
        ("How many integers are there in the solution set of $|x-2| \\leq 5.6$?", "11"),  # copy of c/0
        ("How many ordered pairs $(x,y)$ of positive integers satisfy $xy = 48$?", "10"),  # variant of b/0
        ("How many integers are in the solution set of $|x-3|\\leq5.6$ ?", "11"),  # variant of c/0, same answer
        ("In the prime factorization of $24!$, what is the exponent of $3$?  " + reminder, "9"),  # reminder only
        ("Find the square root of $\\dfrac{8!}{70}$.  " + reminder, "24"),  # reminder only
        ("How many even integers are in the solution set of $|x-2|\\leq5.6$ ?", "5"),  # same numbers, other answer
    ]
    against = "[" + ",".join(str(tmp_path / n) for n in sets) + "]"
    cases = [  # (overrides, dropped pool rows)
        ([], [0]),
        (["decontamination.keep_variants=false"], [0, 1, 2, 5]),
        (["decontamination.keep_variants=false", "decontamination.boilerplate_min_questions=0"], [0, 1, 2, 3, 4, 5]),
    ]
    for overrides, dropped in cases:
        cfg = load_prepare_config([], ["sources=[{path: x}]", f"decontamination.against={against}", *overrides])
        ledger = Ledger(["t"])
        kept = drop_contaminated(_items(pool), cfg, ledger)
        assert [it.problem.question for it in kept] == [q for i, (q, _) in enumerate(pool) if i not in dropped]
        assert ledger.rejects[0]["detail"].startswith("copy of c/")
        report = ledger.notes["decontamination"]
        assert report["c.jsonl"]["similar"] >= 2 and report["b.jsonl"]["similar"] == 1
        if not overrides:
            assert report["c.jsonl"] == {"problems": 3, "similar": 3, "copies": 1}
            assert report["b.jsonl"]["copies"] == 0 and report["a.jsonl"]["similar"] == 0
            assert ledger.rejects[0]["detail"] == "copy of c/0 (0.95), same answer and numbers"


@pytest.fixture(scope="module")
def shared_preset_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "train.parquet"
    assert main([str(REPO / "configs" / "data_math_hard_limr.yaml"), f"output.path={out}"]) == 0
    return out


@pytest.mark.slow  # the shared preset's whole pipeline: 30 s of set-up, where the rest of this module takes seconds
def test_shared_preset_output(shared_preset_output):
    """The preset's file: no null answer, none of the known copies, a data_source stock veRL's reward scores."""
    out = shared_preset_output
    table = pq.read_table(out).to_pylist()
    assert {r["data_source"] for r in table} == {"DigitalLearningGmbH/MATH-lighteval"}
    assert not any(r["reward_model"]["ground_truth"].strip().lower() in ("none", "null", "nan") for r in table)
    questions = {r["prompt"][1]["content"] for r in table}
    copies = [  # OlympiadBench 2791, MATH500 algebra/170 and prealgebra/1743 as the pool writes them
        "The four zeros of the polynomial $x^4 + jx^2 + kx + 225$ are distinct real numbers",
        "How many integers are there in the solution set of $|x-2| \\leq 5.6$?",
        "For how many two-digit prime numbers is the sum of its digits 8?",
    ]
    assert not [c for c in copies if any(q.startswith(c) for q in questions)]
    rejects = [json.loads(line) for line in (out.parent / "rejects.jsonl").read_text().splitlines()]
    contaminated = [r for r in rejects if r["stage"] == "contaminated"]
    assert all(r["detail"].endswith("same answer and numbers") for r in contaminated)
    assert all(any(r["question"].startswith(c) for r in contaminated) for c in copies)
    assert len(contaminated) == 11  # the pool's 11 copies of OlympiadBench and MATH500 problems, no variant
