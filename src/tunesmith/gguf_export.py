"""GGUF, llama.cpp's file format: model weights and metadata written with the `gguf` package, and read back.

`write_gguf` writes a merged HF model of a family llama.cpp runs (Llama 2/3.x and SmolLM,
Mistral, Qwen2/2.5, Gemma 3, Phi-3) the way llama.cpp's own convert_hf_to_gguf.py writes it:
gguf's tensor names, the Llama q/k permutation, Gemma's norm weight + 1, Llama 3's rope_freqs,
and each architecture's hyperparameter keys; the tokenizer goes through `gguf_vocab.py`.
`write_gguf_lora` writes a PEFT LoRA as a llama.cpp adapter. `gguf_tensor_report` reads a file
back, dequantizes every tensor and compares it with the expected arrays within each type's
rounding (`gguf_tolerance`). `format_support` is the one rule of which export formats a model
can take; config check, run start and export ask it.

Separate from `export.py`, which holds the export stage and its parity checks: this module
knows the file format only, not runs or models loaded from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.artifacts import atomic_path
from tunesmith.errors import UserError

# HF model_type -> llama.cpp architecture, as llama.cpp's converter maps the HF classes (Mistral's
# dense models are written as Llama; Gemma 3's text model as gemma3).
GGUF_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gemma3_text": "GEMMA3", "phi3": "PHI3"}
ROPE_TYPES = {"LLAMA": ("default", "llama3", "linear"), "QWEN2": ("default", "linear", "yarn"), "GEMMA3": ("default", "linear"), "PHI3": ("default", "longrope")}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's default for gemma3: five sliding layers, then one global


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE settings of one attention kind (Gemma 3 keeps one per kind), with rope_theta."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if isinstance(rope.get(layer_type), dict):
        rope = dict(rope[layer_type])
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type") or "default")
    return rope


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_unsupported(config: Any) -> str | None:
    """Why GGUF cannot hold this model (None when it can): the family, or a feature llama.cpp lacks."""
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        return f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} models, not {config.model_type!r}"
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES[arch]:
        return f"GGUF export of {config.model_type}: RoPE scaling {rope_type!r} is not supported"
    if getattr(config, "mlp_bias", False):
        return f"GGUF export of {config.model_type}: MLP biases are not supported by llama.cpp"
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        return (
            f"GGUF export of mistral: llama.cpp runs Mistral as Llama, with full attention; this model's sliding window "
            f"({window} tokens, shorter than its {config.max_position_embeddings}-token context) would be lost"
        )
    if arch == "QWEN2" and getattr(config, "use_sliding_window", False):
        return "GGUF export of qwen2: llama.cpp's qwen2 has no sliding-window attention (use_sliding_window: true)"
    if arch == "GEMMA3":
        if getattr(config, "attn_logit_softcapping", None):
            return "GGUF export of gemma3: attention logit soft-capping is not supported by llama.cpp's gemma3"
        if getattr(config, "query_pre_attn_scalar", head_dim(config)) != head_dim(config):
            return "GGUF export of gemma3: llama.cpp scales queries by 1/sqrt(head_dim), this model's query_pre_attn_scalar differs"
        if rope_parameters(config, "sliding_attention")["rope_type"] != "default":
            return "GGUF export of gemma3: RoPE scaling on the sliding-window layers is not supported"
    return None


def format_support(config: Any) -> dict[str, str | None]:
    """For each export format: None when this model can be exported to it, else why not.

    The one rule config check, run start and export all ask: a family's refusal shows before
    any training, not after it.
    """
    gguf_reason = gguf_unsupported(config)
    return {"merged": None, "adapter": None, "hub": None, "gguf": gguf_reason, "ollama": gguf_reason}


def format_problems(config: Any, formats: list[str]) -> list[str]:
    """One line per requested format this model cannot be exported to."""
    support = format_support(config)
    return [f"export.formats: {fmt}: {support[fmt]}" for fmt in formats if support.get(fmt)]


def model_format_problems(model_dir: Path, formats: list[str]) -> list[str]:
    """`format_problems` for a model folder, from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    return format_problems(AutoConfig.from_pretrained(str(model_dir)), list(formats))


def refuse_unsupported_formats(model_dir: Path, formats: list[str]) -> None:
    """Run and train start: a requested export the model's family cannot take stops here, before training."""
    problems = model_format_problems(model_dir, formats)
    if problems:
        raise UserError("; ".join(problems), "remove the format from export.formats, or export merged/adapter and convert with llama.cpp")


def check_gguf_supported(config: Any) -> str:
    """The gguf MODEL_ARCH name for this model; UserError (with the fix) when GGUF cannot hold it."""
    reason = gguf_unsupported(config)
    if reason:
        raise UserError(reason, "export --format merged (or adapter) instead")
    return GGUF_ARCHITECTURES[config.model_type]


def gguf_tensor_name(config: Any, hf_name: str) -> str | None:
    """llama.cpp's name for a HF weight (None for weights GGUF does not store), from gguf's own map."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[config.model_type])
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    return tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_rows(weight: Any, n_head: int) -> Any:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved RoPE pairs.

    HF keeps the two halves of each head's rotary dimensions apart; llama.cpp's Llama RoPE rotates
    adjacent pairs. Within each head, rows (first half, second half) become interleaved. Only the
    Llama architecture needs it: qwen2, gemma3 and phi3 use llama.cpp's NeoX RoPE, HF's layout.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def transform_for_gguf(config: Any, gguf_name: str, array: Any) -> Any:
    """The converter's per-tensor transforms: Llama's q/k permutation, Gemma's norm weight + 1."""
    arch = GGUF_ARCHITECTURES[config.model_type]
    if arch == "LLAMA" and ".attn_q." in gguf_name:
        return permute_rows(array, config.num_attention_heads)
    if arch == "LLAMA" and ".attn_k." in gguf_name:
        return permute_rows(array, config.num_key_value_heads)
    if arch == "GEMMA3" and gguf_name.endswith("norm.weight"):
        return array + 1.0  # Gemma3RMSNorm multiplies by (1 + weight); llama.cpp by weight
    return array


def _rope_freqs(config: Any) -> Any:
    """Llama 3's per-dimension RoPE wavelength factors (`rope_freqs`), as llama.cpp's converter computes them."""
    import math

    import numpy as np

    rope = rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def extra_tensors(config: Any) -> dict[str, Any]:
    """Tensors the converter generates from the config: Llama 3's rope_freqs, Phi-3's long/short factors."""
    import numpy as np

    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        return {"rope_freqs.weight": _rope_freqs(config)}
    if rope["rope_type"] == "longrope":
        return {
            "rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32),
        }
    return {}


def hf_to_gguf_arrays(model: Any) -> dict[str, Any]:
    """HF state dict -> {gguf name: float32 numpy array}, transformed as llama.cpp's converter does."""
    config = model.config
    check_gguf_supported(config)
    arrays = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = gguf_tensor_name(config, name)
        if gguf_name is None:
            raise UserError(f"GGUF export: no llama.cpp tensor for {name!r}", "export --format merged")
        arrays[gguf_name] = transform_for_gguf(config, gguf_name, tensor.detach().float().cpu().numpy())
    arrays.update(extra_tensors(config))
    return arrays


def _gguf_qtype(gguf_type: str, shape: tuple[int, ...]) -> Any:
    """Tensor type for one weight: norms stay f32, rows not a multiple of 32 cannot be q8_0."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[gguf_type]


def f16_file_arrays(expected: dict[str, Any]) -> dict[str, Any]:
    """The arrays an f16 file of `expected` holds (weights rounded to f16, norms kept f32).

    llama.cpp's quantizer (q4_0, q4_k_m) starts from our f16 file, not from the fp32 weights: its
    output is checked against these, or the f16 rounding would count as quantization error.
    """
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    return {name: array.astype(np.float16).astype(np.float32) if _gguf_qtype("f16", array.shape) == Q.F16 else array for name, array in expected.items()}


def _encode_tensor(array: Any, qtype: Any) -> Any:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), qtype)


def add_model_metadata(writer: Any, config: Any) -> None:
    """The hyperparameter keys llama.cpp's converter writes for each architecture."""
    arch = GGUF_ARCHITECTURES[config.model_type]
    rope = rope_parameters(config)
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_vocab_size(config.vocab_size)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(_rope_scaling("LINEAR"))
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(_rope_scaling("YARN"))
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if arch == "LLAMA":
        writer.add_rope_dimension_count(dim)
    elif arch == "PHI3":
        rotary = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor", 1.0)
        writer.add_rope_dimension_count(int(rotary * config.hidden_size) // config.num_attention_heads)
        original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        writer.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        if rope["rope_type"] == "longrope":
            import math

            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
    elif arch == "GEMMA3":
        _add_gemma3_metadata(writer, config)


def _rope_scaling(name: str) -> Any:
    import gguf

    return getattr(gguf.RopeScalingType, name)


def _add_gemma3_metadata(writer: Any, config: Any) -> None:
    """Sliding window (and its pattern when not llama.cpp's default), local RoPE base, soft-capping."""
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    layer_types = list(getattr(config, "layer_types", None) or [])
    is_sliding = [t == "sliding_attention" for t in layer_types]
    if any(is_sliding):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
        default = [(i % GEMMA3_SWA_PATTERN) < GEMMA3_SWA_PATTERN - 1 for i in range(len(is_sliding))]
        if is_sliding != default:
            writer.add_sliding_window_pattern(is_sliding)


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str, name: str) -> None:
    """One GGUF file of a HF model (merged weights), atomically."""
    import gguf

    from tunesmith.gguf_vocab import add_tokenizer_metadata

    config = model.config
    arch = check_gguf_supported(config)
    arrays = hf_to_gguf_arrays(model)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        add_model_metadata(writer, config)
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
    a step plus the scale's own f16 rounding: relative 2^-11, or absolute 2^-25 where the scale
    is an f16 subnormal (a block whose largest weight is under ~0.008), times up to 127 levels.
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
        return np.broadcast_to(step * (0.5 + 127 * 2.0**-11) + 127 * 2.0**-25 + 1e-7, blocks.shape).reshape(ref.shape)
    if type_name in LEGACY_QUANT_LEVELS:
        # llama.cpp's q4_0/q5_0 scale a block of 32 by its signed extreme / -levels: the
        # opposite extreme may clamp one whole step, so a step (plus the f16 scale) bounds it.
        blocks = ref.reshape(*ref.shape[:-1], -1, 32)
        step = blocks.max(axis=-1, keepdims=True) / LEGACY_QUANT_LEVELS[type_name]
        return np.broadcast_to(step * (1 + 2.0**-9) + 1e-7, blocks.shape).reshape(ref.shape)
    if type_name in K_QUANT_TYPES:
        # k-quants (what q4_K_M writes: Q4_K, Q6_K) fit scales and minima per sub-block by search,
        # with no closed-form bound: half the 256-block's extreme catches a tensor written in the
        # wrong place or layout, not rounding, which the parity share judges.
        blocks = ref.reshape(*ref.shape[:-1], -1, 256)
        return np.broadcast_to(blocks.max(axis=-1, keepdims=True) * 0.5 + 1e-7, blocks.shape).reshape(ref.shape)
    raise ValueError(f"no tolerance for GGUF type {type_name}")


LEGACY_QUANT_LEVELS = {"Q4_0": 8.0, "Q5_0": 16.0}
K_QUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


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
    arch = check_gguf_supported(config)
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
        gguf_name = gguf_tensor_name(config, hf_name)
        if gguf_name is None or gguf_name in ("token_embd.weight", "output.weight"):
            raise UserError(f"GGUF LoRA export: llama.cpp cannot apply a LoRA to {hf_name}", "use the merged GGUF")
        a = lora_a.detach().float().cpu().numpy()
        b = lora_b.detach().float().cpu().numpy() * scaling
        # Only B's rows (the output features) follow the Llama q/k permutation: (B A) permuted = (B permuted) A.
        b = transform_for_gguf(config, gguf_name, b)
        arrays[gguf_name + ".lora_a"] = a
        arrays[gguf_name + ".lora_b"] = b
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
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
