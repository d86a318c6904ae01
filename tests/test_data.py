"""Readers, the writer, format detection, the split and the data CLI commands."""

import csv
import json
from collections import Counter

import pytest

from conftest import SHARED_DATA
from tunesmith.data import (
    detect_format,
    label_counts,
    normalize_text,
    open_source,
    read_conversations,
    split_conversations,
    write_conversations,
)
from tunesmith.errors import UserError
from tunesmith.schema import Conversation, Message


def chat(user, answer, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages}


def pairs(convs):
    return [(c.messages[-2].content, c.messages[-1].content) for c in convs]


# ---------------------------------------------------------------- readers


def test_openai_reader_keeps_weights_names_tools_and_lines(write_jsonl, tmp_path):
    tool_call = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"order\": 7}"}}]
    records = [
        chat("hi", "hello", system="be brief"),
        "",  # a blank line is skipped, but counted for line numbers
        {
            "messages": [
                {"role": "user", "content": "where is order 7?", "name": "ann"},
                {"role": "assistant", "content": "", "tool_calls": tool_call},
                {"role": "tool", "content": "{\"status\": \"shipped\"}", "tool_call_id": "c1"},
                {"role": "assistant", "content": "draft", "weight": 0},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "It shipped."},
            ],
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
        },
    ]
    path = write_jsonl(records)
    convs = read_conversations(path)
    assert [c.source_line for c in convs] == [1, 3]
    second = convs[1]
    assert second.messages[0].name == "ann"
    assert second.messages[1].extra["tool_calls"] == tool_call
    assert second.messages[3].weight == 0
    assert second.target == "It shipped."
    # Writing back is lossless: the canonical file equals the input records.
    out = tmp_path / "out.jsonl"
    assert write_conversations(out, convs) == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [records[0], records[2]]
    assert pairs(read_conversations(out)) == pairs(convs)


def test_prompt_completion_reader(write_jsonl):
    path = write_jsonl([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)])
    assert detect_format(path) == ("prompt_completion", "lines")
    convs = read_conversations(path, system_prompt="sys")
    assert pairs(convs) == [("p0", "c0"), ("p1", "c1"), ("p2", "c2")]
    assert convs[0].messages[0].role == "system" and convs[0].messages[0].content == "sys"


def test_alpaca_jsonl_and_json_array_with_line_numbers(write_jsonl, tmp_path):
    records = [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    convs = read_conversations(write_jsonl(records))
    assert pairs(convs) == [("Translate to French\n\ncat", "chat"), ("Say hi", "hi")]
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(records, indent=2))
    assert detect_format(array) == ("array", "array")
    from_array = read_conversations(array)
    assert pairs(from_array) == pairs(convs)
    # Each element's line is where its object starts in the file.
    text_lines = array.read_text().splitlines()
    assert [text_lines[c.source_line - 1].strip() for c in from_array] == ["{", "{"]
    assert from_array[1].source_line > from_array[0].source_line


def test_sharegpt_reader(write_jsonl):
    path = write_jsonl(
        [
            {
                "system": "sys",
                "conversations": [
                    {"from": "human", "value": "q1"},
                    {"from": "gpt", "value": "a1"},
                    {"from": "human", "value": "q2"},
                    {"from": "gpt", "value": "a2"},
                ],
            }
        ]
    )
    (conv,) = read_conversations(path)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.target == "a2"


def test_csv_reader_with_mapping_guessing_and_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerow([1, "first, with a comma", "a"])
        w.writerow([2, "second\nspans two lines", "b"])
        w.writerow([3, "third", "a"])
    convs = read_conversations(path)  # columns guessed: text -> label
    assert pairs(convs) == [("first, with a comma", "a"), ("second\nspans two lines", "b"), ("third", "a")]
    assert [c.source_line for c in convs] == [2, 3, 5]
    explicit = read_conversations(path, input_col="id", output_col="label", system_prompt="S")
    assert pairs(explicit)[0] == ("1", "a") and explicit[0].messages[0].content == "S"
    with pytest.raises(UserError, match="no column 'nope'"):
        read_conversations(path, input_col="nope", output_col="label")


def test_tsv_reader_and_unguessable_columns(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('q\tans\nsay "hi"\tok\n', encoding="utf-8")
    with pytest.raises(UserError, match="cannot tell which columns") as err:
        read_conversations(path)
    assert "--input-col" in err.value.hint
    assert pairs(read_conversations(path, input_col="q", output_col="ans")) == [('say "hi"', "ok")]
    # Without a suffix, a tab in the first line means TSV.
    bare = tmp_path / "bare"
    bare.write_text(path.read_text())
    assert detect_format(bare) == ("tsv", "table")


def test_parquet_reader_columns_and_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert pairs(read_conversations(tmp_path / "d.parquet")) == [("q1", "a1"), ("q2", "a2")]
    # A table of chat records: struct fields absent from a row come back as None and are ignored.
    messages = [chat("hi", "yo")["messages"], [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x", "weight": 1}]]
    pq.write_table(pa.table({"messages": messages}), tmp_path / "m.parquet")
    convs = read_conversations(tmp_path / "m.parquet")
    assert pairs(convs) == [("hi", "yo"), ("u", "x")] and [c.source_line for c in convs] == [1, 2]


def test_hf_disk_reader(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"instruction": ["i1", "i2"], "input": ["", "x"], "output": ["o1", "o2"]}).save_to_disk(str(folder))
    assert detect_format(folder) == ("hf_disk", "table")
    assert pairs(read_conversations(folder)) == [("i1", "o1"), ("i2\n\nx", "o2")]


def test_hf_disk_without_datasets_says_pip_install(tmp_path, monkeypatch):
    import sys

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(UserError) as err:
        read_conversations(folder)
    assert "pip install datasets" in err.value.one_line()


@pytest.mark.parametrize(
    "record, expected",
    [
        (chat("u", "a"), "openai"),
        ({"prompt": "u", "completion": "a"}, "prompt_completion"),
        ({"instruction": "u", "input": "", "output": "a"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ],
)
def test_auto_detection_skips_bad_first_lines(write_jsonl, record, expected):
    path = write_jsonl(["{not json", record])
    assert detect_format(path) == (expected, "lines")
    source, rows = open_source(path)
    rows = list(rows)
    assert source.format == expected
    assert rows[0].problems[0].code == "invalid_json" and rows[0].line == 1
    assert rows[1].conversation is not None and rows[1].problems == []


def test_unknown_shape_needs_columns(write_jsonl):
    path = write_jsonl([{"text": "hello", "intent": "greet"}])
    with pytest.raises(UserError, match="match no known format"):
        read_conversations(path)
    assert pairs(read_conversations(path, input_col="text", output_col="intent")) == [("hello", "greet")]


def test_read_refuses_bad_rows_naming_lines(write_jsonl):
    path = write_jsonl([chat("u", "a"), "{broken", {"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(UserError) as err:
        read_conversations(path)
    text = err.value.one_line()
    assert "line 2: invalid JSON" in text and "line 3: no assistant turn" in text
    assert "tunesmith data check" in text


def test_bom_is_fine_and_bad_utf8_names_the_line(tmp_path):
    good = tmp_path / "bom.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat("u", "a")).encode() + b"\n")
    assert pairs(read_conversations(good)) == [("u", "a")]
    # An emoji as CESU-8: each UTF-16 surrogate half encoded on its own.
    cesu = "\U0001f600".encode("utf-16-le")
    halves = [int.from_bytes(cesu[i : i + 2], "little") for i in (0, 2)]
    cesu8 = b"".join(chr(h).encode("utf-8", "surrogatepass") for h in halves)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(chat("u", "a")).encode() + b"\n" + b'{"messages": [{"role": "user", "content": "' + cesu8 + b'"}]}\n')
    with pytest.raises(UserError) as err:
        read_conversations(bad)
    assert "line 2" in err.value.message and "CESU-8" in err.value.message


def test_single_json_object_is_a_clear_error(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps({"Intent": [{"data": [{"text": "x"}]}]}, indent=2))
    with pytest.raises(UserError, match="single JSON object"):
        read_conversations(path)


# ---------------------------------------------------------------- split


def labelled(n_per_label, labels=("spam", "ham", "eggs")):
    out = []
    for label, n in zip(labels, n_per_label):
        out += [Conversation([Message("user", f"{label} message {i}"), Message("assistant", label)], source_line=len(out) + 1) for i in range(n)]
    return out


def test_split_is_deterministic_and_seeded():
    convs = labelled((40, 40, 20))
    train, held = split_conversations(convs, 0.2, seed=0)
    train2, held2 = split_conversations(convs, 0.2, seed=0)
    assert pairs(train) == pairs(train2) and pairs(held) == pairs(held2)
    _, held3 = split_conversations(convs, 0.2, seed=1)
    assert pairs(held3) != pairs(held)
    # Order is kept on both sides.
    assert [c.source_line for c in held] == sorted(c.source_line for c in held)
    assert len(train) + len(held) == len(convs)


def test_split_is_stratified_by_label():
    convs = labelled((120, 60, 20))
    assert label_counts(convs) == {"spam": 120, "ham": 60, "eggs": 20}
    _, held = split_conversations(convs, 0.15, seed=3)
    assert Counter(c.target for c in held) == {"spam": round(0.15 * 120), "ham": round(0.15 * 60), "eggs": round(0.15 * 20)}


def test_split_never_puts_one_input_on_both_sides():
    convs = []
    for i in range(60):
        text = f"Question {i % 20}?"  # every input three times, with spacing and case variants
        variant = [text, text.upper(), f"  {text} "][i // 20]
        convs.append(Conversation([Message("user", variant), Message("assistant", f"answer {i}")], source_line=i + 1))
    train, held = split_conversations(convs, 0.25, seed=0)
    train_inputs = {normalize_text(c.input_text) for c in train}
    assert held and not any(normalize_text(c.input_text) in train_inputs for c in held)
    assert len(held) % 3 == 0  # whole groups move


def test_split_edge_cases():
    convs = labelled((5,), labels=("x",))
    train, held = split_conversations(convs, 0.0, seed=0)
    assert len(train) == 5 and held == []
    with pytest.raises(UserError):
        split_conversations(convs, 1.0, seed=0)
    one_input = [Conversation([Message("user", "same"), Message("assistant", str(i))]) for i in range(5)]
    train, held = split_conversations(one_input, 0.5, seed=0)
    assert len(train) == 5 and held == []  # one group cannot be on both sides; training keeps it


def test_cli_convert_and_split(cli, tmp_path):
    src = tmp_path / "d.csv"
    rows = [("text", "label")] + [(f"message number {i}", "spam" if i % 4 == 0 else "ham") for i in range(40)]
    src.write_text("\n".join(",".join(r) for r in rows) + "\n")
    result = cli("data", "convert", str(src), str(tmp_path / "out.jsonl"), "--system", "Classify.")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 40
    assert json.loads(lines[0]) == chat("message number 0", "spam", system="Classify.")
    result = cli("data", "split", str(tmp_path / "out.jsonl"), "--eval-fraction", "0.2", "--seed", "0", "--out", str(tmp_path / "split"))
    assert result.returncode == 0, result.stderr
    train = read_conversations(tmp_path / "split" / "train.jsonl")
    held = read_conversations(tmp_path / "split" / "eval.jsonl")
    assert len(train) + len(held) == 40
    assert Counter(c.target for c in held) == {"spam": 2, "ham": 6}
    result = cli("data", "convert", str(tmp_path / "missing.jsonl"), str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not found" in result.stderr


# ---------------------------------------------------------------- real data (skips when absent)


@pytest.mark.skipif(not (SHARED_DATA / "sms_spam" / "SMSSpamCollection").exists(), reason="../shared/data/sms_spam absent")
def test_sms_spam_tsv_with_column_mapping():
    path = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
    convs = read_conversations(path, format="tsv", input_col="SMS", output_col="Label")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert len(convs) == len(rows)
    assert pairs(convs) == [(text, label) for label, text in rows]
    assert set(label_counts(convs)) == {"ham", "spam"}
    assert convs[0].source_line == 2


@pytest.mark.skipif(not (SHARED_DATA / "snips" / "train_PlayMusic_full.json").exists(), reason="../shared/data/snips absent")
def test_snips_cesu8_file_gives_a_clear_error():
    path = SHARED_DATA / "snips" / "train_PlayMusic_full.json"
    raw = path.read_bytes()
    with pytest.raises(UnicodeDecodeError) as decode:
        raw.decode("utf-8")
    expected_line = raw[: decode.value.start].count(b"\n") + 1
    with pytest.raises(UserError) as err:
        read_conversations(path)
    assert f"line {expected_line}:" in err.value.message and "CESU-8" in err.value.message
    assert "surrogatepass" in err.value.hint
