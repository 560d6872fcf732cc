"""Answer grading and the outcome reward: the last \\boxed{} answer against the gold answer.

ToRL (``verl/utils/reward_score/math_verifier.py``, ``docs/torl-behaviour.md`` ("Reward and grading")): the last
``\\boxed{}`` of the response (tool outputs included) is compared with the gold answer; +1 if equivalent, -1 otherwise
or without a box. Fixed here: answers are wrapped in ``$...$`` before math-verify parses them (bare strings mis-parse:
``6 - 5i`` == ``7 - 5i``), plain numbers are compared numerically first (AIME's ``025`` == ``25``), units after a
number are dropped, and every math-verify call runs in a helper process with a deadline, so a check can never hang and
works from any thread (math-verify's own ``signal.alarm`` timeout only works on the main thread).

Not here: batching across actors (``actors/grader.py``) and accuracy metrics (``torl/rollout/metrics.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from torl.config import RewardConfig

log = logging.getLogger(__name__)

# Predictions much longer than any real answer are wrong without parsing (a 10k-character "answer" is noise and
# parsing it costs seconds). Gold answers set the scale: OlympiadBench's longest list is a few hundred characters.
MAX_ANSWER_CHARS = 1000

# ---------------------------------------------------------------------------------------------------------------
# Extraction


def _boxed_spans(text: str) -> list[str]:
    r"""Every complete ``\boxed{...}`` (balanced braces, any depth) or ``\boxed 5`` content, in order."""
    out: list[str] = []
    for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        else:
            short = re.match(r" +([^\s$]+)", text[i:])  # "\boxed 5" (no braces): up to whitespace or "$"
            if short:
                out.append(short.group(1))
    return out


def extract_boxed(text: str) -> str | None:
    r"""The content of the last complete ``\boxed{}`` in ``text`` (nested braces kept), or None.

    >>> extract_boxed(r"so \boxed{1} no, \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    """
    spans = _boxed_spans(text)
    return spans[-1].strip() if spans else None


# ---------------------------------------------------------------------------------------------------------------
# Cheap checks done in-process: normalisation and plain numbers.

_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}$")
# Exponents are capped at 3 digits: Fraction("1e999999999") would build a gigantic integer.
_NUMBER = re.compile(r"^[-+]?(\d{1,400}(\.\d{0,400})?|\.\d{1,400})([eE][-+]?\d{1,3})?$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
# \frac{a}{b}, \frac ab / \frac43 (unbraced = one digit, as LaTeX reads it), a/b.
_FRAC = re.compile(r"^([-+]?)\\frac\s*(?:\{(\d+)\}|(\d))\s*(?:\{(\d+)\}|(\d))$|^([-+]?)(\d+)/(\d+)$")
# A unit after a number: \text{...}, \mbox{...}, or a word of 2+ letters (optionally ^2 / ^3), e.g. "45 minutes",
# "166 cm^2", "\frac{41}{12} \text{ km}". One letter is not dropped ("2 x" must not equal 2).
_UNIT_SUFFIX = re.compile(
    r"^(.*?\d\}?)\s*(?:\\(?:text|mbox|mathrm)\{[^{}]*\}|[A-Za-z]{2,}(?:\s*/\s*[A-Za-z]+)?)(?:\^\{?[23]\}?)?$"
)
_NOT_UNITS = {"pi", "sqrt", "frac", "infty", "cdot", "times", "or", "and", "i"}


def normalize_answer(answer: str) -> str:
    """Strip what never changes an answer's meaning: outer ``$``, spacing commands, ``\\left``/``\\right``, ``\\%``,
    ``^\\circ``, a trailing period, ``\\dfrac``. Case and inner content are kept."""
    s = answer.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)  # not \\leftarrow
    # Spacing commands (never the row separator "\\\\"); ",\\!" in "10,\\!080" is a thousands separator.
    s = re.sub(r",\\!\s*", ",", s)
    s = re.sub(r"(?<!\\)\\!", "", s)
    s = re.sub(r"(?<!\\)\\[,;: ]", " ", s).replace("~", " ")
    s = re.sub(r"(?<!\\)\\\$", "", s)  # "\\$32" (dollars)
    s = s.replace("\\%", "").replace("%", "").replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    s = s.strip().rstrip(".").strip()
    if s.count("$") == 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    m = _TEXT_WRAP.match(s)
    if m:
        s = m.group(1).strip()
    return re.sub(r"\s+", " ", s)


def parse_number(s: str) -> Fraction | None:
    """A plain number (``025``, ``-3.50``, ``1,000``, ``27.0``, ``\\frac{3}{4}``, ``3/4``, ``1e3``) as an exact
    Fraction, or None for anything else."""
    s = s.strip() if "," in s else s.replace(" ", "")  # "1, 350" is a list, not 1350
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _NUMBER.match(s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
    m = _FRAC.match(s)
    if m:
        if m.group(7):
            sign, num, den = m.group(6), m.group(7), m.group(8)
        else:
            sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def _strip_unit(s: str) -> str:
    m = _UNIT_SUFFIX.match(s)
    if not m:
        return s
    unit = s[len(m.group(1)) :].strip().lower()
    return s if unit in _NOT_UNITS else m.group(1).strip()


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    return abs(a - b) <= Fraction(1, 10**9) * max(abs(a), abs(b), 1)


def quick_equivalent(pred: str, gold: str) -> bool | None:
    """True/False when cheap checks decide, None when math-verify must (never slow: no parsing of expressions)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p:
        return False
    if p.lower() == g.lower():
        return True
    gn = parse_number(g)
    if gn is None:
        gn = parse_number(_strip_unit(g))  # MATH's "864 \mbox{ inches}^2", "5.4 \text{ cents}"
    if gn is None:
        return None
    pn = parse_number(p)
    if pn is None:
        pn = parse_number(_strip_unit(p))  # "45 minutes", "166 cm^2" against a numeric gold
    if pn is not None:
        return _numbers_equal(pn, gn)
    return None


def wrap_math(answer: str) -> str:
    """Put an answer in math mode for math-verify: ``$...$`` unless it already has ``$`` or is a ``\\boxed{}``."""
    s = answer.strip()
    if "$" in s or s.startswith("\\boxed") or s.startswith("\\("):
        return s
    return f"${s}$"


# ---------------------------------------------------------------------------------------------------------------
# math-verify in a helper process with a deadline.

_WORKER_CODE = "from torl.rl.grading import _worker_main; _worker_main()"


def _die_with_parent() -> None:
    """Linux: have the kernel kill this helper when its parent dies, so a check stuck in a huge computation cannot
    outlive a killed grader actor (stdin EOF only ends the helper between checks)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() == 1:  # the parent already died before prctl took effect
            os._exit(0)


def _worker_main() -> None:
    """Helper process loop: one JSON request per stdin line, "1"/"0" per stdout line. Runs math-verify without
    its signal-based timeouts (the parent enforces the deadline by killing this process)."""
    import logging as _logging

    _die_with_parent()
    _logging.disable(_logging.WARNING)  # math-verify warns on every call that timeouts are off; we know
    from math_verify import parse, verify

    # Warm up sympy's lazily imported simplification code, so a real check's deadline does not pay for it.
    for a, b in (("$\\frac{1}{2(n+1)}$", "$\\frac{1}{2n+2}$"), ("$(1,2]\\cup\\{3\\}$", "$\\{1, (2,3)\\}$")):
        verify(parse(a, parsing_timeout=None), parse(b, parsing_timeout=None), timeout_seconds=None)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold = parse(req["g"], parsing_timeout=None)
            pred = parse(req["p"], parsing_timeout=None)
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
        except Exception:  # noqa: BLE001 - any parser failure means "not shown equal"
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


class _Helper:
    """One helper process and its stdout buffer (spawned without waiting; ``ready`` waits for its handshake)."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the torl package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.buf = b""
        self.is_ready = False

    def readline(self, timeout_s: float) -> str | None:
        """The next reply line, or None on timeout or when the process died."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def ready(self, timeout_s: float) -> bool:
        if not self.is_ready:
            self.is_ready = self.readline(timeout_s) == "ready"
        return self.is_ready and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


class MathVerifyWorker:
    """Runs math-verify in a helper process; a check that overruns its deadline kills the helper and counts as not
    equivalent. A warm spare helper is kept so a kill costs no restart latency (importing sympy takes ~1 s).
    Thread-safe: checks are serialised."""

    def __init__(self, startup_timeout_s: float = 120.0) -> None:
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._active: _Helper | None = None
        self._spare: _Helper | None = None
        self.timeouts = 0
        self.started = 0

    def _helper(self) -> _Helper:
        if self._active is not None and self._active.proc.poll() is None:
            return self._active
        if self._active is not None:
            self._active.kill()
        helper = self._spare if self._spare is not None and self._spare.proc.poll() is None else _Helper()
        self._spare = None
        self.started += 1
        if not helper.ready(self._startup_timeout_s):
            helper.kill()
            raise RuntimeError("math-verify helper process failed to start (is math-verify installed?)")
        self._active = helper
        self._spare = _Helper()  # warms up while the active helper works (not during its start: 2 cores)
        return helper

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        """math-verify equivalence of two math-mode strings; False on a timeout or a crash of the helper."""
        with self._lock:
            helper = self._helper()
            assert helper.proc.stdin is not None
            try:
                helper.proc.stdin.write((json.dumps({"p": pred, "g": gold}) + "\n").encode())
                helper.proc.stdin.flush()
            except BrokenPipeError:
                helper.kill()
                return False
            reply = helper.readline(timeout_s)
            if reply is None:
                self.timeouts += 1
                log.warning("answer check timed out after %.1fs (counted wrong): pred=%.80r", timeout_s, pred)
                helper.kill()
                return False
            return reply == "1"

    def close(self) -> None:
        """Stop the helper processes (they also exit on their own when this process ends: stdin closes)."""
        with self._lock:
            for helper in (self._active, self._spare):
                if helper is not None:
                    helper.kill()
            self._active = self._spare = None


_worker: MathVerifyWorker | None = None
_worker_lock = threading.Lock()


def _shared_worker() -> MathVerifyWorker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = MathVerifyWorker()
        return _worker


# ---------------------------------------------------------------------------------------------------------------
# Public API


def is_equivalent(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the predicted answer means the gold answer. Never raises, never takes much longer than ``timeout_s``.

    Cheap checks first (normalised string equality, exact numbers), then math-verify on both answers wrapped in
    ``$...$`` in the helper process, which handles expressions, sets (multiple answers, order-free), tuples and
    intervals (ordered), and units in ``\\text{}``.

    >>> is_equivalent("025", "25"), is_equivalent("6 - 5i", "7 - 5i")
    (True, False)
    """
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    if len(pred) > max(MAX_ANSWER_CHARS, 4 * len(gold)):
        return False
    quick = quick_equivalent(pred, gold)
    if quick is not None:
        return quick
    p, g = normalize_answer(pred), normalize_answer(gold)
    try:
        return _shared_worker().check(wrap_math(p), wrap_math(g), timeout_s)
    except Exception:  # noqa: BLE001 - the helper could not start or broke: grade as wrong, loudly
        log.exception("math-verify check failed; counted wrong")
        return False


def is_verifiable(gold: str, timeout_s: float = 5.0) -> bool:
    """Whether a gold answer can be graded at all: a plain number (units dropped) can; anything else must parse in
    math-verify and verify against itself, else no response could ever be judged equal to it by ``is_equivalent``.
    Raises when the math-verify helper cannot start (a broken install must not reject every answer)."""
    if not isinstance(gold, str) or not gold.strip() or len(gold) > MAX_ANSWER_CHARS:
        return False
    norm = normalize_answer(gold)
    if parse_number(norm) is not None or parse_number(_strip_unit(norm)) is not None:
        return True
    math = wrap_math(norm)
    return _shared_worker().check(math, math, timeout_s)


def score(
    response_text: str, gold: str, cfg: RewardConfig, attempted_code: bool = False, code_failed: bool = False
) -> tuple[float, bool]:
    """(reward, correct) for one response: ``cfg.correct`` if its last boxed answer is equivalent to ``gold``, else
    ``cfg.wrong`` (no box is wrong). ``cfg.exec_error_penalty`` is subtracted when code was attempted and failed
    (ToRL also charged responses without code; ``cfg.compat_penalty_without_code`` restores that)."""
    boxed = extract_boxed(response_text)
    correct = boxed is not None and is_equivalent(boxed, gold, cfg.grade_timeout_s)
    reward = cfg.correct if correct else cfg.wrong
    if cfg.exec_error_penalty:
        failed = (attempted_code and code_failed) or (cfg.compat_penalty_without_code and not attempted_code)
        if failed:
            reward -= cfg.exec_error_penalty
    return reward, correct


def worker_stats() -> dict[str, int]:
    """Counters of this process's math-verify helper: checks that timed out, helpers started."""
    worker = _worker
    return (
        {"timeouts": worker.timeouts, "helper_starts": worker.started}
        if worker
        else {"timeouts": 0, "helper_starts": 0}
    )


def shutdown_helpers() -> None:
    """Stop this process's math-verify helper processes (a later check starts new ones)."""
    global _worker
    with _worker_lock:
        if _worker is not None:
            _worker.close()
        _worker = None


def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment (added to the reward): 0 up to ``max_length - buffer`` tokens, then falling
    linearly to ``-penalty`` at ``max_length``, and ``-penalty`` beyond it (a response cut off by the limit).

    >>> [overlong_penalty(n, 100, 20) for n in (80, 90, 100, 101)]
    [0.0, -0.5, -1.0, -1.0]
    """
    if buffer <= 0 or length <= max_length - buffer:
        return 0.0
    if length > max_length:
        return -penalty
    return -penalty * (length - (max_length - buffer)) / buffer
