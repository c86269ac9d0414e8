"""qkio's one build helper (qkio/build.py): hashed names, atomic rename, one
cache folder, and the scratch left by a build that died is cleaned up."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qkio import build


def _copy_recipe(text: str, calls: list):
    def recipe(output: Path, scratch: Path) -> None:
        calls.append(scratch)
        assert output.parent == scratch and scratch.name.startswith(build.SCRATCH_PREFIX)
        output.write_text(text)
    return recipe


def test_output_named_by_inputs_and_key_and_built_once(tmp_path):
    source = tmp_path / "thing.txt"
    source.write_text("one")
    cache = tmp_path / "cache"
    calls: list = []
    first = build.cached_build("thing", ".out", [source], _copy_recipe("built", calls), cache=cache)
    assert first.parent == cache and first.name.startswith("thing-") and first.suffix == ".out"
    assert first.read_text() == "built"
    assert build.cached_build("thing", ".out", [source], _copy_recipe("again", calls), cache=cache) == first
    assert len(calls) == 1 and first.read_text() == "built"
    other_key = build.cached_build("thing", ".out", [source], _copy_recipe("k", calls), cache=cache,
                                   key=["-O3"])
    source.write_text("two")
    other_input = build.cached_build("thing", ".out", [source], _copy_recipe("i", calls), cache=cache)
    assert len({first, other_key, other_input}) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in (first, other_key, other_input))


def test_failed_build_leaves_nothing(tmp_path):
    def recipe(output: Path, scratch: Path) -> None:
        output.write_text("half")
        raise build.BuildError("the tool said no")
    with pytest.raises(build.BuildError, match="the tool said no"):
        build.cached_build("thing", "", [], recipe, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_is_a_build_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(build.BuildError, match="cannot build thing in"):
        build.cached_build("thing", "", [], _copy_recipe("x", []), cache=tmp_path / "file" / "cache")


def test_stale_scratch_is_removed_and_a_fresh_one_is_not(tmp_path):
    stale = tmp_path / f"{build.SCRATCH_PREFIX}thing-dead"
    fresh = tmp_path / f"{build.SCRATCH_PREFIX}thing-alive"
    for d in (stale, fresh):
        d.mkdir()
        (d / "thing.o").write_text("partial")
    old = time.time() - build.STALE_AFTER_S - 60
    os.utime(stale, (old, old))
    keep = tmp_path / "thing-0123456789abcdef"
    keep.write_text("a finished build, however old")
    os.utime(keep, (old, old))
    build.cached_build("other", "", [], _copy_recipe("x", []), cache=tmp_path)
    assert not stale.exists() and fresh.exists() and keep.exists()


def test_missing_tools_named_together(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.BuildError, match=r"building a thing needs as and ld \(binutils"):
        build.find_tools(("as", "ld"), "a thing", "binutils")
