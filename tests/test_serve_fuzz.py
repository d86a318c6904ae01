"""Property-based fuzzing of the HTTP API: hypothesis builds request bodies, near-valid and
hostile, and every answer must be a clean 2xx/4xx in OpenAI's error shape, never a 5xx.

The server is the real one on the tiny model, in-process on an ephemeral port. Bounded by
example counts (no wall-clock asserts); `FUZZ_LOG` collects every (route, status) so the test
can say how many requests it sent and what it found.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.serve import ServeSettings, create_app
from tunesmith.serve.app import run_in_thread

API_KEY = "sk-fuzz"
FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
FUZZ_LOG: Counter = Counter()


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tiny_run):
    settings_ = ServeSettings(models=[str(tiny_model_dir), str(tiny_run)], port=0, api_key=API_KEY, max_tokens_limit=6, max_n=2, max_body_bytes=16384, max_batch_size=4)
    handle = run_in_thread(create_app(settings_))
    with httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        handle.http = http
        handle.model_ids = sorted(handle.app.state.served.models)
        yield handle
    handle.stop()
    print(f"\nfuzz: {sum(FUZZ_LOG.values())} requests; by (route, status): {dict(sorted(FUZZ_LOG.items()))}")


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_any = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)
tiny_float = st.sampled_from([0.0, 1e-300, 1e-45, 1e-39, 5e-39, 1e-20, 1e-6, 0.5, 1.0, 2.0, 2.5, -1.0])
big_int = st.sampled_from([-(2**64), -1, 0, 1, 2, 3, 6, 7, 2**31, 2**63 - 1, 2**63, 2**64, 10**30])


def _part() -> st.SearchStrategy:
    text = st.one_of(st.text(max_size=30), st.text(max_size=30), json_scalar)
    return st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"])}, optional={"text": text})


message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "user", "assistant", "developer", "tool"]), "content": st.one_of(st.text(max_size=60), st.lists(_part(), max_size=3), st.none())},
)

# A hostile value for any field: edge numbers, wrong types, empty strings and lists.
hostile = st.one_of(big_int, tiny_float, json_scalar, json_any, st.just(""), st.just([""]), st.just([]), st.just(float("nan")), st.just(float("inf")))


def _sampling() -> dict[str, st.SearchStrategy]:
    """Valid values of the optional fields both endpoints share, edge values included."""
    return {
        "max_tokens": st.integers(1, 6),
        "temperature": st.sampled_from([0.0, 1e-6, 0.5, 1.0, 2.0]),
        "top_p": st.sampled_from([1e-6, 0.5, 0.9, 1.0]),
        "n": st.integers(1, 2),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "logprobs": st.just(False),
        "user": st.text(max_size=8),
    }


def _with_hostile(valid: st.SearchStrategy, keys: list[str]) -> st.SearchStrategy:
    """A valid body with up to two fields replaced (or added) by hostile values."""
    overlay = st.dictionaries(st.sampled_from(keys), hostile, max_size=2)
    return st.tuples(valid, overlay).map(lambda pair: {**pair[0], **pair[1]})


def _chat_body(model_ids: list[str]) -> st.SearchStrategy:
    response_format = st.one_of(
        st.just({"type": "json_object"}),
        st.just({"type": "text"}),
        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"name": st.just("x")}, optional={"schema": json_any})}),
    )
    valid = st.fixed_dictionaries({"model": st.sampled_from(model_ids), "messages": st.lists(message, min_size=1, max_size=3)}, optional={**_sampling(), "response_format": response_format})
    return _with_hostile(valid, ["model", "messages", "response_format", "max_completion_tokens", "top_logprobs", *_sampling()])


def _completion_body(model_ids: list[str]) -> st.SearchStrategy:
    prompt = st.one_of(st.text(min_size=1, max_size=60), st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=6))
    valid = st.fixed_dictionaries({"model": st.sampled_from(model_ids), "prompt": prompt}, optional=_sampling())
    return _with_hostile(valid, ["model", "prompt", "max_completion_tokens", "echo", "best_of", *_sampling()])


def _post(server, route: str, body: object) -> httpx.Response:
    content = json.dumps(body, allow_nan=True).encode()
    response = server.http.post(route, content=content, headers={"content-type": "application/json"})
    FUZZ_LOG[(route, response.status_code)] += 1
    return response


def _check(response: httpx.Response) -> None:
    """A 5xx is a bug; a 4xx carries OpenAI's error object and nothing else; a stream has no error event."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert "Traceback" not in body["error"]["message"] and "/site-packages/" not in body["error"]["message"]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"error"' not in response.text, response.text[-500:]


def test_fuzz_chat_completions(fuzz_server):
    @FUZZ
    @given(body=_chat_body(fuzz_server.model_ids))
    def run(body):
        _check(_post(fuzz_server, "/v1/chat/completions", body))

    run()


def test_fuzz_completions(fuzz_server):
    @FUZZ
    @given(body=_completion_body(fuzz_server.model_ids))
    def run(body):
        _check(_post(fuzz_server, "/v1/completions", body))

    run()


def test_fuzz_raw_bodies_and_paths(fuzz_server):
    """Bodies that are not JSON objects, wrong content types, and arbitrary paths and methods."""

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        route=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json"]),
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        raw=st.one_of(st.binary(max_size=200), json_any.map(lambda v: json.dumps(v).encode())),
        content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
        junk_path=st.one_of(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#"), max_size=20), st.just("x%22%7D%201%0Aevil_total%201")),
    )
    def run(route, method, raw, content_type, junk_path):
        for path in (route, "/" + junk_path.lstrip("/")):
            response = fuzz_server.http.request(method, path, content=raw, headers={"content-type": content_type} if content_type else {})
            FUZZ_LOG[("raw", response.status_code)] += 1
            assert response.status_code < 500, (method, path, response.text[:300])

    run()


def test_fuzz_server_is_alive_after(fuzz_server):
    """After everything above, the server still answers a normal request."""
    response = _post(fuzz_server, "/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")
