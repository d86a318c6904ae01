"""`tunesmith export RUN --format merged|adapter|gguf|ollama`: hand the trained model to other tools.

Every export is checked against the trained model right after it is written (the parity check):
the same prompts go through the exported artifact, read back by the tool that will consume it,
and through the trained model; greedy outputs are compared and every mismatch is reported.

What a run trained is loaded by `runs.load_run_model` (with the drift guard); greedy decoding
and stop ids are inference.py's.

The file formats themselves are in `gguf_export.py` (GGUF written and read back) and
`ollama_modelfile.py` (the Modelfile's TEMPLATE); this module loads, exports and checks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tunesmith.artifacts import EVAL_SPLIT_FILE, EXPORT_DIR, EXPORT_MANIFEST_FILE, atomic_path, guard_output, record_output
from tunesmith.errors import UserError
from tunesmith.gguf_export import check_gguf_supported, gguf_tensor_report, hf_to_gguf_arrays, write_gguf, write_gguf_lora
from tunesmith.inference import greedy_tokens, render_ids, stop_token_ids, stop_token_list
from tunesmith.ollama_modelfile import chat_format, modelfile_text, ollama_template, template_parity
from tunesmith.runs import ExportRecord, RunModel, lint_adapter_config, load_run_model, write_export_record

FORMATS = ("merged", "adapter", "gguf", "ollama")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
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
    return [render_ids(tokenizer, c) for c in conversations]


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


# ----------------------------------------------------------------------------------------------
# merged


def merged_model(run: RunModel) -> Any:
    """The trained model with the LoRA folded into the base weights (a fresh copy)."""
    import copy

    if run.kind == "full":
        return run.model
    return copy.deepcopy(run.model).merge_and_unload()


def export_merged(run: RunModel, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """HF folder (safetensors, tokenizer, chat template, generation config) + parity check."""
    from transformers import AutoModelForCausalLM

    merged = merged_model(run)
    eos = stop_token_ids(run.model, run.tokenizer)
    stops = stop_token_list(run.model, run.tokenizer)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = run.tokenizer.pad_token_id
    with atomic_path(out_dir, force=force) as tmp:
        tmp.mkdir()
        merged.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        _write_tunesmith_manifest(tmp, run, "merged")
    # Parity: reload with plain transformers, as a user would.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=merged.dtype).eval()
    prompts = prompt_ids(run.tokenizer, probe_conversations(run.run_dir, run.cfg))
    trained_tokens = greedy_tokens(run.model, prompts, eos, PARITY_NEW_TOKENS)
    parity = compare_outputs(trained_tokens, greedy_tokens(reloaded, prompts, eos, PARITY_NEW_TOKENS), run.tokenizer)
    parity["max_logit_diff"] = max_logit_diff(run.model, reloaded, prompts)
    return {"path": str(out_dir), "parity": parity}


def _write_tunesmith_manifest(folder: Path, run: RunModel, fmt: str, extra: dict[str, Any] | None = None) -> None:
    from tunesmith.artifacts import library_versions

    data = {
        "format": fmt,
        "run": str(run.run_dir.resolve()),
        "base_model": run.cfg.model.name,
        "base_fingerprint": run.base_fingerprint,
        "trained_on_base_fingerprint": run.trained_on_base_fingerprint,
        "versions": library_versions(),
        **(extra or {}),
    }
    (folder / EXPORT_MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# adapter


def export_adapter(run: RunModel, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """The PEFT folder as trained, plus the manifest, the serving lint and a reload parity check."""
    from peft import PeftModel

    if run.kind != "adapter":
        raise UserError(f"{run.run_dir} is a full fine-tune: it has no adapter", "export --format merged or gguf")
    adapter_cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    lint = lint_adapter_config(adapter_cfg, run.model.base_model.model.config.model_type)
    with atomic_path(out_dir, force=force) as tmp:
        shutil.copytree(run.adapter_dir, tmp)
        _write_tunesmith_manifest(tmp, run, "adapter", {"lint": lint})
    # Parity: the exported folder on a fresh copy of the base, against the trained model.
    import copy

    base = copy.deepcopy(run.model.get_base_model())
    reloaded = PeftModel.from_pretrained(base, str(out_dir)).eval()
    eos = stop_token_ids(run.model, run.tokenizer)
    prompts = prompt_ids(run.tokenizer, probe_conversations(run.run_dir, run.cfg))
    trained_tokens = greedy_tokens(run.model, prompts, eos, PARITY_NEW_TOKENS)
    parity = compare_outputs(trained_tokens, greedy_tokens(reloaded, prompts, eos, PARITY_NEW_TOKENS), run.tokenizer)
    return {"path": str(out_dir), "lint": lint, "parity": parity}


# ----------------------------------------------------------------------------------------------
# gguf: the files written by gguf_export.py, checked through the tools that read them


def gguf_parity(path: Path, run: RunModel, reference_tokens: list[list[int]], prompts: list[list[int]], eos: set[int]) -> dict[str, Any]:
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
    result = compare_outputs(reference_tokens, greedy_tokens(model, prompts, eos, PARITY_NEW_TOKENS), run.tokenizer)
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


def export_gguf(run: RunModel, out_dir: Path, gguf_types: list[str], force: bool = False) -> dict[str, Any]:
    """The merged model as GGUF (one file per type) and, for adapter runs, the LoRA as a GGUF
    adapter for llama.cpp's --lora; every file read back and checked."""
    merged = merged_model(run)
    check_gguf_supported(merged.config)
    name = f"{run.cfg.name}"
    eos = stop_token_ids(run.model, run.tokenizer)
    prompts = prompt_ids(run.tokenizer, probe_conversations(run.run_dir, run.cfg))
    reference_tokens = greedy_tokens(run.model, prompts, eos, PARITY_NEW_TOKENS)
    expected = hf_to_gguf_arrays(merged)
    report: dict[str, Any] = {"path": str(out_dir), "files": {}}
    with atomic_path(out_dir, force=force) as tmp:
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


def export_ollama(run: RunModel, out_dir: Path, gguf_type: str, force: bool = False) -> dict[str, Any]:
    """GGUF + Modelfile; prints nothing itself, the CLI shows the `ollama create` command."""
    fmt = chat_format(run.tokenizer)
    template = ollama_template(fmt)
    system = run.cfg.data.system_prompt or fmt.default_system
    stops = []
    for token_id in stop_token_list(run.model, run.tokenizer):
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
    with atomic_path(out_dir, force=force) as tmp:
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
        report = export_merged(trained, out_dir, force)
    elif fmt == "adapter":
        report = export_adapter(trained, out_dir, force)
    elif fmt == "gguf":
        report = export_gguf(trained, out_dir, gguf_types, force)
    else:
        report = export_ollama(trained, out_dir, gguf_types[0], force)
    record_output(out_dir)
    if trained.warning:
        report["warning"] = trained.warning
    report["format"] = fmt
    write_export_record(run_dir, ExportRecord.model_validate(report))
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


__all__ = ["FORMATS", "parity_problems", "run"]
