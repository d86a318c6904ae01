"""`tunesmith train` with train.backend openai: a fine-tuning job through the OpenAI fine-tuning API.

The same road as local training, with the checks moved before the data leaves the machine:

1. The model must be a dated snapshot (gpt-4o-mini-2024-07-18): an alias may point at other
   weights next month, and a job on it would train, and an eval would measure, something else.
2. The files to upload are written in the run folder (RUN/provider/), redacted when asked; the
   data check runs on exactly those files and must pass; personal data blocks the upload unless
   it was redacted or allowed. What leaves the machine (files, rows, bytes) and where it goes
   (the base URL) is printed before anything is sent.
3. Upload, create the job (an idempotency key derived from the uploaded files, so a retried
   create cannot start a second paid job), and write each id into the manifest at once.
4. Follow the job through its events. An interrupted follow leaves the job running at the
   provider; `--resume` (or the next `tunesmith run`) re-attaches to it, never creating another.
5. Record the fine-tuned model id, the trained tokens, and the estimated against the billed cost.

Works against OpenAI and against any server speaking the API (`tunesmith serve`), through the
official `openai` client (endpoints.make_client: key from the environment only).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith import artifacts, runs
from tunesmith.config import RunConfig, config_to_yaml
from tunesmith.data import read_conversations
from tunesmith.endpoints import api_error_line, make_client, resolve_base_url, retry_delay_s, with_retries
from tunesmith.errors import UserError

PROVIDER_DIR = "provider"
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_RETRIES = 6
# A snapshot name ends in a date (gpt-4o-mini-2024-07-18), a MMDD (gpt-3.5-turbo-0125) or a
# version number (davinci-002); a fine-tune id (ft:...) names fixed weights too.
PINNED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4}|\d{3})$")


def check_pinned(model: str, allow_floating: bool) -> None:
    """Refuse an undated alias: the provider may move it to new weights under the same name."""
    if allow_floating or model.startswith("ft:") or PINNED.search(model):
        return
    raise UserError(
        f"model {model!r} is an undated alias: the provider can change the weights behind it, so this fine-tune "
        "could not be reproduced or compared later",
        "use a dated snapshot (e.g. gpt-4o-mini-2024-07-18), or pass --allow-floating-model",
    )


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The provider's hyperparameters from the config: epochs, batch size, learning-rate multiplier."""
    t, o = cfg.train, cfg.train.openai
    hp: dict[str, Any] = {"n_epochs": int(t.epochs), "batch_size": t.batch_size}
    if o.learning_rate_multiplier is not None:
        hp["learning_rate_multiplier"] = o.learning_rate_multiplier
    return hp


# --------------------------------------------------------------------------- before upload


def write_uploads(cfg: RunConfig) -> list[tuple[runs.UploadedFile, list]]:
    """(the file record, its conversations) of training and validation data, written in canonical
    OpenAI chat JSONL to RUN/provider/, PII replaced by placeholders when train.openai.redact."""
    from tunesmith.data import write_conversations
    from tunesmith.pii import redact_text
    from tunesmith.schema import Conversation, Message

    files = runs.data_files(cfg)
    parts = [("training", files.read(files.train))]
    if files.eval is not None and files.eval.exists():
        parts.append(("validation", files.read(files.eval)))
    redact = cfg.train.openai.redact
    out = []
    for purpose, conversations in parts:
        if redact:
            conversations = [Conversation([Message(m.role, redact_text(m.content), m.weight, m.name, m.extra) for m in c.messages], c.source_line, c.extra)
                             for c in conversations]
        path = cfg.run_dir / PROVIDER_DIR / f"{purpose}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = write_conversations(path, conversations)
        record = runs.UploadedFile(purpose=purpose, path=str(path), rows=rows, bytes=path.stat().st_size,
                                   sha256=artifacts.sha256_file(path), redacted=redact)
        out.append((record, conversations))
    return out


def check_uploads(cfg: RunConfig, uploads: list[runs.UploadedFile], base_url: str) -> None:
    """The data check on exactly the files to be sent, then the privacy gate: every error and
    every personal-data finding stops the upload (the latter unless allowed)."""
    from tunesmith.check import check_file

    found = []
    validation = next((f.path for f in uploads if f.purpose == "validation"), None)
    for f in uploads:
        # The training file with the validation file as held-out (leakage); the validation file
        # alone, where only the size rule is the training set's and not its own.
        report = check_file(f.path, format="openai", eval_path=validation if f.purpose == "training" else None)
        artifacts.write_json_atomic(Path(f.path).with_suffix(".check.json"), report.to_dict())
        errors = [e for e in report.errors if f.purpose == "training" or e.code != "too_few_examples"]
        if errors:
            first = errors[0]
            raise UserError(
                f"the data check found {len(errors)} error(s) in the {f.purpose} file {f.path} "
                f"(first: {'line %d: ' % first.line if first.line else ''}{first.message}); nothing was uploaded",
                first.fix or "fix the data and run again",
            )
        pii = {kind: count for kind, count in (report.stats.get("pii") or {}).items() if count}
        if pii:
            lines = sorted(w.line for w in report.warnings if w.code == "pii" and w.line)
            kinds = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in pii.items())
            found.append(f"{f.purpose} file: {kinds}" + (f" (first at line {lines[0]})" if lines else ""))
    if found and not cfg.train.openai.allow_pii:
        raise UserError(
            f"personal data in what would be uploaded to {base_url}: {'; '.join(found)}; nothing was uploaded",
            "upload a redacted copy (train.openai.redact: true), or pass --allow-pii to send it as is",
        )


def disclose(uploads: list[runs.UploadedFile], base_url: str, cfg: RunConfig, console: Console) -> None:
    """Say what leaves the machine and where it goes, before it does."""
    o = cfg.train.openai
    console.print(f"[bold]uploading to {base_url}[/bold] (key from ${o.api_key_env}; model {o.model}):", highlight=False)
    for f in uploads:
        console.print(f"  {f.purpose}: {f.path}: {f.rows} rows, {f.bytes:,} bytes, sha256 {f.sha256[:16]}"
                      + (" (redacted)" if f.redacted else ""), markup=False, highlight=False)


# --------------------------------------------------------------------------- upload and create


def upload_files(client, record: runs.ProviderRecord, run_dir: Path) -> None:
    """Upload each file not uploaded yet, recording its id in the manifest at once."""
    for f in record.files:
        if f.file_id is not None:
            continue
        with open(f.path, "rb") as handle:
            content = handle.read()
        uploaded = with_retries(lambda: client.files.create(file=(Path(f.path).name, content), purpose="fine-tune"), max_retries=JOB_RETRIES)
        f.file_id = uploaded.id
        runs.write_provider_record(run_dir, record)


def find_job(client, record: runs.ProviderRecord) -> str | None:
    """The id of a job already created on our training file: a create whose answer was lost
    (the process killed mid-request) must not be paid for twice."""
    training = next(f.file_id for f in record.files if f.purpose == "training")
    for job in with_retries(lambda: client.fine_tuning.jobs.list(limit=100), max_retries=JOB_RETRIES).data:
        if job.training_file == training and job.model == record.model:
            return job.id
    return None


def create_job(client, record: runs.ProviderRecord, run_dir: Path) -> None:
    """Create the job (or find the one already created on these files); its id goes in the manifest at once.

    A create answered 5xx, or whose answer was lost, may still have made the job: before each
    new try the provider's job list is searched for it, so no failure pays for two jobs.
    """
    import openai

    ids = {f.purpose: f.file_id for f in record.files}
    key = "tunesmith-" + hashlib.sha256("|".join([record.model, *sorted(f"{k}={v}" for k, v in ids.items())]).encode()).hexdigest()[:32]
    options: dict[str, Any] = {"suffix": record.suffix, "seed": record.seed}
    if ids.get("validation"):
        options["validation_file"] = ids["validation"]
    job_id = None
    for attempt in range(JOB_RETRIES + 1):
        job_id = find_job(client, record)
        if job_id is not None:
            break
        try:
            job_id = client.fine_tuning.jobs.create(model=record.model, training_file=ids["training"], hyperparameters=record.hyperparameters,
                                                    extra_headers={"Idempotency-Key": key}, **options).id
            break
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
            if attempt == JOB_RETRIES:
                raise
            time.sleep(retry_delay_s(e, attempt))
        except openai.APIStatusError as e:
            raise api_error_line(e, record.base_url, "creating the fine-tuning job") from None
    record.job_id, record.status, record.created_at = job_id, "validating_files", time.time()
    runs.write_provider_record(run_dir, record)


# --------------------------------------------------------------------------- follow


def show_event(event, console: Console) -> None:
    """One job event: its message, and the step, total and loss when it carries metrics."""
    data = getattr(event, "data", None) or {}
    data = data if isinstance(data, dict) else getattr(data, "__dict__", {})
    step, total = data.get("step"), data.get("total_steps")
    progress = f" [{step}/{total}]" if step is not None and total else ""
    loss = f" train_loss={data['train_loss']:.4f}" if isinstance(data.get("train_loss"), (int, float)) else ""
    console.print(f"  {event.level}: {event.message}{progress}{loss}", markup=False, highlight=False)


def follow(client, record: runs.ProviderRecord, run_dir: Path, poll_interval_s: float, console: Console):
    """Poll the job and print its new events until it ends; record each status change."""
    seen: set[str] = set()
    while True:
        job = with_retries(lambda: client.fine_tuning.jobs.retrieve(record.job_id), max_retries=JOB_RETRIES)
        page = with_retries(lambda: client.fine_tuning.jobs.list_events(record.job_id, limit=100), max_retries=JOB_RETRIES)
        # OpenAI lists events newest first; shown oldest first, each once.
        for event in sorted(page.data, key=lambda e: (e.created_at, e.id)):
            if event.id not in seen:
                seen.add(event.id)
                show_event(event, console)
        if job.status != record.status:
            record.status = job.status
            runs.write_provider_record(run_dir, record)
        if job.status in TERMINAL:
            return job
        time.sleep(poll_interval_s)


def finish(cfg: RunConfig, record: runs.ProviderRecord, job, conversations: list) -> None:
    """Record the outcome: a failure as one line; a success with its model, tokens and costs."""
    record.finished_at = time.time()
    if job.status != "succeeded":
        error = getattr(job, "error", None)
        message = " ".join(str(getattr(error, "message", None) or f"the job ended {job.status}").split())
        record.error = message
        runs.write_provider_record(cfg.run_dir, record)
        raise UserError(f"fine-tuning job {job.id} {job.status}: {message}",
                        "fix the cause, then start a new job: tunesmith train CONFIG --force")
    from tunesmith.estimate import load_prices

    price = load_prices()["usd_per_1m_training_tokens"].get(record.model)
    record.fine_tuned_model, record.trained_tokens = job.fine_tuned_model, job.trained_tokens
    record.estimated_tokens = estimated_tokens(cfg, conversations)
    record.price_usd_per_1m_tokens = price
    if price is not None:
        record.billed_cost_usd = record.trained_tokens * price / 1e6 if record.trained_tokens is not None else None
        record.estimated_cost_usd = record.estimated_tokens * price / 1e6 if record.estimated_tokens is not None else None
    runs.write_provider_record(cfg.run_dir, record)


def estimated_tokens(cfg: RunConfig, conversations: list) -> int | None:
    """Billed tokens as `tunesmith data estimate` counts them (the local model's tokenizer and
    chat template, every example whole, times epochs); None when no local tokenizer is at hand."""
    from tunesmith.estimate import count_tokens
    from tunesmith.models import load_tokenizer

    if not conversations:
        return None
    try:
        tokenizer = load_tokenizer(runs.base_model_ref(cfg), trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle)
    except (UserError, OSError):
        return None
    return round(count_tokens(conversations, tokenizer, 1 << 30)["untruncated_tokens"] * int(cfg.train.epochs))


# --------------------------------------------------------------------------- the stage


def run(cfg: RunConfig, *, resume: bool = False, force: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Fine-tune through the provider's API, or re-attach to the run's job; returns the record's summary."""
    console = console or Console(stderr=True)
    o = cfg.train.openai
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    check_pinned(o.model, o.allow_floating_model)
    # As the pipeline does: `tunesmith eval RUN` and `tunesmith runs` read the run's own config.
    artifacts.write_text_atomic(run_dir / artifacts.CONFIG_FILE, config_to_yaml(cfg))
    runs.register_run(run_dir)
    base_url = resolve_base_url(o.base_url)
    record = runs.read_provider_record(run_dir)
    if record is not None and not resume and not force:
        what = f"job {record.job_id} ({record.status})" if record.job_id else "an upload"
        raise UserError(f"{run_dir} already has {what} at {record.base_url}",
                        "pass --resume to follow it, or --force to start a new job (paid again)")
    client = make_client(base_url if record is None or not resume else record.base_url, o.api_key_env)
    conversations: list = []
    if record is None or not resume:
        # 1-2: what would leave the machine is written, checked and announced before anything is sent.
        uploads = write_uploads(cfg)
        conversations = next(c for f, c in uploads if f.purpose == "training")
        check_uploads(cfg, [f for f, _ in uploads], base_url)
        disclose([f for f, _ in uploads], base_url, cfg, console)
        record = runs.ProviderRecord(backend="openai", base_url=base_url, model=o.model, files=[f for f, _ in uploads],
                                     hyperparameters=hyperparameters(cfg), suffix=o.suffix or cfg.name[:64], seed=cfg.train.seed)
        runs.write_provider_record(run_dir, record)
    else:
        console.print(f"re-attaching to {record.job_id or 'the upload'} at {record.base_url}", highlight=False)
        conversations = read_conversations(record.files[0].path, "openai")
    import openai

    try:
        # 3: files, then the job; each id is in the manifest before the next call.
        if record.job_id is None:
            upload_files(client, record, run_dir)
            create_job(client, record, run_dir)
        console.print(f"fine-tuning job {record.job_id} at {record.base_url}", highlight=False)
        # 4-5: follow until it ends (interrupted: the job keeps running; --resume follows it again).
        job = follow(client, record, run_dir, o.poll_interval_s, console)
    except KeyboardInterrupt:
        if record.job_id:
            console.print(f"job {record.job_id} keeps running at the provider; follow it again with --resume", highlight=False)
        raise
    except openai.APIError as e:
        raise api_error_line(e, record.base_url, f"fine-tuning job {record.job_id or '(not created)'}") from None
    finish(cfg, record, job, conversations)
    console.print(f"fine-tuned model: {record.fine_tuned_model} ({record.trained_tokens} trained tokens; "
                  f"estimated ${record.estimated_cost_usd if record.estimated_cost_usd is not None else '?'}, "
                  f"billed ${record.billed_cost_usd if record.billed_cost_usd is not None else '?'})", highlight=False)
    return {"job_id": record.job_id, "fine_tuned_model": record.fine_tuned_model, "trained_tokens": record.trained_tokens,
            "estimated_cost_usd": record.estimated_cost_usd, "billed_cost_usd": record.billed_cost_usd}
