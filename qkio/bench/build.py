"""Building what the benchmarks run: the guests and the C reference programs.

The guests are qkio's own (:mod:`qkio.guests`); the C reference programs are
kept as source in this package (``<name>.c``) and compiled with ``gcc -O2``
on first use.  Both go through qkio's one build helper,
:func:`qkio.build.cached_build`, into qkio's one cache folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..build import BuildError, cached_build, find_tools, run_tool
from ..guests import build_guest

__all__ = ["BuildError", "build_c", "build_guest"]

HERE = Path(__file__).resolve().parent
#: -Werror only in the project's own CI: a user's newer gcc may warn about what ours does not.
CFLAGS = ("-O2", "-Wall", *(("-Werror",) if os.environ.get("CI") else ()))


def _gcc_version(gcc: str) -> bytes:
    try:
        return subprocess.run([gcc, "--version"], capture_output=True, check=True).stdout.split(b"\n")[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{gcc} --version failed: {e}") from None


def build_c(name: str) -> Path:
    """Compile ``<name>.c`` from this package with ``gcc -O2``; return the executable's path."""
    source = HERE / f"{name}.c"
    if not source.exists():
        raise KeyError(f"no C reference program {name!r} in {HERE}")
    what = f"the C reference program {name!r}"
    (gcc,) = find_tools(("gcc",), what, "gcc")

    def recipe(exe: Path, scratch: Path) -> None:
        run_tool([gcc, *CFLAGS, "-o", str(exe), str(source)], what)

    return cached_build(name, "", [source], recipe, key=[_gcc_version(gcc), " ".join(CFLAGS)],
                        what=what)
