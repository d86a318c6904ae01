"""`tunesmith data estimate`: tokens, FLOPs, time and money of a fine-tune, before spending any.

Each number says how it was obtained:

1. Tokens come from the training code's own tokenisation (`formatting.tokenize_conversation`:
   the model's chat template, the loss mask, truncation to max_length), so "trained tokens" is
   exactly what the loss will see. Per epoch, then times epochs.
2. FLOPs are counted from the model's shapes (built on the meta device: no weights are read)
   with the formula of the method, written out in `training_flops`.
3. Time on this machine divides those FLOPs by a FLOP/s measured with a few real training steps
   of the real model (bf16 autocast where the hardware supports it, as training does). The
   measurement is cached in $TUNESMITH_HOME/calibration.json, keyed by model fingerprint,
   method, torch threads and hardware, because it costs seconds to minutes.
4. Time on common GPUs divides the FLOPs by published peak dense bf16 FLOP/s times a stated
   utilisation: an order of magnitude, not a promise.
5. Memory per method (LoRA, QLoRA, full) follows how tunesmith's training stores each part
   (`modeling.load_for_training`): weights, gradients and AdamW state by dtype, activations of
   one batch, a fixed overhead; compared with 24, 40 and 80 GB GPUs and this machine's RAM.
6. The OpenAI bill multiplies billed tokens by epochs by a dated price table kept in the
   repository (prices.json), never fetched.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.humanize import duration_text, plural

METHODS = ("lora", "qlora", "full")
CALIBRATION_FILE = "calibration.json"
# The calibration batch: big enough that matmuls dominate, small enough to take seconds on a CPU.
CALIBRATION_BATCH = 4
CALIBRATION_SEQ_LEN = 256
CALIBRATION_STEPS = 3  # measured, after one warm-up step that is not
DEFAULT_UTILISATION = 0.35
# A shared prompt start worth a word in the estimate: this long, and this share of the fed tokens.
SHARED_PROMPT_MIN_TOKENS = 64
SHARED_PROMPT_MIN_SHARE = 0.25
PRICES_FILE = Path(__file__).with_name("prices.json")

# Published peak dense (no sparsity) tensor-core FLOP/s for bf16 with fp32 accumulation.
GPUS: list[dict[str, Any]] = [
    {"name": "T4", "memory_gb": 16, "peak_flops": 65e12,
     "note": "fp16 tensor cores (Turing has no bf16)", "source": "NVIDIA T4 datasheet"},
    {"name": "L4", "memory_gb": 24, "peak_flops": 121e12, "source": "NVIDIA L4 datasheet (242 with sparsity)"},
    {"name": "A10G", "memory_gb": 24, "peak_flops": 70e12,
     "source": "AWS G5 / baseten.co 'NVIDIA A10 vs A10G' (the A10 datasheet says 125)"},
    {"name": "A100-40GB", "memory_gb": 40, "peak_flops": 312e12, "source": "NVIDIA A100 datasheet"},
    {"name": "A100-80GB", "memory_gb": 80, "peak_flops": 312e12, "source": "NVIDIA A100 datasheet"},
    {"name": "H100 SXM", "memory_gb": 80, "peak_flops": 989e12, "source": "NVIDIA H100 datasheet (1,979 with sparsity)"},
    {"name": "H200", "memory_gb": 141, "peak_flops": 989e12, "source": "NVIDIA H200 datasheet (1,979 with sparsity)"},
    {"name": "RTX 4090", "memory_gb": 24, "peak_flops": 165.2e12,
     "source": "NVIDIA Ada Lovelace whitepaper (fp32 accumulate; 330 with fp16 accumulate)"},
]

# Memory: bytes per parameter as training stores it (modeling.load_for_training).
ADAM_TRAINED_BYTES = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW's two fp32 moments
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights plus one fp32 absmax per block of 64
MEMORY_OVERHEAD_BYTES = 1.0e9  # CUDA context or the Python/torch runtime, and allocator slack
# Activations kept for backward, per token per layer, in units of the hidden size (Korthikanti et
# al. 2022, 34*h bytes at 2 bytes an element, with a fused attention that stores no T^2 scores).
ACTIVATION_ELEMENTS_PER_HIDDEN = 17
MEMORY_TARGETS_GB = (24, 40, 80)
MEMORY_NOTE = (
    "weights, gradients and AdamW state as tunesmith stores them (full: fp32 weights + gradients + "
    "2 moments = 16 bytes/parameter; lora: frozen linears bf16 on a GPU, fp32 on a CPU without bf16, "
    "adapters 16 bytes/parameter; qlora: frozen linears 4-bit NF4), activations of one batch of "
    "the longest examples (no gradient checkpointing, fused attention) and 1 GB overhead; "
    "fits = at most 90% of the memory"
)

FORMULAS = {
    "full": "6*N_body*fed + 6*N_head*trained + 12*L*d_attn*sum(T^2)",
    "lora": "(2+2)*N_body*fed + (2+2)*N_head*trained + 6*N_adapter*fed + 12*L*d_attn*sum(T^2)",
}
FORMULA_NOTES = {
    "full": "forward 2N, backward 4N (activation and weight gradients) per token",
    "lora": "forward 2N + backward through the frozen weights 2N (activation gradients only, no weight "
    "gradients) per token, plus the adapters' forward 2P and backward 4P",
    "common": "N_body: the decoder's linear weights, run at every fed token, except that a prompt start every "
    "example shares runs once per batch (train.shared_prefix: 'fed' is the computed tokens); N_head: the output projection, "
    "which tunesmith's loss runs only at trained positions; attention scores and values cost 4*L*d_attn*T "
    "per token forward (x3 with backward), T the example's length. Padding, embeddings lookups, norms and "
    "the optimizer step are left out; gradient checkpointing would add one forward (2N per token).",
}


# --------------------------------------------------------------------------------------------
# The model's shape and the FLOP formula


def model_shape(folder: Path, method: str, lora_r: int, target_modules: list[str] | str) -> dict[str, int]:
    """Parameter counts that the FLOP formula needs, from the model's config (meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    body = adapter = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        body += module.weight.numel()
        # peft's "all-linear" is every linear layer but the output head; a list matches name suffixes.
        targeted = target_modules == "all-linear" or name.split(".")[-1] in target_modules
        if method != "full" and targeted:
            adapter += lora_r * (module.in_features + module.out_features)
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "body_params": body,
        "head_params": head.weight.numel() if head is not None else 0,
        "adapter_params": adapter,
        "layers": getattr(text, "num_hidden_layers", 0) or 0,
        "hidden_size": getattr(text, "hidden_size", 0) or 0,
        "attention_width": heads * head_dim,
        "max_positions": getattr(text, "max_position_embeddings", 0) or 0,
        "vocab_size": getattr(text, "vocab_size", 0) or 0,
    }


def training_flops(shape: dict[str, int], method: str, fed_tokens: float, trained_tokens: float, sum_squared_lengths: float) -> dict[str, float]:
    """Training FLOPs of the method (see FORMULAS): matmul and attention terms and their sum."""
    attention = 12 * shape["layers"] * shape["attention_width"] * sum_squared_lengths
    if method == "full":
        matmul = 6 * shape["body_params"] * fed_tokens + 6 * shape["head_params"] * trained_tokens
        adapters = 0.0
    else:
        # Frozen weights: forward 2N, backward 2N (gradients of activations only).
        matmul = 4 * shape["body_params"] * fed_tokens + 4 * shape["head_params"] * trained_tokens
        adapters = 6 * shape["adapter_params"] * fed_tokens
    return {"matmul": float(matmul), "adapters": float(adapters), "attention": float(attention), "total": float(matmul + adapters + attention)}


# --------------------------------------------------------------------------------------------
# Calibration: a few real training steps on this machine


def hardware_name() -> str:
    """What the calibration ran on: the GPU's name, or the CPU's model and core count."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{cpu} ({os.cpu_count()} cores)"


def calibration_path() -> Path:
    from tunesmith.artifacts import tunesmith_home

    return tunesmith_home() / CALIBRATION_FILE


def read_calibrations() -> dict[str, Any]:
    try:
        data = json.loads(calibration_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def calibration_key(fingerprint: str, method: str, threads: int, hardware: str) -> str:
    return f"{fingerprint}|{method}|threads={threads}|{hardware}"


def calibrate(model: str, method: str, *, recalibrate: bool = False) -> dict[str, Any]:
    """Measured training throughput of `model` with `method` here; cached unless `recalibrate`."""
    import torch

    from tunesmith.artifacts import write_json_atomic
    from tunesmith.models import fingerprint, resolve_model_dir

    folder = resolve_model_dir(model)
    key = calibration_key(fingerprint(folder), method, torch.get_num_threads(), hardware_name())
    cache = read_calibrations()
    entry = cache.get(key)
    shape_now = {"batch": CALIBRATION_BATCH, "steps": CALIBRATION_STEPS}
    if entry and not recalibrate and all(entry.get(k) == v for k, v in shape_now.items()):
        return {**entry, "cached": True}
    entry = {"key": key, **_measure(folder, method)}
    cache = read_calibrations()  # re-read: another process may have added entries meanwhile
    cache[key] = entry
    write_json_atomic(calibration_path(), cache)
    return {**entry, "cached": False}


def _measure(folder: Path, method: str) -> dict[str, Any]:
    """Time CALIBRATION_STEPS training steps (forward, backward, AdamW) of the real model.

    The model is set up by the training code itself (`modeling.load_for_training`: dtype, PEFT
    wrapping, bf16 autocast decision), and the loss is the training loss, so the measured
    FLOP/s is that of a real step. Inputs are random token ids: speed does not depend on them.
    """
    import torch

    from tunesmith.config import RunConfig
    from tunesmith.inference import use_bf16
    from tunesmith.modeling import autocast, load_for_training, make_loss_module

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    bf16 = use_bf16("auto", device)
    cfg = RunConfig.model_validate({"model": {"name": str(folder)}, "data": {"train": "-"}, "train": {"method": method}})
    shape = model_shape(folder, method, cfg.train.lora.r, cfg.train.lora.target_modules)
    model, _ = load_for_training(cfg, device, bf16)
    loss_module = make_loss_module(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    seq_len = min(CALIBRATION_SEQ_LEN, shape["max_positions"] or CALIBRATION_SEQ_LEN)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (CALIBRATION_BATCH, seq_len), generator=generator).to(device)
    positions = torch.arange(seq_len).expand(CALIBRATION_BATCH, seq_len).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_seconds = []
    for _ in range(1 + CALIBRATION_STEPS):
        sync()
        started = time.perf_counter()
        with autocast(device, bf16):
            loss = loss_module(ids, ids, positions)
        (loss / ids.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        step_seconds.append(time.perf_counter() - started)
    seconds = statistics.median(step_seconds[1:])  # the first step pays one-time setup
    fed = CALIBRATION_BATCH * seq_len
    flops = training_flops(shape, method, fed, CALIBRATION_BATCH * (seq_len - 1), CALIBRATION_BATCH * seq_len**2)["total"]
    del model, optimizer, loss_module
    return {
        "model": str(folder),
        "method": method,
        "torch_threads": torch.get_num_threads(),
        "hardware": hardware_name(),
        "device": device.type,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "batch": CALIBRATION_BATCH,
        "seq_len": seq_len,
        "steps": CALIBRATION_STEPS,
        "step_seconds": [round(s, 4) for s in step_seconds[1:]],
        "seconds_per_step": seconds,
        "tokens_per_s": fed / seconds,
        "flops_per_step": flops,
        "flops_per_s": flops / seconds,
        "torch": torch.__version__,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# Memory


def training_memory_bytes(shape: dict[str, int], method: str, *, batch_size: int, seq_len: int, trained_fraction: float, bf16: bool) -> dict[str, float]:
    """Peak training memory of `method` by part (see MEMORY_NOTE): weights and optimizer, activations, overhead."""
    frozen_linear_bytes = NF4_BYTES if method == "qlora" else (2 if bf16 else 4)
    other_params = shape["total_params"] - shape["body_params"]  # embeddings, norms (fp32 in training)
    if method == "full":
        weights = ADAM_TRAINED_BYTES * shape["total_params"]
    else:
        weights = frozen_linear_bytes * shape["body_params"] + 4 * other_params + ADAM_TRAINED_BYTES * shape["adapter_params"]
    tokens = batch_size * seq_len
    element_bytes = 2 if bf16 else 4
    activations = ACTIVATION_ELEMENTS_PER_HIDDEN * element_bytes * shape.get("hidden_size", 0) * shape["layers"] * tokens
    # The loss runs the output head at trained positions only: fp32 logits and their gradient.
    logits = 2 * 4 * shape["vocab_size"] * tokens * trained_fraction
    total = weights + activations + logits + MEMORY_OVERHEAD_BYTES
    return {"weights_and_optimizer": float(weights), "activations": float(activations + logits), "overhead": MEMORY_OVERHEAD_BYTES, "total": float(total)}


def machine_memory_bytes() -> dict[str, int | None]:
    """This machine's RAM: total and available now (from /proc/meminfo; None where unknown)."""
    info: dict[str, int | None] = {"total": None, "available": None}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info["total" if key == "MemTotal" else "available"] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            info["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return info


def memory_table(shape: dict[str, int], *, batch_size: int, seq_len: int, trained_fraction: float, cpu_bf16: bool, lora_r: int, adapter_shapes: dict[str, int]) -> dict[str, Any]:
    """Memory per method on a GPU (bf16) and here (this CPU's dtype), against 24/40/80 GB and this RAM."""
    ram = machine_memory_bytes()
    rows = []
    for method in METHODS:
        method_shape = {**shape, "adapter_params": adapter_shapes[method]}
        gpu = training_memory_bytes(method_shape, method, batch_size=batch_size, seq_len=seq_len, trained_fraction=trained_fraction, bf16=True)
        here = training_memory_bytes(method_shape, method, batch_size=batch_size, seq_len=seq_len, trained_fraction=trained_fraction, bf16=cpu_bf16)
        rows.append({
            "method": method,
            "gpu_bytes": gpu["total"],
            "gpu_parts": gpu,
            "fits_gpu_gb": {str(gb): gpu["total"] <= 0.9 * gb * 1e9 for gb in MEMORY_TARGETS_GB},
            "here_bytes": here["total"],
            "here_parts": here,
            "fits_here": (here["total"] <= 0.9 * ram["total"]) if ram["total"] else None,
        })
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_r": lora_r,
        "here_precision": "bf16 autocast" if cpu_bf16 else "fp32",
        "ram_bytes": ram["total"],
        "ram_available_bytes": ram["available"],
        "note": MEMORY_NOTE,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------
# Prices


def load_prices(path: Path = PRICES_FILE) -> dict[str, Any]:
    """The dated OpenAI fine-tuning price snapshot kept in the repository."""
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# The estimate


def count_tokens(conversations, tokenizer, max_length: int) -> dict[str, Any]:
    """Fed and trained tokens per epoch as training would see them, with truncation to max_length.

    Each example is tokenised once without a limit (its full length is what OpenAI bills), then
    cut to max_length by training's own `data.truncate` (earlier turns, then the prompt; never
    the final answer: that is the problem `final_answer_too_long`, which training refuses), so
    the trained tokens lost are those training would lose.
    """
    from tunesmith.formatting import tokenize_conversation, truncate_example

    fed = trained = full = squared = truncated = dropped = 0
    longest = 0
    problems: dict[str, list[int | None]] = {}
    common: list[int] | None = None  # the prompt tokens every example starts with
    for conv in conversations:
        example, kinds = tokenize_conversation(tokenizer, conv, max_length=1 << 30)
        common = common_start(common, example.input_ids[: example.shareable_length])
        for kind in kinds:
            problems.setdefault(kind, []).append(conv.source_line)
        length = len(example)
        kept = min(length, max_length)
        trained_kept = example.trained_tokens
        if length > max_length:
            cut, cut_kinds = truncate_example(example, max_length)
            for kind in cut_kinds:
                problems.setdefault(kind, []).append(conv.source_line)
            # Dropping whole earlier exchanges can leave fewer than max_length tokens.
            kept, trained_kept = len(cut), cut.trained_tokens
            truncated += 1
            dropped += example.trained_tokens - trained_kept
        full += length
        fed += kept
        trained += trained_kept
        squared += kept * kept
        longest = max(longest, length)
    return {
        "examples": len(conversations),
        "fed_tokens": fed,
        "trained_tokens": trained,
        "untruncated_tokens": full,
        "sum_squared_lengths": squared,
        "longest_example": longest,
        "truncated_examples": truncated,
        "dropped_trained_tokens": dropped,
        "shared_prompt_tokens": len(common or []),
        "problems": {k: v[:20] for k, v in problems.items()},
    }


def common_start(common: list[int] | None, ids: list[int]) -> list[int]:
    """The longest start `common` (None: no example yet) and `ids` share."""
    if common is None:
        return list(ids)
    n = 0
    for a, b in zip(common, ids):
        if a != b:
            break
        n += 1
    return common[:n]


def shared_prompt_cost(per_epoch: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """What a prompt start shared by every example (a long system prompt) costs per example, and
    what computing it once per batch (train.shared_prefix) saves at a few batch sizes.

    Training shares at least these tokens in every batch (a batch's rows may share more). The
    saving is in fed tokens: the shared start runs once per batch instead of once per row.
    """
    n, shared = per_epoch["examples"], per_epoch["shared_prompt_tokens"]
    own = per_epoch["fed_tokens"] / n - shared
    batch_size = min(batch_size, n)  # one batch holds at most every example
    sizes = sorted({b for b in (1, 4, 8, 16, 32, 64) if b <= n} | {batch_size})
    return {
        "tokens": shared,
        "share_of_fed_tokens": shared * n / per_epoch["fed_tokens"] if per_epoch["fed_tokens"] else 0.0,
        "own_tokens_per_example": own,
        "batch_size": batch_size,
        "fed_tokens_per_example": {b: own + shared / b for b in sizes},
        # What training computes per epoch at batch_size (the estimate's FLOPs and time use it).
        "computed_tokens": round((own + shared / batch_size) * n),
    }


def estimate_file(
    path: str | Path,
    model: str,
    epochs: float,
    *,
    max_length: int = 1024,
    method: str = "lora",
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
    calibrate_here: bool = True,
    recalibrate: bool = False,
    utilisation: float = DEFAULT_UTILISATION,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Tokens, FLOPs, memory and time (here and on common GPUs) and the OpenAI bill of fine-tuning on a file."""
    from tunesmith.config import LoraConfig, TrainConfig
    from tunesmith.data import read_conversations
    from tunesmith.models import fingerprint, load_tokenizer, resolve_model_dir

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    if epochs <= 0:
        raise UserError(f"epochs must be positive, got {epochs}", "pass e.g. --epochs 3")
    if max_length < 8:
        raise UserError(f"max length {max_length} is too small", "pass --max-length 8 or more (1024 is the config default)")
    if not 0 < utilisation <= 1:
        raise UserError(f"utilisation {utilisation} is outside (0, 1]", "pass e.g. --utilisation 0.35")

    # Data first: a broken file is refused before the model costs anything.
    conversations = read_conversations(path, format, input_col, output_col, system_prompt)
    if not conversations:
        raise UserError(f"{path} holds no examples", f"run `tunesmith data check {path}`")
    folder = resolve_model_dir(model)
    tokenizer = load_tokenizer(str(folder))
    per_epoch = count_tokens(conversations, tokenizer, max_length)

    batch_size = batch_size or TrainConfig().batch_size
    shared_prompt = shared_prompt_cost(per_epoch, batch_size)
    lora = LoraConfig()
    shape = model_shape(folder, method, lora.r, lora.target_modules)
    # train.shared_prefix (the default) runs a prompt start shared by a batch once per batch.
    flops_per_epoch = training_flops(shape, method, shared_prompt["computed_tokens"], per_epoch["trained_tokens"], per_epoch["sum_squared_lengths"])
    total_flops = flops_per_epoch["total"] * epochs

    result: dict[str, Any] = {
        "file": str(path),
        "model": model,
        "model_fingerprint": fingerprint(folder),
        "method": method,
        "epochs": epochs,
        "max_length": max_length,
        "tokens": {
            "per_epoch": per_epoch,
            "total": {
                "fed_tokens": round(per_epoch["fed_tokens"] * epochs),
                "trained_tokens": round(per_epoch["trained_tokens"] * epochs),
            },
        },
        "model_shape": {**shape, "lora_r": lora.r if method != "full" else None, "lora_target_modules": lora.target_modules if method != "full" else None},
        "flops": {
            "per_epoch": flops_per_epoch["total"],
            "total": total_flops,
            "terms_per_epoch": flops_per_epoch,
            "formula": FORMULAS["full" if method == "full" else "lora"],
            "formula_note": FORMULA_NOTES["full" if method == "full" else "lora"] + ". " + FORMULA_NOTES["common"],
        },
    }

    import torch

    from tunesmith.inference import use_bf16

    result["shared_prompt"] = shared_prompt
    adapter_params = model_shape(folder, "lora", lora.r, lora.target_modules)["adapter_params"] if method == "full" else shape["adapter_params"]
    result["memory"] = memory_table(
        shape, batch_size=batch_size, seq_len=min(max_length, per_epoch["longest_example"]),
        trained_fraction=per_epoch["trained_tokens"] / max(per_epoch["fed_tokens"], 1), cpu_bf16=use_bf16("auto", torch.device("cpu")),
        lora_r=lora.r, adapter_shapes={"lora": adapter_params, "qlora": adapter_params, "full": 0},
    )

    if calibrate_here:
        calibration = calibrate(model, method, recalibrate=recalibrate)
        result["this_machine"] = {
            "calibration": calibration,
            "seconds_per_epoch": flops_per_epoch["total"] / calibration["flops_per_s"],
            "seconds": total_flops / calibration["flops_per_s"],
        }
    else:
        result["this_machine"] = None

    result["gpus"] = {
        "utilisation": utilisation,
        "note": "time = FLOPs / (published peak dense bf16 FLOP/s x utilisation), training steps only: "
        "loading the model, the baselines' and the evaluation's generation are not included; memory: see the memory table",
        "rows": [
            {**gpu, "seconds": total_flops / (gpu["peak_flops"] * utilisation)}
            for gpu in GPUS
        ],
    }

    prices = load_prices()
    billed_per_epoch = per_epoch["untruncated_tokens"]
    billed_total = round(billed_per_epoch * epochs)
    result["openai"] = {
        "snapshot_date": prices["snapshot_date"],
        "source": prices["source"],
        "note": f"prices are a dated snapshot ({prices['snapshot_date']}), not live. Billed tokens are counted "
        f"with {model}'s tokenizer and chat template, not OpenAI's (o200k_base for GPT-4o/4.1): expect a "
        "difference of some percent.",
        "billed_tokens_per_epoch": billed_per_epoch,
        "billed_tokens": billed_total,
        "rows": [
            {"model": name, "usd_per_1m_tokens": price, "usd": billed_total * price / 1e6}
            for name, price in prices["usd_per_1m_training_tokens"].items()
        ],
    }
    return result


# --------------------------------------------------------------------------------------------
# The terminal report


def human_seconds(seconds: float) -> str:
    """`3 min 20 s`, `1 h 05 min` (humanize.duration_text); milliseconds below a second."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else "< 1 ms"
    return duration_text(seconds)


def human_bytes(count: float) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.0f} MB"


def render_memory(memory: dict[str, Any], console) -> None:
    """The memory table: each method against 24/40/80 GB GPUs and this machine's RAM."""
    from rich.table import Table

    ram = memory["ram_bytes"]
    table = Table("method", "GPU needs", *[f"{gb} GB" for gb in MEMORY_TARGETS_GB], "here needs", f"RAM {human_bytes(ram)}" if ram else "RAM ?",
                  title=f"training memory, batch {memory['batch_size']} x {memory['seq_len']} tokens: GPUs in bf16, this CPU in {memory['here_precision']}")
    for row in memory["rows"]:
        fits = ["fits" if row["fits_gpu_gb"][str(gb)] else "doesn't" for gb in MEMORY_TARGETS_GB]
        here = "unknown" if row["fits_here"] is None else ("fits" if row["fits_here"] else "doesn't")
        table.add_row(row["method"], human_bytes(row["gpu_bytes"]), *fits, human_bytes(row["here_bytes"]), here)
    console.print(table)
    if memory["ram_available_bytes"]:
        console.print(f"this CPU: {human_bytes(ram)} RAM, {human_bytes(memory['ram_available_bytes'])} free now", markup=False, highlight=False)
    console.print(f"memory: {memory['note']}.", markup=False, highlight=False)


def render_shared_prompt(shared: dict[str, Any], console) -> None:
    """What a long prompt start shared by every example costs, when it is a visible share of the tokens."""
    if shared["tokens"] < SHARED_PROMPT_MIN_TOKENS or shared["share_of_fed_tokens"] < SHARED_PROMPT_MIN_SHARE:
        return
    per_batch = ", ".join(f"{b}: {tokens:,.0f}" for b, tokens in shared["fed_tokens_per_example"].items())
    console.print(
        f"shared prompt: every example starts with the same {shared['tokens']:,} tokens (its system prompt and the "
        f"template), {shared['share_of_fed_tokens']:.0%} of the tokens fed. train.shared_prefix (on by default) computes "
        f"them once per batch, so larger batches amortise them; tokens fed per example by batch size: {per_batch} "
        f"(the FLOPs and times here are at batch {shared['batch_size']}; memory per batch size: see the memory table). "
        f"A fine-tune learns a label set or a format from the answers: with a shorter prompt, or none, an example "
        f"feeds about {shared['own_tokens_per_example']:,.0f} tokens (the tuned model is then prompted the same short way).",
        markup=False, highlight=False,
    )


def human_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def render_estimate(result: dict[str, Any], console) -> None:
    """Print an estimate: tokens, FLOPs, time here and on GPUs, the OpenAI bill."""
    from rich.table import Table

    per_epoch, total = result["tokens"]["per_epoch"], result["tokens"]["total"]
    shape, flops = result["model_shape"], result["flops"]
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_row("file", f"{result['file']}: {per_epoch['examples']:,} examples, longest {per_epoch['longest_example']:,} tokens")
    summary.add_row("model", f"{result['model']} ({shape['total_params'] / 1e6:.1f} M parameters), method {result['method']}"
                    + (f", LoRA r={shape['lora_r']} on {shape['lora_target_modules']}: {shape['adapter_params'] / 1e6:.2f} M adapter parameters" if shape["lora_r"] else ""))
    shared = result["shared_prompt"]
    computed = f" ({shared['computed_tokens']:,} computed: the shared prompt start once per batch of {shared['batch_size']})" if shared["tokens"] and shared["batch_size"] > 1 else ""
    summary.add_row("tokens / epoch", f"{per_epoch['fed_tokens']:,} fed{computed}, {per_epoch['trained_tokens']:,} trained (assistant, weight 1)")
    summary.add_row(f"tokens x {result['epochs']:g} epochs", f"{total['fed_tokens']:,} fed, {total['trained_tokens']:,} trained")
    if per_epoch["truncated_examples"]:
        summary.add_row("max length", f"{plural(per_epoch['truncated_examples'], 'example')} over {result['max_length']}: truncation drops "
                        f"{per_epoch['dropped_trained_tokens']:,} trained tokens per epoch")
    summary.add_row("FLOPs", f"{human_flops(flops['per_epoch'])} per epoch, {human_flops(flops['total'])} in total")
    summary.add_row("formula", flops["formula"])
    here = result["this_machine"]
    if here:
        cal = here["calibration"]
        summary.add_row("this machine", f"{human_seconds(here['seconds'])} ({human_seconds(here['seconds_per_epoch'])} per epoch)")
        summary.add_row("calibration", f"{cal['tokens_per_s']:,.0f} tokens/s, {cal['flops_per_s'] / 1e12:.3g} TFLOP/s measured "
                        f"({cal['batch']}x{cal['seq_len']} tokens, {cal['precision']}, {plural(cal['torch_threads'], 'thread')}, {cal['hardware']}"
                        f"{', cached' if cal['cached'] else ''})")
    console.print(summary, highlight=False)
    render_shared_prompt(result["shared_prompt"], console)
    for problem, lines in per_epoch["problems"].items():
        console.print(f"[yellow]warning:[/] {problem} on {'line' if len(lines) == 1 else 'lines'} {', '.join(str(x) for x in lines)}")

    if result.get("memory"):
        render_memory(result["memory"], console)
    gpus = result["gpus"]
    table = Table("GPU", "memory", "peak bf16", f"time at {gpus['utilisation']:.0%}",
                  title="training time on common GPUs (peak x utilisation; no model load, no evaluation)")
    for row in gpus["rows"]:
        table.add_row(row["name"], f"{row['memory_gb']} GB", f"{row['peak_flops'] / 1e12:g} TFLOP/s", human_seconds(row["seconds"]))
    console.print(table)
    console.print("GPU and this machine's times are training steps only: loading the model, the baselines and the "
                  "evaluation's generation come on top.", markup=False, highlight=False)

    openai = result["openai"]
    table = Table("OpenAI model", "$ / 1M tokens", "bill", title=f"OpenAI fine-tuning: {openai['billed_tokens']:,} billed tokens "
                  f"({openai['billed_tokens_per_epoch']:,} x {result['epochs']:g} epochs), prices of {openai['snapshot_date']}")
    for row in openai["rows"]:
        table.add_row(row["model"], f"{row['usd_per_1m_tokens']:.2f}", f"${row['usd']:,.2f}")
    console.print(table)
    console.print(f"{openai['note']} Source: {openai['source']}", markup=False, highlight=False)
