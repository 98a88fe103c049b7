"""Chapter 8: training a language model.

The loss (cross-entropy, perplexity, bits per byte), AdamW written from scratch, the
warmup + cosine learning-rate schedule, gradient clipping and accumulation, mixed
precision chosen per device, token data and batches, atomic checkpoints that resume
exactly, and a command-line trainer for the GPT of chapter 6:

    .venv/bin/python code/ch08_training.py --data shakespeare --out-dir runs/shakespeare

The loop, ``train``, is the book's only one: it trains any model on any source of batches
with any loss, so later chapters fine-tune pretrained models with it (Chapters 13 and 14)
and run it in many processes (Chapter 11).

Depends on torch, numpy (token files), the standard library and chapters 2 and 6.
safetensors (checkpoints), tqdm (progress bar) and matplotlib (plots) are imported where
they are used.

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt.
"""

# --8<-- [start:imports]
import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import socket
import sys
import time
import traceback
import tomllib
import types
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ch02_tokenizer import (atomic_path, load_token_file, python_docs_text, split_train_val,
                            write_atomically, write_token_file)
from ch03_embeddings import stored_run  # the runs the book's figures are drawn from
from ch06_gpt import GPT, GPTConfig, gpt_num_parameters, setting
# --8<-- [end:imports]


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------

# --8<-- [start:loss]
def lm_loss(logits, targets):
    """Mean cross-entropy of next-token predictions: logits (B, T, V), targets (B, T).
    A target of -1 is left out of the mean (padding, or a token not to be learned)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-1)


def naive_cross_entropy(logits, targets):
    """softmax, then log: correct on paper, but exp overflows for large logits."""
    probs = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    return -probs[torch.arange(len(targets)), targets].log().mean()


def perplexity(loss):
    """e^loss: the number of equally likely tokens the model is as unsure as."""
    return math.exp(loss)


def bits_per_byte(loss, n_tokens, n_bytes):
    """Mean loss in nats per token -> bits per byte of text, comparable across tokenizers."""
    return loss * n_tokens / (n_bytes * math.log(2))
# --8<-- [end:loss]


# ---------------------------------------------------------------------------
# AdamW from scratch
# ---------------------------------------------------------------------------

# --8<-- [start:exercise-1]
# Exercise 1: one AdamW update
def adamw_update(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Update param, m and v in place for AdamW step number ``step`` (1, 2, ...).

    m and v are the running averages of the gradient and of its square. Correct their
    bias towards 0 by dividing by 1 - beta**step, shrink the parameter by lr *
    weight_decay (decoupled weight decay), then move it by lr * m_hat / (sqrt(v_hat) + eps).
    """
    m.mul_(beta1).add_(grad, alpha=1 - beta1)  # m = b1 m + (1 - b1) g
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    param.mul_(1 - lr * weight_decay)  # decay the weight itself, not the gradient
    param.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)
# --8<-- [end:exercise-1]


# --8<-- [start:adamw]
class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # first step: moments start at zero
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(),
                             group["lr"], beta1, beta2, group["eps"], group["weight_decay"])


def param_groups(model, weight_decay):
    """Decay matrices (weights, embeddings); leave biases and norm gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
# --8<-- [end:adamw]


# ---------------------------------------------------------------------------
# Learning-rate schedule, clipping, accumulation
# ---------------------------------------------------------------------------

# --8<-- [start:exercise-2]
# Exercise 2: linear warmup, then cosine decay
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    """The learning rate at ``step`` (0-based).

    Rise linearly from max_lr / warmup_steps (step 0) to max_lr (step warmup_steps - 1),
    then follow half a cosine from there down to min_lr, reached at step decay_steps, and
    stay at min_lr after that.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps + 1) / (decay_steps - warmup_steps + 1)  # 0 -> 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
# --8<-- [end:exercise-2]


# --8<-- [start:clip]
def clip_grad_norm(parameters, max_norm):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    Returns the norm before clipping. Scaling every gradient by the same factor keeps the
    update's direction and only shortens it. A norm that is not finite changes nothing."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:  # nothing to clip, as torch.nn.utils.clip_grad_norm_
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    # NaN or inf: leave them for the trainer to report
    scale = torch.where(torch.isfinite(total), scale, 1.0)
    for g in grads:
        g.mul_(scale)
    return total
# --8<-- [end:clip]


# --8<-- [start:exercise-3]
# Exercise 3: gradient accumulation
def accumulate_gradients(model, micro_batches):
    """Backpropagate the mean loss over several micro-batches of equal size.

    micro_batches is a list of (x, y) pairs. Leave in .grad exactly the gradient of the
    loss of one batch made of all of them, and return that loss as a float. Hint: the
    mean over k equal micro-batches is the sum of their means divided by k.
    """
    total = 0.0
    for x, y in micro_batches:
        _, loss = model(x, y)
        (loss / len(micro_batches)).backward()  # gradients add up across backward calls
        total += loss.item() / len(micro_batches)
    return total
# --8<-- [end:exercise-3]


# ---------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------

# --8<-- [start:precision]
def float_formats():
    """Range and precision of the floating-point formats used in training."""
    rows = {}
    for name, dtype in [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        info = torch.finfo(dtype)
        rows[name] = dict(bits=info.bits, max=info.max, smallest_normal=info.tiny, epsilon=info.eps)
    return rows


def matmul_gflops(dtype, device="cpu", n=256, repeats=3):
    """Measured throughput of an n x n matrix product in GFLOP/s (2 n^3 flops each)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def seconds(count):
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds(2)  # warm up
    count = max(1, int(0.02 / max(seconds(1), 1e-6)))  # about 20 ms per timing
    best = min(seconds(count) for _ in range(repeats))
    return 2 * n**3 * count / best / 1e9


def choose_precision(device):
    """(autocast dtype or None, whether to scale the loss) for training on ``device``.

    CUDA: bf16 where the GPU supports it (fp32's range, so no loss scaling), else fp16 with
    a GradScaler. CPU: fp32. Measured on the book's small models, bf16 autocast made a
    training step slower on both CPUs tried: 2x on one without native bf16, and 1.5x even on
    one whose bf16 matrix products are 3x faster (the casts cost more than they save).
    Pass --precision bf16 to try it on yours."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True
    return None, False


def autocast(device, dtype):
    """torch.autocast for the device, or nothing when training in full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
# --8<-- [end:precision]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

# --8<-- [start:char-tokenizer]
class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's Shakespeare baseline)."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(set(text))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return [self.index[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in the alphabet") from None

    def decode(self, ids):
        if any(not 0 <= i < len(self.chars) for i in ids):
            raise ValueError(f"token ids must lie in [0, {len(self.chars)})")
        return "".join(self.chars[i] for i in ids)
# --8<-- [end:char-tokenizer]


# --8<-- [start:corpus]
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_DIR = Path(
    os.environ.get("LLM_FROM_SCRATCH_CACHE", Path.home() / ".cache" / "llm-from-scratch"))


def fetch(url, sha256, path):
    """Download ``url`` to ``path`` once, verify its SHA-256, write it atomically."""
    path = Path(path)
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{url}: SHA-256 {digest} does not match the expected {sha256}")
    write_atomically(path, data)
    return path


CORPORA = ("python-docs", "shakespeare")  # built-in names; anything else is a file path
PYTHON_DOCS = "Python documentation (built in)"


def read_corpus(name="python-docs"):
    """(text, source) of the text to train on: "python-docs" (ships with Python, no
    download), "shakespeare" (Tiny Shakespeare, downloaded once and cached), or a file path.
    source says what was actually read: the cached file, the path, or PYTHON_DOCS."""
    if name == "python-docs":
        return python_docs_text(), PYTHON_DOCS
    if name == "shakespeare":
        cached = CACHE_DIR / "tinyshakespeare.txt"
        try:
            path = fetch(TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_SHA256, cached)
        except (OSError, ValueError) as error:  # offline, or a corrupted download
            warnings.warn(f"could not get Tiny Shakespeare ({error}), so this run trains on the "
                          f"{PYTHON_DOCS} instead. To train on Shakespeare offline, save "
                          f"{TINY_SHAKESPEARE_URL} as {cached} (the folder is "
                          "$LLM_FROM_SCRATCH_CACHE) or pass --data PATH to a copy")
            return python_docs_text(), f"{PYTHON_DOCS}, in place of Tiny Shakespeare (offline)"
        return read_text_file(path), str(path)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus named {name!r}: use {' or '.join(CORPORA)}, "
                                "or the path of a text file")
    return read_text_file(path), str(path.resolve())


def read_text_file(path):
    """The text of a UTF-8 file; a binary or otherwise encoded file is an error naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded): "
                         "train on a text file, converted to UTF-8") from None
    if "\0" in text:
        raise ValueError(f"{path} holds NUL bytes: it looks like a binary file, not text")
    return text


def load_corpus(name="python-docs"):
    """The text of read_corpus(name)."""
    return read_corpus(name)[0]


def corpus_record(name, text, source):
    """What a run was trained on, as data.json in its folder records it (run_data_info)."""
    return {"corpus": name, "source": source,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}
# --8<-- [end:corpus]


# --8<-- [start:batches]
def get_batch(data, block_size, batch_size, generator, device="cpu"):
    """Random windows of a token array: x (B, T) and the next tokens y (B, T)."""
    if len(data) <= block_size:
        raise ValueError(f"{len(data)} tokens are too few for windows of {block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = np.stack([np.asarray(data[s : s + block_size + 1], dtype=np.int64)
                        for s in starts.tolist()])
    windows = torch.from_numpy(windows).to(device)  # (B, T + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # y: x shifted by one


class TokenBatches:
    """A source of batches for train(): random windows of a training and a validation token
    array. Any object with this get_batch method can feed train() (Chapter 13's padded
    fine-tuning examples do)."""

    def __init__(self, train, val, block_size):
        self.splits = {"train": train, "val": val}
        self.block_size = block_size

    def get_batch(self, split, batch_size, generator, device="cpu"):
        """(x, y), each (batch_size, block_size), drawn with ``generator``."""
        return get_batch(self.splits[split], self.block_size, batch_size, generator, device)


def next_token_loss(model, batch):
    """train()'s default loss: the model's mean next-token loss on a batch (x, y) or
    (x, y, loss_mask), where a False in the (B, T) loss_mask leaves that target out."""
    x, y, *mask = batch
    if mask:
        y = y.masked_fill(~mask[0], -1)  # -1: ignored by the model's cross-entropy
    _, loss = model(x, y)
    return loss


class WindowDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of a token array, for torch.utils.data.DataLoader."""

    def __init__(self, data, block_size):
        self.data, self.block_size = data, block_size

    def __len__(self):
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, i):
        start = i * self.block_size
        window = torch.from_numpy(
            np.asarray(self.data[start : start + self.block_size + 1], dtype=np.int64))
        return window[:-1], window[1:]
# --8<-- [end:batches]


# ---------------------------------------------------------------------------
# Checkpoints: atomic, pickle-free, complete
# ---------------------------------------------------------------------------

# --8<-- [start:checkpoint]
def save_checkpoint(path, model, optimizer, step, generator, meta, frozen=True):
    """Model, optimizer moments, step, random states and ``meta`` in one safetensors file.
    frozen=False leaves out the parameters that are not trained (requires_grad False): the
    checkpoint of a fine-tuning run then holds only what changed, and resuming it needs the
    same base model."""
    from safetensors.torch import save

    weights = model.state_dict(keep_vars=True)
    if not frozen:
        weights = {k: v for k, v in weights.items()
                   if not isinstance(v, torch.nn.Parameter) or v.requires_grad}
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in weights.items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batches"] = generator.get_state()
    info = dict(meta, step=step, param_groups=_tag_tuples(optim["param_groups"]), frozen=frozen)
    # tied weights share storage: safetensors wants each stored once
    tensors = _untie(tensors)
    write_atomically(path, save(tensors, metadata={"book": json.dumps(info)}))


def _untie(tensors):
    seen = {}
    for key, value in tensors.items():
        ptr = (value.data_ptr(), value.shape)
        if ptr in seen:
            tensors[key] = value.clone()
        seen[ptr] = key
    return tensors


def _tag_tuples(value):
    """JSON has lists but no tuples: mark tuples (AdamW's betas) so they come back as tuples."""
    if isinstance(value, tuple):
        return {"tuple": [_tag_tuples(v) for v in value]}
    if isinstance(value, list):
        return [_tag_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag_tuples(v) for k, v in value.items()}
    return value


def _untag_tuples(value):
    if isinstance(value, dict):
        if value.keys() == {"tuple"}:
            return tuple(_untag_tuples(v) for v in value["tuple"])
        return {k: _untag_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_tuples(v) for v in value]
    return value


def load_checkpoint(path, model, optimizer=None, generator=None, restore_rng=False):
    """Restore what save_checkpoint wrote; returns its metadata (with "step").

    The optimizer comes back exactly as it was saved, and ``generator`` (the data position)
    too. The global random state (dropout's) is restored only with restore_rng=True, as
    resuming a run needs: loading a model to use it leaves the caller's random state alone.
    safetensors holds only tensors and JSON: loading it cannot run code, unlike a pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        info = json.loads(_safetensors_metadata(data)["book"])
    except (SafetensorError, KeyError, ValueError, OSError) as error:
        raise ValueError(
            f"{path} is not a checkpoint of this book (safetensors): {error}") from None
    if not (isinstance(info, dict) and isinstance(info.get("step"), int)
            and isinstance(info.get("param_groups"), list)):
        raise ValueError(f"{path}: its metadata is not what save_checkpoint writes "
                         "(a step and param_groups)")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    check_weights(path, weights, model.state_dict(), every=info.get("frozen", True))
    model.load_state_dict(weights, strict=False)  # check_weights has compared names and shapes
    if optimizer is not None:
        state = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(
            {"state": state, "param_groups": _untag_tuples(info["param_groups"])})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
    if generator is not None:
        generator.set_state(tensors["rng.batches"])
    return info


def check_weights(path, weights, expected, every=True):
    """One clear error when the tensors of a checkpoint do not fit a model's state dict
    ``expected``: missing (if ``every`` one is needed), unknown or of another shape, or
    holding NaN or inf (saved by a run that diverged)."""
    missing = [k for k in expected if k not in weights] if every else []
    unknown = [k for k in weights if k not in expected]
    reshaped = [f"{k} {tuple(weights[k].shape)}, not {tuple(v.shape)}"
                for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems = [f"{kind} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                for kind, names in [("missing", missing), ("unknown", unknown),
                                    ("of another shape", reshaped)] if names]
    if problems:
        raise ValueError(f"{path} does not fit this model; tensors {'; '.join(problems)}")
    for name, value in weights.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{path}: {name} holds NaN or inf; the run that saved it had diverged")


def _safetensors_metadata(data):
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


def checkpoint_metadata(path):
    """What save_checkpoint stored beside the tensors (config, history, step), read from the
    file's header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["book"])
    except (SafetensorError, KeyError, ValueError, OSError) as error:
        raise ValueError(
            f"{path} is not a checkpoint of this book (safetensors): {error!r}") from None
# --8<-- [end:checkpoint]


# --8<-- [start:run-folder]
@contextlib.contextmanager
def lock_run_folder(out_dir):
    """Context: out_dir belongs to this process until the block ends. A second trainer on
    the same folder gets an error naming the first; the operating system releases the lock
    when the process ends, however it ends, so a killed run never leaves a stale lock.
    (Without fcntl, on Windows, the folder is used unlocked, with a warning.)"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        warnings.warn(f"cannot lock {out} on this platform: make sure no other trainer uses it")
        yield
        return
    with open(out / "train.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not said who it is yet"
            raise RuntimeError(f"{out} is in use by another trainer ({holder}): "
                               "wait for it to end, or train in another --out-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield


# The temporary name Chapter 2's atomic_path gives path: .{stem}.{8 hex digits}.tmp{suffix}
ATOMIC_TMP_NAME = re.compile(r"\.(?P<stem>.+)\.[0-9a-f]{8}\.tmp(?P<suffix>(\.[^.]+)?)")


def remove_leftovers(folder):
    """Delete the temporary files of atomic_path that a run killed mid-write left in folder
    (only those); returns their names. Call it only while holding the folder's lock: another
    trainer's files in progress look the same."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        match = ATOMIC_TMP_NAME.fullmatch(path.name)
        if (match and path.is_file()
                and Path(match["stem"] + match["suffix"]).suffix == match["suffix"]):
            path.unlink()
            removed.append(path.name)
    return removed
# --8<-- [end:run-folder]


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------

# --8<-- [start:train-config]
def nanogpt_model():
    """nanoGPT's CPU model: 4 layers, 4 heads, 128 wide, 64 characters of context, no
    biases, exact GELU (Chapter 6's GPTConfig; vocab_size is set from the data)."""
    return GPTConfig(block_size=64, n_layer=4, n_head=4, d_model=128, bias=False, mlp="gelu")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. Each field's help text is its command-line flag's."""

    # data
    data: str = setting("python-docs", "the text: python-docs (built in), shakespeare (Tiny "
                                       "Shakespeare, downloaded once) or the path of a UTF-8 file")
    val_fraction: float = setting(0.1, "the share of the text, at its end, kept for validation")
    # the model: every setting of Chapter 6's GPTConfig; train() sets vocab_size from the data
    model: GPTConfig = dataclasses.field(default_factory=nanogpt_model)
    # optimisation
    batch_size: int = setting(12, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches whose gradients add up to one step")
    max_iters: int = setting(2000, "optimizer steps of the whole run")
    lr: float = setting(1e-3, "peak learning rate, reached at the end of the warmup")
    min_lr: float = setting(1e-4, "the learning rate the cosine decays to")
    warmup_iters: int = setting(100, "steps of linear warmup")
    decay_iters: int = setting(2000, "the step where the cosine reaches min_lr")
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay of the matrices")
    beta1: float = setting(0.9, "AdamW's decay rate of the running mean of gradients")
    beta2: float = setting(0.99, "AdamW's decay rate of the running mean of squared gradients")
    grad_clip: float = setting(1.0, "the largest global norm of the gradients; "
                                    "larger ones are scaled")
    fused_adamw: bool = setting(False, "PyTorch's one-kernel AdamW instead of the book's "
                                       "(same update)")
    # evaluation, samples, checkpoints
    eval_interval: int = setting(250, "steps between evaluations, samples and checkpoints")
    eval_iters: int = setting(200, "batches per validation loss; 0: no validation loss")
    sample_tokens: int = setting(200, "characters of sample text at each evaluation; 0: none")
    out_dir: str | None = setting("runs/default", "the run's folder (checkpoint, token files, loss "
                                                  "plot); a run in it resumes. None: keep nothing")
    save_frozen: bool = setting(True, "checkpoints hold frozen weights too "
                                      "(off: fine-tuning a big model)")
    # machine
    device: str = setting("auto", "auto (cuda if there is one), cpu, cuda, cuda:1, mps")
    precision: str = setting("auto", "auto (bf16 or fp16 on a GPU, fp32 on a CPU), "
                                     "fp32, bf16, fp16")
    compile: bool = setting(False, "run the model through torch.compile")
    seed: int = setting(1337, "seed of the initial weights, dropout and batches")
    progress: bool = setting(True, "show a progress bar (tqdm)")

    def __post_init__(self):
        if isinstance(self.model, dict):  # as stored in a checkpoint or a TOML file
            self.model = GPTConfig(**check_types(GPTConfig, self.model))
        check_settings(self)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AT_LEAST_1 = ("batch_size", "grad_accum", "max_iters", "eval_interval")
AT_LEAST_0 = ("eval_iters", "sample_tokens", "warmup_iters", "decay_iters", "lr", "min_lr",
              "weight_decay")


def check_settings(cfg):
    """One clear error for the first setting of the wrong type or out of range, before any
    work: a TOML file's n_layer = "two", max_iters = 3.5 or progress = "no", --lr nan."""
    if not isinstance(cfg.model, GPTConfig):
        raise ValueError(f"model must be a GPTConfig, got {cfg.model!r}")
    check_types(TrainConfig, {f.name: getattr(cfg, f.name)
                              for f in dataclasses.fields(cfg) if f.name != "model"})
    for name in AT_LEAST_1:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in AT_LEAST_0:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.grad_clip > 0 and 0 < cfg.val_fraction < 1):
        raise ValueError("lr and grad_clip must be positive and val_fraction in (0, 1), "
                         f"got lr={cfg.lr}, grad_clip={cfg.grad_clip}, "
                         f"val_fraction={cfg.val_fraction}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ValueError(f"beta1 and beta2 must be in [0, 1), got {cfg.beta1} and {cfg.beta2}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(
                f"unknown device {cfg.device!r}: use auto, cpu, cuda, cuda:1, mps, ...") from None


def check_types(cls, values):
    """values (a dict of settings of the dataclass cls), each of its field's type: an int is
    a float, but a bool is not an int, and a float must be finite. Returns values."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        kinds = (fields[name].__args__ if isinstance(fields.get(name), types.UnionType)
                 else (fields.get(name),))
        if name not in fields or (value is None and type(None) in kinds):
            continue  # an unknown name is the dataclass's own error
        kind = next(k for k in kinds if k is not type(None))
        if not TYPE_CHECKS.get(kind)(value):
            raise ValueError(f"{name} must be {TYPE_WORDS[kind]}, got {value!r}")
    return values


TYPE_CHECKS = {bool: lambda v: isinstance(v, bool),
               int: lambda v: isinstance(v, int) and not isinstance(v, bool),
               float: lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v)),
               str: lambda v: isinstance(v, str)}
TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a finite number",
              str: "a string"}


# TrainConfig's defaults are nanoGPT's CPU recipe; the capstone at the end of the chapter
# explains the book's: rotary positions, ReLU, a 3x higher peak learning rate, a shorter
# warmup and schedule, and PyTorch's fused AdamW. "tiny" trains a 2-layer model in seconds,
# for the figures and examples of the chapters.
RECIPES = {
    "nanogpt": {},
    "book": dict(positions="rope", mlp="relu", lr=3e-3, warmup_iters=50, max_iters=900,
                 decay_iters=900, fused_adamw=True),
    "tiny": dict(n_layer=2, n_head=2, d_model=64, positions="rope", batch_size=16, max_iters=300,
                 warmup_iters=30, decay_iters=300, lr=3e-3, eval_interval=100, eval_iters=10,
                 sample_tokens=0, progress=False),
}
MODEL_SETTINGS = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]


def make_config(recipe="nanogpt", **settings):
    """A TrainConfig from one of RECIPES and flat overrides, where a GPTConfig field
    (n_layer=2, positions="rope", ...) sets the model's: make_config("tiny", max_iters=50)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    values = {**RECIPES[recipe], **settings}
    model = check_types(GPTConfig, {name: values.pop(name)
                                    for name in MODEL_SETTINGS if name in values})
    cfg = TrainConfig(**values)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
# --8<-- [end:train-config]


# --8<-- [start:estimate-loss]
@torch.no_grad()
def estimate_loss(model, data, cfg, device, amp_dtype, loss_fn=None, runtime=None):
    """Mean loss over cfg.eval_iters validation batches of ``data``, drawn with their own
    fixed seed so that evaluating never changes the training batches that follow. With many
    processes (``runtime``, see train), each scores its share of every batch and they average."""
    runtime = runtime or SingleProcess()
    loss_fn = loss_fn or next_token_loss
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        batch = runtime.get_batch(data, "val", cfg.batch_size, generator, device)
        with autocast(device, amp_dtype):
            losses.append(loss_fn(model, batch).item())
    model.train()
    return runtime.mean(sum(losses) / len(losses))


@torch.no_grad()
def draw_sample(model, start_ids, n_tokens, block_size, generator, temperature=1.0):
    """Draw n_tokens ids from the model, one at a time, to show progress while training
    (Chapter 9 generates text properly)."""
    ids = torch.tensor([start_ids], device=next(model.parameters()).device)
    for _ in range(n_tokens):
        logits, _ = model(ids[:, -block_size:])
        probs = torch.softmax(logits[0, -1].float() / temperature, dim=-1).cpu()
        next_id = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, next_id.to(ids.device).view(1, 1)], dim=1)
    return ids[0, len(start_ids) :].tolist()
# --8<-- [end:estimate-loss]


# --8<-- [start:prepare]
def prepare_data(cfg, write=True, corpus=None):
    """train()'s default data: the characters of cfg.data as tokens (a CharTokenizer), the
    first 1 - val_fraction for training. Returns (tokenizer, TokenBatches). With an out_dir
    they are written as token files and memory-mapped, with data.json recording the text
    (run_data_info); write=False only opens the files that another process wrote (Chapter
    11). corpus: (text, source) from read_corpus(cfg.data), if it was read already."""
    block_size = cfg.model.block_size
    out = None if cfg.out_dir is None else Path(cfg.out_dir)
    if out is None or write:
        text, source = corpus or read_corpus(cfg.data)
        tokenizer = CharTokenizer.from_text(text)
        train_ids, val_ids = split_train_val(np.array(tokenizer.encode(text), dtype=np.int64),
                                             cfg.val_fraction)
        # refused before any work
        for split, ids in [("training", train_ids), ("validation", val_ids)]:
            if len(ids) <= block_size:
                raise ValueError(f"{source}: its {split} part has {len(ids)} characters, too few "
                                 f"for windows of {block_size + 1}; use a longer text or a "
                                 "smaller --block-size")
        if out is None:
            return tokenizer, TokenBatches(train_ids.astype(np.uint16), val_ids.astype(np.uint16),
                                           block_size)
        record = corpus_record(cfg.data, text, source)
        if run_data_info(out) != record:  # a new folder, or one whose run has not started
            refuse_other_data(out, record)
            out.mkdir(parents=True, exist_ok=True)
            write_token_file(train_ids, out / "train.npy", tokenizer.vocab_size)
            write_token_file(val_ids, out / "val.npy", tokenizer.vocab_size)
            write_atomically(out / "tokenizer.json",
                             json.dumps({"chars": tokenizer.chars}).encode())
            # last: files complete
            write_atomically(out / "data.json", json.dumps(record, indent=1).encode())
    batches = TokenBatches(load_token_file(out / "train.npy"), load_token_file(out / "val.npy"),
                           block_size)
    return load_run_tokenizer(out), batches


def run_data_info(out_dir):
    """What the run in out_dir was trained on, as prepare_data recorded it: a dict with
    "corpus" (the name given), "source" (what was read), "sha256" and "chars" of the text;
    None for a folder without a record."""
    path = Path(out_dir) / "data.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path} is not the JSON record of a run's data") from None


def refuse_other_data(out, record):
    """A run folder with a checkpoint keeps the data it was trained on: resuming on another
    text would silently remap its token ids."""
    if not (out / "checkpoint.safetensors").exists():
        return
    recorded = run_data_info(out)
    if recorded is None:  # a run from before data.json: its token files still say what it read
        if not all((out / name).exists() for name in ("tokenizer.json", "train.npy", "val.npy")):
            raise ValueError(f"{out} holds a checkpoint but no record of its data: "
                             "train in a new --out-dir")
        tokenizer = load_run_tokenizer(out)
        ids = np.concatenate([load_token_file(out / "train.npy"), load_token_file(out / "val.npy")])
        recorded = corpus_record("its token files", tokenizer.decode(ids.tolist()),
                                 f"{out}/train.npy, val.npy")
    if recorded["sha256"] != record["sha256"]:
        raise ValueError(f"{out} holds a run trained on {recorded['source']} "
                         f"({recorded['chars']:,} characters, sha256 {recorded['sha256'][:12]}), "
                         f"and --data {record['corpus']} is another text ({record['chars']:,} "
                         f"characters, sha256 {record['sha256'][:12]}): train on it in a "
                         "new --out-dir")


def load_run_tokenizer(out_dir):
    """The character tokenizer that prepare_data saved in a run's out_dir."""
    return CharTokenizer(json.loads((Path(out_dir) / "tokenizer.json").read_bytes())["chars"])


def model_from_checkpoint(path):
    """The trained GPT in a checkpoint, built from the GPTConfig stored with it, in eval
    mode; returns (model, metadata). Unlike resuming, using a model leaves the global random
    state as it was: neither building nor loading it reseeds the caller's code."""
    info = checkpoint_metadata(path)
    try:
        config = TrainConfig(**info["config"]).model  # checks every setting's type
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: its metadata holds no valid configuration ({error})") from None
    check_fits_in_memory(config, path)
    with torch.random.fork_rng(devices=[]):  # the random initial weights are overwritten anyway
        model = GPT(config)
    load_checkpoint(path, model)
    return model.eval(), info


def check_fits_in_memory(config, what, device="cpu"):
    """Refuse a model whose float32 weights alone exceed the memory of ``device``, from its
    configuration, before anything is allocated (a crafted d_model = 2**20 asks for terabytes)."""
    need = 4 * gpt_num_parameters(config)
    have = memory_bytes(device)
    if have is not None and need > have:
        raise MemoryError(f"{what}: the model of {gpt_num_parameters(config):,} parameters needs "
                          f"{need / 2**30:,.1f} GiB for its weights alone; "
                          f"{device} has {have / 2**30:,.1f} GiB")


def memory_bytes(device="cpu"):
    """The memory of a device: a GPU's own, or the machine's physical memory (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no check
        return None


def make_optimizer(model, cfg):
    """The book's AdamW, or with cfg.fused_adamw PyTorch's fused kernel of the same update:
    one pass over all parameters instead of about ten tensor operations per parameter.
    Only parameters that require gradients are optimised (a frozen one is left alone)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.fused_adamw:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name, device):
    """(autocast dtype or None, scale the loss?) from the --precision flag."""
    if name == "auto":
        return choose_precision(device)
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False),
            "fp16": (torch.float16, True)}[name]
# --8<-- [end:prepare]


# --8<-- [start:train]
# --8<-- [start:single-process]
class SingleProcess:
    """How train() runs: in this one process, on whole batches. Chapter 11 runs the same
    loop in many processes at once by overriding these few methods."""

    is_main = True  # the process that logs, samples and writes files

    def main_first(self):
        """Context: the main process runs the block (writing files) before the others do."""
        return contextlib.nullcontext()

    def wrap(self, model):
        """The module that runs forward and backward."""
        return model

    def get_batch(self, data, split, batch_size, generator, device):
        """This process's rows of a batch of batch_size examples drawn from ``data``."""
        return data.get_batch(split, batch_size, generator, device)

    def gradient_sync(self, sync):
        """Context for one micro-batch's forward and backward; sync is False but on the last."""
        return contextlib.nullcontext()

    def mean(self, value):
        """The mean of a float over all processes."""
        return value
# --8<-- [end:single-process]


def train(cfg, model=None, data=None, *, loss_fn=None, evaluate=None, stop_after=None, log=print,
          runtime=None):
    """Train ``model`` on batches of ``data`` as ``cfg`` says, resuming from
    out_dir/checkpoint.safetensors if there is one. Returns the history: the training loss of
    every iteration and the validation losses.

    model: any nn.Module; None builds GPT(cfg.model) with fresh weights. Only parameters that
      require gradients are trained, so a pretrained model with frozen parts works as it is.
    data: a source of batches, an object with get_batch(split, batch_size, generator, device)
      like TokenBatches; None prepares cfg.data (prepare_data), and its tokenizer shows a
      sample of text at each evaluation.
    loss_fn(model, batch) -> scalar loss; default next_token_loss.
    evaluate(model) -> dict of floats, recorded at each evaluation in history["metrics"].
    stop_after ends the run after that many iterations, as if it were killed right after a
    checkpoint; the next call resumes it. runtime (default SingleProcess()) says how the work
    is shared between processes.

    The main process holds the out_dir's lock for the whole run (lock_run_folder). A loss or
    gradient that is not a finite number stops the run with a FloatingPointError, before the
    update, so the last checkpoint stays the last good one.
    """
    runtime = runtime or SingleProcess()
    # a bad --data makes no folder
    corpus = read_corpus(cfg.data) if data is None and runtime.is_main else None
    owns_folder = cfg.out_dir is not None and runtime.is_main
    with lock_run_folder(cfg.out_dir) if owns_folder else contextlib.nullcontext():
        if owns_folder:
            removed = remove_leftovers(cfg.out_dir)
            if removed:
                log(f"removed {len(removed)} unfinished file(s) of a killed run: "
                    f"{', '.join(removed)}")
        return _train(cfg, model, data, corpus, loss_fn or next_token_loss, evaluate, stop_after,
                      log, runtime)


def _train(cfg, model, data, corpus, loss_fn, evaluate, stop_after, log, runtime):
    device = resolve_device(cfg.device)
    amp_dtype, scale_loss = resolve_precision(cfg.precision, device)
    tokenizer = None
    if data is None:
        with runtime.main_first():  # one process writes the token files, then the others open them
            tokenizer, data = prepare_data(cfg, write=runtime.is_main, corpus=corpus)
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))

    torch.manual_seed(cfg.seed)
    if model is None:
        check_fits_in_memory(cfg.model, "--n-layer, --d-model, ...")
    model = (GPT(cfg.model) if model is None else model).to(device).train()  # dropout on, if any
    if isinstance(getattr(model, "config", None), GPTConfig):
        cfg = dataclasses.replace(cfg, model=model.config)  # what a checkpoint rebuilds
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=scale_loss)
    batches = torch.Generator().manual_seed(cfg.seed)  # the data position, saved in checkpoints
    history = {"train": [], "val": []}

    checkpoint = Path(cfg.out_dir) / "checkpoint.safetensors" if cfg.out_dir is not None else None
    start = 0
    if checkpoint is not None and checkpoint.exists():
        info = load_checkpoint(checkpoint, model, optimizer, batches, restore_rng=True)
        start, history = info["step"], info["history"]
        log(f"resumed from {checkpoint} at iteration {start}")
    saved = start  # the iteration of the last good checkpoint
    step_fn = runtime.wrap(model)
    step_fn = torch.compile(step_fn) if cfg.compile else step_fn

    bar = _progress(cfg, start)
    log = bar.write if log is print else log  # printed lines go above the progress bar
    tick = time.perf_counter()
    for it in range(start, cfg.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters)
        losses, n_tokens = [], 0  # tokens: of the global batch, when batches are token ids
        for micro in range(cfg.grad_accum):
            batch = runtime.get_batch(data, "train", cfg.batch_size, batches, device)
            with runtime.gradient_sync(sync=micro == cfg.grad_accum - 1):
                with autocast(device, amp_dtype):
                    loss = loss_fn(step_fn, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(loss.detach().float())
            if not batch[0].is_floating_point():
                n_tokens += cfg.batch_size * batch[0][0].numel()
        scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
        # one sync a step
        *losses, grad_norm = torch.stack([*losses, grad_norm.to(losses[0])]).tolist()
        # the whole batch's loss
        loss_sum = runtime.mean(sum(loss / cfg.grad_accum for loss in losses))
        # fp16: the scaler skips infs
        problem = not_finite(loss_sum, 0.0 if scale_loss else grad_norm, model)
        if problem:
            kept = f"; the last good checkpoint, of iteration {saved}, is kept" if saved else ""
            raise FloatingPointError(f"iteration {it + 1}: {problem}. The run stopped before "
                                     f"updating the weights{kept}. {NOT_FINITE_ADVICE}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history["train"].append(loss_sum)

        now = time.perf_counter()
        bar.set_postfix(loss=f"{loss_sum:.3f}",
                        **({"tok_s": f"{n_tokens / (now - tick):,.0f}"} if n_tokens else {}))
        bar.update(1)
        tick = now
        done = it + 1
        if done % cfg.eval_interval == 0 or done == cfg.max_iters or done == stop_after:
            report = f"iter {done}: train {loss_sum:.4f}"
            if cfg.eval_iters:
                val = estimate_loss(model, data, cfg, device, amp_dtype, loss_fn, runtime)
                if not math.isfinite(val):
                    raise FloatingPointError(f"iteration {done}: the validation loss is {val}. "
                                             + NOT_FINITE_ADVICE)
                history["val"].append([done, val])
                report += f", val {val:.4f}"
            if evaluate:
                history.setdefault("metrics", []).append([done, evaluate(model)])
                report += "".join(f", {k} {v:.4f}" for k, v in history["metrics"][-1][1].items())
            if runtime.is_main:
                if tokenizer is not None and cfg.sample_tokens:
                    ids = draw_sample(model, tokenizer.encode("\n"), cfg.sample_tokens,
                                      cfg.model.block_size, torch.Generator().manual_seed(done))
                    report += "\n" + tokenizer.decode(ids) + "\n"
                log(report)
                if checkpoint is not None:
                    save_checkpoint(checkpoint, model, optimizer, done, batches,
                                    {"config": dataclasses.asdict(cfg), "history": history},
                                    cfg.save_frozen)
                    save_loss_plot(history, checkpoint.parent / "loss.svg")
                    saved = done
        if done == stop_after:
            break
    bar.close()
    return history


NOT_FINITE_ADVICE = ("Lower --lr (or --grad-clip), train in full precision (--precision fp32), "
                     "or check the data; Chapter 8's section 'When the loss becomes NaN' shows "
                     "how to find the cause")


def not_finite(loss, grad_norm, model):
    """What is not a finite number in this step, naming the first parameter whose gradient
    is not finite; None when all is well. Only the failing step looks at every gradient."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    problem = (f"the loss is {loss}" if not math.isfinite(loss)
               else f"the gradient norm is {grad_norm}")
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"{problem}, and the first gradient that is not finite is {name}'s"
    return problem


# --8<-- [start:plant-nan]
def plant_nan(param, from_call):
    """Make the gradient of ``param`` NaN from its from_call-th backward pass on, as an
    overflow inside one layer would; returns the hook's handle (.remove() undoes it)."""
    calls = itertools.count(1)
    return param.register_hook(lambda grad: grad * math.nan if next(calls) >= from_call else grad)
# --8<-- [end:plant-nan]


def _progress(cfg, start):
    """A tqdm bar when asked for (and installed); otherwise an object that does nothing."""
    if cfg.progress:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=cfg.max_iters, initial=start, unit="it")
        except ImportError:
            pass
    return _NoProgress()


class _NoProgress:
    write = staticmethod(print)

    def set_postfix(self, **kwargs):
        pass

    def update(self, n):
        pass

    def close(self):
        pass
# --8<-- [end:train]


# --8<-- [start:loss-plot]
def history_figure(history):
    """Training loss per iteration and validation loss per evaluation, as a figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(history["train"]) + 1), history["train"], lw=0.6, alpha=0.6,
            label="train (batch)")
    if history["val"]:
        steps, vals = zip(*history["val"])
        ax.plot(steps, vals, "o-", label="validation")
    ax.set(xlabel="iteration", ylabel="loss (nats per token)")
    ax.legend()
    fig.tight_layout()
    return fig


def save_loss_plot(history, path):
    """Save the loss curves next to the checkpoint (skipped if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = history_figure(history)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
# --8<-- [end:loss-plot]


# --8<-- [start:cli]
def settings():
    """Every setting of a run, as dataclass fields: TrainConfig's and its model's GPTConfig's."""
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    return fields + [f for f in dataclasses.fields(GPTConfig) if f.name in MODEL_SETTINGS]


def arg_parser():
    """A flag for every setting (--batch-size 32, --n-layer 6, --positions rope), with its
    field's help text and default, plus --recipe and --config."""
    parser = argparse.ArgumentParser(
        description="Train the book's GPT on a text file. Defaults are nanoGPT's CPU recipe; "
                    "--recipe starts from another, --config reads a TOML file, "
                    "flags override both.",
        allow_abbrev=False)  # --max-iter is an error, not --max-iters
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="nanogpt",
                        help="the settings to start from (default: nanogpt, nanoGPT's CPU recipe)")
    parser.add_argument("--config", help="a TOML file of settings, flat or with a [model] table")
    recipes = {name: make_config(name) for name in RECIPES}
    for field in settings():
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field.type)
        text = flag_help(field, recipes).replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            parser.add_argument(flag, type=kind, default=None,
                                metavar={int: "N", float: "X"}.get(kind), help=text)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def flag_help(field, recipes):
    """A setting's help text, its default, and the recipes that change it."""
    values = {name: getattr(cfg.model if field.name in MODEL_SETTINGS else cfg, field.name)
              for name, cfg in recipes.items()}
    default = values.pop("nanogpt")
    changed = "".join(f", {name}: {value}" for name, value in values.items() if value != default)
    return f"{field.metadata.get('help', '')} (default: {default}{changed})"


def parse_args(argv=None):
    """The TrainConfig of a command line: --recipe starts from one of RECIPES, --config reads
    a TOML file (flat settings, or the model's in a [model] table), flags override both."""
    parser = arg_parser()
    args = vars(parser.parse_args(argv))
    recipe, config_path = args.pop("recipe"), args.pop("config")
    args.pop("debug")  # run_command's flag
    values = {}
    if config_path:
        with open(config_path, "rb") as f:
            values = tomllib.load(f)
        values.update(values.pop("model", {}))
        unknown = set(values) - {f.name for f in settings()}
        if unknown:
            parser.error(f"unknown settings in the config file: {sorted(unknown)}")
    values.update({k: v for k, v in args.items() if v is not None})
    return make_config(recipe, **values)


def _flag_type(annotation):
    """int for int, int | None, and so on: what a flag's text is parsed as."""
    if isinstance(annotation, types.UnionType):
        return next(a for a in annotation.__args__ if a is not type(None))
    return annotation


def main(argv=None):
    warnings.showwarning = (
        lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr))
    history = train(parse_args(argv))
    if history["val"]:
        print(f"final validation loss {history['val'][-1][1]:.4f}")


def run_command(main, argv=None):
    """Run a command-line ``main(argv)`` as a reader meets it: an error becomes one line on
    stderr and exit status 1, not a traceback; ``--debug`` anywhere shows the traceback.
    Every chapter's command line ends with ``sys.exit(run_command(main))``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (| head): end quietly
        with contextlib.suppress(Exception):  # no flush at exit into the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:  # one clear line; the traceback is one flag away
        if debug:
            traceback.print_exc()
        else:
            message = str(error) or type(error).__name__
            print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1
# --8<-- [end:cli]


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def plot_lr_schedule():
    """The warmup + cosine schedule of the chapter's default run."""
    import matplotlib.pyplot as plt

    cfg = TrainConfig()
    steps = range(cfg.max_iters + 200)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [lr_at(s, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters) for s in steps])
    ax.axvline(cfg.warmup_iters, color="gray", ls=":", lw=1)
    ax.set(xlabel="iteration", ylabel="learning rate",
           title="Linear warmup, cosine decay to a floor")
    fig.tight_layout()
    return fig


# the chapter's training run: these settings on top of the "tiny" recipe
TRAINING_RUN = dict(eval_interval=50, out_dir=None, device="cpu", precision="fp32")


def training_run_history(stop_after=None):
    """The run the chapter's loss figure is drawn from, as the book stores it: 300 iterations
    of the "tiny" recipe on the Python documentation (a minute or two on 2 cores). The figure never
    trains: it reads docs/data/ch08_training.training_run.json, which
    python tests/benchmarks/figure_data.py ch08_training.training_run writes."""
    history = train(make_config("tiny", **TRAINING_RUN), stop_after=stop_after, log=lambda s: None)
    return {"recipe": "tiny", "settings": TRAINING_RUN, "train": history["train"],
            "val": history["val"]}


def plot_training_run(run=None):
    """Loss curves of the stored run of a small GPT on the Python documentation."""
    return history_figure(run or stored_run("ch08_training.training_run"))


def plot_float_formats():
    """Where fp32, fp16 and bf16 can represent numbers: range vs. spacing."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    for row, (name, f) in enumerate(float_formats().items()):
        lo, hi = math.log10(f["smallest_normal"]), math.log10(f["max"])
        ax.plot([lo, hi], [row, row], lw=8, solid_capstyle="butt")
        ax.text(hi + 1, row, f"{name}: eps = {f['epsilon']:.1e}", va="center")
    ax.axvline(-8, color="gray", ls=":", lw=1)
    ax.text(-8, 2.45, " a typical small gradient, 1e-8", fontsize=8, color="gray")
    ax.set(yticks=[], xlabel="log10 of the magnitude (normal numbers)", xlim=(-45, 60))
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(run_command(main))
