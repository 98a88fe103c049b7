"""Chapter 14: learning from preferences and rewards — DPO and RL with verifiable rewards.

After supervised fine-tuning (Chapter 13), a model is shaped by comparisons and rewards
instead of by answers to copy. This module builds, on Chapter 13's checkable arithmetic task:

- the log-probability of a completion given its prompt, with the prompt and the padding
  masked, summed or length-normalised;
- rewards from comparisons: the Bradley-Terry model, and a reward model (the LM with a
  scalar head on the last real token) trained on pairs;
- Direct Preference Optimisation (DPO): the loss derived from the KL-regularised objective,
  a frozen reference, and the implicit rewards it tracks;
- preference pairs from the model itself: sampled answers scored by the task's verifier;
- policy gradients: REINFORCE with a baseline, then GRPO (group-normalised advantages, the
  clipped importance ratio, the k3 estimate of the KL divergence, length normalisation),
  trained by Chapter 8's ``train`` with a source of batches that samples from the policy;
- command lines for each run, whose weights Chapter 12's chat command loads:

    .venv/bin/python code/ch14_preferences.py dpo --init runs/ch14/sft/model.safetensors \\
        --out-dir runs/ch14/dpo
    .venv/bin/python code/ch14_preferences.py grpo --init runs/ch14/sft/model.safetensors \\
        --out-dir runs/ch14/grpo
    .venv/bin/python code/ch14_preferences.py reward --init runs/ch14/sft/model.safetensors

Depends on torch, the standard library and chapters 2, 6, 8, 9, 10, 12 and 13. safetensors
(weights), tqdm (progress bars, through Chapter 8) and matplotlib (plots) are imported where
they are used.

Shapes: B batch (rows), T sequence length, V vocabulary, G answers per prompt (a group),
C model width.

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt, ch08_training,
ch09_generation, ch10_evaluation, ch12_pretrained, ch13_finetuning.
"""

# --8<-- [start:imports]
import argparse
import copy
import functools
import json
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ch02_tokenizer import write_atomically
from ch06_gpt import GPT, GPTConfig
from ch08_training import CharTokenizer, make_config, next_token_loss, run_command, train
from ch09_generation import generate, left_pad
from ch10_evaluation import evaluating, pad_right, token_logprobs
from ch12_pretrained import load_smollm2
from ch13_finetuning import (GPTClassifier, SFTBatches, add_lora, arithmetic_examples, chat_prompt,
                             check_answer, check_positive, count_parameters, finetuned_weights,
                             hidden_states, knowledge_scores, peak_memory_mb, response_ids,
                             save_weights, write_summary)
# --8<-- [end:imports]

DATA_DIR = Path(__file__).resolve().parent.parent / "docs" / "data"  # stored run histories


# ---------------------------------------------------------------------------------------
# The task: prompts, answers and the verifier, for a chat model or a small one
# ---------------------------------------------------------------------------------------

# --8<-- [start:tasks]
class ChatTask:
    """Chapter 13's arithmetic problems in a chat model's template (SmolLM2's): the prompt
    ends where the assistant's answer starts, an answer ends with <|im_end|>, and the reward
    is 1 when Chapter 13's check_answer accepts the answer, else 0."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.special_tokens["<|im_end|>"]

    def prompt(self, example):
        return chat_prompt(self.tokenizer, example)

    def answer(self, example):
        return response_ids(self.tokenizer, example)

    def text(self, ids):
        return self.tokenizer.decode([i for i in ids if i != self.eos_id])

    def reward(self, ids, example):
        return float(check_answer(self.text(ids), example))


PROBLEM = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


class CharTask(ChatTask):
    """The same problems for a small model trained from scratch on characters: the prompt
    "47+38=", the answer "85" and a newline, which ends it."""

    def __init__(self):
        self.tokenizer = CharTokenizer("0123456789+-=\n")
        self.eos_id = self.tokenizer.encode("\n")[0]

    def prompt(self, example):
        a, op, b = PROBLEM.match(example["instruction"]).groups()
        return self.tokenizer.encode(f"{a}{op}{b}=")

    def answer(self, example):
        return self.tokenizer.encode(example["output"] + "\n")


def char_examples(n, split="train", seed=0, digits=2):
    """n distinct problems of `digits` digits, drawn from several seeds of Chapter 13's
    arithmetic_examples (one draw holds at most a twentieth of all problems)."""
    seen, out = set(), []
    for s in range(100):
        for e in arithmetic_examples(min(n, (9 * 10 ** (digits - 1)) ** 2 // 20), split,
                                     f"{seed}-{s}", digits):
            if e["instruction"] not in seen:
                seen.add(e["instruction"])
                out.append(e)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct problems of {digits} digits")
# --8<-- [end:tasks]


# ---------------------------------------------------------------------------------------
# Log-probabilities of completions
# ---------------------------------------------------------------------------------------

# --8<-- [start:logprobs]
def pack_completions(prompts, completions, pad_id=0, device=None):
    """Prompt + completion of each row, padded on the right: ids (B, T) and completion_mask
    (B, T), True exactly at the completion's tokens (not the prompt's, not padding)."""
    if any(len(p) == 0 or len(c) == 0 for p, c in zip(prompts, completions)):
        raise ValueError("every prompt and every completion needs at least one token")
    ids = pad_right([torch.tensor(list(p) + list(c)) for p, c in zip(prompts, completions)], pad_id)
    mask = pad_right([torch.tensor([0] * len(p) + [1] * len(c))
                      for p, c in zip(prompts, completions)], 0)
    return ids.to(device), mask.bool().to(device)


def completion_logprobs(model, ids, completion_mask):
    """log p(token | every token before it) for each completion token: (B, T - 1), entry t
    scoring ids[:, t + 1], and 0 at prompt and padding positions. Rows are padded on the
    right, which a causal model never sees from the real tokens (Chapter 10)."""
    targets = ids[:, 1:].masked_fill(~completion_mask[:, 1:], -1)  # -1: not scored
    return token_logprobs(model, ids[:, :-1], targets)


def sequence_logprobs(model, ids, completion_mask, average=False):
    """log p(completion | prompt) of each row, (B,): the sum of its tokens' log-probabilities,
    or with average=True their mean (length-normalised)."""
    total = completion_logprobs(model, ids, completion_mask).sum(dim=-1)
    return total / completion_mask[:, 1:].sum(dim=-1) if average else total
# --8<-- [end:logprobs]


# ---------------------------------------------------------------------------------------
# Rewards from comparisons: Bradley-Terry and a reward model
# ---------------------------------------------------------------------------------------

# --8<-- [start:bradley-terry]
def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """Mean of -log P(chosen > rejected) = -log sigmoid(r_chosen - r_rejected) over the pairs
    (B,): the negative log-likelihood of the comparisons under the Bradley-Terry model."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def reward_model(gpt, start=0):
    """The LM with a scalar head: Chapter 13's classifier with one output, read at the last
    real token of prompt + answer (the only one that has seen all of it)."""
    return GPTClassifier(gpt, n_classes=1, pooling="last", start=start)


class RewardPairs:
    """Pairs for a reward model, for train(): splits {name: [(chosen, rejected), ...]}, each
    a (T,) tensor of prompt + answer ids, or the (T, C) hidden states that enter the first
    trained block. A batch is x (2B, T[, C]) padded on the right, chosen rows first, and the
    lengths (2B,)."""

    def __init__(self, splits):
        self.splits = splits

    def get_batch(self, split, batch_size, generator, device="cpu"):
        rows = torch.randint(len(self.splits[split]), (batch_size,), generator=generator).tolist()
        return self.collate(split, rows, device)

    def in_order(self, split, batch_size, device="cpu"):
        n = len(self.splits[split])
        for start in range(0, n, batch_size):
            yield self.collate(split, range(start, min(start + batch_size, n)), device)

    def collate(self, split, rows, device):
        pairs = [self.splits[split][i] for i in rows]
        seqs = [c for c, _ in pairs] + [r for _, r in pairs]
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        return x.to(device), torch.tensor([len(s) for s in seqs], device=device)


def reward_loss(model, batch):
    """train()'s loss for a reward model: Bradley-Terry on the chosen and rejected rows."""
    x, lengths = batch
    chosen, rejected = model(x, lengths)[:, 0].chunk(2)
    return bradley_terry_loss(chosen, rejected)


def pairwise_accuracy(model, data, split, batch_size=16):
    """The fraction of a split's pairs whose chosen answer gets the higher reward."""
    device = next(model.parameters()).device
    wins = []
    with evaluating(model):
        for x, lengths in data.in_order(split, batch_size, device):
            chosen, rejected = model(x, lengths)[:, 0].chunk(2)
            wins.append(chosen > rejected)
    return torch.cat(wins).float().mean().item()
# --8<-- [end:bradley-terry]


# ---------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-1]
# Exercise 1: the DPO loss
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """The DPO loss of a batch of pairs, and the implicit rewards of each answer.

    Each argument is a (B,) tensor of sequence log-probabilities log p(answer | prompt), of
    the chosen or rejected answer, under the policy or the frozen reference. The implicit
    reward of an answer is beta * (log pi(answer) - log pi_ref(answer)); the loss is the mean
    over pairs of -log sigmoid(chosen reward - rejected reward). Returns (loss, chosen
    rewards (B,), rejected rewards (B,)), the rewards detached from the graph.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()
# --8<-- [end:exercise-1]


# --8<-- [start:dpo]
class PreferenceBatches:
    """Preference pairs for train(): splits {name: [(prompt, chosen, rejected), ...]} of
    token-id lists. The frozen reference's log-probabilities of every answer are computed
    once, here, since they never change. A batch is (ids (2B, T), completion_mask (2B, T),
    reference log-probabilities (2B,)), the chosen rows first."""

    def __init__(self, splits, reference, pad_id=0, average=False, batch_size=16):
        empty = [name for name, rows in splits.items() if not rows]
        if empty:
            raise ValueError(f"no preference pairs in {empty}: no prompt got both a correct and "
                             "an incorrect answer; sample more prompts or more answers per prompt")
        self.splits, self.pad_id, self.average = splits, pad_id, average
        device = next(reference.parameters()).device
        self.reference = {}
        with evaluating(reference):
            for name in splits:
                logps = [sequence_logprobs(reference, ids, mask, average) for ids, mask, _ in
                         self.in_order(name, batch_size, device, with_reference=False)]
                chosen, rejected = zip(*[lp.chunk(2) for lp in logps])
                self.reference[name] = torch.stack([torch.cat(chosen), torch.cat(rejected)],
                                                   dim=1).cpu()  # (N, 2)

    def get_batch(self, split, batch_size, generator, device="cpu"):
        rows = torch.randint(len(self.splits[split]), (batch_size,), generator=generator).tolist()
        return self.collate(split, rows, device)

    def in_order(self, split, batch_size, device="cpu", with_reference=True):
        n = len(self.splits[split])
        for start in range(0, n, batch_size):
            yield self.collate(split, list(range(start, min(start + batch_size, n))), device,
                               with_reference)

    def collate(self, split, rows, device, with_reference=True):
        triples = [self.splits[split][i] for i in rows]
        prompts = [p for p, _, _ in triples] * 2
        answers = [c for _, c, _ in triples] + [r for _, _, r in triples]
        ids, mask = pack_completions(prompts, answers, self.pad_id, device)
        ref = None
        if with_reference:
            ref = torch.cat([self.reference[split][rows, 0],
                             self.reference[split][rows, 1]]).to(device)
        return ids, mask, ref


def dpo_batch_loss(model, batch, beta=0.1, average=False):
    """train()'s loss for DPO: the policy's log-probabilities of both answers of each pair,
    against the reference's that the batch carries."""
    ids, mask, ref = batch
    chosen, rejected = sequence_logprobs(model, ids, mask, average).chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0]


def preference_metrics(model, data, split, beta=0.1, batch_size=16):
    """The implicit rewards on a split's pairs: mean reward of the chosen and rejected answers,
    their mean margin, the preference accuracy (margin > 0) and the DPO loss."""
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with evaluating(model):
        for ids, mask, ref in data.in_order(split, batch_size, device):
            policy = sequence_logprobs(model, ids, mask, data.average)
            _, c, r = dpo_loss(*policy.chunk(2), *ref.chunk(2), beta)
            chosen.append(c)
            rejected.append(r)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    margin = chosen - rejected
    return {"chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
            "margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item(),
            "loss": -F.logsigmoid(margin).mean().item()}
# --8<-- [end:dpo]


# ---------------------------------------------------------------------------------------
# Sampling answers and scoring them: preference pairs from the model itself
# ---------------------------------------------------------------------------------------

# --8<-- [start:sampling]
@torch.no_grad()
def sample_answers(model, task, examples, n_samples, max_new_tokens=8, temperature=1.0,
                   generator=None, batch_size=64):
    """n_samples answers to each example's prompt, drawn by Chapter 9's generate (KV cache,
    prompts padded on the left, one batch for many rows). Returns, per example, a list of
    n_samples token-id lists, each cut after the end token (kept: the model must learn to
    stop). temperature 0 is greedy."""
    prompts = [task.prompt(e) for e in examples for _ in range(n_samples)]
    device = next(model.parameters()).device
    answers = []
    with evaluating(model):
        for start in range(0, len(prompts), batch_size):
            idx, mask = left_pad(prompts[start:start + batch_size], 0, device)
            out = generate(model, idx, max_new_tokens, temperature=temperature, eos_id=task.eos_id,
                           padding_mask=mask, generator=generator)
            for row in out[:, idx.shape[1]:].tolist():
                answers.append(row[:row.index(task.eos_id) + 1] if task.eos_id in row else row)
    return [answers[i:i + n_samples] for i in range(0, len(answers), n_samples)]


def score_answers(task, examples, answers):
    """The verifier's reward of every answer: a list (per example) of lists of floats."""
    return [[task.reward(a, e) for a in group] for e, group in zip(examples, answers)]


def preference_pairs(task, examples, answers, rewards, pairs_per_prompt=1, seed=0):
    """(prompt, chosen, rejected) triples: for each prompt whose answers include a correct
    and an incorrect one, up to pairs_per_prompt pairs, each answer used at most once."""
    rng = random.Random(seed)
    triples = []
    for example, group, scores in zip(examples, answers, rewards):
        good = [a for a, r in zip(group, scores) if r > 0]
        bad = [a for a, r in zip(group, scores) if r <= 0]
        rng.shuffle(good)
        rng.shuffle(bad)
        for chosen, rejected in list(zip(good, bad))[:pairs_per_prompt]:
            triples.append((task.prompt(example), chosen, rejected))
    return triples


def greedy_accuracy(model, task, examples, max_new_tokens=8, batch_size=64):
    """The fraction of examples whose greedy answer the verifier accepts."""
    answers = sample_answers(model, task, examples, 1, max_new_tokens, temperature=0,
                             batch_size=batch_size)
    return sum(r[0] for r in score_answers(task, examples, answers)) / len(examples)
# --8<-- [end:sampling]


# ---------------------------------------------------------------------------------------
# Policy gradients: REINFORCE, then GRPO
# ---------------------------------------------------------------------------------------

# --8<-- [start:reinforce]
def reinforce_loss(logps, rewards, baseline=0.0):
    """-(r - b) log pi(y | x), mean over the sampled answers (B,): its gradient is the
    REINFORCE estimate of -grad E[r]. A baseline b that does not depend on the answer
    leaves the estimate unbiased and can shrink its variance."""
    return -((rewards - baseline) * logps).mean()
# --8<-- [end:reinforce]


# --8<-- [start:exercise-2]
# Exercise 2: group-normalised advantages
def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO's advantages: rewards (N * G,), the G answers of each prompt one after the other,
    -> (N * G,): each reward minus the mean of its group, divided by the group's standard
    deviation (with Bessel's correction, as torch.std) plus eps. A group whose answers all
    got the same reward gets advantages of 0: it teaches nothing."""
    if rewards.dim() != 1 or len(rewards) % group_size or group_size < 2:
        raise ValueError(
            f"rewards must be (N * G,) with G = group_size >= 2, got {tuple(rewards.shape)} and "
            f"group_size {group_size}"
        )
    groups = rewards.view(-1, group_size)  # (N, G)
    advantages = ((groups - groups.mean(dim=1, keepdim=True))
                  / (groups.std(dim=1, keepdim=True) + eps))
    return advantages.view(-1)
# --8<-- [end:exercise-2]


# --8<-- [start:kl]
def kl_estimates(logp, ref_logp):
    """Three per-token estimates of KL(pi || pi_ref) from tokens sampled from pi, with
    log r = log pi_ref - log pi (Schulman's k1, k2, k3): k1 = -log r (unbiased, but negative
    half the time), k2 = (log r)^2 / 2 (biased, low variance), k3 = r - 1 - log r (unbiased
    and never negative). GRPO uses k3."""
    log_r = ref_logp - logp
    return {"k1": -log_r, "k2": log_r ** 2 / 2, "k3": log_r.exp() - 1 - log_r}


def kl_k3(logp, ref_logp):
    """The k3 estimate per token: r - 1 - log r, r = pi_ref / pi, >= 0, 0 when they agree."""
    log_r = ref_logp - logp
    return log_r.exp() - 1 - log_r
# --8<-- [end:kl]


# --8<-- [start:exercise-3]
# Exercise 3: the clipped surrogate objective with masking
def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04):
    """GRPO's loss for a batch of sampled answers.

    logp, old_logp, ref_logp (B, T): per-token log-probabilities under the policy being
    trained, the policy that sampled the answers, and the frozen reference; advantages (B,)
    one per answer; mask (B, T) bool, True at the answer's tokens. At each token, with the
    ratio rho = exp(logp - old_logp), the loss is
        -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps) * A) + beta * k3,
    k3 the KL estimate kl_k3(logp, ref_logp) (left out when beta is 0). Average it over each
    answer's own tokens (length normalisation), then over the answers; tokens outside the
    mask count for nothing, whatever their values.
    """
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]  # (B, 1): every token of an answer shares its advantage
    per_token = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if beta:
        per_token = per_token + beta * kl_k3(logp, ref_logp)
    # masked_fill, not *: a NaN off the mask stays out
    per_token = per_token.masked_fill(~mask, 0.0)
    return (per_token.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).mean()
# --8<-- [end:exercise-3]


# --8<-- [start:rollouts]
class Rollouts:
    """train()'s source of batches for GRPO: every batch is sampled from the policy as it is
    now. get_batch draws batch_size prompts, samples group_size answers to each (Chapter 9's
    generate with the KV cache), scores them with the verifier and returns

        (ids (B, T), completion_mask (B, T), advantages (B,), old log-probs (B, T - 1) or
         None, reference log-probs (B, T - 1) or None),  B = batch_size * group_size.

    With updates_per_batch > 1 the same batch is served that many times (several
    optimisation steps per sampling, where the clipped ratio matters) and the log-probs of
    the policy that sampled it are kept; with 1 they equal the policy's own, so none are
    computed. The reference's are computed when a reference is given (beta > 0).
    self.stats[-1] describes the last batch sampled: its mean reward, mean answer length
    (tokens) and the fraction of groups whose rewards were all equal (no signal)."""

    def __init__(self, policy, task, examples, reference=None, group_size=8, max_new_tokens=8,
                 temperature=1.0, updates_per_batch=1, pad_id=0):
        if group_size < 2:
            raise ValueError(
                "GRPO compares answers to the same prompt: group_size must be at least 2")
        self.policy, self.task, self.examples, self.reference = policy, task, examples, reference
        self.group_size, self.max_new_tokens, self.temperature = (group_size, max_new_tokens,
                                                                  temperature)
        self.updates_per_batch, self.pad_id = updates_per_batch, pad_id
        self.batch, self.served, self.stats = None, 0, []

    def get_batch(self, split, batch_size, generator, device="cpu"):
        if split != "train":
            raise ValueError(
                "rollouts are sampled for training only: call train() with eval_iters=0")
        if self.batch is None or self.served == self.updates_per_batch:
            self.batch, self.served = self.sample(batch_size, generator, device), 0
        self.served += 1
        return self.batch

    def sample(self, batch_size, generator, device):
        rows = torch.randint(len(self.examples), (batch_size,), generator=generator).tolist()
        examples = [self.examples[i] for i in rows]
        # sampling, reproducible and resumable
        seed = torch.randint(2**62, (1,), generator=generator).item()
        sampler = torch.Generator(device=device).manual_seed(seed)
        answers = sample_answers(self.policy, self.task, examples, self.group_size,
                                 self.max_new_tokens, self.temperature, sampler)
        rewards = torch.tensor(score_answers(self.task, examples, answers))  # (N, G)
        advantages = group_advantages(rewards.view(-1), self.group_size)
        flat = [a for group in answers for a in group]
        prompts = [self.task.prompt(e) for e in examples for _ in range(self.group_size)]
        ids, mask = pack_completions(prompts, flat, self.pad_id, device)
        old = ref = None
        with torch.no_grad():
            if self.updates_per_batch > 1:
                with evaluating(self.policy):
                    old = completion_logprobs(self.policy, ids, mask)
            if self.reference is not None:
                ref = completion_logprobs(self.reference, ids, mask)
        self.stats.append({"reward": rewards.mean().item(),
                           "length": sum(map(len, flat)) / len(flat),
                           "no_signal": (rewards.std(dim=1) == 0).float().mean().item()})
        return ids, mask, advantages.to(device), old, ref


def grpo_batch_loss(model, batch, clip_eps=0.2, beta=0.04):
    """train()'s loss for GRPO on a batch of Rollouts."""
    ids, mask, advantages, old, ref = batch
    logp = completion_logprobs(model, ids, mask)  # (B, T - 1), with gradients
    old = logp.detach() if old is None else old
    ref = logp.detach() if ref is None else ref
    return grpo_loss(logp, old, ref, advantages, mask[:, 1:], clip_eps, beta)
# --8<-- [end:rollouts]


# ---------------------------------------------------------------------------------------
# Runs: each trained by Chapter 8's train
# ---------------------------------------------------------------------------------------

# --8<-- [start:runs]
def train_config(steps, batch_size, lr, out_dir=None, eval_interval=None, seed=123, device="cpu"):
    """Chapter 8's settings for a fine-tuning run: warmup, cosine decay to lr / 10, no weight
    decay, no validation loss (the metrics come from `evaluate`)."""
    return make_config("tiny", lr=lr, min_lr=lr / 10, max_iters=steps,
                       warmup_iters=max(1, steps // 20), decay_iters=steps, batch_size=batch_size,
                       weight_decay=0.0, eval_interval=eval_interval or max(1, steps // 4),
                       eval_iters=0, out_dir=out_dir, save_frozen=False, device=device,
                       precision="fp32", seed=seed, progress=out_dir is not None, fused_adamw=True)


def prepare_policy(model, method="lora", lora_rank=8, lora_alpha=16, seed=123):
    """A frozen copy of model (the reference), and model made trainable: LoRA adapters on its
    linear layers (Chapter 13), or every weight ("full")."""
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    torch.manual_seed(seed)
    if method == "lora":
        add_lora(model, r=lora_rank, alpha=lora_alpha)
    elif method == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    return reference


def collect_pairs(model, task, examples, n_samples=4, max_new_tokens=8, temperature=1.0, seed=123,
                  val_fraction=0.1):
    """On-policy preference pairs: n_samples answers per training problem, scored by the
    verifier, a correct one paired with an incorrect one; a tenth of the problems' pairs held
    out. Returns ({"train": triples, "val": triples}, statistics of the samples)."""
    tick = time.perf_counter()
    answers = sample_answers(
        model, task, examples, n_samples, max_new_tokens, temperature,
        torch.Generator(device=next(model.parameters()).device).manual_seed(seed))
    rewards = score_answers(task, examples, answers)
    n_val = max(1, round(val_fraction * len(examples)))
    splits = {"train": preference_pairs(task, examples[n_val:], answers[n_val:], rewards[n_val:],
                                        seed=seed),
              "val": preference_pairs(task, examples[:n_val], answers[:n_val], rewards[:n_val],
                                      seed=seed)}
    flat = [r for group in rewards for r in group]
    stats = {"problems": len(examples), "samples": len(flat),
             "sample_accuracy": sum(flat) / len(flat),
             "mixed_groups": sum(0 < sum(g) < len(g) for g in rewards) / len(rewards),
             "train_pairs": len(splits["train"]), "val_pairs": len(splits["val"]),
             "seconds": time.perf_counter() - tick}
    return splits, stats


def dpo_run(model, task, pairs, beta=0.1, steps=20, batch_size=8, lr=1e-4, method="lora",
            average=False, out_dir=None, seed=123, log=print):
    """DPO on preference pairs ({"train", "val"} triples), changing model in place, with
    Chapter 8's train; the implicit-reward metrics of the held-out pairs are tracked.
    Returns the history, the metrics before and after, and the training time."""
    reference = prepare_policy(model, method, seed=seed)
    data = PreferenceBatches(pairs, reference, average=average)
    del reference  # its log-probabilities are in data: the copy can go
    measure = functools.partial(preference_metrics, data=data, split="val", beta=beta)
    before = measure(model)
    cfg = train_config(steps, batch_size, lr, out_dir, seed=seed,
                       device=next(model.parameters()).device.type)
    tick = time.perf_counter()
    history = train(cfg, model, data,
                    loss_fn=functools.partial(dpo_batch_loss, beta=beta, average=average),
                    evaluate=measure, log=log)
    return {"history": history, "pairs_before": before, "pairs_after": measure(model),
            "train_seconds": time.perf_counter() - tick, "beta": beta, "steps": steps,
            "batch_size": batch_size, "lr": lr, "method": method}


def grpo_run(model, task, examples, steps=20, prompts_per_step=4, group_size=8, lr=1e-4, beta=0.04,
             clip_eps=0.2, max_new_tokens=8, temperature=1.0, updates_per_batch=1, method="lora",
             out_dir=None, seed=123, log=print):
    """GRPO on the training problems, changing model in place, with Chapter 8's train: the
    reward and the answer length of every step are recorded (history["metrics"])."""
    reference = prepare_policy(model, method, seed=seed)
    reference = reference if beta else None  # no KL penalty: no reference to compute
    rollouts = Rollouts(model, task, examples, reference, group_size, max_new_tokens, temperature,
                        updates_per_batch)
    cfg = train_config(steps, prompts_per_step, lr, out_dir, eval_interval=1, seed=seed,
                       device=next(model.parameters()).device.type)
    tick = time.perf_counter()
    history = train(cfg, model, rollouts,
                    loss_fn=functools.partial(grpo_batch_loss, clip_eps=clip_eps, beta=beta),
                    evaluate=lambda m: rollouts.stats[-1], log=log)
    return {"history": history, "train_seconds": time.perf_counter() - tick, "steps": steps,
            "prompts_per_step": prompts_per_step, "group_size": group_size, "lr": lr, "beta": beta,
            "clip_eps": clip_eps, "temperature": temperature,
            "updates_per_batch": updates_per_batch, "method": method}


def sft_char_model(task, examples, steps=1500, batch_size=64, lr=3e-3, seed=0, **model_settings):
    """A small GPT trained from scratch on the char task's prompts and answers (Chapter 13's
    SFTBatches: the loss only on the answers), the starting point of the chapter's small
    runs. Returns (model in eval mode, training seconds)."""
    rows = [(task.prompt(e), task.answer(e)) for e in examples]
    config = GPTConfig(**{**dict(vocab_size=task.tokenizer.vocab_size, block_size=16, n_layer=2,
                                 n_head=4, d_model=128, positions="rope", mlp="relu", bias=False),
                          **model_settings})
    torch.manual_seed(seed)
    model = GPT(config)
    cfg = make_config("tiny", lr=lr, min_lr=lr / 10, max_iters=steps, warmup_iters=steps // 20,
                      decay_iters=steps, batch_size=batch_size, eval_iters=0, eval_interval=steps,
                      out_dir=None, device="cpu", precision="fp32", seed=seed, weight_decay=0.0)
    tick = time.perf_counter()
    train(cfg, model, SFTBatches({"train": rows}), loss_fn=next_token_loss, log=lambda s: None)
    return model.eval(), time.perf_counter() - tick
# --8<-- [end:runs]


# --8<-- [start:save]
def save_policy(model, path, init=None, **metadata):
    """The policy's weights that differ from SmolLM2's as one safetensors file that Chapter
    12's load_weights and `chat --checkpoint` read: the merged LoRA weights and the other
    trained ones (Chapter 13's finetuned_weights), and every weight of the file the run
    started from (init), so the file stands alone; written by Chapter 13's save_weights."""
    from safetensors import safe_open

    weights = finetuned_weights(model)
    if init is not None:
        state = model.state_dict()
        with safe_open(str(init), framework="pt") as f:
            names = [n for n in f.keys() if n not in weights]
        weights |= {n: state[n].detach().cpu().contiguous() for n in names}
    return save_weights(weights, path, **metadata)
# --8<-- [end:save]


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

# --8<-- [start:cli]
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Preference and reward training of SmolLM2 on the arithmetic task.",
        allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    reward = commands.add_parser("reward",
                                 help="a reward model trained on on-policy pairs (Bradley-Terry)",
                                 allow_abbrev=False)
    reward.add_argument("--steps", type=int, default=300)
    dpo = commands.add_parser("dpo", help="DPO on on-policy pairs scored by the verifier",
                              allow_abbrev=False)
    dpo.add_argument("--beta", type=float, default=0.1)
    dpo.add_argument("--steps", type=int, default=20)
    dpo.add_argument("--average", action="store_true", help="length-normalised log-probabilities")
    grpo = commands.add_parser("grpo", help="GRPO with the verifier's reward", allow_abbrev=False)
    grpo.add_argument("--beta", type=float, default=0.04, help="weight of the KL penalty (k3)")
    grpo.add_argument("--steps", type=int, default=20)
    grpo.add_argument("--group-size", type=int, default=8)
    grpo.add_argument("--clip", type=float, default=0.2)
    grpo.add_argument("--updates-per-batch", type=int, default=1)
    grpo.add_argument("--temperature", type=float, default=1.0)
    for command in (reward, dpo, grpo):
        command.add_argument("--init", default=None,
                             help="the SFT weights to start from "
                                  "(Chapter 13: runs/.../model.safetensors)")
        command.add_argument("--batch-size", type=int, default=None,
                             help="pairs (reward, dpo) or prompts (grpo)")
        command.add_argument("--lr", type=float, default=None)
        command.add_argument("--method", choices=("lora", "full"), default="lora")
        command.add_argument("--n-train", type=int, default=2000, help="training problems")
        command.add_argument("--n-test", type=int, default=100,
                             help="held-out problems (Chapter 13's test set)")
        command.add_argument("--seed", type=int, default=123)
        command.add_argument("--out-dir", default=None,
                             help="checkpoints (resumable) and the saved weights")
        command.add_argument("--summary", default=None,
                             help="write the run's figures and history to this JSON")
        command.add_argument("--device", default="cpu")
    for command in (reward, dpo):
        command.add_argument("--prompts", type=int, default=256,
                             help="problems to sample answers for")
        command.add_argument("--samples", type=int, default=4, help="answers sampled per problem")
        command.add_argument("--pairs", default=None,
                             help="a JSON file of pairs: read if it exists, else written")
    return parser.parse_args(argv)


def held_out(model, task, test, tokenizer):
    """Held-out exact match (greedy) and what the model knew before (Chapter 13)."""
    tick = time.perf_counter()
    scores = ({"exact_match": greedy_accuracy(model, task, test)}
              | knowledge_scores(model, tokenizer))
    return scores | {"seconds": time.perf_counter() - tick}


def load_pairs(args, model, task, train_set):
    """The pairs file when it exists, otherwise freshly sampled pairs (written to it)."""
    if args.pairs and Path(args.pairs).exists():
        stored = json.loads(Path(args.pairs).read_text())
        return stored["pairs"], stored["stats"]
    pairs, stats = collect_pairs(model, task, train_set[:args.prompts], args.samples,
                                 seed=args.seed)
    print(f"pairs: {stats}", flush=True)
    if args.pairs:
        write_atomically(args.pairs, json.dumps({"pairs": pairs, "stats": stats}).encode())
    return pairs, stats


def preference_command(args):
    """One run: the model before, the training, the model after, the weights saved."""
    model, tokenizer = load_smollm2(args.init, args.device)
    task = ChatTask(tokenizer)
    train_set = arithmetic_examples(args.n_train, "train", args.seed)
    test = arithmetic_examples(args.n_test, "test", args.seed)  # Chapter 13's held-out problems
    summary = {"command": args.command, "init": args.init}
    if args.command in ("dpo", "grpo"):
        summary["before"] = held_out(model, task, test, tokenizer)
        print(f"before: {summary['before']}", flush=True)
    if args.command == "reward":
        pairs, summary["pairs"] = load_pairs(args, model, task, train_set)
        summary |= reward_run(model, pairs, args.steps, args.batch_size or 16, args.lr or 1e-4,
                              args.seed)
        print(f"reward model: held-out pairwise accuracy {summary['val_accuracy']:.1%}")
    elif args.command == "dpo":
        pairs, summary["pairs"] = load_pairs(args, model, task, train_set)
        summary |= dpo_run(model, task, pairs, args.beta, args.steps, args.batch_size or 8,
                           args.lr or 1e-4, args.method, args.average, args.out_dir, args.seed)
    else:
        summary |= grpo_run(model, task, train_set, args.steps, args.batch_size or 4,
                            args.group_size, args.lr or 1e-4, args.beta, args.clip,
                            temperature=args.temperature, updates_per_batch=args.updates_per_batch,
                            method=args.method, out_dir=args.out_dir, seed=args.seed)
    if args.command in ("dpo", "grpo"):
        summary["after"] = held_out(model, task, test, tokenizer)
        print(f"after: {summary['after']}", flush=True)
        if args.out_dir:
            path = save_policy(model, Path(args.out_dir) / "model.safetensors", args.init,
                               run=args.command)
            print(f"saved the weights to {path}; chat with them:\n"
                  f"    python code/ch12_pretrained.py chat --checkpoint {path}")
    summary["peak_mb"] = peak_memory_mb()
    write_summary(summary, args.summary)
    return summary


def reward_run(gpt, pairs, steps=300, batch_size=16, lr=1e-4, seed=123, log=print):
    """A reward model from gpt: its last block, final norm and a scalar head trained with the
    Bradley-Terry loss on the pairs; the frozen blocks below run once (Chapter 13's
    hidden_states). Returns its pairwise accuracy on the training and held-out pairs."""
    tick = time.perf_counter()
    start = gpt.config.n_layer - 1
    states = {}
    for name, triples in pairs.items():
        seqs = [torch.tensor(p + a) for p, c, r in triples for a in (c, r)]
        h = hidden_states(gpt, seqs, start)
        states[name] = list(zip(h[0::2], h[1::2]))
    torch.manual_seed(seed)
    model = reward_model(gpt, start=start)
    model.requires_grad_(False)
    for part in (gpt.blocks[-1], gpt.norm_f, gpt.lm_head):
        part.requires_grad_(True)
    data = RewardPairs(states)
    cfg = train_config(steps, batch_size, lr, seed=seed)
    history = train(cfg, model, data, loss_fn=reward_loss,
                    evaluate=lambda m: {"val_accuracy": pairwise_accuracy(m, data, "val")}, log=log)
    trainable, total = count_parameters(model)
    return {"history": history, "train_accuracy": pairwise_accuracy(model, data, "train"),
            "val_accuracy": pairwise_accuracy(model, data, "val"),
            "seconds": time.perf_counter() - tick, "trainable_params": trainable,
            "total_params": total, "steps": steps, "lr": lr}


def main(argv=None):
    """The command line. Errors are exceptions: run_command prints them in one line."""
    args = parse_args(argv)
    check_positive(args, ["steps", "batch_size", "lr", "n_train", "n_test", "group_size",
                          "updates_per_batch", "clip", "prompts", "samples"])
    preference_command(args)
    return 0
# --8<-- [end:cli]


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def read_run(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: it is written by the chapter's command lines (--summary)")
    return json.loads(path.read_text())


def plot_grpo_run(path=DATA_DIR / "ch14_grpo.json"):
    """Mean reward and mean answer length of every GRPO step (a stored run)."""
    import matplotlib.pyplot as plt

    run = read_run(path)
    steps, stats = zip(*run["history"]["metrics"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    reward = [s["reward"] for s in stats]
    ax1.plot(steps, reward, ".", alpha=0.5, label="each step")
    window = 5
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1])
              for i in range(len(reward))]
    ax1.plot(steps, smooth, "-", label=f"mean of the last {window}")
    ax1.set(xlabel="step", ylabel="mean reward of the sampled answers", ylim=(0, 1.02),
            title="Reward")
    ax1.legend(fontsize=8)
    ax2.plot(steps, [s["length"] for s in stats], ".-")
    ax2.set(xlabel="step", ylabel="tokens per answer", title="Answer length", ylim=(0, None))
    fig.tight_layout()
    return fig


def plot_dpo_run(path=DATA_DIR / "ch14_dpo.json"):
    """The DPO loss of every step, and the held-out pairs' implicit rewards (a stored run)."""
    import matplotlib.pyplot as plt

    run = read_run(path)
    history = run["history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(range(1, len(history["train"]) + 1), history["train"], lw=1)
    ax1.axhline(0.6931, color="0.5", ls=":", lw=1, label="log 2: the policy equals the reference")
    ax1.set(xlabel="step", ylabel="DPO loss (batch)", title="Training loss")
    ax1.legend(fontsize=8)
    points = [[0, run["pairs_before"]]] + history["metrics"]
    steps = [p[0] for p in points]
    for key, label in (("chosen_reward", "chosen"), ("rejected_reward", "rejected"),
                       ("margin", "margin")):
        ax2.plot(steps, [p[1][key] for p in points], "o-", label=label)
    ax2.axhline(0, color="0.5", lw=0.8)
    ax2.set(xlabel="step", ylabel="implicit reward (held-out pairs)", title="beta log(pi / pi_ref)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_kl_estimators():
    """k1, k2 and k3 as functions of the log-ratio log r = log pi_ref - log pi of one token."""
    import matplotlib.pyplot as plt

    log_r = torch.linspace(-2.5, 2.5, 201, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, values in kl_estimates(torch.zeros_like(log_r), log_r).items():
        ax.plot(log_r, values, label=name)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set(xlabel="log r = log pi_ref(token) - log pi(token)", ylabel="estimate", ylim=(-2.6, 4),
           title="Per-token estimates of KL(pi || pi_ref)")
    ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(run_command(main))
