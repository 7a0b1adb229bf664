"""A dependency-free progress bar on stderr for long work (training, shadow models, audits)."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress("training", total) as bar: bar.update(1, loss=0.3)`.

    Draws in place on a terminal; on a pipe or in CI it prints at most ~10 lines per task.
    """

    def __init__(self, label: str, total: int, stream=None, enabled: bool = True):
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_decile = -1
        self.info = ""

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int = 1, **info) -> None:
        self.done = min(self.done + n, self.total)
        if info:
            self.info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        if not self.enabled:
            return
        if self.tty:
            self._draw("\r")
        else:
            decile = self.done * 10 // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                self._draw("")
                self.stream.write("\n")

    def _draw(self, prefix: str) -> None:
        frac = self.done / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"{prefix}{self.label:<18} [{bar}] {self.done}/{self.total} "
                          f"{elapsed:6.1f}s {self.info}")
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
