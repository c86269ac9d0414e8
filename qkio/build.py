"""Building from source into qkio's one cache: the one build helper.

qkio keeps what it runs as source -- the demo and test guests (``as``/``ld``),
the benchmarks' C reference programs (``gcc``) -- and builds each on first
use.  Every such build goes through :func:`cached_build`:

* the output's file name carries a hash of everything it is made from (the
  input files' names and bytes, the tool flags, anything else the caller puts
  in ``key``), so it is rebuilt exactly when one of them changed, and a cached
  output runs on a machine without the tools;
* the build happens in a scratch directory *inside* the cache and the result
  is renamed into place: ``rename(2)`` within one file system is atomic, so
  two processes building the same thing at once never run half a file, and a
  failed build leaves nothing under the final name;
* a scratch directory left behind by a build that was killed (SIGKILL, a
  power cut: ``TemporaryDirectory`` cleans up only on the way out of a live
  process) is removed by the next build once it is an hour old -- older than
  any live build can be, so a concurrent build's scratch is never touched.

The cache is one folder: ``$QKIO_CACHE`` if set, else
``$XDG_CACHE_HOME/qkio`` (``~/.cache/qkio``), as the XDG base directory
specification says.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import QkioError

#: Scratch directories are named ``.tmp-<name>-<random>`` inside the cache.
SCRATCH_PREFIX = ".tmp-"
#: A scratch directory this many seconds old belongs to a build that died.
STALE_AFTER_S = 3600.0


class BuildError(QkioError):
    """Something could not be built; the message carries the tool's own words."""


def cache_dir() -> Path:
    """qkio's cache folder: ``$QKIO_CACHE``, else ``$XDG_CACHE_HOME/qkio``, else ``~/.cache/qkio``."""
    if os.environ.get("QKIO_CACHE"):
        return Path(os.environ["QKIO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qkio"


def find_tools(names: Iterable[str], what: str, package: str) -> list[str]:
    """The paths of the tools ``names`` on PATH, or one :class:`BuildError` naming every
    missing one, what needs them and the Debian package that has them."""
    paths = {name: shutil.which(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise BuildError(f"building {what} needs {' and '.join(missing)} ({package}; on Debian: "
                         f"apt-get install {package}), not found on PATH")
    return [path for path in paths.values() if path is not None]


def run_tool(argv: list[str], what: str) -> None:
    """Run one build step; a failure is a :class:`BuildError` with the tool's output."""
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        tool = os.path.basename(argv[0])
        output = (result.stdout + result.stderr).strip()
        raise BuildError(f"building {what}: {tool} failed (exit status {result.returncode}):\n{output}")


def input_hash(inputs: Iterable[Path], key: Iterable[str | bytes] = ()) -> str:
    """16 hex digits of SHA-256 over ``key`` and each input's file name and bytes.

    A missing input hashes as missing (the build itself then reports it)."""
    digest = hashlib.sha256()
    for part in key:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    for path in inputs:
        path = Path(path)
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def remove_stale_scratch(cache: Path, now: float | None = None) -> list[Path]:
    """Remove scratch directories of builds that died (older than :data:`STALE_AFTER_S`)."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(cache.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SCRATCH_PREFIX):
            continue
        try:
            if now - entry.lstat().st_mtime < STALE_AFTER_S:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except FileNotFoundError:  # another build removed it first
            continue
        except OSError:
            continue  # not ours to fight over; the next build tries again
        removed.append(entry)
    return removed


def cached_build(name: str, suffix: str, inputs: Iterable[Path], recipe: Callable[[Path, Path], None],
                 *, key: Iterable[str | bytes] = (), what: str | None = None,
                 cache: str | os.PathLike | None = None) -> Path:
    """Return ``<cache>/<name>-<hash><suffix>``, building it first if it is not there.

    ``recipe(output, scratch)`` must create the file ``output``, using the
    directory ``scratch`` for anything else it needs; both are inside the
    cache and gone afterwards.  ``key`` holds whatever else decides the
    output (tool flags, versions).  An :class:`OSError` on the cache (read-only,
    full) becomes a :class:`BuildError` naming ``what``.
    """
    inputs = [Path(p) for p in inputs]
    what = what or name
    out_dir = Path(cache) if cache is not None else cache_dir()
    target = out_dir / f"{name}-{input_hash(inputs, key)}{suffix}"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(out_dir)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f"{SCRATCH_PREFIX}{name}-") as scratch:
            output = Path(scratch) / f"{name}{suffix}"
            recipe(output, Path(scratch))
            os.replace(output, target)
    except OSError as e:
        raise BuildError(f"cannot build {what} in {out_dir}: {e}") from None
    return target
