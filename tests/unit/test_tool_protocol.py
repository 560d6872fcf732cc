"""The TIR protocol, one parametrized row per rule in docs/torl-behaviour.md ("TIR rollout")."""

import pytest

from torl.config import ToolConfig
from torl.rollout.tool_protocol import (
    SANDBOX_ERROR_TEXT,
    TIMEOUT_TEXT,
    LoopState,
    format_observation,
    is_success,
    is_tool_request,
    last_code_block,
    next_state,
    observation_text,
    truncate_middle,
)
from torl.rollout.types import ExecResult

DEFAULT = ToolConfig()
COMPAT = ToolConfig(compat_fake_timeout=True, compat_error_substring=True)
CODE_OK = ToolConfig(compat_code_ok=True)
TRACEBACK = (
    "Traceback (most recent call last):\n  File \"<s>\", line 1, in <module>\nNameError: name 'a' is not defined\n"
)


@pytest.mark.parametrize(
    "finish, stop_reason, expected",
    [
        ("stop", "```output", True),  # stopped on the tool stop string
        ("stop", None, False),  # EOS
        ("stop", 151643, False),  # stop token id (EOS-like)
        ("length", None, False),  # cut off by length
        ("length", "```output", False),  # only finish_reason == "stop" counts
        ("stop", "```out", False),  # a different stop string
        (None, None, False),
    ],
)
def test_is_tool_request(finish, stop_reason, expected):
    assert is_tool_request(finish, stop_reason, "```output") is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Let me compute.\n```python\nprint(1+1)\n```\n", "print(1+1)"),  # one block
        ("```python\na=1\n```\ntext\n```python\nprint(2)\n```\n", "print(2)"),  # last block only, not concatenated
        ("```python\nprint(1)\n```\n```python\nprint(2)", None),  # last block unclosed -> nothing runs
        ("```python\nprint(1)", None),  # only block unclosed
        ("no code at all", None),
        ("So we run: ```python\nx = 3\nprint(x)\n```", "x = 3\nprint(x)"),  # a line *ending* with ```python opens
        ("```python3\nprint(3)\n```", "print(3)"),  # a line *starting* with ```python opens
        ("```python\nprint(4)\n```output", "print(4)"),  # any line starting with ``` closes
        ("```python\n```\n", ""),  # empty block is complete (runs empty code)
        ("```py\nprint(5)\n```\n", None),  # ```py is not ```python
        ("```python\r\nprint(6)\r\n```\r\n", "print(6)"),  # CRLF lines
        ("```python\nprint('```')\n```", "print('```')"),  # ``` mid-line does not close
        ("```python\n  ```\nprint(7)\n```", "  ```\nprint(7)"),  # an indented ``` does not close, the next does
    ],
)
def test_last_code_block(text, expected):
    assert last_code_block(text) == expected


def _r(status, stdout="", stderr="", exit_code=None):
    code = {"ok": 0, "error": 1}.get(status) if exit_code is None else exit_code
    return ExecResult(status=status, stdout=stdout, stderr=stderr, exit_code=code)


LONG = "".join(str(i % 10) for i in range(300))


@pytest.mark.parametrize(
    "result, cfg, expected",
    [
        # success shows stdout, stripped
        (_r("ok", "2\n"), DEFAULT, "2"),
        # error keeps the last line of stderr
        (_r("error", "", TRACEBACK), DEFAULT, "NameError: name 'a' is not defined"),
        # error_last_line off keeps the whole stderr
        (_r("error", "", TRACEBACK), ToolConfig(error_last_line=False), TRACEBACK.strip()),
        # printed then crashed: by exit status it failed, the error shows
        (_r("error", "partial\n", TRACEBACK), DEFAULT, "NameError: name 'a' is not defined"),
        # ToRL: printed then crashed counts as success, stdout shown, traceback hidden
        (_r("error", "partial\n", TRACEBACK), COMPAT, "partial"),
        # ran fine, printed nothing: empty by default ...
        (_r("ok", ""), DEFAULT, ""),
        # ... and ToRL's fake timeout text in compat mode
        (_r("ok", ""), COMPAT, TIMEOUT_TEXT),
        (_r("ok", ""), ToolConfig(compat_fake_timeout=True), TIMEOUT_TEXT),
        # stdout mentioning Error: kept whole by default ...
        (_r("ok", "no Error here\nresult 5\n"), DEFAULT, "no Error here\nresult 5"),
        # ... trimmed to its last line by ToRL's substring check
        (_r("ok", "no Error here\nresult 5\n"), COMPAT, "result 5"),
        (_r("ok", "no Error here\nresult 5\n"), ToolConfig(compat_error_substring=True), "result 5"),
        # real timeout without error text -> the timeout text in both modes
        (_r("timeout", "", "", exit_code=None), DEFAULT, TIMEOUT_TEXT),
        (_r("timeout", "", "", exit_code=None), COMPAT, TIMEOUT_TEXT),
        # timeout with a message -> its last line
        (_r("timeout", "", "TimeoutError: took longer than 10 s\n"), DEFAULT, "TimeoutError: took longer than 10 s"),
        # killed by a signal (e.g. memory limit): last line of what it said
        (_r("killed", "", "MemoryError\n", exit_code=-9), DEFAULT, "MemoryError"),
        # error with an empty stderr falls back to stdout's last line
        (_r("error", "a\nb\n", ""), DEFAULT, "b"),
        # the sandbox itself failed
        (_r("sandbox_error", "", "worker died"), DEFAULT, SANDBOX_ERROR_TEXT),
        (_r("sandbox_error", "", "worker died"), COMPAT, SANDBOX_ERROR_TEXT),
        # 256 chars or longer -> first 128 + "..." + last 128
        (_r("ok", LONG), DEFAULT, LONG[:128] + "..." + LONG[-128:]),
        (_r("ok", LONG[:256]), DEFAULT, LONG[:128] + "..." + LONG[128:256]),
        # 255 chars stay whole
        (_r("ok", LONG[:255]), DEFAULT, LONG[:255]),
        # stripping happens before the length check
        (_r("ok", "  " + LONG[:255] + "\n\n"), DEFAULT, LONG[:255]),
        # truncation applies to error text too (a long last line)
        (_r("error", "", "ValueError: " + LONG), DEFAULT, ("ValueError: " + LONG)[:128] + "..." + LONG[-128:]),
    ],
)
def test_format_observation(result, cfg, expected):
    assert format_observation(result, cfg) == expected


@pytest.mark.parametrize(
    "result, cfg, expected",
    [
        (_r("ok", "1"), DEFAULT, True),
        (_r("ok", ""), DEFAULT, True),
        (_r("error", "partial", TRACEBACK), DEFAULT, False),
        (_r("error", "partial", TRACEBACK), CODE_OK, True),  # ToRL's verdict: any stdout = success
        (_r("error", "", TRACEBACK), CODE_OK, False),
        (_r("sandbox_error"), CODE_OK, False),  # ToRL: "UnknownError" is not "Done"
        (_r("error", "partial", TRACEBACK), COMPAT, False),  # the observation quirks alone keep the exit status
        (_r("timeout", "", ""), DEFAULT, False),
        (_r("sandbox_error"), DEFAULT, False),
    ],
)
def test_is_success(result, cfg, expected):
    assert is_success(result, cfg) is expected


def test_truncate_middle_custom_limits():
    assert truncate_middle("abcdefghij", limit=10, keep=3) == "abc...hij"
    assert truncate_middle("abcdefghi", limit=10, keep=3) == "abcdefghi"
    assert truncate_middle("abc", limit=0, keep=1) == "abc"  # 0 disables


@pytest.mark.parametrize(
    "body, ends_nl, expected",
    [
        ("2", True, "```output\n2\n```\n"),
        ("2", False, "\n```output\n2\n```\n"),  # a newline is added when the round's text lacks one
        ("", True, "```output\n\n```\n"),  # empty output keeps the frame
    ],
)
def test_observation_text(body, ends_nl, expected):
    assert observation_text(body, ends_nl) == expected


@pytest.mark.parametrize(
    "finish, stop_reason, code, calls, cfg, expected",
    [
        ("stop", "```output", "print(1)", 0, DEFAULT, LoopState.EXECUTE),
        ("stop", "```output", "print(1)", 1, DEFAULT, LoopState.STOP),  # c=1 used up
        ("stop", "```output", "print(1)", 1, ToolConfig(max_calls=2), LoopState.EXECUTE),
        ("stop", "```output", None, 0, DEFAULT, LoopState.GENERATE),  # request without a complete block
        ("stop", None, None, 0, DEFAULT, LoopState.STOP),  # EOS
        ("length", None, "print(1)", 0, DEFAULT, LoopState.STOP),
        ("stop", "```output", "print(1)", 0, ToolConfig(enabled=False), LoopState.STOP),
        ("stop", "```output", "print(1)", 0, ToolConfig(max_calls=0), LoopState.STOP),  # c=0
    ],
)
def test_next_state(finish, stop_reason, code, calls, cfg, expected):
    assert next_state(finish, stop_reason, code, calls, cfg) is expected
