"""Shared by conf.py and the root conftest.py: which notebooks need KVM, and
where their golden copies are; plus the Sphinx extension that says what the
no-KVM fallback did.

Whether KVM is usable is asked of :func:`qkio.kvm.probe`, qkio's one probe
(conf.py puts the repository on ``sys.path``, so the book builds even without
qkio installed).  This module must import without Sphinx or pytest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)


def front_matter(md_path: str | os.PathLike) -> dict:
    """The YAML front matter of a MyST notebook (empty dict if there is none)."""
    import yaml  # a dependency of jupytext and myst-parser

    m = _FRONT_MATTER.match(Path(md_path).read_text(encoding="utf-8"))
    if not m:
        return {}
    data = yaml.safe_load(m.group(1)) or {}
    return data if isinstance(data, dict) else {}


def requires_kvm(md_path: str | os.PathLike) -> bool:
    """True if the notebook's front matter says ``qkio: {requires_kvm: true}``."""
    qkio = front_matter(md_path).get("qkio") or {}
    return bool(isinstance(qkio, dict) and qkio.get("requires_kvm"))


def golden_path(md_path: str | os.PathLike) -> Path:
    """Where the golden (executed) copy of a notebook lives: beside it, as .ipynb."""
    return Path(md_path).with_suffix(".ipynb")


# -- Sphinx: say what the no-KVM fallback did ------------------------------------
#
# conf.py decides (it must: include/exclude patterns are read before any
# extension runs) and leaves two values behind: qkio_book_kvm_unusable (the
# reason, or "") and qkio_book_fallback, a list of (docname, golden exists?).
# This extension reports them in the build log and puts a note at the top of
# each affected page, so a reader knows the outputs are stored, not fresh.


def _log_fallback(app, config):
    from sphinx.util import logging

    log = logging.getLogger("qkio_book")
    reason = config.qkio_book_kvm_unusable
    if not reason:
        log.info("qkio: /dev/kvm is usable; notebooks are executed (cache: %s)",
                 config.nb_execution_cache_path)
        return
    log.info("qkio: /dev/kvm is unusable: %s", reason)
    for docname, has_golden in config.qkio_book_fallback:
        if has_golden:
            log.info("qkio: %s: rendering the stored golden outputs (%s.ipynb), not executing it",
                     docname, docname)
        else:
            log.warning("qkio: %s needs KVM and has no golden %s.ipynb: rendered without outputs",
                        docname, docname)


def _note_on_page(app, doctree):
    from docutils import nodes

    fallback = dict(app.config.qkio_book_fallback)
    if app.env.docname not in fallback:
        return
    has_golden = fallback[app.env.docname]
    text = (f"This page was not executed for this build: {app.config.qkio_book_kvm_unusable}. "
            + ("The outputs shown were recorded on a machine with KVM (the notebook's golden copy)."
               if has_golden else "It has no stored outputs either, so none are shown."))
    note = nodes.note("", nodes.paragraph(text=text))
    sections = list(doctree.findall(nodes.section))
    if sections:  # after the title
        sections[0].insert(1, note)
    else:
        doctree.insert(0, note)


def _offer_ipynb_download(app, pagename, templatename, context, doctree):
    """Give every executed notebook page a ".ipynb" entry in the download menu.

    sphinx-book-theme only offers the executed .ipynb of a MyST notebook when
    launch buttons (Binder, JupyterHub...) are configured; it offers the .md
    source regardless.  So copy myst-nb's executed notebook next to the
    sources, as the theme would, and set the context value its download
    button reads (it runs at priority 501, this at 500).
    """
    import shutil

    if not context.get("sourcename", "").endswith((".md", ".md.txt")):
        return
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.exists():
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executed, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


# -- Sphinx: the API reference shows only public names ----------------------------
#
# A parameter with a leading underscore (a bound method cached as a default
# argument, a back-pointer a dataclass fills in itself) is not something a
# caller passes, and a private return type is not something a caller can name:
# leave both out of the signatures autodoc prints.

_PRIVATE_NAME = re.compile(r"(?<![\w.])_(?!_)\w*(?:\.\w+)*")


def _split_top_level(params: str) -> list[str]:
    """Split a parameter list at the commas that are not inside brackets or quotes."""
    out, depth, cur, quote = [], 0, "", ""
    for ch in params:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur.strip():
        out.append(cur)
    return out


# A private module alias in an annotation (``_trace.Tracer`` for a module
# imported as ``from . import trace as _trace``): the class's own name is
# what the reader can look up.
_PRIVATE_PREFIX = re.compile(r"(?<![\w.])_(?!_)\w+\.")


def _public_signature(app, what, name, obj, options, signature, return_annotation):
    if signature and signature.startswith("(") and signature.endswith(")"):
        params = [p for p in _split_top_level(signature[1:-1])
                  if not _PRIVATE_NAME.match(p.strip().lstrip("*"))]
        signature = _PRIVATE_PREFIX.sub("", "(" + ",".join(params).strip() + ")")
    if return_annotation and _PRIVATE_NAME.search(return_annotation.rsplit(".", 1)[-1]):
        return_annotation = None
    return signature, return_annotation


def _viewcode_stays_in_qkio(app, modname, attribute):
    """viewcode follows an attribute to the module that defines its value; for a
    value of a built-in type (a ``MappingProxyType`` default, say) that is
    ``builtins``, which has no source page: its link in _modules/index.html
    would be broken.  Keep such attributes in the module that documents them."""
    from sphinx.ext.viewcode import _get_full_modname

    followed = _get_full_modname(modname, attribute)
    return modname if followed == "builtins" else followed


def setup(app):
    app.connect("autodoc-process-signature", _public_signature)
    app.connect("viewcode-follow-imported", _viewcode_stays_in_qkio)
    app.add_config_value("qkio_book_kvm_unusable", "", "env")
    app.add_config_value("qkio_book_fallback", [], "env")
    app.connect("config-inited", _log_fallback)
    app.connect("doctree-read", _note_on_page)
    app.connect("html-page-context", _offer_ipynb_download, priority=500)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
