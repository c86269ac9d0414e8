"""Open every page of the built book in headless Chromium and check it.

For each HTML page in ``_build/html`` (``QKIO_BOOK_HTML`` to point elsewhere):
it loads; every ``<img>`` has been decoded (``naturalWidth > 0``) and is
displayed (has a box, not ``display: none`` / ``visibility: hidden``, unless it
sits in a closed ``<details>`` on purpose); no stylesheet, script or image
failed to load; and every link into the book resolves -- the file exists and,
if the link has a ``#fragment``, the target page has an element with that id.
Links to other sites are not followed (CI has no network). One more test checks
that every chapter in notebooks/ became a page and the root index.html
redirects to docs/index.html.

It uses Debian's /usr/bin/chromium over the DevTools protocol (CDP) with the
synchronous ``websocket-client`` package; no browser is downloaded. It is
skipped, saying why, when Chromium is missing or the book has not been built
(``scripts/build-book`` first: CI builds, then tests). It checks whatever is in
_build/html, so build before testing after a change.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = Path(os.environ.get("QKIO_BOOK_HTML", ROOT / "_build" / "html")).resolve()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

if CHROMIUM is None:
    pytest.skip("headless Chromium not found (Debian: apt-get install chromium; "
                "scripts/setup-env installs it)", allow_module_level=True)
if not (HTML / "docs" / "index.html").exists():
    pytest.skip(f"the book has not been built: no {HTML / 'docs' / 'index.html'} "
                "(run scripts/build-book first)", allow_module_level=True)
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (the 'test' extra)")

# Sphinx's own machinery pages under _static/ and the raw sources are not pages;
# the root index.html only redirects (test_root_redirects_to_landing_page).
PAGES = sorted(rel for rel in (p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html"))
               if not rel.startswith(("_static/", "_sources/")) and rel != "index.html")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900", "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


class Cdp:
    """The least of a Chrome DevTools Protocol client: call a method, wait for an event."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.last_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.last_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev["method"] == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            finally:
                self.ws.settimeout(60)
            if msg.get("method") == method:
                return msg
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def browser():
    with tempfile.TemporaryDirectory(prefix="qkio-chromium-") as profile:
        proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
                if proc.poll() is not None:
                    pytest.fail(f"{CHROMIUM} exited with status {proc.returncode} before opening DevTools")
                if time.monotonic() > deadline:
                    pytest.fail(f"{CHROMIUM} did not open its DevTools port within 60 s")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = [t for t in json.load(r) if t["type"] == "page"]
            cdp = Cdp(targets[0]["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Log"):
                cdp.call(f"{domain}.enable")
            yield cdp
            cdp.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load(cdp: Cdp, page: str) -> dict:
    """Navigate to a page, wait until it and its images are loaded, return what we check."""
    cdp.events.clear()
    cdp.call("Page.navigate", url=(HTML / page).as_uri())
    cdp.wait_for("Page.loadEventFired")
    return cdp.evaluate(r"""
    (async () => {
      const imgs = [...document.images];
      for (const img of imgs) img.loading = "eager";
      await Promise.all(imgs.map(img => img.decode().catch(() => null)));
      const shown = el => {
        const s = getComputedStyle(el), r = el.getBoundingClientRect();
        return s.display !== "none" && s.visibility !== "hidden" && r.width > 0 && r.height > 0;
      };
      return {
        url: location.href,
        title: document.title,
        h1: [...document.querySelectorAll("main h1, article h1")].map(h => h.textContent.trim()),
        text: (document.querySelector("main") || document.body).innerText.length,
        images: imgs.map(img => ({
          src: img.currentSrc || img.src,
          naturalWidth: img.naturalWidth,
          shown: shown(img),
          inClosedDetails: !!img.closest("details:not([open])"),
        })),
        links: [...document.querySelectorAll("a[href]")].map(a => a.href),
        downloads: [...document.querySelectorAll("a.download, a[download]")].map(a => a.href),
        // The text column: the article's content box.  Anything inside it that
        // is wider, or that scrolls sideways, makes the reader scroll.
        ...(() => {
          const art = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
          const cs = getComputedStyle(art), ar = art.getBoundingClientRect();
          const left = ar.left + parseFloat(cs.paddingLeft), right = ar.right - parseFloat(cs.paddingRight);
          const describe = el => {
            const t = (el.innerText || "").trim().split("\n")[0].slice(0, 70);
            const id = el.closest("[id]");
            return `<${el.tagName.toLowerCase()}${id ? " in #" + id.id : ""}> "${t}"`;
          };
          const wide = [];
          for (const el of art.querySelectorAll("pre, table, div.cell_output, div.output, .highlight, .pst-scrollable-table-container, img, object, figure, .MathJax, mjx-container")) {
            if (!shown(el)) continue;
            const r = el.getBoundingClientRect();
            if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== "visible")
              wide.push(`${describe(el)} scrolls sideways (${el.scrollWidth} px of content in ${el.clientWidth} px)`);
            else if (r.right > right + 1 || r.left < left - 1)
              wide.push(`${describe(el)} is ${Math.round(r.width)} px wide, the column ${Math.round(right - left)} px`);
          }
          // Figures: images and embedded SVG drawings in the article.
          // (Icons, such as the module index's +/- toggles, are not figures.)
          const figures = [...art.querySelectorAll("img, object[type='image/svg+xml']")].filter(shown)
            .filter(el => { const r = el.getBoundingClientRect(); return r.width >= 48 && r.height >= 48; }).map(el => {
            const fig = el.closest("figure");
            const cap = fig && fig.querySelector("figcaption");
            const r = el.getBoundingClientRect();
            return {
              src: el.currentSrc || el.src || el.data,
              tag: el.tagName.toLowerCase(),
              alt: el.tagName === "IMG" ? (el.getAttribute("alt") || "") : (el.textContent || "").trim(),
              caption: cap ? cap.innerText.trim() : "",
              width: r.width, height: r.height,
              naturalWidth: el.naturalWidth || 0,
            };
          });
          // API pages: signatures, and parameters listed in field lists.
          const signatures = [...art.querySelectorAll("dt.sig")].map(d => d.innerText.replace(/\s+/g, " ").replace(/\s*¶$/, "").trim());
          const bareParams = [];
          for (const dt of art.querySelectorAll("dl.field-list > dt")) {
            if (!/^Param/i.test(dt.textContent.trim())) continue;
            for (const li of (dt.nextElementSibling ? dt.nextElementSibling.querySelectorAll("p") : []))
              if (!/\S\s+[–—-]\s+\S/.test(li.textContent)) bareParams.push(li.textContent.trim());
          }
          return {column: right - left, wide, figures, signatures, bareParams,
                  words: (art.innerText.match(/\S+/g) || []).length};
        })(),
        ids: [...document.querySelectorAll("[id], a[name]")].map(e => e.id || e.getAttribute("name")),
      };
    })()
    """)


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" or (tag == "a" and k == "name"):
                self.ids.add(v)


_ids_cache: dict[Path, set[str]] = {}


def ids_in(path: Path) -> set[str]:
    if path not in _ids_cache:
        parser = _Ids()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        _ids_cache[path] = parser.ids
    return _ids_cache[path]


def broken_links(page: str, info: dict) -> list[str]:
    here = (HTML / page).resolve()
    broken = []
    for href in sorted(set(info["links"])):
        url = urllib.parse.urlsplit(href)
        if url.scheme != "file":
            continue  # http(s), mailto, javascript: not ours to check offline
        target = Path(urllib.parse.unquote(url.path))
        frag = urllib.parse.unquote(url.fragment)
        if not target.is_relative_to(HTML):
            broken.append(f"{href}: points outside the book")
        elif not target.is_file():
            broken.append(f"{href}: no such file")
        elif frag and frag not in (set(info["ids"]) if target == here else ids_in(target)):
            broken.append(f"{href}: no element with id {frag!r} in {target.relative_to(HTML)}")
    return broken


MAX_WORDS = 8000
MIN_TEXT_PX = 10.0      # the smallest text of a figure, as drawn at column width
# A name with one leading underscore (not a dunder such as __init__), as a
# dotted component or a bare word: _trace.Tracer, qkio._x, _helper.
_PRIVATE = re.compile(r"(?<![\w])_(?!_)[A-Za-z]\w*")
_FILE_NAME = re.compile(r"^\S+\.(png|svg|jpe?g|gif|webp)$|^[\w.-]+$", re.I)


def svg_text_sizes(path: Path) -> tuple[float, list[float]]:
    """(viewBox width, font sizes of the text in it) of an SVG file.

    Graphviz and matplotlib (svg.fonttype: none, notebooks/matplotlibrc) both
    keep text as <text> with a font size in viewBox units, so how big the text
    is on screen is font size * drawn width / viewBox width.
    """
    root = ET.parse(path).getroot()
    vb = root.get("viewBox")
    width = float(vb.split()[2]) if vb else float(re.sub(r"[a-z]+$", "", root.get("width", "0")))
    sizes = []
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "text" or not "".join(el.itertext()).strip():
            continue
        style = el.get("style", "")
        m = (re.search(r"font-size:\s*([\d.]+)", style) or re.search(r"font:\s*(?:\w+\s+)*?([\d.]+)px", style))
        size = el.get("font-size") or (m.group(1) if m else None)
        if size is None:  # inherited from a <g>: look up the ancestors' attributes
            continue
        sizes.append(float(re.sub(r"[a-z]+$", "", size)))
    return width, sizes


def figure_problems(page: str, info: dict) -> list[str]:
    """Every figure: a caption and alt text that say something, and text legible at the width drawn."""
    problems = []
    for fig in info["figures"]:
        name = urllib.parse.unquote(urllib.parse.urlsplit(fig["src"]).path).rsplit("/", 1)[-1]
        what = f"figure {name}"
        alt = " ".join(fig["alt"].split())
        if len(alt.split()) < 4 or _FILE_NAME.match(alt) or name in alt:
            problems.append(f"{what}: alt text {alt[:60]!r} does not say what it shows")
        if len(fig["caption"].split()) < 4:
            problems.append(f"{what}: no caption saying what to see in it ({fig['caption']!r})")
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(fig["src"]).path))
        if path.suffix.lower() != ".svg":
            problems.append(f"{what}: a bitmap; draw it as SVG (text stays sharp and checkable)")
            continue
        width, sizes = svg_text_sizes(path)
        if not sizes or not width:
            continue
        smallest = min(sizes) * fig["width"] / width
        if smallest < MIN_TEXT_PX:
            problems.append(f"{what}: its smallest text is {smallest:.1f} px at the {fig['width']:.0f} px "
                            f"it is drawn (at least {MIN_TEXT_PX:.0f} px)")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_page(browser, page):
    info = load(browser, page)
    problems = []

    if not info["title"] or info["text"] < 20:
        problems.append(f"page looks empty (title {info['title']!r}, {info['text']} characters of text)")
    if page.startswith(("docs/", "notebooks/")) and not info["h1"]:
        problems.append("no <h1> in the page's main content")

    for img in info["images"]:
        if img["naturalWidth"] == 0:
            problems.append(f"image not loaded: {img['src']}")
        elif not img["shown"] and not img["inClosedDetails"]:
            problems.append(f"image not displayed: {img['src']}")

    problems += broken_links(page, info)
    problems += info["wide"]
    problems += figure_problems(page, info)
    if page.startswith("docs/api/"):
        for sig in info["signatures"]:
            private = sorted(set(_PRIVATE.findall(sig)))
            if private:
                problems.append(f"private name(s) {', '.join(private)} in the signature {sig[:100]!r}")
        for p in info["bareParams"]:
            problems.append(f"a parameter listed without a description: {p[:80]!r}")
    if info["words"] > MAX_WORDS:
        problems.append(f"{info['words']} words: split the page (at most {MAX_WORDS})")

    for ev in browser.events:
        if ev["method"] == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error":
            e = ev["params"]["entry"]
            problems.append(f"browser error ({e.get('source')}): {e.get('text')} {e.get('url', '')}".rstrip())
        elif ev["method"] == "Runtime.exceptionThrown":
            d = ev["params"]["exceptionDetails"]
            problems.append(f"uncaught script exception: {d.get('exception', {}).get('description') or d.get('text')}")

    if problems:
        pytest.fail(f"{page}:\n  " + "\n  ".join(problems), pytrace=False)


def test_root_redirects_to_landing_page(browser):
    browser.events.clear()
    browser.call("Page.navigate", url=(HTML / "index.html").as_uri())
    deadline = time.monotonic() + 15
    url = None
    while time.monotonic() < deadline:
        try:
            url = browser.evaluate("location.href")
        except RuntimeError as e:
            # Asked mid-redirect, the page we asked has just been replaced:
            # that is the redirect happening, so look again.
            if "navigated or closed" not in str(e):
                raise
            time.sleep(0.1)
            continue
        if url.endswith("/docs/index.html"):
            return
        time.sleep(0.1)
    pytest.fail(f"index.html did not redirect to docs/index.html (still at {url})")


def test_landing_page_shows_the_drawing(browser):
    """The drawing of qemu-kvm 0.12's process is on the landing page, seen, legible, whole."""
    info = load(browser, "docs/index.html")
    drawings = [f for f in info["figures"] if f["tag"] == "object" and f["src"].endswith(".svg")]
    assert drawings, "the landing page has no drawing (an <object> with an SVG from Graphviz)"
    d = drawings[0]
    assert d["width"] >= 0.9 * info["column"] and d["height"] > 300, \
        f"the drawing is {d['width']:.0f}x{d['height']:.0f} px in a {info['column']:.0f} px column"
    svg = Path(urllib.parse.unquote(urllib.parse.urlsplit(d["src"]).path))
    text = " ".join("".join(t.itertext()) for t in ET.parse(svg).getroot().iter()
                    if t.tag.endswith("text"))
    for part in ("select()", "KVM_RUN", "qemu_mutex", "event pipe", "signal pipe", "signalfd",
                 "signal thread", "SIG_IPI", "AIO workers", "SIGUSR2"):
        assert part in text, f"the drawing does not show {part!r}"
    assert not figure_problems("docs/index.html", {"figures": [d]})


@pytest.mark.parametrize("query, chapter", [("signalfd", "08-signalfd"), ("main_loop_wait", "04-main-loop"),
                                            ("event pipe", "05-event-pipe")])
def test_search_ranks_the_chapter_first(browser, query, chapter):
    """The book's own search, as a reader uses it: the chapter about the word comes first."""
    browser.events.clear()
    browser.call("Page.navigate", url=(HTML / "search.html").as_uri() + "?q=" + urllib.parse.quote(query))
    browser.wait_for("Page.loadEventFired")
    deadline = time.monotonic() + 30
    hrefs: list[str] = []
    while time.monotonic() < deadline:  # results come in one by one; wait for the summary line
        done = browser.evaluate('!!(document.querySelector("#search-results .search-summary") || {}).textContent')
        if done:
            break
        time.sleep(0.2)
    hrefs = browser.evaluate('[...document.querySelectorAll("#search-results li > a")].map(a => a.href)')
    assert hrefs, f"searching {query!r} found nothing"
    first = urllib.parse.urlsplit(hrefs[0]).path
    assert first.endswith(f"notebooks/{chapter}.html"), \
        f"searching {query!r}: the first result is {first}, not chapter {chapter}; top five: " + \
        ", ".join(urllib.parse.urlsplit(h).path.rsplit("/", 2)[-1] for h in hrefs[:5])


def test_every_chapter_is_a_page():
    chapters = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.md"))
    assert chapters, "no chapters in notebooks/"
    missing = [c for c in chapters if not (HTML / "notebooks" / f"{c}.html").is_file()]
    assert not missing, f"chapters not in the built book (stale build, or not in a toctree?): {missing}"


# A chapter draws a trace when its code calls plot_timeline; the page then
# offers that trace (Sphinx's {download} role copies it into _downloads/) and
# says where to open it.
TRACE_CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.md")
                        if "plot_timeline(" in p.read_text(encoding="utf-8"))


def test_some_chapters_draw_traces():
    assert TRACE_CHAPTERS, "no chapter calls plot_timeline: TRACE_CHAPTERS below checks nothing"


@pytest.mark.parametrize("chapter", TRACE_CHAPTERS)
def test_chapter_offers_its_trace(browser, chapter):
    """Each drawn trace can be downloaded as Chrome trace JSON, with a word on where to open it."""
    info = load(browser, f"notebooks/{chapter}.html")
    traces = [h for h in info["downloads"] if h.endswith(".trace.json")]
    assert traces, f"{chapter}: no download link to a .trace.json file"
    assert any(urllib.parse.urlsplit(h).netloc == "ui.perfetto.dev" for h in info["links"]), \
        f"{chapter}: the page does not say to open its trace at https://ui.perfetto.dev"
    for href in traces:
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(href).path))
        assert path.is_relative_to(HTML / "_downloads") and path.is_file(), f"{chapter}: {href} is not in _downloads"
        trace = json.loads(path.read_text(encoding="utf-8"))
        events = trace.get("traceEvents") if isinstance(trace, dict) else None
        assert events and any(e.get("ph") in ("B", "X") for e in events), \
            f"{chapter}: {path.name} has no traceEvents with slices"
