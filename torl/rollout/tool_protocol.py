"""The tool-integrated reasoning (TIR) protocol: when a round asks for a tool, which code runs, what the model sees.

ToRL's model interface (``docs/torl-behaviour.md`` ("TIR rollout"), ``vllm_rollout_spmd.py`` ``_tir_generate``): a
round that stopped on the ```` ```output ```` stop string is a tool request; the last complete ```` ```python ````
block of that round's text is run; the result becomes an observation (error -> last line, long output -> 128 + "..." +
128) inserted as ```` ```output\\n{observation}\\n```\\n ````. ToRL's two quirks (a fake timeout text for silent code,
"Error" anywhere in stdout trimming it) are ``ToolConfig`` options, off by default, on in ``configs/torl_compat.yaml``.

Not here: running code (the sandbox), tokenising or masking the inserted text, and the engine loop itself
(``torl/rollout/tool_loop.py`` drives it with ``LoopState`` / ``next_state``).
"""

from __future__ import annotations

import enum

from torl.config import ToolConfig
from torl.rollout.types import ExecResult

# What ToRL's model saw when a run produced no output at all, e.g. a real timeout (Sandbox Fusion returned nothing and
# ToRL substituted this text). Kept for real timeouts in both modes so the model's interface does not change.
TIMEOUT_TEXT = "timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'"
# ToRL's observation when the sandbox call itself failed (HTTP error or unparseable response).
SANDBOX_ERROR_TEXT = "UnknownError"
OUTPUT_OPEN = "```output\n"
OUTPUT_CLOSE = "\n```\n"


class LoopState(enum.Enum):
    """What the per-trajectory tool loop does next (veRL's AgentState, reduced to what TIR needs)."""

    GENERATE = "generate"  # resume generation on the text so far (no tool ran)
    EXECUTE = "execute"  # run the extracted code, insert the observation, then generate again
    STOP = "stop"  # the response is finished (EOS, length, abort, or a round that did not ask for a tool)


def is_tool_request(finish_reason: str | None, stop_reason: str | int | None, stop: str = "```output") -> bool:
    """True when a round ended on the tool stop string (ToRL: finish_reason == "stop" and stop_reason == stop).

    EOS (``stop_reason`` None or a token id) and length cut-offs are not tool requests.
    """
    return finish_reason == "stop" and isinstance(stop_reason, str) and stop_reason == stop


def last_code_block(text: str) -> str | None:
    """The last complete ```` ```python ```` block of one round's text, or None.

    Line rules (ToRL): a line that starts or ends with ```` ```python ```` opens a block; a later line starting with
    ```` ``` ```` closes it. Only the last complete block counts; if the last block opened is still unclosed, nothing
    runs (None), even when an earlier block was complete. Blocks are never concatenated. An empty block gives "".

    >>> last_code_block("x\\n```python\\nprint(1)\\n```\\nmore\\n```python\\nprint(2)\\n```\\n")
    'print(2)'
    """
    last: str | None = None
    current: list[str] | None = None  # lines of the block being read; None = outside a block
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if current is None:
            if line.startswith("```python") or line.endswith("```python"):
                current = []
        elif line.startswith("```"):
            last = "\n".join(current)
            current = None
        else:
            current.append(line)
    return None if current is not None else last


def has_complete_block(text: str) -> bool:
    """Whether ``text`` holds any complete ```` ```python ```` block under ``last_code_block``'s line rules (an
    unclosed block after a complete one still counts: the turn did produce code)."""
    inside = False
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if not inside:
            inside = line.startswith("```python") or line.endswith("```python")
        elif line.startswith("```"):
            return True
    return False


def is_void_turn(text: str) -> bool:
    """SimpleTIR's void turn (arXiv 2509.02479, docs/void-turns.md): a round whose text holds neither a complete code
    block nor a final answer (``\\boxed{``, as SimpleTIR's ``execute_predictions`` tests it).

    >>> is_void_turn("Let me think"), is_void_turn("so \\boxed{2}"), is_void_turn("```python\nx=1\n```\n")
    (True, False, False)
    """
    return not has_complete_block(text) and "\\boxed{" not in text


def torl_passes(result: ExecResult) -> bool:
    """ToRL's "Done": exit code 0 *or* any stdout, so a program that printed and then crashed passes; a failed sandbox
    request ("UnknownError") does not (``vllm_rollout_spmd.py`` ``postproc``)."""
    return result.status == "ok" or result.exit_code == 0 or bool(result.stdout)


def is_success(result: ExecResult, cfg: ToolConfig) -> bool:
    """Whether a call passes (feeds tool/exec_success, the pass rates and the execution penalty).

    Default: the exit status (``status == "ok"``). ToRL (``compat_code_ok``): ``torl_passes``.
    """
    return torl_passes(result) if cfg.compat_code_ok else result.status == "ok"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().split("\n") if ln.strip()]
    return lines[-1] if lines else ""


def truncate_middle(text: str, limit: int = 256, keep: int = 128) -> str:
    """ToRL's rule: text of ``limit`` characters or more becomes its first ``keep`` + "..." + its last ``keep``."""
    if limit > 0 and len(text) >= limit:
        return text[:keep] + "..." + text[-keep:]
    return text


def format_observation(result: ExecResult, cfg: ToolConfig) -> str:
    """The observation body (what goes inside the ```output frame) for one execution result.

    Default (ToRL's interface with its bugs fixed): success shows stdout, even when empty; a failure shows stderr
    (stdout if stderr is empty) cut to its last line; a real timeout with no error text shows ToRL's timeout text;
    a sandbox failure shows "UnknownError". Then strip, then the 128 + "..." + 128 truncation at 256 characters.
    """
    if result.status == "sandbox_error":
        body = SANDBOX_ERROR_TEXT
    elif cfg.compat_error_substring:
        # ToRL: stdout if it "succeeded" (exit 0 or any stdout), else stderr; "Error" anywhere -> keep the last line.
        body = result.stdout if torl_passes(result) else result.stderr
        if "Error" in body:
            body = _last_line(body)
    elif result.status == "ok":
        body = result.stdout
    else:
        body = result.stderr if result.stderr.strip() else result.stdout
        if cfg.error_last_line:
            body = _last_line(body)
        if not body.strip() and result.status == "timeout":
            body = TIMEOUT_TEXT
    if cfg.compat_fake_timeout and not body.strip():
        # ToRL quirk: empty output, including code that ran fine and printed nothing, became a fake timeout.
        body = TIMEOUT_TEXT
    return truncate_middle(body.strip(), cfg.truncate_chars, cfg.truncate_keep)


def observation_text(body: str, round_text_ends_with_newline: bool) -> str:
    """The full text inserted after a tool request: "\\n" if the round's text lacks one, then the output frame.

    The stop string itself was dropped by the engine (include_stop_str_in_output=False), so the frame re-opens it.

    >>> observation_text("2", False)
    '\\n```output\\n2\\n```\\n'
    """
    return ("" if round_text_ends_with_newline else "\n") + OUTPUT_OPEN + body + OUTPUT_CLOSE


def next_state(
    finish_reason: str | None, stop_reason: str | int | None, code: str | None, calls_made: int, cfg: ToolConfig
) -> LoopState:
    """The loop's transition after one generation round.

    STOP unless the round is a tool request while tools are on and calls remain (c = ``cfg.max_calls``); a request
    without a complete code block resumes generation without running anything (ToRL dropped that round's stop text,
    quirk (iii); the caller keeps it); otherwise EXECUTE. ``calls_made`` counts what uses up c: executed calls, and
    with ``cfg.compat_round_per_request`` unexecuted requests too.
    """
    if not cfg.enabled or not is_tool_request(finish_reason, stop_reason, cfg.stop):
        return LoopState.STOP
    if calls_made >= cfg.max_calls:
        return LoopState.STOP
    return LoopState.GENERATE if code is None else LoopState.EXECUTE
