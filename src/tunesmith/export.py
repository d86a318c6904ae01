"""`tunesmith export RUN --format merged|adapter|gguf|ollama|hub`: hand the trained model to other tools.

Every export is checked against the trained model right after it is written (the parity check):
the same prompts go through the exported artifact, read back by the tool that will consume it,
and through the trained model; greedy outputs are compared and every mismatch is reported.

What a run trained is loaded by `runs.load_run_model` (with the drift guard); greedy decoding
and stop ids are inference.py's.

The file formats themselves are in `gguf_export.py` (GGUF written and read back) and
`ollama_modelfile.py` (the Modelfile's TEMPLATE); every export's README.md model card is
`model_card.py`'s; this module loads, exports and checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from tunesmith.artifacts import EXPORT_DIR, EXPORT_MANIFEST_FILE, atomic_path, guard_output, record_output
from tunesmith.errors import GateFailed, UserError
from tunesmith.gguf_export import check_gguf_supported, f16_file_arrays, format_support, gguf_tensor_report, hf_to_gguf_arrays, write_gguf, write_gguf_lora
from tunesmith.inference import greedy_tokens, render_ids, stop_token_ids, stop_token_list
from tunesmith.model_card import write_card
from tunesmith.ollama_modelfile import chat_format, modelfile_text, ollama_stops, ollama_template, template_parity
from tunesmith.runs import ExportRecord, RunModel, lint_adapter_config, load_run_model, write_export_record

FORMATS = ("merged", "adapter", "gguf", "ollama", "hub")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q4_0")
# Written by llama.cpp's quantizer from an f16 file (llama_cpp.llama_model_quantize), not by us.
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
LLAMA_CPP_MISSING = "llama-cpp-python is not installed (`make llama-cpp` installs it)"
PARITY_NEW_TOKENS = 16
PARITY_SEED = 0

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


def probe_conversations(run_dir: Path, cfg: Any, count: int | None = None) -> list[list[dict[str, str]]]:
    """Prompts for the parity checks: a seeded sample of the run's held-out prompts (its split,
    else data.eval; at most `count`, default export.parity_prompts), else fixed probes. A sample
    rather than one probe: one prompt hides a flip that a dozen show as a share."""
    import random

    from tunesmith.runs import data_files

    count = count or getattr(getattr(cfg, "export", None), "parity_prompts", 16)
    conversations = []
    # The split lies in this run folder, wherever it was moved to since training.
    files = data_files(cfg.model_copy(update={"output_dir": str(Path(run_dir).resolve())})) if cfg is not None else None
    if files is not None and files.eval is not None and files.eval.exists():
        for conv in files.read(files.eval):
            prompt = [{"role": m.role, "content": m.content or ""} for m in conv.prompt_messages]
            if prompt:
                conversations.append(prompt)
    if len(conversations) > count:
        picked = sorted(random.Random(PARITY_SEED).sample(range(len(conversations)), count))
        conversations = [conversations[i] for i in picked]
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
    matching = len(reference) - len(mismatches)
    return {"prompts": len(reference), "matching": matching, "unchanged_share": matching / len(reference) if reference else 1.0, "mismatches": mismatches}


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
        run.tokenizer.save_pretrained(tmp)  # with the run's chat template: the folder renders as trained
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


def _transformers_gguf_model(path: Path) -> Any:
    """transformers' reading of a GGUF file, told what llama.cpp reads that its loader drops.

    Its gemma3 loader keeps neither the per-layer sliding pattern nor llama.cpp's query scale
    (1/sqrt(head_dim)); both are set from the file, so the check compares what llama.cpp runs.
    """
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if config.model_type == "gemma3_text":
        fields = GGUFReader(str(path)).fields
        config.query_pre_attn_scalar = config.head_dim
        pattern = fields.get("gemma3.attention.sliding_window_pattern")
        if pattern is not None:
            config.layer_types = ["sliding_attention" if bool(v) else "full_attention" for v in pattern.contents()]
        elif "gemma3.attention.sliding_window" not in fields:
            config.layer_types = ["full_attention"] * config.num_hidden_layers
        else:
            config.layer_types = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(config.num_hidden_layers)]
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config, dtype="float32").eval()


def gguf_parity(path: Path, run: RunModel, reference_tokens: list[list[int]], prompts: list[list[int]], eos: set[int]) -> dict[str, Any]:
    """Generate from the GGUF file as other tools read it: transformers' GGUF loader (which
    undoes the converter's transforms and rebuilds the tokenizer), and llama.cpp when importable."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = _transformers_gguf_model(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    result = compare_outputs(reference_tokens, greedy_tokens(model, prompts, eos, PARITY_NEW_TOKENS), run.tokenizer)
    result["max_logit_diff"] = max_logit_diff(run.model, model, prompts)
    texts = [run.tokenizer.decode(p) for p in prompts]
    result["tokenizer_matches"] = all(tokenizer(t, add_special_tokens=False)["input_ids"] == p for t, p in zip(texts, prompts))
    if llama_cpp_available():
        result["llama_cpp"] = llama_cpp_parity(path, reference_tokens, prompts, eos, run.tokenizer)
    else:
        result["llama_cpp"] = f"skipped: {llama_cpp_problem()}"
    return result


_LLAMA_CPP_PROBLEM: list[str | None] = []


def llama_cpp_problem() -> str | None:
    """None when llama.cpp runs on this machine; else why not, in one line.

    Probed once in a child process: a build for instructions this CPU lacks (AVX-512 on an
    AVX2 machine) dies with SIGILL on its first call, which would kill this process with it.
    """
    import importlib.util
    import subprocess
    import sys

    if not _LLAMA_CPP_PROBLEM:
        if importlib.util.find_spec("llama_cpp") is None:
            _LLAMA_CPP_PROBLEM.append(LLAMA_CPP_MISSING)
        else:
            probe = subprocess.run([sys.executable, "-c", "import llama_cpp; llama_cpp.llama_backend_init()"], capture_output=True, timeout=300)
            if probe.returncode == 0:
                _LLAMA_CPP_PROBLEM.append(None)
            elif probe.returncode in (-4, 132):
                _LLAMA_CPP_PROBLEM.append("llama-cpp-python is built for instructions this CPU lacks (illegal instruction): rebuild it here with `make llama-cpp` after removing -DGGML_AVX512=ON")
            else:
                _LLAMA_CPP_PROBLEM.append(f"llama-cpp-python does not start (exit {probe.returncode}): {probe.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return _LLAMA_CPP_PROBLEM[0]


def llama_cpp_available() -> bool:
    return llama_cpp_problem() is None


def llama_cpp_greedy(path: Path, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids in, token ids out) by llama.cpp, stop token included."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(p) for p in prompts) + max_new_tokens + 8, verbose=False, n_threads=1, seed=PARITY_SEED)
    outputs = []
    for ids in prompts:
        tokens: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(token))
            if token in stop_ids or len(tokens) >= max_new_tokens:
                break
        outputs.append(tokens)
    llm.close() if hasattr(llm, "close") else None
    return outputs


def llama_cpp_parity(path: Path, reference_tokens: list[list[int]], prompts: list[list[int]], eos: set[int], tokenizer: Any) -> dict[str, Any]:
    return compare_outputs(reference_tokens, llama_cpp_greedy(path, prompts, eos, PARITY_NEW_TOKENS), tokenizer)


def quantize_with_llama_cpp(f16_path: Path, out_path: Path, gguf_type: str) -> None:
    """q4_K_M / q4_0 through llama.cpp's own quantizer (the k-quants are not in the gguf package)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[gguf_type])
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({status}) on {f16_path} -> {gguf_type}")


def write_gguf_type(merged: Any, tokenizer: Any, path: Path, gguf_type: str, name: str) -> str | None:
    """Write one GGUF file; None when written, else why it was skipped (no llama.cpp quantizer)."""
    if gguf_type not in QUANTIZER_TYPES:
        write_gguf(merged, tokenizer, path, gguf_type, name)
        return None
    if not llama_cpp_available():
        return f"{gguf_type} skipped: {llama_cpp_problem()}"
    f16_path = path.with_name(path.stem + ".f16-source.gguf")
    write_gguf(merged, tokenizer, f16_path, "f16", name)
    try:
        quantize_with_llama_cpp(f16_path, path, gguf_type)
    finally:
        f16_path.unlink(missing_ok=True)
    return None


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
    report: dict[str, Any] = {"path": str(out_dir), "files": {}, "skipped": []}
    with atomic_path(out_dir, force=force) as tmp:
        tmp.mkdir()
        for gguf_type in gguf_types:
            path = tmp / f"{name}-{gguf_type}.gguf"
            skipped = write_gguf_type(merged, run.tokenizer, path, gguf_type, name)
            if skipped:
                report["skipped"].append(skipped)
                continue
            reference = f16_file_arrays(expected) if gguf_type in QUANTIZER_TYPES else expected
            report["files"][path.name] = {"tensors": gguf_tensor_report(path, reference), "parity": gguf_parity(path, run, reference_tokens, prompts, eos)}
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
    check_gguf_supported(run.model.config)
    if gguf_type in QUANTIZER_TYPES and not llama_cpp_available():
        raise UserError(f"ollama export as {gguf_type}: {llama_cpp_problem()}", "run `make llama-cpp`, or export with --gguf-type q8_0")
    fmt = chat_format(run.tokenizer)
    template = ollama_template(fmt)
    system = run.cfg.data.system_prompt or fmt.default_system
    stops = ollama_stops(run.tokenizer, stop_token_list(run.model, run.tokenizer), fmt)
    conversations = [list(c) for c in PROBE_CONVERSATIONS] + probe_conversations(run.run_dir, run.cfg)
    parity_template = template_parity(run.tokenizer, template, system, conversations)
    merged = merged_model(run)
    gguf_name = f"{run.cfg.name}-{gguf_type}.gguf"
    with atomic_path(out_dir, force=force) as tmp:
        tmp.mkdir()
        write_gguf_type(merged, run.tokenizer, tmp / gguf_name, gguf_type, run.cfg.name)
        expected = hf_to_gguf_arrays(merged)
        tensors = gguf_tensor_report(tmp / gguf_name, f16_file_arrays(expected) if gguf_type in QUANTIZER_TYPES else expected)
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
# hub: one folder for huggingface_hub.upload_folder


def export_hub(run: RunModel, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """The adapter (a full fine-tune: the merged model), parity-checked as its own export is,
    plus the GGUF files of RUN/export/gguf when that export exists; the card is added by `run`."""
    report = export_adapter(run, out_dir, force) if run.kind == "adapter" else export_merged(run, out_dir, force)
    gguf_dir = run.run_dir / EXPORT_DIR / "gguf"
    report["weights"] = "adapter" if run.kind == "adapter" else "merged"
    report["gguf_files"] = []
    for path in sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []:
        with atomic_path(out_dir / path.name) as tmp:
            try:
                os.link(path, tmp)  # GGUF files are large: a hard link when the disk allows it
            except OSError:
                shutil.copyfile(path, tmp)
        report["gguf_files"].append(path.name)
    return report


# ----------------------------------------------------------------------------------------------
# The stage


def run(
    run_dir: Path,
    fmt: str,
    *,
    gguf_types: list[str] | None = None,
    min_parity: float | None = None,
    allow_base_mismatch: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Export a run's trained model in one format into RUN/export/<format>/, then parity-check it.

    An existing RUN/export/<format>/ is replaced only when tunesmith wrote it and nobody changed
    it since (`artifacts.guard_output`), or with `force`: a user's file in it is never lost silently.
    With `min_parity` (default export.min_parity), an exported file whose share of probe prompts
    with an unchanged greedy answer is below it raises GateFailed, after everything is written.
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
    base_config = trained.model.get_base_model().config if trained.kind == "adapter" else trained.model.config
    refused = format_support(base_config)[fmt]
    if refused:
        raise UserError(refused, "export --format merged (or adapter) instead")
    out_dir = run_dir / EXPORT_DIR / fmt
    if fmt == "merged":
        report = export_merged(trained, out_dir, force)
    elif fmt == "adapter":
        report = export_adapter(trained, out_dir, force)
    elif fmt == "gguf":
        report = export_gguf(trained, out_dir, gguf_types, force)
    elif fmt == "ollama":
        report = export_ollama(trained, out_dir, gguf_types[0], force)
    else:
        report = export_hub(trained, out_dir, force)
    write_card(out_dir, run_dir, fmt, report)  # every export explains itself (model_card.py)
    record_output(out_dir)
    if trained.warning:
        report["warning"] = trained.warning
    report["format"] = fmt
    write_export_record(run_dir, ExportRecord.model_validate(report))
    min_parity = trained.cfg.export.min_parity if min_parity is None else min_parity
    below = [line for line, share in parity_shares(report).items() if min_parity is not None and share[0] < min_parity * share[1]]
    if below:
        raise GateFailed(f"export {fmt}: greedy answers unchanged below min_parity {min_parity:.0%}: " + "; ".join(below))
    return report


def parity_shares(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{where: (prompts with an unchanged greedy answer, prompts)} for every generation check in a report."""
    shares: dict[str, tuple[int, int]] = {}

    def add(where: str, parity: Any) -> None:
        if isinstance(parity, dict) and "matching" in parity and "prompts" in parity and "conversations" not in parity:
            shares[f"{where} {parity['matching']}/{parity['prompts']}"] = (parity["matching"], parity["prompts"])
            add(f"{where} (llama.cpp)", parity.get("llama_cpp"))

    add(report.get("format", "export"), report.get("parity"))
    for name, entry in (report.get("files") or {}).items():
        add(name, entry.get("parity"))
    return shares


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
