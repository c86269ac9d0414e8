"""The book is the test suite: collect ``notebooks/*.md`` as nbval notebooks.

nbval only collects ``.ipynb`` files, and a MyST Markdown notebook has no
outputs to compare against.  So each chapter is two files:

``notebooks/NN-name.md``
    the source: prose, code cells, cell tags.  This is what people edit and
    review, and what Sphinx renders.
``notebooks/NN-name.ipynb``
    its *golden* copy: the same notebook executed by ``scripts/regen-goldens``
    (``jupytext --to ipynb --execute``).  Only its outputs are used here.

For every ``.md`` this plugin takes the inputs and tags from the ``.md`` and the
outputs from the golden (``jupytext.combine.combine_inputs_with_outputs``) and
hands the result to nbval's own ``IPyNbFile``/``IPyNbCell``.  So each code cell
is its own test item (``notebooks/01-hello.md::Cell 3``) with nbval's output
comparison, its markers (``# NBVAL_IGNORE_OUTPUT``, ``# NBVAL_SKIP``,
``# NBVAL_RAISES_EXCEPTION``) and tags (``nbval-ignore-output``,
``nbval-skip``, ``raises-exception``...), its timeouts, and the sanitizer in
``tests/nbval_sanitize.cfg``.  One more item per notebook,
``golden-is-current``, fails when the golden no longer has the same cells as
the ``.md`` (someone edited the source and did not regenerate).

stderr is **not** compared.  Two reasons: what a child process writes to fd 2
reaches the kernel through ipykernel's fd-level capture thread, so *when* it
shows up (this cell or the next) is a race; and Python warnings carry host
paths and line numbers.  Claims the book makes must be printed to stdout (or
be a cell's value).  The book still shows stderr.

A notebook whose front matter says::

    qkio:
      requires_kvm: true

has the ``kvm`` marker on every cell item, so it is skipped, with the reason
(missing device, no permission, KVM_CREATE_VM refused, ``QKIO_NO_KVM`` set...),
on a machine where /dev/kvm cannot create a VM.  Its ``golden-is-current``
item still runs: it needs no KVM.

The ``kvm`` marker is the test suite's one way to say "needs KVM"
(``@pytest.mark.kvm`` on a test, ``pytestmark = pytest.mark.kvm`` on a
module); :func:`pytest_runtest_setup` below is the one place that skips, and
:func:`qkio.kvm.probe` the one probe it asks.

Why this file is at the root of the repository: hooks in a ``conftest.py``
see only the files below its own directory, and the chapters (``notebooks/``)
and the tests (``tests/``) are siblings.  From the root it applies to both,
and pytest loads it for ``pytest notebooks/01-hello.md`` as for ``pytest
tests/``, with no plugin to register by hand.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from qkio.kvm import probe as kvm_probe

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import qkio_book  # noqa: E402  (docs/_ext/qkio_book.py: KVM probe, front matter)

try:  # nbval and jupytext are in the "test" extra; without them only unit tests run
    import jupytext
    import nbformat
    from jupytext.combine import combine_inputs_with_outputs
    from nbval.plugin import IPyNbFile
except ImportError:  # pragma: no cover
    IPyNbFile = None

REGEN = "scripts/regen-goldens"


def _describe_changes(src, gold) -> list[str]:
    """Name changed cells the way nbval names its items (code cells count from 0)."""
    out, code = [], 0
    for (kind, a), (_, b) in zip(src, gold):
        if a != b:
            out.append(f"Cell {code}" if kind == "code" else f"a {kind} cell before Cell {code}")
        code += kind == "code"
    return out


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


if IPyNbFile is not None:

    class GoldenIsCurrent(pytest.Item):
        """The golden .ipynb has exactly the cells of the .md (no KVM needed)."""

        def runtest(self):
            md = self.path
            golden = qkio_book.golden_path(md)
            rel = md.relative_to(ROOT) if md.is_relative_to(ROOT) else md
            if not golden.exists():
                raise GoldenMismatch(
                    f"{rel}: no golden outputs ({golden.name} is missing), so no cell output was compared.\n"
                    f"Create it with:  {REGEN} {rel}")
            src = _cells(jupytext.read(md))
            gold = _cells(nbformat.read(golden, as_version=4))
            if src != gold:
                if len(src) != len(gold):
                    what = f"the .md has {len(src)} cells, the golden {len(gold)}"
                else:
                    what = "changed: " + ", ".join(_describe_changes(src, gold))
                raise GoldenMismatch(
                    f"{rel}: the golden {golden.name} is stale: {what}.\n"
                    f"After a code change:      {REGEN} {rel}\n"
                    f"After a prose-only edit:  {REGEN} --no-execute {rel}   (keeps the outputs, needs no KVM)")

        def repr_failure(self, excinfo, style=None):
            if isinstance(excinfo.value, GoldenMismatch):
                return str(excinfo.value)
            return super().repr_failure(excinfo, style=style)

        def reportinfo(self):
            return self.path, None, f"{self.path.name}::golden-is-current"

    class GoldenMismatch(Exception):
        pass

    class MystNotebook(IPyNbFile):
        """nbval's notebook collector, fed from a MyST .md plus its golden .ipynb."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Figures are drawn afresh by every run, as SVG (scripts/setup-env):
            # like nbval's PNGs, they are not compared.
            self.skip_compare = self.skip_compare + ("stderr", "image/svg+xml")
            self.requires_kvm = qkio_book.requires_kvm(self.path)

        def get_sanitize_files(self):
            # pyproject.toml names tests/nbval_sanitize.cfg relative to the
            # repository; nbval would open it relative to the cwd.
            root = self.config.rootpath
            return [f if Path(f).is_absolute() else str(root / f) for f in super().get_sanitize_files()]

        def _notebook(self):
            nb = jupytext.read(self.path)
            golden = qkio_book.golden_path(self.path)
            if golden.exists():
                nb = combine_inputs_with_outputs(nb, nbformat.read(golden, as_version=4), fmt="md:myst")
            return nb

        # nbval's own collect() makes the cell items (markers, tags, options:
        # nothing of it is copied here); it reads the notebook from the file
        # its node points at, as .ipynb.  So while it collects, the node points
        # at the chapter's combined notebook (the .md's inputs, the golden's
        # outputs), written beside the chapter -- the same directory, because
        # nbval starts the kernel in the notebook's directory -- and removed
        # right after.  Cell items keep the .md as their path and name.
        _combined: Path | None = None

        @property
        def fspath(self):
            legacy = super().fspath  # pytest's legacy path object for self.path
            return type(legacy)(str(self._combined)) if self._combined is not None else legacy

        def collect(self):
            yield GoldenIsCurrent.from_parent(self, name="golden-is-current")
            fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}-", suffix=".ipynb", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    nbformat.write(self._notebook(), f)
                self._combined = Path(name)
                items = list(super().collect())
            finally:
                self._combined = None
                os.unlink(name)
            for item in items:
                if self.requires_kvm:
                    item.add_marker(pytest.mark.kvm)
                yield item


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kvm: needs a usable /dev/kvm (qkio.kvm.probe); skipped with the reason where there is none")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # tryfirst: skip before any fixture or parent collector (a notebook's
    # kernel) is set up for an item that cannot run.
    if item.get_closest_marker("kvm") is not None:
        reason = kvm_probe()
        if reason:
            pytest.skip(f"KVM is not usable here: {reason}")


def _is_book_notebook(path: Path) -> bool:
    return path.suffix == ".md" and path.parent.name == "notebooks" and path.name[:1].isdigit()


def pytest_ignore_collect(collection_path: Path, config):
    # Goldens are compared through their .md, never collected on their own;
    # nbval would otherwise run each of them a second time.
    if collection_path.suffix == ".ipynb" and collection_path.with_suffix(".md").exists():
        return True
    if collection_path.name == ".ipynb_checkpoints":
        return True
    if collection_path.suffix == ".ipynb" and collection_path.name.startswith("."):
        return True  # a combined notebook of MystNotebook.collect (left by a crash)
    return None


def pytest_collect_file(file_path: Path, parent):
    if IPyNbFile is None or not _is_book_notebook(file_path):
        return None
    opt = parent.config.option
    if not (opt.nbval or opt.nbval_lax):
        return None
    return MystNotebook.from_parent(parent, path=file_path)
