"""The book's pytest plugin.

Two jobs:

1. Grading exercises. ``pytest tests/test_ch01_backprop.py --impl my_ch01.py`` runs a
   chapter's tests against the reader's own module instead of the book's. Tests reach the
   chapter's module only through the ``load_chapter`` fixture, which honours ``--impl``.
2. Running the pages. Every page in docs/ is collected; its ``python`` code blocks, with
   their snippets expanded as the site build expands them, run in page order in one
   Jupyter kernel per page, one test item per block (see book_pages.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

import book_pages


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
        return _load_module_from(path, name)

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


def _load_module_from(path: Path, name: str):
    """Import ``path`` as module ``name``, so later chapters importing it see the reader's code."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def pytest_configure(config):
    config.book_loader = ChapterLoader(config.getoption("--impl"))


@pytest.fixture(scope="session")
def load_chapter(request):
    """``load_chapter("ch01_backprop")`` -> the module under test (the reader's under --impl)."""
    return request.config.book_loader


# ---------------------------------------------------------------------------
# Pages: every python block of docs/**/*.md is a test item
# ---------------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".md" and book_pages.DOCS_DIR in file_path.parents:
        if parent.config.getoption("--impl"):
            return None  # grading a reader's module: the book's pages are not what is graded
        return book_pages.PageFile.from_parent(parent, path=file_path)
    return None


def pytest_runtest_logreport(report):
    book_pages.record_report(report)


def pytest_terminal_summary(terminalreporter):
    book_pages.report_page_summary(terminalreporter)
