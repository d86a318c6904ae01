"""The engine: one thread owns the model and runs every request in a shared decode batch.

Why a thread: torch calls block, and the HTTP event loop must keep accepting requests while
tokens are computed. Requests reach the thread through a queue; tokens go back to each
request's asyncio queue through `call_soon_threadsafe`. The thread is the only code touching
the model, the adapters and the KV caches, so none of them needs a lock.

Batching is continuous: a new request is prefilled alone (no padding waste), then joins the
running decode batch at the next step; a finished or disconnected one leaves it at once. Rows
of one batch may use different adapters: peft's mixed-adapter forward (`adapter_names=`)
routes each row through its own LoRA, or none (`__base__`).

A prefix cache keeps the KV of the last few system prompts (per adapter): a request that starts
with one prefills only its own tokens on a copy of that KV, so a long shared system prompt (a
label list) is computed once, not once per request. The decode batch still holds each row's
copy of it (the two-part attention of `cascade.py` is not yet used by the engine).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.inference import MIN_SHARED_PREFIX, cache_kwarg, stop_token_ids

log = logging.getLogger("tunesmith.serve")
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
# Below this temperature sampling is greedy: logits / 1e-39 overflow float32 to inf and the
# softmax turns to NaN (vLLM uses the same cut-off).
GREEDY_BELOW_TEMPERATURE = 1e-5
PREFIX_CACHE_ENTRIES = 4  # system prompts (per adapter) whose KV is kept; least recently used evicted


def peft_name(model_id: str) -> str:
    """The adapter's name inside peft: model ids may hold '.' (`ft:base:v1.2:id`, a run named
    v1.2), which torch refuses in module names, so peft gets a name derived from the id."""
    import hashlib

    return "adapter_" + hashlib.sha256(model_id.encode()).hexdigest()[:16]


@dataclass
class ServedModel:
    """One `model` id of the API: the base itself, or a LoRA adapter over it."""

    id: str
    adapter_path: Path | None
    default_system: str | None = None
    source: str = ""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    grammar: Any = None  # a compiled xgrammar grammar: the output must match it


@dataclass
class Sequence:
    """One generation (one choice of one request) as the engine tracks it."""

    model: ServedModel
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    next_input: int | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    matcher: Any = None
    bitmask: Any = None
    generator: Any = None
    prefix_tokens: int = 0  # leading prompt tokens that are the system prompt (its KV is cached)

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_adapters: int = 4, max_batch_size: int = 16, max_context: int | None = None, prefix_cache: bool = True):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.peft = None  # the PeftModel wrapping `model` once the first adapter is loaded
        self.max_adapters = max_adapters
        self.max_batch_size = max_batch_size
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.adapters: collections.OrderedDict[str, Path] = collections.OrderedDict()  # LRU, oldest first
        self.pending: queue.Queue[Sequence] = queue.Queue()
        self.active: list[Sequence] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch_members: list[Sequence] = []
        self._batch_cache: Any = None
        self._batch_mask: Any = None
        self._grammar_compiler: Any = None
        self._grammar_lock = threading.Lock()
        self.prefix_cache = prefix_cache
        # (adapter, system prompt ids) -> the prompt's KV, batch 1: computed once, copied per request.
        self._prefixes: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.stats = {"steps": 0, "batched_rows": 0, "max_batch": 0, "adapter_loads": 0, "adapter_evictions": 0, "prefix_hits": 0, "prefix_misses": 0}
        self._torch = torch
        self._cache_kwarg = cache_kwarg(model)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        self.pending.put(seq)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return self.pending.qsize()

    # --- constrained decoding -------------------------------------------------------------

    def compile_grammar(self, schema: dict[str, Any] | None) -> Any:
        """xgrammar grammar for a JSON schema (None: any JSON object). Raises UserError if invalid."""
        import xgrammar as xgr

        with self._grammar_lock:
            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.eos_ids))
                self._grammar_compiler = xgr.GrammarCompiler(info)
            # No free whitespace: a small model otherwise wanders into endless indentation.
            try:
                return self._grammar_compiler.compile_json_schema(json.dumps(schema or {"type": "object"}), any_whitespace=False)
            except Exception:  # noqa: BLE001 - xgrammar raises RuntimeError on bad schemas
                # xgrammar's text names its own source files: logged, not sent to the client.
                log.info("json schema refused by xgrammar", exc_info=True)
                raise UserError("response_format json_schema is not a JSON schema this server can enforce (check its types and keywords)") from None

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        torch = self._torch
        with torch.inference_mode():
            while not self._stop.is_set():
                admitted = self._admit()
                self.active = [s for s in self.active if not self._drop_if_done(s)]
                if not self.active:
                    if not admitted:
                        self._wake.wait(0.05)
                        self._wake.clear()
                    continue
                try:
                    self._decode_step()
                except Exception:  # noqa: BLE001 - a bug must not kill the server: fail the batch
                    # Only the shared forward pass gets here (per-sequence work fails alone in
                    # _decode_step): no row can be blamed, so every row of the batch fails.
                    log.exception("decode step failed")
                    for seq in self.active:
                        self._fail(seq)
                    self.active = []
                    self._batch_members = []

    def _drop_if_done(self, seq: Sequence) -> bool:
        return seq.cancelled or seq.finish_reason is not None

    def _admit(self) -> bool:
        admitted = False
        while len(self.active) < self.max_batch_size:
            try:
                seq = self.pending.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled:
                continue
            try:
                self._ensure_adapter(seq.model)
                self._prefill(seq)
            except Exception:  # noqa: BLE001 - one bad request fails alone
                log.exception("prefill failed")
                self._fail(seq)
                continue
            admitted = True
            if seq.finish_reason is None:
                self.active.append(seq)
        return admitted

    # --- adapters: lazily loaded, least recently used evicted -----------------------------

    def _ensure_adapter(self, served: ServedModel) -> None:
        if served.adapter_path is None:
            return
        name = served.id
        if name in self.adapters:
            self.adapters.move_to_end(name)
            return
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(served.adapter_path), adapter_name=peft_name(name))
            self.peft.eval()
        else:
            self.peft.load_adapter(str(served.adapter_path), adapter_name=peft_name(name))
        self.adapters[name] = served.adapter_path
        self.stats["adapter_loads"] += 1
        # Load first, evict after: peft refuses to delete the only adapter it has.
        in_use = {s.model.id for s in self.active}
        for old in list(self.adapters):
            if len(self.adapters) <= self.max_adapters:
                break
            if old != name and old not in in_use:
                self.peft.delete_adapter(peft_name(old))
                del self.adapters[old]
                self.stats["adapter_evictions"] += 1

    def _forward(self, input_ids: Any, adapters: list[str], cache: Any, **kwargs: Any) -> tuple[Any, Any]:
        """(last-position logits, cache). transformers 5 renamed `past_key_values` to `cache`."""
        kwargs[self._cache_kwarg] = cache
        if self.peft is None:
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        else:
            out = self.peft(input_ids=input_ids, use_cache=True, logits_to_keep=1, adapter_names=adapters, **kwargs)
        new_cache = getattr(out, "cache", None)
        return out.logits[:, -1].float(), new_cache if new_cache is not None else out.past_key_values

    def _adapter_name(self, seq: Sequence) -> str:
        return peft_name(seq.model.id) if seq.model.adapter_path is not None else BASE_ADAPTER

    # --- prefill and decode ---------------------------------------------------------------

    def _prefill(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        torch = self._torch
        if seq.params.grammar is not None:
            import xgrammar as xgr

            seq.matcher = xgr.GrammarMatcher(seq.params.grammar)
            seq.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        if seq.params.temperature >= GREEDY_BELOW_TEMPERATURE:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else int(time.time_ns() % 2**63))
        cache, start = self._cached_prefix(seq) if self.prefix_cache else (DynamicCache(), 0)
        logits, cache = self._forward(torch.tensor([seq.prompt_ids[start:]]), [self._adapter_name(seq)], cache)
        seq.prefill_cache = cache  # type: ignore[attr-defined]
        self._accept(seq, self._choose(seq, logits[0]))

    def _cached_prefix(self, seq: Sequence) -> tuple[Any, int]:
        """(a cache holding the system prompt's KV, its length): computed on first sight, then
        copied from the prefix cache, so a long shared system prompt is prefilled once, not per
        request. The key holds the adapter: a LoRA on k/v projections changes the prefix's KV."""
        from transformers import DynamicCache

        n = seq.prefix_tokens
        if n < MIN_SHARED_PREFIX or n >= len(seq.prompt_ids):
            return DynamicCache(), 0
        key = (self._adapter_name(seq), str(seq.model.adapter_path), tuple(seq.prompt_ids[:n]))
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            self.stats["prefix_hits"] += 1
        else:
            _, cache = self._forward(self._torch.tensor([seq.prompt_ids[:n]]), [self._adapter_name(seq)], DynamicCache())
            self._prefixes[key] = cache
            self.stats["prefix_misses"] += 1
            while len(self._prefixes) > PREFIX_CACHE_ENTRIES:
                self._prefixes.popitem(last=False)
        return copy.deepcopy(self._prefixes[key]), n

    def _decode_step(self) -> None:
        """One token for every active sequence, in one forward pass."""
        torch = self._torch
        if [id(s) for s in self.active] != [id(s) for s in self._batch_members]:
            self._rebuild_batch()
        members = self._batch_members
        lengths = self._batch_mask.sum(dim=1)
        mask = torch.cat([self._batch_mask, torch.ones(len(members), 1, dtype=self._batch_mask.dtype)], dim=1)
        input_ids = torch.tensor([[s.next_input] for s in members])
        logits, self._batch_cache = self._forward(
            input_ids,
            [self._adapter_name(s) for s in members],
            self._batch_cache,
            attention_mask=mask,
            position_ids=lengths.unsqueeze(1),
        )
        self._batch_mask = mask
        self.stats["steps"] += 1
        self.stats["batched_rows"] += len(members)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(members))
        for row, seq in enumerate(members):
            if seq.cancelled:
                continue
            try:
                self._accept(seq, self._choose(seq, logits[row]))
            except Exception:  # noqa: BLE001 - sampling or grammar error: this sequence fails alone
                log.exception("sampling failed for one sequence")
                self._fail(seq)

    def _fail(self, seq: Sequence) -> None:
        """End one sequence with an error event; the client sees a generic 500 (details are logged)."""
        seq.finish_reason = "error"
        seq.emit(("error", "internal error"))

    def _rebuild_batch(self) -> None:
        """Left-pad every member's KV cache to one length: run when the batch membership changes."""
        from transformers import DynamicCache

        torch = self._torch
        per_seq = []
        old_index = {id(s): i for i, s in enumerate(self._batch_members)}
        for seq in self.active:
            if id(seq) in old_index:
                row = old_index[id(seq)]
                length = int(self._batch_mask[row].sum())
                layers = [(layer.keys[row : row + 1, :, -length:], layer.values[row : row + 1, :, -length:]) for layer in self._batch_cache.layers]
            else:
                cache = seq.prefill_cache  # type: ignore[attr-defined]
                layers = [(layer.keys, layer.values) for layer in cache.layers]
                length = layers[0][0].shape[2]
                seq.prefill_cache = None  # type: ignore[attr-defined]
            per_seq.append((layers, length))
        width = max(length for _, length in per_seq)
        merged = []
        for layer_index in range(len(per_seq[0][0])):
            keys, values = [], []
            for layers, length in per_seq:
                k, v = layers[layer_index]
                pad = width - length
                if pad:
                    k = torch.cat([k.new_zeros(*k.shape[:2], pad, k.shape[3]), k], dim=2)
                    v = torch.cat([v.new_zeros(*v.shape[:2], pad, v.shape[3]), v], dim=2)
                keys.append(k)
                values.append(v)
            merged.append((torch.cat(keys), torch.cat(values)))
        mask = torch.zeros(len(per_seq), width, dtype=torch.long)
        for row, (_, length) in enumerate(per_seq):
            mask[row, width - length :] = 1
        self._batch_cache = DynamicCache(ddp_cache_data=merged)
        self._batch_mask = mask
        self._batch_members = list(self.active)

    def _choose(self, seq: Sequence, logits: Any) -> int:
        torch = self._torch
        logits = logits[: self.vocab_size].clone()
        if seq.matcher is not None:
            import xgrammar as xgr

            seq.matcher.fill_next_token_bitmask(seq.bitmask)
            xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), seq.bitmask)
        if seq.params.temperature < GREEDY_BELOW_TEMPERATURE:
            return int(logits.argmax())
        probs = torch.softmax(logits / seq.params.temperature, dim=-1)
        if seq.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < seq.params.top_p
            keep[0] = True  # the likeliest token always stays: top_p=1e-300 rounds to 0 in float32
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, stream the new text, and decide whether the sequence ends."""
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            seq.finish_reason = "error"
            seq.emit(("error", "constrained decoding reached a dead end"))
            return
        seq.next_input = token
        if token in self.eos_ids or (seq.matcher is not None and seq.matcher.is_terminated()):
            self._finish(seq, "stop", counted=1)
            return
        seq.generated.append(token)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = text.find(stop)
            if at >= 0:
                self._send(seq, text[:at], final=True)
                self._finish(seq, "stop")
                return
        if len(seq.generated) >= seq.params.max_tokens or len(seq.prompt_ids) + len(seq.generated) >= self.max_context:
            self._send(seq, text, final=True)
            self._finish(seq, "length")
            return
        self._send(seq, text, final=False)

    def _send(self, seq: Sequence, text: str, final: bool) -> None:
        if not final:
            # Hold back a half-decoded character, and any tail that may be the start of a stop string.
            text = text.rstrip("\ufffd")
            holdback = max((len(s) - 1 for s in seq.params.stop), default=0)
            text = text[: max(seq.sent_chars, len(text) - holdback)]
        if len(text) > seq.sent_chars:
            seq.emit(("delta", text[seq.sent_chars :]))
            seq.sent_chars = len(text)

    def _finish(self, seq: Sequence, reason: str, counted: int = 0) -> None:
        if reason == "stop" and counted:
            self._send(seq, self.tokenizer.decode(seq.generated, skip_special_tokens=True), final=True)
        seq.finish_reason = reason
        seq.emit(("done", reason, len(seq.prompt_ids), len(seq.generated) + counted))
