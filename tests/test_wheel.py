"""The package as a user gets it: ``pip wheel .`` carries the compiled exit loop,
and a fresh virtual environment with no compiler on PATH and an empty cache
runs it (issue 11's "done when").

Slow-ish (a wheel build and a venv: ~20-30 s here), so it is one test.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from helpers.vmm import ROOT, demo_guest

pytestmark = pytest.mark.kvm


def _run(argv, **kw):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result


def test_wheel_carries_the_native_loop_and_a_compilerless_venv_uses_it(tmp_path):
    hello = tmp_path / "hello.elf"
    hello.write_bytes(demo_guest("hello").read_bytes())  # built here; the venv has no binutils
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)])
    (wheel,) = wheels.glob("qkio-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("qkio/native/_cpu_exec.") and n.endswith(".so")], names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
          "--no-deps", "--no-index", str(wheel)])
    cache, home = tmp_path / "cache", tmp_path / "home"
    cache.mkdir()
    home.mkdir()
    # Only the venv's own bin on PATH: no gcc, no cc, no as, no ld.
    env = {"PATH": str(venv / "bin"), "HOME": str(home), "QKIO_CACHE": str(cache)}
    for tool in ("gcc", "cc", "as", "ld"):
        assert not (venv / "bin" / tool).exists()
    probe = _run([str(venv / "bin" / "python"), "-c",
                  "import qkio.native as n; m = n.load(); print(m.__file__ if m else n.unavailable_reason)"],
                 env=env, cwd=tmp_path)
    assert probe.stdout.strip().startswith(str(venv)), probe.stdout
    run = subprocess.run([str(venv / "bin" / "qkio"), "run", "--kernel", str(hello), "--exit-path", "native"],
                         capture_output=True, env=env, cwd=tmp_path, timeout=120,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    assert (run.returncode, run.stdout, run.stderr) == (33, b"Hello from qkio's guest\n", b"")
    assert list(cache.iterdir()) == []  # nothing was built at run time
