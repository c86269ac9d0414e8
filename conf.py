"""Sphinx configuration for the qkio book.

The book is built from the repository root: prose in docs/, chapters in
notebooks/ (MyST Markdown notebooks, executed at build time by myst-nb), the API
reference from the qkio package itself.

    sphinx-build -M html . _build          # or scripts/build-book
    open _build/html/index.html

Where /dev/kvm cannot create a VM, notebooks that declare
``qkio: {requires_kvm: true}`` are not executed: the book renders their
committed golden copies (notebooks/NN-name.ipynb, see conftest.py) and
the build log says so.  See docs/_ext/qkio_book.py.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
sys.path.insert(0, str(ROOT))  # autodoc finds qkio even without `pip install -e`

import qkio_book  # noqa: E402

# -- Project -------------------------------------------------------------------

project = "qkio"
author = "the qkio authors"
copyright = "2026, the qkio authors"
try:
    from qkio import __version__ as release
except Exception:  # pragma: no cover - the book must build while qkio is broken
    release = "0"
version = release

# -- Sources -------------------------------------------------------------------

extensions = [
    "myst_nb",            # MyST Markdown + notebooks (includes myst_parser: do not list both)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "qkio_book",          # docs/_ext/qkio_book.py: no-KVM fallback notices
    "qkio_drawing",       # docs/_ext/qkio_drawing.py: the drawing of qemu-kvm 0.12's process
]

# Graphviz's dot (Debian: graphviz, scripts/setup-env) draws at build time;
# SVG keeps the drawing's text sharp at any width and its boxes clickable.
graphviz_output_format = "svg"

root_doc = "docs/index"
# Without include_patterns Sphinx would read README.md, the venv and the
# jupyter cache.  notebooks/*.ipynb (the goldens) are left out: they are
# rendered only in the no-KVM fallback below, one instead of its .md (both
# together would be "multiple files found for the document").
include_patterns = ["docs/**", "notebooks/*.md"]
exclude_patterns = ["_build", ".venv", "**/.ipynb_checkpoints", "docs/_ext/**", "docs/_extra/**",
                    "docs/_static/**"]

# -- MyST / myst-nb --------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist", "fieldlist", "dollarmath", "attrs_inline"]
myst_heading_anchors = 3

nb_execution_mode = "cache"


def _package_digest() -> str:
    """A hash of everything under qkio/ that a chapter's run depends on.

    jupyter-cache keys a notebook by its code cells only, so a change to qkio
    alone would leave every chapter's cached outputs in place, stale.  Each
    state of the package therefore gets a cache of its own: a changed
    package re-runs every chapter once, then the cache serves as before.
    """
    import hashlib
    digest = hashlib.sha256()
    for path in sorted((ROOT / "qkio").rglob("*")):
        if path.is_file() and path.suffix in {".py", ".c", ".s", ".inc", ".ld"}:
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _cache_for_this_package() -> str:
    caches = ROOT / "_build" / ".jupyter_cache"
    current = caches / _package_digest()
    if caches.is_dir():  # the caches of earlier states of the package are of no more use
        import re
        import shutil
        for old in caches.iterdir():
            if old != current and (re.fullmatch(r"[0-9a-f]{16}", old.name) or old.name in ("global.db", "executed")):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return str(current)


nb_execution_cache_path = _cache_for_this_package()
nb_execution_timeout = 300          # per cell; guests run at ~1M instructions/s on this host (chapter 11 measures it)
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True         # ...and says why (timeouts included)
nb_execution_excludepatterns = ["notebooks/*.ipynb"]  # goldens are never re-run
nb_merge_streams = True

# The no-KVM fallback: swap KVM notebooks for their goldens, execution off.
from qkio.kvm import probe as kvm_probe  # noqa: E402  (qkio's one KVM probe)

KVM_UNUSABLE = kvm_probe()
qkio_book_fallback = []   # (docname, golden exists?) read by qkio_book.setup
if KVM_UNUSABLE:
    for md in sorted((ROOT / "notebooks").glob("[0-9]*.md")):
        if not qkio_book.requires_kvm(md):
            continue
        rel = md.relative_to(ROOT).as_posix()
        golden = qkio_book.golden_path(md)
        if golden.exists():
            exclude_patterns.append(rel)
            include_patterns.append(golden.relative_to(ROOT).as_posix())
        else:
            nb_execution_excludepatterns.append(rel)
        qkio_book_fallback.append((rel[:-3], golden.exists()))
qkio_book_kvm_unusable = KVM_UNUSABLE or ""
# The traces chapters offer for download ({download}`NN-name.trace.json`) are
# written beside them by running them; a chapter shown from its golden has run
# nowhere, so its link has no file: say so without failing a -W build.
if KVM_UNUSABLE:
    suppress_warnings = ["download.not_readable"]

# -- Python API ------------------------------------------------------------------

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"

autodoc_typehints = "signature"   # types once, in the signature; the docstring says the rest

# -- HTML ------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "qkio: the threads of a KVM VMM"
html_static_path = ["docs/_static"]
html_extra_path = ["docs/_extra"]   # index.html -> docs/index.html
html_css_files = ["qkio.css"]
html_theme_options = {
    "use_download_button": True,
    "use_fullscreen_button": False,
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_last_updated_fmt = None
# Search: chapters before glossary and API entries for the same word.
html_search_scorer = str(ROOT / "docs" / "_ext" / "search_scorer.js")
html_show_sourcelink = True
