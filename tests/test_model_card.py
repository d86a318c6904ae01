"""The model card every export carries, the Hub folder, and `tunesmith push` without a network.

The run is trained by train.run and evaluated by evaluate.run (tiny model), so the card's
numbers are the run's own; the card is read back with huggingface_hub's ModelCard, the tool
the Hub uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import copy_run, train_tiny_run

from tunesmith import evaluate, export
from tunesmith.config import load_config
from tunesmith.model_card import card_text, front_matter
from tunesmith.models import fingerprint


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny LoRA run, evaluated against the zero-shot base on 6 held-out examples."""
    project = tmp_path_factory.mktemp("card")
    run_dir = train_tiny_run(project, tiny_model_dir, name="card-run", eval_settings={"subjects": ["base", "tuned"], "max_examples": 6})
    evaluate.run(load_config(project / "config.yaml"))
    return run_dir


@pytest.mark.parametrize("fmt", ["adapter", "merged", "gguf", "ollama"])
def test_every_export_writes_a_card_from_the_runs_records(evaluated_run, tiny_model_dir, fmt, tmp_path):
    from huggingface_hub import ModelCard

    run_dir = copy_run(evaluated_run, tmp_path / "run")
    report = export.run(run_dir, fmt)
    card_path = Path(report["path"]) / "README.md"
    card = ModelCard.load(card_path)
    meta = card.data.to_dict()
    assert meta["license"] == "other"  # a local base folder with no card: no licence to inherit
    assert meta["library_name"] == {"adapter": "peft", "merged": "transformers"}.get(fmt, "gguf")
    assert {"tunesmith", "lora"} <= set(meta["tags"]) and "base_model" not in meta  # no Hub id for a local base

    manifest = json.loads((run_dir / "manifest.json").read_text())
    text = card_path.read_text()
    assert f"`{fingerprint(tiny_model_dir)}`" in text
    assert manifest["train"]["data"]["train_sha256"] in text and "30 examples" in text
    assert "| LoRA rank / alpha / dropout | 4 / 8 / 0 |" in text and "| learning rate, schedule, warmup | 0.01, cosine," in text
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    for subject in ("base", "tuned"):
        m = results["subjects"][subject]["metrics"][results["primary_metric"]]
        assert f"| {m['value']:.3f} | [{m['ci_low']:.3f}, {m['ci_high']:.3f}] |" in text
    assert f"**Verdict.** {manifest['eval']['verdict']}" in text
    assert "## Intended use" in text and "## Limits" in text and "## Licence" in text


def test_card_says_when_a_run_was_not_evaluated(tiny_run):
    text = card_text(tiny_run, "adapter")
    assert "Not evaluated: run `tunesmith eval RUN`" in text and "It has not been evaluated" in text
    assert "|---|---|---|" not in text  # no score table without scores


def test_card_takes_the_licence_and_use_from_the_config(evaluated_run, tmp_path):
    run_dir = copy_run(evaluated_run, tmp_path / "run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["train"]["config"]["export"].update({"license": "mit", "intended_use": "Routing tickets for ACME."})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    text = card_text(run_dir, "adapter")
    assert front_matter(text)["license"] == "mit" and "set in the run's config (`export.license`)" in text
    assert "Routing tickets for ACME." in text


def test_builtin_base_names_its_hub_origin_and_licence():
    from tunesmith.model_card import base_origin

    assert base_origin("smollm2-135m-instruct", None) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_origin("some-org/some-model", None) == ("some-org/some-model", None)


def test_hub_folder_holds_the_adapter_the_gguf_and_the_card(evaluated_run, tmp_path, cli):
    from huggingface_hub import ModelCard
    from peft import PeftConfig

    run_dir = copy_run(evaluated_run, tmp_path / "run")
    export.run(run_dir, "gguf")
    result = cli("export", str(run_dir), "--format", "hub")
    assert result.returncode == 0, result.stderr
    folder = run_dir / "export" / "hub"
    names = {p.name for p in folder.iterdir()}
    ggufs = {p.name for p in (run_dir / "export" / "gguf").glob("*.gguf")}
    assert ggufs and ggufs <= names and {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert PeftConfig.from_pretrained(str(folder)).r == 4  # PEFT opens it as its own folder
    meta = ModelCard.load(folder / "README.md").data.to_dict()
    assert meta["library_name"] == "peft" and "gguf" in meta["tags"]
    assert "parity: exported artifact matches" in result.stdout


def _push(cli, run_dir: Path, tmp_path: Path, **env) -> tuple[int, str]:
    base_env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
    result = cli("push", str(run_dir), "someone/tiny-card", env={**base_env, **env})
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.strip()


def test_push_fails_in_one_line_without_token_or_network(evaluated_run, tmp_path, cli):
    run_dir = copy_run(evaluated_run, tmp_path / "run")
    code, err = _push(cli, run_dir, tmp_path)
    assert code == 2 and "--format hub` first" in err and len(err.splitlines()) == 1

    assert cli("export", str(run_dir), "--format", "hub").returncode == 0
    code, err = _push(cli, run_dir, tmp_path)
    assert code == 2 and err.startswith("error: no Hugging Face token") and len(err.splitlines()) == 1
    code, err = _push(cli, run_dir, tmp_path, HF_TOKEN="hf_fake", HF_HUB_OFFLINE="1")
    assert code == 2 and err.startswith("error: could not push") and len(err.splitlines()) == 1, err
    # No network: nothing listens on port 9 of this machine.
    code, err = _push(cli, run_dir, tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT="http://127.0.0.1:9")
    assert code == 2 and re.match(r"error: could not push .* to someone/tiny-card: ", err) and len(err.splitlines()) == 1, err
