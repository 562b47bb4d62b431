"""A dependency-free progress bar on standard error, for long CLI work."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "profiling") as bar: ... bar.advance()``; silent when ``enabled`` is false."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None, width: int = 30):
        self.total, self.desc, self.enabled, self.width = max(total, 1), desc, enabled, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def advance(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.desc} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s")
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
