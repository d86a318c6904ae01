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
    assert all(p.stat().st_size < 16_384 for p in CORPUS.iterdir())  # small committed files


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
