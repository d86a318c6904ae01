"""Outputs the user names (--redact, data convert, data split --out): tunesmith never destroys
user data. It replaces only what it wrote (and nobody changed since), never an input."""

from __future__ import annotations

import json
import os

import pytest

from tunesmith import artifacts
from tunesmith.cli import main


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_refused(code: int, err: str, *words: str) -> None:
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "fix:" in lines[0], err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def data(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"question {i} mail me at a{i}@example.com"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(12)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_redact_never_replaces_a_folder(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("thesis")
    code, _, err = run_in_process(capsys, "data", "check", data, "--redact", "precious")
    assert_refused(code, err, "precious", "folder", "--force")
    assert (precious / "thesis.txt").read_text() == "thesis"
    assert not (tmp_path / ".tunesmith-outputs.json").exists()


@pytest.mark.parametrize("command", ["convert", "split"])
def test_convert_and_split_never_replace_a_folder(data, tmp_path, capsys, command):
    precious = tmp_path / "precious"
    (precious / "train.jsonl").mkdir(parents=True)
    (precious / "train.jsonl" / "thesis.txt").write_text("thesis")
    args = ["data", "convert", data, precious / "train.jsonl"] if command == "convert" else ["data", "split", data, "--out", precious]
    code, _, err = run_in_process(capsys, *args)
    assert_refused(code, err, "train.jsonl", "folder")
    assert (precious / "train.jsonl" / "thesis.txt").read_text() == "thesis"


@pytest.mark.parametrize("command", ["convert", "split", "redact"])
def test_output_under_a_file_is_one_line_not_a_traceback(data, tmp_path, capsys, command):
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    args = {
        "convert": ["data", "convert", data, notes / "out.jsonl"],
        "split": ["data", "split", data, "--out", notes],
        "redact": ["data", "check", data, "--redact", notes / "sub" / "red.jsonl"],
    }[command]
    code, _, err = run_in_process(capsys, *args)
    assert_refused(code, err, "notes.txt", "is a file, not a folder")
    assert notes.read_text() == "notes"


def test_foreign_file_is_refused_unless_force_and_own_output_is_replaced(data, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("my own notes\n")
    code, _, err = run_in_process(capsys, "data", "convert", data, out)
    assert_refused(code, err, "did not write", "--force")
    assert out.read_text() == "my own notes\n"
    code, _, err = run_in_process(capsys, "data", "convert", data, out, "--force")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 12 and artifacts.written_by_tunesmith(out)
    # A re-run replaces tunesmith's own output without --force...
    code, _, err = run_in_process(capsys, "data", "convert", data, out)
    assert code == 0, err
    # ...but not once the user has edited it.
    with open(out, "a") as f:
        f.write('{"messages": []}\n')
    code, _, err = run_in_process(capsys, "data", "convert", data, out)
    assert_refused(code, err, "changed since")
    assert out.read_text().endswith('{"messages": []}\n')


def test_redact_own_output_twice_then_refuse_user_edit(data, tmp_path, capsys):
    out = tmp_path / "redacted.jsonl"
    for _ in range(2):
        code, _, err = run_in_process(capsys, "data", "check", data, "--redact", out)
        assert code == 0, err
    assert "[EMAIL]" in out.read_text()
    out.write_text("edited by hand\n")
    code, _, err = run_in_process(capsys, "data", "check", data, "--redact", out)
    assert_refused(code, err, "redacted.jsonl")
    assert out.read_text() == "edited by hand\n"


def test_output_that_is_the_input_is_refused_even_with_force(data, tmp_path, capsys, monkeypatch):
    before = data.read_bytes()
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    (tmp_path / "sub").mkdir()
    for redact in (data, "data.jsonl", "sub/../data.jsonl", link):
        for force in ([], ["--force"]):
            code, _, err = run_in_process(capsys, "data", "check", "data.jsonl", "--redact", redact, *force)
            assert_refused(code, err, "is the input")
    code, _, err = run_in_process(capsys, "data", "check", data, "--redact", tmp_path, "--force")
    assert_refused(code, err, "holds the input")
    code, _, err = run_in_process(capsys, "data", "convert", data, link, "--force")
    assert_refused(code, err, "is the input")
    assert data.read_bytes() == before and link.is_symlink()


def test_split_into_the_inputs_own_folder_is_refused(data, tmp_path, capsys):
    sp = tmp_path / "sp"
    code, _, err = run_in_process(capsys, "data", "split", data, "--out", sp)
    assert code == 0, err
    train = sp / "train.jsonl"
    before = train.read_bytes()
    for force in ([], ["--force"]):
        code, _, err = run_in_process(capsys, "data", "split", train, "--out", sp, *force)
        assert_refused(code, err, "is the input")
    assert train.read_bytes() == before


def test_eval_file_is_an_input_of_the_check(data, tmp_path, capsys):
    held = tmp_path / "held.jsonl"
    held.write_bytes(data.read_bytes())
    code, _, err = run_in_process(capsys, "data", "check", data, "--eval", held, "--redact", held, "--force")
    assert_refused(code, err, "is the input")
    assert held.read_bytes() == data.read_bytes()


def test_output_inside_an_input_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    code, _, err = run_in_process(capsys, "data", "convert", folder, folder / "out.jsonl", "--force")
    assert_refused(code, err, "is inside the input")
    assert sorted(os.listdir(folder)) == ["dataset_info.json"]
