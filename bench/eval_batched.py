"""Batched evaluation (tunesmith's generation loop) against one-at-a-time `model.generate`.

The workload is what `tunesmith eval` does on a short-answer task: N held-out SMS messages
(../shared/data/sms_spam), each under a system prompt, answered greedily with a few tokens.
Both sides use the same model, dtype, prompts and stop token; the script checks that they
produce the same answers and prints the speed ratio.

    .venv/bin/python bench/eval_batched.py                    # 300 examples, batch 32
    .venv/bin/python bench/eval_batched.py --examples 60      # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch

from tunesmith import evaluate, inference
from tunesmith.models import load_model
from tunesmith.schema import Conversation

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms_spam" / "SMSSpamCollection"
SYSTEM = "Classify the SMS as spam or ham. Answer with one word: spam or ham."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: the benchmark needs the shared sms_spam dataset")
    with open(DATA, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : args.examples + 1]
    convs = [Conversation.from_openai({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}) for label, text in rows]

    dtype = inference.inference_dtype(args.precision)
    loaded = load_model(args.model, dtype=dtype, device="cuda" if torch.cuda.is_available() else None)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [inference.render_ids(tok, evaluate.prompt_messages(c, SYSTEM)) for c in convs]
    stop = inference.stop_token_ids(model, tok)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    device = next(model.parameters()).device

    # Warm-up (first-call allocations) on a few prompts, both paths.
    inference.generate_greedy(model, prompts[:4], max_new_tokens=2, batch_size=4, stop_ids=stop, pad_id=tok.pad_token_id, decode=decode)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=2, do_sample=False)

    start = time.perf_counter()
    batched = inference.generate_greedy(
        model, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_ids=stop, pad_id=tok.pad_token_id, decode=decode
    )
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    sequential = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id)
            sequential.append(decode(out[0, len(ids):].tolist()).strip())
    sequential_s = time.perf_counter() - start

    same = sum(g.text == s for g, s in zip(batched, sequential))
    accuracy = sum(g.text.strip().lower() == c.target for g, c in zip(batched, convs)) / len(convs)
    result = {
        "examples": len(prompts),
        "model": args.model,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "batched_s": round(batched_s, 2),
        "one_at_a_time_generate_s": round(sequential_s, 2),
        "speedup": round(sequential_s / batched_s, 2),
        "identical_answers": f"{same}/{len(prompts)}",
        "zero_shot_accuracy": round(accuracy, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
