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
from typing import Any, Iterable, Iterator

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
PROGRESS_FILE = "progress.json"  # the running task's progress, for `tunesmith runs`
TRACKING_FILE = "tracking.json"  # the experiment trackers' run ids, so eval logs to the run train opened
TENSORBOARD_DIR = "tracking/tensorboard"
MLFLOW_DIR = "tracking/mlruns"
WANDB_DIR = "tracking"  # wandb adds its own wandb/ folder below
EXPORT_DIR = "export"
# Beside every export (RUN/export/FORMAT/): the base fingerprint it was trained on, which
# `tunesmith serve` reads to drift-guard an exported adapter folder.
EXPORT_MANIFEST_FILE = "tunesmith_manifest.json"


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
def atomic_path(path: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path` (file or folder).

    A folder is only ever replaced by a folder: a file written over a folder is refused unless
    `force`, because the folder is likely the user's (`--redact precious` once deleted a thesis).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            if not target.is_dir() and not force:
                raise UserError(f"{path} is a folder; tunesmith will not replace it with a file", "name an output file, or pass --force")
            # A folder cannot be replaced in one rename: move the old one aside first, so the
            # window without `path` is two renames wide and the old copy is never half-deleted.
            old = tmp / (path.name + ".old")
            os.replace(path, old)
            os.replace(target, path)
        elif target.is_dir() and os.path.lexists(path):
            # Nor can a folder be renamed over a file (or a link): the same move aside, and the
            # same rule the other way round.
            if not force:
                raise UserError(f"{path} is a file; tunesmith will not replace it with a folder", "name an output folder, or pass --force")
            os.replace(path, tmp / (path.name + ".old"))
            os.replace(target, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Outputs the user names (--redact OUT, data convert SRC DST, data split --out, export):
# tunesmith replaces only what it wrote itself.
#
# The rule: every such output is recorded, once written, in a ledger beside it
# (`OUTPUTS_LEDGER` in the same folder) with the size and modification time of each file it
# holds. An existing path is "ours" when the ledger knows it and nothing in it changed since:
# a user's file, a user's folder, a file the user edited afterwards, or a file dropped into an
# exported folder all read as foreign and are refused unless --force. An output that is an
# input, lies inside an input folder or holds an input is refused even with --force: the
# input would be gone before it was read.
OUTPUTS_LEDGER = ".tunesmith-outputs.json"


def _fingerprint(path: Path) -> dict[str, Any]:
    """Size and mtime of a file, or of every file under a folder (symlinks as links)."""
    if path.is_dir() and not path.is_symlink():
        files = {}
        for child in sorted(path.rglob("*")):
            if child.is_symlink() or child.is_file():
                st = child.lstat()
                files[child.relative_to(path).as_posix()] = [st.st_size, st.st_mtime_ns]
        return {"kind": "folder", "files": files}
    st = path.lstat()
    return {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _ledger(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / OUTPUTS_LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("outputs", {}) if isinstance(data, dict) else {}


def written_by_tunesmith(path: Path) -> bool:
    """True when `path` is an output tunesmith recorded and nobody changed since."""
    path = Path(path)
    return _ledger(path.parent).get(path.name) == _fingerprint(path)


def record_output(path: Path) -> None:
    """Note a just-written output in its folder's ledger, so a later run may replace it."""
    path = Path(path)
    outputs = _ledger(path.parent)
    outputs[path.name] = _fingerprint(path)
    about = "outputs tunesmith wrote here; it replaces only these (and only while unchanged)"
    write_json_atomic(path.parent / OUTPUTS_LEDGER, {"about": about, "outputs": outputs})


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def guard_output(path: Path, inputs: Iterable[Path | None] = (), force: bool = False) -> None:
    """Refuse an output that would destroy user data: an input, or something tunesmith did not write."""
    path = Path(path)
    resolved = path.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _same_or_inside(resolved, source) or _same_or_inside(source, resolved):
            what = "is" if resolved == source else ("is inside" if source in resolved.parents else "holds")
            raise UserError(f"output {path} {what} the input {given}", "write the output to another path")
    _check_writable_folder(path)
    if force or not os.path.lexists(path) or written_by_tunesmith(path):
        return
    kind = "folder" if path.is_dir() and not path.is_symlink() else "file"
    raise UserError(
        f"{path} is a {kind} that tunesmith did not write (or that changed since)",
        "choose another output path, or pass --force to replace it",
    )


def _check_writable_folder(path: Path) -> None:
    """Refuse, before any work, an output whose folder is a file or cannot be written: the
    write would otherwise fail with a traceback after the whole input was read."""
    folder = Path(os.path.abspath(path)).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is a file, not a folder", "choose an output path inside a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: the folder {folder} is not writable", "choose an output path in a folder you can write to")


@contextlib.contextmanager
def atomic_output(path: Path, inputs: Iterable[Path | None] = (), force: bool = False) -> Iterator[Path]:
    """`atomic_path` for an output the user named: guarded before, recorded as ours after."""
    guard_output(path, inputs, force)
    with atomic_path(path, force=force) as tmp:
        yield tmp
    record_output(path)


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
