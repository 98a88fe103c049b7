"""Chapter 3: embeddings and positional encodings.

Token ids become vectors by a table lookup (an embedding). Attention by itself cannot tell
where a token is, so a model adds position information in one of these ways:

- sinusoidal encodings added to the input (Vaswani et al., 2017),
- learned absolute position embeddings added to the input (GPT-2),
- rotary embeddings that rotate queries and keys (RoPE, Su et al., 2021; Llama),
- linear biases added to the attention scores (ALiBi, Press et al., 2022; BLOOM, MPT),
- nothing at all, relying on the causal mask (NoPE).

The end of the file holds a tiny model and a CPU experiment that trains it with each
encoding and tests it on sequences longer than any it saw in training.

Shapes: B batch, T sequence length, C model width, H heads, D head width, V vocabulary.

Needs: nothing else from the book.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# --8<-- [start:token-embedding]
def one_hot_embed(ids, weight):
    """The embedding lookup written as a matrix product: one_hot(ids) @ weight.

    ids: integer tensor (...,); weight: (V, C). Returns (..., C). Same result as weight[ids],
    but it spends V*C multiply-adds per token to select one row, which is why models look up.
    """
    check_token_ids(ids, weight.shape[0])
    one_hot = F.one_hot(ids.long(), num_classes=weight.shape[0]).to(weight.dtype)  # (..., V)
    return one_hot @ weight  # (..., V) @ (V, C) -> (..., C)


def check_token_ids(ids, vocab_size):
    """Raise a clear error for ids that are not integers or fall outside [0, vocab_size)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}), got values from "
            f"{ids.min().item()} to {ids.max().item()}"
        )


class TokenEmbedding(nn.Module):
    """A (V, C) table of learned vectors, one row per token id.

    scale=True multiplies by sqrt(C), as in "Attention Is All You Need" (section 3.4), so
    that embeddings initialised small are not drowned by a sinusoidal table of size ~1.
    """

    def __init__(self, vocab_size, d_model, scale=False):
        super().__init__()
        self.vocab_size, self.d_model, self.scale = vocab_size, d_model, scale
        # N(0, 0.02), the initialisation of GPT-2.
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * 0.02)

    def forward(self, ids):  # ids (B, T) -> (B, T, C)
        check_token_ids(ids, self.vocab_size)
        x = F.embedding(ids, self.weight)  # row lookup: weight[ids]
        return x * math.sqrt(self.d_model) if self.scale else x
# --8<-- [end:token-embedding]


# --8<-- [start:self-attention]
def self_attention(x, causal=False, bias=None):
    """Bare self-attention with no projections: softmax(x x^T / sqrt(C) + bias) x.

    x: (B, T, C); bias: additive, broadcastable to (B, T, T). Chapter 4 derives attention;
    here PyTorch's kernel is enough to see what attention does with (and without) positions.
    """
    if causal and bias is not None:  # PyTorch takes one or the other: fold the mask into the bias
        T = x.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        bias = bias.masked_fill(future, float("-inf"))
        causal = False
    return F.scaled_dot_product_attention(x, x, x, attn_mask=bias, is_causal=causal)
# --8<-- [end:self-attention]


# --8<-- [start:positions]
def resolve_positions(length, positions=None, offset=0, device=None):
    """positions if given (checked), else offset, offset+1, ..., offset+length-1.

    A model generating with a KV cache passes offset = number of cached tokens; batches of
    left-padded sequences pass explicit positions of shape (B, T).
    """
    if positions is None:
        return torch.arange(offset, offset + length, device=device)
    if offset:
        raise ValueError("give either positions or offset, not both")
    if positions.dtype.is_floating_point:
        raise TypeError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.shape[-1] != length:
        raise ValueError(
            f"positions has {positions.shape[-1]} entries in its last dimension but the "
            f"sequence has length {length}"
        )
    return positions
# --8<-- [end:positions]


# --8<-- [start:sinusoidal]
# Exercise 1: sinusoidal positional encoding
def sinusoidal_table(n_positions, d_model, base=10000.0):
    """The sinusoidal encoding of "Attention Is All You Need", a (n_positions, d_model) table.

    Row p, columns 2i and 2i+1, hold sin(p * w_i) and cos(p * w_i) with the frequency
    w_i = base ** (-2i / d_model): wavelengths 2*pi*base**(2i/d_model) grow geometrically
    from 2*pi to nearly 2*pi*base. d_model must be even (raise ValueError otherwise).
    Hint: compute the angles in float64 and return float32.
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even for sin/cos pairs, got {d_model}")
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (T, 1)
    freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (C/2,)
    angle = position * freq  # (T, C/2)
    table = torch.empty(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = angle.sin()
    table[:, 1::2] = angle.cos()
    return table.float()
# --8<-- [end:sinusoidal]


# --8<-- [start:sinusoidal-shift]
def sinusoidal_shift_matrix(k, d_model, base=10000.0):
    """The (d_model, d_model) matrix M_k with PE(p + k) = M_k @ PE(p) for every position p.

    It is block diagonal, one 2x2 rotation per frequency w_i, from the angle-sum formulas:
        sin(w(p+k)) =  cos(wk) sin(wp) + sin(wk) cos(wp)
        cos(w(p+k)) = -sin(wk) sin(wp) + cos(wk) cos(wp)
    M_k depends on the shift k only, not on p: a fixed linear map, as the paper says.
    """
    freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (C/2,)
    c, s = torch.cos(k * freq), torch.sin(k * freq)
    blocks = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # (C/2, 2, 2)
    return torch.block_diag(*blocks).float()
# --8<-- [end:sinusoidal-shift]


# --8<-- [start:sinusoidal-module]
class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to x: x + PE[positions]. No parameters."""

    def __init__(self, d_model, max_positions=4096, base=10000.0):
        super().__init__()
        table = sinusoidal_table(max_positions, d_model, base)  # (T_max, C)
        self.register_buffer("table", table, persistent=False)  # moves with .to(device)

    def forward(self, x, positions=None, offset=0):  # x (B, T, C); positions (T,) or (B, T)
        pos = resolve_positions(x.shape[1], positions, offset, x.device)
        if pos.max() >= len(self.table):
            raise ValueError(
                f"position {pos.max().item()} is beyond max_positions={len(self.table)}")
        return x + self.table[pos].to(x.dtype)  # (T, C) or (B, T, C) broadcasts over the batch
# --8<-- [end:sinusoidal-module]


# --8<-- [start:learned]
class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned vector per position (GPT-2's wpe): x + W[positions].

    Its defining limit: row p is trained only if position p occurs in training, and there
    is no row at all beyond max_positions - 1.
    """

    def __init__(self, max_positions, d_model):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_positions, d_model) * 0.02)  # (T_max, C)

    def forward(self, x, positions=None, offset=0):  # x (B, T, C); positions (T,) or (B, T)
        pos = resolve_positions(x.shape[1], positions, offset, x.device)
        if pos.min() < 0 or pos.max() >= len(self.weight):
            raise ValueError(
                f"learned positions exist for 0..{len(self.weight) - 1}, got "
                f"{pos.min().item()}..{pos.max().item()}: this encoding cannot extrapolate"
            )
        return x + self.weight[pos]
# --8<-- [end:learned]


# --8<-- [start:rope-helpers]
def rope_inv_freq(head_dim, base=10000.0, dtype=torch.float32):
    """The RoPE frequencies theta_i = base ** (-2i / head_dim), i < head_dim / 2.

    In float32 this is computed exactly as Hugging Face's Llama does, so angles match it.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs, so head_dim must be even, got {head_dim}")
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim))


def rope_angles(positions, head_dim, base=10000.0, dtype=torch.float32):
    """Angles m * theta_i: positions (T,) or (B, T) -> (T, D/2) or (B, T, D/2).

    float32 by default, as in Llama (float16 angles would be far off at large positions);
    float64 inputs get float64 angles.
    """
    inv_freq = rope_inv_freq(head_dim, base, dtype).to(positions.device)
    return positions.to(dtype)[..., None] * inv_freq


def _angle_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_check(x, positions):
    if x.dim() < 2:
        raise ValueError(f"RoPE expects x of shape (..., T, D), got {tuple(x.shape)}")
    if positions.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"positions has length {positions.shape[-1]} but x has {x.shape[-2]} positions "
            f"(x shape {tuple(x.shape)})"
        )


def _broadcast_angles(angles, x):
    """(B, T, D/2) angles for per-sequence positions need a head axis to meet x (B, H, T, D)."""
    if angles.dim() == 3 and x.dim() == 4:
        angles = angles[:, None]  # (B, 1, T, D/2)
    return angles
# --8<-- [end:rope-helpers]


# --8<-- [start:rope]
# Exercise 2: rotary position embedding (rotate-half layout)
def apply_rope(x, positions, base=10000.0):
    """Rotate x (..., T, D) by its positions, in the rotate-half layout of Llama / Hugging Face.

    Dimension i is paired with i + D/2 (i < D/2), and the pair at position m is rotated by
    the angle m * theta_i with theta_i = base ** (-2i / D) (use rope_inv_freq):
        out_i       = x_i cos(m theta_i) - x_{i+D/2} sin(m theta_i)
        out_{i+D/2} = x_i sin(m theta_i) + x_{i+D/2} cos(m theta_i)
    i.e. out = x * cos + rotate_half(x) * sin with cos, sin repeated over both halves.
    positions: integers, (T,) or (B, T) for x of shape (B, H, T, D). Returns x's shape and dtype.
    """
    _rope_check(x, positions)
    angles = rope_angles(positions, x.shape[-1], base, _angle_dtype(x))  # (T, D/2) or (B, T, D/2)
    angles = _broadcast_angles(angles, x)  # (..., T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, D): both halves share theta_i
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin
# --8<-- [end:rope]


# --8<-- [start:rope-interleaved]
def apply_rope_interleaved(x, positions, base=10000.0):
    """RoPE in the interleaved layout of the paper and Meta's original Llama code.

    Dimension 2i is paired with 2i + 1 and rotated by m * theta_i: each pair is one complex
    number multiplied by exp(i m theta_i). Same shapes as apply_rope.
    """
    _rope_check(x, positions)
    angles = rope_angles(positions, x.shape[-1], base, _angle_dtype(x))  # (T, D/2) or (B, T, D/2)
    angles = _broadcast_angles(angles, x)  # (..., T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # (..., T, D/2) each
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)  # (..., T, D/2, 2) -> (..., T, D), pairs back side by side


def interleaved_to_half_permutation(head_dim):
    """Index perm with x_half = x_interleaved[..., perm]: evens first, then odds.

    It moves pair (2i, 2i+1) to (i, i + D/2), so for every x and positions
        apply_rope(x[..., perm], pos) == apply_rope_interleaved(x, pos)[..., perm].
    Permuting the rows of W_q and W_k this way converts a checkpoint from one layout to the
    other; attention scores are unchanged because q . k is unchanged when q and k are
    permuted alike.
    """
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
# --8<-- [end:rope-interleaved]


# --8<-- [start:rope-module]
class RotaryEmbedding(nn.Module):
    """Rotates queries or keys (B, H, T, D) by their positions; no parameters.

    Call it on q and on k with the same positions. With a KV cache, pass the absolute
    positions of the new tokens (offset=number of cached tokens, or explicit position ids):
    the cached keys were rotated when they were made and are never rotated again.
    """

    def __init__(self, head_dim, base=10000.0, interleaved=False):
        super().__init__()
        rope_inv_freq(head_dim)  # validates head_dim early
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved
        self._table = None  # (cos, signed sin), each (max_len, D): see cos_sin

    def forward(self, x, positions=None, offset=0):  # x (B, H, T, D); positions (T,) or (B, T)
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"RotaryEmbedding was built for head_dim={self.head_dim}, got {x.shape[-1]}")
        pos = resolve_positions(x.shape[-2], positions, offset, x.device)
        if self.interleaved:
            return apply_rope_interleaved(x, pos, self.base)
        cos, sin = self.cos_sin(x, pos, offset + x.shape[-2] if positions is None else None)
        # apply_rope's x * cos + rotate_half(x) * sin in 3 operations instead of 6:
        # rotate_half(x) * sin == roll(x) * (-sin, sin), with the signs kept in the table
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, dims=-1), sin)

    def cos_sin(self, x, pos, length=None):
        """cos and signed sin (-sin on the first half) at pos, (..., T, D), from a table.

        Every layer rotates q and k at every step by the same angles; recomputing them, as
        apply_rope does, made training about 10% slower. length: one past the largest
        position, when known without reading pos (a GPU would wait for pos.max())."""
        length = int(pos.max()) + 1 if length is None else length
        cos, sin = self._table if self._table is not None else (None, None)
        if cos is None or len(cos) < length or cos.device != x.device or cos.dtype != x.dtype:
            size = max(length, 2 * len(cos) if cos is not None else 0)  # grow by doubling
            angles = rope_angles(torch.arange(size, device=x.device), self.head_dim, self.base,
                                 _angle_dtype(x))  # (size, D/2)
            angles = torch.cat((angles, angles), dim=-1)  # (size, D): both halves share theta_i
            sin = angles.sin()
            sin[:, : self.head_dim // 2].neg_()  # rotate_half's minus sign
            cos, sin = angles.cos().to(x.dtype), sin.to(x.dtype)
            self._table = cos, sin
        return _broadcast_angles(cos[pos], x), _broadcast_angles(sin[pos], x)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"
# --8<-- [end:rope-module]


# --8<-- [start:alibi]
# Exercise 3: ALiBi slopes
def alibi_slopes(n_head):
    """The per-head slopes of ALiBi, a float32 tensor (n_head,).

    For n heads, n a power of two: the geometric sequence 2**(-8/n), 2**(-16/n), ...,
    2**(-8), whose first term and ratio are both 2**(-8/n); for 8 heads 1/2, 1/4, ..., 1/256.
    Otherwise, with c the largest power of two below n_head: the c slopes of c heads, then
    every other slope of 2c heads (slopes(2c)[0::2]), as many as are still missing. This is
    the rule of the authors' code (Press et al., 2022).
    """
    if n_head < 1:
        raise ValueError(f"n_head must be positive, got {n_head}")

    def power_of_two_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(closest)
    if closest != n_head:  # interleave in the slopes that 2 * closest heads would get
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)
# --8<-- [end:alibi]


# --8<-- [start:alibi-bias]
def alibi_bias(n_head, q_len, k_len=None, device=None, dtype=torch.float32):
    """The ALiBi bias (n_head, q_len, k_len) to add to attention scores.

    bias[h, i, j] = -slope_h * |pos_i - j|, where the queries are the LAST q_len of the
    k_len positions (pos_i = k_len - q_len + i), as in generation with a KV cache. On the
    causal part (j <= pos_i) this is slope_h * (j - pos_i), the paper's bias; the symmetric
    |.| is a common choice for bidirectional attention, where the paper defines nothing.
    """
    k_len = q_len if k_len is None else k_len
    if q_len > k_len:
        raise ValueError(f"q_len ({q_len}) cannot exceed k_len ({k_len})")
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    distance = (q_pos - k_pos).abs().to(dtype)  # (Tq, Tk)
    slopes = alibi_slopes(n_head).to(device=device, dtype=dtype)  # (H,)
    return -slopes[:, None, None] * distance  # (H, Tq, Tk)
# --8<-- [end:alibi-bias]


# ---------------------------------------------------------------------------------------
# The experiment: one tiny model, five ways to know positions
# ---------------------------------------------------------------------------------------

# --8<-- [start:tiny-model]
ENCODINGS = ("none", "learned", "sinusoidal", "rope", "alibi")


class TinyAttentionLayer(nn.Module):
    """A pre-norm Transformer layer: x + attn(ln(x)), then x + mlp(ln(x)) (Chapter 5 builds one).

    Causal attention with PyTorch's kernel. rope / alibi switch on those encodings.
    """

    def __init__(self, d_model, n_head, rope=False, alibi=False):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.rope = RotaryEmbedding(self.head_dim) if rope else None
        self.alibi = alibi

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for t in (q, k, v))
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if self.alibi:  # ALiBi bias plus the causal mask, as one additive tensor
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            bias = alibi_bias(self.n_head, T, device=x.device).masked_fill(~causal, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyPositionModel(nn.Module):
    """Token embedding, one positional encoding, n_layer causal layers, a linear read-out."""

    def __init__(self, encoding, vocab_size, d_model=32, n_head=4, n_layer=2, max_positions=256):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.encoding = encoding
        self.embed = TokenEmbedding(vocab_size, d_model)
        self.add_positions = {
            "learned": LearnedPositionalEmbedding(max_positions, d_model),
            "sinusoidal": SinusoidalPositionalEncoding(d_model, max_positions),
        }.get(encoding)
        self.layers = nn.ModuleList(
            TinyAttentionLayer(d_model, n_head, rope=encoding == "rope", alibi=encoding == "alibi")
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, ids):  # (B, T) -> logits (B, T, V)
        x = self.embed(ids)
        if self.add_positions is not None:
            x = self.add_positions(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))
# --8<-- [end:tiny-model]


# --8<-- [start:experiment]
def make_batch(task, batch_size, n, n_symbols, generator=None, device=None, lag=3):
    """A batch of `task` examples with n symbols each: inputs (B, T) and targets (B, T).

    "shift": the sequence x_1..x_n (T = n); the answer at position t is x_{t-lag}, the token
             `lag` steps back: position relative to the current token is all that matters.
    "copy", "reverse": x_1..x_n SEP y_1..y_n (T = 2n), y = x or x reversed; after SEP the
             model must write y. The answer at position t depends on where SEP is.
    Symbols are 1..n_symbols, SEP is 0; targets are -100 (ignored by cross_entropy) where
    there is nothing to answer.
    """
    x = torch.randint(1, n_symbols + 1, (batch_size, n), generator=generator)
    if task == "shift":
        targets = torch.full_like(x, -100)
        targets[:, lag:] = x[:, :-lag] if lag else x
        return x.to(device), targets.to(device)
    if task not in ("copy", "reverse"):
        raise ValueError(f"unknown task {task!r}: use 'shift', 'copy' or 'reverse'")
    y = x if task == "copy" else x.flip(1)
    sep = torch.zeros(batch_size, 1, dtype=torch.long)
    seq = torch.cat((x, sep, y), dim=1)  # (B, 2n + 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()  # predict the next token
    targets[:, :n] = -100  # predicting x_2..x_n and SEP is not the task
    return inputs.to(device), targets.to(device)


def train_position_model(encoding, task="shift", train_max_n=16, steps=200, n_symbols=16,
                         batch_size=64, lr=1e-2, seed=0, losses=None, stop_after=None,
                         **model_kwargs):
    """Train a TinyPositionModel on task with n drawn from 1..train_max_n; return it.

    losses: a list that receives the training loss of every step. stop_after ends the run
    after that many steps (the learning-rate schedule is still that of `steps`)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyPositionModel(encoding, n_symbols + 1, **model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        min_n = 4 if task == "shift" else 1  # shift needs n > lag = 3 to have any answer
        n = int(torch.randint(min_n, train_max_n + 1, (1,), generator=gen))
        inputs, targets = make_batch(task, batch_size, n, n_symbols, gen)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if losses is not None:
            losses.append(loss.item())
        if step == stop_after:
            break
    return model


@torch.no_grad()
def accuracy_by_length(model, task, lengths, n_symbols=16, n_samples=256, seed=1234):
    """Fraction of answer tokens predicted right (teacher forcing), for each n in lengths."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    accs = []
    for n in lengths:
        inputs, targets = make_batch(task, n_samples, n, n_symbols, gen)
        pred = model(inputs).argmax(-1)
        answer = targets != -100
        accs.append((pred[answer] == targets[answer]).float().mean().item())
    return accs
# --8<-- [end:experiment]


# --8<-- [start:run-experiment]
def run_position_experiment(encodings=ENCODINGS, task="shift", train_max_n=16,
                            test_lengths=range(4, 49, 4), steps=200, seed=0, losses=None):
    """Train one tiny model per encoding on lengths <= train_max_n; test on test_lengths.

    Returns {encoding: [accuracy for each test length]}; losses (a dict) receives
    {encoding: [training loss of each step]}. About 2-4 s per encoding on 2 cores.
    """
    results = {}
    for encoding in encodings:
        curve = losses.setdefault(encoding, []) if losses is not None else None
        model = train_position_model(encoding, task, train_max_n, steps, seed=seed, losses=curve)
        results[encoding] = accuracy_by_length(model, task, list(test_lengths))
    return results
# --8<-- [end:run-experiment]


# ---------------------------------------------------------------------------------------
# Stored runs: a figure that needs training draws from a run the book stores in docs/data/
# ---------------------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parent.parent / "docs" / "data"
# writes docs/data/{name}.json
RECORD_COMMAND = ".venv/bin/python tests/benchmarks/figure_data.py {name}"


def stored_run(name):
    """The stored history docs/data/<name>.json that a figure is drawn from."""
    path = DATA_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; write it with {RECORD_COMMAND.format(name=name)}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def position_experiment_history(test_lengths=range(4, 49, 4), steps=200, seed=0):
    """The experiment of section 3.8 as stored for its figure: accuracy by test length and
    the training loss of every step, for each encoding (about a minute on 2 cores)."""
    losses = {}
    accuracy = run_position_experiment(
        test_lengths=test_lengths, steps=steps, seed=seed, losses=losses
    )
    return {"task": "shift", "train_max_n": 16, "steps": steps, "seed": seed,
            "lengths": list(test_lengths), "accuracy": accuracy, "losses": losses}


# ---------------------------------------------------------------------------------------
# Figures (drawn at build time; matplotlib is imported only here)
# ---------------------------------------------------------------------------------------


def plot_sinusoidal_table():
    """The sinusoidal table (positions x dimensions) and a few of its columns."""
    import matplotlib.pyplot as plt

    table = sinusoidal_table(128, 64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax1.imshow(table.T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, origin="lower")
    ax1.set(xlabel="position p", ylabel="dimension", title="PE[p, :] for d_model = 64")
    fig.colorbar(im, ax=ax1)
    for dim in (0, 2, 10, 30):
        wavelength = 2 * math.pi * 10000 ** (dim / 64)
        ax2.plot(table[:, dim], label=f"dim {dim} (sin, wavelength {wavelength:.0f})")
    ax2.set(xlabel="position p", title="some columns: geometric wavelengths")
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_sinusoidal_similarity():
    """PE(p) . PE(p + k) against the distance k: the same curve for every p."""
    import matplotlib.pyplot as plt

    table = sinusoidal_table(512, 128)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for p, style in ((0, "-"), (100, "--"), (300, ":")):
        k = torch.arange(-p, 512 - p)
        ax.plot(k, table[p + k] @ table[p], style, lw=1.5, label=f"p = {p}")
    ax.set(xlabel="distance k", ylabel="PE(p) . PE(p+k)", xlim=(-120, 200),
           title="Sinusoidal encodings (d_model 128): similarity vs distance, any p")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_rope_decay():
    """RoPE: the score of a query and key with all-ones content, against their distance."""
    import matplotlib.pyplot as plt

    head_dim, n = 64, 1024
    q = torch.ones(1, head_dim)
    k = torch.ones(n, head_dim)
    q_rot = apply_rope(q, torch.tensor([n - 1]))  # the query sits at the last position
    k_rot = apply_rope(k, torch.arange(n))
    scores = (k_rot @ q_rot[0]).flip(0)  # index = distance n - 1 - j
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(scores, lw=1)
    ax.set(xlabel="distance m - n", ylabel="q . k after RoPE", xscale="symlog",
           title="RoPE: same content, score falls off (unevenly) with distance (head_dim 64)")
    fig.tight_layout()
    return fig


def plot_alibi_bias():
    """The ALiBi bias of 4 of 8 heads on a causal 12 x 12 score matrix."""
    import matplotlib.pyplot as plt

    n_head, T = 8, 12
    bias = alibi_bias(n_head, T)
    bias = bias.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("nan"))
    slopes = alibi_slopes(n_head)
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2), layout="constrained")
    for ax, h in zip(axes, (0, 1, 3, 7)):
        im = ax.imshow(bias[h].numpy(), cmap="viridis", vmin=-6, vmax=0)
        ax.set(title=f"head {h}, slope 1/{1 / slopes[h]:.0f}", xlabel="key j",
               xticks=range(0, T, 3), yticks=range(0, T, 3))
    axes[0].set_ylabel("query i")
    fig.colorbar(im, ax=axes, shrink=0.8, label="bias (masked: blank)")
    return fig


def plot_position_experiment(run=None):
    """Accuracy by sequence length of the five tiny models: the stored run of the experiment,
    or `run`, a position_experiment_history()."""
    import matplotlib.pyplot as plt

    run = run or stored_run("ch03_embeddings.position_experiment")
    lengths = run["lengths"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for encoding, accs in run["accuracy"].items():
        ax.plot(lengths, accs, marker="o", ms=3, label=encoding)
    ax.axvspan(0, 16, color="0.9", zorder=0, label="lengths seen in training")
    n = torch.arange(17, 49)  # right up to position 15, wrong after: 13 of n - 3 answers
    ax.plot(n, 13 / (n - 3), color="0.4", ls="--", lw=1, label="right only at positions < 16")
    ax.axhline(1 / 16, color="0.5", ls=":", lw=1, label="chance (1/16)")
    ax.set(xlabel="sequence length", ylabel="accuracy", xlim=(0, 49), ylim=(0, 1.02),
           title="Shift task (output the token 3 back): trained on length <= 16")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
