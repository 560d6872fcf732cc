"""Synthetic tasks and traces: seeded, disjoint splits, correct answers, ToRL's exact frames."""

import random
from collections import Counter
from fractions import Fraction

import pytest

from torl.data import tasks
from torl.data.prompts import build_prompt


def _value(answer: str) -> Fraction:
    return Fraction(answer)  # "12", "-3/4": plain integers or a/b only


def test_make_split_is_deterministic_and_seed_dependent():
    a, b = tasks.make_split("train", 50, seed=3), tasks.make_split("train", 50, seed=3)
    assert a == b
    assert [p.id for p in a] != [p.id for p in tasks.make_split("train", 50, seed=4)]


def test_splits_are_disjoint_whatever_the_seeds():
    test_ids = {p.id for s in (0, 1) for p in tasks.make_split("test", 200, seed=s)}
    train_ids = {p.id for s in (0, 7) for p in tasks.make_split("train", 2000, seed=s)}
    assert test_ids and not test_ids & train_ids


def test_split_sizes_ids_unique_and_default_size():
    probs = tasks.make_split("test", None, seed=0)
    assert len(probs) == tasks.DEFAULT_SIZES["test"]
    assert len({p.id for p in probs}) == len(probs)
    assert all(p.source.startswith("synthetic/") for p in probs)


def test_bad_split_and_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown synthetic split"):
        tasks.make_split("validation", 5)
    with pytest.raises(ValueError, match="n must be"):
        tasks.make_split("train", -1)


def test_answers_are_plain_integers_or_reduced_fractions_and_code_prints_them():
    for t in tasks.make_tasks("train", 300, seed=5):
        assert "/" not in t.answer or _value(t.answer).denominator != 1
        assert str(_value(t.answer).numerator) in t.answer
        ok, out = tasks.run_code(t.code)
        assert ok and out == t.answer, (t.key, out)


def test_mix_of_families_and_levels():
    ts = tasks.make_tasks("train", 2000, seed=0)
    fams = Counter(t.family for t in ts)
    assert set(fams) == set(tasks.FAMILIES) and min(fams.values()) > 150
    easy = sum(t.level == "easy" for t in ts) / len(ts)
    assert 0.15 < easy < 0.4


def test_trace_kinds_frames_and_independence_from_task_type():
    rng = random.Random(0)
    ts = tasks.make_tasks("train", 3000, seed=0, unique=False)
    traces = [(t, *tasks.make_trace(t, rng)) for t in ts]
    kinds = Counter(k for *_, k in traces)
    code_share = (kinds["code"] + kinds["bug"]) / len(traces)
    assert 0.35 < code_share < 0.45 and 0.02 < kinds["bug"] / len(traces) < 0.06
    for level in ("easy", "hard"):  # same code rate on easy and hard items: the decision carries no task info
        sub = [k for t, _, _, k in traces if t.level == level]
        assert abs(sum(k != "text" for k in sub) / len(sub) - code_share) < 0.05
    for t, prompt, response, kind in traces[:300]:
        assert prompt == build_prompt(t.question, "tir_base_0309")
        if kind == "text":
            assert "```" not in response
        else:
            assert response.count("```python\n") == 1 and response.count("\n```\n```output\n") == 1
            obs = response.split("```output\n", 1)[1].split("\n```\n", 1)[0]
            if kind == "code":
                assert obs == t.answer and response.endswith(f"\\boxed{{{t.answer}}}.")
            else:
                assert obs.split(":")[0] in ("NameError", "SyntaxError")
        assert response.count("\\boxed{") == 1


def test_text_answers_right_on_easy_mostly_wrong_on_hard():
    rng = random.Random(1)
    right = {"easy": [], "hard": []}
    for t in tasks.make_tasks("train", 3000, seed=2, unique=False):
        response, kind = tasks.make_response(t, rng, code_frac=0.0)
        boxed = response.rsplit("\\boxed{", 1)[1].split("}")[0]
        right[t.level].append(boxed == t.answer)
    assert all(right["easy"])
    assert 0.05 < sum(right["hard"]) / len(right["hard"]) < 0.2


def test_run_code_reports_the_real_last_error_line():
    assert tasks.run_code("print(6 * 7)") == (True, "42")
    assert tasks.run_code("print(x)") == (False, "NameError: name 'x' is not defined")
    ok, err = tasks.run_code("print 3)")
    assert not ok and err.startswith("SyntaxError")


@pytest.mark.parametrize("kind", tasks.REALISTIC_BUGS)
def test_realistic_bugs_fail_with_the_interpreters_error_and_their_fix_prints_the_answer(kind):
    expected = {
        "typo": "NameError: name 're",
        "missing_import": "NameError: name '",
        "off_by_one": "IndexError: list index out of range",
        "int_division": "TypeError: slice indices must be integers",
    }[kind]
    rng = random.Random(3)
    fitting = [t for t in tasks.make_tasks("train", 600, seed=4) if kind in tasks.bug_kinds(t)]
    assert {t.family for t in fitting} == {
        "typo": set(tasks.FAMILIES),
        "missing_import": {"lin", "comb", "frac"},
        "off_by_one": {"sum"},
        "int_division": {"sum"},
    }[kind]
    for t in fitting[:40]:
        bad, fixed = tasks.realistic_bug(t, kind, rng)
        ok, err = tasks.run_code(bad)
        assert not ok and err.startswith(expected), (t.key, bad, err)
        assert tasks.run_code(fixed) == (True, t.answer)
    with pytest.raises(ValueError, match="does not fit"):
        tasks.realistic_bug(
            next(t for t in tasks.make_tasks("train", 50, seed=4) if t.family == "mul"), "off_by_one", rng
        )


def test_realistic_traces_fix_after_the_error_or_guess():
    rng = random.Random(5)
    ts = tasks.make_tasks("train", 2000, seed=6, unique=False)
    kw = {"code_frac": 1.0, "bug_frac": 0.8, "fix_frac": 0.4, "bug_style": "realistic"}
    traces = [(t, *tasks.make_response(t, rng, **kw)) for t in ts]
    kinds = Counter(k for *_, k in traces)
    assert abs(kinds["fix"] / len(ts) - 0.8 * 0.4) < 0.04 and abs(kinds["bug"] / len(ts) - 0.8 * 0.6) < 0.04
    for t, response, kind in traces[:300]:
        blocks = response.split("```python\n")[1:]
        outputs = [part.split("\n```\n", 1)[0] for part in response.split("```output\n")[1:]]
        assert len(blocks) == len(outputs) == {"code": 1, "bug": 1, "fix": 2}[kind]
        if kind != "code":
            assert outputs[0].split(":")[0] in ("NameError", "IndexError", "TypeError")  # the real error line
        if kind == "fix":
            assert f"{outputs[0]}\n```\n{tasks.FIX_LINE}\n```python\n" in response and outputs[1] == t.answer
        if kind == "bug":
            assert tasks.GUESS_LINE in response
        else:
            assert response.endswith(f"\\boxed{{{t.answer}}}.")
    with pytest.raises(ValueError, match="fix_frac needs"):
        tasks.make_response(ts[0], rng, fix_frac=0.5)


def test_easy_code_frac_sets_the_code_share_on_easy_items_only():
    """easy_code_frac (the selective preset's base model): easy items write code at their own rate, hard items at
    code_frac; left unset, the traces are exactly those of code_frac alone (the shipped models' corpora) (#33)."""
    items = tasks.make_tasks("train", 2000, seed=4, unique=False)

    def code_share(level: str, **kw) -> float:
        rng = random.Random(7)
        kinds = [(t.level, tasks.make_response(t, rng, code_frac=0.5, **kw)[1]) for t in items]
        mine = [k for lv, k in kinds if lv == level]
        return sum(k != "text" for k in mine) / len(mine)

    assert abs(code_share("easy", easy_code_frac=0.1) - 0.1) < 0.05
    assert abs(code_share("hard", easy_code_frac=0.1) - 0.5) < 0.05
    plain, unset = random.Random(3), random.Random(3)
    assert [tasks.make_response(t, plain)[0] for t in items[:300]] == [
        tasks.make_response(t, unset, easy_code_frac=None)[0] for t in items[:300]
    ]
