"""report_to: what a run logs to TensorBoard, MLflow and W&B, read back with each library's own reader."""

import importlib.util
import json
from pathlib import Path

import pytest

from tunesmith import artifacts, evaluate, tracking, train
from tunesmith.config import load_config
from tunesmith.errors import UserError
from tunesmith.starter import support_tickets

INSTALLED = [name for name in tracking.TRACKERS if importlib.util.find_spec(tracking.MODULES[name]) is not None]


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """(run folder, train summary, eval results) of a tiny run that reports to every installed tracker."""
    if not INSTALLED:
        pytest.skip("none of tensorboard, mlflow, wandb is installed (pip install 'tunesmith[tracking]')")
    folder = tmp_path_factory.mktemp("tracked")
    records = support_tickets(40, seed=3)
    for name, part in (("train.jsonl", records[:30]), ("eval.jsonl", records[30:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    config = {
        "name": "tracked", "output_dir": "run", "model": {"name": str(tiny_model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 256},
        "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "compile": "off", "learning_rate": 1e-2, "eval_every": 2},
        "eval": {"max_new_tokens": 4, "bootstrap_samples": 50, "precision": "fp32", "subjects": ["base", "tuned"]},
        "report_to": INSTALLED,
    }
    (folder / "config.yaml").write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as mp:
        # Offline, and nothing outside the test's folder: never the network, never ~/.config.
        mp.setenv("TUNESMITH_HOME", str(folder / "home"))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(key, str(folder / "wandb-home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config(folder / "config.yaml")
        summary = train.run(cfg)
        results = evaluate.run(cfg)
    return cfg.run_dir, summary, results


def step_rows(run_dir: Path) -> list[dict]:
    return [m for m in train.read_metrics(run_dir / artifacts.METRICS_FILE) if "loss" in m]


def eval_rows(run_dir: Path) -> list[dict]:
    return [m for m in train.read_metrics(run_dir / artifacts.METRICS_FILE) if "eval_loss" in m]


def assert_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """(step, value) pairs: the same steps, the same values (float32 in TensorBoard)."""
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_tensorboard_event_files_hold_the_run(tracked_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'tunesmith[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary, results = tracked_run
    events = EventAccumulator(str(run_dir / artifacts.TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    rows = step_rows(run_dir)
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"), ("tokens_per_s", "train/tokens_per_s")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3, 4]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    assert_series([(e.step, e.value) for e in events.Scalars("eval/loss")], [(m["step"], m["eval_loss"]) for m in eval_rows(run_dir)])
    primary = results["primary_metric"]
    assert events.Scalars(f"eval/tuned/{primary}")[0].value == pytest.approx(results["subjects"]["tuned"]["metrics"][primary]["value"])
    assert events.Scalars(f"eval/base/{primary}")[0].value == pytest.approx(results["subjects"]["base"]["metrics"][primary]["value"])
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"] if tag.endswith("text_summary")}
    assert results["verdict"]["text"] in texts["verdict/text_summary"]
    assert summary["trainable_parameters"] and "| train.lora.r | 16 |" in texts["params/text_summary"]
    assert events.Images("train/loss")[0].width > 100  # the loss plot


def test_mlflow_client_reads_params_metrics_and_artifacts(tracked_run):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'tunesmith[tracking]')")
    from mlflow.tracking import MlflowClient

    run_dir, summary, results = tracked_run
    client = MlflowClient(tracking_uri=(run_dir / artifacts.MLFLOW_DIR).resolve().as_uri())
    run_id = json.loads((run_dir / artifacts.TRACKING_FILE).read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    manifest = json.loads((run_dir / artifacts.MANIFEST_FILE).read_text())["train"]
    assert run.data.params["base_model.fingerprint"] == manifest["base_model"]["fingerprint"]
    assert run.data.params["train.max_steps"] == "4" and run.data.params["model.name"] == manifest["config"]["model"]["name"]
    history = client.get_metric_history(run_id, "train/loss")
    assert_series([(m.step, m.value) for m in sorted(history, key=lambda m: m.step)], [(r["step"], r["loss"]) for r in step_rows(run_dir)])
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"):
        assert client.get_metric_history(run_id, key), key
    primary = results["primary_metric"]
    for subject in ("base", "tuned"):
        assert run.data.metrics[f"eval/{subject}/{primary}"] == pytest.approx(results["subjects"][subject]["metrics"][primary]["value"])
    assert run.data.tags["verdict"] == results["verdict"]["text"]
    listed = {a.path for a in client.list_artifacts(run_id, "eval")} | {a.path for a in client.list_artifacts(run_id, "train")}
    assert {"eval/report.html", "train/loss.png"} <= listed
    assert {a.path for a in client.list_artifacts(run_id, "model/adapter")} >= {"model/adapter/adapter_model.safetensors", "model/adapter/adapter_config.json"}


def wandb_records(path: Path):
    """The serialised records of a .wandb file, for wandb's own `Record` protobuf to parse.

    wandb 0.31 writes the file from its Go core and no longer ships the Python reader
    (wandb.sdk.internal.datastore); the framing it keeps is LevelDB's log format: a 7-byte
    header (":W&B", magic, version), then 32 KiB blocks of records, each with a 7-byte header
    (checksum, length, type: 1 full, 2 first, 3 middle, 4 last part).
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block_bytes, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        left_in_block = block_bytes - offset % block_bytes
        if left_in_block < 7:  # a block's tail too short for a header is padding
            offset += left_in_block
            continue
        length, kind = int.from_bytes(data[offset + 4 : offset + 6], "little"), data[offset + 6]
        if kind == 0 and length == 0:
            offset += left_in_block
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_files_hold_the_run(tracked_run):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'tunesmith[tracking]')")
    from wandb.proto import wandb_internal_pb2

    run_dir, summary, results = tracked_run
    run_id = json.loads((run_dir / artifacts.TRACKING_FILE).read_text())["wandb_run_id"]
    files = sorted((run_dir / artifacts.WANDB_DIR / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # training, then evaluation, in the same run
    history, config, summaries, artifact_names = {}, {}, {}, []
    for path in files:
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((items["_step"], value))
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "summary":
                summaries.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
            elif kind == "artifact":
                artifact_names.append(record.artifact.name)
    rows = step_rows(run_dir)
    assert_series(history["train/loss"], [(r["step"], r["loss"]) for r in rows])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= set(history)
    manifest = json.loads((run_dir / artifacts.MANIFEST_FILE).read_text())["train"]
    assert config["base_model.fingerprint"] == manifest["base_model"]["fingerprint"]
    primary = results["primary_metric"]
    assert summaries[f"eval/tuned/{primary}"] == pytest.approx(results["subjects"]["tuned"]["metrics"][primary]["value"])
    assert summaries["verdict"] == results["verdict"]["text"]
    assert {"tracked-model-adapter", "tracked-train-loss.png", "tracked-eval-report.html"} <= set(artifact_names)


def test_a_tracker_that_is_not_installed_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.MODULES, "wandb", "wandb_not_installed_here")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in support_tickets(8, seed=1)))
    (tmp_path / "config.yaml").write_text(json.dumps({"model": {"name": str(tiny_model_dir)}, "data": {"train": "train.jsonl"}, "report_to": ["wandb"]}))
    with pytest.raises(UserError, match="report_to lists wandb, which is not installed"):
        train.run(load_config(tmp_path / "config.yaml"))
    assert not (tmp_path / "runs" / "run" / artifacts.TRAIN_DIR).exists()
