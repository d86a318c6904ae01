"""train.backend openai against a real HTTP server speaking OpenAI's fine-tuning API shapes
(tests/fake_provider.py), driven by the official `openai` client: the checks before upload,
the job followed to its end, resume, failure, and what the manifest records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from fake_provider import FakeFineTuning

from tunesmith import provider, runs
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.serve.app import run_in_thread
from tunesmith.starter import support_tickets


@pytest.fixture(autouse=True)
def no_provider_env(monkeypatch):
    """Nothing of the developer's own OpenAI setup may reach a test."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def fake():
    """(state, base URL) of a fine-tuning API server; a test may change the state's settings."""
    state = FakeFineTuning()
    handle = run_in_thread(state.app())
    yield state, f"{handle.url}/v1"
    handle.stop()


def write_project(folder: Path, model_dir: Path, base_url: str, records: list | None = None, **openai_settings) -> Path:
    """train.jsonl, eval.jsonl and config.yaml (backend openai) in `folder`; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else support_tickets(24, seed=3)
    cut = len(records) * 3 // 4
    for name, part in (("train.jsonl", records[:cut]), ("eval.jsonl", records[cut:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    config = {
        "name": "hosted", "output_dir": "run", "model": {"name": str(model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 256},
        "train": {"backend": "openai", "epochs": 2, "batch_size": 4, "seed": 7,
                  "openai": {"model": "gpt-4o-mini-2024-07-18", "base_url": base_url, "poll_interval_s": 0.01,
                             "learning_rate_multiplier": 0.5, **openai_settings}},
    }
    (folder / "config.yaml").write_text(json.dumps(config))
    return folder / "config.yaml"


PII_RECORDS = [
    {"messages": [{"role": "user", "content": f"refund for order {i}, write to jane.doe{i}@example.com"},
                  {"role": "assistant", "content": "billing"}]}
    for i in range(16)
]


def test_a_job_is_followed_to_success_and_recorded(fake, tiny_model_dir, tmp_path):
    state, url = fake
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url))
    result = provider.run(cfg)

    (body,) = state.created
    assert body["model"] == "gpt-4o-mini-2024-07-18"
    assert body["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert (body["suffix"], body["seed"]) == ("hosted", 7)
    assert state.idempotency_keys[0].startswith("tunesmith-")
    # Exactly the files written in the run folder left the machine, training and validation.
    record = runs.read_provider_record(cfg.run_dir)
    assert [f.purpose for f in record.files] == ["training", "validation"]
    for f in record.files:
        assert state.files[f.file_id]["content"] == Path(f.path).read_bytes()
        assert f.rows == {"training": 18, "validation": 6}[f.purpose]
        assert state.files[f.file_id]["purpose"] == "fine-tune"
        assert f.bytes == len(Path(f.path).read_bytes())
    assert body["training_file"] == record.files[0].file_id and body["validation_file"] == record.files[1].file_id
    job = state.jobs[record.job_id]
    assert record.status == "succeeded" and record.fine_tuned_model == job["fine_tuned_model"] == result["fine_tuned_model"]
    assert record.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:")
    assert record.trained_tokens == job["trained_tokens"] == 1000 * 18 * 2
    # Billed: the provider's token count at the dated price ($3 / 1M for gpt-4o-mini); estimated:
    # the local tokenizer's count of the same examples, times epochs, at the same price.
    assert record.price_usd_per_1m_tokens == 3.0
    assert record.billed_cost_usd == pytest.approx(36000 * 3.0 / 1e6)
    assert record.estimated_tokens > 0 and record.estimated_cost_usd == pytest.approx(record.estimated_tokens * 3.0 / 1e6)
    (row,) = runs.list_runs()
    assert row["method"] == "openai:gpt-4o-mini-2024-07-18" and Path(row["path"]) == cfg.run_dir.resolve()


def test_the_api_key_never_reaches_a_file(fake, tiny_model_dir, tmp_path, monkeypatch):
    state, url = fake
    secret = "sk-test-" + "k" * 40
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url))
    provider.run(cfg)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_privacy_gate_blocks_a_file_with_pii(fake, tiny_model_dir, tmp_path):
    state, url = fake
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url, records=PII_RECORDS))
    with pytest.raises(UserError) as e:
        provider.run(cfg)
    assert "personal data" in e.value.message and "12 email" in e.value.message and url in e.value.message
    assert "nothing was uploaded" in e.value.message and "\n" not in e.value.one_line()
    assert state.files == {} and state.created == []


def test_redacted_data_passes_the_gate_and_only_placeholders_leave(fake, tiny_model_dir, tmp_path):
    state, url = fake
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url, records=PII_RECORDS, redact=True))
    provider.run(cfg)
    uploaded = b"".join(f["content"] for f in state.files.values())
    assert b"@example.com" not in uploaded and uploaded.count(b"[EMAIL]") == 16


def test_allow_pii_sends_the_data_as_is(fake, tiny_model_dir, tmp_path):
    state, url = fake
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url, records=PII_RECORDS, allow_pii=True))
    provider.run(cfg)
    assert b"jane.doe0@example.com" in b"".join(f["content"] for f in state.files.values())


def test_floating_alias_is_refused_in_one_line_before_anything_is_sent(fake, tiny_model_dir, tmp_path):
    state, url = fake
    config = write_project(tmp_path, tiny_model_dir, url, model="gpt-4o-mini")
    done = run_cli("train", str(config), env={"OPENAI_BASE_URL": ""})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'gpt-4o-mini' is an undated alias" in lines[0] and "--allow-floating-model" in lines[0]
    assert state.files == {} and state.created == []
    # Allowed on purpose, the alias is trained on.
    provider.run(load_config(config, ["train.openai.allow_floating_model=true"]))
    assert state.created[0]["model"] == "gpt-4o-mini"


def test_pinned_names():
    for name in ("gpt-4o-mini-2024-07-18", "gpt-3.5-turbo-0125", "davinci-002", "ft:gpt-4o-mini-2024-07-18:org:x:abc"):
        provider.check_pinned(name, False)
    for name in ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "chatgpt-4o-latest"):
        with pytest.raises(UserError):
            provider.check_pinned(name, False)


def test_resume_reattaches_to_the_same_job(fake, tiny_model_dir, tmp_path):
    """A follow cut short (the server stops answering) leaves the job recorded; --resume follows
    that job to its end and creates no second one; without --resume a rerun is refused."""
    state, url = fake
    state.refuse_retrieves = 1
    config = write_project(tmp_path, tiny_model_dir, url)
    cfg = load_config(config)
    with pytest.raises(UserError):
        provider.run(cfg)
    record = runs.read_provider_record(cfg.run_dir)
    assert record.job_id is not None and record.status == "validating_files" and len(state.created) == 1

    with pytest.raises(UserError) as e:
        provider.run(cfg)
    assert "--resume" in e.value.hint and len(state.created) == 1

    result = provider.run(cfg, resume=True)
    assert len(state.created) == 1 and len(state.files) == 2
    assert result["job_id"] == record.job_id and runs.read_provider_record(cfg.run_dir).status == "succeeded"


def test_a_create_whose_answer_is_lost_is_found_not_repeated(fake, tiny_model_dir, tmp_path):
    """The provider made the job but answered 502: the retry finds that job on our training
    file instead of paying for a second one."""
    state, url = fake
    state.lose_create_answers = 1
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url))
    result = provider.run(cfg)
    assert len(state.created) == 1 and list(state.jobs) == [result["job_id"]]
    assert runs.read_provider_record(cfg.run_dir).status == "succeeded"


def test_an_interrupted_pipeline_reattaches_to_its_job(fake, tiny_model_dir, tmp_path):
    """`tunesmith run` stopped while following the job: the rerun resumes the train stage,
    which re-attaches to the recorded job."""
    from tunesmith import pipeline

    state, url = fake
    state.refuse_retrieves = 1
    cfg = load_config(write_project(tmp_path, tiny_model_dir, url), ["eval.subjects=[base]"])
    with pytest.raises(UserError):
        pipeline.run(cfg, until_stage="train")
    assert len(state.created) == 1
    summary = pipeline.run(cfg, until_stage="train")
    assert len(state.created) == 1
    assert summary["train"]["job_id"] == runs.read_provider_record(cfg.run_dir).job_id
    assert summary["train"]["fine_tuned_model"].startswith("ft:")


def test_a_failed_job_is_one_line_with_the_providers_message(fake, tiny_model_dir, tmp_path):
    state, url = fake
    state.fail_message = "Training file has 3 examples with invalid roles.\nSee line 4."
    done = run_cli("train", str(write_project(tmp_path, tiny_model_dir, url)), env={"OPENAI_BASE_URL": ""})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: fine-tuning job ftjob-") and "failed: Training file has 3 examples with invalid roles. See line 4." in last
    assert "Traceback" not in done.stderr
    record = runs.read_provider_record(tmp_path / "run")
    assert record.status == "failed" and record.error == "Training file has 3 examples with invalid roles. See line 4."


def test_events_are_shown_with_progress(fake, tiny_model_dir, tmp_path):
    from rich.console import Console

    state, url = fake
    console = Console(record=True, width=200)
    provider.run(load_config(write_project(tmp_path, tiny_model_dir, url)), console=console)
    text = console.export_text()
    assert "uploading to " + url in text and "training: " in text and "18 rows" in text
    assert "Step 1/3" in text and "[3/3]" in text and "train_loss=0.3333" in text
    assert text.index("Created fine-tuning job") < text.index("Step 1/3") < text.index("successfully completed")


def test_config_refuses_steps_and_fractional_epochs_for_openai(tmp_path, tiny_model_dir):
    config = write_project(tmp_path, tiny_model_dir, "http://127.0.0.1:1/v1")
    with pytest.raises(UserError, match="whole epochs"):
        load_config(config, ["train.max_steps=10"])
    with pytest.raises(UserError, match="whole number"):
        load_config(config, ["train.epochs=1.5"])
