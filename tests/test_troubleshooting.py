"""The troubleshooting appendix: its table of expected losses, checked against the book's
stored runs (docs/data/*.json) and the tables of its chapters, and, where that is cheap,
against a fresh run of the book's code; and the first loss of every recipe, ln V."""

import dataclasses
import json
import math
import re

import pytest
import torch

import book_pages
from ch02_tokenizer import python_docs_text
from ch03_embeddings import DATA_DIR, train_position_model
from ch06_gpt import GPT
from ch07_transformer import cross_attention_history
from ch08_training import CharTokenizer, TokenBatches, make_config

PAGE = book_pages.DOCS_DIR / "appendix" / "troubleshooting.md"
CHAPTERS = book_pages.DOCS_DIR / "chapters"
QUOTED = re.compile(r"Chapter (\d+)'s table: ([\d.]+)")
STORED = re.compile(r"`([\w.]+): ([\w.]+)`")


@dataclasses.dataclass
class Row:
    run: str
    measure: str  # "training" (the mean of the 10 iterations up to it) or "validation"
    iteration: int
    low: float
    high: float
    source: str


def expected_losses():
    """The rows of the page's table of expected losses."""
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    start = lines.index("| run | measure | iteration | expected | source |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        run, measure, iteration, expected, source = (cell.strip() for cell in line.strip("|").split("|"))
        band = re.fullmatch(r"(\u2212?[\d.]+)\u2013([\d.]+)", expected)
        if band is None:
            raise ValueError(f"{PAGE.name}: the row {run!r} gives {expected!r}, not a band such as 1.85\u20132.00")
        low, high = (float(x.replace("\u2212", "-")) for x in band.groups())
        rows.append(Row(run, measure, int(iteration), low, high, source))
    return rows


ROWS = expected_losses()


def stored_value(row):
    """The loss the row's stored run has at the row's iteration: a validation loss where it
    was measured, or the mean of the training losses of the 10 iterations up to it."""
    name, path = STORED.fullmatch(row.source).groups()
    value = json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    if row.measure == "validation":
        return dict((it, loss) for it, loss in value)[row.iteration]
    assert row.measure == "training" and all(isinstance(v, float) for v in value)
    window = value[max(0, row.iteration - 10):row.iteration]
    assert len(window) == min(10, row.iteration), "the run is shorter than the row's iteration"
    return sum(window) / len(window)


def test_the_table_covers_every_training_run_of_the_book():
    sources = {STORED.fullmatch(r.source)[1] if STORED.fullmatch(r.source) else r.source for r in ROWS}
    stored = {p.stem for p in DATA_DIR.glob("*.json")} - {"ch13_classification"}  # accuracies, not losses
    figures = {"ch10_evaluation.sampling_diagnostics"}  # the same tiny run as context_and_stride
    assert stored - figures <= sources
    assert all(r.low < r.high for r in ROWS) and {r.measure for r in ROWS} == {"training", "validation"}


@pytest.mark.parametrize("row", [r for r in ROWS if STORED.fullmatch(r.source)], ids=lambda r: f"{r.source} @ {r.iteration}")
def test_the_stored_run_lies_in_the_band(row):
    assert row.low <= stored_value(row) <= row.high, row


@pytest.mark.parametrize("row", [r for r in ROWS if QUOTED.fullmatch(r.source)], ids=lambda r: r.run)
def test_the_chapters_measured_loss_lies_in_the_band(row):
    chapter, value = QUOTED.fullmatch(row.source).groups()
    page = next(CHAPTERS.glob(f"ch{int(chapter):02d}_*.md")).read_text(encoding="utf-8")
    assert any(line.startswith("|") and value in line for line in page.splitlines()), f"Chapter {chapter} has no {value}"
    assert row.low <= float(value) <= row.high


def rope_losses(n):
    losses = []
    train_position_model("rope", losses=losses, stop_after=n)
    return losses


FRESH = {  # a stored run's first training losses, computed again: n -> [loss of iterations 1..n]
    "`ch03_embeddings.position_experiment: losses.rope`": rope_losses,
    "`ch07_transformer.cross_attention: losses`": lambda n: cross_attention_history(stop_after=n)["losses"],
}


@pytest.mark.parametrize("row", [r for r in ROWS if r.source in FRESH and r.iteration == 1], ids=lambda r: r.source)
def test_a_fresh_run_starts_in_the_band(row):
    first = FRESH[row.source](1)
    assert len(first) == 1 and row.low <= first[0] <= row.high


def test_every_recipe_starts_at_ln_v():
    """The page's first check: an untrained model's loss is about ln V, for every recipe."""
    text = python_docs_text()
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text[:50_000]))
    data = TokenBatches(ids, None, 64)
    for recipe in ("nanogpt", "book", "tiny"):
        cfg = make_config(recipe)
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
        _, loss = model(*data.get_batch("train", 16, torch.Generator().manual_seed(0)))
        assert loss.item() == pytest.approx(math.log(tokenizer.vocab_size), abs=0.3), recipe
