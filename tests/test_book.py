"""The book's own rules, checked over every chapter: snippet markers, module
dependencies (matplotlib only inside plot_* functions), no type hints on functions, the
main guard last, run times stated on the pages, and exercises that really grade.

These tests cover all of code/, docs/ and tests/, so a new chapter is checked by
simply adding its files.
"""

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import book_pages
import starter

ROOT = book_pages.ROOT
MODULES = sorted(book_pages.CODE_DIR.glob("ch[0-9][0-9]_*.py"))
CHAPTER_PAGES = sorted((book_pages.DOCS_DIR / "chapters").glob("*.md"))
MARKER = re.compile(r"^\s*# --8<-- \[(start|end):([\w-]+)\]\s*$")
STDLIB = sys.stdlib_module_names
ALLOWED_IMPORTS = {"torch", "tiktoken", "numpy", "regex"}  # plus the stdlib and earlier chapters


def chapter_number(path: Path) -> int:
    return int(path.stem[2:4])


def test_every_chapter_has_a_module_a_page_and_tests():
    assert MODULES, "no chapter modules in code/"
    for module in MODULES:
        assert (book_pages.DOCS_DIR / "chapters" / f"{module.stem}.md").exists(), module.stem
        assert (ROOT / "tests" / f"test_{module.stem}.py").exists(), module.stem


def test_code_has_no_package_marker():
    # code/__init__.py would shadow the standard library's `code` module (pdb uses it).
    assert not (book_pages.CODE_DIR / "__init__.py").exists()


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_snippet_sections_are_balanced_and_unique(module):
    # pymdownx.snippets silently includes to the end of the file for a missing end
    # marker and uses the first of two sections with one name: catch both here.
    open_sections, seen = [], Counter()
    for lineno, line in enumerate(module.read_text().splitlines(), 1):
        match = MARKER.match(line)
        if not match:
            assert "--8<--" not in line, f"{module.name}:{lineno}: malformed snippet marker"
            continue
        kind, name = match.groups()
        if kind == "start":
            assert name not in open_sections, f"{module.name}:{lineno}: nested [start:{name}]"
            seen[name] += 1
            assert seen[name] == 1, f"{module.name}:{lineno}: section '{name}' defined twice"
            open_sections.append(name)
        else:
            assert name in open_sections, f"{module.name}:{lineno}: [end:{name}] without start"
            open_sections.remove(name)
    assert not open_sections, f"{module.name}: sections never ended: {open_sections}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_module_depends_only_on_torch_tiktoken_stdlib_and_earlier_chapters(module):
    tree = ast.parse(module.read_text())
    for node in tree.body:  # module level only: plot_* functions import matplotlib lazily
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if re.fullmatch(r"ch\d\d_\w+", top):
                assert int(top[2:4]) < chapter_number(module), f"{module.stem} imports {top}"
            else:
                assert top in STDLIB or top in ALLOWED_IMPORTS, f"{module.stem} imports {top}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_importing_a_module_does_not_import_matplotlib(module):
    # A reader who copies a module should not need matplotlib until calling a plot_* function.
    check = "import sys; import {0}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    result = subprocess.run(
        [sys.executable, "-c", check.format(module.stem)],
        cwd=book_pages.CODE_DIR, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {module.stem} imports {result.stdout.strip()}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_functions_have_no_type_annotations(module):
    # The book's rule for type hints: only dataclass fields have them; types and shapes of
    # arguments and results go in docstrings and comments.
    annotated = []
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            if node.returns is not None or any(a.annotation is not None for a in arguments):
                annotated.append(f"{module.name}:{node.lineno} {node.name}")
    assert not annotated, "annotated functions:\n" + "\n".join(annotated)


def is_main_guard(node):
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and [type(op) for op in node.test.ops] == [ast.Eq]
        and [getattr(c, "value", None) for c in node.test.comparators] == ["__main__"]
    )


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_main_guard_is_the_last_statement(module):
    body = ast.parse(module.read_text()).body
    guards = [index for index, node in enumerate(body) if is_main_guard(node)]
    assert guards in ([], [len(body) - 1]), (
        f"{module.name}: `if __name__ == \"__main__\":` must be the module's last statement "
        f"(found at line {body[guards[0]].lineno}, {len(body) - 1 - guards[0]} statements before the end)"
    )


def test_main_guard_check_recognizes_the_guard():
    assert is_main_guard(ast.parse('if __name__ == "__main__":\n    main()').body[0])
    assert not is_main_guard(ast.parse('if __name__ != "__main__":\n    main()').body[0])


@pytest.mark.parametrize("page", CHAPTER_PAGES, ids=lambda p: p.stem)
def test_chapter_page_states_its_cpu_run_time_and_exercises(page):
    text = page.read_text()
    assert re.search(r'!!! info "Run time"\n\s+About .+ on a 2-core laptop CPU', text), (
        f"{page.name} must state its run time under the title"
    )
    assert "## Exercises" in text
    assert "--impl" in text, "the page says how to grade the reader's own module"


def test_page_blocks_expand_snippets_like_the_site():
    page = book_pages.DOCS_DIR / "chapters" / "ch01_backprop.md"
    blocks = book_pages.page_blocks(page)
    assert blocks and not any("--8<--" in b.code for b in blocks)
    assert any("class Value:" in b.code for b in blocks)


def test_a_skip_needs_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!--pytest.mark.skip-->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="reason"):
        book_pages.page_blocks(page)


def test_atomic_write_replaces_the_file_only_on_success(tmp_path):
    path = tmp_path / "out" / "figure.svg"
    with book_pages.atomic_write(path) as tmp:
        tmp.write_text("first")
        assert not path.exists()  # nothing visible until the write is complete
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with book_pages.atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.svg"]  # no temporary left


# ---------------------------------------------------------------------------
# Exercises and starters
# ---------------------------------------------------------------------------

EXERCISE_MODULES = [m for m in MODULES if starter.find_exercises(m.read_text())]


def test_starter_keeps_signature_and_docstring_and_drops_the_body():
    source = (
        "import math\n\n"
        "# Exercise 1: area\n"
        "def area(r):\n"
        '    """Area of a disc of radius r."""\n'
        "    squared = r * r\n"
        "    return math.pi * squared\n\n\n"
        "def untouched():\n    return 1\n"
    )
    out = starter.make_starter(source)
    namespace = {}
    exec(out, namespace)
    assert namespace["area"].__doc__ == "Area of a disc of radius r."
    assert namespace["untouched"]() == 1
    with pytest.raises(NotImplementedError, match="Exercise 1: area"):
        namespace["area"](2.0)
    assert "squared" not in out


@pytest.mark.parametrize("module", EXERCISE_MODULES, ids=lambda p: p.stem)
def test_every_exercise_is_graded_by_a_marked_test(module):
    numbers = {e.number for e in starter.find_exercises(module.read_text())}
    assert len(numbers) >= 3, f"{module.stem}: at least three exercises per chapter"
    test_source = (ROOT / "tests" / f"test_{module.stem}.py").read_text()
    graded = {int(n) for n in re.findall(r"@pytest\.mark\.exercise\((\d+)\)", test_source)}
    assert numbers == graded, f"exercises {sorted(numbers)} vs graded {sorted(graded)}"


@pytest.mark.parametrize("module", EXERCISE_MODULES, ids=lambda p: p.stem)
def test_starter_fails_every_exercise_test_with_a_clear_message(module, tmp_path):
    path = tmp_path / f"my_{module.stem}.py"
    path.write_text(starter.starter_for(module.stem))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", f"tests/test_{module.stem}.py", "--impl", str(path),
         "-m", "exercise", "-q", "-p", "no:cacheprovider", "--tb=line"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    out = result.stdout + result.stderr
    n_marked = len(re.findall(r"@pytest\.mark\.exercise\(", (ROOT / "tests" / f"test_{module.stem}.py").read_text()))
    assert result.returncode == 1, out
    # Every selected test fails (a parametrized test counts once per parameter set).
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", out.strip().splitlines()[-1])}
    assert counts.get("failed", 0) >= n_marked, out
    assert not {"passed", "skipped", "error", "errors", "xfailed", "xpassed"} & set(counts), out
    for ex in starter.find_exercises(module.read_text()):
        assert f"NotImplementedError: Exercise {ex.number}: {ex.title}" in out, out
        assert f"exercise {ex.number} ({ex.title}): not implemented yet" in out, out  # the summary
    assert "Traceback" not in out and "Falsifying example" not in out, out  # one line per test


def test_starter_has_no_snippet_markers_and_a_header_that_grades_one_exercise():
    module = book_pages.CODE_DIR / "ch01_backprop.py"
    assert "# --8<-- [start:" in module.read_text()  # the book's module has markers ...
    text = starter.starter_for("ch01_backprop")
    assert "--8<--" not in text  # ... its starter has none
    ast.parse(text)
    assert "#     .venv/bin/pytest tests/test_ch01_backprop.py --impl my_ch01.py --exercise 1\n" in text


@pytest.mark.parametrize("module", EXERCISE_MODULES, ids=lambda p: p.stem)
def test_starters_carry_no_snippet_markers(module):
    assert "--8<--" not in starter.starter_for(module.stem)


def run_exercises(*args):
    """pytest in a fresh process, as a reader runs it; returns its whole output."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


def test_exercise_option_grades_one_exercise_in_a_few_lines(tmp_path):
    # A reader who did exercise 1 of Chapter 1 (its body kept: the comment that marks it
    # is renamed before the starter is made) and nothing else.
    source = (book_pages.CODE_DIR / "ch01_backprop.py").read_text()
    done = source.replace("# Exercise 1: ", "# Done: ", 1)
    path = tmp_path / "my_ch01.py"
    path.write_text(starter.make_starter(done, "ch01_backprop"))
    code, out = run_exercises("tests/test_ch01_backprop.py", "--impl", str(path),
                              "--exercise", "1", "--exercise", "2", "-v")
    assert code == 1, out
    assert re.search(r"\b2 failed, 1 passed\b", out), out
    assert re.search(r"test_exercise_1_tanh_matches_autograd PASSED \[exercise 1\]", out), out
    assert "exercise 1 (tanh for Value): passed (1 test)" in out, out
    assert "exercise 2 (the backward pass of a linear layer): not implemented yet" in out, out
    lines = out.splitlines()
    start, end = (next(i for i, line in enumerate(lines) if f" {name} " in line) for name in ("FAILURES", "exercises"))
    failures = lines[start + 1:end]
    assert "exercise 3" not in out[out.index(" FAILURES "):], out  # not selected
    assert len(failures) == 4, out  # one line per stopped test: no traceback, no Hypothesis report
    assert failures[1].endswith("NotImplementedError: Exercise 2: the backward pass of a linear layer"), out


@pytest.fixture
def book_pytester(pytester):
    pytester.makeini(
        "[pytest]\nmarkers =\n    exercise(n): a test that grades exercise n\n"
        "filterwarnings =\n    error::pytest.PytestUnknownMarkWarning\n"
    )
    pytester.makeconftest('pytest_plugins = ["book_pytest"]')
    return pytester


def test_exercise_summary_tells_passed_not_implemented_waiting_and_failing(book_pytester):
    book_pytester.makepyfile(test_made_up="""
        import pytest
        from hypothesis import given, strategies as st

        def stub(n):
            raise NotImplementedError(f"Exercise {n}: made up")

        @pytest.mark.exercise(1)
        def test_one():
            assert 1 + 1 == 2

        @pytest.mark.exercise(2)
        @given(st.integers())
        def test_two(x):
            stub(2)

        @pytest.mark.exercise(3)
        def test_three():
            stub(2)  # exercise 3 calls exercise 2's function

        @pytest.mark.exercise(4)
        def test_four_a():
            assert 1 + 1 == 2

        @pytest.mark.exercise(4)
        def test_four_b():
            assert 1 + 1 == 3

        def test_not_an_exercise():
            assert True
    """)
    result = book_pytester.runpytest("-m", "exercise")
    out = result.stdout.str()
    result.assert_outcomes(passed=2, failed=3, deselected=1)
    result.stdout.fnmatch_lines([
        "*= exercises =*",
        "test_made_up.py exercise 1: passed (1 test)",
        "test_made_up.py exercise 2: not implemented yet*",
        "test_made_up.py exercise 3: waits for exercise 2 (not implemented yet)",
        "test_made_up.py exercise 4: failing: 1 of 2 tests failed",
    ])
    result.stdout.fnmatch_lines(["*_ test_two [[]exercise 2] _*", "*test_made_up.py:*: NotImplementedError: Exercise 2: made up"])
    assert "Falsifying" not in out and "Traceback" not in out and "def stub" not in out, out
    assert "assert 1 + 1 == 3" in out  # a real failure keeps its full report

    selected = book_pytester.runpytest("--exercise", "4,1", "-v")
    selected.assert_outcomes(passed=2, failed=1, deselected=3)
    selected.stdout.fnmatch_lines(["*::test_one PASSED [[]exercise 1]*", "*::test_four_b FAILED [[]exercise 4]*"])


def test_exercise_option_rejects_what_it_cannot_select(book_pytester):
    book_pytester.makepyfile(test_made_up="""
        import pytest

        @pytest.mark.exercise(1)
        def test_one():
            pass
    """)
    missing = book_pytester.runpytest("--exercise", "7")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["*--exercise 7: no selected test grades that exercise; "
                                  "the tests collected here grade exercises 1*"])
    wrong = book_pytester.runpytest("--exercise", "three")
    assert wrong.ret == pytest.ExitCode.USAGE_ERROR
    wrong.stderr.fnmatch_lines(["*--exercise takes exercise numbers*got 'three'*"])


# ---------------------------------------------------------------------------
# Commands shown to the reader work as printed
# ---------------------------------------------------------------------------

# A command that runs whatever `pytest`, `python` or `torchrun` comes first on the PATH,
# rather than the book's environment (.venv/bin/...). `python3 -m venv` makes that environment.
BARE_COMMAND = re.compile(r"^(?:\$\s+)?(?:pytest|python3?|torchrun)\s+(?![=(.:,])(?!-m venv\b)\S")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
SHELL_FENCES = {"bash", "sh", "shell", "console", "zsh"}
INLINE_CODE = re.compile(r"`([^`]+)`")


def bare_commands_in_lines(lines):
    """The commands of ``lines`` (each may chain several with && ; |) that start bare."""
    return [part.strip() for line in lines for part in re.split(r"&&|\|\|?|;", line.strip())
            if BARE_COMMAND.match(part.strip())]


def bare_commands_in_markdown(text):
    """(line, command) for each bare command in a shell fence, an indented code block or
    an inline code span of a Markdown text."""
    found, prose, fence = [], [], None  # fence: (marker, language) of the open fence
    for lineno, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, line = (match[1], match[2]), ""
        elif fence is not None and match and match[1].startswith(fence[0]) and not match[2]:
            fence, line = None, ""
        elif fence is not None:
            if fence[1] in SHELL_FENCES:
                found += [(lineno, c) for c in bare_commands_in_lines([line.split(" #")[0]])]
            line = ""
        elif line.startswith("    "):  # an indented code block (the README's commands)
            found += [(lineno, c) for c in bare_commands_in_lines([line])]
        prose.append(line)
    prose_text = "\n".join(prose)
    for span in INLINE_CODE.finditer(prose_text):
        lineno = prose_text.count("\n", 0, span.start()) + 1
        found += [(lineno, c) for c in bare_commands_in_lines([" ".join(span[1].split())])]
    return found


def docstring_and_string_lines(path, all_strings):
    """Lines of a Python file's module docstring, or of all its string constants."""
    tree = ast.parse(path.read_text())
    if not all_strings:
        return (ast.get_docstring(tree, clean=True) or "").splitlines()
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return [line.strip().removeprefix("usage:").strip() for s in strings for line in s.splitlines()]


def test_commands_shown_to_the_reader_name_the_books_environment():
    bare = []
    for page in [ROOT / "README.md", *sorted(book_pages.DOCS_DIR.rglob("*.md"))]:
        bare += [f"{page.relative_to(ROOT)}:{n}: {c}" for n, c in bare_commands_in_markdown(page.read_text())]
    sources = [(m, False) for m in MODULES] + [(ROOT / "hooks" / "starter.py", True),
                                               (ROOT / "hooks" / "book_pytest.py", True)]
    for path, all_strings in sources:
        lines = docstring_and_string_lines(path, all_strings)
        bare += [f"{path.relative_to(ROOT)}: {c}" for c in bare_commands_in_lines(lines)]
    header = starter.starter_for("ch01_backprop").split('"""')[0]
    bare += [f"starter header: {c}" for c in bare_commands_in_lines(l.lstrip("# ") for l in header.splitlines())]
    assert not bare, ("commands that run whatever comes first on the PATH; write .venv/bin/pytest, "
                      ".venv/bin/python, .venv/bin/torchrun:\n" + "\n".join(bare))


def test_bare_command_check_finds_each_kind_of_command():
    page = (
        "Run `pytest tests/test_ch01_backprop.py` or `.venv/bin/pytest -q`; the `pytest-codeblocks`\n"
        "package, `python` fences and `python3 -m venv .venv` are fine. Or `python code/x.py\n--flag`.\n\n"
        "```bash\n.venv/bin/python a.py && python b.py   # python c.py in a comment\n```\n\n"
        "```python\ntorchrun = [sys.executable]\nprint('python x.py')\n```\n\n"
        "    torchrun --standalone code/ch11_distributed.py\n"
    )
    assert bare_commands_in_markdown(page) == [
        (6, "python b.py"), (14, "torchrun --standalone code/ch11_distributed.py"),
        (1, "pytest tests/test_ch01_backprop.py"), (2, "python code/x.py --flag"),
    ]


# ---------------------------------------------------------------------------
# Pages run twice in one folder
# ---------------------------------------------------------------------------


def test_a_page_must_run_again_in_the_same_folder(book_pytester, monkeypatch):
    monkeypatch.setattr(book_pages, "DOCS_DIR", book_pytester.path)  # made-up pages
    monkeypatch.setattr(book_pages, "NOTEBOOK_CACHE", book_pytester.path / "notebooks")
    fence = "```"
    book_pytester.makefile(".md", refuses=f"""
        # Refuses a folder that holds a run

        {fence}python
        from pathlib import Path

        out = Path("run")
        if out.exists():
            raise ValueError(f"{{out}} already holds a run")
        out.mkdir()
        (out / "log.txt").write_text("trained\\n")
        print("trained in 0.5 s")
        {fence}
    """, appends=f"""
        # Appends to a file it finds

        {fence}python
        with open("log.txt", "a") as f:
            f.write("one more line\\n")
        print(len(open("log.txt").readlines()), "lines")
        {fence}
    """, rewrites=f"""
        # Writes its file again, the same, and times itself

        {fence}python
        import time

        start = time.perf_counter()
        open("numbers.txt", "w").write(" ".join(map(str, range(10))))
        print(f"wrote 10 numbers in {{time.perf_counter() - start:.6f}} s")
        {fence}

        {fence}python
        print(sum(map(int, open("numbers.txt").read().split())))
        {fence}
    """)
    result = book_pytester.runpytest("refuses.md", "appends.md", "rewrites.md")
    out = result.stdout.str()
    result.assert_outcomes(passed=5, failed=2)
    result.stdout.fnmatch_lines([
        "*refuses.md does not run twice in one folder: its block at line 3 wrote into the page's folder, and fails when it runs again there*",
        "*ValueError: run already holds a run*",
    ])
    result.stdout.fnmatch_lines(["*appends.md does not run twice in one folder*prints something else*", "-1 lines", "+2 lines"])
    assert "rewrites.md does not run twice" not in out
    result.stdout.fnmatch_lines(["rewrites.md: 2 blocks: 2 passed, 0 failed, 0 skipped; run again in the same folder: passed (blocks that wrote into it: line 3)"])
    # The notebook kept for the site holds the first run's outputs.
    saved = list((book_pytester.path / "notebooks").glob("appends-*.ipynb"))
    assert len(saved) == 1 and "1 lines" in saved[0].read_text() and "2 lines" not in saved[0].read_text()


def test_timings_are_masked_and_other_numbers_kept():
    from book_pytest import TIMING

    text = "trained in 5 s: 105,216 parameters\n(9.5 s, most of it)\npure Python: 3.6 MB/s, 17,000 tokens/s\n2 processes\n"
    assert TIMING.sub("…", text) == "trained in … s: 105,216 parameters\n(… s, most of it)\npure Python: … MB/s, … tokens/s\n2 processes\n"


# The site's code column holds 100 characters at 1280 px (.ci/check_site.py checks that it
# does): longer lines would scroll sideways, in the modules and in the pages' own fences.
CODE_COLUMN = 100
CODE_FENCE = re.compile(r"^(?P<indent>\s*)(?:```|~~~)")


def overlong_fence_lines(text):
    """(line number, width) of each line in a fence wider than the code column, measured from
    the fence's own indentation (a fence inside an admonition is indented by four spaces)."""
    found, indent = [], None
    for lineno, line in enumerate(text.split("\n"), 1):
        match = CODE_FENCE.match(line)
        if match:
            indent = None if indent is not None else len(match["indent"])
        elif indent is not None and len(line) - indent > CODE_COLUMN and "--8<--" not in line:
            found.append((lineno, len(line) - indent))
    return found


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_module_lines_fit_the_sites_code_column(module):
    lines = module.read_text(encoding="utf-8").splitlines()
    wide = [(n, len(line)) for n, line in enumerate(lines, 1) if len(line) > CODE_COLUMN]
    assert not wide, f"{module.name}: lines wider than {CODE_COLUMN} columns (line, width): {wide[:10]}"


@pytest.mark.parametrize("page", sorted(book_pages.DOCS_DIR.rglob("*.md")),
                         ids=lambda p: str(p.relative_to(book_pages.DOCS_DIR)))
def test_page_code_lines_fit_the_sites_code_column(page):
    wide = overlong_fence_lines(page.read_text(encoding="utf-8"))
    assert not wide, f"{page.name}: code lines wider than {CODE_COLUMN} columns (line, width): {wide[:10]}"


def test_overlong_fence_lines_measures_from_the_fences_indentation():
    long_line = "x" * (CODE_COLUMN + 1)
    page = f"text {long_line}\n```python\n{long_line}\n```\n!!! note\n    ```python\n    {'y' * CODE_COLUMN}\n    ```\n"
    assert overlong_fence_lines(page) == [(3, CODE_COLUMN + 1)]
