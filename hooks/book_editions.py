"""MkDocs hooks of the book's other editions: what a reader takes away from the site.

* one zip per chapter module, ``downloads/chNN_topic.zip``: the module and every book module
  it needs (its docstring's ``Needs:`` line), snippet markers removed, linked from its page;
* ``downloads/notebooks.zip``: every chapter's executed notebook and starter file;
* ``downloads/llm-from-scratch.pdf``: the whole book printed by headless Chromium from a
  print view of all its pages (``print.html``), with typeset math, figures and page numbers;
* ``colab_url``: where "Open in Colab" finds a chapter's notebook: on the repository's
  ``notebooks`` branch, which .github/workflows/pages.yml pushes from the built site.

The offline edition is Material's ``offline`` plugin (mkdocs.yml): the built site works from
file://. The zips are generated files of the build (deterministic: fixed timestamps, sorted
names); the PDF is printed after the build, only by ``mkdocs build`` and only where Chromium
(/usr/bin/chromium) and playwright are installed: elsewhere, or with BOOK_PDF=0 (a quicker
build), the build says so and goes on.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import posixpath
import re
import sys
import time
import zipfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_pages  # noqa: E402

log = logging.getLogger("mkdocs.hooks.book_editions")

NOTEBOOK_BRANCH = "notebooks"  # pushed by .github/workflows/pages.yml
PDF = "downloads/llm-from-scratch.pdf"
NOTEBOOKS_ZIP = "downloads/notebooks.zip"
PRINT_PAGE = "print.html"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SNIPPET_MARKER = re.compile(r"^[ \t]*# --8<-- \[(?:start|end):[\w-]+\][ \t]*\n", re.MULTILINE)
NEEDS_LINE = re.compile(r"^Needs: (?P<names>.*)$", re.MULTILINE)
NO_NEEDS = "nothing else from the book."


# ---------------------------------------------------------------------------
# Colab
# ---------------------------------------------------------------------------


def colab_url(repository: str, stem: str) -> str:
    """The Colab address of chapter ``stem``'s notebook. The Pages workflow pushes the built
    site's notebooks/<stem>.ipynb to the top of the ``notebooks`` branch of ``repository``
    ("owner/name", mkdocs.yml's extra.repository)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repository):
        raise ValueError(f"extra.repository must be 'owner/name' on GitHub, not {repository!r}")
    return f"https://colab.research.google.com/github/{repository}/blob/{NOTEBOOK_BRANCH}/{stem}.ipynb"


# ---------------------------------------------------------------------------
# Module downloads
# ---------------------------------------------------------------------------


def needs_of(module: str) -> list[str]:
    """The book modules that code/<module>.py needs to run, in chapter order: its book
    imports and theirs (the transitive closure)."""
    source = (book_pages.CODE_DIR / f"{module}.py").read_text(encoding="utf-8")
    return sorted(set(book_pages.book_modules_needed(source)) - {module})


def needs_line(module: str) -> str:
    """The ``Needs:`` line that code/<module>.py's docstring should carry."""
    return "Needs: " + (", ".join(needs_of(module)) + "." if needs_of(module) else NO_NEEDS)


def declared_needs(docstring: str) -> list[str] | None:
    """The modules named by a docstring's ``Needs:`` paragraph (None without one); a long
    list wraps onto the following lines."""
    match = NEEDS_LINE.search(docstring or "")
    if match is None:
        return None
    rest = docstring[match.end():].split("\n\n")[0]  # the paragraph's wrapped lines
    names = " ".join((match["names"] + rest).split())
    return [] if names == NO_NEEDS else [n.strip() for n in names.rstrip(".").split(",")]


def strip_markers(source: str) -> str:
    """A module without its ``# --8<-- [start:x]`` / ``[end:x]`` lines (the pages' snippets)."""
    return SNIPPET_MARKER.sub("", source)


def deterministic_zip(members: dict[str, bytes]) -> bytes:
    """A zip of ``members`` (name -> content) that is the same bytes on every build."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, members[name])
    return buffer.getvalue()


def module_zip(module: str) -> bytes:
    """code/<module>.py with every book module it needs, ready to copy into a project."""
    return deterministic_zip({
        f"{name}.py": strip_markers((book_pages.CODE_DIR / f"{name}.py").read_text(encoding="utf-8")).encode()
        for name in [module, *needs_of(module)]
    })


def module_zip_uri(module: str) -> str:
    return f"downloads/{module}.zip"


def notebooks_zip(files) -> bytes | None:
    """Every chapter's executed notebook and starter file, as the build publishes them."""
    members = {}
    for file in files:
        if re.fullmatch(r"notebooks/ch\d\d_\w+\.ipynb|starters/ch\d\d_\w+\.py", file.src_uri):
            members[file.src_uri] = file.content_bytes
    return deterministic_zip(members) if members else None


# ---------------------------------------------------------------------------
# MkDocs events: downloads and links
# ---------------------------------------------------------------------------


_command = "build"
_pdf_wanted = False


def on_startup(command, dirty):
    global _command
    _command = command


def pdf_tools_missing() -> str | None:
    """Why this build does not print the PDF, or None when it does."""
    if os.environ.get("BOOK_PDF") == "0":
        return "BOOK_PDF=0"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM}"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -r .ci/requirements.txt)"
    return None


def on_config(config):
    global _pdf_wanted
    missing = pdf_tools_missing()
    _pdf_wanted = _command == "build" and missing is None
    if _command == "build" and missing:
        log.info("not printing the PDF of the book: %s", missing)
    return config


@event_priority(50)  # after book_mkdocs.py adds notebooks and starters, before mkdocs-jupyter
def on_files(files, config):
    for path in sorted(book_pages.CODE_DIR.glob("ch[0-9][0-9]_*.py")):
        files.append(File.generated(config, module_zip_uri(path.stem), content=module_zip(path.stem)))
    bundle = notebooks_zip(files)
    if bundle is not None:
        files.append(File.generated(config, NOTEBOOKS_ZIP, content=bundle))
    return files


def _link_paragraph(markdown: str, links: list[str]) -> str:
    """``markdown`` with ``links`` at the end of the line of links under its title (which
    book_mkdocs.py writes), or on a new line there."""
    match = re.search(r'^<p class="book-links" markdown>.*(?=</p>$)', markdown, re.MULTILINE)
    if match:
        return markdown[: match.end()] + " " + " ".join(links) + markdown[match.end():]
    title, sep, rest = markdown.partition("\n")
    line = '<p class="book-links" markdown>' + " ".join(links) + "</p>"
    return f"{title}\n\n{line}\n{rest}" if title.startswith("# ") else f"{line}\n\n{markdown}"


@event_priority(-50)  # after book_mkdocs.py's line of links
def on_page_markdown(markdown: str, page, config, files):
    uri = page.file.src_uri
    if uri == "index.md":
        links = []
        if _pdf_wanted:
            links.append(f'<a href="{PDF}" download>:material-file-pdf-box: The whole book as a PDF</a>')
        if files.get_file_from_path(NOTEBOOKS_ZIP):
            links.append(f'<a href="{NOTEBOOKS_ZIP}" download>:material-folder-zip-outline: '
                         "All notebooks and starter files (.zip)</a>")
        return _link_paragraph(markdown, links) if links else markdown
    stem = Path(uri).stem
    if uri.startswith("chapters/") and files.get_file_from_path(module_zip_uri(stem)):
        link = (f'<a href="../{module_zip_uri(stem)}" download>:material-language-python: '
                f"{stem}.py with the modules it needs (.zip)</a>")
        return _link_paragraph(markdown, [link])
    return markdown


# ---------------------------------------------------------------------------
# The PDF: a print view of every page of the nav, printed by headless Chromium
# ---------------------------------------------------------------------------


_pages: dict[str, tuple[str, str]] = {}  # src_uri -> (page url, content html)
_nav_order: list[str] = []


def on_nav(nav, config, files):
    _nav_order[:] = [page.file.src_uri for page in nav.pages]
    return nav


@event_priority(-100)  # the page as published: after book_mkdocs.py has put in the outputs
def on_page_content(html: str, page, config, files):
    _pages[page.file.src_uri] = (page.url, html)
    return html


URL_ATTRIBUTE = re.compile(r'(?P<attr>\b(?:src|href))="(?P<url>[^"#][^"]*)"')


def rebase_links(html: str, page_url: str) -> str:
    """Relative src/href of a page at ``page_url`` rewritten relative to the site's root."""
    folder = posixpath.dirname(page_url)

    def rebase(match):
        url = match["url"]
        if re.match(r"^[a-z][a-z0-9+.-]*:|^/", url):
            return match[0]
        return f'{match["attr"]}="{posixpath.normpath(posixpath.join(folder, url))}"'

    return URL_ATTRIBUTE.sub(rebase, html)


PRINT_CSS = """
@page { size: A4; margin: 18mm 16mm 18mm 16mm; }
body { margin: 0; }
.md-typeset { font-size: 10.5pt; }
.book-page { break-before: page; }
.book-page:first-child { break-before: auto; }
.headerlink, .book-links, .md-clipboard, .md-code__nav { display: none !important; }
.md-typeset pre > code { white-space: pre-wrap; overflow-wrap: anywhere; }
.md-typeset img, .md-typeset svg { max-width: 100%; }
.md-typeset h1, .md-typeset h2, .md-typeset h3 { break-after: avoid; }
.md-typeset figure, .md-typeset .highlight, .md-typeset tr { break-inside: avoid; }
"""


def print_view(site_dir: Path, site_name: str) -> str:
    """One HTML page with every page of the nav in order, styled like the site."""
    stylesheets = sorted(p.relative_to(site_dir).as_posix() for p in site_dir.glob("assets/stylesheets/main.*.min.css"))
    stylesheets += ["stylesheets/book.css"] if (site_dir / "stylesheets/book.css").exists() else []
    links = "\n".join(f'<link rel="stylesheet" href="{href}">' for href in stylesheets)
    sections = []
    for uri in _nav_order:
        if uri not in _pages:
            continue
        url, html = _pages[uri]
        html = re.sub(r"<details(?=[\s>])(?![^>]*\bopen\b)", "<details open", html)
        sections.append(f'<section class="book-page" data-src="{uri}">\n{rebase_links(html, url)}\n</section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{site_name}</title>
{links}
<style>{PRINT_CSS}</style>
<script src="javascripts/mathjax.js"></script>
<script src="assets/mathjax/tex-svg.js"></script>
</head>
<body data-md-color-scheme="default" data-md-color-primary="indigo" data-md-color-accent="deep-orange">
<article class="md-content__inner md-typeset">
{"".join(sections)}
</article></body></html>
"""


FOOTER = ('<div style="font-size:8px;width:100%;text-align:center;color:#555">'
          '<span class="pageNumber"></span> / <span class="totalPages"></span></div>')


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def open_typeset(page, url: str):
    """Load ``url`` in the playwright ``page`` and wait until MathJax has typeset it all."""
    page.goto(url, wait_until="load", timeout=600_000)
    page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=120_000)
    page.evaluate("MathJax.startup.promise")
    return page


def print_pdf(html_path: Path, pdf_path: Path) -> None:
    """Print ``html_path`` to ``pdf_path`` once MathJax has typeset every formula."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        started = time.monotonic()
        page = open_typeset(browser.new_page(), html_path.as_uri())
        log.info("printing the PDF: %s typeset in %.0f s", html_path.name, time.monotonic() - started)
        page.emulate_media(media="print")
        with book_pages.atomic_write(pdf_path) as tmp:
            page.pdf(path=str(tmp), format="A4", print_background=True, display_header_footer=True,
                     header_template="<span></span>", footer_template=FOOTER,
                     margin={"top": "18mm", "bottom": "18mm", "left": "16mm", "right": "16mm"},
                     outline=True, tagged=True)
        browser.close()


def on_post_build(config):
    site_dir = Path(config["site_dir"])
    html_path = site_dir / PRINT_PAGE
    html_path.write_text(print_view(site_dir, config["site_name"]), encoding="utf-8")
    if not _pdf_wanted:
        return
    started = time.monotonic()
    print_pdf(html_path, site_dir / PDF)
    size = (site_dir / PDF).stat().st_size
    log.info("printed %s (%.1f MB) in %.0f s", PDF, size / 1e6, time.monotonic() - started)
