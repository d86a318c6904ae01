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
with one prefills only its own tokens, so a long shared system prompt (a label list) is computed
once, not once per request. Llama-style models decode with the two-part attention of
`cascade.py`: the batch holds each row's own KV (its prompt after the system prompt, then its
answer) in a cache allocated when the membership changes and written in place, and the rows
that share a cached system prompt attend to its one stored KV, never copied per row. Other
models take their own forward, with each row's copy of the prefix in a DynamicCache.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
GROW_COLUMNS = 32  # free columns the two-part batch cache gets when it is laid out (grown when full)


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
    prefill_cache: Any = None  # its KV after prefill until it joins the batch: (RowCache, row) on the two-part path, else a DynamicCache
    prefix_kv: Any = None  # two-part path: the cached system prompt's KV it attends to (None: none)

    def emit(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_adapters: int = 4, max_batch_size: int = 16, max_context: int | None = None, prefix_cache: bool = True,
                 two_part: bool = True):
        import torch

        from tunesmith import cascade

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
        # (adapter, system prompt ids) -> the prompt's KV, batch 1: computed once, attended where it is
        # stored on the two-part path (copied per request on the model's forward).
        self._prefixes: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.stats = {"steps": 0, "batched_rows": 0, "max_batch": 0, "adapter_loads": 0, "adapter_evictions": 0, "prefix_hits": 0, "prefix_misses": 0,
                      "prefill_forwards": 0, "prefill_s": 0.0, "decode_s": 0.0}
        self._torch = torch
        self._cache_kwarg = cache_kwarg(model)
        # Two-part decoding (`two_part=False`: the model's own forward, as for models it does not cover).
        reason = cascade.unsupported_reason(model, self.max_context) if two_part else None
        if reason:
            log.warning("serve: %s decodes without two-part attention (%s): each row copies its system prompt's KV", type(model).__name__, reason)
        self.decoder = cascade.TwoPartDecoder(model) if two_part and not reason else None
        self._rows: Any = None  # two-part path: the batch's RowCache, rows in _batch_members order
        self._groups: Any = None  # two-part path: which rows attend to which cached prefix

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()  # a stopped engine starts again (its caches kept)
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
                    self._rows = None

    def _drop_if_done(self, seq: Sequence) -> bool:
        return seq.cancelled or seq.finish_reason is not None

    def _admit(self) -> bool:
        """Prefill waiting requests into free batch slots. On the two-part path, consecutive
        requests for one model prefill together (one forward, rows left-padded): a prompt's few
        own tokens alone make small, slow matrix products."""
        admitted = False
        together: list[Sequence] = []
        while len(self.active) + len(together) < self.max_batch_size:
            try:
                seq = self.pending.get_nowait()
            except queue.Empty:
                break
            if seq.cancelled:
                continue
            if together and (seq.model.id != together[0].model.id or self.decoder is None):
                # Its adapter is loaded (and may evict another) only once the earlier ones are in.
                self._admit_together(together)
                together = []
            together.append(seq)
            admitted = True
        if together:
            self._admit_together(together)
        return admitted

    def _admit_together(self, seqs: list[Sequence]) -> None:
        """Prefill requests of one model and add them to the batch. When the shared forward
        fails, each is tried alone, so one bad request fails alone."""
        started = time.perf_counter()
        try:
            self._ensure_adapter(seqs[0].model)
            logits = self._prefill(seqs)
            self.stats["prefill_forwards"] += 1
            self.stats["prefill_s"] += time.perf_counter() - started
        except Exception:  # noqa: BLE001 - one bad request fails alone
            if len(seqs) > 1:
                for seq in seqs:
                    self._admit_together([seq])
                return
            log.exception("prefill failed")
            self._fail(seqs[0])
            return
        for seq, row_logits in zip(seqs, logits):
            try:
                self._accept(seq, self._choose(seq, row_logits))
            except Exception:  # noqa: BLE001 - sampling or grammar error: this sequence fails alone
                log.exception("sampling failed for one sequence")
                self._fail(seq)
            if seq.finish_reason is None:
                self.active.append(seq)
            else:
                seq.prefill_cache = None  # ended at its first token: it never joins the batch

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

    def _prefill(self, seqs: list[Sequence]) -> Any:
        """Logits after each prompt [len(seqs), vocab] (one sequence unless on the two-part path),
        each sequence's KV kept for the decode batch; its sampling state set up."""
        from transformers import DynamicCache

        torch = self._torch
        for seq in seqs:
            if seq.params.grammar is not None:
                import xgrammar as xgr

                seq.matcher = xgr.GrammarMatcher(seq.params.grammar)
                seq.bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
            if seq.params.temperature >= GREEDY_BELOW_TEMPERATURE:
                seq.generator = torch.Generator()
                seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else int(time.time_ns() % 2**63))
        prefixes = [self._cached_prefix(seq) if self.prefix_cache else (None, 0) for seq in seqs]
        if self.decoder is not None:
            return self._prefill_two_part(seqs, prefixes)
        (seq,), ((prefix, start),) = seqs, prefixes
        # The model's cache grows in place: each request prefills on its own copy of the prefix.
        cache = copy.deepcopy(prefix) if prefix is not None else DynamicCache()
        logits, seq.prefill_cache = self._forward(torch.tensor([seq.prompt_ids[start:]]), [self._adapter_name(seq)], cache)
        return logits

    def _prefill_two_part(self, seqs: list[Sequence], prefixes: list[tuple[Any, int]]) -> Any:
        """Logits after each prompt, in one forward: rows left-padded, each attending to its
        cached system prompt; each prompt's own KV (after the prefix) kept for the batch."""
        torch = self._torch
        device = self.decoder.param.device
        own = [seq.prompt_ids[start:] for seq, (_, start) in zip(seqs, prefixes)]
        width = max(map(len, own))
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in own], device=device)  # padding: masked out, never embedded
        positions = torch.tensor([[0] * (width - len(ids)) + list(range(start, start + len(ids))) for ids, (_, start) in zip(own, prefixes)], device=device)
        cache = self.decoder.new_cache(len(seqs), width, torch.tensor([width - len(ids) for ids in own]))
        with self._one_adapter(self._adapter_name(seqs[0])):
            logits = self.decoder.forward(input_ids, positions, cache, self._prefix_groups([prefix for prefix, _ in prefixes]))
        for row, (seq, (prefix, _)) in enumerate(zip(seqs, prefixes)):
            seq.prefill_cache, seq.prefix_kv = (cache, row), prefix
        return logits.float()

    def _prefix_groups(self, prefix_per_row: list[Any]) -> Any:
        """cascade.PrefixGroup per distinct prefix, naming its rows (None: no row has one)."""
        from tunesmith import cascade

        by_prefix: dict[int, tuple[Any, list[int]]] = {}
        for row, prefix in enumerate(prefix_per_row):
            if prefix is not None:
                by_prefix.setdefault(id(prefix), (prefix, []))[1].append(row)
        if len(by_prefix) == 1 and len(next(iter(by_prefix.values()))[1]) == len(prefix_per_row):
            return [cascade.PrefixGroup(next(iter(by_prefix.values()))[0])]  # every row: no indexing
        device = self.decoder.param.device
        return [cascade.PrefixGroup(prefix, self._torch.tensor(rows, device=device)) for prefix, rows in by_prefix.values()] or None

    def _cached_prefix(self, seq: Sequence) -> tuple[Any, int]:
        """(the system prompt's KV, its length), or (None, 0) when it has none: computed on first
        sight, then reused, so a long shared system prompt is prefilled once, not per request.
        The key holds the adapter: a LoRA on k/v projections changes the prefix's KV."""
        from transformers import DynamicCache

        n = seq.prefix_tokens
        if n < MIN_SHARED_PREFIX or n >= len(seq.prompt_ids):
            return None, 0
        key = (self._adapter_name(seq), str(seq.model.adapter_path), tuple(seq.prompt_ids[:n]))
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return self._prefixes[key], n
        if self.decoder is not None:
            with self._one_adapter(self._adapter_name(seq)):
                prefix = self.decoder.prefix(seq.prompt_ids[:n])
        else:
            prefix = self._forward(self._torch.tensor([seq.prompt_ids[:n]]), [self._adapter_name(seq)], DynamicCache())[1]
        self._prefixes[key] = prefix
        self.stats["prefix_misses"] += 1
        # An evicted prefix stays alive while a decoding row still points to it (seq.prefix_kv).
        while len(self._prefixes) > PREFIX_CACHE_ENTRIES:
            self._prefixes.popitem(last=False)
        return prefix, n

    @contextlib.contextmanager
    def _one_adapter(self, name: str) -> Any:
        """One adapter (or none) active for the two-part decoder, which calls the model's modules
        itself, not peft's forward: for prefills, where all the inputs are one request's tokens."""
        if self.peft is None:
            yield
        elif name == BASE_ADAPTER:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(name)  # (it marks the adapter trainable: no effect under inference_mode)
            yield

    def _row_adapters(self, names: list[str]) -> Any:
        """Each input row through its own adapter for the two-part decoder: peft's routing of
        `adapter_names` (what PeftModel.forward wraps around the model). A decode step feeds one
        token per row, so the rows are the inputs every LoRA layer sees."""
        if self.peft is None:
            return contextlib.nullcontext()
        return self.peft._enable_peft_forward_hooks(adapter_names=names)

    def _decode_step(self) -> None:
        """One token for every active sequence, in one forward pass."""
        started = time.perf_counter()
        logits = self._decode_two_part() if self.decoder is not None else self._decode_forward()
        members = self._batch_members
        self.stats["steps"] += 1
        self.stats["decode_s"] += time.perf_counter() - started
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

    def _decode_forward(self) -> Any:
        """Logits of one step through the model's own forward and the batch's DynamicCache."""
        torch = self._torch
        if [id(s) for s in self.active] != [id(s) for s in self._batch_members]:
            self._rebuild_batch()
        members = self._batch_members
        lengths = self._batch_mask.sum(dim=1)
        mask = torch.cat([self._batch_mask, torch.ones(len(members), 1, dtype=self._batch_mask.dtype)], dim=1)
        input_ids = torch.tensor([[s.next_input] for s in members])
        logits, self._batch_cache = self._forward(
            input_ids, [self._adapter_name(s) for s in members], self._batch_cache, attention_mask=mask, position_ids=lengths.unsqueeze(1)
        )
        self._batch_mask = mask
        return logits

    def _decode_two_part(self) -> Any:
        """Logits of one step through the two-part decoder: each row's token written in place in
        the batch cache, the cached system prompts attended where they are stored."""
        torch = self._torch
        if [id(s) for s in self.active] != [id(s) for s in self._batch_members] or self._rows.length == self._rows.keys[0].shape[2]:
            self._lay_out_rows()
        members = self._batch_members
        device = self.decoder.param.device
        input_ids = torch.tensor([[s.next_input] for s in members], device=device)
        # The token fed now is the last one generated: its position follows the prompt and the
        # tokens fed before it.
        positions = torch.tensor([[len(s.prompt_ids) + len(s.generated) - 1] for s in members], device=device)
        with self._row_adapters([self._adapter_name(s) for s in members]):
            return self.decoder.forward(input_ids, positions, self._rows, self._groups).float()

    def _lay_out_rows(self) -> None:
        """A new batch cache for the active sequences: each row's own KV right-aligned (left
        padding masked), with GROW_COLUMNS free columns after it. Run when the membership
        changes or the cache is full; the system prompts' KV is not part of it (rows point to it)."""
        torch = self._torch
        old_row = {id(s): i for i, s in enumerate(self._batch_members)}
        # Where each row's KV is now: the old batch cache, or the cache its prefill wrote; in
        # either, its columns end at that cache's length, so each source is one block copy.
        sources: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
        lengths = []
        for row, seq in enumerate(self.active):
            if id(seq) in old_row:
                source, at = self._rows, old_row[id(seq)]
            else:
                (source, at), seq.prefill_cache = seq.prefill_cache, None
            sources.setdefault(id(source), (source, []))[1].append((row, at))
            lengths.append(source.length - int(source.start[at]))
        width = max(lengths)
        cache = self.decoder.new_cache(len(self.active), width + GROW_COLUMNS, torch.tensor([width - n for n in lengths]))
        for tensor in cache.keys + cache.values:
            tensor[:, :, :width].zero_()  # left padding: masked, but it enters the products (finite, not garbage)
        for source, pairs in sources.values():
            columns = max(lengths[row] for row, _ in pairs)  # a shorter row brings some of its (zero) padding along
            to_rows, from_rows = (torch.tensor(index, device=cache.start.device) for index in zip(*pairs))
            for new, before in zip(cache.keys + cache.values, source.keys + source.values):
                new[to_rows, :, width - columns : width] = before.index_select(0, from_rows)[:, :, source.length - columns : source.length]
        cache.length = width
        self._rows, self._batch_members = cache, list(self.active)
        self._groups = self._prefix_groups([seq.prefix_kv for seq in self.active])

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
                layers = [(layer.keys, layer.values) for layer in seq.prefill_cache.layers]
                length = layers[0][0].shape[2]
                seq.prefill_cache = None
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
