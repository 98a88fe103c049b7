"""The book's pytest plugin.

Two jobs:

1. Grading exercises. ``pytest tests/test_ch01_backprop.py --impl my_ch01.py`` runs a
   chapter's tests against the reader's own module instead of the book's. Tests reach the
   chapter's module only through the ``load_chapter`` fixture, which honours ``--impl``.
2. Running the pages. Every page in docs/ is collected; its ``python`` code blocks, with
   their snippets expanded as the site build expands them, run in page order in one
   Jupyter kernel per page, one test item per block; a failure is reported at the page
   and line of its block, and the rest of that page is skipped. A page whose blocks all
   ran stores its executed notebook in the cache that the site build publishes.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import book_pages
from book_pages import ROOT, Block


def pytest_addoption(parser):
    group = parser.getgroup("book")
    group.addoption(
        "--impl",
        metavar="PATH",
        help="grade your own implementation: a chapter module file (for one chapter's tests) "
        "or a folder holding files named like the book's modules (chNN_topic.py)",
    )


# ---------------------------------------------------------------------------
# --impl: the reader's module in place of the book's
# ---------------------------------------------------------------------------


class ChapterLoader:
    """Loads a chapter's module: the reader's (``--impl``) or the book's (code/)."""

    def __init__(self, impl: str | None):
        self.impl = Path(impl).resolve() if impl else None
        if self.impl is not None and not self.impl.exists():
            raise pytest.UsageError(f"--impl {impl}: no such file or folder")
        self.file_is_for: str | None = None  # the one module name a file --impl stands for

    def __call__(self, name: str):
        path = self._reader_file(name)
        if path is None:
            return importlib.import_module(name)  # the book's reference module
        # Registered under the book's name, so later chapters importing it see the reader's code.
        return book_pages.load_module(name, path)

    def _reader_file(self, name: str) -> Path | None:
        if self.impl is None:
            return None
        if self.impl.is_dir():
            candidate = self.impl / f"{name}.py"
            return candidate if candidate.exists() else None
        if self.file_is_for not in (None, name):
            raise pytest.UsageError(
                f"--impl {self.impl} is one file, but these tests load two chapters "
                f"({self.file_is_for} and {name}). Run one chapter's test file at a time, "
                "or pass a folder holding files named like the book's modules."
            )
        self.file_is_for = name
        return self.impl


def pytest_configure(config):
    config.book_loader = ChapterLoader(config.getoption("--impl"))


@pytest.fixture(scope="session")
def load_chapter(request):
    """``load_chapter("ch01_backprop")`` -> the module under test (the reader's under --impl)."""
    return request.config.book_loader


# ---------------------------------------------------------------------------
# Pages: every python block of docs/**/*.md is a test item
# ---------------------------------------------------------------------------


ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def page_kernel(nb):
    """A kernel that runs ``nb``'s cells one at a time (``client.execute_cell``), in a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="book-page-", ignore_cleanup_errors=True) as workdir:
        client = book_pages.notebook_client(nb, workdir)
        with client.setup_kernel(env=book_pages.kernel_env()):
            yield client


class PageFile(pytest.File):
    """A page of docs/: collects its python blocks; runs them in one kernel."""

    def collect(self):
        self.blocks = book_pages.page_blocks(self.path)
        if not self.blocks:
            return
        self.notebook = book_pages.page_notebook(self.path, self.blocks)
        key = book_pages.notebook_key(self.notebook)  # of the notebook before it runs
        self.cache_path = book_pages.cached_notebook_path(self.path, key)
        self.kernel_stack = contextlib.ExitStack()  # closed in teardown: stops the kernel
        self.kernel = None
        self.ready = False  # the kernel started and the setup cells ran
        self.failed_line: int | None = None  # of the block that failed; the rest is skipped
        code_indexes = [
            i
            for i, cell in enumerate(self.notebook.cells)
            if cell.cell_type == "code" and not cell.metadata.get("book_setup")
        ]
        for block, index in zip(self.blocks, code_indexes):
            yield BlockItem.from_parent(self, name=f"line {block.lineno}", block=block, cell_index=index)

    def setup(self):
        self.kernel = self.kernel_stack.enter_context(page_kernel(self.notebook))
        for index, cell in enumerate(self.notebook.cells):
            if cell.metadata.get("book_setup"):
                self.kernel.execute_cell(cell, index)  # writes a book module the page imports
        self.ready = True

    def teardown(self):
        self.kernel_stack.close()
        items = [i for i in self.session.items if i.parent is self]
        if self.ready and self.failed_line is None and len(items) == len(self.blocks):
            book_pages.save_executed(self.cache_path, self.notebook)


class BlockError(Exception):
    pass


class BlockItem(pytest.Item):
    """One python block of a page."""

    def __init__(self, *, block: Block, cell_index: int, **kwargs):
        super().__init__(**kwargs)
        self.block = block
        self.cell_index = cell_index
        if block.skip_reason:
            self.add_marker(pytest.mark.skip(reason=f"line {block.lineno}: {block.skip_reason}"))

    def runtest(self):
        page = self.parent
        if page.failed_line is not None:
            pytest.skip(f"not run: the block at line {page.failed_line} of this page failed")
        from nbclient.exceptions import CellExecutionError, CellTimeoutError

        try:
            page.kernel.execute_cell(page.notebook.cells[self.cell_index], self.cell_index)
        except (CellExecutionError, CellTimeoutError) as error:
            page.failed_line = self.block.lineno
            raise BlockError(ANSI.sub("", str(error))) from None
        except BaseException:
            page.failed_line = self.block.lineno
            raise

    def repr_failure(self, excinfo):
        where = f"{self.path.relative_to(ROOT)}:{self.block.lineno}"
        if excinfo.errisinstance(BlockError):
            return f"code block at {where} failed:\n{excinfo.value}"
        return f"code block at {where}: {super().repr_failure(excinfo)}"

    def reportinfo(self):
        return self.path, self.block.lineno - 1, f"code block at line {self.block.lineno}"


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".md" and book_pages.DOCS_DIR in file_path.parents:
        if parent.config.getoption("--impl"):
            return None  # grading a reader's module: the book's pages are not what is graded
        return PageFile.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------------
# The report ends with the count of blocks run per page
# ---------------------------------------------------------------------------

_page_stats: dict[str, Counter] = defaultdict(Counter)


def pytest_runtest_logreport(report):
    path, _, rest = report.nodeid.partition("::")
    if not (path.endswith(".md") and rest.startswith("line ")):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _page_stats[path][report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if not _page_stats:
        return
    terminalreporter.section("code blocks of the book's pages")
    total = Counter()
    for path in sorted(_page_stats):
        stats = _page_stats[path]
        total += stats
        terminalreporter.write_line(
            f"{path}: {sum(stats.values())} blocks: {stats['passed']} passed, "
            f"{stats['failed']} failed, {stats['skipped']} skipped"
        )
    terminalreporter.write_line(
        f"all pages: {sum(total.values())} blocks: {total['passed']} passed, "
        f"{total['failed']} failed, {total['skipped']} skipped"
    )
