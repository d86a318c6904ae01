import json

from conftest import copy_without_chat_template


def test_user_error_is_one_line_exit_2(cli, tmp_path):
    result = cli("config", "check", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "fix:" in lines[0]


def test_unknown_model_exit_2(cli):
    result = cli("generate", "hi", "--model", "definitely-not-a-model")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "unknown model" in result.stderr


def test_bad_option_exit_2(cli):
    result = cli("init")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_init_then_config_check_with_set(cli, tmp_path):
    result = cli("init", str(tmp_path / "p"), "--count", "12")
    assert result.returncode == 0, result.stderr
    result = cli("config", "check", str(tmp_path / "p" / "config.yaml"), "--set", "train.lora.r=4")
    assert result.returncode == 0, result.stderr
    assert "r: 4" in result.stdout


def test_models_json(cli):
    result = cli("models", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["name"] == "smollm2-135m-instruct"


def test_generate_on_tiny_model(cli, tiny_model_dir):
    result = cli("generate", "hello", "--model", str(tiny_model_dir), "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr


def test_generate_on_a_model_without_chat_template_is_one_line(cli, tiny_model_dir, tmp_path):
    base = copy_without_chat_template(tiny_model_dir, tmp_path / "no-template")
    result = cli("generate", "hello", "--model", str(base), "--max-new-tokens", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "no chat template" in result.stderr and "fix:" in result.stderr


def test_internal_error_keeps_traceback(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tunesmith.cli as c\n"
        "@c.app.command('boom')\n"
        "def boom():\n"
        "    raise RuntimeError('bug')\n"
        "c.main(['boom'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: bug" in result.stderr


def test_cli_reference_doc_is_current():
    from pathlib import Path

    from tunesmith.cli import cli_reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    assert doc.read_text() == cli_reference_markdown() + "\n", "run: make docs"
