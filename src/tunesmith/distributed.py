"""torch.distributed plumbing for `tunesmith train`: process group setup under torchrun,
sums across ranks, FSDP sharding and gradient-sync control.

Kept apart from train.py so the loop reads top to bottom; DDP itself is one line there.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

from tunesmith.errors import UserError


def check_processes_fit_devices(processes_per_node: int) -> None:
    """Refuse more processes on this machine than it has GPUs, before any is started.

    Each process takes cuda:LOCAL_RANK (init_distributed), so on a machine with CUDA the
    process beyond the last GPU would ask for a device that does not exist and crash, after
    the others started and while they wait for it. On CPU (no CUDA, or CUDA hidden) every
    process runs on the CPU with gloo: any count works.
    """
    import torch

    if processes_per_node <= 1 or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if processes_per_node > gpus:
        raise UserError(
            f"{processes_per_node} training processes on this machine but it has {gpus} CUDA GPU{'s' if gpus != 1 else ''}: "
            "each process needs a GPU of its own",
            f"pass --nproc {gpus} or fewer, or train on the CPU (gloo) with CUDA hidden: CUDA_VISIBLE_DEVICES= tunesmith train ...",
        )


def init_distributed():
    """(world, rank, local_rank, device) under torchrun; (1, 0, 0, device) otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Under a torchrun started by hand, every process refuses alike (LOCAL_WORLD_SIZE is the
    # same in each), before the process group would leave the others waiting.
    check_processes_fit_devices(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, rank, local_rank, device


def all_sum(values: list[float], world: int, device) -> list[float]:
    """Each value summed over all ranks (float64, so token counts stay exact)."""
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard_model(loss_module, layer_classes: set[str]) -> None:
    """FSDP2: each decoder layer (a module whose class is in `layer_classes`, the model's
    `_no_split_modules`) is a unit whose weights are gathered only while it runs; the rest
    (embeddings, final norm, head) is the root unit."""
    from torch.distributed.fsdp import fully_shard

    for module in loss_module.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(loss_module)


def gradient_sync(train_module, sync: bool, fsdp: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP, FSDP)."""
    if fsdp:
        train_module.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else train_module.no_sync()
