"""Two-part (cascade) attention for Llama-style decoders: the shared prefix attended once.

A batch of prompts that start with the same system prompt needs that prefix's keys and values
once, not once per row. Each layer here attends in two parts and merges them exactly:

- the prefix part: every query of every row against the prefix's KV, stored once (batch 1),
  as one large matrix product instead of one small product per row;
- the own part: each row's queries against its own KV (its prompt after the prefix, then its
  generated tokens), in a cache allocated once per batch and written in place;

and the two softmaxes are merged with their log-sum-exp, which gives the softmax over the
concatenated keys. Query heads that share a KV head (GQA) are folded into the query length, so
the repeated KV is never materialised.

We run the model's own modules (its norms, projections, rotary embedding, MLP), so a PEFT
adapter injected into the projections applies as in the model's forward. Only the decoder
layers whose forward we reproduce are accepted (`unsupported_reason` says why not).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

# Decoder layers whose forward is pre-norm attention + MLP with rotary positions and no extra
# query/key norms: the forward `TwoPartDecoder.forward` writes out.
LLAMA_STYLE_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")
SCORES_PER_CHUNK = 1 << 24  # attention scores held at once (64 MiB in fp32); bounds long prefills


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model: Any, total_tokens: int) -> str | None:
    """Why this model cannot run the two-part path (None when it can), for sequences of up to
    `total_tokens` (a sliding window shorter than that changes which keys a query sees)."""
    lm = _causal_lm(model)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None or not hasattr(lm, "lm_head"):
        return f"{type(lm).__name__} has no model.layers / lm_head"
    names = sorted({type(layer).__name__ for layer in layers})
    if any(name not in LLAMA_STYLE_LAYERS for name in names):
        return f"its decoder layers ({', '.join(names)}) are not Llama-style"
    if any(not type(layer).__module__.startswith("transformers.models.") for layer in layers):
        return "its decoder layers are remote code"
    for layer in layers:
        window = getattr(layer.self_attn, "sliding_window", None)
        if type(layer).__name__ == "MistralDecoderLayer":
            window = getattr(lm.config, "sliding_window", None)
        if window is not None and window < total_tokens:
            return f"it attends through a sliding window of {window} tokens, shorter than {total_tokens}"
    return None


@dataclass
class PrefixGroup:
    """A prefix's keys and values per layer ([1, kv_heads, n, head_dim] each, stored once) and
    the batch rows that attend to it (a long tensor; None: every row, the batch's only group). A
    row in no group attends to its own part only: a server batch mixes requests with different
    system prompts, or none."""

    layers: list[tuple[Any, Any]]
    rows: Any = None


@dataclass
class RowCache:
    """Each row's own keys and values, per layer [rows, kv_heads, capacity, head_dim],
    allocated once; columns [0, length) are written, a row's columns before `start` are padding
    (masked, but they enter the products: they must hold finite values, e.g. zeros)."""

    keys: list[Any]
    values: list[Any]
    start: Any  # [rows] first real column of each row (prompts are left-padded)
    length: int = 0

    def select(self, index: Any) -> None:
        """Keep only the rows in `index` (finished rows leave the batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.start = self.start.index_select(0, index)


class TwoPartDecoder:
    """The model's decoder run with two-part attention; state lives in a RowCache and a prefix."""

    def __init__(self, model: Any):
        self.lm = _causal_lm(model)
        self.body = self.lm.model
        config = self.lm.config
        self.layers = list(self.body.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.head_dim = attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.param = next(self.lm.parameters())

    def new_cache(self, rows: int, capacity: int, start: Any) -> RowCache:
        """An unwritten cache for `rows` rows of up to `capacity` columns."""
        import torch

        shape = (rows, self.kv_heads, capacity, self.head_dim)
        keys = [torch.empty(shape, dtype=self.param.dtype, device=self.param.device) for _ in self.layers]
        values = [torch.empty_like(k) for k in keys]
        return RowCache(keys, values, start.to(self.param.device))

    def prefix(self, ids: list[int]) -> list[tuple[Any, Any]]:
        """The prefix's keys and values per layer, [1, kv_heads, len(ids), head_dim]."""
        import torch

        device = self.param.device
        cache = self.new_cache(1, len(ids), torch.zeros(1, dtype=torch.long))
        self.forward(torch.tensor([ids], device=device), torch.arange(len(ids), device=device)[None], cache, None)
        return list(zip(cache.keys, cache.values))

    def forward(self, input_ids: Any, position_ids: Any, cache: RowCache, prefixes: list[PrefixGroup] | None) -> Any:
        """Logits at the last column for `input_ids` [rows, T] written at cache columns
        [length, length + T); each row's queries also attend to all of its group's prefix.

        Token-wise work (embeddings, norms, projections, MLP) runs on the real tokens only,
        packed: left padding costs attention columns, not matrix rows."""
        import torch

        rows, width = input_ids.shape
        cols = torch.arange(cache.length, cache.length + width, device=input_ids.device)
        real = (cols[None, :] >= cache.start[:, None]).flatten().nonzero().squeeze(1)
        if len(real) == rows * width:
            real = None
        hidden = self.body.embed_tokens(input_ids.flatten() if real is None else input_ids.flatten()[real])
        cos, sin = self.body.rotary_emb(hidden, position_ids)
        seen = self._own_mask(cache, width)
        # With a prefix the own part is ours (it must return its log-sum-exp): an additive mask
        # laid out for the folded GQA query; without one, torch's attention takes the bool mask.
        mask = _folded_bias(seen, self.layers[0].self_attn.num_key_value_groups) if prefixes else seen[:, None]
        tokens = [_group_tokens(group.rows, real, rows, width) for group in prefixes or []]
        for i, layer in enumerate(self.layers):
            normed = layer.input_layernorm(hidden)
            parts = [(group.layers[i], index) for group, index in zip(prefixes, tokens)] if prefixes else None
            attended = self._attention(layer.self_attn, normed, (rows, width, real), cos, sin, cache, i, parts, mask)
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        cache.length += width
        # Each row's last column is a real token (left padding); in the packed order it ends the row.
        last = torch.arange(1, rows + 1, device=hidden.device) * width - 1 if real is None else (width - cache.start).cumsum(0) - 1
        return self.lm.lm_head(self.body.norm(hidden[last]))

    def _own_mask(self, cache: RowCache, width: int) -> Any:
        """Which own keys each query sees [rows, width, keys]: causal, padding masked; a
        padding query sees itself, so no softmax row is empty (its output is never used)."""
        import torch

        device = cache.start.device
        query_cols = torch.arange(cache.length, cache.length + width, device=device)
        key_cols = torch.arange(cache.length + width, device=device)
        seen = (key_cols[None, None, :] >= cache.start[:, None, None]) & (key_cols[None, None, :] <= query_cols[None, :, None])
        return seen | (key_cols[None, None, :] == query_cols[None, :, None])

    def _attention(self, attn: Any, x: Any, layout: tuple, cos: Any, sin: Any, cache: RowCache, i: int, prefix_parts: Any, mask: Any) -> Any:
        """Attention output for x [tokens, hidden] (packed when `real` lists the real columns)."""
        import torch

        rows, width, real = layout
        d = self.head_dim

        def heads_of(projected):  # [tokens, n * d] -> [rows, n, width, d], zeros at padding
            if real is not None:
                projected = projected.new_zeros(rows * width, projected.shape[-1]).index_copy_(0, real, projected)
            return projected.view(rows, width, -1, d).transpose(1, 2)

        q, k, v = heads_of(attn.q_proj(x)), heads_of(attn.k_proj(x)), heads_of(attn.v_proj(x))
        q, k = self.apply_rotary(q, k, cos, sin)
        end = cache.length + width
        cache.keys[i][:, :, cache.length : end] = k
        cache.values[i][:, :, cache.length : end] = v
        keys, values = cache.keys[i][:, :, :end], cache.values[i][:, :, :end]
        q = q.to(keys.dtype)  # a quantized model's projections may compute in another dtype than its cache
        heads, groups = q.shape[1], q.shape[1] // self.kv_heads
        if prefix_parts is None:
            # One part: torch's fused attention, GQA without repeating the keys.
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            out = out.to(x.dtype).transpose(1, 2).reshape(rows * width, heads * d)
            return attn.o_proj(out if real is None else out[real])
        # GQA: the query heads of one KV head become one longer query, so keys are not repeated.
        q = q.reshape(rows, self.kv_heads, groups * width, d)
        out, lse = attend(q, keys, values, mask, attn.scaling)
        # Every real query of a group's rows against its one prefix: a batch-1 attention with a long query.
        pre_out, pre_lse = self._prefix_part(q, prefix_parts, (rows, width, real), attn.scaling)
        # Merge the two softmaxes: each part weighted by its share of the total exp-sum.
        total = torch.logaddexp(lse, pre_lse)
        out = out * torch.exp(lse - total) + pre_out * torch.exp(pre_lse - total)
        out = out.to(x.dtype).view(rows, self.kv_heads, groups, width, d).permute(0, 3, 1, 2, 4).reshape(rows * width, heads * d)
        return attn.o_proj(out if real is None else out[real])


    def _prefix_part(self, q: Any, parts: list[tuple[Any, Any]], layout: tuple, scale: float) -> tuple[Any, Any]:
        """(output, log-sum-exp) of the queries q [rows, kv_heads, groups * width, d] against the
        prefixes, in q's layout. `parts` holds each prefix's (keys, values) and the packed token
        indices that attend to it (None: all); other queries get zero output, -inf log-sum-exp."""
        import torch

        rows, width, _ = layout
        kv, d = self.kv_heads, self.head_dim
        groups = q.shape[2] // width
        by_token = q.view(rows, kv, groups, width, d).permute(0, 3, 1, 2, 4).reshape(rows * width, kv, groups, d)
        if len(parts) == 1 and parts[0][1] is None:
            out, lse = self._attend_tokens(by_token, parts[0][0], scale)
        else:
            out = by_token.new_zeros(rows * width, kv, groups, d, dtype=torch.float32)
            lse = out.new_full((rows * width, kv, groups, 1), float("-inf"))
            for prefix_kv, index in parts:
                if len(index):
                    part_out, part_lse = self._attend_tokens(by_token[index], prefix_kv, scale)
                    out.index_copy_(0, index, part_out)
                    lse.index_copy_(0, index, part_lse)
        to_layout = lambda t: t.reshape(rows, width, kv, groups, -1).permute(0, 2, 3, 1, 4).reshape(rows, kv, groups * width, -1)  # noqa: E731
        return to_layout(out), to_layout(lse)

    def _attend_tokens(self, by_token: Any, prefix_kv: tuple[Any, Any], scale: float) -> tuple[Any, Any]:
        """Queries [tokens, kv_heads, groups, d] against one prefix, as one batch-1 attention."""
        tokens, kv, groups, d = by_token.shape
        out, lse = attend(by_token.permute(1, 0, 2, 3).reshape(1, kv, tokens * groups, d), *prefix_kv, None, scale)
        return out.view(kv, tokens, groups, d).transpose(0, 1), lse.view(kv, tokens, groups, 1).transpose(0, 1)


def _group_tokens(group_rows: Any, real: Any, rows: int, width: int) -> Any:
    """Packed-token indices [rows * width] of a group's real queries; None: every token."""
    import torch

    if group_rows is None:
        return real
    member = torch.zeros(rows, dtype=torch.bool, device=group_rows.device).index_fill_(0, group_rows, True).repeat_interleave(width)
    if real is not None:
        member &= torch.zeros(rows * width, dtype=torch.bool, device=member.device).index_fill_(0, real, True)
    return member.nonzero().squeeze(1)


def _folded_bias(seen: Any, groups: int) -> Any:
    """The own mask as an additive bias [rows, 1, groups * width, keys]: query row g * width + t
    is head group g at column t (the folded GQA layout)."""
    import torch

    bias = torch.zeros(seen.shape, dtype=torch.float32, device=seen.device).masked_fill_(~seen, float("-inf"))
    return bias[:, None].repeat(1, 1, groups, 1)


def attend(q: Any, k: Any, v: Any, bias: Any, scale: float) -> tuple[Any, Any]:
    """(softmax(q k^T * scale + bias) v in fp32, log-sum-exp of each query's scores).

    q [b, h, n, d], k and v [b, h, s, d]; bias broadcasts to the scores. Queries go in chunks,
    so a long prefill never holds all of its scores at once; one exp pass per score."""
    import torch

    b, h, n, _ = q.shape
    step = max(1, SCORES_PER_CHUNK // max(1, b * h * k.shape[2]))
    outs, lses = [], []
    for lo in range(0, n, step):
        scores = torch.matmul(q[:, :, lo : lo + step], k.transpose(-1, -2)).float().mul_(scale)
        if bias is not None:
            scores.add_(bias[:, :, lo : lo + step])
        top = scores.amax(dim=-1, keepdim=True)
        weights = scores.sub_(top).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        outs.append(torch.matmul(weights.to(v.dtype), v).float().div_(total))
        lses.append(top + total.log())
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
