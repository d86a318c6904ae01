"""`tunesmith train`: LoRA, QLoRA and full fine-tuning in one plain-torch loop.

Read top to bottom: distributed setup, data (tokenised and checked before any model is
loaded, so a bad mask costs seconds, not a model load), model, optimizer, the data plan,
resume, the loop, the artifacts. The data plan is a pure function of (seed, dataset, config),
so the data position in a checkpoint is just the step number, and resuming is exact.
What a checkpoint holds, and how it is written and read back, is in `checkpoints.py`;
the torch.distributed plumbing (DDP/FSDP setup, sums across ranks) in `distributed.py`;
the model set up for a method and its loss in `modeling.py`; the run's record in `runs.py`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith import artifacts, runs
from tunesmith.checkpoints import (
    full_model_state,
    full_tensor,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_optimizer_shards,
    shards_folder,
    trainable_state,
)
from tunesmith.config import RunConfig
from tunesmith.distributed import all_sum, gradient_sync, init_distributed, shard_model
from tunesmith.errors import UserError
from tunesmith.formatting import (
    Example,
    collate,
    length_grouped_batches,
    mask_text,
    packed_batches,
    preflight,
)
from tunesmith.inference import use_bf16
from tunesmith.modeling import autocast, causal_lm, load_for_training, make_loss_module


# --- data -----------------------------------------------------------------------------------


def data_paths(cfg: RunConfig) -> tuple[Path, Path | None, runs.DataFiles]:
    """(train, eval, files): runs.data_files' choice (the split's files, else the config's), checked."""
    files = runs.data_files(cfg)
    if files.train is None or not files.train.exists():
        raise UserError(f"training data {files.train} not found", "fix data.train in the config (relative to the config file)")
    if files.eval is not None and not files.eval.exists():
        raise UserError(f"eval data {files.eval} not found", "fix data.eval in the config, or remove it")
    return files.train, files.eval, files


def load_examples(cfg: RunConfig, tokenizer) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Tokenise and pre-flight both splits; raise one UserError for every bad example."""
    train_path, eval_path, files = data_paths(cfg)
    train_examples, train_report = preflight(tokenizer, files.read(train_path), cfg.data, str(train_path))
    eval_examples: list[Example] = []
    if eval_path is not None:
        eval_examples, _ = preflight(tokenizer, files.read(eval_path), cfg.data, str(eval_path))
    info = {
        "train_file": str(train_path),
        "train_sha256": artifacts.sha256_file(train_path),
        "eval_file": str(eval_path) if eval_path else None,
        "eval_sha256": artifacts.sha256_file(eval_path) if eval_path else None,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "train_tokens_per_epoch": train_report.tokens,
        "trained_tokens_per_epoch": train_report.trained_tokens,
        "truncated_examples": len(train_report.truncated_lines),
    }
    if not train_examples:
        raise UserError(f"{train_path} holds no examples", "check the data file")
    return train_examples, eval_examples, info


def show_mask(cfg: RunConfig, count: int, console) -> None:
    """Print `count` training examples with their trained tokens highlighted."""
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle)
    train_path, _, files = data_paths(cfg)
    examples, report = preflight(tokenizer, files.read(train_path), cfg.data, str(train_path))
    for example in examples[:count]:
        console.rule(f"line {example.source_line}: {len(example)} tokens, {example.trained_tokens} trained")
        console.print(mask_text(tokenizer, example))
    console.rule()
    console.print(
        f"{report.examples} examples, {report.tokens} tokens, {report.trained_tokens} trained "
        f"({report.trained_tokens / max(report.tokens, 1):.1%}); truncated: {len(report.truncated_lines)}"
    )


# --- the data plan ---------------------------------------------------------------------------


class DataPlan:
    """Which examples every optimizer step sees: a pure function of seed, data and config.

    A step is `grad_accum` micro-batches; a micro-batch is `batch_size * world` rows, of which
    each rank takes its contiguous share. So 2 processes with batch 2 see exactly the batches
    of 1 process with batch 4.
    """

    def __init__(self, examples: list[Example], cfg: RunConfig, world: int, rank: int):
        self.examples, self.cfg, self.world, self.rank = examples, cfg, world, rank
        self.global_batch = cfg.train.batch_size * world
        self.lengths = [len(e) for e in examples]
        self._epoch_cache: dict[int, list[list[list[int]]]] = {}
        micro = len(self.epoch_batches(0))
        self.steps_per_epoch = math.ceil(micro / cfg.train.grad_accum)
        t = cfg.train
        self.total_steps = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._epoch_cache:
            t = self.cfg.train
            if t.packing:
                batches = packed_batches(self.lengths, self.global_batch, self.cfg.data.max_length, seed=t.seed, epoch=epoch)
            else:
                batches = length_grouped_batches(self.lengths, self.global_batch, seed=t.seed, epoch=epoch)
            if self.world > 1:
                # Every rank needs rows: the last batch borrows from the first (as DistributedSampler does).
                flat = [row for batch in batches for row in batch]
                last = batches[-1]
                while len(last) < self.global_batch:
                    last.append(flat[len(last) % len(flat)])
            self._epoch_cache = {epoch: batches}
        return self._epoch_cache[epoch]

    def step(self, step: int) -> list[list[list[int]]]:
        """The global micro-batches of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        ga = self.cfg.train.grad_accum
        return self.epoch_batches(epoch)[within * ga : (within + 1) * ga]

    def shard(self, global_batch: list[list[int]]) -> list[list[int]]:
        per_rank = math.ceil(len(global_batch) / self.world)
        return global_batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def trained_tokens(self, global_batches: list[list[list[int]]]) -> int:
        return sum(self.examples[i].trained_tokens for batch in global_batches for row in batch for i in row)

    def tokens(self, global_batches: list[list[list[int]]]) -> int:
        return sum(len(self.examples[i]) for batch in global_batches for row in batch for i in row)


# --- the model: modeling.py (shared with estimate's calibration) ----------------------------


def lr_lambda(cfg: RunConfig, total_steps: int):
    t = cfg.train
    warmup = int(t.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- records --------------------------------------------------------------------------------


def write_loss_plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


# --- loss on the eval split, precision, compile ------------------------------------------------


def evaluate_loss(loss_module, examples: list[Example], cfg: RunConfig, pad_id: int, device, bf16: bool, world: int, rank: int, lockstep: bool = False) -> float | None:
    """Token-mean cross-entropy on the eval split (trained positions only), sharded over ranks.

    `lockstep` (FSDP, whose forward gathers weights from every rank): each rank runs the same
    number of batches; a rank out of batches runs one more whose loss it does not count.
    """
    import torch

    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    size = cfg.train.batch_size
    batches = [[[i] for i in order[b : b + size]] for b in range(0, len(order), size)]
    total, tokens = 0.0, 0
    was_training = loss_module.training
    loss_module.eval()
    with torch.no_grad():
        mine = batches[rank::world]
        rounds = math.ceil(len(batches) / world) if lockstep else len(mine)
        for j in range(rounds):
            batch = mine[j] if j < len(mine) else batches[0]
            tensors = collate(examples, batch, pad_id)
            with autocast(device, bf16):
                loss = loss_module(
                    tensors["input_ids"].to(device), tensors["labels"].to(device), tensors["position_ids"].to(device)
                )
            if j < len(mine):
                total += float(loss)
                tokens += tensors["trained_tokens"]
    if lockstep:
        # FSDP keeps the root unit's weights gathered after a forward until the backward that
        # never comes here: shard them again, or the optimizer's parameters go missing.
        loss_module.reshard()
    loss_module.train(was_training)
    total, tokens = all_sum([total, tokens], world, device)
    return total / max(tokens, 1)


def want_compile(setting: str, device) -> bool:
    """`auto`: compile on CUDA only. On CPU the variable sequence lengths make inductor
    recompile for many batches (minutes of compile on this project's 2-core machine), which
    a short fine-tuning run never earns back; `on` forces it."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"


# --- the stage ------------------------------------------------------------------------------


def run(cfg: RunConfig, *, resume: bool = False, console=None) -> dict[str, Any]:
    """Train per `cfg`; write the adapter or model, metrics, loss plot, checkpoints, manifest."""
    import torch
    import torch.distributed as dist
    from rich.console import Console

    started = time.time()
    t = cfg.train
    world, rank, local_rank, device = init_distributed()
    main_rank = rank == 0
    fsdp = world > 1 and t.parallel == "fsdp"  # the config refuses fsdp with qlora
    console = console or Console(stderr=True)
    if not main_rank:
        console = Console(quiet=True)
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / artifacts.CHECKPOINTS_DIR
    metrics_path = run_dir / artifacts.METRICS_FILE

    # 1. Data first: the pre-flight mask check fails in seconds, before a model load.
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle)
    train_examples, eval_examples, data_info = load_examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id

    # 2. Seeds before the model: LoRA init draws from the torch RNG.
    random.seed(t.seed + rank)
    torch.manual_seed(t.seed)
    bf16 = use_bf16(t.precision, device)
    model, loaded = load_for_training(cfg, device, bf16, fsdp=fsdp)
    torch.manual_seed(t.seed + rank)  # dropout differs per rank, as with a larger batch
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 3. Wrap: the loss module (one forward for DDP and compile), DDP or FSDP across ranks, compile.
    plan = DataPlan(train_examples, cfg, world, rank)
    loss_module = make_loss_module(model)
    train_module = loss_module
    if fsdp:
        layer_classes = set(getattr(causal_lm(model), "_no_split_modules", None) or [])
        shard_model(loss_module, layer_classes)  # in place: the parameters become sharded DTensors
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(loss_module, device_ids=[device] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    compiled = want_compile(t.compile, device)
    if compiled:
        train_module = torch.compile(train_module, dynamic=True)
    # FSDP gathers a layer's weights once per forward; the shared prefix runs each layer twice.
    shared_prefix = t.shared_prefix and not t.packing and not t.gradient_checkpointing and not fsdp

    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, plan.total_steps))

    # 4. Resume, or start clean (stale checkpoints of an earlier run would be resumed later).
    state: dict[str, Any] = {"step": 0, "tokens": 0, "trained_tokens": 0, "train_time_s": 0.0, "best_eval_loss": None, "evals_without_improvement": 0}
    if resume:
        found = list_checkpoints(ckpt_dir)
        if not found:
            console.print(f"no checkpoint in {ckpt_dir}: starting from step 0")
            resume = False
    if resume:
        state = load_checkpoint(found[-1], model, optimizer, scheduler, rank, fsdp_root=loss_module if fsdp else None)
        if state.get("train_sha256") not in (None, data_info["train_sha256"]):
            raise UserError("the training data changed since the checkpoint was written", "resume with the same data, or start again without --resume")
        console.print(f"resuming from {found[-1].name}")
        metrics = read_metrics(metrics_path, up_to_step=state["step"])
    else:
        metrics = []
        if main_rank:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    if main_rank:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_text_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
    metrics_file = open(metrics_path, "a", encoding="utf-8") if main_rank else None

    def checkpoint() -> None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        # Under FSDP gathering is a collective every rank joins; under DDP only rank 0 writes.
        weights = trainable_state(model) if fsdp or main_rank else None
        shards = None
        if fsdp:
            shards = shards_folder(ckpt_dir, state["step"])
            if main_rank:
                shutil.rmtree(shards, ignore_errors=True)
            dist.barrier()
            save_optimizer_shards(loss_module, optimizer, shards)
            dist.barrier()
        if main_rank:
            ckpt_state = {**state, "train_sha256": data_info["train_sha256"]}
            save_checkpoint(ckpt_dir, weights, None if fsdp else optimizer, scheduler, rngs, ckpt_state, t.keep_checkpoints, shards)
        if world > 1:
            dist.barrier()

    def log(row: dict) -> None:
        metrics.append(row)
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    if t.method != "full":
        # Warn now, not at deployment, when the serving engines will refuse this adapter.
        peft_config = model.peft_config["default"].to_dict()
        for problem in runs.lint_adapter_config(peft_config, causal_lm(model).config.model_type):
            console.print(f"[yellow]serving lint:[/yellow] {problem}")
    console.print(
        f"training {t.method} on {data_info['train_examples']} examples: {plan.total_steps} steps, "
        f"{trainable_count:,} trainable parameters, {'bf16' if bf16 else 'fp32'}, world {world}"
        + (" (fsdp)" if fsdp else "")
        + (", compiled" if compiled else "")
    )

    # 5. The loop. The loss of a step is the mean over all trained tokens of its global batch
    #    (every micro-batch and rank), so accumulation and DDP change nothing in the maths.
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not main_rank,
    )
    last_eval = None
    stop_early = False
    if eval_examples and state["step"] == 0:
        # Step 0: the base model's eval loss, so the curve shows what training changed.
        state["initial_eval_loss"] = state["best_eval_loss"] = evaluate_loss(loss_module, eval_examples, cfg, pad_id, device, bf16, world, rank, fsdp)
        log({"step": 0, "eval_loss": state["initial_eval_loss"]})
    with progress:
        task = progress.add_task("train", total=plan.total_steps, completed=state["step"], loss="-", tps="-")
        while state["step"] < plan.total_steps and not stop_early:
            step = state["step"]
            step_start = time.perf_counter()
            global_batches = plan.step(step)
            step_trained = plan.trained_tokens(global_batches)
            loss_sum, fed_tokens = 0.0, 0
            for m, global_batch in enumerate(global_batches):
                tensors = collate(train_examples, plan.shard(global_batch), pad_id)
                sync = m == len(global_batches) - 1 or world == 1
                with gradient_sync(train_module, sync, fsdp), autocast(device, bf16):
                    loss = train_module(
                        tensors["input_ids"].to(device),
                        tensors["labels"].to(device),
                        tensors["position_ids"].to(device),
                        tensors["shared_prefix_len"] if shared_prefix else 0,
                    )
                # DDP and FSDP average gradients over ranks; scaling by world makes it the global token mean.
                (loss * world / step_trained).backward()
                loss_sum += float(loss.detach())
                fed_tokens += tensors["fed_tokens_shared"] if shared_prefix else sum(len(train_examples[i]) for row in plan.shard(global_batch) for i in row)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm else float("inf")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss_sum, fed_tokens = all_sum([loss_sum, fed_tokens], world, device)
            elapsed = time.perf_counter() - step_start
            step_tokens = plan.tokens(global_batches)
            state["step"] = step + 1
            state["tokens"] += step_tokens
            state["trained_tokens"] += step_trained
            state["tokens_fed"] = state.get("tokens_fed", 0) + int(fed_tokens)
            state["train_time_s"] += elapsed
            row = {
                "step": step + 1,
                "loss": loss_sum / step_trained,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": step_tokens / elapsed,
                "trained_tokens_per_s": step_trained / elapsed,
            }
            done = state["step"] == plan.total_steps
            if eval_examples and (done or (t.eval_every and state["step"] % t.eval_every == 0)):
                last_eval = evaluate_loss(loss_module, eval_examples, cfg, pad_id, device, bf16, world, rank, fsdp)
                row["eval_loss"] = last_eval
                best = state["best_eval_loss"]
                if best is None or last_eval < best:
                    state["best_eval_loss"], state["evals_without_improvement"] = last_eval, 0
                else:
                    state["evals_without_improvement"] += 1
                    if t.early_stopping_patience and state["evals_without_improvement"] >= t.early_stopping_patience:
                        stop_early = True
                        console.print(f"early stop at step {state['step']}: no better eval loss in {t.early_stopping_patience} evals")
            log(row)
            progress.update(task, completed=state["step"], loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")
            if done or stop_early or (t.save_every and state["step"] % t.save_every == 0):
                checkpoint()
    if metrics_file:
        metrics_file.close()
    if eval_examples and last_eval is None:
        last_eval = evaluate_loss(loss_module, eval_examples, cfg, pad_id, device, bf16, world, rank, fsdp)

    # 6. Artifacts (rank 0): the adapter or model in standard formats, the plot, the manifest.
    #    Under FSDP every rank first takes part in gathering the whole weights.
    whole = None
    if fsdp:
        whole = full_model_state(model) if t.method == "full" else trainable_state(model)
    if main_rank:
        if t.method == "full":
            out = run_dir / artifacts.FULL_MODEL_DIR
            with artifacts.atomic_path(out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=whole)
                tokenizer.save_pretrained(tmp)
        else:
            out = run_dir / artifacts.ADAPTER_DIR
            with artifacts.atomic_path(out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=whole)
        write_loss_plot(metrics, run_dir / artifacts.LOSS_PLOT_FILE)
    summary = {
        "method": t.method,
        "output": str(out) if main_rank else None,
        "steps": state["step"],
        "total_steps": plan.total_steps,
        "stopped_early": stop_early,
        "final_loss": next((m["loss"] for m in reversed(metrics) if "loss" in m), None),
        "initial_eval_loss": state.get("initial_eval_loss"),
        "final_eval_loss": last_eval,
        "best_eval_loss": state["best_eval_loss"],
        "tokens_trained": state["tokens"],
        "trained_tokens": state["trained_tokens"],
        "tokens_fed": state.get("tokens_fed", 0),  # what the model ran: a shared prefix counts once per batch
        "train_time_s": state["train_time_s"],
        "tokens_per_s": state["tokens"] / max(state["train_time_s"], 1e-9),
        "trainable_parameters": trainable_count,
    }
    if main_rank:
        versions = artifacts.library_versions()
        for dist_name in ("bitsandbytes", "accelerate"):
            try:
                import importlib.metadata as md

                versions[dist_name] = md.version(dist_name)
            except Exception:  # noqa: BLE001 - optional libraries
                pass
        runs.write_train_record(
            run_dir,
            runs.TrainRecord(
                **summary,
                base_model=runs.BaseModelRecord(reference=cfg.model.name, path=str(loaded.path), fingerprint=loaded.fingerprint),
                data=data_info,
                config=cfg.model_dump(mode="json"),
                versions=versions,
                seed=t.seed,
                precision="bf16" if bf16 else "fp32",
                compiled=compiled,
                world_size=world,
                parallel=t.parallel if world > 1 else None,
                hardware=artifacts.hardware_summary(),
                wall_time_s=time.time() - started,
                resumed=resume,
            ),
        )
        console.print(
            f"done: {state['step']} steps, loss {summary['final_loss'] or float('nan'):.4f}"
            + (f", eval loss {last_eval:.4f}" if last_eval is not None else "")
            + f", {summary['tokens_per_s']:.0f} tokens/s -> {out}"
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
