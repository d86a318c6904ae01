"""GGUF, llama.cpp's file format: Llama weights and tokenizer written with the `gguf` package, and read back.

`write_gguf` writes a merged HF Llama model (q/k rows permuted to llama.cpp's RoPE layout, the
byte-level BPE tokenizer and chat template as metadata); `write_gguf_lora` writes a PEFT LoRA as
a llama.cpp adapter. `gguf_tensor_report` reads a file back, dequantizes every tensor and
compares it with the expected arrays within each type's rounding (`gguf_tolerance`).

Separate from `export.py`, which holds the export stage and its parity checks: this module
knows the file format only, not runs or models loaded from them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunesmith.artifacts import atomic_path
from tunesmith.errors import UserError

_LLAMA_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a HF Llama weight (None for weights GGUF does not store)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = _LAYER_NAME.match(hf_name)
    if m and m.group(2) in _LLAMA_LAYER_TENSORS:
        return f"blk.{m.group(1)}.{_LLAMA_LAYER_TENSORS[m.group(2)]}.weight"
    return None


def permute_rows(weight: Any, n_head: int) -> Any:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved RoPE pairs.

    HF keeps the two halves of each head's rotary dimensions apart; llama.cpp's RoPE rotates
    adjacent pairs. Within each head, rows (first half, second half) become interleaved.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_llama(config: Any) -> None:
    """Refuse, with the fix, a model `write_gguf` cannot write: not Llama, with biases, or scaled RoPE."""
    if config.model_type != "llama":
        raise UserError(
            f"GGUF export supports the Llama family only, not {config.model_type!r}",
            "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: Llama models with attention or MLP biases are not supported", "export --format merged")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported", "export --format merged")


def _rope_parameters(config: Any) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _gguf_qtype(gguf_type: str, shape: tuple[int, ...]) -> Any:
    """Tensor type for one weight: norms stay f32, rows not a multiple of 32 cannot be q8_0."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


def _encode_tensor(array: Any, qtype: Any) -> Any:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), qtype)


def _tokenizer_pre(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name, read from the tokenizer.json structure."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    text = json.dumps(spec)
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    return "gpt-2"


def add_tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE vocab, merges, token types, special ids and the chat template."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer") or spec.get("decoder") or {}):
        raise UserError("GGUF export supports byte-level BPE tokenizers only", "export --format merged")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def hf_to_gguf_arrays(model: Any) -> dict[str, Any]:
    """HF Llama state dict -> {gguf name: float32 numpy array}, q/k permuted for llama.cpp."""
    config = model.config
    state = model.state_dict()
    arrays = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = gguf_tensor_name(name)
        if gguf_name is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise UserError(f"GGUF export: no llama.cpp tensor for {name!r}", "export --format merged")
        array = tensor.detach().float().cpu().numpy()
        if gguf_name.endswith("attn_q.weight"):
            array = permute_rows(array, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            array = permute_rows(array, config.num_key_value_heads)
        arrays[gguf_name] = array
    return arrays


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str, name: str) -> None:
    """One GGUF file of a HF Llama model (merged weights), atomically."""
    import gguf

    config = model.config
    check_llama(config)
    arrays = hf_to_gguf_arrays(model)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
        for gguf_name, array in arrays.items():
            qtype = _gguf_qtype(gguf_type, array.shape)
            writer.add_tensor(gguf_name, _encode_tensor(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def gguf_tolerance(type_name: str, reference: Any) -> Any:
    """Largest allowed |dequantized - reference| per element, from each type's rounding.

    f16 keeps 11 significant bits (relative error 2^-11, plus subnormals); bf16 keeps 8; q8_0
    stores each block of 32 as int8 times an f16 scale absmax/127, so rounding is at most half
    a step plus the scale's own f16 rounding.
    """
    import numpy as np

    ref = np.abs(reference.astype(np.float32))
    if type_name == "F32":
        return np.zeros_like(ref)
    if type_name == "F16":
        return ref * 2.0**-11 + 6e-8
    if type_name == "BF16":
        return ref * 2.0**-8 + 1e-38
    if type_name == "Q8_0":
        blocks = ref.reshape(*ref.shape[:-1], -1, 32)
        step = blocks.max(axis=-1, keepdims=True) / 127.0
        return np.broadcast_to(step * (0.5 + 127 * 2.0**-11) + 1e-7, blocks.shape).reshape(ref.shape)
    raise ValueError(f"no tolerance for GGUF type {type_name}")


def gguf_tensor_report(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Read a GGUF file back, dequantize every tensor and compare it with `expected` arrays."""
    import numpy as np
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    rows, problems = [], []
    seen = set()
    for tensor in reader.tensors:
        seen.add(tensor.name)
        if tensor.name not in expected:
            problems.append(f"{tensor.name}: not in the model")
            continue
        ref = expected[tensor.name]
        got = quants.dequantize(tensor.data, tensor.tensor_type).reshape(ref.shape)
        err = np.abs(got.astype(np.float32) - ref.astype(np.float32))
        tol = gguf_tolerance(tensor.tensor_type.name, ref)
        ok = bool((err <= tol).all())
        rows.append({"name": tensor.name, "type": tensor.tensor_type.name, "max_abs_err": float(err.max()), "ok": ok})
        if not ok:
            problems.append(f"{tensor.name} ({tensor.tensor_type.name}): max error {float(err.max()):.3g} above tolerance")
    problems += [f"{name}: missing from the file" for name in expected if name not in seen]
    return {"tensors": len(rows), "problems": problems, "max_abs_err_by_type": _max_by_type(rows)}


def _max_by_type(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        out[r["type"]] = max(out.get(r["type"], 0.0), r["max_abs_err"])
    return out


def lora_modules(peft_model: Any) -> dict[str, tuple[Any, Any, float]]:
    """{HF weight name: (lora_A, lora_B, scaling)} of the active adapter."""
    adapter = peft_model.active_adapter
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            out[name + ".weight"] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter]))
    return out


def write_gguf_lora(peft_model: Any, path: Path) -> dict[str, Any]:
    """The adapter alone as a llama.cpp LoRA GGUF. Returns the arrays written, for checking.

    llama.cpp scales each pair by alpha / rank. PEFT's scaling may differ (rsLoRA, per-module
    alpha), so B is pre-multiplied by PEFT's scaling and alpha is set to the rank: the product
    llama.cpp computes is exactly PEFT's.
    """
    import gguf

    config = peft_model.base_model.model.config
    check_llama(config)
    peft_cfg = peft_model.peft_config[peft_model.active_adapter]
    if getattr(peft_cfg, "use_dora", False):
        raise UserError("GGUF LoRA export: DoRA adapters are not supported by llama.cpp", "export --format gguf uses the merged model; use that")
    modules = lora_modules(peft_model)
    ranks = {a.shape[0] for a, _, _ in modules.values()}
    if len(ranks) != 1:
        raise UserError("GGUF LoRA export: all LoRA modules must share one rank (rank_pattern is not supported)", "use the merged GGUF")
    rank = ranks.pop()
    arrays = {}
    for hf_name, (lora_a, lora_b, scaling) in modules.items():
        gguf_name = gguf_tensor_name(hf_name)
        if gguf_name is None or gguf_name in ("token_embd.weight", "output.weight"):
            raise UserError(f"GGUF LoRA export: llama.cpp cannot apply a LoRA to {hf_name}", "use the merged GGUF")
        a = lora_a.detach().float().cpu().numpy()
        b = lora_b.detach().float().cpu().numpy() * scaling
        # Only B's rows (the output features) follow the q/k permutation: (B A) permuted = (B permuted) A.
        if gguf_name.endswith("attn_q.weight"):
            b = permute_rows(b, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            b = permute_rows(b, config.num_key_value_heads)
        arrays[gguf_name + ".lora_a"] = a
        arrays[gguf_name + ".lora_b"] = b
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        for name, array in arrays.items():
            writer.add_tensor(name, array.astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return arrays
