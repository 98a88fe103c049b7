"""Tests of Chapter 4: attention.

References: torch.softmax, torch.nn.functional.scaled_dot_product_attention,
torch.nn.attention.bias.causal_lower_right, torch.nn.MultiheadAttention, autograd and
gradcheck, Hugging Face's LlamaAttention (grouped-query attention with RoPE), and an explicit
loop over heads. Comparisons run in float64 with torch's default float64 tolerances
(rtol 1e-7, atol 1e-7) unless a test states others.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right

from ch03_embeddings import alibi_bias
from helpers import ListCache

FAST = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch04_attention")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(B=2, H=3, Tq=5, Tk=5, D=8, seed=0):
    return rand(B, H, Tq, D, seed=seed), rand(B, H, Tk, D, seed=seed + 1), rand(B, H, Tk, D, seed=seed + 2)


# ---------------------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(1)
@FAST
@given(seed=st.integers(0, 10_000), magnitude=st.sampled_from([1.0, 30.0, 1000.0]))
def test_softmax_matches_torch_even_for_huge_scores(ch, seed, magnitude):
    scores = rand(4, 7, seed=seed) * magnitude
    assert torch.isfinite(ch.softmax(scores)).all()
    torch.testing.assert_close(ch.softmax(scores), torch.softmax(scores, -1))
    torch.testing.assert_close(ch.softmax(scores, dim=0), torch.softmax(scores, 0))


@pytest.mark.exercise(1)
def test_softmax_of_fully_masked_row_is_zero_not_nan(ch):
    scores = torch.tensor([[1.0, float("-inf"), 2.0], [float("-inf")] * 3])
    out = ch.softmax(scores)
    torch.testing.assert_close(out[0], torch.softmax(scores[0], -1))
    assert torch.equal(out[1], torch.zeros(3))


@pytest.mark.exercise(1)
def test_softmax_gradient_matches_torch(ch):
    s1 = rand(3, 6).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    upstream = rand(3, 6, seed=1)
    (ch.softmax(s1) * upstream).sum().backward()
    (torch.softmax(s2, -1) * upstream).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_naive_softmax_overflows_where_stable_one_does_not(ch):
    scores = torch.tensor([1000.0, 999.0])
    naive = torch.exp(scores) / torch.exp(scores).sum()
    assert torch.isnan(naive).all()
    torch.testing.assert_close(ch.softmax(scores), torch.tensor([1.0, math.exp(-1)]) / (1 + math.exp(-1)))


# ---------------------------------------------------------------------------------------
# Masks and scaled dot-product attention
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(2)
def test_causal_mask_is_lower_right_aligned(ch):
    for q_len, k_len in ((1, 1), (5, 5), (3, 7), (1, 9)):
        mask = ch.causal_mask(q_len, k_len)
        assert mask.dtype == torch.bool and mask.shape == (q_len, k_len)
        assert torch.equal(mask, causal_lower_right(q_len, k_len)._materialize()), (q_len, k_len)
    assert torch.equal(ch.causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.exercise(2)
def test_causal_attention_matches_torch(ch):
    q, k, v = qkv(Tq=6, Tk=6)
    ours = ch.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = qkv(Tq=3, Tk=8)  # queries are the last 3 of 8 positions (KV cache)
    ours = ch.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 8)))


def test_attention_matches_torch_without_mask_and_with_scale(ch):
    q, k, v = qkv(Tq=4, Tk=9)
    torch.testing.assert_close(ch.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(ch.scaled_dot_product_attention(q, k, v, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_attention_matches_torch_with_padding_and_float_masks(ch):
    q, k, v = qkv(B=3, Tq=5, Tk=5)
    lengths = torch.tensor([5, 3, 1])
    padding = torch.arange(5)[None, :] < lengths[:, None]  # (B, Tk), True = real token
    mask = padding[:, None, None, :]  # (B, 1, 1, Tk)
    torch.testing.assert_close(ch.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    both = mask & torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(ch.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=both))
    bias = rand(1, 3, 5, 5, seed=9)  # an additive float mask, like ALiBi
    torch.testing.assert_close(ch.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


def test_fully_masked_query_gives_zero_like_torch(ch):
    q, k, v = qkv(B=1, H=1, Tq=3, Tk=3)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    ours = ch.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(ours[0, 0, 1], torch.zeros(8, dtype=torch.float64))


def test_attention_gradients_match_torch(ch):
    q1, k1, v1 = (t.requires_grad_() for t in qkv(Tq=5, Tk=7))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    upstream = rand(2, 3, 5, 8, seed=5)
    mask = rand(1, 1, 5, 7, seed=6) > -0.5
    (ch.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask) * upstream).sum().backward()
    (F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask) * upstream).sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_attention_dropout_is_unbiased(ch):
    """E[dropout(P) v] = P v: the mean over many dropout draws approaches the exact output."""
    torch.manual_seed(0)
    q, k, v = qkv(B=1, H=1, Tq=2, Tk=4)
    exact = ch.scaled_dot_product_attention(q, k, v)
    draws = torch.stack([ch.scaled_dot_product_attention(q, k, v, dropout_p=0.3) for _ in range(4000)])
    assert not torch.allclose(draws[0], exact)
    torch.testing.assert_close(draws.mean(0), exact, rtol=0, atol=0.1)


def test_attention_bad_shapes_raise(ch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="last dimension"):
        ch.scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="same length"):
        ch.scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="does not broadcast"):
        ch.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        ch.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        ch.scaled_dot_product_attention(q, k[:1].expand(3, -1, -1, -1)[:, :2], v[:1].expand(3, -1, -1, -1)[:, :2])


def test_dot_product_variance_grows_like_d_and_scaling_undoes_it(ch):
    """Var(q . k) = d for independent N(0, 1) entries; divided by sqrt(d) it is 1."""
    gen = torch.Generator().manual_seed(0)
    for d in (16, 256):
        q, k = torch.randn(20000, d, generator=gen), torch.randn(20000, d, generator=gen)
        dots = (q * k).sum(-1)
        assert abs(dots.var().item() / d - 1) < 0.05
        assert abs((dots / math.sqrt(d)).var().item() - 1) < 0.05


# ---------------------------------------------------------------------------------------
# Backward pass by hand
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_attention_backward_matches_autograd(ch):
    q, k, v = (t.requires_grad_() for t in qkv(Tq=4, Tk=6))
    for causal in (False, True):
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)  # the forward pass with torch's softmax
        if causal:
            scores = scores.masked_fill(causal_lower_right(4, 6)._materialize().logical_not(), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = weights @ v
        grad_out = rand(*out.shape, seed=7)
        expected = torch.autograd.grad(out, (q, k, v), grad_out)
        got = ch.attention_backward(q.detach(), k.detach(), v.detach(), weights.detach(), grad_out,
                                    1 / math.sqrt(8))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


@pytest.mark.exercise(3)
def test_attention_manual_backward_passes_gradcheck(ch):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Tq=3, Tk=4, D=4))
    mask = torch.tensor([[True, True, False, True]])  # one padded key
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: ch.attention_manual_backward(q, k, v, mask, causal), (q, k, v))


# ---------------------------------------------------------------------------------------
# Blockwise attention with an online softmax
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(4)
@FAST
@given(Tq=st.integers(1, 20), extra=st.integers(0, 10), block=st.integers(1, 9), causal=st.booleans(),
       seed=st.integers(0, 1000))
def test_blockwise_attention_equals_torch(ch, Tq, extra, block, causal, seed):
    q, k, v = qkv(B=2, H=2, Tq=Tq, Tk=Tq + extra, D=4, seed=seed)
    mask = causal_lower_right(Tq, Tq + extra) if causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ch.blockwise_attention(q, k, v, block, causal), expected)


@pytest.mark.exercise(4)
def test_blockwise_attention_with_huge_scores(ch):
    q, k, v = qkv(Tq=8, Tk=8)
    expected = F.scaled_dot_product_attention(q * 100, k * 100, v, is_causal=True)
    torch.testing.assert_close(ch.blockwise_attention(q * 100, k * 100, v, 3, True), expected)


# ---------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------


def paired_with_torch(ch, d_model=16, n_head=4, bias=True):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(d_model, n_head, bias=bias, batch_first=True).double()
    ours = ch.MultiHeadAttention(d_model, n_head, bias=bias).double()
    ours.load_fused_qkv(ref.in_proj_weight, ref.in_proj_bias)
    with torch.no_grad():
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        if bias:
            ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ours, ref


@pytest.mark.parametrize("bias", [True, False])
def test_mha_equals_torch_multihead_attention(ch, bias):
    ours, ref = paired_with_torch(ch, bias=bias)
    x = rand(3, 7, 16)
    expected, expected_w = ref(x, x, x, need_weights=True)
    got, weights = ours(x, need_weights=True)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(weights.mean(1), expected_w)  # torch averages over heads


def test_mha_cross_attention_causal_and_padding_equal_torch(ch):
    ours, ref = paired_with_torch(ch)
    x, memory = rand(2, 5, 16, seed=1), rand(2, 8, 16, seed=2)
    padding = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    # torch's masks say True = NOT allowed; ours say True = allowed
    expected, _ = ref(x, memory, memory, key_padding_mask=~padding)
    torch.testing.assert_close(ours(x, memory, padding_mask=padding), expected)
    causal_torch = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected, _ = ref(x, x, x, attn_mask=causal_torch, key_padding_mask=~padding[:, :5])
    torch.testing.assert_close(ours(x, causal=True, padding_mask=padding[:, :5]), expected)


def test_mha_gradients_equal_torch(ch):
    ours, ref = paired_with_torch(ch)
    x1 = rand(2, 6, 16).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    upstream = rand(2, 6, 16, seed=3)
    causal_torch = torch.ones(6, 6, dtype=torch.bool).triu(1)
    (ours(x1, causal=True) * upstream).sum().backward()
    (ref(x2, x2, x2, attn_mask=causal_torch)[0] * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    in_w = torch.cat([ours.q_proj.weight.grad, ours.k_proj.weight.grad, ours.v_proj.weight.grad])
    in_b = torch.cat([ours.q_proj.bias.grad, ours.k_proj.bias.grad, ours.v_proj.bias.grad])
    torch.testing.assert_close(in_w, ref.in_proj_weight.grad)
    torch.testing.assert_close(in_b, ref.in_proj_bias.grad)
    torch.testing.assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad)


def test_mha_float32_tolerance(ch):
    """In float32 the two agree to within rtol 1e-5, atol 1e-6 (rounding order differs)."""
    ours, ref = paired_with_torch(ch)
    ours, ref = ours.float(), ref.float()
    x = rand(2, 9, 16).float()
    torch.testing.assert_close(ours(x), ref(x, x, x)[0], rtol=1e-5, atol=1e-6)


def loop_over_heads(mha, x, causal):
    """Reference: each head with its own slices of the weights, then concatenate."""
    D, outputs = mha.head_dim, []
    n_rep = mha.n_head // mha.n_kv_head
    for h in range(mha.n_head):
        g = h // n_rep  # the key/value head this query head reads
        q = x @ mha.q_proj.weight[h * D:(h + 1) * D].T + mha.q_proj.bias[h * D:(h + 1) * D]
        k = x @ mha.k_proj.weight[g * D:(g + 1) * D].T + mha.k_proj.bias[g * D:(g + 1) * D]
        v = x @ mha.v_proj.weight[g * D:(g + 1) * D].T + mha.v_proj.bias[g * D:(g + 1) * D]
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.softmax(scores, -1) @ v)
    return mha.out_proj(torch.cat(outputs, dim=-1))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_batched_heads_equal_a_loop_over_heads(ch, n_kv_head, causal):
    torch.manual_seed(0)
    mha = ch.MultiHeadAttention(16, 4, n_kv_head).double()
    x = rand(2, 6, 16)
    torch.testing.assert_close(mha(x, causal=causal), loop_over_heads(mha, x, causal))


def test_gqa_with_as_many_kv_heads_as_heads_is_mha(ch):
    torch.manual_seed(0)
    gqa = ch.MultiHeadAttention(16, 4, n_kv_head=4).double()
    ours, ref = paired_with_torch(ch)
    gqa.load_state_dict(ours.state_dict())
    x = rand(2, 5, 16)
    torch.testing.assert_close(gqa(x, causal=True), ref(x, x, x, attn_mask=torch.ones(5, 5).triu(1).bool())[0])


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_equals_mha_with_shared_key_value_weights(ch, n_kv_head):
    """Grouped-query attention is multi-head attention whose heads in a group share k and v."""
    torch.manual_seed(0)
    gqa = ch.MultiHeadAttention(16, 4, n_kv_head).double()
    mha = ch.MultiHeadAttention(16, 4).double()
    n_rep, D = 4 // n_kv_head, 4
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            dst.weight.copy_(src.weight.view(n_kv_head, D, 16).repeat_interleave(n_rep, 0).reshape(16, 16))
            dst.bias.copy_(src.bias.view(n_kv_head, D).repeat_interleave(n_rep, 0).reshape(16))
    x = rand(2, 5, 16)
    torch.testing.assert_close(gqa(x, causal=True), mha(x, causal=True))
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


def test_mha_with_rope_and_gqa_equals_hugging_face_llama(ch):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, attention_bias=False,
                         rope_theta=10000.0, max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlamaAttention(config, layer_idx=0).double().eval()
    ours = ch.MultiHeadAttention(32, 4, n_kv_head=2, bias=False, rope=True).double()
    for a, b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
        getattr(ours, a).load_state_dict(getattr(ref, b).state_dict())
    x = rand(2, 7, 32)
    position_ids = torch.arange(3, 10)[None].expand(2, -1)  # as after 3 cached tokens
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
    causal = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    expected, _ = ref(x, position_embeddings=(cos, sin), attention_mask=causal)
    torch.testing.assert_close(ours(x, causal=True, positions=position_ids), expected)


@pytest.mark.parametrize("options", [dict(), dict(rope=True), dict(alibi=True), dict(rope=True, use_fused=True),
                                     dict(alibi=True, use_fused=True)])
def test_decoding_with_a_kv_cache_equals_the_full_causal_forward(ch, options):
    torch.manual_seed(0)
    mha = ch.MultiHeadAttention(16, 4, n_kv_head=2, **options).double()
    x = rand(2, 9, 16)
    full = mha(x, causal=True)
    cache = ListCache()
    steps = [mha(x[:, :4], causal=True, kv_cache=cache)]  # the prompt, then one token at a time
    steps += [mha(x[:, t:t + 1], causal=True, kv_cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_kv_cache_with_left_padding(ch):
    """Batched generation: the second prompt is left-padded by 2; masks cover cached keys too."""
    torch.manual_seed(0)
    mha = ch.MultiHeadAttention(16, 4, n_kv_head=2, rope=True).double()
    x = rand(2, 7, 16)
    padding = torch.tensor([[True] * 7, [False, False] + [True] * 5])
    positions = (padding.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0
    full = mha(x, causal=True, padding_mask=padding, positions=positions)
    cache = ListCache()
    steps = [mha(x[:, :4], causal=True, padding_mask=padding[:, :4], positions=positions[:, :4], kv_cache=cache)]
    for t in range(4, 7):
        steps.append(mha(x[:, t:t + 1], causal=True, padding_mask=padding[:, :t + 1],
                         positions=positions[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    torch.testing.assert_close(full[1, 2:], mha(x[1:, 2:], causal=True)[0])  # padding changes nothing


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_fused_path_equals_ours(ch, n_kv_head):
    torch.manual_seed(0)
    ours = ch.MultiHeadAttention(16, 4, n_kv_head, rope=True).double()
    fused = ch.MultiHeadAttention(16, 4, n_kv_head, rope=True, use_fused=True).double()
    fused.load_state_dict(ours.state_dict())
    x = rand(2, 6, 16)
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for kwargs in (dict(), dict(causal=True), dict(causal=True, padding_mask=padding), dict(padding_mask=padding)):
        torch.testing.assert_close(fused(x, **kwargs), ours(x, **kwargs))


def test_alibi_flag_equals_passing_the_bias(ch):
    torch.manual_seed(0)
    with_flag = ch.MultiHeadAttention(16, 4, alibi=True).double()
    plain = ch.MultiHeadAttention(16, 4).double()
    plain.load_state_dict(with_flag.state_dict())
    x = rand(2, 6, 16)
    bias = alibi_bias(4, 6, dtype=torch.float64)
    torch.testing.assert_close(with_flag(x, causal=True), plain(x, causal=True, attn_mask=bias))


def test_rope_per_sequence_positions(ch):
    """Left padding: sequence 2 starts 2 tokens later, so its positions start at 0 there."""
    torch.manual_seed(0)
    mha = ch.MultiHeadAttention(16, 4, rope=True).double()
    x = rand(1, 4, 16)
    padded = torch.cat([rand(1, 2, 16, seed=4), x], dim=1)  # (1, 6, 16): two pads, then x
    positions = torch.tensor([[0, 0, 0, 1, 2, 3]])
    padding = torch.tensor([[False, False, True, True, True, True]])
    out = mha(padded, causal=True, padding_mask=padding, positions=positions)
    torch.testing.assert_close(out[:, 2:], mha(x, causal=True))


def test_dropout_only_in_training(ch):
    torch.manual_seed(0)
    mha = ch.MultiHeadAttention(16, 4, dropout=0.5).double()
    x = rand(2, 5, 16)
    plain = ch.MultiHeadAttention(16, 4).double()
    plain.load_state_dict(mha.state_dict())
    assert not torch.allclose(mha.train()(x), plain(x))
    torch.testing.assert_close(mha.eval()(x), plain(x))


def test_mha_bad_inputs_raise_clear_errors(ch):
    with pytest.raises(ValueError, match="divisible by n_head"):
        ch.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ch.MultiHeadAttention(16, 4, n_kv_head=3)
    mha = ch.MultiHeadAttention(16, 4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="d_model=16"):
        mha(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="d_model=16"):
        mha(torch.randn(5, 16))
    with pytest.raises(ValueError, match="kv must have shape"):
        mha(x, torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        mha(x, padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mha(x, padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        mha(x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="self-attention only"):
        ch.MultiHeadAttention(16, 4, rope=True)(x, torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="fused"):
        ch.MultiHeadAttention(16, 4, n_kv_head=2).load_fused_qkv(torch.randn(48, 16))
    with pytest.raises(ValueError, match="shape"):
        mha.load_fused_qkv(torch.randn(16, 48))


# ---------------------------------------------------------------------------------------
# The trained example and the cost measurement
# ---------------------------------------------------------------------------------------


def test_reversal_model_learns_an_anti_diagonal(ch):
    model = ch.train_reversal_model(steps=300)
    ids = torch.randint(0, 10, (256, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, weights = model(ids)
    assert (logits.argmax(-1) == ids.flip(1)).float().mean() > 0.95
    assert torch.equal(weights[0, 0].argmax(-1), torch.arange(7, -1, -1))


def test_measured_score_memory_is_quadratic_for_full_and_linear_for_blockwise(ch):
    cost = ch.measure_attention_cost(seq_lens=(32, 64), n_head=2, head_dim=8, repeats=1, block_size=16)
    assert cost["ours_bytes"] == [2 * 32 * 32 * 4, 2 * 64 * 64 * 4]
    assert cost["blockwise_bytes"] == [2 * 32 * 16 * 4, 2 * 64 * 16 * 4]
    assert all(t > 0 for key in ("ours_s", "blockwise_s", "fused_s") for t in cost[key])
