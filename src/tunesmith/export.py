"""`tunesmith export RUN --format merged|adapter|gguf|ollama`: hand the trained model to other tools.

Every export is checked against the trained model right after it is written (the parity check):
the same prompts go through the exported artifact, read back by the tool that will consume it,
and through the trained model; greedy outputs are compared and every mismatch is reported.

Also home of `load_run_model`, the one way to load what a run trained (base + adapter, or the
fully fine-tuned model) with the drift guard: an adapter is refused on a base whose fingerprint
differs from the one its run recorded, because a LoRA on the wrong base silently produces noise.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.artifacts import (
    ADAPTER_DIR,
    CONFIG_FILE,
    EVAL_SPLIT_FILE,
    EXPORT_DIR,
    FULL_MODEL_DIR,
    atomic_path,
    read_manifest,
    update_manifest,
)
from tunesmith.errors import UserError

FORMATS = ("merged", "adapter", "gguf", "ollama")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
OLLAMA_ADAPTER_ARCHS = ("llama", "gemma", "gemma2", "gemma3")
TUNESMITH_MANIFEST = "tunesmith_manifest.json"
PARITY_NEW_TOKENS = 16

# Probe conversations for the parity check when the run has no held-out split to borrow from.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": "my package #12345 has not moved for 8 days"}],
    [
        {"role": "user", "content": "Hi, the app crashes when I open the reports page."},
        {"role": "assistant", "content": "Which device do you use?"},
        {"role": "user", "content": "My iPhone. Please fix this soon."},
    ],
]


# ----------------------------------------------------------------------------------------------
# Loading what a run trained, with the drift guard


@dataclass
class RunModel:
    """What a run trained, loaded: `model` is a PeftModel (adapter runs) or a plain HF model."""

    model: Any
    tokenizer: Any
    kind: str  # "adapter" or "full"
    base_fingerprint: str
    base_path: Path
    cfg: Any
    run_dir: Path
    adapter_dir: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def check_base_fingerprint(expected: str | None, actual: str, *, base: str, allow_base_mismatch: bool) -> str | None:
    """The drift guard. Returns a warning when a mismatch is allowed, raises otherwise."""
    if not expected or expected == actual:
        return None
    message = f"base model {base!r} has fingerprint {actual}, but the adapter was trained on {expected}"
    if allow_base_mismatch:
        return message + " (allowed by --allow-base-mismatch)"
    raise UserError(message, "load the base the run was trained on, or pass --allow-base-mismatch if you know they match")


def base_model_ref(cfg: Any) -> str:
    """The config's model reference; a relative folder is taken relative to the config's folder."""
    name = cfg.model.name
    resolved = cfg.resolve(name)
    if resolved is not None and not Path(name).is_absolute() and resolved.exists():
        return str(resolved)
    return name


def read_run(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """(config, manifest) of a run folder, with user errors for what is missing."""
    from tunesmith.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found", "pass the output_dir of a trained run")
    manifest = read_manifest(run_dir)
    return load_config(run_dir / CONFIG_FILE), manifest


def load_run_model(run_dir: Path, *, allow_base_mismatch: bool = False, dtype: Any = None) -> RunModel:
    """Load the trained model of a run: base + adapter (drift-guarded), or the full model."""
    from tunesmith.models import load_model

    run_dir = Path(run_dir)
    cfg, manifest = read_run(run_dir)
    train = manifest.get("train") or {}
    full_dir, adapter_dir = run_dir / FULL_MODEL_DIR, run_dir / ADAPTER_DIR
    if (full_dir / "config.json").exists():
        loaded = load_model(str(full_dir), dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        return RunModel(loaded.model, loaded.tokenizer, "full", train.get("base_fingerprint") or loaded.fingerprint, loaded.path, cfg, run_dir, None, manifest)
    if not (adapter_dir / "adapter_config.json").exists():
        raise UserError(f"{run_dir} has no trained model ({ADAPTER_DIR}/ or {FULL_MODEL_DIR}/)", "train it first: tunesmith train CONFIG")
    from peft import PeftModel

    base = load_model(base_model_ref(cfg), dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle)
    warning = check_base_fingerprint(train.get("base_fingerprint"), base.fingerprint, base=cfg.model.name, allow_base_mismatch=allow_base_mismatch)
    if warning:
        manifest = {**manifest, "base_mismatch_warning": warning}
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    model.eval()
    return RunModel(model, base.tokenizer, "adapter", base.fingerprint, base.path, cfg, run_dir, adapter_dir, manifest)


# ----------------------------------------------------------------------------------------------
# Adapter compatibility lint (also called by train before training starts)


def lint_adapter_config(lora_cfg: dict[str, Any], model_type: str) -> list[str]:
    """Problems serving engines will have with this adapter config; every one, with its fix.

    `lora_cfg` is a PEFT adapter_config.json (or a peft LoraConfig's dict); `model_type` is the
    base's `config.model_type`.
    """
    problems = []
    ranks = [int(lora_cfg.get("r") or 0), *[int(r) for r in (lora_cfg.get("rank_pattern") or {}).values()]]
    max_rank = max(ranks)
    if max_rank > VLLM_DEFAULT_MAX_LORA_RANK:
        flag = next((r for r in VLLM_LORA_RANKS if r >= max_rank), max_rank)
        problems.append(
            f"vLLM: LoRA rank {max_rank} is above vLLM's default max_lora_rank of {VLLM_DEFAULT_MAX_LORA_RANK}; "
            f"start vLLM with --max-lora-rank {flag}"
        )
    if lora_cfg.get("modules_to_save"):
        problems.append(
            f"vLLM: modules_to_save {sorted(lora_cfg['modules_to_save'])} (fully trained modules) cannot be served as a LoRA; "
            "export --format merged instead"
        )
    targets = lora_cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    embedding_like = [t for t in targets if any(k in t for k in ("embed_tokens", "lm_head", "wte", "embed_out"))]
    if embedding_like or lora_cfg.get("trainable_token_indices"):
        problems.append(
            f"vLLM: LoRA on the embedding or output head ({', '.join(embedding_like) or 'trainable tokens'}) is not servable; "
            "drop these targets or export --format merged"
        )
    if lora_cfg.get("use_dora"):
        problems.append("vLLM: DoRA adapters are not supported; export --format merged (or gguf) instead")
    if model_type not in OLLAMA_ADAPTER_ARCHS:
        problems.append(
            f"Ollama: ADAPTER import supports llama and gemma architectures only, not {model_type!r}; "
            "export --format ollama (a merged GGUF) instead"
        )
    return problems


# ----------------------------------------------------------------------------------------------
# Parity: the same prompts through two models


def probe_conversations(run_dir: Path, cfg: Any, count: int = 3) -> list[list[dict[str, str]]]:
    """Prompts for the parity check: the run's first held-out examples, else fixed probes."""
    conversations = []
    path = Path(run_dir) / EVAL_SPLIT_FILE
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            prompt = [{"role": m["role"], "content": m.get("content") or ""} for m in messages[:last]]
            if prompt:
                conversations.append(prompt)
            if len(conversations) == count:
                break
    if not conversations:
        conversations = [list(c) for c in PROBE_CONVERSATIONS]
    system = getattr(getattr(cfg, "data", None), "system_prompt", None)
    if system:
        conversations = [c if c[0]["role"] == "system" else [{"role": "system", "content": system}, *c] for c in conversations]
    return conversations


def prompt_ids(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]) for c in conversations]


def greedy_tokens(model: Any, prompts: list[list[int]], eos_ids: list[int], max_new_tokens: int = PARITY_NEW_TOKENS) -> list[list[int]]:
    """Greedy continuation of each prompt, one at a time (no padding to differ between models)."""
    import torch

    outputs = []
    with torch.inference_mode():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


def max_logit_diff(model_a: Any, model_b: Any, prompts: list[list[int]]) -> float:
    import torch

    worst = 0.0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            worst = max(worst, float((model_a(input_ids=x).logits.float() - model_b(input_ids=x).logits.float()).abs().max()))
    return worst


def compare_outputs(reference: list[list[int]], exported: list[list[int]], tokenizer: Any) -> dict[str, Any]:
    mismatches = []
    for i, (ref, got) in enumerate(zip(reference, exported)):
        if ref != got:
            mismatches.append(
                {"prompt": i, "trained": tokenizer.decode(ref), "exported": tokenizer.decode(got), "first_diff_token": next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))}
            )
    return {"prompts": len(reference), "matching": len(reference) - len(mismatches), "mismatches": mismatches}


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------------------------
# merged


def merged_model(run: RunModel) -> Any:
    """The trained model with the LoRA folded into the base weights (a fresh copy)."""
    import copy

    if run.kind == "full":
        return run.model
    return copy.deepcopy(run.model).merge_and_unload()


def export_merged(run: RunModel, out_dir: Path) -> dict[str, Any]:
    """HF folder (safetensors, tokenizer, chat template, generation config) + parity check."""
    from transformers import AutoModelForCausalLM

    merged = merged_model(run)
    eos = eos_token_ids(run.model, run.tokenizer)
    merged.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    merged.generation_config.pad_token_id = run.tokenizer.pad_token_id
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        merged.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        _write_tunesmith_manifest(tmp, run, "merged")
    # Parity: reload with plain transformers, as a user would.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=merged.dtype).eval()
    prompts = prompt_ids(run.tokenizer, probe_conversations(run.run_dir, run.cfg))
    parity = compare_outputs(greedy_tokens(run.model, prompts, eos), greedy_tokens(reloaded, prompts, eos), run.tokenizer)
    parity["max_logit_diff"] = max_logit_diff(run.model, reloaded, prompts)
    return {"path": str(out_dir), "parity": parity}


def _write_tunesmith_manifest(folder: Path, run: RunModel, fmt: str, extra: dict[str, Any] | None = None) -> None:
    from tunesmith.artifacts import library_versions

    data = {
        "format": fmt,
        "run": str(run.run_dir.resolve()),
        "base_model": run.cfg.model.name,
        "base_fingerprint": run.base_fingerprint,
        "trained_on_base_fingerprint": (run.manifest.get("train") or {}).get("base_fingerprint"),
        "versions": library_versions(),
        **(extra or {}),
    }
    (folder / TUNESMITH_MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# adapter


def export_adapter(run: RunModel, out_dir: Path) -> dict[str, Any]:
    """The PEFT folder as trained, plus the manifest, the serving lint and a reload parity check."""
    from peft import PeftModel

    if run.kind != "adapter":
        raise UserError(f"{run.run_dir} is a full fine-tune: it has no adapter", "export --format merged or gguf")
    adapter_cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    lint = lint_adapter_config(adapter_cfg, run.model.base_model.model.config.model_type)
    with atomic_path(out_dir) as tmp:
        shutil.copytree(run.adapter_dir, tmp)
        _write_tunesmith_manifest(tmp, run, "adapter", {"lint": lint})
    # Parity: the exported folder on a fresh copy of the base, against the trained model.
    import copy

    base = copy.deepcopy(run.model.get_base_model())
    reloaded = PeftModel.from_pretrained(base, str(out_dir)).eval()
    eos = eos_token_ids(run.model, run.tokenizer)
    prompts = prompt_ids(run.tokenizer, probe_conversations(run.run_dir, run.cfg))
    parity = compare_outputs(greedy_tokens(run.model, prompts, eos), greedy_tokens(reloaded, prompts, eos), run.tokenizer)
    return {"path": str(out_dir), "lint": lint, "parity": parity}


# ----------------------------------------------------------------------------------------------
# gguf: llama.cpp's file format, written with the `gguf` package

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


def unpermute_rows(weight: Any, n_head: int) -> Any:
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_llama(config: Any) -> None:
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
    _check_llama(config)
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


def gguf_parity(path: Path, run: RunModel, reference_tokens: list[list[int]], prompts: list[list[int]], eos: list[int]) -> dict[str, Any]:
    """Generate from the GGUF file as other tools read it: transformers' GGUF loader (which
    undoes the q/k permutation and rebuilds the tokenizer), and llama.cpp when importable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32").eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    result = compare_outputs(reference_tokens, greedy_tokens(model, prompts, eos), run.tokenizer)
    result["max_logit_diff"] = max_logit_diff(run.model, model, prompts)
    texts = [run.tokenizer.decode(p) for p in prompts]
    result["tokenizer_matches"] = all(tokenizer(t, add_special_tokens=False)["input_ids"] == p for t, p in zip(texts, prompts))
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        result["llama_cpp"] = "skipped: llama-cpp-python is not installed"
    else:
        result["llama_cpp"] = _llama_cpp_parity(path, reference_tokens, prompts, run.tokenizer)
    return result


def _llama_cpp_parity(path: Path, reference_tokens: list[list[int]], prompts: list[list[int]], tokenizer: Any) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=1)
    outputs = []
    for ids in prompts:
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(tokens) >= len(max(reference_tokens, key=len)):
                break
            tokens.append(token)
        outputs.append(tokens)
    trimmed = [[t for t in ref if t != tokenizer.eos_token_id] for ref in reference_tokens]
    return compare_outputs(trimmed, outputs, tokenizer)


def export_gguf(run: RunModel, out_dir: Path, gguf_types: list[str]) -> dict[str, Any]:
    """The merged model as GGUF (one file per type) and, for adapter runs, the LoRA as a GGUF
    adapter for llama.cpp's --lora; every file read back and checked."""
    merged = merged_model(run)
    _check_llama(merged.config)
    name = f"{run.cfg.name}"
    eos = eos_token_ids(run.model, run.tokenizer)
    prompts = prompt_ids(run.tokenizer, probe_conversations(run.run_dir, run.cfg))
    reference_tokens = greedy_tokens(run.model, prompts, eos)
    expected = hf_to_gguf_arrays(merged)
    report: dict[str, Any] = {"path": str(out_dir), "files": {}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for gguf_type in gguf_types:
            path = tmp / f"{name}-{gguf_type}.gguf"
            write_gguf(merged, run.tokenizer, path, gguf_type, name)
            report["files"][path.name] = {"tensors": gguf_tensor_report(path, expected), "parity": gguf_parity(path, run, reference_tokens, prompts, eos)}
        if run.kind == "adapter":
            path = tmp / f"{name}-lora-f32.gguf"
            lora_expected = write_gguf_lora(run.model, path)
            report["files"][path.name] = {"tensors": gguf_tensor_report(path, lora_expected)}
        _write_tunesmith_manifest(tmp, run, "gguf", {"files": sorted(report["files"])})
    return report


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
    _check_llama(config)
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


# ----------------------------------------------------------------------------------------------
# ollama: the GGUF plus a Modelfile whose TEMPLATE is the chat template in Go template syntax


@dataclass
class ChatFormat:
    """A chat template reduced to literal pieces around each message's content."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_format(tokenizer: Any) -> ChatFormat:
    """Probe the chat template with marker contents and cut out the literal pieces.

    Works for templates that wrap each message in fixed text per role (ChatML, Llama 3, Zephyr
    and the like); anything else is refused by the check in `ollama_template`.
    """
    s, u, a = "\x01S\x01", "\x01U\x01", "\x01A\x01"
    sys_only = _render(tokenizer, [{"role": "system", "content": s}])
    sys_user = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}])
    full = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}])
    with_gen = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], add_generation_prompt=True)
    user_only = _render(tokenizer, [{"role": "user", "content": u}])
    unfit = UserError("the chat template does not wrap messages in fixed text; Ollama TEMPLATE cannot be derived", "write the TEMPLATE of the Modelfile by hand")
    if not (sys_user.startswith(sys_only) and full.startswith(sys_user) and with_gen.startswith(sys_user)):
        raise unfit
    p_sys, _, s_sys = sys_only.partition(s)
    p_user, _, s_user = sys_user[len(sys_only) :].partition(u)
    p_asst, _, s_asst = full[len(sys_user) :].partition(a)
    generation_prompt = with_gen[len(sys_user) :]
    # A template that adds a system turn when there is none: that text is Ollama's SYSTEM default.
    default_system = None
    own = p_user + u + s_user
    if user_only != own:
        head = user_only[: -len(own)] if user_only.endswith(own) else None
        if head is None or not (head.startswith(p_sys) and head.endswith(s_sys)):
            raise unfit
        default_system = head[len(p_sys) : len(head) - len(s_sys)]
    return ChatFormat({"system": p_sys, "user": p_user, "assistant": p_asst}, {"system": s_sys, "user": s_user, "assistant": s_asst}, generation_prompt, default_system)


def ollama_template(fmt: ChatFormat) -> str:
    """The Go template Ollama renders `.Messages` with (one line: no trim markers near text)."""
    for piece in [*fmt.prefix.values(), *fmt.suffix.values(), fmt.generation_prompt]:
        if "{{" in piece or "}}" in piece:
            raise UserError("the chat template's text contains '{{'; cannot write it as a Go template", "write TEMPLATE by hand")
    parts = ["{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, role in enumerate(("system", "user", "assistant")):
        parts.append(f'{{{{ {"if" if n == 0 else "else if"} eq .Role "{role}" }}}}{fmt.prefix[role]}{{{{ .Content }}}}')
        parts.append(f"{{{{ if not $last }}}}{fmt.suffix[role]}{{{{ end }}}}" if role == "assistant" else fmt.suffix[role])
    parts.append("{{ end }}")
    parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{fmt.generation_prompt}{{{{ end }}}}{{{{ end }}}}')
    return "".join(parts)


def _quote_modelfile(text: str) -> str:
    if '"""' in text:
        raise UserError('the template contains """; cannot quote it in a Modelfile', "write the Modelfile by hand")
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str, stops: list[str], system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote_modelfile(template)}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if system:
        lines.append(f"SYSTEM {_quote_modelfile(system)}")
    return "\n".join(lines) + "\n"


def ollama_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """What Ollama hands the template: SYSTEM is prepended when the request has no system turn."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def template_parity(tokenizer: Any, template: str, system: str | None, conversations: list[list[dict[str, str]]]) -> dict[str, Any]:
    """Render each conversation with the chat template and with the Go template; list differences."""
    mismatches = []
    for i, conv in enumerate(conversations):
        expected = _render(tokenizer, ollama_messages(conv, system), add_generation_prompt=True)
        got = render_go_template(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in ollama_messages(conv, system)]})
        if expected != got:
            mismatches.append({"conversation": i, "chat_template": expected, "modelfile": got})
    return {"conversations": len(conversations), "mismatches": mismatches}


def export_ollama(run: RunModel, out_dir: Path, gguf_type: str) -> dict[str, Any]:
    """GGUF + Modelfile; prints nothing itself, the CLI shows the `ollama create` command."""
    fmt = chat_format(run.tokenizer)
    template = ollama_template(fmt)
    system = run.cfg.data.system_prompt or fmt.default_system
    stops = []
    for token_id in eos_token_ids(run.model, run.tokenizer):
        text = run.tokenizer.convert_ids_to_tokens(token_id)
        if text and text not in stops:
            stops.append(text)
    # A new turn starting is a stop too (Ollama's own ChatML templates stop on <|im_start|>).
    for token in run.tokenizer.all_special_tokens:
        if token and token in fmt.prefix["user"] and token not in stops:
            stops.append(token)
    conversations = [list(c) for c in PROBE_CONVERSATIONS] + probe_conversations(run.run_dir, run.cfg)
    parity_template = template_parity(run.tokenizer, template, system, conversations)
    merged = merged_model(run)
    gguf_name = f"{run.cfg.name}-{gguf_type}.gguf"
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_gguf(merged, run.tokenizer, tmp / gguf_name, gguf_type, run.cfg.name)
        tensors = gguf_tensor_report(tmp / gguf_name, hf_to_gguf_arrays(merged))
        (tmp / "Modelfile").write_text(modelfile_text(gguf_name, template, stops, system), encoding="utf-8")
        _write_tunesmith_manifest(tmp, run, "ollama", {"gguf": gguf_name})
    model_name = re.sub(r"[^a-z0-9._-]+", "-", run.cfg.name.lower()).strip("-") or "tunesmith"
    return {
        "path": str(out_dir),
        "gguf": gguf_name,
        "tensors": tensors,
        "template_parity": parity_template,
        "ollama_create": f"ollama create {model_name} -f {out_dir / 'Modelfile'}",
    }


# ----------------------------------------------------------------------------------------------
# A renderer for the Go template subset `ollama_template` writes, so the export can prove the
# Modelfile renders what the chat template renders without Ollama installed.

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_EXPR_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render `{{ range $i, $_ := .X }}`, `{{ $v := expr }}`, if/else if/else/end, `{{ .Field }}`
    with the functions eq, ne, and, or, not, len, slice. Enough for Ollama chat templates."""
    nodes, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        nodes.append(("text", text))
        nodes.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    nodes.append(("text", template[pos:]))
    tree, end = _parse_block(nodes, 0)
    if end != len(nodes):
        raise ValueError("unbalanced {{ end }}")
    out: list[str] = []
    _exec(tree, {"$": data}, data, out)
    return "".join(out)


def _parse_block(nodes: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    block: list[Any] = []
    while i < len(nodes):
        kind, value = nodes[i]
        if kind == "text":
            block.append(("text", value))
            i += 1
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            return block, i
        if word in ("if", "range"):
            branches, i = _parse_branches(nodes, i)
            block.append((word, branches))
            continue
        block.append(("expr", value))
        i += 1
    return block, i


def _parse_branches(nodes: list[tuple[str, str]], i: int) -> tuple[list[tuple[str | None, list[Any]]], int]:
    head = nodes[i][1]
    branches = []
    cond: str | None = head.split(None, 1)[1]
    i += 1
    while True:
        body, i = _parse_block(nodes, i)
        branches.append((cond, body))
        if i >= len(nodes):
            raise ValueError("missing {{ end }}")
        value = nodes[i][1]
        i += 1
        if value == "end":
            return branches, i
        rest = value[len("else") :].strip()
        cond = rest[len("if") :].strip() if rest.startswith("if") else None


def _exec(block: list[Any], scope: dict[str, Any], dot: Any, out: list[str]) -> None:
    for node in block:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            m = re.match(r"^(\$\w+)\s*:?=\s*(.*)$", node[1], re.S)
            if m:
                scope[m.group(1)] = _eval(m.group(2), scope, dot)
            else:
                value = _eval(node[1], scope, dot)
                out.append("" if value is None else str(value))
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truthy(_eval(cond, scope, dot)):
                    _exec(body, scope, dot, out)
                    break
        elif kind == "range":
            (cond, body), *rest = node[1]
            m = re.match(r"^(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.*)$", cond, re.S)
            items = _eval(m.group(3), scope, dot)
            for index, item in enumerate(items or []):
                inner = dict(scope)
                if m.group(1):
                    inner[m.group(1)], inner[m.group(2)] = index, item
                _exec(body, inner, item, out)
            if not items and rest:
                _exec(rest[0][1], scope, dot, out)


def _truthy(value: Any) -> bool:
    return bool(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else value != 0


def _eval(expr: str, scope: dict[str, Any], dot: Any) -> Any:
    tokens = _EXPR_TOKEN.findall(expr)
    value, i = _eval_pipeline(tokens, 0, scope, dot)
    if i != len(tokens):
        raise ValueError(f"cannot parse {expr!r}")
    return value


def _eval_pipeline(tokens: list[str], i: int, scope: dict[str, Any], dot: Any) -> tuple[Any, int]:
    """A command: an operand alone, or a function applied to operands (until ')' or the end)."""
    functions = {
        "eq": lambda a, *b: any(a == x for x in b),
        "ne": lambda a, b: a != b,
        "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
        "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
        "not": lambda a: not _truthy(a),
        "len": len,
        "slice": lambda a, *idx: a[idx[0] : idx[1]] if len(idx) > 1 else a[idx[0] :] if idx else a,
    }
    args = []
    while i < len(tokens) and tokens[i] != ")":
        token = tokens[i]
        if token == "(":
            value, i = _eval_pipeline(tokens, i + 1, scope, dot)
            i += 1  # the ')'
            args.append(value)
            continue
        args.append(functions[token] if token in functions else _operand(token, scope, dot))
        i += 1
    if args and callable(args[0]):
        return args[0](*args[1:]), i
    if len(args) != 1:
        raise ValueError(f"cannot evaluate {' '.join(tokens)!r}")
    return args[0], i


def _operand(token: str, scope: dict[str, Any], dot: Any) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":
        return dot
    root, fields = (dot, token[1:].split(".")) if token.startswith(".") else (scope[token.split(".")[0]], token.split(".")[1:])
    value = root
    for name in fields:
        value = value[name]
    return value


# ----------------------------------------------------------------------------------------------
# The stage


def run(run_dir: Path, fmt: str, *, gguf_types: list[str] | None = None, allow_base_mismatch: bool = False) -> dict[str, Any]:
    """Export a run's trained model in one format into RUN/export/<format>/, then parity-check it."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    trained = load_run_model(run_dir, allow_base_mismatch=allow_base_mismatch)
    gguf_types = gguf_types or list(trained.cfg.export.gguf_types)
    for t in gguf_types:
        if t not in GGUF_TYPES:
            raise UserError(f"unknown GGUF type {t!r}", f"use one of: {', '.join(GGUF_TYPES)}")
    out_dir = run_dir / EXPORT_DIR / fmt
    if fmt == "merged":
        report = export_merged(trained, out_dir)
    elif fmt == "adapter":
        report = export_adapter(trained, out_dir)
    elif fmt == "gguf":
        report = export_gguf(trained, out_dir, gguf_types)
    else:
        report = export_ollama(trained, out_dir, gguf_types[0])
    if "base_mismatch_warning" in trained.manifest:
        report["warning"] = trained.manifest["base_mismatch_warning"]
    report["format"] = fmt
    manifest = read_manifest(run_dir)
    exports = dict(manifest.get("export") or {})
    exports[fmt] = report
    update_manifest(run_dir, "export", exports)
    return report


def parity_problems(report: dict[str, Any]) -> list[str]:
    """Every mismatch in an export report, one line each (for the CLI and for gates)."""
    lines = []

    def parity_lines(where: str, parity: dict[str, Any] | None) -> None:
        if not parity:
            return
        for m in parity.get("mismatches", []):
            if "conversation" in m:
                lines.append(f"{where}: Modelfile template renders conversation {m['conversation']} differently")
            else:
                lines.append(f"{where}: prompt {m['prompt']} differs from token {m['first_diff_token']}: trained {m['trained']!r}, exported {m['exported']!r}")
        if parity.get("tokenizer_matches") is False:
            lines.append(f"{where}: the GGUF tokenizer encodes the prompts differently")
        if isinstance(parity.get("llama_cpp"), dict):
            parity_lines(f"{where} (llama.cpp)", parity["llama_cpp"])

    parity_lines(report["format"], report.get("parity"))
    parity_lines(report["format"], report.get("template_parity"))
    for name, entry in (report.get("files") or {}).items():
        lines += [f"{name}: {p}" for p in entry["tensors"]["problems"]]
        parity_lines(name, entry.get("parity"))
    if report.get("tensors"):
        lines += [f"{report.get('gguf')}: {p}" for p in report["tensors"]["problems"]]
    return lines


__all__ = [
    "FORMATS",
    "RunModel",
    "check_base_fingerprint",
    "lint_adapter_config",
    "load_run_model",
    "render_go_template",
    "run",
]
