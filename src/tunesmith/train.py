"""`tunesmith train`: LoRA, QLoRA and full fine-tuning in one plain-torch loop.

Read top to bottom: distributed setup, data (tokenised and checked before any model is
loaded, so a bad mask costs seconds, not a model load), model, optimizer, the data plan,
resume, the loop, the artifacts: `run` at the bottom calls them in that order (`prepare`,
`start_or_resume`, `train_loop`, `save_outputs`), with the loop's state in `TrainingState`.
The data plan is a pure function of (seed, dataset, config), so the data position in a
checkpoint is just the step number, and resuming is exact.
What a checkpoint holds, and how it is written and read back, is in `checkpoints.py`;
the torch.distributed plumbing (DDP/FSDP setup, sums across ranks) in `distributed.py`;
the model set up for a method and its loss in `modeling.py`; the run's record in `runs.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith import artifacts, runs, templates, tracking
from tunesmith.checkpoints import (
    full_model_state,
    full_tensor,
    list_checkpoints,
    load_checkpoint,
    refuse_changed_settings,
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
    IGNORE_INDEX,
    Example,
    collate,
    length_grouped_batches,
    mask_text,
    packed_batches,
    preflight,
)
from tunesmith.humanize import duration_text
from tunesmith.inference import use_bf16
from tunesmith.modeling import autocast, causal_lm, check_loss_matches_model, load_for_training, make_loss_module
from tunesmith.progress import Progress


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

    tokenizer = load_tokenizer(runs.base_model_ref(cfg), **runs.tokenizer_options(cfg, recorded=False))
    train_path, _, files = data_paths(cfg)
    examples, report = preflight(tokenizer, files.read(train_path), cfg.data, str(train_path))
    brackets = not console.is_terminal  # no colour in a file or pipe: mark trained tokens [[ ]]
    if brackets:
        console.print("trained tokens are between [[ and ]]", markup=False, highlight=False)
    for example in examples[:count]:
        console.rule(f"line {example.source_line}: {len(example)} tokens, {example.trained_tokens} trained")
        console.print(mask_text(tokenizer, example, brackets=brackets), markup=False, highlight=False, soft_wrap=True)
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
    of 1 process with batch 4. Every epoch is planned from its own batches, and all of them up
    front: packing after a reshuffle gives each epoch a different number of rows, and the LR
    schedule needs the total number of steps before the first one.
    """

    def __init__(self, examples: list[Example], cfg: RunConfig, world: int, rank: int):
        self.examples, self.cfg, self.world, self.rank = examples, cfg, world, rank
        self.global_batch = cfg.train.batch_size * world
        self.lengths = [len(e) for e in examples]
        self.steps, self.step_epochs = self._plan_steps()
        self.total_steps = len(self.steps)

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """The global micro-batches of one epoch, in order."""
        t = self.cfg.train
        if t.packing:
            return packed_batches(self.lengths, self.global_batch, self.cfg.data.max_length, seed=t.seed, epoch=epoch)
        return length_grouped_batches(self.lengths, self.global_batch, seed=t.seed, epoch=epoch)

    def _plan_steps(self) -> tuple[list[list[list[list[int]]]], list[int]]:
        """(the micro-batches of every step, the epoch of every step): whole epochs until
        `epochs` (the last one partly, when fractional) or `max_steps` is reached."""
        t = self.cfg.train
        ga = t.grad_accum
        steps: list[list[list[list[int]]]] = []
        epochs: list[int] = []
        epoch = 0
        while (len(steps) < t.max_steps) if t.max_steps is not None else (epoch < t.epochs):
            batches = self.epoch_batches(epoch)
            epoch_steps = [batches[b : b + ga] for b in range(0, len(batches), ga)]
            if t.max_steps is None and t.epochs - epoch < 1:
                epoch_steps = epoch_steps[: max(1, math.ceil((t.epochs - epoch) * len(epoch_steps)))]
            steps += epoch_steps
            epochs += [epoch] * len(epoch_steps)
            epoch += 1
        if t.max_steps is not None:
            steps, epochs = steps[: t.max_steps], epochs[: t.max_steps]
        return steps, epochs

    def step(self, step: int) -> list[list[list[int]]]:
        """The global micro-batches of optimizer step `step` (0-based)."""
        return self.steps[step]

    def shard(self, global_batch: list[list[int]]) -> list[list[int]]:
        """This rank's rows of a global micro-batch; empty when a short batch has none left for it."""
        per_rank = math.ceil(len(global_batch) / self.world)
        return global_batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def trained_tokens(self, global_batches: list[list[list[int]]]) -> int:
        return sum(self.examples[i].trained_tokens for batch in global_batches for row in batch for i in row)

    def tokens(self, global_batches: list[list[list[int]]]) -> int:
        return sum(len(self.examples[i]) for batch in global_batches for row in batch for i in row)


def shard_tensors(plan: DataPlan, examples: list[Example], global_batch: list[list[int]], pad_id: int) -> dict[str, Any]:
    """This rank's tensors of a global micro-batch.

    A rank whose share of a short batch is empty still runs a forward and backward (DDP and
    FSDP reduce gradients in collectives every rank joins), on a row with no trained token:
    its loss and gradients are exactly zero, so the step's maths is that of one process.
    Borrowing rows instead would train some examples twice.
    """
    rows = plan.shard(global_batch)
    if rows:
        tensors = collate(examples, rows, pad_id)
        tensors["fed_tokens"] = sum(len(examples[i]) for row in rows for i in row)
        return tensors
    tensors = collate(examples, global_batch[:1], pad_id)
    tensors["labels"].fill_(IGNORE_INDEX)
    return {**tensors, "trained_tokens": 0, "fed_tokens": 0, "fed_tokens_shared": 0}


def plan_settings(cfg: RunConfig, world: int) -> dict[str, Any]:
    """The settings that decide the data plan, the LR schedule and what the saved weights mean,
    by config key: a resumed run must keep them (the global batch, not the process count,
    decides the plan; a LoRA's alpha or dropout changed under its saved weights trains another
    model, silently)."""
    t, d = cfg.train, cfg.data
    lora = {f"train.lora.{key}": value for key, value in t.lora.model_dump(mode="json").items()} if t.method != "full" else {}
    return {
        "train.method": t.method,
        **lora,
        "train.batch_size x processes": t.batch_size * world,
        "train.grad_accum": t.grad_accum,
        "train.max_steps": t.max_steps,
        "train.epochs": t.epochs if t.max_steps is None else None,  # ignored under max_steps
        "train.seed": t.seed,
        "train.packing": t.packing,
        "train.learning_rate": t.learning_rate,
        "train.lr_schedule": t.lr_schedule,
        "train.warmup_ratio": t.warmup_ratio,
        "train.weight_decay": t.weight_decay,
        "data.max_length": d.max_length,
        "data.truncate": d.truncate,
        "data.system_prompt": d.system_prompt,
    }


# --- the model ------------------------------------------------------------------------------


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
    """train/loss.png: report.plot_loss on the metrics rows (the best eval step marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunesmith.report import plot_loss

    series = {
        "train loss": [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None],
        "eval loss": [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None],
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    plot_loss(ax, {name: points for name, points in series.items() if points})
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


def evaluate_loss(loss_module, examples: list[Example], cfg: RunConfig, pad_id: int, device, bf16: bool, world: int, rank: int,
                  lockstep: bool = False, shared_prefix: bool = False) -> float | None:
    """Token-mean cross-entropy on the eval split (trained positions only), sharded over ranks.

    `lockstep` (FSDP, whose forward gathers weights from every rank): each rank runs the same
    number of batches; a rank out of batches runs one more whose loss it does not count.
    `shared_prefix`: a prompt prefix every row of a batch shares runs once per batch, as in
    training (a long system prompt is most of an eval batch's compute otherwise).
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
                    tensors["input_ids"].to(device), tensors["labels"].to(device), tensors["position_ids"].to(device),
                    tensors["shared_prefix_len"] if shared_prefix else 0,
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


def eval_loss_sample(examples: list[Example], cap: int | None, seed: int) -> list[Example]:
    """The held-out examples the in-training eval loss runs on: a seeded sample of at most `cap`
    (the same one at every eval, so the curve compares like with like), in file order. A
    1,000-row held-out set would otherwise cost minutes at every eval."""
    if cap is None or len(examples) <= cap:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), cap))
    return [examples[i] for i in chosen]


def eval_every_steps(cfg: RunConfig, total_steps: int) -> int:
    """Steps between eval losses: `train.eval_every`, else about 10 evals per run."""
    return cfg.train.eval_every or max(1, math.ceil(total_steps / 10))


def refuse_non_finite(step: int, loss: float, grad_norm: float) -> None:
    """Stop at the first non-finite loss or gradient norm, before the update: every later step
    and the saved weights would be NaN, and a finished run's artifact must be a usable one."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise UserError(
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; no adapter or model was written",
            "lower train.learning_rate (or train.lora.alpha), or set train.max_grad_norm; then train again",
        )


def want_compile(setting: str, device) -> bool:
    """`auto`: compile on CUDA only. On CPU the variable sequence lengths make inductor
    recompile for many batches (minutes of compile on this project's 2-core machine), which
    a short fine-tuning run never earns back; `on` forces it."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"


# --- the stage ------------------------------------------------------------------------------


def refuse_replacing_finished_run(cfg: RunConfig, *, resume: bool, force: bool) -> None:
    """A finished run's adapter or model, and its checkpoints, are replaced only when asked:
    training again from step 0 deletes them, and they may be what is deployed."""
    if resume or force:
        return
    for relative in (artifacts.ADAPTER_DIR, artifacts.FULL_MODEL_DIR):
        if (cfg.run_dir / relative).exists():
            raise UserError(
                f"{cfg.run_dir} already holds a trained run ({relative})",
                "pass --force to train again from step 0 (replaces it and its checkpoints), or use another output_dir",
            )


@dataclass
class TrainingState:
    """What the loop carries from step to step. A checkpoint saves it (state.json) and a resume
    reads it back; the last two fields belong to this process's session only."""

    step: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    tokens_fed: int = 0  # what the model ran: a shared prefix counts once per batch
    train_time_s: float = 0.0
    initial_eval_loss: float | None = None
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    eval_time_s: float = 0.0  # spent on eval losses (in this and earlier sessions of the run)
    last_eval_loss: float | None = None
    stopped_early: bool = False

    def to_checkpoint(self) -> dict[str, Any]:
        saved = dataclasses.asdict(self)
        del saved["last_eval_loss"], saved["stopped_early"]
        return saved

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainingState:
        known = {f.name for f in dataclasses.fields(cls)} - {"last_eval_loss", "stopped_early"}
        return cls(**{key: value for key, value in saved.items() if key in known})


@dataclass
class TrainingSetup:
    """What the loop trains with, built once by `prepare`: data, model, its wrappers, optimizer."""

    cfg: RunConfig
    world: int
    rank: int
    device: Any
    fsdp: bool
    bf16: bool
    tokenizer: Any
    train_examples: list[Example]
    eval_examples: list[Example]
    data_info: dict[str, Any]
    model: Any
    loaded: Any
    trainable_count: int
    plan: DataPlan
    loss_module: Any  # the model's loss as one module (evaluation, FSDP's root unit)
    train_module: Any  # the loss module under DDP and/or compile
    compiled: bool
    shared_prefix: bool
    optimizer: Any
    scheduler: Any

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def eval_loss(self) -> float | None:
        return evaluate_loss(self.loss_module, self.eval_examples, self.cfg, self.pad_id, self.device, self.bf16, self.world, self.rank,
                             self.fsdp, self.shared_prefix)


@dataclass
class MetricsLog:
    """The metrics rows so far; rank 0 appends each to metrics.jsonl as it comes."""

    rows: list[dict]
    file: Any = None

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def prepare(cfg: RunConfig, world: int, rank: int, device) -> TrainingSetup:
    """Steps 1-3: the data, checked; the model, seeded; wrapped for the ranks; the optimizer."""
    import torch

    t = cfg.train
    fsdp = world > 1 and t.parallel == "fsdp"  # the config refuses fsdp with qlora

    # 1. Data first: the pre-flight mask check fails in seconds, before a model load.
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(runs.base_model_ref(cfg), **runs.tokenizer_options(cfg, recorded=False))
    train_examples, eval_examples, data_info = load_examples(cfg, tokenizer)
    eval_examples = eval_loss_sample(eval_examples, t.eval_loss_examples, t.seed)
    data_info["eval_loss_examples"] = len(eval_examples)

    # 2. Seeds before the model: LoRA init draws from the torch RNG.
    random.seed(t.seed + rank)
    torch.manual_seed(t.seed)
    bf16 = use_bf16(t.precision, device)
    model, loaded = load_for_training(cfg, device, bf16, fsdp=fsdp)
    # Before any wrapping: FSDP's root unit gathers weights only through the loss module.
    check_loss_matches_model(model, train_examples, tokenizer.pad_token_id, device, bf16)
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
    return TrainingSetup(
        cfg=cfg, world=world, rank=rank, device=device, fsdp=fsdp, bf16=bf16, tokenizer=tokenizer,
        train_examples=train_examples, eval_examples=eval_examples, data_info=data_info, model=model, loaded=loaded,
        trainable_count=trainable_count, plan=plan, loss_module=loss_module, train_module=train_module,
        compiled=compiled, shared_prefix=shared_prefix, optimizer=optimizer, scheduler=scheduler,
    )


def start_or_resume(s: TrainingSetup, resume: bool, console) -> tuple[TrainingState, MetricsLog, bool]:
    """Step 4: (state, metrics log, resumed) from the last checkpoint, or a clean start (stale
    checkpoints of an earlier run would be resumed later, so they go)."""
    ckpt_dir = s.cfg.run_dir / artifacts.CHECKPOINTS_DIR
    metrics_path = s.cfg.run_dir / artifacts.METRICS_FILE
    found = list_checkpoints(ckpt_dir) if resume else []
    if resume and not found:
        console.print(f"no checkpoint in {ckpt_dir}: starting from step 0")
        resume = False
    if resume:
        saved = load_checkpoint(found[-1], s.model, s.optimizer, s.scheduler, s.rank, fsdp_root=s.loss_module if s.fsdp else None)
        if saved.get("train_sha256") not in (None, s.data_info["train_sha256"]):
            raise UserError("the training data changed since the checkpoint was written", "resume with the same data, or start again without --resume")
        refuse_changed_settings(found[-1], saved.get("settings"), plan_settings(s.cfg, s.world))
        console.print(f"resuming from {found[-1].name}")
        state = TrainingState.from_checkpoint(saved)
        metrics = MetricsLog(read_metrics(metrics_path, up_to_step=state.step))
    else:
        state, metrics = TrainingState(), MetricsLog([])
        if s.main_rank:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    if s.main_rank:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_text_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics.rows))
        metrics.file = open(metrics_path, "a", encoding="utf-8")
    return state, metrics, resume


def save_training_checkpoint(s: TrainingSetup, state: TrainingState) -> None:
    """checkpoints/step-N: weights, optimizer, scheduler, every rank's RNG, the loop state."""
    import torch.distributed as dist

    ckpt_dir = s.cfg.run_dir / artifacts.CHECKPOINTS_DIR
    rngs = [rng_state()]
    if s.world > 1:
        rngs = [None] * s.world
        dist.all_gather_object(rngs, rng_state())
    # Under FSDP gathering is a collective every rank joins; under DDP only rank 0 writes.
    weights = trainable_state(s.model) if s.fsdp or s.main_rank else None
    shards = None
    if s.fsdp:
        shards = shards_folder(ckpt_dir, state.step)
        if s.main_rank:
            shutil.rmtree(shards, ignore_errors=True)
        dist.barrier()
        save_optimizer_shards(s.loss_module, s.optimizer, shards)
        dist.barrier()
    if s.main_rank:
        saved = {**state.to_checkpoint(), "train_sha256": s.data_info["train_sha256"], "settings": plan_settings(s.cfg, s.world)}
        save_checkpoint(ckpt_dir, weights, None if s.fsdp else s.optimizer, s.scheduler, rngs, saved, s.cfg.train.keep_checkpoints, shards)
    if s.world > 1:
        dist.barrier()


def announce(s: TrainingSetup, console) -> None:
    """The serving lint (now, not at deployment, when the engines would refuse the adapter), then what trains."""
    t = s.cfg.train
    if t.method != "full":
        peft_config = s.model.peft_config["default"].to_dict()
        for problem in runs.lint_adapter_config(peft_config, causal_lm(s.model).config.model_type):
            console.print(f"[yellow]serving lint:[/yellow] {problem}")
    console.print(
        f"training {t.method} on {s.data_info['train_examples']} examples: {s.plan.total_steps} steps, "
        f"{s.trainable_count:,} trainable parameters, {'bf16' if s.bf16 else 'fp32'}, world {s.world}"
        + (" (fsdp)" if s.fsdp else "")
        + (", compiled" if s.compiled else "")
    )


def train_step(s: TrainingSetup, state: TrainingState) -> dict[str, Any]:
    """One optimizer step (every micro-batch's forward and backward, clip, update): advances
    `state` and returns the step's metrics row.

    The loss of a step is the mean over all trained tokens of its global batch (every
    micro-batch and rank), so accumulation and DDP change nothing in the maths.
    """
    import torch

    step_start = time.perf_counter()
    global_batches = s.plan.step(state.step)
    step_trained = s.plan.trained_tokens(global_batches)
    loss_sum, fed_tokens = 0.0, 0
    for m, global_batch in enumerate(global_batches):
        tensors = shard_tensors(s.plan, s.train_examples, global_batch, s.pad_id)
        sync = m == len(global_batches) - 1 or s.world == 1
        with gradient_sync(s.train_module, sync, s.fsdp), autocast(s.device, s.bf16):
            loss = s.train_module(
                tensors["input_ids"].to(s.device),
                tensors["labels"].to(s.device),
                tensors["position_ids"].to(s.device),
                tensors["shared_prefix_len"] if s.shared_prefix else 0,
            )
        # DDP and FSDP average gradients over ranks; scaling by world makes it the global token mean.
        (loss * s.world / step_trained).backward()
        loss_sum += float(loss.detach())
        fed_tokens += tensors["fed_tokens_shared"] if s.shared_prefix else tensors["fed_tokens"]
    max_norm = s.cfg.train.max_grad_norm
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(s.optimizer.param_groups[0]["params"], max_norm if max_norm else float("inf")))
    # Summed over ranks before the update: every rank sees the same values and stops alike.
    loss_sum, fed_tokens = all_sum([loss_sum, fed_tokens], s.world, s.device)
    refuse_non_finite(state.step + 1, loss_sum / step_trained, float(grad_norm))
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)

    elapsed = time.perf_counter() - step_start
    step_tokens = s.plan.tokens(global_batches)
    state.step += 1
    state.tokens += step_tokens
    state.trained_tokens += step_trained
    state.tokens_fed += int(fed_tokens)
    state.train_time_s += elapsed
    return {
        "step": state.step,
        "loss": loss_sum / step_trained,
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "tokens_per_s": step_tokens / elapsed,
        "trained_tokens_per_s": step_trained / elapsed,
    }


def timed_eval_loss(s: TrainingSetup, state: TrainingState, progress, when: str) -> float | None:
    """The eval loss now, its cost added to `state.eval_time_s` and shown: on a large held-out
    set the evals are a visible share of a run, and the user should see what they cost."""
    start = time.perf_counter()
    loss = s.eval_loss()
    seconds = time.perf_counter() - start
    state.eval_time_s += seconds
    progress.note(f"eval loss {loss:.4f} {when} ({len(s.eval_examples)} held-out examples, {duration_text(seconds)})")
    return loss


def evaluate_and_track(s: TrainingSetup, state: TrainingState, progress) -> float | None:
    """The eval loss now; keeps the best one and stops early after `early_stopping_patience` worse ones."""
    patience = s.cfg.train.early_stopping_patience
    state.last_eval_loss = loss = timed_eval_loss(s, state, progress, f"at step {state.step}")
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss, state.evals_without_improvement = loss, 0
    else:
        state.evals_without_improvement += 1
        if patience and state.evals_without_improvement >= patience:
            state.stopped_early = True
            progress.note(f"early stop at step {state.step}: no better eval loss in {patience} evals")
    return loss


def train_loop(s: TrainingSetup, state: TrainingState, metrics: MetricsLog, console, trackers=None) -> None:
    """Step 5: optimizer steps until the plan ends or early stopping, with evals and checkpoints when due."""
    t = s.cfg.train
    eval_every = eval_every_steps(s.cfg, s.plan.total_steps)
    with Progress("train", s.plan.total_steps, "step", console=console, run_dir=s.cfg.run_dir if s.main_rank else None,
                  done=state.step, enabled=s.main_rank) as progress:
        if s.eval_examples and state.step == 0 and t.initial_eval:
            # Step 0: the base model's eval loss, so the curve shows what training changed.
            state.initial_eval_loss = state.best_eval_loss = timed_eval_loss(s, state, progress, "of the base model")
            metrics.log({"step": 0, "eval_loss": state.initial_eval_loss})
            if trackers:
                trackers.log_metrics({"eval/loss": state.initial_eval_loss}, step=0)
        while state.step < s.plan.total_steps and not state.stopped_early:
            row = train_step(s, state)
            done = state.step == s.plan.total_steps
            if s.eval_examples and (done or state.step % eval_every == 0):
                row["eval_loss"] = evaluate_and_track(s, state, progress)
            metrics.log(row)
            if trackers:
                trackers.log_step(row)
            progress.update(state.step, loss=f"{row['loss']:.4f}", **{"tokens/s": f"{row['tokens_per_s']:.0f}"},
                            **({"eval loss": f"{state.last_eval_loss:.4f}"} if state.last_eval_loss is not None else {}))
            if done or state.stopped_early or (t.save_every and state.step % t.save_every == 0):
                save_training_checkpoint(s, state)
        if s.eval_examples and state.last_eval_loss is None:
            state.last_eval_loss = timed_eval_loss(s, state, progress, f"at step {state.step}")
    metrics.close()


def save_outputs(s: TrainingSetup, metrics: MetricsLog) -> Path | None:
    """Step 6: the adapter or model in standard formats and the loss plot (rank 0; under FSDP
    every rank first takes part in gathering the whole weights). The folder written, on rank 0."""
    whole = None
    if s.fsdp:
        whole = full_model_state(s.model) if s.cfg.train.method == "full" else trainable_state(s.model)
    if not s.main_rank:
        return None
    run_dir = s.cfg.run_dir
    # A run retrained (--force) with another method must not keep the other kind of output:
    # loaders take model_full/ over adapter/, so a stale one would be evaluated and served.
    stale = artifacts.ADAPTER_DIR if s.cfg.train.method == "full" else artifacts.FULL_MODEL_DIR
    shutil.rmtree(run_dir / stale, ignore_errors=True)
    if s.cfg.train.method == "full":
        out = run_dir / artifacts.FULL_MODEL_DIR
        with artifacts.atomic_path(out) as tmp:
            s.model.save_pretrained(tmp, safe_serialization=True, state_dict=whole)
            s.tokenizer.save_pretrained(tmp)
    else:
        out = run_dir / artifacts.ADAPTER_DIR
        with artifacts.atomic_path(out) as tmp:
            s.model.save_pretrained(tmp, safe_serialization=True, state_dict=whole)
    write_loss_plot(metrics.rows, run_dir / artifacts.LOSS_PLOT_FILE)
    return out


def summarize(s: TrainingSetup, state: TrainingState, metrics: MetricsLog, out: Path | None) -> dict[str, Any]:
    """What `run` returns and the manifest records of the training."""
    return {
        "method": s.cfg.train.method,
        "output": str(out) if out is not None else None,
        "steps": state.step,
        "total_steps": s.plan.total_steps,
        "stopped_early": state.stopped_early,
        "final_loss": next((m["loss"] for m in reversed(metrics.rows) if "loss" in m), None),
        "initial_eval_loss": state.initial_eval_loss,
        "final_eval_loss": state.last_eval_loss,
        "best_eval_loss": state.best_eval_loss,
        "tokens_trained": state.tokens,
        "trained_tokens": state.trained_tokens,
        "tokens_fed": state.tokens_fed,  # what the model ran: a shared prefix counts once per batch
        "train_time_s": state.train_time_s,
        "eval_loss_time_s": state.eval_time_s,
        "eval_loss_examples": len(s.eval_examples),
        "tokens_per_s": state.tokens / max(state.train_time_s, 1e-9),
        "trainable_parameters": s.trainable_count,
    }


def write_manifest(s: TrainingSetup, summary: dict[str, Any], started: float, resumed: bool) -> None:
    """The manifest's `train` record: the summary, inputs' hashes, versions, config, hardware."""
    cfg, t, loaded = s.cfg, s.cfg.train, s.loaded
    versions = artifacts.library_versions()
    for dist_name in ("bitsandbytes", "accelerate"):
        try:
            import importlib.metadata as md

            versions[dist_name] = md.version(dist_name)
        except Exception:  # noqa: BLE001 - optional libraries
            pass
    runs.write_train_record(
        cfg.run_dir,
        runs.TrainRecord(
            **summary,
            base_model=runs.BaseModelRecord(reference=cfg.model.name, path=str(loaded.path), fingerprint=loaded.fingerprint),
            data=s.data_info,
            # base_dir is excluded from dumps; the record keeps it so runs.read_run_config
            # resolves the config's relative paths (output_dir, data, model) as training did.
            config={**cfg.model_dump(mode="json"), "base_dir": cfg.base_dir},
            versions=versions,
            chat_template=templates.applied_template(s.tokenizer).record(),
            seed=t.seed,
            precision="bf16" if s.bf16 else "fp32",
            compiled=s.compiled,
            world_size=s.world,
            parallel=t.parallel if s.world > 1 else None,
            hardware=artifacts.hardware_summary(),
            wall_time_s=time.time() - started,
            resumed=resumed,
        ),
    )


def run(cfg: RunConfig, *, resume: bool = False, force: bool = False, console=None) -> dict[str, Any]:
    """Train per `cfg`; write the adapter or model, metrics, loss plot, checkpoints, manifest.

    A run folder that already holds a finished run is refused unless `force` or `resume`.
    """
    import torch.distributed as dist
    from rich.console import Console

    from tunesmith.gguf_export import refuse_unsupported_formats
    from tunesmith.models import resolve_model_dir

    started = time.time()
    refuse_replacing_finished_run(cfg, resume=resume, force=force)
    tracking.check_installed(cfg.report_to)  # a missing tracker library fails before the model loads
    # A requested export the model cannot take is refused now, not after training.
    refuse_unsupported_formats(resolve_model_dir(runs.base_model_ref(cfg), allow_pickle=cfg.model.allow_pickle), cfg.export.formats)
    world, rank, _, device = init_distributed()
    console = console or Console(stderr=True)
    if rank != 0:
        console = Console(quiet=True)

    setup = prepare(cfg, world, rank, device)  # 1-3: data, model, wrappers, optimizer
    state, metrics, resumed = start_or_resume(setup, resume, console)  # 4
    announce(setup, console)
    trackers = tracking.open_for_training(cfg, setup.loaded.fingerprint, resumed=resumed) if setup.main_rank else None
    try:
        train_loop(setup, state, metrics, console, trackers)  # 5
        out = save_outputs(setup, metrics)  # 6
        summary = summarize(setup, state, metrics, out)
    except BaseException:
        if trackers is not None:
            trackers.close()
        raise
    if setup.main_rank:
        write_manifest(setup, summary, started, resumed)
        tracking.log_training_end(trackers, summary, cfg.run_dir / artifacts.LOSS_PLOT_FILE, out)
        console.print(
            f"done: {state.step} steps, loss {summary['final_loss'] or float('nan'):.4f}"
            + (f", eval loss {state.last_eval_loss:.4f}" if state.last_eval_loss is not None else "")
            + f", {summary['tokens_per_s']:.0f} tokens/s, {duration_text(time.time() - started)} wall time"
            + (f" ({duration_text(state.eval_time_s)} of it eval loss)" if state.eval_time_s else "")
            + f" -> {out}"
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
