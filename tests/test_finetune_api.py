"""The OpenAI fine-tuning API of `tunesmith serve`, driven by the official `openai` client.

The server is the real command (`python -m tunesmith serve`) on a free port, training jobs on
the tiny model in subprocesses; the served fine-tune is compared with the job's adapter run
directly through peft, and a server killed mid-job is restarted on the same state folder.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from finetune_server import API_KEY, finetune_server, wait_for, wait_for_job

from tunesmith import inference
from tunesmith.runs import load_run_model, read_train_record
from tunesmith.serve.jobs import JOB_RUN_DIR, JOBS_DIR
from tunesmith.starter import support_tickets

DATED_BASE = "gpt-4o-mini-2024-07-18"  # the tiny model served under a hosted snapshot's name
MESSAGES = [{"role": "user", "content": "my package #12345 has not moved for 8 days"}]


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft-data") / "tickets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in support_tickets(30, seed=3)))
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with finetune_server(tiny_model_dir, tmp_path_factory.mktemp("ft-server") / "state") as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def direct_reply(run_dir, max_new_tokens: int = 12) -> str:
    """The greedy answer of a job's adapter run through peft directly, for MESSAGES."""
    trained = load_run_model(run_dir)
    ids = [inference.render_ids(trained.tokenizer, MESSAGES)]
    tokens = inference.greedy_tokens(trained.model, ids, inference.stop_token_ids(trained.model, trained.tokenizer), max_new_tokens=max_new_tokens)[0]
    return trained.tokenizer.decode(tokens, skip_special_tokens=True)


def test_seed_recipe_with_the_openai_client(client, server, training_file, tiny_model_dir):
    """files.create -> fine_tuning.jobs.create -> poll retrieve -> chat with the ft: model;
    a long job ahead of it in the queue is cancelled while it runs (one job at a time)."""
    uploaded = client.files.create(file=training_file.open("rb"), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.status, uploaded.filename) == ("file", "fine-tune", "processed", "tickets.jsonl")
    assert uploaded.bytes == training_file.stat().st_size
    assert client.files.content(uploaded.id).read() == training_file.read_bytes()
    assert uploaded.id in [f.id for f in client.files.list()]

    base = client.models.list().data[0].id
    long_job = client.fine_tuning.jobs.create(model=base, training_file=uploaded.id, hyperparameters={"n_epochs": 50, "batch_size": 1})
    job = client.fine_tuning.jobs.create(
        model=base, training_file=uploaded.id, suffix="tickets.v1", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2}}},
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size, job.hyperparameters.learning_rate_multiplier) == (1, 4, 2)

    # One at a time: the second job waits while the first trains; a cancel frees the worker.
    wait_for_job(client, long_job.id, until=("running",))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    cancelled = client.fine_tuning.jobs.cancel(long_job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None

    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{tiny_model_dir.name}:tickets.v1:{job.id.removeprefix('ftjob-')}"
    run_dir = server.state_dir / JOBS_DIR / job.id / JOB_RUN_DIR
    record = read_train_record(run_dir)
    assert job.trained_tokens == record.trained_tokens > 0
    assert record.config["train"]["learning_rate"] == pytest.approx(2 * 1e-2)  # the multiplier times the server's rate

    # Served at once, beside the base: the answer is the job's adapter's, run directly.
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == direct_reply(run_dir)
    base_reply = client.chat.completions.create(model=base, messages=MESSAGES, max_tokens=12, temperature=0)
    assert base_reply.choices[0].message.content != reply.choices[0].message.content

    # The cancelled job stayed cancelled, and its trainer left no model behind.
    assert client.fine_tuning.jobs.retrieve(long_job.id).status == "cancelled"
    assert not (server.state_dir / JOBS_DIR / long_job.id / JOB_RUN_DIR / "train" / "adapter").exists()
    assert "Fine-tuning job cancelled" in [e.message for e in client.fine_tuning.jobs.list_events(long_job.id)]

    # Events (newest first) and checkpoints, as OpenAI lists them.
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert messages[0] == "The job has successfully completed"
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    steps = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert sorted(e.data["step"] for e in steps) == list(range(1, record.steps + 1))
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == record.steps
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{record.steps}"
    assert checkpoints[0].metrics.train_loss == pytest.approx(record.final_loss)

    # Cursor pagination: newest first, `after` continues.
    first = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [job.id] and first.has_more
    second = client.fine_tuning.jobs.list(limit=1, after=job.id)
    assert [j.id for j in second.data] == [long_job.id] and not second.has_more
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id, long_job.id]

    # A finished job's cancel is refused; its files may go once no job needs them.
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_upload_errors_in_openai_shape_with_the_row(client, server, training_file):
    rows = training_file.read_text().splitlines()
    rows[2] = '{"messages": [{"role": "user", "content": "no answer"}'  # line 3: broken JSON
    broken = training_file.parent / "broken.jsonl"
    broken.write_text("\n".join(rows) + "\n")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=broken.open("rb"), purpose="fine-tune")
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith("broken.jsonl line 3: ")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "file", "invalid_file_format")
    # Nothing of the refused file was kept.
    assert "broken.jsonl" not in [f.filename for f in client.files.list()]
    assert len(list((server.state_dir / "files").iterdir())) == len(client.files.list().data)

    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=training_file.open("rb"), purpose="batch")
    assert caught.value.body["param"] == "purpose"


def test_job_requests_are_checked(client):
    base = client.models.list().data[0].id
    cases = [
        (dict(model="gpt-4o-mini-2024-07-18", training_file="file-x"), "model"),
        (dict(model=base, training_file="file-missing"), "training_file"),
        (dict(model=base, training_file="file-x", hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
        (dict(model=base, training_file="file-x", suffix="no spaces please"), "suffix"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(**kwargs)
        assert caught.value.body["param"] == param, kwargs
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.retrieve("ftjob-unknown")
    assert caught.value.body["code"] == "fine_tuning_job_not_found"


def test_a_small_file_uploads_as_validation_but_cannot_train(client, training_file):
    """OpenAI's 10-example minimum binds the training file; a small held-out file is a valid upload."""
    small = training_file.parent / "small.jsonl"
    small.write_text("\n".join(training_file.read_text().splitlines()[:3]) + "\n")
    uploaded = client.files.create(file=small.open("rb"), purpose="fine-tune")
    base = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=base, training_file=uploaded.id)
    assert caught.value.body["param"] == "training_file"
    assert "at least 10" in caught.value.body["message"]
    client.files.delete(uploaded.id)


def test_fine_tuning_routes_need_the_key(server, training_file):
    no_key = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    for call in (
        lambda: no_key.files.create(file=training_file.open("rb"), purpose="fine-tune"),
        lambda: no_key.files.list(),
        lambda: no_key.fine_tuning.jobs.list(),
        lambda: no_key.fine_tuning.jobs.create(model="x", training_file="file-x"),
        lambda: no_key.fine_tuning.jobs.list_events("ftjob-x"),
        lambda: no_key.fine_tuning.jobs.checkpoints.list("ftjob-x"),
    ):
        with pytest.raises(openai.AuthenticationError):
            call()
    assert httpx.get(f"{server.base_url}/files").status_code == 401


def test_a_job_survives_a_server_killed_mid_training(tiny_model_dir, tmp_path, training_file):
    """SIGKILL the server while its job trains; a new server on the same state folder resumes
    the job from its checkpoint and serves the model. The base is served under a dated
    hosted name (NAME=PATH), as a client written for OpenAI would ask for it."""
    state_dir = tmp_path / "state"
    settings = dict(overrides=["train.save_every=2"])
    base = f"{DATED_BASE}={tiny_model_dir}"
    with finetune_server(base, state_dir, **settings) as first:
        client = openai.OpenAI(base_url=first.base_url, api_key=API_KEY, max_retries=0)
        uploaded = client.files.create(file=training_file.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=DATED_BASE, training_file=uploaded.id, suffix="restart",
                                             hyperparameters={"n_epochs": 3, "batch_size": 2})
        killed_at = wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="a checkpoint")[0].step_number
        first.kill()
    with finetune_server(base, state_dir, **settings) as second:
        client = openai.OpenAI(base_url=second.base_url, api_key=API_KEY, max_retries=0)
        done = wait_for_job(client, job.id)
        assert done.status == "succeeded", done.error
        record = read_train_record(state_dir / JOBS_DIR / job.id / JOB_RUN_DIR)
        assert record.resumed and record.steps > killed_at
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        resumed = [int(m.group(1)) for m in map(re.compile(r"^Fine-tuning job resumed from its checkpoint at step (\d+) ").match, messages) if m]
        assert len(resumed) == 1 and resumed[0] >= killed_at
        assert done.fine_tuned_model == f"ft:{DATED_BASE}:restart:{job.id.removeprefix('ftjob-')}"
        reply = client.chat.completions.create(model=done.fine_tuned_model, messages=MESSAGES, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content is not None


def test_a_failing_job_carries_the_trainers_one_line_error(client, training_file):
    """A row over data.max_length (256 tokens on this server) passes the upload check, which
    counts no tokens, and stops the job's trainer: the job fails with the trainer's one line."""
    rows = training_file.read_text().splitlines()
    long_row = json.loads(rows[4])
    long_row["messages"][-1]["content"] = "word " * 400
    rows[4] = json.dumps(long_row)
    too_long = training_file.parent / "too-long.jsonl"
    too_long.write_text("\n".join(rows) + "\n")
    uploaded = client.files.create(file=too_long.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=client.models.list().data[0].id, training_file=uploaded.id, hyperparameters={"n_epochs": 1})
    job = wait_for_job(client, job.id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "training_failed"
    assert "\n" not in job.error.message and "data.max_length" in job.error.message, job.error.message
    assert job.error.message.startswith("run/data/train.jsonl: ")  # the job folder's path, not the server's
    last = client.fine_tuning.jobs.list_events(job.id).data[0]
    assert (last.level, last.message) == ("error", f"Fine-tuning job failed: {job.error.message}")


def test_hostile_uploads_are_clean_4xx(server, client):
    url, auth = f"{server.base_url}/files", {"Authorization": f"Bearer {API_KEY}"}
    cases = {
        "json, not multipart": (dict(json={"file": "x"}), 415, None),
        "no boundary": (dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 400, "file"),
        "no file field": (dict(files={"purpose": (None, "fine-tune")}), 400, "file"),
        "no purpose": (dict(files={"file": ("a.jsonl", b"{}\n")}), 400, "purpose"),
        "binary": (dict(files={"file": ("a.jsonl", bytes(range(256)) * 4)}, data={"purpose": "fine-tune"}), 400, "file"),
        "empty": (dict(files={"file": ("a.jsonl", b"")}, data={"purpose": "fine-tune"}), 400, "file"),
    }
    before = len(client.files.list().data)
    for name, (kwargs, status, param) in cases.items():
        response = httpx.post(url, headers={**auth, **kwargs.pop("headers", {})}, timeout=60, **kwargs)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (name, error)
        assert str(server.state_dir) not in error["message"], (name, error)  # no server paths
    assert len(client.files.list().data) == before


@pytest.fixture
def inprocess(tiny_model_dir, tmp_path, monkeypatch):
    """The app in this process, served as a relative folder (`tunesmith serve tiny-llama` from
    its parent folder), without its lifespan: the worker does not start, jobs stay queued."""
    from fastapi.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    monkeypatch.chdir(tiny_model_dir.parent)
    app = create_app(ServeSettings(models=[tiny_model_dir.name], state_dir=str(tmp_path / "state")))
    yield app, TestClient(app)
    app.state.finetuning.store.close()
    app.state.finetuning.lock.close()


def test_a_base_given_as_a_relative_folder_trains_the_same_base(inprocess, tiny_model_dir, tmp_path, training_file):
    """`tunesmith serve ./models/tiny`: the job's trainer runs in the job's folder, where the
    relative folder once named nothing, so every job failed to load its base."""
    from tunesmith import runs
    from tunesmith.config import load_config

    _, http = inprocess
    uploaded = http.post("/v1/files", files={"file": ("t.jsonl", training_file.read_bytes())}, data={"purpose": "fine-tune"})
    assert uploaded.status_code == 200, uploaded.text
    job = http.post("/v1/fine_tuning/jobs", json={"model": tiny_model_dir.name, "training_file": uploaded.json()["id"]})
    assert job.status_code == 200, job.text
    cfg = load_config(tmp_path / "state" / JOBS_DIR / job.json()["id"] / "config.yaml")
    assert runs.base_model_ref(cfg) == str(tiny_model_dir.resolve())


def test_odd_numbers_in_requests_are_400_not_500_or_coerced(inprocess, tiny_model_dir, training_file):
    """`?limit=²` (a Unicode digit that int() refuses) was a 500; `n_epochs: true` was read as
    1 epoch and `"3"` as 3: the API's numbers are JSON numbers, as OpenAI's are."""
    _, http = inprocess
    for path in ("/v1/files?limit=\u00b2", "/v1/fine_tuning/jobs?limit=\u0663"):
        response = http.get(path)
        assert response.status_code == 400 and response.json()["error"]["param"] == "limit", (path, response.text)
    uploaded = http.post("/v1/files", files={"file": ("t.jsonl", training_file.read_bytes())}, data={"purpose": "fine-tune"}).json()
    for hyper in ({"n_epochs": True}, {"batch_size": True}, {"learning_rate_multiplier": True}, {"n_epochs": "3"}):
        response = http.post("/v1/fine_tuning/jobs", json={"model": tiny_model_dir.name, "training_file": uploaded["id"], "hyperparameters": hyper})
        assert response.status_code == 400, (hyper, response.text)
    response = http.post("/v1/fine_tuning/jobs", json={"model": tiny_model_dir.name, "training_file": uploaded["id"], "seed": True})
    assert response.status_code == 400, response.text
    assert http.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_jobs_trained_on_another_base_meet_the_drift_guard(tiny_model_dir, tmp_path, training_file, monkeypatch):
    """A state folder reopened over another base (--state-dir, or the base folder replaced in
    place) once served its ft: models over that base without a word: wrong answers, no error."""
    import shutil

    from fastapi.testclient import TestClient
    from safetensors.torch import load_file, save_file

    from finetune_server import TINY_JOB_OVERRIDES
    from tunesmith.errors import UserError
    from tunesmith.serve import ServeSettings, create_app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's trainer inherits it
    state = str(tmp_path / "state")
    app = create_app(ServeSettings(models=[str(tiny_model_dir)], state_dir=state, finetune_overrides=TINY_JOB_OVERRIDES))
    http = TestClient(app)  # no lifespan: the job is trained below, in this thread
    uploaded = http.post("/v1/files", files={"file": ("t.jsonl", training_file.read_bytes())}, data={"purpose": "fine-tune"}).json()
    job = http.post("/v1/fine_tuning/jobs", json={"model": str(tiny_model_dir), "training_file": uploaded["id"],
                                                  "hyperparameters": {"n_epochs": 1, "batch_size": 8}}).json()
    ft = app.state.finetuning
    ft.runner._train(ft.store.next_job())
    job = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    ft.store.close()
    ft.lock.close()

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="fingerprint"):
        create_app(ServeSettings(models=[str(other)], state_dir=state))
    allowed = create_app(ServeSettings(models=[str(other)], state_dir=state, allow_base_mismatch=True))
    assert [w for w in allowed.state.warnings if w.startswith(f"{job['fine_tuned_model']}: ")], allowed.state.warnings
    allowed.state.finetuning.store.close()
    allowed.state.finetuning.lock.close()
