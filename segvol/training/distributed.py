"""A round over several processes (torchrun): the process group and the few collectives it needs.

Why so little: a round spreads two things, the encoding of the labelled images (each process
encodes its share, every process gets all the views) and the decoder steps (each process computes
the loss of its share of the batch, the gradients are summed). Everything here is a no-op with one
process, so the same code runs with and without torchrun.

The backend: gloo for CPU tensors always (the object collectives pickle to CPU memory), and nccl
for CUDA tensors where CUDA is present ("cpu:gloo,cuda:nccl"), so a round on ``--conf device cpu``
works on a GPU machine too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    in the environment); with one process, or when already joined, nothing. On CUDA each process
    takes the GPU of its LOCAL_RANK (``cuda`` then means that one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
        if here > gpus:  # NCCL refuses two processes on one GPU; say so before it does, obscurely
            raise RuntimeError(
                f"{here} processes on this host but {gpus} GPU(s): a round takes one GPU per process "
                "(lower --conf train_processes or --nproc_per_node)"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes (versions, progress, results) for all."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: every world-th item from its rank (balanced within one item)."""
    return list(items[rank() :: world()])


def gather_shards(local: Sequence[T]) -> list[T]:
    """The inverse of ``shard``: every process's share, put back in the original order, on every
    process. Objects are pickled, so tensors must be on the CPU; tensors shared inside one
    process's share stay shared (pickle keeps identity within one object)."""
    if world() == 1:
        return list(local)
    parts: list[Any] = [None] * world()
    dist.all_gather_object(parts, list(local))
    return [part[k] for k in range(max(map(len, parts))) for part in parts if k < len(part)]


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every process (a decision all must take together)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_params(params: Sequence[torch.Tensor]) -> None:
    """Rank 0's values in every process (as DDP does when it wraps a module), so all start equal."""
    if world() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """What DDP's reducer does, in one flat buffer: every process ends with the sum of all
    processes' gradients. A parameter no process touched keeps ``grad`` None, so the optimiser
    leaves it alone as it does in one process (AdamW skips None, but would move on a zero)."""
    if world() == 1 or not params:
        return
    like = params[0]
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    touched = torch.tensor([p.grad is not None for p in params], dtype=like.dtype, device=like.device)
    flat = torch.cat([*grads, touched])
    dist.all_reduce(flat)
    offset = 0
    for p, used in zip(params, flat[-len(params) :].tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p) if used else None
        offset += n


def barrier() -> None:
    if world() > 1:
        dist.barrier()
