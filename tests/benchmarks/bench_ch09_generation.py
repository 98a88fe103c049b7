"""Chapter 9 benchmark: generation speed with and without the KV cache, beside Hugging Face.

    python tests/benchmarks/bench_ch09_generation.py                 # everything (a few minutes)
    python tests/benchmarks/bench_ch09_generation.py --sizes small --lengths 64,256
    python tests/benchmarks/bench_ch09_generation.py --threads 1

For each model size, the book's GPT (Chapter 6) with random weights and Hugging Face's
GPT2LMHeadModel holding the SAME weights (converted with to_hf_gpt2) generate --new-tokens
tokens greedily after the same 16-token prompt, batch 1, with and without their caches
(Hugging Face with min_new_tokens, so it never stops early). Ours runs twice with its cache:
with the chapter's lean decode_step, and through GPT.forward (lean_step=False). The runs
alternate, and the best of --repeats is reported, so that load from other programs hurts all
sides alike; the runs without a cache (a full forward pass per token) are repeated
--uncached-repeats times, for --uncached-sizes only. Both continuations are checked to be
identical first. Then the cache's speed-up as the output grows (--lengths) on the small
model with a 2048-token context.

Sizes: small = the trainer's 4 layers, 4 heads, 128 dims (vocabulary 65, as character-level
Shakespeare); medium = 6 layers, 6 heads, 384 dims (vocabulary 65); gpt2 = GPT-2 small's
shapes, 12 layers, 12 heads, 768 dims, vocabulary 50257. GPT-2-style blocks (biases, tanh
GELU, learned positions), so that the weights load into Hugging Face's model.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))
from ch06_gpt import GPT, GPTConfig, to_hf_gpt2  # noqa: E402
from ch09_generation import generate  # noqa: E402

SIZES = {"small": dict(n_layer=4, n_head=4, d_model=128, vocab_size=65),
         "medium": dict(n_layer=6, n_head=6, d_model=384, vocab_size=65),
         "gpt2": dict(n_layer=12, n_head=12, d_model=768, vocab_size=50257)}
REFERENCE = "Hugging Face, 4 layers x 128 dims, 256 new tokens, on the reference machine: ~490 tokens/s with its cache, ~210 without"


def models(size, block_size):
    """Our GPT with random weights, and Hugging Face's GPT-2 with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=block_size, mlp="gelu_tanh", **SIZES[size])).eval()
    c = ours.config
    hf = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.d_model, vocab_size=c.vocab_size,
                                    n_positions=block_size, bos_token_id=None, eos_token_id=None)).eval()
    hf.load_state_dict(to_hf_gpt2(ours))
    return ours, hf


def runners(ours, hf, prompt, n_new):
    def hf_generate(use_cache):
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False, use_cache=use_cache, pad_token_id=0)

    return {"ours, cache": lambda: generate(ours, prompt, n_new, temperature=0),
            "ours, GPT.forward": lambda: generate(ours, prompt, n_new, temperature=0, lean_step=False),
            "HF, cache": lambda: hf_generate(True),
            "ours, no cache": lambda: generate(ours, prompt, n_new, temperature=0, use_cache=False),
            "HF, no cache": lambda: hf_generate(False)}


def best_tokens_per_second(runs, n_new, repeats, clock=time.perf_counter):
    """Alternate the runs, `repeats` rounds; the best tokens/s of each. clock=time.process_time
    counts the CPU time of this process only: on a shared machine, less disturbed by others."""
    best = {name: 0.0 for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            run()
            best[name] = max(best[name], n_new / (clock() - start))
    return best


@torch.inference_mode()
def compare_with_hf(sizes, n_new, repeats, uncached_sizes, uncached_repeats):
    print(f"\n## Greedy generation, batch 1, 16-token prompt, {n_new} new tokens, tokens/s "
          f"(best of {repeats} with the caches, of {uncached_repeats} without)")
    print(f"reference: {REFERENCE}\n")
    print("| model | ours, cache | ours, cache via GPT.forward | HF, cache | ours / HF | ours, no cache | HF, no cache |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        ours, hf = models(size, block_size=max(1024, 16 + n_new))
        prompt = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
        runs = runners(ours, hf, prompt, n_new)
        if not torch.equal(runs["ours, cache"](), runs["HF, cache"]()):
            print(f"warning: {size}: our tokens differ from Hugging Face's")
        cached = {name: runs[name] for name in ("ours, cache", "ours, GPT.forward", "HF, cache")}
        s = best_tokens_per_second(cached, n_new, repeats)
        if size in uncached_sizes:  # a full forward pass per token: slow for the larger models
            s.update(best_tokens_per_second({k: runs[k] for k in ("ours, no cache", "HF, no cache")}, n_new,
                                            uncached_repeats))
        no_cache = "| ".join(f"{s[k]:.0f} " if k in s else "- " for k in ("ours, no cache", "HF, no cache"))
        print(f"| {size} | {s['ours, cache']:.0f} | {s['ours, GPT.forward']:.0f} | {s['HF, cache']:.0f} "
              f"| {s['ours, cache'] / s['HF, cache']:.2f}x | {no_cache}|", flush=True)


@torch.inference_mode()
def speedup_by_length(lengths, repeats):
    print("\n## The cache's speed-up as the output grows (small model, block_size 2048, best of "
          f"{repeats}; one run for outputs over 512 tokens)\n")
    print("| new tokens | ours, cache | ours, no cache | speed-up | HF, cache | HF, no cache | HF speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ours, hf = models("small", block_size=2048)
    prompt = torch.randint(0, 65, (1, 16), generator=torch.Generator().manual_seed(1))
    for n_new in lengths:
        runs = runners(ours, hf, prompt, n_new)
        del runs["ours, GPT.forward"]
        s = best_tokens_per_second(runs, n_new, repeats if n_new <= 512 else 1)
        print(f"| {n_new} | {s['ours, cache']:.0f} | {s['ours, no cache']:.0f} | "
              f"{s['ours, cache'] / s['ours, no cache']:.1f}x | {s['HF, cache']:.0f} | {s['HF, no cache']:.0f} | "
              f"{s['HF, cache'] / s['HF, no cache']:.1f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="small,medium,gpt2")
    parser.add_argument("--uncached-sizes", default="small,medium", help="sizes also run without the caches")
    parser.add_argument("--uncached-repeats", type=int, default=1)
    parser.add_argument("--lengths", default="64,256,1024", help="comma-separated; empty to skip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torch.set_num_threads({args.threads}) for both sides")
    compare_with_hf(args.sizes.split(","), args.new_tokens, args.repeats, args.uncached_sizes.split(","),
                    args.uncached_repeats)
    if args.lengths:
        speedup_by_length([int(n) for n in args.lengths.split(",")], args.repeats)


if __name__ == "__main__":
    main()
