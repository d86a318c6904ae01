"""The OpenAI wire format: request bodies (validated), responses and the error body.

Only the fields tunesmith honours are typed; unknown fields are accepted and ignored, as
OpenAI-compatible servers do, so clients that send `user` or `logprobs=False` still work.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from typing_extensions import Annotated

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


MAX_STOP_SEQUENCES = 4  # OpenAI's limit; each one is searched in the decoded text at every token
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class ContentPart(_Open):
    """One part of a message's content; only `text` parts are read (images, audio: ignored)."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a content part of type text needs a string `text`")
        return self


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """Content as text: parts of type `text` joined (images and audio are not supported)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class JsonSchemaSpec(_Open):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class SamplingFields(_Open):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None  # accepted only when off: tunesmith returns no logprobs
    top_logprobs: int | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: NonEmptyText | list[NonEmptyText] = Field(..., min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for legacy completions


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|constrained-str|.*[\[\]].*)$")


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for the most specific of pydantic's errors, without union-branch tags.

    Why the longest location: a union field reports one error per branch, and the deepest one
    is the branch the client meant (`content[0].text` rather than "content is not a string")."""
    first = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    path = [str(p) for p in first["loc"] if isinstance(p, int) or not _UNION_TAG.match(str(p))]
    param = ".".join(path) or None
    message = first["msg"].removeprefix("Value error, ")
    return (f"invalid request: {param}: {message}" if param else f"invalid request: {message}"), param


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: the openai client turns it into the matching exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
