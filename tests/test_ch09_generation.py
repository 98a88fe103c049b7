"""Tests of Chapter 9: generating text.

References: Hugging Face transformers' logits processors (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, RepetitionPenaltyLogitsProcessor) and its beam search,
Chapter 6's GPT.generate and Chapter 7's greedy_decode, PyTorch's FLOP counter, brute-force
loops that recompute everything, exhaustive search, and properties checked with hypothesis.

Run against your own module with: pytest tests/test_ch09_generation.py --impl my_ch09.py
"""

import itertools
import json
import math
import os
import shutil
import warnings
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import ch07_transformer as ch07
from ch06_gpt import GPT, GPTConfig, to_hf_gpt2
from ch08_training import run_command
import helpers
from helpers import ListCache, tiny_train_settings

FAST = settings(max_examples=30, deadline=None)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch09_generation")


tiny_gpt = partial(helpers.tiny_gpt, vocab_size=97, block_size=32, n_head=4)


# Learned positions, rotary positions, and grouped-query attention (2 kv heads for 4 heads).
VARIANTS = {"learned": dict(), "rope": dict(positions="rope"),
            "gqa-rope": dict(positions="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False)}

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40)


def random_logits(seed, rows=8, vocab=50, scale=3.0):
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# Temperature, top-k, top-p, repetition penalty
# ---------------------------------------------------------------------------------------


@FAST
@given(logits=logit_rows, temperature=st.floats(0.05, 20))
def test_entropy_grows_with_temperature_at_the_derived_rate(ch, logits, temperature):
    z = torch.tensor(logits, dtype=torch.float64)
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    h = ch.entropy(z / t)
    (dh_dt,) = torch.autograd.grad(h, t)
    p = torch.softmax(z / temperature, -1)
    variance = (p * z**2).sum() - (p * z).sum() ** 2  # Var_p(z)
    torch.testing.assert_close(dh_dt, variance / temperature**3, atol=1e-9, rtol=1e-6)
    assert h.item() <= math.log(len(logits)) + 1e-9


def test_entropy_limits_are_zero_and_log_v(ch):
    z = torch.tensor([3.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    assert ch.entropy(z / 1e-3).item() == pytest.approx(0.0, abs=1e-12)  # greedy: one token
    assert ch.entropy(z / 1e6).item() == pytest.approx(math.log(4), abs=1e-6)  # uniform
    torch.testing.assert_close(ch.entropy(z), torch.distributions.Categorical(logits=z).entropy())


@FAST
@given(logits=logit_rows, seed=st.integers(0, 2**31))
def test_temperature_towards_zero_samples_the_argmax(ch, logits, seed):
    z = torch.tensor([logits])
    top2 = z.topk(2).values[0]
    assume(top2[0] - top2[1] > 1e-3)  # a unique maximum
    temperature = (top2[0] - top2[1]).item() / 200  # every other token: p < e^-200 = 0 in float32
    sampled = ch.next_token(z, temperature=temperature, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sampled, z.argmax(-1))
    assert torch.equal(ch.next_token(z, temperature=0), z.argmax(-1))


def test_temperature_and_top_k_match_hugging_face(ch):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    logits = random_logits(0)
    logits[0, :5] = logits[0, 10]  # ties with the k-th largest are kept by both
    ids = torch.zeros(8, 1, dtype=torch.long)
    for temperature in (0.3, 1.0, 2.5):
        torch.testing.assert_close(ch.apply_temperature(logits, temperature),
                                   TemperatureLogitsWarper(temperature)(ids, logits))
    for k in (1, 5, 20, 50, 80):
        assert torch.equal(ch.top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits))


@pytest.mark.exercise(1)
def test_exercise_1_top_p_matches_hugging_face(ch):
    from transformers.generation.logits_process import TopPLogitsWarper

    ids = torch.zeros(8, 1, dtype=torch.long)
    for seed, p in itertools.product(range(4), (0.05, 0.3, 0.5, 0.9, 0.99)):
        logits = random_logits(seed, scale=1.0 + seed)
        assert torch.equal(ch.top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits)), (seed, p)
    assert torch.equal(ch.top_p_filter(logits, 1.0), logits)


@pytest.mark.exercise(1)
@FAST
@given(logits=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=30, unique=True),
       p=st.floats(0.01, 0.999))
def test_exercise_1_top_p_keeps_the_smallest_set_whose_mass_reaches_p(ch, logits, p):
    z = torch.tensor([logits], dtype=torch.float64)
    probs = torch.softmax(z, -1)[0]
    kept = torch.isfinite(ch.top_p_filter(z, p))[0]
    assert probs[kept].sum() >= p - 1e-12  # reaches p
    assert probs[kept].min() >= probs[~kept].max() if (~kept).any() else True  # the most probable ones
    assert probs[kept].sum() - probs[kept].min() < p + 1e-12  # smallest: one fewer falls short


def test_rules_and_their_order(ch):
    logits = random_logits(1)
    context = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    # top-k keeps the same tokens before or after temperature (dividing by T > 0 keeps the order)
    for k in (3, 10):
        assert torch.equal(torch.isfinite(ch.top_k_filter(logits / 0.5, k)), torch.isfinite(ch.top_k_filter(logits, k)))
    # the repetition penalty and temperature commute: both scale each logit by a positive factor
    torch.testing.assert_close(ch.apply_repetition_penalty(logits / 0.7, context, 1.3),
                               ch.apply_repetition_penalty(logits, context, 1.3) / 0.7)
    # top-p does not commute with temperature: a hotter distribution needs more tokens
    hot, cold = (torch.isfinite(ch.top_p_filter(logits / t, 0.9)).sum() for t in (2.0, 0.5))
    assert hot > cold
    # top-k then top-p keeps a prefix of the ranking no longer than top-k's or top-p's alone
    for k, p in ((5, 0.5), (10, 0.9), (40, 0.8)):
        both = torch.isfinite(ch.top_p_filter(ch.top_k_filter(logits, k), p))
        assert (both <= torch.isfinite(ch.top_k_filter(logits, k))).all()
        assert (both <= torch.isfinite(ch.top_p_filter(logits, p))).all()
    # process_logits applies them in Hugging Face's order
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8),
                              TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    ours = ch.process_logits(logits, context, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    torch.testing.assert_close(ours, hf(context, logits))


@pytest.mark.exercise(2)
def test_exercise_2_repetition_penalty_matches_hugging_face(ch):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits(2)
    context = torch.randint(0, 50, (8, 30), generator=torch.Generator().manual_seed(1))  # repeats included
    for penalty in (0.8, 1.2, 2.0):
        torch.testing.assert_close(ch.apply_repetition_penalty(logits, context, penalty),
                                   RepetitionPenaltyLogitsProcessor(penalty)(context, logits))


@pytest.mark.exercise(2)
def test_exercise_2_repetition_penalty_lowers_seen_tokens_only_and_ignores_padding(ch):
    logits = random_logits(3, rows=2, vocab=10)
    context = torch.tensor([[0, 4, 4, 7], [9, 9, 1, 2]])
    mask = torch.tensor([[False, True, True, True], [False, False, True, True]])  # left padding
    out = ch.apply_repetition_penalty(logits, context, 1.5, mask)
    seen = torch.zeros(2, 10, dtype=torch.bool)
    seen[0, [4, 7]] = seen[1, [1, 2]] = True  # padded ids 0 and 9 do not count
    assert torch.equal(out[~seen], logits[~seen])
    assert (out[seen] < logits[seen]).all()
    single = ch.apply_repetition_penalty(logits[:1], torch.tensor([[4]]), 1.5)  # one seen token
    assert torch.softmax(single, -1)[0, 4] < torch.softmax(logits[:1], -1)[0, 4]


def test_sampling_follows_the_distribution_and_the_seed(ch):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([ch.sample(logits.expand(2000, 5), gen) for _ in range(10)])  # 20,000 draws
    frequencies = torch.bincount(draws, minlength=5) / len(draws)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), atol=0.012, rtol=0)
    assert frequencies[4] == 0  # a filtered token is never drawn
    a, b = (ch.sample(logits.expand(50, 5), torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


def test_one_generator_per_row_makes_a_row_independent_of_the_batch(ch):
    logits = random_logits(4, rows=3, vocab=20, scale=0.5)
    together = ch.sample(logits, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = torch.cat([ch.sample(logits[i:i + 1], [torch.Generator().manual_seed(s)]) for i, s in enumerate((1, 2, 3))])
    assert torch.equal(together, alone)


# ---------------------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_exercise_3_kv_cache_writes_in_place_and_returns_every_token(ch):
    cache, reference = ch.KVCache(2, 3, max_len=10, head_dim=4), ListCache()
    pointers = cache.k.data_ptr(), cache.v.data_ptr()
    for T in (4, 1, 1, 3):
        k, v = torch.randn(2, 3, T, 4), torch.randn(2, 3, T, 4)
        all_k, all_v = cache.update(k, v)
        ref_k, ref_v = reference.update(k, v)
        assert torch.equal(all_k, ref_k) and torch.equal(all_v, ref_v)
        assert cache.seq_len == reference.seq_len
        assert all_k.data_ptr() == pointers[0] and all_v.data_ptr() == pointers[1]  # views, no copies
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == pointers
    with pytest.raises(ValueError, match="10"):
        cache.update(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))  # 9 + 2 > 10


@pytest.mark.exercise(3)
def test_exercise_3_cached_logits_and_tokens_equal_uncached(ch):
    for name, overrides in VARIANTS.items():
        model = tiny_gpt(**overrides)
        idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            caches = ch.make_kv_caches(model, 2, 20)
            model(idx[:, :6], kv_caches=caches)  # prefill: a prompt of 6 tokens
            qkv = [ch.fused_qkv(block.attn) for block in model.blocks]
            for t in range(6, 20):  # then one token at a time, against a full forward
                positions = torch.full((2, 1), t)
                cached = ch.decode_step(model, idx[:, t:t + 1], positions, caches, qkv)
                torch.testing.assert_close(cached, model(idx[:, :t + 1])[0][:, -1], atol=1e-5, rtol=1e-4, msg=name)
        prompt = idx[:, :5]
        assert torch.equal(ch.generate(model, prompt, 27, temperature=0),
                           ch.generate(model, prompt, 27, temperature=0, use_cache=False)), name
        kw = dict(temperature=1.2, top_k=40, top_p=0.95, repetition_penalty=1.1)
        sampled = [ch.generate(model, prompt, 27, use_cache=cache, generator=torch.Generator().manual_seed(3), **kw)
                   for cache in (True, False)]
        assert torch.equal(*sampled), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_through_the_models_own_forward_equals_the_lean_step(ch, variant):
    model = tiny_gpt(**VARIANTS[variant])
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(1))
    lean = ch.generate(model, prompt, 28, temperature=0)
    assert torch.equal(lean, ch.generate(model, prompt, 28, temperature=0, lean_step=False))


def test_cache_memory_formula(ch):
    model = tiny_gpt(**VARIANTS["gqa-rope"])
    caches = ch.make_kv_caches(model, batch_size=3, max_len=20)
    per_token = ch.kv_cache_bytes_per_token(model.config)
    assert per_token == 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads of 8 dims, 4 bytes
    assert sum(c.nbytes for c in caches) == per_token * 3 * 20 == sum(c.k.nbytes + c.v.nbytes for c in caches)
    assert ch.kv_cache_bytes_per_token(GPTConfig.gpt2()) == 73_728  # 72 KiB per token in float32
    assert ch.kv_cache_bytes_per_token(GPTConfig.llama2_7b(), torch.float16) == 2**19  # 512 KiB


@pytest.mark.parametrize("variant", ["learned", "gqa-rope"])
def test_generation_flops_formula_matches_pytorchs_flop_counter(ch, variant):
    model = tiny_gpt(use_fused=False, tie_weights=False, **VARIANTS[variant])  # matmul attention: countable
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    for use_cache in (True, False):
        with FlopCounterMode(display=False) as counter:
            ch.generate(model, prompt, 12, temperature=0, use_cache=use_cache, lean_step=False)
        assert counter.get_total_flops() == ch.generation_flops(model.config, 7, 12, use_cache), use_cache


# ---------------------------------------------------------------------------------------
# A full context: the sliding window
# ---------------------------------------------------------------------------------------


def sliding_reference(model, prompt, n_new, keep):
    """Brute force: a full forward at every step over the window the policy prescribes:
    start at the prompt's last block_size tokens; when the window would exceed block_size,
    keep its last `keep` tokens."""
    block, idx = model.config.block_size, prompt
    start = max(0, prompt.shape[1] - block)
    with torch.no_grad():
        for _ in range(n_new):
            if idx.shape[1] - start > block:
                start = idx.shape[1] - keep
            logits, _ = model(idx[:, start:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("variant", ["learned", "rope"])
def test_sliding_window_equals_an_uncached_reference_cropping_the_same_way(ch, variant):
    model = tiny_gpt(**VARIANTS[variant])  # block_size 32
    prompt = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    for keep in (None, 20, 1):
        out = ch.generate(model, prompt, 70, temperature=0, window_keep=keep)  # the window slides 3+ times
        assert torch.equal(out, sliding_reference(model, prompt, 70, keep or 16)), keep
    long_prompt = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(3))  # > block_size
    with pytest.warns(UserWarning, match="the prompt has 45 tokens"):
        out = ch.generate(model, long_prompt, 10, temperature=0)
    assert torch.equal(out, sliding_reference(model, long_prompt, 10, 16))


def test_a_prompt_longer_than_the_context_is_cropped_with_a_warning(ch):
    model = tiny_gpt()  # block_size 32
    prompt = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    for use_cache in (True, False):
        with pytest.warns(UserWarning) as caught:
            out = ch.generate(model, prompt, 3, temperature=0, use_cache=use_cache)
        assert [str(w.message) for w in caught] == [
            "the prompt has 40 tokens, more than the model's context of 32: its first 8 tokens are dropped"]
        assert torch.equal(out[:, :40], prompt)  # what is dropped is the start of the model's input only
        assert torch.equal(out[:, 40:], ch.generate(model, prompt[:, 8:], 3, temperature=0)[:, 32:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits, even when generation slides past the context
        ch.generate(model, prompt[:, :32], 40, temperature=0)


def test_non_finite_logits_are_refused_at_the_step_they_appear(ch):
    model, idx = tiny_gpt(), torch.tensor([[1, 2, 3]])
    calls = []

    def nan_from_third_step(module, inputs, output):
        calls.append(1)
        return output.fill_(float("nan")) if len(calls) >= 3 else output

    hook = model.lm_head.register_forward_hook(nan_from_third_step)
    for options in (dict(temperature=0), dict(temperature=0.8, top_k=5), dict(use_cache=False)):
        calls.clear()
        with pytest.raises(ValueError, match=r"step 3 hold NaN or inf: the model's weights or its input"):
            ch.generate(model, idx, 5, **options)
    hook.remove()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")  # token 0's logit is +-inf from step 1
    for options in (dict(temperature=0), dict(temperature=1.0)):
        with pytest.raises(ValueError, match="step 1 hold NaN or inf"):
            ch.generate(model, idx, 5, **options)
    with pytest.raises(ValueError, match="step 1 hold NaN or inf"):
        ch.beam_search(model, idx, 5)


def test_sampling_refuses_probabilities_that_overflowed(ch):
    logits = torch.tensor([[3.0, 1.0, -2.0]])
    with pytest.raises(ValueError, match="probabilities to sample from hold NaN or inf"):
        ch.next_token(logits, temperature=1e-40)  # logits / 1e-40 overflow float32 to inf
    with pytest.raises(ValueError, match="probabilities to sample from hold NaN or inf"):
        ch.sample(torch.tensor([[0.0, float("nan")]]), [torch.Generator()])


def test_memory_follows_the_tokens_made_not_max_new_tokens(ch, monkeypatch):
    model, idx = tiny_gpt(), torch.tensor([[1, 2, 3]])
    sizes = []
    make_kv_caches = ch.make_kv_caches
    monkeypatch.setattr(ch, "make_kv_caches", lambda m, b, n=None: sizes.append(n) or make_kv_caches(m, b, n))
    huge = 10**15  # 8 PB of token ids if allocated up front
    with torch.inference_mode():
        stream = ch.generate_stream(model, idx, huge, temperature=0)
        first = torch.stack(list(itertools.islice(stream, 70)), dim=1)  # past the context: the window slides
    assert torch.equal(first, ch.generate(model, idx, 70, temperature=0)[:, 3:])
    assert sizes == [32, 32]  # the KV cache never holds more than the context


def test_keeping_a_full_window_is_chapter_6s_crop_at_every_step(ch):
    model = tiny_gpt()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model.generate(prompt, 50)  # Chapter 6: the last block_size tokens, every step
    assert torch.equal(ch.generate(model, prompt, 50, temperature=0, window_keep=32), reference)


# ---------------------------------------------------------------------------------------
# Batches of prompts of different lengths
# ---------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [72, 8], [30, 31, 32, 1]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_forward_gives_each_rows_own_logits(ch, variant):
    model = tiny_gpt(**VARIANTS[variant])
    idx, mask = ch.left_pad(PROMPTS, pad_id=0)
    assert idx.shape == (3, 7) and mask.sum(1).tolist() == [7, 2, 4]
    with torch.no_grad():
        batched, _ = model(idx, padding_mask=mask)
        assert torch.isfinite(batched).all()  # padding queries see something: no NaN
        for row, prompt in enumerate(PROMPTS):
            alone, _ = model(torch.tensor([prompt]))
            torch.testing.assert_close(batched[row, -len(prompt):], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_generation_equals_one_prompt_at_a_time(ch, variant):
    model = tiny_gpt(**VARIANTS[variant])
    idx, mask = ch.left_pad(PROMPTS)
    for use_cache in (True, False):
        batched = ch.generate(model, idx, 20, temperature=0, padding_mask=mask, use_cache=use_cache)
        sampled = ch.generate(model, idx, 20, temperature=0.9, top_k=30, repetition_penalty=1.2, padding_mask=mask,
                              use_cache=use_cache, generator=[torch.Generator().manual_seed(s) for s in range(3)])
        for row, prompt in enumerate(PROMPTS):
            alone = ch.generate(model, torch.tensor([prompt]), 20, temperature=0)
            assert torch.equal(batched[row, 7:], alone[0, len(prompt):]), (use_cache, row)
            alone = ch.generate(model, torch.tensor([prompt]), 20, temperature=0.9, top_k=30, repetition_penalty=1.2,
                                generator=[torch.Generator().manual_seed(row)])
            assert torch.equal(sampled[row, 7:], alone[0, len(prompt):]), (use_cache, row)


def test_rows_stop_at_the_end_token_at_different_times(ch):
    model = tiny_gpt()
    idx, mask = ch.left_pad(PROMPTS)
    free = ch.generate(model, idx, 15, temperature=0, padding_mask=mask)
    eos = free[1, 7 + 3].item()  # the token row 1 produces at its 4th step is the "end token"
    out = ch.generate(model, idx, 15, temperature=0, padding_mask=mask, eos_id=eos)
    lengths = []
    for row, prompt in enumerate(PROMPTS):
        alone = ch.generate(model, torch.tensor([prompt]), 15, temperature=0, eos_id=eos)[0, len(prompt):]
        assert torch.equal(out[row, 7:7 + len(alone)], alone)
        assert (out[row, 7 + len(alone):] == eos).all()  # finished rows are filled with the end token
        lengths.append(len(alone))
    assert out.shape[1] == 7 + max(lengths) and min(lengths) < 15  # the batch ends with its last row


def test_clear_errors(ch):
    model = tiny_gpt()
    idx = torch.tensor([[1, 2, 3]])
    for kwargs, match in ((dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                          (dict(repetition_penalty=0), "repetition_penalty"), (dict(window_keep=33), "window_keep"),
                          (dict(padding_mask=torch.tensor([[True, True, False]])), "left padding"),
                          (dict(padding_mask=torch.tensor([[1, 1, 1]])), "bool")):
        with pytest.raises(ValueError, match=match):
            ch.generate(model, idx, 5, **kwargs)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"max_new_tokens must be a positive integer, got {bad}"):
            ch.generate(model, idx, bad)
    with pytest.raises(ValueError, match="LongTensor"):
        ch.generate(model, idx.float(), 5)
    with pytest.raises(ValueError, match="eval"):
        ch.generate(tiny_gpt(dropout=0.1).train(), idx, 5)
    with pytest.raises(ValueError, match="one prompt"):
        ch.beam_search(model, torch.zeros(2, 3, dtype=torch.long), 5)


def test_generate_returns_an_ordinary_tensor(ch):
    model = tiny_gpt()
    out = ch.generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0)
    assert out.dtype == torch.long and not out.is_inference()
    _, loss = model(out[:, :-1], out[:, 1:])  # usable with autograd, e.g. to score the sample
    loss.backward()


# ---------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------


def hf_twin(seed, vocab_size=11, eos=None):
    """A GPT and Hugging Face's GPT2LMHeadModel with the same random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = tiny_gpt(seed, vocab_size=vocab_size, mlp="gelu_tanh")
    with torch.no_grad():  # sharper distributions, so that the beams disagree with greedy
        ours.lm_head.weight.mul_(40)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=vocab_size, n_positions=32,
                                    bos_token_id=None, eos_token_id=eos, pad_token_id=0)).eval()
    hf.load_state_dict(to_hf_gpt2(ours))
    return ours, hf


def test_beam_search_equals_hugging_faces(ch):
    finished_early = 0
    for seed in range(6):
        eos = 3 if seed % 2 else None
        ours, hf = hf_twin(seed, eos=eos)
        prompt = torch.randint(0, 11, (1, 4), generator=torch.Generator().manual_seed(seed))
        for width, alpha in ((3, 1.0), (4, 0.0), (2, 2.0)):
            theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, num_beams=width,
                                 do_sample=False, early_stopping=True,
                                 length_penalty=alpha, eos_token_id=eos, pad_token_id=0)
            out = ch.beam_search(ours, prompt, 10, width, length_penalty=alpha, eos_id=eos)
            assert torch.equal(out, theirs), (seed, width, alpha)
            finished_early += out.shape[1] < 14
    assert finished_early  # the end-token path was exercised


def test_beam_width_one_is_greedy_and_the_cache_changes_nothing(ch):
    for seed in range(4):
        model, _ = hf_twin(seed)
        prompt = torch.randint(0, 11, (1, 3), generator=torch.Generator().manual_seed(seed))
        greedy = ch.generate(model, prompt, 12, temperature=0, eos_id=5)
        assert torch.equal(ch.beam_search(model, prompt, 12, 1, eos_id=5), greedy)
        assert torch.equal(ch.beam_search(model, prompt, 12, 3, eos_id=5),
                           ch.beam_search(model, prompt, 12, 3, eos_id=5, use_cache=False))


def test_wide_beam_is_exhaustive_search_with_length_normalisation(ch):
    """With a beam as wide as the search space, beam search must return the best of ALL
    sequences: every continuation up to and including the end token, or of full length,
    scored by log p / n**alpha."""
    V, eos, n = 4, 0, 3
    model = tiny_gpt(0, vocab_size=V, tie_weights=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    prompt = torch.tensor([[1, 2]])

    def log_prob(seq):
        with torch.no_grad():
            logits, _ = model(torch.cat([prompt, torch.tensor([seq])], dim=1))
        logp = F.log_softmax(logits[0, 1:-1], -1)  # predictions for the new tokens
        return logp[torch.arange(len(seq)), torch.tensor(seq)].sum().item()

    candidates = [list(s) for L in range(1, n + 1) for s in itertools.product(range(V), repeat=L)
                  if (eos not in s[:-1]) and (s[-1] == eos or L == n)]
    answers = set()
    for alpha in (0.0, 1.0, 3.0):
        best = max(candidates, key=lambda s: log_prob(s) / len(s) ** alpha)
        out = ch.beam_search(model, prompt, n, beam_width=V**n, length_penalty=alpha, eos_id=eos)
        assert out[0, 2:].tolist() == best, alpha
        answers.add(tuple(best))
    assert len(answers) > 1  # the length penalty changed the winner


# ---------------------------------------------------------------------------------------
# The encoder-decoder with a cache
# ---------------------------------------------------------------------------------------


def seq2seq(prenorm, seed=0, use_fused=True):
    torch.manual_seed(seed)
    vocab = ch07.date_vocab()
    config = ch07.Seq2SeqConfig(len(vocab), d_model=32, n_head=4, d_ff=64, dropout=0.0, prenorm=prenorm,
                                use_fused=use_fused)
    src, _, _ = ch07.encode_batch(ch07.make_date_pairs(6, "test", seed), vocab)
    return ch07.Transformer(config).eval(), vocab, src


@pytest.mark.parametrize("prenorm", [False, True])
def test_cached_encoder_decoder_equals_chapter_7s_greedy_decode(ch, prenorm):
    model, vocab, src = seq2seq(prenorm)
    free = ch07.greedy_decode(model, src, vocab.BOS, vocab.EOS, 14)
    assert torch.equal(ch.cached_greedy_decode(model, src, vocab.BOS, vocab.EOS, 14), free)
    eos = free[2, 4].item()  # an "end token" that rows reach at different steps
    assert torch.equal(ch.cached_greedy_decode(model, src, vocab.BOS, eos, 14),
                       ch07.greedy_decode(model, src, vocab.BOS, eos, 14))
    with torch.no_grad():  # and the logits of every step
        memory = model.encode(src)
        cross_kv = [ch.cross_attention_kv(b.cross_attn, memory) for b in model.decoder]
        caches = [ch.KVCache(6, 4, 14, 8) for _ in model.decoder]
        tgt = torch.cat([torch.full((6, 1), vocab.BOS), free], dim=1)
        for t in range(free.shape[1]):
            cached = ch.decoder_step(model, tgt[:, t:t + 1], t, caches, cross_kv, (src != 0)[:, None, None, :],
                                     tgt[:, :t + 1] != 0)
            torch.testing.assert_close(cached, model.decode(tgt[:, :t + 1], memory, src)[:, -1], atol=1e-5, rtol=1e-4)


def test_encoder_decoder_step_flops(ch):
    model, vocab, src = seq2seq(False, use_fused=False)
    memory = model.encode(src)
    tgt = torch.full((6, 9), vocab.BOS)
    with torch.no_grad(), FlopCounterMode(display=False) as uncached:
        model.decode(tgt, memory, src)
    cross_kv = [ch.cross_attention_kv(b.cross_attn, memory) for b in model.decoder]
    caches = [ch.KVCache(6, 4, 9, 8) for _ in model.decoder]
    for c in caches:
        c.seq_len = 8
    with torch.no_grad(), FlopCounterMode(display=False) as cached:
        ch.decoder_step(model, tgt[:, -1:], 8, caches, cross_kv, (src != 0)[:, None, None, :], tgt != 0)
    # cached cross-attention runs through PyTorch's kernel, which the counter does not see: add it
    S, C = src.shape[1], model.config.d_model
    sdpa = 6 * model.config.n_decoder_layer * 4 * S * C
    assert uncached.get_total_flops() == 6 * ch.seq2seq_step_flops(model.config, S, 9, use_cache=False)
    assert cached.get_total_flops() + sdpa == 6 * ch.seq2seq_step_flops(model.config, S, 9, use_cache=True)


# ---------------------------------------------------------------------------------------
# Streaming, stop strings, the command line
# ---------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.text("ab\n", max_size=4), max_size=12),
       stops=st.lists(st.text("ab\n", min_size=1, max_size=3), max_size=3))
def test_stop_strings_cut_the_text_before_the_first_one(ch, pieces, stops):
    text = "".join(pieces)  # brute force: the first end of a stop string, the longest one there
    ends = [(end, -len(s)) for end in range(1, len(text) + 1) for s in stops if text[:end].endswith(s)]
    expected = text[:sum(min(ends))] if ends else text
    out = list(ch.stop_at_strings(iter(pieces), stops))
    assert "".join(out) == expected
    assert all(out)  # no empty pieces


def test_streaming_stops_generating_at_the_stop_string(ch):
    model = tiny_gpt(vocab_size=5)
    tokenizer = type("Tok", (), dict(chars=list("abcd\n"), encode=lambda s, t: ["abcd\n".index(c) for c in t],
                                     decode=lambda s, ids: "".join("abcd\n"[i] for i in ids)))()
    full = "".join(ch.stream_text(model, tokenizer, "ab", 30, temperature=0))
    stop = full[5:7]
    pieces = list(ch.stream_text(model, tokenizer, "ab", 30, stop=[stop], temperature=0))
    assert "".join(pieces) == full[:full.find(stop)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint written by Chapter 8's trainer (a few iterations on the Python docs)."""
    import ch08_training as ch08

    out = tmp_path_factory.mktemp("run")
    cfg = ch08.make_config("tiny", **tiny_train_settings(out, max_iters=6, warmup_iters=2, decay_iters=6,
                                                          eval_iters=1, sample_tokens=0, dropout=0.0))
    ch08.train(cfg, log=lambda s: None)
    return out


def test_command_line_streams_what_generate_makes(ch, trained, capsys):
    args = ["--out-dir", str(trained), "--prompt", "The ", "--max-new-tokens", "40", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.95", "--seed", "0"]
    assert ch.main(args) == 0
    printed = capsys.readouterr().out
    model, tokenizer = ch.load_trained(trained)
    assert model.config.positions == "rope" and model.config.block_size == 16  # from the checkpoint
    idx = torch.tensor([tokenizer.encode("The ")])
    out = ch.generate(model, idx, 40, temperature=0.8, top_k=20, top_p=0.95, generator=torch.Generator().manual_seed(0))
    assert printed == tokenizer.decode(out[0].tolist()) + "\n"  # 44 > 16: the window slid, too


def test_command_line_stop_string(ch, trained, capsys):
    for sampling in (["--temperature", "0"], ["--temperature", "1.0", "--seed", "3"]):
        args = ["--out-dir", str(trained), "--prompt", "a", "--max-new-tokens", "30", *sampling]
        assert ch.main(args) == 0
        full = capsys.readouterr().out[:-1]
        stop = full[6:8]
        assert ch.main(args + ["--stop", stop]) == 0
        assert capsys.readouterr().out == full[:full.find(stop, 1)] + "\n"


def run_cli(ch, argv, capsys):
    """(exit status, stdout, stderr) of the command line, run as `python ch09_generation.py` runs it."""
    status = run_command(ch.main, argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(status, err, *fragments):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert err.endswith(errors[0] + "\n"), err  # the error is the last thing printed
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def copy_run(trained, folder, edit=lambda tensors, info: None, data_record=True):
    """A copy of the trained run in folder, with edit(tensors, metadata) applied to its checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir()
    for name in ["tokenizer.json"] + ["data.json"] * data_record:
        shutil.copy(trained / name, folder / name)
    with safe_open(str(trained / "checkpoint.safetensors"), framework="pt") as f:
        tensors, info = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["book"])
    edit(tensors, info)
    save_file(tensors, folder / "checkpoint.safetensors", metadata={"book": json.dumps(info)})
    return folder


def block_weight(tensors):
    return next(k for k, v in tensors.items() if k.startswith("model.blocks.0.") and v.dim() == 2)


def test_command_line_says_what_the_run_was_trained_on(ch, trained, tmp_path, capsys):
    args = ["--prompt", "a", "--max-new-tokens", "3"]
    status, out, err = run_cli(ch, ["--out-dir", str(trained), *args], capsys)
    assert status == 0 and len(out) == 1 + 3 + 1
    assert err == "run trained on: python-docs (Python documentation (built in))\n"
    old = copy_run(trained, tmp_path / "old", data_record=False)  # a folder from before data.json
    status, _, err = run_cli(ch, ["--out-dir", str(old), *args], capsys)
    assert status == 0 and err.startswith("run trained on: unknown (") and err.count("\n") == 1


def test_command_line_warns_in_one_line_that_a_long_prompt_is_cropped(ch, trained, capsys):
    prompt = "The quick brown fox."  # 20 characters, 20 tokens; the context holds 16
    status, out, err = run_cli(ch, ["--out-dir", str(trained), "--prompt", prompt, "--max-new-tokens", "5"], capsys)
    assert status == 0 and out.startswith(prompt) and len(out) == 20 + 5 + 1
    assert err.splitlines()[1:] == ["warning: the prompt has 20 tokens, more than the model's context of 16: "
                                    "its first 4 tokens are dropped"]


def test_command_line_errors_are_one_clear_line(ch, trained, tmp_path, capsys):
    status, out, err = run_cli(ch, ["--out-dir", str(tmp_path / "nothing")], capsys)
    assert_one_error_line(status, err, "checkpoint.safetensors does not exist", "python code/ch08_training.py")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_bytes((trained / "tokenizer.json").read_bytes())
    (bad / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a checkpoint")
    assert_one_error_line(*run_cli(ch, ["--out-dir", str(bad)], capsys)[::2], "not a checkpoint")
    status, out, err = run_cli(ch, ["--out-dir", str(trained), "--prompt", "caf\u00e9 \u2603"], capsys)
    assert_one_error_line(status, err, "not in the model's vocabulary", "'\u2603'")
    assert out == ""  # nothing printed before the error


def test_command_line_refuses_a_tokenizer_of_another_run(ch, trained, tmp_path, capsys):
    other = copy_run(trained, tmp_path / "other")
    chars = json.loads((trained / "tokenizer.json").read_text())["chars"]
    (other / "tokenizer.json").write_text(json.dumps({"chars": chars[:-1]}))
    status, _, err = run_cli(ch, ["--out-dir", str(other)], capsys)
    assert_one_error_line(status, err, f"has {len(chars) - 1} tokens", f"has {len(chars)}")


def missing_tensor(tensors, info):
    del tensors[block_weight(tensors)]


def extra_tensor(tensors, info):
    tensors["model.blocks.9.extra.weight"] = torch.zeros(2, 2)


def misshaped_tensor(tensors, info):
    key = block_weight(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


def nan_weight(tensors, info):
    tensors[block_weight(tensors)][0, 0] = float("nan")


def metadata_of_the_wrong_type(tensors, info):
    info["config"]["model"]["n_layer"] = "one"


@pytest.mark.parametrize("damage", [missing_tensor, extra_tensor, misshaped_tensor, nan_weight,
                                    metadata_of_the_wrong_type])
def test_command_line_refuses_a_damaged_checkpoint_in_one_line(ch, trained, tmp_path, capsys, damage):
    damaged = copy_run(trained, tmp_path / damage.__name__, damage)
    status, out, err = run_cli(ch, ["--out-dir", str(damaged), "--max-new-tokens", "5"], capsys)
    assert_one_error_line(status, err, str(damaged))
    assert out == ""


@pytest.mark.parametrize("flag, value, rule", [
    ("--max-new-tokens", "0", "a positive integer"), ("--temperature", "-0.5", ">= 0 (0 = greedy)"),
    ("--top-k", "0", "a positive integer"), ("--top-p", "1.5", "in (0, 1]"), ("--top-p", "0", "in (0, 1]"),
    ("--repetition-penalty", "0", "> 0 (1 = none)"), ("--temperature", "nan", ">= 0 (0 = greedy)")])
def test_command_line_refuses_flags_out_of_range_in_one_line(ch, trained, capsys, flag, value, rule):
    status, out, err = run_cli(ch, ["--out-dir", str(trained), flag, value], capsys)
    assert_one_error_line(status, err, f"{flag} must be {rule}, got ")
    assert out == "" and "run trained on" not in err  # refused before the model is loaded


def test_command_line_debug_shows_the_traceback_and_flags_are_not_abbreviated(ch, trained, tmp_path, capsys):
    status, _, err = run_cli(ch, ["--out-dir", str(tmp_path / "nothing"), "--debug"], capsys)
    assert status == 1 and "Traceback" in err and "FileNotFoundError" in err
    with pytest.raises(SystemExit) as exit_:  # --max-new would be taken for --max-new-tokens with abbreviations
        ch.parse_args(["--out-dir", str(trained), "--max-new", "5"])
    assert exit_.value.code == 2 and "unrecognized arguments: --max-new" in capsys.readouterr().err


def test_command_line_runs_as_a_script(ch, trained):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "code"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, ch.__file__, "--out-dir", str(trained), "--prompt", "def",
                             "--max-new-tokens", "20", "--seed", "1"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def") and len(result.stdout) == 3 + 20 + 1
