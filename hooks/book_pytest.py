"""The book's pytest plugin.

Three jobs:

1. Grading exercises. ``.venv/bin/pytest tests/test_ch01_backprop.py --impl my_ch01.py``
   runs a chapter's tests against the reader's own module instead of the book's; tests reach
   the chapter's module only through the ``load_chapter`` fixture, which honours ``--impl``.
   ``--exercise N`` (repeatable, or a list such as ``--exercise 1,3``) selects the tests
   marked ``@pytest.mark.exercise(N)``; ``-m exercise`` selects them all. Every exercise test
   shows its number in the report (``PASSED [exercise 3]``, and in the header of a failure),
   a test stopped by a starter's stub (``NotImplementedError: Exercise N: ...``) fails in one
   line instead of a traceback, and a run that grades exercises ends with one line per
   exercise: passed, not implemented yet, waiting for another exercise, or failing.
2. Running the pages. Every page in docs/ is collected; its ``python`` code blocks, with
   their snippets expanded as the site build expands them, run in page order in one
   Jupyter kernel per page, in a fresh folder, one test item per block; a failure is
   reported at the page and line of its block, and the rest of that page is skipped. A
   page whose blocks all ran stores its executed notebook (the outputs of this first run)
   in the cache that the site build publishes.
3. Running a page again in the same folder. A reader runs a notebook twice in one folder
   (Run All, then Run All again), so a page must give the same results when its folder
   already holds what its first run wrote. Only a block that writes into the folder can
   behave differently the second time (refuse an existing run, resume a finished one, read
   a stale file): every other block meets the same folder and the same code. So the
   plugin lists the page folder's files (names, sizes, modification times; ``__pycache__``
   aside) before and after each block, and a last item per page, ``run again in the same
   folder``, runs the blocks that changed it once more, in page order, in the same kernel
   and folder, after the whole page. It fails when such a block raises, when it prints
   something else than the first time (numbers followed by a unit of time or a rate, such
   as ``5 s`` or ``3.6 MB/s``, are masked), or when the folder ends up with other files.
   A page that writes nothing into its folder costs nothing more; one that does costs the
   time of its writing blocks once more. The second run sees the kernel as the whole page
   left it, not as each block first saw it; blocks that rely on a name a later block
   rebinds would show up as a difference here. The notebook saved for the site keeps the
   first run's outputs.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import os
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
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
    group.addoption(
        "--exercise",
        action="append",
        metavar="N",
        help="run only the tests of exercise N (@pytest.mark.exercise(N)); repeat the option "
        "or give a list (--exercise 1,3) for several; -m exercise runs every exercise's tests",
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
                f"({self.file_is_for} and {name}). Run one chapter's test file at a time "
                f"(.venv/bin/pytest tests/test_{name}.py --impl ...), "
                "or pass a folder holding files named like the book's modules."
            )
        self.file_is_for = name
        return self.impl


def pytest_configure(config):
    config.book_loader = ChapterLoader(config.getoption("--impl"))
    config.book_exercises = parse_exercise_option(config.getoption("--exercise"))
    config.pluginmanager.register(BookReport(config), "book-report")


@pytest.fixture(scope="session")
def load_chapter(request):
    """``load_chapter("ch01_backprop")`` -> the module under test (the reader's under --impl)."""
    return request.config.book_loader


# ---------------------------------------------------------------------------
# Exercises: --exercise N, the number in the report, one line per exercise
# ---------------------------------------------------------------------------

STUB_MESSAGE = re.compile(r"Exercise (\d+): ")  # what a starter's stubs raise (hooks/starter.py)


def parse_exercise_option(values: list[str] | None) -> set[int] | None:
    """``["1,3", "4"]`` -> {1, 3, 4}; None when the option is not given."""
    if not values:
        return None
    numbers = set()
    for part in ",".join(values).split(","):
        if not part.strip().isdigit():
            raise pytest.UsageError(
                f"--exercise takes exercise numbers, such as --exercise 3 or --exercise 1,3; got {part.strip()!r}"
            )
        numbers.add(int(part))
    return numbers


def exercise_number(item) -> int | None:
    """N of an item marked ``@pytest.mark.exercise(N)``, else None."""
    marker = item.get_closest_marker("exercise")
    if marker is None:
        return None
    if len(marker.args) != 1 or not isinstance(marker.args[0], int) or isinstance(marker.args[0], bool):
        raise pytest.UsageError(
            f"{item.nodeid}: the exercise mark takes the exercise's number, e.g. @pytest.mark.exercise(3)"
        )
    return marker.args[0]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    for item in items:
        number = exercise_number(item)
        if number is not None:
            item.user_properties.append(("exercise", number))  # travels with every report
            path, lineno, domain = item.location
            item.location = (path, lineno, f"{domain} [exercise {number}]")  # failure headers
    wanted = config.book_exercises
    if wanted is None:
        return
    selected = [item for item in items if exercise_number(item) in wanted]
    missing = wanted - {exercise_number(item) for item in selected}
    if missing:
        graded = sorted({n for n in map(exercise_number, items) if n is not None})
        raise pytest.UsageError(
            f"--exercise {','.join(map(str, sorted(missing)))}: no selected test grades "
            + ("that exercise" if len(missing) == 1 else "those exercises")
            + (f"; the tests collected here grade exercises {', '.join(map(str, graded))}" if graded
               else "; none of the tests collected here grades an exercise")
        )
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected


def report_exercise(report) -> int | None:
    return dict(report.user_properties).get("exercise")


def starter_stub(error: BaseException) -> NotImplementedError | None:
    """The NotImplementedError a starter's stub raised, if ``error`` is one (or a group of
    only such errors, as Hypothesis may raise), else None."""
    if isinstance(error, BaseExceptionGroup):
        stubs = [starter_stub(e) for e in error.exceptions]
        return stubs[0] if stubs and all(stubs) else None
    if isinstance(error, NotImplementedError) and STUB_MESSAGE.match(str(error)):
        return error
    return None


@dataclass
class StubFailure:
    """A one-line report of a test stopped by a starter's stub (no traceback to read)."""

    path: str
    lineno: int
    message: str

    @property
    def reprcrash(self):  # what pytest's summaries and --tb=line read
        return self

    def toterminal(self, tw):
        tw.line(str(self))

    def __str__(self):
        return f"{self.path}:{self.lineno}: {self.message}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    stub = starter_stub(call.excinfo.value) if report.failed and call.excinfo else None
    if stub is not None:
        frame = stub.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = (frame.tb_frame.f_code.co_filename, frame.tb_lineno) if frame else (str(item.path), 0)
        report.longrepr = StubFailure(*where, f"NotImplementedError: {stub}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_report_teststatus(report, config):
    category, letter, word = yield
    number = report_exercise(report)
    if number is not None and word:  # "PASSED" -> "PASSED [exercise 3]" (-v, short summary)
        text, markup = word if isinstance(word, tuple) else (word, {})
        word = (f"{text} [exercise {number}]", markup) if markup else f"{text} [exercise {number}]"
    return category, letter, word


class ExerciseReport:
    """Collects the outcome of every exercise test, for one line per exercise at the end."""

    def __init__(self):
        # (test file, exercise number) -> {test id: "passed" | "skipped" | "stub N" | "failed"}
        self.tests: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)

    def add(self, report):
        number = report_exercise(report)
        if number is None:
            return
        outcomes = self.tests[(report.nodeid.split("::")[0], number)]
        if report.failed:
            stub = report.longrepr if isinstance(report.longrepr, StubFailure) else None
            outcomes[report.nodeid] = f"stub {STUB_MESSAGE.search(stub.message)[1]}" if stub else "failed"
        elif report.skipped:
            outcomes.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            outcomes.setdefault(report.nodeid, "passed")

    def lines(self):
        for (path, number), outcomes in sorted(self.tests.items()):
            yield f"{path} exercise {number}{self._title(path, number)}: {self.verdict(number, outcomes)}"

    @staticmethod
    def verdict(number, outcomes):
        counts = Counter(outcomes.values())
        n = len(outcomes)
        tests = f"{n} test" + ("s" if n != 1 else "")
        if counts["failed"]:
            return f"failing: {counts['failed']} of {tests} failed"
        if counts[f"stub {number}"]:
            return f"not implemented yet (the starter's NotImplementedError; {tests})"
        waiting = sorted(int(kind.split()[1]) for kind in counts if kind.startswith("stub "))
        if waiting:
            return f"waits for exercise {', '.join(map(str, waiting))} (not implemented yet)"
        if counts["skipped"]:
            return f"{counts['passed']} of {tests} passed, {counts['skipped']} skipped"
        return f"passed ({tests})"

    @staticmethod
    def _title(test_path, number):
        """' (title)' from the book's module of the chapter that ``test_path`` grades."""
        import starter

        module = book_pages.CODE_DIR / (Path(test_path).stem.removeprefix("test_") + ".py")
        if not module.exists():
            return ""
        titles = {e.number: e.title for e in starter.find_exercises(module.read_text(encoding="utf-8"))}
        return f" ({titles[number]})" if number in titles else ""


def grading_exercises(config) -> bool:
    """Whether this run grades exercises: --impl, --exercise or a -m naming them."""
    return bool(config.getoption("--impl") or config.book_exercises
                or "exercise" in (config.getoption("markexpr") or ""))


# ---------------------------------------------------------------------------
# Pages: every python block of docs/**/*.md is a test item
# ---------------------------------------------------------------------------


ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def page_kernel(nb):
    """A kernel that runs ``nb``'s cells one at a time (``client.execute_cell``), in a fresh
    folder (``client.workdir``)."""
    with tempfile.TemporaryDirectory(prefix="book-page-", ignore_cleanup_errors=True) as workdir:
        client = book_pages.notebook_client(nb, workdir)
        client.workdir = Path(workdir)
        with client.setup_kernel(env=book_pages.kernel_env()):
            yield client


def shown(path: Path) -> Path:
    """``path`` as the report shows it: relative to the book's folder when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def folder_files(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, modification time in ns)} of the files under ``folder``;
    ``__pycache__`` (Python's own, written by any import) is left out."""
    files = {}
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in names:
            path = Path(top, name)
            with contextlib.suppress(FileNotFoundError):  # a file removed while we look
                stat = path.stat()
                files[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return files


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
        self.blocks_run = 0  # blocks that ran and passed, in this session
        self.writers: list[BlockItem] = []  # blocks that changed the page's folder
        self.folder: dict[str, tuple[int, int]] = {}  # the folder's files after the last block
        code_indexes = [
            i
            for i, cell in enumerate(self.notebook.cells)
            if cell.cell_type == "code" and not cell.metadata.get("book_setup")
        ]
        for block, index in zip(self.blocks, code_indexes):
            yield BlockItem.from_parent(self, name=f"line {block.lineno}", block=block, cell_index=index)
        yield RerunItem.from_parent(self, name=RerunItem.NAME)

    def setup(self):
        self.kernel = self.kernel_stack.enter_context(page_kernel(self.notebook))
        for index, cell in enumerate(self.notebook.cells):
            if cell.metadata.get("book_setup"):
                self.kernel.execute_cell(cell, index)  # writes a book module the page imports
        self.folder = folder_files(self.kernel.workdir)
        self.ready = True

    def teardown(self):
        self.kernel_stack.close()
        if self.ready and self.failed_line is None and self.all_blocks_ran():
            book_pages.save_executed(self.cache_path, self.notebook)  # the first run's outputs

    def all_blocks_ran(self) -> bool:
        return self.blocks_run == sum(1 for b in self.blocks if not b.skip_reason)


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
        finally:
            folder = folder_files(page.kernel.workdir)
            if folder != page.folder:
                page.writers.append(self)
            page.folder = folder
        page.blocks_run += 1

    def repr_failure(self, excinfo):
        where = f"{shown(self.path)}:{self.block.lineno}"
        if excinfo.errisinstance(BlockError):
            return f"code block at {where} failed:\n{excinfo.value}"
        return f"code block at {where}: {super().repr_failure(excinfo)}"

    def reportinfo(self):
        return self.path, self.block.lineno - 1, f"code block at line {self.block.lineno}"


# Numbers that measure time or speed: "5 s", "(9.5 s,", "3.6 MB/s", "17,000 tokens/s".
TIMING = re.compile(r"\d[\d,]*(?:\.\d+)?(?=\s*(?:ns|µs|us|ms|s|min|seconds?|minutes?|hours?|h|[A-Za-z]+/s)\b)")


def printed_text(outputs) -> str:
    """What a cell printed and showed as text, error included, with timings masked."""
    parts = []
    for output in outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", "") + "\n")
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}\n")
    return TIMING.sub("…", ANSI.sub("", "".join(parts)))


class RerunError(Exception):
    pass


class RerunItem(pytest.Item):
    """After a page ran: its blocks that wrote into its folder run again there, and must
    give the same results (see the module's docstring)."""

    NAME = "run again in the same folder"

    def runtest(self):
        page = self.parent
        if not page.ready or page.failed_line is not None or not page.all_blocks_ran():
            pytest.skip("not run: the page's blocks did not all run")
        from nbclient.exceptions import CellExecutionError, CellTimeoutError

        self.user_properties.append(("wrote into the folder", [w.block.lineno for w in page.writers]))
        first_folder = page.folder
        for writer in page.writers:
            where = f"line {writer.block.lineno}"
            first = page.notebook.cells[writer.cell_index]
            again = copy.deepcopy(first)
            try:
                page.kernel.execute_cell(again, writer.cell_index)  # puts `again` in the notebook
            except (CellExecutionError, CellTimeoutError) as error:
                raise RerunError(
                    f"its block at {where} wrote into the page's folder, and fails when it runs "
                    f"again there (as when a reader runs the notebook twice):\n"
                    + ANSI.sub("", str(error))
                ) from None
            finally:
                page.notebook.cells[writer.cell_index] = first  # the site shows the first run
            before, after = printed_text(first.outputs), printed_text(again.outputs)
            if before != after:
                diff = difflib.unified_diff(before.splitlines(), after.splitlines(),
                                            "first run", "second run", lineterm="", n=1)
                raise RerunError(
                    f"its block at {where} wrote into the page's folder, and prints something else "
                    "when it runs again there (as when a reader runs the notebook twice):\n"
                    + "\n".join(diff)
                )
        folder = folder_files(page.kernel.workdir)
        if set(folder) != set(first_folder):
            added, gone = sorted(set(folder) - set(first_folder)), sorted(set(first_folder) - set(folder))
            raise RerunError(
                "running the page's writing blocks again left other files in its folder: "
                f"new {added}, gone {gone}"
            )

    def repr_failure(self, excinfo):
        if excinfo.errisinstance(RerunError):
            return f"{shown(self.path)} does not run twice in one folder: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, self.NAME


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".md" and book_pages.DOCS_DIR in file_path.parents:
        if parent.config.getoption("--impl"):
            return None  # grading a reader's module: the book's pages are not what is graded
        return PageFile.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------------
# The report ends with the count of blocks run per page, and a line per exercise
# ---------------------------------------------------------------------------


class BookReport:
    """Counts the blocks run per page and collects the exercise tests' outcomes; prints
    both at the end (state lives here, one per pytest run, not in module globals)."""

    def __init__(self, config):
        self.config = config
        self.pages: dict[str, Counter] = defaultdict(Counter)
        self.reruns: dict[str, str] = {}  # page -> outcome of "run again in the same folder"
        self.exercises = ExerciseReport()

    def pytest_runtest_logreport(self, report):
        self.exercises.add(report)
        path, _, rest = report.nodeid.partition("::")
        if path.endswith(".md") and (report.when == "call" or (report.when == "setup" and report.outcome != "passed")):
            if rest.startswith("line "):
                self.pages[path][report.outcome] += 1
            elif rest == RerunItem.NAME:
                writers = dict(report.user_properties).get("wrote into the folder")
                lines = ", ".join(map(str, writers or []))
                self.reruns[path] = report.outcome + (
                    "" if writers is None else f" (blocks that wrote into it: line{'s' * (len(writers) > 1)} {lines})" if writers
                    else " (no block wrote into it)")

    def pytest_terminal_summary(self, terminalreporter):
        if self.exercises.tests and grading_exercises(self.config):
            terminalreporter.section("exercises")
            for line in self.exercises.lines():
                terminalreporter.write_line(line)
        if self.pages:
            terminalreporter.section("code blocks of the book's pages")
            for line in self.page_lines():
                terminalreporter.write_line(line)

    def page_lines(self):
        total = Counter()
        for path in sorted(self.pages):
            stats = self.pages[path]
            total += stats
            again = f"; run again in the same folder: {self.reruns[path]}" if path in self.reruns else ""
            yield (f"{path}: {sum(stats.values())} blocks: {stats['passed']} passed, "
                   f"{stats['failed']} failed, {stats['skipped']} skipped{again}")
        yield (f"all pages: {sum(total.values())} blocks: {total['passed']} passed, "
               f"{total['failed']} failed, {total['skipped']} skipped")
