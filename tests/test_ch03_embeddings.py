"""Tests of Chapter 3: embeddings and positional encodings.

References: torch's own embedding and attention, the formulas of the papers written out
with math.sin/cos, Hugging Face's Llama RoPE and BLOOM ALiBi code, and a complex-number
RoPE in the style of Meta's original Llama code.
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ch03_embeddings import stored_run  # the book's stored runs, whatever --impl grades

FAST = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch03_embeddings")


# ---------------------------------------------------------------------------------------
# Token embeddings
# ---------------------------------------------------------------------------------------


def test_one_hot_product_equals_lookup(ch):
    torch.manual_seed(0)
    weight = torch.randn(50, 8, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(ch.one_hot_embed(ids, weight), F.embedding(ids, weight), rtol=0, atol=0)


def test_one_hot_product_has_the_lookup_gradient(ch):
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 5))
    w1 = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    upstream = torch.randn(4, 5, 6, dtype=torch.float64)
    (ch.one_hot_embed(ids, w1) * upstream).sum().backward()
    (F.embedding(ids, w2) * upstream).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    unused = torch.ones(20, dtype=torch.bool)
    unused[ids.unique()] = False
    assert torch.all(w1.grad[unused] == 0)  # rows of tokens not in the batch get no gradient


def test_token_embedding_matches_nn_embedding(ch):
    torch.manual_seed(0)
    emb = ch.TokenEmbedding(30, 16)
    ref = torch.nn.Embedding(30, 16)
    ref.weight.data.copy_(emb.weight.data)
    ids = torch.randint(0, 30, (2, 9))
    torch.testing.assert_close(emb(ids), ref(ids), rtol=0, atol=0)
    scaled = ch.TokenEmbedding(30, 16, scale=True)
    scaled.weight.data.copy_(emb.weight.data)
    torch.testing.assert_close(scaled(ids), ref(ids) * 4.0)  # sqrt(16)


def test_bad_token_ids_raise(ch):
    emb = ch.TokenEmbedding(10, 4)
    with pytest.raises(TypeError, match="integer"):
        emb(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        emb(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError):
        ch.one_hot_embed(torch.tensor([-1]), torch.randn(10, 4))


# ---------------------------------------------------------------------------------------
# Attention is blind to order; the causal mask is not
# ---------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 10_000))
def test_attention_without_positions_is_permutation_equivariant(ch, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 6, 8, generator=gen, dtype=torch.float64)
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(ch.self_attention(x[:, perm]), ch.self_attention(x)[:, perm])


def test_positions_or_a_causal_mask_break_equivariance(ch):
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    pe = ch.SinusoidalPositionalEncoding(8, 16)
    with_pos = ch.self_attention(pe(x[:, perm]))
    assert not torch.allclose(with_pos, ch.self_attention(pe(x))[:, perm], atol=1e-3)
    causal = ch.self_attention(x[:, perm], causal=True)
    assert not torch.allclose(causal, ch.self_attention(x, causal=True)[:, perm], atol=1e-3)


def test_causal_attention_alone_reveals_position(ch):
    """NoPE: identical tokens after a distinct first one; causal attention outputs 1/(t+1)."""
    T = 10
    x = torch.tensor([[1.0, 0.0]]).repeat(T, 1)  # u = (1, 0): every score u . x_j equals 1
    x[0] = torch.tensor([1.0, 1.0])  # b = (1, 1): u . b = 1 too, so attention is uniform
    out = ch.self_attention(x[None].double(), causal=True)[0, :, 1]
    torch.testing.assert_close(out, 1.0 / torch.arange(1, T + 1, dtype=torch.float64))
    no_mask = ch.self_attention(x[None].double())[0, 1:, 1]  # every non-first query sees the same
    torch.testing.assert_close(no_mask, no_mask[0].expand_as(no_mask))


# ---------------------------------------------------------------------------------------
# Sinusoidal encoding
# ---------------------------------------------------------------------------------------


def paper_sinusoid(pos, dim, d_model, base=10000.0):
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d))."""
    i2 = dim - dim % 2
    angle = pos / base ** (i2 / d_model)
    return math.sin(angle) if dim % 2 == 0 else math.cos(angle)


@pytest.mark.exercise(1)
def test_sinusoidal_table_matches_the_paper_formula(ch):
    table = ch.sinusoidal_table(50, 12)
    assert table.shape == (50, 12) and table.dtype == torch.float32
    ref = torch.tensor([[paper_sinusoid(p, d, 12) for d in range(12)] for p in range(50)])
    torch.testing.assert_close(table, ref, rtol=0, atol=1e-6)


@pytest.mark.exercise(1)
def test_sinusoidal_table_other_base_and_large_positions(ch):
    table = ch.sinusoidal_table(3000, 6, base=100.0)
    for p in (0, 1, 1234, 2999):
        ref = torch.tensor([paper_sinusoid(p, d, 6, base=100.0) for d in range(6)])
        torch.testing.assert_close(table[p], ref, rtol=0, atol=1e-6)


@pytest.mark.exercise(1)
def test_sinusoidal_table_rejects_odd_width(ch):
    with pytest.raises(ValueError, match="even"):
        ch.sinusoidal_table(10, 7)


@FAST
@given(p=st.integers(0, 2000), k=st.integers(-500, 500), d=st.sampled_from([4, 16, 64]))
def test_shift_by_k_is_a_fixed_linear_map(ch, p, k, d):
    """PE(p + k) = M_k PE(p), with M_k independent of p."""
    if p + k < 0:
        k = -k
    table = ch.sinusoidal_table(2600, d).double()
    shift = ch.sinusoidal_shift_matrix(k, d).double()
    torch.testing.assert_close(shift @ table[p], table[p + k], rtol=0, atol=1e-5)


def test_shift_matrices_are_rotations_that_compose(ch):
    m3, m5, m8 = (ch.sinusoidal_shift_matrix(k, 16).double() for k in (3, 5, 8))
    torch.testing.assert_close(m3 @ m3.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(m3), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(m3 @ m5, m8, atol=1e-6, rtol=0)


def test_sinusoidal_dot_product_depends_only_on_distance(ch):
    """PE(p) . PE(q) = sum_i cos(w_i (p - q)), a function of p - q alone."""
    d = 32
    table = ch.sinusoidal_table(300, d).double()
    freqs = [10000.0 ** (-2 * i / d) for i in range(d // 2)]
    for p, q in [(0, 0), (10, 3), (3, 10), (250, 120), (299, 0)]:
        ref = sum(math.cos(w * (p - q)) for w in freqs)
        assert abs((table[p] @ table[q]).item() - ref) < 1e-5


def test_sinusoidal_module_adds_the_table_with_offsets(ch):
    torch.manual_seed(0)
    pe = ch.SinusoidalPositionalEncoding(8, max_positions=64)
    x = torch.randn(2, 5, 8)
    table = ch.sinusoidal_table(64, 8)
    torch.testing.assert_close(pe(x), x + table[:5])
    torch.testing.assert_close(pe(x, offset=7), x + table[7:12])
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])
    torch.testing.assert_close(pe(x, positions=pos), x + table[pos])
    with pytest.raises(ValueError, match="max_positions"):
        pe(x, offset=60)


# ---------------------------------------------------------------------------------------
# Learned absolute positions
# ---------------------------------------------------------------------------------------


def test_learned_positions_match_an_embedding_of_positions(ch):
    torch.manual_seed(0)
    lp = ch.LearnedPositionalEmbedding(16, 8)
    ref = torch.nn.Embedding(16, 8)
    ref.weight.data.copy_(lp.weight.data)
    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(lp(x), x + ref(torch.arange(6)))
    torch.testing.assert_close(lp(x, offset=4), x + ref(torch.arange(4, 10)))


def test_learned_positions_train_only_the_rows_used(ch):
    lp = ch.LearnedPositionalEmbedding(16, 8)
    lp(torch.randn(2, 5, 8)).sum().backward()
    assert torch.all(lp.weight.grad[:5] != 0) and torch.all(lp.weight.grad[5:] == 0)


def test_learned_positions_cannot_extrapolate(ch):
    lp = ch.LearnedPositionalEmbedding(8, 4)
    with pytest.raises(ValueError, match="cannot extrapolate"):
        lp(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="either positions or offset"):
        lp(torch.randn(1, 2, 4), positions=torch.tensor([0, 1]), offset=3)
    with pytest.raises(ValueError, match="length"):
        lp(torch.randn(1, 3, 4), positions=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    def rope(q, k, position_ids, base):
        config = LlamaConfig(hidden_size=q.shape[1] * q.shape[-1], num_attention_heads=q.shape[1],
                             rope_theta=base, max_position_embeddings=4096)
        cos, sin = LlamaRotaryEmbedding(config)(q, position_ids)
        return apply_rotary_pos_emb(q, k, cos, sin)

    return rope


def meta_llama_rope(x, positions, base=10000.0):
    """Interleaved RoPE as complex multiplication, the way Meta's Llama code writes it."""
    D = x.shape[-1]
    freqs = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = positions.double()[:, None] * freqs  # (T, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)  # exp(i m theta)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


@pytest.mark.exercise(2)
def test_rope_matches_hugging_face_llama(ch, hf_llama_rope):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 4, 11, 16)
    position_ids = torch.stack([torch.arange(11), torch.arange(5, 16)])  # (B, T), per sequence
    for base in (10000.0, 500000.0):  # Llama 2 and Llama 3
        ref_q, ref_k = hf_llama_rope(q, k, position_ids, base)
        torch.testing.assert_close(ch.apply_rope(q, position_ids, base), ref_q)
        torch.testing.assert_close(ch.apply_rope(k, position_ids, base), ref_k)


@pytest.mark.exercise(2)
@FAST
@given(m=st.integers(0, 3000), n=st.integers(0, 3000), shift=st.integers(0, 3000), seed=st.integers(0, 1000))
def test_rope_score_depends_only_on_relative_position(ch, m, n, shift, seed):
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k> for every shift s."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 32, generator=gen, dtype=torch.float64), torch.randn(1, 32, generator=gen, dtype=torch.float64)

    def score(a, b):
        return (ch.apply_rope(q, torch.tensor([a])) @ ch.apply_rope(k, torch.tensor([b])).T).item()

    assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-6 * (1 + abs(score(m, n)))


@pytest.mark.exercise(2)
def test_rope_is_a_rotation(ch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    out = ch.apply_rope(x, torch.arange(9))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # rotations keep lengths
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :])  # position 0: angle 0
    assert out.dtype == x.dtype


def test_interleaved_rope_matches_complex_reference(ch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)
    pos = torch.arange(100, 107)
    torch.testing.assert_close(ch.apply_rope_interleaved(x, pos), meta_llama_rope(x, pos), rtol=1e-5, atol=1e-4)


def test_permutation_maps_interleaved_to_rotate_half(ch):
    torch.manual_seed(0)
    x, pos = torch.randn(2, 3, 7, 16), torch.arange(7)
    perm = ch.interleaved_to_half_permutation(16)
    assert sorted(perm.tolist()) == list(range(16))
    torch.testing.assert_close(ch.apply_rope(x[..., perm], pos), ch.apply_rope_interleaved(x, pos)[..., perm])


def test_permuting_query_key_weights_converts_a_checkpoint(ch):
    """An interleaved model with W_q, W_k equals a rotate-half model with permuted rows."""
    torch.manual_seed(0)
    D, C, T = 8, 12, 6
    wq, wk, h = torch.randn(D, C), torch.randn(D, C), torch.randn(T, C)
    perm, pos = ch.interleaved_to_half_permutation(D), torch.arange(T)
    scores_interleaved = ch.apply_rope_interleaved(h @ wq.T, pos) @ ch.apply_rope_interleaved(h @ wk.T, pos).T
    scores_half = ch.apply_rope(h @ wq[perm].T, pos) @ ch.apply_rope(h @ wk[perm].T, pos).T
    torch.testing.assert_close(scores_half, scores_interleaved, rtol=1e-4, atol=1e-4)


def test_rope_offset_equals_slicing_full_sequence(ch):
    """KV cache: rotating the last 3 tokens with offset 5 equals rotating all 8 and slicing."""
    torch.manual_seed(0)
    rope = ch.RotaryEmbedding(16)
    x = torch.randn(2, 4, 8, 16)
    torch.testing.assert_close(rope(x[:, :, 5:], offset=5), rope(x)[:, :, 5:])
    torch.testing.assert_close(rope(x[:, :, 5:], positions=torch.arange(5, 8)), rope(x)[:, :, 5:])


def test_rotary_embeddings_cached_table_equals_apply_rope(ch):
    """The module keeps a table of cos/sin and grows it; it must rotate exactly as apply_rope."""
    torch.manual_seed(0)
    rope = ch.RotaryEmbedding(16)
    for T in (3, 8, 40):  # the table grows twice
        x = torch.randn(2, 4, T, 16)
        torch.testing.assert_close(rope(x), ch.apply_rope(x, torch.arange(T)))
        torch.testing.assert_close(rope(x[:, :, -1:], offset=T - 1), ch.apply_rope(x, torch.arange(T))[:, :, -1:])
    pos = torch.randint(0, 100, (2, 5))  # per-row positions beyond the table
    x = torch.randn(2, 4, 5, 16)
    torch.testing.assert_close(rope(x, positions=pos), ch.apply_rope(x, pos))
    torch.testing.assert_close(rope(x.double(), positions=pos), ch.apply_rope(x.double(), pos))  # rebuilt in float64


def test_rope_per_sequence_positions_equal_a_loop(ch):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11]])
    for fn in (ch.apply_rope, ch.apply_rope_interleaved):
        out = fn(x, pos)
        for b in range(3):
            torch.testing.assert_close(out[b], fn(x[b], pos[b]))


def test_rope_bad_inputs(ch):
    with pytest.raises(ValueError, match="even"):
        ch.RotaryEmbedding(7)
    rope = ch.RotaryEmbedding(8)
    with pytest.raises(ValueError, match="head_dim=8"):
        rope(torch.randn(1, 2, 3, 6))
    with pytest.raises(ValueError, match="length"):
        ch.apply_rope(torch.randn(1, 2, 3, 8), torch.arange(4))
    with pytest.raises(TypeError, match="integers"):
        rope(torch.randn(1, 2, 3, 8), positions=torch.tensor([0.0, 1.0, 2.0]))


# ---------------------------------------------------------------------------------------
# ALiBi
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_alibi_slopes_of_the_paper(ch):
    torch.testing.assert_close(ch.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(ch.alibi_slopes(1), torch.tensor([2.0 ** -8]))


@pytest.mark.exercise(3)
def test_alibi_slopes_match_bloom(ch):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for n_head in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 64, 71):
        expected = _get_alibi_slopes(n_head, torch.device("cpu"))
        torch.testing.assert_close(ch.alibi_slopes(n_head), expected, msg=f"n_head={n_head}")


def test_alibi_bias_brute_force(ch):
    H, Tq, Tk = 4, 3, 7
    bias = ch.alibi_bias(H, Tq, Tk)
    slopes = ch.alibi_slopes(H)
    assert bias.shape == (H, Tq, Tk)
    for h in range(H):
        for i in range(Tq):
            for j in range(Tk):
                pos_i = Tk - Tq + i
                assert abs(bias[h, i, j].item() + slopes[h].item() * abs(pos_i - j)) < 1e-6
    torch.testing.assert_close(bias, ch.alibi_bias(H, Tk)[:, -Tq:])  # KV cache: last rows


def test_alibi_equals_bloom_after_causal_softmax(ch):
    """BLOOM adds slope * j (key position only); softmax ignores a per-row constant, so the
    causal attention weights equal ours, slope * (j - i)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    torch.manual_seed(0)
    H, T = 6, 9
    scores = torch.randn(1, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bloom = build_alibi_tensor(torch.ones(1, T), H, torch.float32).view(1, H, 1, T)
    ours = ch.alibi_bias(H, T)[None]
    w_bloom = torch.softmax((scores + bloom).masked_fill(~causal, float("-inf")), -1)
    w_ours = torch.softmax((scores + ours).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(w_ours, w_bloom)


def test_alibi_bad_lengths(ch):
    with pytest.raises(ValueError, match="cannot exceed"):
        ch.alibi_bias(4, 5, 3)
    with pytest.raises(ValueError, match="positive"):
        ch.alibi_slopes(0)


# ---------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------


def test_make_batch_tasks(ch):
    gen = torch.Generator().manual_seed(0)
    inputs, targets = ch.make_batch("shift", 4, 10, 16, gen)
    assert inputs.shape == targets.shape == (4, 10)
    assert torch.all(targets[:, :3] == -100) and torch.equal(targets[:, 3:], inputs[:, :-3])
    for task, flip in (("copy", False), ("reverse", True)):
        inputs, targets = ch.make_batch(task, 4, 5, 16, gen)
        x = inputs[:, :5]
        assert torch.all(inputs[:, 5] == 0)  # SEP
        answer = x.flip(1) if flip else x
        assert torch.equal(targets[:, 5:], answer) and torch.all(targets[:, :5] == -100)
    with pytest.raises(ValueError, match="unknown task"):
        ch.make_batch("sort", 2, 3, 4)


@pytest.mark.parametrize("encoding", ["none", "learned", "sinusoidal", "rope", "alibi"])
def test_tiny_model_runs_with_each_encoding(ch, encoding):
    model = ch.TinyPositionModel(encoding, vocab_size=17, max_positions=32)
    logits = model(torch.randint(0, 17, (2, 12)))
    assert logits.shape == (2, 12, 17) and torch.isfinite(logits).all()


def test_tiny_model_rejects_unknown_encoding(ch):
    with pytest.raises(ValueError, match="encoding"):
        ch.TinyPositionModel("relative", vocab_size=5)


def test_experiment_learned_positions_fail_beyond_training_but_rope_does_not(ch):
    """The page's claim, with the page's settings (seeded): trained on lengths <= 16."""
    lengths = [16, 48]
    learned = ch.accuracy_by_length(ch.train_position_model("learned"), "shift", lengths, n_samples=128)
    rope = ch.accuracy_by_length(ch.train_position_model("rope"), "shift", lengths, n_samples=128)
    assert learned[0] > 0.9 and rope[0] > 0.9  # both learn the task at training lengths
    assert learned[1] < 0.6  # right only where positions were trained (13 of 45 answers)
    assert rope[1] > 0.75  # relative positions carry over to unseen lengths


def test_self_attention_combines_causal_mask_and_bias(ch):
    torch.manual_seed(0)
    x, bias = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected = F.scaled_dot_product_attention(x, x, x, attn_mask=bias.masked_fill(future, float("-inf")))
    torch.testing.assert_close(ch.self_attention(x, causal=True, bias=bias), expected)


# ---------------------------------------------------------------------------------------
# The stored run the experiment's figure is drawn from (docs/data/)
# ---------------------------------------------------------------------------------------


def test_stored_position_experiment_is_what_the_code_trains(ch):
    """The figure of section 3.8 draws from a stored run: it has the experiment's fields and
    shapes, supports the page's reading of it, and the first steps of every encoding, trained
    again with the same seed, give its losses (so the figure cannot drift from the code)."""
    run = stored_run("ch03_embeddings.position_experiment")
    assert run["lengths"] == list(range(4, 49, 4)) and run["steps"] == 200 and run["seed"] == 0
    assert list(run["accuracy"]) == list(ch.ENCODINGS) == list(run["losses"])
    for encoding in ch.ENCODINGS:
        assert len(run["accuracy"][encoding]) == len(run["lengths"])
        assert all(0 <= a <= 1 for a in run["accuracy"][encoding])
        assert len(run["losses"][encoding]) == run["steps"]
        losses = []
        ch.train_position_model(encoding, steps=run["steps"], seed=run["seed"], losses=losses, stop_after=10)
        assert losses == pytest.approx(run["losses"][encoding][:10], rel=1e-4), encoding
    accuracy = {encoding: dict(zip(run["lengths"], accs)) for encoding, accs in run["accuracy"].items()}
    assert accuracy["learned"][16] > 0.9 and accuracy["learned"][48] < 0.6  # the page's reading
    assert accuracy["rope"][16] > 0.9 and accuracy["rope"][48] > 0.75


def test_a_missing_stored_run_says_which_command_writes_it():
    with pytest.raises(FileNotFoundError, match=r"figure_data.py ch03_embeddings.no_such_run"):
        stored_run("ch03_embeddings.no_such_run")


def test_stop_after_ends_the_run_on_the_full_schedule(ch):
    full, short = [], []
    ch.train_position_model("rope", steps=20, losses=full)
    ch.train_position_model("rope", steps=20, losses=short, stop_after=6)
    assert len(full) == 20 and short == full[:6]


def test_the_experiments_figure_draws_from_the_stored_run_in_a_moment(ch, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(ch, "train_position_model", lambda *args, **kwargs: pytest.fail("the figure trains"))
    tick = time.process_time()  # CPU seconds: a busy machine does not make the check fail
    fig = ch.plot_position_experiment()
    assert time.process_time() - tick < 2.0 and len(fig.axes[0].lines) >= len(ch.ENCODINGS)
    plt.close(fig)
