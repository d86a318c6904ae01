"""The server, in-process on an ephemeral port, driven by the official `openai` client.

One base (the tiny Llama) and two adapter runs over it; greedy outputs are compared with the
same adapters run directly through peft, so the numbers come from the real code.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import openai
import pytest
from conftest import copy_without_chat_template, train_tiny_run

from tunesmith import inference
from tunesmith.errors import UserError
from tunesmith.runs import load_run_model
from tunesmith.serve import ServeSettings, create_app
from tunesmith.serve.app import run_in_thread

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
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


@contextlib.contextmanager
def swapped_state(server, **values):
    """Replace entries of the running app's state for one block (starlette's State is no plain object)."""
    state = server.app.state
    old = {name: getattr(state, name) for name in values}
    for name, value in values.items():
        setattr(state, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(state, name, value)


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
        # max_adapters=1: the other one is evicted by the engine's batch loop, which may finish
        # that bookkeeping just after the reply is sent (seen under load): wait for it, briefly.
        for _ in range(200):
            if list(engine.adapters) == [name]:
                break
            time.sleep(0.05)
        assert list(engine.adapters) == [name]
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
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # bare liveness needs no key


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
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'tunesmith_requests_total{route="/v1/chat/completions",status="200"}' in text
    completion_tokens = int(next(line.split()[1] for line in text.splitlines() if line.startswith("tunesmith_completion_tokens_total")))
    assert completion_tokens > 0 and "tunesmith_request_latency_seconds_count" in text
    health = httpx.get(f"{server.url}/health", headers=AUTH).json()
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
    # An exported adapter folder carries the fingerprint in its export manifest.
    from tunesmith import export

    exported = export.run(shutil.copytree(runs["alpha"], tmp_path / "alpha-copy"), "adapter")["path"]
    with pytest.raises(UserError, match="fingerprint"):
        create_app(ServeSettings(models=[str(other), str(exported)]))


# ----------------------------------------------------------------------------------------------
# Issue 12: hardening. Each test failed before its fix.


def test_key_guards_everything_but_bare_liveness(server):
    for path in ("/metrics", "/openapi.json", "/v1/models", "/no-such-path"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no paths, no model ids
    detailed = httpx.get(f"{server.url}/health", headers=AUTH).json()
    assert detailed["models"] == sorted(server.app.state.served.models) and detailed["base"] == base_id(server)
    assert httpx.get(f"{server.url}/openapi.json", headers=AUTH).status_code == 200


def test_empty_api_key_is_refused(tiny_model_dir):
    for key in ("", "  "):
        with pytest.raises(UserError, match="empty"):
            create_app(ServeSettings(models=[str(tiny_model_dir)], api_key=key))


def test_empty_api_key_env_is_refused_by_the_cli(cli, tiny_model_dir):
    result = cli("serve", str(tiny_model_dir), "--port", "0", env={"TUNESMITH_API_KEY": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key is empty" in lines[0]


def test_metrics_label_by_route_template_not_raw_path(server):
    for path in ("/x%22%7D%201%0Aevil_total%201", "/another/path/1", "/another/path/2"):
        assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 404
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert not any(line.startswith("evil_total") for line in text.splitlines())
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines() if line.startswith("tunesmith_requests_total{")}
    assert "unmatched" in routes and routes <= {"unmatched", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/chat/completions", "/v1/completions"}


BAD_CHAT = [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ({"seed": 2**64}, 400),
    ({"seed": -(2**64)}, 400),
    ({"max_tokens": -1}, 400),
    ({"max_tokens": 0}, 400),
    ({"max_tokens": 10**12}, 400),
    ({"n": 0}, 400),
    ({"n": 1000}, 400),
    ({"temperature": -0.1}, 400),
    ({"temperature": 3}, 400),
    ({"top_p": 0}, 400),
    ({"logprobs": True}, 400),
    ({"top_logprobs": 5}, 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"stop": 7}, 400),
    ({"model": "no-such-model"}, 404),
    ({"model": 5}, 400),
    ({"response_format": {"type": "json_schema"}}, 400),
    ({"response_format": {"type": "yaml"}}, 400),
]
BAD_COMPLETIONS = [
    ({"prompt": ""}, 400),
    ({"prompt": ["ok", ""]}, 400),
    ({"prompt": []}, 400),
    ({"prompt": [1, 2, 3]}, 400),
    ({"prompt": None}, 400),
    ({"seed": 2**64}, 400),
    ({"logprobs": 2}, 400),
    ({"max_tokens": -5}, 400),
]


def test_bad_requests_are_clean_4xx_never_500(server):
    """Every malformed request: its 4xx, OpenAI's error object only, the culprit named."""
    tried = handled = 0
    for route, cases, base in (
        ("/v1/chat/completions", BAD_CHAT, {"model": "alpha", "messages": MESSAGES, "max_tokens": 2}),
        ("/v1/completions", BAD_COMPLETIONS, {"model": "alpha", "prompt": "hi", "max_tokens": 2}),
    ):
        for extra, status in cases:
            response = httpx.post(f"{server.url}{route}", json={**base, **extra}, headers=AUTH)
            tried += 1
            assert response.status_code == status, (route, extra, response.text)
            error = response.json()["error"]
            assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
            assert error["param"] and error["param"].split(".")[0] in {*extra, "model"}, (extra, error)
            handled += 1
    raw_cases = [(b"{not json", "application/json", 400), (b'{"model": "alpha"', "application/json", 400), (b"[]", "application/json", 400), (b"model=alpha", "application/x-www-form-urlencoded", 415), (b"\xff\xfe", "application/json", 400), (b"[" * 50000, "application/json", 400), (b'{"model": "alpha", "messages": [{"role": "user", "content": "a\\ud800"}]}', "application/json", 400)]
    for raw, content_type, status in raw_cases:
        response = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={**AUTH, "content-type": content_type})
        tried += 1
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}, (raw, response.text)
        handled += 1
    print(f"bad requests tried: {tried}, clean 4xx: {handled}")


def test_tiny_temperature_and_top_p_sample_instead_of_failing(client):
    """temperature 1e-40 (logits / t overflow to inf) and top_p 1e-300 (0 in float32) are valid values."""
    greedy = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=0).choices[0].message.content
    tiny_t = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=1e-40, seed=1).choices[0].message.content
    tiny_p = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6, temperature=1.0, top_p=1e-300, seed=1).choices[0].message.content
    assert tiny_t == greedy and tiny_p == greedy  # both keep only the likeliest token
    seeded = client.completions.create(model="alpha", prompt="The quick", max_tokens=3, seed=2**64 - 1, n=2)
    assert len(seeded.choices) == 2


def test_error_bodies_carry_no_internals(server):
    body = {"model": "beta", "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "/" not in message and "xgrammar" not in message.lower() and "schema" in message
    response = httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH)
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}

    class Exploding:
        chat_template = "{{ messages }}"  # has one, so the failure is inside rendering

        def apply_chat_template(self, *args, **kwargs):
            raise RuntimeError("secret detail at /opt/site-packages/x.py")

    with swapped_state(server, tokenizer=Exploding()):
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES}, headers=AUTH)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "secret" not in response.text and "RuntimeError" not in response.text


def test_sequences_per_request_are_bounded(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt=["hi"] * 100, n=2, max_tokens=1)
    limit = server.app.state.settings.max_sequences_per_request
    assert err.value.body["param"] == "prompt" and str(limit) in err.value.body["message"]
    ok = client.completions.create(model="alpha", prompt=["hi"] * (limit // 2), n=2, max_tokens=1)
    assert len(ok.choices) == limit


def test_prompt_rendering_runs_off_the_event_loop(server, client):
    """Rendering and tokenising a large prompt must not block the loop that serves every client."""
    threads = []
    real = server.app.state.tokenizer

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def apply_chat_template(self, *args, **kwargs):
            threads.append(threading.current_thread())
            return real.apply_chat_template(*args, **kwargs)

        def __call__(self, *args, **kwargs):
            threads.append(threading.current_thread())
            return real(*args, **kwargs)

    with swapped_state(server, tokenizer=Recording()):
        client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=1)
        client.completions.create(model="alpha", prompt="hello", max_tokens=1)
    assert len(threads) >= 2 and server.thread not in threads  # chat renders, then tokenises (inference.render_ids)


def test_prompt_longer_than_the_model_context_is_400(server):
    context = server.app.state.engine.max_context
    body = {"model": "alpha", "prompt": "word " * (context + 100), "max_tokens": 2}
    with swapped_state(server, settings=server.app.state.settings.model_copy(update={"max_prompt_tokens": 10**6})):
        response = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_pickle_only_adapter_is_refused_at_startup(tiny_model_dir, runs, tmp_path):
    import shutil

    from tunesmith.artifacts import ADAPTER_DIR

    run = tmp_path / "pickled"
    shutil.copytree(runs["alpha"], run)
    (run / ADAPTER_DIR / "adapter_model.safetensors").rename(run / ADAPTER_DIR / "adapter_model.bin")  # never unpickled
    with pytest.raises(UserError, match="pickle"):
        create_app(ServeSettings(models=[str(tiny_model_dir), str(run)]))
    with pytest.raises(UserError, match="pickle"):
        create_app(ServeSettings(models=[str(tiny_model_dir), f"p={run / ADAPTER_DIR}"]))


def test_a_failing_sequence_fails_alone_in_its_batch(tiny_model_dir):
    """A sampling error for one row of a shared decode step ends that request only."""
    import asyncio

    from tunesmith.models import load_model
    from tunesmith.serve.engine import Engine, SamplingParams, Sequence, ServedModel

    loaded = load_model(str(tiny_model_dir))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=8)
    prompt = loaded.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    real_choose = engine._choose

    def choose(seq, logits):
        if seq.index == 1 and seq.generated:  # in a decode step, after prefill
            raise RuntimeError("injected sampling failure")
        return real_choose(seq, logits)

    engine._choose = choose

    async def run() -> dict[int, list]:
        loop = asyncio.get_running_loop()
        queues = {i: asyncio.Queue() for i in range(3)}
        for i in range(3):  # submitted before start: admitted together, one decode batch
            engine.submit(Sequence(ServedModel("base", None), list(prompt), SamplingParams(max_tokens=8, temperature=0), loop, queues[i], index=i))
        engine.start()
        try:
            out = {i: [] for i in range(3)}
            for i, q in queues.items():
                while not out[i] or out[i][-1][0] not in ("done", "error"):
                    out[i].append(await asyncio.wait_for(q.get(), timeout=60))
            return out
        finally:
            engine.stop()

    events = asyncio.run(run())
    assert events[0][-1][0] == "done" and events[2][-1][0] == "done"
    assert events[1][-1] == ("error", "internal error")
    assert engine.stats["max_batch"] == 3


def test_damaged_adapter_config_is_refused_at_startup(tiny_model_dir, runs, tmp_path):
    import shutil

    from tunesmith.artifacts import ADAPTER_DIR

    adapter = tmp_path / "adapter"
    shutil.copytree(runs["alpha"] / ADAPTER_DIR, adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="adapter_config.json is not valid JSON"):
        create_app(ServeSettings(models=[str(tiny_model_dir), str(adapter)]))


def test_chat_on_a_model_without_chat_template_is_400_not_500(tiny_model_dir, tmp_path):
    base = copy_without_chat_template(tiny_model_dir, tmp_path / "no-template")
    handle = run_in_thread(create_app(ServeSettings(models=[str(base)], port=0)))
    try:
        chat = httpx.post(f"{handle.url}/v1/chat/completions", json={"model": str(base), "messages": MESSAGES, "max_tokens": 2}, timeout=60)
        completion = httpx.post(f"{handle.url}/v1/completions", json={"model": str(base), "prompt": "hello", "max_tokens": 2}, timeout=60)
    finally:
        handle.stop()
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "no_chat_template", chat.text
    assert completion.status_code == 200, completion.text


def test_model_ids_with_dots_are_served(tiny_model_dir, runs, direct):
    """A model id holding '.' (`ft:base:v1.2:id`, a run renamed v1.2) once failed every request:
    torch refuses '.' in the module names peft builds from the adapter name."""
    handle = run_in_thread(create_app(ServeSettings(models=[str(tiny_model_dir), f"alpha.v2={runs['alpha']}"], port=0)))
    try:
        client = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="alpha.v2", messages=MESSAGES, max_tokens=12, temperature=0)
    finally:
        handle.stop()
    assert reply.choices[0].message.content == direct["alpha"]


def _engine_answers(engine, batches: list[list[tuple]]) -> list[list[int]]:
    """Token ids for each (served model, prompt, prefix_tokens, seed), one batch after another
    through `engine`: greedy when seed is None, else sampled at temperature 1 with that seed.
    Each batch is queued before the engine starts, so its requests are admitted together."""
    import asyncio

    from tunesmith.serve.engine import SamplingParams, Sequence

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        answers = []
        for batch in batches:
            queues = [asyncio.Queue() for _ in batch]
            seqs = []
            for (served, prompt, prefix_tokens, seed), q in zip(batch, queues):
                params = SamplingParams(max_tokens=10, temperature=0 if seed is None else 1.0, seed=seed)
                seqs.append(Sequence(served, list(prompt), params, loop, q, prefix_tokens=prefix_tokens))
            for seq in seqs:
                engine.submit(seq)
            engine.start()
            try:
                for seq, q in zip(seqs, queues):
                    while True:
                        event = await asyncio.wait_for(q.get(), timeout=60)
                        assert event[0] != "error", event
                        if event[0] == "done":
                            break
                    answers.append(list(seq.generated))
            finally:
                engine.stop()
        return answers

    return asyncio.run(run())


def test_prefix_cache_gives_the_same_answers_across_batches_and_system_prompts(tiny_model_dir, runs, monkeypatch):
    """The system prompt's KV computed once and reused gives the tokens a full prefill gives (fp32):
    over two successive batches sharing a system prompt, and a batch whose rows differ in it;
    base rows and adapter rows (the prefix's KV depends on the adapter). The engine decodes with
    two-part attention, the prefix's KV attended where it is stored (the batch cache is narrower
    than the system prompt), and gives the tokens of the model's own forward (`two_part=False`)."""
    from tunesmith.artifacts import ADAPTER_DIR
    from tunesmith.models import load_model
    from tunesmith.serve.app import system_prefix_tokens
    from tunesmith.serve import engine as engine_module
    from tunesmith.serve.engine import Engine, ServedModel

    loaded = load_model(str(tiny_model_dir))
    base, alpha = ServedModel("base", None), ServedModel("alpha", runs["alpha"] / ADAPTER_DIR)
    labels = "Reply with one label: " + ", ".join(f"intent_{i}" for i in range(40)) + "."
    other = "You answer shipping questions in one short sentence, politely and without guessing."

    def request(served, system: str, user: str, seed: int | None = None) -> tuple:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prompt = inference.render_ids(loaded.tokenizer, messages)
        return served, prompt, system_prefix_tokens(loaded.tokenizer, messages, prompt), seed

    users = ["where is my parcel", "refund my order 12", "the box arrived broken", "change my address please", "cancel it"]
    batches = [
        [request(alpha, labels, users[0]), request(base, labels, users[1]), request(alpha, labels, users[2], seed=3)],
        # The next batch: the same system prompt, its KV reused.
        [request(alpha, labels, users[3]), request(base, labels, users[4], seed=4), request(alpha, labels, users[1], seed=5)],
        # Rows that differ in system prompt (the first two prefill together: one model, two prefixes).
        [request(alpha, labels, users[0], seed=6), request(alpha, other, users[1]), request(base, other, users[2], seed=7)],
    ]
    assert all(0 < n < len(prompt) for batch in batches for _, prompt, n, _ in batch)
    cached = Engine(loaded.model, loaded.tokenizer, max_batch_size=8, prefix_cache=True)
    assert cached.decoder is not None  # the tiny Llama takes the two-part path
    monkeypatch.setattr(engine_module, "GROW_COLUMNS", 3)  # its batch cache fills up and is laid out again every few steps
    with_cache = _engine_answers(cached, batches)
    monkeypatch.undo()
    assert cached._rows.length < min(n for _, _, n, _ in batches[-1])  # columns written per row: no copy of a prefix
    fresh = load_model(str(tiny_model_dir))  # the first engine wrapped its model in peft
    uncached = Engine(fresh.model, fresh.tokenizer, max_batch_size=8, prefix_cache=False)
    assert with_cache == _engine_answers(uncached, batches)
    fresh = load_model(str(tiny_model_dir))
    assert with_cache == _engine_answers(Engine(fresh.model, fresh.tokenizer, max_batch_size=8, prefix_cache=True, two_part=False), batches)
    assert len(set(map(tuple, with_cache))) > 3  # the answers differ by prompt: the comparison has teeth
    # Four (adapter, system prompt) pairs, each computed once; every other request reused one.
    assert cached.stats["prefix_misses"] == 4 and cached.stats["prefix_hits"] == 5
    assert cached.stats["prefill_forwards"] == 8  # one per run of requests for one model: two prefilled together
    assert uncached.stats["prefix_hits"] == uncached.stats["prefix_misses"] == 0


def test_server_weights_dtype_comes_from_inference_dtype(tiny_model_dir, tmp_path):
    """`precision` picks the weights' dtype through inference.inference_dtype; bf16 still answers."""
    import torch

    settings = ServeSettings(models=[str(tiny_model_dir)], port=0, precision="bf16", state_dir=str(tmp_path / "state"))
    handle = run_in_thread(create_app(settings))
    try:
        assert handle.app.state.engine.model.dtype == torch.bfloat16
        client = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "Reply with one label: " + ", ".join(f"intent_{i}" for i in range(20))}, *MESSAGES]
        answer = client.chat.completions.create(model=base_id(handle), messages=messages, max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert handle.app.state.engine.stats["prefix_misses"] == 1  # the chat route found the system prompt
    finally:
        handle.stop()


def test_engine_vllm_is_refused_in_one_line_when_vllm_is_absent(cli, tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the refusal cannot be shown")
    result = cli("serve", str(tiny_model_dir), "--engine", "vllm", "--port", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install vllm" in lines[0], result.stderr


def test_vllm_command_carries_the_adapters_and_the_lint_flags(tiny_model_dir, runs):
    """The argv handed to vLLM: the base, every adapter by its id, the rank flag the lint computes."""
    import json as json_module

    from tunesmith.artifacts import ADAPTER_DIR
    from tunesmith.runs import vllm_max_lora_rank
    from tunesmith.serve.vllm import vllm_command

    settings = ServeSettings(models=[str(tiny_model_dir), str(runs["alpha"]), f"b2={runs['beta'] / ADAPTER_DIR}"], port=8123, max_batch_size=64)
    argv = vllm_command(settings)
    assert argv[argv.index("--model") + 1] == str(tiny_model_dir)
    assert argv[argv.index("--max-num-seqs") + 1] == "64" and "--enable-lora" in argv and "--enable-prefix-caching" in argv
    lora = argv[argv.index("--lora-modules") + 1 : argv.index("--lora-modules") + 3]
    assert sorted(m.split("=")[0] for m in lora) == sorted(["alpha", "b2"])
    rank = int(json_module.loads((runs["alpha"] / ADAPTER_DIR / "adapter_config.json").read_text())["r"])
    assert "--max-lora-rank" not in argv and vllm_max_lora_rank({"r": rank}) is None  # tiny runs use r=4
    assert vllm_max_lora_rank({"r": 24}) == 32 and vllm_max_lora_rank({"r": 8, "rank_pattern": {"q_proj": 100}}) == 128
