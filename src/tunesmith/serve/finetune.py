"""OpenAI's fine-tuning API on `tunesmith serve`: /v1/files and /v1/fine_tuning/jobs.

The wire shapes are the official `openai` client's types (FileObject, FineTuningJob,
FineTuningJobEvent, FineTuningJobCheckpoint, cursor pages with `after`/`limit`), so code
written for OpenAI's fine-tuning runs against this server unchanged. Uploads are checked with
tunesmith's data check; a job is a `tunesmith run ... --until train` of a LoRA over the served
base, trained by the worker in `jobs.py`, and served as `ft:<base>:<suffix>:<id>` when done.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from tunesmith import artifacts
from tunesmith.check import MIN_EXAMPLES
from tunesmith.config import MAX_SEED
from tunesmith.errors import UserError
from tunesmith.serve import protocol
from tunesmith.serve.app import APIError, _read_body
from tunesmith.serve.engine import ServedModel
from tunesmith.serve.jobs import JOB_RUN_DIR, JobRunner, JobStore, hold_lock

SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_PAGE = 100
MAX_FILES_PAGE = 10000  # OpenAI's default and largest page of files
JOB_METHODS = ("lora", "qlora")  # a job's model is an adapter served over the running base


@dataclass
class FineTuning:
    """What the fine-tuning routes need, on `app.state.finetuning`."""

    folder: Path
    store: JobStore
    runner: JobRunner
    lock: Any


def absolute_ref(base_ref: str) -> str:
    """A base given as a relative folder, made absolute: the job's trainer runs in the job's
    folder, where `./models/x` would name nothing (or another folder)."""
    return str(Path(base_ref).resolve()) if Path(base_ref).exists() else base_ref


def default_state_dir(base_ref: str) -> Path:
    """One folder per base model under TUNESMITH_HOME: a job's model is served over its base."""
    import hashlib

    return artifacts.tunesmith_home() / "serve" / f"base-{hashlib.sha256(absolute_ref(base_ref).encode()).hexdigest()[:12]}"


def open_finetuning(state: Any, folder: Path) -> FineTuning:
    """Lock the state folder, open the store, serve every finished job's model again."""
    check_overrides(state.settings.finetune_overrides, state.served.base_ref)
    lock = hold_lock(folder)
    store = JobStore(folder)

    def serve_model(job: dict[str, Any]) -> None:
        adapter = store.job_dir(job["id"]) / JOB_RUN_DIR / artifacts.ADAPTER_DIR
        state.served.models[job["fine_tuned_model"]] = ServedModel(job["fine_tuned_model"], adapter, None, str(adapter.parent.parent))

    from tunesmith.runs import check_base_fingerprint, trained_base_fingerprint

    for job in store.rows("SELECT * FROM jobs WHERE status = 'succeeded'"):
        # The drift guard, as for adapters named on the command line: a state folder passed
        # with --state-dir, or a base folder replaced in place, may hold jobs of another base.
        trained_on = trained_base_fingerprint(store.job_dir(job["id"]) / JOB_RUN_DIR)
        warning = check_base_fingerprint(trained_on, state.base_fingerprint, base=state.served.base_ref,
                                         allow_base_mismatch=state.settings.allow_base_mismatch)
        if warning:
            state.warnings.append(f"{job['fine_tuned_model']}: {warning}")
        serve_model(job)
    return FineTuning(folder, store, JobRunner(store, serve_model), lock)


def check_overrides(overrides: list[str], base_ref: str) -> None:
    """The server's `--finetune-set` overrides must make a valid LoRA config (checked at start)."""
    config = job_config_dict(overrides, base_ref, "check", Path("train.jsonl"), None, Hyperparameters(), 0)
    method = config["train"].get("method", "lora")
    if method not in JOB_METHODS:
        raise UserError(f"--finetune-set train.method={method}: a job's model is served as an adapter over the base", "use lora or qlora")
    _validated(config, Path("."))


def base_name(base_id: str) -> str:
    """The base as a fine-tuned model id names it: a folder's own name, not its whole path."""
    return Path(base_id).name if "/" in base_id or "\\" in base_id else base_id


def _validated(config: dict[str, Any], folder: Path) -> Any:
    from pydantic import ValidationError

    from tunesmith.config import RunConfig, validation_user_error

    try:
        return RunConfig.model_validate({**config, "base_dir": str(folder)})
    except ValidationError as e:
        raise validation_user_error(e, "fine-tuning job config (--finetune-set)") from None


# ----------------------------------------------------------------------------------------------
# Request bodies


Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Strict: pydantic would read `true` as 1 epoch and "3" as 3; OpenAI's API takes JSON numbers.
    n_epochs: Auto | StrictInt | None = Field(None, description="Passes over the training file (1-50).")
    batch_size: Auto | StrictInt | None = Field(None, description="Examples per step (1-256).")
    learning_rate_multiplier: Auto | StrictInt | StrictFloat | None = Field(None, description="Times the server's learning rate (0-10].")

    def problem(self) -> tuple[str, str] | None:
        """(param, message) of the first value out of range, or None."""
        for name, low, high in (("n_epochs", 1, 50), ("batch_size", 1, 256)):
            value = getattr(self, name)
            if isinstance(value, int) and not low <= value <= high:
                return name, f"{name} must be between {low} and {high}"
        value = self.learning_rate_multiplier
        if isinstance(value, float | int) and not 0 < value <= 10:
            return "learning_rate_multiplier", "learning_rate_multiplier must be above 0 and at most 10"
        return None


class SupervisedSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    hyperparameters: Hyperparameters | None = None


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["supervised"]
    supervised: SupervisedSpec | None = None


class JobCreateRequest(BaseModel):
    """The fields OpenAI's `fine_tuning.jobs.create` sends; integrations are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: MethodSpec | None = None
    suffix: str | None = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[str, str] | None = None


def job_config_dict(overrides: list[str], base_ref: str, job_id: str, train_path: Path, eval_path: Path | None, hyper: Hyperparameters, seed: int) -> dict[str, Any]:
    """The job's run config: LoRA on the base, the server's overrides, then the job's values."""
    from tunesmith.config import TrainConfig, apply_overrides

    config: dict[str, Any] = {
        "name": job_id,
        "output_dir": JOB_RUN_DIR,
        "model": {"name": absolute_ref(base_ref)},
        "data": {"train": str(train_path), "eval": str(eval_path) if eval_path else None},
        "train": {"method": "lora"},
        "eval": {"subjects": ["tuned"]},
        "export": {"formats": []},
    }
    apply_overrides(config, overrides)
    train = config["train"]
    if isinstance(hyper.n_epochs, int):
        train["epochs"] = hyper.n_epochs
    if isinstance(hyper.batch_size, int):
        train["batch_size"] = hyper.batch_size
    if isinstance(hyper.learning_rate_multiplier, float | int):
        base_lr = train.get("learning_rate", TrainConfig.model_fields["learning_rate"].default)
        train["learning_rate"] = float(base_lr) * hyper.learning_rate_multiplier
    train["seed"] = seed
    return config


# ----------------------------------------------------------------------------------------------
# Wire objects


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"], "expires_at": None, "status_details": None}


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    hyper = json.loads(row["hyperparameters"])
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"], "model": row["model"],
        "training_file": row["training_file"], "validation_file": row["validation_file"], "hyperparameters": hyper,
        "status": row["status"], "fine_tuned_model": row["fine_tuned_model"] if row["status"] == "succeeded" else None,
        "finished_at": row["finished_at"], "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None, "organization_id": "org-tunesmith", "result_files": [],
        "seed": row["seed"], "estimated_finish": None, "integrations": [], "user_provided_suffix": row["suffix"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"], "level": row["level"],
            "message": row["message"], "type": row["type"], "data": json.loads(row["data"]) if row["data"] else None}


def checkpoint_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"], "fine_tuning_job_id": row["job_id"],
            "fine_tuned_model_checkpoint": row["model"], "metrics": json.loads(row["metrics"]), "step_number": row["step"]}


def _page(rows: list[dict[str, Any]], has_more: bool, render: Any, ids: bool = False) -> dict[str, Any]:
    data = [render(r) for r in rows]
    page: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if ids:
        page.update(first_id=data[0]["id"] if data else None, last_id=data[-1]["id"] if data else None)
    return page


def _limit(request: Request, default: int = 20, most: int = MAX_PAGE) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    # isascii: str.isdigit() accepts digits such as '²' that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise APIError(400, f"limit must be an integer from 1 to {most}", param="limit")
    return int(raw)


def _finetuning(request: Request) -> FineTuning:
    return request.app.state.finetuning


# ----------------------------------------------------------------------------------------------
# /v1/files

router = APIRouter()


async def _read_upload(request: Request) -> tuple[str, str, bytes]:
    """(purpose, filename, content) of a multipart upload, read up to the upload limit."""
    limit = request.app.state.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise APIError(415, "upload a file as multipart/form-data with fields `file` and `purpose`", code="unsupported_media_type")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(400, f"upload over {limit} bytes", code="body_too_large")
    # The stdlib MIME parser: multipart bodies are MIME, and no other dependency is needed.
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + bytes(raw))
    fields: dict[str, tuple[str | None, bytes]] = {}
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    if "file" not in fields:
        raise APIError(400, "the upload has no `file` field", param="file")
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", errors="replace").strip()
    filename, content = fields["file"]
    return purpose, Path(filename or "upload.jsonl").name, content


def check_upload(path: Path, filename: str) -> int:
    """Examples in an uploaded training file; APIError naming the row and the fix when the data
    check finds errors (the same check `tunesmith data check` runs)."""
    from tunesmith.check import check_file

    report = check_file(path)
    # The purpose does not say whether a file will train or validate; OpenAI's 10-example minimum
    # binds the training file only, so it is checked when a job names the file (create_job).
    errors = [e for e in report.errors if e.code != "too_few_examples"]
    if errors:
        first = errors[0]
        # The client knows its file by the name it uploaded, not by the server's path.
        where = f"{filename} line {first.line}: " if first.line else ("" if str(path) in first.message else f"{filename}: ")
        message = first.message.replace(str(path), filename)
        more = f" ({len(errors)} errors in all; `tunesmith data check` lists them)" if len(errors) > 1 else ""
        fix = f" (fix: {first.fix})" if first.fix else ""
        raise APIError(400, f"{where}{message}{fix}{more}", param="file", code="invalid_file_format")
    return report.examples


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    ft = _finetuning(request)
    purpose, filename, content = await _read_upload(request)
    if purpose != "fine-tune":
        raise APIError(400, f"purpose {purpose[:40]!r} is not supported by this server; use purpose 'fine-tune'", param="purpose")
    file_id = protocol.new_id("file")
    path = ft.store.file_path(file_id)
    await asyncio.to_thread(_write_bytes, path, content)
    try:
        examples = await asyncio.to_thread(check_upload, path, filename)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    ft.store.execute(
        "INSERT INTO files (id, filename, bytes, created_at, purpose, status, examples) VALUES (?, ?, ?, ?, ?, 'processed', ?)",
        (file_id, filename, len(content), protocol.now(), purpose, examples),
    )
    return file_object(_file_row(ft, file_id))


def _write_bytes(path: Path, content: bytes) -> None:
    with artifacts.atomic_path(path) as tmp:
        tmp.write_bytes(content)


def _file_row(ft: FineTuning, file_id: str, param: str | None = None) -> dict[str, Any]:
    row = ft.store.row("SELECT * FROM files WHERE id = ?", (file_id,))
    if row is None:
        raise APIError(404 if param is None else 400, f"No such File object: {file_id[:100]}", param=param or "file_id", code="file_not_found" if param is None else None)
    return row


@router.get("/v1/files")
async def list_files(request: Request) -> dict[str, Any]:
    ft = _finetuning(request)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", param="order")
    purpose = request.query_params.get("purpose")
    where, params = ("purpose = ?", (purpose,)) if purpose else ("1 = 1", ())
    rows, has_more = ft.store.page("files", where, params, request.query_params.get("after"), _limit(request, MAX_FILES_PAGE, MAX_FILES_PAGE), newest_first=order == "desc")
    return _page(rows, has_more, file_object, ids=True)


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
    return file_object(_file_row(_finetuning(request), file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    ft = _finetuning(request)
    _file_row(ft, file_id)
    content = await asyncio.to_thread(ft.store.file_path(file_id).read_bytes)
    return Response(content, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    ft = _finetuning(request)
    _file_row(ft, file_id)
    in_use = ft.store.row("SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status IN ('validating_files', 'queued', 'running')", (file_id, file_id))
    if in_use:
        raise APIError(400, f"file {file_id} is used by job {in_use['id']}, which has not finished", param="file_id")
    ft.store.execute("DELETE FROM files WHERE id = ?", (file_id,))
    ft.store.file_path(file_id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


# ----------------------------------------------------------------------------------------------
# /v1/fine_tuning/jobs


def _job_hyperparameters(body: JobCreateRequest) -> Hyperparameters:
    hyper = body.hyperparameters or Hyperparameters()
    if body.method is not None and body.method.supervised is not None and body.method.supervised.hyperparameters is not None:
        hyper = body.method.supervised.hyperparameters
    problem = hyper.problem()
    if problem:
        raise APIError(400, problem[1], param=f"hyperparameters.{problem[0]}")
    return hyper


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request) -> dict[str, Any]:
    state = request.app.state
    ft = _finetuning(request)
    body = await _read_body(request, JobCreateRequest)
    served = state.served
    if body.model not in (served.base_id, served.base_ref):
        raise APIError(400, f"this server fine-tunes only its base model {served.base_id!r}, not {body.model[:100]!r}", param="model", code="model_not_available")
    if body.suffix is not None and not SUFFIX.match(body.suffix):
        raise APIError(400, "suffix must be 1-64 letters, digits, '.', '_' or '-'", param="suffix")
    hyper = _job_hyperparameters(body)
    training = _file_row(ft, body.training_file, param="training_file")
    if training["examples"] < MIN_EXAMPLES:
        raise APIError(400, f"training file {training['id']} has {training['examples']} examples; fine-tuning needs at least {MIN_EXAMPLES}",
                       param="training_file", code="invalid_training_file")
    validation = _file_row(ft, body.validation_file, param="validation_file") if body.validation_file else None
    job_id = protocol.new_id("ftjob")
    seed = body.seed if body.seed is not None else random.randint(0, MAX_SEED)
    job_dir = ft.store.job_dir(job_id)
    config = job_config_dict(state.settings.finetune_overrides, served.base_ref, job_id, ft.store.file_path(training["id"]),
                             ft.store.file_path(validation["id"]) if validation else None, hyper, seed)
    try:
        cfg = _validated(config, job_dir)
    except UserError as e:
        raise APIError(400, e.one_line(), param="hyperparameters") from None
    from tunesmith.config import config_to_yaml

    job_dir.mkdir(parents=True)
    artifacts.write_text_atomic(job_dir / artifacts.CONFIG_FILE, config_to_yaml(cfg))
    resolved = {"n_epochs": cfg.train.epochs if cfg.train.max_steps is None else "auto", "batch_size": cfg.train.batch_size,
                "learning_rate_multiplier": hyper.learning_rate_multiplier if isinstance(hyper.learning_rate_multiplier, float | int) else 1.0}
    if isinstance(resolved["n_epochs"], float) and resolved["n_epochs"].is_integer():
        resolved["n_epochs"] = int(resolved["n_epochs"])
    fine_tuned_model = f"ft:{base_name(served.base_id)}:{body.suffix or ''}:{job_id.removeprefix('ftjob-')}"
    ft.store.execute(
        "INSERT INTO jobs (id, created_at, model, training_file, validation_file, hyperparameters, suffix, seed, status, fine_tuned_model, metadata)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
        (job_id, protocol.now(), body.model, training["id"], validation["id"] if validation else None, json.dumps(resolved),
         body.suffix, seed, fine_tuned_model, json.dumps(body.metadata) if body.metadata else None),
    )
    ft.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    ft.store.add_event(job_id, f"Validated training file: {training['id']} ({training['examples']} examples)")
    ft.runner.wake()
    return job_object(_job_row(ft, job_id))


def _job_row(ft: FineTuning, job_id: str) -> dict[str, Any]:
    row = ft.store.row("SELECT * FROM jobs WHERE id = ?", (job_id,))
    if row is None:
        raise APIError(404, f"No such fine-tuning job: {job_id[:100]}", param="fine_tuning_job_id", code="fine_tuning_job_not_found")
    return row


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    ft = _finetuning(request)
    rows, has_more = ft.store.page("jobs", "1 = 1", (), request.query_params.get("after"), _limit(request))
    return _page(rows, has_more, job_object)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(request: Request, job_id: str) -> dict[str, Any]:
    return job_object(_job_row(_finetuning(request), job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    ft = _finetuning(request)
    _job_row(ft, job_id)
    changed = ft.store.execute(
        "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status IN ('validating_files', 'queued', 'running')",
        (protocol.now(), job_id),
    )
    if not changed:
        raise APIError(400, f"job {job_id} is {_job_row(ft, job_id)['status']}; only a queued or running job can be cancelled", param="fine_tuning_job_id")
    ft.store.add_event(job_id, "Fine-tuning job cancelled")
    return job_object(_job_row(ft, job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_events(request: Request, job_id: str) -> dict[str, Any]:
    ft = _finetuning(request)
    _job_row(ft, job_id)
    rows, has_more = ft.store.page("events", "job_id = ?", (job_id,), request.query_params.get("after"), _limit(request))
    return _page(rows, has_more, event_object)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(request: Request, job_id: str) -> dict[str, Any]:
    ft = _finetuning(request)
    _job_row(ft, job_id)
    rows, has_more = ft.store.page("checkpoints", "job_id = ?", (job_id,), request.query_params.get("after"), _limit(request, 10))
    return _page(rows, has_more, checkpoint_object, ids=True)
