"""Chapter 11: data parallelism on torch.distributed, checked against one process.

Two kinds of tests: in this process (sharding, formulas, the trainer in one process or in
a process group of one), and in real process groups of two CPU processes (gloo): one set
of worker processes started with torch.multiprocessing (DDP against one process on the
global batch, accumulation with no_sync, averaging by hand, memory by ZeRO stage), and
the command line under torchrun, whose checkpoint one process then resumes.

Run against your own module with: pytest tests/test_ch11_distributed.py --impl my_ch11.py
"""

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import ch08_training
from book_pages import load_module
import helpers
from ch06_gpt import GPT, GPTConfig, gpt_num_parameters
from ch08_training import AdamW, TokenBatches, get_batch, param_groups
from helpers import tiny_train_settings

CODE_DIR = Path(__file__).resolve().parent.parent / "code"
WORKER_TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch11_distributed")


tiny_gpt = partial(helpers.tiny_gpt, bias=False)


def tokens(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n,), generator=g).numpy().astype(np.uint16)


def tiny_train_config(out_dir, **overrides):
    overrides = {"eval_interval": 3, "dropout": 0.0, **overrides}
    return ch08_training.make_config("tiny", **tiny_train_settings(out_dir, **overrides))


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def global_batch_grads(model, batches):
    """The reference: one process, the mean loss over all rows of all the given batches."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (model(x, y)[1] / len(batches)).backward()
    return grads_of(model)


# ---------------------------------------------------------------------------
# The process group's variables, and the batch
# ---------------------------------------------------------------------------

TORCHRUN_VARS = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


def test_distributed_env_reads_torchrun_variables(ch):
    assert ch.distributed_env({}) is None  # plain python
    assert ch.distributed_env({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1"}) is None
    env = ch.distributed_env(TORCHRUN_VARS)
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)


def test_missing_rendezvous_variables_are_a_clear_error(ch):
    with pytest.raises(ValueError, match=r"missing: LOCAL_RANK, MASTER_ADDR, MASTER_PORT.*torchrun"):
        ch.distributed_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="missing: MASTER_PORT"):
        ch.distributed_env({k: v for k, v in TORCHRUN_VARS.items() if k != "MASTER_PORT"})
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        ch.distributed_env({**TORCHRUN_VARS, "RANK": "2"})
    with pytest.raises(ValueError, match="integers"):
        ch.distributed_env({**TORCHRUN_VARS, "WORLD_SIZE": "two"})


def test_global_batch_must_divide_among_the_processes(ch, tmp_path, monkeypatch):
    assert ch.per_rank_batch(12, 4) == 3
    with pytest.raises(ValueError, match="multiple of 3"):
        ch.per_rank_batch(4, 3)
    # train() refuses before it joins a process group (which would wait for the others)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(ch.free_port()))
    with pytest.raises(ValueError, match="does not split evenly among 3 processes"):
        ch.train(tiny_train_config(tmp_path, batch_size=4))
    assert not dist.is_initialized()
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ValueError, match="missing: LOCAL_RANK"):
        ch.train(tiny_train_config(tmp_path, batch_size=6))


def test_backend_and_device_per_process(ch):
    assert ch.backend_for("cpu") == "gloo" and ch.backend_for(torch.device("cuda", 3)) == "nccl"
    assert ch.process_device("cpu", 1) == torch.device("cpu")


@pytest.mark.exercise(1)
def test_exercise_1_shards_are_the_rows_of_the_global_batch(ch):
    x, y = get_batch(tokens(), 16, 12, torch.Generator().manual_seed(7))
    for batch in [(x, y), (x, y, x % 2 == 0)]:  # a loss mask shards like the rest
        for world_size in (1, 2, 3, 4, 6):
            shards = [ch.shard_batch(batch, rank, world_size) for rank in range(world_size)]
            for shard in shards:
                assert len(shard) == len(batch)
                assert all(t.shape == (12 // world_size, 16) for t in shard)
            for i, whole in enumerate(batch):
                assert torch.equal(torch.cat([shard[i] for shard in shards]), whole)


@pytest.mark.exercise(1)
def test_exercise_1_indivisible_batch_is_an_error(ch):
    batch = get_batch(tokens(), 16, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        ch.shard_batch(batch, 0, 4)


# ---------------------------------------------------------------------------
# Data parallelism and the all-reduce, in one process
# ---------------------------------------------------------------------------


def test_averaged_shard_gradients_equal_the_global_batch_gradient(ch):
    model = tiny_gpt().double()
    x, y = get_batch(tokens(), 16, 8, torch.Generator().manual_seed(0))
    reference = global_batch_grads(model, [(x, y)])
    for world_size in (2, 4, 8):
        for ours, ref in zip(ch.simulated_data_parallel_grads(model, x, y, world_size), reference):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-13)


def test_ring_all_reduce_sums_and_sends_2_n_minus_1_over_n_of_the_data(ch):
    g = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        for shape in [(3, 20), (7,), (1,)]:  # 60 elements split evenly for n <= 6, 7 and 1 do not
            tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
            results, sent = ch.simulate_ring_all_reduce(tensors)
            for result in results:
                torch.testing.assert_close(result, torch.stack(tensors).sum(0), rtol=1e-12, atol=1e-12)
            if shape == (3, 20):
                assert sent == [2 * (n - 1) * tensors[0].nbytes // n] * n
    assert ch.ring_all_reduce_seconds(1e9, 1, 1e9) == 0.0
    assert ch.ring_all_reduce_seconds(1e9, 4, 1e9) == pytest.approx(1.5)  # 2 * 3/4 of 1 s
    assert ch.ring_all_reduce_seconds(1e9, 1000, 1e9, latency=1e-3) == pytest.approx(2 * 0.999 + 2 * 999e-3)
    assert ch.naive_all_reduce_seconds(1e9, 4, 1e9) == pytest.approx(6.0)


# ---------------------------------------------------------------------------
# The trainer in one process
# ---------------------------------------------------------------------------


def test_plain_python_is_chapter_8s_trainer(ch, tmp_path):
    ours = ch.train(tiny_train_config(tmp_path / "a", max_iters=6), log=lambda s: None)
    ref = ch08_training.train(tiny_train_config(tmp_path / "b", max_iters=6), log=lambda s: None)
    assert ours == ref


def test_data_parallel_runtime_in_a_group_of_one_is_exact(ch, tmp_path):
    # The whole distributed path (DDP, sharded batches, all-reduced losses, barriers) with one
    # process: nothing to average, so the run must equal Chapter 8's bit for bit.
    ref = ch08_training.train(tiny_train_config(tmp_path / "ref", max_iters=6), log=lambda s: None)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ours = ch08_training.train(tiny_train_config(tmp_path / "ddp", max_iters=6), log=lambda s: None,
                                   runtime=ch.DataParallel(0, 1, "cpu"))
    finally:
        dist.destroy_process_group()
    assert ours == ref


def test_only_the_main_process_logs_and_writes(ch, tmp_path):
    class NotMain(ch08_training.SingleProcess):
        is_main = False

    cfg = tiny_train_config(tmp_path, max_iters=3)
    ch08_training.prepare_data(cfg)  # what the main process would have written first
    before = sorted(p.name for p in tmp_path.iterdir())
    messages = []
    history = ch08_training.train(cfg, log=messages.append, runtime=NotMain())
    assert messages == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(history["train"]) == 3 and len(history["val"]) == 1  # it still trains and evaluates


# ---------------------------------------------------------------------------
# Memory and compute
# ---------------------------------------------------------------------------


def test_state_bytes_after_an_adamw_step_is_16_bytes_per_parameter(ch):
    model = tiny_gpt()
    optimizer = AdamW(param_groups(model, 0.1))
    model(*get_batch(tokens(), 16, 4, torch.Generator().manual_seed(0)))[1].backward()
    optimizer.step()
    measured = ch.state_bytes(model, optimizer)
    n = gpt_num_parameters(model.config)
    assert measured["weights"] == measured["gradients"] == 4 * n
    step_counters = 4 * len(optimizer.state)  # one float32 step count per tensor
    assert measured["optimizer"] == 8 * n + step_counters


@pytest.mark.exercise(3)
def test_exercise_3_bytes_per_parameter_in_one_process_matches_measured(ch):
    model = tiny_gpt()
    optimizer = AdamW(param_groups(model, 0.1))
    model(*get_batch(tokens(), 16, 4, torch.Generator().manual_seed(0)))[1].backward()
    optimizer.step()
    total = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    total += sum(v.nbytes for s in optimizer.state.values() for v in s.values())
    n = sum(p.numel() for p in model.parameters())
    for stage in range(4):  # with one process, sharding saves nothing
        assert ch.bytes_per_parameter(stage, 1) == pytest.approx(total / n, rel=1e-3)
    # mixed precision as in the ZeRO paper: 2 + 2 bytes, then 12 of fp32 master weights and Adam
    assert ch.bytes_per_parameter(0, 64, weights=2, grads=2, optimizer=12) == 16
    assert ch.bytes_per_parameter(1, 64, weights=2, grads=2, optimizer=12) == pytest.approx(4 + 12 / 64)
    assert ch.bytes_per_parameter(2, 64, weights=2, grads=2, optimizer=12) == pytest.approx(2 + 14 / 64)
    with pytest.raises(ValueError):
        ch.bytes_per_parameter(4, 8)


def test_training_flops_are_three_forward_passes(ch):
    # PyTorch's FLOP counter over a real forward and backward pass (Chapter 4's attention,
    # whose matrix products the counter sees, instead of the fused kernel).
    from torch.utils.flop_counter import FlopCounterMode

    for overrides in [{}, dict(mlp="swiglu", n_kv_head=1, positions="rope", tie_weights=False)]:
        model = tiny_gpt(use_fused=False, **overrides)
        x, y = get_batch(tokens(), 16, 3, torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            model(x, y)[1].backward()
        assert counter.get_total_flops() == 3 * 16 * ch.training_flops_per_token(model.config)


def test_time_and_utilisation_formulas(ch):
    # 1e12 tokens at 1e9 FLOPs each on 10 GPUs of 1e15 FLOP/s at 50%: 2e5 s
    assert ch.training_seconds(1e12, 1e9, 10, 1e15, 0.5) == pytest.approx(2e5)
    assert ch.model_flops_utilisation(1e5, 1e9, 4e14) == pytest.approx(0.25)
    flops = ch.training_flops_per_token(GPTConfig.gpt2())
    n = gpt_num_parameters(GPTConfig.gpt2())
    assert 6 * n * 1.0 < flops < 6 * n * 1.3  # the 6N rule, plus the head and attention


# ---------------------------------------------------------------------------
# Two real processes (gloo on CPU), started once for the tests below
# ---------------------------------------------------------------------------


def _record(results, name, fn):
    """Run one check; keep its result, or its error, so one failure does not hide the rest."""
    try:
        results[name] = fn()
    except Exception as error:  # noqa: BLE001 - reported by the test that reads it
        results[name] = {"error": type(error).__name__, "message": str(error)}


def _two_rank_worker(rank, world_size, port, module_path, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ch = load_module("ch11_distributed", module_path)
    ch.init_distributed(ch.distributed_env(), "cpu", timeout_s=60)
    data, results = tokens(), {}

    def ddp_steps():  # per-rank batch 4 on 2 ranks, three AdamW steps
        model = tiny_gpt().double()
        runtime = ch.DataParallel(rank, world_size, "cpu")
        ddp = runtime.wrap(model)
        optimizer = AdamW(param_groups(model, 0.1), lr=1e-2)
        batches = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = runtime.get_batch(TokenBatches(data, data, 16), "train", 8, batches, "cpu")
            ddp(x, y)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"params": [p.detach().clone() for p in model.parameters()]}

    def accumulate(sync_on):  # two micro-batches; all-reduce only on micro-step `sync_on`
        model = tiny_gpt().double()
        runtime = ch.DataParallel(rank, world_size, "cpu")
        ddp = runtime.wrap(model)
        batches, after_first = torch.Generator().manual_seed(2), None
        for micro in range(2):
            x, y = runtime.get_batch(TokenBatches(data, data, 16), "train", 8, batches, "cpu")
            with runtime.gradient_sync(sync=micro == sync_on):
                (ddp(x, y)[1] / 2).backward()
            after_first = after_first or grads_of(model)
        return {"after_first": after_first, "grads": grads_of(model)}

    def by_hand():  # exercise 2: this rank's rows of a batch, then all_reduce; and DDP on them
        x, y = get_batch(data, 16, 8, torch.Generator().manual_seed(1))
        rows = slice(4 * rank, 4 * rank + 4)
        reference = tiny_gpt().double()
        ddp = DDP(reference)  # kept alive: its hooks all-reduce during backward
        ddp(x[rows], y[rows])[1].backward()
        model = tiny_gpt().double()
        model(x[rows], y[rows])[1].backward()
        ch.average_gradients(model)
        return {"ours": grads_of(model), "ddp": grads_of(reference)}

    _record(results, "ddp", ddp_steps)
    _record(results, "accumulate", lambda: accumulate(sync_on=1))
    _record(results, "wrong_step", lambda: accumulate(sync_on=0))
    _record(results, "by_hand", by_hand)
    _record(results, "mean", lambda: ch.DataParallel(rank, world_size, "cpu").mean(rank))
    _record(results, "memory", lambda: ch.measure_memory_by_stage(tiny_gpt().config))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(ch, tmp_path_factory):
    """Results of the checks above from each of two processes: [rank 0's, rank 1's]."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    context = mp.start_processes(_two_rank_worker, nprocs=2, join=False, start_method="spawn",
                                 args=(2, ch.free_port(), ch.__file__, str(out_dir)))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two worker processes did not finish within {WORKER_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def result(two_ranks, name):
    """Both ranks' results of one check; re-raises an error a worker recorded."""
    values = [ranks[name] for ranks in two_ranks]
    for value in values:
        if isinstance(value, dict) and "error" in value:
            error = NotImplementedError if value["error"] == "NotImplementedError" else RuntimeError
            raise error(value["message"] if error is NotImplementedError else f"{value['error']}: {value['message']}")
    return values


def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(two_ranks):
    # float64, so the only differences are the rounding of a different order of additions
    model = tiny_gpt().double()
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-2)
    batches, data = torch.Generator().manual_seed(1), tokens()
    for _ in range(3):
        model(*get_batch(data, 16, 8, batches))[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rank0, rank1 = result(two_ranks, "ddp")
    for ours0, ours1, ref in zip(rank0["params"], rank1["params"], model.parameters()):
        assert torch.equal(ours0, ours1)  # the replicas stay identical
        torch.testing.assert_close(ours0, ref.detach(), rtol=1e-10, atol=1e-12)


def test_accumulation_with_no_sync_equals_the_unaccumulated_gradient(two_ranks):
    data, batches = tokens(), torch.Generator().manual_seed(2)
    micro_batches = [get_batch(data, 16, 8, batches) for _ in range(2)]
    reference = global_batch_grads(tiny_gpt().double(), micro_batches)
    ranks = result(two_ranks, "accumulate")
    for rank, got in enumerate(ranks):
        for ours, ref in zip(got["grads"], reference):
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-13)
        # after the first micro-batch nothing was communicated: each rank holds its own rows' gradient
        x, y = micro_batches[0]
        local = global_batch_grads(tiny_gpt().double(), [(x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4])])
        for ours, ref in zip(got["after_first"], local):
            torch.testing.assert_close(ours, ref / 2, rtol=1e-10, atol=1e-13)


def test_syncing_on_the_wrong_micro_step_makes_the_replicas_diverge(two_ranks):
    rank0, rank1 = result(two_ranks, "wrong_step")
    differs = [not torch.allclose(a, b) for a, b in zip(rank0["grads"], rank1["grads"])]
    assert sum(differs) > len(differs) // 2  # different gradients -> different steps, silently


@pytest.mark.exercise(2)
def test_exercise_2_all_reduce_by_hand_matches_ddp(two_ranks):
    by_hand = result(two_ranks, "by_hand")
    x, y = get_batch(tokens(), 16, 8, torch.Generator().manual_seed(1))
    reference = global_batch_grads(tiny_gpt().double(), [(x, y)])
    for rank in range(2):
        for ours, theirs, ref in zip(by_hand[rank]["ours"], by_hand[rank]["ddp"], reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-13)


def test_mean_over_processes(two_ranks):
    assert result(two_ranks, "mean") == [0.5, 0.5]


def test_sharding_splits_the_state_between_the_processes(two_ranks):
    memory = result(two_ranks, "memory")
    full = memory[0][0]  # stage 0: every process holds everything
    assert memory[1][0] == full
    for kind in ("weights", "gradients", "optimizer"):
        total = memory[0][3][kind] + memory[1][3][kind]  # fully_shard: each process half
        assert total == pytest.approx(full[kind], rel=1e-3), kind
    both = memory[0][1]["optimizer"] + memory[1][1]["optimizer"]  # ZeroRedundancyOptimizer
    assert both == full["optimizer"] and memory[0][1]["gradients"] == full["gradients"]


@pytest.mark.exercise(3)
def test_exercise_3_bytes_per_parameter_matches_real_sharding(ch, two_ranks):
    memory = result(two_ranks, "memory")
    n = gpt_num_parameters(tiny_gpt().config)
    for rank in range(2):
        per_param = {stage: sum(parts.values()) / n for stage, parts in memory[rank].items()}
        assert ch.bytes_per_parameter(0, 2) == pytest.approx(per_param[0], rel=1e-3)
        # ZeRO-1 gives whole tensors to ranks, so the halves are only about equal
        assert ch.bytes_per_parameter(1, 2) == pytest.approx(per_param[1], rel=0.02)
        assert ch.bytes_per_parameter(3, 2) == pytest.approx(per_param[3], rel=1e-3)
        # stage 2: whole weights (as DDP's) with sharded gradients and moments (as FSDP's)
        stage2 = (memory[rank][0]["weights"] + memory[rank][3]["gradients"] + memory[rank][3]["optimizer"]) / n
        assert ch.bytes_per_parameter(2, 2) == pytest.approx(stage2, rel=1e-3)


# ---------------------------------------------------------------------------
# The command line under torchrun, and resuming its checkpoint in one process
# ---------------------------------------------------------------------------


def test_cli_errors_are_one_line_without_a_traceback(ch, tmp_path, capsys):
    missing = ["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert ch08_training.run_command(ch.main, missing) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no corpus named") and err.count("\n") == 1 and "Traceback" not in err
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(CODE_DIR), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, ch.__file__, *missing], env=env, capture_output=True, text=True,
                         timeout=WORKER_TIMEOUT_S)  # the script ends with run_command too
    assert run.returncode == 1 and run.stderr == err, run.stderr



def test_cli_under_torchrun_then_resume_in_one_process(ch, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    flags = ["--recipe", "tiny", "--data", "python-docs", "--n-layer", "1", "--d-model", "32", "--block-size", "16",
             "--batch-size", "4", "--max-iters", "6", "--decay-iters", "12", "--warmup-iters", "3",
             "--eval-interval", "3", "--eval-iters", "2", "--sample-tokens", "8", "--out-dir", str(two),
             "--device", "cpu", "--precision", "fp32", "--no-progress", "--dropout", "0.0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(ch.free_port()), ch.__file__, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(CODE_DIR), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    # only rank 0 logs
    assert run.stdout.count("iter 3:") == run.stdout.count("iter 6:") == 1, run.stdout
    assert run.stdout.count("final validation loss") == 1, run.stdout

    # One process, same settings, to the same point: the same data position, bit for bit, and
    # the same weights and losses up to float32 rounding (the all-reduce adds in another order).
    quiet = dict(log=lambda s: None)
    alone = ch.train(tiny_train_config(one), stop_after=6, **quiet)
    from safetensors.torch import load_file

    saved_two, saved_one = load_file(two / "checkpoint.safetensors"), load_file(one / "checkpoint.safetensors")
    assert torch.equal(saved_two["rng.batches"], saved_one["rng.batches"])
    for key in saved_one:
        if key.startswith(("model.", "optim.")):
            torch.testing.assert_close(saved_two[key], saved_one[key], rtol=1e-4, atol=1e-6, msg=key)
    meta = json.loads(ch08_training._safetensors_metadata((two / "checkpoint.safetensors").read_bytes())["book"])
    np.testing.assert_allclose(meta["history"]["train"], alone["train"], rtol=1e-5)

    # Both resume in one process and finish the 12 iterations with the same losses.
    resumed_two = ch.train(tiny_train_config(two), **quiet)
    resumed_one = ch.train(tiny_train_config(one), **quiet)
    assert len(resumed_two["train"]) == 12
    np.testing.assert_allclose(resumed_two["train"], resumed_one["train"], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in resumed_two["val"]], [v for _, v in resumed_one["val"]], rtol=1e-5)
