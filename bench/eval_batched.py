"""Batched evaluation (tunesmith's generation loop) against its previous loop and one-at-a-time `model.generate`.

Three workloads, each what `tunesmith eval` does on a short-answer task, greedy:

- `sms`: N held-out SMS messages (../shared/data/sms_spam) under a one-line system prompt.
- `long-prompt`: a label-listing system prompt of ~600 tokens (CLINC150's intent names,
  ../shared/data/clinc150) shared by every row, then a short user turn: the regime where the
  shared prefix dominates, as in an intent-classification eval.
- `flat`: distinct ~150-word medical abstracts (../shared/data/medical_abstracts), nothing shared
  (the shared-prefix path is turned off), as a contrast.

Three sides in one process, back to back, same model, dtype, prompts and stop tokens:
the two-part attention loop (today's `generate_greedy`), the loop before it (`two_part=False`:
the model's own forward, the prefix's cache copied into each batch, a DynamicCache
re-concatenated every step), and a `model.generate` call per example. It checks the answers
agree and prints the speed ratios.

    .venv/bin/python bench/eval_batched.py --case long-prompt --precision fp32 --threads 1 --repeats 2
    .venv/bin/python bench/eval_batched.py --case flat --precision fp32 --threads 1
    .venv/bin/python bench/eval_batched.py                    # sms: 300 examples, batch 32
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMS = SHARED / "sms_spam" / "SMSSpamCollection"
CLINC = SHARED / "clinc150" / "data_full.json"
ABSTRACTS = SHARED / "medical_abstracts" / "medical_tc_test.csv"
SMS_SYSTEM = "Classify the SMS as spam or ham. Answer with one word: spam or ham."
CASE_DEFAULTS = {"sms": (300, 8), "long-prompt": (32, 16), "flat": (32, 16)}  # (examples, max new tokens)


def workload(case: str, examples: int, tokenizer) -> tuple[list[Conversation], str | None]:
    """(conversations, system prompt) of a case."""
    for path in (SMS, CLINC, ABSTRACTS):
        if not path.exists():
            raise SystemExit(f"{path} is absent: the benchmark needs the shared datasets")
    turn = lambda user, answer: Conversation.from_openai({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})  # noqa: E731
    if case == "sms":
        with open(SMS, encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : examples + 1]
        return [turn(text, label) for label, text in rows], SMS_SYSTEM
    if case == "long-prompt":
        data = json.loads(CLINC.read_text())
        intents = sorted({intent for _, intent in data["train"]})
        system = "Classify the user's request into exactly one of these intents and answer with the intent name only.\nIntents: "
        while len(tokenizer(system + ", ".join(intents))["input_ids"]) > 600:  # ~600 tokens of labels
            intents.pop()
        test = [row for row in data["test"] if row[1] in intents]
        stride = max(1, len(test) // examples)
        return [turn(text, intent) for text, intent in test[::stride][:examples]], system + ", ".join(intents)
    with open(ABSTRACTS, encoding="utf-8") as f:
        rows = list(csv.reader(f))[1 : examples + 1]
    return [turn("Which condition does this abstract describe?\n" + " ".join(text.split()[:150]), label) for label, text in rows], None


def timed(fn):
    """(result, wall seconds, this process's CPU seconds): on a shared machine the CPU time is the
    steadier measure of the work (one torch thread, so it is not summed over threads)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASE_DEFAULTS), default="sms")
    parser.add_argument("--examples", type=int, default=None, help="rows (default: 300 for sms, 32 otherwise)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 for sms, 16 otherwise")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=1, help="run the two batched sides alternately N times; the fastest of each counts")
    parser.add_argument("--skip-generate", action="store_true", help="leave out the one-at-a-time side")
    parser.add_argument("--generate-rows", type=int, default=None, help="one-at-a-time side on the first N rows only (its time scaled to all rows)")
    args = parser.parse_args()
    examples = args.examples or CASE_DEFAULTS[args.case][0]
    max_new_tokens = args.max_new_tokens or CASE_DEFAULTS[args.case][1]
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = inference.inference_dtype(args.precision)
    loaded = load_model(args.model, dtype=dtype, device="cuda" if torch.cuda.is_available() else None)
    model, tok = loaded.model, loaded.tokenizer
    convs, system = workload(args.case, examples, tok)
    prompts = [inference.render_ids(tok, evaluate.prompt_messages(c, system)) for c in convs]
    stop = inference.stop_token_ids(model, tok)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    device = next(model.parameters()).device
    share_prefix = args.case != "flat"
    batched = lambda two_part: inference.generate_greedy(  # noqa: E731
        model, prompts, max_new_tokens=max_new_tokens, batch_size=args.batch_size, stop_ids=stop,
        pad_id=tok.pad_token_id, decode=decode, share_prefix=share_prefix, two_part=two_part,
    )

    def one_at_a_time() -> list[str]:
        answers = []
        with torch.inference_mode():
            for ids in prompts[: args.generate_rows]:
                x = torch.tensor([ids], device=device)
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id)
                answers.append(decode(out[0, len(ids):].tolist()).strip())
        return answers

    # Warm-up (first-call allocations) on a few prompts, every side.
    for two_part in (True, False):
        inference.generate_greedy(model, prompts[:4], max_new_tokens=2, batch_size=4, stop_ids=stop, pad_id=tok.pad_token_id, decode=decode, two_part=two_part)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=2, do_sample=False)

    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for side in (True, False):
            runs[side].append(timed(lambda: batched(side)))
    (two_part, two_part_s, two_part_cpu_s), (previous, previous_s, previous_cpu_s) = (min(runs[side], key=lambda r: r[2]) for side in (True, False))
    sequential, sequential_s, sequential_cpu_s = ([], 0.0, 0.0) if args.skip_generate else timed(one_at_a_time)

    accuracy = sum(g.text.strip().lower() == c.target.lower() for g, c in zip(two_part, convs)) / len(convs)
    result = {
        "case": args.case,
        "examples": len(prompts),
        "model": args.model,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "max_new_tokens": max_new_tokens,
        "shared_prefix_tokens": inference.shared_prefix_length(prompts) if share_prefix else 0,
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "mean_new_tokens": round(sum(len(g.token_ids) for g in two_part) / len(two_part), 1),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "two_part_s": round(two_part_s, 2),
        "previous_batched_s": round(previous_s, 2),
        "speedup_vs_previous_batched": round(previous_s / two_part_s, 2),
        "two_part_cpu_s": round(two_part_cpu_s, 2),
        "previous_batched_cpu_s": round(previous_cpu_s, 2),
        "speedup_vs_previous_batched_cpu": round(previous_cpu_s / two_part_cpu_s, 2),
        "identical_tokens_vs_previous_batched": f"{sum(a.token_ids == b.token_ids for a, b in zip(two_part, previous))}/{len(prompts)}",
        "accuracy": round(accuracy, 3),
    }
    if not args.skip_generate:
        scale = len(prompts) / len(sequential)
        result |= {
            "generate_rows": len(sequential),
            "one_at_a_time_generate_s": round(sequential_s, 2),
            "one_at_a_time_generate_cpu_s": round(sequential_cpu_s, 2),
            "speedup_vs_generate": round(sequential_s * scale / two_part_s, 2),
            "speedup_vs_generate_cpu": round(sequential_cpu_s * scale / two_part_cpu_s, 2),
            "identical_answers_vs_generate": f"{sum(g.text == s for g, s in zip(two_part, sequential))}/{len(sequential)}",
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
