"""Progress for anything that takes more than a few seconds: a live bar on a terminal, sparse log lines elsewhere.

On a terminal a tqdm bar shows rate, time left and the figures the caller passes (reward, accuracy, s/step). In a
file (CI, ``ray job submit`` logs, a redirected run) a bar would write a line per refresh, so there the same tqdm
meter is printed as a plain line at most every ``log_every_s`` seconds, and once at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm


def interactive(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (stderr by default) is a terminal and TORL_PROGRESS is not ``lines``."""
    mode = os.environ.get("TORL_PROGRESS", "auto")
    if mode in ("bar", "lines"):
        return mode == "bar"
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """``with Progress(total, "train") as p: ... p.update(1, reward=0.3)``; figures are shown as ``key value``."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        log_every_s: float = 30.0,
        initial: int = 0,
        stream: IO[str] | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.log_every_s = log_every_s
        self.start = self.last_line = time.monotonic()
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, dynamic_ncols=True)
            if interactive(self.stream)
            else None
        )

    def update(self, n: int = 1, **figures: Any) -> None:
        self.n += n
        if figures:
            self.postfix = {k: _fmt(v) for k, v in figures.items()}
        if self.bar is not None:
            if figures:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.log_every_s or (self.total is not None and self.n >= self.total):
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The meter as one plain line: ``desc: 40%|... 12/30 [00:30<00:45, 2.5 s/step, reward 0.3]``."""
        postfix = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return tqdm.format_meter(
            self.n,
            self.total,
            time.monotonic() - self.start,
            prefix=self.desc,
            unit=self.unit,
            postfix=postfix or None,
            initial=self.initial,
            ncols=100,
        )

    def write(self, text: str) -> None:
        """A message that does not break the bar (printed above it on a terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
