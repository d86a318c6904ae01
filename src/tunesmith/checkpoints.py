"""Training checkpoints: what `checkpoints/step-N` holds, and how it is written and read back.

A checkpoint is the trainable weights (gathered whole, safetensors), the optimizer and scheduler
state (under FSDP the optimizer as per-rank shards, torch.distributed.checkpoint), every rank's
RNG state and the loop state (step, token counts, best eval loss). It is written atomically
(temp folder + rename), so a crash mid-write leaves no half checkpoint to resume from.

Separate from `train.py` so that the loop there reads top to bottom; nothing here decides what
training does, only how its state survives an interruption.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from tunesmith import artifacts
from tunesmith.config import RunConfig
from tunesmith.errors import UserError

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_OPTIMIZER_SHARDS = "optimizer-shards"  # FSDP: each rank writes its shard (torch.distributed.checkpoint)
CHECKPOINT_RNG = "rng.pt"
CHECKPOINT_STATE = "state.json"
SHARDS_PREFIX = ".shards-step-"  # hidden: list_checkpoints never takes one for a checkpoint


def full_tensor(tensor):
    """The whole tensor: FSDP parameters are sharded DTensors (gathering one is a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def trainable_state(model) -> dict:
    """Trainable weights, whole, on CPU. Under FSDP every rank must call it (it all-gathers)."""
    return {name: full_tensor(p.detach()).to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}


def full_model_state(model) -> dict:
    """The whole state dict on CPU (full fine-tuning under FSDP; every rank calls it)."""
    return {name: full_tensor(t.detach()).to("cpu") for name, t in model.state_dict().items()}


def copy_into(param, tensor) -> None:
    """Load a whole tensor into a parameter, sharding it first when the parameter is FSDP's."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(tensor)


def save_optimizer_shards(loss_module, optimizer, folder: Path) -> None:
    """FSDP: every rank writes its share of the optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(loss_module, optimizer)}, checkpoint_id=str(folder))


def load_optimizer_shards(loss_module, optimizer, folder: Path) -> None:
    """FSDP: read the optimizer state back, resharded to this run's processes if their number changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(loss_module, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(loss_module, optimizer, state["optimizer"])


def rng_state() -> dict:
    """This process's Python, torch (and CUDA) RNG states: dropout and data order resume exactly."""
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shards_folder(folder: Path, step: int) -> Path:
    """Where FSDP ranks write a checkpoint's optimizer shards before rank 0 completes it."""
    return folder / f"{SHARDS_PREFIX}{step}"


def save_checkpoint(folder: Path, weights: dict, optimizer, scheduler, rng_states: list, state: dict, keep: int, shards: Path | None = None) -> None:
    """Write checkpoints/step-N atomically (temp folder + rename), then prune old ones.

    `shards` (FSDP): a folder the ranks already filled with the optimizer's shards; it becomes
    part of the checkpoint, and `optimizer` is then None.
    """
    import torch
    from safetensors.torch import save_file

    target = folder / f"step-{state['step']}"
    with artifacts.atomic_path(target) as tmp:
        tmp.mkdir()
        if shards is not None:
            os.replace(shards, tmp / CHECKPOINT_OPTIMIZER_SHARDS)
        save_file(weights, str(tmp / CHECKPOINT_WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict() if optimizer else None, "scheduler": scheduler.state_dict()}, tmp / CHECKPOINT_OPTIMIZER)
        torch.save({"ranks": rng_states}, tmp / CHECKPOINT_RNG)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))
    for old in list_checkpoints(folder)[:-keep] + sorted(folder.glob(f"{SHARDS_PREFIX}*")):
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a crash mid-write leaves only a hidden temp folder)."""
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def refuse_parallel_mismatch(path: Path, fsdp: bool) -> None:
    """A checkpoint's optimizer state is sharded (FSDP) or whole (DDP, one process); the other
    mode cannot read it."""
    sharded = (path / CHECKPOINT_OPTIMIZER_SHARDS).is_dir()
    if sharded != fsdp:
        written = "train.parallel fsdp" if sharded else "train.parallel ddp or one process"
        raise UserError(f"checkpoint {path} was written with {written}", "resume with the same train.parallel and --nproc > 1 for fsdp")


def check_resumable(cfg: RunConfig, world: int) -> None:
    """Refuse, before any process starts, a resume whose checkpoint the parallel mode cannot read."""
    found = list_checkpoints(cfg.run_dir / artifacts.CHECKPOINTS_DIR)
    if found:
        refuse_parallel_mismatch(found[-1], world > 1 and cfg.train.parallel == "fsdp")


def refuse_changed_settings(path: Path, written: dict | None, now: dict) -> None:
    """Refuse a resume whose data plan or LR schedule settings differ from the checkpoint's:
    the step number is the only data position a checkpoint keeps, so it means something else
    under another plan. Checkpoints from before this record (`written` None) are not checked."""
    if written is None:
        return
    changed = [f"{key} ({written.get(key)!r} -> {value!r})" for key, value in now.items() if written.get(key) != value]
    if changed:
        raise UserError(
            f"settings changed since checkpoint {path.name}: {', '.join(changed)}",
            "resume with the settings the checkpoint was written with, or start again without --resume",
        )


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int, fsdp_root=None) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the loop state.

    Only files tunesmith wrote are read, and the pickled ones with weights_only=True.
    `fsdp_root`: the sharded module, whose optimizer state is read from its shards.
    """
    import torch
    from safetensors.torch import load_file

    refuse_parallel_mismatch(path, fsdp_root is not None)
    weights = load_file(str(path / CHECKPOINT_WEIGHTS))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise UserError(f"checkpoint {path} does not match the model ({len(missing)} missing weights)", "resume with the config that wrote it")
    with torch.no_grad():
        for name, tensor in weights.items():
            copy_into(params[name], tensor)
    opt = torch.load(path / CHECKPOINT_OPTIMIZER, weights_only=True)
    if fsdp_root is not None:
        load_optimizer_shards(fsdp_root, optimizer, path / CHECKPOINT_OPTIMIZER_SHARDS)
    else:
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rngs = torch.load(path / CHECKPOINT_RNG, weights_only=True)["ranks"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return json.loads((path / CHECKPOINT_STATE).read_text())
