"""Benchmark of Chapter 12 (run by hand, never by pytest): SmolLM2-135M-Instruct with the
book's code beside transformers' LlamaForCausalLM loaded from the same GGUF file.

    python tests/benchmarks/bench_ch12_pretrained.py              # everything, a few minutes
    python tests/benchmarks/bench_ch12_pretrained.py --rounds 1 --skip-capstone

Measures, in one run:
- load time from the GGUF file to a ready model: the book's loader, transformers';
- greedy generation with a KV cache, 128 new tokens after a 16-token prompt, batch 1 and 8:
  transformers' generate (fp32) and Chapter 9's generator on the book's fp32, int8 and int4
  weights (Chapter 12's quantize_model), tokens/s and the ratio to transformers;
- each in its own process, so that its memory is its own: the peak resident set (loading
  included: the quantized variants are made from the fp32 model) and the resident set of
  the ready model after generating;
- this machine's memory bandwidth (a 256 MB copy), the bytes of weights each variant reads
  per generated token at batch 1, the GB/s that makes and its fraction of the bandwidth;
- the perplexity of each variant on held-out text (Chapter 10's evaluate_text), and the same
  for Chapter 8's capstone model (the "book" recipe, trained here for a few minutes).
Variants alternate over --rounds rounds and the best time of each is kept: the machine may
be shared, and its other load only ever slows a run down.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "code"))

VARIANTS = ("transformers", "fp32", "int8", "int4")


def worker(variant, n_new, batches, threads):
    """Load one variant, time its generation, print one JSON line (run in a fresh process)."""
    import torch

    torch.set_num_threads(threads)
    import ch12_pretrained as ch12

    path = ch12.smollm2_path()
    start = time.perf_counter()
    if variant == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    else:
        model, _ = ch12.load_gguf_model(path)
        if variant != "fp32":
            ch12.quantize_model(model, bits=int(variant[3:]))
    load_s = time.perf_counter() - start
    result = {"variant": variant, "load_s": load_s, "tokens_per_s": {}}

    def generate(idx, n):
        with torch.inference_mode():
            if variant == "transformers":
                model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)
            else:
                for _ in ch12.generate_stream(model, idx, n, temperature=0):
                    pass

    for batch in batches:
        idx = torch.randint(0, 49152, (batch, 16), generator=torch.Generator().manual_seed(0))
        generate(idx, 4)  # warm up (fbgemm packs its weights at the first call)
        start = time.perf_counter()
        generate(idx, n_new)
        result["tokens_per_s"][str(batch)] = batch * n_new / (time.perf_counter() - start)
    if variant != "transformers":
        result["bytes_per_token"] = ch12.bytes_read_per_token(model)
        result["weight_bytes"] = ch12.weight_bytes(model)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading included
    result["rss_mb"] = resident_mb()  # what the ready model holds, after generating
    print(json.dumps(result))


def resident_mb():
    """The process's resident memory now, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(variant, args):
    batches = args.batches if variant != "int4" else [b for b in args.batches if b == 1]  # int4 is slow
    command = [sys.executable, __file__, "--worker", variant, "--new", str(args.new), "--threads", str(args.threads),
               "--batches", *map(str, batches)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def perplexities(n_chars, block_size):
    """SmolLM2's perplexity on held-out text with fp32, int8 and int4 weights."""
    import ch12_pretrained as ch12

    path = ch12.smollm2_path()
    tokenizer = ch12.GGUFTokenizer.from_gguf(ch12.GGUFFile(path))
    return ch12.compare_variants(lambda: ch12.load_gguf_model(path)[0], tokenizer, ch12.held_out_text(n_chars),
                                 block_size // 2, block_size, ch12.question_tasks())


def capstone(n_new):
    """Chapter 8's capstone model ("book" recipe on the Python docs): perplexity per character
    on held-out text, memory and generation speed, fp32 against int8 and int4."""
    import copy
    import dataclasses

    import torch

    import ch12_pretrained as ch12
    from ch02_tokenizer import python_docs_text
    from ch06_gpt import GPT
    from ch08_training import CharTokenizer, make_config, train

    start = time.perf_counter()
    cfg = make_config("book", out_dir=None, device="cpu", progress=False, sample_tokens=0, eval_iters=0)
    tokenizer = CharTokenizer.from_text(python_docs_text())
    torch.manual_seed(cfg.seed)
    model = GPT(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    train(cfg, model, log=lambda s: None)
    model.eval()
    print(f"capstone trained in {time.perf_counter() - start:.0f} s", flush=True)
    text = ch12.held_out_text(20_000)
    rows = ch12.compare_variants(lambda: copy.deepcopy(model), tokenizer, text, 32, model.config.block_size)
    for row, (kind, variant) in zip(rows, ch12.quantized_variants(lambda: copy.deepcopy(model))):
        row["tokens_per_s"] = ch12.generation_speed(variant, 1, n_new)["tokens_per_s"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--new", type=int, default=128, help="new tokens per generation")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chars", type=int, default=20_000, help="held-out characters for perplexity")
    parser.add_argument("--skip-capstone", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.new, args.batches, args.threads)

    import torch

    torch.set_num_threads(args.threads)
    import ch12_pretrained as ch12

    ch12.smollm2_path()  # download before timing anything
    bandwidth = ch12.memory_bandwidth()
    print(f"memory bandwidth (256 MB copy, read + write): {bandwidth:.1f} GB/s; {args.threads} threads")
    best = {}
    for r in range(args.rounds):
        for variant in VARIANTS:
            result = run_worker(variant, args)
            old = best.get(variant)
            if old is None:
                best[variant] = result
            else:
                old["load_s"] = min(old["load_s"], result["load_s"])
                old["peak_rss_mb"] = min(old["peak_rss_mb"], result["peak_rss_mb"])
                old["rss_mb"] = min(old["rss_mb"], result["rss_mb"])
                for b, v in result["tokens_per_s"].items():
                    old["tokens_per_s"][b] = max(old["tokens_per_s"][b], v)
            print(f"  round {r + 1}: {variant} done", flush=True)
    reference = best["transformers"]
    print(f"\nload: book {best['fp32']['load_s']:.1f} s, transformers {reference['load_s']:.1f} s "
          f"({reference['load_s'] / best['fp32']['load_s']:.1f}x faster)")
    hf_bytes = best["fp32"]["bytes_per_token"]  # the same fp32 weights
    header = f"{'variant':14}{'peak MB':>9}{'RSS MB':>8}" + "".join(f"{f'tok/s b={b}':>12}{'ratio':>7}" for b in args.batches)
    print("\n" + header + f"{'MB/token':>10}{'GB/s':>7}{'of bw':>7}")
    for variant in VARIANTS:
        row = best[variant]
        line = f"{variant:14}{row['peak_rss_mb']:9.0f}{row['rss_mb']:8.0f}"
        for b in args.batches:
            if str(b) not in row["tokens_per_s"]:
                line += f"{'-':>12}{'-':>7}"
                continue
            speed, ref = row["tokens_per_s"][str(b)], reference["tokens_per_s"][str(b)]
            line += f"{speed:12.1f}{speed / ref:7.2f}"
        per_token = row.get("bytes_per_token", hf_bytes)
        achieved = per_token * row["tokens_per_s"]["1"] / 1e9
        line += f"{per_token / 1e6:10.0f}{achieved:7.1f}{achieved / bandwidth:7.0%}"
        print(line)
    print(f"\nperplexity of SmolLM2 on {args.chars:,} characters of held-out Python documentation, and accuracy "
          "on the 40 questions:")
    for row in perplexities(args.chars, 512):
        print(f"  {row['kind']:5} {row['MB']:6.0f} MB  perplexity {row['perplexity']:.3f}  "
              f"bits/byte {row['bits_per_byte']:.4f}  questions {row['accuracy']:.1%}")
    if not args.skip_capstone:
        print("\nChapter 8's capstone model (characters):")
        for row in capstone(args.new):
            print(f"  {row['kind']:5} {row['MB']:6.2f} MB  perplexity {row['perplexity']:.4f}  "
                  f"bits/byte {row['bits_per_byte']:.4f}  {row['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
