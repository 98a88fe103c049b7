"""A page of the book as code: its python blocks, its notebook, and running them.

The site build (book_mkdocs.py) and the tests (book_pytest.py) both use this module, so a
page's code is expanded and run the same way in both places:

* ``page_blocks(page)``: the page's ``python`` fences, with pymdownx.snippets expanded by
  the Snippets preprocessor built from mkdocs.yml itself.
* ``page_notebook(page)``: the page as a Jupyter notebook (jupytext), self-contained: a
  setup cell per book module the page imports writes that module next to the notebook.
* ``notebook_client(nb, workdir)``: runs a notebook with nbclient. The tests
  (book_pytest.py) run a page's blocks in one kernel, one item per block, and store the
  executed notebook in .cache/notebooks/; the site build publishes that notebook (or
  executes it itself when the cache has no copy), so CI runs each page once.

It also holds two small helpers of the build machinery: ``atomic_write`` and ``load_module``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import posixpath
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"
CODE_DIR = ROOT / "code"
CACHE_DIR = ROOT / ".cache"
NOTEBOOK_CACHE = CACHE_DIR / "notebooks"
CACHE_VERSION = "1"  # bump to invalidate every cached notebook

BOOK_MODULE_IMPORT = re.compile(r"^\s*(?:from|import)\s+(ch\d\d_\w+)", re.MULTILINE)
SKIP_MARK = re.compile(r"""^pytest\.mark\.skip\(reason=(?P<q>["'])(?P<reason>.+)(?P=q)\)$""")


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


@dataclass
class Block:
    """One executed code fence of a page."""

    lineno: int  # line of the opening fence in the page (1-based)
    code: str  # with snippets expanded
    skip_reason: str | None = None


@functools.cache
def site_config():
    """mkdocs.yml, as MkDocs reads it."""
    from mkdocs.config import load_config

    return load_config(str(ROOT / "mkdocs.yml"))


def site_uses_directory_urls() -> bool:
    """Whether pages are published as folders (chapters/x/) or files (chapters/x.html):
    Material's offline plugin, when enabled, turns directory URLs off."""
    config = site_config()
    offline = config.plugins.get("material/offline")
    return config["use_directory_urls"] and not (offline and offline.config.enabled)


@functools.cache
def _snippets():
    """The pymdownx.snippets preprocessor configured exactly as in mkdocs.yml."""
    import markdown

    config = site_config()
    md = markdown.Markdown(
        extensions=config["markdown_extensions"], extension_configs=config["mdx_configs"]
    )
    return md.preprocessors["snippet"]


def expand_snippets(text: str) -> str:
    """Inline every ``--8<--`` include of ``text`` as the site build does."""
    return "\n".join(_snippets().run(text.split("\n")))


def page_blocks(page: Path) -> list[Block]:
    """The ``python`` blocks of a page, in order, parsed by pytest-codeblocks."""
    from pytest_codeblocks import extract_from_buffer

    raw = page.read_text(encoding="utf-8")
    blocks = []
    for block in extract_from_buffer(io.StringIO(raw)):
        if block.syntax != "python":
            continue  # bash, text, `python title=...` (shown, not run) and so on
        blocks.append(
            Block(
                lineno=block.lineno,
                code=expand_snippets(block.code).rstrip("\n"),
                skip_reason=_skip_reason(block.marks, page, block.lineno),
            )
        )
    return blocks


def _skip_reason(marks: list[str], page: Path, lineno: int) -> str | None:
    if not marks:
        return None
    match = SKIP_MARK.match(marks[0]) if len(marks) == 1 else None
    if match is None:
        raise ValueError(
            f"{page}:{lineno}: a block may only opt out with one "
            f'<!--pytest.mark.skip(reason="...")--> marker, found {marks}'
        )
    return match["reason"]


# ---------------------------------------------------------------------------
# Notebooks
# ---------------------------------------------------------------------------

ADMONITION = re.compile(r'^(?P<indent>\s*)(?:!!!|\?\?\?\+?|===)\s*(?P<kind>[\w-]*)\s*(?:"(?P<title>.*)")?\s*$')
SKIP_COMMENT = re.compile(r"^\s*<!--\s*pytest\.mark\.skip.*-->\s*$")


def _notebook_markdown(page: Path) -> str:
    """The page as plain Markdown that jupytext reads: snippets expanded, admonitions and
    tabs flattened (so fences inside them become cells), skip markers turned into the
    ``skip-execution`` tag that nbclient honours."""
    lines = page.read_text(encoding="utf-8").split("\n")
    out: list[str] = []
    dedent_stack: list[int] = []  # indentation of the admonitions we are inside
    skip_next_fence = False
    in_fence = False
    for line in lines:
        indent = len(line) - len(line.lstrip())
        while dedent_stack and line.strip() and indent < dedent_stack[-1] + 4:
            dedent_stack.pop()
        cut = dedent_stack[-1] + 4 if dedent_stack else 0
        line = line[cut:] if line[:cut].strip() == "" else line.lstrip()
        if SKIP_COMMENT.match(line):
            skip_next_fence = True
            continue
        match = ADMONITION.match(line)
        if match:
            title = match["title"] or match["kind"].capitalize()
            out.append(f"**{title}**" if title else "")
            dedent_stack.append(indent)
            continue
        if skip_next_fence and line.strip() == "```python":
            line = line.replace("```python", '```python tags=["skip-execution"]')
            skip_next_fence = False
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence else notebook_links(line, page))  # code keeps its brackets
    return expand_snippets("\n".join(out))


RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:|#|/)(?P<path>[^)#\s]+)(?P<fragment>#[^)\s]*)?\)")


def notebook_links(text: str, page: Path, directory_urls: bool | None = None) -> str:
    """The relative links of page text, as seen from the site's notebook page (notebooks/<page>/
    or notebooks/<page>.html, as mkdocs.yml has it): a link to a page (``ch02_tokenizer.md#x``)
    becomes that page's address (``../../chapters/ch02_tokenizer/#x`` or
    ``../chapters/ch02_tokenizer.html#x``), any other file keeps its name (figures, data)."""
    here = page.parent.relative_to(DOCS_DIR).as_posix() if DOCS_DIR in page.parents else "."
    if directory_urls is None:
        directory_urls = site_uses_directory_urls()
    up = "../../" if directory_urls else "../"

    def relink(match):
        target = posixpath.normpath(posixpath.join(here, match["path"]))
        if target.endswith(".md") and directory_urls:  # a page: its address
            target = target[: -len(".md")]
            target = target[: -len("index")] if target.endswith("index") else target + "/"
        elif target.endswith(".md"):
            target = target[: -len(".md")] + ".html"
        return f"]({up}{target}{match['fragment'] or ''})"

    return RELATIVE_LINK.sub(relink, text)


def book_modules_needed(code: str) -> list[str]:
    """Book modules that ``code`` imports, with their own book imports, dependencies first."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for dep in BOOK_MODULE_IMPORT.findall(book_module_source(name)):
            if dep != name:
                visit(dep)
        ordered.append(name)

    for name in BOOK_MODULE_IMPORT.findall(code):
        if not (CODE_DIR / f"{name}.py").exists():
            raise ValueError(f"the page imports {name}, but code/{name}.py does not exist")
        visit(name)
    return ordered


def book_module_source(name: str) -> str:
    return (CODE_DIR / f"{name}.py").read_text(encoding="utf-8")


def page_notebook(page: Path, blocks: list[Block] | None = None):
    """The page as an (unexecuted) notebook whose code cells are exactly its blocks."""
    import jupytext
    import nbformat

    blocks = page_blocks(page) if blocks is None else blocks
    nb = jupytext.reads(_notebook_markdown(page), fmt="md")
    for index, cell in enumerate(nb.cells):  # shell blocks are shown, not run
        magic = re.match(r"%%(\w+)\n", cell.source) if cell.cell_type == "code" else None
        if magic:
            body = cell.source[magic.end():]
            nb.cells[index] = nbformat.v4.new_markdown_cell(f"```{magic[1]}\n{body}\n```")
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    if [c.source.rstrip("\n") for c in code_cells] != [b.code for b in blocks]:
        raise ValueError(
            f"{page}: the notebook's code cells differ from the page's python blocks "
            "(is a python fence nested somewhere the notebook conversion cannot see?)"
        )
    for cell, block in zip(code_cells, blocks):
        cell.metadata["page_line"] = block.lineno
        cell.metadata.pop("lines_to_next_cell", None)

    modules = book_modules_needed("\n".join(b.code for b in blocks))
    setup = [
        nbformat.v4.new_code_cell(
            f"%%writefile {name}.py\n" + without_section_markers(book_module_source(name)),
            metadata={"book_setup": True, "jupyter": {"source_hidden": True}},
        )
        for name in modules
    ]
    if setup:
        note = nbformat.v4.new_markdown_cell(
            "*Setup: the next cells write the book's modules that this chapter imports "
            f"({', '.join(modules)}) next to the notebook, so it runs anywhere.*"
        )
        nb.cells[1:1] = [note, *setup]  # after the title cell
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for number, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{number}"  # deterministic ids: the cache key is the content
    return nb


SECTION_MARKER = re.compile(r"^[ \t]*# --8<-- \[(?:start|end):[\w-]+\][ \t]*\n?", re.MULTILINE)


def without_section_markers(source: str) -> str:
    """A module as a reader copies it: the ``# --8<-- [start:x]`` lines that cut it into the
    page's snippets removed (code/ keeps them)."""
    return SECTION_MARKER.sub("", source)


def notebook_key(nb) -> str:
    """A hash of the unexecuted notebook: its cache key."""
    import nbformat

    text = CACHE_VERSION + nbformat.writes(nb)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cached_notebook_path(page: Path, key: str) -> Path:
    """Where the executed notebook of ``page`` whose cache key is ``key`` is stored."""
    return NOTEBOOK_CACHE / f"{page.stem}-{key}.ipynb"


def save_executed(path: Path, nb) -> None:
    import nbformat

    with atomic_write(path) as tmp:
        nbformat.write(nb, tmp)


def notebook_client(nb, workdir: str):
    """An nbclient client that runs ``nb`` in ``workdir``, stopping at the first error."""
    from nbclient import NotebookClient

    resources = {"metadata": {"path": workdir}}
    return NotebookClient(nb, timeout=900, kernel_name="python3", resources=resources)


def kernel_env() -> dict[str, str]:
    """The environment a page's kernel starts with: figures show inline, as in Jupyter."""
    return {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def execute_notebook(nb, progress=None, niceness=0):
    """Run every cell (skip-execution cells excepted) in a fresh folder; fail on the first error.

    ``progress(done, total)``, if given, is called after each code cell; a ``niceness`` > 0
    lowers the kernel's priority (work in the background of `mkdocs serve`)."""
    total = sum(cell.cell_type == "code" for cell in nb.cells)
    with tempfile.TemporaryDirectory(prefix="book-page-", ignore_cleanup_errors=True) as workdir:
        client = notebook_client(nb, workdir)
        if niceness:
            def lower_priority(**_):
                os.setpriority(os.PRIO_PROCESS, client.km.provisioner.pid, niceness)

            client.on_notebook_start = lower_priority
        if progress is not None:
            done = iter(range(1, total + 1))
            client.on_cell_executed = lambda **_: progress(next(done, total), total)
        return client.execute(env=kernel_env())


# ---------------------------------------------------------------------------
# Small helpers of the build machinery
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yield a temporary path beside ``path``; once written, it replaces ``path`` in one step,
    so a killed run never leaves a half-written file. On an error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_module(name: str, path: Path):
    """Import the file ``path`` as module ``name`` (registered in sys.modules, so modules that
    import ``name`` get this one)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
