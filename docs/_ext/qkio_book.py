"""Shared by conf.py and the root conftest.py: is /dev/kvm usable, and which
notebooks need it.

Both the book build and the test suite must agree on one question -- can this
machine run a KVM guest? -- so the probe lives in one place.  It asks the
kernel, not the file system: ``/dev/kvm`` can exist and still be useless
(no permission, a container without the device cgroup, nested virt off, or
``KVM_CREATE_VM`` refused because another hypervisor owns VMX).  So it opens
the device, checks ``KVM_GET_API_VERSION`` (must be 12) and creates and closes
one VM.  The answer names the cause, because a skip reason that only says
"no KVM" sends people looking in the wrong place.

This module must import without Sphinx, pytest or qkio installed.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
from pathlib import Path

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01        # _IO(KVMIO, 0x01)
KVM_API_VERSION = 12          # the only value Linux has ever returned


@functools.lru_cache(maxsize=None)
def kvm_unusable_reason(device: str = KVM_DEVICE) -> str | None:
    """None if a VM can be created through ``device``, else why not (one line).

    ``QKIO_NO_KVM=1`` in the environment makes it answer "unusable", to try
    the no-KVM paths (skipped notebooks, book from goldens) on a KVM machine.
    """
    if os.environ.get("QKIO_NO_KVM", "") not in ("", "0"):
        return "QKIO_NO_KVM is set in the environment"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{device} does not exist (no KVM in this kernel, or not passed into this container/VM)"
    except PermissionError:
        return (f"{device} is not readable and writable by uid {os.getuid()} "
                f"(add the user to group 'kvm', or run as root)")
    except OSError as e:
        return f"cannot open {device}: {os.strerror(e.errno)} (errno {e.errno})"
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as e:
            return f"KVM_GET_API_VERSION on {device} failed: {os.strerror(e.errno)} (errno {e.errno})"
        if version != KVM_API_VERSION:
            return f"KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}"
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as e:
            hint = ""
            if e.errno in (errno.EBUSY, errno.ENODEV, errno.EIO):
                hint = " (is hardware virtualisation disabled, or held by another hypervisor?)"
            return f"KVM_CREATE_VM failed: {os.strerror(e.errno)} (errno {e.errno}){hint}"
        os.close(vm_fd)
        return None
    finally:
        os.close(fd)


def kvm_usable() -> bool:
    return kvm_unusable_reason() is None


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


def setup(app):
    app.add_config_value("qkio_book_kvm_unusable", "", "env")
    app.add_config_value("qkio_book_fallback", [], "env")
    app.connect("config-inited", _log_fallback)
    app.connect("doctree-read", _note_on_page)
    app.connect("html-page-context", _offer_ipynb_download, priority=500)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
