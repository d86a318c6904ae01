"""Load test of `tunesmith serve`: N concurrent clients over loopback for a fixed time.

The same load runs twice against the same loaded model: once with continuous batching
(--max-batch-size), once served one request at a time (max batch 1). Reported per mode:
errors (must be 0), requests, generated tokens/s, p50/p99 latency; and the throughput ratio.

    .venv/bin/python bench/serve_load.py --clients 8 --seconds 30 --max-tokens 32

Clients are threads of this process speaking HTTP to uvicorn on 127.0.0.1 (port chosen by
the OS); the model runs in the server's engine thread, which releases the GIL inside torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(url: str, model: str, prompts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        i = worker
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() < deadline:
                body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens, "temperature": 0}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the results here.")
    args = parser.parse_args()

    import torch

    from tunesmith.models import load_model
    from tunesmith.serve import ServeSettings, create_app
    from tunesmith.serve.app import run_in_thread
    from tunesmith.starter import support_tickets

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prompts = [r["messages"][1]["content"] for r in support_tickets(64, seed=7)]
    results = {}
    for mode, batch in (("batched", args.max_batch_size), ("one_at_a_time", 1)):
        settings = ServeSettings(models=[args.model], port=0, max_batch_size=batch, max_tokens_limit=max(args.max_tokens, 1))
        handle = run_in_thread(create_app(settings, loaded=loaded))
        try:
            load(handle.url, args.model, prompts[:4], 2, 3.0, 4)  # warm-up, not measured
            results[mode] = load(handle.url, args.model, prompts, args.clients, args.seconds, args.max_tokens)
            results[mode]["mean_batch"] = handle.app.state.engine.stats["batched_rows"] / max(1, handle.app.state.engine.stats["steps"])
        finally:
            handle.stop()
        print(mode, json.dumps(results[mode], indent=2))
    ratio = results["batched"]["tokens_per_s"] / results["one_at_a_time"]["tokens_per_s"]
    summary = {"model": args.model, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "torch_threads": args.threads, "throughput_ratio": ratio, **results}
    print(f"throughput batched / one-at-a-time: {ratio:.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
