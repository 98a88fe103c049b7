"""Chapter 13 benchmark: a step of LoRA against a step of full fine-tuning of SmolLM2-135M.

    python tests/benchmarks/bench_ch13_finetuning.py [--steps 3] [--batch-size 8] [--repeats 2]

Each measurement runs in a fresh process (so that memory figures do not mix): it loads
SmolLM2, then trains on the arithmetic task with Chapter 8's train for --steps iterations
(padded batches, response-only loss) and reports the seconds per step (the first step,
which allocates, excluded) and the memory that training adds: the peak resident memory
sampled during training minus the resident memory just before it. The two methods
alternate, --repeats times each, since a shared machine's load changes from minute to
minute: compare the ratios of neighbouring runs.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CODE = Path(__file__).resolve().parents[2] / "code"


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def measure(method, steps, batch_size):
    """One run in this process: {"method", "seconds_per_step", "training_mb", ...}."""
    sys.path.insert(0, str(CODE))
    import torch

    import ch13_finetuning as ch
    from ch08_training import make_config, next_token_loss, train

    model, tokenizer = ch.load_smollm2()
    if method == "lora":
        ch.add_lora(model, r=8, alpha=16)
    data = ch.SFTBatches({"train": ch.tokenize_examples(tokenizer, ch.arithmetic_examples(256, "train", 0))})
    ticks = []
    cfg = make_config("tiny", lr=1e-4, max_iters=steps, warmup_iters=1, decay_iters=steps, batch_size=batch_size,
                      eval_interval=steps, eval_iters=0, out_dir=None, device="cpu", precision="fp32",
                      fused_adamw=True)

    def loss_fn(m, batch):  # times each step from the start of its forward pass
        ticks.append(time.perf_counter())
        return next_token_loss(m, batch)

    before, peak, done = resident_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    train(cfg, model, data, loss_fn=loss_fn, log=lambda s: None)
    end = time.perf_counter()
    done.set()
    sampler.join()
    ticks.append(end)
    trainable, total = ch.count_parameters(model)
    return {"method": method, "seconds_per_step": (ticks[-1] - ticks[1]) / (steps - 1), "first_step": ticks[1] - ticks[0],
            "training_mb": peak[0] - before, "resident_before_mb": before, "trainable_params": trainable,
            "total_params": total, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", choices=("lora", "full"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.batch_size)))
        return
    results = []
    for _ in range(args.repeats):
        for method in ("lora", "full"):
            out = subprocess.run([sys.executable, __file__, "--one", method, "--steps", str(args.steps),
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{method:5} {r['seconds_per_step']:6.2f} s/step, training adds {r['training_mb']:7.0f} MB "
                  f"(resident before {r['resident_before_mb']:.0f} MB), {r['trainable_params']:,} trained, "
                  f"load average {r['load_average']:.1f}", flush=True)
    for lora, full in zip(results[::2], results[1::2]):
        print(f"LoRA / full: time per step {lora['seconds_per_step'] / full['seconds_per_step']:.2f}, "
              f"memory added by training {lora['training_mb'] / full['training_mb']:.2f}")


if __name__ == "__main__":
    main()
