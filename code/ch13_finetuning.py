"""Chapter 13: fine-tuning — a classifier, LoRA, and instruction tuning.

A pretrained model (Chapter 12's SmolLM2-135M-Instruct in Chapter 6's GPT) is adapted three
ways, each trained by Chapter 8's ``train`` (the book's only training loop) and measured on
held-out data against a baseline:

- a spam classifier on the SMS Spam Collection: a class head on the last real token of each
  message, beside a bag-of-words logistic regression and the model prompted zero-shot, and an
  ablation of what to train (last block, all layers, LoRA, head only; last token or mean
  pooling; pretrained or random weights);
- LoRA from scratch: low-rank adapters on chosen Linear layers, merged and unmerged;
- supervised fine-tuning (SFT) on chat-formatted examples, with the loss masked to the
  response: a checkable arithmetic task (exact match) and 1,100 instruction examples
  (held-out loss), and what fine-tuning costs the model on questions it could answer before.

    .venv/bin/python code/ch13_finetuning.py classify --trainable last-block
    .venv/bin/python code/ch13_finetuning.py sft --task arithmetic --method lora \\
        --out-dir runs/arithmetic

Depends on torch, the standard library and chapters 2, 6, 8, 9, 10 and 12. safetensors
(weights files), tqdm (progress bars, through Chapter 8) and matplotlib (plots) are imported
where they are used.

Shapes: B batch, T sequence length, C model width, K classes, V vocabulary, N and K the
output and input widths of a linear layer (its weight is (N, K)), r the rank of an adapter.

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt, ch08_training,
ch09_generation, ch10_evaluation, ch12_pretrained.
"""

# --8<-- [start:imports]
import argparse
import copy
import hashlib
import io
import json
import math
import random
import re
import resource
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch02_tokenizer import write_atomically
from ch08_training import CACHE_DIR, fetch, make_config, next_token_loss, run_command, train
from ch09_generation import generate, left_pad
from ch10_evaluation import (evaluating, evaluate_text, multiple_choice_accuracy, pad_right,
                              token_logprobs)
from ch12_pretrained import (default_system_message, held_out_text, load_smollm2, question_tasks,
                             render_chat)
# --8<-- [end:imports]

DATA_DIR = Path(__file__).resolve().parent.parent / "docs" / "data"  # stored run histories


# ---------------------------------------------------------------------------------------
# Data: two public data sets, and a task generated in code
# ---------------------------------------------------------------------------------------

# --8<-- [start:data]
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# of the file in the zip
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
INSTRUCTIONS_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                    "01_main-chapter-code/instruction-data.json")
INSTRUCTIONS_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"


def offline_error(url, path, error):
    return FileNotFoundError(f"could not download {url} ({error}). With a network, run this again; "
                             f"offline, copy the file to {path}")


def sms_spam_path(cache_dir=None):
    """The SMS Spam Collection file, downloaded once (as a zip) into the cache folder and
    checked by the sha256 of the file inside the zip."""
    path = Path(cache_dir or CACHE_DIR) / "SMSSpamCollection"
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == SMS_SHA256:
        return path
    try:
        with urllib.request.urlopen(SMS_URL, timeout=30) as response:
            data = zipfile.ZipFile(io.BytesIO(response.read())).read("SMSSpamCollection")
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise offline_error(SMS_URL, path, error) from None
    if hashlib.sha256(data).hexdigest() != SMS_SHA256:
        raise ValueError(
            f"the SMSSpamCollection in {SMS_URL} does not have the sha256 {SMS_SHA256}")
    write_atomically(path, data)
    return path


def load_sms_spam(cache_dir=None):
    """The 5,574 messages as (text, label) pairs, label 1 for spam and 0 for ham."""
    messages = []
    for line in sms_spam_path(cache_dir).read_text(encoding="utf-8").splitlines():
        label, text = line.split("\t", 1)
        messages.append((text, int(label == "spam")))
    return messages


def load_instructions(cache_dir=None):
    """The 1,100 instruction examples: dicts with "instruction", "input" and "output"."""
    path = Path(cache_dir or CACHE_DIR) / "instruction-data.json"
    try:
        fetch(INSTRUCTIONS_URL, INSTRUCTIONS_SHA256, path)
    except OSError as error:
        raise offline_error(INSTRUCTIONS_URL, path, error) from None
    return json.loads(path.read_text(encoding="utf-8"))


def split_list(items, fractions, seed):
    """items shuffled with a seeded generator and cut into consecutive parts of the given
    fractions (the last part takes what rounding leaves)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    cuts = [round(sum(fractions[:i + 1]) * len(items)) for i in range(len(fractions) - 1)]
    return [items[a:b] for a, b in zip([0] + cuts, cuts + [len(items)])]


def spam_splits(messages, fractions=(0.7, 0.1, 0.2), seed=123):
    """Balanced train / val / test splits: exact repeats removed (a message in both the
    training and the test split would be scored as if unseen), as many ham messages drawn as
    there are spam ones, and each class cut in the same fractions, so every split is half
    spam and chance is 50%. Returns {"train": [(text, label), ...], "val": ..., "test": ...}."""
    unique = list(dict.fromkeys(messages))  # keeps the first of each repeat, in order
    by_class = [[m for m in unique if m[1] == label] for label in (0, 1)]
    n = min(len(c) for c in by_class)
    parts = [split_list(random.Random(seed).sample(c, n), fractions, seed) for c in by_class]
    splits = {}
    for name, ham, spam in zip(("train", "val", "test"), *parts):
        splits[name] = split_list(ham + spam, [1.0], seed)[0]  # classes mixed
    return splits


def instruction_splits(examples, fractions=(0.85, 0.05, 0.1), seed=123):
    """train / val / test lists of instruction examples (935, 55 and 110 of the 1,100)."""
    return dict(zip(("train", "val", "test"), split_list(examples, fractions, seed)))
# --8<-- [end:data]


# --8<-- [start:arithmetic]
def arithmetic_split(a, op, b):
    """"test" for a tenth of all problems, "train" for the rest, by a hash of the problem:
    the two sets are disjoint whatever the seed or the number drawn."""
    return "test" if hashlib.sha256(f"{a}{op}{b}".encode()).digest()[0] < 26 else "train"  # 26/256


def arithmetic_examples(n, split="train", seed=0, digits=3):
    """n distinct problems "a + b" or "a - b" (a >= b) with numbers of ``digits`` digits, as
    instruction examples {"instruction", "input", "output"}; split "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    low, high = 10 ** (digits - 1), 10**digits - 1
    if n > (high - low + 1) ** 2 // 20:
        raise ValueError(f"{n} problems of {digits} digits are too many to draw distinct ones")
    rng = random.Random(f"{seed}-{split}")
    seen, examples = set(), []
    while len(examples) < n:
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen or arithmetic_split(a, op, b) != split:
            continue
        seen.add((a, op, b))
        examples.append({"instruction": f"What is {a} {op} {b}? Answer with the number only.",
                         "input": "", "output": str(a + b if op == "+" else a - b)})
    return examples


def extract_answer(completion):
    """The last integer in a completion ("1,221" counts as 1221), or None."""
    numbers = re.findall(r"-?\d+", re.sub(r"(?<=\d),(?=\d{3})", "", completion))
    return int(numbers[-1]) if numbers else None


def check_answer(completion, example):
    """True when the last number of the completion is exactly the example's answer."""
    return extract_answer(completion) == int(example["output"])
# --8<-- [end:arithmetic]


# ---------------------------------------------------------------------------------------
# A classifier on a pretrained GPT
# ---------------------------------------------------------------------------------------

# --8<-- [start:batches]
class ExampleBatches:
    """A source of batches for Chapter 8's train(): examples of different lengths, padded
    on the right. splits: {name: (examples, labels)}, each example a (T,) tensor of token ids
    or a (T, C) tensor of hidden states, each label an int. get_batch draws rows at random
    with the given generator, like Chapter 8's TokenBatches; in_order visits every row once."""

    def __init__(self, splits, pad_id=0):
        self.splits = {name: (list(x), torch.as_tensor(y)) for name, (x, y) in splits.items()}
        self.pad_id = pad_id

    def get_batch(self, split, batch_size, generator, device="cpu"):
        """(x (B, T) or (B, T, C), lengths (B,), labels (B,))."""
        rows = torch.randint(len(self.splits[split][0]), (batch_size,), generator=generator)
        return self.collate(split, rows.tolist(), device)

    def in_order(self, split, batch_size, device="cpu"):
        n = len(self.splits[split][0])
        for start in range(0, n, batch_size):
            yield self.collate(split, range(start, min(start + batch_size, n)), device)

    def collate(self, split, rows, device):
        examples, labels = self.splits[split]
        chosen = [examples[i] for i in rows]
        x = nn.utils.rnn.pad_sequence(chosen, batch_first=True, padding_value=self.pad_id)
        lengths = torch.tensor([len(e) for e in chosen])
        return x.to(device), lengths.to(device), labels[list(rows)].to(device)
# --8<-- [end:batches]


# --8<-- [start:exercise-1]
# Exercise 1: the logits of the last real token
def last_token(logits, lengths):
    """logits (B, T, K) of rows padded on the right, lengths (B,) their real lengths ->
    (B, K): each row's logits at its last real token, position lengths[b] - 1.

    Under a causal mask that token is the only one that has seen the whole row, and the
    padding after it has not changed it."""
    if (lengths < 1).any() or (lengths > logits.shape[1]).any():
        raise ValueError(f"lengths must be in [1, {logits.shape[1]}], got {lengths.tolist()}")
    return logits[torch.arange(len(lengths), device=logits.device), lengths - 1]
# --8<-- [end:exercise-1]


# --8<-- [start:classifier]
def mean_pool(logits, lengths):
    """The mean of each row's logits over its real tokens: (B, T, K) -> (B, K). A linear
    head commutes with the mean, so this is the head of the mean hidden state."""
    real = torch.arange(logits.shape[1], device=logits.device)[None, :] < lengths[:, None]  # (B, T)
    return (logits * real[..., None]).sum(dim=1) / lengths[:, None]


POOLINGS = {"last": last_token, "mean": mean_pool}


class GPTClassifier(nn.Module):
    """Chapter 6's GPT with its output head replaced by a class head (C -> K), pooled over
    each row: the last real token's logits, or their mean over the real tokens.

    start > 0 skips the embeddings and the first ``start`` blocks: the inputs are then the
    hidden states that enter block ``start`` (see hidden_states), for training the top of a
    model whose bottom is frozen without running the bottom at every step."""

    def __init__(self, gpt, n_classes=2, pooling="last", start=0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
        if not 0 <= start <= gpt.config.n_layer:
            raise ValueError(f"start must be in [0, n_layer={gpt.config.n_layer}], got {start}")
        self.gpt, self.pooling, self.start = gpt, pooling, start
        gpt.lm_head = nn.Linear(gpt.config.d_model, n_classes)  # untied from the embeddings

    def forward(self, x, lengths):
        """x (B, T) token ids, or (B, T, C) hidden states when start > 0 -> logits (B, K)."""
        if self.start == 0:
            logits, _ = self.gpt(x)  # (B, T, K)
        else:
            for block in self.gpt.blocks[self.start:]:
                x = block(x, causal=True)
            logits = self.gpt.lm_head(self.gpt.norm_f(x))  # (B, T, K)
        return POOLINGS[self.pooling](logits, lengths)


@torch.no_grad()
def hidden_states(gpt, examples, stop, start=0, batch_size=32):
    """The hidden states entering block ``stop``, computed once for every example: a list of
    (T, C) tensors. examples: 1-D tensors of token ids (start=0), or the (T, C) hidden
    states entering block ``start``. Rows are padded on the right, so under the causal mask
    each example's first T states are the ones it would have alone."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # little padding per batch
    device = gpt.norm_f.weight.device
    out = [None] * len(examples)
    with evaluating(gpt):
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            x = nn.utils.rnn.pad_sequence([examples[i] for i in rows], batch_first=True).to(device)
            if start == 0:  # (B, T) ids -> (B, T, C)
                x = gpt.tok_emb(x)
                x = gpt.pos_emb(x) if gpt.pos_emb is not None else x
            for block in gpt.blocks[start:stop]:
                x = block(x, causal=True)
            for row, i in enumerate(rows):
                out[i] = x[row, :len(examples[i])].cpu()
    return out


def classification_loss(model, batch):
    """train()'s loss for a classifier: cross-entropy of the class logits."""
    x, lengths, labels = batch
    return F.cross_entropy(model(x, lengths), labels)


def accuracy(model, data, split, batch_size=32):
    """The fraction of a split's examples whose most likely class is their label."""
    device = next(model.parameters()).device
    correct = total = 0
    with evaluating(model):
        for x, lengths, labels in data.in_order(split, batch_size, device):
            correct += (model(x, lengths).argmax(-1) == labels).sum().item()
            total += len(labels)
    return correct / total
# --8<-- [end:classifier]


# --8<-- [start:trainable]
def count_parameters(model):
    """(trainable, total) numbers of distinct parameters (a tied matrix counts once)."""
    params = list(model.parameters())  # parameters() yields a shared (tied) one once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def training_bytes(model):
    """Memory that training holds besides activations, in float32: every weight, plus a
    gradient and AdamW's two moments for each trainable one."""
    trainable, total = count_parameters(model)
    return 4 * (total + 3 * trainable)


TRAINABLE = ("head", "last-block", "all", "lora")


def set_trainable(classifier, which, lora_rank=8, lora_alpha=16):
    """Freeze all but: the class head ("head"); the last block, the final norm and the head
    ("last-block"); everything ("all"); or LoRA adapters on every block's Linear layers and
    the head ("lora")."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")
    gpt = classifier.gpt
    classifier.requires_grad_(which == "all")
    if which == "lora":
        add_lora(gpt.blocks, r=lora_rank, alpha=lora_alpha)
    if which == "last-block":
        gpt.blocks[-1].requires_grad_(True)
        gpt.norm_f.requires_grad_(True)
    gpt.lm_head.requires_grad_(True)
    return classifier


def first_trained_block(which, n_layer):
    """The first block whose output can change in training: every block below it can be
    run once and its outputs cached (hidden_states)."""
    return {"head": n_layer, "last-block": n_layer - 1}.get(which, 0)
# --8<-- [end:trainable]


# ---------------------------------------------------------------------------------------
# Two baselines: a bag of words, and the model prompted zero-shot
# ---------------------------------------------------------------------------------------

# --8<-- [start:bag-of-words]
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")  # lowercase words and numbers, single symbols (£, !)


def words(text):
    return WORD.findall(text.lower())


def bow_vocabulary(texts, min_count=2):
    """The words that occur at least min_count times in texts, each with its column."""
    counts = {}
    for text in texts:
        for w in set(words(text)):
            counts[w] = counts.get(w, 0) + 1
    return {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}


def bow_features(texts, vocabulary):
    """(N, V) floats: 1 where a message contains a word of the vocabulary (others ignored)."""
    x = torch.zeros(len(texts), len(vocabulary))
    for row, text in enumerate(texts):
        for w in set(words(text)):
            if w in vocabulary:
                x[row, vocabulary[w]] = 1.0
    return x


class LogisticRegression(nn.Module):
    """p(spam | x) = sigmoid(w . x + b): one weight per word, one bias."""

    def __init__(self, n_features):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_features))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (N, V) -> logits (N,)
        return x @ self.weight + self.bias


def logistic_regression_loss(model, batch):
    """Mean of -log p(y | x) = softplus(z) - y z, with z the logit: the log-sigmoid written
    without overflow (softplus(z) = log(1 + e^z))."""
    x, y = batch
    z = model(x)
    return (F.softplus(z) - y * z).mean()


class TensorBatches:
    """Rows of fixed-size tensors for train(): splits {name: (x, y)}."""

    def __init__(self, splits):
        self.splits = splits

    def get_batch(self, split, batch_size, generator, device="cpu"):
        x, y = self.splits[split]
        rows = torch.randint(len(x), (batch_size,), generator=generator)
        return x[rows].to(device), y[rows].to(device)


def bag_of_words_baseline(splits, max_iters=600, lr=0.05, weight_decay=0.01, log=print):
    """A logistic regression on words trained with Chapter 8's train; returns its accuracy
    on each split and the model with its vocabulary."""
    vocabulary = bow_vocabulary([t for t, _ in splits["train"]])
    tensors = {name: (bow_features([t for t, _ in rows], vocabulary),
                      torch.tensor([float(y) for _, y in rows]))
               for name, rows in splits.items()}
    model = LogisticRegression(len(vocabulary))
    cfg = make_config("tiny", lr=lr, max_iters=max_iters, warmup_iters=10, decay_iters=max_iters,
                      batch_size=64, weight_decay=weight_decay, eval_interval=max_iters,
                      eval_iters=0, out_dir=None, device="cpu", precision="fp32")
    train(cfg, model, TensorBatches(tensors), loss_fn=logistic_regression_loss, log=log)
    with torch.no_grad():
        scores = {f"{name}_accuracy": ((model(x) > 0).float() == y).float().mean().item()
                  for name, (x, y) in tensors.items()}
    return scores, model, vocabulary
# --8<-- [end:bag-of-words]


# --8<-- [start:zero-shot]
SPAM_QUESTION = ("Is the following text message spam (unsolicited advertising or a scam)? "
                 "Answer yes or no.\n\nMessage: {text}")


def user_turn_ids(tokenizer, content):
    """The ids of one user message in the model's chat template, ending where the
    assistant's answer starts."""
    system = default_system_message(tokenizer.chat_template)
    return tokenizer.encode(render_chat([{"role": "user", "content": content}], system),
                            allowed_special="all")


@torch.no_grad()
def zero_shot_log_odds(model, tokenizer, texts, batch_size=16):
    """log p("Yes") - log p("No") (N,) for the first token of the model's answer to
    SPAM_QUESTION about each text: > 0 means it answers spam. The next-token logits of a
    prompt are read at its last real token, as the classifier reads its class logits."""
    yes, no = tokenizer.encode("Yes"), tokenizer.encode("No")
    if len(yes) != 1 or len(no) != 1:
        raise ValueError("this tokenizer does not spell Yes and No as one token each")
    device = model.lm_head.weight.device
    log_odds = []
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            prompts = [torch.tensor(user_turn_ids(tokenizer, SPAM_QUESTION.format(text=t)))
                       for t in texts[start:start + batch_size]]
            logits, _ = model(pad_right(prompts, 0).to(device))  # (B, T, V)
            # (B, V)
            last = last_token(logits, torch.tensor([len(p) for p in prompts], device=device))
            # the softmax's sum cancels
            log_odds.append((last[:, yes[0]] - last[:, no[0]]).float().cpu())
    return torch.cat(log_odds)
# --8<-- [end:zero-shot]


# ---------------------------------------------------------------------------------------
# LoRA: low-rank adapters
# ---------------------------------------------------------------------------------------

# --8<-- [start:lora]
class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update of its weight:

        y = x W^T + b + (alpha / r) * x A^T B^T,    A (r, K), B (N, r)

    B starts at zero, so the layer starts as exactly the pretrained one, and A as nn.Linear
    initialises its weights (peft does the same). merge() adds (alpha / r) B A into W, for
    inference at the cost of the plain layer; unmerge() takes it out again."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Linear) or r < 1:
            raise ValueError(f"LoRALinear wraps an nn.Linear with a rank r >= 1, "
                             f"got {type(base).__name__}, r={r}")
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        base.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))  # (r, K)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))  # (N, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False
    # --8<-- [end:lora]

    # --8<-- [start:exercise-2]
    # Exercise 2: the forward pass of a LoRA layer
    def forward(self, x):
        """x (..., K) -> (..., N): the base layer's output plus scaling * x A^T B^T (x after
        dropout), computed as two thin products, never as the (N, K) matrix B A. Once the
        update is merged into the base weight, the base layer alone."""
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scaling * (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T
    # --8<-- [end:exercise-2]

    # --8<-- [start:lora-delta]
    def delta_weight(self):
        """The update of the weight, (alpha / r) B A: (N, K)."""
        return self.scaling * (self.lora_B @ self.lora_A)
    # --8<-- [end:lora-delta]

    # --8<-- [start:exercise-3]
    # Exercise 3: merge the update into the weight
    @torch.no_grad()
    def merge(self):
        """Add delta_weight() to the base weight in place and mark the layer merged; raise
        ValueError if it already is."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged")
        self.base.weight += self.delta_weight()
        self.merged = True
    # --8<-- [end:exercise-3]
    # --8<-- [start:lora-rest]

    @torch.no_grad()
    def unmerge(self):
        """Take the update out of the base weight again (up to float rounding)."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, targets=LORA_TARGETS, r=8, alpha=16, dropout=0.0):
    """Freeze every parameter of model and wrap each nn.Linear whose attribute name is in
    targets in a LoRALinear, in place: only the adapters train. Returns the model."""
    model.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no nn.Linear named one of {targets} in the model")
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def finetuned_weights(model):
    """What fine-tuning changed, under the names of the plain model: the merged weight of
    each LoRA layer (W + delta) and every other trainable parameter. Chapter 12's
    load_weights puts such a file over the pretrained weights."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            weight = (
                module.base.weight if module.merged else module.base.weight + module.delta_weight()
            )
            out[f"{name}.weight"] = weight.detach()
    for name, p in model.named_parameters():  # shared parameters once
        if p.requires_grad and not name.endswith(("lora_A", "lora_B")):
            out[name] = p.detach()
    return {k: v.cpu().contiguous() for k, v in out.items()}
# --8<-- [end:lora-rest]


# ---------------------------------------------------------------------------------------
# Supervised fine-tuning on chat-formatted examples
# ---------------------------------------------------------------------------------------

# --8<-- [start:chat-examples]
def user_message(example):
    """The instruction, and its input below it when there is one (Alpaca's layout)."""
    return example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")


def chat_prompt(tokenizer, example):
    """The ids of an example's prompt: the system message, the user's turn and the start of
    the assistant's, in the model's chat template (Chapter 12's render_chat)."""
    return user_turn_ids(tokenizer, user_message(example))


def response_ids(tokenizer, example):
    """The ids the model must learn to write: the answer, then <|im_end|>, which ends its turn
    (and stops generation)."""
    return tokenizer.encode_ordinary(example["output"]) + [tokenizer.special_tokens["<|im_end|>"]]


def tokenize_examples(tokenizer, examples, max_len=None):
    """(prompt ids, response ids) of each example; with max_len, the examples longer than
    that are left out."""
    pairs = [(chat_prompt(tokenizer, e), response_ids(tokenizer, e)) for e in examples]
    return [p for p in pairs if max_len is None or len(p[0]) + len(p[1]) <= max_len]
# --8<-- [end:chat-examples]


# --8<-- [start:exercise-4]
# Exercise 4: the response-only loss mask
def sft_tensors(prompt, response):
    """Inputs, targets and loss mask of one example, for next-token training on prompt +
    response (two lists of ids): x = ids[:-1] and y = ids[1:] as LongTensors, and loss_mask
    a bool tensor of the same length, True exactly where y is a token of the response."""
    ids = torch.tensor(list(prompt) + list(response))
    loss_mask = torch.arange(1, len(ids)) >= len(prompt)  # y[t] = ids[t + 1]
    return ids[:-1], ids[1:], loss_mask
# --8<-- [end:exercise-4]


# --8<-- [start:sft-batches]
class SFTBatches:
    """Batches of chat examples for train(), in one of two layouts:

    - padding: one example per row, padded on the right to the batch's longest;
      (x, y, loss_mask), the layout of Chapter 8's next_token_loss;
    - packing: examples laid end to end in rows of exactly ``row_len`` tokens, with the
      document of each token; (x, y, loss_mask, documents), for packed_loss.

    splits: {name: [(prompt ids, response ids), ...]} (tokenize_examples)."""

    def __init__(self, splits, packing=False, row_len=256):
        too_long = [len(p) + len(r) for rows in splits.values() for p, r in rows
                    if len(p) + len(r) > row_len + 1]
        if packing and too_long:
            raise ValueError(
                f"{len(too_long)} examples are longer than row_len + 1 = {row_len + 1} tokens")
        self.splits, self.packing, self.row_len = splits, packing, row_len

    def get_batch(self, split, batch_size, generator, device="cpu"):
        examples = self.splits[split]
        if not self.packing:
            rows = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
            return pad_examples([sft_tensors(*examples[i]) for i in rows], device)
        rows, row = [], []
        while len(rows) < batch_size:  # draw examples, fill rows one after the other
            x, y, mask = sft_tensors(
                *examples[torch.randint(len(examples), (1,), generator=generator).item()]
            )
            if sum(len(part[0]) for part in row) + len(x) > self.row_len:
                rows.append(row)
                row = []
            row.append((x, y, mask))
        return pack_rows(rows, self.row_len, device)

    def in_order(self, split, batch_size, device="cpu"):
        """Padded batches of a split's examples, each once, in order (for evaluation)."""
        examples = self.splits[split]
        for start in range(0, len(examples), batch_size):
            yield pad_examples([sft_tensors(*e) for e in examples[start:start + batch_size]],
                               device)


def pad_examples(tensors, device):
    """[(x, y, loss_mask), ...] -> x, y, loss_mask (B, T), padded on the right (y with -1)."""
    x, y, mask = zip(*tensors)
    return (pad_right(x, 0).to(device), pad_right(y, -1).to(device),
            pad_right(mask, 0).bool().to(device))


def pack_rows(rows, row_len, device):
    """Rows of [(x, y, loss_mask), ...] laid end to end and padded to row_len: x, y,
    loss_mask and documents (B, row_len), documents[b, t] the number of the example that
    token t belongs to in its row (-1 for padding)."""
    out = [torch.full((len(rows), row_len), fill, dtype=dtype)
           for fill, dtype in ((0, torch.long), (-1, torch.long), (False, torch.bool),
                               (-1, torch.long))]
    for b, row in enumerate(rows):
        t = 0
        for doc, (x, y, mask) in enumerate(row):
            for tensor, value in zip(out, (x, y, mask, doc)):
                tensor[b, t:t + len(x)] = value
            t += len(x)
    return [tensor.to(device) for tensor in out]


def document_positions(documents):
    """The position of each token inside its own document: (B, T) -> (B, T), 0 at each start."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def packed_logits(model, x, documents):
    """Chapter 6's GPT.forward for packed rows: a token attends only to the earlier tokens of
    its own document (a block-diagonal causal mask), and positions restart at each document,
    so each example is computed as if it were alone in its row."""
    positions = document_positions(documents)  # (B, T)
    # (B, 1, T, T); causal is added
    same = documents[:, None, :, None] == documents[:, None, None, :]
    return model(x, positions=positions, attn_mask=same)[0]  # (B, T, V)


def packed_loss(model, batch):
    """train()'s loss for packed rows: the mean next-token loss over the response tokens."""
    x, y, loss_mask, documents = batch
    logits = packed_logits(model, x, documents)
    return F.cross_entropy(logits.flatten(0, 1), y.masked_fill(~loss_mask, -1).flatten(),
                           ignore_index=-1)
# --8<-- [end:sft-batches]


# --8<-- [start:sft-evaluate]
@torch.no_grad()
def response_loss(model, data, split, batch_size=8):
    """Mean loss (nats per token) of the responses of a split, each token scored once, with
    Chapter 10's token_logprobs; exp of it is the perplexity of the responses."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with evaluating(model):
        for x, y, mask in data.in_order(split, batch_size, device):
            logp = token_logprobs(model, x, y.masked_fill(~mask, -1))  # (B, T), 0 off the responses
            nll -= logp.sum().item()
            count += mask.sum().item()
    return nll / count


def complete(model, tokenizer, examples, max_new_tokens=16, batch_size=16):
    """Greedy answers to the prompts of examples (Chapter 9's generate, prompts padded on the
    left), each cut at <|im_end|>."""
    end = tokenizer.special_tokens["<|im_end|>"]
    device = model.lm_head.weight.device
    answers = []
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            prompts = [chat_prompt(tokenizer, e) for e in examples[start:start + batch_size]]
            idx, mask = left_pad(prompts, 0, device)
            out = generate(model, idx, max_new_tokens, temperature=0, eos_id=end, padding_mask=mask)
            for row in out[:, idx.shape[1]:].tolist():
                row = row[:row.index(end)] if end in row else row
                answers.append(tokenizer.decode(row))
    return answers


def exact_match(model, tokenizer, examples, **options):
    """(fraction of examples answered right by check_answer, the answers)."""
    answers = complete(model, tokenizer, examples, **options)
    return sum(check_answer(a, e) for a, e in zip(answers, examples)) / len(examples), answers


def knowledge_scores(model, tokenizer, n_chars=4000):
    """What the model knew before fine-tuning: Chapter 12's 40 questions (accuracy, by
    summed log-likelihood) and the perplexity of held-out Python documentation."""
    with torch.no_grad():
        questions = multiple_choice_accuracy(model, tokenizer, question_tasks())["sum"]
        text = evaluate_text(model, tokenizer, held_out_text(n_chars), 256, 512)
    return {"questions": questions, "docs_perplexity": text.perplexity}
# --8<-- [end:sft-evaluate]


# --8<-- [start:load-finetuned]
def save_weights(weights, path, **metadata):
    """A dict of CPU tensors as a safetensors file that Chapter 12's load_weights and
    chat --checkpoint read, written atomically; a tied matrix is stored once (loading it
    under either name fills the one shared parameter)."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, tensor in sorted(weights.items()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor
    write_atomically(path, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))
    return Path(path)


def save_finetuned(model, path, **metadata):
    """finetuned_weights(model), saved by save_weights."""
    return save_weights(finetuned_weights(model), path, **metadata)


def load_finetuned(path, device="cpu"):
    """(model, tokenizer): SmolLM2-135M-Instruct with the weights a fine-tuning run saved."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `python code/ch13_finetuning.py sft ...` first")
    return load_smollm2(checkpoint=path, device=device)
# --8<-- [end:load-finetuned]


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------

# --8<-- [start:runs]
def peak_memory_mb():
    """The most memory this process has held so far (its peak resident set), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_ids(tokenizer, texts, max_len):
    return [torch.tensor(tokenizer.encode_ordinary(t)[:max_len]) for t in texts]


def classifier_inputs(gpt, tokenizer, splits, start, max_len=128):
    """Each split's inputs for a classifier that starts at block ``start``: the token ids of
    its messages (start 0), or the hidden states that enter that block."""
    ids = {
        name: token_ids(tokenizer, [t for t, _ in rows], max_len) for name, rows in splits.items()
    }
    return {name: hidden_states(gpt, x, start) if start else x for name, x in ids.items()}


def classifier_run(gpt, tokenizer, splits, trainable="last-block", pooling="last", epochs=2,
                   batch_size=8, lr=None, inputs=None, seed=123, out_dir=None, evaluations=4,
                   max_iters=None, device="cpu", log=print):
    """Fine-tune gpt (changed in place) into a spam classifier with Chapter 8's train and
    return (a summary: accuracies on each split, time, parameters, the history; the model).

    The blocks below the first trained one are frozen: their outputs are computed once
    (classifier_inputs, or given as ``inputs``) and the classifier starts from them."""
    tick = time.perf_counter()
    torch.manual_seed(seed)  # the class head and the adapters
    start = first_trained_block(trainable, gpt.config.n_layer)
    inputs = inputs or classifier_inputs(gpt, tokenizer, splits, start)
    model = set_trainable(GPTClassifier(gpt, 2, pooling, start), trainable)
    data = ExampleBatches(
        {name: (inputs[name], [y for _, y in rows]) for name, rows in splits.items()})
    iters = max(1, round(epochs * len(splits["train"]) / batch_size))
    iters = min(iters, max_iters or iters)
    lr = lr or (5e-5 if trainable == "all" else 1e-3 if trainable == "lora" else 5e-4)
    cfg = make_config("tiny", lr=lr, min_lr=lr / 10, max_iters=iters,
                      warmup_iters=max(1, iters // 20), decay_iters=iters, batch_size=batch_size,
                      weight_decay=0.0, eval_interval=max(1, iters // evaluations), eval_iters=0,
                      out_dir=out_dir, save_frozen=False, device=device, precision="fp32",
                      seed=seed, progress=out_dir is not None, fused_adamw=True)
    history = train(cfg, model, data, loss_fn=classification_loss,
                    evaluate=lambda m: {"val_accuracy": accuracy(m, data, "val")}, log=log)
    scores = {f"{name}_accuracy": accuracy(model, data, name) for name in splits}
    n_trainable, n_total = count_parameters(model)
    return dict(trainable=trainable, pooling=pooling, **scores, seconds=time.perf_counter() - tick,
                trainable_params=n_trainable, total_params=n_total, iters=iters, lr=lr,
                batch_size=batch_size, history=history), model


def sft_run(model, tokenizer, task="arithmetic", method="lora", steps=200, batch_size=8, lr=None,
            lora_rank=8, lora_alpha=16, packing=False, n_train=2000, n_test=100, max_len=256,
            seed=123, out_dir=None, eval_interval=None, device="cpu", log=print):
    """Supervised fine-tuning of model (changed in place) on the arithmetic task or the
    instruction set, with Chapter 8's train; measured before and after on held-out
    examples, and on what the model knew before (knowledge_scores). Returns a summary."""
    if task == "arithmetic":
        train_set = arithmetic_examples(n_train, "train", seed)
        splits = {"train": train_set, "val": arithmetic_examples(n_test, "test", seed + 1),
                  "test": arithmetic_examples(n_test, "test", seed)}
    elif task == "instructions":
        splits = instruction_splits(load_instructions(), seed=seed)
    else:
        raise ValueError(f"task must be 'arithmetic' or 'instructions', got {task!r}")
    tokens = {name: tokenize_examples(tokenizer, rows, max_len) for name, rows in splits.items()}
    data = SFTBatches(tokens, packing=packing, row_len=max_len)
    measure = (
        (lambda m: {"exact_match": exact_match(m, tokenizer, splits["test"], max_new_tokens=8)[0]})
        if task == "arithmetic"
        else (lambda m: {"response_loss": response_loss(m, data, "test")})
    )
    before = measure(model) | knowledge_scores(model, tokenizer)
    log(f"before: {before}")
    torch.manual_seed(seed)
    if method == "lora":
        add_lora(model, r=lora_rank, alpha=lora_alpha)
    elif method != "full":
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    lr = lr or (2e-3 if method == "lora" else 5e-5)
    cfg = make_config("tiny", lr=lr, min_lr=lr / 10, max_iters=steps,
                      warmup_iters=max(1, steps // 20), decay_iters=steps, batch_size=batch_size,
                      weight_decay=0.0, eval_interval=eval_interval or max(1, steps // 4),
                      eval_iters=0, out_dir=out_dir, save_frozen=False, device=device,
                      precision="fp32", seed=seed, progress=out_dir is not None, fused_adamw=True)
    tick = time.perf_counter()
    history = train(cfg, model, data, loss_fn=packed_loss if packing else next_token_loss, log=log)
    seconds = time.perf_counter() - tick
    after = measure(model) | knowledge_scores(model, tokenizer)
    log(f"after: {after}")
    n_trainable, n_total = count_parameters(model)
    return dict(task=task, method=method, steps=steps, batch_size=batch_size, lr=lr,
                packing=packing, before=before, after=after, train_seconds=seconds,
                seconds_per_step=seconds / steps, trainable_params=n_trainable,
                total_params=n_total, training_mb=training_bytes(model) / 1e6, history=history)
# --8<-- [end:runs]


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

# --8<-- [start:cli]
ABLATION = [  # (trainable, pooling, weights): the rows that cache their frozen bottom come first
    ("last-block", "last", "pretrained"), ("head", "last", "pretrained"),
    ("last-block", "mean", "pretrained"), ("last-block", "last", "random"),
    ("lora", "last", "pretrained"), ("all", "last", "pretrained"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune SmolLM2-135M-Instruct with Chapter 8's train.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    classify = commands.add_parser("classify", help="a spam classifier, with its baselines",
                                   allow_abbrev=False)
    classify.add_argument("--trainable", choices=TRAINABLE, default="last-block")
    classify.add_argument("--pooling", choices=sorted(POOLINGS), default="last")
    classify.add_argument("--weights", choices=("pretrained", "random"), default="pretrained")
    classify.add_argument("--ablation", action="store_true",
                          help="every row of the chapter's table, and baselines")
    classify.add_argument("--epochs", type=float, default=1)
    classify.add_argument("--max-full-iters", type=int, default=None,
                          help="at most this many iterations for the rows that run the whole "
                               "model (all, lora); 0 leaves those rows out of --ablation")
    classify.add_argument("--limit", type=int, default=None,
                          help="use only the first N messages of each split")
    sft = commands.add_parser("sft", help="supervised fine-tuning on chat examples",
                              allow_abbrev=False)
    sft.add_argument("--task", choices=("arithmetic", "instructions"), default="arithmetic")
    sft.add_argument("--method", choices=("lora", "full"), default="lora")
    sft.add_argument("--steps", type=int, default=200)
    sft.add_argument("--lora-rank", type=int, default=8)
    sft.add_argument("--lora-alpha", type=float, default=16)
    sft.add_argument("--packing", action="store_true",
                     help="pack examples into rows instead of padding")
    sft.add_argument("--n-train", type=int, default=2000, help="arithmetic problems to train on")
    sft.add_argument("--n-test", type=int, default=100, help="held-out arithmetic problems")
    for command in (classify, sft):
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--lr", type=float, default=None, help="default: by method")
        command.add_argument("--seed", type=int, default=123)
        command.add_argument("--device", default="cpu", help="cpu, cuda, ...")
        command.add_argument("--out-dir", default=None,
                             help="checkpoints (resumable) and the saved weights")
        command.add_argument("--summary", default=None,
                             help="write the run's figures and history to this JSON file")
    return parser.parse_args(argv)


def write_summary(summary, path):
    if path:
        write_atomically(path, json.dumps(summary, indent=1).encode())


def classify_command(args):
    """One row of the table, or (--ablation) every row and both baselines. The rows that
    freeze the same bottom share its hidden states, computed once per kind of weights."""
    splits = {name: rows[:args.limit] for name, rows in spam_splits(load_sms_spam()).items()}
    rows = ABLATION if args.ablation else [(args.trainable, args.pooling, args.weights)]
    summary = {"rows": [], "sizes": {k: len(v) for k, v in splits.items()}}
    pretrained, tokenizer = load_smollm2(device=args.device)
    n = pretrained.config.n_layer
    cached = {}
    for trainable, pooling, weights in rows:
        start = first_trained_block(trainable, n)
        if args.ablation and not start and args.max_full_iters == 0:
            continue
        # the baselines before the slow rows
        if args.ablation and not start and "zero_shot" not in summary:
            summary |= baselines(pretrained, tokenizer, splits)
            print(f"baselines: bag of words {summary['bag_of_words']['test_accuracy']:.1%}, "
                  f"zero-shot {summary['zero_shot']['test_accuracy']:.1%} (calibrated on val: "
                  f"{summary['zero_shot']['calibrated_test_accuracy']:.1%})", flush=True)
        if weights not in cached:
            torch.manual_seed(args.seed)  # random weights: the same architecture, fresh weights
            cached[weights] = {"model": pretrained if weights == "pretrained"
                               else type(pretrained)(pretrained.config).to(args.device)}
        base = cached[weights]["model"]
        # the frozen bottom, run once per kind of weights
        if start and start not in cached[weights]:
            tick = time.perf_counter()
            states = classifier_inputs(base, tokenizer, splits, n - 1)
            cached[weights] |= {n - 1: states,
                                n: {k: hidden_states(base, v, n, start=n - 1)
                                    for k, v in states.items()},
                                "seconds": time.perf_counter() - tick}
        out_dir = f"{args.out_dir}/{trainable}-{pooling}-{weights}" if args.out_dir else None
        row, _ = classifier_run(copy.deepcopy(base), tokenizer, splits, trainable, pooling,
                                args.epochs, args.batch_size, args.lr, cached[weights].get(start),
                                args.seed, out_dir, evaluations=4 if start else 1,
                                max_iters=None if start else args.max_full_iters,
                                device=args.device)
        row.update(weights=weights, peak_mb=peak_memory_mb(),
                   cache_seconds=cached[weights]["seconds"] if start else 0)
        print(f"{trainable:10} {pooling:4} {weights:10} test accuracy {row['test_accuracy']:.1%} "
              f"(val {row['val_accuracy']:.1%}), {row['seconds']:.0f} s "
              f"(+{row['cache_seconds']:.0f} s of cached states), "
              f"{row['trainable_params']:,} trained parameters", flush=True)
        summary["rows"].append(row)
        write_summary(summary, args.summary)
    if args.ablation and "zero_shot" not in summary:
        summary |= baselines(pretrained, tokenizer, splits)
        write_summary(summary, args.summary)
    return summary


def baselines(model, tokenizer, splits):
    """The bag-of-words logistic regression, and the model asked zero-shot: as it answers
    (log-odds > 0), and with the one threshold that is best on the validation split."""
    tick = time.perf_counter()
    scores, _, vocabulary = bag_of_words_baseline(splits, log=lambda s: None)
    bow = dict(scores, vocabulary=len(vocabulary), seconds=time.perf_counter() - tick)
    tick = time.perf_counter()
    odds = {
        name: zero_shot_log_odds(model, tokenizer, [t for t, _ in splits[name]])
        for name in ("val", "test")
    }
    labels = {name: torch.tensor([y for _, y in splits[name]]) for name in ("val", "test")}
    acc = lambda name, threshold: (((odds[name] > threshold).long() == labels[name])  # noqa: E731
                                   .float().mean().item())
    threshold = max(odds["val"].tolist(), key=lambda t: acc("val", t - 1e-6)) - 1e-6
    zero_shot = {"test_accuracy": acc("test", 0.0),
                 "predicted_spam": (odds["test"] > 0).float().mean().item(),
                 "threshold": threshold, "calibrated_test_accuracy": acc("test", threshold),
                 "seconds": time.perf_counter() - tick}
    return {"bag_of_words": bow, "zero_shot": zero_shot}


def sft_command(args):
    model, tokenizer = load_smollm2(device=args.device)
    summary = sft_run(model, tokenizer, args.task, args.method, args.steps, args.batch_size,
                      args.lr, args.lora_rank, args.lora_alpha, args.packing, n_train=args.n_train,
                      n_test=args.n_test, seed=args.seed, out_dir=args.out_dir, device=args.device)
    summary["peak_mb"] = peak_memory_mb()
    if args.out_dir:
        path = save_finetuned(model, Path(args.out_dir) / "model.safetensors", task=args.task,
                              method=args.method)
        print(f"saved the fine-tuned weights to {path}; chat with them:\n"
              f"    python code/ch12_pretrained.py chat --checkpoint {path}")
    print(f"{args.task} {args.method}: before {summary['before']}\n after {summary['after']}\n"
          f"{summary['seconds_per_step']:.2f} s per step, peak memory {summary['peak_mb']:.0f} MB")
    write_summary(summary, args.summary)
    return summary


def check_positive(args, names):
    """A clear error for a count, size or rate that must be positive, before any model loads.
    names: attributes of args; those the command does not have are skipped."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def main(argv=None):
    """The command line. Errors are exceptions: run_command prints them in one line."""
    args = parse_args(argv)
    check_positive(args, ["epochs", "limit", "steps", "lora_rank", "lora_alpha", "n_train",
                          "n_test", "batch_size", "lr"])
    (classify_command if args.command == "classify" else sft_command)(args)
    return 0
# --8<-- [end:cli]


# ---------------------------------------------------------------------------------------
# Figures, drawn from the stored summaries of the command-line runs (docs/data/)
# ---------------------------------------------------------------------------------------

def plot_classification(path=DATA_DIR / "ch13_classification.json"):
    """Test accuracy of every row of the ablation, beside the two baselines."""
    import matplotlib.pyplot as plt

    summary = json.loads(Path(path).read_text())
    rows = summary["rows"]
    labels = [f"{r['trainable']}, {r['pooling']} token, {r['weights']}" if r["pooling"] == "last"
              else f"{r['trainable']}, mean pooling, {r['weights']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.4))
    ax.barh(range(len(rows)), [100 * r["test_accuracy"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(100 * r["test_accuracy"] + 0.5, i, f"{100 * r['test_accuracy']:.1f}%", va="center",
                fontsize=8)
    for name, style in (("bag_of_words", "--"), ("zero_shot", ":")):
        if name in summary:
            value = 100 * summary[name]["test_accuracy"]
            ax.axvline(value, color="black", ls=style, lw=1,
                       label=f"{name.replace('_', ' ')}: {value:.1f}%")
    ax.axvline(50, color="gray", lw=0.8, label="chance: 50%")
    ax.set(yticks=range(len(rows)), yticklabels=labels, xlim=(0, 108), xlabel="test accuracy (%)")
    ax.invert_yaxis()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_sft_losses(paths=(DATA_DIR / "ch13_sft_arithmetic_lora.json",
                           DATA_DIR / "ch13_sft_arithmetic_full.json",
                           DATA_DIR / "ch13_sft_instructions_lora.json")):
    """The training loss (response tokens only) of the SFT runs, per iteration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for path in paths:
        if Path(path).exists():
            run = json.loads(Path(path).read_text())
            losses = run["history"]["train"]
            ax.plot(range(1, len(losses) + 1), losses, label=f"{run['task']}, {run['method']}")
    ax.set(xlabel="iteration", ylabel="loss on the responses (nats per token)", yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(run_command(main))
