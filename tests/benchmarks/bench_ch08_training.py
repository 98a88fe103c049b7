"""Chapter 8 capstone benchmark: the book's trainer against nanoGPT's CPU recipe.

    python tests/benchmarks/bench_ch08_training.py nanogpt  [--data PATH] [--threads N]
    python tests/benchmarks/bench_ch08_training.py recipe   [--data PATH] [--minutes 10]
    python tests/benchmarks/bench_ch08_training.py breakdown

nanogpt:   nanoGPT's README CPU recipe for character-level Tiny Shakespeare, taken flag
           for flag (4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, no
           dropout, lr 1e-3 -> 1e-4, warmup 100, beta2 0.99, first 90% train), so it can be
           run beside `python train.py config/train_shakespeare_char.py --device=cpu
           --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
           --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
           --dropout=0.0` on the same machine. Prints ms/iteration, tokens/s and the
           validation loss at iteration 2000 beside nanoGPT's reference figures.
recipe:    the book's own CPU recipe: time to reach nanoGPT's final validation loss
           (1.886), beside nanoGPT's recipe timed on the same machine in the same run, and
           the best validation loss within --minutes.
breakdown: one training step split into data, forward, backward and optimizer, with the
           achieved GFLOP/s beside the machine's measured matrix-product throughput.

Evaluation time is excluded from the training times (it is reported separately): both
trainers spend it identically, and the recipe's evaluations exist only to find the moment
the target is crossed.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))
import ch08_training as t  # noqa: E402

NANOGPT = {"val_loss": 1.886, "ms_per_iter": 45.0, "tokens_per_s": 17_000, "wall_s": 100.0}
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"

NANOGPT_RECIPE = dict(
    n_layer=4, n_head=4, d_model=128, block_size=64, batch_size=12, dropout=0.0,
    max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000,
    beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_iters=20,
)
BOOK_RECIPE = dict(NANOGPT_RECIPE, **t.RECIPES["book"])  # chapter 8's capstone explains it


class Timed:
    """Runs the trainer, taking evaluation time out of the training time.

    Records, at each evaluation, (seconds of training so far, validation loss)."""

    def __init__(self):
        self.eval_seconds = 0.0
        self.points = []
        self._estimate = t.estimate_loss

    def __enter__(self):
        self.start = time.perf_counter()

        def timed_estimate(*args, **kwargs):
            begin = time.perf_counter()
            loss = self._estimate(*args, **kwargs)
            self.points.append((begin - self.start - self.eval_seconds, loss))
            self.eval_seconds += time.perf_counter() - begin
            return loss

        t.estimate_loss = timed_estimate
        return self

    def __exit__(self, *exc):
        t.estimate_loss = self._estimate


def run(settings, data, eval_interval):
    """Train once; returns (history, Timed). The clock includes tokenising the corpus and
    building the model (about a second), as nanoGPT's wall time does."""
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = t.make_config(data=str(data), out_dir=out_dir, device="cpu", precision="fp32",
                            eval_interval=eval_interval, sample_tokens=0, progress=False, **settings)
        with Timed() as timer:
            history = t.train(cfg, log=lambda s: None)
    return history, timer


def nanogpt(args):
    settings = dict(NANOGPT_RECIPE)
    history, timer = run(settings, args.data, eval_interval=settings["max_iters"])
    train_s = timer.points[-1][0]
    iters = settings["max_iters"]
    tokens = iters * settings["batch_size"] * settings["block_size"]
    val = history["val"][-1][1]
    print(f"{'':28s}{'book':>12s}{'nanoGPT':>12s}")
    print(f"{'ms per iteration':28s}{1e3 * train_s / iters:12.1f}{NANOGPT['ms_per_iter']:12.1f}")
    print(f"{'tokens per second':28s}{tokens / train_s:12,.0f}{NANOGPT['tokens_per_s']:12,d}")
    print(f"{'val loss at 2000 (20 batches)':28s}{val:12.3f}{NANOGPT['val_loss']:12.3f}")
    print(f"{'training time (s)':28s}{train_s:12.1f}{NANOGPT['wall_s']:12.1f}")


def recipe(args):
    """Time to nanoGPT's final validation loss, beside nanoGPT's recipe run by the same trainer
    on the same machine in the same run; then the best loss within --minutes."""
    reference = None
    if not args.skip_reference:
        _, timer = run(dict(NANOGPT_RECIPE), args.data, eval_interval=NANOGPT_RECIPE["max_iters"])
        reference = timer.points[-1][0]
        print(f"nanoGPT's recipe, this trainer, this machine: {reference:.1f} s for "
              f"{NANOGPT_RECIPE['max_iters']} iterations")
    settings = dict(BOOK_RECIPE, eval_iters=200)
    history, timer = run(settings, args.data, eval_interval=50)
    reached = next(((sec, it) for (sec, _), (it, val) in zip(timer.points, history["val"])
                    if val <= NANOGPT["val_loss"]), None)
    print("book recipe:", settings)
    for (sec, val), (it, _) in zip(timer.points, history["val"]):
        print(f"  iteration {it:5d}  {sec:6.1f} s of training  val loss {val:.4f}")
    if reached:
        print(f"reached val loss {NANOGPT['val_loss']} after {reached[0]:.1f} s (iteration {reached[1]}); "
              f"nanoGPT's recipe takes about {NANOGPT['wall_s']:.0f} s on the reference machine: "
              f"ratio {reached[0] / NANOGPT['wall_s']:.2f}")
        if reference:
            print(f"against nanoGPT's recipe on this machine ({reference:.1f} s): ratio {reached[0] / reference:.2f}")
    else:
        print(f"did not reach {NANOGPT['val_loss']}")
    if args.minutes:
        iters = _iterations_for(settings, args.minutes * 60, args.data)
        long = dict(settings, max_iters=iters, decay_iters=iters, warmup_iters=settings["warmup_iters"])
        history, timer = run(long, args.data, eval_interval=max(iters // 10, 1))
        best = min(val for _, val in history["val"])
        print(f"{args.minutes:g}-minute run ({iters} iterations, schedule stretched to fit): "
              f"best val loss {best:.4f} after {timer.points[-1][0]:.0f} s of training")


def _iterations_for(settings, seconds, data):
    """How many iterations of ``settings`` fit in ``seconds`` on this machine."""
    probe = dict(settings, max_iters=60, decay_iters=60, warmup_iters=10)
    history, timer = run(probe, data, eval_interval=60)
    return int(seconds / (timer.points[-1][0] / 60))


def step_phases(settings, steps=60, warmup=10):
    """Median seconds of each phase of one training step of ``settings``, and the model."""
    cfg = t.make_config(**settings)
    data = torch.randint(0, 65, (1_000_000,)).numpy().astype("uint16")
    torch.manual_seed(0)
    model = t.GPT(dataclasses.replace(cfg.model, vocab_size=65))
    opt = t.make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    phases = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = t.get_batch(data, cfg.model.block_size, cfg.batch_size, g)
        t1 = time.perf_counter()
        _, loss = model(x, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        t.clip_grad_norm(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step >= warmup:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(dt)
    return {k: sorted(v)[len(v) // 2] for k, v in phases.items()}, model, cfg


def breakdown(args):
    """One training step of nanoGPT's configuration and of the book's recipe, phase by phase."""
    (ref, model, cfg), (book, _, _) = step_phases(NANOGPT_RECIPE), step_phases(BOOK_RECIPE)
    tokens = cfg.batch_size * cfg.model.block_size
    fwd_flops = model.flops_per_token(cfg.model.block_size) * tokens
    print(f"nanoGPT's configuration, {model.num_parameters():,} parameters, {tokens} tokens per step")
    print(f"  {'phase':10s} {'nanoGPT recipe':>22s} {'book recipe':>22s}")
    for name in ref:
        print(f"  {name:10s} {1e3 * ref[name]:10.2f} ms {100 * ref[name] / sum(ref.values()):7.1f}%"
              f" {1e3 * book[name]:10.2f} ms {100 * book[name] / sum(book.values()):7.1f}%")
    print(f"  {'total':10s} {1e3 * sum(ref.values()):10.2f} ms {'':8s} {1e3 * sum(book.values()):10.2f} ms")
    achieved = 3 * fwd_flops / (ref["forward"] + ref["backward"]) / 1e9  # backward ~ 2x forward
    print(f"forward {fwd_flops / 1e9:.2f} GFLOP per step; forward+backward run at {achieved:.1f} GFLOP/s")
    for n in (128, 256, 512, 1024):
        print(f"  machine: {n}x{n} fp32 matrix product {t.matmul_gflops(torch.float32, n=n):.1f} GFLOP/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("what", choices=["nanogpt", "recipe", "breakdown"])
    parser.add_argument("--data", default=str(SHARED) if SHARED.exists() else "shakespeare")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=10.0, help="recipe: length of the long run (0: none)")
    parser.add_argument("--skip-reference", action="store_true", help="recipe: don't run nanoGPT's recipe first")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {args.data}")
    {"nanogpt": nanogpt, "recipe": recipe, "breakdown": breakdown}[args.what](args)


if __name__ == "__main__":
    sys.exit(t.run_command(main))
