"""Small utilities shared by the chapters' tests (not part of the book's modules)."""

import torch


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
