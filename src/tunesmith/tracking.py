"""Experiment tracking: what a run does, sent to the trackers teams use (`report_to`).

TensorBoard, MLflow and Weights & Biases, each optional (pip install 'tunesmith[tracking]') and
off by default. Train logs the resolved config and the base fingerprint as params, then every
step's loss, learning rate, gradient norm and tokens/s, and the eval loss; at its end the loss
plot and the adapter (or model). Evaluation logs every subject's final metrics, the verdict and
the report. Both write to the same tracker run: its ids are kept in RUN/tracking.json.

Local by default, so nothing needs a server: TensorBoard and MLflow write under RUN/tracking/
(MLflow to MLFLOW_TRACKING_URI when set), and W&B runs offline unless WANDB_MODE says otherwise
or an API key and the network are there (`wandb sync` uploads an offline run later).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from tunesmith import artifacts
from tunesmith.errors import UserError

TRACKERS = ("tensorboard", "mlflow", "wandb")
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
STEP_KEYS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
             "eval_loss": "eval/loss"}
MLFLOW_PARAM_CHARS = 6000  # MLflow refuses longer parameter values


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`train.lora.r` -> "16": a nested config as flat string params, as trackers want them."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def check_installed(report_to: list[str]) -> None:
    """Refuse, before any model is loaded, a tracker whose library is not installed."""
    import importlib.util

    missing = [name for name in report_to if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        raise UserError(f"report_to lists {', '.join(missing)}, which is not installed",
                        "pip install 'tunesmith[tracking]', or remove it from report_to")


def wandb_mode() -> str:
    """WANDB_MODE when set; else online only with an API key and a reachable server, offline
    otherwise (wandb.init would wait for minutes on a machine without network)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    import netrc
    import socket

    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        has_key = False
    if not has_key:
        return "offline"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
    except OSError:
        return "offline"
    return "online"


class Trackers:
    """The trackers of one run, open for one stage (train or eval); rank 0 only."""

    def __init__(self, cfg, *, new_run: bool):
        check_installed(cfg.report_to)
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        ids_path = self.run_dir / artifacts.TRACKING_FILE
        ids = {} if new_run or not ids_path.exists() else json.loads(ids_path.read_text())
        self.tensorboard = self.mlflow = self.wandb = None
        self.mlflow_run_id = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / artifacts.TENSORBOARD_DIR))
        if "mlflow" in cfg.report_to:
            self.mlflow, self.mlflow_run_id = open_mlflow(cfg, ids.get("mlflow_run_id"))
            ids["mlflow_run_id"] = self.mlflow_run_id
        if "wandb" in cfg.report_to:
            self.wandb = open_wandb(cfg, ids.setdefault("wandb_run_id", uuid.uuid4().hex[:12]))
        artifacts.write_json_atomic(ids_path, ids)

    # --- params and metrics ---------------------------------------------------------------

    def log_params(self, params: dict[str, str]) -> None:
        if self.tensorboard is not None:
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.tensorboard.add_text("params", "| param | value |\n|---|---|\n" + table, 0)
        if self.mlflow is not None:
            from mlflow.entities import Param

            items = [Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                self.mlflow.log_batch(self.mlflow_run_id, params=items[start : start + 100])
        if self.wandb is not None:
            self.wandb.config.update(params, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now_ms = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run_id, metrics=[Metric(key, value, now_ms, step) for key, value in values.items()])
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_step(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row of training (loss, lr, grad norm, tokens/s, eval loss when due)."""
        self.log_metrics({STEP_KEYS[k]: v for k, v in row.items() if k in STEP_KEYS}, row["step"])

    def log_summary(self, values: dict[str, Any], text: dict[str, str]) -> None:
        """Final numbers (no step: they describe the run) and sentences such as the verdict."""
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, 0)
            for key, value in text.items():
                self.tensorboard.add_text(key, value, 0)
        if self.mlflow is not None:
            from mlflow.entities import Metric, RunTag

            now_ms = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now_ms, 0) for k, v in numbers.items()]
            for start in range(0, len(metrics), 1000):
                self.mlflow.log_batch(self.mlflow_run_id, metrics=metrics[start : start + 1000])
            self.mlflow.log_batch(self.mlflow_run_id, tags=[RunTag(k, v) for k, v in text.items()])
        if self.wandb is not None:
            self.wandb.summary.update({**numbers, **text})

    # --- artifacts ------------------------------------------------------------------------

    def log_artifact(self, path: Path, kind: str) -> None:
        """A file or folder (the report, the loss plot, the adapter) as an artifact; TensorBoard,
        which has none, gets the plot as an image."""
        path = Path(path)
        if not path.exists():
            return
        if self.tensorboard is not None and path.suffix == ".png":
            import matplotlib.image

            self.tensorboard.add_image(f"{kind}/{path.stem}", matplotlib.image.imread(str(path))[..., :3], 0, dataformats="HWC")
        if self.mlflow is not None:
            if path.is_dir():
                self.mlflow.log_artifacts(self.mlflow_run_id, str(path), artifact_path=f"{kind}/{path.name}")
            else:
                self.mlflow.log_artifact(self.mlflow_run_id, str(path), artifact_path=kind)
        if self.wandb is not None:
            import wandb

            artifact = wandb.Artifact(f"{self.cfg.name}-{kind}-{path.name}".replace("/", "-"), type=kind)
            if path.is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            self.wandb.log_artifact(artifact)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run_id)
        if self.wandb is not None:
            self.wandb.finish()


def open_mlflow(cfg, run_id: str | None):
    """(client, run id): the run `run_id` when it exists, else a new one in the experiment named
    after the run. A local file store under RUN/tracking unless MLFLOW_TRACKING_URI is set."""
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(cfg.run_dir) / artifacts.MLFLOW_DIR).resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store working but refuses it unless asked: it is what lets
        # `mlflow ui --backend-store-uri RUN/tracking/mlruns` show the run with no database to set up.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    if run_id is not None:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return client, run_id
        except Exception:  # noqa: BLE001 - a run deleted or in another store: start a new one
            pass
    experiment = client.get_experiment_by_name(cfg.name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(cfg.name)
    return client, client.create_run(experiment_id, run_name=cfg.name).info.run_id


def open_wandb(cfg, run_id: str):
    """A W&B run (resumed by id when train opened it), offline unless wandb_mode() says online."""
    import wandb

    folder = Path(cfg.run_dir) / artifacts.WANDB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=cfg.name, id=run_id, resume="allow",
                      dir=str(folder), mode=wandb_mode(), reinit="create_new")


# --- what the stages call ---------------------------------------------------------------------


def open_for_training(cfg, fingerprint: str, *, resumed: bool) -> Trackers | None:
    """The trackers of a training (a new tracker run unless resumed), params logged; None when
    `report_to` is empty."""
    if not cfg.report_to:
        return None
    trackers = Trackers(cfg, new_run=not resumed)
    config = cfg.model_dump(mode="json")
    trackers.log_params({**flat_params(config), "base_model.fingerprint": fingerprint})
    return trackers


def log_training_end(trackers: Trackers | None, summary: dict[str, Any], loss_plot: Path, output: Path | None) -> None:
    """The training's summary numbers, loss plot and adapter (or model); closes the trackers."""
    if trackers is None:
        return
    try:
        trackers.log_summary({f"train_summary/{k}": v for k, v in summary.items()}, {})
        trackers.log_artifact(loss_plot, "train")
        if output is not None:
            trackers.log_artifact(output, "model")
    finally:
        trackers.close()


def log_evaluation(cfg, results: dict[str, Any], eval_dir: Path) -> None:
    """Every subject's final metrics (with intervals), the verdict and the report, to the
    tracker run training opened (a new one when there is none). Only an evaluation of the
    fine-tune: the pipeline's baseline stage runs before training opens the tracker run, and
    the evaluation after it logs the baselines' answers again (reused, not regenerated)."""
    if not cfg.report_to or "tuned" not in results["subjects"]:
        return
    trackers = Trackers(cfg, new_run=False)
    try:
        values = {}
        for subject, entry in results["subjects"].items():
            for metric, value in entry["metrics"].items():
                values[f"eval/{subject}/{metric}"] = value["value"]
                values[f"eval/{subject}/{metric}_ci_low"] = value["ci_low"]
                values[f"eval/{subject}/{metric}_ci_high"] = value["ci_high"]
        verdict = results.get("verdict") or {}
        trackers.log_summary(values, {"verdict": verdict.get("text", ""), "primary_metric": results.get("primary_metric", "")})
        for name in ("report.html", "report.md", "results.json"):
            trackers.log_artifact(Path(eval_dir) / name, "eval")
    finally:
        trackers.close()
