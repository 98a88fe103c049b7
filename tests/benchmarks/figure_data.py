"""Write the stored runs that the book's figures are drawn from (docs/data/<name>.json).

    .venv/bin/python tests/benchmarks/figure_data.py ch10_evaluation.capstone [...] [--out-dir DIR]
    .venv/bin/python tests/benchmarks/figure_data.py --list

A figure that needs a trained model never trains while the book is built: its plot_*
function draws from a JSON file in docs/data/. The name ``<module>.<x>`` is made by calling
``<x>_history()`` of code/<module>.py, which trains and measures and returns a small dict
(losses per iteration, accuracies, attention weights); this script adds how it was made
(command, seconds, torch version, threads) under "recorded" and writes the file atomically.
The tests of each chapter re-run the first iterations of each stored run and compare.
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))

import torch  # noqa: E402

from ch02_tokenizer import write_atomically  # noqa: E402
from ch03_embeddings import DATA_DIR, RECORD_COMMAND  # noqa: E402
from ch08_training import run_command  # noqa: E402

STORED_RUNS = {  # name: what a run of it costs on a 2-core laptop CPU
    "ch08_training.training_run": "about 10 s",
    "ch03_embeddings.position_experiment": "about 30 s",
    "ch07_transformer.cross_attention": "about 15 s",
    "ch10_evaluation.context_and_stride": "about 30 s",
    "ch10_evaluation.learning_curves": "about 40 s",
    "ch10_evaluation.capstone": "about 3 minutes",
    "ch10_evaluation.sampling_diagnostics": "about 40 s",
}


def history_function(name):
    """The <x>_history function of code/<module>.py that makes the stored run <module>.<x>."""
    if name not in STORED_RUNS:
        raise ValueError(f"unknown stored run {name!r}; choose from {sorted(STORED_RUNS)}")
    module, x = name.split(".")
    return getattr(importlib.import_module(module), f"{x}_history")


def record(name, out_dir=DATA_DIR):
    """Run <name>'s history function and write its result to out_dir/<name>.json."""
    tick = time.perf_counter()
    run = history_function(name)()
    run["recorded"] = {"command": RECORD_COMMAND.format(name=name),
                       "seconds": round(time.perf_counter() - tick, 1),
                       "torch": torch.__version__, "threads": torch.get_num_threads()}
    path = Path(out_dir) / f"{name}.json"
    write_atomically(path, (json.dumps(run, indent=1) + "\n").encode())
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the stored runs the book's figures are drawn from.")
    parser.add_argument("names", nargs="*",
                        help="stored runs to write, such as ch10_evaluation.capstone")
    parser.add_argument("--out-dir", default=DATA_DIR,
                        help="where to write <name>.json (default docs/data)")
    parser.add_argument("--list", action="store_true",
                        help="list the stored runs and what each costs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for name, cost in STORED_RUNS.items():
            print(f"{name:40s} {cost}")
        return
    for name in args.names:
        history_function(name)  # an unknown name fails before anything runs
    for name in args.names:
        print(f"wrote {record(name, args.out_dir)}", flush=True)


if __name__ == "__main__":
    sys.exit(run_command(main))
