"""Chapter 6: GPT, a decoder-only language model.

Token embeddings and positions (Chapter 3), a stack of causal Transformer blocks (Chapters 4
and 5), a final norm and an output head that shares the embedding matrix. One configuration
object covers GPT-2 of every size and a Llama-style model (RMSNorm, SwiGLU, RoPE,
grouped-query attention, no biases), built from the same components.

Also here: the parameter count and forward FLOPs per token as formulas, greedy generation,
and loading / exporting Hugging Face GPT-2 (and Llama) weights, from a state dict or a
safetensors file read and written from scratch.

Shapes: B batch, T sequence length, C model width (d_model), V vocabulary size.

Needs: ch03_embeddings, ch04_attention, ch05_block.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03_embeddings import LearnedPositionalEmbedding, TokenEmbedding
from ch05_block import Block, block_num_parameters, default_d_ff, init_gpt2_, make_norm


# --8<-- [start:config]
def setting(default, help):
    """A dataclass field with its help text, which Chapter 8's command line shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class GPTConfig:
    """Everything that defines a GPT. The defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = setting(50257, "token ids the model knows (a trainer sets it from its data)")
    block_size: int = setting(1024, "context length: the most tokens the model reads at once")
    n_layer: int = setting(12, "Transformer blocks")
    n_head: int = setting(12, "attention heads per block")
    n_kv_head: int | None = setting(None, "key/value heads; fewer than n_head: grouped-query "
                                          "attention (None: n_head)")
    d_model: int = setting(768, "width of the residual stream")
    d_ff: int | None = setting(None, "hidden width of the MLP (None: default_d_ff, 4 * d_model "
                                     "for GELU)")
    dropout: float = setting(0.0, "dropout probability while training")
    bias: bool = setting(True, "biases in every Linear and LayerNorm")
    norm: str = setting("layernorm", "layernorm or rmsnorm")
    norm_eps: float | None = setting(None, "the norm's epsilon (None: its default, 1e-5 for "
                                           "LayerNorm, 1e-6 for RMSNorm)")
    mlp: str = setting("gelu_tanh", "gelu (exact), gelu_tanh (GPT-2's), relu or swiglu")
    positions: str = setting("learned", "learned absolute positions (GPT-2) or rope (Llama)")
    rope_base: float = setting(10000.0, "base of the rotary frequencies")
    rope_interleaved: bool = setting(False, "rotate adjacent pairs (GPT-J, llama.cpp) instead of "
                                            "halves (Llama)")
    tie_weights: bool = setting(True, "the output head shares the token embedding matrix")
    use_fused: bool = setting(True, "torch's fused attention and LayerNorm; off: the own code "
                                    "of Chapters 4 and 5")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"positions must be 'learned' or 'rope', got {self.positions!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self):
        return self.d_model // self.n_head

    @classmethod
    def gpt2(cls, name="gpt2", **overrides):
        """GPT-2 of the given size: 'gpt2' (124M), 'gpt2-medium' (350M), 'gpt2-large' (774M),
        'gpt2-xl' (1558M)."""
        sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                 "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if name not in sizes:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {sorted(sizes)}")
        n_layer, n_head, d_model = sizes[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "d_model": d_model, **overrides})

    @classmethod
    def llama_style(cls, **overrides):
        """The Llama recipe on the same components: RMSNorm, SwiGLU, RoPE, grouped-query
        attention, no biases, untied head. Sizes default to GPT-2 small's, with 4 kv heads."""
        llama = dict(n_kv_head=4, bias=False, norm="rmsnorm", mlp="swiglu", positions="rope",
                     tie_weights=False)
        return cls(**{**llama, **overrides})

    @classmethod
    def llama2_7b(cls, **overrides):
        """Llama 2 7B's shape (6.74B parameters), for counting; too big to build on a laptop."""
        size = dict(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_kv_head=32,
                    d_model=4096, d_ff=11008)
        return cls.llama_style(**{**size, **overrides})
# --8<-- [end:config]


# --8<-- [start:gpt]
class GPT(nn.Module):
    """A decoder-only Transformer language model: p(x_t | x_<t) for every position t."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.tok_emb = TokenEmbedding(c.vocab_size, c.d_model)  # (V, C)
        self.pos_emb = (
            LearnedPositionalEmbedding(c.block_size, c.d_model)
            if c.positions == "learned"
            else None
        )
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.n_kv_head, c.d_ff, dropout=c.dropout, bias=c.bias,
                  norm=c.norm, norm_eps=c.norm_eps, mlp=c.mlp, prenorm=True,
                  rope=c.positions == "rope", rope_base=c.rope_base,
                  rope_interleaved=c.rope_interleaved, use_fused=c.use_fused)
            for _ in range(c.n_layer)
        )
        # pre-norm needs a last norm
        self.norm_f = make_norm(c.norm, c.d_model, c.norm_eps, c.bias, c.use_fused)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # (V, C)
        init_gpt2_(self, n_residual=2 * c.n_layer)  # two residual branches per block
        if c.tie_weights:
            self.tie_weights()

    def forward(self, idx, targets=None, kv_caches=None, *, padding_mask=None, positions=None,
                attn_mask=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        targets (B, T): the next token at each position (-1 = ignore); loss is the mean
        cross-entropy over the targets. kv_caches: one cache per block (see
        MultiHeadAttention), holding earlier tokens; idx are then the new tokens only.
        padding_mask (B, past + T) bool, True for real tokens, for a batch of left-padded
        prompts (Chapter 9): real tokens never attend to padding, and a token's position is
        the number of real tokens before it in its row. positions (B, T): explicit positions.
        attn_mask: bool, broadcastable to (B, 1, T, past + T), True where a query may attend a
        key, applied on top of the causal mask (several documents packed in a row, Chapter 13).
        """
        if idx.dim() != 2:
            raise ValueError(
                f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}"
            )
        B, T = idx.shape
        past = kv_caches[0].seq_len if kv_caches else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context "
                             f"length block_size={self.config.block_size}; crop it to the last "
                             f"{self.config.block_size} tokens")
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool or padding_mask.shape != (B, past + T):
                raise ValueError(
                    f"padding_mask must be a bool (B, past + T) = {(B, past + T)} tensor, got "
                    f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            if positions is None:  # count the real tokens before each one
                positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            # (B, 1, T, past + T): real queries see real keys; a padding query sees all (never NaN)
            real = padding_mask[:, None, None, :] | ~padding_mask[:, None, past:, None]
            attn_mask = real if attn_mask is None else real & attn_mask
        x = self.tok_emb(idx)  # (B, T, C); raises for ids outside [0, V)
        if self.pos_emb is not None:  # + W_pos[past : past + T], or W_pos[positions]
            x = (
                self.pos_emb(x, positions)
                if positions is not None
                else self.pos_emb(x, offset=past)
            )
        x = self.drop(x)
        for i, block in enumerate(self.blocks):  # one query needs no causal mask: it is the last
            x = block(x, causal=T > 1, attn_mask=attn_mask, positions=positions,
                      kv_cache=kv_caches[i] if kv_caches else None)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        loss = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    def num_parameters(self, non_embedding=False):
        """Number of distinct parameters (a tied matrix counts once). non_embedding=True leaves
        out the token and position embeddings, the N of the scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (
                self.pos_emb.weight.numel() if self.pos_emb is not None else 0
            )
        return n

    def flops_per_token(self, seq_len=None):
        """Forward-pass FLOPs per token with seq_len tokens of context (see flops_per_token)."""
        return flops_per_token(self.config, seq_len)
    # --8<-- [end:gpt]

    # --8<-- [start:exercise-1]
    # Exercise 1: weight tying
    def tie_weights(self):
        """Make the output head use the token embedding matrix: one nn.Parameter,
        used twice (__init__ calls this when config.tie_weights is True).

        Both are (V, C): the embedding looks row i up for token i, the head scores token i
        with the dot product of row i and the final hidden state. After tying, the model has
        V * C parameters fewer, and the shared matrix gets the gradients of both uses.
        """
        self.lm_head.weight = self.tok_emb.weight
    # --8<-- [end:exercise-1]

    # --8<-- [start:exercise-4]
    # Exercise 4: greedy generation
    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Extend idx (B, T) by max_new_tokens tokens, each the argmax of the
        next-token logits; returns (B, T + max_new_tokens). The model reads at most the last
        block_size tokens (crop the context), and only the logits of the last position matter.
        Call model.eval() first, so that dropout is off.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # (B, <= block_size)
            logits, _ = self(context)  # (B, T, V)
            next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx
    # --8<-- [end:exercise-4]


# --8<-- [start:components]
def components(model):
    """The classes of the book's modules that a model is built from, as 'module.Class', sorted."""
    return sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                   if m is not model and type(m).__module__.startswith("ch")})
# --8<-- [end:components]


# ---------------------------------------------------------------------------------------
# Parameters and FLOPs
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-2]
# Exercise 2: the parameter count of a GPT
def gpt_num_parameters(config):
    """The number of distinct parameters of GPT(config), from the formula, without building it.

    Token embedding V*C; learned positions block_size*C (none with RoPE); n_layer blocks of
    block_num_parameters(...) (Chapter 5); a final norm (C, or 2C for a LayerNorm with bias);
    an output head V*C unless it is tied to the token embedding.
    """
    c = config
    embeddings = c.vocab_size * c.d_model + (
        c.block_size * c.d_model if c.positions == "learned" else 0
    )
    block = block_num_parameters(c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.bias, c.norm, c.mlp)
    final_norm = c.d_model * (2 if c.norm == "layernorm" and c.bias else 1)
    head = 0 if c.tie_weights else c.vocab_size * c.d_model
    return embeddings + c.n_layer * block + final_norm + head
# --8<-- [end:exercise-2]


# --8<-- [start:exercise-3]
# Exercise 3: forward FLOPs per token
def flops_per_token(config, seq_len=None):
    """Forward-pass FLOPs per token of GPT(config) when it reads seq_len tokens (default
    block_size), counting the matrix products (2 FLOPs per multiply-add) and nothing else.

    Per block: the projections (q and output C x C, k and v C x d_kv, d_kv = n_kv_head * head_dim)
    and the MLP (2 matrices C x F, 3 for SwiGLU), 2 FLOPs per weight; attention scores q k^T
    and the weighted sum of values: 2 * seq_len * C FLOPs each (all seq_len keys, as the dense
    kernels compute them). Plus the output head, 2 * C * V. Embedding lookups cost nothing.
    """
    c = config
    T = seq_len or c.block_size
    d_ff = c.d_ff or default_d_ff(c.d_model, c.mlp)
    d_kv = (c.n_kv_head or c.n_head) * c.head_dim
    projections = 2 * c.d_model * c.d_model + 2 * c.d_model * d_kv
    mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * d_ff
    attention = 2 * T * c.d_model + 2 * T * c.d_model  # q k^T, then weights @ v
    return c.n_layer * (2 * (projections + mlp) + attention) + 2 * c.d_model * c.vocab_size
# --8<-- [end:exercise-3]


# ---------------------------------------------------------------------------------------
# Hugging Face interoperability
# ---------------------------------------------------------------------------------------

# --8<-- [start:hf-gpt2]
def config_from_hf_gpt2(hf_config):
    """GPTConfig from a transformers GPT2Config or the dict of a config.json."""
    get = (
        hf_config.get
        if isinstance(hf_config, dict)
        else (lambda key, default=None: getattr(hf_config, key, default))
    )
    activation = get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
           "relu": "relu"}.get(activation)
    if mlp is None:
        raise ValueError(f"unsupported GPT-2 activation_function {activation!r}")
    return GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"),
                     n_layer=get("n_layer"), n_head=get("n_head"), d_model=get("n_embd"),
                     d_ff=get("n_inner"), mlp=mlp, norm_eps=get("layer_norm_epsilon", 1e-5),
                     bias=True, tie_weights=get("tie_word_embeddings", True))


# Per block: Hugging Face's name -> ours. Conv1D weights are stored (in, out): transpose them.
GPT2_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_proj.weight": "attn.out_proj.weight", "attn.c_proj.bias": "attn.out_proj.bias",
    "ln_2.weight": "mlp_norm.weight", "ln_2.bias": "mlp_norm.bias",
    "mlp.c_fc.weight": "mlp.fc.weight", "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight", "mlp.c_proj.bias": "mlp.proj.bias",
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_gpt2_to_ours(hf_state_dict, config):
    """Rename and reshape a Hugging Face GPT-2 state dict into GPT(config)'s.

    Two things differ besides the names: GPT-2's Conv1D computes x @ W + b with W stored
    (in, out), the transpose of nn.Linear's (out, in); and its c_attn fuses the query, key
    and value projections into one (C, 3C) matrix, which we split into three.
    """
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()}
    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "norm_f.weight": sd["ln_f.weight"], "norm_f.bias": sd["ln_f.bias"]}
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for hf_name, our_name in GPT2_BLOCK_NAMES.items():
            w = sd[hf + hf_name]
            out[ours + our_name] = w.t() if hf_name in CONV1D else w
        q, k, v = sd[hf + "attn.c_attn.weight"].t().chunk(3, dim=0)  # (3C, C) -> 3 x (C, C)
        qb, kb, vb = sd[hf + "attn.c_attn.bias"].chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{ours}attn.{name}.weight"], out[f"{ours}attn.{name}.bias"] = w, b
    # GPT-2 ties the head to wte; a GPT2Model checkpoint (the hub's) has no lm_head at all.
    out["lm_head.weight"] = hf_state_dict.get("lm_head.weight", sd["wte.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def ours_to_hf_gpt2(state_dict, config):
    """The inverse of hf_gpt2_to_ours: our state dict under GPT2LMHeadModel's names."""
    sd, t = state_dict, "transformer."
    out = {t + "wte.weight": sd["tok_emb.weight"], t + "wpe.weight": sd["pos_emb.weight"],
           t + "ln_f.weight": sd["norm_f.weight"], t + "ln_f.bias": sd["norm_f.bias"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(config.n_layer):
        hf, ours = f"{t}h.{i}.", f"blocks.{i}."
        for hf_name, our_name in GPT2_BLOCK_NAMES.items():
            w = sd[ours + our_name]
            out[hf + hf_name] = w.t() if hf_name in CONV1D else w
        qkv = [sd[f"{ours}attn.{n}_proj.weight"] for n in "qkv"]
        out[hf + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # 3 x (C, C) -> (C, 3C)
        out[hf + "attn.c_attn.bias"] = torch.cat([sd[f"{ours}attn.{n}_proj.bias"] for n in "qkv"])
    return {k: v.contiguous() for k, v in out.items()}
# --8<-- [end:hf-gpt2]


# --8<-- [start:hf-llama]
def config_from_hf_llama(hf_config):
    """GPTConfig from a transformers LlamaConfig (or its dict)."""
    get = (
        hf_config.get
        if isinstance(hf_config, dict)
        else (lambda key, default=None: getattr(hf_config, key, default))
    )
    rope = get("rope_parameters") or {}
    base = rope.get("rope_theta", get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"only the default RoPE is supported, got rope_type {rope.get('rope_type')!r}"
        )
    return GPTConfig.llama_style(
        vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
        n_layer=get("num_hidden_layers"), n_head=get("num_attention_heads"),
        n_kv_head=get("num_key_value_heads"), d_model=get("hidden_size"),
        d_ff=get("intermediate_size"), norm_eps=get("rms_norm_eps"), rope_base=base,
        bias=get("attention_bias", False), tie_weights=get("tie_word_embeddings", False))


def hf_llama_to_ours(hf_state_dict, config):
    """Rename a Hugging Face Llama state dict into GPT(config)'s. No reshaping: Llama uses
    nn.Linear, and Hugging Face stores W_q, W_k in the rotate-half RoPE layout we use."""
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
             "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
             "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.out_proj",
             "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
             "mlp.down_proj": "mlp.down_proj"}
    out = {}
    for key, value in hf_state_dict.items():
        key = key.removeprefix("model.")
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            module, param = rest.rsplit(".", 1)
            key = f"blocks.{i}.{names[module]}.{param}"
        else:
            key = {"embed_tokens.weight": "tok_emb.weight",
                   "norm.weight": "norm_f.weight"}.get(key, key)
        out[key] = value
    if config.tie_weights:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
# --8<-- [end:hf-llama]


# --8<-- [start:from-hf]
def from_hf_gpt2(source, config):
    """A GPT with the weights of a Hugging Face GPT-2 checkpoint.

    source: a state dict (GPT2LMHeadModel's or GPT2Model's) or the path of a safetensors
    file (the hub's model.safetensors); config: a GPTConfig, a transformers GPT2Config or
    the dict of its config.json.
    """
    config = config if isinstance(config, GPTConfig) else config_from_hf_gpt2(config)
    state_dict = load_safetensors(source) if isinstance(source, (str, Path)) else source
    model = GPT(config)
    model.load_state_dict(hf_gpt2_to_ours(state_dict, config))
    return model


def to_hf_gpt2(model):
    """The weights of our GPT under Hugging Face GPT2LMHeadModel's names and layouts."""
    return ours_to_hf_gpt2(model.state_dict(), model.config)


def from_hf_llama(source, config):
    """A Llama-style GPT with the weights of a Hugging Face Llama checkpoint (state dict or
    safetensors path); config: a GPTConfig or a transformers LlamaConfig (or its dict)."""
    config = config if isinstance(config, GPTConfig) else config_from_hf_llama(config)
    state_dict = load_safetensors(source) if isinstance(source, (str, Path)) else source
    model = GPT(config)
    model.load_state_dict(hf_llama_to_ours(state_dict, config))
    return model
# --8<-- [end:from-hf]


# --8<-- [start:safetensors]
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """Read a .safetensors file: an 8-byte little-endian header size n, n bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [start, end]}}, then the raw tensor bytes."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        raw = bytearray(body[start:end])  # a writable copy, so the tensor owns its memory
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file that load_safetensors (and the safetensors
    library) reads back. The JSON header is padded with spaces to a multiple of 8 bytes."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
# --8<-- [end:safetensors]


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def parameter_breakdown(config):
    """Parameters of GPT(config) by kind: embeddings, attention, MLP, norms, head."""
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(config)
    parts = {"embeddings": 0, "attention": 0, "MLP": 0, "norms": 0, "output head": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = ("embeddings" if "emb" in name else "output head" if name.startswith("lm_head")
                else "attention" if ".attn." in name else "MLP" if ".mlp." in name else "norms")
        parts[kind] += p.numel()
    return parts


def plot_parameters():
    """Where the parameters of GPT-2 (four sizes) and of a Llama-style model of GPT-2
    small's size are."""
    import matplotlib.pyplot as plt

    configs = {
        name: GPTConfig.gpt2(name) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    }
    configs["Llama-style\n(GPT-2 small size)"] = GPTConfig.llama_style(vocab_size=50257)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    bottom = [0.0] * len(configs)
    breakdowns = [parameter_breakdown(c) for c in configs.values()]
    for kind in breakdowns[0]:
        share = [100 * b[kind] / sum(b.values()) for b in breakdowns]
        ax.bar(list(configs), share, bottom=bottom, label=kind)
        bottom = [b + s for b, s in zip(bottom, share)]
    labels = [f"{sum(b.values()) / 1e6:.0f}M" for b in breakdowns]
    for i, label in enumerate(labels):
        ax.text(i, 101, label, ha="center", va="bottom")
    ax.set(ylabel="% of the parameters", ylim=(0, 112), title="Where the parameters are")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig
