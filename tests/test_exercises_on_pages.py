"""Exercises that don't give the answer away.

An exercise is a function of a chapter's module whose ``def`` is preceded by
``# Exercise N: title`` (hooks/starter.py). Its body may appear on the chapter's page
only where the reader chooses to look: after the "## Exercises" heading, inside a
collapsed ``??? success "Solution"`` box. The chapter text before it uses the function
without showing its body.

How the pages do it, since a page's blocks run in order in one kernel:

* A plain function that the text needs before the exercises is imported from the
  chapter's module (``from ch04_attention import softmax``): the notebook's setup cells
  write the book's modules next to it, so the import works everywhere. The solution
  block at the end defines the same function again from its own snippet section.
* A method that is an exercise (Appendix A's ``Sigmoid.backward``, Chapter 6's
  ``GPT.tie_weights`` and ``GPT.generate``, Chapter 9's ``KVCache.update``, Chapter 13's
  ``LoRALinear.forward`` and ``merge``) has its own snippet section, and the class is
  shown from the sections around it: the one before it, and where methods follow it, a
  second section joined to the first in the same fence (it must reach a line at column 0,
  such as the next top-level function, or ``dedent_subsections`` would dedent it out of
  the class; Chapter 13's ``delta_weight``, stranded between two exercises, is shown on
  its own and attached like them). The page then attaches the module's method to the
  class it just defined, ``GPT.generate = ch06_gpt.GPT.generate``, with a comment naming
  the exercise; the prose says what the method does, never how. Snippets cannot elide a
  body inside a class, and a signature-only copy would be code pasted on the page.

The module in code/ stays complete; only the page hides the bodies.
"""

import re
from pathlib import Path

import pytest

import book_pages
import starter

MODULES = sorted(book_pages.CODE_DIR.glob("ch[0-9][0-9]_*.py"))
EXERCISE_MODULES = [m for m in MODULES if starter.find_exercises(m.read_text(encoding="utf-8"))]
EXERCISES_HEADING = re.compile(r"^## Exercises\s*$")
COLLAPSED = re.compile(r"^(?P<indent>\s*)\?\?\?\+? ")


def exercise_bodies(module):
    """(exercise, its body lines stripped of indentation and blanks) for each exercise."""
    source = module.read_text(encoding="utf-8")
    lines = source.splitlines()
    for ex in starter.find_exercises(source):
        body = [line.strip() for line in lines[ex.body_start - 1 : ex.body_end]]
        yield ex, [line for line in body if line and not line.startswith("# --8<--")]


def occurrences(page_lines, body):
    """Line indices (0-based) where ``body`` starts as consecutive non-blank lines."""
    stripped = [(i, line.strip()) for i, line in enumerate(page_lines) if line.strip()]
    texts = [text for _, text in stripped]
    return [stripped[k][0] for k in range(len(texts) - len(body) + 1)
            if texts[k : k + len(body)] == body]


def inside_collapsed_block(page_lines, index):
    """Whether line ``index`` lies in the content of a ``??? `` admonition."""
    indent = len(page_lines[index]) - len(page_lines[index].lstrip())
    for line in reversed(page_lines[:index]):
        if not line.strip():
            continue
        line_indent = len(line) - len(line.lstrip())
        if line_indent < indent:
            if COLLAPSED.match(line):
                return True
            indent = line_indent  # a fence or an outer admonition: keep looking outwards
            if indent == 0:
                return False
    return False


def expanded_page(module):
    page = book_pages.DOCS_DIR / "chapters" / f"{module.stem}.md"
    return book_pages.expand_snippets(page.read_text(encoding="utf-8")).split("\n")


def exercises_heading(page_lines):
    found = [i for i, line in enumerate(page_lines) if EXERCISES_HEADING.match(line)]
    assert len(found) == 1, f"expected one '## Exercises' heading, found {len(found)}"
    return found[0]


CASES = [(m, ex, body) for m in EXERCISE_MODULES for ex, body in exercise_bodies(m)]


@pytest.mark.parametrize(
    "module, exercise, body", CASES, ids=[f"{m.stem}-{ex.number}" for m, ex, _ in CASES]
)
def test_exercise_body_is_shown_only_in_its_collapsed_solution(module, exercise, body):
    assert body, f"{module.stem}: exercise {exercise.number} has an empty body"
    lines = expanded_page(module)
    heading = exercises_heading(lines)
    found = occurrences(lines, body)
    assert found, f"{module.stem}.md never shows the solution of exercise {exercise.number}"
    for index in found:
        where = f"{module.stem}.md (expanded) line {index + 1}"
        assert index > heading, (
            f"{where}: the body of exercise {exercise.number} ({exercise.name}) is shown "
            "before the exercise is posed"
        )
        assert inside_collapsed_block(lines, index), (
            f"{where}: the body of exercise {exercise.number} ({exercise.name}) is shown "
            "outside a collapsed ??? block"
        )


@pytest.mark.parametrize("module", EXERCISE_MODULES, ids=lambda p: p.stem)
def test_chapter_text_does_not_announce_the_solution(module):
    text = (book_pages.DOCS_DIR / "chapters" / f"{module.stem}.md").read_text(encoding="utf-8")
    before = text.split("\n## Exercises", 1)[0]
    assert not re.search(r"here is the reference|the reference solution", before, re.IGNORECASE)


def test_the_checks_recognize_a_hidden_and_a_shown_body():
    page = [
        "Text uses `area`.",
        "```python",
        "def area(r):",
        "    return 3.14 * r * r",
        "```",
        "## Exercises",
        '??? success "Solution"',
        "    ```python",
        "    def area(r):",
        "        return 3.14 * r * r",
        "    ```",
        "After the box:",
        "    return 3.14 * r * r",
    ]
    body = ["return 3.14 * r * r"]
    assert occurrences(page, body) == [3, 9, 12]
    assert not inside_collapsed_block(page, 3)
    assert inside_collapsed_block(page, 9)
    assert not inside_collapsed_block(page, 12)  # indented, but under ordinary text
    assert exercises_heading(page) == 5
