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

This module finds the records (format detection, containers, columns); `parsers.py` turns each
one into a `Conversation` and lists its problems. Plain OpenAI chat lines (the bulk of a large
file) are read with orjson; any other line takes the exact reader, which names its problem.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson

from tunesmith.artifacts import atomic_output, atomic_path, guard_output
from tunesmith.errors import UserError
from tunesmith.humanize import plural
from tunesmith.parsers import (
    FIXES,
    PARSERS,
    ParsedRow,
    Problem,
    _with_system,
    parse_openai_plain,
    plain_exchange_problems,
    parse_rows,
)
from tunesmith.schema import Conversation

FORMATS = ("auto", "openai", "prompt_completion", "alpaca", "sharegpt", "csv", "tsv", "parquet", "hf_disk")
TABLE_FORMATS = ("csv", "tsv", "parquet", "hf_disk")

# Column names tried, in order, when a table does not say which columns to use.
INPUT_COLUMN_GUESSES = ("input", "prompt", "text", "question", "instruction", "query", "utterance", "sms", "message")
OUTPUT_COLUMN_GUESSES = ("output", "completion", "label", "answer", "response", "target", "class", "intent", "category")

# How many lines the format detection looks at before it gives up on JSON lines.
DETECT_LINES = 1000


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
    """(1-based line, text without the newline, UTF-8 or NUL problem or None). A leading BOM is dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield (number, *_text_line(number, raw.rstrip(b"\r\n")))


def _text_line(number: int, raw: bytes) -> tuple[str, Problem | None]:
    """One line's bytes (newline removed) as text, with its UTF-8 or NUL problem or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", "replace"), _utf8_problem(raw, e, number)
    if "\x00" in text:
        return text, Problem("nul_byte", f"a NUL byte (0x00) at column {raw.index(0) + 1}", number)
    return text, None


# Byte-order marks and magic numbers: a file in another encoding, or compressed, is named as
# what it is, with its fix, instead of a report of a thousand garbage lines.
_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
)
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip FILE)"),
    (b"PK\x03\x04", "a zip archive (or an .xlsx workbook)", "unzip it, or save the sheet as CSV UTF-8"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 FILE)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz FILE)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd FILE)"),
    (b"PAR1", "a Parquet file", "name it *.parquet, or pass --format parquet"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV or JSONL"),
)
REENCODE_FIX = "re-save it as UTF-8 (Excel: Save As > CSV UTF-8; an editor: encoding UTF-8; iconv -f UTF-16 -t UTF-8)"


def _wide_encoding(head: bytes) -> str | None:
    """UTF-16 or UTF-32 without a BOM, told by where the NULs fall: ASCII text in them has a
    NUL beside (or three around) every character."""
    n = len(head) - len(head) % 4
    if n < 8:
        return None
    share = [head[i:n:4].count(0) / (n // 4) for i in range(4)]
    high = [s > 0.7 for s in share]
    low = [s < 0.1 for s in share]
    if high[1] and high[2] and high[3] and low[0]:
        return "UTF-32 (little-endian)"
    if high[0] and high[1] and high[2] and low[3]:
        return "UTF-32 (big-endian)"
    if high[1] and high[3] and low[0] and low[2]:
        return "UTF-16 (little-endian)"
    if high[0] and high[2] and low[1] and low[3]:
        return "UTF-16 (big-endian)"
    return None


def check_text_encoding(path: Path) -> None:
    """UserError when a text data file is not UTF-8 text as a whole: UTF-16/32, compressed, binary.

    A NUL or a bad byte on a line of an otherwise UTF-8 file is not this: that line gets its
    own problem from `iter_text_lines`.
    """
    with open(path, "rb") as f:
        head = f.read(8192)
    encoding = next((name for bom, name in _BOMS if head.startswith(bom)), None) or _wide_encoding(head)
    if encoding:
        raise UserError(f"{path} is {encoding} text, not UTF-8", REENCODE_FIX)
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            raise UserError(f"{path} is {what}, not a text data file", fix)
    text = head.decode("utf-8", "replace")
    junk = sum(1 for ch in text if ch == "\ufffd" or ch == "\x7f" or (ch < " " and ch not in "\t\n\r\f"))
    if junk > 0.1 * max(len(text), 1):
        raise UserError(
            f"{path} looks like a binary file ({junk} of its first {len(text)} characters are not text)",
            "pass a UTF-8 JSONL, JSON, CSV or TSV file, or a Parquet file named *.parquet",
        )


def _read_text_strict(path: Path) -> str:
    """The whole file as text; invalid UTF-8 is a UserError naming the line."""
    lines = []
    for number, text, problem in iter_text_lines(path):
        if problem is not None:
            raise UserError(f"{path}: line {number}: {problem.message}", problem.fix)
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


def _refuse_pretty_printed_records(path: Path, text: str) -> None:
    """UserError when the file is several JSON objects each spread over lines (`json.dump(indent=2)`
    in a loop): one error for the file, not one per line of it."""
    try:
        first, end = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except (ValueError, RecursionError):
        return
    rest = text[end:].lstrip()
    if isinstance(first, dict) and "\n" in text[:end].strip() and rest.startswith("{"):
        last = text.count("\n", 0, end) + 1
        raise UserError(
            f"{path}: the records are JSON objects spread over several lines (the first one runs to line {last}), not one per line",
            "write one object per line, e.g. jq -c . FILE > FILE.jsonl",
        )


# `owner/name` with no file suffix: how a Hugging Face Hub dataset id is written.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")


def looks_like_hub_id(reference: str) -> bool:
    """True for `owner/name` that is no local path: a Hub dataset id someone meant to load."""
    text = str(reference)
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(_DATA_SUFFIXES) and not Path(text).exists()


def hub_id_fix(reference: str) -> str:
    """How to pass a Hub dataset offline: save it to disk once where there is network."""
    return (
        "tunesmith reads local data only, and a Hub id needs the network: where you have it, run "
        f"python -c \"import datasets; datasets.load_dataset('{reference}', split='train').save_to_disk('data/{Path(reference).name}')\" "
        f"and pass data/{Path(reference).name} (a save_to_disk folder), or pass a JSONL/CSV/Parquet file"
    )


def missing_data_error(path: Path | str) -> UserError:
    """The 'not found' of a data path; for a Hub id, says how to bring it here."""
    if looks_like_hub_id(str(path)):
        return UserError(f"{path} not found: it looks like a Hugging Face Hub dataset id, not a local file or folder", hub_id_fix(str(path)))
    return UserError(f"{path} not found", "pass the path of a data file")


def detect_format(path: Path, columns_given: bool = False) -> tuple[str, str]:
    """(record format, container) of a file or folder; UserError when it cannot tell.

    With `columns_given`, JSON records of any shape are read through the column mapping.
    """
    path = Path(path)
    if not path.exists():
        raise missing_data_error(path)
    if path.is_dir():
        if _is_hf_disk(path):
            return "hf_disk", "table"
        raise UserError(f"{path} is a folder but not a `datasets` save_to_disk folder", "pass a data file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet", "table"
    check_text_encoding(path)
    if suffix == ".csv":
        return "csv", "table"
    if suffix in (".tsv", ".tab"):
        return "tsv", "table"
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head.removeprefix(b"\xef\xbb\xbf").strip():
        raise UserError(f"{path} is empty", "add examples, one JSON object per line")
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
        except (ValueError, RecursionError):
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
        _refuse_pretty_printed_records(path, text)
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as e:
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
# Containers: JSON lines, one JSON array, tables.


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any, Problem | None]]:
    """Elements of a top-level JSON array with the line each starts on."""
    text = _read_text_strict(path)
    reader = _JsonReader()
    decoder = reader.decoder
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
        except RecursionError:
            yield line, None, Problem("invalid_json", "invalid JSON (nested too deeply)", line)
            return
        except ValueError as e:
            yield line_of(getattr(e, "pos", pos)), None, Problem(
                "invalid_json", f"invalid JSON ({getattr(e, 'msg', e)})", line_of(getattr(e, "pos", pos))
            )
            return
        bad = reader.problem(text[pos:end], value, line)
        yield line, (None if bad else value), bad
        pos = end
        expect_value = False
    yield line_of(n), None, Problem("invalid_json", "the JSON array is not closed with ']'", line_of(n))


class _JsonReader:
    """JSON decoding that notes duplicate keys and lone surrogates, which `json` lets through:
    a duplicate silently keeps its last value, a lone surrogate fails later, when written."""

    def __init__(self) -> None:
        self.duplicates: list[str] = []
        # One decoder for the file: json.loads(..., object_pairs_hook=) would build one per line.
        self.decoder = json.JSONDecoder(object_pairs_hook=self._pairs)

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        record = dict(pairs)
        if len(record) != len(pairs):
            seen: set[str] = set()
            self.duplicates.extend(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return record

    def problem(self, text: str, value: Any, line: int) -> Problem | None:
        """The duplicate-key or lone-surrogate problem of a decoded value, if any."""
        if self.duplicates:
            keys = sorted(set(self.duplicates))
            self.duplicates.clear()
            return Problem("duplicate_key", f"key {keys[0]!r} appears twice in one object", line)
        if _SURROGATE_ESCAPE.search(text):
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                return Problem("lone_surrogate", f"a lone UTF-16 surrogate escape (\\u{ord(e.object[e.start]):04x}) without its pair", line)
        return None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _iter_json_lines(path: Path) -> Iterator[tuple[int, Any, Problem | None]]:
    reader = _JsonReader()
    for number, text, problem in iter_text_lines(path):
        row = _json_line(reader, number, text, problem)
        if row is not None:
            yield row


def _json_line(reader: _JsonReader, number: int, text: str, problem: Problem | None) -> tuple[int, Any, Problem | None] | None:
    """(line, value, problem) of one JSON line; None for a blank line."""
    if problem is not None:
        return number, None, problem
    if not text.strip():
        return None
    try:
        value = reader.decoder.decode(text)
    except RecursionError:
        return number, None, Problem("invalid_json", "invalid JSON (nested too deeply)", number)
    except ValueError as e:
        # json's own messages end in " at" ("Invalid control character at"): the column follows.
        msg = getattr(e, "msg", str(e)).removesuffix(" at")
        col = getattr(e, "colno", None)
        where = f" at column {col}" if col else ""
        if "\r" in text:
            where += "; the file's lines end with a bare CR (old Mac style): convert them to LF"
        reader.duplicates.clear()
        return number, None, Problem("invalid_json", f"invalid JSON ({msg}{where})", number)
    bad = reader.problem(text, value, number)
    return number, (None if bad else value), bad


# A key ends with its closing quote, optional whitespace and a colon; a string can hold the same
# bytes (an escaped quote), so counting them bounds the number of keys from above.
_KEY_END = re.compile(rb'"[ \t\r]*:')
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def _plain_openai_line(raw: bytes, number: int, shared: dict[str | None, str] | None = None) -> Conversation | None:
    """The conversation of a plain OpenAI chat line read with orjson; None when the line needs
    the exact reader (`_json_line` then `parse_openai`) to say what it is.

    Why: most lines of a large file are plain, and orjson reads them several times faster than
    `json` with the duplicate-key hook. orjson keeps the last of duplicate keys silently, so
    the line must have no more key ends than the record has keys; a NUL, a surrogate escape,
    or anything orjson refuses (invalid UTF-8, NaN, bad JSON) goes to the exact reader.
    """
    if b"\x00" in raw or (b"\\u" in raw and _SURROGATE_ESCAPE_BYTES.search(raw)):
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    plain = parse_openai_plain(record, number, shared)
    if plain is None:
        return None
    conv, keys = plain
    # Every quote outside a string's escapes opens or closes a key or a string value; a plain
    # record's strings are its keys and two values a message. As many quotes as those need:
    # no escaped quote and no string beyond them, so no repeated key.
    if raw.count(b'"') == 2 * (keys + 2 * len(conv.messages)):
        return conv
    spaced = b'" ' in raw or b'"\t' in raw or b'"\r' in raw
    key_ends = len(_KEY_END.findall(raw)) if spaced else raw.count(b'":')
    return conv if key_ends == keys else None


def _iter_openai_lines(path: Path, system_prompt: str | None) -> Iterator[ParsedRow]:
    """Parsed rows of an OpenAI chat JSONL file: plain lines through `_plain_openai_line`, every
    other line through the exact reader; the same rows `parse_rows(_iter_json_lines(...))` gives."""
    reader = _JsonReader()
    system_prompts: dict[str | None, str] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            conv = _plain_openai_line(raw, number, system_prompts)
            if conv is not None:
                problems = plain_exchange_problems(conv, number)
                yield ParsedRow(number, _with_system(conv, system_prompt) if system_prompt else conv, problems)
                continue
            row = _json_line(reader, number, *_text_line(number, raw))
            if row is not None:
                yield from parse_rows(iter([row]), "openai", None, None, system_prompt)


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
                if start - line > 1 and any("\n" in f for f in fields):
                    # An unclosed quote swallows every line after it into one field.
                    yield line, None, Problem("bad_row", f"a quote opened on this line is not closed: the row runs to line {start - 1}", line)
                else:
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
        raise missing_data_error(path)
    if format == "auto":
        format, container = detect_format(path, columns_given=bool(input_col and output_col))
    elif format in TABLE_FORMATS:
        container = "table"
        if format in ("csv", "tsv") and path.is_file():
            check_text_encoding(path)
    elif path.is_dir():
        raise UserError(f"{path} is a folder", "pass a file, or --format hf_disk for a save_to_disk folder")
    else:
        check_text_encoding(path)
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
        return source, parse_rows(raw_rows, record_format, input_col, output_col, system_prompt, from_table=True)

    if format == "openai" and container == "lines":
        return Source(path, format, container, input_col, output_col), _iter_openai_lines(path, system_prompt)
    raw_rows = _iter_json_array(path) if container == "array" else _iter_json_lines(path)
    if format == "array":
        # Peek the first object of the array for its keys, then parse every element in that format.
        first = next((value for _, value, p in _iter_json_array(path) if p is None and isinstance(value, dict)), None)
        format = _format_from_keys(first or {}) or ("columns" if (input_col and output_col) else "")
        if not format and first is None:
            raise UserError(f"{path}: the JSON array holds no readable object", "make it an array of example objects, or JSONL")
        if not format:
            keys = sorted(first)[:8]
            raise UserError(
                f"{path}: the array's objects have keys {keys}, which match no known format",
                "use instruction/output (alpaca), messages, conversations or prompt/completion; "
                "or pass --input-col and --output-col",
            )
    if input_col and output_col and format not in PARSERS:
        format = "columns"
    source = Source(path, format, container, input_col, output_col)
    record_format = None if format == "columns" else format
    return source, parse_rows(raw_rows, record_format, input_col, output_col, system_prompt)


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
            f"{path}: {plural(len(errors), 'problem')} in the data: {shown}{more}",
            f"{errors[0].fix}; `tunesmith data check {path}` lists every problem with its fix",
        )
    if not conversations:
        raise UserError(f"{path} holds no examples", "add examples, one per line")
    return conversations


def conversation_line(conv: Conversation) -> str:
    return json.dumps(conv.to_openai(), ensure_ascii=False)


def write_conversations(
    path: str | Path, conversations: Iterable[Conversation], *, inputs: Iterable[Path | None] | None = None, force: bool = False
) -> int:
    """Write canonical OpenAI chat JSONL atomically; returns the number of lines written.

    With `inputs` the path is one the user named: it is guarded (`artifacts.guard_output`) and
    recorded as tunesmith's; without, it is a run-folder artifact tunesmith owns.
    """
    count = 0
    writing = atomic_path(Path(path)) if inputs is None else atomic_output(Path(path), list(inputs), force)
    with writing as tmp:
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
    force: bool = False,
) -> int:
    """`tunesmith data convert`: any supported format -> canonical chat JSONL. Returns the count."""
    guard_output(Path(dst), [Path(src)], force)  # before reading: a refusal should not wait for it
    conversations = read_conversations(src, format, input_col, output_col, system_prompt)
    return write_conversations(dst, conversations, inputs=[Path(src)], force=force)


# --------------------------------------------------------------------------------------------
# Labels and the train/eval split


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to group equal inputs."""
    return " ".join(text.casefold().split())


def label_counts(conversations: list[Conversation]) -> dict[str, int] | None:
    """Counts per answer when the answers are a label set (metrics.task_kind: classification), else None."""
    from tunesmith import metrics as M

    targets = [(conv.target or "").strip() for conv in conversations]
    if M.infer_task(targets) != "classification":
        return None
    counts: dict[str, int] = {}
    for label in targets:
        counts[label] = counts.get(label, 0) + 1
    return counts


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
    force: bool = False,
) -> tuple[Path, Path, int, int]:
    """`tunesmith data split`: write OUT/train.jsonl and OUT/eval.jsonl; returns paths and counts."""
    from tunesmith.artifacts import EVAL_SPLIT_FILE, TRAIN_SPLIT_FILE

    out_dir = Path(out_dir)
    train_path = out_dir / Path(TRAIN_SPLIT_FILE).name
    eval_path = out_dir / Path(EVAL_SPLIT_FILE).name
    for out in (train_path, eval_path):
        guard_output(out, [Path(path)], force)
    conversations = read_conversations(path, format, input_col, output_col, system_prompt)
    train, held_out = split_conversations(conversations, eval_fraction, seed)
    write_conversations(train_path, train, inputs=[Path(path)], force=force)
    write_conversations(eval_path, held_out, inputs=[Path(path)], force=force)
    return train_path, eval_path, len(train), len(held_out)
