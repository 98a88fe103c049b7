"""Chapter 7: the encoder-decoder Transformer.

The architecture of "Attention Is All You Need" (Vaswani et al., 2017), assembled from the
components of Chapters 3-5: one shared token embedding (scaled by sqrt(d_model)), sinusoidal
positions, an encoder stack of bidirectional blocks, a decoder stack of causal blocks with
cross-attention, and an output layer that reuses the embedding matrix. The same Block class
makes the GPT of Chapter 6.

Then: the three attention masks, label smoothing, the warmup learning-rate schedule, greedy
decoding, and a CPU experiment that teaches the model to rewrite dates ("5 March 2021",
"3/5/2021", ...) in ISO form ("2021-03-05").

Shapes: B batch, S source length, T target length, C model width, V vocabulary size.

Needs: ch03_embeddings, ch04_attention, ch05_block.
"""

import datetime
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03_embeddings import SinusoidalPositionalEncoding, TokenEmbedding, stored_run
from ch04_attention import causal_mask
from ch05_block import Block, make_norm


# --8<-- [start:config]
@dataclass
class Seq2SeqConfig:
    """An encoder-decoder Transformer. The paper's base model is d_model=512, n_head=8,
    6 + 6 layers, d_ff=2048, dropout=0.1; the defaults here are a small one for a CPU."""

    vocab_size: int
    max_len: int = 64  # longest source or target sequence
    d_model: int = 64
    n_head: int = 4
    n_encoder_layer: int = 2
    n_decoder_layer: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    prenorm: bool = False  # False: post-norm, as in the paper
    mlp: str = "relu"  # the paper's activation
    pad_id: int = 0
    use_fused: bool = True  # torch's attention kernel; False: Chapter 4's code
# --8<-- [end:config]


# ---------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-1]
# Exercise 1: the three masks
def make_masks(src, tgt_in, pad_id):
    """The boolean masks (True = may attend) of the three attentions, shaped to
    broadcast over heads:

    encoder self-attention  (B, 1, 1, S): every source token sees every real source token;
    decoder self-attention  (B, 1, T, T): target position i sees real positions j <= i (causal);
    cross-attention         (B, 1, 1, S): every target position sees every real source token.
    src (B, S) and tgt_in (B, T) are token ids; a token equal to pad_id is padding, never attended.
    """
    src_real = src != pad_id  # (B, S)
    tgt_real = tgt_in != pad_id  # (B, T)
    encoder_mask = src_real[:, None, None, :]  # (B, 1, 1, S)
    causal = causal_mask(tgt_in.shape[1], device=tgt_in.device)  # (T, T) lower triangle
    decoder_mask = causal[None, None] & tgt_real[:, None, None, :]  # (B, 1, T, T)
    cross_mask = src_real[:, None, None, :]  # (B, 1, 1, S)
    return encoder_mask, decoder_mask, cross_mask
# --8<-- [end:exercise-1]


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

# --8<-- [start:model]
class Transformer(nn.Module):
    """Encoder-decoder Transformer: p(target | source), one target token at a time."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        # shared by source, target, output
        self.embed = TokenEmbedding(c.vocab_size, c.d_model, scale=True)
        self.positions = SinusoidalPositionalEncoding(c.d_model, c.max_len)
        self.drop = nn.Dropout(c.dropout)
        block = dict(
            d_ff=c.d_ff, dropout=c.dropout, mlp=c.mlp, prenorm=c.prenorm, use_fused=c.use_fused
        )
        self.encoder = nn.ModuleList(
            Block(c.d_model, c.n_head, **block) for _ in range(c.n_encoder_layer)
        )
        self.decoder = nn.ModuleList(Block(c.d_model, c.n_head, cross_attention=True, **block)
                                     for _ in range(c.n_decoder_layer))
        # Pre-norm leaves the residual stream unnormalized, so each stack ends with a norm.
        self.encoder_norm = make_norm("layernorm", c.d_model) if c.prenorm else nn.Identity()
        self.decoder_norm = make_norm("layernorm", c.d_model) if c.prenorm else nn.Identity()
        for p in self.parameters():  # Xavier-uniform matrices, as torch.nn.Transformer
            if p.dim() > 1 and p is not self.embed.weight:
                nn.init.xavier_uniform_(p)

    def embed_tokens(self, ids):  # (B, L) -> (B, L, C): sqrt(C) * embedding + sinusoid, dropout
        if ids.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence of {ids.shape[1]} tokens is longer than max_len={self.config.max_len}"
            )
        return self.drop(self.positions(self.embed(ids)))

    def encode(self, src):
        """src (B, S) -> memory (B, S, C): the encoder's reading of the source."""
        # (no target yet: any will do)
        encoder_mask, _, _ = make_masks(src, src[:, :1], self.config.pad_id)
        x = self.embed_tokens(src)
        for block in self.encoder:
            x = block(x, attn_mask=encoder_mask)  # bidirectional: no causal mask
        return self.encoder_norm(x)

    def decode(self, tgt_in, memory, src):
        """tgt_in (B, T), memory (B, S, C), src (B, S) -> logits (B, T, V) for the next tokens."""
        _, decoder_mask, cross_mask = make_masks(src, tgt_in, self.config.pad_id)
        x = self.embed_tokens(tgt_in)
        for block in self.decoder:  # causal self-attention, cross-attention to memory, MLP
            x = block(x, memory, attn_mask=decoder_mask, memory_mask=cross_mask)
        return self.decoder_norm(x) @ self.embed.weight.T  # (B, T, V): the shared matrix again

    def forward(self, src, tgt_in):
        """Teacher forcing: logits (B, T, V) for every next target token at once."""
        return self.decode(tgt_in, self.encode(src), src)

    @torch.no_grad()
    def cross_attention_weights(self, src, tgt_in):
        """The cross-attention weights (B, H, T, S) of every decoder block, for plots: a hook
        runs each cross-attention call again with need_weights=True."""
        weights = []

        def keep_weights(module, args, kwargs, output):
            # .forward: no hooks
            weights.append(module.forward(*args, **{**kwargs, "need_weights": True})[1])

        hooks = [
            block.cross_attn.register_forward_hook(keep_weights, with_kwargs=True)
            for block in self.decoder
        ]
        try:
            self(src, tgt_in)
        finally:
            for hook in hooks:
                hook.remove()
        return weights
# --8<-- [end:model]


# ---------------------------------------------------------------------------------------
# Label smoothing, the learning-rate schedule, decoding
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-2]
# Exercise 2: cross-entropy with label smoothing
def label_smoothing_loss(logits, targets, smoothing=0.1, ignore_index=-100):
    """Mean over the targets that are not ignore_index of the cross-entropy against the smoothed
    distribution q = (1 - smoothing) * one_hot(target) + smoothing / V (uniform over all V classes).

    The chapter derives
        -sum_k q_k log p_k = (1 - smoothing) * (-log p_target) + smoothing * mean_k(-log p_k).
    logits (N, V), targets (N,). Equal to F.cross_entropy(..., label_smoothing=smoothing).
    """
    log_probs = F.log_softmax(logits, dim=-1)  # (N, V)
    keep = targets != ignore_index
    nll = -log_probs.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)  # (N,) -log p_target
    uniform = -log_probs.mean(dim=-1)  # (N,) cross-entropy against the uniform distribution
    loss = (1 - smoothing) * nll + smoothing * uniform
    return loss[keep].mean()
# --8<-- [end:exercise-2]


# --8<-- [start:schedule]
def transformer_lr(step, d_model, warmup):
    """The paper's schedule: d_model**-0.5 * min(step**-0.5, step * warmup**-1.5), step >= 1.
    Linear warmup for `warmup` steps, then decay like 1/sqrt(step), forever."""
    step = max(step, 1)
    return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def warmup_linear_decay_lr(step, peak, warmup, total):
    """Linear warmup to `peak` in `warmup` steps, then linear decay to 0 at step `total`: for a
    run whose length is known in advance, the last steps are small and the model settles."""
    step = max(step, 1)
    return peak * min(step / warmup, max(0.0, (total - step) / (total - warmup)))
# --8<-- [end:schedule]


# --8<-- [start:exercise-3]
# Exercise 3: greedy decoding
@torch.no_grad()
def greedy_decode(model, src, bos_id, eos_id, max_new_tokens):
    """Translate src (B, S): encode it once, then start every target with bos_id and append the
    argmax of the decoder's last logits until every row has produced eos_id or max_new_tokens
    tokens were made. Returns (B, L) ids without the BOS, L <= max_new_tokens; after a row's
    EOS, fill it with the model's pad_id (which the decoder mask then ignores).
    """
    memory = model.encode(src)  # (B, S, C), computed once
    out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        logits = model.decode(out, memory, src)  # (B, t, V)
        next_id = logits[:, -1].argmax(dim=-1)  # (B,)
        next_id = torch.where(done, torch.full_like(next_id, model.config.pad_id), next_id)
        out = torch.cat([out, next_id[:, None]], dim=1)
        done |= next_id == eos_id
        if done.all():
            break
    return out[:, 1:]
# --8<-- [end:exercise-3]


# ---------------------------------------------------------------------------------------
# The task: dates in many formats -> ISO 8601
# ---------------------------------------------------------------------------------------

# --8<-- [start:dates]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DATE_FORMATS = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 5 March 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",  # Mar 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # 5 Mar 2021
    lambda d: f"{d.month}/{d.day}/{d.year}",  # 3/5/2021, the US order
    lambda d: f"{d.day}.{d.month}.{d.year}",  # 5.3.2021, the European order
]
FIRST_DAY, LAST_DAY = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()


def is_test_date(date):
    """Every 10th day of the calendar is held out: test dates never appear in
    training, in any format."""
    return date.toordinal() % 10 == 0


def make_date_pairs(n, split="train", seed=0):
    """n pairs (source, target) like ("5 Mar 2021", "2021-03-05"), dates of 1900-2099 drawn
    uniformly from the split (train or test), formats uniformly from DATE_FORMATS."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    pairs = []
    while len(pairs) < n:
        date = datetime.date.fromordinal(rng.randint(FIRST_DAY, LAST_DAY))
        if is_test_date(date) == (split == "test"):
            pairs.append((rng.choice(DATE_FORMATS)(date), date.isoformat()))
    return pairs


class CharVocab:
    """Characters <-> ids, with <pad> = 0, <bos> = 1, <eos> = 2."""

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, texts):
        self.chars = ["<pad>", "<bos>", "<eos>"] + sorted(set("".join(texts)))
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        unknown = set(text) - self.index.keys()
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {sorted(unknown)}")
        return [self.index[ch] for ch in text]

    def decode(self, ids):
        """Ids -> text, stopping at the first <eos> and skipping <pad> and <bos>."""
        out = []
        for i in ids:
            if i == self.EOS:
                break
            if i > self.EOS:
                out.append(self.chars[i])
        return "".join(out)


def date_vocab():
    """Every character any format or ISO date can contain."""
    return CharVocab(MONTHS + ["0123456789", " ,./-"])


def encode_batch(pairs, vocab):
    """Pairs of strings -> src (B, S) padded on the right, tgt_in = <bos> y, tgt_out = y <eos>."""
    pad = vocab.PAD
    src = [vocab.encode(s) for s, _ in pairs]
    tgt = [vocab.encode(t) for _, t in pairs]
    S, T = max(map(len, src)), max(map(len, tgt)) + 1
    src_ids = torch.tensor([s + [pad] * (S - len(s)) for s in src])
    tgt_in = torch.tensor([[vocab.BOS] + t + [pad] * (T - 1 - len(t)) for t in tgt])
    # -100: ignored
    tgt_out = torch.tensor([t + [vocab.EOS] + [-100] * (T - 1 - len(t)) for t in tgt])
    return src_ids, tgt_in, tgt_out
# --8<-- [end:dates]


# --8<-- [start:train]
def exact_match(model, pairs, vocab, batch_size=500):
    """Fraction of pairs whose greedy translation is exactly the target string."""
    model.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        src, _, _ = encode_batch(chunk, vocab)
        out = greedy_decode(model, src, vocab.BOS, vocab.EOS, max_new_tokens=12)
        correct += sum(vocab.decode(row) == target for row, (_, target) in zip(out.tolist(), chunk))
    return correct / len(pairs)


def train_dates(config=None, steps=400, batch_size=128, peak_lr=3e-3, warmup=100, smoothing=0.1,
                seed=0, log_every=50, stop_after=None):
    """Train a Transformer to rewrite dates in ISO form; returns (model, vocab, history).

    Adam with the paper's betas, warmup then linear decay, label smoothing, fresh random
    pairs at every step (training dates only). The default model has no dropout: with fresh
    data at every step there is no overfitting to fight. history: a dict per log_every steps.
    stop_after ends the run after that many steps, on the schedule of a `steps`-step run.
    """
    torch.manual_seed(seed)
    vocab = date_vocab()
    config = config or Seq2SeqConfig(vocab_size=len(vocab), dropout=0.0)
    model = Transformer(config)
    opt = torch.optim.Adam(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), eps=1e-9)
    data = make_date_pairs(steps * batch_size, "train", seed)
    history, start = [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = warmup_linear_decay_lr(step, peak_lr, warmup, steps)
        src, tgt_in, tgt_out = encode_batch(data[(step - 1) * batch_size:step * batch_size], vocab)
        logits = model(src, tgt_in)  # (B, T, V): all target positions at once (teacher forcing)
        loss = label_smoothing_loss(logits.flatten(0, 1), tgt_out.flatten(), smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == 1:
            history.append(dict(step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"],
                                seconds=time.perf_counter() - start))
        if step == stop_after:
            break
    model.eval()
    return model, vocab, history
# --8<-- [end:train]


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def plot_schedule():
    """Learning-rate schedules (the paper's, and ours for a short run), and a
    label-smoothed target."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.3))
    steps = range(1, 100_001)
    ax1.plot(steps, [transformer_lr(s, 512, 4000) for s in steps])
    ax1.set(xlabel="step", ylabel="learning rate", title="The paper: d_model=512, warmup=4000")
    steps = range(1, 401)
    ax2.plot(steps, [warmup_linear_decay_lr(s, 3e-3, 100, 400) for s in steps], color="C1")
    ax2.set(xlabel="step", title="Ours: 400 steps, warmup 100, peak 3e-3")
    V, eps, target = 10, 0.1, 3
    q = [eps / V + (1 - eps) * (k == target) for k in range(V)]
    ax3.bar(range(V), q, color=["C1" if k == target else "C0" for k in range(V)])
    ax3.set(xlabel="class k", ylabel="q_k", xticks=range(V), title=f"Smoothed target, eps = {eps}")
    fig.tight_layout()
    return fig


def cross_attention_maps(model, vocab, examples):
    """Greedy translations of the examples and the cross-attention of the last decoder block
    (mean over heads): [{"source", "output", "weights": output x source}] for each example."""
    src, _, _ = encode_batch([(s, "") for s in examples], vocab)
    out = greedy_decode(model, src, vocab.BOS, vocab.EOS, max_new_tokens=11)
    tgt_in = torch.cat([torch.full((len(examples), 1), vocab.BOS), out[:, :-1]], dim=1)
    weights = model.cross_attention_weights(src, tgt_in)[-1].mean(dim=1)  # (B, T, S)
    maps = []
    for w, source, row in zip(weights, examples, out.tolist()):
        output = vocab.decode(row)
        maps.append({"source": source, "output": output,
                     "weights": w[:len(output), :len(source)].tolist()})
    return maps


def cross_attention_history(steps=300, seed=0,
                            examples=("5 March 2021", "7/14/1989", "Sep 7, 2045"), stop_after=None):
    """The run the cross-attention figure is drawn from: one encoder and one decoder block,
    trained for `steps` (about 12 s on 2 cores); its loss at every step and its maps."""
    vocab = date_vocab()
    config = Seq2SeqConfig(len(vocab), n_encoder_layer=1, n_decoder_layer=1, dropout=0.0)
    model, vocab, history = train_dates(config, steps=steps, batch_size=64, peak_lr=3e-3,
                                        warmup=75, seed=seed, log_every=1, stop_after=stop_after)
    return {"steps": steps, "seed": seed, "batch_size": 64, "peak_lr": 3e-3, "warmup": 75,
            "losses": [record["loss"] for record in history],
            "maps": cross_attention_maps(model, vocab, examples)}


def plot_cross_attention(run=None):
    """Cross-attention maps of the stored run (or of `run`, a cross_attention_history()):
    which source characters each output character reads."""
    import matplotlib.pyplot as plt

    maps = (run or stored_run("ch07_transformer.cross_attention"))["maps"]
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4.4))
    for ax, m in zip(axes, maps):
        ax.imshow(torch.tensor(m["weights"]).numpy(), cmap="Blues", vmin=0)
        ax.set_xticks(range(len(m["source"])), list(m["source"]))
        ax.set_yticks(range(len(m["output"])), list(m["output"]))
        ax.set(title=f"{m['source']!r} -> {m['output']!r}", xlabel="source character",
               ylabel="output character")
    fig.tight_layout()
    return fig
