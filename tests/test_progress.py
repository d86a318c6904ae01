"""Progress outside a terminal: plain lines with an ETA, stage wall times, the eval-loss cost."""

import json
import re
from pathlib import Path

from tunesmith import progress
from tunesmith.humanize import duration_text

DURATION = r"(?:\d+ (?:min|h|d) )?[\d.]+ (?:s|min|h)"  # humanize.duration_text: `0.4 s`, `3 min 05 s`, `1 h 02 min`
from tunesmith.starter import support_tickets


def write_project(folder: Path, model_dir: Path) -> Path:
    records = support_tickets(60, seed=7)
    (folder / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "name": "piped",
        "output_dir": "run",
        "model": {"name": str(model_dir)},
        "data": {"train": "tickets.jsonl", "eval_fraction": 0.2, "max_length": 256},
        "train": {"max_steps": 6, "batch_size": 4, "precision": "fp32", "compile": "off", "learning_rate": 5e-3,
                  "eval_loss_examples": 5},
        "eval": {"max_new_tokens": 4, "max_examples": 6, "batch_size": 2, "few_shot_k": 1,
                 "subjects": ["base", "base-fewshot", "tuned"]},
        "export": {"formats": []},
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_piped_run_prints_periodic_progress_with_an_eta(tiny_model_dir, tmp_path, cli):
    """`tunesmith run ... > log`: no terminal, so plain lines (here at every update: interval 0)."""
    config = write_project(tmp_path, tiny_model_dir)
    result = cli("run", str(config), env={progress.INTERVAL_ENV: "0"})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()

    training = [line for line in lines if re.fullmatch(r"train: step [1-5]/6 \(\d+%\), loss \d+\.\d{4}, \d+ tokens/s(, eval loss \d+\.\d{4})?, "
                                                        rf"{DURATION} elapsed, ETA {DURATION}", line)]
    assert len(training) == 5, result.stderr  # steps 1-5; step 6 ends the task with its own line
    assert any(re.fullmatch(rf"train: 6/6 steps in {DURATION} \([\d.]+ s/step\), loss .*", line) for line in lines), result.stderr

    # Generation: baselines (in the baseline stage) and the fine-tune (in the eval stage).
    for subject in ("base", "base-fewshot", "tuned"):
        partial = [line for line in lines if re.fullmatch(rf"generate {subject}: [24]/6 examples \(\d+%\), [\d.]+ examples/s, {DURATION} elapsed, ETA {DURATION}", line)]
        assert len(partial) == 2, (subject, result.stderr)
        assert any(re.fullmatch(rf"generate {subject}: 6/6 examples in {DURATION} \([\d.]+ examples/s\)", line) for line in lines), subject

    # The in-training eval loss: on the capped sample, with its cost; about 10 evals per run
    # (here 6 steps: one per step) plus the base model's.
    evals = [line for line in lines if line.startswith("eval loss ")]
    assert len(evals) == 7 and all(re.fullmatch(r"eval loss \d+\.\d{4} (of the base model|at step \d) \(5 held-out examples, " + DURATION + r"\)", e) for e in evals), evals
    # Every stage ends with its wall time.
    for stage in ("check", "split", "baseline", "train", "eval"):
        assert any(re.fullmatch(rf"{stage}: done in {DURATION}", line) for line in lines), stage
    # The record `tunesmith runs` reads: the last task, finished.
    record = progress.read_record(tmp_path / "run")
    assert record["finished"] and record["what"] == "generate tuned" and record["done"] == record["total"] == 6


def test_status_text_rate_and_eta():
    # A resumed task: 40 of 100 steps done before, 10 more in 20 s -> 2 s/step, 50 left.
    text = progress.status_text("train", 50, 100, "step", 20.0, 10, {"loss": "1.2345", "tokens/s": "880"})
    assert text == "train: step 50/100 (50%), loss 1.2345, 880 tokens/s, 20 s elapsed, ETA 1 min 40 s"
    text = progress.status_text("generate base", 30, 120, "examples", 60.0, 30, {})
    assert text == "generate base: 30/120 examples (25%), 0.50 examples/s, 1 min elapsed, ETA 3 min"
    assert duration_text(7322) == "2 h 02 min"


def test_a_terminal_gets_a_bar_and_a_pipe_gets_lines(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    outputs = {}
    for name, terminal in (("terminal", True), ("pipe", False)):
        monkeypatch.setattr("sys.stdout.isatty", lambda terminal=terminal: terminal)
        stream = io.StringIO()
        console = Console(file=stream, force_terminal=terminal, width=200)
        with progress.Progress("train", 3, "step", console=console, run_dir=tmp_path) as bar:
            for step in (1, 2, 3):
                bar.update(step, loss=f"{1 / step:.4f}")
            assert progress.read_record(tmp_path)["done"] == 3 and not progress.read_record(tmp_path)["finished"]
        outputs[name] = stream.getvalue()
    # Piped: one plain line per update (interval 0), no control codes.
    assert "train: step 2/3 (67%), loss 0.5000, " in outputs["pipe"] and "\x1b" not in outputs["pipe"]
    # A terminal: the bar draws itself (escape codes), without the plain lines.
    assert "\x1b[" in outputs["terminal"] and "train: step 2/3" not in outputs["terminal"]
    for output in outputs.values():
        assert "train: 3/3 steps in " in output  # the end line with the wall time, in both
    assert progress.read_record(tmp_path)["finished"]
