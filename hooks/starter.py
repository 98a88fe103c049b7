"""Make a chapter's starter file: its module with the exercise bodies removed.

    .venv/bin/python hooks/starter.py ch01_backprop > my_ch01.py

An exercise in a module is a function or method whose ``def`` (or first decorator) line
is directly preceded by a comment ``# Exercise N: title``. The starter keeps everything
else of the module, and for each exercise keeps the comment, the signature and the
docstring, and replaces the body with ``raise NotImplementedError("Exercise N: title")``
(the message the pytest plugin recognizes as "not implemented yet"). The module's
``# --8<--`` lines, which only mark sections for the pages, are left out. It is generated
from the reference module, so it can never drift from it.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent.parent / "code"
EXERCISE = re.compile(r"^\s*# Exercise (?P<number>\d+): (?P<title>.+?)\s*$")
SECTION_MARKER = re.compile(r"^\s*# --8<-- ")  # pymdownx.snippets' section lines


@dataclass
class Exercise:
    number: int
    title: str
    name: str  # the function's name
    body_start: int  # first line of the body to remove (1-based, after the docstring)
    body_end: int  # last line of the body
    indent: str


def find_exercises(source: str) -> list[Exercise]:
    """The exercises of a module's source, in order of appearance."""
    lines = source.splitlines()
    exercises = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        match = EXERCISE.match(lines[first - 2]) if first >= 2 else None
        if match is None:
            continue
        body = node.body
        has_docstring = isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant
        ) and isinstance(body[0].value.value, str)
        if has_docstring and len(body) == 1:
            raise ValueError(f"exercise {match['number']} ({node.name}) has no body to remove")
        kept = body[1] if has_docstring else body[0]
        exercises.append(
            Exercise(
                number=int(match["number"]),
                title=match["title"],
                name=node.name,
                body_start=kept.lineno,
                body_end=node.end_lineno,
                indent=" " * kept.col_offset,
            )
        )
    exercises.sort(key=lambda e: e.body_start)
    numbers = [e.number for e in exercises]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"exercise numbers are not unique: {numbers}")
    return exercises


def make_starter(source: str, module: str = "chNN_topic") -> str:
    """``source`` with each exercise's body replaced by ``raise NotImplementedError``, and
    without its snippet section markers; ``module`` names the chapter in the header."""
    exercises = find_exercises(source)
    lines = source.splitlines(keepends=True)
    for ex in reversed(exercises):  # from the bottom, so line numbers hold
        stub = f'{ex.indent}raise NotImplementedError("Exercise {ex.number}: {ex.title}")\n'
        lines[ex.body_start - 1 : ex.body_end] = [stub]
    lines = [line for line in lines if not SECTION_MARKER.match(line)]
    return starter_header(module, exercises) + "".join(lines)


def starter_header(module: str, exercises: list[Exercise]) -> str:
    """The comment on top of a starter: what it is and the commands that grade it."""
    mine = f"my_{module[:4]}.py"
    first = min((e.number for e in exercises), default=1)
    return (
        f"# Starter file for the exercises of code/{module}.py, generated from the book's module:\n"
        "# the exercise bodies are removed. Save it in the book's folder as " + mine + ",\n"
        "# implement an exercise, then grade it (here exercise " + str(first) + "):\n"
        f"#     .venv/bin/pytest tests/test_{module}.py --impl {mine} --exercise {first}\n"
        "# -m exercise instead of --exercise N grades every exercise; neither runs all of\n"
        "# the chapter's tests against this file.\n"
    )


def starter_for(module: str) -> str:
    path = CODE_DIR / f"{module.removesuffix('.py')}.py"
    if not path.exists():
        raise SystemExit(f"no chapter module {path.name} in {CODE_DIR}")
    return make_starter(path.read_text(encoding="utf-8"), path.stem)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: .venv/bin/python hooks/starter.py chNN_topic > my_chNN.py")
    sys.stdout.write(starter_for(sys.argv[1]))
