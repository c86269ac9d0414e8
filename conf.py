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
nb_execution_cache_path = str(ROOT / "_build" / ".jupyter_cache")
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

# -- Python API ------------------------------------------------------------------

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"

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
html_show_sourcelink = True
