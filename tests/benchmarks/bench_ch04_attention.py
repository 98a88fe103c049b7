"""Benchmark of Chapter 4: our attention beside PyTorch's, from one run.

Run by hand from the repository root (not collected by pytest):

    python tests/benchmarks/bench_ch04_attention.py [--threads N] [--repeats 5]

1. Causal scaled dot-product attention, forward, 4 heads of 64 dims, batch 1, T = 256 ... 4096:
   ours (full T x T matrix), ours blockwise (online softmax, blocks of 128) and
   torch.nn.functional.scaled_dot_product_attention; with the exponent of T fitted on the
   largest lengths (2 = quadratic) and the bytes of the largest score tensor each of ours keeps.
2. A multi-head attention layer (d_model 512, 8 heads, T = 512, batch 8), forward + backward:
   our MultiHeadAttention (explicit and use_fused=True) beside torch.nn.MultiheadAttention with
   the same weights, after checking that they agree.

Timings are the fastest of --repeats runs, the implementations alternating, so background
load hits them alike. Run it on an otherwise idle machine; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))
from ch04_attention import (  # noqa: E402
    MultiHeadAttention,
    blockwise_attention,
    scaled_dot_product_attention,
)


def fastest(fns, repeats):
    """Run each of fns (a dict) `repeats` times, alternating; return the fastest time of each."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def slope(lengths, times):
    """Least-squares exponent p in time ~ T^p over the given points (log-log)."""
    xs, ys = [math.log(t) for t in lengths], [math.log(s) for s in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@torch.no_grad()
def bench_sdpa(repeats):
    print("1. causal attention, forward, B=1, H=4, D=64 (ms)")
    print(f"{'T':>6} {'ours':>9} {'blockwise':>10} {'torch':>9} {'ours/torch':>11} {'weights MiB':>12} {'block MiB':>10}")
    lengths, times = [256, 512, 1024, 2048, 4096], {"ours": [], "blockwise": [], "torch": []}
    for T in lengths:
        q, k, v = (torch.randn(1, 4, T, 64) for _ in range(3))
        torch.testing.assert_close(blockwise_attention(q, k, v, 128, True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-4, atol=1e-5)
        best = fastest({
            "ours": lambda: scaled_dot_product_attention(q, k, v, is_causal=True),
            "blockwise": lambda: blockwise_attention(q, k, v, 128, is_causal=True),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }, repeats)
        for name in times:
            times[name].append(best[name])
        print(f"{T:6d} {best['ours'] * 1e3:9.2f} {best['blockwise'] * 1e3:10.2f} {best['torch'] * 1e3:9.2f} "
              f"{best['ours'] / best['torch']:11.1f} {4 * T * T * 4 / 2**20:12.1f} {4 * T * 128 * 4 / 2**20:10.2f}")
    fit = {name: slope(lengths[-3:], t[-3:]) for name, t in times.items()}
    print("fitted exponent of T over T = 1024..4096:", ", ".join(f"{n} {p:.2f}" for n, p in fit.items()))


def bench_mha(repeats):
    print("\n2. multi-head attention layer, d_model=512, 8 heads, B=8, T=512, causal, forward + backward (ms)")
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(512, 8, batch_first=True)
    ours = MultiHeadAttention(512, 8)
    ours.load_fused_qkv(ref.in_proj_weight, ref.in_proj_bias)
    ours.out_proj.load_state_dict(ref.out_proj.state_dict())
    fused = MultiHeadAttention(512, 8, use_fused=True)
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(8, 512, 512)
    forbidden = torch.ones(512, 512, dtype=torch.bool).triu(1)
    with torch.no_grad():
        expected = ref(x, x, x, attn_mask=forbidden, need_weights=False)[0]
        torch.testing.assert_close(ours(x, causal=True), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused(x, causal=True), expected, rtol=1e-4, atol=1e-5)

    def step(module, call):
        module.zero_grad(set_to_none=True)
        call().sum().backward()

    best = fastest({
        "ours (explicit)": lambda: step(ours, lambda: ours(x, causal=True)),
        "ours (use_fused=True)": lambda: step(fused, lambda: fused(x, causal=True)),
        "torch.nn.MultiheadAttention": lambda: step(
            ref, lambda: ref(x, x, x, attn_mask=forbidden, need_weights=False, is_causal=True)[0]),
    }, repeats)
    for name, t in best.items():
        print(f"{name:30s} {t * 1e3:9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    bench_sdpa(args.repeats)
    bench_mha(args.repeats)


if __name__ == "__main__":
    main()
