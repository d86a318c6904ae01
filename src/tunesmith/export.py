"""`tunesmith export RUN --format merged|adapter|gguf|ollama`: hand the trained model to other tools.

Every export is checked against the trained model right after it is written (the parity check):
the same prompts go through the exported artifact, read back by the tool that will consume it,
and through the trained model; greedy outputs are compared and every mismatch is reported.

Also home of `load_run_model`, the one way to load what a run trained (base + adapter, or the
fully fine-tuned model) with the drift guard: an adapter is refused on a base whose fingerprint
differs from the one its run recorded, because a LoRA on the wrong base silently produces noise.

The file formats themselves are in `gguf_export.py` (GGUF written and read back) and
`ollama_modelfile.py` (the Modelfile's TEMPLATE); this module loads, exports and checks.
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
    guard_output,
    record_output,
    read_manifest,
    update_manifest,
)
from tunesmith.errors import UserError
from tunesmith.gguf_export import check_llama, gguf_tensor_report, hf_to_gguf_arrays, write_gguf, write_gguf_lora
from tunesmith.ollama_modelfile import chat_format, modelfile_text, ollama_template, template_parity

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
# gguf: the files written by gguf_export.py, checked through the tools that read them


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
    check_llama(merged.config)
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


# ----------------------------------------------------------------------------------------------
# ollama: the GGUF plus a Modelfile whose TEMPLATE is the chat template in Go template syntax
# (derived and checked in ollama_modelfile.py)


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
# The stage


def run(run_dir: Path, fmt: str, *, gguf_types: list[str] | None = None, allow_base_mismatch: bool = False, force: bool = False) -> dict[str, Any]:
    """Export a run's trained model in one format into RUN/export/<format>/, then parity-check it.

    An existing RUN/export/<format>/ is replaced only when tunesmith wrote it and nobody changed
    it since (`artifacts.guard_output`), or with `force`: a user's file in it is never lost silently.
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    guard_output(run_dir / EXPORT_DIR / fmt, force=force)
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
    record_output(out_dir)
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
    "run",
]
