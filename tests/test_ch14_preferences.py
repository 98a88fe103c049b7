"""Chapter 14: completion log-probabilities (against each row scored alone), Bradley-Terry
and the reward model, the DPO loss (against TRL's DPOTrainer on the same weights, a float64
computation of the paper's formula, and gradcheck), preference pairs from samples, REINFORCE
(against the exact gradient of a small policy), GRPO's advantages, KL estimate and clipped
objective (against TRL's GRPOTrainer and the formulas in float64), and the runs through
Chapter 8's train, all on small models.

Run against your own module with: pytest tests/test_ch14_preferences.py --impl my_ch14.py
"""

import copy
import json
import math
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
from ch06_gpt import from_hf_llama
from ch08_training import make_config, train
from ch09_generation import sequence_logprob
from ch12_pretrained import load_weights


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch14_preferences")


def random_ids(lengths, vocab=50, seed=0, low=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


def alone_logprob(model, prompt, completion):
    """log p(completion | prompt) of one row, token by token, in float64, with no padding."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits, _ = model(ids)
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion))


# ---------------------------------------------------------------------------
# Log-probabilities of completions
# ---------------------------------------------------------------------------


def test_pack_completions_masks_exactly_the_completion(ch):
    ids, mask = ch.pack_completions([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9], [8, 10, 11, 12]]
    assert mask.tolist() == [[False, False, False, True], [False, True, True, True]]
    ids, mask = ch.pack_completions([[5], [6, 7, 8, 9]], [[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[5, 1, 2, 0, 0], [6, 7, 8, 9, 3]]
    assert mask.tolist() == [[False, True, True, False, False], [False, False, False, False, True]]
    with pytest.raises(ValueError, match="at least one token"):
        ch.pack_completions([[1]], [[]])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5)), min_size=1, max_size=4), st.integers(0, 10))
def test_completion_logprobs_equal_each_row_scored_alone(ch, lengths, seed):
    model = helpers.tiny_llama()
    prompts = random_ids([p for p, _ in lengths], seed=seed)
    completions = random_ids([c for _, c in lengths], seed=seed + 100)
    ids, mask = ch.pack_completions(prompts, completions, pad_id=0)
    with torch.no_grad():
        per_token = ch.completion_logprobs(model, ids, mask)
        summed = ch.sequence_logprobs(model, ids, mask)
        mean = ch.sequence_logprobs(model, ids, mask, average=True)
    assert per_token.shape == (len(prompts), ids.shape[1] - 1)
    assert (per_token[~mask[:, 1:]] == 0).all()  # the prompt and the padding count for nothing
    expected = torch.tensor([alone_logprob(model, p, c) for p, c in zip(prompts, completions)], dtype=torch.float64)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-5, atol=1e-5)
    counts = torch.tensor([len(c) for c in completions], dtype=torch.float64)
    torch.testing.assert_close(mean.double(), expected / counts, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_agree_with_chapter_9s_score_of_one_prompt(ch):
    model = helpers.tiny_llama()
    prompt, completion = random_ids([5, 4], seed=3)
    ids, mask = ch.pack_completions([prompt], [completion])
    with torch.no_grad():
        ours = ch.sequence_logprobs(model, ids, mask)
    torch.testing.assert_close(ours, sequence_logprob(model, ids, len(prompt)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Bradley-Terry and the reward model
# ---------------------------------------------------------------------------


def test_bradley_terry_loss_is_the_negative_log_likelihood_of_the_comparisons(ch):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g) * 5, torch.randn(6, generator=g) * 5
    c, r = chosen.double(), rejected.double()
    p = torch.exp(c) / (torch.exp(c) + torch.exp(r))  # P(chosen preferred), the model's definition
    expected = -torch.log(p).mean()
    torch.testing.assert_close(ch.bradley_terry_loss(chosen, rejected).double(), expected, rtol=1e-6, atol=1e-6)
    # only differences matter: adding a constant to every reward changes nothing
    torch.testing.assert_close(ch.bradley_terry_loss(chosen + 3, rejected + 3), ch.bradley_terry_loss(chosen, rejected))
    # stable where the naive formula overflows
    assert ch.bradley_terry_loss(torch.tensor([1000.0]), torch.tensor([-1000.0])).item() == 0.0
    assert ch.bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([1000.0])).item() == pytest.approx(2000.0)


def test_the_reward_is_read_at_the_last_real_token_whatever_the_padding(ch):
    model = ch.reward_model(helpers.tiny_llama()).eval()
    rows = [torch.tensor(r) for r in random_ids([3, 7, 5], seed=4)]
    with torch.no_grad():
        padded = model(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), torch.tensor([3, 7, 5]))
        alone = torch.cat([model(r[None], torch.tensor([len(r)])) for r in rows])
    assert padded.shape == (3, 1)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_a_reward_model_trained_by_chapter_8s_loop_learns_a_preference(ch):
    # The rule to learn: answers that contain token 7 are preferred. Held-out pairs use
    # prompts and answers never seen in training.
    g = torch.Generator().manual_seed(0)

    def pair():
        prompt = torch.randint(10, 40, (4,), generator=g)
        other = torch.randint(10, 40, (3,), generator=g)
        good = other.clone()
        good[torch.randint(3, (1,), generator=g)] = 7
        return torch.cat([prompt, good]), torch.cat([prompt, other])

    data = ch.RewardPairs({"train": [pair() for _ in range(200)], "val": [pair() for _ in range(100)]})
    torch.manual_seed(0)
    model = ch.reward_model(helpers.tiny_llama(block_size=16))
    before = ch.pairwise_accuracy(model, data, "val")
    cfg = make_config("tiny", max_iters=150, batch_size=16, lr=3e-3, eval_iters=0, eval_interval=150,
                      out_dir=None, device="cpu", precision="fp32")
    history = train(cfg, model, data, loss_fn=ch.reward_loss, log=lambda s: None)
    after = ch.pairwise_accuracy(model, data, "val")
    assert after >= 0.95 and after > before
    assert sum(history["train"][-10:]) / 10 < 0.2 < history["train"][0]


# ---------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------


def dpo_formula(pc, pr, rc, rr, beta):
    """The paper's loss in float64: -log sigmoid(beta log(pi_c / ref_c) - beta log(pi_r / ref_r))."""
    z = beta * ((pc - rc) - (pr - rr))
    return torch.log1p(torch.exp(-z)).mean()


@pytest.mark.exercise(1)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_exercise_1_dpo_loss_equals_the_papers_formula_in_float64(ch, beta):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4))
    loss, chosen, rejected = ch.dpo_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(loss, dpo_formula(pc, pr, rc, rr, beta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.exercise(1)
def test_exercise_1_dpo_loss_gradients_pass_gradcheck_and_match_the_derivation(ch):
    g = torch.Generator().manual_seed(2)
    inputs = [(-5 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *x: ch.dpo_loss(*x, beta=0.3)[0], inputs)
    pc, pr, rc, rr = inputs
    loss, _, _ = ch.dpo_loss(pc, pr, rc, rr, 0.3)
    loss.backward()
    # d loss / d log pi(chosen) = -beta sigmoid(-margin) / B: largest where the model is most wrong
    margin = 0.3 * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -0.3 * torch.sigmoid(-margin) / 5)
    torch.testing.assert_close(pr.grad, 0.3 * torch.sigmoid(-margin) / 5)


@pytest.mark.exercise(1)
def test_exercise_1_the_loss_is_log_2_when_the_policy_is_the_reference_and_stable_far_from_it(ch):
    lp = torch.tensor([-3.0, -7.0])
    loss, chosen, rejected = ch.dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and (chosen == 0).all() and (rejected == 0).all()
    far = ch.dpo_loss(torch.tensor([0.0]), torch.tensor([-1e5]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)[0]
    assert far.item() == 0.0
    wrong = ch.dpo_loss(torch.tensor([-1e5]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)[0]
    assert wrong.item() == pytest.approx(1e5)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [chr(ord("a") + i) for i in range(26)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                       tie_word_embeddings=False)


TRL_WARNINGS = "ignore:.*gradient_checkpointing.*:FutureWarning"  # transformers' deprecations, inside TRL


@pytest.mark.filterwarnings(TRL_WARNINGS)
@pytest.mark.parametrize("loss_type, average", [("sigmoid", False), ("sigmoid_norm", True)])
def test_dpo_on_a_model_equals_trls_dpo_trainer_in_loss_and_gradients(ch, tmp_path, loss_type, average):
    """TRL's DPOTrainer tokenizes the pairs, masks the prompts and computes the loss of a
    Hugging Face Llama; ours runs on Chapter 6's GPT holding the same weights. (bf16=False:
    TRL's default would run the reference model under bfloat16 autocast.)"""
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    config = tiny_llama_config()
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)  # two different random models
    rows = [{"prompt": "a b c", "chosen": " d e", "rejected": " f"},
            {"prompt": "g h", "chosen": " i", "rejected": " j k l"},
            {"prompt": "m n o p", "chosen": " q r s", "rejected": " t u"}]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.2, loss_type=[loss_type], report_to="none", use_cpu=True,
                     bf16=False, per_device_train_batch_size=3, dataset_num_proc=None, logging_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tiny_tokenizer())
    examples = [trainer.train_dataset[i] for i in range(3)]  # TRL's token ids: prompt, chosen + <eos>, ...
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    theirs.backward()

    ours_policy = from_hf_llama(policy.state_dict(), config)
    ours_reference = from_hf_llama(reference.state_dict(), config)
    splits = {"train": [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]}
    data = ch.PreferenceBatches(splits, ours_reference, average=average)
    batch = next(data.in_order("train", 3))
    ours = ch.dpo_batch_loss(ours_policy, batch, beta=0.2, average=average)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_policy.tok_emb.weight.grad, policy.model.embed_tokens.weight.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_policy.lm_head.weight.grad, policy.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_preference_batches_carry_the_references_log_probabilities(ch):
    reference = helpers.tiny_llama(seed=1)
    prompts, chosen = random_ids([3, 5, 2, 4]), random_ids([2, 1, 3, 2], seed=1)
    rejected = random_ids([1, 4, 2, 2], seed=2)
    data = ch.PreferenceBatches({"train": list(zip(prompts, chosen, rejected))}, reference, batch_size=3)
    ids, mask, ref = data.get_batch("train", 5, torch.Generator().manual_seed(0))
    assert ids.shape[0] == mask.shape[0] == ref.shape[0] == 10
    expected = [alone_logprob(reference, p, c) for p, c in zip(prompts, chosen)]
    expected_r = [alone_logprob(reference, p, r) for p, r in zip(prompts, rejected)]
    expected = torch.tensor([expected, expected_r], dtype=torch.float64).T  # (N, 2): chosen, rejected
    torch.testing.assert_close(data.reference["train"].double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the rows of a batch: chosen first, then rejected, each with its reference score
        torch.testing.assert_close(ch.sequence_logprobs(reference, ids, mask), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no preference pairs"):
        ch.PreferenceBatches({"train": list(zip(prompts, chosen, rejected)), "val": []}, reference)


def test_implicit_rewards_after_dpo_rank_the_pairs(ch):
    # Prompt -> prefer answer 5 over answer 6. DPO through Chapter 8's train moves the
    # margin from 0 (the policy is the reference) to positive on held-out prompts.
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(10, 40, (3,), generator=g).tolist(), [5, 1], [6, 1]) for _ in range(120)]
    policy = helpers.tiny_llama(seed=3)
    reference = ch.prepare_policy(policy, "full")
    data = ch.PreferenceBatches({"train": pairs[:100], "val": pairs[100:]}, reference)
    before = ch.preference_metrics(policy, data, "val", beta=0.5)
    assert before["margin"] == pytest.approx(0, abs=1e-6) and before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    cfg = make_config("tiny", max_iters=40, batch_size=8, lr=3e-3, eval_iters=0, eval_interval=20, out_dir=None,
                      device="cpu", precision="fp32")
    history = train(cfg, policy, data, loss_fn=partial(ch.dpo_batch_loss, beta=0.5), log=lambda s: None,
                    evaluate=lambda m: ch.preference_metrics(m, data, "val", beta=0.5))
    after = history["metrics"][-1][1]
    assert after["accuracy"] == 1.0 and after["margin"] > 1.0 and after["loss"] < 0.3
    assert after["chosen_reward"] > after["rejected_reward"]
    for p in reference.parameters():  # the reference never moved
        assert not p.requires_grad


# ---------------------------------------------------------------------------
# Sampling and scoring: pairs from the model itself
# ---------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """A 'model' whose next token is always chosen ahead: a fixed distribution over the
    char task's tokens, to test sampling and scoring without training anything. It is made
    of a GPT's parts with no blocks (the logits are the head's bias), so that Chapter 9's
    generate runs it through forward and through its lean decode step alike."""

    def __init__(self, probs, block_size=32):
        super().__init__()
        from ch06_gpt import GPTConfig

        self.config = GPTConfig(vocab_size=len(probs), block_size=block_size, n_layer=1, n_head=1, d_model=8)
        self.tok_emb, self.pos_emb = torch.nn.Embedding(len(probs), 1), None
        self.blocks, self.norm_f = torch.nn.ModuleList(), torch.nn.Identity()
        self.lm_head = torch.nn.Linear(1, len(probs))
        with torch.no_grad():
            self.tok_emb.weight.zero_()
            self.lm_head.weight.zero_()
            self.lm_head.bias.copy_(probs.log())

    def forward(self, idx, targets=None, kv_caches=None, padding_mask=None, positions=None):
        return self.lm_head(self.norm_f(self.tok_emb(idx))), None


def test_the_char_task_writes_problems_and_scores_answers(ch):
    task = ch.CharTask()
    example = {"instruction": "What is 47 + 38? Answer with the number only.", "input": "", "output": "85"}
    assert task.tokenizer.decode(task.prompt(example)) == "47+38="
    assert task.tokenizer.decode(task.answer(example)) == "85\n"
    assert task.reward(task.tokenizer.encode("85\n"), example) == 1.0
    assert task.reward(task.tokenizer.encode("84\n"), example) == 0.0
    assert task.reward(task.tokenizer.encode("\n"), example) == 0.0
    examples = ch.char_examples(1000, "train", seed=0)
    assert len({e["instruction"] for e in examples}) == 1000
    test = ch.char_examples(100, "test", seed=0)
    assert not {e["instruction"] for e in examples} & {e["instruction"] for e in test}


def test_sampled_answers_stop_after_the_end_token_and_are_reproducible(ch):
    task = ch.CharTask()
    probs = torch.full((task.tokenizer.vocab_size,), 1.0)
    probs[task.eos_id] = 4.0  # the end comes early
    model = Oracle(probs / probs.sum())
    examples = ch.char_examples(5, "train", seed=1)
    answers = ch.sample_answers(model, task, examples, 3, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                                batch_size=4)
    assert len(answers) == 5 and all(len(group) == 3 for group in answers)
    for group in answers:
        for a in group:
            assert 1 <= len(a) <= 6
            assert task.eos_id not in a[:-1]  # the end token only as the last one
            assert a[-1] == task.eos_id or len(a) == 6
    again = ch.sample_answers(model, task, examples, 3, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                              batch_size=4)
    assert again == answers


def test_preference_pairs_pair_a_correct_answer_with_an_incorrect_one(ch):
    task = ch.CharTask()
    examples = ch.char_examples(3, "train", seed=2)
    enc = task.tokenizer.encode
    right = [e["output"] + "\n" for e in examples]
    answers = [[enc(right[0]), enc("1\n"), enc("2\n"), enc(right[0])],  # mixed: pairs
               [enc(right[1])] * 4,  # all correct: no pair
               [enc("3\n"), enc("4\n"), enc("5\n"), enc("6\n")]]  # all wrong: no pair
    rewards = ch.score_answers(task, examples, answers)
    assert rewards == [[1.0, 0.0, 0.0, 1.0], [1.0] * 4, [0.0] * 4]
    for k in (1, 2, 3):
        pairs = ch.preference_pairs(task, examples, answers, rewards, pairs_per_prompt=k)
        assert len(pairs) == min(k, 2)  # two correct answers, two incorrect: at most two disjoint pairs
        for prompt, chosen, rejected in pairs:
            assert prompt == task.prompt(examples[0])
            assert task.reward(chosen, examples[0]) == 1.0 and task.reward(rejected, examples[0]) == 0.0
        assert len({tuple(r) for _, _, r in pairs}) == len(pairs)


# ---------------------------------------------------------------------------
# Policy gradients
# ---------------------------------------------------------------------------


def test_reinforce_is_the_exact_policy_gradient_in_expectation_with_or_without_a_baseline(ch):
    # A one-step policy over 5 answers: softmax(theta). E[r] = sum_y pi(y) r(y), whose exact
    # gradient autograd gives; REINFORCE's loss, weighted by pi(y) over every answer (its
    # expectation), must have the opposite gradient, whatever the baseline.
    theta = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    (exact,) = torch.autograd.grad((torch.softmax(theta, 0) * r).sum(), theta)
    for baseline in (0.0, 0.7, -3.0):
        logp = torch.log_softmax(theta, 0)
        probs = logp.exp().detach()
        expected_loss = sum(probs[y] * ch.reinforce_loss(logp[y:y + 1], r[y:y + 1], baseline) for y in range(5))
        (grad,) = torch.autograd.grad(expected_loss, theta)
        torch.testing.assert_close(grad, -exact)


def test_a_baseline_reduces_the_variance_of_the_estimate(ch):
    theta = torch.zeros(4, requires_grad=True)
    r = torch.tensor([10.0, 10.5, 11.0, 9.5])  # rewards far from 0: a baseline helps most
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(torch.softmax(theta.detach(), 0), 2000, replacement=True, generator=g)

    def estimates(baseline):
        grads = []
        for y in samples[:400]:
            (grad,) = torch.autograd.grad(ch.reinforce_loss(torch.log_softmax(theta, 0)[y:y + 1], r[y:y + 1], baseline),
                                          theta)
            grads.append(grad)
        return torch.stack(grads)

    plain, centred = estimates(0.0), estimates(r.mean().item())
    torch.testing.assert_close(plain.mean(0), centred.mean(0), atol=0.3, rtol=0)  # the same expectation...
    assert centred.var(0).sum() < plain.var(0).sum() / 50  # ...with far less variance


@pytest.mark.exercise(2)
def test_exercise_2_group_advantages_equal_trls_normalisation(ch):
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (4 * 6,), generator=g).float()
    rewards[:6] = 1.0  # a group that all got it right
    groups = rewards.view(4, 6)
    expected = (groups - groups.mean(1, keepdim=True)) / (nanstd(groups, dim=1).unsqueeze(1) + 1e-4)
    got = ch.group_advantages(rewards, 6)
    torch.testing.assert_close(got, expected.view(-1))
    assert (got[:6] == 0).all()


@pytest.mark.exercise(2)
@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=24), st.integers(2, 4))
def test_exercise_2_group_advantages_are_centred_and_scaled_within_each_group(ch, values, group_size):
    values = values[:len(values) // group_size * group_size]
    if not values:
        return
    rewards = torch.tensor(values, dtype=torch.float64)
    advantages = ch.group_advantages(rewards, group_size).view(-1, group_size)
    for group, adv in zip(rewards.view(-1, group_size).tolist(), advantages):
        mean = sum(group) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1))
        torch.testing.assert_close(adv, torch.tensor([(x - mean) / (std + 1e-4) for x in group], dtype=torch.float64))


@pytest.mark.exercise(2)
def test_exercise_2_group_advantages_reject_ragged_groups(ch):
    with pytest.raises(ValueError, match="group_size"):
        ch.group_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError, match="group_size"):
        ch.group_advantages(torch.zeros(4), 1)


def test_the_kl_estimates_are_their_formulas_and_k1_k3_are_unbiased(ch):
    # p and q over 6 tokens: E_{x ~ p}[k(x)] against the exact KL(p || q) = sum p log(p / q).
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum()
    estimates = ch.kl_estimates(p.log(), q.log())  # one value per token
    r = q / p
    torch.testing.assert_close(estimates["k1"], -r.log())
    torch.testing.assert_close(estimates["k2"], r.log() ** 2 / 2)
    torch.testing.assert_close(estimates["k3"], r - 1 - r.log())
    torch.testing.assert_close(ch.kl_k3(p.log(), q.log()), estimates["k3"])
    torch.testing.assert_close((p * estimates["k1"]).sum(), exact)  # expectations under p, exactly
    torch.testing.assert_close((p * estimates["k3"]).sum(), exact)
    assert (p * estimates["k2"]).sum() != pytest.approx(exact.item(), rel=1e-3)  # k2 is biased
    assert (estimates["k3"] >= 0).all() and (estimates["k1"] < 0).any()
    assert ch.kl_k3(torch.tensor([-1.5]), torch.tensor([-1.5])).item() == 0.0


def grpo_formula(logp, old, ref, adv, mask, eps, beta):
    """GRPO's loss written out with loops in float64 (DeepSeekMath's objective, negated)."""
    total = 0.0
    for i in range(len(logp)):
        tokens = [t for t in range(len(logp[i])) if mask[i][t]]
        row = 0.0
        for t in tokens:
            rho = math.exp(logp[i][t] - old[i][t])
            surrogate = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            row += -surrogate + beta * kl
        total += row / max(len(tokens), 1)
    return total / len(logp)


@pytest.mark.exercise(3)
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_exercise_3_grpo_loss_equals_the_formula_with_masked_tokens(ch, beta):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 6
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios inside and outside the clip
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0] = False  # an answer with no token: counts 0
    got = ch.grpo_loss(logp, old, ref, adv, mask, 0.2, beta)
    expected = grpo_formula(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, beta)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.exercise(3)
def test_exercise_3_grpo_loss_ignores_whatever_is_outside_the_mask(ch):
    g = torch.Generator().manual_seed(1)
    logp, old, ref = (-2 * torch.rand(3, 5, generator=g) for _ in range(3))
    adv = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    base = ch.grpo_loss(logp, old, ref, adv, mask)
    noisy = [t.masked_fill(~mask, v) for t, v in zip((logp, old, ref), (float("nan"), 1e4, -1e4))]
    torch.testing.assert_close(ch.grpo_loss(*noisy, adv, mask), base)


@pytest.mark.exercise(3)
def test_exercise_3_the_clip_stops_the_gradient_only_where_the_ratio_left_the_trust_region(ch):
    # One token per answer; ratio = exp(logp - old). With A > 0, a ratio above 1 + eps gets no
    # gradient (no reward for pushing further); below it, the full gradient -A rho.
    old = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), math.log(1.1), math.log(0.5), math.log(0.9)], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss = ch.grpo_loss(logp[:, None], old[:, None], logp.detach()[:, None], adv, mask, 0.2, 0.0)
    loss.backward()
    rho = logp.detach().exp()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -rho[1] / 4, 0.0, rho[3] / 4]))


@pytest.mark.filterwarnings(TRL_WARNINGS)
def test_grpo_loss_equals_trls_grpo_trainer(ch, tmp_path):
    """TRL's GRPOTrainer computes its loss (grpo, k3 KL, clip 0.2) on left-padded prompts and
    completions of a Hugging Face Llama; ours runs on Chapter 6's GPT with the same weights,
    the rows laid out prompt + completion padded on the right. (use_bias_correction_kl=False:
    TRL's default also weights the KL term by the ratio, which is 1 on a batch's first update.)"""
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "model")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), beta=0.04, epsilon=0.2, loss_type="grpo", report_to="none",
                      use_cpu=True, bf16=False, use_bias_correction_kl=False, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=4, logging_strategy="no")
    no_reward = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731 (the loss takes the advantages given)
    trainer = GRPOTrainer(model=str(tmp_path / "model"), reward_funcs=no_reward,
                          args=args, train_dataset=Dataset.from_list([{"prompt": "a b"}] * 4),
                          processing_class=tiny_tokenizer())
    g = torch.Generator().manual_seed(1)
    prompts = [[2, 3, 4], [5, 6], [2, 3, 4, 5], [7, 8, 9]]
    completions = [[10, 11, 1], [12, 13], [14], [15, 16, 1]]
    prompt_ids = torch.tensor([[0] * (4 - len(p)) + p for p in prompts])  # TRL pads prompts on the left
    completion_ids = torch.tensor([c + [0] * (3 - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (3 - len(c)) for c in completions])
    advantages = torch.randn(4, generator=g)
    old = -3 * torch.rand(4, 3, generator=g)
    ref = -3 * torch.rand(4, 3, generator=g)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=(prompt_ids != 0).long(), completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages, old_per_token_logps=old,
                  ref_per_token_logps=ref, num_items_in_batch=completion_mask.sum())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    theirs = trainer._compute_loss(trainer.model, inputs)

    ours_model = from_hf_llama(trainer.model.state_dict(), tiny_llama_config())
    ids, mask = ch.pack_completions(prompts, completions)
    shape = (4, ids.shape[1] - 1)  # our per-token layout: position t scores token t + 1

    def place(per_completion_token):
        out = torch.zeros(shape)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            out[i, len(p) - 1:len(p) - 1 + len(c)] = per_completion_token[i, :len(c)]
        return out

    ours = ch.grpo_batch_loss(ours_model, (ids, mask, advantages, place(old), place(ref)), clip_eps=0.2, beta=0.04)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# GRPO through Chapter 8's train
# ---------------------------------------------------------------------------


def char_policy(ch, seed=0):
    task = ch.CharTask()
    return task, helpers.tiny_llama(seed=seed, vocab_size=task.tokenizer.vocab_size, block_size=16).train()


def test_rollouts_sample_groups_score_them_and_serve_a_batch_several_times(ch):
    task, policy = char_policy(ch)
    examples = ch.char_examples(20, "train", seed=3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    rollouts = ch.Rollouts(policy, task, examples, reference, group_size=4, max_new_tokens=4, updates_per_batch=2)
    g = torch.Generator().manual_seed(0)
    ids, mask, advantages, old, ref = rollouts.get_batch("train", 3, g, "cpu")
    assert ids.shape[0] == mask.shape[0] == len(advantages) == 12
    assert old.shape == ref.shape == (12, ids.shape[1] - 1)
    assert policy.training  # sampling switched to eval mode and back
    with torch.no_grad():
        torch.testing.assert_close(old, ch.completion_logprobs(policy.eval(), ids, mask))
        torch.testing.assert_close(ref, ch.completion_logprobs(reference, ids, mask))
    policy.train()
    lengths = mask.sum(-1).float()
    assert rollouts.stats[-1]["length"] == pytest.approx(lengths.mean().item())
    assert rollouts.get_batch("train", 3, g, "cpu")[0] is ids  # served again: one sampling, two updates
    assert rollouts.get_batch("train", 3, g, "cpu")[0] is not ids
    assert len(rollouts.stats) == 2
    again = ch.Rollouts(policy, task, examples, reference, group_size=4, max_new_tokens=4, updates_per_batch=2)
    assert torch.equal(again.get_batch("train", 3, torch.Generator().manual_seed(0), "cpu")[0], ids)  # reproducible
    with pytest.raises(ValueError, match="eval_iters=0"):
        rollouts.get_batch("val", 3, g, "cpu")
    with pytest.raises(ValueError, match="group_size"):
        ch.Rollouts(policy, task, examples, group_size=1)


def test_grpo_through_chapter_8s_train_raises_the_reward_of_a_learnable_rule(ch):
    # The reward: 1 when the answer starts with the digit 7. A random small model rarely
    # writes it; GRPO's groups find the rare successes and reinforce them.
    class StartsWith7(ch.CharTask):
        def reward(self, ids, example):
            return float(self.text(ids).startswith("7"))

    task = StartsWith7()
    torch.manual_seed(0)
    policy = helpers.tiny_llama(seed=1, vocab_size=task.tokenizer.vocab_size, block_size=16)
    examples = ch.char_examples(50, "train", seed=4)
    rollouts = ch.Rollouts(policy, task, examples, None, group_size=8, max_new_tokens=3)
    cfg = make_config("tiny", max_iters=30, batch_size=4, lr=1e-2, warmup_iters=1, decay_iters=30, eval_iters=0,
                      eval_interval=1, out_dir=None, device="cpu", precision="fp32")
    history = train(cfg, policy, rollouts, loss_fn=partial(ch.grpo_batch_loss, beta=0.0), log=lambda s: None,
                    evaluate=lambda m: rollouts.stats[-1])
    rewards = [stats["reward"] for _, stats in history["metrics"]]
    assert len(rewards) == 30
    assert sum(rewards[:5]) / 5 < 0.3 and sum(rewards[-5:]) / 5 > 0.8


def test_the_chapters_module_never_steps_an_optimizer_itself(ch):
    source = open(ch.__file__).read()
    assert not re.search(r"\.step\(", source)  # Chapter 8's train is the only training loop


# ---------------------------------------------------------------------------
# Saving, and loading into Chapter 12's model
# ---------------------------------------------------------------------------


def test_saved_policy_loads_into_a_fresh_model_with_chapter_12s_load_weights(ch, tmp_path):
    from safetensors.torch import save_file

    base = helpers.tiny_llama(seed=5)
    init = tmp_path / "sft.safetensors"  # an SFT file that changed the final norm and one block's MLP
    sft = copy.deepcopy(base)
    with torch.no_grad():
        sft.norm_f.weight.mul_(1.1)
        sft.blocks[1].mlp.up_proj.weight.add_(0.01)
    save_file({"norm_f.weight": sft.norm_f.weight.contiguous(),
               "blocks.1.mlp.up_proj.weight": sft.blocks[1].mlp.up_proj.weight.contiguous()}, init)
    policy = copy.deepcopy(sft)
    ch.prepare_policy(policy, "lora")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter
    path = ch.save_policy(policy, tmp_path / "model.safetensors", init, run="test")
    loaded = load_weights(copy.deepcopy(base), path).eval()
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], policy.eval()(x)[0], rtol=1e-5, atol=1e-5)


def test_stored_runs_are_read_by_the_figures_and_a_missing_one_says_how_to_make_it(ch, tmp_path):
    with pytest.raises(FileNotFoundError, match="--summary"):
        ch.plot_grpo_run(tmp_path / "missing.json")
    metrics = [[1, {"reward": 0.5, "length": 3.0, "no_signal": 0.0}],
               [2, {"reward": 0.75, "length": 2.5, "no_signal": 0.5}]]
    run = {"history": {"train": [0.1, 0.2], "val": [], "metrics": metrics}}
    (tmp_path / "grpo.json").write_text(json.dumps(run))
    fig = ch.plot_grpo_run(tmp_path / "grpo.json")
    assert [list(line.get_ydata()) for line in fig.axes[1].lines] == [[3.0, 2.5]]


@pytest.mark.parametrize("argv, message", [(["grpo", "--group-size", "0"], "--group-size must be positive, got 0"),
                                           (["dpo", "--lr", "0"], "--lr must be positive, got 0.0")])
def test_the_command_line_refuses_bad_flags_in_one_line_before_loading_the_model(ch, capsys, argv, message):
    from ch08_training import run_command

    assert run_command(ch.main, argv) == 1
    assert capsys.readouterr().err == f"error: {message} (--debug shows the traceback)\n"
    with pytest.raises(SystemExit):  # no abbreviations: --group is not taken for --group-size
        ch.parse_args(["grpo", "--group", "4"])
    assert "unrecognized arguments: --group" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ch.parse_args(["--help"])
    assert "--debug " in capsys.readouterr().out
