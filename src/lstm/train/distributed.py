"""torchrun / DistributedDataParallel: gloo on CPU, NCCL on GPU. Without torchrun's environment
everything here is a no-op and the run is a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sums(sums: dict) -> dict:
    """Add {name: (sum, count)} over ranks. Every rank takes part, also one with nothing to add (a
    split smaller than world x batch leaves some ranks without a batch): a collective that one rank
    skips pairs the others' with its next one, which hangs or mixes up their data."""
    if not active():
        return sums
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(sums))
    names = sorted(set().union(*everyone))
    if not names:
        return sums
    packed = torch.tensor([[float(sums[n][0]), float(sums[n][1])] if n in sums else [0.0, 0.0] for n in names],
                          dtype=torch.float64)
    dist.all_reduce(packed)
    return {n: (packed[i, 0], float(packed[i, 1])) for i, n in enumerate(names)}


def max_over_ranks(value: int) -> int:
    if not active():
        return value
    packed = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return int(packed.item())


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    if active():
        dist.barrier()  # every rank done before the teardown, which can hang in gloo otherwise (pytorch#75097)
        dist.destroy_process_group()
