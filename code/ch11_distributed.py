"""Chapter 11: scaling out, data-parallel training on PyTorch's distributed engine.

Chapter 8's trainer run by many processes at once. Each process holds the whole model and
trains on its own rows of every batch; DistributedDataParallel averages the gradients with
an all-reduce, so every process takes the step that one process would take on the whole
batch. The same command runs in one process or in many, on CPUs (gloo) or GPUs (NCCL):

    .venv/bin/python code/ch11_distributed.py --data shakespeare --out-dir runs/ddp
    .venv/bin/torchrun --standalone --nproc_per_node 4 code/ch11_distributed.py \\
        --data shakespeare --out-dir runs/ddp

``--batch-size`` is the global batch: the rows of one micro-batch summed over all processes.

Also here: the ring all-reduce and its cost, the memory a process holds per parameter and
what sharding it (ZeRO, FSDP) saves, and the FLOPs, utilisation and duration of a run.

Depends on torch (torch.distributed), the standard library and chapters 6 and 8;
matplotlib only in the plot_* functions.

Needs: ch02_tokenizer, ch03_embeddings, ch04_attention, ch05_block, ch06_gpt, ch08_training.
"""

# --8<-- [start:imports]
import contextlib
import copy
import dataclasses
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ch06_gpt import GPT, GPTConfig, flops_per_token, gpt_num_parameters
from ch08_training import SingleProcess, get_batch, parse_args, resolve_device, run_command
from ch08_training import train as train_loop  # Chapter 8's loop, which train() below reuses
# --8<-- [end:imports]


# ---------------------------------------------------------------------------
# Data parallelism, simulated in one process
# ---------------------------------------------------------------------------

# --8<-- [start:simulate]
def simulated_data_parallel_grads(model, x, y, world_size):
    """The gradients every rank holds after DDP's all-reduce, simulated in one process:
    world_size copies of ``model``, each on its rows of the batch x, y (B, T), averaged."""
    if len(x) % world_size:
        raise ValueError(f"a batch of {len(x)} rows does not split into {world_size} equal shards")
    per_rank = []
    for xs, ys in zip(x.chunk(world_size), y.chunk(world_size)):  # rank r's rows
        replica = copy.deepcopy(model)
        replica.zero_grad(set_to_none=True)
        replica(xs, ys)[1].backward()
        per_rank.append([p.grad for p in replica.parameters()])
    return [torch.stack(grads).mean(0) for grads in zip(*per_rank)]  # all-reduce: sum / N
# --8<-- [end:simulate]


# ---------------------------------------------------------------------------
# The ring all-reduce and its cost
# ---------------------------------------------------------------------------

# --8<-- [start:ring]
def simulate_ring_all_reduce(tensors):
    """Sum equal-shape tensors, one per simulated rank, as a ring all-reduce does.

    Every rank cuts its tensor into N chunks. Reduce-scatter: in N - 1 steps each rank sends
    one chunk to its right neighbour, which adds it to its own copy; then rank r holds the
    full sum of chunk (r + 1) % N. All-gather: N - 1 more steps pass the finished chunks on.
    Returns the N results (each equal to the sum) and the bytes each rank sent."""
    n = len(tensors)
    # [rank][chunk]
    chunks = [list(t.detach().clone().reshape(-1).tensor_split(n)) for t in tensors]
    sent = [0] * n
    for phase in ("reduce-scatter", "all-gather"):
        for step in range(n - 1):
            # every rank sends at the same time: read all messages before anyone receives
            offset = -step if phase == "reduce-scatter" else 1 - step
            messages = [
                (r, (r + offset) % n, chunks[r][(r + offset) % n].clone()) for r in range(n)
            ]
            for r, i, data in messages:
                receiver = chunks[(r + 1) % n][i]  # the right neighbour's copy of chunk i
                if phase == "reduce-scatter":
                    receiver.add_(data)
                else:
                    receiver.copy_(data)
                sent[r] += data.nbytes
    shape = tensors[0].shape
    return [torch.cat(c).reshape(shape) for c in chunks], sent


def ring_all_reduce_seconds(n_bytes, world_size, bandwidth, latency=0.0):
    """Time of a ring all-reduce of n_bytes over world_size ranks: 2 (N - 1) steps, each
    sending n_bytes / N over a link of ``bandwidth`` bytes/s after ``latency`` seconds."""
    n = world_size
    return 2 * (n - 1) * (latency + n_bytes / (n * bandwidth))


def naive_all_reduce_seconds(n_bytes, world_size, bandwidth, latency=0.0):
    """Time when one rank receives every gradient, sums, and sends the sum back to each:
    its link carries 2 (N - 1) whole copies."""
    return 2 * (world_size - 1) * (latency + n_bytes / bandwidth)
# --8<-- [end:ring]


# ---------------------------------------------------------------------------
# The process group: what torchrun tells each process
# ---------------------------------------------------------------------------

# --8<-- [start:env]
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    rank: int  # this process, 0 .. world_size - 1 (0 logs and writes)
    world_size: int  # processes in the run, on all machines
    local_rank: int  # this process on its machine: picks its GPU


def distributed_env(environ=None):
    """This process's place in a torchrun launch, from the variables torchrun sets, or None
    when it was started by plain ``python`` (neither RANK nor WORLD_SIZE set)."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    missing = [name for name in RENDEZVOUS if name not in environ]
    if missing:
        found = [name for name in RENDEZVOUS if name in environ]
        raise ValueError(
            f"a distributed launch needs all of {', '.join(RENDEZVOUS)}; missing: "
            f"{', '.join(missing)} (found {', '.join(found)}). Start the processes with "
            "torchrun (python -m torch.distributed.run), which sets them all, or unset "
            "RANK and WORLD_SIZE to train in one process."
        )
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in RENDEZVOUS[:3])
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         f"{[environ[name] for name in RENDEZVOUS[:3]]}") from None
    if not (0 <= rank < world_size and 0 <= local_rank <= rank):
        raise ValueError(f"need 0 <= LOCAL_RANK <= RANK < WORLD_SIZE, got LOCAL_RANK={local_rank}, "
                         f"RANK={rank}, WORLD_SIZE={world_size}")
    return DistributedEnv(rank, world_size, local_rank)


def process_device(requested, local_rank):
    """The device of this process: GPU number LOCAL_RANK when training on CUDA, else the CPU."""
    device = resolve_device(requested)  # "auto": cuda if there is one
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this machine has "
                f"{torch.cuda.device_count()}: start at most that many processes per machine"
            )
        device = torch.device("cuda", local_rank)
    return device


def backend_for(device):
    """NCCL moves GPU tensors over NVLink / InfiniBand; gloo moves CPU tensors over TCP."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(env, device, timeout_s=600):
    """Join the process group (every process calls this; it returns when all have joined).
    MASTER_ADDR:MASTER_PORT is where they meet. A collective that waits longer than
    timeout_s for the others fails instead of hanging."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method="env://", rank=env.rank,
                            world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def free_port():
    """A TCP port that nothing listens on now (the system picks one when asked for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
# --8<-- [end:env]


# ---------------------------------------------------------------------------
# Sharding the data
# ---------------------------------------------------------------------------

# --8<-- [start:shard]
def per_rank_batch(batch_size, world_size):
    """Rows of each micro-batch that one process trains on: batch_size is the global batch."""
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(
            f"the global batch_size {batch_size} does not split evenly among {world_size} "
            f"processes: make it a multiple of {world_size} (batch_size is summed over "
            "all processes, so every one trains on batch_size / world_size rows)"
        )
    return batch_size // world_size
# --8<-- [end:shard]


# --8<-- [start:exercise-1]
# Exercise 1: this process's rows of a global batch
def shard_batch(batch, rank, world_size):
    """This process's rows of a global batch: a tuple of tensors whose first dimension is
    the batch_size rows (x, y, and any mask). Return the same tuple with rows rank * b to
    (rank + 1) * b - 1 of each tensor, b = batch_size // world_size. Use per_rank_batch for
    b: it raises ValueError when batch_size does not divide by world_size.
    """
    b = per_rank_batch(len(batch[0]), world_size)
    return tuple(t[rank * b : (rank + 1) * b] for t in batch)
# --8<-- [end:exercise-1]


# ---------------------------------------------------------------------------
# Averaging gradients by hand
# ---------------------------------------------------------------------------

# --8<-- [start:exercise-2]
# Exercise 2: average the gradients with all_reduce
def average_gradients(model):
    """Replace each parameter's .grad by its mean over all processes, in place: what DDP
    does during backward. dist.all_reduce(t) sums t over the processes in place (every
    process gets the sum); divide by dist.get_world_size(). Skip parameters without .grad.
    """
    world_size = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size
# --8<-- [end:exercise-2]


# ---------------------------------------------------------------------------
# The trainer: Chapter 8's loop in every process
# ---------------------------------------------------------------------------

# --8<-- [start:runtime]
class DataParallel(SingleProcess):
    """Chapter 8's train() in one of world_size processes: the model wrapped in
    DistributedDataParallel, each process on its rows of every batch."""

    def __init__(self, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.is_main = rank == 0
        self.ddp = None

    @contextlib.contextmanager
    def main_first(self):
        if not self.is_main:
            dist.barrier()  # wait until the main process has run the block
        yield
        if self.is_main:
            dist.barrier()  # let the others go

    def wrap(self, model):
        # DDP copies rank 0's weights to every process, then all-reduces gradients in buckets
        # while the backward pass is still running, so communication overlaps computation.
        # gradient_as_bucket_view: each .grad is a view into its bucket, not a second copy.
        on_gpu = self.device.type == "cuda"
        self.ddp = DDP(
            model, device_ids=[self.device.index] if on_gpu else None, gradient_as_bucket_view=True
        )
        return self.ddp

    def get_batch(self, data, split, batch_size, generator, device):
        # every process draws the same global batch from the same generator state, then keeps
        # its rows
        return shard_batch(
            data.get_batch(split, batch_size, generator, device), self.rank, self.world_size
        )

    def gradient_sync(self, sync):
        # no_sync must hold the forward pass too: DDP decides in forward whether the coming
        # backward all-reduces.
        return contextlib.nullcontext() if sync else self.ddp.no_sync()

    def mean(self, value):
        total = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)  # sum over the processes
        return total.item() / self.world_size
# --8<-- [end:runtime]


# --8<-- [start:train]
def train(cfg, model=None, data=None, *, log=print, **options):
    """Chapter 8's train(cfg, model, data, ...), in this process alone (plain ``python``) or in
    every process that torchrun started. The result is the same run, up to rounding:
    cfg.batch_size is the global batch and the data position does not depend on the number
    of processes. Only rank 0 logs and writes; every process returns the history."""
    env = distributed_env()
    if env is None:
        return train_loop(cfg, model, data, log=log, **options)
    per_rank_batch(cfg.batch_size, env.world_size)  # a bad config fails before any process waits
    device = process_device(cfg.device, env.local_rank)
    cfg = dataclasses.replace(cfg, device=str(device), progress=cfg.progress and env.rank == 0)
    joined_here = not dist.is_initialized()
    if joined_here:
        init_distributed(env, device)
    runtime = DataParallel(env.rank, env.world_size, device)
    try:
        history = train_loop(
            cfg, model, data, log=log if runtime.is_main else _quiet, runtime=runtime, **options
        )
        dist.barrier()  # the checkpoint is written before any process moves on
    finally:
        # DDP holds the process group: let it go first, so that the group's threads stop
        # here, not while the interpreter shuts down
        runtime.ddp = None
        if joined_here:
            dist.destroy_process_group()
    return history


def _quiet(message):
    pass
# --8<-- [end:train]


# --8<-- [start:cli]
def main(argv=None):
    """The command line: Chapter 8's flags, in one process or under torchrun."""
    history = train(parse_args(argv))
    env = distributed_env()
    if (env is None or env.rank == 0) and history["val"]:
        print(f"final validation loss {history['val'][-1][1]:.4f}")
# --8<-- [end:cli]


# ---------------------------------------------------------------------------
# Memory per parameter, and what sharding saves
# ---------------------------------------------------------------------------

# --8<-- [start:memory]
def state_bytes(model, optimizer):
    """Bytes of weights, gradients and optimizer state that this process holds, measured.
    A sharded tensor (a DTensor, as fully_shard makes) counts only its local shard."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    optimizer = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: this rank's part
    params = list(model.parameters())
    return {
        "weights": sum(local(p).nbytes for p in params),
        "gradients": sum(local(p.grad).nbytes for p in params if p.grad is not None),
        "optimizer": sum(local(v).nbytes for state in optimizer.state.values()
                         for v in state.values() if torch.is_tensor(v)),
    }
# --8<-- [end:memory]


# --8<-- [start:exercise-3]
# Exercise 3: bytes per parameter on each process, by ZeRO stage
def bytes_per_parameter(stage, world_size, weights=4, grads=4, optimizer=8):
    """Bytes that one of world_size processes holds per model parameter.

    weights, grads and optimizer are the bytes per parameter of each kind of state (fp32
    weights and gradients and Adam's two fp32 moments: 4, 4 and 8). Stage 0 (DDP) keeps all
    of it in every process. ZeRO stage 1 shards the optimizer state (each process keeps
    1 / world_size of it), stage 2 the gradients as well, stage 3 (FSDP) the weights too.
    Raise ValueError for a stage other than 0, 1, 2 or 3.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stages are 0, 1, 2 and 3, got {stage}")
    sharded = [0, optimizer, optimizer + grads, optimizer + grads + weights][stage]
    return weights + grads + optimizer - sharded + sharded / world_size
# --8<-- [end:exercise-3]


# --8<-- [start:measure-sharding]
def measure_memory_by_stage(config, batch_size=4, seed=0):
    """State bytes this process holds after one AdamW step of GPT(config), trained with DDP
    (stage 0), DDP + ZeroRedundancyOptimizer (stage 1) and fully_shard (FSDP, stage 3).
    Call it in every process of an initialised process group (CPU: gloo)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(config.vocab_size, (batch_size, config.block_size), generator=generator)

    def one_step(stage):
        torch.manual_seed(seed)
        model = GPT(config)
        if stage == 3:
            for block in model.blocks:
                fully_shard(block)  # each block gathers its weights only while it runs
            fully_shard(model)
            net, optimizer = model, torch.optim.AdamW(model.parameters())
        else:
            net = DDP(model)
            optimizer = (torch.optim.AdamW(model.parameters()) if stage == 0 else
                         ZeroRedundancyOptimizer(model.parameters(),
                                                 optimizer_class=torch.optim.AdamW))
        net(x, x)[1].backward()
        optimizer.step()
        return state_bytes(model, optimizer)

    return {stage: one_step(stage) for stage in (0, 1, 3)}


def memory_report(config=None):
    """Run under torchrun: rank 0 prints the measured bytes per parameter by stage."""
    config = config or GPTConfig(
        vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128, bias=False
    )
    env = distributed_env()
    if env is None:
        raise ValueError("memory_report measures sharding across processes: start it with torchrun")
    init_distributed(env, "cpu", timeout_s=120)
    try:
        measured = measure_memory_by_stage(config)
        n = gpt_num_parameters(config)
        if env.rank == 0:
            print(f"{n:,} parameters, {env.world_size} processes; bytes per parameter in rank 0")
            for stage, parts in measured.items():
                row = ", ".join(f"{k} {v / n:.2f}" for k, v in parts.items())
                print(f"stage {stage}: {row}; total {sum(parts.values()) / n:.2f} "
                      f"(formula {bytes_per_parameter(stage, env.world_size):.2f})")
    finally:
        dist.destroy_process_group()
# --8<-- [end:measure-sharding]


# ---------------------------------------------------------------------------
# Compute: FLOPs, utilisation, time
# ---------------------------------------------------------------------------

# --8<-- [start:compute]
def training_flops_per_token(config, seq_len=None):
    """FLOPs of a training step per token: the forward pass (Chapter 6's flops_per_token)
    and a backward pass twice as costly (for every matrix product, one product for the
    gradient of its input and one for the gradient of its weights)."""
    return 3 * flops_per_token(config, seq_len)


def model_flops_utilisation(tokens_per_second, flops_per_token, peak_flops):
    """MFU: the share of the hardware's peak FLOP/s that the model's own FLOPs use."""
    return tokens_per_second * flops_per_token / peak_flops


def training_seconds(n_tokens, flops_per_token, n_gpus, peak_flops, mfu):
    """Wall-clock time to train on n_tokens with n_gpus running at ``mfu`` of their peak."""
    return n_tokens * flops_per_token / (n_gpus * peak_flops * mfu)


PEAK_BF16_FLOPS = {  # dense bf16 matrix products, from the vendors' data sheets
    "A100": 312e12,
    "H100 SXM": 989e12,
}
# --8<-- [end:compute]


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def plot_ring_all_reduce():
    """Time to all-reduce GPT-2 small's fp32 gradients: ring vs one rank doing all the work."""
    import matplotlib.pyplot as plt

    n_bytes = 4 * gpt_num_parameters(GPTConfig.gpt2())
    ranks = list(range(2, 65))
    links = [("NVLink, 300 GB/s", 300e9), ("PCIe 4.0, 25 GB/s", 25e9),
             ("100 Gb/s Ethernet", 12.5e9)]
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    for (name, bandwidth), color in zip(links, ["C0", "C1", "C2"]):
        ax.plot(ranks, [1e3 * ring_all_reduce_seconds(n_bytes, n, bandwidth, 10e-6) for n in ranks],
                color=color, label=f"ring, {name}")
        ax.plot(ranks,
                [1e3 * naive_all_reduce_seconds(n_bytes, n, bandwidth, 10e-6) for n in ranks],
                color=color, ls=":", label=f"one rank sums, {name}")
    ax.set(xlabel="processes N", ylabel="milliseconds", yscale="log",
           title="All-reduce of 498 MB of gradients (GPT-2 small, fp32)")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    return fig


def plot_memory_by_stage():
    """GB per GPU for weights, gradients and Adam state (16 bytes per parameter) on 8 GPUs."""
    import matplotlib.pyplot as plt

    models = [("GPT-2 124M", GPTConfig.gpt2()), ("GPT-2 355M", GPTConfig.gpt2("gpt2-medium")),
              ("GPT-2 774M", GPTConfig.gpt2("gpt2-large")),
              ("GPT-2 1.5B", GPTConfig.gpt2("gpt2-xl")), ("Llama 2 7B", GPTConfig.llama2_7b())]
    world_size = 8
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.2
    for stage in range(4):
        gb = [
            gpt_num_parameters(c) * bytes_per_parameter(stage, world_size) / 1e9 for _, c in models
        ]
        ax.bar([i + (stage - 1.5) * width for i in range(len(models))], gb, width,
               label=["0: DDP", "1: shard optimizer", "2: + gradients",
                      "3: + weights (FSDP)"][stage])
    ax.axhline(80, color="gray", ls="--", lw=1)
    ax.text(2.5, 88, "80 GB: one GPU's memory", ha="center", fontsize=8, color="gray")
    ax.set(xticks=range(len(models)), xticklabels=[name for name, _ in models], yscale="log",
           ylabel="GB per GPU (before activations)",
           title="Training state on each of 8 GPUs, by ZeRO stage")
    ax.legend(fontsize=8, title="stage", title_fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(run_command(main))
