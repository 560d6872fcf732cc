"""Answer extraction, equivalence and reward: a table of real answer formats from the five benchmarks + pitfalls.

math-verify runs in a helper process started once per test session (about half a second); each row is milliseconds.
"""

import threading
import time

import pytest

from torl.config import RewardConfig
from torl.rl.grading import extract_boxed, is_equivalent, normalize_answer, parse_number, score

# (prediction as boxed by a model, gold as stored in the dataset, expected)
GRADING_TABLE = [
    # --- AIME24 (Qwen file: strings, 7 zero-padded) / AIME25 (ints) / torl parquet (unpadded strings)
    ("25", "025", True),
    ("025", "25", True),
    ("204", "204", True),
    ("73", "073", True),
    ("72", "073", False),
    ("204.0", "204", True),
    ("\\boxed{204}", "204", True),
    ("$204$", "204", True),
    ("2 0 4", "204", True),  # spaces inside a plain number
    ("1,000", "1000", True),  # thousands separator
    # --- AMC23 (integers stored as floats: 27.0)
    ("27", "27.0", True),
    ("27.0", "27", True),
    ("27.5", "27.0", False),
    ("\\frac{27}{1}", "27.0", True),
    ("3159", "3159.0", True),
    # --- MATH500
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("3", "\\left( 3, \\frac{\\pi}{2} \\right)", False),  # a tuple parses whole, not as its first element
    ("(\\frac{\\pi}{2}, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)", False),  # tuples are ordered
    ("p-q", "p - q", True),
    ("q - p", "p - q", False),
    ("\\frac{28}{6}", "\\frac{14}{3}", True),
    ("4\\frac{2}{3}", "\\frac{14}{3}", True),  # a mixed number
    ("Evelyn", "\\text{Evelyn}", True),
    ("\\text{Bob}", "\\text{Evelyn}", False),
    ("90", "90^\\circ", True),
    ("90^{\\circ}", "90^\\circ", True),
    ("\\sqrt{117}", "3\\sqrt{13}", True),
    ("3\\sqrt{12}", "3\\sqrt{13}", False),
    ("6 - 5i", "6 - 5i", True),
    ("7 - 5i", "6 - 5i", False),  # the bare-string pitfall: parse("6 - 5i") == [5] without $...$
    ("6-5i", "6 - 5i", True),
    ("5", "x=5", True),
    ("-2, 1", "1,-2", True),  # multiple answers: order-free
    ("1", "1,-2", False),  # one of two answers is not enough
    ("7, 5, 3", "3, 5, 7", True),
    ("\\frac{3}{2}", "\\frac32", True),  # \frac shorthand
    ("1.5", "\\frac{3}{2}", True),
    ("\\frac{4}{3}", "\\frac43", True),
    ("\\frac{5}{9}", "\\frac 59", True),
    ("0.34", "\\dfrac{17}{50}", True),
    ("(3,4]", "(3,4]", True),
    ("(3,4)", "(3,4]", False),  # interval ends matter
    ("[3,4]", "(3,4]", False),
    ("(2, \\infty)", "(2,\\infty)", True),
    ("10080", "10,\\!080", True),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100", True),
    ("32348", "\\$32,\\!348", True),
    ("864", "864 \\mbox{ inches}^2", True),
    ("5.4", "5.4 \\text{ cents}", True),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", True),
    ("C", "\\text{(C)}", True),
    ("\\text{(C)}", "\\text{(C)}", True),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", False),
    (
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        True,
    ),
    (
        "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}",
        "\\begin{pmatrix} -2 \\\\ -14 \\\\ 7 \\end{pmatrix}",
        False,
    ),
    ("(b+2)(a+5)", "(a+5)(b+2)", True),
    ("1 \\pm \\sqrt{19}", "1 \\pm \\sqrt{19}", True),
    ("x \\in [-2,7]", "x \\in [-2,7]", True),
    ("[-2,7]", "x \\in [-2,7]", True),
    ("0.0000672", ".0000672", True),
    ("6.72 \\times 10^{-5}", ".0000672", True),
    ("12\\pi", "12\\pi", True),
    ("12", "12\\pi", False),
    ("\\cot x", "\\cot x", True),
    ("\\tan x", "\\cot x", False),
    ("52_8", "52_8", True),
    # --- OlympiadBench (final_answer[0], with or without $, units in a separate field, multiple answers)
    ("2", "2", True),
    ("\\frac{1}{2(n+1)}", "$\\frac{1}{2 n+2}$", True),
    ("\\frac{1}{2n}", "$\\frac{1}{2 n+2}$", False),
    ("2^{1009}", "$2^{1009}$", True),
    ("2^{1008}", "$2^{1009}$", False),
    ("2(n-1)", "$2n-2$", True),
    ("(2,7,13),(1,8,19),(4,5,7)", "$(1,8,19), (2,7,13), (4,5,7)$", True),
    ("(1,8,19),(2,7,13)", "$(1,8,19), (2,7,13), (4,5,7)$", False),
    ("84, 69", "$69$,$84$", True),
    ("69", "$69$,$84$", False),
    ("1, 3, 5", "1,3,5", True),
    ("1, 3", "1,3,5", False),
    ("0,2,-2", "$-2,0,2$", True),
    ("2x", "$f(x)=2 x$", True),
    ("f(x) = 2x", "$f(x)=2 x$", True),
    ("f(x)=x", "$f(x)=2 x$", False),
    ("45 \\text{ minutes}", "45", True),  # unit "minute" in the unit field
    ("45 minutes", "45", True),
    ("166 cm^2", "$166$", True),  # unit "$cm^2$"
    ("\\frac{600}{7} \\text{ km/h}", "$\\frac{600}{7}$", True),
    ("4.2\\%", "4.2", True),  # unit "%"
    ("(-\\infty, 0) \\cup \\{1\\}", "$(-\\infty, 0) \\cup\\{1\\}$.", True),
    ("(-\\infty, 0)", "$(-\\infty, 0) \\cup\\{1\\}$.", False),
    ("[0.5, 8]", "$[\\frac{1}{2}, 8]$", True),
    ("(0.5, 8)", "$[\\frac{1}{2}, 8]$", False),
    ("(-\\frac12, \\frac72)", "$(-\\frac{1}{2}, \\frac{7}{2})$", True),
    ("\\binom{2n}{n}", "$\\binom{2n}{n}$", True),
    ("(3,2),(-3,2),(3,-2),(-3,-2)", "$(3,2),(-3,2),(3,-2),(-3,-2)$", True),
    ("(3,2),(-3,2)", "$(3,2),(-3,2),(3,-2),(-3,-2)$", False),
    # --- pitfalls and junk
    ("", "5", False),
    ("   ", "5", False),
    ("x", "5", False),
    ("2 x", "2", False),  # a one-letter "unit" is not dropped
    ("2\\pi", "2", False),
    ("5", "", False),
]


@pytest.mark.parametrize("pred, gold, expected", GRADING_TABLE)
def test_grading_table(pred, gold, expected):
    assert is_equivalent(pred, gold, timeout_s=5.0) is expected


def test_grading_table_is_large_and_covers_every_benchmark():
    assert len(GRADING_TABLE) >= 60


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\left\\{ 1, 2 \\right\\}"),  # escaped braces do not count
        ("\\boxed{a^{b^{c^{d}}}}", "a^{b^{c^{d}}}"),  # deeper than ToRL's 3-level regex
        ("\\boxed 5 is it", "5"),  # no braces
        ("$\\boxed 42$", "42"),
        ("\\fbox{7}", "7"),
        ("\\boxed{ 12 }", "12"),
        ("\\boxed{3} and a cut-off \\boxed{4", "3"),  # an unclosed box does not count
        ("no box here", None),
        ("\\boxed{}", ""),
        ("\\boxedx{3}", None),
        ("```output\n\\boxed{9}\n```\n", "9"),  # ToRL reads boxes inside tool output too
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "s, expected",
    [
        ("025", 25),
        ("-3.50", -3.5),
        ("1,000", 1000),
        ("\\frac{3}{4}", 0.75),
        ("\\frac34", 0.75),
        ("3/4", 0.75),
        ("1e3", 1000),
        ("27.0", 27),
        ("1, 350", None),
        ("x", None),
        ("1e999999999", None),
        ("\\frac{1}{0}", None),
    ],
)
def test_parse_number(s, expected):
    value = parse_number(s)
    assert (value is None) if expected is None else (value == pytest.approx(expected))


def test_normalize_answer():
    assert normalize_answer(" $\\dfrac{1}{2}$. ") == "\\frac{1}{2}"
    assert normalize_answer("\\text{east}") == "east"
    assert normalize_answer("10,\\!080") == "10,080"


@pytest.mark.parametrize("pred", ["9^{9^{9^{9}}}", "1000000!"])
def test_pathological_answers_time_out_as_wrong(pred):
    t0 = time.monotonic()
    assert is_equivalent(pred, "5", timeout_s=0.3) is False
    assert time.monotonic() - t0 < 10.0  # the deadline + a helper restart on a loaded machine


def test_grading_still_works_after_a_timeout():
    assert is_equivalent("9^{9^{9^{9}}}", "5", timeout_s=0.3) is False
    assert is_equivalent("\\sqrt{117}", "3\\sqrt{13}", timeout_s=5.0) is True


def test_huge_answer_is_wrong_fast():
    t0 = time.monotonic()
    assert is_equivalent("x+" * 5000 + "1", "5", timeout_s=5.0) is False
    assert time.monotonic() - t0 < 0.5


def test_works_outside_the_main_thread():
    results = []

    def run():
        results.append(is_equivalent("\\frac{1}{2(n+1)}", "$\\frac{1}{2 n+2}$", timeout_s=5.0))
        results.append(is_equivalent("9^{9^{9^{9}}}", "5", timeout_s=0.5))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [True, False, True, False] or sorted(results) == [False, False, True, True]


CFG = RewardConfig()
PENALTY = RewardConfig(exec_error_penalty=0.5)
COMPAT_PENALTY = RewardConfig(exec_error_penalty=0.5, compat_penalty_without_code=True)


@pytest.mark.parametrize(
    "text, cfg, attempted, failed, expected",
    [
        ("so \\boxed{25}", CFG, False, False, (1.0, True)),
        ("so \\boxed{24}", CFG, False, False, (-1.0, False)),
        ("so 25", CFG, False, False, (-1.0, False)),  # no box is wrong
        ("so \\boxed{25}", CFG, True, True, (1.0, True)),  # penalty off by default (ToRL)
        ("so \\boxed{25}", PENALTY, True, True, (0.5, True)),  # failed code
        ("so \\boxed{24}", PENALTY, True, True, (-1.5, False)),
        ("so \\boxed{25}", PENALTY, True, False, (1.0, True)),  # code ran fine
        ("so \\boxed{25}", PENALTY, False, False, (1.0, True)),  # no code: no penalty
        ("so \\boxed{25}", COMPAT_PENALTY, False, False, (0.5, True)),  # ToRL charged code-free responses too
        ("so \\boxed{25}", RewardConfig(correct=2.0, wrong=0.0), False, False, (2.0, True)),
    ],
)
def test_score(text, cfg, attempted, failed, expected):
    assert score(text, "025", cfg, attempted_code=attempted, code_failed=failed) == expected


def test_overlong_penalty_follows_dapo_at_the_boundaries():
    from torl.rl.grading import overlong_penalty

    # L_max 3072, L_cache 512: no penalty up to 2560 tokens, linear to -1 at 3072, -1 beyond (cut off).
    assert overlong_penalty(2560, 3072, 512) == 0.0
    assert overlong_penalty(2561, 3072, 512) == pytest.approx(-1 / 512)
    assert overlong_penalty(2816, 3072, 512) == pytest.approx(-0.5)
    assert overlong_penalty(3072, 3072, 512) == pytest.approx(-1.0)
    assert overlong_penalty(3073, 3072, 512, penalty=0.5) == -0.5
    assert overlong_penalty(5000, 3072, 0) == 0.0  # off
