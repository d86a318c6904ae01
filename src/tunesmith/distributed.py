"""torch.distributed plumbing for `tunesmith train`: process group setup under torchrun,
sums across ranks, FSDP sharding and gradient-sync control.

Kept apart from train.py so the loop reads top to bottom; DDP itself is one line there.
"""

from __future__ import annotations

import os
from contextlib import nullcontext


def init_distributed():
    """(world, rank, local_rank, device) under torchrun; (1, 0, 0, device) otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
