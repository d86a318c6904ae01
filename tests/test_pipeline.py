"""`tunesmith run`: the whole pipeline on the tiny model, skipping, resuming after SIGKILL."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunesmith import artifacts, pipeline, train
from tunesmith.artifacts import read_manifest_or_empty
from tunesmith.checkpoints import list_checkpoints
from tunesmith.runs import run_summary
from tunesmith.starter import support_tickets


def write_project(folder: Path, model_dir: Path, count: int = 60, **train_keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = support_tickets(count, seed=7)
    (folder / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "name": "tiny-pipeline",
        "output_dir": "run",
        "model": {"name": str(model_dir)},
        "data": {"train": "tickets.jsonl", "eval_fraction": 0.2, "max_length": 256},
        "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "compile": "off", "learning_rate": 5e-3, **train_keys},
        "eval": {"max_new_tokens": 8, "max_examples": 6, "batch_size": 6, "few_shot_k": 2},
        "export": {"formats": ["adapter"]},
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def single_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def stage_states(run_dir: Path) -> dict:
    return {k: v.get("status") for k, v in read_manifest_or_empty(run_dir).get("pipeline", {}).items()}


def test_run_completes_then_skips_unchanged_stages(tiny_model_dir, tmp_path, cli):
    config = write_project(tmp_path, tiny_model_dir)
    first = cli("run", str(config))
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "run"
    assert stage_states(run_dir) == {s: "done" for s in pipeline.STAGES}
    for relative in (
        artifacts.CHECK_REPORT_FILE,
        artifacts.TRAIN_SPLIT_FILE,
        artifacts.EVAL_SPLIT_FILE,
        artifacts.ADAPTER_DIR + "/adapter_model.safetensors",
        "eval/report.html",
        "eval/results.json",
        "eval/predictions.jsonl",
        "export/adapter/adapter_config.json",
    ):
        assert (run_dir / relative).exists(), relative
    assert "report:" in first.stdout

    again = cli("run", str(config))
    assert again.returncode == 0, again.stderr
    for stage in pipeline.STAGES:
        assert f"{stage}: unchanged, skipped" in again.stderr, stage

    # An evaluation setting changed: only the evaluations run again.
    edited = cli("run", str(config), "--set", "eval.max_new_tokens=6")
    assert edited.returncode == 0, edited.stderr
    skipped = {s for s in pipeline.STAGES if f"{s}: unchanged, skipped" in edited.stderr}
    assert skipped == {"check", "split", "train", "export"}

    listed = cli("runs", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["tiny-pipeline"] and rows[0]["status"] == "done export"


def test_sigkill_during_training_then_rerun_reuses_stages_and_checkpoint(tiny_model_dir, tmp_path):
    config = write_project(tmp_path, tiny_model_dir, max_steps=80, save_every=5, batch_size=2)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "tunesmith", "run", str(config)]
    # A progress record at every step, so that `tunesmith runs` shows the live step.
    env = {**single_thread_env(), "TUNESMITH_PROGRESS_INTERVAL_S": "0"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = run_dir / artifacts.CHECKPOINTS_DIR
    while proc.poll() is None and not list_checkpoints(checkpoints):
        time.sleep(0.002)
    live = run_summary(run_dir)["status"]
    proc.kill()  # SIGKILL mid-training: nothing gets to clean up
    proc.wait()
    assert proc.returncode == -9, proc.stderr.read().decode()
    assert re.fullmatch(r"running train: step \d+/80 \(\d+%\), loss [\d.]+, \d+ tokens/s.*, ETA .+", live), live
    states = stage_states(run_dir)
    assert states["train"] == "running" and states["baseline"] == "done"
    # Killed, it could record nothing; its process is gone, so it failed.
    assert run_summary(run_dir)["status"].startswith(f"failed at train: the process (pid {proc.pid}) ended without finishing it")
    assert not (run_dir / artifacts.ADAPTER_DIR).exists()
    killed_at = int(list_checkpoints(checkpoints)[-1].name.split("-")[1])

    rerun = subprocess.run(command, env=single_thread_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    for stage in ("check", "split", "baseline"):
        assert f"{stage}: unchanged, skipped" in rerun.stderr, stage
    assert "train (resuming)" in rerun.stderr
    assert f"resuming from step-{killed_at}" in rerun.stderr or f"step-{killed_at}" in rerun.stderr
    assert stage_states(run_dir) == {s: "done" for s in pipeline.STAGES}
    steps = [m["step"] for m in train.read_metrics(run_dir / artifacts.METRICS_FILE) if "loss" in m]
    assert steps == list(range(1, 81))  # every step once: the resumed run continued, not restarted


def test_data_errors_stop_the_run_before_training(tiny_model_dir, tmp_path, cli):
    config = write_project(tmp_path, tiny_model_dir)
    with open(tmp_path / "tickets.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    result = cli("run", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "training was not started" in result.stderr and "line 61" in result.stderr
    assert not (tmp_path / "run" / artifacts.TRAIN_DIR).exists()
    # `tunesmith runs` says where and why it stopped (it used to say "running check" for good).
    listed = cli("runs", "--json")
    status = json.loads(listed.stdout)[0]["status"]
    assert status.startswith("failed at check: the data check found 1 error in") and "line 61" in status


def test_unknown_stage_is_a_user_error(tiny_model_dir, tmp_path, cli):
    config = write_project(tmp_path, tiny_model_dir)
    result = cli("run", str(config), "--from", "deploy")
    assert result.returncode == 2 and "unknown stage" in result.stderr


@pytest.mark.parametrize("stage", ["split"])
def test_until_stops_early(tiny_model_dir, tmp_path, cli, stage):
    config = write_project(tmp_path, tiny_model_dir)
    result = cli("run", str(config), "--until", stage)
    assert result.returncode == 0, result.stderr
    assert set(stage_states(tmp_path / "run")) == {"check", "split"}


def test_gates_judge_the_fine_tune_not_the_baselines(tiny_model_dir, tmp_path, cli):
    config = write_project(tmp_path, tiny_model_dir)
    result = cli("run", str(config), "--set", "eval.gates=['exact_match>=0.99']")
    assert result.returncode == 3, result.stderr  # the random tiny model cannot pass it
    assert "gate failed" in result.stderr and "tuned" in result.stderr
    states = stage_states(tmp_path / "run")
    assert states["baseline"] == "done" and states["train"] == "done" and states["eval"] == "failed"
    assert "export" not in states
    assert run_summary(tmp_path / "run")["status"].startswith("failed at eval: gate failed: exact_match>=0.99")
    assert (tmp_path / "run" / "eval" / "report.md").exists()


def test_pipeline_replaces_its_own_training_but_not_one_run_by_hand(tiny_model_dir, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.errors import UserError

    config = write_project(tmp_path, tiny_model_dir)
    train.run(load_config(config))  # by hand: the pipeline has no record of it
    # Twice: the refused attempt once left a train record that made the next run resume it.
    for _ in range(2):
        with pytest.raises(UserError, match="already holds a trained run"):
            pipeline.run(load_config(config), until_stage="train")
    pipeline.run(load_config(config), until_stage="train", force=True)
    # Its own training, with changed inputs, is redone without --force; unchanged, skipped.
    assert "skipped" not in pipeline.run(load_config(config, ["train.learning_rate=1e-2"]), until_stage="train")["train"]
    assert pipeline.run(load_config(config, ["train.learning_rate=1e-2"]), until_stage="train")["train"]["skipped"]


def test_baseline_inputs_include_the_data_settings_that_cut_prompts(tiny_model_dir, tmp_path):
    """Eval prompts are truncated like training examples (data.max_length, data.truncate): a
    change there changes the baselines' prompts, so the baseline stage must not be skipped."""
    from tunesmith.config import load_config

    config = write_project(tmp_path, tiny_model_dir)
    before = pipeline.stage_inputs("baseline", load_config(config), "fp")
    for change in ("data.max_length=64", "data.truncate=true"):
        assert pipeline.stage_inputs("baseline", load_config(config, [change]), "fp") != before, change
    assert pipeline.stage_inputs("baseline", load_config(config), "fp") == before
