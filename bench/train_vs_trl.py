"""tunesmith's training loop against TRL's SFTTrainer + PEFT, on the same data and LoRA config.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/train_vs_trl.py                 # 12 steps, batch 8, max length 512

Data: CLINC150 (../shared/data/clinc150), the 30 intents of the banking and credit-card
domains, in chat form: a system prompt naming the intents (the same for every example, as in
domain fine-tuning), the user's utterance, the intent as the answer. Both sides train the
same examples for the same number of optimizer steps with the same LoRA (r=16, alpha=32, all
linear layers) and the same optimizer settings; TRL keeps its usual settings otherwise (bf16,
gradient checkpointing, loss on the completion only). Each side runs in its own process, so
peak RSS is its own. The eval loss of both adapters is measured by the same code: fp32,
mean cross-entropy over the answer tokens (and end-of-turn) of held-out examples.

tokens/s counts the tokens of the training examples (prompt + answer, no padding) over the
training time (optimizer steps only: no model load, no eval), the same count for both.
MFU: matmul FLOPs over the machine's measured bf16 matmul peak (same thread count), with FLOPs =
4 x (decoder linear parameters) x tokens fed (a forward and the backward to the activations;
the frozen base needs no weight gradients), leaving out attention scores, the LM head and
TRL's gradient-checkpointing recompute. Tokens fed: every token of every example for TRL; for
tunesmith a prefix shared by a batch counts once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLINC = REPO.parent / "shared" / "data" / "clinc150"
DOMAINS = ("banking", "credit_cards")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
OPTIM = {"learning_rate": 2e-4, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0}


def write_dataset(folder: Path, train_count: int, eval_count: int) -> None:
    """CLINC150 banking + credit cards as OpenAI chat JSONL (train and eval files)."""
    import random

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
        return [
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": t}, {"role": "assistant", "content": i}]}
            for t, i in rows[:count]
        ]

    for name, split, count in (("train", "train", train_count), ("eval", "val", eval_count)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(split, count)))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def eval_loss(model_dir: Path, adapter: Path, folder: Path, max_length: int) -> float:
    """fp32 token-mean cross-entropy of base + adapter on the eval answers (shared by both sides)."""
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


def example_tokens(model_dir: Path, folder: Path, count: int, max_length: int) -> int:
    from tunesmith.data import read_conversations
    from tunesmith.formatting import tokenize_dataset
    from tunesmith.models import load_tokenizer

    examples, _ = tokenize_dataset(load_tokenizer(str(model_dir)), read_conversations(folder / "train.jsonl", format="openai")[:count], max_length=max_length)
    return sum(len(e) for e in examples)


def side_tunesmith(args, model_dir: Path, folder: Path) -> dict:
    from tunesmith import train
    from tunesmith.config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "base_dir": str(folder),
            "output_dir": "tunesmith-run",
            "model": {"name": str(model_dir)},
            "data": {"train": "train.jsonl", "max_length": args.max_length},
            "train": {
                "method": "lora",
                "lora": LORA,
                "max_steps": args.steps,
                "batch_size": args.batch,
                "warmup_ratio": 0.0,
                "lr_schedule": "cosine",
                "precision": args.precision,
                "compile": args.compile,
                **OPTIM,
                "seed": args.seed,
            },
        }
    )
    summary = train.run(cfg)
    rss = peak_rss_bytes()
    return {"train_time_s": summary["train_time_s"], "peak_rss_bytes": rss, "adapter": summary["output"], "tokens_fed": summary["tokens_fed"]}


def side_trl(args, model_dir: Path, folder: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    # Prompt-completion form: TRL computes the loss on the completion (the assistant turn) only.
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    config = SFTConfig(
        output_dir=str(folder / "trl-run"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        learning_rate=OPTIM["learning_rate"],
        weight_decay=OPTIM["weight_decay"],
        max_grad_norm=OPTIM["max_grad_norm"],
        seed=args.seed,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=dataset, peft_config=peft_config, processing_class=tokenizer)
    out = trainer.train()
    rss = peak_rss_bytes()
    adapter = folder / "trl-adapter"
    trainer.model.save_pretrained(adapter)
    settings = {k: getattr(config, k) for k in ("bf16", "gradient_checkpointing", "completion_only_loss", "packing", "padding_free")}
    return {"train_time_s": out.metrics["train_runtime"], "peak_rss_bytes": rss, "adapter": str(adapter), "settings": settings}


def bf16_matmul_peak_flops() -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * 2048**3 / (time.perf_counter() - start))
    return best


def decoder_linear_params(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--eval-count", type=int, default=64)
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="tunesmith's train.compile")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both sides (LoRA init, data order).")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="tunesmith's train.precision")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side (the machine is shared).")
    parser.add_argument("--only", choices=["tunesmith", "trl"], help="Run one side (default: both).")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from tunesmith.models import resolve_model_dir

    import torch

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    if args.side:  # a child: train one side, print its result as JSON on the last line
        folder = Path(args.workdir)
        result = side_tunesmith(args, model_dir, folder) if args.side == "tunesmith" else side_trl(args, model_dir, folder)
        print(json.dumps(result))
        return

    if not CLINC.exists():
        sys.exit(f"CLINC150 not found at {CLINC}")
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    write_dataset(folder, args.steps * args.batch, args.eval_count)
    tokens = example_tokens(model_dir, folder, args.steps * args.batch, args.max_length)
    linear_params = decoder_linear_params(model_dir)
    peak = bf16_matmul_peak_flops()
    results = {}
    for side in [args.only] if args.only else ["tunesmith", "trl"]:
        command = [sys.executable, __file__, "--side", side, "--workdir", str(folder), "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length), "--compile", args.compile, "--threads", str(args.threads), "--seed", str(args.seed), "--precision", args.precision]
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)})
        if proc.returncode != 0:
            sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["tokens_per_s"] = tokens / result["train_time_s"]
        # What the model ran: TRL every token of every row; tunesmith a shared prefix once per batch.
        result.setdefault("tokens_fed", tokens)
        result["mfu"] = 4 * linear_params * result["tokens_fed"] / result["train_time_s"] / peak
        result["eval_loss"] = eval_loss(model_dir, Path(result["adapter"]), folder, args.max_length)
        results[side] = result
        print(f"{side}: {result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, eval loss {result['eval_loss']:.4f}, MFU {result['mfu']:.1%}", flush=True)

    report = {
        "steps": args.steps,
        "batch": args.batch,
        "max_length": args.max_length,
        "train_tokens": tokens,
        "bf16_matmul_peak_gflops": peak / 1e9,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "seed": args.seed,
        "load_average": os.getloadavg(),
        "results": results,
    }
    if len(results) == 2:
        a, b = results["tunesmith"], results["trl"]
        report["ratios"] = {
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
            "peak_rss": a["peak_rss_bytes"] / b["peak_rss_bytes"],
            "eval_loss": a["eval_loss"] / b["eval_loss"],
        }
        print(f"ratios tunesmith/TRL: tokens/s {report['ratios']['tokens_per_s']:.2f}x, peak RSS {report['ratios']['peak_rss']:.2f}x, eval loss {report['ratios']['eval_loss']:.3f}x")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
