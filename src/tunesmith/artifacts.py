"""Where things live on disk, and how they get there: atomically.

Every artifact is written to a temporary sibling and renamed into place, so a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tunesmith.errors import UserError

# Run-folder layout: one name per artifact, so no stage spells a path on its own.
#   RUN/config.yaml             the resolved config of the run
#   RUN/manifest.json           one section per stage (inputs' hashes, versions, results)
#   RUN/data/train.jsonl        canonical OpenAI chat JSONL after the split
#   RUN/data/eval.jsonl         the held-out split
#   RUN/data/check.json         the data check report
#   RUN/train/adapter/          PEFT adapter folder (lora, qlora)
#   RUN/train/model/            HF model folder (full fine-tuning)
#   RUN/train/checkpoints/      step-N folders, written atomically
#   RUN/train/metrics.jsonl     one line per step / eval
#   RUN/train/loss.png          loss curve
#   RUN/eval/                   report.md, report.html, predictions.jsonl, results.json
#   RUN/export/<format>/        exported artifacts
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
TRAIN_SPLIT_FILE = "data/train.jsonl"
EVAL_SPLIT_FILE = "data/eval.jsonl"
CHECK_REPORT_FILE = "data/check.json"
TRAIN_DIR = "train"
ADAPTER_DIR = "train/adapter"
FULL_MODEL_DIR = "train/model"
CHECKPOINTS_DIR = "train/checkpoints"
METRICS_FILE = "train/metrics.jsonl"
LOSS_PLOT_FILE = "train/loss.png"
EVAL_DIR = "eval"
EXPORT_DIR = "export"


def tunesmith_home() -> Path:
    """The cache root: $TUNESMITH_HOME, else ~/.cache/tunesmith."""
    env = os.environ.get("TUNESMITH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunesmith"


def models_cache_dir() -> Path:
    return tunesmith_home() / "models"


def safe_child(root: Path, name: str) -> Path:
    """`root / name`, refusing names that would escape `root` (.., absolute paths, separators)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UserError(f"invalid name {name!r}", "use letters, digits, '-', '_' and '.' only")
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise UserError(f"name {name!r} escapes {root}", "use a plain name, not a path")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            # A folder cannot be replaced in one rename: move the old one aside first, so the
            # window without `path` is two renames wide and the old copy is never half-deleted.
            old = tmp / (path.name + ".old")
            os.replace(path, old)
            os.replace(target, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of what shapes the numbers: recorded in every manifest."""
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for dist in ("tunesmith", "torch", "transformers", "peft", "safetensors", "tokenizers", "gguf"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def hardware_summary() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_device_count"] = torch.cuda.device_count()
    return info


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {MANIFEST_FILE}", "pass a run folder that tunesmith wrote")
    return json.loads(path.read_text(encoding="utf-8"))


def read_manifest_or_empty(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def update_manifest(run_dir: Path, section: str, data: dict[str, Any]) -> None:
    """Merge one stage's record into the run manifest (each stage owns its section)."""
    path = Path(run_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    manifest[section] = data
    manifest.setdefault("versions", library_versions())
    write_json_atomic(path, manifest)
