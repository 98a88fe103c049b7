"""Chapter 5: the Transformer block.

The pieces that turn the attention of Chapter 4 into a stackable layer:

- layer normalization (forward and its hand-derived backward) and RMSNorm;
- the position-wise feed-forward network, with GELU (exact and tanh) or SwiGLU;
- dropout with its 1 / (1 - p) rescaling;
- residual connections, pre-norm and post-norm;
- GPT-2's initialisation with scaled residual projections, and the parameter count of a block.

``Block`` is the one layer that every model of the book stacks: a GPT block (causal
self-attention), an encoder block (bidirectional self-attention) and a decoder block
(causal self-attention plus cross-attention) are the same class with different switches.

Shapes: B batch, T sequence length, C model width (d_model), F hidden width of the MLP.

Needs: ch03_embeddings, ch04_attention.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03_embeddings import LearnedPositionalEmbedding, TokenEmbedding
from ch04_attention import MultiHeadAttention


# ---------------------------------------------------------------------------------------
# Layer normalization
# ---------------------------------------------------------------------------------------

# --8<-- [start:layer-norm]
def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Normalize each vector x[..., :] to mean 0 and variance 1, then scale and shift.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance (divide by
    C, not C - 1), over the last dimension, as torch.nn.LayerNorm. x (..., C) -> (..., C).
    """
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    centered = x - mean
    var = (centered * centered).mean(dim=-1, keepdim=True)  # (..., 1), biased
    x_hat = centered * torch.rsqrt(var + eps)  # (..., C): mean 0, variance 1
    if weight is not None:
        x_hat = x_hat * weight
    if bias is not None:
        x_hat = x_hat + bias
    return x_hat
# --8<-- [end:layer-norm]


# --8<-- [start:exercise-1]
# Exercise 1: the backward pass of layer normalization
def layer_norm_backward(grad_out, x, weight, eps=1e-5):
    """Gradients of y = layer_norm(x, weight, bias, eps); returns (dL/dx, dL/dweight, dL/dbias).

    grad_out and x (..., C), weight (C,). With x_hat = (x - mean) * rstd, rstd = 1/sqrt(var + eps)
    and g = grad_out * weight (the gradient reaching x_hat), the chapter derives
        dL/dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (means over the last dim)
        dL/dweight = sum of grad_out * x_hat,  dL/dbias = sum of grad_out
                                                                (over all but the last dim).
    """
    mean = x.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(((x - mean) ** 2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    x_hat = (x - mean) * rstd  # (..., C)
    g = grad_out * weight  # dL/dx_hat
    grad_x = rstd * (
        g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)
    )
    lead = tuple(range(x.dim() - 1))  # every dimension but the last
    grad_weight = (grad_out * x_hat).sum(dim=lead)  # (C,)
    grad_bias = grad_out.sum(dim=lead)  # (C,)
    return grad_x, grad_weight, grad_bias
# --8<-- [end:exercise-1]


# --8<-- [start:layer-norm-function]
class LayerNormFunction(torch.autograd.Function):
    """layer_norm with the hand-derived backward, so gradcheck can test it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return layer_norm(x, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = layer_norm_backward(grad_out, x, weight, ctx.eps)
        return grad_x, grad_weight, grad_bias, None  # no gradient for eps
# --8<-- [end:layer-norm-function]


# --8<-- [start:layer-norm-module]
class LayerNorm(nn.Module):
    """Layer normalization with a learned scale (init 1) and optional shift (init 0).

    fused=True calls torch's one-kernel F.layer_norm (faster, and equal to layer_norm above
    up to rounding, as the tests check); fused=False runs our formula.
    """

    def __init__(self, d_model, eps=1e-5, bias=True, fused=True):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x):  # (..., C) -> (..., C)
        if self.fused:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)
# --8<-- [end:layer-norm-module]


# --8<-- [start:exercise-2]
RMS_NORM_EPS = 1e-6  # Llama's default, and the book's for every RMSNorm


# Exercise 2: RMSNorm
def rms_norm(x, weight=None, eps=RMS_NORM_EPS):
    """RMSNorm: x / sqrt(mean(x**2) + eps) * weight, over the last dimension. No centering, no bias.

    x (..., C), weight (C,) or None. Half-precision inputs are normalized in float32 and cast
    back before the weight is applied, as in Llama (mean(x**2) overflows easily in float16).
    """
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight
# --8<-- [end:exercise-2]


# --8<-- [start:rms-norm-module]
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019) with a learned scale, as in Llama.

    fused=True calls torch's one-kernel F.rms_norm on float32 inputs (equal to rms_norm up to
    rounding, as the tests check); half precision, and fused=False, run rms_norm above."""

    def __init__(self, d_model, eps=RMS_NORM_EPS, fused=True):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x):  # (..., C) -> (..., C)
        if self.fused and x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind, d_model, eps=None, bias=True, fused=True):
    """'layernorm' -> LayerNorm, 'rmsnorm' -> RMSNorm (which has no bias to switch off).
    eps=None: each norm's own default (1e-5 for LayerNorm, RMS_NORM_EPS for RMSNorm);
    fused=False: the book's formula instead of torch's kernel."""
    if kind == "layernorm":
        return LayerNorm(d_model, 1e-5 if eps is None else eps, bias, fused)
    if kind == "rmsnorm":
        return RMSNorm(d_model, RMS_NORM_EPS if eps is None else eps, fused)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
# --8<-- [end:rms-norm-module]


# ---------------------------------------------------------------------------------------
# The position-wise feed-forward network
# ---------------------------------------------------------------------------------------

# --8<-- [start:gelu]
def gelu(x):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF: 0.5 x (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """The tanh approximation of GELU used by GPT-2 (Hugging Face's "gelu_new")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
# --8<-- [end:gelu]


# --8<-- [start:mlp]
# The activations the MLP uses: torch's one-kernel versions of the functions above.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def default_d_ff(d_model, mlp="gelu", multiple_of=64):
    """Hidden width F of the MLP: 4 C, or for SwiGLU 2/3 of 4 C (same parameter count with
    three matrices instead of two), rounded up to a multiple of `multiple_of` as in Llama."""
    if mlp == "swiglu":
        hidden = int(2 * 4 * d_model / 3)
        return multiple_of * math.ceil(hidden / multiple_of)
    return 4 * d_model


class MLP(nn.Module):
    """Position-wise feed-forward network: proj(act(fc(x))), the same for every position."""

    def __init__(self, d_model, d_ff=None, activation="gelu", bias=True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d_ff = d_ff or default_d_ff(d_model, activation)
        self.act = ACTIVATIONS[activation]
        self.fc = nn.Linear(d_model, d_ff, bias=bias)  # C -> F: widen
        self.proj = nn.Linear(d_ff, d_model, bias=bias)  # F -> C: back to the residual stream

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.proj(self.act(self.fc(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward network of Llama: down(silu(gate(x)) * up(x)), silu(z) = z sigmoid(z)."""

    def __init__(self, d_model, d_ff=None, bias=False):
        super().__init__()
        d_ff = d_ff or default_d_ff(d_model, "swiglu")
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) gated


def make_mlp(kind, d_model, d_ff=None, bias=True):
    """'gelu', 'gelu_tanh', 'relu' -> MLP with that activation; 'swiglu' -> SwiGLU."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias)
    return MLP(d_model, d_ff, kind, bias)
# --8<-- [end:mlp]


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-3]
# Exercise 3: dropout
def dropout(x, p=0.5, training=True):
    """Inverted dropout: zero each entry independently with probability p and multiply the
    survivors by 1 / (1 - p), so that E[dropout(x)] = x and nothing changes at evaluation.

    Return x itself when not training or p == 0, zeros when p == 1, and raise ValueError for
    p outside [0, 1]. Hint: torch.empty_like(x).bernoulli_(1 - p) is a mask of ones (kept).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    keep = torch.empty_like(x).bernoulli_(1.0 - p)  # 1 with probability 1 - p
    return x * keep / (1.0 - p)
# --8<-- [end:exercise-3]


# ---------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------

# --8<-- [start:block]
class Block(nn.Module):
    """A Transformer block: attention and an MLP, each wrapped in a residual connection.

    Pre-norm (GPT-2, Llama):   x = x + attn(norm(x));  x = x + mlp(norm(x))
    Post-norm (the original):  x = norm(x + attn(x));  x = norm(x + mlp(x))

    cross_attention=True adds a sublayer between the two that attends from x to `memory`,
    the encoder's output: the decoder block of the encoder-decoder Transformer.
    n_kv_head < n_head gives grouped-query attention; rope=True rotates queries and keys
    (pairs of adjacent numbers with rope_interleaved, else the two halves: Chapter 3).
    dropout applies to the attention weights and to each sublayer's output (residual dropout).
    norm_eps=None takes the norm's own default; use_fused=False runs the book's own attention
    and LayerNorm (Chapters 4 and 5) instead of torch's fused kernels.
    """

    def __init__(self, d_model, n_head, n_kv_head=None, d_ff=None, *, dropout=0.0, bias=True,
                 norm="layernorm", norm_eps=None, mlp="gelu", prenorm=True, cross_attention=False,
                 rope=False, rope_base=10000.0, rope_interleaved=False, use_fused=True):
        super().__init__()
        self.prenorm = prenorm
        self.attn_norm = make_norm(norm, d_model, norm_eps, bias, use_fused)
        self.attn = MultiHeadAttention(d_model, n_head, n_kv_head, bias=bias, dropout=dropout,
                                       rope=rope, rope_base=rope_base,
                                       rope_interleaved=rope_interleaved, use_fused=use_fused)
        self.cross_norm = (
            make_norm(norm, d_model, norm_eps, bias, use_fused) if cross_attention else None
        )
        self.cross_attn = (
            MultiHeadAttention(
                d_model, n_head, n_kv_head, bias=bias, dropout=dropout, use_fused=use_fused
            )
            if cross_attention
            else None
        )
        self.mlp_norm = make_norm(norm, d_model, norm_eps, bias, use_fused)
        self.mlp = make_mlp(mlp, d_model, d_ff, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory=None, *, causal=False, padding_mask=None, attn_mask=None,
                memory_padding_mask=None, memory_mask=None, positions=None, kv_cache=None):
        """x (B, T, C) -> (B, T, C). memory (B, S, C): what cross-attention reads.

        causal, padding_mask (B, T), attn_mask, positions and kv_cache go to self-attention
        (see MultiHeadAttention); memory_padding_mask (B, S) and memory_mask to cross-attention.
        """
        def self_attention(h):
            return self.attn(h, causal=causal, padding_mask=padding_mask, attn_mask=attn_mask,
                             positions=positions, kv_cache=kv_cache)

        x = self._residual(x, self.attn_norm, self_attention)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError(
                    "this block has cross-attention: pass memory, the encoder output (B, S, C)"
                )
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, memory, padding_mask=memory_padding_mask, attn_mask=memory_mask))
        elif memory is not None:
            raise ValueError(
                "memory was given, but this block has no cross-attention (cross_attention=False)"
            )
        return self._residual(x, self.mlp_norm, self.mlp)

    def _residual(self, x, norm, sublayer):
        if self.prenorm:  # the residual stream x passes through untouched: x + f(norm(x))
            return x + self.drop(sublayer(norm(x)))
        return norm(x + self.drop(sublayer(x)))  # post-norm: every block renormalizes the stream

    def residual_projections(self):
        """The linear layers that write into the residual stream (scaled at initialisation)."""
        layers = [
            self.attn.out_proj,
            self.mlp.proj if isinstance(self.mlp, MLP) else self.mlp.down_proj,
        ]
        return layers + ([self.cross_attn.out_proj] if self.cross_attn is not None else [])
# --8<-- [end:block]


# --8<-- [start:load-torch-layer]
@torch.no_grad()
def load_torch_layer(block, layer):
    """Copy the weights of a torch.nn.TransformerEncoderLayer or TransformerDecoderLayer into
    a Block built with the same sizes (its norm_first must match block.prenorm).

    torch names: self_attn (fused in_proj_weight (3C, C) = [W_q; W_k; W_v]), multihead_attn
    (cross-attention, decoder only), linear1 / linear2 (the MLP), norm1, norm2 [, norm3].
    """
    if layer.norm_first != block.prenorm:
        raise ValueError(f"norm_first={layer.norm_first} but the block has prenorm={block.prenorm}")
    is_decoder = hasattr(layer, "multihead_attn")
    if is_decoder != (block.cross_attn is not None):
        raise ValueError(
            "a decoder layer goes into a block with cross_attention=True, an encoder layer into one"
            " without"
        )

    def copy_attention(ours, theirs):
        ours.load_fused_qkv(theirs.in_proj_weight, theirs.in_proj_bias)
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())

    copy_attention(block.attn, layer.self_attn)
    block.mlp.fc.load_state_dict(layer.linear1.state_dict())
    block.mlp.proj.load_state_dict(layer.linear2.state_dict())
    block.attn_norm.load_state_dict(layer.norm1.state_dict())
    if is_decoder:
        copy_attention(block.cross_attn, layer.multihead_attn)
        block.cross_norm.load_state_dict(layer.norm2.state_dict())
        block.mlp_norm.load_state_dict(layer.norm3.state_dict())
    else:
        block.mlp_norm.load_state_dict(layer.norm2.state_dict())
    return block
# --8<-- [end:load-torch-layer]


# ---------------------------------------------------------------------------------------
# Initialisation and parameter count
# ---------------------------------------------------------------------------------------

# --8<-- [start:init]
@torch.no_grad()
def init_gpt2_(model, n_residual, std=0.02):
    """GPT-2's initialisation, in place: every Linear and Embedding weight ~ N(0, std**2),
    biases 0, norms weight 1 / bias 0, and the projections that write into the residual
    stream (Block.residual_projections) ~ N(0, (std / sqrt(n_residual))**2), where n_residual
    is the number of residual branches in the whole stack (2 per GPT block).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, TokenEmbedding, LearnedPositionalEmbedding)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (LayerNorm, RMSNorm, nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():  # second pass: it must come after the Linear init above
        if isinstance(module, Block):
            for proj in module.residual_projections():
                nn.init.normal_(proj.weight, 0.0, std / math.sqrt(n_residual))
    return model
# --8<-- [end:init]


# --8<-- [start:exercise-4]
# Exercise 4: the parameter count of a block
def block_num_parameters(d_model, n_head, n_kv_head=None, d_ff=None, bias=True, norm="layernorm",
                         mlp="gelu", cross_attention=False):
    """Number of parameters of Block(d_model, n_head, n_kv_head, d_ff, bias=..., norm=..., mlp=...,
    cross_attention=...), from the formula, without building it.

    Attention: W_q and W_o are C x C; W_k and W_v are C x (n_kv_head * C / n_head); with bias,
    each has one bias per output. MLP: two matrices C x F (three for SwiGLU), F = d_ff or
    default_d_ff(d_model, mlp); with bias, F + C biases (2F + C for SwiGLU). A norm has C weights,
    plus C biases for a LayerNorm with bias. One attention and one norm more with cross_attention.
    """
    n_kv_head = n_kv_head or n_head
    d_ff = d_ff or default_d_ff(d_model, mlp)
    d_kv = n_kv_head * (d_model // n_head)  # width of the keys (and values) of all kv heads
    attention = 2 * d_model * d_model + 2 * d_model * d_kv + (2 * d_model + 2 * d_kv if bias else 0)
    if mlp == "swiglu":
        feed_forward = 3 * d_model * d_ff + (2 * d_ff + d_model if bias else 0)
    else:
        feed_forward = 2 * d_model * d_ff + (d_ff + d_model if bias else 0)
    one_norm = d_model * (2 if norm == "layernorm" and bias else 1)
    n_sublayers = 3 if cross_attention else 2
    return (n_sublayers - 1) * attention + feed_forward + n_sublayers * one_norm
# --8<-- [end:exercise-4]


# ---------------------------------------------------------------------------------------
# Experiments: the residual stream at initialisation, pre-norm versus post-norm
# ---------------------------------------------------------------------------------------

# --8<-- [start:experiments]
def make_stack(n_layer, d_model=64, n_head=4, prenorm=True, init="gpt2", scaled=True, seed=0):
    """n_layer blocks in a ModuleList, initialised like GPT-2 (scaled or not) or like the
    original Transformer (init="xavier": Xavier-uniform matrices, as torch.nn.Transformer)."""
    torch.manual_seed(seed)
    stack = nn.ModuleList(Block(d_model, n_head, prenorm=prenorm) for _ in range(n_layer))
    if init == "xavier":
        for p in stack.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        return stack
    return init_gpt2_(stack, n_residual=2 * n_layer if scaled else 1)


def final_residual_std(n_layer, scaled=True, d_model=128, batch=4, seq_len=16, seed=0):
    """Std of the residual stream after n_layer pre-norm blocks at GPT-2 initialisation,
    for an input of std 0.02, the size of GPT-2's initial embeddings."""
    stack = make_stack(n_layer, d_model, scaled=scaled, seed=seed)
    x = 0.02 * torch.randn(batch, seq_len, d_model, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for block in stack:
            x = block(x, causal=True)
    return x.std().item()


def gradient_norms_by_depth(n_layer=24, prenorm=True, d_model=64, batch=4, seq_len=16, seed=0):
    """Gradient norms at initialisation (Xavier, as in the original Transformer), by block.

    Returns (input_grads, weight_grads): |dL/dx| at each block's input and |dL/dW| of each
    block's first MLP matrix, index 0 = the block next to the embeddings. The loss is the mean
    square of a fixed random read-out of the stack's output (after a final norm for pre-norm,
    as in GPT-2), a stand-in for a language-model loss.
    """
    stack = make_stack(n_layer, d_model, prenorm=prenorm, init="xavier", seed=seed)
    final_norm = LayerNorm(d_model) if prenorm else nn.Identity()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, d_model, generator=gen)
    readout = torch.randn(d_model, d_model, generator=gen) / math.sqrt(d_model)
    inputs = []
    for block in stack:
        x.requires_grad_(True)
        x.retain_grad()  # keep dL/dx of this intermediate tensor
        inputs.append(x)
        x = block(x, causal=True)
    (final_norm(x) @ readout).pow(2).mean().backward()
    return [h.grad.norm().item() for h in inputs], [
        b.mlp.fc.weight.grad.norm().item() for b in stack
    ]
# --8<-- [end:experiments]


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def plot_gelu():
    """GELU, its tanh approximation and ReLU; and the (tiny) difference between the GELUs."""
    import matplotlib.pyplot as plt

    x = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(x, F.relu(x), color="0.6", ls="--", label="ReLU")
    ax1.plot(x, gelu(x), label="GELU (exact, erf)")
    ax1.plot(x, F.silu(x), label="SiLU (the gate of SwiGLU)")
    ax1.set(xlabel="x", ylim=(-0.6, 3), title="Activations")
    ax1.legend()
    ax2.plot(x, gelu_tanh(x) - gelu(x))
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set(xlabel="x", title="GELU tanh approximation minus exact GELU")
    fig.tight_layout()
    return fig


def plot_gradient_flow():
    """Pre-norm versus post-norm gradients by depth, and the residual stream
    with/without scaled init."""
    import matplotlib.pyplot as plt

    n_layer = 24
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for prenorm, label in ((False, "post-norm"), (True, "pre-norm")):
        _, weight_grads = gradient_norms_by_depth(n_layer, prenorm)
        ax1.plot(range(1, n_layer + 1), weight_grads, "o-", ms=3, label=label)
    ax1.set(yscale="log", xlabel="block (1 = next to the embeddings)",
            ylabel="|dL/dW| of the MLP's first matrix",
            title="Gradients at initialisation, 24 blocks")
    ax1.legend()
    depths = [1, 2, 4, 8, 16, 32]
    ax2.plot(depths, [final_residual_std(n, scaled=False) for n in depths], "o-",
             label="all weights N(0, 0.02)")
    ax2.plot(depths, [final_residual_std(n, scaled=True) for n in depths], "o-",
             label="residual projections N(0, 0.02 / sqrt(2N))")
    ax2.set(xscale="log", yscale="log", xlabel="number of blocks N",
            ylabel="std of the output stream", title="Residual stream at GPT-2 initialisation")
    ax2.set_xticks(depths, [str(d) for d in depths])
    ax2.minorticks_off()
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
