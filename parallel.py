"""Data parallelism for train.py, kept out of the model file (as torchtitan does): the process group,
the DDP wrapper or FSDP2 sharding, and a clean teardown. One process per GPU under torchrun (NCCL);
on CPUs, gloo does the same job.

DDP keeps a whole replica (weights, grads, Adam moments) on every GPU; FSDP2 (`--fsdp`) keeps 1/N of
each on each of N GPUs and all-gathers one decoder layer's weights just before it runs.

    torchrun --nproc_per_node=8 train.py ...                       # one machine, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 train.py ...               # two machines
"""
import gc
import os
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import cli


def setup(device_flag):
    """-> SimpleNamespace(rank, world, local, device), distributed when torchrun set RANK."""
    device = cli.pick_device(device_flag)
    if "RANK" not in os.environ:   # a plain `python train.py`: one process, no process group at all
        return SimpleNamespace(rank=0, world=1, local=0, device=device)
    # rank: among all processes; world: their number; local: the index on this machine (its GPU)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"   # each process owns the GPU of its local rank
        torch.cuda.set_device(device)   # before init: NCCL binds its communicator to the current device
    # NCCL for GPUs (the fast path); gloo lets the same DDP code run, and be tested, on CPUs
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return SimpleNamespace(rank=rank, world=world, local=local, device=device)


def wrap(model, ddp, allow_unused=False):
    """The model DDP-wrapped when there is more than one process."""
    # DDP averages gradients across ranks during the backward, overlapping communication with compute
    if ddp.world == 1:
        return model   # unwrapped: no hooks, no no_sync needed
    # allow_unused: an MoE expert no token of a micro-batch chose gets no gradient, and DDP must be told
    # to expect that (it costs one extra pass over the graph, so dense models do not ask for it)
    return DDP(model, device_ids=[ddp.local] if ddp.device.startswith("cuda") else None,
               find_unused_parameters=allow_unused)


def shard(model, ddp, dtype, compile=False):
    """FSDP2 in place: each decoder layer its own unit, then the root (embedding, final norm, head)."""
    # a unit's weights are gathered just before it runs and freed right after, so a GPU holds 1/N of
    # the model plus about one layer in full; the root unit keeps the rest (the embedding: it is also
    # the tied head, used at both ends of the forward)
    # bf16 compute, fp32 gradient reduction: the mean over ranks of bf16 gradients would lose bits
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        if compile:   # per layer, before sharding (as torchtitan): the graph stays between FSDP's hooks
            layer.compile()
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)   # after fully_shard a parameter is a DTensor: its rank's rows
    return model


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


def accumulate(model, sync):
    """The context of one micro-batch's backward: DDP all-reduces on the last micro-batch only."""
    # FSDP reduce-scatters after every micro-batch instead: skipping it would keep every layer's
    # unsharded gradient until the last one, the memory FSDP is there to save
    return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()


def local_grad_hook(model):
    """DDP: -> a 0-dim tensor that each backward adds this rank's |gradient|^2 to, before the all-reduce."""
    # noise.py's small batch when every micro-batch syncs: DDP averages inside the backward, so the
    # rank's own gradient exists only in the buckets on their way out; read there, then DDP's own
    # averaging (allreduce_hook: what DDP does without a hook) sends them on unchanged
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    total = torch.zeros((), device=next(model.parameters()).device)

    def hook(state, bucket):   # bucket.buffer(): this rank's gradients of some parameters, flattened
        total.add_(bucket.buffer().float().pow(2).sum())
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, hook)
    return total


def clip_grad_norm(model, max_norm):
    """Clip the global gradient norm; -> the norm before clipping, a plain tensor."""
    # with FSDP each rank holds a slice of each gradient: the norm is a DTensor, made whole here
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def average(tensor, ddp):
    """The mean over ranks, in place (a no-op in one process)."""
    if ddp.world > 1:   # the training loss: every rank logs, and stops on, the same number
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor


def total(tensor, ddp):
    """The sum over ranks, in place (a no-op in one process)."""
    if ddp.world > 1:   # sums (loss x tokens, token counts), divided afterwards: exact for uneven shards
        dist.all_reduce(tensor)   # SUM is all_reduce's default op
    return tensor


def barrier(ddp):
    # every rank waits here until all arrive (rank 0 preparing the data, the others waiting for it)
    if ddp.world > 1:
        dist.barrier()


def teardown():
    """Collect the DDP-wrapped model, then destroy the process group."""
    # without the collection about 1 gloo run in 10 aborted at exit on our CPU machine: the wrapper's
    # hooks outlived the group they talk to. Without a group there is nothing to outlive, and a full
    # collection costs seconds in a big process (the tests call train.main hundreds of times)
    if dist.is_initialized():   # also safe after a failed setup, or in a single process
        gc.collect()
        dist.destroy_process_group()
