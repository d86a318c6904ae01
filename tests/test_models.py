import json
import time

import pytest
import torch
from safetensors.torch import save_file

from tunesmith.errors import UserError
from tunesmith.models import fingerprint, list_models, load_model, resolve_model_dir


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
