"""Chapter 4: attention, from a soft dictionary lookup to multi-head attention.

- softmax in its numerically stable form, causal and padding masks;
- scaled dot-product attention, softmax(q k^T / sqrt(d_k) + mask) v, with its backward pass
  derived by hand (the softmax Jacobian) and a blockwise "online softmax" version, the idea
  behind flash attention, that never stores the (T, T) matrix;
- MultiHeadAttention with grouped-query / multi-query attention (n_kv_head), self- and
  cross-attention, causal and padding masks, additive biases (ALiBi), rotary embeddings
  (RoPE) and a switch to PyTorch's fused kernel.

Shapes: B batch, T / Tq / Tk sequence lengths, C model width, H query heads, Hkv key/value
heads, D head width (C = H * D).

Needs: ch03_embeddings.
"""

import math
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03_embeddings import RotaryEmbedding, alibi_bias


# --8<-- [start:softmax]
# Exercise 1: numerically stable softmax
def softmax(scores, dim=-1):
    """softmax along dim, computed as exp(s - max(s)) / sum(exp(s - max(s))).

    Subtracting the row maximum changes nothing mathematically (it cancels in the ratio)
    but keeps exp() from overflowing: the largest exponent becomes exp(0) = 1.
    A row that is entirely -inf (a query allowed to see no key at all) must give zeros,
    not NaN, as PyTorch's scaled_dot_product_attention does.
    """
    row_max = scores.amax(dim=dim, keepdim=True).detach()  # softmax does not depend on it
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=dim, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))  # all -inf rows: 0 / 1
# --8<-- [end:softmax]


# --8<-- [start:causal-mask]
# Exercise 2: causal mask
def causal_mask(q_len, k_len=None, device=None):
    """Boolean (q_len, k_len) mask, True where query i may attend to key j.

    The queries are the LAST q_len of the k_len positions (as when a KV cache holds
    k_len - q_len earlier tokens), so query i sits at position i + k_len - q_len and may see
    keys j <= i + k_len - q_len. With q_len == k_len this is the lower triangle.
    """
    k_len = q_len if k_len is None else k_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
# --8<-- [end:causal-mask]


# --8<-- [start:masks]
def padding_to_attn_mask(padding_mask):
    """(B, Tk) bool, True for real tokens -> (B, 1, 1, Tk), broadcastable to (B, H, Tq, Tk)."""
    return padding_mask[:, None, None, :]


def merge_masks(*masks, dtype=torch.float32):
    """Combine boolean masks (True = may attend) and additive float biases into one mask.

    None entries are skipped. Booleans alone are and-ed and stay boolean; as soon as a
    float bias is present, everything becomes one additive float mask (-inf = masked).
    """
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out
    out = torch.zeros((), dtype=dtype, device=masks[0].device)
    for m in masks:
        out = out.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else out + m.to(dtype)
    return out
# --8<-- [end:masks]


# --8<-- [start:checks]
def check_qkv(q, k, v):
    """Raise ValueError unless q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) fit together."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k, v must be (..., T, D) with the same number of dims; got {shapes}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dimension D; got {shapes}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same length and leading dims; got {shapes}")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch/head dimensions of q and k do not match; got {shapes}") from None


def check_mask(mask, scores_shape):
    """Raise unless mask is bool or float and broadcasts to the scores (..., Tq, Tk)."""
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(
            f"attn_mask must be bool (True = attend) or an additive float, got {mask.dtype}")
    try:
        if torch.broadcast_shapes(mask.shape, scores_shape) != torch.Size(scores_shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention "
            f"scores (..., Tq, Tk) = {tuple(scores_shape)}"
        ) from None
# --8<-- [end:checks]


# --8<-- [start:sdpa]
def attention_weights(q, k, attn_mask=None, is_causal=False, scale=None):
    """softmax(q k^T * scale + mask): q (..., Tq, D), k (..., Tk, D) -> (..., Tq, Tk).

    attn_mask: bool (True = may attend) or an additive float bias such as ALiBi,
    broadcastable to (..., Tq, Tk). scale defaults to 1 / sqrt(D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Tq, D) @ (..., D, Tk) -> (..., Tq, Tk)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if attn_mask is not None:
        check_mask(attn_mask, scores.shape)
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return softmax(scores, dim=-1)


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None):
    """Attention(q, k, v) = softmax(q k^T / sqrt(D) + mask) v, from scratch.

    q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) -> (..., Tq, Dv). Same arguments as
    torch.nn.functional.scaled_dot_product_attention, with two differences: is_causal and
    attn_mask may be combined, and when Tq < Tk the causal mask is aligned bottom-right
    (the queries are the last positions, as with a KV cache); PyTorch aligns it top-left.
    Dropout is applied to the attention weights whenever dropout_p > 0.
    """
    check_qkv(q, k, v)
    weights = attention_weights(q, k, attn_mask, is_causal, scale)  # (..., Tq, Tk)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (..., Tq, Tk) @ (..., Tk, Dv) -> (..., Tq, Dv)
# --8<-- [end:sdpa]


# --8<-- [start:backward]
# Exercise 3: the backward pass of attention
def attention_backward(q, k, v, weights, grad_out, scale):
    """Gradients of O = P v, P = softmax(S), S = scale * q k^T, given dL/dO; returns (dq, dk, dv).

    q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv), weights P (..., Tq, Tk), grad_out
    (..., Tq, Dv). Derivation (one row of P at a time):
        dv = P^T dO                  dP = dO v^T
        dS = P * (dP - sum_j(P * dP))   (the softmax Jacobian diag(p) - p p^T applied to dP)
        dq = scale * dS k            dk = scale * dS^T q
    Masked entries have P = 0, so they get dS = 0: the mask needs no extra work.
    """
    grad_v = weights.transpose(-2, -1) @ grad_out  # (..., Tk, Tq) @ (..., Tq, Dv)
    grad_p = grad_out @ v.transpose(-2, -1)  # (..., Tq, Dv) @ (..., Dv, Tk)
    grad_s = weights * (grad_p - (weights * grad_p).sum(dim=-1, keepdim=True))  # (..., Tq, Tk)
    grad_q = scale * grad_s @ k  # (..., Tq, D)
    grad_k = scale * grad_s.transpose(-2, -1) @ q  # (..., Tk, D)
    return grad_q, grad_k, grad_v
# --8<-- [end:backward]


# --8<-- [start:manual-autograd]
class _AttentionFunction(torch.autograd.Function):
    """Attention whose backward is attention_backward instead of autograd's own."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale):
        weights = attention_weights(q, k, attn_mask, is_causal, scale)
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = scale
        return weights @ v

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weights = ctx.saved_tensors
        grad_q, grad_k, grad_v = attention_backward(q, k, v, weights, grad_out, ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None  # no gradient for mask, flag, scale


def attention_manual_backward(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """scaled_dot_product_attention (without dropout) using the hand-derived backward."""
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _AttentionFunction.apply(q, k, v, attn_mask, is_causal, scale)
# --8<-- [end:manual-autograd]


# --8<-- [start:blockwise]
# Exercise 4: blockwise attention with an online softmax
def blockwise_attention(q, k, v, block_size=64, is_causal=False, scale=None):
    """scaled_dot_product_attention computed one block of keys at a time (flash attention's idea).

    q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) -> (..., Tq, Dv), equal to the plain
    version up to rounding, but the largest score tensor is (..., Tq, block_size), never
    (..., Tq, Tk). Keep per query a running maximum m, a running sum l of exp(s - m) and a
    running output acc = sum exp(s - m) v. A new block with scores s_b updates them:
        m' = max(m, max(s_b));  c = exp(m - m')   (rescales what was summed with the old m)
        l' = c l + sum exp(s_b - m');  acc' = c acc + exp(s_b - m') v_b
    and at the end out = acc / l. is_causal aligns the mask bottom-right, as causal_mask does.
    """
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_len, k_len = q.shape[-2], k.shape[-2]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    m = q.new_full((*lead, q_len, 1), float("-inf"))  # running max
    l = q.new_zeros((*lead, q_len, 1))  # running sum of exponentials
    acc = q.new_zeros((*lead, q_len, v.shape[-1]))  # running weighted sum of values
    q_pos = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)  # (Tq, 1)
    for start in range(0, k_len, block_size):
        k_blk, v_blk = k[..., start:start + block_size, :], v[..., start:start + block_size, :]
        s = (q @ k_blk.transpose(-2, -1)) * scale  # (..., Tq, blk)
        if is_causal:
            k_pos = torch.arange(start, start + k_blk.shape[-2], device=q.device)[None, :]
            s = s.masked_fill(k_pos > q_pos, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # rows that have seen only masked keys so far keep m = -inf; exponentiate against 0
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        correction = torch.exp(m - m_safe)  # exp(-inf) = 0 on the first block
        p = torch.exp(s - m_safe)  # (..., Tq, blk)
        l = correction * l + p.sum(dim=-1, keepdim=True)
        acc = correction * acc + p @ v_blk
        m = m_new
    return acc / torch.where(l > 0, l, torch.ones_like(l))
# --8<-- [end:blockwise]


# --8<-- [start:repeat-kv]
def repeat_kv(x, n_rep):
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): key/value head g serves query heads
    g * n_rep ... g * n_rep + n_rep - 1 (the layout of Llama and Hugging Face's repeat_kv)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)
# --8<-- [end:repeat-kv]


# --8<-- [start:mha]
class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query attention, masks, ALiBi and RoPE.

    Weights: q_proj (C -> H*D), k_proj and v_proj (C -> Hkv*D), out_proj (H*D -> C), four
    separate nn.Linear layers (the layout of Hugging Face's Llama; GPT-2's fused c_attn and
    torch.nn.MultiheadAttention's in_proj are split by load_fused_qkv).
    n_kv_head: None or n_head = multi-head attention, 1 = multi-query, in between = grouped-query.
    dropout: on the attention weights, in training mode only.
    rope: rotate q and k with RotaryEmbedding(D, rope_base, rope_interleaved) (self-attention only).
    alibi: add the ALiBi bias of Chapter 3 to the scores (self-attention only).
    use_fused: compute attention with torch.nn.functional.scaled_dot_product_attention.
    """

    def __init__(self, d_model, n_head, n_kv_head=None, bias=True, dropout=0.0, rope=False,
                 rope_base=10000.0, rope_interleaved=False, alibi=False, use_fused=False):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.d_model, self.n_head, self.n_kv_head = d_model, n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.dropout, self.use_fused, self.alibi = dropout, use_fused, alibi
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base, rope_interleaved) if rope else None

    def split_heads(self, x, n_head):  # (B, T, n_head * D) -> (B, n_head, T, D)
        B, T, _ = x.shape
        return x.view(B, T, n_head, self.head_dim).transpose(1, 2)

    def merge_heads(self, x):  # (B, H, T, D) -> (B, T, H * D): concatenate the heads
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x, kv=None, *, causal=False, padding_mask=None, attn_mask=None,
                positions=None, kv_cache=None, need_weights=False):
        """x (B, Tq, C) -> (B, Tq, C); with need_weights, also the weights (B, H, Tq, Tk).

        kv: (B, Tk, C), the source of keys and values for cross-attention (None: x itself).
        causal: query i sees keys up to its own position (bottom-right aligned when Tk > Tq).
        padding_mask: (B, Tk) bool, True for real tokens, False for padding (never attended);
            with a kv_cache it covers all keys, the cached ones included.
        attn_mask: bool (True = may attend) or additive float, broadcastable to (B, H, Tq, Tk).
        positions: (Tq,) or (B, Tq) integer positions of the queries, for RoPE; default
            past, ..., past + Tq - 1 with past = kv_cache.seq_len (0 without a cache).
        kv_cache: any object with an int seq_len and update(k, v) -> (all_k, all_v); it gets
            this call's keys (already rotated) and values (B, Hkv, Tq, D) and returns all of them.
        """
        self._check_inputs(x, kv)
        B, Tq, _ = x.shape
        source = x if kv is None else kv
        q = self.split_heads(self.q_proj(x), self.n_head)  # (B, H, Tq, D)
        k = self.split_heads(self.k_proj(source), self.n_kv_head)  # (B, Hkv, Tk, D)
        v = self.split_heads(self.v_proj(source), self.n_kv_head)  # (B, Hkv, Tk, D)

        if self.rope is not None:  # rotate by absolute position; cached keys were rotated before
            offset = kv_cache.seq_len if kv_cache is not None and positions is None else 0
            q, k = self.rope(q, positions, offset), self.rope(k, positions, offset)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, Hkv, Tk, D) with Tk = past + Tq
        Tk = k.shape[-2]
        self._check_masks(padding_mask, attn_mask, (B, self.n_head, Tq, Tk))

        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, Tk, D): kv head g serves a group
        fused = self.use_fused and not need_weights
        # PyTorch's kernel takes is_causal only without another mask, and aligns it top-left.
        fused_causal = (fused and causal and Tq == Tk and padding_mask is None
                        and attn_mask is None and not self.alibi)
        mask = merge_masks(
            causal_mask(Tq, Tk, x.device) if causal and not fused_causal else None,
            padding_to_attn_mask(padding_mask) if padding_mask is not None else None,  # (B,1,1,Tk)
            attn_mask,
            alibi_bias(self.n_head, Tq, Tk, x.device, q.dtype) if self.alibi else None,  # H,Tq,Tk
            dtype=q.dtype,
        )
        dropout_p = self.dropout if self.training else 0.0
        if fused:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=fused_causal)
            weights = None
        else:
            weights = attention_weights(q, k, mask)  # (B, H, Tq, Tk)
            y = F.dropout(weights, dropout_p, training=self.training) @ v  # (B, H, Tq, D)
        y = self.out_proj(self.merge_heads(y))  # (B, Tq, C)
        return (y, weights) if need_weights else y

    def _check_inputs(self, x, kv):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        if kv is not None:
            if kv.dim() != 3 or kv.shape[0] != x.shape[0] or kv.shape[-1] != self.d_model:
                raise ValueError(
                    f"kv must have shape (B={x.shape[0]}, Tk, d_model={self.d_model}), "
                    f"got {tuple(kv.shape)}"
                )
            if self.rope is not None or self.alibi:
                raise ValueError("RoPE and ALiBi encode positions within one sequence: use "
                                 "them for self-attention only (kv=None)")

    def _check_masks(self, padding_mask, attn_mask, scores_shape):
        B, _, _, Tk = scores_shape
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool:
                raise TypeError(f"padding_mask must be bool (True = real token), got "
                                f"{padding_mask.dtype}; use mask.bool() for a 0/1 mask")
            if padding_mask.shape != (B, Tk):
                raise ValueError(f"padding_mask must have shape (B, Tk) = {(B, Tk)} (all keys, "
                                 f"cached ones included), got {tuple(padding_mask.shape)}")
        if attn_mask is not None:
            check_mask(attn_mask, scores_shape)

    @torch.no_grad()
    def load_fused_qkv(self, weight, bias=None):
        """Copy a fused (3C, C) in-projection [W_q; W_k; W_v] into q_proj, k_proj, v_proj.

        torch.nn.MultiheadAttention's in_proj_weight has this layout; GPT-2's Conv1D c_attn
        stores the transpose, so pass c_attn.weight.T and c_attn.bias.
        """
        if self.n_kv_head != self.n_head:
            raise ValueError("a fused [q; k; v] projection has as many key/value heads as "
                             "query heads (n_kv_head == n_head)")
        if weight.shape != (3 * self.d_model, self.d_model):
            raise ValueError(f"expected weight of shape {(3 * self.d_model, self.d_model)}, "
                             f"got {tuple(weight.shape)}")
        for proj, w in zip((self.q_proj, self.k_proj, self.v_proj), weight.chunk(3, dim=0)):
            proj.weight.copy_(w)
        if bias is not None:
            for proj, b in zip((self.q_proj, self.k_proj, self.v_proj), bias.chunk(3, dim=0)):
                proj.bias.copy_(b)

    def extra_repr(self):
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}"
# --8<-- [end:mha]


# ---------------------------------------------------------------------------------------
# A tiny trained example, the cost of attention, and the figures
# ---------------------------------------------------------------------------------------

# --8<-- [start:reversal]
class ReversalModel(nn.Module):
    """Learns to reverse a sequence with ONE attention layer: output i = input T-1-i.

    Token embedding plus learned positions (Chapter 3), MultiHeadAttention, a read-out. No
    residual connection, so everything the output knows must come through attention.
    """

    def __init__(self, n_symbols, length, d_model=32, n_head=1):
        super().__init__()
        from ch03_embeddings import LearnedPositionalEmbedding, TokenEmbedding

        self.embed = TokenEmbedding(n_symbols, d_model)
        self.positions = LearnedPositionalEmbedding(length, d_model)
        self.attn = MultiHeadAttention(d_model, n_head)
        self.head = nn.Linear(d_model, n_symbols)

    def forward(self, ids):  # (B, T) -> logits (B, T, V), weights (B, H, T, T)
        x = self.positions(self.embed(ids))
        y, weights = self.attn(x, need_weights=True)
        return self.head(y), weights


def train_reversal_model(length=8, n_symbols=10, steps=300, batch_size=64, lr=1e-2, seed=0):
    """Train a ReversalModel on random sequences; return it (about a second on a CPU)."""
    torch.manual_seed(seed)
    model = ReversalModel(n_symbols, length)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = torch.randint(0, n_symbols, (batch_size, length))
        logits, _ = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flip(1).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model
# --8<-- [end:reversal]


# --8<-- [start:cost]
def best_time(fn, repeats=3):
    """The fastest of `repeats` runs of fn(), in seconds (the least disturbed by other work)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def measure_attention_cost(seq_lens=(128, 256, 512, 1024, 2048), n_head=4, head_dim=32,
                           repeats=3, block_size=128):
    """Forward time of three attentions, and the size of the score tensor each keeps, per length.

    Returns a dict of lists: seq_len, ours_s (scaled_dot_product_attention), blockwise_s,
    fused_s (PyTorch's kernel), and ours_bytes / blockwise_bytes: bytes of the largest score
    tensor each one materialises, read off the real tensors: (1, H, T, T) against (1, H, T, block).
    """
    keys = ("seq_len", "ours_s", "blockwise_s", "fused_s", "ours_bytes", "blockwise_bytes")
    out = {key: [] for key in keys}
    for T in seq_lens:
        q, k, v = (torch.randn(1, n_head, T, head_dim) for _ in range(3))
        out["seq_len"].append(T)
        runs = {"ours_s": partial(scaled_dot_product_attention, q, k, v, is_causal=True),
                "blockwise_s": partial(blockwise_attention, q, k, v, block_size, is_causal=True),
                "fused_s": partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)}
        for key, run in runs.items():
            out[key].append(best_time(run, repeats))
        weights = attention_weights(q, k, is_causal=True)
        block_scores = q @ k[..., :block_size, :].transpose(-2, -1)
        out["ours_bytes"].append(weights.numel() * weights.element_size())
        out["blockwise_bytes"].append(block_scores.numel() * block_scores.element_size())
    return out
# --8<-- [end:cost]


def plot_scaling():
    """Why 1/sqrt(d_k): spread of q.k, and how peaked softmax gets, with and without it."""
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    dims = [4, 16, 64, 256, 1024]
    raw_std, max_raw, max_scaled = [], [], []
    for d in dims:
        q = torch.randn(2000, d, generator=gen)
        k = torch.randn(2000, 16, d, generator=gen)  # 16 keys per query
        scores = (k @ q[:, :, None])[..., 0]  # (2000, 16)
        raw_std.append(scores.std().item())
        max_raw.append(softmax(scores).amax(-1).mean().item())
        max_scaled.append(softmax(scores / math.sqrt(d)).amax(-1).mean().item())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(dims, raw_std, "o-", label="std of q . k (measured)")
    ax1.plot(dims, [math.sqrt(d) for d in dims], "k--", lw=1, label="sqrt(d_k) (derived)")
    ax1.set(xscale="log", yscale="log", xlabel="d_k", title="q, k with N(0, 1) entries")
    ax1.legend()
    ax2.plot(dims, max_raw, "o-", label="softmax(q . k)")
    ax2.plot(dims, max_scaled, "o-", label="softmax(q . k / sqrt(d_k))")
    ax2.axhline(1 / 16, color="0.5", ls=":", label="uniform over 16 keys")
    ax2.set(xscale="log", xlabel="d_k", ylabel="mean of the largest weight", ylim=(0, 1.05),
            title="Without scaling, softmax becomes one-hot")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_attention_cost():
    """Time (log-log) and score-tensor memory of attention against sequence length, on this CPU."""
    import matplotlib.pyplot as plt

    cost = measure_attention_cost()
    T = cost["seq_len"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(T, cost["ours_s"], "o-", label="ours (full T x T matrix)")
    ax1.plot(T, cost["blockwise_s"], "o-", label="ours, blockwise (online softmax)")
    ax1.plot(T, cost["fused_s"], "o-", label="PyTorch fused kernel")
    quadratic = [cost["ours_s"][-1] * (t / T[-1]) ** 2 for t in T]
    ax1.plot(T, quadratic, "k--", lw=1, label="slope 2 (T^2)")
    ax1.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="seconds (forward)",
            title="Causal attention, 4 heads of 32 dims")
    ax1.legend(fontsize=8)
    ax2.plot(T, [b / 2**20 for b in cost["ours_bytes"]], "o-", label="weights (1, H, T, T)")
    ax2.plot(T, [b / 2**20 for b in cost["blockwise_bytes"]], "o-", label="a block (1, H, T, 128)")
    ax2.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="MiB",
            title="Largest score tensor")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(T, [str(t) for t in T], minor=False)
        ax.minorticks_off()
    fig.tight_layout()
    return fig


def plot_attention_heatmaps():
    """Attention weights: a trained one-layer reversal model, and causal + padding masks."""
    import matplotlib.pyplot as plt

    model = train_reversal_model()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        _, trained = model(ids)
        torch.manual_seed(0)
        mha = MultiHeadAttention(16, 1)
        x = torch.randn(1, 8, 16)
        padding = torch.tensor([[True] * 6 + [False] * 2])  # the last two tokens are padding
        _, masked = mha(x, causal=True, padding_mask=padding, need_weights=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
    for ax, w, title in ((axes[0], trained, "trained to reverse 8 tokens"),
                         (axes[1], masked, "causal mask + 2 padding tokens (random weights)")):
        im = ax.imshow(w[0, 0].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set(title=title, xlabel="key position j", ylabel="query position i",
               xticks=range(8), yticks=range(8))
    axes[0].set_xticklabels([f"{j}\n'{t}'" for j, t in enumerate(ids[0].tolist())])
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
    return fig
