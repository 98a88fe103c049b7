"""Tests of Chapter 6: GPT, a decoder-only language model.

References: Hugging Face transformers' GPT2LMHeadModel and LlamaForCausalLM built from a
config with random weights (no download), the safetensors library, PyTorch's FLOP counter,
and brute-force loops.

Run against your own module with: pytest tests/test_ch06_gpt.py --impl my_ch06.py
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode
from helpers import ListCache

FAST = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch06_gpt")


def small_config(ch, **overrides):
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32)
    return ch.GPTConfig(**{**base, **overrides})


def hf_gpt2(seed=0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**{**dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=32,
                                  bos_token_id=None, eos_token_id=None), **overrides})
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def hf_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**dict(vocab_size=97, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None), **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; make them random so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


# ---------------------------------------------------------------------------------------
# Configuration and parameter count
# ---------------------------------------------------------------------------------------


def test_config_rejects_inconsistent_values(ch):
    with pytest.raises(ValueError, match="divisible"):
        ch.GPTConfig(d_model=100, n_head=12)
    with pytest.raises(ValueError, match="positions"):
        ch.GPTConfig(positions="sinusoidal")
    with pytest.raises(ValueError, match="GPT-2 size"):
        ch.GPTConfig.gpt2("gpt3")


@pytest.mark.parametrize("name,hf_count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                           ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_sizes_have_the_parameter_counts_of_hugging_face(ch, name, hf_count):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = ch.GPTConfig.gpt2(name)
    with torch.device("meta"):  # shapes only: no memory, no time
        ours = ch.GPT(config)
        theirs = GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.d_model))
    assert ours.num_parameters() == theirs.num_parameters() == hf_count


def test_llama2_7b_shape_has_6_74_billion_parameters(ch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = ch.GPTConfig.llama2_7b()
    with torch.device("meta"):
        ours = ch.GPT(config)
        theirs = LlamaForCausalLM(LlamaConfig())  # its defaults are Llama 2 7B's shape
    assert ours.num_parameters() == theirs.num_parameters() == 6_738_415_616


@pytest.mark.exercise(1)
def test_exercise_1_tied_head_shares_the_embedding_matrix(ch):
    tied = ch.GPT(small_config(ch, tie_weights=True))
    untied = ch.GPT(small_config(ch, tie_weights=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


@pytest.mark.exercise(1)
def test_exercise_1_tied_matrix_gets_the_gradients_of_both_uses(ch):
    torch.manual_seed(0)
    tied = ch.GPT(small_config(ch, tie_weights=True))
    untied = ch.GPT(small_config(ch, tie_weights=False))
    state = {k: v.clone() for k, v in tied.state_dict().items()}
    untied.load_state_dict(state)  # the untied model starts with two copies of the same matrix
    idx, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    tied(idx, targets)[1].backward()
    untied(idx, targets)[1].backward()
    torch.testing.assert_close(tied.tok_emb.weight.grad, untied.tok_emb.weight.grad + untied.lm_head.weight.grad)


@pytest.mark.exercise(2)
@FAST
@given(n_layer=st.integers(1, 3), n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]),
       kv_div=st.sampled_from([1, 2]), bias=st.booleans(), norm=st.sampled_from(["layernorm", "rmsnorm"]),
       mlp=st.sampled_from(["gelu", "swiglu"]), positions=st.sampled_from(["learned", "rope"]), tie=st.booleans())
def test_exercise_2_parameter_formula_matches_the_module(ch, n_layer, n_head, head_dim, kv_div, bias, norm, mlp,
                                                         positions, tie):
    config = ch.GPTConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=n_head,
                          n_kv_head=max(1, n_head // kv_div), d_model=n_head * head_dim, bias=bias, norm=norm,
                          mlp=mlp, positions=positions, tie_weights=tie)
    with torch.device("meta"):
        model = ch.GPT(config)
    assert ch.gpt_num_parameters(config) == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.exercise(2)
def test_exercise_2_parameter_formula_gives_gpt2_and_llama_counts(ch):
    assert ch.gpt_num_parameters(ch.GPTConfig.gpt2()) == 124_439_808
    assert ch.gpt_num_parameters(ch.GPTConfig.gpt2("gpt2-xl")) == 1_557_611_200
    assert ch.gpt_num_parameters(ch.GPTConfig.llama2_7b()) == 6_738_415_616


def test_non_embedding_count_leaves_out_token_and_position_tables(ch):
    config = ch.GPTConfig.gpt2()
    with torch.device("meta"):
        model = ch.GPT(config)
    assert model.num_parameters(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_exercise_3_flops_formula_matches_pytorchs_flop_counter(ch):
    for overrides in (dict(), dict(n_kv_head=2, mlp="swiglu", positions="rope", bias=False)):
        config = small_config(ch, use_fused=False, tie_weights=False, **overrides)  # matmul path: countable
        model = ch.GPT(config)
        for seq_len in (32, 20):
            idx = torch.randint(0, 97, (1, seq_len))
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(idx)
            assert counter.get_total_flops() == seq_len * ch.flops_per_token(config, seq_len), overrides


@pytest.mark.exercise(3)
def test_exercise_3_flops_are_about_twice_the_parameters(ch):
    # The rule of thumb 2N (+ attention): for GPT-2 small with 1024 tokens of context.
    config = ch.GPTConfig.gpt2()
    # every weight that multiplies: all parameters but positions, biases (9C) and norms (4C) per
    # block and the final norm; the tied matrix counts once (lookups are free, the head is not)
    n_matmul = 124_439_808 - 1024 * 768 - 12 * 13 * 768 - 2 * 768
    attention = 12 * 4 * 1024 * 768  # scores and weighted values, 1024 keys
    assert ch.flops_per_token(config) == 2 * n_matmul + attention
    assert 1.1 < ch.flops_per_token(config) / (2 * 124_439_808) < 1.2


# ---------------------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------------------


def test_loss_is_mean_cross_entropy_and_about_ln_v_at_initialisation(ch):
    torch.manual_seed(0)
    model = ch.GPT(small_config(ch, tie_weights=False))
    idx, targets = torch.randint(0, 97, (4, 32)), torch.randint(0, 97, (4, 32))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 97)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1)))
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1  # near-uniform predictions
    targets[:, :5] = -1  # ignored positions
    _, partial = model(idx, targets)
    torch.testing.assert_close(partial, F.cross_entropy(logits[:, 5:].reshape(-1, 97), targets[:, 5:].reshape(-1)))


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_logits_never_depend_on_future_tokens(ch, positions):
    torch.manual_seed(0)
    model = ch.GPT(small_config(ch, positions=positions)).eval()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0][:, :12], model(changed)[0][:, :12])


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_head=2, mlp="swiglu", positions="rope", norm="rmsnorm")])
def test_fused_attention_gpt_equals_from_scratch_attention_gpt(ch, overrides):
    torch.manual_seed(0)
    fused = ch.GPT(small_config(ch, use_fused=True, **overrides))
    scratch = ch.GPT(small_config(ch, use_fused=False, **overrides))
    scratch.load_state_dict(fused.state_dict())
    idx, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    (logits_f, loss_f), (logits_s, loss_s) = fused(idx, targets), scratch(idx, targets)
    torch.testing.assert_close(logits_f, logits_s, atol=1e-5, rtol=1e-4)
    loss_f.backward()
    loss_s.backward()
    for (name, p_f), p_s in zip(fused.named_parameters(), scratch.parameters()):
        torch.testing.assert_close(p_f.grad, p_s.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_clear_errors_for_bad_input(ch):
    model = ch.GPT(small_config(ch))
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_dropout_is_active_in_training_only(ch):
    torch.manual_seed(0)
    model = ch.GPT(small_config(ch, dropout=0.2))
    idx = torch.randint(0, 97, (2, 16))
    assert not torch.allclose(model.train()(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_blocks_accept_a_kv_cache_for_incremental_decoding(ch, positions):
    torch.manual_seed(0)
    model = ch.GPT(small_config(ch, positions=positions, n_kv_head=2)).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        caches = [ListCache() for _ in model.blocks]
        first, _ = model(idx[:, :7], kv_caches=caches)  # a prompt of 7 tokens
        steps = [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(7, 12)]  # then one at a time
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(2, 21, dtype=torch.long), kv_caches=caches)  # 12 cached + 21 > 32


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


@pytest.mark.exercise(4)
def test_exercise_4_generate_is_the_greedy_loop(ch):
    torch.manual_seed(0)
    model = ch.GPT(small_config(ch, tie_weights=False)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, 40)  # 45 tokens: more than block_size=32, so it must crop
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    idx = prompt
    with torch.no_grad():
        for _ in range(40):  # brute force: the full forward on the cropped context, every time
            logits, _ = model(idx[:, -32:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


@pytest.mark.exercise(4)
def test_exercise_4_generate_matches_hugging_face_greedy_continuation(ch):
    hf = hf_gpt2(seed=3)
    ours = ch.GPT(ch.config_from_hf_gpt2(hf.config))
    ours.load_state_dict(ch.hf_gpt2_to_ours(hf.state_dict(), ours.config))
    ours.eval()
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(prompt, 20), theirs)


# ---------------------------------------------------------------------------------------
# Hugging Face GPT-2 and Llama
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_fused", [True, False], ids=["torch-kernels", "book-components"])
def test_hf_gpt2_weights_give_the_same_logits_and_loss(ch, use_fused):
    hf = hf_gpt2()
    config = replace(ch.config_from_hf_gpt2(hf.config), use_fused=use_fused)  # False: our LayerNorm and attention
    ours = ch.from_hf_gpt2(hf.state_dict(), config).eval()
    assert ours.config.mlp == "gelu_tanh"  # GPT-2's activation is the tanh approximation
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])  # HF shifts the labels inside
        torch.testing.assert_close(ours(idx)[0], out.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss)


def test_conv1d_is_a_transposed_linear(ch):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight stored (8, 12)
    x = torch.randn(3, 8)
    assert conv.weight.shape == (8, 12)
    torch.testing.assert_close(conv(x), F.linear(x, conv.weight.t(), conv.bias))


def test_export_to_hf_gpt2_round_trips(ch):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = ch.GPT(small_config(ch, mlp="gelu_tanh")).eval()
    hf = hf_gpt2(seed=5)
    hf.load_state_dict(ch.to_hf_gpt2(ours), strict=True)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=1e-4)
    back = ch.from_hf_gpt2(hf.state_dict(), hf.config)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(hf, GPT2LMHeadModel)


def test_hf_safetensors_file_loads_offline(ch, tmp_path):
    hf = hf_gpt2(seed=2)
    hf.save_pretrained(tmp_path)  # model.safetensors + config.json, written locally
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    ours = ch.from_hf_gpt2(tmp_path / "model.safetensors", config).eval()
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-4)


def test_hub_style_gpt2model_checkpoint_without_prefix_or_head(ch):
    hf = hf_gpt2(seed=4)
    hub_style = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = ch.from_hf_gpt2(hub_style, hf.config).eval()
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-4)


def test_safetensors_reader_and_writer_agree_with_the_library(ch, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "half": torch.randn(5).half(), "bf": torch.randn(2, 2).bfloat16(), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3)}
    ch.save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    save_file(tensors, tmp_path / "theirs.safetensors")
    for path in ("ours.safetensors", "theirs.safetensors"):
        for reader in (load_file, ch.load_safetensors):
            loaded = reader(tmp_path / path)
            assert loaded.keys() == tensors.keys()
            for name, t in tensors.items():
                assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), (path, name)


@pytest.mark.parametrize("use_fused", [True, False], ids=["torch-kernels", "book-components"])
def test_hf_llama_weights_give_the_same_logits_and_continuation(ch, use_fused):
    hf = hf_llama()
    ours = ch.from_hf_llama(hf.state_dict(), replace(ch.config_from_hf_llama(hf.config), use_fused=use_fused)).eval()
    c = ours.config
    assert (c.norm, c.mlp, c.positions, c.n_kv_head, c.bias) == ("rmsnorm", "swiglu", "rope", 2, False)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-4)
    prompt = idx[:1, :5]
    theirs = hf.generate(prompt, max_new_tokens=15, do_sample=False)
    assert torch.equal(ours.generate(prompt, 15), theirs)


def test_parameter_breakdown_adds_up(ch):
    parts = ch.parameter_breakdown(ch.GPTConfig.gpt2())
    assert sum(parts.values()) == 124_439_808
    assert parts["embeddings"] == 50257 * 768 + 1024 * 768 and parts["output head"] == 0  # tied


def test_rope_interleaved_is_the_half_layout_with_permuted_query_and_key_rows(ch):
    from ch03_embeddings import interleaved_to_half_permutation

    torch.manual_seed(0)
    half = ch.GPT(small_config(ch, positions="rope", n_kv_head=2)).eval()
    interleaved = ch.GPT(small_config(ch, positions="rope", n_kv_head=2, rope_interleaved=True)).eval()
    perm = interleaved_to_half_permutation(half.config.head_dim)
    inverse = torch.argsort(perm)  # half-layout rows -> interleaved-layout rows
    state = {}
    for name, w in half.state_dict().items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # permute within each head
            w = w.view(-1, half.config.head_dim, w.shape[-1])[:, inverse].reshape(w.shape)
        state[name] = w
    interleaved.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(interleaved(idx)[0], half(idx)[0], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(ch.GPT(interleaved.config).eval()(idx)[0], half(idx)[0])


def test_one_default_epsilon_for_rmsnorm(ch):
    import inspect

    from ch05_block import RMS_NORM_EPS, RMSNorm, make_norm, rms_norm

    config = small_config(ch, norm="rmsnorm")
    model = ch.GPT(config)
    assert {m.eps for m in model.modules() if isinstance(m, RMSNorm)} == {RMS_NORM_EPS}
    assert make_norm("rmsnorm", 8).eps == RMSNorm(8).eps == RMS_NORM_EPS
    assert inspect.signature(rms_norm).parameters["eps"].default == RMS_NORM_EPS
    assert ch.GPTConfig.llama_style().norm_eps in (None, RMS_NORM_EPS)
