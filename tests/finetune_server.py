"""`tunesmith serve` as a real process, for tests that drive its fine-tuning API over HTTP.

Import it from a test module (tests/ is on the path, as for conftest):

    from finetune_server import finetune_server, wait_for_job
    with finetune_server(tiny_model_dir, tmp_path / "state") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)

The server trains each job in a subprocess with TINY_JOB_OVERRIDES (fp32, rank-4 LoRA, short
examples), so a job on the tiny model takes seconds of training.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

API_KEY = "sk-finetune-test"
# Every job on the tiny model: fp32 (no bf16 autocast differences), a small LoRA with a large
# learning rate (the adapter visibly changes outputs), short examples.
TINY_JOB_OVERRIDES = ["train.precision=fp32", "train.lora.r=4", "train.lora.alpha=8", "train.learning_rate=1e-2", "data.max_length=256"]
# A guard against a hung server or job, not a performance bound (as run_cli's timeout).
HANG_GUARD_S = 900


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    api_key: str
    state_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: a crash, with no shutdown code run (the trainer dies with it)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server_process(model_dir: Path | str, state_dir: Path, *, api_key: str = API_KEY, overrides: list[str] | None = None,
                         extra_args: list[str] | None = None, log_path: Path | None = None) -> ServerProcess:
    """`python -m tunesmith serve MODEL --state-dir STATE` on a free port; returns once /health answers.

    `model_dir` may be NAME=PATH: the base is then served, and fine-tuned, under NAME (e.g. a
    dated hosted snapshot's name, for a client that refuses undated ones)."""
    port = free_port()
    log_path = log_path or state_dir.parent / f"{state_dir.name}-server-{port}.log"
    args = [sys.executable, "-m", "tunesmith", "serve", str(model_dir), "--port", str(port), "--api-key", api_key, "--state-dir", str(state_dir)]
    for override in TINY_JOB_OVERRIDES + (overrides or []):
        args += ["--finetune-set", override]
    # One torch thread in the server and, inherited, in every trainer it starts (shared machine).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([*args, *(extra_args or [])], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, port, api_key, state_dir, log_path)
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tunesmith serve exited with code {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"tunesmith serve did not answer /health:\n{server.log_tail()}")
        time.sleep(0.2)


@contextlib.contextmanager
def finetune_server(model_dir: Path | str, state_dir: Path, **kwargs) -> Iterator[ServerProcess]:
    """A `tunesmith serve` process for the block; stopped (jobs left to resume) at the end."""
    server = start_server_process(model_dir, state_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def wait_for_job(client, job_id: str, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"), poll_s: float = 0.3):
    """Poll `fine_tuning.jobs.retrieve` until the job's status is one of `until`; the job."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status}")
        time.sleep(poll_s)


def wait_for(condition, poll_s: float = 0.3, what: str = "condition"):
    """Poll `condition()` until it returns something true; that value."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} never became true")
        time.sleep(poll_s)
