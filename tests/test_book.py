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
