"""Benchmark of Chapter 2: BPE training and encoding speed, beside the reference libraries.

Run by hand from the repository root (not collected by pytest):

    python tests/benchmarks/bench_ch02_tokenizer.py [--data PATH] [--repeats 5] [--only train]
    python tests/benchmarks/bench_ch02_tokenizer.py --only long [--simple]

1. Training on Tiny Shakespeare at vocabulary 1024 and 4096: our ``train_bpe`` (the whole text
   as one string, its normal use) beside Hugging Face ``tokenizers``' byte-level BPE trainer
   used the way its documentation does: ``tokenizer.train([file])`` (its default threads, and
   one thread) and ``train_from_iterator`` over the file's lines. (One 1.1 MB string through
   ``train_from_iterator`` is about 2x slower for Hugging Face, since it splits and counts one
   sequence on one thread, so it is not the reference.) Each run is a fresh process, so its
   peak memory (max RSS) is its own; the implementations alternate, ``--repeats`` times, and
   the medians and their ratios are printed: background load hits all of them alike. CPU
   seconds are printed too: on a busy machine the wall time includes waiting for a core, which
   hurts a trainer with two threads more than one with one, while the CPU time of the
   one-thread runs (ours and HF on 1 thread) compares the work itself.
2. Encoding throughput (MB/s) on the same text: our pure-Python encoder (cold cache and warm),
   the ``tiktoken.Encoding`` built from our ranks, and tiktoken's own encoding on the same
   ranks (GPT-2), all checked to give identical ids.
3. Long pieces (``--only long``): 16,000 x "a", "!" and "😀" in a row, each one piece, encoded
   with GPT-2's ranks by our encoder (a fresh tokenizer each time, so nothing is cached) and by
   tiktoken, side by side, ids checked identical. ``--simple`` adds Exercise 3's simple loop,
   quadratic in the piece length (minutes).

The text is ../shared/data/tinyshakespeare.txt (beside the repository), or --data; it is not
part of the repository. Its public address:
https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "code"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
IMPLEMENTATIONS = {  # name -> label
    "ours": "ours: train_bpe(text)",
    "hf-file": "HF: train([file])",
    "hf-lines": "HF: lines iterator",
    "hf-file-1thread": "HF: train([file]), 1 thread",
}


def read_corpus(path: Path) -> str:
    if not path.exists():
        sys.exit(f"{path} not found: download Tiny Shakespeare from {URL} (sha256 {SHA256}) "
                 "and pass --data")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256:
        sys.exit(f"{path}: unexpected sha256, not the Tiny Shakespeare of {URL}")
    return data.decode("utf-8")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def hf_tokenizer_and_trainer(vocab_size: int):
    """Hugging Face's byte-level BPE, set up as GPT-2's: all 256 bytes in the alphabet."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_once(impl: str, vocab_size: int, path: Path) -> dict:
    """One training run in this process, reading the file included: wall and CPU seconds,
    vocabulary size and max RSS before/after (MB)."""
    read_corpus(path)  # check the file once, outside the timed part
    if impl == "ours":
        import ch02_tokenizer as ch

        before = max_rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        tok = ch.train_bpe(path.read_text(encoding="utf-8"), vocab_size)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        size = tok.vocab_size
    else:
        import tokenizers  # noqa: F401 (imported before the clock starts)

        before = max_rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        tok, trainer = hf_tokenizer_and_trainer(vocab_size)
        if impl == "hf-lines":
            with open(path, encoding="utf-8") as lines:
                tok.train_from_iterator(lines, trainer=trainer)
        else:
            tok.train([str(path)], trainer=trainer)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        size = tok.get_vocab_size()
    return {"seconds": seconds, "cpu": cpu, "rss_before": before, "rss_peak": max_rss_mb(),
            "size": size}


def train_in_subprocess(impl: str, vocab_size: int, path: Path) -> dict:
    env = dict(os.environ)
    if impl.endswith("1thread"):
        env["RAYON_NUM_THREADS"] = "1"
        env["TOKENIZERS_PARALLELISM"] = "false"
    out = subprocess.run([sys.executable, __file__, "--train-once", impl.removesuffix("-1thread"),
                          str(vocab_size), "--data", str(path)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_training(path: Path, repeats: int) -> None:
    print(f"\n== BPE training on Tiny Shakespeare (1.1 MB): medians of {repeats} alternating "
          "runs, a fresh process each ==")
    print(f"{'vocab':>6} {'implementation':<30} {'median s':>9} {'min s':>7} {'CPU s':>6} "
          f"{'peak RSS MB':>12} {'RSS growth MB':>14}")
    for vocab_size in (1024, 4096):
        runs = {impl: [] for impl in IMPLEMENTATIONS}
        for _ in range(repeats):
            for impl in IMPLEMENTATIONS:  # alternate, so background load is shared fairly
                runs[impl].append(train_in_subprocess(impl, vocab_size, path))
        medians, cpu = {}, {}
        for impl, label in IMPLEMENTATIONS.items():
            seconds = [r["seconds"] for r in runs[impl]]
            medians[impl] = statistics.median(seconds)
            cpu[impl] = statistics.median(r["cpu"] for r in runs[impl])
            peak = max(r["rss_peak"] for r in runs[impl])
            growth = max(r["rss_peak"] - r["rss_before"] for r in runs[impl])
            print(f"{vocab_size:>6} {label:<30} {medians[impl]:>9.3f} {min(seconds):>7.3f} "
                  f"{cpu[impl]:>6.2f} {peak:>12.0f} {growth:>14.0f}")
        ours = medians["ours"]
        print(f"{'':>6} ours / HF file: {ours / medians['hf-file']:.2f}x, "
              f"ours / HF lines: {ours / medians['hf-lines']:.2f}x, "
              f"ours / HF file on 1 thread: {ours / medians['hf-file-1thread']:.2f}x "
              f"(CPU time: {cpu['ours'] / cpu['hf-file-1thread']:.2f}x)")


def vocabulary_overlap(path: Path, vocab_size: int) -> float:
    """Share of the tokens HF learned from the file that our trainer learned too (a sanity
    check: the two cut the text a little differently, HF line by line)."""
    import ch02_tokenizer as ch

    ours = set(ch.train_bpe(read_corpus(path), vocab_size).ranks)
    tok, trainer = hf_tokenizer_and_trainer(vocab_size)
    tok.train([str(path)], trainer=trainer)
    byte_of = {c: b for b, c in ch.bytes_to_unicode().items()}
    theirs = {bytes(byte_of[c] for c in token) for token in tok.get_vocab()}
    return len(ours & theirs) / len(theirs)


def best_seconds(run, repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` calls of ``run()``, and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def throughput(encode, text: str, repeats: int) -> tuple[float, list[int]]:
    """Best MB/s over ``repeats`` runs, and the ids."""
    best, ids = best_seconds(lambda: encode(text), repeats)
    return len(text.encode("utf-8")) / best / 1e6, ids


def bench_encoding(text: str, repeats: int) -> None:
    import ch02_tokenizer as ch

    print("\n== Encoding throughput on Tiny Shakespeare (best of runs, one thread) ==")
    gpt2 = ch.load_gpt2()
    trained = ch.train_bpe(text, 4096)
    official = ch.official_encoding("gpt2")
    rows = []
    for name, tok, reference in [("GPT-2 ranks", gpt2, official),
                                 ("our 4096 vocab", trained, None)]:
        cold_tok = ch.Tokenizer(tok.ranks, tok.pattern, tok.special_tokens)
        cold, ids = throughput(cold_tok.encode_ordinary, text, 1)  # empty cache, first pass
        warm, ids_warm = throughput(tok.encode_ordinary, text, repeats)
        ours_tt, ids_tt = throughput(tok.to_tiktoken().encode_ordinary, text, repeats)
        assert ids == ids_warm == ids_tt
        rows += [(name, "ours, pure Python, cold cache", cold),
                 (name, "ours, pure Python, warm cache", warm),
                 (name, "tiktoken.Encoding(our ranks)", ours_tt)]
        if reference is not None:
            ref, ids_ref = throughput(reference.encode_ordinary, text, repeats)
            assert ids_ref == ids
            rows.append((name, "tiktoken's own get_encoding", ref))
    for name, label, mbs in rows:
        print(f"{name:<16} {label:<32} {mbs:>8.2f} MB/s")
    print(f"(GPT-2 ids identical across all four; {len(ids)} tokens for "
          f"{len(text.encode('utf-8')):,} bytes with the 4096 vocabulary)")


def bench_long_pieces(repeats: int, simple: bool) -> None:
    import ch02_tokenizer as ch

    print("\n== Long pieces: 16,000 characters in a row, GPT-2's ranks (best of runs, "
          "empty cache) ==")
    gpt2 = ch.load_gpt2()
    official = ch.official_encoding("gpt2")
    print(f"{'text':<12} {'bytes':>7} {'ids':>6} {'ours s':>8} {'tiktoken s':>11} {'ratio':>6}"
          + (f" {'simple loop s':>14}" if simple else ""))
    for unit in ("a", "!", "😀"):
        text = unit * 16_000
        ours_s, ids = best_seconds(
            lambda: ch.Tokenizer(gpt2.ranks, gpt2.pattern).encode_ordinary(text), repeats)
        ref_s, ref_ids = best_seconds(lambda: official.encode_ordinary(text), repeats)
        assert ids == ref_ids
        row = (f"16,000 x {unit:<3} {len(text.encode()):>7,} {len(ids):>6,} {ours_s:>8.3f} "
               f"{ref_s:>11.4f} {ours_s / ref_s:>5.0f}x")
        if simple:  # one piece: the text is all one regex match
            simple_s, simple_ids = best_seconds(
                lambda: ch.bpe_encode_piece(text.encode(), gpt2.ranks), 1)
            assert simple_ids == ids
            row += f" {simple_s:>14.1f}"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["train", "encode", "long"], help="run one part only")
    parser.add_argument("--simple", action="store_true",
                        help="long pieces: time Exercise 3's simple loop too (minutes)")
    parser.add_argument("--train-once", nargs=2, metavar=("IMPL", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_once:
        print(json.dumps(train_once(args.train_once[0], int(args.train_once[1]), args.data)))
        return
    text = read_corpus(args.data) if args.only != "long" else None  # fail early if missing
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine adds noise)")
    if args.only in (None, "train"):
        bench_training(args.data, args.repeats)
        for vocab_size in (1024, 4096):
            print(f"vocab {vocab_size}: {vocabulary_overlap(args.data, vocab_size):.1%} of the "
                  "tokens HF learned from the file are also in ours")
    if args.only in (None, "encode"):
        bench_encoding(text, args.repeats)
    if args.only in (None, "long"):
        bench_long_pieces(args.repeats, args.simple)


if __name__ == "__main__":
    main()
