"""MkDocs hooks of the book: everything the site generates at build time.

Nothing is written into docs/; the generated files are added to the build with MkDocs'
``File.generated`` (figures and executed notebooks are cached in .cache/, and notebooks are
staged as ordinary files for mkdocs-jupyter, see ``_staged_notebook``):

* figures: a page that shows ``figures/ch01_backprop.plot_training.svg`` gets the SVG
  drawn by calling ``plot_training()`` of code/ch01_backprop.py (matplotlib);
* notebooks: each chapter as a Jupyter notebook, executed (mkdocs-jupyter renders it);
* starters: each chapter's module with its exercise bodies removed;
* MathJax: copied from the django-static-mathjax package, so math needs no CDN.

Every chapter page gets a line of links to its notebook, Colab and its starter file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_pages  # noqa: E402
import starter  # noqa: E402

log = logging.getLogger("mkdocs.hooks.book")
FIGURE_REF = re.compile(r"figures/(?P<module>ch\d\d_\w+)\.(?P<function>plot_\w+)\.svg")
CHAPTERS = "chapters/"


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _code_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sorted(book_pages.CODE_DIR.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


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
    """The SVG of ``module.function()``, drawn once per version of code/."""
    out = book_pages.CACHE_DIR / "figures" / _code_fingerprint() / f"{module}.{function}.svg"
    if out.exists():
        return out
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "llm-from-scratch"  # reproducible SVG ids
    log.info("drawing figure %s.%s()", module, function)
    figure = getattr(_fresh_module(module), function)()
    with book_pages.atomic_write(out) as tmp:
        figure.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return out


# ---------------------------------------------------------------------------
# Notebooks
# ---------------------------------------------------------------------------


_serving = False  # under `mkdocs serve`, an edit must not wait for a notebook to run


def on_startup(command, dirty):
    global _serving
    _serving = command == "serve"


def executed_notebook(page: Path) -> Path | None:
    """The executed notebook of a page: from the cache that the tests fill, else run now.

    Under `mkdocs serve`, an older executed notebook of the page is shown instead, if there
    is one, so editing a page stays fast; `mkdocs build` and the tests always run it."""
    blocks = book_pages.page_blocks(page)
    if not blocks:
        return None
    nb = book_pages.page_notebook(page, blocks)
    path = book_pages.cached_notebook_path(page, book_pages.notebook_key(nb))
    if path.exists():
        return path
    older = sorted(book_pages.NOTEBOOK_CACHE.glob(f"{page.stem}-*.ipynb"), key=lambda p: p.stat().st_mtime)
    if _serving and older:
        log.info("showing an older run of the notebook of %s (run pytest to refresh it)", page.name)
        return older[-1]
    log.info("executing the notebook of %s (not in .cache/notebooks)", page.name)
    book_pages.save_executed(path, book_pages.execute_notebook(nb))
    return path


# ---------------------------------------------------------------------------
# MkDocs events
# ---------------------------------------------------------------------------


STAGING = book_pages.CACHE_DIR / "site-files"


def _staged_notebook(config, uri: str, path: Path) -> File:
    """A notebook as a MkDocs file, copied to ``STAGING / uri``.

    Not ``File.generated``: mkdocs-jupyter 0.26 wraps each notebook in a file object that
    recomputes ``abs_src_path`` from ``src_dir``, which a generated file lacks, so the page
    would have no source. And it publishes the .ipynb under its source's own name, which the
    copy gives: notebooks/<stem>/<stem>.ipynb, the address the download link uses."""
    staged = STAGING / uri
    staged.parent.mkdir(parents=True, exist_ok=True)
    if not staged.exists() or staged.read_bytes() != path.read_bytes():
        staged.write_bytes(path.read_bytes())
    return File(
        uri, src_dir=str(STAGING), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]
    )


@event_priority(100)  # before mkdocs-jupyter, which turns the .ipynb files into pages
def on_files(files, config):
    docs = Path(config["docs_dir"])

    mathjax = Path(importlib.util.find_spec("mathjax").origin).parent / "static/mathjax/es5"
    mathjax_js = str(mathjax / "tex-svg.js")
    files.append(File.generated(config, "assets/mathjax/tex-svg.js", abs_src_path=mathjax_js))

    figures = set()
    for page in sorted(docs.rglob("*.md")):
        for match in FIGURE_REF.finditer(page.read_text(encoding="utf-8")):
            figures.add((match["module"], match["function"]))
    for module, function in sorted(figures):
        svg = draw_figure(module, function)
        files.append(File.generated(config, f"figures/{module}.{function}.svg", abs_src_path=str(svg)))

    for page in sorted((docs / CHAPTERS).glob("*.md")):
        notebook = executed_notebook(page)
        if notebook is not None:
            files.append(_staged_notebook(config, f"notebooks/{page.stem}.ipynb", notebook))
        module = book_pages.CODE_DIR / f"{page.stem}.py"
        if module.exists() and starter.find_exercises(module.read_text(encoding="utf-8")):
            content = starter.starter_for(page.stem)
            files.append(File.generated(config, f"starters/{page.stem}.py", content=content))
    return files


def on_page_markdown(markdown: str, page, config, files):
    """Under a chapter's title: links to its notebook, Colab and starter file."""
    if not page.file.src_uri.startswith(CHAPTERS):
        return markdown
    stem = Path(page.file.src_uri).stem
    links = []
    if files.get_file_from_path(f"notebooks/{stem}.ipynb"):
        links.append(f"[:material-notebook-outline: Notebook with outputs](../notebooks/{stem}.ipynb)")
        links.append(
            f'<a href="../notebooks/{stem}/{stem}.ipynb" download>:material-download: Download .ipynb</a>'
        )
        repo = config["extra"]["repository"]
        colab = f"https://colab.research.google.com/github/{repo}/blob/gh-pages/notebooks/{stem}/{stem}.ipynb"
        links.append(f'<a href="{colab}">:simple-googlecolab: Open in Colab</a>')
    if files.get_file_from_path(f"starters/{stem}.py"):
        links.append(
            f'<a href="../starters/{stem}.py" download>:material-pencil-outline: Starter file for the exercises</a>'
        )
    if not links:
        return markdown
    line = '<p class="book-links" markdown>' + " ".join(links) + "</p>"
    title, sep, rest = markdown.partition("\n")
    return f"{title}\n\n{line}\n{rest}" if title.startswith("# ") else f"{line}\n\n{markdown}"
