"""`tunesmith run CONFIG`: check -> split -> baseline -> train -> eval -> export, resumable.

Each stage records a hash of its inputs (data content, its config section, the base model's
fingerprint, upstream artifacts) in the run manifest when it finishes. A re-run skips every
stage whose inputs hash is unchanged, so after a crash or a config edit only what changed is
redone; an interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from tunesmith import artifacts, runs
from tunesmith.artifacts import sha256_file, write_text_atomic
from tunesmith.config import RunConfig, config_to_yaml
from tunesmith.errors import UserError
from tunesmith.humanize import duration_text, plural

STAGES = runs.PIPELINE_STAGES  # check, split, baseline, train, eval, export
console = Console(stderr=True)


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _hash_path(path: Path | None) -> str | None:
    """Content hash of a file, or of every file in a folder (names and contents)."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return _hash([(str(p.relative_to(path)), sha256_file(p)) for p in files])


def _section(cfg: RunConfig, name: str) -> dict[str, Any]:
    return cfg.model_dump(mode="json")[name]


def stage_inputs(stage: str, cfg: RunConfig, model_fingerprint: str) -> str:
    """The identity of a stage's inputs: when it is unchanged, the stage's outputs are current."""
    # Each stage hashes only what it reads: hashing a large data file or a model folder for a
    # stage that does not depend on it is wasted I/O on every run.
    run = cfg.run_dir

    def data_files():
        return (_hash_path(cfg.resolve(cfg.data.train)), _hash_path(cfg.resolve(cfg.data.eval)))

    def splits():
        return (_hash_path(run / artifacts.TRAIN_SPLIT_FILE), _hash_path(run / artifacts.EVAL_SPLIT_FILE))

    def trained():
        provider = runs.read_provider_record(run) if cfg.train.backend == "openai" else None
        hosted = provider.fine_tuned_model if provider is not None else None
        return _hash_path(run / artifacts.ADAPTER_DIR) or _hash_path(run / artifacts.FULL_MODEL_DIR) or hosted

    def train_section():
        # Permissions and polling do not change what is trained: a rerun that adds --allow-pii
        # must resume the job it started, not pay for a second one.
        section = _section(cfg, "train")
        for key in ("allow_pii", "allow_floating_model", "poll_interval_s"):
            section["openai"].pop(key, None)
        return section

    model = _section(cfg, "model")
    if stage == "check":
        return _hash(stage, data_files(), _section(cfg, "data"), model_fingerprint)
    if stage == "split":
        return _hash(stage, data_files(), _section(cfg, "data"))
    if stage == "baseline":
        # data: max_length and truncate cut the prompts as training cut its examples.
        return _hash(stage, splits(), _section(cfg, "eval"), _section(cfg, "data"), model, model_fingerprint)
    if stage == "train":
        return _hash(stage, splits(), train_section(), _section(cfg, "data"), model, model_fingerprint)
    if stage == "eval":
        return _hash(stage, splits(), trained(), _section(cfg, "eval"), model_fingerprint)
    if stage == "export":
        return _hash(stage, trained(), _section(cfg, "export"), model_fingerprint)
    raise ValueError(stage)


def _stage_check(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    from tunesmith import check

    report = check.run(cfg)
    train_path = cfg.resolve(cfg.data.train)
    if report.errors:
        first = report.errors[0]
        where = f"line {first.line}: " if first.line else ""
        raise UserError(
            f"the data check found {plural(report.error_count, 'error')} in {train_path} (first: {where}{first.message}); "
            f"training was not started; full report in {cfg.run_dir / artifacts.CHECK_REPORT_FILE}",
            first.fix or f"fix the data (tunesmith data check {train_path}) and run again",
        )
    return {"errors": report.error_count, "warnings": report.warning_count}


def _stage_split(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    from tunesmith.data import read_conversations, split_conversations, write_conversations

    kwargs = dict(format=cfg.data.format, input_col=cfg.data.input_col, output_col=cfg.data.output_col, system_prompt=cfg.data.system_prompt)
    train = read_conversations(cfg.resolve(cfg.data.train), **kwargs)
    if cfg.data.eval:
        held_out = read_conversations(cfg.resolve(cfg.data.eval), **kwargs)
    else:
        train, held_out = split_conversations(train, cfg.data.eval_fraction, cfg.data.split_seed)
    if not held_out:
        raise UserError("the evaluation split is empty", "set data.eval or a data.eval_fraction of 0.1-0.2")
    write_conversations(cfg.run_dir / artifacts.TRAIN_SPLIT_FILE, train)
    write_conversations(cfg.run_dir / artifacts.EVAL_SPLIT_FILE, held_out)
    return {"train_examples": len(train), "eval_examples": len(held_out)}


def _stage_baseline(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    from tunesmith import evaluate

    subjects = [s for s in cfg.eval.subjects if s != "tuned"]
    if not subjects:
        return {"subjects": []}
    # Gates judge the fine-tune; the baselines alone are scored here, not gated.
    ungated = cfg.model_copy(deep=True)
    ungated.eval.gates = []
    evaluate.run(ungated, subjects=subjects)
    return {"subjects": subjects}


def _stage_train(cfg: RunConfig, fingerprint: str, resume: bool, replace: bool) -> dict[str, Any]:
    from tunesmith import provider, train

    if cfg.train.backend == "openai":
        return provider.run(cfg, resume=resume, force=replace, console=console)
    result = train.run(cfg, resume=resume, force=replace)
    return result if isinstance(result, dict) else {}


def _stage_eval(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    from tunesmith import evaluate

    result = evaluate.run(cfg, gates=cfg.eval.gates)
    verdict = result.get("verdict") or {}
    return {"verdict": verdict.get("text") if isinstance(verdict, dict) else verdict, "primary_metric": result.get("primary_metric")}


def _stage_export(cfg: RunConfig, fingerprint: str) -> dict[str, Any]:
    from tunesmith import export

    reports = {fmt: export.run(cfg.run_dir, fmt, gguf_types=cfg.export.gguf_types) for fmt in cfg.export.formats}
    problems = {fmt: export.parity_problems(report) for fmt, report in reports.items()}
    for fmt, lines in problems.items():
        for line in lines:
            console.print(f"[yellow]export {fmt} parity: {line}[/yellow]")
    return {
        "exported": {fmt: str(cfg.run_dir / artifacts.EXPORT_DIR / fmt) for fmt in reports},
        "parity_problems": sum(len(lines) for lines in problems.values()),
    }


def run(
    cfg: RunConfig,
    *,
    from_stage: str | None = None,
    until_stage: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the pipeline stages in order, skipping those whose inputs are unchanged."""
    from tunesmith.gguf_export import refuse_unsupported_formats
    from tunesmith.models import check_expected_fingerprint, fingerprint, load_tokenizer, resolve_model_dir
    from tunesmith.templates import applied_template, end_of_turn_token

    for name in (from_stage, until_stage):
        if name is not None and name not in STAGES:
            raise UserError(f"unknown stage {name!r}", f"use one of: {', '.join(STAGES)}")
    first = STAGES.index(from_stage) if from_stage else 0
    last = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    if cfg.eval.engine == "vllm" and any(first <= STAGES.index(s) <= last for s in ("baseline", "eval")):
        from tunesmith.vllm_engine import require_vllm

        require_vllm("eval.engine: vllm", "set eval.engine: torch")  # now, not after the training
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / artifacts.CONFIG_FILE, config_to_yaml(cfg))
    runs.register_run(run_dir)

    # The model fingerprint is part of most stages' inputs; resolving it first also converts the
    # builtin model once, before any stage starts timing itself.
    model_dir = resolve_model_dir(runs.base_model_ref(cfg), allow_pickle=cfg.model.allow_pickle)
    model_fp = fingerprint(model_dir)
    refuse_unsupported_formats(model_dir, cfg.export.formats)  # before any training, not at export
    check_expected_fingerprint(cfg.model.name, model_fp, cfg.model.expected_fingerprint)
    # The chat template before any stage: a base model without one (model.chat_template unset)
    # is refused now, not at the train stage after the baselines ran. Its text is part of the
    # model's identity for the stages' inputs: another template renders other prompts.
    tokenizer = load_tokenizer(str(model_dir), **runs.tokenizer_options(cfg, recorded=False))
    end_of_turn_token(tokenizer)
    inputs_fp = _hash(model_fp, applied_template(tokenizer).sha256)

    stages: dict[str, Callable[[], dict[str, Any]]] = {
        "check": lambda: _stage_check(cfg, model_fp),
        "split": lambda: _stage_split(cfg, model_fp),
        "baseline": lambda: _stage_baseline(cfg, model_fp),
        "train": lambda: _stage_train(cfg, model_fp, resume=resume_training, replace=replace_training),
        "eval": lambda: _stage_eval(cfg, model_fp),
        "export": lambda: _stage_export(cfg, model_fp),
    }
    summary: dict[str, Any] = {}
    for index, stage in enumerate(STAGES):
        if index < first or index > last:
            continue
        if stage in ("baseline",) and not [s for s in cfg.eval.subjects if s != "tuned"]:
            continue
        if stage == "export" and not cfg.export.formats:
            continue
        if stage == "export" and cfg.train.backend == "openai":
            console.print("[dim]export: skipped, the fine-tune lives at the provider (train.backend openai)[/dim]")
            continue
        inputs = stage_inputs(stage, cfg, inputs_fp)
        record = runs.read_stage_records(run_dir).get(stage)
        current = record is not None and record.inputs == inputs
        if not force and current and record.status == "done":
            console.print(f"[dim]{stage}: unchanged, skipped[/dim]")
            summary[stage] = {"skipped": True, **record.result}
            continue
        # A training interrupted with the same inputs resumes from its last checkpoint.
        # (A failed one too: an interrupt or a crash mid-training leaves checkpoints worth resuming.)
        resume_training = stage == "train" and not force and current and record.status in ("running", "failed")
        # The pipeline replaces a training it recorded itself (its inputs changed); one run by
        # hand with `tunesmith train` only with --force.
        replace_training = force or record is not None
        if stage == "train":
            # Refused before the stage's record is written: a record of the refused attempt would
            # make the next `tunesmith run` take the run trained by hand for its own and resume it.
            from tunesmith.train import refuse_replacing_finished_run

            refuse_replacing_finished_run(cfg, resume=resume_training, force=replace_training)
        console.print(f"[bold]{stage}[/bold]{' (resuming)' if resume_training else ''}")
        summary[stage] = run_stage(run_dir, stage, inputs, stages[stage])
    return summary


def run_stage(run_dir: Path, stage: str, inputs: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage between its records: `running` (with this process's id, so `tunesmith runs`
    can tell a killed run), then `done` with its wall time, or `failed` with the error's line.

    The error is recorded and raised again: the CLI still prints it and exits as before.
    """
    started_at = time.time()
    runs.write_stage_record(run_dir, stage, runs.StageRecord(status="running", inputs=inputs, started_at=started_at, **runs.this_process()))
    start = time.perf_counter()
    try:
        result = body()
    except BaseException as e:
        seconds = time.perf_counter() - start
        runs.write_stage_record(run_dir, stage, runs.StageRecord(
            status="failed", inputs=inputs, started_at=started_at, finished_at=time.time(), seconds=round(seconds, 2), error=runs.error_line(e),
        ))
        console.print(f"{stage}: failed after {duration_text(seconds)}", markup=False, highlight=False)
        raise
    seconds = time.perf_counter() - start
    # The inputs hash was taken before the stage ran; it covers upstream artifacts only, so
    # the stage's own outputs do not change it.
    runs.write_stage_record(
        run_dir, stage, runs.StageRecord(status="done", inputs=inputs, seconds=round(seconds, 2), result=result, started_at=started_at, finished_at=time.time())
    )
    console.print(f"{stage}: done in {duration_text(seconds)}", markup=False, highlight=False)
    return result


