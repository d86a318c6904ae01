"""Running a model: stop ids, dtype, prompt ids, cache arguments, batched greedy decoding.

eval, the export parity checks, `tunesmith generate` and the server engine all call this
module, so "when does an answer end" and "which dtype runs here" have one answer each.

Generation is our own loop (left padding, KV cache, a prompt prefix shared by every example
computed once, finished rows dropped from the batch), because it is where evaluation spends
its time and `generate` cannot share the prefix.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import UserError

logger = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 8  # tokens; below this, computing the prefix apart is not worth a forward


# --------------------------------------------------------------------------- stop ids


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a turn: the generation config's eos ids, the tokenizer's eos, and the
    chat template's end-of-turn token (templates.end_of_turn_token: Gemma's <end_of_turn> and
    Phi-3's <|end|> are not eos, and a converted GGUF may name only one of them)."""
    from tunesmith.templates import end_of_turn_token

    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        try:
            ids.add(end_of_turn_token(tokenizer)[0])
        except UserError:
            pass  # a template without an end-of-turn token: the eos ids above end the answer
    return ids


def stop_token_list(model: Any, tokenizer: Any) -> list[int]:
    """The stop ids in a stable order, the generation config's first (for configs that take a list)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    first = eos if isinstance(eos, list) else [eos] if eos is not None else []
    rest = sorted(stop_token_ids(model, tokenizer) - set(first))
    return list(dict.fromkeys(first + rest))


# --------------------------------------------------------------------------- dtype


def bf16_fast(device: Any) -> bool:
    """Whether this device runs bf16 fast: CUDA with bf16, CPUs with AMX/AVX512-BF16."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        if bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(precision: str, device: Any) -> bool:
    """Training: bf16 autocast for `precision` (auto: where the hardware runs it fast)."""
    if precision == "fp32":
        return False
    supported = bf16_fast(device)
    if precision == "bf16" and not supported and getattr(device, "type", device) == "cuda":
        raise UserError("train.precision is bf16 but this GPU has no bf16", "set train.precision: fp32")
    return supported or precision == "bf16"


def inference_dtype(precision: str, device: Any = None):
    """Generation: the weights' dtype for `precision` (auto: bf16 where fast, else fp32)."""
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_fast(device) else torch.float32


# --------------------------------------------------------------------------- prompts and cache


def pad_token_id(tokenizer: Any, stop_ids: set[int]) -> int:
    """The id that pads a left-padded generation batch: the tokenizer's pad, else a stop id
    (padding is masked out, so any id the model knows will do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)


def render_ids(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = True) -> list[int]:
    """Token ids of chat messages through the model's chat template (the one prompt renderer)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cache_kwarg(model: Any) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; the name this model's forward takes
    (a PEFT wrapper forwards **kwargs, so its base model is asked)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def cache_arg(model: Any, cache: Any) -> dict[str, Any]:
    return {cache_kwarg(model): cache}


# --------------------------------------------------------------------------- batched greedy decoding


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids, end-of-turn included (empty when reused from a previous run)
    latency_s: float  # from the batch's start until this answer ended: what its caller waited
    compute_s: float  # its share of the batch's wall time: sums to the subject's total time
    stopped: bool  # ended on an end-of-turn token (else it hit max_new_tokens)
    new_tokens: int = -1

    def __post_init__(self) -> None:
        if self.new_tokens < 0:
            self.new_tokens = len(self.token_ids)


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    if not prompts:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def generate_greedy(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop_ids: set[int],
    pad_id: int,
    decode: Callable[[list[int]], str],
    share_prefix: bool = True,
    on_batch: Callable[[int], None] | None = None,
    two_part: bool = True,
) -> list[Generation]:
    """Greedy answers to token-id prompts, in the prompts' order, batched.

    The prefix every prompt shares (system prompt, few-shot examples) runs once. Prompts run
    longest first, so a batch holds similar lengths and little padding; padding sits between
    the shared prefix and each prompt's own tokens, masked out, with position ids that skip it,
    so each row computes what it would compute alone.

    Llama-style models take the two-part path (`cascade.py`): the prefix's KV is kept once and
    attended by every row without a copy, each row's own KV sits in a cache allocated once per
    batch. `two_part=False`, or a model it does not cover (the reason is logged), takes the
    model's own forward with the prefix's cache copied into each batch.
    """
    import torch

    from tunesmith import cascade

    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    reason = cascade.unsupported_reason(model, longest) if two_part else None
    if reason:
        _log_fallback(type(_causal_lm(model)).__name__, reason)
    prefix_len = shared_prefix_length(prompts) if share_prefix else 0
    if prefix_len < MIN_SHARED_PREFIX:
        prefix_len = 0
    with torch.inference_mode():
        if two_part and not reason:
            decoder = cascade.TwoPartDecoder(model)
            prefix = [cascade.PrefixGroup(decoder.prefix(prompts[0][:prefix_len]))] if prefix_len else None
            run_batch = lambda own: _generate_batch_two_part(decoder, own, prefix, prefix_len, max_new_tokens, stop_ids, pad_id, decode)  # noqa: E731
        else:
            prefix_cache = _prefix_cache(model, prompts[0][:prefix_len]) if prefix_len else None
            run_batch = lambda own: _generate_batch(model, own, prefix_cache, prefix_len, max_new_tokens, stop_ids, pad_id, decode)  # noqa: E731
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for i, gen in zip(rows, run_batch([prompts[i][prefix_len:] for i in rows])):
                results[i] = gen
            if on_batch:
                on_batch(len(rows))
    return results  # type: ignore[return-value]


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=None)
def _log_fallback(model_class: str, reason: str) -> None:
    """Say once per model class and reason why generation takes the slower path."""
    logger.warning("generation: %s runs without two-part attention (%s); the model's own forward is used", model_class, reason)


def _prefix_cache(model, prefix_ids: list[int]):
    """The model's own cache of the shared prefix, batch 1 (the path without two-part attention)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1, **cache_arg(model, cache))
    return cache


@dataclass
class _Rows:
    """What the decode loop carries for one batch: each row's tokens and when it ended, and
    which rows still generate (`active[j]` is the batch row of cache row j)."""

    tokens: list[list[int]]
    ended_s: list[float]
    stopped: list[bool]
    active: list[int]

    @classmethod
    def start(cls, rows: int) -> "_Rows":
        return cls([[] for _ in range(rows)], [0.0] * rows, [False] * rows, list(range(rows)))

    def advance(self, next_list: list[int], step: int, max_new_tokens: int, stop_ids: set[int], now: float) -> list[int]:
        """Record one step's tokens; return the cache rows that go on generating."""
        keep = []
        for j, r in enumerate(self.active):
            token = next_list[j]
            self.tokens[r].append(token)
            if token in stop_ids:
                self.stopped[r], self.ended_s[r] = True, now
            elif step == max_new_tokens - 1:
                self.ended_s[r] = now
            else:
                keep.append(j)
        return keep

    def results(self, decode: Callable[[list[int]], str], wall_s: float) -> list[Generation]:
        out = []
        for r, tokens in enumerate(self.tokens):
            answer = tokens[:-1] if self.stopped[r] else tokens
            out.append(Generation(decode(answer).strip(), tokens, self.ended_s[r], wall_s / len(self.tokens), self.stopped[r]))
        return out


def _left_padded(own: list[list[int]], pad_id: int):
    """(input_ids, mask) [rows, longest], each prompt right-aligned."""
    import torch

    rows, width = len(own), max(len(p) for p in own)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, ids in enumerate(own):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        mask[r, width - len(ids) :] = 1
    return input_ids, mask


def _generate_batch_two_part(decoder, own, prefix, prefix_len, max_new_tokens, stop_ids, pad_id, decode) -> list[Generation]:
    """One batch through the two-part decoder: its own KV written in place, never re-concatenated."""
    import torch

    device = decoder.param.device
    input_ids, mask = _left_padded(own, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    width = input_ids.shape[1]
    positions = (prefix_len + mask.cumsum(-1) - 1).clamp(min=0)
    # The last generated token is never fed back, so max_new_tokens - 1 columns follow the prompt.
    cache = decoder.new_cache(len(own), width + max(max_new_tokens - 1, 0), width - mask.sum(-1))

    start = time.perf_counter()
    logits = decoder.forward(input_ids, positions, cache, prefix)
    state = _Rows.start(len(own))
    positions = positions[:, -1:]
    for step in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)
        keep = state.advance(next_ids.tolist(), step, max_new_tokens, stop_ids, time.perf_counter() - start)
        if not keep:
            break
        if len(keep) < len(state.active):
            # Drop finished rows so the rest of the batch stops paying for them.
            index = torch.tensor(keep, device=device)
            cache.select(index)
            positions, next_ids = positions[index], next_ids[index]
            state.active = [state.active[j] for j in keep]
        positions = positions + 1
        logits = decoder.forward(next_ids[:, None], positions, cache, prefix)
    return state.results(decode, time.perf_counter() - start)


def _generate_batch(model, own, prefix_cache, prefix_len, max_new_tokens, stop_ids, pad_id, decode) -> list[Generation]:
    """One batch through the model's own forward and DynamicCache (the path before two-part attention)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids, mask = _left_padded(own, pad_id)
    rows = len(own)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(rows)
        attention = torch.cat([torch.ones((rows, prefix_len), dtype=torch.long, device=device), mask], dim=1)
    else:
        cache = DynamicCache(config=model.config)
        attention = mask
    positions = (prefix_len + mask.cumsum(-1) - 1).clamp(min=0)

    start = time.perf_counter()
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_arg(model, cache)
    ).logits[:, -1]
    state = _Rows.start(rows)
    for step in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)
        # One device sync per step (tolist), not one per row.
        keep = state.advance(next_ids.tolist(), step, max_new_tokens, stop_ids, time.perf_counter() - start)
        if not keep:
            break
        if len(keep) < len(state.active):
            # Drop finished rows so the rest of the batch stops paying for them.
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, positions, next_ids = attention[index], positions[index], next_ids[index]
            state.active = [state.active[j] for j in keep]
        attention = torch.cat([attention, torch.ones((len(state.active), 1), dtype=torch.long, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions, use_cache=True, **cache_arg(model, cache)
        ).logits[:, -1]
    return state.results(decode, time.perf_counter() - start)


def greedy_tokens(model: Any, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt, one at a time (no padding to differ between two
    models compared token for token), end-of-turn token included."""
    gens = generate_greedy(
        model, prompts, max_new_tokens=max_new_tokens, batch_size=1, stop_ids=stop_ids, pad_id=0,
        decode=lambda ids: "", share_prefix=False,
    )
    return [g.token_ids for g in gens]
