"""Seeded synthetic math tasks where a Python tool truly helps, and ToRL-format traces to pretrain a base model on.

Six families (multiplication, remainders, sums of sequences, 2x2 linear systems, combinations, fraction sums),
each with an easy level (a small model can learn it by heart, so text-only answers are sometimes right) and a hard
level (multi-digit: only running code gives the exact answer). Answers are plain integers or ``a/b`` fractions.
Splits are disjoint by construction: a problem's split is a hash of its canonical parameters, so ``test`` never
shares a problem with ``train`` whatever the seeds and sizes.

Traces (``make_trace``) follow ToRL's tir_base_0309 prompt and observation frame: about 40% write a ```python block
and copy its real ```output into ``\\boxed{}``; the rest answer in text (right on easy items, usually a near miss on
hard ones); a few code traces carry a bug whose real error line is shown, then a guess. Whether a trace uses code is
drawn independently of the family and level, so the choice sits at the start of the response for RL to learn
(``easy_code_frac`` makes it depend on the level, for the selective-tool-use preset). ``bug_style="realistic"`` (the
error-recovery preset) writes bugs people make instead (a typo'd name, a missing import, an off-by-one index, ``/``
where ``//`` was meant), and after the interpreter's error either a second block that fixes the bug (share
``fix_frac``) or a guess: RL with two tool calls can then learn to repair.
Not here: tokenization and training (``torl.models.pretrain``), grading (``torl.rl.grading``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from math import comb

from torl.data.problems import Problem
from torl.data.prompts import build_prompt

SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 4096, "test": 256}
TEST_BUCKETS = 10  # one problem in TEST_BUCKETS (by parameter hash) belongs to the held-out split
TEMPLATE = "tir_base_0309"
EASY_FRAC = 0.3  # share of easy items in a split (the CPU default's data)


@dataclass(frozen=True)
class Task:
    """One generated problem with what is needed to write traces for it."""

    family: str
    level: str  # "easy" | "hard"
    key: str  # canonical parameters, e.g. "mul:4821,397"; decides the split
    question: str
    answer: str
    code: str  # a correct program that prints the answer
    reasoning: str  # a one-line text-only "derivation" with the placeholder {ans} for the stated answer

    def problem(self) -> Problem:
        return Problem(
            id=f"syn-{self.key}",
            source=f"synthetic/{self.family}",
            question=self.question,
            answer=self.answer,
            level=self.level,
        )


def _fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


# --- families: each takes (rng, hard) and returns a Task ---------------------------------------------------------
# Easy items are ones a small model can answer in text by a rule it can learn (copy a number, append zeros, a
# single-digit fact it saw under other parameters), so text-only answers on *unseen* held-out items are sometimes
# right. Hard items need exact multi-digit arithmetic: only the tool gets them right reliably. Their operands stay at
# 2-5 digits: a ~1M-parameter model learns to copy those into code within minutes of CPU training (7-digit
# operands were still miscopied after 450 steps).


def _task(family: str, hard: bool, key: str, question: str, answer: Fraction | int, code: str, why: str) -> Task:
    return Task(family, "hard" if hard else "easy", f"{family}:{key}", question, _fmt(answer), code, why)


def _mul(rng: random.Random, hard: bool) -> Task:
    if hard:
        a, b = rng.randint(100, 999), rng.randint(12, 99)
    else:  # a one-digit fact times a power of ten: 7 x 800
        a, b = rng.randint(2, 9), rng.randint(2, 9) * 10 ** rng.randint(1, 3)
    q = rng.choice(["What is ${a} \\times {b}$?", "Compute the product of {a} and {b}.", "Find ${a} \\cdot {b}$."])
    why = f"Multiplying {a} by {b} gives {{ans}}."
    return _task("mul", hard, f"{a},{b}", q.format(a=a, b=b), a * b, f"print({a} * {b})", why)


def _mod(rng: random.Random, hard: bool) -> Task:
    if hard:
        a, m = rng.randint(1000, 99_999), rng.randint(11, 97)
    else:  # the remainder is read off the last digit
        a, m = rng.randint(100, 999_999), rng.choice([2, 5, 10])
    q = rng.choice(["Find the remainder when {a} is divided by {m}.", "What is ${a} \\bmod {m}$?"])
    why = f"Dividing {a} by {m} leaves a remainder of {{ans}}."
    return _task("mod", hard, f"{a},{m}", q.format(a=a, m=m), a % m, f"print({a} % {m})", why)


def _sum(rng: random.Random, hard: bool) -> Task:
    if hard and rng.random() < 0.5:
        n = rng.randint(15, 60)
        q = f"What is the sum of the squares of the integers from 1 to {n}?"
        code = f"print(sum(k ** 2 for k in range(1, {n + 1})))"
        why = f"The sum of the squares up to {n} is {{ans}}."
        return _task("sum", hard, f"sq{n}", q, sum(k * k for k in range(1, n + 1)), code, why)
    if hard:
        a, d, n = rng.randint(2, 99), rng.randint(2, 19), rng.randint(12, 40)
    else:  # a constant sequence of 10 or 100 terms: append zeros
        a, d, n = rng.randint(2, 999), 0, rng.choice([10, 100])
    q = f"An arithmetic sequence starts at {a} and has common difference {d}. What is the sum of its first {n} terms?"
    code = f"print(sum({a} + {d} * k for k in range({n})))"
    why = f"The sum of the first {n} terms is {{ans}}."
    return _task("sum", hard, f"{a},{d},{n}", q, n * a + d * n * (n - 1) // 2, code, why)


def _signed(k: int, v: str, first: bool) -> str:
    mag = "" if abs(k) == 1 else str(abs(k))
    if first:
        return f"-{mag}{v}" if k < 0 else f"{mag}{v}"
    return f" - {mag}{v}" if k < 0 else f" + {mag}{v}"


def _lin(rng: random.Random, hard: bool) -> Task:
    if hard:
        while True:
            a, b, c, d = (rng.choice([k for k in range(-9, 10) if k]) for _ in range(4))
            if a * d - b * c:
                break
        x0, y0 = rng.randint(-20, 20), rng.randint(-20, 20)
        # shift the right-hand sides so that solutions are often fractions
        e, f = a * x0 + b * y0 + rng.randint(-3, 3), c * x0 + d * y0 + rng.randint(-3, 3)
    else:  # x + y = e and x - y = e: x is read off the equations
        a, b, c, d = 1, 1, 1, -1
        e = f = rng.randint(-60, 60)
    eq1, eq2 = _signed(a, "x", True) + _signed(b, "y", False), _signed(c, "x", True) + _signed(d, "y", False)
    q = f"Solve the system ${eq1} = {e}$ and ${eq2} = {f}$. What is the value of $x$?"
    code = (
        f"from fractions import Fraction\na, b, e = {a}, {b}, {e}\nc, d, f = {c}, {d}, {f}\n"
        "print(Fraction(e * d - b * f, a * d - b * c))"
    )
    why = "Eliminating $y$ from the two equations gives $x = {ans}$."
    return _task("lin", hard, f"{a},{b},{c},{d},{e},{f}", q, Fraction(e * d - b * f, a * d - b * c), code, why)


def _comb(rng: random.Random, hard: bool) -> Task:
    if hard:
        n, k = rng.randint(12, 30), rng.randint(3, 6)
    else:  # choosing 1 (or all but 1) of n: the answer is n
        n = rng.randint(3, 99)
        k = rng.choice([1, n - 1])
    q = rng.choice(
        [
            "In how many ways can {k} people be chosen from a group of {n} people?",
            "How many subsets with exactly {k} elements does a set with {n} elements have?",
        ]
    )
    code = f"from math import comb\nprint(comb({n}, {k}))"
    why = f"Choosing {k} out of {n} gives {{ans}} ways."
    return _task("comb", hard, f"{n},{k}", q.format(n=n, k=k), comb(n, k), code, why)


def _frac(rng: random.Random, hard: bool) -> Task:
    if hard:
        a, b, c, d = rng.randint(1, 40), rng.randint(7, 60), rng.randint(1, 40), rng.randint(7, 60)
    else:  # same denominator, numerators add to a one-digit number already in lowest terms
        while True:
            b = d = rng.randint(3, 11)
            a, c = rng.randint(1, 5), rng.randint(1, 5)
            if Fraction(a + c, b).denominator == b:
                break
    q = f"What is $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$? Give your answer as a fraction in lowest terms."
    code = f"from fractions import Fraction\nprint(Fraction({a}, {b}) + Fraction({c}, {d}))"
    why = f"Adding {a}/{b} and {c}/{d} gives {{ans}}."
    return _task("frac", hard, f"{a},{b},{c},{d}", q, Fraction(a, b) + Fraction(c, d), code, why)


FAMILIES: dict[str, Callable[[random.Random, bool], Task]] = {
    "mul": _mul,
    "mod": _mod,
    "sum": _sum,
    "lin": _lin,
    "comb": _comb,
    "frac": _frac,
}


def split_of(key: str) -> str:
    """The split a problem belongs to, from a stable hash of its parameters (independent of seeds)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def make_tasks(
    split: str,
    n: int | None,
    seed: int,
    easy_frac: float = EASY_FRAC,
    unique: bool = True,
    families: tuple[str, ...] | None = None,
) -> list[Task]:
    """``n`` tasks of ``split`` (families uniform, ``easy_frac`` easy), deterministic in ``seed``.

    ``unique=False`` allows repeats (pretraining corpora); every task still belongs to ``split``. ``families``
    draws from those families only (None: all of ``FAMILIES``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    n = DEFAULT_SIZES[split] if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= easy_frac <= 1.0:
        raise ValueError(f"easy_frac must be within [0, 1], got {easy_frac}")
    unknown = sorted(set(families or ()) - set(FAMILIES))
    if unknown or families == ():
        raise ValueError(f"unknown task families {unknown or '(none given)'}; choose from {sorted(FAMILIES)}")
    rng = random.Random(f"torl-tasks/{split}/{seed}")
    names = sorted(families or FAMILIES)
    tasks: list[Task] = []
    seen: set[str] = set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(f"could not draw {n} distinct {split} tasks (got {len(tasks)})")
        task = FAMILIES[rng.choice(names)](rng, rng.random() >= easy_frac)
        if (unique and task.key in seen) or split_of(task.key) != split:
            continue
        seen.add(task.key)
        tasks.append(task)
    return tasks


def make_split(
    split: str,
    n: int | None = None,
    seed: int = 0,
    families: tuple[str, ...] | None = None,
    easy_frac: float = EASY_FRAC,
) -> list[Problem]:
    """``n`` held-out (``test``) or training (``train``) problems; ``n=None`` gives the split's default size."""
    return [t.problem() for t in make_tasks(split, n, seed, easy_frac=easy_frac, families=families)]


# --- traces ------------------------------------------------------------------------------------------------------

CODE_OPENERS = ("Let me write a Python program to compute this.", "I will use Python to get the exact value.")
TEXT_OPENERS = ("Let me solve this step by step.", "Let me reason about this directly.")
BUGS = ("name", "import", "syntax")


def run_code(code: str) -> tuple[bool, str]:
    """Run our own trusted snippet in-process: (ok, stdout stripped) or (False, last line of the error)."""
    buf = io.StringIO()
    try:
        compiled = compile(code, "<string>", "exec")
        with contextlib.redirect_stdout(buf):
            exec(compiled, {"__name__": "__main__"})  # noqa: S102 - our own generated code, not model output
    except Exception as exc:  # the real error, as the sandbox would report it (ToRL keeps the last line)
        return False, traceback.format_exception_only(exc)[-1].strip()
    return True, buf.getvalue().strip()


def _near_miss(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one digit changed, or off by a little (what a model "computing in its head" says)."""
    if "/" in answer:
        num, den = answer.split("/")
        return f"{_near_miss(num, rng)}/{den}" if rng.random() < 0.6 else f"{num}/{_near_miss(den, rng).lstrip('-')}"
    value = int(answer)
    digits = str(abs(value))
    if len(digits) >= 2 and rng.random() < 0.7:
        i = rng.randrange(len(digits))
        choices = [c for c in "0123456789" if c != digits[i] and not (i == 0 and c == "0")]
        wrong = int(digits[:i] + rng.choice(choices) + digits[i + 1 :]) * (-1 if value < 0 else 1)
    else:
        wrong = value + rng.choice([-1, 1]) * rng.randint(1, max(2, abs(value) // 10))
    return str(wrong) if wrong != value else str(value + 1)


def _buggy(task: Task, kind: str) -> str:
    if kind == "import" and "import " in task.code:
        return "\n".join(line for line in task.code.splitlines() if "import " not in line)
    if kind == "syntax":
        return task.code.replace("print(", "print ", 1)
    return task.code.replace("print(", "print(result + ", 1) if "(" in task.code else "print(result)"


# --- realistic bugs (bug_style="realistic") -----------------------------------------------------------------------
# Each kind maps a task to (buggy program, fixed program); the fixed one prints the answer. Correct first attempts use
# the fixed program of a kind drawn the same way, so a buggy and a correct attempt share their form and part only at
# the bug itself (the model cannot tell from the first tokens of a program whether it will fail).
REALISTIC_BUGS = ("typo", "missing_import", "off_by_one", "int_division")
TYPOS = ("reslt", "resutl")
FIX_LINE = "Let me fix the error and run it again."
GUESS_LINE = "The code failed, so I estimate the answer:"


def _sum_terms(task: Task) -> tuple[str, int]:
    """The list comprehension of a ``sum`` task's terms and their count, from its key ("sq30" or "a,d,n")."""
    params = task.key.split(":", 1)[1]
    if params.startswith("sq"):
        n = int(params[2:])
        return f"[k ** 2 for k in range(1, {n} + 1)]", n
    a, d, n = (int(x) for x in params.split(","))
    return f"[{a} + {d} * k for k in range({n})]", n


def bug_kinds(task: Task) -> tuple[str, ...]:
    """The realistic bugs that fit ``task``: a typo always; a missing import where the program imports; an off-by-one
    index and an integer division where it sums a list (the ``sum`` family)."""
    kinds = ["typo"]
    if "import " in task.code:
        kinds.append("missing_import")
    if task.family == "sum":
        kinds += ["off_by_one", "int_division"]
    return tuple(kinds)


def realistic_bug(task: Task, kind: str, rng: random.Random) -> tuple[str, str]:
    """(buggy program, fixed program) for ``task`` with bug ``kind`` (one of ``bug_kinds(task)``)."""
    if kind not in bug_kinds(task):
        raise ValueError(f"bug {kind!r} does not fit task {task.key} (fits: {bug_kinds(task)})")
    if kind == "missing_import":
        return "\n".join(line for line in task.code.splitlines() if "import " not in line), task.code
    if kind == "typo":
        head, _, last = task.code.rpartition("\n")
        expr = last[len("print(") : -1]
        body = f"{head}\nresult = {expr}" if head else f"result = {expr}"
        return f"{body}\nprint({rng.choice(TYPOS)})", f"{body}\nprint(result)"
    terms, n = _sum_terms(task)
    if kind == "off_by_one":
        body = f"terms = {terms}\ntotal = 0\nfor k in range({{}}):\n    total += terms[k]\nprint(total)"
        return body.format(f"1, {n} + 1"), body.format(n)
    body = f"terms = {terms}\nhalf = {n} {{}} 2\nprint(sum(terms[:half]) + sum(terms[half:]))"
    return body.format("/"), body.format("//")


def _guess(task: Task, rng: random.Random, hard_text_acc: float) -> str:
    return task.answer if rng.random() < hard_text_acc else _near_miss(task.answer, rng)


def _realistic_code_response(
    task: Task, rng: random.Random, opener: str, bug_frac: float, fix_frac: float, hard_text_acc: float
) -> tuple[str, str]:
    """A code trace with a realistic bug in ``bug_frac`` of cases: kinds "code", "fix" (repaired after the error) or
    "bug" (a guess after the error)."""
    bad, fixed = realistic_bug(task, rng.choice(bug_kinds(task)), rng)
    ok, out = run_code(fixed)
    if not ok or out != task.answer:
        raise AssertionError(f"fixed program of {task.key} printed {out!r}, expected {task.answer!r}")
    answer = f"```output\n{out}\n```\nThe program prints {out}, so the answer is \\boxed{{{out}}}."
    if rng.random() >= bug_frac:
        return f"{opener}\n```python\n{fixed}\n```\n{answer}", "code"
    failed, err = run_code(bad)
    if failed:
        raise AssertionError(f"buggy program of {task.key} ran: {bad!r}")
    first = f"{opener}\n```python\n{bad}\n```\n```output\n{err}\n```\n"
    if rng.random() < fix_frac:
        return f"{first}{FIX_LINE}\n```python\n{fixed}\n```\n{answer}", "fix"
    return f"{first}{GUESS_LINE} \\boxed{{{_guess(task, rng, hard_text_acc)}}}.", "bug"


def make_response(
    task: Task,
    rng: random.Random,
    code_frac: float = 0.4,
    bug_frac: float = 0.08,
    hard_text_acc: float = 0.1,
    bug_style: str = "simple",
    fix_frac: float = 0.0,
    easy_code_frac: float | None = None,
) -> tuple[str, str]:
    """A ToRL-format response for ``task`` and its kind ("code", "bug", "fix" or "text"); ends before the EOS token.

    Code is written in ``code_frac`` of traces, drawn without looking at the task, or in ``easy_code_frac`` of those
    for easy items when it is given.

    ``bug_style="simple"``: the CPU default's traces (a bug is a stray name, a dropped import or a syntax error, always
    followed by a guess; ``fix_frac`` must be 0). ``"realistic"``: ``realistic_bug``'s kinds, fixed in ``fix_frac``.
    """
    if bug_style not in ("simple", "realistic"):
        raise ValueError(f"bug_style must be 'simple' or 'realistic', got {bug_style!r}")
    if bug_style == "simple" and fix_frac:
        raise ValueError("fix_frac needs bug_style='realistic' (simple bugs are always followed by a guess)")
    if easy_code_frac is not None and task.level == "easy":
        code_frac = easy_code_frac  # the choice depends on the item's level (the selective preset's base model)
    if rng.random() < code_frac:  # one draw either way: traces without easy_code_frac stay what they were
        opener = rng.choice(CODE_OPENERS)
        if bug_style == "realistic":
            return _realistic_code_response(task, rng, opener, bug_frac, fix_frac, hard_text_acc)
        if rng.random() < bug_frac:
            bad = _buggy(task, rng.choice(BUGS))
            ok, out = run_code(bad)
            if not ok:
                return (
                    f"{opener}\n```python\n{bad}\n```\n```output\n{out}\n```\n"
                    f"{GUESS_LINE} \\boxed{{{_guess(task, rng, hard_text_acc)}}}.",
                    "bug",
                )
        ok, out = run_code(task.code)
        if not ok or out != task.answer:
            raise AssertionError(f"reference code of {task.key} printed {out!r}, expected {task.answer!r}")
        return (
            f"{opener}\n```python\n{task.code}\n```\n```output\n{out}\n```\n"
            f"The program prints {out}, so the answer is \\boxed{{{out}}}.",
            "code",
        )
    right = task.level == "easy" or rng.random() < hard_text_acc
    ans = task.answer if right else _near_miss(task.answer, rng)
    return f"{rng.choice(TEXT_OPENERS)}\n{task.reasoning.format(ans=ans)}\nSo the answer is \\boxed{{{ans}}}.", "text"


def make_trace(task: Task, rng: random.Random, **kw: float | str | None) -> tuple[str, str, str]:
    """(prompt, response, kind) for pretraining; the prompt is ToRL's tir_base_0309 text for the question."""
    response, kind = make_response(task, rng, **kw)
    return build_prompt(task.question, TEMPLATE), response, kind
