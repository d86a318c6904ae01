"""Load test of `tunesmith serve`: N concurrent clients over loopback for a fixed time.

The same load runs against the same loaded model with continuous batching (--max-batch-size)
at each --clients count, then served one request at a time (max batch 1), then through
llama.cpp single-stream on an f16 GGUF of the same model (written by tunesmith's own GGUF
export, run with --llama-threads), the same prompts one after another. Reported per mode:
errors (must be 0), requests, generated tokens/s, p50/p99 latency; and the throughput ratios.

    .venv/bin/python bench/serve_load.py --clients 8 32 64 --seconds 40 --max-tokens 16 --shared-system-prompt

--shared-system-prompt gives every request the same label-listing system prompt (the regime
the server's prefix cache is for); without it, requests carry only their user turn.

Clients are threads of this process speaking HTTP to uvicorn on 127.0.0.1 (port chosen by
the OS); the model runs in the server's engine thread, which releases the GIL inside torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(url: str, model: str, prompts: list[list[dict]], clients: int, seconds: float, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        i = worker
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() < deadline:
                body = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0}
                started = time.perf_counter()
                try:
                    response = http.post(f"{url}/v1/chat/completions", json=body)
                    response.raise_for_status()
                    generated = response.json()["usage"]["completion_tokens"]
                except Exception as e:  # noqa: BLE001 - every failure is counted, none hidden
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens[0] += generated
                i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started  # includes the requests still running at the deadline
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "generated_tokens": tokens[0],
        "tokens_per_s": tokens[0] / elapsed,
        "p50_latency_s": percentile(latencies, 0.50),
        "p99_latency_s": percentile(latencies, 0.99),
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        "elapsed_s": elapsed,
    }


def label_system_prompt(labels: int) -> str:
    """A label-listing system prompt (the intent-classification case of issue 16: ~580 tokens at 77 labels)."""
    names = [f"{verb}_{noun}" for verb in ("check", "cancel", "change", "report", "request", "track", "update") for noun in ("order", "refund", "address", "card", "account", "delivery", "invoice", "password", "plan", "subscription", "payment")]
    return "Classify the customer's message. Reply with exactly one of these intent labels and nothing else: " + ", ".join(names[:labels]) + "."


def llama_cpp_single_stream(gguf_path: str, prompts: list[list[dict]], seconds: float, max_tokens: int, threads: int) -> dict:
    """llama.cpp answering the same prompts one after another (greedy) for `seconds`."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    llm.create_chat_completion(messages=prompts[0], max_tokens=4, temperature=0)  # warm-up, not measured
    latencies, tokens, errors = [], 0, []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        try:
            out = llm.create_chat_completion(messages=prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0)
            tokens += out["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - counted, not hidden
            errors.append(f"{type(e).__name__}: {e}")
        i += 1
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "errors": len(errors), "generated_tokens": tokens, "tokens_per_s": tokens / elapsed, "p50_latency_s": percentile(latencies, 0.5), "p99_latency_s": percentile(latencies, 0.99), "elapsed_s": elapsed, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="weights' dtype, as `tunesmith serve --precision`")
    parser.add_argument("--shared-system-prompt", action="store_true", help="every request carries the same label-listing system prompt")
    parser.add_argument("--labels", type=int, default=77, help="labels listed in the shared system prompt")
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    parser.add_argument("--llama-threads", type=int, default=2, help="llama.cpp threads (0: skip llama.cpp)")
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the results here.")
    args = parser.parse_args()

    import tempfile

    import torch

    from tunesmith.inference import inference_dtype
    from tunesmith.models import load_model
    from tunesmith.serve import ServeSettings, create_app
    from tunesmith.serve.app import run_in_thread
    from tunesmith.starter import support_tickets

    torch.set_num_threads(args.threads)
    dtype = inference_dtype(args.precision)
    loaded = load_model(args.model, dtype=dtype)
    system = [{"role": "system", "content": label_system_prompt(args.labels)}] if args.shared_system_prompt else []
    prompts = [system + [{"role": "user", "content": r["messages"][1]["content"]}] for r in support_tickets(64, seed=7)]
    system_tokens = len(loaded.tokenizer(system[0]["content"])["input_ids"]) if system else 0
    results: dict = {}
    modes = [(f"batched_{n}_clients", args.max_batch_size, n) for n in args.clients] + [("one_at_a_time", 1, args.clients[0])]
    for mode, batch, clients in modes:
        settings = ServeSettings(models=[args.model], port=0, max_batch_size=batch, max_tokens_limit=max(args.max_tokens, 1), precision=args.precision, prefix_cache=not args.no_prefix_cache)
        handle = run_in_thread(create_app(settings, loaded=loaded))
        try:
            load(handle.url, args.model, prompts[:4], 2, 3.0, 4)  # warm-up, not measured
            warm = dict(handle.app.state.engine.stats)
            results[mode] = load(handle.url, args.model, prompts, clients, args.seconds, args.max_tokens)
            stats = {k: v - warm[k] for k, v in handle.app.state.engine.stats.items() if k in warm}  # the measured load's share
            results[mode].update(clients=clients, mean_batch=stats["batched_rows"] / max(1, stats["steps"]), prefix_hits=stats["prefix_hits"],
                                 **{k: round(stats[k], 2) for k in ("prefill_forwards", "prefill_s", "decode_s") if k in stats})
        finally:
            handle.stop()
        print(mode, json.dumps(results[mode], indent=2), flush=True)
    if args.llama_threads:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp side skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
        else:
            from tunesmith.gguf_export import write_gguf

            with tempfile.TemporaryDirectory() as tmp:
                path = f"{tmp}/model-f16.gguf"
                write_gguf(load_model(args.model).model, loaded.tokenizer, Path(path), "f16", args.model)
                results["llama_cpp_f16_single_stream"] = llama_cpp_single_stream(path, prompts, args.seconds, args.max_tokens, args.llama_threads)
            print("llama_cpp_f16_single_stream", json.dumps(results["llama_cpp_f16_single_stream"], indent=2), flush=True)
    one = results["one_at_a_time"]["tokens_per_s"]
    llama = results.get("llama_cpp_f16_single_stream", {}).get("tokens_per_s")
    for n in args.clients:
        tps = results[f"batched_{n}_clients"]["tokens_per_s"]
        print(f"{n} clients: {tps:.1f} tokens/s, {tps / one:.2f}x one-at-a-time" + (f", {tps / llama:.2f}x llama.cpp f16 single-stream" if llama else ""))
    summary = {"model": args.model, "dtype": str(dtype), "shared_system_prompt_tokens": system_tokens, "prefix_cache": not args.no_prefix_cache, "seconds": args.seconds, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "torch_threads": args.threads, **results}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
