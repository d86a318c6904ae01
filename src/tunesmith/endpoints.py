"""Models behind OpenAI-compatible APIs: the client, retries, the response cache, and the
evaluation subjects they answer.

One owner for talking to a provider: the openai training backend (provider.py) and the
evaluation (evaluate.py) both get their client and their retry rule here, through the official
`openai` package, so code that works against OpenAI works against vLLM, Ollama or `tunesmith
serve` and back.

An endpoint subject gets exactly the chat messages a local subject gets (zero-shot as `base`,
few-shot as `base-fewshot`, the answer format as `base-prompted`), greedy (temperature 0), at most
eval.max_new_tokens. Every answer is cached on disk under a hash of (base URL, model, messages,
parameters): a rerun, or the pipeline's eval stage after its baseline stage, pays nothing twice.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith import artifacts
from tunesmith.errors import UserError
from tunesmith.inference import Generation

OPENAI_URL = "https://api.openai.com/v1"
CACHE_DIR = "endpoint-cache"
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After is a provider outage: fail rather than hang
REQUEST_TIMEOUT_S = 600.0
# Which local subject's messages each prompt engineering reuses, and the subject name's tail.
PROMPTS = {"zero-shot": ("base", ""), "few-shot": ("base-fewshot", "+fewshot"), "prompted": ("base-prompted", "+prompted")}


# --------------------------------------------------------------------------- the client


def resolve_base_url(configured: str | None) -> str:
    """The API root: the configured one, else OPENAI_BASE_URL, else OpenAI's."""
    return (configured or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")


def make_client(base_url: str, api_key_env: str):
    """An `openai.OpenAI` client for `base_url`, its key read from the environment only.

    Retries are ours (`with_retries`), not the client's, so they are counted and reported. A
    server other than OpenAI's may run without auth: a placeholder key is sent then.
    """
    try:
        import openai
    except ImportError:
        raise UserError("the `openai` package is not installed", "pip install 'tunesmith[provider]'") from None
    key = os.environ.get(api_key_env)
    if not key:
        if base_url == OPENAI_URL:
            raise UserError(f"{api_key_env} is not set, so {base_url} cannot be reached",
                            f"export {api_key_env}=sk-... (the key is read from the environment, never from a file)")
        key = "no-key"
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)


def retry_delay_s(error: Exception, attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): the server's Retry-After(-ms) when it
    sends one, else exponential backoff with jitter, so clients that failed together spread out."""
    response = getattr(error, "response", None)
    headers = response.headers if response is not None else {}
    try:
        if headers.get("retry-after-ms") is not None:
            return min(float(headers["retry-after-ms"]) / 1000, MAX_RETRY_AFTER_S)
        if headers.get("retry-after") is not None:
            value = headers["retry-after"]
            try:
                return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                when = email.utils.parsedate_to_datetime(value).timestamp()
                return min(max(when - time.time(), 0.0), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        pass
    return min(0.5 * 2**attempt, MAX_BACKOFF_S) * (1 + 0.25 * random.random())


def with_retries(call: Callable[[], Any], *, max_retries: int, on_retry: Callable[[Exception, float], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> Any:
    """call(), retried on 429, 5xx, timeouts and dropped connections. Other errors (400, 401,
    404) are the request's fault: retrying would fail the same way, so they raise at once."""
    import openai

    for attempt in range(max_retries + 1):
        try:
            return call()
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
            if attempt == max_retries:
                raise
            delay = retry_delay_s(e, attempt)
            if on_retry is not None:
                on_retry(e, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def api_error_line(error: Exception, base_url: str, what: str) -> UserError:
    """A provider's refusal as one line: who answered, the status, the provider's own message."""
    status = getattr(error, "status_code", None)
    message = getattr(error, "message", None) or str(error)
    where = f"{base_url} ({status})" if status else base_url
    hint = {401: "check the API key in the environment variable", 404: "check the model name and the base URL",
            429: "wait, or lower eval.max_concurrency"}.get(status or 0, "see the provider's message")
    return UserError(f"{what}: {where}: {' '.join(str(message).split())}", hint)


# --------------------------------------------------------------------------- prices


def inference_price(model: str) -> tuple[float, float] | None:
    """(USD per 1M prompt tokens, per 1M completion tokens) from prices.json, or None when the
    model has no price there (a self-hosted server costs its compute, not tokens). A fine-tune
    `ft:BASE:org:suffix:id` is priced as `ft:BASE`."""
    from tunesmith.estimate import load_prices

    table = load_prices().get("usd_per_1m_inference_tokens", {})
    key = "ft:" + model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model
    row = table.get(key)
    return (float(row["input"]), float(row["output"])) if row else None


# --------------------------------------------------------------------------- the cache


def cache_key(base_url: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([base_url, model, messages, params], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_path(key: str) -> Path:
    return artifacts.tunesmith_home() / CACHE_DIR / key[:2] / f"{key}.json"


def cache_get(key: str) -> dict[str, Any] | None:
    try:
        return json.loads(cache_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cache_put(key: str, answer: dict[str, Any]) -> None:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(path, answer)


# --------------------------------------------------------------------------- subjects


@dataclass
class EndpointSubject:
    """One model behind an API, with one prompt engineering: a column of the report."""

    name: str
    model: str
    base_url: str
    api_key_env: str
    prompts_of: str  # the local subject whose messages it gets: base, base-fewshot, base-prompted
    kind: str  # "hosted model" or "hosted fine-tune"
    usd_per_1m_input: float | None = None
    usd_per_1m_output: float | None = None


@dataclass
class Usage:
    """What a subject's requests cost: sent and cached requests, tokens, retries."""

    requests_sent: int = 0
    cached: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def endpoint_subjects(cfg, task: str, hosted_finetune: str | None, hosted_base_url: str | None) -> list[EndpointSubject]:
    """The endpoint subjects of a config: each eval.endpoints entry times its prompts (prompted
    only where there is a label set or schema to state), and the run's hosted fine-tune as
    `tuned` when it was trained through a provider."""
    out = []
    for ep in cfg.eval.endpoints:
        base_url = resolve_base_url(ep.base_url or cfg.train.openai.base_url)
        prices = inference_price(ep.model)
        price_in = ep.usd_per_1m_input_tokens if ep.usd_per_1m_input_tokens is not None else (prices[0] if prices else None)
        price_out = ep.usd_per_1m_output_tokens if ep.usd_per_1m_output_tokens is not None else (prices[1] if prices else None)
        kind = "hosted fine-tune" if ep.model.startswith("ft:") else "hosted model"
        for prompt in ep.prompts:
            if prompt == "prompted" and task == "text":
                continue
            local, tail = PROMPTS[prompt]
            out.append(EndpointSubject((ep.name or f"openai:{ep.model}") + tail, ep.model, base_url, ep.api_key_env, local, kind, price_in, price_out))
    if hosted_finetune is not None:
        prices = inference_price(hosted_finetune)
        out.append(EndpointSubject("tuned", hosted_finetune, hosted_base_url or resolve_base_url(cfg.train.openai.base_url),
                                   cfg.train.openai.api_key_env, "base", "hosted fine-tune", *(prices or (None, None))))
    names = [s.name for s in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"eval.endpoints: subject name(s) {duplicates} used twice", "give each endpoint a distinct `name`")
    return out


def ask(client, subject: EndpointSubject, messages: list[dict[str, Any]], max_new_tokens: int, max_retries: int, usage: Usage) -> Generation:
    """One answer: from the cache when this exact request was answered before, else from the API."""
    params = {"temperature": 0, "max_tokens": max_new_tokens}
    key = cache_key(subject.base_url, subject.model, messages, params)
    answer = cache_get(key)
    if answer is not None:
        usage.add(cached=1, prompt_tokens=answer["prompt_tokens"], completion_tokens=answer["completion_tokens"])
        return Generation(answer["text"], [], answer["latency_s"], 0.0, answer["finish_reason"] == "stop", answer["completion_tokens"])
    import openai

    def call():
        usage.add(requests_sent=1)
        return client.chat.completions.create(model=subject.model, messages=messages, **params)

    start = time.perf_counter()
    try:
        response = with_retries(call, max_retries=max_retries, on_retry=lambda e, delay: usage.add(retries=1))
    except openai.APIError as e:
        raise api_error_line(e, subject.base_url, f"eval subject {subject.name} (model {subject.model})") from None
    latency_s = time.perf_counter() - start
    choice = response.choices[0]
    tokens = response.usage
    answer = {"text": (choice.message.content or "").strip(), "finish_reason": choice.finish_reason,
              "prompt_tokens": tokens.prompt_tokens if tokens else 0, "completion_tokens": tokens.completion_tokens if tokens else 0,
              "latency_s": latency_s, "model": response.model}
    cache_put(key, answer)
    usage.add(prompt_tokens=answer["prompt_tokens"], completion_tokens=answer["completion_tokens"])
    return Generation(answer["text"], [], latency_s, latency_s, choice.finish_reason == "stop", answer["completion_tokens"])


def hosted_finetune(cfg, subjects: list[str]) -> tuple[str | None, str | None]:
    """(model id, base URL) of the run's hosted fine-tune when `tuned` is asked of a run trained
    through a provider (train.backend openai): it answers as `tuned`, judged like a local one."""
    from tunesmith import runs

    if cfg.train.backend != "openai" or "tuned" not in subjects:
        return None, None
    record = runs.read_provider_record(cfg.run_dir)
    if record is None or record.fine_tuned_model is None:
        raise UserError(f"{cfg.run_dir} has no hosted fine-tune yet (train.backend openai)",
                        "train it first: tunesmith train CONFIG (or --resume to follow its job), or drop tuned from eval.subjects")
    return record.fine_tuned_model, record.base_url


def generate_endpoint(subject: EndpointSubject, conversations: list[list[dict[str, Any]]], ec) -> tuple[list[Generation], dict[str, Any]]:
    """(answers in order, what results.json says of the subject): at most eval.max_concurrency
    requests in flight; usage and cost summed over the answers (cached ones included: they are
    what the subject costs, `requests_sent` is what this run paid for)."""
    from rich.console import Console
    from rich.progress import Progress

    client = make_client(subject.base_url, subject.api_key_env)
    usage = Usage()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=ec.max_concurrency) as pool, Progress(transient=True, console=Console(stderr=True)) as bar:
        task_id = bar.add_task(f"eval {subject.name}", total=len(conversations))
        futures = [pool.submit(ask, client, subject, messages, ec.max_new_tokens, ec.max_retries, usage) for messages in conversations]
        answers = []
        try:
            for future in futures:
                answers.append(future.result())
                bar.advance(task_id, 1)
        except BaseException:
            for future in futures:  # one refusal (a 401, a 404) stops the subject: send nothing more
                future.cancel()
            raise
    cost = None
    if subject.usd_per_1m_input is not None and subject.usd_per_1m_output is not None:
        cost = (usage.prompt_tokens * subject.usd_per_1m_input + usage.completion_tokens * subject.usd_per_1m_output) / 1e6
    info = {
        "kind": subject.kind, "model": f"openai:{subject.model}", "base_url": subject.base_url, "prompts_of": subject.prompts_of,
        "usage": {"requests": len(conversations), "requests_sent": usage.requests_sent, "cached": usage.cached, "retries": usage.retries,
                  "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "wall_s": round(time.perf_counter() - start, 3)},
        "cost_usd": cost,
        "price_usd_per_1m_tokens": {"input": subject.usd_per_1m_input, "output": subject.usd_per_1m_output},
    }
    return answers, info
