"""How close the server's batched generation runs to this CPU's matmul roof (issue 16, item 4).

The serving target (64 clients >= 5x llama.cpp's single-stream f16 tokens/s) asks whether
tunesmith's engine is slow or the machine is. This measures, in one process at `--threads`:

- the fp32 matmul peak: the best FLOP/s of a 1024^2 `F.linear` (the kernel the projections run);
- the two-part engine's own work at the serving bench's shape: a shared system prompt of
  `--prefix` tokens cached once, `--rows` requests of `--own` prompt tokens prefilled in one
  forward, then `--new-tokens` - 1 decode steps (`cascade.TwoPartDecoder`, as the server runs it);
- the linear-layer FLOPs of that work (decoder projections at every token, the LM head at each
  row's last position), so the achieved share of the peak is FLOPs / time / peak;
- the roof: generated tokens/s if every FLOP ran at the peak, for requests of this shape.

Attention, norms and activations are left out of the FLOPs (they are work too, so the achieved
share is a lower bound of the engine's efficiency). Requests in the server also pay for HTTP,
scheduling and tokenising, which this leaves out.

    .venv/bin/python bench/decode_roofline.py --threads 2 --llama-cpp-tokens-per-s 46.0
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from train_vs_trl import matmul_peak_flops  # bench/ is on the path when a script of it runs

from tunesmith.cascade import PrefixGroup, TwoPartDecoder
from tunesmith.models import load_model


def linear_params(model) -> tuple[int, int]:
    """(decoder projection parameters, LM head parameters)."""
    decoder = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name)
    return decoder, model.lm_head.weight.numel()


def engine_times(model, rows: int, prefix: int, own: int, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of the two-part engine on random token ids."""
    decoder = TwoPartDecoder(model)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        group = PrefixGroup(decoder.prefix(torch.randint(100, vocab, (prefix,)).tolist()))
        cache = decoder.new_cache(rows, own + new_tokens, torch.zeros(rows, dtype=torch.long))
        ids = torch.randint(100, vocab, (rows, own))
        start = time.perf_counter()
        logits = decoder.forward(ids, torch.arange(prefix, prefix + own).expand(rows, -1), cache, [group])
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            position = torch.full((rows, 1), prefix + own + step)
            logits = decoder.forward(logits.argmax(-1)[:, None], position, cache, [group])
        decode_s = time.perf_counter() - start
    return prefill_s, decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64, help="requests in the batch (the bench's 64 clients)")
    parser.add_argument("--prefix", type=int, default=342, help="shared system prompt tokens (the bench's 77-label prompt)")
    parser.add_argument("--own", type=int, default=20, help="each request's own prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="engine runs; the fastest counts")
    parser.add_argument("--llama-cpp-tokens-per-s", type=float, help="llama.cpp's single-stream figure from serve_load.py, to state the target")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model, dtype=torch.float32).model.eval()
    decoder_params, head_params = linear_params(model)
    peak_start = matmul_peak_flops("fp32", seconds=3.0)
    runs = [engine_times(model, args.rows, args.prefix, args.own, args.new_tokens) for _ in range(args.repeats)]
    peak = max(peak_start, matmul_peak_flops("fp32", seconds=3.0))
    prefill_s, decode_s = min(r[0] for r in runs), min(r[1] for r in runs)
    prefill_flops = args.rows * (2 * decoder_params * args.own + 2 * head_params)
    decode_flops = args.rows * (args.new_tokens - 1) * 2 * (decoder_params + head_params)
    generated = args.rows * args.new_tokens
    result = {
        "threads": args.threads, "rows": args.rows, "prefix": args.prefix, "own": args.own, "new_tokens": args.new_tokens,
        "peak_gflops": peak / 1e9,
        "prefill_s": prefill_s, "prefill_share_of_peak": prefill_flops / prefill_s / peak,
        "decode_s": decode_s, "decode_share_of_peak": decode_flops / decode_s / peak,
        "engine_tokens_per_s": generated / (prefill_s + decode_s),
        "roof_tokens_per_s": generated / ((prefill_flops + decode_flops) / peak),
        "gflop_per_generated_token": (prefill_flops + decode_flops) / generated / 1e9,
    }
    print(f"fp32 peak {result['peak_gflops']:.1f} GFLOP/s at {args.threads} thread(s)")
    print(f"prefill {args.rows} x {args.own} tokens: {prefill_s:.2f} s, {result['prefill_share_of_peak']:.0%} of the peak (linear layers)")
    print(f"decode {args.new_tokens - 1} steps of {args.rows} rows: {decode_s:.2f} s, {result['decode_share_of_peak']:.0%} of the peak")
    print(f"engine: {result['engine_tokens_per_s']:.0f} generated tokens/s; roof (every linear FLOP at the peak): "
          f"{result['roof_tokens_per_s']:.0f} tokens/s ({result['gflop_per_generated_token']:.2f} GFLOP per generated token)")
    if args.llama_cpp_tokens_per_s:
        target = 5 * args.llama_cpp_tokens_per_s
        result["target_tokens_per_s"] = target
        print(f"target 5 x {args.llama_cpp_tokens_per_s:.1f} = {target:.0f} tokens/s = {target / result['roof_tokens_per_s']:.0%} of the roof")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
