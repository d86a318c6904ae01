"""The run folder: typed manifest records, the run's data files, the one loader of its trained model.

Every stage that reads what another stage wrote goes through here, so a manifest key is spelled
once: train writes a `TrainRecord`, and export, eval and serve read the base fingerprint back
from the same typed field. (A hand-spelled `train.base_fingerprint`, which nothing wrote, once
disabled the drift guard everywhere.)

Also here: the drift guard (an adapter is refused on a base whose fingerprint differs from the
one its run recorded: a LoRA on the wrong base silently produces noise), the serving lint of an
adapter config, and the run registry behind `tunesmith runs`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tunesmith import artifacts
from tunesmith.errors import UserError

# --------------------------------------------------------------------------- typed records


class BaseModelRecord(BaseModel):
    """The base a run trained on: the config's reference, the folder it resolved to, its fingerprint."""

    model_config = ConfigDict(extra="forbid")

    reference: str
    path: str
    fingerprint: str


class ChatTemplateRecord(BaseModel):
    """The chat template a run trained with (templates.ChatTemplate.record()): its source ("model",
    a shipped name, or "file" with the file's path and sha256), the text's sha256, and the text,
    so every later stage renders what training rendered even if the file changes."""

    model_config = ConfigDict(extra="forbid")

    source: str
    path: str | None = None
    file_sha256: str | None = None
    sha256: str
    text: str


class TrainRecord(BaseModel):
    """manifest.json `train`: what training wrote. Summary statistics ride along as extra keys."""

    model_config = ConfigDict(extra="allow")

    method: str
    output: str | None = None
    base_model: BaseModelRecord
    config: dict[str, Any]
    data: dict[str, Any] = {}
    versions: dict[str, str] = {}
    precision: str | None = None
    chat_template: ChatTemplateRecord | None = None


class EvalRecord(BaseModel):
    """manifest.json `eval`: the evaluation's headline, pointing at the full report."""

    model_config = ConfigDict(extra="allow")

    task: str
    examples: int
    eval_sha256: str
    primary_metric: str
    primary: dict[str, float]
    verdict: str
    gates_passed: bool
    subjects: dict[str, dict[str, Any]]
    report: str
    prompt_truncation: dict[str, Any] | None = None


class UploadedFile(BaseModel):
    """One file sent to a provider: what left the machine, and the provider's id for it."""

    model_config = ConfigDict(extra="forbid")

    purpose: str  # "training" or "validation"
    path: str
    rows: int
    bytes: int
    sha256: str
    redacted: bool = False
    file_id: str | None = None  # set once the upload succeeded


class ProviderRecord(BaseModel):
    """manifest.json `provider`: a fine-tune run through a provider's fine-tuning API
    (train.backend openai). Written at every step (files uploaded, job created, job finished),
    so an interrupted run re-attaches to its job instead of paying for a second one. Never
    holds the API key."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    base_url: str
    model: str
    files: list[UploadedFile] = []
    hyperparameters: dict[str, Any] = {}
    suffix: str | None = None
    seed: int | None = None
    job_id: str | None = None
    status: str = "uploading"  # uploading, then the job's status (validating_files, queued, running, succeeded, failed, cancelled)
    created_at: float | None = None
    finished_at: float | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    estimated_tokens: int | None = None  # counted here with the local tokenizer, times epochs
    estimated_cost_usd: float | None = None
    billed_cost_usd: float | None = None  # trained_tokens (the provider's count) at the dated price
    price_usd_per_1m_tokens: float | None = None
    error: str | None = None


class ExportRecord(BaseModel):
    """One entry of manifest.json `export` (keyed by format): the export's report."""

    model_config = ConfigDict(extra="allow")

    format: str
    path: str
    warning: str | None = None


class StageRecord(BaseModel):
    """One entry of manifest.json `pipeline` (keyed by stage): written by pipeline.py, read by it
    (skip or resume) and by `tunesmith runs` (status, time)."""

    model_config = ConfigDict(extra="allow")

    status: str  # "running", "done" or "failed"
    inputs: str  # pipeline.stage_inputs: the hash that decides whether the stage is current
    started_at: float | None = None
    finished_at: float | None = None
    seconds: float = 0.0
    result: dict[str, Any] = {}
    error: str | None = None  # a failed stage's error, one line
    pid: int | None = None  # the process running the stage: when it is gone, the run was killed
    host: str | None = None


def this_process() -> dict[str, Any]:
    """The StageRecord fields that name the running process (pid, host)."""
    import os
    import socket

    return {"pid": os.getpid(), "host": socket.gethostname()}


def error_line(error: BaseException) -> str:
    """A stage's error as one line: a user error with its fix, else the exception's type and text."""
    from tunesmith.errors import GateFailed

    if isinstance(error, UserError):
        text = error.one_line()
    elif isinstance(error, GateFailed):
        text = f"gate failed: {error}"
    elif isinstance(error, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def write_train_record(run_dir: Path, record: TrainRecord) -> None:
    artifacts.update_manifest(run_dir, "train", record.model_dump(mode="json"))


def read_train_record(run_dir: Path) -> TrainRecord | None:
    """The run's train record, or None when it has not been trained."""
    from pydantic import ValidationError

    section = artifacts.read_manifest_or_empty(run_dir).get("train")
    if not section:
        return None
    try:
        return TrainRecord.model_validate(section)
    except ValidationError as e:
        where = ".".join(str(p) for p in e.errors()[0]["loc"])
        raise UserError(
            f"{Path(run_dir) / artifacts.MANIFEST_FILE}: the train record is not one tunesmith train wrote (train.{where})",
            "train the run again with this version of tunesmith",
        ) from None


def write_eval_record(run_dir: Path, record: EvalRecord) -> None:
    artifacts.update_manifest(run_dir, "eval", record.model_dump(mode="json"))


def write_provider_record(run_dir: Path, record: ProviderRecord) -> None:
    artifacts.update_manifest(run_dir, "provider", record.model_dump(mode="json"))


def read_provider_record(run_dir: Path) -> ProviderRecord | None:
    """The run's provider record, or None when it was not trained through a provider."""
    from pydantic import ValidationError

    section = artifacts.read_manifest_or_empty(run_dir).get("provider")
    if not section:
        return None
    try:
        return ProviderRecord.model_validate(section)
    except ValidationError:
        raise UserError(
            f"{Path(run_dir) / artifacts.MANIFEST_FILE}: the provider record is not one tunesmith wrote",
            "train the run again with this version of tunesmith (tunesmith train CONFIG --force)",
        ) from None


def write_export_record(run_dir: Path, record: ExportRecord) -> None:
    """Add (or replace) one format's entry in the manifest's `export` section."""
    exports = dict(artifacts.read_manifest_or_empty(run_dir).get("export") or {})
    exports[record.format] = record.model_dump(mode="json")
    artifacts.update_manifest(run_dir, "export", exports)


def read_stage_records(run_dir: Path) -> dict[str, StageRecord]:
    """The pipeline's stage records; one this version cannot read counts as never run."""
    from pydantic import ValidationError

    records = {}
    for stage, section in (artifacts.read_manifest_or_empty(run_dir).get("pipeline") or {}).items():
        try:
            records[stage] = StageRecord.model_validate(section)
        except ValidationError:
            continue
    return records


def write_stage_record(run_dir: Path, stage: str, record: StageRecord) -> None:
    """Add (or replace) one stage's entry in the manifest's `pipeline` section."""
    pipeline = dict(artifacts.read_manifest_or_empty(run_dir).get("pipeline") or {})
    pipeline[stage] = record.model_dump(mode="json")
    artifacts.update_manifest(run_dir, "pipeline", pipeline)


# --------------------------------------------------------------------------- the run's config and data


def read_run_config(run_dir: Path):
    """The config a run was trained with (its train record), else RUN/config.yaml."""
    from tunesmith.config import RunConfig, load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found", "pass the output_dir of a trained run")
    record = read_train_record(run_dir)
    if record is not None:
        # The record keeps base_dir, so relative paths resolve as they did when training.
        return RunConfig.model_validate(record.config)
    if not (run_dir / artifacts.CONFIG_FILE).exists():
        raise UserError(f"{run_dir} has no {artifacts.MANIFEST_FILE} train record nor {artifacts.CONFIG_FILE}", "pass a run folder that tunesmith wrote")
    return load_config(run_dir / artifacts.CONFIG_FILE, [f"output_dir={run_dir.resolve()}"])


@dataclass
class DataFiles:
    """Where a run's examples are: the split stage's files when present, else the config's."""

    train: Path | None
    eval: Path | None
    options: dict[str, Any]  # read_conversations keyword arguments (format, columns, system prompt)

    def read(self, path: Path):
        from tunesmith.data import read_conversations

        return read_conversations(path, **self.options)


def data_files(cfg) -> DataFiles:
    """The one rule for "the run's split files, else the config's files" (train and eval use it)."""
    run_dir = cfg.run_dir
    split_train, split_eval = run_dir / artifacts.TRAIN_SPLIT_FILE, run_dir / artifacts.EVAL_SPLIT_FILE
    if split_train.exists() and split_eval.exists():
        # The split stage writes both files, canonical OpenAI chat, the system prompt included.
        return DataFiles(split_train, split_eval, {"format": "openai"})
    d = cfg.data
    options = dict(format=d.format, input_col=d.input_col, output_col=d.output_col, system_prompt=d.system_prompt)
    return DataFiles(cfg.resolve(d.train), cfg.resolve(d.eval), options)


# --------------------------------------------------------------------------- the drift guard


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


def run_chat_template(run_dir: Path):
    """The chat template a trained run recorded (a templates.ChatTemplate; `.text` is the Jinja
    text every export writes), or None for a run not trained yet."""
    from tunesmith.templates import ChatTemplate

    record = read_train_record(run_dir)
    if record is None or record.chat_template is None:
        return None
    return ChatTemplate.from_record(record.chat_template.model_dump())


def tokenizer_options(cfg: Any, run_dir: Path | None = None, *, recorded: bool = True) -> dict[str, Any]:
    """load_tokenizer/load_model keyword arguments for a run's base model.

    The chat template is the one training recorded (so eval, export and serve render what was
    trained, even if a template file changed since), else the config's `model.chat_template`;
    training itself passes recorded=False: it decides the template.
    """
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
    template = run_chat_template(run_dir) if recorded and run_dir.is_dir() else None
    return {
        "trust_remote_code": cfg.model.trust_remote_code,
        "allow_pickle": cfg.model.allow_pickle,
        "chat_template": template or cfg.model.chat_template,
        "config_dir": cfg.base_dir,
    }


def trained_base_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint of the base the run trained on (None for a run without a train record)."""
    record = read_train_record(run_dir)
    return record.base_model.fingerprint if record is not None else None


# --------------------------------------------------------------------------- loading the trained model


@dataclass
class RunModel:
    """What a run trained, loaded: `model` is a PeftModel (adapter runs) or a plain HF model."""

    model: Any
    tokenizer: Any
    kind: str  # "adapter" or "full"
    base_fingerprint: str  # of the base loaded now (adapter) or of the full model folder
    base_path: Path
    cfg: Any
    run_dir: Path
    adapter_dir: Path | None = None
    trained_on_base_fingerprint: str | None = None  # what the train record says
    warning: str | None = None  # the drift guard's, when --allow-base-mismatch let it through
    info: dict[str, Any] = field(default_factory=dict)  # for reports: kind, path, fingerprints
    chat_template: Any = None  # the templates.ChatTemplate the tokenizer renders with (None: a model without one)


def check_adapter_weights(adapter_dir: Path) -> None:
    """Refuse an adapter folder without safetensors weights at startup: peft would otherwise
    unpickle `adapter_model.bin` (never done here) or fail on the first request, half-loaded.
    The one pickle refusal for adapters: load_run_model and the server both call it."""
    if (adapter_dir / "adapter_model.safetensors").exists():
        return
    if (adapter_dir / "adapter_model.bin").exists():
        raise UserError(f"adapter {adapter_dir} has only pickle weights (adapter_model.bin); tunesmith loads safetensors only", "re-save it with peft's save_pretrained(..., safe_serialization=True)")
    raise UserError(f"adapter {adapter_dir} has no adapter_model.safetensors", "point at a PEFT adapter folder as save_pretrained writes it")


def load_run_model(run_dir: Path, *, allow_base_mismatch: bool = False, dtype: Any = None, device: Any = None,
                   missing_hint: str | None = None) -> RunModel:
    """Load the trained model of a run: base + adapter (drift-guarded), or the full model in `dtype`.

    An adapter run is computed in fp32 whatever `dtype` says, the LoRA unmerged: merged into
    bf16 weights, every update below half a bf16 step of W rounds away (small LoRA updates are
    mostly that), and a bf16 forward loses the same updates again in its activations (measured:
    docs in the test of this rule, tests/test_runs.py). Pickle weights are refused unless the
    run's config allows them (models.load_model).
    """
    from tunesmith.models import load_model
    from tunesmith.templates import applied_template

    run_dir = Path(run_dir)
    files = locate_run_model(run_dir, allow_base_mismatch=allow_base_mismatch, missing_hint=missing_hint)  # the checks, before any weights
    cfg = read_run_config(run_dir)
    opts = dict(dtype=dtype, device=device, **tokenizer_options(cfg, run_dir))
    expected = trained_base_fingerprint(run_dir)
    if files.kind == "full":
        loaded = load_model(str(files.model_dir), **opts)
        info = {**files.info, "dtype": str(loaded.model.dtype).replace("torch.", "")}
        return RunModel(loaded.model, loaded.tokenizer, "full", loaded.fingerprint, loaded.path, cfg, run_dir, None, expected, None, info,
                        applied_template(loaded.tokenizer))
    import torch
    from peft import PeftModel

    opts["dtype"] = torch.float32
    base = load_model(base_model_ref(cfg), expected_fingerprint=cfg.model.expected_fingerprint, **opts)
    model = PeftModel.from_pretrained(base.model, str(files.adapter_dir))
    if device is not None:
        model.to(device)
    model.eval()
    info = {**files.info, "dtype": "float32"}
    return RunModel(model, base.tokenizer, "adapter", base.fingerprint, base.path, cfg, run_dir, files.adapter_dir, expected, files.warning, info,
                    applied_template(base.tokenizer))


@dataclass
class RunModelFiles:
    """Where a run's trained model lies, drift-guarded, not loaded: for an engine that loads
    weights itself (vLLM). `model_dir` is the full model, or the base the adapter applies to."""

    kind: str  # "adapter" or "full"
    model_dir: Path
    adapter_dir: Path | None
    warning: str | None  # the drift guard's, when allow_base_mismatch let it through
    info: dict[str, Any]  # for reports, the keys load_run_model's info has


def locate_run_model(run_dir: Path, *, allow_base_mismatch: bool = False, missing_hint: str | None = None) -> RunModelFiles:
    """The files of a run's trained model, with load_run_model's checks (a trained model is
    there, else a user error with `missing_hint`; the base's fingerprint pinned and against the
    train record; safetensors adapter weights) and without its weights."""
    from tunesmith.models import check_expected_fingerprint, fingerprint, resolve_model_dir

    run_dir = Path(run_dir)
    full_dir, adapter_dir = run_dir / artifacts.FULL_MODEL_DIR, run_dir / artifacts.ADAPTER_DIR
    if not (full_dir / "config.json").exists() and not (adapter_dir / "adapter_config.json").exists():
        raise UserError(
            f"{run_dir} has no trained model ({artifacts.ADAPTER_DIR}/ or {artifacts.FULL_MODEL_DIR}/)",
            missing_hint or "train it first: tunesmith train CONFIG",
        )
    cfg = read_run_config(run_dir)
    m = cfg.model
    expected = trained_base_fingerprint(run_dir)
    if (full_dir / "config.json").exists():
        info = {"kind": "full", "path": str(full_dir), "fingerprint": fingerprint(full_dir), "base_fingerprint": expected}
        return RunModelFiles("full", full_dir, None, None, info)
    check_adapter_weights(adapter_dir)
    base_dir = resolve_model_dir(base_model_ref(cfg), allow_pickle=m.allow_pickle)
    base_fp = fingerprint(base_dir)
    check_expected_fingerprint(base_model_ref(cfg), base_fp, m.expected_fingerprint)
    warning = check_base_fingerprint(expected, base_fp, base=m.name, allow_base_mismatch=allow_base_mismatch)
    info = {"kind": "adapter", "path": str(adapter_dir), "base_fingerprint": base_fp, "trained_on_base_fingerprint": expected}
    if warning:
        info["warning"] = warning
    return RunModelFiles("adapter", base_dir, adapter_dir, warning, info)


# --------------------------------------------------------------------------- adapter lint

VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
OLLAMA_ADAPTER_ARCHS = ("llama", "gemma", "gemma2", "gemma3")


def vllm_max_lora_rank(lora_cfg: dict[str, Any]) -> int | None:
    """The `--max-lora-rank` vLLM needs for this adapter config (None: its default will do)."""
    ranks = [int(lora_cfg.get("r") or 0), *[int(r) for r in (lora_cfg.get("rank_pattern") or {}).values()]]
    max_rank = max(ranks)
    if max_rank <= VLLM_DEFAULT_MAX_LORA_RANK:
        return None
    return next((r for r in VLLM_LORA_RANKS if r >= max_rank), max_rank)


def lint_adapter_config(lora_cfg: dict[str, Any], model_type: str) -> list[str]:
    """Problems serving engines will have with this adapter config; every one, with its fix.

    `lora_cfg` is a PEFT adapter_config.json (or a peft LoraConfig's dict); `model_type` is the
    base's `config.model_type`. Train runs it before training, export on the exported folder.
    """
    problems = []
    max_rank = max([int(lora_cfg.get("r") or 0), *[int(r) for r in (lora_cfg.get("rank_pattern") or {}).values()]])
    flag = vllm_max_lora_rank(lora_cfg)
    if flag is not None:
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


# --------------------------------------------------------------------------- the registry: `tunesmith runs`

PIPELINE_STAGES = ("check", "split", "baseline", "train", "eval", "export")


def _registry_path() -> Path:
    return artifacts.tunesmith_home() / "runs.txt"


def register_run(run_dir: Path) -> None:
    """Remember a run folder so `tunesmith runs` finds it wherever it lives."""
    path = _registry_path()
    known = set(path.read_text().splitlines()) if path.exists() else set()
    resolved = str(Path(run_dir).resolve())
    if resolved not in known:
        artifacts.write_text_atomic(path, "".join(f"{p}\n" for p in sorted(known | {resolved})))


def list_runs(extra_roots: list[Path] | None = None) -> list[dict[str, Any]]:
    """Every known run with model, method, data, status, primary metric and time."""
    folders = []
    path = _registry_path()
    if path.exists():
        folders += [Path(p) for p in path.read_text().splitlines() if p]
    for root in extra_roots or []:
        if root.exists():
            folders += [p.parent for p in root.glob("*/" + artifacts.MANIFEST_FILE)]
    rows = []
    seen = set()
    for folder in folders:
        folder = folder.resolve()
        if folder in seen or not (folder / artifacts.MANIFEST_FILE).exists():
            continue
        seen.add(folder)
        rows.append(run_summary(folder))
    return rows


def _run_config_dict(folder: Path) -> dict[str, Any]:
    import yaml

    if (folder / artifacts.CONFIG_FILE).exists():
        return yaml.safe_load((folder / artifacts.CONFIG_FILE).read_text()) or {}
    record = read_train_record(folder)
    return {k: v for k, v in record.config.items() if k != "base_dir"} if record is not None else {}


def run_status(folder: Path, pipeline: dict[str, StageRecord]) -> str:
    """`running train: step 12/100 ..., ETA 3m05s`, `failed at eval: <error>`, `done export` or `new`.

    A stage recorded as running whose process is gone was killed (SIGKILL, out of memory, a
    node lost): it failed, though nothing could record it.
    """
    from tunesmith.progress import process_alive, read_record

    for stage in PIPELINE_STAGES:
        record = pipeline.get(stage)
        if record is None:
            continue
        if record.status == "failed":
            return f"failed at {stage}: {record.error or 'unknown error'}"
        if record.status == "running":
            if process_alive(record.pid, record.host) is False:
                return f"failed at {stage}: the process (pid {record.pid}) ended without finishing it (killed?); `tunesmith run` resumes"
            live = read_record(folder)
            if live and not live.get("finished") and live.get("pid") == record.pid and (live.get("updated_at") or 0) >= (record.started_at or 0):
                return f"running {stage}: {live['text'].removeprefix(stage + ': ')}"
            return f"running {stage}"
    done = [s for s in PIPELINE_STAGES if s in pipeline and pipeline[s].status == "done"]
    return f"done {done[-1]}" if done else "new"


def run_summary(folder: Path) -> dict[str, Any]:
    config = _run_config_dict(folder)
    pipeline = read_stage_records(folder)
    status = run_status(folder, pipeline)
    results = _read_json(folder / artifacts.EVAL_DIR / "results.json")
    primary = _primary_metric(results)
    seconds = sum(pipeline[s].seconds for s in PIPELINE_STAGES if s in pipeline)
    return {
        "path": str(folder),
        "name": config.get("name", folder.name),
        "model": config.get("model", {}).get("name"),
        "method": (f"openai:{(config['train'].get('openai') or {}).get('model')}" if config.get("train", {}).get("backend") == "openai"
                   else config.get("train", {}).get("method")),
        "data": config.get("data", {}).get("train"),
        "status": status,
        "primary_metric": primary,
        "seconds": round(seconds, 1),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _primary_metric(results: dict[str, Any]) -> dict[str, Any] | None:
    """(name, tuned value) of the evaluation's primary metric, when there is one."""
    name = results.get("primary_metric")
    subjects = results.get("subjects", {})
    tuned = subjects.get("tuned", {}) if isinstance(subjects, dict) else {}
    metrics = tuned.get("metrics", {}) if isinstance(tuned, dict) else {}
    value = metrics.get(name)
    if isinstance(value, dict):
        value = value.get("value")
    return {"name": name, "value": value} if name else None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Config keys and metrics that differ between two runs."""
    configs = []
    for folder in (a, b):
        config = _run_config_dict(Path(folder))
        if not config:
            raise UserError(f"{folder} has no {artifacts.CONFIG_FILE}", "pass two run folders that tunesmith wrote")
        configs.append(_flatten(config))
    keys = sorted(set(configs[0]) | set(configs[1]))
    config_diff = {k: (configs[0].get(k), configs[1].get(k)) for k in keys if configs[0].get(k) != configs[1].get(k)}
    metrics = []
    for folder in (a, b):
        results = _read_json(Path(folder) / artifacts.EVAL_DIR / "results.json")
        flat = {}
        for subject, data in (results.get("subjects") or {}).items():
            for name, value in (data.get("metrics") or {}).items():
                flat[f"{subject}.{name}"] = value.get("value") if isinstance(value, dict) else value
        metrics.append(flat)
    metric_keys = sorted(set(metrics[0]) | set(metrics[1]))
    metric_diff = {k: (metrics[0].get(k), metrics[1].get(k)) for k in metric_keys if isinstance(metrics[0].get(k, 0), (int, float, type(None)))}
    return {"config": config_diff, "metrics": metric_diff}
