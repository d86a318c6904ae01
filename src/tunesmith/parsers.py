"""Per-format parsers: one raw record (a JSON object, a table row) -> a `Conversation` and its problems.

Each `parse_*` validates one record of its format field by field and returns (conversation or
None, problems); `conversation_problems` adds what is wrong with a well-formed conversation
(turn order, empty answers, nothing to train); `parse_rows` runs them over a stream of raw rows.
`Problem` and `FIXES` are the problem codes every reader reports, each with its fix.

Separate from `data.py`, which finds the records (format detection, JSON lines, arrays, CSV,
Parquet, save_to_disk folders) and holds the public reading API: this module never opens a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from tunesmith.schema import ROLES, Conversation, Message

# OpenAI's chat fine-tuning format: every key it accepts, at the top and in a message.
OPENAI_TOP_KEYS = ("messages", "tools", "functions", "parallel_tool_calls")
OPENAI_MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call")

# ShareGPT speaker names seen in the wild -> our roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}

# One fix per problem kind: the report says what to do, not only what is wrong.
FIXES: dict[str, str] = {
    "invalid_utf8": "save the file as UTF-8 (a BOM is fine); CESU-8 surrogate pairs convert with "
    "raw.decode('utf-8', 'surrogatepass').encode('utf-16', 'surrogatepass').decode('utf-16')",
    "nul_byte": "remove the NUL bytes: they are not text (left by a crash, or a binary paste); a UTF-16 file must be re-saved as UTF-8",
    "duplicate_key": "keep the key once: JSON readers silently keep only its last value",
    "lone_surrogate": "write the character itself, or both halves of its \\ud83d\\ude00-style escape pair",
    "unsupported_content_part": "keep only {\"type\": \"text\", \"text\": ...} parts: tunesmith trains text models "
    "(describe the image or audio in text, or drop the example)",
    "bad_content_part": "write each content part as {\"type\": \"text\", \"text\": \"...\"}",
    "invalid_json": "make the line one complete JSON object (one example per line, no trailing commas)",
    "not_object": "each line must be a JSON object such as {\"messages\": [...]}",
    "missing_messages": "add a \"messages\" list of {\"role\", \"content\"} turns",
    "messages_not_list": "\"messages\" must be a list of {\"role\", \"content\"} objects",
    "empty_messages": "add at least a user turn and an assistant turn",
    "unknown_key": "remove the key or fix its spelling (OpenAI's format allows messages, tools; "
    "a message allows role, content, name, weight, tool_calls, tool_call_id)",
    "message_not_object": "each message must be an object {\"role\": ..., \"content\": ...}",
    "missing_role": "add \"role\": one of system, user, assistant, tool",
    "unknown_role": "use one of the roles system, user, assistant, tool",
    "missing_content": "add a \"content\" string to the message",
    "non_string_content": "make \"content\" a string, or a list of {\"type\": \"text\", \"text\": ...} parts",
    "bad_tool_calls": "make \"tool_calls\" a list of {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
    "bad_name": "\"name\" must be a string",
    "bad_weight": "set \"weight\" to 0 (do not train on this turn) or 1 (train on it)",
    "weight_not_assistant": "remove \"weight\": only assistant turns can have one",
    "no_assistant": "add an assistant turn: the answer the model should learn",
    "no_trained_assistant": "set \"weight\": 1 on at least one assistant turn (weight 0 trains nothing)",
    "system_not_first": "move the system turn to the start of the conversation (or merge it there)",
    "assistant_before_user": "start the conversation (after any system turn) with a user turn",
    "consecutive_user": "merge the consecutive user turns into one, or add the assistant answer between them",
    "consecutive_assistant": "merge the consecutive assistant turns into one, or add the user turn between them",
    "tool_without_call": "a tool turn must follow an assistant turn with tool_calls",
    "empty_assistant": "write the answer, or set \"weight\": 0 on this turn if it must not be trained",
    "empty_user": "write the user's message, or remove the empty turn",
    "missing_field": "add the field, or choose the right --format",
    "bad_field": "make the field a string",
    "bad_row": "make every row have as many fields as the header (quote fields holding the delimiter)",
    "empty_input": "fill the input cell, or drop the row",
    "empty_output": "fill the output cell, or drop the row",
}


@dataclass
class Problem:
    """One thing wrong with one row: its code (the key of FIXES), a message and the 1-based line."""

    code: str
    message: str
    line: int | None = None
    severity: str = "error"

    @property
    def fix(self) -> str:
        return FIXES.get(self.code, "")


@dataclass
class ParsedRow:
    line: int
    conversation: Conversation | None
    problems: list[Problem] = field(default_factory=list)


def conversation_problems(conv: Conversation, line: int | None) -> list[Problem]:
    """Problems of a well-formed conversation: turn order, empty answers, nothing to train."""
    problems = []
    messages = conv.messages
    roles = [m.role for m in messages]
    if "assistant" not in roles:
        problems.append(Problem("no_assistant", "no assistant turn", line))
    elif not any(m.weight == 1 for m in messages if m.role == "assistant"):
        problems.append(Problem("no_trained_assistant", "every assistant turn has weight 0", line))
    seen_user = False
    previous = None
    for i, m in enumerate(messages, 1):
        if m.role == "system" and i > 1:
            problems.append(Problem("system_not_first", f"message {i} is a system turn after the first turn", line))
        elif m.role == "user":
            if previous is not None and previous.role == "user":
                problems.append(Problem("consecutive_user", f"messages {i - 1} and {i} are both user turns", line))
            if not m.content.strip():
                problems.append(Problem("empty_user", f"message {i} is an empty user turn", line, "warning"))
            seen_user = True
        elif m.role == "assistant":
            if not seen_user:
                problems.append(Problem("assistant_before_user", f"message {i} is an assistant turn before any user turn", line))
            elif previous is not None and previous.role == "assistant" and "tool_calls" not in previous.extra:
                problems.append(
                    Problem("consecutive_assistant", f"messages {i - 1} and {i} are both assistant turns", line)
                )
            calls = m.extra.get("tool_calls") or m.extra.get("function_call")
            if m.weight == 1 and not m.content.strip() and not calls:
                problems.append(Problem("empty_assistant", f"message {i} is an empty assistant turn with weight 1", line))
        elif m.role == "tool":
            if previous is None or previous.role not in ("assistant", "tool") or (
                previous.role == "assistant" and not previous.extra.get("tool_calls")
            ):
                problems.append(Problem("tool_without_call", f"message {i} is a tool turn without a tool call before it", line))
        previous = m
    return problems


def plain_exchange_problems(conv: Conversation, line: int | None) -> list[Problem]:
    """`conversation_problems`, answered at once for the commonest example: an optional system
    turn, a user turn and a trained assistant turn, neither empty (none of the problems)."""
    messages = conv.messages
    first = 1 if len(messages) == 3 and messages[0].role == "system" else 0
    if len(messages) - first == 2:
        user, answer = messages[first], messages[first + 1]
        if (
            user.role == "user" and answer.role == "assistant" and answer.weight == 1 and not answer.extra
            and user.content.strip() and answer.content.strip()
        ):
            return []
    return conversation_problems(conv, line)


def _with_system(conv: Conversation, system_prompt: str | None) -> Conversation:
    if system_prompt and not any(m.role == "system" for m in conv.messages):
        conv.messages.insert(0, Message(role="system", content=system_prompt))
    return conv


def content_part_problems(parts: list, i: int, role: Any, line: int) -> list[Problem]:
    """OpenAI content parts: text parts are read (joined, see `schema.content_text`); any
    other part (image_url, input_audio, file, refusal) is named, since a text model cannot train on it."""
    if not parts:
        return [Problem("missing_content", f"message {i} ({role}) has an empty list of content parts", line)]
    problems = []
    for j, part in enumerate(parts, 1):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict) or not isinstance(kind, str):
            problems.append(Problem("bad_content_part", f"message {i} ({role}) content part {j} is not a {{\"type\": ...}} object", line))
        elif kind != "text":
            problems.append(Problem("unsupported_content_part", f"message {i} ({role}) content part {j} has type {kind!r}: only text parts can be trained", line))
        elif not isinstance(part.get("text"), str):
            problems.append(Problem("bad_content_part", f"message {i} ({role}) content part {j} is a text part without a \"text\" string", line))
    return problems


def parse_openai(record: Any, line: int) -> tuple[Conversation | None, list[Problem]]:
    """Validate one OpenAI chat record field by field (every check of OpenAI's notebook)."""
    if not isinstance(record, dict):
        return None, [Problem("not_object", f"the line is a JSON {type(record).__name__}, not an object", line)]
    problems = []
    for key in record:
        if key not in OPENAI_TOP_KEYS:
            problems.append(Problem("unknown_key", f"unknown key {key!r}", line))
    if "messages" not in record:
        problems.append(Problem("missing_messages", "no \"messages\" key", line))
        return None, problems
    messages = record["messages"]
    if not isinstance(messages, list):
        problems.append(Problem("messages_not_list", f"\"messages\" is a {type(messages).__name__}, not a list", line))
        return None, problems
    if not messages:
        problems.append(Problem("empty_messages", "\"messages\" is empty", line))
        return None, problems
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            problems.append(Problem("message_not_object", f"message {i} is a {type(m).__name__}, not an object", line))
            continue
        for key in m:
            if key not in OPENAI_MESSAGE_KEYS:
                problems.append(Problem("unknown_key", f"message {i} has unknown key {key!r}", line))
        role = m.get("role")
        if role is None:
            problems.append(Problem("missing_role", f"message {i} has no role", line))
        elif role not in ROLES:
            problems.append(Problem("unknown_role", f"message {i} has unknown role {role!r}", line))
        has_call = bool(m.get("tool_calls") or m.get("function_call"))
        if "content" not in m or m["content"] is None:
            if not (role == "assistant" and has_call):
                problems.append(Problem("missing_content", f"message {i} ({role}) has no content", line))
        elif isinstance(m["content"], list):
            problems.extend(content_part_problems(m["content"], i, role, line))
        elif not isinstance(m["content"], str):
            kind = type(m["content"]).__name__
            problems.append(Problem("non_string_content", f"message {i} ({role}) has {kind} content, not a string", line))
        if "tool_calls" in m and m["tool_calls"] is not None and not isinstance(m["tool_calls"], list):
            problems.append(Problem("bad_tool_calls", f"message {i} has tool_calls that are not a list", line))
        if "name" in m and not isinstance(m["name"], str):
            problems.append(Problem("bad_name", f"message {i} has a non-string name", line))
        if "weight" in m:
            weight = m["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                problems.append(Problem("bad_weight", f"message {i} has weight {weight!r}, not 0 or 1", line))
            elif role != "assistant":
                problems.append(Problem("weight_not_assistant", f"message {i} ({role}) has a weight", line))
    if problems:
        return None, problems
    conv = Conversation.from_openai(record, source_line=line)
    extra = {k: v for k, v in record.items() if k != "messages"}
    if extra:
        conv.extra.update(extra)
    return conv, conversation_problems(conv, line)


_ROLE_SET = frozenset(ROLES)


def parse_openai_plain(record: Any, line: int, shared: dict[str | None, str] | None = None) -> tuple[Conversation, int] | None:
    """`parse_openai`'s conversation of a plain record, and how many keys the record holds;
    None for any other record.

    Plain: only "messages", each message only a known role and string content (and a 0/1 weight
    on an assistant turn). Such a record has no problem `parse_openai` could find, so the many
    rows of a large file skip its field-by-field walk; every other record takes that walk.
    `shared` maps each system prompt to one string object, so a prompt repeated on every row is
    stored once and hashed once (a str caches its hash) by every lookup downstream. Its key None
    holds the last one: the next row's prompt, mostly the same, is compared with it (equal
    strings compare at memory speed) instead of hashed (every character read).
    """
    if type(record) is not dict or len(record) != 1:
        return None
    messages = record.get("messages")
    if type(messages) is not list or not messages:
        return None
    out = []
    keys = 1
    for m in messages:
        if type(m) is not dict:
            return None
        n = len(m)
        try:
            role, content = m["role"], m["content"]
        except KeyError:
            return None
        if type(content) is not str or type(role) is not str or role not in _ROLE_SET:
            return None
        if role == "system" and shared is not None:
            previous = shared.get(None)
            if content != previous:
                if len(shared) >= 1000:
                    shared.clear()
                previous = shared[None] = shared.setdefault(content, content)
            content = previous
        if n == 2:
            out.append(Message(role, content))
        elif n == 3 and role == "assistant" and type(m.get("weight")) is int and m["weight"] in (0, 1):
            out.append(Message(role, content, m["weight"]))
        else:
            return None
        keys += n
    return Conversation(out, source_line=line), keys


def _string_field(record: dict, key: str, line: int, required: bool, problems: list[Problem]) -> str:
    value = record.get(key)
    if value is None:
        if required:
            problems.append(Problem("missing_field", f"no {key!r} field", line))
        return ""
    if not isinstance(value, str):
        problems.append(Problem("bad_field", f"{key!r} is a {type(value).__name__}, not a string", line))
        return ""
    return value


def parse_prompt_completion(record: Any, line: int) -> tuple[Conversation | None, list[Problem]]:
    if not isinstance(record, dict):
        return None, [Problem("not_object", f"the line is a JSON {type(record).__name__}, not an object", line)]
    problems: list[Problem] = []
    prompt = _string_field(record, "prompt", line, True, problems)
    completion = _string_field(record, "completion", line, True, problems)
    if problems:
        return None, problems
    conv = Conversation([Message("user", prompt), Message("assistant", completion)], source_line=line)
    return conv, conversation_problems(conv, line)


def parse_alpaca(record: Any, line: int) -> tuple[Conversation | None, list[Problem]]:
    if not isinstance(record, dict):
        return None, [Problem("not_object", f"the record is a JSON {type(record).__name__}, not an object", line)]
    problems: list[Problem] = []
    instruction = _string_field(record, "instruction", line, True, problems)
    extra_input = _string_field(record, "input", line, False, problems)
    output = _string_field(record, "output", line, True, problems)
    system = _string_field(record, "system", line, False, problems)
    if problems:
        return None, problems
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = ([Message("system", system)] if system else []) + [Message("user", user), Message("assistant", output)]
    conv = Conversation(messages, source_line=line)
    return conv, conversation_problems(conv, line)


def parse_sharegpt(record: Any, line: int) -> tuple[Conversation | None, list[Problem]]:
    if not isinstance(record, dict):
        return None, [Problem("not_object", f"the record is a JSON {type(record).__name__}, not an object", line)]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        what = "no" if turns is None else "an empty or non-list"
        return None, [Problem("missing_messages", f"{what} \"conversations\" list", line)]
    problems: list[Problem] = []
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system:
        messages.append(Message("system", system))
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            problems.append(Problem("message_not_object", f"turn {i} is a {type(turn).__name__}, not an object", line))
            continue
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            problems.append(Problem("unknown_role", f"turn {i} has unknown speaker {speaker!r}", line))
        if value is None:
            problems.append(Problem("missing_content", f"turn {i} has no value", line))
        elif not isinstance(value, str):
            problems.append(Problem("non_string_content", f"turn {i} has {type(value).__name__} value, not a string", line))
        if role is not None and isinstance(value, str):
            messages.append(Message(role, value))
    if problems:
        return None, problems
    conv = Conversation(messages, source_line=line)
    return conv, conversation_problems(conv, line)


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from a table
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def parse_columns(row: dict, line: int, input_col: str, output_col: str) -> tuple[Conversation | None, list[Problem]]:
    """A table row (or a JSON record) mapped by column names to one user turn and one answer."""
    problems = []
    for col in (input_col, output_col):
        if col not in row:
            problems.append(Problem("missing_field", f"no {col!r} column", line))
    if problems:
        return None, problems
    user, answer = _cell_text(row[input_col]), _cell_text(row[output_col])
    if not user.strip():
        problems.append(Problem("empty_input", f"the {input_col!r} cell is empty", line))
    if not answer.strip():
        problems.append(Problem("empty_output", f"the {output_col!r} cell is empty", line))
    if problems:
        return None, problems
    return Conversation([Message("user", user), Message("assistant", answer)], source_line=line), []


PARSERS = {
    "openai": parse_openai,
    "prompt_completion": parse_prompt_completion,
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
}


def _strip_nones(value: Any) -> Any:
    """Tables give every struct field to every row (None when absent): drop those before checking."""
    if isinstance(value, dict):
        return {k: _strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nones(v) for v in value]
    return value


def parse_rows(
    raw_rows: Iterator[tuple[int, Any, Problem | None]],
    record_format: str | None,
    input_col: str | None,
    output_col: str | None,
    system_prompt: str | None,
    from_table: bool = False,
) -> Iterator[ParsedRow]:
    """Raw (line, value, problem) rows -> ParsedRows: each value parsed as `record_format` (None: by
    `input_col` / `output_col`), the system prompt added to a conversation that has none."""
    for line, value, problem in raw_rows:
        if problem is not None:
            yield ParsedRow(line, None, [problem])
            continue
        if record_format is None:
            if not isinstance(value, dict):
                yield ParsedRow(line, None, [Problem("not_object", "the record is not an object", line)])
                continue
            conv, problems = parse_columns(value, line, input_col or "", output_col or "")
        else:
            if from_table and isinstance(value, dict):
                value = _strip_nones(value)
            conv, problems = PARSERS[record_format](value, line)
        if conv is not None:
            conv = _with_system(conv, system_prompt)
        yield ParsedRow(line, conv, problems)
