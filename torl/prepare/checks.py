"""Per-problem checks: does this problem have one final answer our grader can check? Each returns why not, or None.

ToRL kept problems with a single verifiable answer, dropping proofs and ambiguous answers
(docs/torl-behaviour.md ("Training data")). An RL reward only means something when the answer can be matched: a
proof has no final answer, a multiple-choice letter is guessed right one time in five without any reasoning, and an
answer the grader cannot parse rewards nothing however good the response. The rules below look at text only; the
math-verify self-check runs in ``torl.rl.grading``'s helper process.
"""

from __future__ import annotations

import re

from torl.rl.grading import is_verifiable

# "Show that ...", "Explain why ...": an imperative opening a sentence, a line or a numbered part. "will the census
# show that" (a question about a value) opens nothing, and "Show your work" asks for no proof.
_PROOF_VERB = re.compile(
    r"(?:^|[.!?:;]\s+|\n\s*|\(\w\)\s*|\b\d+[.)]\s*)(?:show|demonstrate|verify|establish|deduce|explain)\s+(?:that|why)\b",
    re.IGNORECASE,
)
_PROVE_ANYWHERE = re.compile(r"\bprove\b|\bproof\b", re.IGNORECASE)
# Gold answers that are not values: "Proof", "QED", a box symbol, "see proof", "proven".
_PROOF_ANSWER = re.compile(
    r"^\W*(?:\\text\{\s*)?(?:proof|proven|proved|q\.?e\.?d\.?|see (?:the )?proof|\\blacksquare|\\square|\\box)\b",
    re.IGNORECASE,
)
# Option markers of a multiple-choice list: "(A)", "\textbf{(B)}", "\mathrm{(C)}", or "A." / "B)" opening a line.
# "P(A)" (a probability) is not a marker: a letter right before the parenthesis rules it out.
_OPTION_MARKERS = {
    letter: re.compile(rf"(?<![A-Za-z])\(\s*{letter}\s*\)|^\s*\$?{letter}\s*[.)]\s", re.MULTILINE)
    for letter in "ABCDEF"
}
_LETTER_ANSWER = re.compile(r"^\s*(?:\\text(?:bf)?\{\s*)?\(?\s*([A-F](?:\s*,\s*[A-F])*)\s*\)?\s*\}?\s*$")
_LATEX_COMMAND = re.compile(r"\\(?:begin|end)\{[a-z*]*\}|\\[A-Za-z]+")
_PROSE_WORD = re.compile(r"[A-Za-z]{2,}")
PROSE_WORDS = 4  # this many running words (LaTeX commands aside) make an answer a sentence, not a value


def proof_style(question: str, answer: str) -> str | None:
    """Why this is a proof problem (no single final answer), or None."""
    if _PROOF_ANSWER.match(answer):
        return f"answer is not a value ({answer[:40]!r})"
    m = _PROOF_VERB.search(question)
    if m:
        return f"question asks to {m.group(0).strip(' .!?:;()0123456789').lower()}"
    m = _PROVE_ANYWHERE.search(question)
    if m:
        return f"question says {m.group(0).lower()!r}"
    return None


def _options(question: str) -> list[str]:
    """The longest run A, B, C, ... of option markers found in the question."""
    found = []
    for letter, marker in _OPTION_MARKERS.items():
        if not marker.search(question):
            break
        found.append(letter)
    return found


def multiple_choice(question: str, answer: str) -> str | None:
    """Why this is a multiple-choice leftover (options in the question, or a bare option letter as answer), or None.

    Three options (A)-(C) are required: two could be cases of one problem ("(a) and (b)" are lower case anyway).
    """
    options = _options(question)
    if len(options) >= 3:
        return f"question lists options {options[0]}-{options[-1]}"
    m = _LETTER_ANSWER.match(answer)
    if m:
        return f"answer is an option letter ({m.group(1)})"
    return None


def unverifiable(answer: str, timeout_s: float = 5.0) -> str | None:
    """Why the grader could never match this gold answer, or None: unbalanced braces, a sentence instead of a value,
    or math-verify cannot parse it or verify it against itself (``torl.rl.grading.is_verifiable``)."""
    depth = 0
    for i, ch in enumerate(answer):
        if ch in "{}" and (i == 0 or answer[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            if depth < 0:
                break
    if depth != 0:
        return "unbalanced braces"
    prose = _PROSE_WORD.findall(_LATEX_COMMAND.sub(" ", answer))
    if len(prose) >= PROSE_WORDS:
        return f"a sentence, not a value ({' '.join(prose[:6])})"
    if not is_verifiable(answer, timeout_s):
        return "math-verify cannot parse it or verify it against itself"
    return None
