"""runs.py: the typed train record, the drift guard in every stage that loads a run, and the
loader that keeps small LoRA updates. Every run here is trained by train.run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, train_tiny_run

from tunesmith import artifacts, evaluate, export, runs
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.models import fingerprint
from tunesmith.serve import ServeSettings, create_app


def test_train_writes_the_base_fingerprint_that_loaders_read(tiny_run, tiny_model_dir):
    record = runs.read_train_record(tiny_run)
    assert record.base_model.fingerprint == fingerprint(tiny_model_dir) == runs.trained_base_fingerprint(tiny_run)
    raw = json.loads((tiny_run / artifacts.MANIFEST_FILE).read_text())["train"]
    assert raw["base_model"]["fingerprint"] == record.base_model.fingerprint
    loaded = runs.load_run_model(tiny_run)
    assert loaded.trained_on_base_fingerprint == loaded.base_fingerprint == record.base_model.fingerprint


def test_a_swapped_base_is_refused_by_export_eval_and_serve(tmp_path, cli):
    """The regression: train wrote the fingerprint under train.base_model.fingerprint and every
    loader read train.base_fingerprint (never written), so a changed base went through."""
    base = build_tiny_model(tmp_path / "base")
    run_dir = train_tiny_run(tmp_path / "project", base, name="drift")
    trained_fp = fingerprint(base)
    # The same name and architecture, other weights: the adapter still loads, silently wrong.
    build_tiny_model(base, seed=1)
    swapped_fp = fingerprint(base)
    assert swapped_fp != trained_fp

    result = cli("export", str(run_dir), "--format", "adapter")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and trained_fp in result.stderr and "--allow-base-mismatch" in result.stderr
    result = cli("eval", str(tmp_path / "project" / "config.yaml"), "--subjects", "tuned", "--max-examples", "2")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and trained_fp in result.stderr
    with pytest.raises(UserError, match=trained_fp):
        create_app(ServeSettings(models=[str(run_dir)]))

    # --allow-base-mismatch: a warning, and the work is done.
    report = export.run(run_dir, "adapter", allow_base_mismatch=True)
    assert "allowed by --allow-base-mismatch" in report["warning"]
    cfg = load_config(tmp_path / "project" / "config.yaml", ["eval.subjects=[tuned]", "eval.max_examples=2"])
    results = evaluate.run(cfg, allow_base_mismatch=True)
    assert trained_fp in results["subjects"]["tuned"]["warning"] and results["examples"] == 2
    app = create_app(ServeSettings(models=[str(run_dir)], allow_base_mismatch=True))
    assert len(app.state.warnings) == 1 and trained_fp in app.state.warnings[0]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_small_lora_updates_survive_the_loader(tmp_path):
    """A run trained with a tiny learning rate on a bf16-released base: its LoRA update is far
    below the bf16 step of the weights. The old eval loader (merge in fp32, cast to bf16) erased
    it completely; runs.load_run_model keeps it, at any requested dtype."""
    from peft import PeftModel

    from tunesmith.inference import render_ids
    from tunesmith.models import load_model

    base_dir = build_tiny_model(tmp_path / "base", bf16_exact=True)
    run_dir = train_tiny_run(tmp_path / "project", base_dir, train={"learning_rate": 1e-9, "max_steps": 2})
    trained = runs.load_run_model(run_dir, dtype=torch.bfloat16)
    ids = render_ids(trained.tokenizer, [{"role": "user", "content": "my package #12345 has not moved for 8 days"}])
    base = load_model(str(base_dir)).model
    new_diff = float((_logits(trained.model, ids) - _logits(base, ids)).abs().max())
    # The update reaches the logits, and nothing else moves them (no bf16 rounding noise, which
    # is ~1e-2 here and would drown an update of ~1e-7).
    assert 0 < new_diff < 1e-4

    # What the old loader computed: every merged weight rounds back to the base's bf16 weight.
    old = PeftModel.from_pretrained(load_model(str(base_dir)).model, str(run_dir / artifacts.ADAPTER_DIR)).merge_and_unload()
    old = old.to(torch.bfloat16)
    base_bf16 = load_model(str(base_dir)).model.to(torch.bfloat16)  # cast the same way (rotary buffers too)
    changed = sum(int((a != b).sum()) for a, b in zip(old.state_dict().values(), base_bf16.state_dict().values()))
    assert changed == 0
    assert torch.equal(_logits(old, ids), _logits(base_bf16, ids))


def test_a_foreign_train_record_is_a_user_error(tiny_run, tmp_path):
    from conftest import copy_run

    run_dir = copy_run(tiny_run, tmp_path / "run")
    manifest = json.loads((run_dir / artifacts.MANIFEST_FILE).read_text())
    manifest["train"] = {"base_fingerprint": "abc"}  # the shape the old test fixture wrote by hand
    (run_dir / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="train record is not one tunesmith train wrote"):
        runs.load_run_model(run_dir)


def test_the_run_config_resolves_paths_as_training_did(tmp_path, tiny_model_dir, monkeypatch):
    """The train record's config keeps the config's folder: read back from another working
    directory, output_dir and the data files resolve as when training (without it, every
    relative path resolved against the caller's current directory)."""
    project = tmp_path / "project"
    run_dir = train_tiny_run(project, tiny_model_dir, train={"max_steps": 1})
    monkeypatch.chdir(tmp_path)
    cfg = runs.read_run_config(run_dir)
    assert cfg.run_dir.resolve() == run_dir.resolve()
    assert cfg.resolve(cfg.data.train).resolve() == (project / "train.jsonl").resolve()
    assert runs.run_summary(run_dir)["data"] == "train.jsonl"  # the registry shows the config as written


def test_a_relative_model_folder_is_relative_to_the_config_in_every_stage(tmp_path, tiny_model_dir, monkeypatch):
    """model.name `base` next to the config: train, eval's base model and the run loader all
    take the config's folder (train and eval took the current directory, the loader the
    config's: run from elsewhere, training failed or trained another model than was loaded)."""
    import shutil

    from tunesmith import train

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "base")
    train_tiny_run(project, project / "base", train={"max_steps": 1})  # writes data and config.yaml
    config = json.loads((project / "config.yaml").read_text())
    config["model"]["name"] = "base"
    (project / "config.yaml").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(project / "config.yaml", ["eval.subjects=[base,tuned]", "eval.max_examples=2"])
    train.run(cfg, force=True)
    assert runs.read_train_record(cfg.run_dir).base_model.fingerprint == fingerprint(project / "base")
    assert runs.load_run_model(cfg.run_dir).base_path.resolve() == (project / "base").resolve()
    results = evaluate.run(cfg)
    assert results["subjects"]["base"]["fingerprint"] == fingerprint(project / "base")
