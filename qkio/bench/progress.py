"""A progress line on stderr: ``qkio bench: pio: round 2/5, qemu...``.

Rewritten in place with ``\\r`` when stderr is a terminal, silent otherwise
(a log file or a notebook gets the final table only).
"""

from __future__ import annotations

import os
import sys


class Progress:
    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = os.isatty(self.stream.fileno())
            except (AttributeError, OSError, ValueError):
                enabled = False
        self.enabled = enabled
        self.bench = ""
        self._width = 0

    def start(self, bench: str) -> None:
        self.bench = bench
        self("starting")

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"qkio bench: {self.bench}: {message}"
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def done(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class Silent(Progress):
    """For library callers and tests: says nothing."""

    def __init__(self):
        super().__init__(enabled=False)
