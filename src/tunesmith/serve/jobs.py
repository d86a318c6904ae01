"""Fine-tuning jobs of `tunesmith serve`: their SQLite store, and the worker that trains them.

State folder layout (one per server; `ServeSettings.state_dir`):

    STATE/state.lock              held while a server uses the folder (one server per folder)
    STATE/jobs.sqlite             files, jobs, events, checkpoints (stdlib sqlite3, WAL)
    STATE/files/FILE_ID.jsonl     uploaded files, as uploaded
    STATE/jobs/JOB_ID/config.yaml the run config the job trains with
    STATE/jobs/JOB_ID/run/        the run folder (`tunesmith run ... --until train`)
    STATE/jobs/JOB_ID/train.log   the trainer's output

Why a subprocess per job: training must not share the serving process's GIL or memory, a
cancel must be able to stop it at once (a thread cannot be killed), and a server that dies
takes its trainer with it (PR_SET_PDEATHSIG), so a restarted server never finds a second
trainer writing the same run folder. Resuming is the pipeline's: a train stage recorded as
running with unchanged inputs restarts from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts
from tunesmith.serve.engine import log

DB_FILE = "jobs.sqlite"
LOCK_FILE = "state.lock"
FILES_DIR = "files"
JOBS_DIR = "jobs"
JOB_LOG_FILE = "train.log"
JOB_RUN_DIR = "run"
ACTIVE_STATUSES = ("validating_files", "queued", "running")
POLL_S = 0.5

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    purpose TEXT NOT NULL, status TEXT NOT NULL, examples INTEGER);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL,
    validation_file TEXT, hyperparameters TEXT NOT NULL, suffix TEXT, seed INTEGER NOT NULL,
    status TEXT NOT NULL, fine_tuned_model TEXT, finished_at INTEGER, trained_tokens INTEGER,
    error TEXT, metadata TEXT);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
    model TEXT NOT NULL, metrics TEXT NOT NULL, UNIQUE (job_id, step));
"""


class JobStore:
    """The SQLite store: one connection, one lock (routes and the worker thread share it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        (folder / FILES_DIR).mkdir(parents=True, exist_ok=True)
        (folder / JOBS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(folder / DB_FILE, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def execute(self, sql: str, params: tuple = ()) -> int:
        """Run one write; the number of rows it changed."""
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    def row(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def page(self, table: str, where: str, params: tuple, after: str | None, limit: int, newest_first: bool = True) -> tuple[list[dict[str, Any]], bool]:
        """(rows, has_more): one page in rowid order, starting after the row with id `after`."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        sql = f"SELECT * FROM {table} WHERE {where}"
        if after is not None:
            sql += f" AND rowid {compare} COALESCE((SELECT rowid FROM {table} WHERE id = ?), {'-1' if compare == '>' else '1e18'})"
            params = (*params, after)
        found = self.rows(f"{sql} ORDER BY rowid {order} LIMIT ?", (*params, limit + 1))
        return found[:limit], len(found) > limit

    # --- files, jobs, events ------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.folder / FILES_DIR / f"{file_id}.jsonl"

    def job_dir(self, job_id: str) -> Path:
        return self.folder / JOBS_DIR / job_id

    def add_event(self, job_id: str, message: str, level: str = "info", type_: str = "message", data: dict | None = None) -> None:
        from tunesmith.serve import protocol

        self.execute(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (protocol.new_id("ftevent"), job_id, protocol.now(), level, message, type_, json.dumps(data) if data is not None else None),
        )

    def next_job(self) -> dict[str, Any] | None:
        """The job to train next: an interrupted one first (it resumes), then the oldest queued."""
        return self.row("SELECT * FROM jobs WHERE status IN ('running', 'queued') ORDER BY status = 'queued', rowid LIMIT 1")

    def status(self, job_id: str) -> str | None:
        found = self.row("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return found["status"] if found else None


def hold_lock(folder: Path) -> Any:
    """An exclusive lock on the state folder, or a UserError naming the fix (a second server
    on the same folder would train every queued job twice)."""
    import fcntl

    from tunesmith.errors import UserError

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"the state folder {folder} is in use by another tunesmith server", "stop that server, or pass another --state-dir") from None
    return handle


def _prctl() -> Any:
    """libc's prctl, bound now: the forked child must not load a library (another thread of the
    server may hold the loader's lock at fork time)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the server dies (Linux), so no orphan trains on."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


class JobRunner:
    """One background thread that trains the queued jobs one at a time, each in a subprocess,
    turning the run folder's metrics and checkpoints into events and checkpoint records."""

    def __init__(self, store: JobStore, on_success: Callable[[dict[str, Any]], None]):
        self.store = store
        self.on_success = on_success
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tunesmith-finetune", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop the trainer; its job stays `running` and resumes when a server starts again."""
        self._stop.set()
        self._wake.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.next_job()
            if job is None:
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            try:
                self._train(job)
            except Exception as e:  # noqa: BLE001 - one broken job must not stop the queue
                log.exception("fine-tuning job %s failed", job["id"])
                self._fail(job["id"], f"internal error: {type(e).__name__}; the server log has the details")

    def _train(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        job_dir = self.store.job_dir(job_id)
        run_dir = job_dir / JOB_RUN_DIR
        if job["status"] == "running":
            from tunesmith.checkpoints import list_checkpoints

            found = list_checkpoints(run_dir / artifacts.CHECKPOINTS_DIR)
            where = f"from its checkpoint at step {found[-1].name[5:]}" if found else "from step 0 (no checkpoint was written)"
            self.store.add_event(job_id, f"Fine-tuning job resumed {where} after a server restart")
        else:
            if not self.store.execute("UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'queued'", (job_id,)):
                return  # cancelled meanwhile
            self.store.add_event(job_id, "Fine-tuning job started")
        command = [sys.executable, "-m", "tunesmith", "run", str(job_dir / artifacts.CONFIG_FILE), "--until", "train"]
        with open(job_dir / JOB_LOG_FILE, "ab") as log_file:
            self._process = subprocess.Popen(
                command, cwd=job_dir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, before exec
            )
        try:
            while self._process.poll() is None:
                if self._stop.wait(POLL_S):
                    return  # shutting down: the job stays running and resumes on restart
                self._record_progress(job, run_dir)
                if self.store.status(job_id) == "cancelled":
                    self._process.kill()
                    self._process.wait()
                    return
            self._record_progress(job, run_dir)
            returncode = self._process.returncode
        finally:
            if self._stop.is_set() and self._process.poll() is None:
                self._process.terminate()
                self._process.wait(timeout=30)
            self._process = None
        if self._stop.is_set():
            return
        if returncode == 0:
            self._succeed(job, run_dir)
        else:
            # Paths inside the job folder are told relative to it: the client has no use for the server's.
            message = _last_error_line(job_dir / JOB_LOG_FILE) or f"the trainer exited with code {returncode}; see {JOB_LOG_FILE}"
            self._fail(job_id, message.replace(f"{job_dir}{os.sep}", ""))

    def _record_progress(self, job: dict[str, Any], run_dir: Path) -> None:
        """New metrics rows become metrics events; new checkpoint folders, checkpoint records."""
        from tunesmith.checkpoints import list_checkpoints
        from tunesmith.serve import protocol

        job_id = job["id"]
        last = self.store.row("SELECT MAX(json_extract(data, '$.step')) AS step FROM events WHERE job_id = ? AND type = 'metrics'", (job_id,))
        last_step = (last or {}).get("step") or 0
        rows = _metrics_rows(run_dir / artifacts.METRICS_FILE)
        losses = {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}
        for row in rows:
            if row.get("loss") is None or row["step"] <= last_step:
                continue
            data = {"step": row["step"], "train_loss": row["loss"], "learning_rate": row.get("lr")}
            self.store.add_event(job_id, f"Step {row['step']}: training loss={row['loss']:.4f}", type_="metrics", data=data)
        for folder in list_checkpoints(run_dir / artifacts.CHECKPOINTS_DIR):
            step = int(folder.name[5:])
            metrics = {"step": float(step), "train_loss": losses.get(step)}
            added = self.store.execute(
                "INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, model, metrics) VALUES (?, ?, ?, ?, ?, ?)",
                (protocol.new_id("ftckpt"), job_id, protocol.now(), step, f"{job['fine_tuned_model']}:ckpt-step-{step}", json.dumps(metrics)),
            )
            if added:
                self.store.add_event(job_id, f"Checkpoint created at step {step}")

    def _succeed(self, job: dict[str, Any], run_dir: Path) -> None:
        from tunesmith.runs import read_train_record
        from tunesmith.serve import protocol

        record = read_train_record(run_dir)
        trained_tokens = record.trained_tokens if record is not None else None
        changed = self.store.execute(
            "UPDATE jobs SET status = 'succeeded', finished_at = ?, trained_tokens = ? WHERE id = ? AND status = 'running'",
            (protocol.now(), trained_tokens, job["id"]),
        )
        if not changed:
            return  # cancelled in the last instant: the cancel stands
        self.on_success(job)
        self.store.add_event(job["id"], f"New fine-tuned model created: {job['fine_tuned_model']}")
        self.store.add_event(job["id"], "The job has successfully completed")

    def _fail(self, job_id: str, message: str) -> None:
        from tunesmith.serve import protocol

        error = {"code": "training_failed", "message": message, "param": None}
        if self.store.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ? AND status IN ('queued', 'running')", (protocol.now(), json.dumps(error), job_id)):
            self.store.add_event(job_id, f"Fine-tuning job failed: {message}", level="error")


def _metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The metrics file's complete rows (the trainer may be writing the last line right now)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _last_error_line(path: Path) -> str | None:
    """The trainer's one-line `error: ...` (a UserError), or its last line (a traceback's)."""
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    return lines[-1][:500] if lines else None
