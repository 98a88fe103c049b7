"""Chapter 9: generating text.

At every step a language model gives a distribution over the next token; generating text is
choosing from it, again and again. This module builds:

- the decoding rules: greedy, temperature, top-k, top-p (nucleus), repetition penalty, the
  order in which they combine, sampling with a seeded generator, stopping on an end token or
  a stop string, and beam search with length normalisation;
- the KV cache: per-layer key/value buffers allocated once and written in place, so that each
  new token costs one token's forward pass instead of the whole sequence's; for the GPT of
  Chapter 6 (with a sliding window when the context fills) and for the decoder of Chapter
  7's encoder-decoder (whose cross-attention keys and values are computed once);
- batched generation of prompts of different lengths (left padding, positions per row);
- a command-line generator that streams text from a checkpoint of Chapter 8's trainer:

    .venv/bin/python code/ch09_generation.py --out-dir runs/shakespeare \\
        --prompt "ROMEO:" --temperature 0.8

Shapes: B batch, T sequence length, V vocabulary size, H query heads, Hkv key/value heads,
D head width, S source length (encoder-decoder).

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt, ch08_training.
"""

# --8<-- [start:imports]
import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode  # the base of FlopCounterMode

from ch04_attention import repeat_kv
from ch06_gpt import GPT, GPTConfig, flops_per_token
from ch08_training import (load_run_tokenizer, model_from_checkpoint, resolve_device, run_command,
                           run_data_info)
# --8<-- [end:imports]


# ---------------------------------------------------------------------------------------
# Choosing the next token
# ---------------------------------------------------------------------------------------

# --8<-- [start:entropy]
def entropy(logits):
    """Entropy in nats of softmax(logits) over the last dimension: -sum p log p (0 log 0 = 0)."""
    log_p = F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
# --8<-- [end:entropy]


# --8<-- [start:temperature-top-k]
def apply_temperature(logits, temperature):
    """logits / temperature: below 1 sharpens the distribution, above 1 flattens it."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature} (0 means greedy: "
                         "take the argmax instead of dividing by it)")
    return logits / temperature


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th are kept too); -inf elsewhere.

    logits (B, V) -> (B, V). Same rule as Hugging Face's TopKLogitsWarper.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive integer, got {k!r}")
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))
# --8<-- [end:temperature-top-k]


# --8<-- [start:exercise-1]
# Exercise 1: top-p (nucleus) filtering
def top_p_filter(logits, p):
    """Keep, in each row, the smallest set of most probable tokens whose probabilities add up
    to at least p, and set the other logits to -inf. logits (B, V) -> (B, V).

    Sort the probabilities in decreasing order; a token is dropped when the tokens ranked
    before it already reach p (so the most probable token is always kept). p = 1 keeps every
    token. Hints: torch.sort(descending=True), cumsum, then scatter the sorted mask back to
    the original order. Same rule as Hugging Face's TopPLogitsWarper.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked before each one
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))
# --8<-- [end:exercise-1]


# --8<-- [start:exercise-2]
# Exercise 2: repetition penalty
def apply_repetition_penalty(logits, context, penalty, context_mask=None):
    """CTRL's repetition penalty (Keskar et al., 2019): the logit of every token that occurs in
    context (B, L) is divided by penalty where it is positive and multiplied by penalty where
    it is negative, so a penalty > 1 always lowers it. Returns a new (B, V) tensor.

    A token counts once however often it occurs. context_mask (B, L) bool: only the ids where
    it is True count (False marks padding). Hint: mark the ids seen in a (B, V) bool tensor
    with scatter_; send the masked-out ids to an extra column V that you then drop.
    """
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be positive, got {penalty}")
    B, V = logits.shape
    if context_mask is not None:
        context = context.masked_fill(~context_mask, V)  # padding -> the spare column
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, context, True)  # (B, V + 1): True for every id in the row's context
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen[:, :V], penalised, logits)
# --8<-- [end:exercise-2]


# --8<-- [start:process]
def process_logits(logits, context=None, context_mask=None, *, temperature=1.0, top_k=None,
                   top_p=None, repetition_penalty=1.0):
    """The next-token logits (B, V) after every rule, in Hugging Face's order: repetition
    penalty, temperature, top-k, top-p. Only top-p depends on the order (see the chapter)."""
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, context, repetition_penalty, context_mask)
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def sample(logits, generator=None):
    """One token per row drawn from softmax(logits) (B, V) -> (B,).

    generator: a torch.Generator (on the logits' device) for reproducible draws, or a list of
    B generators, one per row, so that a row draws the same tokens whatever else is in the
    batch. None uses PyTorch's global generator.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    if not torch.isfinite(probs).all():  # torch.multinomial's own error would not say why
        raise ValueError(
            "the probabilities to sample from hold NaN or inf: the logits do, or overflowed "
            "(a temperature too close to 0 divides them into inf)"
        )
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(probs):
            raise ValueError(f"got {len(generator)} generators for {len(probs)} rows")
        return torch.cat(
            [torch.multinomial(p[None], 1, generator=g)[:, 0] for p, g in zip(probs, generator)]
        )
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def next_token(logits, context=None, context_mask=None, *, temperature=1.0, top_k=None, top_p=None,
               repetition_penalty=1.0, generator=None):
    """The next token of each row (B,) from the last logits (B, V): the argmax when
    temperature is 0 (greedy: top-k and top-p always keep the argmax), else a sample."""
    if temperature == 0:
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, context, repetition_penalty, context_mask)
        return logits.argmax(dim=-1)
    logits = process_logits(logits, context, context_mask, temperature=temperature, top_k=top_k,
                            top_p=top_p, repetition_penalty=repetition_penalty)
    return sample(logits, generator)
# --8<-- [end:process]


# ---------------------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------------------

# --8<-- [start:kv-cache]
class KVCache:
    """The keys and values of the tokens seen so far, for one attention layer.

    k, v: buffers (B, Hkv, max_len, D) allocated once; their first seq_len positions are
    filled. Chapter 4's MultiHeadAttention calls update() with the new tokens' keys (already
    rotated by RoPE) and values, and attends to what it returns.
    """

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype=torch.float32, device=None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_len = 0

    @property
    def max_len(self):
        return self.k.shape[2]

    @property
    def nbytes(self):
        """Bytes held by the two buffers (allocated for max_len tokens, whatever is filled)."""
        return self.k.nbytes + self.v.nbytes

    # --8<-- [end:kv-cache]
    # --8<-- [start:exercise-3]
    # Exercise 3: the KV cache's update
    def update(self, k, v):
        """Append the keys and values of T new tokens, k and v (B, Hkv, T, D), and return the
        keys and values of all seq_len + T tokens so far, each (B, Hkv, seq_len + T, D).

        Write them in place into self.k and self.v at positions seq_len ... seq_len + T - 1
        (no torch.cat: the buffers were allocated once), advance seq_len, and return views
        (slices) of the buffers. Raise ValueError when the tokens do not fit in max_len.
        """
        start, end = self.seq_len, self.seq_len + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {start} cached + "
                             f"{k.shape[-2]} new do not fit")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.seq_len = end
        return self.k[:, :, :end], self.v[:, :, :end]
    # --8<-- [end:exercise-3]

    # --8<-- [start:kv-cache-rest]
    def reset(self):
        """Forget every token (the buffers stay allocated)."""
        self.seq_len = 0

    def reorder(self, index):
        """Keep the rows index (B,) of the batch, in that order: beam search's surviving beams."""
        n = self.seq_len
        self.k[:, :, :n] = self.k[index, :, :n]
        self.v[:, :, :n] = self.v[index, :, :n]


def make_kv_caches(model, batch_size, max_len=None):
    """One KVCache per block of a Chapter 6 GPT, for batch_size rows of up to max_len tokens."""
    c, weight = model.config, model.lm_head.weight  # the dtype and device of the model
    max_len = c.block_size if max_len is None else max_len
    return [
        KVCache(
            batch_size, c.n_kv_head or c.n_head, max_len, c.head_dim, weight.dtype, weight.device
        )
        for _ in model.blocks
    ]
# --8<-- [end:kv-cache-rest]


# --8<-- [start:cache-cost]
def kv_cache_bytes_per_token(config, dtype=torch.float32):
    """Cache memory per token of one sequence: keys and values (2) of every layer, of
    n_kv_head heads of head_dim numbers: 2 * n_layer * n_kv_head * head_dim * bytes."""
    n_kv_head = config.n_kv_head or config.n_head
    return 2 * config.n_layer * n_kv_head * config.head_dim * torch.finfo(dtype).bits // 8


def generation_flops(config, prompt_len, n_new, use_cache=True):
    """Forward FLOPs (matrix products, Chapter 6's flops_per_token) to generate n_new tokens
    after a prompt of prompt_len tokens, one sequence.

    Without a cache, step i runs the whole sequence of L = prompt_len + i tokens, each token
    attending to L keys: L * flops_per_token(config, L). With a cache, the prompt runs once
    (prefill), then each step runs one token against the L keys cached: flops_per_token(config, L).
    """
    P = prompt_len
    if use_cache:
        return P * flops_per_token(config, P) + sum(
            flops_per_token(config, L) for L in range(P + 1, P + n_new)
        )
    return sum(L * flops_per_token(config, L) for L in range(P, P + n_new))
# --8<-- [end:cache-cost]


# ---------------------------------------------------------------------------------------
# Generation with a GPT
# ---------------------------------------------------------------------------------------

# --8<-- [start:lean-step]
def fused_qkv(attn):
    """q_proj, k_proj and v_proj of a MultiHeadAttention stacked into one ((H + 2 Hkv) D, C)
    matrix (and bias): one matrix product per token instead of three. None when they are not
    plain nn.Linear layers (quantized ones, Chapter 12, or LoRA-adapted ones, Chapter 13):
    they then run as they are, since a stacked float copy would read more bytes than the
    layers themselves, and would leave out an adapter."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if any(type(p) is not torch.nn.Linear for p in projections):
        return None
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    bias = (
        None
        if attn.q_proj.bias is None
        else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    )
    return weight, bias


def decode_step(model, ids, positions, caches, qkv, padding_mask=None):
    """GPT.forward for ONE new token per row, ids (B, 1), at positions (B, 1), with the
    earlier tokens in caches; returns the next-token logits (B, V).

    The same arithmetic as the model's forward, minus what one token at inference does not
    need: checks of the ids and positions, dropout modules (identities in eval mode), the
    causal mask, three projections where one fused matrix qkv[i] = fused_qkv(...) does, and
    copies of grouped key/value heads (SDPA's enable_gqa reads them in place).
    padding_mask (B, Tk) covers the cached tokens and this one.
    """
    B = ids.shape[0]
    x = F.embedding(ids, model.tok_emb.weight)  # (B, 1, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb.weight[positions]  # learned positions, (B, 1, C)
    mask = None if padding_mask is None else padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
    for block, cache, fused in zip(model.blocks, caches, qkv):  # pre-norm blocks
        attn, h = block.attn, block.attn_norm(x)
        if fused is None:  # the layers as they are
            q, k, v = (proj(h).view(B, 1, -1, attn.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        else:
            heads = F.linear(h, *fused).view(B, 1, -1, attn.head_dim).transpose(1, 2)
            # (B, H or Hkv, 1, D)
            q, k, v = heads.split([attn.n_head, attn.n_kv_head, attn.n_kv_head], dim=1)
        if attn.rope is not None:
            q, k = attn.rope(q, positions), attn.rope(k, positions)
        k, v = cache.update(k, v)  # (B, Hkv, Tk, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=attn.n_head != attn.n_kv_head
        )
        x = x + attn.out_proj(y.transpose(1, 2).reshape(B, 1, -1))  # (B, 1, C)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm_f(x))[:, -1]  # (B, V)
# --8<-- [end:lean-step]


# --8<-- [start:generate]
SAMPLING_RULES = {  # what each setting of generate must be; None turns top_k and top_p off
    "max_new_tokens": (lambda n: isinstance(n, int) and n >= 1, "a positive integer"),
    "temperature": (lambda t: t >= 0, ">= 0 (0 = greedy)"),
    "top_k": (lambda k: k is None or isinstance(k, int) and k >= 1, "a positive integer"),
    "top_p": (lambda p: p is None or 0 < p <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda r: r > 0, "> 0 (1 = none)"),
}


def check_sampling(as_flags=False, **settings):
    """Raise ValueError for the first setting that breaks its rule in SAMPLING_RULES; with
    as_flags, name it as the command line does (--top-k, not top_k)."""
    for name, value in settings.items():
        valid, rule = SAMPLING_RULES[name]
        if not valid(value):
            shown = "--" + name.replace("_", "-") if as_flags else name
            raise ValueError(f"{shown} must be {rule}, got {value!r}")


def check_generate_args(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                        padding_mask, window_keep):
    """Raise ValueError, saying what is wrong, for arguments that generate cannot use."""
    if idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (B, T) LongTensor of token ids, "
                         f"got {idx.dtype} {tuple(idx.shape)}")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty)
    if model.training and model.config.dropout > 0:
        raise ValueError("the model is in training mode, so dropout is on: call model.eval() first")
    if window_keep is not None and not 1 <= window_keep <= model.config.block_size:
        raise ValueError(
            f"window_keep must be in [1, block_size={model.config.block_size}], got {window_keep}"
        )
    if padding_mask is not None:
        if padding_mask.shape != idx.shape or padding_mask.dtype != torch.bool:
            raise ValueError(
                f"padding_mask must be a bool tensor of idx's shape {tuple(idx.shape)}"
            )
        if (padding_mask[:, 1:] < padding_mask[:, :-1]).any() or not padding_mask[:, -1].all():
            raise ValueError("padding_mask must describe left padding: False (padding) first, then "
                             "True up to the last column; left_pad() builds it")


def crop_notice(prompt_len, block_size):
    """The one-line notice that a prompt longer than the context loses its first tokens, or
    None when it fits: the model reads only the last block_size tokens."""
    if prompt_len <= block_size:
        return None
    return (f"the prompt has {prompt_len} tokens, more than the model's context of {block_size}: "
            f"its first {prompt_len - block_size} tokens are dropped")


def check_finite(logits, step):
    """Refuse next-token logits (B, V) that hold NaN or inf (one cheap check per step): a
    sample drawn from them would be garbage, or torch.multinomial's cryptic error."""
    if not torch.isfinite(logits).all():
        raise ValueError(
            f"the logits of generation step {step} hold NaN or inf: the model's weights or "
            "its input hold NaN/inf (or its activations overflowed)"
        )


def with_room(buffer, n):
    """buffer (B, L) with room for at least n columns: doubled when full, new columns True/1.
    Memory grows with the tokens made, not with max_new_tokens, which may be huge."""
    if n <= buffer.shape[1]:
        return buffer
    return torch.cat(
        [buffer, buffer.new_ones(buffer.shape[0], max(n, 2 * buffer.shape[1]) - buffer.shape[1])],
        dim=1,
    )


def decode_tokens(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
                  repetition_penalty=1.0, eos_id=None, generator=None, use_cache=True,
                  padding_mask=None, window_keep=None, lean_step=True):
    """Yield the next token of every row, a (B,) tensor, up to max_new_tokens times. Run it
    under torch.inference_mode() (generate and generate_stream do).

    idx (B, T): prompts, left-padded with padding_mask (B, T) (True = real token) when their
    lengths differ. A row that has produced eos_id is finished and gets eos_id from then on;
    the stream ends early when every row is finished. The model reads the window
    tokens[start:n]: a prompt longer than block_size loses its first tokens (with a warning);
    when the window would exceed block_size, only its last window_keep tokens (default
    block_size // 2) are kept, and with use_cache they are run again (re-prefill).
    With use_cache, the prompt (and a slid window) runs through GPT.forward, which fills the
    caches, and every later token through decode_step, or GPT.forward if lean_step is False.
    """
    check_generate_args(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                        padding_mask, window_keep)
    B, T = idx.shape
    block = model.config.block_size
    keep = block // 2 if window_keep is None else window_keep
    if notice := crop_notice(T, block):
        warnings.warn(notice, stacklevel=2)
    room = T + min(max_new_tokens, block)  # grows (with_room) as tokens come
    tokens = with_room(idx, room)  # every token so far, written in place (a copy: room > T)
    mask = None if padding_mask is None else with_room(padding_mask, room)  # new tokens are real
    caches = make_kv_caches(model, B, min(block, T + max_new_tokens)) if use_cache else None
    qkv = [fused_qkv(b.attn) for b in model.blocks] if use_cache and lean_step else None
    done = torch.zeros(B, dtype=torch.bool, device=idx.device) if eos_id is not None else None
    start = max(0, T - block)  # the model reads tokens[:, start:n]
    fed = start  # with a cache: tokens[:, start:fed] are in it
    for n in range(T, T + max_new_tokens):  # n tokens so far
        tokens = with_room(tokens, n + 1)
        mask = None if mask is None else with_room(mask, n + 1)
        if n - start > block:  # the window is full: slide it
            start = fed = n - keep
            for cache in caches or ():
                cache.reset()
        window_mask = mask[:, start:n] if mask is not None else None
        if qkv is not None and fed == n - 1:  # one new token, the others cached
            positions = (torch.full((B, 1), n - 1 - start, device=idx.device) if mask is None
                         else window_mask.sum(dim=-1, keepdim=True) - 1)  # real tokens before it
            last_logits = decode_step(model, tokens[:, n - 1:n], positions, caches, qkv,
                                      window_mask)
        elif use_cache:  # the tokens not yet cached: the whole window at first, then one
            last_logits = model(tokens[:, fed:n], kv_caches=caches,
                                padding_mask=window_mask)[0][:, -1]
        else:
            last_logits = model(tokens[:, start:n], padding_mask=window_mask)[0][:, -1]
        fed = n
        check_finite(last_logits, n - T + 1)
        next_id = next_token(last_logits, tokens[:, :n], mask[:, :n] if mask is not None else None,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, generator=generator)  # (B,)
        if done is not None:
            next_id = next_id.masked_fill(done, eos_id)
            done |= next_id == eos_id
        tokens[:, n] = next_id
        yield next_id
        if done is not None and done.all():
            return


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, **options):
    """decode_tokens in inference mode: yields each new token (B,) as soon as it exists."""
    yield from decode_tokens(model, idx, max_new_tokens, **options)


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, eos_id=None, generator=None, use_cache=True,
             padding_mask=None, window_keep=None, lean_step=True):
    """Extend idx (B, T) by up to max_new_tokens tokens: a LongTensor (B, T + n).

    temperature 0 is greedy decoding; otherwise the logits go through the repetition penalty,
    temperature, top-k and top-p, and the next token is sampled with generator (see sample).
    n < max_new_tokens only when every row has produced eos_id. See decode_tokens for
    padding_mask (batches of prompts of different lengths), window_keep and lean_step.
    """
    with torch.inference_mode():  # no autograd bookkeeping, for the whole loop at once
        new = list(decode_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty, eos_id=eos_id,
                                 generator=generator, use_cache=use_cache,
                                 padding_mask=padding_mask, window_keep=window_keep,
                                 lean_step=lean_step))
        out = torch.cat([idx] + [t[:, None] for t in new], dim=1)  # (B, T + n)
    return out.clone()  # outside inference mode: a normal tensor that autograd may use
# --8<-- [end:generate]


# --8<-- [start:left-pad]
def left_pad(prompts, pad_id=0, device=None):
    """Lists of token ids of different lengths -> idx (B, T) padded on the left with pad_id,
    and padding_mask (B, T), True for real tokens. T is the longest prompt's length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, and no empty prompt")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], device=device)
    padding_mask = torch.tensor(
        [[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device
    )
    return idx, padding_mask
# --8<-- [end:left-pad]


# ---------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------

# --8<-- [start:beam-search]
@torch.inference_mode()
def beam_search(model, idx, max_new_tokens, beam_width=4, *, length_penalty=1.0, eos_id=None,
                use_cache=True):
    """The continuation of one prompt idx (1, T) with the best score that beam search finds;
    returns (1, T + n).

    A hypothesis of n new tokens with total log-probability log p scores log p / n**length_penalty:
    0 ranks by log p (which favours short endings), 1 by the mean log-probability per token.
    At each step every beam is extended by every token; the beam_width best continuations that
    do not end with eos_id stay alive, those that end with it (and rank among the beam_width
    best) are finished. The search stops when beam_width hypotheses are finished, or after
    max_new_tokens steps, when the live beams join the finished ones. Hugging Face's beam
    search with early_stopping=True follows the same rules.
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(
            f"beam_search takes one prompt, idx of shape (1, T); got {tuple(idx.shape)}"
        )
    if beam_width < 1:
        raise ValueError(f"beam_width must be at least 1, got {beam_width}")
    T, k = idx.shape[1], beam_width
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"{T} + {max_new_tokens} tokens exceed block_size={model.config.block_size}"
        )
    beams = idx.repeat(k, 1)  # (k, T): every beam starts as the prompt...
    scores = torch.full((k,), float("-inf"), device=idx.device)
    scores[0] = 0.0  # ...but only one is live, or step 1 would pick the same token k times
    caches = make_kv_caches(model, k, T + max_new_tokens) if use_cache else None
    feed, finished = beams, []  # finished: (score, ids) pairs
    for step in range(1, max_new_tokens + 1):
        logits, _ = model(feed, kv_caches=caches)
        check_finite(logits[:, -1], step)
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1)  # (k, V)
        V = logprobs.shape[-1]
        # The 2k best of the k * V continuations: at most k end with eos (one per beam).
        top, flat = (scores[:, None] + logprobs).view(-1).topk(min(2 * k, k * V))
        parent, token = flat // V, flat % V
        alive = []
        for rank, (score, t) in enumerate(zip(top.tolist(), token.tolist())):
            if t == eos_id:
                if rank < k and score > float("-inf"):
                    ids = torch.cat([beams[parent[rank]], token[rank:rank + 1]])
                    finished.append((score / step**length_penalty, ids))
            elif len(alive) < k:
                alive.append(rank)
        if len(finished) >= k:
            break
        alive = torch.tensor(alive, device=idx.device)
        beams = torch.cat([beams[parent[alive]], token[alive, None]], dim=1)  # (k, T + step)
        scores = top[alive]
        if use_cache:  # the surviving beams' caches, in their new order; then feed one token
            for cache in caches:
                cache.reorder(parent[alive])
            feed = token[alive, None]
        else:
            feed = beams
    else:  # max_new_tokens reached: the live beams compete with the finished ones
        finished += [(s / max_new_tokens**length_penalty, b) for s, b in zip(scores.tolist(), beams)
                     if s > float("-inf")]
    if not finished:  # max_new_tokens == 0
        return idx.clone()
    best = max(finished, key=lambda pair: pair[0])[1]
    return best[None].clone()  # clone: a normal tensor, not an inference-mode one


@torch.no_grad()
def sequence_logprob(model, idx, prompt_len, length_penalty=0.0):
    """log p(idx[:, prompt_len:] | the prompt) / n**length_penalty, n = idx.shape[1] - prompt_len,
    from one full forward pass: the score beam search ranks by. idx (B, T) -> (B,)."""
    logits, _ = model(idx)
    # predictions of the new tokens
    logp = F.log_softmax(logits[:, prompt_len - 1:-1].float(), dim=-1)
    new = idx[:, prompt_len:]
    return logp.gather(-1, new[..., None])[..., 0].sum(dim=-1) / new.shape[1] ** length_penalty
# --8<-- [end:beam-search]


# ---------------------------------------------------------------------------------------
# The encoder-decoder (Chapter 7) with a cache
# ---------------------------------------------------------------------------------------

# --8<-- [start:seq2seq]
def cross_attention_kv(attn, memory):
    """Keys and values of the encoder output memory (B, S, C) for one cross-attention layer,
    (B, Hkv, S, D) each. They depend on the source only: compute them once per source."""
    return (attn.split_heads(attn.k_proj(memory), attn.n_kv_head),
            attn.split_heads(attn.v_proj(memory), attn.n_kv_head))


def cached_cross_attention(attn, h, k, v, mask):
    """Cross-attention of attn (a MultiHeadAttention) from h (B, T, C) to precomputed k, v;
    mask (B, 1, 1, S), True for real source tokens."""
    q = attn.split_heads(attn.q_proj(h), attn.n_head)  # (B, H, T, D)
    n_rep = attn.n_head // attn.n_kv_head
    y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)
    return attn.out_proj(attn.merge_heads(y))  # (B, T, C)


def decoder_step(model, ids, position, caches, cross_kv, cross_mask, padding_mask):
    """The decoder of a Chapter 7 Transformer on one new target token per row, ids (B, 1) at
    `position`, with a KVCache per block for self-attention and the precomputed cross_kv.
    padding_mask (B, position + 1): target tokens that are padding (never attended).
    Returns the logits (B, V) of the token that follows."""
    x = model.drop(model.positions(model.embed(ids), offset=position))  # (B, 1, C)
    for block, cache, (k, v) in zip(model.decoder, caches, cross_kv):
        # Block.forward's three sublayers, with cached self-attention and cross-attention
        x = block._residual(
            x, block.attn_norm, lambda h: block.attn(h, padding_mask=padding_mask, kv_cache=cache)
        )
        x = block._residual(x, block.cross_norm,
                            lambda h: cached_cross_attention(block.cross_attn, h, k, v, cross_mask))
        x = block._residual(x, block.mlp_norm, block.mlp)
    return (model.decoder_norm(x) @ model.embed.weight.T)[:, -1]  # (B, V)


@torch.inference_mode()
def cached_greedy_decode(model, src, bos_id, eos_id, max_new_tokens):
    """Chapter 7's greedy_decode with a KV cache: the same output (B, L), but each step runs
    the decoder on one token, and cross-attention's keys and values are computed once."""
    B, pad = src.shape[0], model.config.pad_id
    memory = model.encode(src)  # (B, S, C), once
    cross_mask = (src != pad)[:, None, None, :]  # (B, 1, 1, S)
    cross_kv = [cross_attention_kv(block.cross_attn, memory) for block in model.decoder]
    caches = [KVCache(B, block.attn.n_kv_head, max_new_tokens, block.attn.head_dim, memory.dtype,
                      memory.device)
              for block in model.decoder]
    tokens = torch.full((B, max_new_tokens + 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for t in range(max_new_tokens):
        logits = decoder_step(model, tokens[:, t:t + 1], t, caches, cross_kv, cross_mask,
                              tokens[:, :t + 1] != pad)  # target tokens equal to pad are padding
        next_id = logits.argmax(dim=-1).masked_fill(done, pad)  # (B,)
        tokens[:, t + 1] = next_id
        done |= next_id == eos_id
        if done.all():
            return tokens[:, 1:t + 2].clone()
    return tokens[:, 1:].clone()


def seq2seq_step_flops(config, src_len, t, use_cache=True):
    """Matrix-product FLOPs of the decoder step that reads t target tokens (Chapter 7 model,
    C = d_model, F = d_ff): with a cache, one query; without, all t, and the keys and values
    of the source again. Per layer: self-attention projections 4 C^2 per token and 4 t C for
    scores and values; cross-attention q and out 2 C^2 per token, k and v 2 C^2 per source
    token, 4 S C per query; the MLP 2 C F per token; all times 2 FLOPs per multiply-add."""
    C, F_, S, V = config.d_model, config.d_ff, src_len, config.vocab_size
    queries = 1 if use_cache else t
    per_query = 2 * (4 * C * C + 2 * C * t + 2 * C * C + 2 * S * C + 2 * C * F_)
    per_source = 0 if use_cache else 2 * 2 * S * C * C  # k_proj and v_proj of the memory
    return config.n_decoder_layer * (queries * per_query + per_source) + queries * 2 * C * V
# --8<-- [end:seq2seq]


# ---------------------------------------------------------------------------------------
# Streaming text, stop strings, the command line
# ---------------------------------------------------------------------------------------

# --8<-- [start:stop-strings]
def held_back(text, stops):
    """Length of the longest end of text that could be the beginning of a stop string."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)


def stop_at_strings(pieces, stops):
    """Pass text pieces through until one of the strings stops appears; return before it.

    What is yielded, joined, is the text before the first stop string to be completed (the
    longest, if several end at the same character). The text is read one character at a
    time, so the result does not depend on how it is cut into pieces. Text that might be the
    start of a stop string is held back until the next piece decides.
    """
    stops = [s for s in stops if s]
    pending = ""
    for piece in pieces:
        for char in piece:
            pending += char
            stop = max((s for s in stops if pending.endswith(s)), key=len, default=None)
            if stop is not None:
                if len(pending) > len(stop):
                    yield pending[:-len(stop)]
                return  # the caller stops asking for tokens: generation ends here
        ready = len(pending) - held_back(pending, stops)
        if ready:
            yield pending[:ready]
            pending = pending[ready:]
    if pending:
        yield pending
# --8<-- [end:stop-strings]


# --8<-- [start:stream-text]
def encode_prompt(tokenizer, prompt):
    """The prompt's ids, or a ValueError that names the characters the model does not know."""
    unknown = sorted(set(prompt) - set(tokenizer.chars))
    if unknown:
        raise ValueError(
            f"the prompt has characters that are not in the model's vocabulary: {unknown}; "
            f"it knows {len(tokenizer.chars)}: {''.join(tokenizer.chars)!r}"
        )
    if not prompt:
        raise ValueError("the prompt is empty: give the model at least one character to continue")
    return tokenizer.encode(prompt)


def stream_text(model, tokenizer, prompt, max_new_tokens, *, stop=(), **sampling):
    """Yield the continuation of the string prompt, piece by piece, as it is generated.

    One character per token (Chapter 8's CharTokenizer), cut before the first stop string.
    sampling: the keyword arguments of generate (temperature, top_k, generator, ...).
    """
    idx = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.lm_head.weight.device)
    tokens = generate_stream(model, idx, max_new_tokens, **sampling)
    yield from stop_at_strings((tokenizer.decode([int(t)]) for t in tokens), stop)


def generate_text(model, tokenizer, prompt, max_new_tokens, **options):
    """The continuation of prompt as one string (stream_text, joined)."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **options))
# --8<-- [end:stream-text]


# --8<-- [start:load]
def load_trained(out_dir, device="cpu"):
    """(model, tokenizer) from a folder written by Chapter 8's trainer: checkpoint.safetensors
    (weights, and the training configuration in its metadata) and tokenizer.json."""
    out = Path(out_dir)
    checkpoint, vocabulary = out / "checkpoint.safetensors", out / "tokenizer.json"
    for path in (checkpoint, vocabulary):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: train a model first, for example with "
                                    f".venv/bin/python code/ch08_training.py --out-dir {out}")
    try:
        tokenizer = load_run_tokenizer(out)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{vocabulary} is not the tokenizer of Chapter 8's trainer: {error!r}"
        ) from None
    # its errors name the file and what is wrong with it
    model, _ = model_from_checkpoint(checkpoint)
    if tokenizer.vocab_size != model.config.vocab_size:  # files of two different runs
        raise ValueError(
            f"{vocabulary} has {tokenizer.vocab_size} tokens but the model in {checkpoint} "
            f"has {model.config.vocab_size}: they do not come from the same run"
        )
    return model.to(device), tokenizer


def describe_run_data(out_dir):
    """What a run folder records of the text it was trained on, in a few words."""
    info = run_data_info(out_dir)
    if info is None:
        return "unknown (the folder has no record of its data: an older trainer wrote it)"
    home = str(Path.home())
    source = ("~" + info["source"][len(home):] if info["source"].startswith(home + "/")
              else info["source"])
    return f"{info['corpus']} ({source})"
# --8<-- [end:load]


# --8<-- [start:cli]
def unescape(text):
    r"""Backslash escapes typed on a command line (\n, \t) -> the characters."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate text with a GPT trained by Chapter 8's trainer.", allow_abbrev=False
    )
    parser.add_argument(
        "--out-dir", required=True, help="the trainer's folder (checkpoint and tokenizer)"
    )
    parser.add_argument(
        "--prompt", default="\\n", help=r"text to continue; escapes such as \n work (default: \n)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument(
        "--stop", action="append", default=[], help="stop before this text (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=None, help="for reproducible samples")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute everything at every step"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def print_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command line: one line on stderr, without the source."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None, out=None):
    """The command line: print the prompt, then stream the continuation as it is made.
    Errors are exceptions: run_command prints them in one line."""
    args = parse_args(argv)
    check_sampling(as_flags=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    device = resolve_device(args.device)
    model, tokenizer = load_trained(args.out_dir, device)
    print(f"run trained on: {describe_run_data(args.out_dir)}", file=sys.stderr)
    generator = torch.Generator(device=device)
    if args.seed is None:
        generator.seed()  # a fresh random seed
    else:
        generator.manual_seed(args.seed)
    prompt, out = unescape(args.prompt), out or sys.stdout
    with warnings.catch_warnings():
        warnings.showwarning = print_warning  # e.g. a prompt cropped to the context, in one line
        pieces = stream_text(model, tokenizer, prompt, args.max_new_tokens,
                             stop=[unescape(s) for s in args.stop],
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, generator=generator,
                             use_cache=not args.no_cache)
        first = next(pieces, "")  # runs the prompt: its warnings and errors come before any text
        out.write(prompt + first)
        for piece in pieces:
            out.write(piece)
            out.flush()  # show each character as soon as it exists
    out.write("\n")
    return 0
# --8<-- [end:cli]


# ---------------------------------------------------------------------------------------
# Measuring, and the figures
# ---------------------------------------------------------------------------------------

# --8<-- [start:measure]
def seconds_per_token(model, prompt_len=16, n_new=128, use_cache=True, seed=0):
    """Greedy generation of n_new tokens after a random prompt (one sequence): the seconds
    each new token took, a list of n_new floats (the first includes the prefill)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    idx = idx.to(model.lm_head.weight.device)
    times, tick = [], time.perf_counter()
    for _ in generate_stream(model, idx, n_new, temperature=0, use_cache=use_cache):
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    return times


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations that reach PyTorch's kernels while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_calls(fn):
    """(tensor operations, module calls) that fn() makes: each costs microseconds of
    dispatch, however small its tensors."""
    modules = 0

    def count_module(module, args):
        nonlocal modules
        modules += 1

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count_module)
    try:
        with OpCounter() as ops:
            fn()
    finally:
        hook.remove()
    return ops.count, modules


def tokens_per_second(model, prompt_len=16, n_new=128, use_cache=True, repeats=3):
    """The best of `repeats` runs of greedy generation, in new tokens per second."""
    return max(
        n_new / sum(seconds_per_token(model, prompt_len, n_new, use_cache)) for _ in range(repeats)
    )
# --8<-- [end:measure]


def plot_temperature():
    """A next-token distribution at three temperatures, and its entropy against temperature."""
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(0)
    V = 50
    logits = (-1.2 * torch.log(torch.arange(1, V + 1, dtype=torch.float64))
              + 0.3 * torch.randn(V, generator=gen, dtype=torch.float64))
    logits = logits.sort(descending=True).values
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for T in (0.5, 1.0, 2.0):
        ax1.plot(range(1, V + 1), torch.softmax(logits / T, -1), "o-", ms=3, label=f"T = {T}")
    ax1.set(xlabel="token (by rank)", ylabel="probability", title="softmax(z / T)")
    ax1.legend()
    temps = torch.logspace(-2, 2, 200, dtype=torch.float64)
    ax2.plot(temps, [entropy(logits / T).item() for T in temps], label="entropy H(T)")
    ax2.axhline(math.log(V), color="0.5", ls="--", lw=1, label=f"log V (uniform), V = {V}")
    ax2.axhline(0, color="0.5", ls=":", lw=1, label="0 (greedy: one token)")
    ax2.set(xscale="log", xlabel="temperature T", ylabel="nats", title="dH/dT = Var(z) / T^3 >= 0")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_top_p():
    """Top-k keeps a fixed number of tokens; top-p keeps as many as the distribution needs."""
    import matplotlib.pyplot as plt

    V, p, k = 40, 0.9, 10
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    cases = {
        "a confident prediction": -2.5 * torch.log(ranks),
        "an uncertain prediction": -0.6 * torch.log(ranks),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, (title, logits) in zip(axes, cases.items()):
        probs = torch.softmax(logits, -1)
        kept = torch.isfinite(top_p_filter(logits[None], p)[0])
        ax.bar(ranks.numpy(), probs.numpy(), color=["C0" if keep else "0.75" for keep in kept])
        ax.plot(
            ranks.numpy(), probs.cumsum(-1).numpy(), "C1.-", ms=3, label="cumulative probability"
        )
        ax.axhline(p, color="C1", ls=":", lw=1)
        ax.axvline(k + 0.5, color="C3", ls="--", lw=1, label=f"top-k cut, k = {k}")
        ax.set(title=f"{title}: top-p = {p} keeps {int(kept.sum())}", xlabel="token (by rank)")
        ax.legend(fontsize=8, loc="center right")
    axes[0].set_ylabel("probability")
    fig.tight_layout()
    return fig


def plot_cache_speedup():
    """Measured time of each new token with and without the KV cache (a small GPT, this CPU)."""
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=512, n_layer=4, n_head=4, d_model=128)).eval()
    n_new, prompt_len = 384, 16
    runs = {
        label: min((seconds_per_token(model, prompt_len, n_new, cache) for _ in range(2)), key=sum)
        for label, cache in (("with the KV cache", True), ("without", False))
    }
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, times in runs.items():
        ax.plot(range(prompt_len + 1, prompt_len + n_new), [1e3 * t for t in times[1:]], lw=1,
                label=f"{label}: {n_new / sum(times):.0f} tokens/s")
    ax.set(xlabel="tokens in the sequence", ylabel="ms per new token", ylim=(0, None),
           title="Greedy generation, 4 layers x 128 dims, one sequence")
    ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(run_command(main))
