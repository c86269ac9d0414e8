"""A progress line: ``qkio bench: pio: round 2/5, qemu...``.

On a terminal it is rewritten in place on stderr with ``\\r``.  In a Jupyter
kernel (a chapter run in JupyterLab, or executed by the book build) it is one
display that is updated in place and emptied when the benchmark is done, so a
cell that runs for a minute says what it is doing while it runs and leaves no
trace in the saved output.  Anywhere else (a log file, a pipe) it is silent.
"""

from __future__ import annotations

import html
import os
import sys


def in_jupyter_kernel() -> bool:
    """True when this code runs in an IPython kernel (JupyterLab, nbclient, nbval)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


class Progress:
    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.jupyter = False
        if enabled is None:
            try:
                enabled = os.isatty(self.stream.fileno())
            except (AttributeError, OSError, ValueError):
                enabled = False
            if not enabled and stream is None and in_jupyter_kernel():
                enabled = self.jupyter = True
        self.enabled = enabled
        self.bench = ""
        self._width = 0
        self._display = None   # the IPython DisplayHandle, in a kernel

    def start(self, bench: str) -> None:
        self.bench = bench
        self("starting")

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"qkio bench: {self.bench}: {message}"
        if self.jupyter:
            self._show({"text/html": f"<code>{html.escape(line)}</code>", "text/plain": ""})
            return
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def _show(self, data: dict) -> None:
        from IPython.display import display

        if self._display is None:
            self._display = display(data, raw=True, display_id=True)
        else:
            self._display.update(data, raw=True)

    def done(self) -> None:
        if self.jupyter and self._display is not None:
            # Empty, not removed: the output stays the same from run to run.
            self._display.update({"text/html": "", "text/plain": ""}, raw=True)
            self._display = None
            return
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class Silent(Progress):
    """For library callers and tests: says nothing."""

    def __init__(self):
        super().__init__(enabled=False)
