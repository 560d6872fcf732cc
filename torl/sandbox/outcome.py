"""What a snippet's run came to: its output, capped as it arrives, and the status its ending maps to.

The zygote (``torl.sandbox.zygote``) collects each child's stdout and stderr in a ``CappedBuffer``, which says when a
snippet printed past ``sandbox.max_output_bytes`` so the zygote kills it instead of reading on, and names the ending
with ``classify``: ok, error, timeout, killed, or sandbox_error, the last only when the sandbox itself said its set-up
failed, never from what the snippet printed. Standard library only (the zygote imports it).
"""

from __future__ import annotations

import os


class CappedBuffer:
    """Collects bytes up to ``cap``; reports overflow so the caller can kill the writer instead of reading on."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def append(self, data: bytes) -> bool:
        """Add ``data``; return True once more than ``cap`` bytes were offered (the excess is dropped)."""
        room = self.cap - self.size
        if len(data) > room:
            data = data[: max(room, 0)]
            self.truncated = True
        if data:
            self.parts.append(data)
            self.size += len(data)
        return self.truncated

    def text(self) -> str:
        # Binary output must not break the JSON reply: undecodable bytes become U+FFFD.
        return b"".join(self.parts).decode("utf-8", errors="replace")


def classify(
    wait_status: int | None, timed_out: bool, over_output: bool, setup_failed: bool = False
) -> tuple[str, int | None]:
    """Map how a snippet ended to ``(status, exit_code)``; a signal gives a negative exit code like ``subprocess``.

    ``setup_failed``: the sandbox itself said so (the forker, or the child's status pipe, which the snippet never
    holds); what the snippet prints or its exit code never makes a sandbox error.

    >>> classify(0, False, False)
    ('ok', 0)
    >>> classify(9, True, False)
    ('timeout', -9)
    """
    code: int | None = None
    if wait_status is not None:
        code = os.waitstatus_to_exitcode(wait_status)
    if setup_failed:
        return "sandbox_error", code
    if timed_out:
        return "timeout", code
    if over_output:
        return "killed", code
    if code is None:
        return "killed", None
    if code < 0:
        return "killed", code
    return ("ok" if code == 0 else "error"), code
