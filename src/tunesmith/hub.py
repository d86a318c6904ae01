"""`tunesmith push RUN REPO`: upload RUN/export/hub/ to the Hugging Face Hub.

The folder is laid out by `tunesmith export RUN --format hub` (the adapter or merged model, the
GGUF files, the model card); this module only uploads it. Without a token or without network it
fails in one line (exit 2) with the fix, before anything is sent.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.artifacts import EXPORT_DIR
from tunesmith.errors import UserError

HUB_FOLDER = "hub"


def hub_folder(run_dir: Path) -> Path:
    """RUN/export/hub, which must hold a card (export wrote it whole)."""
    folder = Path(run_dir) / EXPORT_DIR / HUB_FOLDER
    if not (folder / "README.md").is_file():
        raise UserError(f"{folder} has no export to push", f"run `tunesmith export {run_dir} --format hub` first")
    return folder


def push(run_dir: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create REPO (model type) if needed and upload the hub folder; return the commit URL."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    folder = hub_folder(run_dir)
    token = token or huggingface_hub.get_token()
    if not token:
        raise UserError("no Hugging Face token", "run `hf auth login`, or set HF_TOKEN to a token with write access")
    # What a missing network, the offline switch, a refused token or a bad repo id raise: each is
    # the user's to fix, so each becomes one line.
    failures: tuple[type[BaseException], ...] = (hub_errors.HfHubHTTPError, hub_errors.OfflineModeIsEnabled, hub_errors.HFValidationError, OSError)
    failures += _http_errors()
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=f"tunesmith: {Path(run_dir).name}")
    except failures as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(
            f"could not push {folder} to {repo_id}: {reason[:300]}",
            "check the network (HF_HUB_OFFLINE must be unset), the token's write access and the repo id (OWNER/NAME)",
        ) from None
    return str(getattr(commit, "commit_url", commit))


def _http_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client this huggingface_hub uses (httpx, httpx2 or
    requests, by version): a refused connection surfaces as one of them, unwrapped."""
    import importlib

    found: list[type[BaseException]] = []
    for module_name, attribute in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
