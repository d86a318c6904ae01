"""`create_app(settings)`: the OpenAI-compatible HTTP API over one base and its adapters.

Everything the routes need lives on `app.state` (settings, served models, engine, metrics):
the routes are module-level functions on one `APIRouter` that read `request.app.state`, and
there are no module globals, so two apps in one process (tests) never share anything. Routes
only translate HTTP to engine requests and back; every error leaves in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tunesmith.errors import UserError
from tunesmith.inference import inference_dtype, render_ids
from tunesmith.serve import protocol
from tunesmith.serve.engine import Engine, SamplingParams, Sequence, ServedModel, log


class ServeSettings(BaseModel):
    """Server settings (the `tunesmith serve` options)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["smollm2-135m-instruct"], description="Run folders, adapter folders (NAME=PATH to rename) or one base model reference.")
    host: str = Field("127.0.0.1", description="Interface to bind; 127.0.0.1 keeps the server local.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer KEY` on every route but a bare /health (an empty key is refused).")
    max_adapters: int = Field(4, ge=1, description="Adapters kept loaded at once (least recently used evicted).")
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together in one step.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(4, ge=1, description="Largest n (choices per request).")
    max_sequences_per_request: int = Field(16, ge=1, description="Largest number of prompts x n one request may start (a list of prompts multiplies n).")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest prompt in tokens (default: the model's context minus max_tokens).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body.")
    allow_base_mismatch: bool = Field(False, description="Serve adapters whose recorded base fingerprint differs.")
    state_dir: str | None = Field(None, description="Folder of the fine-tuning API's files, jobs and SQLite store (default: one per base model under TUNESMITH_HOME/serve).")
    max_upload_bytes: int = Field(100 << 20, ge=1024, description="Largest file uploaded to /v1/files.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Weights' dtype: auto runs bf16 where the hardware runs it fast (a bf16 GPU, a CPU with AMX/AVX512-BF16), else fp32.")
    prefix_cache: bool = Field(True, description="Compute a system prompt's KV once and reuse it for every request that starts with it (same adapter).")
    finetune_overrides: list[str] = Field(default_factory=list, description="Run-config overrides (`train.lora.r=8`) applied to every fine-tuning job before its hyperparameters.")


@dataclass
class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_buckets: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    latency_counts: list[int] = field(default_factory=lambda: [0] * 11)
    latency_sum_s: float = 0.0
    latency_count: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        if route.startswith("/v1/") and route != "/v1/models":
            self.latency_sum_s += seconds
            self.latency_count += 1
            index = next((i for i, b in enumerate(self.latency_buckets) if seconds <= b), len(self.latency_buckets))
            self.latency_counts[index] += 1

    def render(self, engine: Engine | None) -> str:
        lines = ["# HELP tunesmith_requests_total HTTP requests by route and status.", "# TYPE tunesmith_requests_total counter"]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'tunesmith_requests_total{{route="{route}",status="{status}"}} {count}')
        lines += [
            "# TYPE tunesmith_prompt_tokens_total counter",
            f"tunesmith_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE tunesmith_completion_tokens_total counter",
            f"tunesmith_completion_tokens_total {self.completion_tokens}",
            "# HELP tunesmith_request_latency_seconds Completion request latency.",
            "# TYPE tunesmith_request_latency_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(self.latency_buckets, self.latency_counts):
            cumulative += count
            lines.append(f'tunesmith_request_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'tunesmith_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}')
        lines.append(f"tunesmith_request_latency_seconds_sum {self.latency_sum_s:.6f}")
        lines.append(f"tunesmith_request_latency_seconds_count {self.latency_count}")
        if engine is not None:
            lines += [
                "# TYPE tunesmith_active_sequences gauge",
                f"tunesmith_active_sequences {len(engine.active)}",
                "# TYPE tunesmith_queued_sequences gauge",
                f"tunesmith_queued_sequences {engine.queue_depth}",
                "# TYPE tunesmith_decode_steps_total counter",
                f"tunesmith_decode_steps_total {engine.stats['steps']}",
                "# HELP tunesmith_decode_rows_total Sequences advanced, summed over decode steps (rows/steps = mean batch).",
                "# TYPE tunesmith_decode_rows_total counter",
                f"tunesmith_decode_rows_total {engine.stats['batched_rows']}",
                "# TYPE tunesmith_loaded_adapters gauge",
                f"tunesmith_loaded_adapters {len(engine.adapters)}",
            ]
        return "\n".join(lines) + "\n"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


# ----------------------------------------------------------------------------------------------
# What is served: one base, adapters over it


@dataclass
class ServedSet:
    base_ref: str
    base_id: str
    models: dict[str, ServedModel]
    expected_base_fingerprints: dict[str, str | None]
    chat_template: Any = None  # the templates.ChatTemplate the adapters were trained with (None: the base's own)


def resolve_served(refs: list[str]) -> ServedSet:
    """Sort the positional arguments into one base and named adapters (no weights loaded)."""
    from tunesmith.artifacts import ADAPTER_DIR, EXPORT_MANIFEST_FILE, FULL_MODEL_DIR, MANIFEST_FILE
    from tunesmith.runs import base_model_ref, check_adapter_weights, read_run_config, run_chat_template, trained_base_fingerprint
    from tunesmith.templates import folder_template

    explicit: list[tuple[str, str]] = []  # (id, ref): model arguments and full fine-tunes
    implied: list[tuple[str, str]] = []  # the bases that adapters name
    adapters: dict[str, ServedModel] = {}
    expected: dict[str, str | None] = {}
    chat_templates: dict[str, Any] = {}  # adapter id -> the template it was trained with
    for raw in refs:
        name, _, ref = raw.partition("=") if "=" in raw and not Path(raw).exists() else ("", "", raw)
        path = Path(ref).expanduser()
        if path.is_dir() and (path / MANIFEST_FILE).exists():
            cfg = read_run_config(path)
            if (path / FULL_MODEL_DIR / "config.json").exists():
                explicit.append((name or cfg.name, str(path / FULL_MODEL_DIR)))
                continue
            if not (path / ADAPTER_DIR / "adapter_config.json").exists():
                raise UserError(f"run {path} has no trained adapter", "train it first: tunesmith train CONFIG")
            check_adapter_weights(path / ADAPTER_DIR)
            model_id = name or cfg.name
            adapters[model_id] = ServedModel(model_id, path / ADAPTER_DIR, cfg.data.system_prompt, str(path))
            expected[model_id] = trained_base_fingerprint(path)
            chat_templates[model_id] = run_chat_template(path)
            implied.append((cfg.model.name, base_model_ref(cfg)))
        elif path.is_dir() and (path / "adapter_config.json").exists():
            check_adapter_weights(path)
            adapter_cfg = _json_object(path / "adapter_config.json")
            model_id = name or path.name
            adapters[model_id] = ServedModel(model_id, path, None, str(path))
            tunesmith_manifest = path / EXPORT_MANIFEST_FILE
            exported = _json_object(tunesmith_manifest) if tunesmith_manifest.exists() else {}
            expected[model_id] = exported.get("trained_on_base_fingerprint") or exported.get("base_fingerprint")
            chat_templates[model_id] = folder_template(path)
            if adapter_cfg.get("base_model_name_or_path"):
                implied.append((adapter_cfg["base_model_name_or_path"], adapter_cfg["base_model_name_or_path"]))
        else:
            explicit.append((name or ref, ref))
    # A base given as an argument wins over the bases the adapters name (the drift guard then
    # checks each adapter against it by fingerprint).
    bases = explicit or implied
    if not bases:
        raise UserError("nothing to serve", "pass a run folder, an adapter folder or a model reference")
    distinct = {str(Path(ref).resolve()) if Path(ref).exists() else ref for _, ref in bases}
    if len(distinct) > 1:
        raise UserError(f"one server serves one base model; these arguments name several: {sorted(distinct)}", "start one server per base model")
    base_id, base_ref = bases[0]
    if base_id in adapters:
        raise UserError(f"model id {base_id!r} is used twice", "rename one with NAME=PATH")
    # One tokenizer renders every request: the adapters' template (they were trained with it).
    distinct_templates = {t.sha256: t for t in chat_templates.values() if t is not None}
    if len(distinct_templates) > 1:
        raise UserError(f"these adapters were trained with different chat templates: {sorted(chat_templates)}", "start one server per chat template")
    chat_template = next(iter(distinct_templates.values()), None)
    return ServedSet(base_ref, base_id, {base_id: ServedModel(base_id, None, None, base_ref), **adapters}, expected, chat_template)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of an adapter folder; a damaged one is the user's to fix, not a traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})", "restore the file, or export the adapter again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object", "restore the file, or export the adapter again")
    return data


# ----------------------------------------------------------------------------------------------
# The app: state on app.state, routes on a module-level router


def check_api_key(api_key: str | None) -> None:
    """An empty key is refused: it would silently turn authentication off."""
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty, which would turn authentication off", "pass a non-empty --api-key (or TUNESMITH_API_KEY), or unset both to serve without a key")


def create_app(settings: ServeSettings, *, loaded: Any = None) -> Any:
    """The FastAPI app. The base model is loaded now (a bad reference fails before binding);
    `loaded` lets a caller pass an already loaded `tunesmith.models.LoadedModel`."""
    from tunesmith.runs import check_base_fingerprint
    from tunesmith.models import load_model

    check_api_key(settings.api_key)
    served = resolve_served(settings.models)
    if loaded is None:
        loaded = load_model(served.base_ref, dtype=inference_dtype(settings.precision), chat_template=served.chat_template)
    warnings = []
    for model_id, fingerprint in served.expected_base_fingerprints.items():
        warning = check_base_fingerprint(fingerprint, loaded.fingerprint, base=served.base_ref, allow_base_mismatch=settings.allow_base_mismatch)
        if warning:
            warnings.append(f"{model_id}: {warning}")
    engine = Engine(loaded.model, loaded.tokenizer, max_adapters=settings.max_adapters, max_batch_size=settings.max_batch_size, prefix_cache=settings.prefix_cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        engine.start()
        app.state.finetuning.runner.start()
        try:
            yield
        finally:
            app.state.finetuning.runner.stop()
            engine.stop()
            app.state.finetuning.store.close()
            app.state.finetuning.lock.close()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.served = served
    app.state.engine = engine
    app.state.tokenizer = loaded.tokenizer
    app.state.base_fingerprint = loaded.fingerprint
    app.state.metrics = Metrics()
    app.state.warnings = warnings
    app.state.started = time.time()
    # The fine-tuning API: its state folder is locked now, so a second server on it fails to start.
    from tunesmith.serve.finetune import default_state_dir, open_finetuning, router as finetune_router

    state_dir = Path(settings.state_dir).expanduser() if settings.state_dir else default_state_dir(served.base_ref)
    app.state.finetuning = open_finetuning(app.state, state_dir)
    app.state.routers = [router, finetune_router]
    for included in app.state.routers:
        app.include_router(included)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_guard)
    return app


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)  # type: ignore[attr-defined]


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) in OpenAI's error shape too."""
    status = getattr(exc, "status_code", 500)
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return JSONResponse(protocol.error_body(str(getattr(exc, "detail", "error")), param=None, code=code), status_code=status)


def _route_label(request: Request) -> str:
    """The route template a request matched, or "unmatched": metric labels never carry the raw
    path, which a client controls (label injection, one new series per distinct path)."""
    routes = [route for included in request.app.state.routers for route in included.routes]
    for route in routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            return route.path
    return "unmatched"


def _key_ok(request: Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _guard(request: Request, call_next: Any) -> Any:
    """Auth, the body-size gate, metrics, and the last line for internal errors (generic 500)."""
    state = request.app.state
    started = time.perf_counter()
    status = 500
    try:
        # Only a bare liveness answer is open: every other path needs the key when one is set.
        request.state.authorized = not state.settings.api_key or _key_ok(request, state.settings.api_key)
        if not request.state.authorized and request.url.path != "/health":
            response = JSONResponse(protocol.error_body("invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"), status_code=401)
        elif _declared_length(request) > _body_limit(request):
            response = JSONResponse(protocol.error_body(f"request body over {_body_limit(request)} bytes", code="body_too_large"), status_code=400)
        else:
            response = await call_next(request)
    except Exception:  # noqa: BLE001 - internals stay in the log, the client gets a generic 500
        log.exception("internal error on %s %s", request.method, _route_label(request))
        response = JSONResponse(protocol.error_body("internal server error", type_="server_error"), status_code=500)
    status = response.status_code
    state.metrics.observe(_route_label(request), status, time.perf_counter() - started)
    return response


def _body_limit(request: Request) -> int:
    """File uploads have their own limit: a training file is larger than any API request."""
    settings = request.app.state.settings
    return settings.max_upload_bytes if request.url.path == "/v1/files" else settings.max_body_bytes


def _declared_length(request: Request) -> int:
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else 0


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness for anyone; the served models and adapters only with the key (or when none is set)."""
    state = request.app.state
    if not request.state.authorized:
        return {"status": "ok"}
    return {"status": "ok", "base": state.served.base_id, "models": sorted(state.served.models), "loaded_adapters": list(state.engine.adapters), "uptime_s": round(time.time() - state.started, 1)}


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.app.state.metrics.render(request.app.state.engine), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = request.app.state
    created = int(state.started)
    data = [{"id": m.id, "object": "model", "created": created, "owned_by": "tunesmith", "parent": None if m.adapter_path is None else state.served.base_id} for m in state.served.models.values()]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    state = request.app.state
    body = await _read_body(request, protocol.ChatCompletionRequest)
    served_model = _model(state, body.model)
    max_tokens = _check_limits(state.settings, body, prompt_count=1)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if served_model.default_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": served_model.default_system})
    # Off the event loop: rendering and tokenising a 1 MB prompt takes seconds of CPU.
    prompt = await asyncio.to_thread(_render_chat, state.tokenizer, messages)
    prefix_tokens = await asyncio.to_thread(system_prefix_tokens, state.tokenizer, messages, prompt)
    grammar = None
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        schema = None
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs a schema", param="response_format")
            schema = fmt.json_schema.schema_
        try:
            grammar = await asyncio.to_thread(state.engine.compile_grammar, schema)
        except UserError as e:
            raise APIError(400, e.message, param="response_format") from None
    return await _generate(request, body, served_model, [prompt], max_tokens, "chat.completion", grammar, prefix_tokens)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    state = request.app.state
    body = await _read_body(request, protocol.CompletionRequest)
    served_model = _model(state, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = _check_limits(state.settings, body, prompt_count=len(prompts))
    ids = await asyncio.to_thread(_tokenize, state.tokenizer, prompts)
    return await _generate(request, body, served_model, ids, max_tokens, "text_completion", None)


def _render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from jinja2.exceptions import TemplateError

    if not getattr(tokenizer, "chat_template", None):  # a base model without one: the client's route is /v1/completions
        raise APIError(400, "this model has no chat template, so it cannot take chat messages; send a prompt to /v1/completions", param="messages", code="no_chat_template")
    try:
        return render_ids(tokenizer, messages)
    except TemplateError as e:  # the template's own raise_exception: a message written for users
        raise APIError(400, f"the model's chat template refused these messages: {e.message}", param="messages") from None


def system_prefix_tokens(tokenizer: Any, messages: list[dict[str, str]], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` are its system messages, as the chat template renders
    them alone (0 when there are none, or when they do not render as a prefix of the prompt):
    the part of the prompt whose KV the engine's prefix cache may share across requests."""
    from jinja2.exceptions import TemplateError

    system = []
    for message in messages:
        if message["role"] != "system":
            break
        system.append(message)
    if not system or len(system) == len(messages):
        return 0
    try:
        ids = render_ids(tokenizer, system, generation_prompt=False)
    except TemplateError:  # a template may refuse a conversation without a user turn
        return 0
    return len(ids) if len(ids) < len(prompt) and prompt[: len(ids)] == ids else 0


def _tokenize(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if not all(ids):
        raise APIError(400, "a prompt tokenizes to nothing", param="prompt")
    return ids


async def _read_body(request: Request, model: type[BaseModel]) -> Any:
    """The body, read up to the size limit (chunked bodies too), validated into `model`."""
    limit = request.app.state.settings.max_body_bytes
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(415, f"Content-Type must be application/json, not {media_type[:60]!r}", code="unsupported_media_type")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(400, f"request body over {limit} bytes", code="body_too_large")
    try:
        return model.model_validate_json(bytes(raw))
    except ValidationError as e:
        message, param = protocol.describe_validation_error(e.errors())
        raise APIError(400, message, param=param) from None


def _model(state: Any, model_id: str) -> ServedModel:
    served_model = state.served.models.get(model_id)
    if served_model is None:
        raise APIError(404, f"The model `{model_id[:100]}` does not exist. Served: {', '.join(sorted(state.served.models))}", param="model", code="model_not_found")
    return served_model


def _check_limits(settings: ServeSettings, body: Any, prompt_count: int) -> int:
    """The request's max_tokens, after every limit that needs no tokenising (400 over any)."""
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_tokens_limit
    if max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens_limit}", param="max_tokens")
    if body.n > settings.max_n:
        raise APIError(400, f"n {body.n} is above this server's limit of {settings.max_n}", param="n")
    if prompt_count * body.n > settings.max_sequences_per_request:
        raise APIError(400, f"{prompt_count} prompts x n {body.n} = {prompt_count * body.n} sequences; this server starts at most {settings.max_sequences_per_request} per request", param="prompt")
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs" if body.logprobs else "top_logprobs")
    return max_tokens


async def _generate(request: Request, body: Any, served_model: ServedModel, prompts: list[list[int]], max_tokens: int, kind: str, grammar: Any, prefix_tokens: int = 0) -> Any:
    state = request.app.state
    max_context = state.engine.max_context
    # A prompt must leave room for at least one new token inside the model's context.
    limit = min(state.settings.max_prompt_tokens or max(1, max_context - max_tokens), max_context - 1)
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise APIError(400, f"prompt is {longest} tokens; this server accepts at most {limit} (with max_tokens {max_tokens})", param="messages" if kind == "chat.completion" else "prompt", code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    sequences = []
    for p_index, prompt in enumerate(prompts):
        for c_index in range(body.n):
            seed = None if body.seed is None else (body.seed + len(sequences)) % 2**64
            params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=seed, grammar=grammar)
            index = p_index * body.n + c_index
            # Each sequence reports on the shared queue tagged with its index.
            tagged = _Tagged(events, index)
            sequences.append(Sequence(served_model, prompt, params, loop, tagged, index=index, prefix_tokens=prefix_tokens))  # type: ignore[arg-type]
    for seq in sequences:
        state.engine.submit(seq)
    request_id = protocol.new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, sequences, events, request_id, kind, body.model, include_usage), media_type="text/event-stream")
    return await _collect(request, state, sequences, events, request_id, kind, body.model)


GENERATION_FAILED = "internal error while generating; the server log has the details"


async def _collect(request: Request, state: Any, sequences: list[Sequence], events: asyncio.Queue, request_id: str, kind: str, model_id: str) -> Any:
    texts = {s.index: "" for s in sequences}
    finish: dict[int, str] = {}
    prompt_tokens = completion_tokens = 0
    counted_prompts = set()
    try:
        while len(finish) < len(sequences):
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(protocol.error_body("client disconnected"), status_code=499)
                continue
            if event[0] == "delta":
                texts[index] += event[1]
            elif event[0] == "done":
                finish[index] = event[1]
                if id(sequences[index].prompt_ids) not in counted_prompts:
                    counted_prompts.add(id(sequences[index].prompt_ids))
                    prompt_tokens += event[2]
                completion_tokens += event[3]
            else:
                raise APIError(500, GENERATION_FAILED if event[1] == "internal error" else event[1], type_="server_error")
    finally:
        for seq in sequences:
            seq.cancelled = True  # frees the slot if the client went away mid-generation
    state.metrics.prompt_tokens += prompt_tokens
    state.metrics.completion_tokens += completion_tokens
    if kind == "chat.completion":
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": finish[i], "logprobs": None} for i in sorted(texts)]
    else:
        choices = [{"index": i, "text": texts[i], "finish_reason": finish[i], "logprobs": None} for i in sorted(texts)]
    return {"id": request_id, "object": kind, "created": protocol.now(), "model": model_id, "choices": choices, "usage": protocol.usage(prompt_tokens, completion_tokens)}


async def _stream(state: Any, sequences: list[Sequence], events: asyncio.Queue, request_id: str, kind: str, model_id: str, include_usage: bool):
    created = protocol.now()
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    done = 0
    prompt_tokens = completion_tokens = 0
    counted_prompts = set()

    def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> str:
        if kind == "chat.completion":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        payload = {"id": request_id, "object": chunk_kind, "created": created, "model": model_id, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if kind == "chat.completion":
            for seq in sequences:
                yield chunk(seq.index, None, None, first=True)
        while done < len(sequences):
            index, event = await events.get()
            if event[0] == "delta":
                yield chunk(index, event[1], None)
            elif event[0] == "done":
                done += 1
                if id(sequences[index].prompt_ids) not in counted_prompts:
                    counted_prompts.add(id(sequences[index].prompt_ids))
                    prompt_tokens += event[2]
                completion_tokens += event[3]
                yield chunk(index, None, event[1])
            else:
                message = GENERATION_FAILED if event[1] == "internal error" else event[1]
                yield f"data: {json.dumps(protocol.error_body(message, 'server_error'))}\n\n"
                done += 1
        state.metrics.prompt_tokens += prompt_tokens
        state.metrics.completion_tokens += completion_tokens
        if include_usage:
            payload = {"id": request_id, "object": chunk_kind, "created": created, "model": model_id, "choices": [], "usage": protocol.usage(prompt_tokens, completion_tokens)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the client disconnects too (the generator is closed): free the slots.
        for seq in sequences:
            seq.cancelled = True


class _Tagged:
    """A view of a shared queue that tags each event with the sequence's choice index."""

    def __init__(self, events: asyncio.Queue, index: int):
        self._events, self._index = events, index

    def put_nowait(self, event: tuple) -> None:
        self._events.put_nowait((self._index, event))


def serve(settings: ServeSettings) -> None:
    """Run the server until interrupted (the `tunesmith serve` command)."""
    import uvicorn

    app = create_app(settings)
    for warning in app.state.warnings:
        print(f"warning: {warning}")
    print(f"fine-tuning API: state folder {app.state.finetuning.folder}")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5)


class ServerThread:
    """uvicorn serving `app` from a background thread on a socket already bound (port 0 works):
    for tests and benchmarks that need a real HTTP server without a fixed port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def run_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> ServerThread:
    return ServerThread(app, host, port).start()
