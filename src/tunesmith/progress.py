"""Progress of long work, for every stage: rich bars in a terminal, plain lines elsewhere, and a
small record in the run folder that `tunesmith runs` reads.

One owner, so train, evaluate and the pipeline say progress the same way. Outside a terminal
(CI, nohup, SLURM, `| tee`) a live bar prints nothing until it ends, so there a plain line
goes out every `TUNESMITH_PROGRESS_INTERVAL_S` seconds (30 by default) and at the start and
end of each task: done/total, the rate, the elapsed time and an ETA. The record
(RUN/progress.json) is replaced atomically every few seconds, so a reader never sees half of it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tunesmith import artifacts
from tunesmith.humanize import duration_text

INTERVAL_ENV = "TUNESMITH_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
RECORD_INTERVAL_S = 5.0  # how often the progress record is rewritten at most (capped by the line interval)


def line_interval_s() -> float:
    """Seconds between plain progress lines: TUNESMITH_PROGRESS_INTERVAL_S, else 30."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def plain_output(console) -> bool:
    """Plain lines unless both stdout and the console's own stream are terminals: a bar drawn on
    a terminal while the output is piped to a file (`| tee`) leaves the file without progress."""
    return not (console.is_terminal and sys.stdout.isatty())


def status_text(what: str, done: int, total: int, unit: str, elapsed_s: float, done_here: int, fields: dict[str, Any]) -> str:
    """`train: step 12/100 (12%), loss 2.3456, 1234 tokens/s, 1m05s elapsed, ETA 8m01s`.

    `done_here` is what this process did in `elapsed_s` (a resumed training started at a later
    step): the rate and the ETA come from it, not from the total.
    """
    share = f" ({done / total:.0%})" if total else ""
    if unit == "step":
        parts = [f"{what}: step {done}/{total}{share}"]
    else:
        parts = [f"{what}: {done}/{total} {unit}{share}"]
    parts += [field_text(name, value) for name, value in fields.items() if value is not None]
    rate = done_here / elapsed_s if elapsed_s > 0 else 0.0
    if unit != "step" and done_here:
        parts.append(f"{rate:.2f} {unit}/s")
    parts.append(f"{duration_text(elapsed_s)} elapsed")
    if done < total:
        parts.append(f"ETA {duration_text((total - done) / rate)}" if rate > 0 else "ETA unknown")
    return ", ".join(parts)


def field_text(name: str, value: Any) -> str:
    """`loss 2.3456`, but `1234 tokens/s`: a rate reads with its unit after the number."""
    return f"{value} {name}" if name.endswith("/s") else f"{name} {value}"


class Progress:
    """One task's progress (`with Progress(...) as p: p.update(done, loss=...)`).

    In a terminal a rich bar; otherwise plain lines. `run_dir` (optional) gets the progress
    record. `enabled=False` (ranks other than 0) makes it silent and record-free.
    """

    def __init__(self, what: str, total: int, unit: str, *, console, run_dir: Path | None = None,
                 done: int = 0, enabled: bool = True, transient: bool = False):
        self.what, self.total, self.unit, self.console = what, int(total), unit, console
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.done = self.start_done = int(done)
        self.enabled, self.transient = enabled, transient
        self.plain = plain_output(console)
        self.interval_s = line_interval_s()
        self.fields: dict[str, Any] = {}
        self.bar = self.task_id = None
        self.started = self.last_line = self.last_record = 0.0

    def __enter__(self) -> Progress:
        self.started = self.last_line = self.last_record = time.perf_counter()
        if not self.enabled:
            return self
        if self.plain:
            self._line()
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[text]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=self.transient,
            )
            self.bar.start()
            self.task_id = self.bar.add_task(self.what, total=self.total, completed=self.done, text="")
        self._record(finished=False)
        return self

    def update(self, done: int, **fields: Any) -> None:
        """`done` of `total` so far; `fields` (already formatted) go into the line."""
        self.done = int(done)
        self.fields.update(fields)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task_id, completed=self.done, text="  ".join(field_text(k, v) for k, v in self.fields.items() if v is not None))
        elif now - self.last_line >= self.interval_s:
            self._line()
        if now - self.last_record >= min(RECORD_INTERVAL_S, self.interval_s):
            self._record(finished=False)

    def advance(self, count: int = 1, **fields: Any) -> None:
        self.update(self.done + count, **fields)

    def note(self, text: str) -> None:
        """A line of its own (an eval loss, an early stop), above the bar in a terminal."""
        if self.enabled:
            (self.bar.console if self.bar is not None else self.console).print(text, markup=False, highlight=False)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def text(self) -> str:
        return status_text(self.what, self.done, self.total, self.unit, self.elapsed_s, self.done - self.start_done, self.fields)

    def _line(self) -> None:
        self.last_line = time.perf_counter()
        self.console.print(self.text(), markup=False, highlight=False, soft_wrap=True)

    def _record(self, finished: bool) -> None:
        self.last_record = time.perf_counter()
        if self.run_dir is not None:
            write_record(self.run_dir, {"text": self.text(), "what": self.what, "done": self.done, "total": self.total,
                                        "unit": self.unit, "finished": finished})

    def __exit__(self, kind, error, tb) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.stop()
        if error is None:
            rate = (self.done - self.start_done) / self.elapsed_s if self.elapsed_s > 0 else 0.0
            per = f"{rate:.2f} {self.unit}/s" if self.unit != "step" else f"{self.elapsed_s / max(self.done - self.start_done, 1):.2f} s/step"
            fields = "".join(f", {field_text(k, v)}" for k, v in self.fields.items() if v is not None)
            self.console.print(f"{self.what}: {self.done}/{self.total} {self.unit if self.unit != 'step' else 'steps'} in "
                               f"{duration_text(self.elapsed_s)} ({per}){fields}", markup=False, highlight=False, soft_wrap=True)
        self._record(finished=True)


# --- the progress record ---------------------------------------------------------------------


def write_record(run_dir: Path, data: dict[str, Any]) -> None:
    """RUN/progress.json, replaced atomically; who wrote it, so a reader can tell a live run."""
    if not Path(run_dir).is_dir():
        return
    artifacts.write_json_atomic(Path(run_dir) / artifacts.PROGRESS_FILE,
                                {**data, "pid": os.getpid(), "host": socket.gethostname(), "updated_at": time.time()})


def read_record(run_dir: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads((Path(run_dir) / artifacts.PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def process_alive(pid: int | None, host: str | None) -> bool | None:
    """Whether process `pid` on `host` still runs; None when this machine cannot tell (another host)."""
    if not pid or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
