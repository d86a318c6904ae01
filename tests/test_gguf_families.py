"""GGUF per family: each tiny family model (tests/families.py) written as llama.cpp's converter
writes it, read back with gguf's reader (metadata and weights), its LoRA as a llama.cpp adapter,
refused formats refused before training, and, where llama-cpp-python is installed, the same
greedy tokens in llama.cpp as in transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from families import FAMILIES, family_config
from tunesmith import export, gguf_export, gguf_vocab, templates
from tunesmith.errors import UserError
from tunesmith.inference import greedy_tokens, render_ids
from tunesmith.models import load_tokenizer

# family -> (general.architecture, tokenizer.ggml.pre). Llama 3.2's and Qwen's real tokenizers are
# named by llama.cpp's check-text hash; the small BPEs trained for the others split like GPT-2.
EXPECTED = {
    "llama3": ("llama", "llama-bpe"),
    "qwen2": ("qwen2", "qwen2"),
    "mistral": ("llama", "gpt-2"),
    "gemma3": ("gemma3", "gpt-2"),
    "phi3": ("phi3", "gpt-2"),
}


def family_model(name, family_model_dir):
    """(model, tokenizer with the run's chat template) of a family's tiny model.

    Mistral: the fixture's model has a 16-token sliding window, which llama.cpp's Llama graph
    does not have (refused, see below); here the same config without a window, as Mistral 7B
    v0.2/v0.3 ship."""
    from transformers import AutoModelForCausalLM

    folder = family_model_dir(name)
    tokenizer = load_tokenizer(str(folder))
    templates.apply_chat_template(tokenizer, FAMILIES[name].chat_template)
    if name == "mistral":
        from transformers import MistralForCausalLM

        config = family_config("mistral", tokenizer)
        config.sliding_window = None
        torch.manual_seed(0)
        return MistralForCausalLM(config).eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def dequantized(reader):
    import gguf

    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}


def f16_family_gguf(name, family_model_dir, tmp_path):
    """(model, tokenizer, path) of a family's f16 GGUF, the model holding the file's own weights:
    a random model's top two logits can lie closer than f16 rounding moves them (Qwen2's 151k
    vocabulary has two 1.2e-5 apart), so comparing against fp32 weights would test the rounding,
    not the conversion."""
    model, tokenizer = family_model(name, family_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    path = tmp_path / f"{name}-f16.gguf"
    gguf_export.write_gguf(model, tokenizer, path, "f16", "run")
    return model, tokenizer, path


def probe_prompts(tokenizer):
    return [render_ids(tokenizer, c) for c in export.PROBE_CONVERSATIONS]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_gguf_reads_back_with_the_familys_metadata_and_weights(name, family_model_dir, tmp_path):
    import gguf

    model, tokenizer, path = f16_family_gguf(name, family_model_dir, tmp_path)
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    arch, pre = EXPECTED[name]
    assert fields["general.architecture"] == arch and fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.context_length"] == model.config.max_position_embeddings
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    report = gguf_export.gguf_tensor_report(path, gguf_export.hf_to_gguf_arrays(model))
    assert report["problems"] == []
    got = dequantized(reader)
    hf = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tol = dict(atol=2e-3, rtol=1e-3)
    # The converter's transforms, checked against the HF weights directly.
    if arch == "llama":
        q = hf["model.layers.0.self_attn.q_proj.weight"]
        assert np.allclose(got["blk.0.attn_q.weight"], gguf_export.permute_rows(q, 4), **tol)
        assert not np.allclose(got["blk.0.attn_q.weight"], q, **tol)
    else:
        assert np.allclose(got["blk.0.attn_output.weight"], hf["model.layers.0.self_attn.o_proj.weight"], **tol)
    if name == "llama3":
        assert gguf_vocab.KNOWN_PRE_HASHES[gguf_vocab.check_text_hash(tokenizer)] == "llama-bpe"
        freqs = got["rope_freqs.weight"]
        # head_dim 16: the fastest rotation is kept (1), the slowest stretched by the factor (32).
        assert freqs.shape == (8,) and freqs[0] == 1.0 and freqs[-1] == 32.0
        assert fields["llama.rope.freq_base"] == 500000.0
    if name == "qwen2":
        assert gguf_vocab.KNOWN_PRE_HASHES[gguf_vocab.check_text_hash(tokenizer)] == "qwen2"
        assert np.allclose(got["blk.0.attn_q.bias"], hf["model.layers.0.self_attn.q_proj.bias"], **tol)
        assert np.abs(got["blk.0.attn_q.bias"]).max() > 0.1
    if name == "gemma3":
        assert np.allclose(got["blk.0.attn_norm.weight"], hf["model.layers.0.input_layernorm.weight"] + 1.0)
        assert np.allclose(got["blk.1.post_ffw_norm.weight"], hf["model.layers.1.post_feedforward_layernorm.weight"] + 1.0)
        assert np.allclose(got["blk.0.attn_k_norm.weight"], hf["model.layers.0.self_attn.k_norm.weight"] + 1.0)
        assert fields["gemma3.attention.sliding_window"] == 16 and fields["gemma3.final_logit_softcapping"] == 2.0
        assert fields["gemma3.rope.freq_base"] == 1_000_000.0 and fields["gemma3.rope.freq_base_swa"] == 10_000.0
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]  # not llama.cpp's default of 5 in 6
        assert "output.weight" not in got  # tied
    if name == "phi3":
        assert got["blk.0.attn_qkv.weight"].shape == (64 + 2 * 32, 64) and got["blk.0.ffn_up.weight"].shape == (2 * 128, 64)
        assert fields["phi3.rope.dimension_count"] == 16 and fields["phi3.attention.sliding_window"] == 0
    # Read as transformers' GGUF loader reads it: the same greedy tokens as the HF model.
    prompts = probe_prompts(tokenizer)
    stops = {tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn), tokenizer.eos_token_id}
    reloaded = export._transformers_gguf_model(path)
    assert greedy_tokens(reloaded, prompts, stops, 12) == greedy_tokens(model, prompts, stops, 12)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_gguf_lora_per_family_names_llama_cpps_tensors(name, family_model_dir, tmp_path):
    import gguf
    from peft import LoraConfig, get_peft_model

    model, _ = family_model(name, family_model_dir)
    # Copied before get_peft_model wraps the layers (and merging later writes into the same memory).
    base = {k: v.copy() for k, v in gguf_export.hf_to_gguf_arrays(model).items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.05)
    path = tmp_path / "lora.gguf"
    arrays = gguf_export.write_gguf_lora(peft_model, path)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == EXPECTED[name][0]
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    names = {t.name for t in reader.tensors}
    assert names == set(arrays)
    kinds = {n.split(".", 2)[2].rsplit(".weight", 1)[0] for n in names}
    if name == "phi3":
        assert kinds == {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}  # fused q/k/v and gate/up, as llama.cpp keeps them
    else:
        assert kinds == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    # llama.cpp adds alpha/rank * B A to the base tensor: that must be the merged model's tensor.
    lora = {t.name: np.array(t.data) for t in reader.tensors}
    scale = float(reader.fields["adapter.lora.alpha"].contents()) / lora["blk.0.attn_output.weight.lora_a"].shape[0]
    merged = gguf_export.hf_to_gguf_arrays(peft_model.merge_and_unload())
    for tensor in ("blk.0.attn_output.weight", "blk.1.ffn_down.weight", "blk.0.attn_qkv.weight" if name == "phi3" else "blk.0.attn_q.weight"):
        rebuilt = base[tensor] + scale * lora[tensor + ".lora_b"] @ lora[tensor + ".lora_a"]
        assert np.allclose(rebuilt, merged[tensor], atol=1e-5), tensor
        assert not np.allclose(base[tensor], merged[tensor], atol=1e-3), "the adapter must change the tensor"


def test_an_unknown_pre_tokenizer_is_refused_not_guessed(family_model_dir):
    from tokenizers import pre_tokenizers

    tokenizer = load_tokenizer(str(family_model_dir("phi3")))
    assert gguf_vocab.tokenizer_pre(tokenizer) == "gpt-2"
    # The same vocabulary split on whitespace first: a split llama.cpp has no name for.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(UserError, match="pre-tokenizer is not one llama.cpp is known to implement") as refused:
        gguf_vocab.tokenizer_pre(tokenizer)
    assert "\n" not in refused.value.one_line()


def _project(tmp_path, model_dir, formats):
    from tunesmith.starter import support_tickets

    records = support_tickets(8, seed=1)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[6:]))
    config = {
        "name": "fam", "output_dir": "run", "model": {"name": str(model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 128},
        "train": {"method": "lora", "max_steps": 1, "batch_size": 2, "precision": "fp32", "compile": "off"},
        "export": {"formats": formats},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    return tmp_path / "config.yaml"


def test_config_check_refuses_formats_the_family_cannot_take(cli, tmp_path, family_model_dir):
    path = _project(tmp_path, family_model_dir("granite"), ["adapter", "gguf"])
    result = cli("config", "check", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "export.formats: gguf: GGUF export supports" in lines[0] and "not 'granite'" in lines[0]
    # Mistral with a sliding window shorter than its context: llama.cpp would run it with full attention.
    path = _project(tmp_path, family_model_dir("mistral"), ["ollama"])
    result = cli("config", "check", str(path))
    assert result.returncode == 2 and "export.formats: ollama: GGUF export of mistral" in result.stderr
    path = _project(tmp_path, family_model_dir("qwen2"), ["merged", "gguf", "ollama"])
    assert cli("config", "check", str(path)).returncode == 0


def test_training_refuses_an_unsupported_format_before_training(tmp_path, family_model_dir):
    from tunesmith import pipeline, train
    from tunesmith.config import load_config

    cfg = load_config(_project(tmp_path, family_model_dir("granite"), ["gguf"]))
    for start in (lambda: train.run(cfg), lambda: pipeline.run(cfg)):
        with pytest.raises(UserError, match="not 'granite'"):
            start()
        assert not (cfg.run_dir / "train").exists()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_llama_cpp_gives_the_same_greedy_tokens_as_transformers(name, family_model_dir, tmp_path):
    if not export.llama_cpp_available():
        pytest.skip(f"llama.cpp parity not checked: {export.llama_cpp_problem()}")
    model, tokenizer, path = f16_family_gguf(name, family_model_dir, tmp_path)
    prompts = probe_prompts(tokenizer)
    stops = {tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn), tokenizer.eos_token_id}
    expected = greedy_tokens(model, prompts, stops, 16)
    got = export.llama_cpp_greedy(path, prompts, stops, 16)
    ties = [_tie_at_divergence(model, p, e, g) for p, e, g in zip(prompts, expected, got) if e != g]
    print(f"llama.cpp parity {name}: {sum(len(t) for t in expected)} tokens over {len(prompts)} prompts, "
          f"equal={got == expected}, divergences at exact ties: {ties}")
    # A random model can tie: Qwen2's fixture has two logits equal to 1e-5 (0.6667 and 0.6667).
    # A divergence is accepted only where transformers' own top two are within f16 rounding and
    # llama.cpp took the other of the two.
    assert all(margin < 1e-3 for margin in ties), ties


def _tie_at_divergence(model, prompt, expected, got):
    """Transformers' top-two logit margin where llama.cpp's tokens first differ (inf when llama.cpp
    picked a token that is not one of the two)."""
    k = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if k is None:
        return float("inf")  # one stopped where the other went on
    with torch.no_grad():
        logits = model(torch.tensor([prompt + expected[:k]])).logits[0, -1]
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]) if got[k] in top.indices.tolist() else float("inf")


# family -> (what opens every conversation, the Modelfile's stops)
OLLAMA = {
    "llama3": ("<|begin_of_text|>", ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"]),
    "qwen2": ("", ["<|im_end|>", "<|im_start|>"]),
    "mistral": ("<s>", ["</s>", "[INST]"]),
    "gemma3": ("<bos>", ["<end_of_turn>", "<eos>", "<start_of_turn>"]),
    "phi3": ("", ["<|end|>", "<|endoftext|>", "<|user|>"]),
}


@pytest.mark.parametrize("name", list(OLLAMA))
def test_ollama_template_renders_each_familys_chat_template(name, family_model_dir):
    from tunesmith import ollama_modelfile

    tokenizer = load_tokenizer(str(family_model_dir(name)))
    templates.apply_chat_template(tokenizer, FAMILIES[name].chat_template)
    fmt = ollama_modelfile.chat_format(tokenizer)
    template = ollama_modelfile.ollama_template(fmt)
    begin, stops = OLLAMA[name]
    assert fmt.begin == begin and template.startswith(begin + "{{")
    assert fmt.system_in_first_user == (name in ("gemma3", "mistral"))  # their system text opens the first user turn
    conversations = [list(c) for c in export.PROBE_CONVERSATIONS] + [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"}],
    ]
    parity = ollama_modelfile.template_parity(tokenizer, template, fmt.default_system, conversations)
    assert parity["mismatches"] == [] and parity["conversations"] == len(conversations)
    if name == "qwen2":
        assert fmt.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    stop_ids = list(dict.fromkeys([end_of_turn, tokenizer.eos_token_id]))
    assert ollama_modelfile.ollama_stops(tokenizer, stop_ids, fmt) == stops


def test_parity_is_a_share_over_held_out_prompts_and_gates_the_exit_code(cli, tiny_run, tmp_path):
    from conftest import copy_run

    run_dir = copy_run(tiny_run, tmp_path / "run")
    # The run's 10 held-out prompts (data.eval), not one probe; q8_0 keeps every greedy answer here.
    result = cli("export", str(run_dir), "--format", "gguf", "--gguf-type", "q8_0", "--min-parity", "1.0")
    assert result.returncode == 0, result.stderr
    assert "parity: tiny-run-q8_0.gguf 10/10 probe prompts with an unchanged greedy answer" in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["export"]["gguf"]["files"]["tiny-run-q8_0.gguf"]["parity"]["unchanged_share"] == 1.0
    # q4_0 goes through llama.cpp's quantizer: without a working llama.cpp it is skipped, saying why.
    result = cli("export", str(run_dir), "--format", "gguf", "--gguf-type", "q4_0")
    if not export.llama_cpp_available():
        assert result.returncode == 0 and "skipped: q4_0 skipped: " + export.llama_cpp_problem() in " ".join(result.stderr.split())
    else:
        assert result.returncode == 0, result.stderr
        manifest = json.loads((run_dir / "manifest.json").read_text())
        share = manifest["export"]["gguf"]["files"]["tiny-run-q4_0.gguf"]["parity"]["unchanged_share"]
        print(f"q4_0 through llama.cpp: unchanged share {share}")
        assert f"parity: tiny-run-q4_0.gguf {round(share * 10)}/10 probe prompts" in result.stdout
        k_quant = cli("export", str(run_dir), "--format", "gguf", "--gguf-type", "q4_k_m", "--force")
        assert k_quant.returncode == 0 and "parity: tiny-run-q4_k_m.gguf" in k_quant.stdout, k_quant.stderr[-2000:]
        if share < 1.0:  # the gate, on a real quantized file that changed some answers
            gated = cli("export", str(run_dir), "--format", "gguf", "--gguf-type", "q4_0", "--min-parity", "1.0", "--force")
            assert gated.returncode == 3 and "parity" in gated.stderr, gated.stderr


@pytest.mark.parametrize("name", list(EXPECTED))
def test_q8_0_gguf_per_family_dequantizes_within_its_rounding(name, family_model_dir, tmp_path):
    import gguf

    model, tokenizer = family_model(name, family_model_dir)
    path = tmp_path / f"{name}-q8_0.gguf"
    gguf_export.write_gguf(model, tokenizer, path, "q8_0", "run")
    report = gguf_export.gguf_tensor_report(path, gguf_export.hf_to_gguf_arrays(model))
    assert report["problems"] == [] and report["max_abs_err_by_type"]["Q8_0"] > 0  # quantized, within a step
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == EXPECTED[name][0]
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_down.weight")} == {"Q8_0"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_llama_cpp_quantizes_each_family_to_q4_0_and_q4_k_m(name, family_model_dir, tmp_path):
    """llama.cpp's own quantizer on our f16 file (export's path for q4_0 / q4_k_m): the file keeps
    the family's metadata, every tensor dequantizes within its type's rounding of the f16 file's
    weights (q4_0), and llama.cpp runs it. The tiny models' 64-wide rows are no multiple of k-quants'
    256-blocks, so q4_k_m falls back to other types here: the file type still says Q4_K_M."""
    if not export.llama_cpp_available():
        pytest.skip(f"q4_0 / q4_k_m not written: {export.llama_cpp_problem()}")
    import gguf

    model, tokenizer = family_model(name, family_model_dir)
    expected = gguf_export.f16_file_arrays(gguf_export.hf_to_gguf_arrays(model))
    prompt = probe_prompts(tokenizer)[:1]
    for gguf_type, file_type in (("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0), ("q4_k_m", gguf.LlamaFileType.MOSTLY_Q4_K_M)):
        path = tmp_path / f"{name}-{gguf_type}.gguf"
        assert export.write_gguf_type(model, tokenizer, path, gguf_type, "run") is None
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["general.file_type"].contents() == file_type
        assert reader.fields["general.architecture"].contents() == EXPECTED[name][0]
        assert reader.fields["tokenizer.ggml.pre"].contents() == EXPECTED[name][1]
        assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        if gguf_type == "q4_0":  # (the read-back is slow on a 150k vocabulary: once)
            report = gguf_export.gguf_tensor_report(path, expected)
            assert report["problems"] == [] and report["max_abs_err_by_type"]["Q4_0"] > 0, report
        assert len(export.llama_cpp_greedy(path, prompt, set(), 2)[0]) == 2


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-4])
def test_q8_0_tolerance_bounds_gguf_quants_rounding_small_blocks_included(scale):
    """A block whose largest weight is under ~0.008 gets an f16-subnormal scale, rounded by an
    absolute 2^-25 rather than a relative 2^-11: export once flagged Gemma 3 270M's own q8_0 as
    "above tolerance" there (blk.17.attn_q.weight, block max 0.0056)."""
    from gguf import GGMLQuantizationType, quants

    weights = (np.random.default_rng(0).standard_normal((256, 256)) * scale).astype(np.float32)
    got = quants.dequantize(quants.quantize(weights, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).reshape(weights.shape)
    tolerance = gguf_export.gguf_tolerance("Q8_0", weights)
    assert (np.abs(got - weights) <= tolerance).all()
    if scale >= 1e-3:  # the bound stays under one quantization step, so it can still catch a wrong weight
        assert (tolerance < np.abs(weights).reshape(256, -1, 32).max(axis=-1).repeat(32, axis=-1) / 127).all()
