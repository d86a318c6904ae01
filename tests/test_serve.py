"""The server, in-process on an ephemeral port, driven by the official `openai` client.

One base (the tiny Llama) and two adapter runs over it; greedy outputs are compared with the
same adapters run directly through peft, so the numbers come from the real code.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from conftest import train_tiny_run

from tunesmith import inference
from tunesmith.errors import UserError
from tunesmith.runs import load_run_model
from tunesmith.serve import ServeSettings, create_app
from tunesmith.serve.app import run_in_thread

API_KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "my package #12345 has not moved for 8 days"}]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {
        "alpha": train_tiny_run(root / "alpha", tiny_model_dir, seed=0, name="alpha"),
        "beta": train_tiny_run(root / "beta", tiny_model_dir, seed=1, name="beta", train={"learning_rate": 2e-2}),
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir, runs):
    settings = ServeSettings(
        models=[str(tiny_model_dir), str(runs["alpha"]), str(runs["beta"])],
        port=0,
        api_key=API_KEY,
        max_adapters=1,  # two adapters, one slot: every switch exercises the LRU
        max_tokens_limit=400,
        max_n=2,
        max_prompt_tokens=200,
        max_body_bytes=8192,
    )
    app = create_app(settings)
    handle = run_in_thread(app)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def direct(runs):
    """Greedy answers of each adapter run through peft directly, for the same prompt."""
    out = {}
    for name, run_dir in runs.items():
        trained = load_run_model(run_dir)
        ids = [inference.render_ids(trained.tokenizer, MESSAGES)]
        tokens = inference.greedy_tokens(trained.model, ids, inference.stop_token_ids(trained.model, trained.tokenizer), max_new_tokens=12)[0]
        out[name] = trained.tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def base_id(server) -> str:
    return server.app.state.served.base_id


def test_models_lists_base_and_adapters(client, server):
    ids = {m.id for m in client.models.list().data}
    assert ids == {base_id(server), "alpha", "beta"}


def test_chat_matches_the_adapter_run_directly_and_swaps_adapters(client, server, direct):
    engine = server.app.state.engine
    for name in ("alpha", "beta", "alpha"):
        reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == direct[name]
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 10
        assert list(engine.adapters) == [name]  # max_adapters=1: the other one was evicted
    assert direct["alpha"] != direct["beta"]
    assert engine.stats["adapter_evictions"] >= 2


def test_streaming_equals_non_streaming_and_ends_with_done(client, server):
    full = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # The raw wire: SSE events ending with the [DONE] sentinel.
    body = {"model": "beta", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).text
    events = [line for line in raw.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_concurrent_requests_share_a_batch_across_adapters(client, server, direct):
    engine = server.app.state.engine
    before = dict(engine.stats)
    results: dict[int, str] = {}
    names = ["alpha", base_id(server), "alpha", base_id(server)]

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model=names[i], messages=MESSAGES, max_tokens=12, temperature=0)
        results[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = client.chat.completions.create(model=base_id(server), messages=MESSAGES, max_tokens=12, temperature=0).choices[0].message.content
    assert results[0] == results[2] == direct["alpha"]
    assert results[1] == results[3] == alone
    steps = engine.stats["steps"] - before["steps"]
    rows = engine.stats["batched_rows"] - before["batched_rows"]
    assert engine.stats["max_batch"] >= 2 and rows > steps  # more than one sequence per step


def test_json_schema_and_json_object_are_enforced(client):
    schema = {
        "type": "object",
        "properties": {"team": {"type": "string", "enum": ["billing", "technical", "account", "shipping"]}, "urgent": {"type": "boolean"}},
        "required": ["team", "urgent"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="alpha",
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    parsed = json.loads(reply.choices[0].message.content)
    assert set(parsed) == {"team", "urgent"} and parsed["team"] in schema["properties"]["team"]["enum"] and isinstance(parsed["urgent"], bool)
    reply = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=80, temperature=0.7, seed=3, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a valid JSON prefix starting an object
        assert reply.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="beta", messages=MESSAGES, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})


def test_completions_endpoint(client):
    reply = client.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=5, temperature=0)
    again = client.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == again.choices[0].text
    assert reply.usage.completion_tokens <= 5
    two = client.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=5, temperature=1.0, n=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1]


def test_auth_errors(server):
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0, default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found" and "no-such-adapter" in err.value.body["message"]


def test_limits_are_400_with_openai_error_body(client, server):
    cases = [
        dict(max_tokens=401),
        dict(n=3),
        dict(messages=[{"role": "user", "content": "word " * 300}]),
    ]
    for extra in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{"model": "alpha", "messages": MESSAGES, "max_tokens": 4, **extra})
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]
    big = {"model": "alpha", "messages": [{"role": "user", "content": "x" * 9000}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "body_too_large"
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "alpha"}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_client_disconnect_frees_its_slot(server):
    engine = server.app.state.engine
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 400, "temperature": 1.0, "seed": 0, "stream": True}
    with httpx.Client() as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            events = (line for line in response.iter_lines() if line)
            for _ in range(3):  # the role chunk, then two deltas: the sequence is decoding now
                next(events)
            [seq] = engine.active
    # Closed after the first chunk: the engine drops the sequence instead of running to 400.
    for _ in range(500):
        if seq not in engine.active:
            break
        time.sleep(0.01)
    assert seq not in engine.active and seq.cancelled and len(seq.generated) < 400


def test_metrics_and_health(server, client):
    client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'tunesmith_requests_total{route="/v1/chat/completions",status="200"}' in text
    completion_tokens = int(next(line.split()[1] for line in text.splitlines() if line.startswith("tunesmith_completion_tokens_total")))
    assert completion_tokens > 0 and "tunesmith_request_latency_seconds_count" in text
    health = httpx.get(f"{server.url}/health").json()
    assert health["models"] == sorted({base_id(server), "alpha", "beta"})


def test_drift_guard_refuses_adapters_on_another_base(tiny_model_dir, runs, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="fingerprint"):
        create_app(ServeSettings(models=[str(other), str(runs["alpha"])]))
    app = create_app(ServeSettings(models=[str(other), str(runs["alpha"])], allow_base_mismatch=True))
    assert app.state.warnings and "alpha" in app.state.warnings[0]
