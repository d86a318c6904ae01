"""The one record every stage passes on: a `Conversation` of `Message`s.

Readers turn every input format into this; formatting turns it into (input_ids, labels).
It mirrors OpenAI's chat fine-tuning format, so writing it back out is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def content_text(content: Any) -> str:
    """A message's content as text: a string as is, OpenAI text parts joined as they are written
    (no separator, as chat templates render a list of text parts); None is empty."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content


@dataclass
class Message:
    """One turn. `weight` only matters on assistant turns: 0 means "context, do not train"."""

    role: str
    content: str
    weight: int = 1
    name: str | None = None
    # Tool calls and other OpenAI fields we carry through untouched (tool_calls, tool_call_id).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.role == "assistant" and self.weight != 1:
            out["weight"] = self.weight
        out.update(self.extra)
        return out


@dataclass
class Conversation:
    """A training example. `source_line` is the 1-based line (or row) it came from, for messages."""

    messages: list[Message]
    source_line: int | None = None
    # Top-level OpenAI fields carried through untouched (tools, parallel_tool_calls).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[Message]:
        """Every message before the last assistant turn: what the model is given."""
        last = self.last_assistant_index()
        return self.messages if last is None else self.messages[:last]

    @property
    def target(self) -> str | None:
        """The content of the last assistant turn: what the model must answer."""
        last = self.last_assistant_index()
        return None if last is None else self.messages[last].content

    @property
    def input_text(self) -> str:
        """The user-visible input, joined, for duplicate and leakage checks."""
        return "\n".join(m.content for m in self.prompt_messages if m.role != "system")

    def last_assistant_index(self) -> int | None:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "assistant":
                return i
        return None

    def to_openai(self) -> dict[str, Any]:
        return {"messages": [m.to_openai() for m in self.messages], **self.extra}

    @classmethod
    def from_openai(cls, record: dict[str, Any], source_line: int | None = None) -> "Conversation":
        """Build from an already validated OpenAI chat record."""
        messages = []
        for raw in record["messages"]:
            extra = {k: v for k, v in raw.items() if k not in ("role", "content", "weight", "name")}
            messages.append(
                Message(
                    role=raw["role"],
                    content=content_text(raw.get("content")),
                    weight=int(raw.get("weight", 1)),
                    name=raw.get("name"),
                    extra=extra,
                )
            )
        return cls(messages=messages, source_line=source_line)
