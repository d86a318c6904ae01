"""What a new user meets in the first hour: full fingerprints, readable numbers and plurals,
marks that survive a pipe, a version, and errors that say what to do."""

import json
import re
import shutil

import pytest

from tunesmith.errors import UserError
from tunesmith.humanize import duration_text, number_text, plural


def cached_model(tiny_model_dir, home):
    """The tiny model as a cached model under TUNESMITH_HOME, as `tunesmith models` lists it."""
    from tunesmith.models import SOURCE_FILE, fingerprint

    folder = home / "models" / "tiny-cached"
    shutil.copytree(tiny_model_dir, folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"source": str(tiny_model_dir)}))
    return folder, fingerprint(folder)


def test_models_prints_the_whole_fingerprint_in_a_pinnable_line(cli, tiny_model_dir, tunesmith_home):
    _, fp = cached_model(tiny_model_dir, tunesmith_home)
    result = cli("models", env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    assert f"expected_fingerprint: {fp}" in result.stdout.splitlines()[-1]


def test_a_shortened_pin_is_refused_at_config_load_with_the_fix(cli, tiny_model_dir, tmp_path, write_jsonl):
    write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 12, "train.jsonl")
    (tmp_path / "c.yaml").write_text(f"model: {{name: {tiny_model_dir}, expected_fingerprint: '{'ab' * 8}'}}\ndata: {{train: train.jsonl}}\n")
    result = cli("config", "check", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.expected_fingerprint" in result.stderr and "64 lowercase hex characters, got 16" in result.stderr


def test_fingerprint_mismatch_prints_where_the_values_differ(tiny_model_dir):
    from tunesmith.models import check_expected_fingerprint

    actual = "0123456789abcdef" * 4
    pinned = actual[:20] + "ffff" + actual[24:]
    with pytest.raises(UserError) as e:
        check_expected_fingerprint("m", actual, pinned)
    message = e.value.one_line()
    assert f"both start {actual[:20]}, then the model has {actual[20:]} where the config pins {pinned[20:]}" in message
    with pytest.raises(UserError) as e:
        check_expected_fingerprint("m", actual, actual[:16])
    assert "only the first 16 of the 64 characters" in e.value.one_line() and f"expected_fingerprint: {actual}" in e.value.one_line()


def test_load_model_refuses_another_pin_with_the_differing_part(tiny_model_dir):
    from tunesmith.models import fingerprint, load_model

    fp = fingerprint(tiny_model_dir)
    other = fp[:40] + ("0" if fp[40] != "0" else "1") + fp[41:]
    with pytest.raises(UserError, match=f"both start {fp[:40]}, then the model has {fp[40:]}"):
        load_model(str(tiny_model_dir), expected_fingerprint=other)


def test_show_mask_brackets_the_trained_tokens_in_a_pipe(cli, tiny_model_dir, tmp_path, write_jsonl):
    write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "UNIQUEANSWER"}]}] * 3, "train.jsonl")
    (tmp_path / "c.yaml").write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: train.jsonl}}\n")
    result = cli("train", str(tmp_path / "c.yaml"), "--show-mask", "2")
    assert result.returncode == 0, result.stderr
    legend, _, body = result.stdout.partition("\n")
    assert legend == "trained tokens are between [[ and ]]"
    marked = re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)
    assert len(marked) == 2 and all(m.startswith("UNIQUEANSWER") for m in marked), result.stdout
    assert "hi" not in "".join(marked)


def test_cli_reference_usage_lines_name_each_command_once():
    from tunesmith.cli import cli_reference_markdown

    usages = [line for line in cli_reference_markdown().splitlines() if line.startswith("Usage:")]
    assert "Usage: tunesmith data check [OPTIONS] {file}" in usages
    assert not [u for u in usages if u.count("tunesmith") != 1]


def test_config_reference_writes_types_as_python_does():
    from tunesmith.config import config_reference_markdown

    doc = config_reference_markdown()
    assert "<class" not in doc
    assert "| `model.name` | `str (length >= 1)` |" in doc and "| `train.epochs` | `float (> 0, <= 10000)` |" in doc


def test_plural_and_durations_read_as_words():
    assert [plural(n, "error") for n in (0, 1, 2, 1500)] == ["0 errors", "1 error", "2 errors", "1,500 errors"]
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"
    assert [duration_text(s) for s in (4.25, 45, 200, 3900, 3600 * 26)] == ["4.2 s", "45 s", "3 min 20 s", "1 h 05 min", "1 d 02 h"]
    assert [number_text(v) for v in (0.5333333333333333, 1.1e-05, 12345.678, 3, "lora", None)] == ["0.5333", "1.10e-05", "12,345.7", "3", "lora", "None"]


def test_data_check_says_1_error(cli, write_jsonl):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(11)]
    path = write_jsonl(rows + ['{"messages": [{"role": "user", "content": "no answer"}]}'])
    result = cli("data", "check", str(path))
    assert result.returncode == 2
    assert "\n1 error\n" in result.stdout and "1 errors" not in result.stdout


def test_advise_keeps_each_reason_on_one_line_in_a_pipe(cli, tmp_path):
    from tunesmith.starter import write_starter

    _, data = write_starter(tmp_path / "p", count=300)
    result = cli("advise", str(data), env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("recommendation: ") and lines[1].startswith("task: ")
    assert all(line.startswith("  - ") for line in lines[2:]) and len(lines) > 3
    assert any(len(line) > 60 for line in lines), "a reason longer than the width stays whole"


def evaluated_run(folder, tiny_model_dir, seed):
    """A tiny LoRA run trained by train.run and evaluated (tuned only, 4 examples) by evaluate.run."""
    from conftest import train_tiny_run

    from tunesmith import evaluate
    from tunesmith.config import load_config

    run_dir = train_tiny_run(folder, tiny_model_dir, seed=seed)
    evaluate.run(load_config(folder / "config.yaml", ["eval.subjects=[tuned]", "eval.max_examples=4"]))
    return run_dir


def test_runs_compare_formats_numbers(cli, tiny_model_dir, tmp_path):
    a = evaluated_run(tmp_path / "a", tiny_model_dir, seed=0)
    b = evaluated_run(tmp_path / "b", tiny_model_dir, seed=1)
    result = cli("runs", "compare", str(a), str(b), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert re.search(r"train\.seed\s+\S+\s+0\s+\S+\s+1\b", result.stdout), result.stdout
    rows = [line for line in result.stdout.splitlines() if "tuned." in line]
    assert rows and not re.search(r"\d\.\d{5,}", result.stdout), result.stdout
    assert all(re.search(r"[+-]\d|\b0\.0000\b", row) for row in rows if row.count(".") >= 3), rows


def test_version(cli):
    from tunesmith import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tunesmith {__version__}"


def test_a_hub_dataset_id_gets_the_offline_fix(cli, tmp_path):
    result = cli("data", "check", "someuser/support-tickets", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = " ".join((result.stdout + result.stderr).split())  # the data check's report, unwrapped
    assert "looks like a Hugging Face Hub dataset id" in line and "needs the network" in line
    assert "save_to_disk('data/support-tickets')" in line and "pass data/support-tickets" in line
    result = cli("data", "check", "someuser/support-tickets.jsonl", cwd=tmp_path)
    assert "support-tickets.jsonl not found" in result.stdout and "Hub" not in result.stdout


def test_config_check_names_a_hub_id_in_data_train(cli, tmp_path):
    from tunesmith.starter import write_starter

    config, _ = write_starter(tmp_path / "p", count=12)
    result = cli("config", "check", str(config), "--set", "data.train=someuser/tickets")
    assert result.returncode == 2
    assert "data.train: someuser/tickets not found: it looks like a Hugging Face Hub dataset id" in result.stderr
