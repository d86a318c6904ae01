"""GGUF of a model with a SentencePiece vocabulary (Llama 2, Mistral v0.x, Gemma, Phi-3): GGUF
tokenizer model "llama", per-token scores and types, not byte-level BPE.

The tokenizer is real: Mistral 7B v0.1's `tokenizer.model` (32000 pieces, byte fallback), read
from `mistral-common`'s wheel, which `make install` downloads into .venv/wheels and never installs
(installed, transformers would route every Mistral folder through it), and converted by
transformers (with sentencepiece) into the fast tokenizer a user's folder holds. What llama.cpp's converter writes
for it (`_create_vocab_sentencepiece`) is read from the SentencePiece model itself: its pieces,
and its unknown / control / byte pieces typed UNKNOWN / CONTROL / BYTE.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tunesmith import export, gguf_export, gguf_vocab, templates
from tunesmith.inference import render_ids

# Realistic prompt texts: tickets, JSON, digits, accents, CJK, an emoji (byte fallback), newlines.
TEXTS = [
    "What is the capital of France?",
    "my package #12345 has not moved for 8 days",
    'Answer with JSON only: {"team": "billing", "priority": "high"}',
    "Héllo wörld, ça va? Grüße aus Köln.",
    "日本語のテキストと한국어",
    "the app crashes 🦙 when I open the reports page.\nPlease fix this soon.",
    "  two  spaces,   three, and\ttabs  ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi, the app crashes when I open the reports page."}],
    [{"role": "system", "content": "Route the ticket."}, {"role": "user", "content": "my invoice shows 3 charges"}],
    [{"role": "user", "content": "1"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "drei ✅"}],
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny Mistral (Llama architecture, no sliding window) with Mistral v0.1's real tokenizer,
    saved as an HF folder with the tokenizer.json transformers converts it to."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    wheels = sorted((Path(sys.prefix) / "wheels").glob("mistral_common-*.whl"))
    if not wheels or importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("needs mistral-common's wheel in .venv/wheels and sentencepiece (`make install` brings both)")
    folder = tmp_path_factory.mktemp("spm") / "mistral-spm"
    folder.mkdir()
    with zipfile.ZipFile(wheels[-1]) as wheel:
        (folder / "tokenizer.model").write_bytes(wheel.read("mistral_common/data/tokenizer.model.v1"))
    # tokenizer_config.json as Mistral's and Llama 2's folders state it: transformers 5's
    # LlamaTokenizer then prefixes "▁" at the start of the string only (Metaspace "first").
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(folder)  # transformers converts the SentencePiece model
    tokenizer.chat_template = templates.MISTRAL
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def spm_gguf(spm_model):
    """(model, tokenizer as tunesmith loads the folder, path of its f16 GGUF), over f16-rounded
    weights (a random model's near-ties would otherwise test the rounding, not the conversion)."""
    from transformers import AutoModelForCausalLM

    from tunesmith.models import load_tokenizer

    folder = spm_model
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    path = folder.parent / "spm-f16.gguf"
    gguf_export.write_gguf(model, tokenizer, path, "f16", "spm")
    return model, tokenizer, path


def test_sentencepiece_vocab_is_written_as_llama_cpps_converter_writes_it(spm_model, spm_gguf):
    import gguf
    import sentencepiece

    model, tokenizer, path = spm_gguf
    assert gguf_vocab.tokenizer_kind(tokenizer) == "spm"
    reader = gguf.GGUFReader(str(path))
    field = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    assert field["tokenizer.ggml.model"] == "llama" and field["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in field  # SentencePiece merges by score, not by a merge list
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
    assert sp.vocab_size() == model.config.vocab_size == 32000
    tokens, scores, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.scores"], field["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 32000
    assert tokens == [sp.IdToPiece(i) for i in range(32000)]

    def sentencepiece_type(i: int) -> int:
        if sp.IsUnknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.IsControl(i):
            return gguf.TokenType.CONTROL
        return gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL

    assert types == [sentencepiece_type(i) for i in range(32000)]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL  # <unk>, <s>, </s>
    assert types.count(gguf.TokenType.BYTE) == 256 and tokens[3 + 0x0A] == "<0x0A>"
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"], field["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert field["tokenizer.ggml.add_bos_token"] is False  # the chat template writes <s> itself
    # llama.cpp puts "▁" before the text after each special token exactly when the HF tokenizer does.
    after_bos = tokenizer.convert_ids_to_tokens(tokenizer("<s>Hi", add_special_tokens=False)["input_ids"])[1]
    assert field["tokenizer.ggml.add_space_prefix"] is after_bos.startswith("▁")
    assert field["tokenizer.chat_template"] == templates.MISTRAL
    # Scores: a merged piece outranks the pieces merged after it, in the tokenizer's merge order.
    vocab = tokenizer.get_vocab()
    assert scores[vocab["▁the"]] > scores[vocab["▁capital"]] and max(scores) <= 0.0


def test_llama_cpp_tokenizes_prompts_as_the_hf_tokenizer_does(spm_gguf):
    if not export.llama_cpp_available():
        pytest.skip(f"llama.cpp tokenization not checked: {export.llama_cpp_problem()}")
    import llama_cpp

    _, tokenizer, path = spm_gguf
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False, n_threads=1)
    try:
        # Chat prompts, rendered to text as llama.cpp's server and Ollama render them, then
        # tokenized with special tokens parsed: the ids the model was trained on.
        for conversation in CONVERSATIONS:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == render_ids(tokenizer, conversation), text
        # Text after a special token, as the template places every message.
        for text in TEXTS:
            expected = tokenizer(tokenizer.bos_token + text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize((tokenizer.bos_token + text).encode(), add_bos=False, special=True) == expected, text
    finally:
        llm.close()


def test_llama_cpp_generates_as_transformers_with_the_sentencepiece_vocab(spm_gguf):
    if not export.llama_cpp_available():
        pytest.skip(f"llama.cpp parity not checked: {export.llama_cpp_problem()}")
    from tunesmith.inference import greedy_tokens

    model, tokenizer, path = spm_gguf
    prompts = [render_ids(tokenizer, c) for c in CONVERSATIONS]
    stops = {tokenizer.eos_token_id}
    assert export.llama_cpp_greedy(path, prompts, stops, 12) == greedy_tokens(model, prompts, stops, 12)

