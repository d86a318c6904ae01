"""Small real HTTP servers for the provider tests: OpenAI's fine-tuning API shapes, and a chat
endpoint that answers 429/5xx before it succeeds. Served by uvicorn on 127.0.0.1:0 in a thread
(tunesmith.serve.app.run_in_thread), driven by the official `openai` client; never a mock of it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_ids = itertools.count(1)


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (the stdlib parser: no python-multipart)."""
    message = BytesParser(policy=default_policy).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


class FakeFineTuning:
    """The fine-tuning API's state: files, jobs, and the requests seen.

    A job advances one status per `retrieve` (validating_files, running, then succeeded or, with
    `fail_message`, failed) and emits an event per step with OpenAI's metrics data. With
    `refuse_retrieves` the first N retrieves answer 401, as a process killed mid-follow would
    leave a job: created, recorded, still running.
    """

    def __init__(self, *, fail_message: str | None = None, steps: int = 3, refuse_retrieves: int = 0, lose_create_answers: int = 0):
        self.fail_message, self.steps, self.refuse_retrieves = fail_message, steps, refuse_retrieves
        self.lose_create_answers = lose_create_answers  # creates that make the job, then answer 502
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.created: list[dict[str, Any]] = []  # every jobs.create body
        self.idempotency_keys: list[str | None] = []
        self.retrieves = 0

    def event(self, job_id: str, message: str, data: dict | None = None, level: str = "info") -> None:
        self.events[job_id].append({"id": f"ftevent-{next(_ids)}", "object": "fine_tuning.job.event", "created_at": int(time.time()),
                                    "level": level, "message": message, "data": data or {}, "type": "metrics" if data else "message"})

    def advance(self, job: dict[str, Any]) -> None:
        job["_ticks"] += 1
        if job["status"] == "validating_files":
            job["status"] = "running"
            self.event(job["id"], "Fine-tuning job started")
        elif job["status"] == "running" and job["_ticks"] <= self.steps + 1:
            step = job["_ticks"] - 1
            self.event(job["id"], f"Step {step}/{self.steps}: training loss={1.0 / step:.3f}",
                       {"step": step, "total_steps": self.steps, "train_loss": 1.0 / step})
        elif job["status"] == "running" and self.fail_message:
            job.update(status="failed", finished_at=int(time.time()), error={"code": "invalid_training_file", "message": self.fail_message, "param": "training_file"})
            self.event(job["id"], self.fail_message, level="error")
        elif job["status"] == "running":
            rows = self.files[job["training_file"]]["content"].count(b"\n")
            job.update(status="succeeded", finished_at=int(time.time()), trained_tokens=1000 * rows * job["hyperparameters"]["n_epochs"],
                       fine_tuned_model=f"ft:{job['model']}:tunesmith:{job['suffix']}:{job['id'][-6:]}")
            self.event(job["id"], "The job has successfully completed")

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/files")
        async def create_file(request: Request):
            parts = _multipart(request.headers["content-type"], await request.body())
            filename, content = parts["file"]
            file_id = f"file-{next(_ids)}"
            self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                                   "filename": filename, "purpose": parts["purpose"][1].decode(), "status": "processed", "content": content}
            return {k: v for k, v in self.files[file_id].items() if k != "content"}

        @app.post("/v1/fine_tuning/jobs")
        async def create_job(request: Request):
            body = await request.json()
            self.created.append(body)
            self.idempotency_keys.append(request.headers.get("idempotency-key"))
            if body["training_file"] not in self.files:
                return JSONResponse({"error": {"message": f"file {body['training_file']} not found", "type": "invalid_request_error", "param": "training_file", "code": None}}, 400)
            job_id = f"ftjob-{next(_ids):06d}"
            job = {"id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "error": None, "fine_tuned_model": None,
                   "finished_at": None, "hyperparameters": body.get("hyperparameters") or {}, "model": body["model"], "organization_id": "org-test",
                   "result_files": [], "seed": body.get("seed"), "status": "validating_files", "trained_tokens": None,
                   "training_file": body["training_file"], "validation_file": body.get("validation_file"), "suffix": body.get("suffix"), "_ticks": 0}
            self.jobs[job_id], self.events[job_id] = job, []
            self.event(job_id, f"Created fine-tuning job: {job_id}")
            if self.lose_create_answers > 0:
                self.lose_create_answers -= 1
                return JSONResponse({"error": {"message": "bad gateway (test)", "type": "server_error", "param": None, "code": None}}, 502,
                                    headers={"Retry-After": "0"})
            return self.public(job)

        @app.get("/v1/fine_tuning/jobs")
        async def list_jobs():
            return {"object": "list", "data": [self.public(j) for j in reversed(list(self.jobs.values()))], "has_more": False}

        @app.get("/v1/fine_tuning/jobs/{job_id}")
        async def retrieve(job_id: str):
            self.retrieves += 1
            if self.refuse_retrieves > 0:
                self.refuse_retrieves -= 1
                return JSONResponse({"error": {"message": "connection dropped (test)", "type": "invalid_request_error", "param": None, "code": None}}, 401)
            job = self.jobs[job_id]
            self.advance(job)
            return self.public(job)

        @app.get("/v1/fine_tuning/jobs/{job_id}/events")
        async def events(job_id: str, limit: int = 20):
            newest_first = list(reversed(self.events[job_id]))[:limit]
            return {"object": "list", "data": newest_first, "has_more": False}

        return app

    @staticmethod
    def public(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if not k.startswith("_")}


class FlakyChat:
    """A chat endpoint answering `failures` (status, headers) first, then a fixed answer with usage."""

    def __init__(self, failures: list[tuple[int, dict[str, str]]], answer: str = "billing", delay_s: float = 0.0):
        self.failures, self.answer, self.delay_s = list(failures), answer, delay_s
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(self.delay_s)  # requests overlap only when the client sends them together
            self.in_flight -= 1
            if self.failures:
                status, headers = self.failures.pop(0)
                return JSONResponse({"error": {"message": f"test failure {status}", "type": "server_error", "param": None, "code": None}}, status, headers=headers)
            return {"id": f"chatcmpl-{next(_ids)}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}

        return app
