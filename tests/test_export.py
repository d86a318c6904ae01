"""Export: every artifact is read back by the tool that consumes it and compared with the trained
model (tiny Llama + a LoRA trained by train.run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import copy_run

from tunesmith import export, gguf_export, ollama_modelfile, runs
from tunesmith.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    return copy_run(tiny_run, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def trained(run_dir):
    return runs.load_run_model(run_dir)


def test_merged_logits_equal_base_plus_adapter(run_dir, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = export.run(run_dir, "merged")
    folder = run_dir / "export" / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "tunesmith_manifest.json"} <= {p.name for p in folder.iterdir()}
    # Plain transformers, no peft: what a user of the merged folder gets.
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == trained.tokenizer.chat_template
    ids = torch.tensor([export.prompt_ids(tokenizer, export.PROBE_CONVERSATIONS)[2]])
    with torch.inference_mode():
        merged_logits = merged(input_ids=ids).logits
        adapter_logits = trained.model(input_ids=ids).logits
        with trained.model.disable_adapter():
            base_logits = trained.model(input_ids=ids).logits
    # fp32 merge reorders one matmul: differences stay at rounding level (1e-4 stated tolerance).
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    assert (adapter_logits - base_logits).abs().max() > 1e-2, "the adapter must change the model for this test to mean anything"
    assert report["parity"]["mismatches"] == [] and report["parity"]["matching"] == report["parity"]["prompts"]
    assert export.parity_problems(report) == []


def test_adapter_export_carries_fingerprint_and_lint(run_dir, trained):
    report = export.run(run_dir, "adapter")
    folder = run_dir / "export" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tunesmith_manifest.json"} <= {p.name for p in folder.iterdir()}
    manifest = json.loads((folder / "tunesmith_manifest.json").read_text())
    assert manifest["base_fingerprint"] == trained.base_fingerprint
    assert report["lint"] == []  # r=4 on llama: servable by vLLM and Ollama as is
    assert report["parity"]["mismatches"] == []
    assert "adapter" in json.loads((run_dir / "manifest.json").read_text())["export"]


def test_lint_names_every_serving_problem():
    problems = runs.lint_adapter_config(
        {"r": 64, "use_dora": True, "modules_to_save": ["lm_head"], "target_modules": ["q_proj", "embed_tokens"]}, "qwen2"
    )
    text = "\n".join(problems)
    assert len(problems) == 5
    assert "--max-lora-rank 64" in text and "DoRA" in text and "modules_to_save" in text and "embed_tokens" in text and "Ollama" in text
    assert runs.lint_adapter_config({"r": 16, "target_modules": "all-linear"}, "llama") == []
    assert "--max-lora-rank 32" in runs.lint_adapter_config({"r": 8, "rank_pattern": {"q_proj": 24}}, "llama")[0]


def test_gguf_tensors_match_after_dequantization(run_dir, trained):
    import gguf

    report = export.run(run_dir, "gguf", gguf_types=["f16", "q8_0"])
    folder = run_dir / "export" / "gguf"
    merged = export.merged_model(trained)
    expected = gguf_export.hf_to_gguf_arrays(merged)
    for gguf_type, qtype in (("f16", "F16"), ("q8_0", "Q8_0")):
        path = folder / f"tiny-run-{gguf_type}.gguf"
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["general.architecture"].contents() == "llama"
        assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == trained.tokenizer.eos_token_id
        assert len(reader.fields["tokenizer.ggml.tokens"].data) == merged.config.vocab_size
        assert reader.fields["tokenizer.chat_template"].contents() == trained.tokenizer.chat_template
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
        assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
        for tensor in reader.tensors:
            got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected[tensor.name].shape)
            assert (np.abs(got - expected[tensor.name]) <= gguf_export.gguf_tolerance(tensor.tensor_type.name, expected[tensor.name])).all(), tensor.name
        entry = report["files"][path.name]
        assert entry["tensors"]["problems"] == [] and entry["tensors"]["tensors"] == len(expected)
        # Read back by transformers' GGUF loader (it undoes the q/k permutation). f16: the same
        # greedy tokens. q8_0 on a random tiny model: near-tied logits flip under quantization
        # noise, so the check is the logits' distance (and that mismatches are reported, not hidden).
        assert entry["parity"]["tokenizer_matches"]
        if gguf_type == "f16":
            assert entry["parity"]["mismatches"] == []
        else:
            assert entry["parity"]["max_logit_diff"] < 0.1
            assert all("first_diff_token" in m for m in entry["parity"]["mismatches"])
    # q/k permutation round-trips; with it wrong, the f16 file would not match the logits at f16 noise.
    assert report["files"]["tiny-run-f16.gguf"]["parity"]["max_logit_diff"] < 1e-2


def test_gguf_lora_adapter_adds_up_to_the_merged_weights(run_dir, trained):
    import gguf

    if not (run_dir / "export" / "gguf").exists():
        export.run(run_dir, "gguf", gguf_types=["f16"])
    reader = gguf.GGUFReader(str(run_dir / "export" / "gguf" / "tiny-run-lora-f32.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    lora = {t.name: np.array(t.data) for t in reader.tensors}
    rank = lora["blk.0.attn_q.weight.lora_a"].shape[0]
    scale = float(reader.fields["adapter.lora.alpha"].contents()) / rank  # what llama.cpp computes
    from transformers import AutoModelForCausalLM

    base = gguf_export.hf_to_gguf_arrays(AutoModelForCausalLM.from_pretrained(trained.base_path))
    merged = gguf_export.hf_to_gguf_arrays(export.merged_model(trained))
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
        rebuilt = base[name] + scale * lora[name + ".lora_b"] @ lora[name + ".lora_a"]
        assert np.allclose(rebuilt, merged[name], atol=1e-5), name


def test_ollama_modelfile_template_renders_like_the_chat_template(run_dir, trained):
    report = export.run(run_dir, "ollama", gguf_types=["q8_0"])
    folder = run_dir / "export" / "ollama"
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-run-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert (folder / "tiny-run-q8_0.gguf").exists()
    assert report["ollama_create"].startswith("ollama create tiny-run -f ")
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = modelfile.split('SYSTEM """', 1)[1].split('"""', 1)[0]
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}],
        [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}],
    ]
    for conversation in conversations:
        expected = trained.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        messages = [{"Role": m["role"], "Content": m["content"]} for m in ollama_modelfile.ollama_messages(conversation, system)]
        assert ollama_modelfile.render_go_template(template, {"Messages": messages}) == expected
    assert report["template_parity"]["mismatches"] == []


def test_go_renderer_handles_ollama_syntax():
    # Ollama's own ChatML template style: trim markers, range over .Messages, $last.
    template = (
        "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}\n"
        '{{- if and (ne .Role "assistant") $last }}<|im_end|>\n<|im_start|>assistant\n{{ end }}\n{{- end }}'
    )
    messages = [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}, {"Role": "user", "Content": "ok"}]
    out = ollama_modelfile.render_go_template(template, {"Messages": messages})
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_refuses_a_family_llama_cpp_is_not_given(tmp_path):
    from transformers import GraniteConfig, GraniteForCausalLM

    model = GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UserError, match="not 'granite'"):
        gguf_export.write_gguf(model, None, tmp_path / "x.gguf", "f16", "x")
    assert not (tmp_path / "x.gguf").exists()
    assert gguf_export.format_support(model.config) == {
        "merged": None,
        "adapter": None,
        "hub": None,
        "gguf": gguf_export.gguf_unsupported(model.config),
        "ollama": gguf_export.gguf_unsupported(model.config),
    }


def test_export_keeps_a_users_file_unless_force(run_dir, trained):
    export.run(run_dir, "adapter")
    export.run(run_dir, "adapter")  # tunesmith's own export folder is replaced without --force
    note = run_dir / "export" / "adapter" / "my_notes.txt"
    note.write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        export.run(run_dir, "adapter")
    assert note.read_text() == "keep me"
    report = export.run(run_dir, "adapter", force=True)
    assert not note.exists() and report["parity"]["mismatches"] == []


def test_export_over_a_users_file_needs_force_then_replaces_it(run_dir, trained):
    import shutil

    out = run_dir / "export" / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("a file where the export folder goes")
    with pytest.raises(UserError, match="did not write"):
        export.run(run_dir, "adapter")
    assert out.read_text() == "a file where the export folder goes"
    report = export.run(run_dir, "adapter", force=True)  # a folder renamed over a file: moved aside first
    assert (out / "adapter_model.safetensors").exists() and report["parity"]["mismatches"] == []


def test_atomic_folder_over_a_file_is_refused_without_force(tmp_path):
    from tunesmith.artifacts import atomic_path

    path = tmp_path / "out"
    path.write_text("keep")
    with pytest.raises(UserError, match="will not replace it with a folder"):
        with atomic_path(path) as tmp:
            tmp.mkdir()
    assert path.read_text() == "keep"
