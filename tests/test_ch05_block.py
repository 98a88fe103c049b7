"""Tests of Chapter 5: the Transformer block.

References: torch.nn.LayerNorm, torch.nn.RMSNorm, F.gelu, autograd and gradcheck, Hugging
Face's Llama RMSNorm, GELU and MLP, and torch.nn.TransformerEncoderLayer / DecoderLayer for
whole blocks, pre-norm and post-norm.

Run against your own module with: pytest tests/test_ch05_block.py --impl my_ch05.py
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch05_block")


# ---------------------------------------------------------------------------------------
# Layer normalization
# ---------------------------------------------------------------------------------------


@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), width=st.integers(2, 33),
       affine=st.booleans(), seed=st.integers(0, 10_000))
def test_layer_norm_matches_torch(ch, shape, width, affine, seed):
    torch.manual_seed(seed)
    x = torch.randn(*shape, width, dtype=torch.float64) * 3 + 1
    ref = nn.LayerNorm(width, elementwise_affine=affine, dtype=torch.float64)
    if affine:
        nn.init.normal_(ref.weight)
        nn.init.normal_(ref.bias)
    ours = ch.layer_norm(x, ref.weight if affine else None, ref.bias if affine else None, ref.eps)
    torch.testing.assert_close(ours, ref(x).detach())


def test_layer_norm_output_has_mean_zero_and_variance_one(ch):
    x = torch.randn(4, 7, 50, dtype=torch.float64) * 5 - 3
    y = ch.layer_norm(x, eps=0.0)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 7, dtype=torch.float64))
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, 7, dtype=torch.float64))


@pytest.mark.exercise(1)
def test_exercise_1_layer_norm_backward_matches_autograd(ch):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 5, 16, dtype=torch.float64)
    F.layer_norm(x, (16,), w, b, 1e-5).backward(grad_out)
    grad_x, grad_w, grad_b = ch.layer_norm_backward(grad_out, x.detach(), w.detach(), 1e-5)
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, w.grad)
    torch.testing.assert_close(grad_b, b.grad)


@pytest.mark.exercise(1)
def test_exercise_1_layer_norm_backward_passes_gradcheck(ch):
    torch.manual_seed(1)
    inputs = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(6, dtype=torch.float64, requires_grad=True),
              torch.randn(6, dtype=torch.float64, requires_grad=True), 1e-5)
    assert torch.autograd.gradcheck(ch.LayerNormFunction.apply, inputs)


def test_layer_norm_module_fused_and_ours_agree_with_nn(ch):
    torch.manual_seed(0)
    ref = nn.LayerNorm(32)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    x = torch.randn(2, 9, 32)
    for fused in (True, False):
        ours = ch.LayerNorm(32, fused=fused)
        ours.load_state_dict(ref.state_dict())
        torch.testing.assert_close(ours(x), ref(x))
    assert ch.LayerNorm(32, bias=False).bias is None
    assert sum(p.numel() for p in ch.LayerNorm(32, bias=False).parameters()) == 32


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(2)
def test_exercise_2_rms_norm_matches_torch_and_llama(ch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 7, 24) * 4
    torch_norm = nn.RMSNorm(24, eps=1e-6)
    nn.init.normal_(torch_norm.weight)
    llama_norm = LlamaRMSNorm(24, eps=1e-6)
    llama_norm.weight.data.copy_(torch_norm.weight.data)
    ours = ch.rms_norm(x, torch_norm.weight, 1e-6)
    torch.testing.assert_close(ours, torch_norm(x))
    torch.testing.assert_close(ours, llama_norm(x))
    y = ch.rms_norm(x, None, 0.0)  # without a weight: root mean square 1
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(3, 7))


@pytest.mark.exercise(2)
def test_exercise_2_rms_norm_in_half_precision_matches_llama(ch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    x = (torch.randn(4, 64) * 300).half()  # x**2 overflows float16 (max 65504)
    llama_norm = LlamaRMSNorm(64, eps=1e-6).half()
    ours = ch.rms_norm(x, llama_norm.weight, 1e-6)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, llama_norm(x))


def test_rms_norm_module_and_factory(ch):
    norm = ch.make_norm("rmsnorm", 16, 1e-6)
    assert isinstance(norm, ch.RMSNorm) and [n for n, _ in norm.named_parameters()] == ["weight"]
    assert isinstance(ch.make_norm("layernorm", 16), ch.LayerNorm)
    with pytest.raises(ValueError, match="norm"):
        ch.make_norm("batchnorm", 16)


def test_fused_rms_norm_module_equals_the_formula(ch):
    torch.manual_seed(0)
    fused, ours = ch.RMSNorm(24, fused=True), ch.RMSNorm(24, fused=False)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(fused.weight)
    x = torch.randn(3, 5, 24) * 4
    torch.testing.assert_close(fused(x), ours(x))
    torch.testing.assert_close(fused(x.half()), ours(x.half()))  # half precision: Llama's rule, both
    assert not ch.make_norm("rmsnorm", 8, fused=False).fused


# ---------------------------------------------------------------------------------------
# GELU, the MLP and SwiGLU
# ---------------------------------------------------------------------------------------


def test_gelu_matches_torch_and_hugging_face(ch):
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    torch.testing.assert_close(ch.gelu(x), F.gelu(x))
    torch.testing.assert_close(ch.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(ch.gelu_tanh(x), NewGELUActivation()(x))  # GPT-2's "gelu_new"


def test_gelu_tanh_approximation_error_is_below_5e_4(ch):
    x = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    diff = (ch.gelu_tanh(x) - ch.gelu(x)).abs()
    assert 4.5e-4 < diff.max().item() < 5e-4  # the figure stated in the chapter: 4.7e-4
    assert 2.5 < abs(x[diff.argmax()].item()) < 2.9  # reached near |x| = 2.7


def test_mlp_is_proj_act_fc(ch):
    torch.manual_seed(0)
    for activation, fn in (("gelu", ch.gelu), ("gelu_tanh", ch.gelu_tanh), ("relu", torch.relu)):
        mlp = ch.MLP(16, 40, activation)
        x = torch.randn(2, 5, 16)
        expected = fn(x @ mlp.fc.weight.T + mlp.fc.bias) @ mlp.proj.weight.T + mlp.proj.bias
        torch.testing.assert_close(mlp(x), expected)
    assert ch.MLP(16).fc.out_features == 64  # 4 * d_model by default
    with pytest.raises(ValueError, match="activation"):
        ch.MLP(16, activation="tanh")


def test_swiglu_matches_llama_mlp(ch):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    ref = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=88))
    ours = ch.SwiGLU(32, 88)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(ours(x), ref(x))


def test_swiglu_default_width_keeps_the_parameter_count_of_a_gelu_mlp(ch):
    for d_model in (64, 768, 4096):
        d_ff = ch.default_d_ff(d_model, "swiglu")
        assert d_ff % 64 == 0 and 0 <= d_ff - 8 * d_model / 3 < 64
    for d_model in (768, 4096):  # three C x F matrices with F ~ 8C/3 ~ two C x 4C matrices
        assert abs(3 * ch.default_d_ff(d_model, "swiglu") / (2 * 4 * d_model) - 1) < 0.03
    assert ch.default_d_ff(4096, "swiglu", multiple_of=256) == 11008  # Llama 7B's width


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_exercise_3_dropout_scales_survivors_and_keeps_the_mean(ch):
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 0.5  # no zeros in x, so zeros in the output are dropped entries
    for p in (0.1, 0.5, 0.8):
        y = ch.dropout(x, p, training=True)
        dropped = y == 0
        assert abs(dropped.float().mean().item() - p) < 0.01  # 200k Bernoulli draws: std ~0.001
        torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
        assert abs(y.mean().item() / x.mean().item() - 1) < 0.02  # E[dropout(x)] = x


@pytest.mark.exercise(3)
def test_exercise_3_dropout_edge_cases(ch):
    x = torch.randn(10, 10)
    assert torch.equal(ch.dropout(x, 0.5, training=False), x)
    assert torch.equal(ch.dropout(x, 0.0, training=True), x)
    assert torch.equal(ch.dropout(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="probability"):
        ch.dropout(x, 1.5)


# ---------------------------------------------------------------------------------------
# The block against torch.nn's Transformer layers
# ---------------------------------------------------------------------------------------


def _random_normals(module):
    """Non-trivial norm weights and biases, so that a mixed-up norm would show."""
    torch.manual_seed(123)
    for name, p in module.named_parameters():
        if "norm" in name:
            p.data.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_block_equals_torch_encoder_layer(ch, prenorm, activation):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=activation, batch_first=True,
                                     norm_first=prenorm).eval()
    _random_normals(ref)
    block = ch.load_torch_layer(ch.Block(32, 4, d_ff=64, mlp=activation, prenorm=prenorm), ref).eval()
    x = torch.randn(3, 7, 32)
    padding = torch.tensor([[True] * 7, [True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref(x))
        # torch's masks say True = masked out (the opposite of ours), hence the ~
        torch.testing.assert_close(block(x, padding_mask=padding), ref(x, src_key_padding_mask=~padding))
        causal = nn.Transformer.generate_square_subsequent_mask(7)
        torch.testing.assert_close(block(x, causal=True), ref(x, src_mask=causal, is_causal=True))


@pytest.mark.parametrize("prenorm", [True, False])
def test_decoder_block_equals_torch_decoder_layer(ch, prenorm):
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=prenorm).eval()
    _random_normals(ref)
    block = ch.load_torch_layer(ch.Block(32, 4, d_ff=64, mlp="relu", prenorm=prenorm, cross_attention=True), ref)
    x, memory = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    memory_padding = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        ours = block.eval()(x, memory, causal=True, memory_padding_mask=memory_padding)
        theirs = ref(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=~memory_padding)
    torch.testing.assert_close(ours, theirs)


def test_load_torch_layer_rejects_mismatches(ch):
    ref = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True)
    with pytest.raises(ValueError, match="norm_first"):
        ch.load_torch_layer(ch.Block(16, 2, d_ff=32, prenorm=False), ref)
    with pytest.raises(ValueError, match="cross_attention"):
        ch.load_torch_layer(ch.Block(16, 2, d_ff=32, cross_attention=True), ref)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False, rope=True),
    dict(prenorm=False, mlp="relu"),
])
def test_fused_attention_path_equals_from_scratch_path(ch, kwargs):
    torch.manual_seed(0)
    fused = ch.Block(32, 4, use_fused=True, **kwargs)
    scratch = ch.Block(32, 4, use_fused=False, **kwargs)
    scratch.load_state_dict(fused.state_dict())
    x = torch.randn(2, 10, 32, requires_grad=True)
    y_fused = fused(x, causal=True)
    y_scratch = scratch(x, causal=True)
    torch.testing.assert_close(y_fused, y_scratch, atol=1e-5, rtol=1e-4)
    (g_fused,) = torch.autograd.grad(y_fused.square().sum(), x)
    (g_scratch,) = torch.autograd.grad(y_scratch.square().sum(), x)
    torch.testing.assert_close(g_fused, g_scratch, atol=1e-5, rtol=1e-4)


def test_causal_block_does_not_look_ahead(ch):
    torch.manual_seed(0)
    block = ch.Block(16, 2).eval()
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, 16)  # change the future of position 4
    torch.testing.assert_close(block(x, causal=True)[:, :5], block(changed, causal=True)[:, :5])
    assert not torch.allclose(block(x)[:, :5], block(changed)[:, :5])  # without the mask it does


def test_prenorm_block_with_silent_sublayers_is_the_identity(ch):
    # The residual stream: if both sublayers output 0, a pre-norm block passes x through.
    block = ch.Block(16, 2)
    for proj in block.residual_projections():
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(x, causal=True), x)


def test_block_memory_errors(ch):
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="memory"):
        ch.Block(16, 2, cross_attention=True)(x)
    with pytest.raises(ValueError, match="cross_attention"):
        ch.Block(16, 2)(x, torch.randn(1, 3, 16))


# ---------------------------------------------------------------------------------------
# Parameter count and initialisation
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(4)
@FAST
@given(n_head=st.sampled_from([1, 2, 4, 8]), head_dim=st.sampled_from([2, 4, 8]), kv_div=st.sampled_from([1, 2, 4]),
       d_ff=st.sampled_from([None, 24, 100]), bias=st.booleans(), norm=st.sampled_from(["layernorm", "rmsnorm"]),
       mlp=st.sampled_from(["gelu", "relu", "swiglu"]), cross=st.booleans())
def test_exercise_4_block_parameter_formula_matches_the_module(ch, n_head, head_dim, kv_div, d_ff, bias, norm, mlp, cross):
    n_kv_head = max(1, n_head // kv_div)
    d_model = n_head * head_dim
    block = ch.Block(d_model, n_head, n_kv_head, d_ff, bias=bias, norm=norm, mlp=mlp, cross_attention=cross)
    expected = sum(p.numel() for p in block.parameters())
    assert ch.block_num_parameters(d_model, n_head, n_kv_head, d_ff, bias, norm, mlp, cross) == expected


@pytest.mark.exercise(4)
def test_exercise_4_gpt2_block_has_7_087_872_parameters(ch):
    # GPT-2 small: (124,439,808 - 50257*768 - 1024*768 - 2*768) / 12 per block
    assert ch.block_num_parameters(768, 12) == (124_439_808 - 50257 * 768 - 1024 * 768 - 2 * 768) // 12 == 7_087_872


def test_gpt2_initialisation(ch):
    torch.manual_seed(0)
    n_layer = 4
    stack = ch.init_gpt2_(nn.ModuleList(ch.Block(256, 4) for _ in range(n_layer)), n_residual=2 * n_layer)
    block = stack[0]
    assert abs(block.attn.q_proj.weight.std().item() - 0.02) < 0.001
    assert abs(block.mlp.fc.weight.std().item() - 0.02) < 0.001
    for proj in block.residual_projections():
        assert abs(proj.weight.std().item() - 0.02 / math.sqrt(2 * n_layer)) < 0.0005
        assert torch.all(proj.bias == 0)
    assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn_norm.bias == 0)


# ---------------------------------------------------------------------------------------
# The measured claims of the chapter
# ---------------------------------------------------------------------------------------


def test_scaled_init_keeps_the_residual_stream_from_growing_with_depth(ch):
    unscaled = ch.final_residual_std(32, scaled=False) / ch.final_residual_std(2, scaled=False)
    scaled = ch.final_residual_std(32, scaled=True) / ch.final_residual_std(2, scaled=True)
    assert 3.0 < unscaled < 5.0  # grows like sqrt(N): sqrt(32 / 2) = 4
    assert 0.8 < scaled < 1.25  # stays put


def test_pre_norm_gradients_never_vanish_and_post_norm_top_gradients_are_large(ch):
    pre_inputs, pre_weights = ch.gradient_norms_by_depth(24, prenorm=True)
    _, post_weights = ch.gradient_norms_by_depth(24, prenorm=False)
    assert min(pre_inputs) >= pre_inputs[-1]  # the identity path: nothing below the top shrinks
    assert post_weights[-1] > 3 * pre_weights[-1]  # post-norm's top block: several times larger
    _, shallow = ch.gradient_norms_by_depth(6, prenorm=True)
    assert pre_weights[-1] < shallow[-1]  # pre-norm's top gradient shrinks as the stack deepens
