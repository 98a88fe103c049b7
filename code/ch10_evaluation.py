"""Chapter 10: evaluating language models.

The held-out loss, perplexity and bits per byte of a long text, every token scored once with
as much context as a sliding window allows; comparing the checkpoints of a training run
(learning curves, the train/validation gap, overfitting); a multiple-choice benchmark
harness that scores each ending by its log-likelihood, summed or length-normalised
(HellaSwag's method); and diagnostics of sampled text (distinct-n, repetition) across
temperatures and top-p.

The metrics take token sequences and models; only ``sampling_sweep`` calls chapter 9's
``generate``. Depends on torch, the standard library and chapters 2, 6 and 8; matplotlib
is imported inside the plot_* functions.

Shapes: B batch, T sequence length, V vocabulary size.

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt,
ch08_training, ch09_generation.
"""

# --8<-- [start:imports]
import contextlib
import dataclasses
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ch02_tokenizer import python_docs_text, split_train_val, train_bpe
from ch06_gpt import GPT
from ch08_training import (CharTokenizer, TokenBatches, bits_per_byte, get_batch, make_config,
                           model_from_checkpoint, perplexity, train)
from ch09_generation import generate
# --8<-- [end:imports]
from ch03_embeddings import stored_run  # the runs the figures are drawn from


# ---------------------------------------------------------------------------
# Log-probabilities of tokens
# ---------------------------------------------------------------------------

# --8<-- [start:logprobs]
@contextlib.contextmanager
def evaluating(model):
    """Dropout off and no gradients inside; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def token_logprobs(model, x, y):
    """log p(y[b, t] | x[b, :t + 1]) at every position: x, y (B, T) -> (B, T).

    A target of -1 marks padding: its entry is 0, so sums over a row skip it."""
    logits, _ = model(x)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # float32 even under autocast
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked.masked_fill(y < 0, 0.0)


def pad_right(sequences, value):
    """Stack 1-D LongTensors of different lengths into (B, T_max), padded on the right.

    For a causal model this is harmless: position t attends only to positions <= t, so the
    padding after a sequence never changes the logits of its real tokens."""
    out = torch.full((len(sequences), max(len(s) for s in sequences)), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out
# --8<-- [end:logprobs]


# ---------------------------------------------------------------------------
# Loss of a long text: a sliding window
# ---------------------------------------------------------------------------

# --8<-- [start:exercise-1]
# Exercise 1: the windows of a strided evaluation
def window_spans(n_tokens, block_size, stride):
    """The windows that score a text of n_tokens tokens, as (start, end, n_new) triples.

    A window reads tokens[start:end] (at most block_size of them) and predicts
    tokens[start + 1 : end + 1]; only its last n_new predictions are counted. Token 0 has no
    context and is never scored; every other token (1 .. n_tokens - 1) must be scored by
    exactly one window. The first window starts at 0 and counts all its predictions; each
    next window starts stride tokens later and counts only the predictions not yet counted,
    so a counted token sees at least block_size - stride + 1 tokens of context. The last
    window ends at n_tokens - 1. Raise ValueError unless 1 <= stride <= block_size and
    n_tokens >= 2.
    """
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"a text of {n_tokens} tokens has nothing to predict")
    start, scored_until = 0, 0  # targets 1 .. scored_until are counted
    while scored_until < n_tokens - 1:
        end = min(start + block_size, n_tokens - 1)  # predicts targets start + 1 .. end
        yield start, end, end - scored_until
        scored_until = end
        start += stride
# --8<-- [end:exercise-1]


# --8<-- [start:sliding-window]
def sliding_window_nll(model, ids, stride, block_size=None, batch_size=32):
    """Total negative log-likelihood (nats) of ids (1-D LongTensor) and how many tokens it
    covers: every token but the first, each scored once, by window_spans' windows."""
    block_size = block_size or model.config.block_size
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(
            f"ids must be one text: a 1-D sequence of token ids, got shape {tuple(ids.shape)}"
        )
    spans = list(window_spans(len(ids), block_size, stride))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(spans), batch_size):
            group = spans[i : i + batch_size]
            x = pad_right([ids[a:b] for a, b, _ in group], 0).to(device)  # (B, T)
            y = pad_right([ids[a + 1 : b + 1] for a, b, _ in group], -1).to(device)  # (B, T)
            logp = token_logprobs(model, x, y)  # (B, T)
            for row, (a, b, n_new) in enumerate(group):
                total -= logp[row, b - a - n_new : b - a].sum().item()  # the last n_new predictions
                count += n_new
    return total, count


@dataclass
class TextScore:
    """A model's score on a text: the total loss and what it was spread over."""

    nll: float  # negative log-likelihood of the scored tokens, in nats
    n_tokens: int  # tokens scored
    n_bytes: int  # UTF-8 bytes of the text those tokens spell

    @property
    def loss(self):  # nats per token
        return self.nll / self.n_tokens

    @property
    def perplexity(self):
        return perplexity(self.loss)

    @property
    def bits_per_byte(self):
        return bits_per_byte(self.loss, self.n_tokens, self.n_bytes)


def evaluate_text(model, tokenizer, text, stride, block_size=None):
    """Score ``text`` with a model and its tokenizer (any object with encode(str) -> ids and
    decode(ids) -> str). The first token is context only, so its bytes are not counted."""
    ids = tokenizer.encode(text)
    nll, n_tokens = sliding_window_nll(model, ids, stride, block_size)
    n_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return TextScore(nll, n_tokens, n_bytes)
# --8<-- [end:sliding-window]


# --8<-- [start:context-position]
def loss_by_position(model, ids, n_windows=1024, seed=0, block_size=None, batch_size=64):
    """Mean loss at each position of n_windows random windows of ids: a (block_size,) tensor.

    Position j predicts its token from the j + 1 tokens before it in the window, so this is
    the loss as a function of how much context the model was given. The windows start at
    random places (chapter 8's get_batch), so no position lines up with a layout of the text."""
    block_size = block_size or model.config.block_size
    x, y = get_batch(ids, block_size, n_windows, torch.Generator().manual_seed(seed))  # (N, T) each
    device = next(model.parameters()).device
    with evaluating(model):
        logp = torch.cat([token_logprobs(model, x[i : i + batch_size].to(device),
                                         y[i : i + batch_size].to(device))
                          for i in range(0, n_windows, batch_size)])  # (N, T)
    return -logp.mean(dim=0).cpu()


def stride_sweep(model, ids, strides, block_size=None):
    """Loss per token and model positions computed (the cost) for each stride."""
    block_size = block_size or model.config.block_size
    rows = []
    for stride in strides:
        nll, count = sliding_window_nll(model, ids, stride, block_size)
        cost = sum(b - a for a, b, _ in window_spans(len(ids), block_size, stride))
        rows.append({"stride": stride, "loss": nll / count, "positions": cost})
    return rows
# --8<-- [end:context-position]


# ---------------------------------------------------------------------------
# Models for the chapter: chapter 8's trainer, and its step on any token array
# ---------------------------------------------------------------------------

# --8<-- [start:models]
def train_gpt(cfg, data, vocab_size):
    """A fresh GPT of cfg.model's shape with vocab_size tokens, trained in memory by
    Chapter 8's train() on a source of batches (such as TokenBatches of any token arrays),
    for tokenizers other than Chapter 8's characters. Returns (model in eval mode, history)."""
    torch.manual_seed(cfg.seed)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=vocab_size))
    history = train(dataclasses.replace(cfg, out_dir=None), model, data, log=lambda s: None)
    return model.eval(), history


def train_bpe_model(cfg, train_text, vocab_size=512):
    """Chapter 2's byte-level BPE with vocab_size tokens, learned on train_text, and a GPT
    trained on its tokens as cfg says. Returns (model, tokenizer as a tiktoken Encoding)."""
    tokenizer = train_bpe(train_text, vocab_size).to_tiktoken()
    ids = torch.tensor(tokenizer.encode_ordinary(train_text))
    data = TokenBatches(ids, None, cfg.model.block_size)  # training only: no validation split
    model, _ = train_gpt(dataclasses.replace(cfg, eval_iters=0), data, tokenizer.n_vocab)
    return model, tokenizer
# --8<-- [end:models]


# ---------------------------------------------------------------------------
# Checkpoints and learning curves
# ---------------------------------------------------------------------------

# --8<-- [start:checkpoint-io]
def train_with_checkpoints(cfg, keep_at, log=print):
    """Run chapter 8's train(cfg) and keep a copy of its checkpoint at each iteration of
    keep_at. cfg.out_dir must hold no earlier run. Returns (history, {iteration: path}).

    train() overwrites one checkpoint; stopping it at each kept iteration (stop_after) and
    resuming is, as chapter 8 proved, the same run as an uninterrupted one."""
    out = Path(cfg.out_dir)
    if (out / "checkpoint.safetensors").exists():
        raise ValueError(f"{out} already holds a run; give train_with_checkpoints an empty out_dir")
    kept = {}
    for it in sorted(keep_at):
        if not 0 < it <= cfg.max_iters:
            raise ValueError(f"cannot keep iteration {it} of a {cfg.max_iters}-iteration run")
        history = train(cfg, stop_after=it, log=log)
        kept[it] = out / f"checkpoint-{it}.safetensors"
        shutil.copyfile(out / "checkpoint.safetensors", kept[it])
    return history, kept
# --8<-- [end:checkpoint-io]


# --8<-- [start:compare]
def compare_checkpoints(checkpoints, tokenizer, text, stride, history=None, window=50):
    """One row per checkpoint: its score on the same held-out text, and, from the run's
    history, the mean training loss of the last ``window`` iterations before it."""
    rows = []
    for it, path in sorted(checkpoints.items()):
        model, _ = model_from_checkpoint(path)
        score = evaluate_text(model, tokenizer, text, stride)
        row = {"iteration": it, "loss": score.loss, "perplexity": score.perplexity,
               "bits_per_byte": score.bits_per_byte}
        if history is not None:
            recent = history["train"][max(0, it - window) : it]
            row["train_loss"] = sum(recent) / len(recent)
        rows.append(row)
    return rows


def smooth(values, window):
    """Moving average over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def best_checkpoint(history):
    """(iteration, loss) of the lowest validation loss: where early stopping would stop."""
    return tuple(min(history["val"], key=lambda row: row[1]))


def generalization_gap(history, window=50):
    """Validation loss minus smoothed training loss at each evaluation: [[it, gap], ...]."""
    train_curve = smooth(history["train"], window)
    return [[it, val - train_curve[it - 1]] for it, val in history["val"]]
# --8<-- [end:compare]


# ---------------------------------------------------------------------------
# A multiple-choice benchmark harness
# ---------------------------------------------------------------------------

# --8<-- [start:exercise-3]
# Exercise 3: the log-likelihood of each ending
def continuation_logprobs(model, context_ids, endings_ids, block_size=None):
    """Summed log p(ending | context) for each ending, all scored in ONE padded batch.

    context_ids: a non-empty list of token ids; endings_ids: a list of k non-empty lists of
    ids, each at most block_size long. Form each sequence context + ending, keep its last
    block_size + 1 tokens (the model reads block_size of them; the last is only a target),
    pad the sequences on the right (pad_right), compute token_logprobs with padded targets
    -1, and sum the log-probabilities of each ending's tokens (the last len(ending) targets
    of its row). Use the `evaluating` context. Returns a (k,) float tensor.
    """
    block_size = block_size or model.config.block_size
    if not context_ids:
        raise ValueError(
            "the context needs at least one token: the first token of an ending is predicted"
            " from it"
        )
    if any(not 1 <= len(e) <= block_size for e in endings_ids):
        raise ValueError(f"every ending needs between 1 and block_size={block_size} tokens")
    rows = [torch.tensor(list(context_ids) + list(e))[-(block_size + 1) :] for e in endings_ids]
    seqs = pad_right(rows, -1)  # (k, L); -1 after each sequence
    device = next(model.parameters()).device
    x, y = seqs[:, :-1].clamp(min=0).to(device), seqs[:, 1:].to(device)  # (k, L - 1) each
    with evaluating(model):
        logp = token_logprobs(model, x, y)  # (k, L - 1), 0 at padding
    n_targets = [len(r) - 1 for r in rows]  # real targets of each row
    return torch.stack(
        [logp[i, n - len(e) : n].sum() for i, (n, e) in enumerate(zip(n_targets, endings_ids))]
    )
# --8<-- [end:exercise-3]


# --8<-- [start:multiple-choice]
SCORINGS = ("sum", "per_token", "per_byte")


def choose(logprob_sums, n_tokens, n_bytes, scoring):
    """Index of the best ending: by summed log-likelihood, or per token, or per byte."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    scores = torch.as_tensor(logprob_sums, dtype=torch.float64)
    if scoring == "per_token":
        scores = scores / torch.as_tensor(n_tokens, dtype=torch.float64)
    elif scoring == "per_byte":
        scores = scores / torch.as_tensor(n_bytes, dtype=torch.float64)
    return int(scores.argmax())


def multiple_choice_accuracy(model, tokenizer, tasks, block_size=None):
    """Accuracy on tasks ({"ctx": str, "endings": [str, ...], "label": int}) under each scoring,
    and the accuracy of guessing at random (the mean of 1 / number of endings)."""
    if not tasks:
        raise ValueError("no tasks to score")
    correct = dict.fromkeys(SCORINGS, 0)
    for task in tasks:
        endings = [tokenizer.encode(e) for e in task["endings"]]
        sums = continuation_logprobs(model, tokenizer.encode(task["ctx"]), endings, block_size)
        n_tokens = [len(e) for e in endings]
        n_bytes = [len(e.encode("utf-8")) for e in task["endings"]]
        for scoring in SCORINGS:
            correct[scoring] += choose(sums, n_tokens, n_bytes, scoring) == task["label"]
    accuracy = {scoring: correct[scoring] / len(tasks) for scoring in SCORINGS}
    accuracy["chance"] = sum(1 / len(t["endings"]) for t in tasks) / len(tasks)
    return accuracy


def load_tasks(path):
    """Tasks from a JSONL file, one {"ctx", "endings", "label"} object a line (HellaSwag's
    validation file has these fields, so it loads as it is)."""
    tasks = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        task = json.loads(line)
        missing = {"ctx", "endings", "label"} - set(task)
        if missing:
            raise ValueError(f"{path}:{lineno}: missing {sorted(missing)}")
        if not 0 <= int(task["label"]) < len(task["endings"]):
            raise ValueError(f"{path}:{lineno}: label {task['label']} is not an ending's index")
        tasks.append(
            {"ctx": task["ctx"], "endings": list(task["endings"]), "label": int(task["label"])}
        )
    return tasks


PLAIN_WORD = re.compile(r"[A-Za-z][a-z]{0,9}[,.;:]?")  # a word of 1 to 10 letters, maybe a comma...


def completion_tasks(text, n_tasks, n_endings=4, context_words=12, max_ending_words=5,
                     split_words=False, seed=0):
    """Multiple-choice completion tasks cut from the plain prose of a text, in HellaSwag's
    format: {"ctx": str, "endings": [str, ...], "label": index of the right ending}.

    The context is context_words consecutive words; the right ending is the next 1 to
    max_ending_words words; each wrong ending is 1 to max_ending_words consecutive words
    from elsewhere. Endings start with a space, so context + ending is text. With
    split_words, every piece is cut inside its first word instead: the context ends with
    that word's first letters and each ending starts with the rest of its own first word.
    Lengths are drawn independently, so the right ending is no shorter than the others on
    average. Only plain words (PLAIN_WORD) are used: no code, tables or long identifiers."""
    words = text.split()
    if len(words) < 4 * (context_words + max_ending_words):
        raise ValueError(f"a text of {len(words)} words is too short to cut tasks from")
    plain = [bool(PLAIN_WORD.fullmatch(w)) for w in words]
    rng = random.Random(seed)
    shortest = 3 if split_words else 1  # a word to split needs a letter on each side of the cut

    def piece(avoid=None):  # (start, n_words, letters cut off) of a run of plain words
        for _ in range(100_000):
            n = rng.randint(1, max_ending_words)
            i = rng.randrange(context_words, len(words) - max_ending_words)
            ok = (
                all(plain[i - (context_words if avoid is None else 0) : i + n])
                and len(words[i]) >= shortest
            )
            if ok and (avoid is None or abs(i - avoid) > context_words + max_ending_words):
                return i, n, rng.randint(1, len(words[i].rstrip(",.;:")) - 1) if split_words else 0
        raise ValueError("the text has too little plain prose to cut tasks from")

    def ending(i, n, cut):
        return ((" " + " ".join(words[i : i + n]))[cut + 1 :] if cut
                else " " + " ".join(words[i : i + n]))

    tasks = []
    for _ in range(n_tasks):
        i, n, cut = piece()
        context = " ".join(words[i - context_words : i]) + (" " + words[i][:cut] if cut else "")
        wrong = [ending(*piece(avoid=i)) for _ in range(n_endings - 1)]
        label = rng.randrange(n_endings)  # where the right ending goes among the wrong ones
        endings = wrong[:label] + [ending(i, n, cut)] + wrong[label:]
        tasks.append({"ctx": context, "endings": endings, "label": label})
    return tasks
# --8<-- [end:multiple-choice]


# ---------------------------------------------------------------------------
# Diagnostics of sampled text
# ---------------------------------------------------------------------------

# --8<-- [start:ngrams]
def ngrams(sequence, n):
    """The n-grams of a sequence, in order: [tuple(sequence[i:i + n]) for each i]."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if isinstance(sequence, torch.Tensor):  # ints, not 0-d tensors (which hash by identity)
        sequence = sequence.tolist()
    return [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
# --8<-- [end:ngrams]


# --8<-- [start:exercise-2]
# Exercise 2: distinct-n
def distinct_n(sequences, n):
    """Distinct-n of a set of samples: the number of different n-grams among all the n-grams
    of all the sequences, divided by the number of those n-grams (use ngrams). 1 means no
    n-gram occurs twice anywhere; 1 / len(sequences) or less means the samples are copies.
    Raise ValueError if the sequences have no n-gram at all.
    """
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    if not grams:
        raise ValueError(f"the sequences are shorter than n={n}: no n-grams to count")
    return len(set(grams)) / len(grams)
# --8<-- [end:exercise-2]


# --8<-- [start:exercise-4]
# Exercise 4: repetition rate
def repetition_rate(sequences, n):
    """The fraction of n-grams that repeat an n-gram seen EARLIER IN THE SAME sequence,
    over all the n-grams of all the sequences. A sample stuck in a loop scores near 1; two
    samples that are copies of each other but never repeat themselves score 0. Raise
    ValueError if the sequences have no n-gram at all.
    """
    repeats = total = 0
    for seq in sequences:
        seen = set()
        for gram in ngrams(seq, n):
            repeats += gram in seen
            seen.add(gram)
            total += 1
    if total == 0:
        raise ValueError(f"the sequences are shorter than n={n}: no n-grams to count")
    return repeats / total
# --8<-- [end:exercise-4]


# --8<-- [start:sampling-sweep]
def sample_diagnostics(sequences):
    """distinct-1, distinct-2 and the repetition rate of 4-grams of a set of samples."""
    return {"distinct_1": distinct_n(sequences, 1), "distinct_2": distinct_n(sequences, 2),
            "repetition_4": repetition_rate(sequences, 4)}


def sampling_sweep(model, prompt_ids, settings, n_samples=8, n_tokens=100, seed=0):
    """Draw n_samples continuations of the prompt for each settings dict (keyword arguments
    of chapter 9's generate: temperature, top_k, top_p, ...) and measure them.

    Every setting starts from the same seed. Returns one row per setting: the settings,
    the diagnostics, and the samples (lists of new token ids)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)] * n_samples, device=device)  # (n_samples, P)
    rows = []
    with evaluating(model):
        for setting in settings:
            generator = torch.Generator(device=device).manual_seed(seed)
            # (n, P + n_tokens)
            out = generate(model, prompt, n_tokens, generator=generator, **setting)
            samples = out[:, prompt.shape[1] :].tolist()
            rows.append({**setting, **sample_diagnostics(samples), "samples": samples})
    return rows


def reference_diagnostics(ids, n_samples=8, n_tokens=100, seed=0):
    """The same diagnostics on pieces of real text (token ids) as long as the samples."""
    if len(ids) <= n_tokens:
        raise ValueError(f"{len(ids)} tokens are too few for pieces of {n_tokens}")
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - n_tokens) for _ in range(n_samples)]
    return sample_diagnostics([[int(t) for t in ids[s : s + n_tokens]] for s in starts])
# --8<-- [end:sampling-sweep]


# ---------------------------------------------------------------------------
# Stored runs of the figures: each *_history() trains and measures, and returns what its
# figure draws (python tests/benchmarks/figure_data.py writes it to docs/data/); the plot_*
# functions only draw from docs/data/, so building the book trains nothing.
# ---------------------------------------------------------------------------

def _tiny_docs_model(**settings):
    """Chapter 8's "tiny" recipe (with settings overridden) trained on the characters of the
    Python docs: (model, tokenizer, validation ids, history)."""
    text = python_docs_text()
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = split_train_val(torch.tensor(tokenizer.encode(text)))
    cfg = make_config("tiny", device="cpu", **settings)
    model, history = train_gpt(
        cfg, TokenBatches(train_ids, val_ids, cfg.model.block_size), tokenizer.vocab_size
    )
    return model, tokenizer, val_ids, history


def context_and_stride_history(strides=(64, 32, 16, 8, 4, 2, 1), **settings):
    """The tiny model's loss by position in the window, and the held-out loss and cost by stride."""
    model, _, val_ids, history = _tiny_docs_model(**settings)
    return {"history": history, "by_position": loss_by_position(model, val_ids).tolist(),
            "strides": stride_sweep(model, val_ids[:2000], list(strides))}


def overfit_config(data, **overrides):
    """A wide one-layer GPT, no weight decay: on a tiny text it has capacity to memorise."""
    settings = dict(data=str(data), out_dir=None, n_layer=1, d_model=128, block_size=32,
                    weight_decay=0.0, eval_interval=30, eval_iters=8, device="cpu")
    return make_config("tiny", **{**settings, **overrides})


def learning_curves_history(tiny_chars=3000, **settings):
    """The same model and recipe (chapter 8's trainer) on the whole corpus and on a tiny slice:
    [{"title", "history"}, ...] under "runs"."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / "tiny.txt"
        tiny.write_text(python_docs_text()[:tiny_chars], encoding="utf-8")
        runs = [("the Python docs: 420,000 training characters",
                 overfit_config("python-docs", **settings)),
                (f"the first {tiny_chars:,} characters, 70% of them for training",
                 overfit_config(tiny, val_fraction=0.3, **settings))]
        return {"tiny_chars": tiny_chars,
                "runs": [{"title": title, "history": train(cfg, log=lambda s: None)}
                         for title, cfg in runs]}


# --8<-- [start:capstone]
def capstone_history(data="python-docs", eval_interval=50, eval_iters=20, **settings):
    """The history of a run of Chapter 8's capstone recipe (RECIPES["book"]) on ``data``;
    settings override the recipe's (max_iters=5 runs only its first 5 iterations)."""
    cfg = make_config("book", data=str(data), out_dir=None, eval_interval=eval_interval,
                      eval_iters=eval_iters, sample_tokens=0, progress=False, device="cpu",
                      **settings)
    return train(cfg, log=lambda s: None)
# --8<-- [end:capstone]


SAMPLING_TEMPERATURES = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5]


def sampling_diagnostics_history(top_ps=(1.0, 0.9, 0.5), **settings):
    """The tiny model's sampling sweep (temperatures x top-p, samples left out) and the same
    diagnostics of held-out text."""
    model, tokenizer, val_ids, history = _tiny_docs_model(**settings)
    prompt = tokenizer.encode("The ")
    sweeps = {str(top_p): [{k: v for k, v in row.items() if k != "samples"}
                           for row in sampling_sweep(model, prompt,
                                                     [{"temperature": t, "top_p": top_p}
                                                      for t in SAMPLING_TEMPERATURES])]
              for top_p in top_ps}
    return {"history": history, "temperatures": SAMPLING_TEMPERATURES, "sweeps": sweeps,
            "reference": reference_diagnostics(val_ids.tolist())}


# ---------------------------------------------------------------------------
# Figures, drawn from the stored runs (docs/data/ch10_evaluation.*.json) in a second
# ---------------------------------------------------------------------------

def plot_context_and_stride(run=None):
    """Loss against context length, and the held-out loss and cost against the stride."""
    import matplotlib.pyplot as plt

    run = run or stored_run("ch10_evaluation.context_and_stride")
    by_position, rows = run["by_position"], run["strides"]
    strides = [r["stride"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(range(1, len(by_position) + 1), by_position, "o-", ms=3)
    ax1.set(xlabel="tokens of context (position in the window + 1)",
            ylabel="mean loss (nats per token)", title="More context, lower loss")
    ax1.grid(alpha=0.3)
    ax2.plot(strides, [r["loss"] for r in rows], "o-", color="C0")
    ax2.set_ylabel("held-out loss (nats per token)", color="C0")
    ax2.set(xscale="log", xlabel="stride (log scale)",
            title="Smaller stride: more context, more cost")
    ax2.set_xticks(strides, [str(s) for s in strides])
    ax2.minorticks_off()
    ax2.grid(alpha=0.3)
    cost = ax2.twinx()
    cost.plot(strides, [r["positions"] / 1e3 for r in rows], "s--", color="C1")
    cost.set_ylabel("positions computed (thousands)", color="C1")
    fig.tight_layout()
    return fig


def plot_learning_curves(run=None):
    """The same model and recipe (chapter 8's trainer) on the whole corpus and on a tiny slice."""
    import matplotlib.pyplot as plt

    run = run or stored_run("ch10_evaluation.learning_curves")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, curve in zip(axes, run["runs"]):
        history = curve["history"]
        ax.plot(range(1, len(history["train"]) + 1), smooth(history["train"], 20),
                label="training (smoothed)")
        steps, vals = zip(*history["val"])
        ax.plot(steps, vals, "o-", ms=3, label="validation")
        it, loss = best_checkpoint(history)
        ax.plot(
            [it], [loss], "*", ms=14, color="C3", label=f"lowest validation loss (iteration {it})"
        )
        ax.set(xlabel="iteration", title=curve["title"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (nats per token)")
    fig.tight_layout()
    return fig


def plot_capstone_curves(run=None):
    """Chapter 8's capstone recipe: its learning curves and its generalisation gap."""
    import matplotlib.pyplot as plt

    history = run or stored_run("ch10_evaluation.capstone")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(range(1, len(history["train"]) + 1), history["train"], color="C0", alpha=0.25, lw=0.8,
             label="training, every iteration")
    ax1.plot(range(1, len(history["train"]) + 1), smooth(history["train"], 50), color="C0",
             label="training (mean of the last 50)")
    steps, vals = zip(*history["val"])
    ax1.plot(steps, vals, "o-", ms=3, color="C1", label="validation")
    ax1.set(xlabel="iteration", ylabel="loss (nats per character)", ylim=(min(vals) - 0.3, 3.5),
            title="Chapter 8's recipe on the Python docs")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    gap_steps, gaps = zip(*generalization_gap(history))
    ax2.plot(gap_steps, gaps, "o-", ms=3, color="C2")
    ax2.axhline(0, color="gray", lw=0.8)
    ax2.set(
        xlabel="iteration", ylabel="validation - training (nats)", title="The generalisation gap"
    )
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sampling_diagnostics(run=None):
    """Distinct-2 and the repetition rate of samples against temperature, for three top-p."""
    import matplotlib.pyplot as plt

    run = run or stored_run("ch10_evaluation.sampling_diagnostics")
    temperatures, reference = run["temperatures"], run["reference"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for top_p, rows in run["sweeps"].items():
        ax1.plot(temperatures, [r["distinct_2"] for r in rows], "o-", label=f"top-p {top_p}")
        ax2.plot(temperatures, [r["repetition_4"] for r in rows], "o-", label=f"top-p {top_p}")
    for ax, key, name in [(ax1, "distinct_2", "distinct-2"),
                          (ax2, "repetition_4", "repetition rate of 4-grams")]:
        ax.axhline(reference[key], color="gray", ls="--", label="held-out text")
        ax.set(xlabel="temperature", ylabel=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("Diversity across samples")
    ax2.set_title("Loops within a sample")
    fig.tight_layout()
    return fig
