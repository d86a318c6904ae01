"""tunesmith's training loop against TRL's SFTTrainer + PEFT: a matrix of settings, datasets and seeds.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/train_vs_trl.py --out train_matrix.json     # the whole matrix, one run
    .venv/bin/python bench/train_vs_trl.py --table train_matrix.json   # its markdown tables

Rows (each one a child process of its own, so peak RSS is its own; 1 torch thread each):
- `trl-defaults`: SFTTrainer with SFTConfig's defaults (bf16 autocast over fp32 weights,
  gradient checkpointing on, padded batches in random order) besides the shared settings below;
- `trl-best`: SFTTrainer at its best reasonable CPU settings: gradient checkpointing off, the
  dtype whose matmul peak measured faster in this run (this CPU may lack fast bf16), and the
  batching chosen with `--trl-batching` (padded, TRL's length grouping, or padding-free);
- `tunesmith-flat`: tunesmith with `shared_prefix: false`;
- `tunesmith-shared`: tunesmith with `shared_prefix: true` (a prompt prefix every row of a batch
  shares runs once per batch).
Shared settings: the same examples, optimizer steps, batch, max length, LoRA (r=16, alpha=32,
dropout 0, all linear layers) and optimizer (AdamW, lr 2e-4, cosine, no warmup, clip 1.0).

Datasets:
- `clinc`: CLINC150 (../shared/data/clinc150), the 30 intents of banking and credit cards: a
  long system prompt naming the intents (the same for every example), the user's utterance,
  the intent as the answer;
- `medical`: medical abstracts (../shared/data/medical_abstracts), each cut to its first 150
  words, with the condition class as the answer: a distinct long prompt per row; the only
  shared prefix is the chat template's own opening.

Sides run interleaved (seed by seed, dataset by dataset, side by side), so load from other
jobs on the machine drifts over all of them alike.

tokens/s: the tokens of the training examples (prompt + answer as tunesmith tokenises them,
no padding) over the training time (optimizer steps only: no model load, no eval), the same
count for every row. Eval loss: the same fp32 code for every adapter (token mean of the
cross-entropy over the answer and end-of-turn tokens of held-out examples). MFU: matmul FLOPs
over the best matmul peak measured in this run (fp32 and bf16 are both measured, at 1 thread,
at the start and the end), with FLOPs = 4 x (decoder linear parameters) x tokens fed (a forward
and the backward to the activations; the frozen base needs no weight gradients), leaving out
attention scores, the LM head and gradient checkpointing's recompute. Tokens fed: every token of
every example, except that tunesmith-shared counts a prefix shared by a batch once.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TUNESMITH_BENCH_DATA", REPO.parent / "shared" / "data"))  # a copy of the repo elsewhere names it
CLINC = DATA / "clinc150"
MEDICAL = DATA / "medical_abstracts"
DOMAINS = ("banking", "credit_cards")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
OPTIM = {"learning_rate": 2e-4, "weight_decay": 0.0, "max_grad_norm": 1.0}
SIDES = ("trl-defaults", "trl-best", "tunesmith-flat", "tunesmith-shared")
DATASETS = ("clinc", "medical")
ABSTRACT_WORDS = 150


# --- data -----------------------------------------------------------------------------------


def chat(system: str | None, user: str, answer: str) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages}


def clinc_records(train_count: int, eval_count: int) -> tuple[list[dict], list[dict]]:
    """CLINC150 banking + credit cards: one long system prompt listing the intents, shared by every row."""
    domains = json.loads((CLINC / "domains.json").read_text())
    intents = sorted(i for d in DOMAINS for i in domains[d])
    system = (
        "You are the intent router of a bank's assistant. Read the customer's message and answer "
        "with exactly one intent name from this list, nothing else: " + ", ".join(intents) + "."
    )
    full = json.loads((CLINC / "data_full.json").read_text())

    def records(split: str, count: int) -> list[dict]:
        rows = [r for r in full[split] if r[1] in intents]
        random.Random(0).shuffle(rows)
        return [chat(system, text, intent) for text, intent in rows[:count]]

    return records("train", train_count), records("val", eval_count)


def medical_records(train_count: int, eval_count: int) -> tuple[list[dict], list[dict]]:
    """Medical abstracts cut to their first 150 words, the condition class as the answer: no shared system prompt."""
    with open(MEDICAL / "medical_tc_labels.csv", newline="") as f:
        labels = {row["condition_label"]: row["condition_name"] for row in csv.DictReader(f)}
    with open(MEDICAL / "medical_tc_test.csv", newline="") as f:
        rows = [(row["medical_abstract"], labels[row["condition_label"]]) for row in csv.DictReader(f)]
    random.Random(0).shuffle(rows)
    classes = ", ".join(sorted(labels.values()))

    def record(abstract: str, label: str) -> dict:
        text = " ".join(abstract.split()[:ABSTRACT_WORDS])
        return chat(None, f"{text}\n\nWhich condition class is this abstract about ({classes})?", label)

    train = [record(*r) for r in rows[:train_count]]
    held_out = [record(*r) for r in rows[train_count : train_count + eval_count]]
    return train, held_out


def write_dataset(folder: Path, dataset: str, train_count: int, eval_count: int) -> None:
    """The dataset's train.jsonl and eval.jsonl (OpenAI chat) in `folder`."""
    train, held_out = (clinc_records if dataset == "clinc" else medical_records)(train_count, eval_count)
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("eval", held_out)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def example_tokens(model_dir: Path, folder: Path) -> int:
    """Tokens of the training examples as tunesmith tokenises them: every row's tokens/s uses this count."""
    from tunesmith.data import read_conversations
    from tunesmith.formatting import tokenize_dataset
    from tunesmith.models import load_tokenizer

    examples, _ = tokenize_dataset(load_tokenizer(str(model_dir)), read_conversations(folder / "train.jsonl", format="openai"), max_length=10**6)
    return sum(len(e) for e in examples)


# --- one side, in its own process -------------------------------------------------------------


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def eval_loss(model_dir: Path, adapter: Path, folder: Path, max_length: int) -> float:
    """fp32 token-mean cross-entropy of base + adapter on the eval answers (the same code for every row)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.data import read_conversations
    from tunesmith.formatting import collate, tokenize_dataset
    from tunesmith.models import load_tokenizer
    from tunesmith.modeling import loss_at_trained_positions

    tokenizer = load_tokenizer(str(model_dir))
    examples, _ = tokenize_dataset(tokenizer, read_conversations(folder / "eval.jsonl", format="openai"), max_length=max_length)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(examples), 16):
            t = collate(examples, [[i] for i in range(b, min(b + 16, len(examples)))], tokenizer.pad_token_id)
            total += float(loss_at_trained_positions(model, t["input_ids"], t["labels"], t["position_ids"]))
            tokens += t["trained_tokens"]
    return total / tokens


def side_tunesmith(args, model_dir: Path, folder: Path, shared_prefix: bool) -> dict:
    import torch

    from tunesmith import train
    from tunesmith.inference import use_bf16
    from tunesmith.config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "base_dir": str(folder),
            "output_dir": f"tunesmith-{'shared' if shared_prefix else 'flat'}-{args.seed}",
            "model": {"name": str(model_dir)},
            "data": {"train": "train.jsonl", "max_length": args.max_length},
            "train": {
                "method": "lora",
                "lora": LORA,
                "max_steps": args.steps,
                "batch_size": args.batch,
                "warmup_ratio": 0.0,
                "lr_schedule": "cosine",
                "precision": "auto",
                "shared_prefix": shared_prefix,
                **OPTIM,
                "seed": args.seed,
            },
        }
    )
    summary = train.run(cfg)
    return {
        "train_time_s": summary["train_time_s"],
        "peak_rss_bytes": peak_rss_bytes(),
        "adapter": summary["output"],
        "tokens_fed": summary["tokens_fed"],
        "settings": {"bf16": use_bf16("auto", torch.device("cpu")), "shared_prefix": shared_prefix},
    }


def trl_config(args, folder: Path, side: str):
    """SFTConfig of a TRL row: the shared settings, plus (trl-best) the speed settings."""
    from trl import SFTConfig

    shared = dict(
        output_dir=str(folder / f"{side}-{args.seed}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        seed=args.seed,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        **OPTIM,
    )
    if side == "trl-defaults":
        return SFTConfig(**shared)
    best = dict(gradient_checkpointing=False)
    if args.trl_dtype == "bf16":  # bf16 weights and autocast
        best |= dict(bf16=True, model_init_kwargs={"dtype": "bfloat16"})
    else:  # fp32 weights, no autocast
        best |= dict(bf16=False, model_init_kwargs={"dtype": "float32"})
    if args.trl_batching == "padding_free":
        best["padding_free"] = True
    elif args.trl_batching == "group_by_length":
        best["train_sampling_strategy"] = "group_by_length"
    return SFTConfig(**shared, **best)


def side_trl(args, model_dir: Path, folder: Path, side: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    # Prompt-completion form: TRL computes the loss on the completion (the assistant turn) only.
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    config = trl_config(args, folder, side)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=dataset, peft_config=peft_config, processing_class=tokenizer)
    out = trainer.train()
    rss = peak_rss_bytes()
    adapter = folder / f"{side}-{args.seed}-adapter"
    trainer.model.save_pretrained(adapter)
    keys = ("bf16", "gradient_checkpointing", "completion_only_loss", "packing", "padding_free", "train_sampling_strategy", "model_init_kwargs")
    settings = {k: getattr(config, k, None) for k in keys}
    settings["weights_dtype"] = str(next(trainer.model.get_base_model().parameters()).dtype)
    return {"train_time_s": out.metrics["train_runtime"], "peak_rss_bytes": rss, "adapter": str(adapter), "settings": settings}


def run_side(args) -> dict:
    """A child: train one side on one dataset and seed, then its adapter's eval loss (after peak RSS is taken)."""
    from tunesmith.models import resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    folder = Path(args.workdir)
    if args.side.startswith("trl"):
        result = side_trl(args, model_dir, folder, args.side)
    else:
        result = side_tunesmith(args, model_dir, folder, shared_prefix=args.side == "tunesmith-shared")
    result["eval_loss"] = eval_loss(model_dir, Path(result["adapter"]), folder, args.max_length)
    return result


# --- the matrix -------------------------------------------------------------------------------


def matmul_peak_flops(dtype_name: str, size: int = 1024, seconds: float = 2.0) -> float:
    """Best FLOP/s of a size^2 `F.linear` (the kernel the models' projections run) in `dtype_name`.

    F.linear, not `a @ b`: on a CPU without native bf16 the bf16 matmul takes a path ~10x slower
    than oneDNN's bf16 linear, which is what training runs.
    """
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x, w = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    F.linear(x, w)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        F.linear(x, w)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def measure_peaks() -> dict[str, float]:
    return {name: matmul_peak_flops(name) / 1e9 for name in ("fp32", "bf16")}


def decoder_linear_params(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name)


def spawn_side(args, side: str, folder: Path, seed: int, steps: int) -> dict:
    command = [
        sys.executable, __file__, "--side", side, "--workdir", str(folder), "--steps", str(steps),
        "--batch", str(args.batch), "--max-length", str(args.max_length), "--threads", str(args.threads),
        "--seed", str(seed), "--trl-dtype", args.trl_dtype, "--trl-batching", args.trl_batching,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} (seed {seed}, {folder.name}) failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["load_average"] = os.getloadavg()
    return result


def side_steps(args, side: str) -> int:
    """trl-defaults may run fewer steps (its bf16 autocast is very slow on a CPU without native bf16): speed only."""
    return args.trl_defaults_steps if side == "trl-defaults" and args.trl_defaults_steps else args.steps


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def run_matrix(args) -> dict:
    import torch

    from tunesmith.models import resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    peaks_start = measure_peaks()
    if args.trl_dtype == "auto":  # TRL's best dtype: the one whose matmul runs faster here
        args.trl_dtype = "bf16" if peaks_start["bf16"] > peaks_start["fp32"] else "fp32"
    root = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    report = {
        "command": " ".join(sys.argv),
        "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "eval_count": args.eval_count,
        "threads": args.threads, "seeds": args.seeds, "trl_defaults_steps": side_steps(args, "trl-defaults"), "sides": args.sides, "datasets": {},
        "trl_best": {"dtype": args.trl_dtype, "batching": args.trl_batching, "gradient_checkpointing": False},
        "peaks_gflops": {"start": peaks_start}, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "decoder_linear_params": decoder_linear_params(model_dir), "runs": [],
    }
    for dataset in args.datasets:
        write_dataset(root / dataset, dataset, args.steps * args.batch, args.eval_count)
        report["datasets"][dataset] = {"train_tokens": example_tokens(model_dir, root / dataset), "train_examples": args.steps * args.batch}
    for seed in args.seeds:
        for dataset in args.datasets:
            for side in args.sides:
                steps = side_steps(args, side)
                if side == "trl-defaults" and args.trl_defaults_seeds is not None and seed not in args.trl_defaults_seeds:
                    continue
                result = spawn_side(args, side, root / dataset, seed, steps)
                # A shorter run trained fewer examples: its token count scales with its steps.
                tokens = report["datasets"][dataset]["train_tokens"] * steps / args.steps
                result |= {"side": side, "dataset": dataset, "seed": seed, "steps": steps, "train_tokens": tokens}
                result.setdefault("tokens_fed", tokens)
                report["runs"].append(result)
                print(f"{dataset} seed {seed} {side}: {tokens / result['train_time_s']:.0f} tokens/s, "
                      f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, eval loss {result['eval_loss']:.4f}", flush=True)
                if args.out:
                    write_json(Path(args.out), report)
    report["peaks_gflops"]["end"] = measure_peaks()
    return report


# --- tables -----------------------------------------------------------------------------------


def run_peaks(report: dict) -> dict[str, float]:
    """The best fp32 and bf16 peaks one invocation measured (at its start and end)."""
    return {name: max(p[name] for p in report["peaks_gflops"].values()) for name in ("fp32", "bf16")}


def summarize(report: dict) -> dict:
    """Per dataset and side: tokens/s (mean, and by seed), peak RSS, eval loss (mean, sd over seeds),
    MFU against the best peak of the run's dtype that any merged invocation measured."""
    peaks = run_peaks(report)
    peak_name = max(peaks, key=peaks.get)
    rows: dict = {}
    for dataset, info in report["datasets"].items():
        for side in report["sides"]:
            runs = [r for r in report["runs"] if r["dataset"] == dataset and r["side"] == side]
            if not runs:
                continue
            times = [r["train_time_s"] for r in runs]
            losses = [r["eval_loss"] for r in runs]
            flops = [4 * report["decoder_linear_params"] * r["tokens_fed"] for r in runs]
            # Each run against the best peak of the dtype it computes in that any invocation measured:
            # a peak measured under load would flatter every run of its invocation.
            run_peak = [peaks["bf16" if r["settings"]["bf16"] else "fp32"] for r in runs]
            rows[(dataset, side)] = {
                "tokens_per_s": statistics.mean(r["train_tokens"] / r["train_time_s"] for r in runs),
                "steps": runs[0]["steps"],
                "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / 2**30,
                "eval_loss_mean": statistics.mean(losses),
                "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
                "mfu": statistics.mean(f / t / 1e9 / p for f, t, p in zip(flops, times, run_peak)),
                "compute_dtype": "bf16" if runs[0]["settings"]["bf16"] else "fp32",
                "tokens_fed_share": statistics.mean(r["tokens_fed"] / r["train_tokens"] for r in runs),
                "seeds": len(runs),
                "eval_losses": losses,
                "tokens_per_s_by_seed": {r["seed"]: r["train_tokens"] / r["train_time_s"] for r in runs},
            }
    return {"peaks": peaks, "peak_name": peak_name, "rows": rows}


def merge(reports: list[dict]) -> dict:
    """One report from several invocations of the same settings (say, the rows that need three seeds
    first, then the speed-only ones): runs and datasets pooled, every measured peak kept."""
    merged = {**reports[0], "runs": [], "datasets": {}, "peaks_gflops": {}, "commands": []}
    for n, report in enumerate(reports):
        for key in ("batch", "max_length", "threads"):
            if report[key] != merged[key]:
                sys.exit(f"cannot merge: {key} differs ({report[key]} against {merged[key]})")
        peaks = run_peaks(report)
        seen = {(run["dataset"], run["side"], run["seed"]) for run in merged["runs"]}
        # A row and seed measured twice counts once: the first file's (name the interleaved matrix first).
        merged["runs"] += [{**run, "peaks_gflops": peaks} for run in report["runs"] if (run["dataset"], run["side"], run["seed"]) not in seen]
        merged["datasets"] |= report["datasets"]
        merged["peaks_gflops"] |= {f"{when} {n}": peaks for when, peaks in report["peaks_gflops"].items()}
        merged["commands"].append(report["command"])
        if any(run["side"] == "trl-best" for run in report["runs"]):
            merged["trl_best"] = report["trl_best"]
        merged["sides"] = list(dict.fromkeys(merged["sides"] + report["sides"]))
        merged["seeds"] = sorted(set(merged["seeds"]) | set(report["seeds"]))
    merged["sides"] = [side for side in SIDES if side in merged["sides"]]
    merged["steps"] = max(run["steps"] for run in merged["runs"])  # rows with fewer are speed only
    return merged


def markdown(report: dict) -> str:
    """The matrix as markdown: one table per dataset, ratios against TRL's best row."""
    s = summarize(report)
    measured = "; ".join(
        f"{when}: fp32 {p['fp32']:.1f}, bf16 {p['bf16']:.1f}" for when, p in report["peaks_gflops"].items()
    )
    lines = [
        f"Matmul peaks measured in this run (GFLOP/s, 1 thread, a 1024^2 `F.linear`): {measured}. "
        f"MFU is against the peak of the dtype the row computes in (in brackets), the best any invocation measured. "
        f"{report['steps']} steps of batch {report['batch']}, "
        f"seeds {', '.join(map(str, report['seeds']))}; trl-best: {report['trl_best']['dtype']}, "
        f"{report['trl_best']['batching']}, no gradient checkpointing.",
        "",
    ]
    for dataset, info in report["datasets"].items():
        best = s["rows"].get((dataset, "trl-best"))
        if not any(key[0] == dataset for key in s["rows"]):
            continue
        lines += [
            f"**{dataset}** ({info['train_examples']} training examples, {info['train_tokens']:,} tokens)",
            "",
            "| row | tokens/s | vs trl-best | by seed | peak RSS | eval loss (mean ± sd, n) | MFU | tokens fed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for side in report["sides"]:
            row = s["rows"].get((dataset, side))
            if row is None:
                continue
            ratio = f"{row['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else ""
            # Each seed's sides ran back to back: their ratio is the one least touched by load drift.
            by_seed = ", ".join(
                f"{tps / best['tokens_per_s_by_seed'][seed]:.2f}x" for seed, tps in sorted(row["tokens_per_s_by_seed"].items())
                if best and seed in best["tokens_per_s_by_seed"]
            )
            loss = f"{row['eval_loss_mean']:.4f} ± {row['eval_loss_sd']:.4f} (n={row['seeds']})" if row["seeds"] > 1 else f"{row['eval_loss_mean']:.4f} (n=1)"
            if row["steps"] != report["steps"]:  # a speed-only row: its adapter saw fewer steps
                loss = f"speed only ({row['steps']} steps, {row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
            lines.append(
                f"| {side} | {row['tokens_per_s']:.0f} | {ratio} | {by_seed} | {row['peak_rss_gib']:.2f} GiB | "
                f"{loss} | {row['mfu']:.1%} ({row['compute_dtype']}) | {row['tokens_fed_share']:.0%} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--eval-count", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side (the machine is shared).")
    parser.add_argument("--trl-dtype", choices=["auto", "fp32", "bf16"], default="auto", help="trl-best's dtype (auto: the faster matmul here).")
    parser.add_argument("--trl-batching", choices=["padded", "group_by_length", "padding_free"], default="padded", help="trl-best's batching.")
    parser.add_argument("--trl-defaults-steps", type=int, help="trl-defaults runs this many steps (speed only; default: --steps).")
    parser.add_argument("--trl-defaults-seeds", type=int, nargs="+", help="trl-defaults runs only these seeds (default: all).")
    parser.add_argument("--out", help="Write the results as JSON here (rewritten after every run).")
    parser.add_argument("--table", nargs="+", help="Print the markdown tables of results JSON files (merged) and exit.")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(markdown(merge([json.loads(Path(path).read_text()) for path in args.table])))
        return

    import torch

    torch.set_num_threads(args.threads)
    if args.side:  # a child: one side, its result as JSON on the last line
        print(json.dumps(run_side(args)))
        return
    for folder in (CLINC if "clinc" in args.datasets else None, MEDICAL if "medical" in args.datasets else None):
        if folder is not None and not folder.exists():
            sys.exit(f"dataset not found at {folder}")
    report = run_matrix(args)
    if args.out:
        write_json(Path(args.out), report)
    print(markdown(report))


if __name__ == "__main__":
    main()
