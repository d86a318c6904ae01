"""The malformed-data corpus (tests/data/malformed): each file gets the right error at the right line.

Every file runs through `tunesmith data check` in-process (`cli.main` with the real parser,
fast); a few also run through the real entry point in a subprocess. The expected errors come
from tests/data/malformed/expected.json, written from what each file is meant to show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main

CORPUS = Path(__file__).parent / "data" / "malformed"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())["files"]
SUBPROCESS_FILES = ["invalid_utf8_cesu8.jsonl", "several_errors.jsonl", "binary_garbage.jsonl"]


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tunesmith ARGS`, run through cli.main in this process."""
    capsys.readouterr()  # drop anything printed before
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_expected(name: str, exit_code: int, report: dict) -> None:
    expected = EXPECTED[name]
    assert exit_code == expected["exit"], (name, report["errors"])
    found = {(f["code"], f["line"]) for f in report["errors"]}
    wanted = {(e["code"], e["line"]) for e in expected["errors"]}
    assert wanted <= found, (name, sorted(found, key=str))
    # Nothing else is blamed: every error is on one of the expected lines.
    assert {line for _, line in found} <= {line for _, line in wanted}, (name, sorted(found, key=str))
    assert all(f["fix"] or f["code"] == "unreadable" for f in report["errors"])


def test_the_corpus_is_complete():
    files = {p.name for p in CORPUS.iterdir() if p.name not in ("expected.json", "generate.py")}
    assert files == set(EXPECTED)
    assert sum(1 for e in EXPECTED.values() if e["exit"] == 2) >= 30
    assert all(p.stat().st_size < 16_384 for p in CORPUS.iterdir() if p.name in EXPECTED)  # small committed files


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_reports_the_expected_errors(name, capsys):
    code, out, err = run_in_process(capsys, "data", "check", str(CORPUS / name), "--json")
    assert "Traceback" not in out + err
    assert_expected(name, code, json.loads(out))


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if EXPECTED[n]["errors"]][:12])
def test_terminal_report_names_line_and_fix(name, capsys):
    code, out, err = run_in_process(capsys, "data", "check", str(CORPUS / name))
    assert code == 2 and "Traceback" not in out + err
    for error in EXPECTED[name]["errors"]:
        assert error["code"] in out
        if error["line"] is not None:
            assert f"line {error['line']}:" in out
    assert "fix:" in out


def test_cesu8_is_named_with_its_conversion(capsys):
    _, out, _ = run_in_process(capsys, "data", "check", str(CORPUS / "invalid_utf8_cesu8.jsonl"), "--json")
    (finding,) = json.loads(out)["errors"]
    assert "CESU-8" in finding["message"] and "surrogatepass" in finding["fix"]


@pytest.mark.parametrize("name", SUBPROCESS_FILES)
def test_real_entry_point(cli, name):
    result = cli("data", "check", str(CORPUS / name), "--json")
    assert "Traceback" not in result.stdout + result.stderr
    assert_expected(name, result.returncode, json.loads(result.stdout))


# ---------------------------------------------------------------- issue 12 §3: edge cases by name


def valid_lines(seed: int, n: int = 10) -> list[bytes]:
    """The corpus generator's valid examples (tests/data/malformed/generate.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("malformed_generate", CORPUS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.valid_lines(seed, n)


def check_json(capsys, path) -> tuple[int, dict]:
    code, out, err = run_in_process(capsys, "data", "check", str(path), "--json")
    assert "Traceback" not in out + err
    return code, json.loads(out)


@pytest.mark.parametrize("line", [1, 2, 7, 60])
def test_nul_byte_gets_its_line_wherever_it_falls(tmp_path, capsys, line):
    lines = valid_lines(300, 70)
    lines[line - 1] = lines[line - 1].replace(b'"content": "', b'"content": "\x00', 1)
    path = tmp_path / "nul.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, report = check_json(capsys, path)
    assert code == 2
    assert [(f["code"], f["line"]) for f in report["errors"]] == [("nul_byte", line)]
    assert "NUL" in report["errors"][0]["message"] and report["errors"][0]["fix"]


@pytest.mark.parametrize("name", ["utf16_le_bom.jsonl", "utf16_be_bom.jsonl", "utf16_le_no_bom.jsonl", "utf16_be_no_bom.jsonl", "utf16_excel.tsv", "utf32_le_bom.jsonl", "utf32_be_no_bom.jsonl"])
def test_wide_encodings_are_named_with_the_fix(capsys, name):
    code, report = check_json(capsys, CORPUS / name)
    (finding,) = report["errors"]
    encoding = "UTF-16" if "16" in name else "UTF-32"
    endian = "little-endian" if "_le_" in name or "excel" in name else "big-endian"
    assert code == 2 and f"{encoding} ({endian})" in finding["message"]
    assert "re-save it as UTF-8" in finding["fix"]


def test_text_content_parts_are_read_joined(capsys):
    from tunesmith.data import read_conversations

    code, report = check_json(capsys, CORPUS / "ok_content_parts_text.jsonl")
    assert code == 0 and report["examples"] == 10
    raw = [json.loads(line) for line in (CORPUS / "ok_content_parts_text.jsonl").read_text().splitlines()]
    conversations = read_conversations(CORPUS / "ok_content_parts_text.jsonl")
    for record, conv in zip(raw, conversations):
        content = record["messages"][1]["content"]
        expected = "".join(p["text"] for p in content) if isinstance(content, list) else content
        assert conv.messages[1].content == expected and len(expected) > 10


@pytest.mark.parametrize("name, kind", [("content_parts_list.jsonl", "image_url"), ("content_parts_audio.jsonl", "input_audio")])
def test_other_content_parts_are_one_error_naming_the_type(capsys, name, kind):
    code, report = check_json(capsys, CORPUS / name)
    (finding,) = report["errors"]
    assert code == 2 and finding["code"] == "unsupported_content_part" and repr(kind) in finding["message"]


def test_control_character_message_says_at_once(capsys):
    _, report = check_json(capsys, CORPUS / "control_char_in_string.jsonl")
    (finding,) = report["errors"]
    assert "at at" not in finding["message"] and "Invalid control character at column" in finding["message"]


def test_huge_single_lines(tmp_path, capsys):
    big = json.dumps({"messages": [{"role": "user", "content": "word " * 800_000}, {"role": "assistant", "content": "ok"}]}).encode()
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b"\n".join(valid_lines(301) + [big]) + b"\n")
    code, report = check_json(capsys, path)
    assert code == 0 and report["examples"] == 11
    path.write_bytes(b"\n".join(valid_lines(301) + [big[:-2]]))  # cut off, no final newline
    code, report = check_json(capsys, path)
    assert code == 2 and [(f["code"], f["line"]) for f in report["errors"]] == [("invalid_json", 11)]
