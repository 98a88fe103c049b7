"""Tests of Chapter 7: the encoder-decoder Transformer.

References: torch.nn.TransformerEncoder / TransformerDecoder with the same weights,
F.cross_entropy's label smoothing, brute-force masks and decoding loops, and the standard
library's datetime for the data.

Run against your own module with: pytest tests/test_ch07_transformer.py --impl my_ch07.py
"""

import contextlib
import datetime
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03_embeddings import stored_run  # the book's stored runs, whatever --impl grades
from ch05_block import load_torch_layer


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch07_transformer")


def padded_batch():
    """Two sources of different lengths (0 = padding) and two targets, one padded."""
    src = torch.tensor([[5, 6, 7, 8, 9], [5, 7, 9, 0, 0]])
    tgt_in = torch.tensor([[1, 4, 6, 8], [1, 5, 0, 0]])
    return src, tgt_in


def small_model(ch, prenorm=False, seed=0):
    torch.manual_seed(seed)
    return ch.Transformer(ch.Seq2SeqConfig(vocab_size=12, max_len=16, d_model=16, n_head=2, d_ff=32,
                                           dropout=0.0, prenorm=prenorm)).eval()


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(1)
def test_exercise_1_masks_match_their_definitions(ch):
    src, tgt_in = padded_batch()
    encoder_mask, decoder_mask, cross_mask = ch.make_masks(src, tgt_in, pad_id=0)
    B, S, T = 2, 5, 4
    assert encoder_mask.shape == (B, 1, 1, S) and cross_mask.shape == (B, 1, 1, S)
    assert decoder_mask.shape == (B, 1, T, T)
    assert encoder_mask.dtype == decoder_mask.dtype == cross_mask.dtype == torch.bool
    for b in range(B):
        for j in range(S):  # any query may see source token j iff it is not padding
            assert encoder_mask[b, 0, 0, j] == cross_mask[b, 0, 0, j] == (src[b, j] != 0)
        for i in range(T):
            for j in range(T):
                assert decoder_mask[b, 0, i, j] == (j <= i and tgt_in[b, j] != 0), (b, i, j)


# ---------------------------------------------------------------------------------------
# The model against torch.nn's Transformer stacks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", [False, True])
def test_encoder_and_decoder_equal_torch_nn_stacks(ch, prenorm):
    model = small_model(ch, prenorm)
    enc_layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=prenorm)
    dec_layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=prenorm)
    final = (lambda: nn.LayerNorm(16)) if prenorm else (lambda: None)
    encoder = nn.TransformerEncoder(enc_layer, 2, norm=final(), enable_nested_tensor=False).eval()
    decoder = nn.TransformerDecoder(dec_layer, 2, norm=final()).eval()
    for ours, theirs in zip(list(model.encoder) + list(model.decoder), list(encoder.layers) + list(decoder.layers)):
        load_torch_layer(ours, theirs)
    if prenorm:
        encoder.norm.load_state_dict(model.encoder_norm.state_dict())
        decoder.norm.load_state_dict(model.decoder_norm.state_dict())
    src, tgt_in = padded_batch()
    with torch.no_grad():
        memory = model.encode(src)
        # torch's masks say True = masked out, the opposite of ours
        ref_memory = encoder(model.embed_tokens(src), src_key_padding_mask=src == 0)
        real = (src != 0)[..., None]  # torch's fast path may zero the padded rows: compare real ones
        torch.testing.assert_close(memory * real, ref_memory * real, atol=1e-5, rtol=1e-4)
        hidden = decoder(model.embed_tokens(tgt_in), memory, tgt_mask=~torch.ones(4, 4, dtype=torch.bool).tril(),
                         tgt_is_causal=True, tgt_key_padding_mask=tgt_in == 0, memory_key_padding_mask=src == 0)
        torch.testing.assert_close(model.decode(tgt_in, memory, src), hidden @ model.embed.weight.T,
                                   atol=1e-5, rtol=1e-4)


def test_one_shared_embedding_matrix_scaled_by_sqrt_d(ch):
    model = small_model(ch)
    matrices = [p for p in model.parameters() if p.shape == (12, 16)]
    assert len(matrices) == 1  # source, target and output share one (V, C) matrix
    ids = torch.tensor([[3, 4]])
    expected = model.embed.weight[ids] * math.sqrt(16) + model.positions.table[:2]
    torch.testing.assert_close(model.embed_tokens(ids), expected)


def test_source_padding_does_not_change_the_output(ch):
    model = small_model(ch)
    src, tgt_in = torch.tensor([[5, 7, 9]]), torch.tensor([[1, 4, 6]])
    longer = torch.tensor([[5, 7, 9, 0, 0, 0]])  # the same source with three pads
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt_in), model(longer, tgt_in), atol=1e-5, rtol=1e-4)


def test_decoder_is_causal_and_reads_the_source(ch):
    model = small_model(ch)
    src, tgt_in = torch.tensor([[5, 7, 9, 4]]), torch.tensor([[1, 4, 6, 8]])
    with torch.no_grad():
        logits = model(src, tgt_in)
        changed_future = model(src, torch.tensor([[1, 4, 3, 3]]))
        changed_source = model(torch.tensor([[5, 7, 9, 3]]), tgt_in)
    torch.testing.assert_close(logits[:, :2], changed_future[:, :2])
    assert not torch.allclose(logits[:, 0], changed_source[:, 0])  # the first token already depends on src


def test_cross_attention_weights_are_distributions_over_real_source_tokens(ch):
    model = small_model(ch)
    src, tgt_in = padded_batch()
    weights = model.cross_attention_weights(src, tgt_in)
    assert len(weights) == 2 and weights[0].shape == (2, 2, 4, 5)  # (B, H, T, S) per decoder block
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4))
        assert torch.all(w[1, :, :, 3:] == 0)  # the padded source positions of row 1


def test_too_long_sequence_is_a_clear_error(ch):
    model = small_model(ch)
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# Label smoothing and the schedules
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(2)
def test_exercise_2_label_smoothing_matches_torch(ch):
    torch.manual_seed(0)
    logits = torch.randn(20, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (20,))
    targets[[2, 5, 11]] = -100  # ignored
    for eps in (0.0, 0.1, 0.4):
        expected = F.cross_entropy(logits, targets, label_smoothing=eps, ignore_index=-100)
        torch.testing.assert_close(ch.label_smoothing_loss(logits, targets, eps), expected)


@pytest.mark.exercise(2)
def test_exercise_2_smoothed_loss_is_minimal_at_the_smoothed_distribution(ch):
    # The gradient of the loss with respect to the logits is p - q: zero when p = q, so the best
    # prediction keeps eps / V on every wrong class instead of pushing it to 0.
    V, eps, target = 6, 0.2, 2
    q = torch.full((V,), eps / V, dtype=torch.float64)
    q[target] += 1 - eps
    logits = q.log()[None].clone().requires_grad_(True)
    loss = ch.label_smoothing_loss(logits, torch.tensor([target]), eps)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-12
    entropy = -(q * q.log()).sum()
    torch.testing.assert_close(loss.detach(), entropy)  # the minimum is the entropy of q, not 0


def test_schedules(ch):
    d, warmup = 512, 4000
    peak = max(ch.transformer_lr(s, d, warmup) for s in range(1, 20000))
    assert peak == pytest.approx(ch.transformer_lr(warmup, d, warmup)) == pytest.approx(d**-0.5 * warmup**-0.5)
    assert ch.transformer_lr(4 * warmup, d, warmup) == pytest.approx(peak / 2)  # 1/sqrt(step) decay
    assert ch.warmup_linear_decay_lr(100, 3e-3, 100, 400) == pytest.approx(3e-3)
    assert ch.warmup_linear_decay_lr(50, 3e-3, 100, 400) == pytest.approx(1.5e-3)
    assert ch.warmup_linear_decay_lr(400, 3e-3, 100, 400) == 0.0


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_exercise_3_greedy_decode_is_the_brute_force_loop(ch):
    model = small_model(ch, seed=3)
    src = torch.tensor([[5, 6, 7, 8], [9, 7, 5, 0], [4, 4, 0, 0]])
    bos, eos = 1, 2
    out = ch.greedy_decode(model, src, bos, eos, max_new_tokens=8)
    assert out.shape[0] == 3 and out.shape[1] <= 8
    for row, source in zip(out, src):
        ids = [bos]  # one sequence at a time, full forward pass at each step, no padding
        with torch.no_grad():
            for _ in range(8):
                next_id = model(source[None], torch.tensor([ids]))[0, -1].argmax().item()
                ids.append(next_id)
                if next_id == eos:
                    break
        expected = ids[1:] + [0] * (out.shape[1] - len(ids) + 1)  # padded after EOS
        assert row.tolist() == expected[:out.shape[1]]


@pytest.mark.exercise(3)
def test_exercise_3_greedy_decode_pads_after_eos_and_stops_when_all_are_done(ch):
    class Scripted:
        """A stand-in model whose next token is scripted: row 0 says 7, EOS; row 1 says 8, 9, EOS."""

        config = ch.Seq2SeqConfig(vocab_size=12, pad_id=0)
        script = [[7, 2, 5, 5, 5, 5], [8, 9, 2, 5, 5, 5]]
        calls = 0

        def encode(self, src):
            return torch.zeros(src.shape[0], src.shape[1], 4)

        def decode(self, tgt_in, memory, src):
            Scripted.calls += 1
            logits = torch.zeros(tgt_in.shape[0], tgt_in.shape[1], 12)
            for b, row in enumerate(self.script):
                logits[b, -1, row[tgt_in.shape[1] - 1]] = 1.0
            return logits

    out = ch.greedy_decode(Scripted(), torch.ones(2, 3, dtype=torch.long), bos_id=1, eos_id=2, max_new_tokens=6)
    assert out.tolist() == [[7, 2, 0], [8, 9, 2]]
    assert Scripted.calls == 3  # stopped as soon as both rows had their EOS


# ---------------------------------------------------------------------------------------
# The date task
# ---------------------------------------------------------------------------------------


def test_date_pairs_are_correct_and_the_test_dates_are_held_out(ch):
    train = ch.make_date_pairs(3000, "train", seed=0)
    test = ch.make_date_pairs(1000, "test", seed=0)
    assert {t for _, t in train}.isdisjoint({t for _, t in test})
    for source, target in train[:300] + test[:300]:
        date = datetime.date.fromisoformat(target)  # a valid date, written in ISO form
        assert source in {fmt(date) for fmt in ch.DATE_FORMATS}
        assert ch.is_test_date(date) == ((source, target) in test)
    assert len({fmt(datetime.date(2021, 3, 5)) for fmt in ch.DATE_FORMATS}) == len(ch.DATE_FORMATS)


def test_vocab_and_batches(ch):
    vocab = ch.date_vocab()
    src, tgt_in, tgt_out = ch.encode_batch([("5 Mar 2021", "2021-03-05"), ("1.1.2000", "2000-01-01")], vocab)
    assert src.shape == (2, 10) and src[1, 8:].tolist() == [vocab.PAD] * 2
    assert tgt_in[:, 0].tolist() == [vocab.BOS] * 2 and tgt_out[:, -1].tolist() == [vocab.EOS] * 2
    assert torch.equal(tgt_in[:, 1:], tgt_out[:, :-1])  # the input is the output shifted right
    assert vocab.decode(vocab.encode("Sep 7, 2045") + [vocab.EOS, 5]) == "Sep 7, 2045"
    with pytest.raises(ValueError, match="vocabulary"):
        vocab.encode("7 Mär 2021")


def test_a_short_training_run_learns_the_dates(ch):
    # The chapter trains 2 + 2 blocks for 400 steps and asserts >= 99% on its page; this is a
    # 1 + 1 block model for 300 smaller steps (about 15 s).
    vocab = ch.date_vocab()
    config = ch.Seq2SeqConfig(len(vocab), n_encoder_layer=1, n_decoder_layer=1, dropout=0.0)
    model, vocab, history = ch.train_dates(config, steps=300, batch_size=64, peak_lr=3e-3, warmup=75)
    assert history[0]["loss"] > 3.0 and history[-1]["loss"] < 0.8
    assert ch.exact_match(model, ch.make_date_pairs(500, "test", seed=1), vocab) >= 0.9


def test_gpt_and_encoder_decoder_are_built_from_the_same_components(ch):
    from ch06_gpt import GPT, GPTConfig, components

    gpt = components(GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16)))
    seq2seq = components(ch.Transformer(ch.Seq2SeqConfig(vocab_size=50)))
    shared = {"ch03_embeddings.TokenEmbedding", "ch04_attention.MultiHeadAttention", "ch05_block.Block",
              "ch05_block.LayerNorm", "ch05_block.MLP"}
    assert shared <= set(gpt) & set(seq2seq)
    assert set(gpt) ^ set(seq2seq) == {"ch03_embeddings.LearnedPositionalEmbedding",
                                       "ch03_embeddings.SinusoidalPositionalEncoding"}


def test_stored_cross_attention_run_is_what_the_code_trains(ch):
    """The cross-attention figure draws from a stored run: its first steps, trained again with
    the same seed, give the stored losses; its maps have one row per output character and one
    column per source character, rows of attention weights sum to 1, and every translation is
    the ISO date of its source (read here by datetime, not by the model)."""
    run = stored_run("ch07_transformer.cross_attention")
    assert len(run["losses"]) == run["steps"] == 300
    fresh = ch.cross_attention_history(steps=run["steps"], seed=run["seed"], stop_after=5)
    assert fresh["losses"] == pytest.approx(run["losses"][:5], rel=1e-4)
    assert [m["source"] for m in fresh["maps"]] == [m["source"] for m in run["maps"]]
    for m in run["maps"]:
        weights = torch.tensor(m["weights"])
        assert weights.shape == (len(m["output"]), len(m["source"]))
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(m["output"])), atol=1e-4, rtol=0)
        assert m["output"] == iso_date(m["source"])


def iso_date(source):
    """The figure's sources read by datetime: "5 March 2021", "7/14/1989", "Sep 7, 2045"."""
    for date_format in ("%d %B %Y", "%m/%d/%Y", "%b %d, %Y"):
        with contextlib.suppress(ValueError):
            return datetime.datetime.strptime(source, date_format).date().isoformat()
    raise ValueError(f"not a date of the figure's formats: {source!r}")


def test_the_cross_attention_figure_draws_from_the_stored_run_in_a_moment(ch, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(ch, "train_dates", lambda *args, **kwargs: pytest.fail("the figure trains"))
    tick = time.process_time()  # CPU seconds: a busy machine does not make the check fail
    fig = ch.plot_cross_attention()
    assert time.process_time() - tick < 2.0 and len(fig.axes) == 3
    plt.close(fig)
