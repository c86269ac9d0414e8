"""The book's one picture: qemu-kvm 0.12's process, drawn by Graphviz.

The drawing is data, not a bitmap: every box and arrow below is one entry in
PARTS or LINKS, with the place in qemu-kvm-0.12.3 (ceph/qemu-kvm, tag
qemu-kvm-0.12.3, commit 69a5ecafa27d) where it can be checked, and the
chapters that look at it.  The directive

    ```{qkio-process}
    :chapter: 5          (optional: draw chapter 5's parts strongly, the rest faint)
    :caption: ...        (optional: replaces the default caption)
    ```

turns that into DOT and hands it to sphinx.ext.graphviz (``dot`` from
Debian's graphviz package, run at build time, offline), as SVG so that its
text stays sharp at any width and each box links to the chapters about it.
The citation of each part is its tooltip in the SVG.

``legend()`` gives the chapter -> parts table that the landing page prints
under the full drawing (directive ``{qkio-process-legend}``).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from html import escape

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective


@dataclass(frozen=True)
class Part:
    id: str
    title: str            # first line, bold
    detail: str           # further lines, "\n"-separated
    chapters: tuple[int, ...]
    source: str           # where to check it in qemu-kvm-0.12.3
    shape: str = "box"
    cluster: str = ""     # "io", "compat" or "" (a box of its own)


@dataclass(frozen=True)
class Link:
    tail: str
    head: str
    label: str
    chapters: tuple[int, ...]
    source: str
    style: str = "solid"


# Line numbers are for qemu-kvm-0.12.3.
PARTS = [
    Part("kvm", "/dev/kvm (the kernel)", "runs the guest; KVM_RUN\nreturns on each exit",
         (1, 3), "qemu-kvm.c kvm_run L900-1009: ioctl(fd, KVM_RUN, 0) at L917", shape="box3d"),
    Part("select", "main_loop_wait(): select()", "on every registered fd; then,\n"
         "lock held, the ready fds'\nhandlers, timers, bottom halves",
         (2, 4, 7), "vl.c main_loop_wait L3952-4046 (select at L3992), called by qemu-kvm.c "
         "kvm_main_loop L2077-2143 on the main thread; handlers: qemu-kvm.c sigfd_handler L2028, "
         "io_thread_wakeup L2059, posix-aio-compat.c posix_aio_read L473", cluster="io"),
    Part("vcpu", "vCPU threads", "one per vCPU: ioctl(KVM_RUN)\nwith the lock dropped",
         (1, 2, 3), "qemu-kvm.c ap_main_loop L1899, kvm_main_loop_cpu L1880, "
         "pre_kvm_run unlocks qemu_mutex L868, post_kvm_run relocks L854", cluster="vcpu"),
    Part("lock", "qemu_mutex", "the global lock",
         (3, 4), "qemu-kvm.c L62 (pthread_mutex_t); dropped by kvm_mutex_unlock L2512-2522 "
         "around select() and by pre_kvm_run around KVM_RUN", shape="hexagon"),
    Part("eventpipe", "event pipe", "an eventfd and its dup,\n"
         "or a pipe (qemu_eventfd)",
         (5, 11, 12), "qemu-kvm.c kvm_main_loop L2086-2096; compatfd.c qemu_eventfd L119-143",
         shape="cylinder"),
    Part("sigfd", "signal pipe", "signalfd for SIGIO, SIGALRM,\nSIGBUS, or the compat pipe",
         (6, 7, 8, 11), "qemu-kvm.c kvm_main_loop L2099-2111 (sigprocmask, qemu_signalfd); "
         "compatfd.c qemu_signalfd L104-117 (SYS_signalfd)", shape="cylinder"),
    Part("compat", "signal thread", "sigwait_compat: sigwaitinfo(),\n"
         "then write() to a pipe",
         (8, 12), "compatfd.c sigwait_compat L26-68, qemu_signalfd_compat L70-102 "
         "(pipe + detached pthread); used when SYS_signalfd is missing or fails",
         cluster="compat"),
    Part("signals", "signals", "timer: SIGALRM\nhpet, rtc (O_ASYNC): SIGIO\n"
         "memory errors: SIGBUS",
         (6, 7), "vl.c host_alarm_handler L1203-1255, dynticks timer_create(SIGEV_SIGNAL); "
         "qemu-kvm.c sigbus_handler L1472", shape="note"),
    Part("aio", "AIO workers", "up to 64 aio_threads:\n"
         "blocking pread/pwrite",
         (7, 9), "posix-aio-compat.c aio_thread L304-366, spawn_thread L368-382, max_threads L66",
         cluster="aio"),
    Part("aiosigfd", "AIO signal pipe", "signalfd for SIGUSR2\n(paio_init)",
         (7, 8), "posix-aio-compat.c paio_init L611-651 (qemu_signalfd at L628, "
         "handler posix_aio_read at L636)", shape="cylinder"),
]

LINKS = [
    Link("vcpu", "kvm", "KVM_RUN / exit", (1, 3), "qemu-kvm.c kvm_run L917"),
    Link("vcpu", "lock", "taken for each exit", (3,), "qemu-kvm.c post_kvm_run L852-857",
         style="dashed"),
    Link("select", "lock", "dropped in select()", (4,), "vl.c main_loop_wait L3991-3993",
         style="dashed"),
    Link("vcpu", "eventpipe", "qemu_notify_event():\nwrite 1", (5,),
         "vl.c qemu_notify_event L3556-3567 -> qemu-kvm.c qemu_kvm_notify_work L1992-2021; "
         "callers: async.c qemu_bh_schedule, vl.c qemu_set_fd_handler2, qemu_system_*_request"),
    Link("select", "eventpipe", "write 1 (timer)", (5, 11),
         "vl.c host_alarm_handler L1253 calls qemu_notify_event"),
    Link("eventpipe", "select", "readable", (5,), "qemu-kvm.c io_thread_wakeup L2059-2075"),
    Link("signals", "sigfd", "pending (all\nthreads block them)", (6, 7, 11),
         "qemu-kvm.c kvm_main_loop L2103 (sigprocmask), ap_main_loop L1899 (sigfillset)"),
    Link("signals", "compat", "sigwaitinfo()", (8,), "compatfd.c sigwait_compat L26-68",
         style="dashed"),
    Link("compat", "sigfd", "write(pipe)", (8, 12), "compatfd.c sigwait_compat", style="dashed"),
    Link("sigfd", "select", "readable", (7, 8), "qemu-kvm.c kvm_main_loop L2111"),
    Link("select", "vcpu", "kick:\nSIG_IPI", (3,),
         "qemu-kvm.c L71; on_vcpu L1530, kvm_update_interrupt_request L1582, "
         "pause_all_threads L1805; only unblocked inside KVM_RUN (setup_kernel_sigmask L1840)",
         style="bold"),
    Link("select", "aio", "request", (7, 10), "posix-aio-compat.c qemu_paio_submit"),
    Link("aio", "aiosigfd", "SIGUSR2", (7, 9, 10), "posix-aio-compat.c aio_thread L358"),
    Link("aiosigfd", "select", "readable", (7, 10), "posix-aio-compat.c paio_init L636"),
]

CHAPTERS = {
    1: ("01-hello", "/dev/kvm, one guest, its exits"),
    2: ("02-threads", "the threads of the process"),
    3: ("03-vcpu-thread", "vCPU threads, the global lock, kicks"),
    4: ("04-main-loop", "the io thread's select() loop"),
    5: ("05-event-pipe", "the event pipe and who writes it"),
    6: ("06-async-signals", "signals without the pipe"),
    7: ("07-signal-pipe", "the signal pipe"),
    8: ("08-signalfd", "signalfd or the signal thread"),
    9: ("09-after", "what became of each part"),
    10: ("10-iothread", "the AIO pool beside an IOThread, virtio-blk"),
    11: ("11-measurements", "what each path costs"),
    12: ("12-errata", "the article's errors, part by part"),
}

CLUSTERS = {
    "io": "io thread (the main thread)",
    "compat": "compat mode (no signalfd)",
    # Boxes of their own; as (invisible) clusters they keep dot's layout
    # narrow enough for the text column.
    "vcpu": "",
    "aio": "",
}

STRONG, FAINT = "#1f5fa8", "#b8b8b8"
FONT = "DejaVu Sans"


def _label(p: Part, marked: int | None) -> str:
    lines = [f'<B>{escape(p.title)}</B>']
    lines += [escape(s) for s in p.detail.split("\n")]
    if marked is None:
        lines.append(f'<FONT POINT-SIZE="11" COLOR="{STRONG}">chapters '
                     f'{", ".join(str(c) for c in p.chapters)}</FONT>')
    return "<" + "<BR/>".join(lines) + ">"


def dot(chapter: int | None = None, base: str = "") -> str:
    """The DOT source; ``chapter`` draws that chapter's parts strong, the rest faint.

    ``base`` is the relative path from the page to notebooks/ for the links.
    """
    def color(chs):
        return STRONG if chapter is None or chapter in chs else FAINT

    out = [
        "digraph qemu_kvm_0_12 {",
        f'  graph [rankdir=TB, fontname="{FONT}", fontsize=13, nodesep=0.35, ranksep=0.45, '
        'newrank=true, bgcolor="transparent", margin=0];',
        f'  node [fontname="{FONT}", fontsize=13, style="filled", fillcolor="white", margin="0.12,0.06"];',
        f'  edge [fontname="{FONT}", fontsize=12];',
    ]
    by_cluster: dict[str, list[Part]] = {}
    for p in PARTS:
        by_cluster.setdefault(p.cluster, []).append(p)

    def node(p: Part) -> str:
        c = color(p.chapters)
        first = CHAPTERS[p.chapters[0]][0]
        return (f'  {p.id} [label={_label(p, chapter)}, shape={p.shape}, color="{c}", '
                f'fontcolor="{"black" if c == STRONG else "#8a8a8a"}", penwidth={2 if c == STRONG else 1}, '
                f'tooltip="{escape(p.source)}", URL="{base}{first}.html", target="_top"];')

    for name, parts in by_cluster.items():
        if not name:
            out += [node(p) for p in parts]
            continue
        out.append(f"  subgraph cluster_{name} {{")
        if CLUSTERS[name]:
            out.append(f'    label="{CLUSTERS[name]}"; labeljust=l; style="rounded,dashed"; color="#666666";')
        else:
            out.append('    label=""; style=invis;')
        out += ["  " + node(p) for p in parts]
        out.append("  }")
    # The three fds in a row above the io thread that waits on them.
    out.append("  { rank=same; sigfd; eventpipe; aiosigfd; }")
    for ln in LINKS:
        c = color(ln.chapters)
        label = "\\n".join(escape(s, quote=True) for s in ln.label.split("\n"))
        out.append(f'  {ln.tail} -> {ln.head} [label="{label}", color="{c}", fontcolor='
                   f'"{"black" if c == STRONG else "#8a8a8a"}", style={ln.style}, '
                   f'tooltip="{escape(ln.source)}"];')
    out.append("}")
    return "\n".join(out)


def parts_of(chapter: int) -> list[str]:
    return ([p.title for p in PARTS if chapter in p.chapters]
            + [ln.label.split("\n")[0] for ln in LINKS if chapter in ln.chapters])


def default_alt(chapter: int | None) -> str:
    base = ("Diagram of qemu-kvm 0.12's process: the io thread waits in select() and holds the "
            "global lock qemu_mutex except around select(); one vCPU thread per vCPU runs the "
            "guest in KVM_RUN with the lock dropped; vCPU threads wake the io thread by writing "
            "the event pipe; SIGIO, SIGALRM and SIGBUS reach it through signalfd (or, in compat "
            "mode, through a signal thread and a pipe); the io thread kicks vCPU threads with "
            "SIG_IPI; AIO worker threads report with SIGUSR2 through a second signalfd.")
    if chapter is None:
        return base
    return base + f" Chapter {chapter}'s parts are drawn strong: " + "; ".join(parts_of(chapter)) + "."


class ProcessDrawing(SphinxDirective):
    option_spec = {"chapter": directives.positive_int, "caption": directives.unchanged,
                   "name": directives.unchanged}

    def run(self):
        from sphinx.ext.graphviz import figure_wrapper, graphviz

        chapter = self.options.get("chapter")
        # URLs in the DOT are relative to this page; sphinx.ext.graphviz
        # rewrites them for the SVG file's place in _images/.
        node = graphviz()
        base = posixpath.relpath("notebooks", posixpath.dirname(self.env.docname) or ".") + "/"
        node["code"] = dot(chapter, base=base)
        node["options"] = {"docname": self.env.docname}
        node["alt"] = default_alt(chapter)
        node["classes"] = ["qkio-process"]
        caption = self.options.get("caption") or (
            "qemu-kvm 0.12's process. Follow an arrow into the io thread's select(): every way "
            "to wake it is a file descriptor. Each box names the chapters that look at it and "
            "links to the first; hover over a box or arrow for the qemu-kvm 0.12.3 source it "
            "comes from." if chapter is None else
            f"Chapter {chapter}'s parts of qemu-kvm 0.12's process, drawn strong; the rest of the "
            "process is faint. The full drawing, with every chapter, is on the landing page.")
        node["caption"] = caption
        fig = figure_wrapper(self, node, caption)
        self.add_name(fig)
        return [fig]


class ProcessLegend(SphinxDirective):
    """A list: chapter -> what it looks at in the drawing."""

    def run(self):
        items = nodes.bullet_list()
        for n, (doc, what) in CHAPTERS.items():
            para = nodes.paragraph()
            ref = addnodes.pending_xref("", refdomain="std", reftype="doc",
                                        reftarget=f"/notebooks/{doc}", refexplicit=True,
                                        refdoc=self.env.docname)
            ref += nodes.inline("", f"Chapter {n}")
            para += ref
            para += nodes.Text(f" ({what}): " + ", ".join(parts_of(n)) + ".")
            items += nodes.list_item("", para)
        return [items]


def setup(app):
    app.setup_extension("sphinx.ext.graphviz")
    app.add_directive("qkio-process", ProcessDrawing)
    app.add_directive("qkio-process-legend", ProcessLegend)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
