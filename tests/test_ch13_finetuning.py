"""Chapter 13: the data and its splits, the last-token classifier (against Hugging Face's
LlamaForSequenceClassification and each example run alone), the bag-of-words baseline
(against L-BFGS on the same objective), LoRA (against the peft package: outputs,
gradients and merges), the response-only SFT loss (against a brute-force per-example loss)
and packing (against padding), all on small models.

Run against your own module with: pytest tests/test_ch13_finetuning.py --impl my_ch13.py
"""

import copy
import json
import re
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
from ch06_gpt import GPT, GPTConfig
from ch08_training import make_config, next_token_loss, train
from ch09_generation import generate
from ch10_evaluation import token_logprobs
from ch12_pretrained import CHATML_TEMPLATE, load_weights, render_chat


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch13_finetuning")


def random_rows(lengths, vocab=50, seed=0, low=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g) for n in lengths]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_the_sms_collection_has_its_published_counts(ch):
    messages = ch.load_sms_spam()
    assert len(messages) == 5574  # the data set's description: 4,827 ham and 747 spam
    assert sum(label for _, label in messages) == 747
    assert messages[2][0].startswith("Free entry in 2 a wkly comp")


def test_spam_splits_are_balanced_disjoint_and_seeded(ch):
    messages = ch.load_sms_spam()
    splits = ch.spam_splits(messages)
    unique = set(messages)
    n_spam = sum(label for _, label in unique)  # each split takes its share of the rarer class
    assert {k: len(v) for k, v in splits.items()} == {"train": 914, "val": 130, "test": 262}
    assert sum(len(v) for v in splits.values()) == 2 * n_spam
    for rows in splits.values():
        assert 2 * sum(label for _, label in rows) == len(rows)  # half spam: chance is 50%
        assert set(rows) <= unique
    texts = [{t for t, _ in rows} for rows in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert ch.spam_splits(messages) == splits
    assert ch.spam_splits(messages, seed=7)["test"] != splits["test"]


def test_the_instruction_set_and_its_splits(ch):
    examples = ch.load_instructions()
    assert len(examples) == 1100 and all(set(e) == {"instruction", "input", "output"} for e in examples)
    splits = ch.instruction_splits(examples)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [935, 55, 110]
    seen = [json.dumps(e, sort_keys=True) for rows in splits.values() for e in rows]
    assert sorted(seen) == sorted(json.dumps(e, sort_keys=True) for e in examples)


def test_offline_without_a_cache_the_loaders_say_what_to_do(ch, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "SMSSpamCollection"))):
        ch.load_sms_spam(cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="instruction-data.json"):
        ch.load_instructions(cache_dir=tmp_path)
    (tmp_path / "SMSSpamCollection").write_text("ham\tnot the real file\n")  # a wrong checksum
    with pytest.raises(FileNotFoundError, match="copy the file"):
        ch.load_sms_spam(cache_dir=tmp_path)


def parse_problem(example):
    a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Answer with the number only\.",
                            example["instruction"]).groups()
    return int(a), op, int(b)


def test_arithmetic_examples_are_right_distinct_and_train_test_disjoint(ch):
    train = ch.arithmetic_examples(3000, "train", seed=0) + ch.arithmetic_examples(3000, "train", seed=1)
    test = ch.arithmetic_examples(300, "test", seed=0)
    for e in train + test:
        a, op, b = parse_problem(e)
        assert 100 <= b <= 999 and 100 <= a <= 999 and e["input"] == ""
        assert int(e["output"]) == (a + b if op == "+" else a - b) >= 0
    assert len({e["instruction"] for e in test}) == 300
    assert not {e["instruction"] for e in train} & {e["instruction"] for e in test}
    assert ch.arithmetic_examples(10, "test", seed=0) == test[:10]
    assert {parse_problem(e)[1] for e in test} == {"+", "-"}
    with pytest.raises(ValueError, match="split"):
        ch.arithmetic_examples(10, "val")


def test_check_answer_reads_the_last_number(ch):
    example = {"instruction": "What is 482 + 739?", "input": "", "output": "1221"}
    for completion, right in [("1221", True), ("The answer is 1,221.", True), ("482 + 739 = 1221", True),
                              ("1221 is not right, it is 1222", False), ("12210", False), ("", False),
                              ("one thousand", False), ("-1221", False)]:
        assert ch.check_answer(completion, example) is right, completion
    assert ch.check_answer("It is -5.", {"output": "-5"})


# ---------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------


@pytest.mark.exercise(1)
def test_exercise_1_last_token_picks_each_rows_last_real_position(ch):
    logits = torch.randn(4, 7, 3)
    lengths = torch.tensor([1, 7, 3, 5])
    expected = torch.stack([logits[b, n - 1] for b, n in enumerate(lengths.tolist())])
    assert torch.equal(ch.last_token(logits, lengths), expected)


@pytest.mark.exercise(1)
def test_exercise_1_a_right_padded_batch_classifies_each_example_as_if_alone(ch):
    # Under the causal mask, the padding after a message never reaches its last real token.
    torch.manual_seed(0)
    model = ch.GPTClassifier(helpers.tiny_llama(), n_classes=3).eval()
    rows = random_rows([2, 9, 5, 16], seed=1)
    with torch.no_grad():
        for pad in (0, 17):
            x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
            batched = model(x, torch.tensor([len(r) for r in rows]))
            alone = torch.cat([model(r[None], torch.tensor([len(r)])) for r in rows])
            torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.exercise(1)
def test_exercise_1_the_classifier_equals_hugging_face_sequence_classification(ch):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from ch06_gpt import from_hf_llama

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         num_labels=2, pad_token_id=0, tie_word_embeddings=False)
    hf = LlamaForSequenceClassification(config).eval()
    state = {k: v for k, v in hf.state_dict().items() if k.startswith("model.")}
    state["lm_head.weight"] = torch.zeros(50, 32)  # replaced by the class head below
    model = ch.GPTClassifier(from_hf_llama(state, config), n_classes=2).eval()
    with torch.no_grad():
        model.gpt.lm_head.weight.copy_(hf.score.weight)
        model.gpt.lm_head.bias.zero_()  # Hugging Face's score layer has no bias
        rows = random_rows([4, 11, 7], seed=2, low=1)  # real tokens are never the pad id 0
        x = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
        ours = model(x, torch.tensor([len(r) for r in rows]))
        theirs = hf(input_ids=x).logits  # pools at the last token that is not padding
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.exercise(1)
def test_exercise_1_last_token_rejects_lengths_outside_the_rows(ch):
    with pytest.raises(ValueError, match="lengths"):
        ch.last_token(torch.randn(2, 4, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="lengths"):
        ch.last_token(torch.randn(2, 4, 2), torch.tensor([5, 3]))


def test_mean_pooling_averages_the_real_tokens_only(ch):
    logits = torch.randn(3, 6, 2)
    lengths = torch.tensor([6, 1, 4])
    expected = torch.stack([logits[b, :n].mean(0) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(ch.mean_pool(logits, lengths), expected)
    with pytest.raises(ValueError, match="pooling"):
        ch.GPTClassifier(helpers.tiny_llama(), pooling="max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_cached_hidden_states_give_the_classifier_of_the_whole_model(ch, pooling):
    torch.manual_seed(0)
    gpt = helpers.tiny_llama(n_layer=3)
    rows = random_rows([3, 8, 5, 1], seed=3)
    lengths = torch.tensor([len(r) for r in rows])
    whole = ch.GPTClassifier(copy.deepcopy(gpt), 2, pooling).eval()
    with torch.no_grad():
        expected = whole(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths)
        for start in (1, 2, 3):
            top = ch.GPTClassifier(copy.deepcopy(gpt), 2, pooling, start=start).eval()
            top.gpt.lm_head.load_state_dict(whole.gpt.lm_head.state_dict())
            states = ch.hidden_states(gpt, rows, 1, batch_size=3)  # in two steps: 0 -> 1 -> start
            states = ch.hidden_states(gpt, states, start, start=1, batch_size=2)
            assert [s.shape for s in states] == [(len(r), 32) for r in rows]
            got = top(torch.nn.utils.rnn.pad_sequence(states, batch_first=True), lengths)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_which_parameters_train(ch):
    def trainable(which):
        model = ch.set_trainable(ch.GPTClassifier(helpers.tiny_llama(), n_classes=2), which)
        return model, {n for n, p in model.named_parameters() if p.requires_grad}

    _, names = trainable("head")
    assert names == {"gpt.lm_head.weight", "gpt.lm_head.bias"}
    model, names = trainable("last-block")
    last = {f"gpt.blocks.1.{n}" for n, _ in model.gpt.blocks[1].named_parameters()}
    assert names == last | {"gpt.norm_f.weight", "gpt.lm_head.weight", "gpt.lm_head.bias"}
    model, names = trainable("all")
    assert names == {n for n, _ in model.named_parameters()}
    model, names = trainable("lora")
    assert names == {n for n in names if n.endswith(("lora_A", "lora_B"))} | {"gpt.lm_head.weight",
                                                                               "gpt.lm_head.bias"}
    assert len([n for n in names if n.endswith("lora_A")]) == 2 * 7  # every Linear of both blocks
    assert ch.count_parameters(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in names)
    with pytest.raises(ValueError, match="trainable"):
        trainable("some")


def test_count_parameters_counts_a_tied_matrix_once(ch):
    model = helpers.tiny_gpt()  # head tied to the embedding
    assert ch.count_parameters(model) == (model.num_parameters(), model.num_parameters())
    model.requires_grad_(False)
    assert ch.count_parameters(model) == (0, model.num_parameters())
    assert ch.training_bytes(model) == 4 * model.num_parameters()


def test_a_classifier_learns_a_toy_task_with_chapter_8s_train(ch):
    # label: does token 7 occur in the row? Only the last token has seen the whole row.
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(8, 30, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g) for _ in range(256)]
    labels = [int(i % 2) for i in range(256)]
    for row, label in zip(rows, labels):
        if label:
            row[torch.randint(len(row), (1,), generator=g)] = 7
    data = ch.ExampleBatches({"train": (rows[:192], labels[:192]), "val": (rows[192:], labels[192:])})
    torch.manual_seed(0)
    model = ch.GPTClassifier(helpers.tiny_llama(vocab_size=30), n_classes=2)
    before = ch.accuracy(model, data, "val")
    cfg = make_config("tiny", max_iters=150, batch_size=16, lr=3e-3, warmup_iters=10, decay_iters=150,
                      eval_interval=150, eval_iters=2, out_dir=None, device="cpu", precision="fp32")
    history = train(cfg, model, data, loss_fn=ch.classification_loss, log=lambda s: None)
    assert history["train"][-1] < history["train"][0]
    assert ch.accuracy(model, data, "val") >= 0.9 > before


# ---------------------------------------------------------------------------
# The bag-of-words baseline
# ---------------------------------------------------------------------------


def test_bag_of_words_features(ch):
    vocabulary = ch.bow_vocabulary(["Free prize! Call now", "call me now", "prize draw"], min_count=2)
    assert vocabulary == {"call": 0, "now": 1, "prize": 2}
    x = ch.bow_features(["CALL call now!", "nothing here"], vocabulary)
    assert x.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert ch.words("Win £100 now!!") == ["win", "£", "100", "now", "!", "!"]


def test_logistic_loss_is_binary_cross_entropy(ch):
    model = ch.LogisticRegression(5)
    torch.nn.init.normal_(model.weight, std=10.0)  # large logits: the formula must not overflow
    x, y = torch.randn(64, 5), torch.randint(0, 2, (64,)).float()
    expected = F.binary_cross_entropy_with_logits(model(x), y)
    torch.testing.assert_close(ch.logistic_regression_loss(model, (x, y)), expected)


def test_logistic_regression_trained_by_chapter_8_reaches_the_optimum_of_lbfgs(ch):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(400, 6, generator=g) < 0.3).float()
    y = (torch.rand(400, generator=g) < torch.sigmoid(x @ torch.tensor([2.0, -1, 0, 1, -2, 0.5]) - 0.3)).float()
    data = ch.TensorBatches({"train": (x, y), "val": (x, y)})
    model = ch.LogisticRegression(6)
    cfg = make_config("tiny", max_iters=1000, batch_size=400, lr=0.1, min_lr=0.001, warmup_iters=10,
                      decay_iters=1000, weight_decay=0.0, eval_interval=600, eval_iters=0, out_dir=None,
                      device="cpu", precision="fp32")
    train(cfg, model, data, loss_fn=ch.logistic_regression_loss, log=lambda s: None)
    reference = torch.nn.Linear(6, 1)  # the same objective, minimised by L-BFGS
    optimizer = torch.optim.LBFGS(reference.parameters(), max_iter=500, tolerance_grad=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(reference(x).squeeze(-1), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        best = F.binary_cross_entropy_with_logits(reference(x).squeeze(-1), y).item()
        assert abs(ch.logistic_regression_loss(model, (x, y)).item() - best) < 1e-4
        torch.testing.assert_close(model.weight, reference.weight[0], atol=0.03, rtol=0)


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------


def peft_copy(model, r, alpha, targets):
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0),
                                   copy.deepcopy(model))


def copy_adapters(ours, theirs):
    """Give the peft model the adapters of ours (random B, so that the update is not zero)."""
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    for name, layer in ours.named_modules():
        if isinstance(layer, ours_lora_class(ours)):
            with torch.no_grad():
                layer.lora_B.normal_()
                peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
                peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)


def ours_lora_class(model):
    return next(type(m) for m in model.modules() if type(m).__name__ == "LoRALinear")


@pytest.mark.exercise(2)
def test_exercise_2_a_new_lora_layer_is_the_pretrained_layer(ch):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 5)
    layer = ch.LoRALinear(copy.deepcopy(base), r=3, alpha=6)
    x = torch.randn(4, 7, 12)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert layer.scaling == 2.0 and layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (5, 3)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.exercise(2)
def test_exercise_2_lora_layer_computes_the_low_rank_update(ch):
    torch.manual_seed(0)
    layer = ch.LoRALinear(torch.nn.Linear(12, 5), r=3, alpha=12)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 12)
    W, b = layer.base.weight, layer.base.bias
    expected = x @ (W + 4.0 * layer.lora_B @ layer.lora_A).T + b
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.exercise(2)
def test_exercise_2_outputs_and_gradients_equal_peft(ch):
    for targets in [("q_proj", "v_proj"), ch.LORA_TARGETS]:
        torch.manual_seed(0)
        gpt = helpers.tiny_llama()
        ours = ch.add_lora(copy.deepcopy(gpt), targets, r=4, alpha=8)
        theirs = peft_copy(gpt, 4, 8, targets)
        copy_adapters(ours, theirs)
        x, y = random_rows([12, 12], seed=4)
        x, y = torch.stack([x, y]), torch.stack([y, x])
        logits, loss = ours(x, y)
        logits_peft, loss_peft = theirs(x, y)
        torch.testing.assert_close(logits, logits_peft)
        loss.backward()
        loss_peft.backward()
        peft_params = dict(theirs.named_parameters())
        trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
        assert len(trained) == 2 * 2 * len(targets)  # A and B of each target in both blocks
        peft_name = {n: n.replace("lora_A", "lora_A.default.weight").replace("lora_B", "lora_B.default.weight")
                     for n, _ in trained}
        assert {n for n, p in peft_params.items() if p.requires_grad} == set(peft_name.values())
        for name, p in trained:
            torch.testing.assert_close(p.grad, peft_params[peft_name[name]].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.exercise(3)
def test_exercise_3_merge_equals_peft_and_unmerge_restores_the_weight(ch):
    torch.manual_seed(0)
    gpt = helpers.tiny_llama()
    ours = ch.add_lora(copy.deepcopy(gpt), ("q_proj", "down_proj"), r=4, alpha=8)
    theirs = peft_copy(gpt, 4, 8, ("q_proj", "down_proj"))
    copy_adapters(ours, theirs)
    x = random_rows([10], seed=5)[0][None]
    with torch.no_grad():
        before = theirs(x)[0]  # the adapted model, unmerged
        ch.merge_lora(ours)
        for module in theirs.modules():
            if hasattr(module, "lora_A"):
                module.merge()
        theirs_weights = {n: p for n, p in theirs.named_parameters() if "base_layer" in n}
        for name, p in ours.named_parameters():
            if ".base." in name:
                torch.testing.assert_close(p, theirs_weights[name.replace(".base.", ".base_layer.")])
        torch.testing.assert_close(ours(x)[0], before, rtol=1e-5, atol=1e-5)
        layer = ours.blocks[0].attn.q_proj
        assert layer.merged
        with pytest.raises(ValueError, match="merged"):
            layer.merge()
        ch.unmerge_lora(ours)
        pretrained = dict(gpt.named_parameters())
        for name, p in ours.named_parameters():
            if ".base." in name:  # W + D - D: one rounding each way
                torch.testing.assert_close(p, pretrained[name.replace(".base.", ".")], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(x)[0], before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_add_lora_freezes_the_rest_and_counts_r_times_in_plus_out(ch):
    gpt = helpers.tiny_llama()
    model = ch.add_lora(gpt, ("q_proj", "v_proj"), r=4)
    q, v = model.blocks[0].attn.q_proj.base, model.blocks[0].attn.v_proj.base
    per_block = 4 * (q.in_features + q.out_features) + 4 * (v.in_features + v.out_features)
    assert ch.count_parameters(model)[0] == 2 * per_block
    assert ch.training_bytes(model) == 4 * (ch.count_parameters(model)[1] + 3 * 2 * per_block)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ch.add_lora(helpers.tiny_llama(), ("qkv",))
    with pytest.raises(ValueError, match="rank"):
        ch.LoRALinear(torch.nn.Linear(3, 3), r=0)


def test_chapter_9s_lean_decode_step_runs_the_adapters(ch):
    # q, k and v wrapped by LoRA cannot be stacked into one matrix: the lean step must run them
    # as modules, and generate exactly what GPT.forward does
    model = ch.add_lora(helpers.tiny_llama(), r=2)
    with torch.no_grad():
        for layer in ch.lora_layers(model):
            layer.lora_B.normal_()  # an update large enough to change the greedy tokens
    x = random_rows([5, 5], seed=3)
    idx = torch.stack(x)
    lean = generate(model, idx, 8, temperature=0)
    assert torch.equal(lean, generate(model, idx, 8, temperature=0, lean_step=False))
    assert not torch.equal(lean, generate(helpers.tiny_llama(), idx, 8, temperature=0))


def test_finetuned_weights_load_into_a_plain_model_with_chapter_12s_loader(ch, tmp_path):
    torch.manual_seed(0)
    gpt = helpers.tiny_llama()
    model = ch.add_lora(copy.deepcopy(gpt), r=2)
    model.norm_f.requires_grad_(True)  # a trained parameter that is not an adapter
    with torch.no_grad():
        for layer in ch.lora_layers(model):
            layer.lora_B.normal_()
        model.norm_f.weight.mul_(1.5)
    path = ch.save_finetuned(model, tmp_path / "model.safetensors", task="test")
    plain = load_weights(copy.deepcopy(gpt), path)
    x = random_rows([9], seed=6)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    assert "blocks.0.attn.q_proj.weight" in ch.finetuned_weights(model)


def test_a_lora_run_of_chapter_8s_train_checkpoints_only_the_adapters(ch, tmp_path):
    torch.manual_seed(0)
    gpt = helpers.tiny_llama()
    model = ch.add_lora(copy.deepcopy(gpt), ("q_proj", "v_proj"), r=2)
    data = helpers_token_batches()
    cfg = make_config("tiny", max_iters=6, batch_size=4, eval_interval=3, eval_iters=1, out_dir=str(tmp_path),
                      save_frozen=False, device="cpu", precision="fp32", block_size=16)
    train(cfg, model, data, log=lambda s: None)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        saved = {k[6:] for k in f.keys() if k.startswith("model.")}
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    for name, p in model.named_parameters():  # the frozen weights did not move
        if ".base." in name:
            assert torch.equal(p, dict(gpt.named_parameters())[name.replace(".base.", ".")])


def helpers_token_batches():
    from ch08_training import TokenBatches

    ids = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0)).numpy()
    return TokenBatches(ids[:300], ids[300:], 16)


# ---------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------


@pytest.mark.exercise(4)
def test_exercise_4_sft_tensors_on_a_hand_made_example(ch):
    x, y, mask = ch.sft_tensors([1, 2, 3], [4, 5])
    assert x.tolist() == [1, 2, 3, 4] and y.tolist() == [2, 3, 4, 5]
    assert mask.tolist() == [False, False, True, True]  # the targets 4 and 5 are the response
    assert mask.dtype == torch.bool


@pytest.mark.exercise(4)
@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.lists(st.integers(0, 40), min_size=1, max_size=12))
def test_exercise_4_the_mask_covers_exactly_the_response_targets(ch, prompt, response):
    x, y, mask = ch.sft_tensors(prompt, response)
    ids = prompt + response
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:]
    assert y[mask].tolist() == response
    assert mask.sum() == len(response)


def sft_examples(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist(),
             torch.randint(0, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def brute_force_response_nll(model, examples):
    """Sum over examples, each run alone, of -log p of its response tokens; and their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in examples:
            ids = torch.tensor(prompt + response)
            logp = torch.log_softmax(model(ids[None, :-1])[0][0].double(), dim=-1)  # (T - 1, V)
            for i, token in enumerate(response):
                total -= logp[len(prompt) - 1 + i, token].item()
            count += len(response)
    return total, count


@pytest.mark.exercise(4)
def test_exercise_4_the_padded_batch_loss_is_the_mean_over_response_tokens(ch):
    torch.manual_seed(0)
    model = helpers.tiny_llama()
    examples = sft_examples()
    batch = ch.pad_examples([ch.sft_tensors(p, r) for p, r in examples], "cpu")
    total, count = brute_force_response_nll(model, examples)
    with torch.no_grad():
        loss = next_token_loss(model, batch)  # Chapter 8's default loss, with the mask
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    data = ch.SFTBatches({"test": examples})
    assert ch.response_loss(model, data, "test", batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_packing_with_document_masks_equals_padding(ch):
    torch.manual_seed(0)
    model = helpers.tiny_llama(block_size=40)
    examples = sft_examples(seed=1, n=6)
    rows = [[ch.sft_tensors(*e) for e in examples[:3]], [ch.sft_tensors(*e) for e in examples[3:]]]
    packed = ch.pack_rows(rows, 40, "cpu")
    x, y, mask, documents = packed
    assert (mask.sum(1) == torch.tensor([sum(len(r) for _, r in examples[:3]),
                                          sum(len(r) for _, r in examples[3:])])).all()
    total, count = brute_force_response_nll(model, examples)
    with torch.no_grad():
        assert ch.packed_loss(model, packed).item() == pytest.approx(total / count, rel=1e-5)
        naive = F.cross_entropy(model(x)[0].flatten(0, 1), y.masked_fill(~mask, -1).flatten(), ignore_index=-1)
    assert abs(naive.item() - total / count) > 1e-3  # without the mask, examples see each other


def test_document_positions_restart_at_each_document(ch):
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert ch.document_positions(documents).tolist() == expected


def test_sft_batches_draw_padded_or_packed_rows(ch):
    examples = sft_examples(seed=2, n=20)
    g = torch.Generator().manual_seed(0)
    x, y, mask = ch.SFTBatches({"train": examples}).get_batch("train", 4, g)
    assert x.shape == y.shape == mask.shape and x.shape[0] == 4
    assert ((y == -1) <= ~mask).all()
    x, y, mask, documents = ch.SFTBatches({"train": examples}, packing=True, row_len=24).get_batch("train", 3, g)
    assert x.shape == (3, 24)
    for row in range(3):  # every example in a row is whole: its prompt and its response
        for doc in documents[row].unique().tolist():
            if doc >= 0:
                tokens = (documents[row] == doc).sum().item()
                assert any(len(p) + len(r) - 1 == tokens and mask[row][documents[row] == doc].sum() == len(r)
                           for p, r in examples)
    with pytest.raises(ValueError, match="row_len"):
        ch.SFTBatches({"train": examples}, packing=True, row_len=4)


class ChatTokenizer:
    """A stand-in for SmolLM2's tokenizer: one id per character, ChatML's special tokens."""

    special_tokens = {"<|im_start|>": 1, "<|im_end|>": 2}
    chat_template = CHATML_TEMPLATE.replace("SYSTEM", "You are a test.")

    def encode_ordinary(self, text):
        return [ord(c) + 3 for c in text]

    def encode(self, text, allowed_special=()):
        ids = []
        for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            ids += [self.special_tokens[part]] if part in self.special_tokens else self.encode_ordinary(part)
        return ids

    def decode(self, ids):
        names = {v: k for k, v in self.special_tokens.items()}
        return "".join(names[i] if i in names else chr(i - 3) for i in ids)


def test_chat_prompt_and_response_spell_the_chat_template(ch):
    tokenizer = ChatTokenizer()
    example = {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."}
    prompt, response = ch.tokenize_examples(tokenizer, [example])[0]
    conversation = [{"role": "user", "content": "Edit the sentence.\n\nHe go home."},
                    {"role": "assistant", "content": "He goes home."}]
    expected = render_chat(conversation, "You are a test.", add_generation_prompt=False)
    assert tokenizer.decode(prompt + response) + "\n" == expected
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ch.tokenize_examples(tokenizer, [example], max_len=10) == []


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_the_command_line_parses_both_commands(ch):
    args = ch.parse_args(["sft", "--task", "instructions", "--method", "full", "--steps", "5"])
    assert (args.command, args.task, args.method, args.steps, args.packing) == ("sft", "instructions", "full", 5, False)
    args = ch.parse_args(["classify", "--trainable", "lora", "--pooling", "mean"])
    assert (args.trainable, args.pooling, args.weights) == ("lora", "mean", "pretrained")
    with pytest.raises(SystemExit):
        ch.parse_args(["classify", "--trainable", "everything"])


@pytest.mark.parametrize("argv, message", [(["sft", "--steps", "0"], "--steps must be positive, got 0"),
                                           (["classify", "--batch-size", "-2"], "--batch-size must be positive, got -2")])
def test_the_command_line_refuses_bad_flags_in_one_line_before_loading_the_model(ch, capsys, argv, message):
    from ch08_training import run_command

    assert run_command(ch.main, argv) == 1
    assert capsys.readouterr().err == f"error: {message} (--debug shows the traceback)\n"
    with pytest.raises(SystemExit):  # no abbreviations: --step is not taken for --steps
        ch.parse_args(["sft", "--step", "5"])
    assert "unrecognized arguments: --step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ch.parse_args(["--help"])
    assert "--debug " in capsys.readouterr().out


def test_load_finetuned_says_what_to_run_when_the_file_is_missing(ch, tmp_path):
    with pytest.raises(FileNotFoundError, match="ch13_finetuning.py sft"):
        ch.load_finetuned(tmp_path / "missing.safetensors")
