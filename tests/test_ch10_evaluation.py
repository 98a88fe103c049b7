"""Chapter 10: held-out loss with a sliding window, bits per byte, checkpoints, the
multiple-choice harness and the diagnostics of samples, each against a brute-force
computation, a model whose probabilities are known, or chapter 8 and 9's own code.

Run against your own module with: pytest tests/test_ch10_evaluation.py --impl my_ch10.py
"""

import json
import math
import time
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
from ch03_embeddings import stored_run  # the book's stored runs, whatever --impl grades
from ch08_training import (CharTokenizer, lm_loss, load_run_tokenizer, load_token_file, make_config,
                           model_from_checkpoint, train)
from ch09_generation import generate
from helpers import tiny_train_settings


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch10_evaluation")


tiny_gpt = partial(helpers.tiny_gpt, vocab_size=20, block_size=8, n_layer=1, d_model=16)


class Bigram(torch.nn.Module):
    """A language model whose next token depends only on the current one, with chosen
    probabilities: p(next = b | current = a) = probs[a, b]. Its answers are known exactly."""

    def __init__(self, probs, block_size=16):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log())  # (V, V)
        self.config = types.SimpleNamespace(block_size=block_size)

    def forward(self, idx, targets=None):
        assert idx.shape[1] <= self.config.block_size, "the model was given more than its context"
        return self.logp[idx], None  # (B, T, V)


def random_bigram(vocab_size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Bigram(torch.softmax(torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64), dim=-1))


def brute_force_nll(model, ids, block_size):
    """-log p of every token 1..N-1, each from its own full left context cropped to block_size."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = ids[max(0, t - block_size) : t][None]  # (1, <= block_size)
            logits, _ = model(context)
            total -= torch.log_softmax(logits[0, -1].double(), dim=-1)[ids[t]].item()
    return total


# ---------------------------------------------------------------------------
# Log-probabilities of tokens
# ---------------------------------------------------------------------------


def test_token_logprobs_are_minus_the_cross_entropy_and_padding_counts_zero(ch):
    model = tiny_gpt()
    x = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(x)
        expected = -F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, T)
        y_padded = y.clone()
        y_padded[1, 5:] = -1
        got = ch.token_logprobs(model, x, y_padded)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1, :5], expected[1, :5])
    assert torch.all(got[1, 5:] == 0)


def test_right_padding_leaves_the_logits_of_real_tokens_unchanged(ch):
    model = tiny_gpt()
    short, long = torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2, 6, 5])
    batch = ch.pad_right([short, long], 0)
    assert batch.tolist() == [[3, 1, 4, 0, 0, 0], [1, 5, 9, 2, 6, 5]]
    with torch.no_grad():
        alone, _ = model(short[None])
        padded, _ = model(batch)
    torch.testing.assert_close(padded[0, :3], alone[0])


# ---------------------------------------------------------------------------
# The sliding window
# ---------------------------------------------------------------------------


@pytest.mark.exercise(1)
@settings(max_examples=150, deadline=None)
@given(n_tokens=st.integers(2, 200), block_size=st.integers(1, 40), data=st.data())
def test_exercise_1_every_token_is_scored_once_with_as_much_context_as_the_stride_allows(
        ch, n_tokens, block_size, data):
    stride = data.draw(st.integers(1, block_size))
    scored = []
    for start, end, n_new in ch.window_spans(n_tokens, block_size, stride):
        assert 0 <= start < end <= n_tokens - 1 and end - start <= block_size
        assert 1 <= n_new <= end - start
        for target in range(end - n_new + 1, end + 1):  # the window's last n_new targets
            context = target - start  # tokens start .. target - 1
            assert context >= min(target, block_size - stride + 1)
            scored.append(target)
    assert sorted(scored) == list(range(1, n_tokens)), "every token but the first, exactly once"


@pytest.mark.exercise(1)
def test_exercise_1_stride_one_equals_scoring_each_token_with_its_full_context(ch):
    model = tiny_gpt(block_size=8)
    ids = torch.randint(0, 20, (61,), generator=torch.Generator().manual_seed(3))
    nll, count = ch.sliding_window_nll(model, ids, stride=1, batch_size=5)
    assert count == 60
    assert nll == pytest.approx(brute_force_nll(model, ids, 8), rel=1e-5)


@pytest.mark.exercise(1)
def test_exercise_1_stride_block_size_equals_the_loss_of_disjoint_chunks(ch):
    # Disjoint windows: chapter 8's lm_loss of each chunk, weighted by its length.
    model = tiny_gpt(block_size=8)
    ids = torch.randint(0, 20, (45,), generator=torch.Generator().manual_seed(4))
    nll, count = ch.sliding_window_nll(model, ids, stride=8)
    expected = 0.0
    with torch.no_grad():
        for start in range(0, 44, 8):
            x, y = ids[start : min(start + 8, 44)], ids[start + 1 : min(start + 8, 44) + 1]
            expected += lm_loss(model(x[None])[0], y[None]).item() * len(y)
    assert count == 44
    assert nll == pytest.approx(expected, rel=1e-5)


@pytest.mark.exercise(1)
def test_exercise_1_window_spans_rejects_bad_arguments(ch):
    for stride in (0, 9):
        with pytest.raises(ValueError, match="stride"):
            list(ch.window_spans(100, 8, stride))
    with pytest.raises(ValueError):
        list(ch.window_spans(1, 8, 4))


def test_a_model_that_ignores_context_scores_the_same_at_every_stride(ch):
    # A bigram model needs one token of context: every stride gives the bigram sum exactly.
    model = random_bigram()
    ids = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(5))
    expected = -sum(model.logp[a, b].item() for a, b in zip(ids[:-1].tolist(), ids[1:].tolist()))
    for stride in (1, 3, 7, 16):
        nll, count = ch.sliding_window_nll(model, ids, stride, batch_size=4)
        assert count == 49 and nll == pytest.approx(expected, rel=1e-6)  # float32 log-softmax


def test_sliding_window_does_not_depend_on_the_batch_size(ch):
    model = tiny_gpt(block_size=8)
    ids = torch.randint(0, 20, (70,), generator=torch.Generator().manual_seed(6))
    one = ch.sliding_window_nll(model, ids, stride=3, batch_size=1)
    many = ch.sliding_window_nll(model, ids, stride=3, batch_size=7)
    assert one[1] == many[1] and one[0] == pytest.approx(many[0], rel=1e-6)


def test_loss_by_position_matches_scoring_the_same_windows_one_by_one(ch):
    model = tiny_gpt(block_size=8)
    ids = torch.randint(0, 20, (300,), generator=torch.Generator().manual_seed(7))
    got = ch.loss_by_position(model, ids, n_windows=10, seed=3, batch_size=4)
    # the same random windows as chapter 8's get_batch draws with that seed
    from ch08_training import get_batch

    x, y = get_batch(ids, 8, 10, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = F.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none").mean(dim=0)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------
# Perplexity and bits per byte
# ---------------------------------------------------------------------------


def test_bits_per_byte_of_a_text_is_its_information_divided_by_its_bytes(ch):
    text = "naïve café: ünïcödé costs bytes"
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_gpt(vocab_size=tokenizer.vocab_size, block_size=8)
    score = ch.evaluate_text(model, tokenizer, text, stride=1)
    ids = torch.tensor(tokenizer.encode(text))
    bits = brute_force_nll(model, ids, 8) / math.log(2)  # -log2 p(text after its first char)
    n_bytes = len(text[1:].encode("utf-8"))
    assert score.n_tokens == len(text) - 1 and score.n_bytes == n_bytes
    assert score.bits_per_byte == pytest.approx(bits / n_bytes, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(score.nll / score.n_tokens))


def test_the_information_of_a_text_does_not_depend_on_how_it_is_tokenized(ch):
    # A unigram model q over characters, and the same model over PAIRS of characters
    # (q(ab) = q(a) q(b)), assign the text the same probability: their summed losses differ
    # only by the first character, which only the character model scores.
    alphabet = "abc"
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    chars = types.SimpleNamespace(encode=lambda s: [alphabet.index(c) for c in s],
                                  decode=lambda ids: "".join(alphabet[i] for i in ids))
    pairs = types.SimpleNamespace(encode=lambda s: [3 * alphabet.index(s[i]) + alphabet.index(s[i + 1])
                                                    for i in range(0, len(s), 2)],
                                  decode=lambda ids: "".join(alphabet[i // 3] + alphabet[i % 3] for i in ids))
    char_model = Bigram(q.expand(3, 3).clone())
    pair_q = (q[:, None] * q[None, :]).reshape(9)
    pair_model = Bigram(pair_q.expand(9, 9).clone())
    text = "abcabbacaacbbcab"
    by_char = ch.evaluate_text(char_model, chars, text, stride=4)
    by_pair = ch.evaluate_text(pair_model, pairs, text, stride=4)
    assert by_pair.n_tokens == by_char.n_tokens // 2 and by_pair.loss > 1.9 * by_char.loss
    assert by_char.nll == pytest.approx(by_pair.nll - math.log(q[alphabet.index(text[1])].item()), rel=1e-6)
    assert (by_char.n_bytes, by_pair.n_bytes) == (len(text) - 1, len(text) - 2)


# ---------------------------------------------------------------------------
# Checkpoints and learning curves
# ---------------------------------------------------------------------------


def small_run(out_dir, **overrides):
    return make_config("tiny", **tiny_train_settings(out_dir, dropout=0.0, sample_tokens=0, **overrides))


def test_kept_checkpoints_are_the_run_at_those_iterations(ch, tmp_path):
    cfg = small_run(tmp_path / "run")
    history, kept = ch.train_with_checkpoints(cfg, keep_at=[6, 12], log=lambda s: None)
    assert sorted(kept) == [6, 12] and [it for it, _ in history["val"]] == [6, 12]
    for it in (6, 12):  # an uninterrupted run that ends at `it` has the same weights
        train(small_run(tmp_path / f"ref{it}", max_iters=it, decay_iters=12), log=lambda s: None)
        reference, _ = model_from_checkpoint(tmp_path / f"ref{it}" / "checkpoint.safetensors")
        loaded, info = model_from_checkpoint(kept[it])
        assert info["step"] == it and not loaded.training
        for (name, p), q in zip(loaded.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="already holds"):
        ch.train_with_checkpoints(cfg, keep_at=[6], log=lambda s: None)


def test_compare_checkpoints_scores_every_checkpoint_on_the_same_text(ch, tmp_path):
    cfg = small_run(tmp_path)
    history, kept = ch.train_with_checkpoints(cfg, keep_at=[6, 12], log=lambda s: None)
    tokenizer = load_run_tokenizer(tmp_path)
    text = tokenizer.decode(load_token_file(tmp_path / "val.npy")[:300].tolist())
    rows = ch.compare_checkpoints(kept, tokenizer, text, stride=1, history=history, window=4)
    assert [r["iteration"] for r in rows] == [6, 12]
    for row in rows:
        model, _ = model_from_checkpoint(kept[row["iteration"]])
        ids = torch.tensor(tokenizer.encode(text))
        assert row["loss"] == pytest.approx(brute_force_nll(model, ids, 16) / (len(ids) - 1), rel=1e-5)
        it = row["iteration"]
        assert row["train_loss"] == pytest.approx(sum(history["train"][it - 4 : it]) / 4)
    assert rows[1]["loss"] < rows[0]["loss"]  # training helps, even this briefly


def test_smooth_is_a_trailing_moving_average(ch):
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    windows = [values[max(0, i - 2) : i + 1] for i in range(len(values))]
    expected = [sum(w) / len(w) for w in windows]
    assert ch.smooth(values, 3) == pytest.approx(expected)


def test_best_checkpoint_and_generalization_gap(ch):
    history = {"train": [3.0, 2.0, 1.5, 1.0, 0.5, 0.25], "val": [[2, 2.5], [4, 2.2], [6, 2.6]]}
    assert ch.best_checkpoint(history) == (4, 2.2)
    gaps = ch.generalization_gap(history, window=2)  # val - mean of the last 2 training losses
    assert [it for it, _ in gaps] == [2, 4, 6]
    assert [gap for _, gap in gaps] == pytest.approx([2.5 - 2.5, 2.2 - 1.25, 2.6 - 0.375])


# ---------------------------------------------------------------------------
# The multiple-choice harness
# ---------------------------------------------------------------------------


def chain_model():
    """Token 0 is the context. From 0: token 1 with p 0.2, token 2 with p 0.6 (token 3: 0.2).
    From 2 the chain 2 -> 3 -> 4 -> 5 continues with p 0.6 at each step (0.08 for the other
    five tokens); after 1 and 5 every token is equally likely."""
    probs = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    probs[0] = torch.tensor([0.0, 0.2, 0.6, 0.2, 0.0, 0.0])
    for a in (2, 3, 4):
        probs[a] = 0.08
        probs[a, a + 1] = 0.6
    probs = probs.clamp(min=1e-12)
    return Bigram(probs / probs.sum(dim=-1, keepdim=True))


@pytest.mark.exercise(3)
def test_exercise_3_the_scorer_returns_the_known_log_probabilities(ch):
    model = chain_model()
    got = ch.continuation_logprobs(model, [0], [[1], [2, 3, 4, 5], [3]])
    expected = torch.tensor([math.log(0.2), math.log(0.6) * 4, math.log(0.2)], dtype=got.dtype)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.exercise(3)
def test_exercise_3_summed_and_normalised_scoring_disagree_on_endings_of_different_length(ch):
    # Ending A: one token with p 0.2. Ending B: four tokens with p 0.6 each. The sum prefers
    # A (log 0.2 = -1.61 > 4 log 0.6 = -2.04); per token, B is far likelier (-0.51 vs -1.61).
    model = chain_model()
    sums = ch.continuation_logprobs(model, [0], [[1], [2, 3, 4, 5]])
    assert ch.choose(sums, [1, 4], [1, 4], "sum") == 0
    assert ch.choose(sums, [1, 4], [1, 4], "per_token") == 1
    assert ch.choose(sums, [1, 4], [1, 4], "per_byte") == 1  # one byte per token: as per token
    assert ch.choose(sums, [1, 4], [9, 4], "per_byte") == 0  # A's one token spells 9 bytes


@pytest.mark.exercise(3)
def test_exercise_3_one_padded_batch_equals_scoring_each_ending_alone(ch):
    model = tiny_gpt(block_size=8)
    g = torch.Generator().manual_seed(8)
    context = torch.randint(0, 20, (6,), generator=g).tolist()
    endings = [torch.randint(0, 20, (n,), generator=g).tolist() for n in (1, 5, 3, 8, 2)]  # some cropped
    got = ch.continuation_logprobs(model, context, endings)
    for i, ending in enumerate(endings):
        seq = torch.tensor(context + ending)[-9:]  # the last block_size + 1 tokens
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[None, :-1])[0][0], dim=-1)  # (L - 1, V)
        targets = seq[1:]
        expected = sum(logp[j, targets[j]] for j in range(len(targets) - len(ending), len(targets)))
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.exercise(3)
def test_exercise_3_the_scorer_rejects_what_it_cannot_score(ch):
    model = tiny_gpt(block_size=8)
    with pytest.raises(ValueError, match="context"):
        ch.continuation_logprobs(model, [], [[1, 2]])
    with pytest.raises(ValueError, match="ending"):
        ch.continuation_logprobs(model, [1], [[1, 2], []])
    with pytest.raises(ValueError, match="ending"):
        ch.continuation_logprobs(model, [1], [list(range(9))])


def test_choose_divides_by_tokens_or_bytes(ch):
    sums = [-4.0, -3.0]
    assert ch.choose(sums, [4, 2], [8, 3], "sum") == 1
    assert ch.choose(sums, [4, 2], [8, 3], "per_token") == 0  # -1.0 vs -1.5
    assert ch.choose(sums, [4, 2], [8, 3], "per_byte") == 0  # -0.5 vs -1.0
    with pytest.raises(ValueError, match="scoring"):
        ch.choose(sums, [4, 2], [8, 3], "mean")


def test_multiple_choice_accuracy_on_tasks_whose_answers_are_known(ch):
    model = chain_model()
    letters = "xabcde"  # token i is letters[i]; every letter is one token and one byte
    tokenizer = types.SimpleNamespace(encode=lambda s: [letters.index(c) for c in s])
    tasks = [{"ctx": "x", "endings": ["a", "bcde", "c"], "label": 1},  # right per token, not by sum
             {"ctx": "x", "endings": ["bc", "bd"], "label": 0},  # p(c|b) = 0.6 > p(d|b) = 0.08
             {"ctx": "x", "endings": ["ad", "b"], "label": 1}]  # right under every scoring
    accuracy = ch.multiple_choice_accuracy(model, tokenizer, tasks)
    assert accuracy == pytest.approx({"sum": 2 / 3, "per_token": 1.0, "per_byte": 1.0,
                                      "chance": (1 / 3 + 1 / 2 + 1 / 2) / 3})


def test_completion_tasks_cut_real_continuations_and_wrong_ones_from_elsewhere(ch):
    from ch02_tokenizer import python_docs_text

    text = python_docs_text()[:60_000]
    folded = " ".join(text.split())
    for split_words in (False, True):
        tasks = ch.completion_tasks(text, 20, split_words=split_words, seed=1)
        assert tasks == ch.completion_tasks(text, 20, split_words=split_words, seed=1)  # seeded
        labels = set()
        for task in tasks:
            assert len(task["endings"]) == 4 and 0 <= task["label"] < 4
            labels.add(task["label"])
            right = task["endings"][task["label"]]
            assert task["ctx"] + right in folded
            assert all(e.startswith(" ") != split_words for e in task["endings"])
            for wrong in task["endings"]:
                assert wrong.strip() in folded and 1 <= len(wrong.split()) <= 5
        assert len(labels) > 1, "the right answer is not always in the same place"


def test_load_tasks_reads_hellaswag_lines(ch, tmp_path):
    line = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
            "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
            "source_id": "activitynet~v_-JhWjGDPHMY"}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(line) + "\n\n" + json.dumps({**line, "label": 1}) + "\n")
    tasks = ch.load_tasks(path)
    assert tasks == [{"ctx": line["ctx"], "endings": line["endings"], "label": 3},
                     {"ctx": line["ctx"], "endings": line["endings"], "label": 1}]
    path.write_text(json.dumps({**line, "label": 4}) + "\n")
    with pytest.raises(ValueError, match="label"):
        ch.load_tasks(path)


# ---------------------------------------------------------------------------
# Diagnostics of samples
# ---------------------------------------------------------------------------


def brute_force_distinct(sequences, n):
    grams = [list(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    unique = []
    for g in grams:
        if g not in unique:
            unique.append(g)
    return len(unique) / len(grams)


def brute_force_repetition(sequences, n):
    repeats = total = 0
    for s in sequences:
        grams = [list(s[i : i + n]) for i in range(len(s) - n + 1)]
        repeats += sum(g in grams[:i] for i, g in enumerate(grams))
        total += len(grams)
    return repeats / total


sequences_strategy = st.lists(st.lists(st.integers(0, 3), min_size=4, max_size=30), min_size=1, max_size=5)


@pytest.mark.exercise(2)
def test_exercise_2_distinct_n_on_hand_made_samples(ch):
    assert ch.distinct_n([[1, 2, 1, 2]], 1) == pytest.approx(2 / 4)
    assert ch.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert ch.distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(1 / 2)  # copies: 1 / number of samples
    assert ch.distinct_n([[1, 2, 3], [3, 2, 1]], 3) == 1.0
    assert ch.distinct_n([[7], [1, 2]], 2) == 1.0  # a sequence shorter than n adds no n-gram
    with pytest.raises(ValueError):
        ch.distinct_n([[1, 2]], 3)


@pytest.mark.exercise(2)
@settings(max_examples=100, deadline=None)
@given(sequences=sequences_strategy, n=st.integers(1, 4))
def test_exercise_2_distinct_n_equals_brute_force(ch, sequences, n):
    assert ch.distinct_n(sequences, n) == pytest.approx(brute_force_distinct(sequences, n))


@pytest.mark.exercise(4)
def test_exercise_4_repetition_rate_on_hand_made_samples(ch):
    assert ch.repetition_rate([[1, 2, 1, 2, 1, 2]], 2) == pytest.approx(3 / 5)
    assert ch.repetition_rate([[5] * 10], 4) == pytest.approx(6 / 7)  # a loop
    assert ch.repetition_rate([[1, 2, 3], [1, 2, 3]], 2) == 0.0  # copies, but no sample repeats itself
    with pytest.raises(ValueError):
        ch.repetition_rate([[1, 2]], 3)


@pytest.mark.exercise(4)
@settings(max_examples=100, deadline=None)
@given(sequences=sequences_strategy, n=st.integers(1, 4))
def test_exercise_4_repetition_rate_equals_brute_force(ch, sequences, n):
    assert ch.repetition_rate(sequences, n) == pytest.approx(brute_force_repetition(sequences, n))


def test_ngrams(ch):
    assert ch.ngrams([1, 2, 3, 4], 3) == [(1, 2, 3), (2, 3, 4)]
    assert ch.ngrams([1, 2], 3) == []
    with pytest.raises(ValueError):
        ch.ngrams([1, 2], 0)


def test_sampling_sweep_draws_with_chapter_9_generate_and_measures_what_it_drew(ch):
    model = tiny_gpt(block_size=16)
    prompt = [1, 2, 3]
    settings_list = [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 2.0, "top_p": 0.9}]
    rows = ch.sampling_sweep(model, prompt, settings_list, n_samples=4, n_tokens=20, seed=5)
    for setting, row in zip(settings_list, rows):
        expected = generate(model, torch.tensor([prompt] * 4), 20, generator=torch.Generator().manual_seed(5),
                            **setting)[:, 3:].tolist()
        assert row["samples"] == expected
        assert {k: row[k] for k in setting} == setting
        assert row["distinct_2"] == pytest.approx(brute_force_distinct(expected, 2))
        assert row["repetition_4"] == pytest.approx(brute_force_repetition(expected, 4))
    greedy, hot = rows[0], rows[1]
    assert greedy["distinct_2"] <= 1 / 4 + 1e-12  # greedy decoding: four copies of one sample
    assert hot["distinct_2"] > greedy["distinct_2"]


def test_reference_diagnostics_of_text_without_repeats(ch):
    diagnostics = ch.reference_diagnostics(list(range(1000)), n_samples=1, n_tokens=50)
    assert diagnostics == {"distinct_1": 1.0, "distinct_2": 1.0, "repetition_4": 0.0}


# ---------------------------------------------------------------------------
# The stored runs the figures are drawn from (docs/data/): each one's first iterations,
# trained again with the same seed, give its stored losses, so a figure cannot drift from
# the code; each figure draws in a moment, training nothing.
# ---------------------------------------------------------------------------

FIRST = dict(max_iters=3, eval_iters=0)  # the first 3 iterations of a run (same schedule), no evaluation


def assert_training_prefix(fresh, stored, n=3):
    assert fresh["train"] == pytest.approx(stored["train"][:n], rel=1e-4)


def test_stored_capstone_run_is_chapter_8s_book_recipe(ch):
    run = stored_run("ch10_evaluation.capstone")
    recipe = make_config("book")
    assert len(run["train"]) == recipe.max_iters
    assert [it for it, _ in run["val"]] == list(range(50, recipe.max_iters + 1, 50))
    assert_training_prefix(ch.capstone_history(**FIRST), run)


def test_stored_learning_curves_are_the_overfitting_experiment(ch):
    run = stored_run("ch10_evaluation.learning_curves")
    fresh = ch.learning_curves_history(**FIRST)
    assert [r["title"] for r in fresh["runs"]] == [r["title"] for r in run["runs"]]
    for fresh_run, stored in zip(fresh["runs"], run["runs"]):
        assert len(stored["history"]["train"]) == 300
        assert_training_prefix(fresh_run["history"], stored["history"])
    full, tiny = (ch.best_checkpoint(r["history"]) for r in run["runs"])
    assert full[0] == 300 and tiny[0] < 150  # the page: only the tiny text overfits, early


def test_stored_context_and_stride_run_is_the_tiny_docs_model(ch):
    run = stored_run("ch10_evaluation.context_and_stride")
    fresh = ch.context_and_stride_history(strides=(64,), **FIRST)
    assert_training_prefix(fresh["history"], run["history"])
    assert len(run["by_position"]) == len(fresh["by_position"]) == make_config("tiny").model.block_size
    assert [r["stride"] for r in run["strides"]] == [64, 32, 16, 8, 4, 2, 1]
    assert run["by_position"][0] > run["by_position"][-1]  # more context, lower loss
    assert [r["positions"] for r in run["strides"]] == sorted(r["positions"] for r in run["strides"])


def test_stored_sampling_diagnostics_are_the_tiny_docs_model(ch):
    run = stored_run("ch10_evaluation.sampling_diagnostics")
    fresh = ch.sampling_diagnostics_history(top_ps=(1.0,), **FIRST)
    assert_training_prefix(fresh["history"], run["history"])
    assert fresh["reference"] == run["reference"]  # pieces of the held-out text: no model involved
    assert list(run["sweeps"]) == ["1.0", "0.9", "0.5"] and run["temperatures"] == fresh["temperatures"]
    for rows in run["sweeps"].values():
        assert [r["temperature"] for r in rows] == run["temperatures"]
        assert all(0 <= r[key] <= 1 for r in rows for key in ("distinct_1", "distinct_2", "repetition_4"))


@pytest.mark.parametrize("name", ["plot_context_and_stride", "plot_learning_curves", "plot_capstone_curves",
                                  "plot_sampling_diagnostics"])
def test_figures_draw_from_the_stored_runs_in_a_moment(ch, name, monkeypatch):
    import matplotlib.pyplot as plt

    for trainer in ("train", "train_gpt"):
        monkeypatch.setattr(ch, trainer, lambda *args, **kwargs: pytest.fail("the figure trains"))
    tick = time.process_time()  # CPU seconds: a busy machine does not make the check fail
    fig = getattr(ch, name)()
    assert time.process_time() - tick < 2.0 and fig.axes and all(ax.lines for ax in fig.axes)
    plt.close(fig)
