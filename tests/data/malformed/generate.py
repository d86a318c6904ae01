"""Writes the malformed-data corpus and its manifest (expected.json). Run it from anywhere:

    python tests/data/malformed/generate.py

Each file holds 10 valid examples (OpenAI's minimum, so nothing else is blamed) and the broken
line(s) at a known position, or is broken as a whole (empty, binary, too few examples). The
manifest says, per file, the exit code of `tunesmith data check` and every error expected with
its code and 1-based line (null: a whole-file error). It is written by hand below, from what
each file is meant to show, not from running the check.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = (
    "order refund parcel login password screen account billing shipping courier error crash export "
    "sync device plan card address delivery tracking damaged missing slow button page report chart"
).split()

U = {"role": "user", "content": "where is my parcel?"}
A = {"role": "assistant", "content": "It ships tomorrow."}
S = {"role": "system", "content": "You are a support agent."}


def valid_lines(seed: int, n: int = 10) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(8))
        answer = " ".join(rng.choice(WORDS) for _ in range(5))
        out.append(json.dumps({"messages": [S, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}).encode())
    return out


def dumps(record) -> bytes:
    return record if isinstance(record, bytes) else (record if isinstance(record, str) else json.dumps(record)).encode()


# name -> (bad lines as {line: record/str/bytes}, expected errors [(code, line)], why)
WITH_BAD_LINES: dict[str, tuple[dict[int, object], list[tuple[str, int]], str]] = {
    "invalid_json_unclosed.jsonl": ({4: '{"messages": [{"role": "user", "content": "hi"}'}, [("invalid_json", 4)], "an object that never closes"),
    "invalid_json_trailing_comma.jsonl": ({7: '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},]}'}, [("invalid_json", 7)], "a trailing comma"),
    "invalid_json_python_repr.jsonl": ({2: "{'messages': [{'role': 'user', 'content': 'hi'}]}"}, [("invalid_json", 2)], "a Python dict repr (single quotes)"),
    "invalid_json_deep_nesting.jsonl": ({5: "[" * 3000}, [("invalid_json", 5)], "nesting deeper than the parser's recursion limit"),
    "invalid_utf8_latin1.jsonl": ({3: b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'}, [("invalid_utf8", 3)], "a Latin-1 byte"),
    "invalid_utf8_cesu8.jsonl": ({6: b'{"messages": [{"role": "user", "content": "smile \xed\xa0\xbd\xed\xb8\x80"}, {"role": "assistant", "content": "ok"}]}'}, [("invalid_utf8", 6)], "an emoji written as a CESU-8 surrogate pair (Java, MySQL utf8)"),
    "control_bytes.jsonl": ({8: b'{"messages": [\x01\x02]}'}, [("invalid_json", 8)], "control bytes inside the JSON"),
    "not_object_array.jsonl": ({3: "[1, 2, 3]"}, [("not_object", 3)], "a JSON array instead of an object"),
    "not_object_string.jsonl": ({9: '"just a string"'}, [("not_object", 9)], "a JSON string"),
    "not_object_null.jsonl": ({11: "null"}, [("not_object", 11)], "JSON null (last line)"),
    "missing_messages.jsonl": ({5: {"msgs": [U, A]}}, [("missing_messages", 5), ("unknown_key", 5)], "a misspelt messages key"),
    "messages_not_list.jsonl": ({3: {"messages": "where is my parcel?"}}, [("messages_not_list", 3)], "messages is a string"),
    "empty_messages.jsonl": ({10: {"messages": []}}, [("empty_messages", 10)], "messages is empty"),
    "unknown_top_key.jsonl": ({4: {"messages": [U, A], "label": "shipping"}}, [("unknown_key", 4)], "a key OpenAI's format does not have"),
    "unknown_message_key.jsonl": ({6: {"messages": [{**U, "meta": {"id": 1}}, A]}}, [("unknown_key", 6)], "a message with an unknown key"),
    "text_instead_of_content.jsonl": ({2: {"messages": [{"role": "user", "text": "hi"}, A]}}, [("unknown_key", 2), ("missing_content", 2)], "text instead of content"),
    "unknown_role.jsonl": ({7: {"messages": [{"role": "bot", "content": "hi"}, A]}}, [("unknown_role", 7)], "role bot"),
    "missing_role.jsonl": ({3: {"messages": [{"content": "hi"}, A]}}, [("missing_role", 3)], "a message without role"),
    "message_not_object.jsonl": ({8: {"messages": ["where is my parcel?", A]}}, [("message_not_object", 8)], "a message that is a string"),
    "missing_content.jsonl": ({5: {"messages": [{"role": "user"}, A]}}, [("missing_content", 5)], "a message without content"),
    "null_content.jsonl": ({4: {"messages": [U, {"role": "assistant", "content": None}]}}, [("missing_content", 4)], "content null without tool_calls"),
    "content_parts_list.jsonl": ({6: {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}, A]}}, [("unsupported_content_part", 6)], "an image part beside a text part: only text parts can be trained"),
    "content_number.jsonl": ({2: {"messages": [U, {"role": "assistant", "content": 42}]}}, [("non_string_content", 2)], "content as a number"),
    "bad_name.jsonl": ({9: {"messages": [{**U, "name": 5}, A]}}, [("bad_name", 9)], "name is a number"),
    "no_assistant.jsonl": ({3: {"messages": [S, U]}}, [("no_assistant", 3)], "no assistant turn"),
    "no_trained_assistant.jsonl": ({5: {"messages": [U, {**A, "weight": 0}]}}, [("no_trained_assistant", 5)], "every assistant turn has weight 0"),
    "system_not_first.jsonl": ({7: {"messages": [U, S, A]}}, [("system_not_first", 7)], "system turn in the middle"),
    "bad_weight_two.jsonl": ({2: {"messages": [U, {**A, "weight": 2}]}}, [("bad_weight", 2)], "weight 2"),
    "bad_weight_string.jsonl": ({10: {"messages": [U, {**A, "weight": "1"}]}}, [("bad_weight", 10)], "weight as a string"),
    "bad_weight_bool.jsonl": ({4: {"messages": [U, {**A, "weight": True}]}}, [("bad_weight", 4)], "weight as a boolean"),
    "weight_on_user.jsonl": ({6: {"messages": [{**U, "weight": 1}, A]}}, [("weight_not_assistant", 6)], "weight on a user turn"),
    "assistant_before_user.jsonl": ({3: {"messages": [A, U, A]}}, [("assistant_before_user", 3)], "the assistant speaks first"),
    "consecutive_user.jsonl": ({8: {"messages": [U, U, A]}}, [("consecutive_user", 8)], "two user turns in a row"),
    "consecutive_assistant.jsonl": ({5: {"messages": [U, A, A]}}, [("consecutive_assistant", 5)], "two assistant turns in a row"),
    "tool_without_call.jsonl": ({2: {"messages": [U, {"role": "tool", "content": "{}"}, A]}}, [("tool_without_call", 2)], "a tool turn with no assistant tool call before it"),
    "empty_assistant.jsonl": ({9: {"messages": [U, {"role": "assistant", "content": "   "}]}}, [("empty_assistant", 9)], "an empty assistant turn with weight 1"),
    "several_errors.jsonl": (
        {2: "{oops", 5: {"messages": [U]}, 8: {"messages": [U, {**A, "weight": 3}]}, 12: "[]"},
        [("invalid_json", 2), ("no_assistant", 5), ("bad_weight", 8), ("not_object", 12)],
        "four broken lines: every one is reported, not only the first",
    ),
    "content_parts_audio.jsonl": ({3: {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}, A]}}, [("unsupported_content_part", 3)], "an audio part"),
    "content_parts_malformed.jsonl": ({4: {"messages": [{"role": "user", "content": [{"type": "text"}, "hi"]}, A]}}, [("bad_content_part", 4)], "a text part without text, and a bare string part"),
    "content_parts_empty.jsonl": ({7: {"messages": [{"role": "user", "content": []}, A]}}, [("missing_content", 7)], "an empty list of parts"),
    "content_object.jsonl": ({5: {"messages": [{"role": "user", "content": {"text": "hi"}}, A]}}, [("non_string_content", 5)], "content as an object"),
    "content_huge_float.jsonl": ({8: b'{"messages": [{"role": "user", "content": 1e999}, {"role": "assistant", "content": "ok"}]}'}, [("non_string_content", 8)], "content a number that overflows to infinity"),
    "role_number.jsonl": ({2: {"messages": [{"role": 1, "content": "hi"}, A]}}, [("unknown_role", 2)], "role as a number"),
    "duplicate_key.jsonl": ({6: b'{"messages": [{"role": "user", "content": "hi", "content": "bye"}, {"role": "assistant", "content": "ok"}]}'}, [("duplicate_key", 6)], "a key twice in one object (JSON keeps the last silently)"),
    "duplicate_top_key.jsonl": ({3: b'{"messages": [], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}'}, [("duplicate_key", 3)], "messages twice"),
    "lone_surrogate.jsonl": ({9: b'{"messages": [{"role": "user", "content": "smile \\ud83d"}, {"role": "assistant", "content": "ok"}]}'}, [("lone_surrogate", 9)], "half of a surrogate pair escape"),
    "weight_nan.jsonl": ({4: b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "weight": NaN}]}'}, [("bad_weight", 4)], "weight NaN (a JSON extension Python reads)"),
    "huge_integer.jsonl": ({5: b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "weight": ' + b"9" * 5000 + b'}]}'}, [("invalid_json", 5)], "an integer longer than Python's digit limit"),
    "control_char_in_string.jsonl": ({3: b'{"messages": [{"role": "user", "content": "tab\there"}, {"role": "assistant", "content": "ok"}]}'}, [("invalid_json", 3)], "a raw control character inside a string"),
    "nul_byte_early.jsonl": ({2: b'{"messages": [{"role": "user", "content": "hi\x00"}, {"role": "assistant", "content": "ok"}]}'}, [("nul_byte", 2)], "a NUL byte in the first 8 KiB (once: the whole file called binary)"),
    "nul_byte_between_records.jsonl": ({7: b"\x00\x00\x00\x00"}, [("nul_byte", 7)], "a line of NULs, as a crash leaves"),
}


def write_with_bad_lines(name: str, bad: dict[int, object], seed: int) -> None:
    lines = valid_lines(seed)
    for line in sorted(bad):
        lines.insert(line - 1, dumps(bad[line]))
    (HERE / name).write_bytes(b"\n".join(lines) + b"\n")


def main() -> None:
    manifest: dict[str, dict] = {}
    for seed, (name, (bad, errors, why)) in enumerate(WITH_BAD_LINES.items()):
        write_with_bad_lines(name, bad, seed)
        manifest[name] = {"exit": 2, "errors": [{"code": c, "line": n} for c, n in errors], "why": why}

    # Whole-file cases.
    valid = valid_lines(100)
    (HERE / "truncated_last_line.jsonl").write_bytes(b"\n".join(valid) + b"\n" + valid[0][:40])
    manifest["truncated_last_line.jsonl"] = {"exit": 2, "errors": [{"code": "invalid_json", "line": 11}], "why": "the last line is cut off (no newline, half an object)"}
    (HERE / "too_few_examples.jsonl").write_bytes(b"\n".join(valid_lines(101, 5)) + b"\n")
    manifest["too_few_examples.jsonl"] = {"exit": 2, "errors": [{"code": "too_few_examples", "line": None}], "why": "5 examples; OpenAI requires 10"}
    (HERE / "empty.jsonl").write_bytes(b"")
    manifest["empty.jsonl"] = {"exit": 2, "errors": [{"code": "unreadable", "line": None}], "why": "an empty file"}
    (HERE / "only_blank_lines.jsonl").write_bytes(b"\n  \n\t\n")
    manifest["only_blank_lines.jsonl"] = {"exit": 2, "errors": [{"code": "unreadable", "line": None}], "why": "nothing but whitespace"}
    rng = random.Random(7)
    (HERE / "binary_garbage.jsonl").write_bytes(bytes(rng.randrange(0, 256) for _ in range(2048)))
    manifest["binary_garbage.jsonl"] = {"exit": 2, "errors": [{"code": "unreadable", "line": None}], "why": "random bytes (NULs included) named .jsonl"}
    (HERE / "gzip_named_jsonl.jsonl").write_bytes(bytes.fromhex("1f8b0800000000000003") + bytes(rng.randrange(0, 256) for _ in range(512)))
    manifest["gzip_named_jsonl.jsonl"] = {"exit": 2, "errors": [{"code": "unreadable", "line": None}], "why": "a gzip stream not decompressed"}

    # Files that look odd but are fine: the check must not blame them.
    (HERE / "ok_bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(valid_lines(102)) + b"\n")
    manifest["ok_bom.jsonl"] = {"exit": 0, "errors": [], "why": "a UTF-8 BOM is fine"}
    (HERE / "ok_crlf_blank_lines.jsonl").write_bytes(b"\r\n".join(valid_lines(103)[:5] + [b""] + valid_lines(103)[5:]) + b"\r\n")
    manifest["ok_crlf_blank_lines.jsonl"] = {"exit": 0, "errors": [], "why": "CRLF line ends and a blank line are fine"}
    (HERE / "ok_no_final_newline.jsonl").write_bytes(b"\n".join(valid_lines(104)))
    manifest["ok_no_final_newline.jsonl"] = {"exit": 0, "errors": [], "why": "a complete last line without a newline is fine"}

    # Other formats report their own errors at their line.
    alpaca = [json.dumps({"instruction": f"task {i}", "input": "", "output": f"done {i}"}) for i in range(10)]
    alpaca.insert(3, json.dumps({"instruction": "task without output", "input": ""}))
    (HERE / "alpaca_missing_output.jsonl").write_text("\n".join(alpaca) + "\n")
    manifest["alpaca_missing_output.jsonl"] = {"exit": 2, "errors": [{"code": "missing_field", "line": 4}], "why": "Alpaca row without output"}
    share = [json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}) for i in range(10)]
    share.insert(6, json.dumps({"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}))
    (HERE / "sharegpt_unknown_speaker.jsonl").write_text("\n".join(share) + "\n")
    manifest["sharegpt_unknown_speaker.jsonl"] = {"exit": 2, "errors": [{"code": "unknown_role", "line": 7}], "why": "ShareGPT speaker robot"}
    rows = ["text,label"] + [f"message number {i},label{i % 3}" for i in range(10)]
    rows.insert(5, "an extra,field,here")
    (HERE / "csv_extra_field.csv").write_text("\n".join(rows) + "\n")
    manifest["csv_extra_field.csv"] = {"exit": 2, "errors": [{"code": "bad_row", "line": 6}], "why": "a CSV row with an extra field"}

    _more_whole_files(manifest)

    out = {"about": "tests/data/malformed: expected result of `tunesmith data check FILE` per file (generate.py writes both)", "files": manifest}
    (HERE / "expected.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {len(manifest)} files and expected.json")


def _more_whole_files(manifest: dict[str, dict]) -> None:
    """Encodings, containers and tables that a hidden corpus would try (issue 12 §3)."""
    text = b"\n".join(valid_lines(200)) + b"\n"

    def add(name: str, data: bytes, exit_code: int, errors: list[tuple[str, int | None]], why: str) -> None:
        (HERE / name).write_bytes(data)
        manifest[name] = {"exit": exit_code, "errors": [{"code": c, "line": n} for c, n in errors], "why": why}

    unreadable = [("unreadable", None)]
    add("utf16_le_bom.jsonl", text.decode().encode("utf-16"), 2, unreadable, "UTF-16 LE with BOM (Windows 'Unicode')")
    add("utf16_be_bom.jsonl", b"\xfe\xff" + text.decode().encode("utf-16-be"), 2, unreadable, "UTF-16 BE with BOM")
    add("utf16_le_no_bom.jsonl", text.decode().encode("utf-16-le"), 2, unreadable, "UTF-16 LE without BOM")
    add("utf16_be_no_bom.jsonl", text.decode().encode("utf-16-be"), 2, unreadable, "UTF-16 BE without BOM")
    add("utf32_le_bom.jsonl", text.decode().encode("utf-32"), 2, unreadable, "UTF-32 with BOM")
    add("utf32_be_no_bom.jsonl", text.decode().encode("utf-32-be")[:12000], 2, unreadable, "UTF-32 BE without BOM")
    tsv = "text\tlabel\n" + "".join(f"message {i}\tlabel{i % 3}\n" for i in range(12))
    add("utf16_excel.tsv", tsv.encode("utf-16"), 2, unreadable, "Excel's 'Unicode text' export: UTF-16 TSV")
    add("xz_named_jsonl.jsonl", b"\xfd7zXZ\x00\x00" + bytes(range(256)), 2, unreadable, "an xz stream")
    add("zip_named_jsonl.jsonl", b"PK\x03\x04" + bytes(range(256)), 2, unreadable, "a zip archive")
    many = valid_lines(201, 50)
    many.insert(44, b'{"messages": [{"role": "user", "content": "late\x00nul"}, {"role": "assistant", "content": "ok"}]}')
    add("nul_byte_late.jsonl", b"\n".join(many) + b"\n", 2, [("nul_byte", 45)], "a NUL past the first 8 KiB")
    add("ok_utf8_bom_crlf.jsonl", b"\xef\xbb\xbf" + b"\r\n".join(valid_lines(202)) + b"\r\n", 0, [], "BOM and CRLF together")
    parts = [json.loads(line) for line in valid_lines(203)]
    for record in parts[::2]:
        user = record["messages"][1]
        user["content"] = [{"type": "text", "text": user["content"][:10]}, {"type": "text", "text": user["content"][10:]}]
    add("ok_content_parts_text.jsonl", "".join(json.dumps(r) + "\n" for r in parts).encode(), 0, [], "OpenAI text content parts")
    records = [json.loads(line) for line in valid_lines(204)]
    add("ok_json_array.json", json.dumps(records, indent=2).encode(), 0, [], "one JSON array of chat records, not JSONL")
    broken = json.dumps(records, indent=1)[:-2] + ',\n "oops"\n]'
    add("json_array_bad_element.json", broken.encode(), 2, [("not_object", broken.count("\n"))], "a JSON array with a string element")
    unclosed = json.dumps(records, indent=1)[:-1]
    add("json_array_unclosed.json", unclosed.encode(), 2, [("invalid_json", unclosed.rstrip().count("\n") + 1)], "a JSON array that never closes")
    rows = ["text,label"] + [f"message number {i},label{i % 3}" for i in range(10)]
    add("csv_missing_field.csv", "\n".join(rows[:4] + ["only one field"] + rows[4:]).encode() + b"\n", 2, [("bad_row", 5)], "a CSV row with a field missing")
    add("csv_unbalanced_quote.csv", "\n".join(rows + ['"an open quote,label1', "swallowed row,label2"]).encode() + b"\n", 2, [("bad_row", 12)], "an unclosed quote swallows the rest")
    add("csv_header_only.csv", b"text,label\n", 2, [("too_few_examples", None)], "a header and no rows")
    add("csv_empty.csv", b"", 2, unreadable, "an empty CSV")
    add("csv_latin1.csv", "\n".join(rows[:3] + ["caf\u00e9 au lait,label1"] + rows[3:]).encode("latin-1") + b"\n", 2, [("invalid_utf8", 4)], "a Latin-1 byte in a CSV")
    add("ok_csv_bom_crlf.csv", b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n", 0, [], "Excel's CSV UTF-8: BOM and CRLF")
    records_text = [json.dumps(r).encode() for r in records]
    pretty = "\n".join(json.dumps(r, indent=2) for r in records).encode()
    add("pretty_printed_records.jsonl", pretty, 2, unreadable, "json.dump(indent=2) in a loop: objects over several lines")
    add("cr_only_line_ends.jsonl", b"\r".join(records_text) + b"\r", 2, [("invalid_json", 1), ("too_few_examples", None)], "old Mac line ends: one line")
    deep = b'{"messages": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1500 + b"}"
    add("deep_valid_object_first.jsonl", b"\n".join([deep] + records_text) + b"\n", 2, [("invalid_json", 1)], "valid JSON nested deeper than the parser goes, on the first line")
    add("deep_array.json", b"[" * 3000 + b"]" * 3000, 2, unreadable, "a JSON array nested 3000 deep")
    add("array_of_strings.json", json.dumps(["an example"] * 12).encode(), 2, unreadable, "a JSON array of strings")
    add("only_bom.jsonl", b"\xef\xbb\xbf\n\n", 2, unreadable, "a BOM and blank lines")
    calls = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": "lookup(x)"}]}
    add("tool_calls_not_list.jsonl", b"\n".join(records_text[:3] + [json.dumps(calls).encode()] + records_text[3:]) + b"\n", 2, [("bad_tool_calls", 4)], "tool_calls as a string")
    add("csv_unknown_columns.csv", "\n".join(["foo,bar"] + [f"{i},{i}" for i in range(10)]).encode() + b"\n", 2, unreadable, "columns that name no input or answer")


if __name__ == "__main__":
    main()
