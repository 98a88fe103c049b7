"""MkDocs hooks of the book: everything the site generates at build time.

Nothing is written into docs/; the generated files are added to the build with MkDocs'
``File.generated`` (figures and executed notebooks are cached in .cache/, and notebooks are
staged as ordinary files for mkdocs-jupyter, see ``_staged_notebook``):

* figures: a page that shows ``figures/ch01_backprop.plot_training.svg`` gets the SVG
  drawn by calling ``plot_training()`` of code/ch01_backprop.py (matplotlib);
* notebooks: each chapter as a Jupyter notebook, executed (mkdocs-jupyter renders it);
* outputs: under each code block of a chapter page, what it printed, returned or drew,
  taken from that executed notebook (``render_outputs``);
* starters: each chapter's module with its exercise bodies removed;
* MathJax: copied from the django-static-mathjax package, so math needs no CDN.

Every chapter page gets a line of links to its notebook, Colab and its starter file; every
notebook page a link to download its .ipynb.

``mkdocs build`` is complete and strict: it draws every figure and executes every notebook
that .cache/ lacks, one at a time with progress lines, before it renders a page, and a page
whose notebook does not match its current code blocks fails the build.

``mkdocs serve`` shows the book at once, even on a fresh clone with an empty .cache/: one
background thread (``Background``) draws the missing figures and executes the missing
notebooks, one at a time, page by page in the order of the book (a page's figures, then its
notebook). Until a figure is drawn the page shows a placeholder SVG saying so; until a
notebook has run, its page shows the notebook of an older version of the page if .cache/
has one (and says so), else a note that its outputs appear once the notebook has run; such
a notebook gets no notebook page until then (mkdocs-jupyter takes 2-8 s of CPU to convert
one chapter's notebook, about a minute for all of them, which is more than the first serve
may take). Placeholders rather than drawing figures first: a figure may train a model for
many seconds, and the reader should not wait for any of that before reading. Each finished
job touches ``READY``, which the server watches, so the pages rebuild and fill in.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import html
import importlib.util
import itertools
import logging
import os
import posixpath
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.utils import get_relative_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_editions  # noqa: E402
import book_pages  # noqa: E402
import starter  # noqa: E402

log = logging.getLogger("mkdocs.hooks.book")
FIGURE_REF = re.compile(r"figures/(?P<module>ch\d\d_\w+)\.(?P<function>plot_\w+)\.svg")
CHAPTERS = "chapters/"
READY = book_pages.CACHE_DIR / "serve" / "ready"  # touched when a background job is done
DATA_DIR = book_pages.DOCS_DIR / "data"  # stored run summaries that some figures read

_serving = False  # under `mkdocs serve`, nothing slow may run before the pages are served


def on_startup(command, dirty):
    global _serving
    _serving = command == "serve"


def on_serve(server, config, builder):
    READY.parent.mkdir(parents=True, exist_ok=True)
    READY.touch()
    server.watch(str(READY.parent))
    background.start()  # after the watch: no finished job can go unnoticed
    return server


def _log_progress(what: str, started: float) -> None:
    log.info("%s (%.0f s)", what, time.monotonic() - started)


# ---------------------------------------------------------------------------
# Background work under `mkdocs serve`
# ---------------------------------------------------------------------------


class Background:
    """One thread that runs slow jobs one at a time. It touches READY when it has finished
    the jobs of a page (``group``), so the server rebuilds once per page, not once per job."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.waiting: set[str] = set()  # names of the jobs queued or running
        self.failed: dict[str, str] = {}  # name -> error, not retried until the name changes
        self.done = 0
        self.thread: threading.Thread | None = None
        self.started = time.monotonic()

    def submit(self, name: str, job, group: str = "") -> None:
        if name in self.waiting or name in self.failed:
            return
        self.waiting.add(name)
        self.jobs.put((name, job, group))

    def _next_group(self) -> str | None:
        with self.jobs.mutex:
            return self.jobs.queue[0][2] if self.jobs.queue else None

    def start(self) -> None:
        if self.thread is None:
            self.started = time.monotonic()
            self.thread = threading.Thread(target=self._run, name="book-background", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            name, job, group = self.jobs.get()
            began = time.monotonic()
            try:
                job()
            except Exception as error:  # shown on the page; the server keeps running
                self.failed[name] = f"{type(error).__name__}: {error}"
                log.error("background: %s failed: %s", name, self.failed[name])
            self.waiting.discard(name)
            self.done += 1
            log.info("background: %s done in %.0f s; %d done, %d left (%.0f s since serve started)",
                     name, time.monotonic() - began, self.done, len(self.waiting),
                     time.monotonic() - self.started)
            if self._next_group() != group:  # the page is complete: rebuild
                READY.parent.mkdir(parents=True, exist_ok=True)
                READY.write_text(f"{name}\n", encoding="utf-8")


background = Background()


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def figure_key(module: str) -> str:
    """A hash of what a module's figures depend on: its source, the sources of the book
    modules it imports, and the stored run summaries in docs/data/."""
    digest = hashlib.sha256()
    for name in book_pages.book_modules_needed(f"import {module}"):
        digest.update(name.encode() + book_pages.book_module_source(name).encode())
    for path in sorted(DATA_DIR.glob("*")) if DATA_DIR.is_dir() else []:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def figure_path(module: str, function: str) -> Path:
    return book_pages.CACHE_DIR / "figures" / figure_key(module) / f"{module}.{function}.svg"


def _fresh_module(name: str):
    """Import code/<name>.py anew, so an edited plot is redrawn under `mkdocs serve`."""
    sys.path.insert(0, str(book_pages.CODE_DIR))
    try:
        for loaded in [m for m in sys.modules if re.fullmatch(r"ch\d\d_\w+", m)]:
            del sys.modules[loaded]  # its book imports too, so they are fresh as well
        return book_pages.load_module(name, book_pages.CODE_DIR / f"{name}.py")
    finally:
        sys.path.remove(str(book_pages.CODE_DIR))


def draw_figure(module: str, function: str) -> Path:
    """The SVG of ``module.function()``, drawn once per version of what it depends on."""
    out = figure_path(module, function)
    if out.exists():
        return out
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "llm-from-scratch"  # reproducible SVG ids
    figure = getattr(_fresh_module(module), function)()
    with book_pages.atomic_write(out) as tmp:
        figure.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return out


def draw_figure_apart(module: str, function: str) -> None:
    """``draw_figure`` in a process of its own, at low priority: in the server's process a
    figure that trains a model would hold the GIL and stall the rebuilds of the pages."""
    command = [sys.executable, __file__, "draw", module, function]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=lambda: os.nice(10))
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])


def placeholder_svg(module: str, function: str) -> str:
    """What `mkdocs serve` shows while the background thread draws the figure."""
    text = html.escape(f"figure {module}.{function}() is being drawn; the page reloads when it is ready")
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="640" height="120" viewBox="0 0 640 120">'
        '<rect x="1" y="1" width="638" height="118" fill="none" stroke="#999" stroke-dasharray="6 4"/>'
        f'<text x="320" y="65" font-family="sans-serif" font-size="13" text-anchor="middle" '
        f'fill="#666">{text}</text></svg>'
    )


# ---------------------------------------------------------------------------
# Notebooks
# ---------------------------------------------------------------------------


def page_notebook_state(page: Path):
    """``(blocks, nb, fresh)``: a page's python blocks, its unexecuted notebook and the cache
    path of its executed copy (which may not exist yet); ``nb`` is None without blocks."""
    blocks = book_pages.page_blocks(page)
    if not blocks:
        return blocks, None, None
    nb = book_pages.page_notebook(page, blocks)
    return blocks, nb, book_pages.cached_notebook_path(page, book_pages.notebook_key(nb))


def read_notebook(path: Path):
    """A notebook the book wrote itself, read without nbformat's schema validation (slow on
    large notebooks, and every build reads each chapter's)."""
    import nbformat

    return nbformat.v4.reads(path.read_text(encoding="utf-8"))


def older_notebook(page: Path) -> Path | None:
    """The most recent executed notebook of an earlier version of ``page``, if any."""
    older = sorted(book_pages.NOTEBOOK_CACHE.glob(f"{page.stem}-*.ipynb"), key=lambda p: p.stat().st_mtime)
    return older[-1] if older else None


def execute_into_cache(page: Path, nb, path: Path) -> None:
    """Run a page's notebook and store it where the tests store it; log progress."""
    started = time.monotonic()
    last = [started]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 10 or done == total:
            last[0] = time.monotonic()
            _log_progress(f"executing the notebook of {page.name}: cell {done}/{total}", started)

    niceness = 10 if _serving else 0  # the server's rebuilds come first
    book_pages.save_executed(path, book_pages.execute_notebook(nb, progress, niceness))


# ---------------------------------------------------------------------------
# Outputs under the code blocks of a chapter page
# ---------------------------------------------------------------------------

MAX_OUTPUT_LINES = 40  # longer outputs show their first and last lines
MAX_LINE_CHARS = 300
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PLACEHOLDER = "BOOKOUTPUTPLACEHOLDER{}X"
PLACEHOLDER_HTML = re.compile(r"<p>BOOKOUTPUTPLACEHOLDER(\d+)X</p>")


class StaleOutputs(ValueError):
    """The executed notebook does not belong to the page's current code blocks."""


def _clean_text(text: str) -> str:
    """Terminal text as it finally looks: colour codes dropped, ``\\r`` progress overwritten."""
    lines = [line.rsplit("\r", 1)[-1] for line in ANSI.sub("", text).replace("\r\n", "\n").split("\n")]
    return "\n".join(lines)


def _shorten(text: str) -> str:
    lines = [line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " …" for line in text.split("\n")]
    if len(lines) > MAX_OUTPUT_LINES:
        head, tail = MAX_OUTPUT_LINES * 3 // 4, MAX_OUTPUT_LINES // 4
        skipped = len(lines) - head - tail
        note = f"… {skipped} more lines (the notebook has the full output) …"
        lines = lines[:head] + [note] + lines[-tail:]
    return "\n".join(lines)


def _pre(kind: str, text: str) -> str:
    return f'<pre class="book-output-{kind}">{html.escape(_shorten(_clean_text(text).rstrip()))}</pre>'


def output_html(outputs: list) -> str:
    """One code cell's outputs as HTML: streams, the value it returned, errors, figures."""
    parts = []  # (kind, text or HTML)
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream":
            stream = "stderr" if output.get("name") == "stderr" else "stdout"
            if parts and parts[-1][0] == stream:  # one box per run of the same stream
                parts[-1] = (stream, parts[-1][1] + output["text"])
            else:
                parts.append((stream, output["text"]))
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            if "image/png" in data:
                png = "".join(data["image/png"]).replace("\n", "")
                base64.b64decode(png, validate=True)  # a corrupt image fails here, not in the browser
                parts.append(("html", '<img class="book-output-figure" alt="figure drawn by the code above" '
                                      f'src="data:image/png;base64,{png}">'))
            elif "<table" in "".join(data.get("text/html", "")):  # tables the code builds itself
                parts.append(("html", f'<div class="book-output-html">{"".join(data["text/html"])}</div>'))
            elif "text/plain" in data:
                parts.append(("result", "".join(data["text/plain"])))
        elif kind == "error":
            traceback = output.get("traceback") or [f"{output.get('ename')}: {output.get('evalue')}"]
            parts.append(("error", "\n".join(traceback)))
    if not parts:
        return ""
    body = "".join(text if kind == "html" else _pre(kind, text) for kind, text in parts)
    return f'<div class="book-output"><div class="book-output-label">Output</div>{body}</div>'



def block_outputs(blocks: list, nb, stale_ok: bool, page: str) -> dict[int, str]:
    """The output HTML of each block (keyed by its line on the page) from an executed notebook.

    A notebook whose code cells are the page's blocks gives every block its outputs. Any other
    notebook is stale: with ``stale_ok`` (`mkdocs serve`), blocks whose code is unchanged get
    their old outputs; without it (`mkdocs build`), StaleOutputs is raised."""
    cells = [c for c in nb.cells if c.cell_type == "code" and not c.metadata.get("book_setup")]
    sources = [c.source.rstrip("\n") for c in cells]
    codes = [b.code for b in blocks]
    if sources != codes and not stale_ok:
        first = next(b.lineno for b, s in itertools.zip_longest(blocks, sources) if b is None or b.code != s)
        raise StaleOutputs(f"{page}: the executed notebook is not the one of the page's current code "
                           f"blocks (first difference at line {first}); its outputs would be stale")
    matched = {}
    for match in difflib.SequenceMatcher(a=codes, b=sources, autojunk=False).get_matching_blocks():
        for offset in range(match.size):
            matched[blocks[match.a + offset].lineno] = output_html(cells[match.b + offset].get("outputs", []))
    return {line: text for line, text in matched.items() if text}


def insert_placeholders(markdown: str, line_offset: int, outputs: dict[int, str], page: str):
    """Put a placeholder paragraph after the closing fence of each block that has outputs,
    at the fence's indentation (so it stays inside an admonition or a tab). ``line_offset``:
    lines of the page file that are not in ``markdown`` (front matter). Returns the new
    Markdown and the HTML of each placeholder, which ``on_page_content`` swaps in."""
    lines = markdown.split("\n")
    after: dict[int, str] = {}  # index of a closing fence -> placeholder line
    replacements = {}
    for number, (lineno, text) in enumerate(sorted(outputs.items())):
        start = lineno - 1 - line_offset
        fence = re.match(r"^(\s*)(`{3,})python\b", lines[start]) if 0 <= start < len(lines) else None
        if fence is None:
            raise ValueError(f"{page}: line {lineno} is not the opening fence of a python block")
        indent, ticks = fence.groups()
        end = next(i for i in range(start + 1, len(lines))
                   if lines[i].strip().startswith(ticks) and set(lines[i].strip()) == {"`"})
        token = PLACEHOLDER.format(number)
        after[end] = f"\n{indent}{token}\n"
        replacements[token] = text
    out = []
    for index, line in enumerate(lines):
        out.append(line)
        if index in after:
            out.append(after[index])
    return "\n".join(out), replacements


def render_outputs(markdown: str, line_offset: int, blocks: list, nb, stale_ok: bool, page: str):
    """``(markdown, replacements)``: ``markdown`` with a placeholder under each block that has
    outputs in ``nb``, and the HTML that replaces each placeholder in the rendered page."""
    return insert_placeholders(markdown, line_offset, block_outputs(blocks, nb, stale_ok, page), page)


def fill_placeholders(content: str, replacements: dict[str, str]) -> str:
    def swap(match):
        return replacements.pop(PLACEHOLDER.format(match[1]))

    content = PLACEHOLDER_HTML.sub(swap, content)
    if replacements:
        raise ValueError(f"{len(replacements)} code outputs found no place on the page "
                         "(a python fence inside a construct whose Markdown is not rendered?)")
    return content


# ---------------------------------------------------------------------------
# MkDocs events
# ---------------------------------------------------------------------------


STAGING = book_pages.CACHE_DIR / "site-files"
NOTES = {
    "running": "The code on this page is still being executed (`mkdocs serve` runs it in the "
               "background); its outputs appear once the notebook has run, and the page reloads.",
    "older": "The outputs on this page are from an older version of its code (`mkdocs serve` "
             "is running the current one in the background; the page reloads when it is done).",
    "failed": "The code of this page failed to run, so it shows no outputs: {error}. "
              "Run `pytest {page}` to see where.",
}
_chapters: dict[str, dict] = {}  # page stem -> what on_files learned about its notebook


def _note(state: dict, page: Path) -> str:
    error = html.escape((state.get("error") or "").split("\n")[0])
    return NOTES[state["kind"]].format(error=error, page=f"docs/{CHAPTERS}{page.name}")


def _staged_notebook(config, uri: str, path: Path | None = None, nb=None) -> File:
    """A notebook as a MkDocs file, copied to ``STAGING / uri`` (from ``path``, or ``nb`` itself).

    Not ``File.generated``: mkdocs-jupyter 0.26 wraps each notebook in a file object that
    recomputes ``abs_src_path`` from ``src_dir``, which a generated file lacks, so the page
    would have no source. And it publishes the .ipynb under its source's own name, which the
    copy gives: notebooks/<stem>/<stem>.ipynb, the address the download link uses."""
    import nbformat

    content = path.read_bytes() if nb is None else nbformat.writes(nb).encode("utf-8")
    staged = STAGING / uri
    staged.parent.mkdir(parents=True, exist_ok=True)
    if not staged.exists() or staged.read_bytes() != content:
        staged.write_bytes(content)
    return File(
        uri, src_dir=str(STAGING), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]
    )


def _with_note(nb, note: str):
    import nbformat

    nb = nbformat.from_dict(nb)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(f"> **Note.** {note}"))
    return nb


def _figures_of(page: Path) -> list[tuple[str, str]]:
    found = FIGURE_REF.finditer(page.read_text(encoding="utf-8"))
    return list(dict.fromkeys((match["module"], match["function"]) for match in found))


def _add_figures(files, config, figures: list[tuple[str, str]], group: str = "") -> None:
    missing = [f for f in figures if not figure_path(*f).exists()]
    started = time.monotonic()
    for module, function in figures:
        uri = f"figures/{module}.{function}.svg"
        if _serving and (module, function) in missing:
            name = f"figure {module}.{function}() [{figure_key(module)}]"
            background.submit(name, lambda m=module, f=function: draw_figure_apart(m, f), group)
            files.append(File.generated(config, uri, content=placeholder_svg(module, function)))
            continue
        if (module, function) in missing:
            number = missing.index((module, function)) + 1
            _log_progress(f"drawing figure {number}/{len(missing)}: {module}.{function}()", started)
        files.append(File.generated(config, uri, abs_src_path=str(draw_figure(module, function))))
    if missing and not _serving:
        _log_progress(f"drew {len(missing)} figures", started)


def _add_notebook(files, config, page: Path, pending: list) -> None:
    """The page's notebook (executed, older or pending); remember which for its page."""
    blocks, nb, fresh = page_notebook_state(page)
    if nb is None:
        return
    uri = f"notebooks/{page.stem}.ipynb"
    state = {"blocks": blocks}
    if fresh.exists():
        state.update(kind="fresh", path=fresh)
        files.append(_staged_notebook(config, uri, fresh))
    elif not _serving:
        pending.append((page, nb, fresh, uri, state))  # executed below, in order
        _chapters[page.stem] = state
        return
    else:
        name = f"notebook of {page.name} [{fresh.stem.rsplit('-', 1)[1]}]"
        background.submit(name, lambda: execute_into_cache(page, nb, fresh), page.name)
        older = older_notebook(page)
        error = background.failed.get(name)
        kind = "failed" if error else "older" if older else "running"
        state.update(kind=kind, error=error, path=older)
        if older:  # a notebook that never ran is not published: converting it costs seconds
            files.append(_staged_notebook(config, uri, nb=_with_note(read_notebook(older), _note(state, page))))
    _chapters[page.stem] = state


@event_priority(100)  # before mkdocs-jupyter, which turns the .ipynb files into pages
def on_files(files, config):
    docs = Path(config["docs_dir"])

    mathjax = Path(importlib.util.find_spec("mathjax").origin).parent / "static/mathjax/es5"
    mathjax_js = str(mathjax / "tex-svg.js")
    files.append(File.generated(config, "assets/mathjax/tex-svg.js", abs_src_path=mathjax_js))

    # Pages in the order of the book, so that under `mkdocs serve` the first ones fill in first.
    pages = [docs / "index.md"] + sorted((docs / CHAPTERS).glob("*.md"))
    pages += sorted(set(docs.rglob("*.md")) - set(pages))
    chapters = docs / CHAPTERS.rstrip("/")
    if _serving:  # queue each page's figures before its notebook
        seen: set = set()
        for page in pages:
            _add_figures(files, config, [f for f in _figures_of(page) if f not in seen], page.name)
            seen.update(_figures_of(page))
            if page.parent == chapters:
                _add_notebook(files, config, page, [])
    else:
        _add_figures(files, config, list(dict.fromkeys(f for page in pages for f in _figures_of(page))))
        pending: list = []
        for page in pages:
            if page.parent == chapters:
                _add_notebook(files, config, page, pending)
        started = time.monotonic()
        for number, (page, nb, fresh, uri, state) in enumerate(pending, 1):
            _log_progress(f"executing notebook {number}/{len(pending)}: {page.name} (not in .cache/notebooks)",
                          started)
            execute_into_cache(page, nb, fresh)
            state.update(kind="fresh", path=fresh)
            files.append(_staged_notebook(config, uri, fresh))
        if pending:
            _log_progress(f"executed {len(pending)} notebooks", started)

    for page in sorted((docs / CHAPTERS).glob("*.md")):
        module = book_pages.CODE_DIR / f"{page.stem}.py"
        if module.exists() and starter.find_exercises(module.read_text(encoding="utf-8")):
            content = starter.starter_for(page.stem)
            files.append(File.generated(config, f"starters/{page.stem}.py", content=content))
    return files


def _download_url(files, stem: str) -> str | None:
    """Where mkdocs-jupyter publishes a chapter's .ipynb: beside its notebook page's HTML."""
    file = files.get_file_from_path(f"notebooks/{stem}.ipynb")
    return posixpath.join(posixpath.dirname(file.dest_uri), f"{stem}.ipynb") if file else None


def _link(page, files, path: str) -> str | None:
    """The address of the site file ``path`` relative to ``page``, if the site has it."""
    file = files.get_file_from_path(path)
    return get_relative_url(file.url, page.url) if file else None


def chapter_links(page, config, files) -> str:
    """The line of links under a chapter's title."""
    stem = Path(page.file.src_uri).stem
    links = []
    notebook = _link(page, files, f"notebooks/{stem}.ipynb")  # the notebook's page
    if notebook:
        download = get_relative_url(_download_url(files, stem), page.url)
        links.append(f'<a href="{notebook}">:material-notebook-outline: Notebook with outputs</a>')
        links.append(f'<a href="{download}" download>:material-download: Download .ipynb</a>')
        colab = book_editions.colab_url(config["extra"]["repository"], stem)
        links.append(f'<a href="{colab}">:simple-googlecolab: Open in Colab</a>')
    starter_file = _link(page, files, f"starters/{stem}.py")
    if starter_file:
        links.append(f'<a href="{starter_file}" download>'
                     ":material-pencil-outline: Starter file for the exercises</a>")
    return '<p class="book-links" markdown>' + " ".join(links) + "</p>" if links else ""


_replacements: dict[str, dict[str, str]] = {}  # page src_uri -> placeholder -> output HTML


def on_page_markdown(markdown: str, page, config, files):
    """Under a chapter's title: links to its notebook, Colab and starter file; under each
    code block: its outputs."""
    if not page.file.src_uri.startswith(CHAPTERS):
        return markdown
    stem = Path(page.file.src_uri).stem
    state = _chapters.get(stem)
    note = ""
    if state is not None:
        raw = Path(page.file.abs_src_path).read_text(encoding="utf-8-sig")
        offset = raw.count("\n") - markdown.count("\n")  # front matter that MkDocs removed
        if state.get("path") is not None:
            nb = read_notebook(state["path"])
            markdown, _replacements[page.file.src_uri] = render_outputs(
                markdown, offset, state["blocks"], nb, stale_ok=_serving, page=page.file.src_uri
            )
        if state["kind"] != "fresh":
            note = f'!!! warning "Outputs"\n    {_note(state, Path(page.file.src_uri))}\n'
    header = "\n\n".join(part for part in (chapter_links(page, config, files), note) if part)
    if not header:
        return markdown
    title, sep, rest = markdown.partition("\n")
    return f"{title}\n\n{header}\n{rest}" if title.startswith("# ") else f"{header}\n\n{markdown}"


def on_page_content(content: str, page, config, files):
    """Chapter pages: the outputs in place of their placeholders. Notebook pages: a link to
    download the .ipynb."""
    if page.file.src_uri in _replacements:
        return fill_placeholders(content, _replacements.pop(page.file.src_uri))
    if page.file.src_uri.startswith("notebooks/") and page.file.src_uri.endswith(".ipynb"):
        stem = Path(page.file.src_uri).stem
        download = get_relative_url(_download_url(files, stem), page.url)
        chapter = _link(page, files, f"{CHAPTERS}{stem}.md")
        links = [f'<a href="{download}" download>Download {stem}.ipynb</a>']
        if chapter:
            links.append(f'<a href="{chapter}">The chapter page</a>')
        _match_toc_to_headings(page.toc, re.findall(r'<h[1-6][^>]* id="([^"]+)"', content))
        return '<p class="book-links">' + " ".join(links) + "</p>\n" + content
    return content


def _match_toc_to_headings(toc, heading_ids: list[str]) -> None:
    """mkdocs-jupyter builds a notebook page's table of contents from its Markdown without
    inline code, so "Checking against `torch.nn.Transformer`" gets the id ``checking-against``
    while the heading's is ``checking-against-torchnntransformer``: point such entries at the
    heading whose id begins with theirs."""
    for item in toc:
        if item.id not in heading_ids:
            item.id = next((i for i in heading_ids if i.startswith(item.id)), item.id)
        _match_toc_to_headings(item.children, heading_ids)


if __name__ == "__main__":  # python hooks/book_mkdocs.py draw MODULE FUNCTION (draw_figure_apart)
    if sys.argv[1:2] != ["draw"] or len(sys.argv) != 4:
        sys.exit("usage: python hooks/book_mkdocs.py draw MODULE FUNCTION")
    print(draw_figure(sys.argv[2], sys.argv[3]))
