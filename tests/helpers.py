"""Small utilities shared by the chapters' tests (not part of the book's modules)."""

import torch

from ch06_gpt import GPT, GPTConfig


class ListCache:
    """The smallest KV cache: keeps every key and value it is given (Chapter 9 builds a real
    one). MultiHeadAttention accepts any object with ``seq_len`` and ``update(k, v)``."""

    def __init__(self):
        self.k = self.v = None

    @property
    def seq_len(self):
        return 0 if self.k is None else self.k.shape[-2]

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
        return self.k, self.v


def tiny_gpt(seed=0, **overrides):
    """A small GPT (Chapter 6) with seeded random weights, in eval mode: 2 layers, 2 heads,
    32 wide, 16 tokens of context, 50 token ids; any GPTConfig field can be overridden."""
    torch.manual_seed(seed)
    config = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


def tiny_llama(seed=0, **overrides):
    """tiny_gpt in the Llama layout of SmolLM2 (Chapters 12-14): RMSNorm, SwiGLU, rotary
    positions, grouped-query attention with one key/value head, no biases."""
    llama = dict(n_kv_head=1, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
    return tiny_gpt(seed, **{**llama, **overrides})


def tiny_train_settings(out_dir, **overrides):
    """Settings for Chapter 8's make_config("tiny", ...): a run of a few seconds on the Python
    documentation, with dropout, so that exact resumption is tested with random state."""
    settings = dict(data="python-docs", n_layer=1, d_model=32, block_size=16, batch_size=4, max_iters=12,
                    warmup_iters=3, decay_iters=12, eval_interval=6, eval_iters=2, sample_tokens=8,
                    out_dir=str(out_dir), device="cpu", precision="fp32", dropout=0.1)
    settings.update(overrides)
    return settings
