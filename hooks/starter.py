"""Make a chapter's starter file: its module with the exercise bodies removed.

    python hooks/starter.py ch01_backprop > my_ch01.py

An exercise in a module is a function or method whose ``def`` (or first decorator) line
is directly preceded by a comment ``# Exercise N: title``. The starter keeps everything
else of the module, and for each exercise keeps the comment, the signature and the
docstring, and replaces the body with ``raise NotImplementedError("Exercise N: title")``.
It is generated from the reference module, so it can never drift from it.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent.parent / "code"
EXERCISE = re.compile(r"^\s*# Exercise (?P<number>\d+): (?P<title>.+?)\s*$")


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


def make_starter(source: str) -> str:
    """``source`` with each exercise's body replaced by ``raise NotImplementedError``."""
    lines = source.splitlines(keepends=True)
    for ex in reversed(find_exercises(source)):  # from the bottom, so line numbers hold
        stub = f'{ex.indent}raise NotImplementedError("Exercise {ex.number}: {ex.title}")\n'
        lines[ex.body_start - 1 : ex.body_end] = [stub]
    header = (
        "# Starter file generated from the book's module: the exercise bodies are removed.\n"
        "# Implement them, then grade your work with\n"
        "#     pytest tests/test_<this chapter>.py --impl <this file>\n"
    )
    return header + "".join(lines)


def starter_for(module: str) -> str:
    path = CODE_DIR / f"{module.removesuffix('.py')}.py"
    if not path.exists():
        raise SystemExit(f"no chapter module {path.name} in {CODE_DIR}")
    return make_starter(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python hooks/starter.py chNN_topic > my_chNN.py")
    sys.stdout.write(starter_for(sys.argv[1]))
