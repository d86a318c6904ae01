"""Evaluation subjects on OpenAI-compatible endpoints, against real HTTP servers: `tunesmith
serve` on the tiny model (the same weights as the local subjects), and a small app that
answers 429/5xx first (tests/fake_provider.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest
from conftest import train_tiny_run
from fake_provider import FakeFineTuning, FlakyChat

from tunesmith import endpoints, evaluate, runs
from tunesmith.config import EvalConfig, load_config
from tunesmith.errors import UserError
from tunesmith.report import usd
from tunesmith.serve import ServeSettings, create_app
from tunesmith.serve.app import run_in_thread

SERVED = "tiny-2024-01-01"  # the base's name on the server: a dated name, as a provider's snapshot
MESSAGES = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]


@pytest.fixture(autouse=True)
def no_provider_env(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def flaky():
    """flaky(failures) -> (state, base URL) of a chat endpoint that fails as told, then answers."""
    handles = []

    def start(failures):
        state = FlakyChat(failures)
        handles.append(run_in_thread(state.app()))
        return state, f"{handles[-1].url}/v1"

    yield start
    for handle in handles:
        handle.stop()


def subject(url: str, name: str = "openai:flaky-2024-01-01") -> endpoints.EndpointSubject:
    return endpoints.EndpointSubject(name, "flaky-2024-01-01", url, "OPENAI_API_KEY", "base", "hosted model", 1.0, 2.0)


def test_a_429_is_retried_after_its_retry_after_and_then_succeeds(flaky):
    state, url = flaky([(429, {"Retry-After": "0"}), (503, {}), (502, {"retry-after-ms": "1"})])
    answers, info = endpoints.generate_endpoint(subject(url), MESSAGES[:1], EvalConfig(max_concurrency=1))
    assert [a.text for a in answers] == ["billing"]
    assert len(state.requests) == 4
    assert info["usage"] | {"wall_s": 0} == {"requests": 1, "requests_sent": 4, "cached": 0, "retries": 3,
                                             "prompt_tokens": 11, "completion_tokens": 2, "wall_s": 0}
    assert info["cost_usd"] == pytest.approx((11 * 1.0 + 2 * 2.0) / 1e6)


def test_concurrency_is_bounded(flaky):
    state, url = flaky([])
    state.delay_s = 0.05
    many = [[{"role": "user", "content": f"ticket {i}"}] for i in range(15)]
    endpoints.generate_endpoint(subject(url), many, EvalConfig(max_concurrency=3))
    assert len(state.requests) == 15 and state.max_in_flight == 3


def test_retries_give_up_after_max_retries_in_one_line(flaky):
    state, url = flaky([(429, {"Retry-After": "0"})] * 3)
    with pytest.raises(UserError) as e:
        endpoints.generate_endpoint(subject(url), MESSAGES[:1], EvalConfig(max_retries=2))
    assert len(state.requests) == 3
    assert "(429)" in e.value.message and "test failure 429" in e.value.message and "\n" not in e.value.one_line()


def test_a_client_error_is_not_retried(flaky):
    state, url = flaky([(404, {})])
    with pytest.raises(UserError) as e:
        endpoints.generate_endpoint(subject(url), MESSAGES[:1], EvalConfig())
    assert len(state.requests) == 1 and "(404)" in e.value.message and "model name" in e.value.hint


def test_retry_delay_honours_retry_after_and_backs_off_without_it():
    def error(headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert endpoints.retry_delay_s(error({"retry-after": "7"}), 0) == 7.0
    assert endpoints.retry_delay_s(error({"retry-after-ms": "250"}), 5) == 0.25
    assert endpoints.retry_delay_s(error({"retry-after": "100000"}), 0) == endpoints.MAX_RETRY_AFTER_S
    assert 0.5 <= endpoints.retry_delay_s(error({}), 0) <= 0.625
    assert 4.0 <= endpoints.retry_delay_s(error({}), 3) <= 5.0


def test_the_cache_makes_a_rerun_send_zero_requests(flaky):
    state, url = flaky([])
    first, info = endpoints.generate_endpoint(subject(url), MESSAGES, EvalConfig(max_concurrency=3))
    assert len(state.requests) == 5 and info["usage"]["requests_sent"] == 5
    again, info = endpoints.generate_endpoint(subject(url), MESSAGES, EvalConfig(max_concurrency=3))
    assert len(state.requests) == 5
    assert info["usage"]["requests_sent"] == 0 and info["usage"]["cached"] == 5 and info["usage"]["prompt_tokens"] == 55
    assert [a.text for a in again] == [a.text for a in first]
    # Another parameter is another request.
    endpoints.generate_endpoint(subject(url), MESSAGES[:1], EvalConfig(max_new_tokens=7))
    assert len(state.requests) == 6 and state.requests[-1]["max_tokens"] == 7 and state.requests[-1]["temperature"] == 0


def test_inference_prices_of_a_snapshot_and_of_its_fine_tunes():
    assert endpoints.inference_price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert endpoints.inference_price("ft:gpt-4o-mini-2024-07-18:org:tickets:abc123") == (0.30, 1.20)
    assert endpoints.inference_price("llama3.2:1b") is None


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """`tunesmith serve` on the tiny model, its base named like a dated snapshot; its
    fine-tuning jobs train as the fine-tuning API's own tests train them (seconds each)."""
    from finetune_server import TINY_JOB_OVERRIDES

    settings = ServeSettings(models=[f"{SERVED}={tiny_model_dir}"], port=0, state_dir=str(tmp_path_factory.mktemp("served") / "state"),
                             finetune_overrides=TINY_JOB_OVERRIDES)
    handle = run_in_thread(create_app(settings))
    yield f"{handle.url}/v1"
    handle.stop()


def test_report_shows_hosted_subjects_beside_the_local_ones(served, tiny_model_dir, tmp_path):
    """Zero-shot, few-shot and prompted on the server, beside base, base-fewshot, base-prompted
    and tuned run locally: the hosted zero-shot subject is the local base model behind HTTP, so
    its answers equal base's; tokens and cost are in results.json and the report; a rerun is
    served from the cache."""
    endpoint = {"model": SERVED, "base_url": served, "usd_per_1m_input_tokens": 0.15, "usd_per_1m_output_tokens": 0.6}
    run_dir = train_tiny_run(tmp_path / "project", tiny_model_dir, eval_settings={
        "subjects": ["base", "base-prompted", "base-fewshot", "tuned"], "few_shot_k": 2, "max_examples": 6, "endpoints": [endpoint]})
    cfg = load_config(run_dir.parent / "config.yaml")
    results = evaluate.run(cfg)

    hosted = [f"openai:{SERVED}", f"openai:{SERVED}+fewshot", f"openai:{SERVED}+prompted"]
    assert list(results["subjects"]) == ["base", "base-prompted", "base-fewshot", "tuned", *hosted]
    rows = [json.loads(x) for x in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    for local, remote in (("base", hosted[0]), ("base-fewshot", hosted[1]), ("base-prompted", hosted[2])):
        assert [r["outputs"][remote]["text"] for r in rows] == [r["outputs"][local]["text"] for r in rows]
        assert results["subjects"][remote]["metrics"]["exact_match"]["value"] == results["subjects"][local]["metrics"]["exact_match"]["value"]
        assert results["subjects"][remote]["prompt"] == results["subjects"][local]["prompt"]
    for name in hosted:
        entry = results["subjects"][name]
        usage = entry["usage"]
        assert usage["requests_sent"] == 6 and usage["cached"] == 0 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert entry["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1e6)
        assert entry["base_url"] == served and entry["model"] == f"openai:{SERVED}"
    # Few-shot prompts are longer than zero-shot ones, as the server counted them.
    assert results["subjects"][hosted[1]]["usage"]["prompt_tokens"] > results["subjects"][hosted[0]]["usage"]["prompt_tokens"]
    assert set(results["comparisons"]) >= {f"tuned_vs_{name}" for name in hosted}

    report = (run_dir / "eval" / "report.md").read_text()
    assert "## Tokens and cost" in report
    usage = results["subjects"][hosted[0]]["usage"]
    line = next(x for x in report.splitlines() if x.startswith(f"| {hosted[0]} |") and "sent" in x)
    assert f"{usage['prompt_tokens']:,}" in line and usd(results["subjects"][hosted[0]]["cost_usd"]) in line
    assert next(x for x in report.splitlines() if x.startswith("| tuned |") and "this machine" in x)
    assert "## Metrics" in report and f"openai:{SERVED}+fewshot" in report.split("## Metrics")[1].split("##")[0]

    again = evaluate.run(cfg)
    for name in hosted:
        assert again["subjects"][name]["usage"]["requests_sent"] == 0 and again["subjects"][name]["usage"]["cached"] == 6


def test_a_missing_hosted_fine_tune_is_named_before_any_generation(tmp_path, tiny_model_dir):
    from tunesmith.starter import support_tickets

    records = support_tickets(20, seed=3)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:15]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[15:]))
    (tmp_path / "config.yaml").write_text(json.dumps({"output_dir": "run", "model": {"name": str(tiny_model_dir)},
                                                      "data": {"train": "train.jsonl", "eval": "eval.jsonl"}, "train": {"backend": "openai"}}))
    with pytest.raises(UserError, match="no hosted fine-tune yet"):
        evaluate.run(load_config(tmp_path / "config.yaml"))


def fine_tuning_available(base_url: str) -> bool:
    """Whether the server implements the fine-tuning API (a 404 on the jobs list: not)."""
    import httpx

    return httpx.get(f"{base_url}/fine_tuning/jobs").status_code != 404


def test_tunesmith_run_with_the_openai_backend_against_tunesmith_serve(served, tiny_model_dir, tmp_path):
    """End to end: `tunesmith run` uploads, creates the job on `tunesmith serve`, follows it, and
    evaluates the hosted fine-tune (as tuned) and the hosted base beside the local base."""
    from conftest import run_cli

    if not fine_tuning_available(served):
        pytest.skip("this `tunesmith serve` does not implement /v1/fine_tuning/jobs (404): the fine-tuning API is not merged yet")
    from tunesmith.starter import support_tickets

    records = support_tickets(30, seed=3)  # 10 held out: the server checks a validation file as a training file
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:20]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[20:]))
    config = {
        "name": "hosted", "output_dir": "run", "model": {"name": str(tiny_model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 256},
        "train": {"backend": "openai", "epochs": 1, "batch_size": 4,
                  "openai": {"model": SERVED, "base_url": served, "poll_interval_s": 0.2}},
        "eval": {"subjects": ["base", "tuned"], "max_new_tokens": 8, "bootstrap_samples": 100, "precision": "fp32",
                 "endpoints": [{"model": SERVED, "base_url": served, "prompts": ["zero-shot"]}]},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    done = run_cli("run", str(tmp_path / "config.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    tuned = results["subjects"]["tuned"]
    assert tuned["kind"] == "hosted fine-tune" and tuned["model"].startswith(f"openai:ft:{SERVED}")
    assert set(results["subjects"]) == {"base", "tuned", f"openai:{SERVED}"}
    assert "tokens and cost" in (tmp_path / "run" / "eval" / "report.md").read_text().lower()
    # The hosted base is the local base behind HTTP; the hosted fine-tune answers otherwise.
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["outputs"][f"openai:{SERVED}"]["text"] for r in rows] == [r["outputs"]["base"]["text"] for r in rows]
    assert any(r["outputs"]["tuned"]["text"] != r["outputs"]["base"]["text"] for r in rows)
    client = openai.OpenAI(base_url=served, api_key="unused", max_retries=0)
    record = runs.read_provider_record(tmp_path / "run")
    job = client.fine_tuning.jobs.retrieve(record.job_id)
    assert (job.status, job.fine_tuned_model, job.trained_tokens) == ("succeeded", record.fine_tuned_model, record.trained_tokens)
    assert tuned["model"] == f"openai:{record.fine_tuned_model}"

    # A rerun finds every stage current: no second job, no request sent.
    jobs_before = [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
    again = run_cli("run", str(tmp_path / "config.yaml"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: unchanged, skipped" in again.stderr and "eval: unchanged, skipped" in again.stderr
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100).data] == jobs_before


def test_the_fake_fine_tuning_server_is_detected_as_implementing_the_api():
    handle = run_in_thread(FakeFineTuning().app())
    try:
        assert fine_tuning_available(f"{handle.url}/v1")
    finally:
        handle.stop()
