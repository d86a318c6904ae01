"""Readers: every supported input format becomes `Conversation`s; the writer emits OpenAI chat JSONL.

Formats (`--format`, or detected from the file):
  openai             {"messages": [{"role", "content", "weight"?, "name"?, "tool_calls"?...}]} per line
  prompt_completion  {"prompt": ..., "completion": ...} per line (OpenAI's legacy format)
  alpaca             {"instruction", "input"?, "output"}; JSONL or one JSON array
  sharegpt           {"conversations": [{"from": "human"|"gpt"|..., "value": ...}]}
  csv / tsv          a header row, then one example per row; columns chosen with input_col/output_col
  parquet            like csv (or, when it has a `messages` / `conversations` column, like those)
  hf_disk            a folder written by `datasets.Dataset.save_to_disk`

Reading is a stream of rows, each parsed into (conversation or None, problems). The data check
consumes the stream to report every problem with its line; `read_conversations` refuses a file
with any problem, because training on half-understood data is worse than not training.
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunesmith.artifacts import atomic_path
from tunesmith.errors import UserError
from tunesmith.schema import ROLES, Conversation, Message

FORMATS = ("auto", "openai", "prompt_completion", "alpaca", "sharegpt", "csv", "tsv", "parquet", "hf_disk")
TABLE_FORMATS = ("csv", "tsv", "parquet", "hf_disk")

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

# Column names tried, in order, when a table does not say which columns to use.
INPUT_COLUMN_GUESSES = ("input", "prompt", "text", "question", "instruction", "query", "utterance", "sms", "message")
OUTPUT_COLUMN_GUESSES = ("output", "completion", "label", "answer", "response", "target", "class", "intent", "category")

# How many lines the format detection looks at before it gives up on JSON lines.
DETECT_LINES = 1000

# One fix per problem kind: the report says what to do, not only what is wrong.
FIXES: dict[str, str] = {
    "invalid_utf8": "save the file as UTF-8 (a BOM is fine); CESU-8 surrogate pairs convert with "
    "raw.decode('utf-8', 'surrogatepass').encode('utf-16', 'surrogatepass').decode('utf-16')",
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
    "non_string_content": "make \"content\" a plain string",
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


@dataclass
class Source:
    """What the reader decided about a file: its format, its container and the columns it uses."""

    path: Path
    format: str
    container: str  # "lines" (JSONL), "array" (one JSON array), "table" (csv/tsv/parquet/hf_disk)
    input_col: str | None = None
    output_col: str | None = None
    columns: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Bytes -> text, line by line: a bad line is a problem with its number, never a crash.


def _utf8_problem(raw: bytes, err: UnicodeDecodeError, line: int) -> Problem:
    bad = raw[err.start : err.start + 3]
    detail = f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
    # CESU-8 / "modified UTF-8": a UTF-16 surrogate half encoded on its own (0xED 0xA0-0xBF ...).
    if len(bad) >= 2 and bad[0] == 0xED and 0xA0 <= bad[1] <= 0xBF:
        detail += ": a UTF-16 surrogate encoded as UTF-8 (CESU-8, e.g. an emoji written by Java or MySQL utf8)"
    return Problem("invalid_utf8", f"not valid UTF-8 ({detail})", line)


def iter_text_lines(path: Path) -> Iterator[tuple[int, str, Problem | None]]:
    """(1-based line, text without the newline, UTF-8 problem or None). A leading BOM is dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield number, raw.decode("utf-8", "replace"), _utf8_problem(raw, e, number)


def _read_text_strict(path: Path) -> str:
    """The whole file as text; invalid UTF-8 is a UserError naming the line."""
    lines = []
    for number, text, problem in iter_text_lines(path):
        if problem is not None:
            raise UserError(f"{path}: line {number}: {problem.message}", FIXES["invalid_utf8"])
        lines.append(text)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Format detection


def _format_from_keys(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    return None


def _is_hf_disk(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    text = head.decode("utf-8", "replace").lstrip()
    return text[:1]


def detect_format(path: Path, columns_given: bool = False) -> tuple[str, str]:
    """(record format, container) of a file or folder; UserError when it cannot tell.

    With `columns_given`, JSON records of any shape are read through the column mapping.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found", "pass the path of a data file")
    if path.is_dir():
        if _is_hf_disk(path):
            return "hf_disk", "table"
        raise UserError(f"{path} is a folder but not a `datasets` save_to_disk folder", "pass a data file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet", "table"
    if suffix == ".csv":
        return "csv", "table"
    if suffix in (".tsv", ".tab"):
        return "tsv", "table"
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise UserError(f"{path} is empty", "add examples, one JSON object per line")
    if b"\x00" in head:
        raise UserError(f"{path} looks like a binary file (it holds NUL bytes)", "pass a JSONL, JSON, CSV, TSV or Parquet file")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head.removeprefix(b"\xef\xbb\xbf"), final=False)
        text_head = True
    except UnicodeDecodeError:
        text_head = False
    first = _first_char(path)
    if first == "[":
        return "array", "array"  # the record format is read from the first element
    json_suffix = suffix in (".jsonl", ".json", ".ndjson")
    for number, text, problem in iter_text_lines(path):
        if number > DETECT_LINES:
            break
        if problem is not None or not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if isinstance(record, dict):
            fmt = _format_from_keys(record)
            if fmt is None and columns_given:
                return "columns", "lines"
            if fmt is None:
                raise UserError(
                    f"{path}: line {number} has keys {sorted(record)[:8]}, which match no known format",
                    "use messages (openai), prompt/completion, instruction/output (alpaca) or conversations "
                    "(sharegpt); or pass --input-col and --output-col",
                )
            return fmt, "lines"
    if first == "{":
        # Not one object per line: maybe one JSON document spread over lines.
        text = _read_text_strict(path)
        try:
            document = json.loads(text)
        except ValueError as e:
            if json_suffix:
                return "openai", "lines"  # let the per-line report show what is wrong
            raise UserError(f"{path}: not valid JSON ({e})", FIXES["invalid_json"]) from None
        keys = sorted(document)[:8] if isinstance(document, dict) else []
        raise UserError(
            f"{path} is a single JSON object (keys {keys}), not one example per line",
            "convert it to JSONL with one {\"messages\": [...]} object per line, or to a JSON array of examples",
        )
    if json_suffix:
        return "openai", "lines"  # nothing parses: the per-line report says why
    if not text_head:
        bad = next(n for n, _, problem in iter_text_lines(path) if problem is not None)
        raise UserError(
            f"{path} is not UTF-8 text (line {bad}) and not a known binary format",
            "pass a UTF-8 JSONL, JSON, CSV or TSV file, or a Parquet file named *.parquet",
        )
    first_line = next((t for _, t, _ in iter_text_lines(path) if t.strip()), "")
    if "\t" in first_line:
        return "tsv", "table"
    if "," in first_line:
        return "csv", "table"
    raise UserError(
        f"cannot tell the format of {path}", f"pass --format (one of {', '.join(FORMATS[1:])})"
    )


# --------------------------------------------------------------------------------------------
# Record -> Conversation, per format. Each returns (conversation or None, problems).


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


def _with_system(conv: Conversation, system_prompt: str | None) -> Conversation:
    if system_prompt and not any(m.role == "system" for m in conv.messages):
        conv.messages.insert(0, Message(role="system", content=system_prompt))
    return conv


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
        elif not isinstance(m["content"], str):
            kind = type(m["content"]).__name__
            problems.append(Problem("non_string_content", f"message {i} ({role}) has {kind} content, not a string", line))
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


# --------------------------------------------------------------------------------------------
# Containers: JSON lines, one JSON array, tables.


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any, Problem | None]]:
    """Elements of a top-level JSON array with the line each starts on."""
    text = _read_text_strict(path)
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    pos, n = start, len(text)

    def line_of(index: int) -> int:
        return text.count("\n", 0, index) + 1

    # Count newlines incrementally: `line_of` over the whole prefix each time would be quadratic.
    counted_to, line = 0, 1
    expect_value = True
    while pos < n:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            break
        if text[pos] == "]":
            return
        if not expect_value:
            if text[pos] != ",":
                line += text.count("\n", counted_to, pos)
                yield line, None, Problem("invalid_json", "expected ',' or ']' between array elements", line)
                return
            pos += 1
            expect_value = True
            continue
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError as e:
            yield line_of(getattr(e, "pos", pos)), None, Problem(
                "invalid_json", f"invalid JSON ({getattr(e, 'msg', e)})", line_of(getattr(e, "pos", pos))
            )
            return
        yield line, value, None
        pos = end
        expect_value = False
    yield line_of(n), None, Problem("invalid_json", "the JSON array is not closed with ']'", line_of(n))


def _iter_json_lines(path: Path) -> Iterator[tuple[int, Any, Problem | None]]:
    for number, text, problem in iter_text_lines(path):
        if problem is not None:
            yield number, None, problem
            continue
        if not text.strip():
            continue
        try:
            yield number, json.loads(text), None
        except RecursionError:
            yield number, None, Problem("invalid_json", "invalid JSON (nested too deeply)", number)
        except ValueError as e:
            msg = getattr(e, "msg", str(e))
            col = getattr(e, "colno", None)
            where = f" at column {col}" if col else ""
            yield number, None, Problem("invalid_json", f"invalid JSON ({msg}{where})", number)


def _iter_delimited(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[int, dict | None, Problem | None]]]:
    """Header and rows of a CSV/TSV; each row with the line it starts on."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    utf8_problems: dict[int, Problem] = {}

    def text_lines() -> Iterator[str]:
        for number, text, problem in iter_text_lines(path):
            if problem is not None:
                utf8_problems[number] = problem
            yield text + "\n"

    # TSV is not quoted (a lone '"' in a text is a character); CSV follows RFC 4180 quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text_lines(), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path} is empty", "add a header row and examples") from None
    except csv.Error as e:
        raise UserError(f"{path}: line 1: cannot read the header ({e})", "fix the header row") from None
    header = [h.strip() for h in header]

    def rows() -> Iterator[tuple[int, dict | None, Problem | None]]:
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, None, Problem("bad_row", f"unreadable row ({e})", start)
                start = reader.line_num + 1
                continue
            line = start
            start = reader.line_num + 1
            bad_bytes = next((utf8_problems.pop(n) for n in range(line, start) if n in utf8_problems), None)
            if bad_bytes is not None:
                yield line, None, bad_bytes
                continue
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                yield line, None, Problem("bad_row", f"the row has {len(fields)} fields, the header {len(header)}", line)
                continue
            yield line, dict(zip(header, fields)), None

    return header, rows()


def _iter_parquet(path: Path) -> tuple[list[str], Iterator[tuple[int, dict | None, Problem | None]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow", "pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({e})", "pass a valid Parquet file") from None
    columns = list(parquet.schema_arrow.names)

    def rows() -> Iterator[tuple[int, dict | None, Problem | None]]:
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None

    return columns, rows()


def _iter_hf_disk(path: Path) -> tuple[list[str], Iterator[tuple[int, dict | None, Problem | None]]]:
    try:
        import datasets
    except ImportError:
        raise UserError("reading a save_to_disk folder needs the datasets library", "pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a bad folder
        raise UserError(f"{path}: not a readable datasets folder ({e})", "pass a folder written by save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(
                f"{path} holds splits {sorted(loaded)} but no 'train'", "save the split you want with save_to_disk"
            )
        loaded = loaded["train"]
    columns = list(loaded.column_names)

    def rows() -> Iterator[tuple[int, dict | None, Problem | None]]:
        for number, row in enumerate(loaded, 1):
            yield number, row, None

    return columns, rows()


def _guess_column(columns: list[str], guesses: tuple[str, ...], exclude: str | None) -> str | None:
    lowered = {c.lower(): c for c in columns if c != exclude}
    for guess in guesses:
        if guess in lowered:
            return lowered[guess]
    return None


def _choose_columns(
    path: Path, columns: list[str], input_col: str | None, output_col: str | None
) -> tuple[str, str]:
    for name, col in (("--input-col", input_col), ("--output-col", output_col)):
        if col is not None and col not in columns:
            raise UserError(f"{path} has no column {col!r} (columns: {', '.join(columns)})", f"pass {name} with one of them")
    input_col = input_col or _guess_column(columns, INPUT_COLUMN_GUESSES, output_col)
    output_col = output_col or _guess_column(columns, OUTPUT_COLUMN_GUESSES, input_col)
    if input_col is None or output_col is None:
        raise UserError(
            f"cannot tell which columns of {path} hold the input and the answer (columns: {', '.join(columns)})",
            "pass --input-col and --output-col",
        )
    return input_col, output_col


# --------------------------------------------------------------------------------------------
# The public API


def open_source(
    path: str | Path,
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
) -> tuple[Source, Iterator[ParsedRow]]:
    """Detect the format of `path` and return it with a lazy stream of parsed rows.

    Memory is bounded by one row for JSONL and CSV/TSV (and by one batch for Parquet): the data
    check streams millions of rows through this.
    """
    path = Path(path)
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}", f"use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise UserError(f"{path} not found", "pass the path of a data file")
    if format == "auto":
        format, container = detect_format(path, columns_given=bool(input_col and output_col))
    elif format in TABLE_FORMATS:
        container = "table"
    elif path.is_dir():
        raise UserError(f"{path} is a folder", "pass a file, or --format hf_disk for a save_to_disk folder")
    else:
        container = "array" if _first_char(path) == "[" else "lines"

    if container == "table":
        if format == "parquet":
            columns, raw_rows = _iter_parquet(path)
        elif format == "hf_disk":
            columns, raw_rows = _iter_hf_disk(path)
        else:
            columns, raw_rows = _iter_delimited(path, "\t" if format == "tsv" else ",")
        # A table of chat records (a `messages` column...) is read like JSON lines.
        record_format = None if (input_col or output_col) else _format_from_keys(columns)
        if record_format is None:
            input_col, output_col = _choose_columns(path, columns, input_col, output_col)
        source = Source(path, format, container, input_col, output_col, columns)
        return source, _parse_rows(raw_rows, record_format, input_col, output_col, system_prompt, from_table=True)

    raw_rows = _iter_json_array(path) if container == "array" else _iter_json_lines(path)
    if format == "array":
        # Peek the first object of the array for its keys, then parse every element in that format.
        first = next((value for _, value, p in _iter_json_array(path) if p is None and isinstance(value, dict)), None)
        format = _format_from_keys(first or {}) or ("columns" if (input_col and output_col) else "")
        if not format:
            keys = sorted(first)[:8] if isinstance(first, dict) else []
            raise UserError(
                f"{path}: the array's objects have keys {keys}, which match no known format",
                "use instruction/output (alpaca), messages, conversations or prompt/completion; "
                "or pass --input-col and --output-col",
            )
    if input_col and output_col and format not in PARSERS:
        format = "columns"
    source = Source(path, format, container, input_col, output_col)
    record_format = None if format == "columns" else format
    return source, _parse_rows(raw_rows, record_format, input_col, output_col, system_prompt)


def _parse_rows(
    raw_rows: Iterator[tuple[int, Any, Problem | None]],
    record_format: str | None,
    input_col: str | None,
    output_col: str | None,
    system_prompt: str | None,
    from_table: bool = False,
) -> Iterator[ParsedRow]:
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


def read_conversations(
    path: str | Path,
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
) -> list[Conversation]:
    """Every example of a data file as a `Conversation`; UserError listing the bad rows if any.

    Warnings (an empty user turn) do not stop reading; `tunesmith data check` lists those.
    """
    _, rows = open_source(path, format, input_col, output_col, system_prompt)
    conversations: list[Conversation] = []
    errors: list[Problem] = []
    for row in rows:
        row_errors = [p for p in row.problems if p.severity == "error"]
        if row_errors:
            errors.extend(row_errors)
        elif row.conversation is not None:
            conversations.append(row.conversation)
    if errors:
        shown = "; ".join(f"line {p.line}: {p.message}" for p in errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise UserError(
            f"{path}: {len(errors)} problem(s) in the data: {shown}{more}",
            f"{errors[0].fix}; `tunesmith data check {path}` lists every problem with its fix",
        )
    if not conversations:
        raise UserError(f"{path} holds no examples", "add examples, one per line")
    return conversations


def conversation_line(conv: Conversation) -> str:
    return json.dumps(conv.to_openai(), ensure_ascii=False)


def write_conversations(path: str | Path, conversations: Iterable[Conversation]) -> int:
    """Write canonical OpenAI chat JSONL atomically; returns the number of lines written."""
    count = 0
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for conv in conversations:
                f.write(conversation_line(conv) + "\n")
                count += 1
    return count


def convert(
    src: str | Path,
    dst: str | Path,
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
) -> int:
    """`tunesmith data convert`: any supported format -> canonical chat JSONL. Returns the count."""
    conversations = read_conversations(src, format, input_col, output_col, system_prompt)
    return write_conversations(dst, conversations)


# --------------------------------------------------------------------------------------------
# Labels and the train/eval split

# Answers form a "closed small set" (a classification task) when there are at most this many
# distinct ones and each appears three times on average.
LABEL_MAX_DISTINCT = 50


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to group equal inputs."""
    return " ".join(text.casefold().split())


def is_closed_label_set(distinct: int, examples: int) -> bool:
    return 2 <= distinct <= LABEL_MAX_DISTINCT and distinct * 3 <= examples


def label_counts(conversations: list[Conversation]) -> dict[str, int] | None:
    """Counts per answer when the answers form a closed small set (classification), else None."""
    counts: dict[str, int] = {}
    for conv in conversations:
        label = (conv.target or "").strip()
        counts[label] = counts.get(label, 0) + 1
        if len(counts) > LABEL_MAX_DISTINCT:
            return None
    return counts if is_closed_label_set(len(counts), len(conversations)) else None


def split_conversations(
    conversations: list[Conversation], eval_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic (train, eval) split: no input on both sides, stratified by label.

    Examples are grouped by their normalized input, and whole groups move to eval: the same
    question on both sides would measure memory, not skill. For a classification set each
    label gives its share of groups (its last group always stays in training). Both sides
    keep the original order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval fraction {eval_fraction} is outside [0, 1)", "use 0.1 to 0.2")
    import random

    groups: dict[str, list[int]] = {}
    for i, conv in enumerate(conversations):
        key = normalize_text(conv.input_text) or normalize_text(json.dumps(conv.to_openai(), ensure_ascii=False))
        groups.setdefault(key, []).append(i)
    labels = label_counts(conversations)
    strata: dict[str, list[str]] = {}
    for key, members in groups.items():
        label = (conversations[members[0]].target or "").strip() if labels else ""
        strata.setdefault(label, []).append(key)

    rng = random.Random(seed)
    eval_indices: set[int] = set()
    for label in sorted(strata):
        keys = strata[label]
        rng.shuffle(keys)
        size = sum(len(groups[k]) for k in keys)
        wanted = round(eval_fraction * size)
        taken = 0
        for key in keys[:-1]:  # the last group stays in training: every label keeps examples there
            if taken >= wanted:
                break
            eval_indices.update(groups[key])
            taken += len(groups[key])
    train = [c for i, c in enumerate(conversations) if i not in eval_indices]
    held_out = [c for i, c in enumerate(conversations) if i in eval_indices]
    return train, held_out


def split_file(
    path: str | Path,
    out_dir: str | Path,
    eval_fraction: float = 0.15,
    seed: int = 0,
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
) -> tuple[Path, Path, int, int]:
    """`tunesmith data split`: write OUT/train.jsonl and OUT/eval.jsonl; returns paths and counts."""
    from tunesmith.artifacts import EVAL_SPLIT_FILE, TRAIN_SPLIT_FILE

    conversations = read_conversations(path, format, input_col, output_col, system_prompt)
    train, held_out = split_conversations(conversations, eval_fraction, seed)
    out_dir = Path(out_dir)
    train_path = out_dir / Path(TRAIN_SPLIT_FILE).name
    eval_path = out_dir / Path(EVAL_SPLIT_FILE).name
    write_conversations(train_path, train)
    write_conversations(eval_path, held_out)
    return train_path, eval_path, len(train), len(held_out)
