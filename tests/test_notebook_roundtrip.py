"""Every chapter survives being edited as a notebook (JupyterLab, or ``jupytext``).

Saving a MyST chapter through Jupytext goes .md -> notebook -> .md; the
stored golden goes .ipynb -> .md.  Both must give back the .md byte for
byte, front matter (``qkio: {requires_kvm: true}``) included, with the
repository's ``jupytext.toml`` -- the configuration JupyterLab uses.  No KVM
is needed: nothing is executed.

A chapter fails here when its text is not what Jupytext itself would write
(cell metadata YAML wrapped at 80 columns, keys in order): saving it from
JupyterLab would then rewrite it.  ``python tests/test_notebook_roundtrip.py
notebooks/NN-name.md`` rewrites it in that form (same content).
"""

from __future__ import annotations

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
from jupytext.config import find_jupytext_configuration_file, load_jupytext_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9]*.md"))


@pytest.fixture(scope="module")
def config():
    # What JupyterLab's contents manager does: look upwards from the notebook.
    path = find_jupytext_configuration_file(str(NOTEBOOKS))
    assert path is not None and Path(path) == ROOT / "jupytext.toml", path
    return load_jupytext_config(str(CHAPTERS[0]))


def test_the_configuration_pairs_md_with_ipynb(config):
    (pairing,) = config.formats
    assert set(pairing.split(",")) == {"ipynb", "md:myst"}


@pytest.mark.parametrize("md", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_md_through_a_notebook_is_byte_identical(md, config):
    text = md.read_text(encoding="utf-8")
    nb = jupytext.reads(text, fmt="md:myst", config=config)
    as_ipynb = jupytext.writes(nb, fmt="ipynb", config=config)
    back = jupytext.writes(jupytext.reads(as_ipynb, fmt="ipynb", config=config), fmt="md:myst",
                           config=config)
    assert back == text, f"not in Jupytext's own form: python tests/test_notebook_roundtrip.py {md.name}"
    assert ("qkio:\n  requires_kvm: true\n" in back) == ("qkio:\n  requires_kvm: true\n" in text)


@pytest.mark.parametrize("md", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_the_golden_ipynb_gives_back_the_md(md, config):
    golden = md.with_suffix(".ipynb")
    if not golden.exists():
        pytest.fail(f"{golden.name} is missing: scripts/regen-goldens {md.relative_to(ROOT)}")
    nb = jupytext.reads(golden.read_text(encoding="utf-8"), fmt="ipynb", config=config)
    assert jupytext.writes(nb, fmt="md:myst", config=config) == md.read_text(encoding="utf-8")


def test_without_the_configuration_the_front_matter_would_be_lost():
    # Why jupytext.toml exists: the default filter drops qkio's metadata.
    md = NOTEBOOKS / "01-hello.md"
    nb = jupytext.reads(jupytext.writes(jupytext.read(md), fmt="ipynb"), fmt="ipynb")
    assert "requires_kvm" not in jupytext.writes(nb, fmt="md:myst")


def canonical(md: Path) -> str:
    """The chapter as Jupytext writes it back after a trip through a notebook."""
    config = load_jupytext_config(str(md))
    nb = jupytext.reads(md.read_text(encoding="utf-8"), fmt="md:myst", config=config)
    nb = jupytext.reads(jupytext.writes(nb, fmt="ipynb", config=config), fmt="ipynb", config=config)
    return jupytext.writes(nb, fmt="md:myst", config=config)


if __name__ == "__main__":  # rewrite the chapters named (or all) in Jupytext's own form
    import sys
    for arg in sys.argv[1:] or CHAPTERS:
        path = Path(arg) if Path(arg).exists() else NOTEBOOKS / arg
        path.write_text(canonical(path), encoding="utf-8")
