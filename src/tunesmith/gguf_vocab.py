"""A HF tokenizer as GGUF metadata: the vocabulary, its llama.cpp tokenizer model and pre-tokenizer.

Two kinds of tokenizer reach llama.cpp:
- byte-level BPE (Llama 3, Qwen2, SmolLM, GPT-2): GGUF model "gpt2", the merges, and a
  pre-tokenizer name (`tokenizer.ggml.pre`) that selects the regex llama.cpp splits text with
  before BPE. A wrong name silently splits text differently from the model's training.
- SentencePiece-style (Gemma, Phi-3, Mistral v0.x: BPE with byte fallback over "▁" pieces, or
  Unigram): GGUF model "llama", per-token scores, byte tokens typed BYTE.

The pre-tokenizer name is derived as llama.cpp's converter derives it: encode a fixed check text,
hash the token ids, look the hash up among the tokenizers it knows. A tokenizer with a vocabulary
of its own (a tiny test tokenizer, an extended vocabulary) has no known hash; its pre-tokenizer
spec is then compared exactly with the specs of the names we support (the same regex, the same
byte-level step). Neither: refused, never guessed.

Separate from `gguf_export.py` (weights and model metadata); this module knows tokenizers only.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from tunesmith.errors import UserError

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs, emoji,
# digit runs, CJK, Cyrillic, contractions; each pre-tokenizer splits it its own way.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(token ids of CHECK_TEXT) -> llama.cpp pre-tokenizer, for the families we export
# (the hashes llama.cpp's converter lists for these reference tokenizers).
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B (and 3.1/3.2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}

# The regexes of the tokenizer.json `Split` step, as the reference tokenizers write them.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Pre-tokenizer steps (see `_pre_steps`) -> llama.cpp name.
KNOWN_PRE_STEPS = {
    (("split", LLAMA3_SPLIT), ("byte_level",)): "llama-bpe",
    (("split", QWEN2_SPLIT), ("byte_level",)): "qwen2",
    (("digits",), ("byte_level_gpt2_regex",)): "smollm",
    (("byte_level_gpt2_regex",),): "gpt-2",
}


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _pre_steps(spec: dict[str, Any] | None) -> tuple[tuple[str, ...], ...] | None:
    """A pre_tokenizer spec as a tuple of the steps that change the split; None when a step is unknown."""
    if not spec:
        return ()
    if spec.get("type") == "Sequence":
        steps: list[tuple[str, ...]] = []
        for part in spec.get("pretokenizers", []):
            sub = _pre_steps(part)
            if sub is None:
                return None
            steps += sub
        return tuple(steps)
    kind = spec.get("type")
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            return None
        return (("byte_level_gpt2_regex",) if spec.get("use_regex", True) else ("byte_level",),)
    if kind == "Digits" and spec.get("individual_digits"):
        return (("digits",),)
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert") and "Regex" in (spec.get("pattern") or {}):
        return (("split", spec["pattern"]["Regex"]),)
    return None


def check_text_hash(tokenizer: Any) -> str:
    """llama.cpp's `chkhsh`: sha256 of the printed list of CHECK_TEXT's token ids (special tokens added)."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def tokenizer_pre(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer: by check-text hash, else by
    an exact match of its pre-tokenizer steps; refused when neither knows it."""
    name = KNOWN_PRE_HASHES.get(check_text_hash(tokenizer))
    if name:
        return name
    steps = _pre_steps(tokenizer_spec(tokenizer).get("pre_tokenizer"))
    if steps is not None and steps in KNOWN_PRE_STEPS:
        return KNOWN_PRE_STEPS[steps]
    raise UserError(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp is known to implement (llama-bpe, qwen2, smollm, gpt-2, tekken)",
        "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py, which lists every known tokenizer",
    )


def tokenizer_kind(tokenizer: Any) -> str:
    """"bpe" (byte-level BPE, GGUF model gpt2) or "spm" (SentencePiece-style, GGUF model llama)."""
    spec = tokenizer_spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") == "Unigram" or (model.get("type") == "BPE" and model.get("byte_fallback")):
        return "spm"
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
        return "bpe"
    raise UserError(
        f"GGUF export supports byte-level BPE and SentencePiece-style tokenizers, not this {model.get('type')} tokenizer",
        "export --format merged",
    )


def _add_space_prefix(spec: dict[str, Any]) -> bool:
    """llama.cpp's add_space_prefix: whether "▁" goes before the text after each special token.

    llama.cpp prefixes the start of the text and every fragment after a special token. The HF
    tokenizer does the same with a `Prepend("▁")` normalizer or Metaspace `always` (Llama 2,
    Phi-3, legacy Mistral folders); with Metaspace `first` (a Mistral tokenizer.model converted by
    transformers, legacy=False) only at the very start of the string, never after a special
    token. A GGUF's prompts come from the chat template and open with a special token (bos), so
    `first` is written as False: the prompt then splits as in training. Gemma prefixes nothing.
    """

    def prepends(node: Any) -> bool:
        if isinstance(node, list):
            return any(prepends(n) for n in node)
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme") or ("always" if node.get("add_prefix_space") else "never")
            return scheme == "always"
        return any(prepends(v) for v in node.values())

    return prepends([spec.get("normalizer"), spec.get("pre_tokenizer")])


def _spm_scores(spec: dict[str, Any], vocab_size: int) -> list[float]:
    """Per-token scores llama.cpp's SentencePiece tokenizer merges by (highest first).

    Unigram: the model's log-probabilities. BPE with byte fallback: -rank of the merge that makes
    the token, so merging the highest score first applies the merges in the tokenizer's order.
    """
    model = spec["model"]
    scores = [0.0] * vocab_size
    if model["type"] == "Unigram":
        for i, (_, score) in enumerate(model["vocab"]):
            if i < vocab_size:
                scores[i] = float(score)
        return scores
    vocab = model["vocab"]
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id < vocab_size and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    return scores


def add_tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Vocabulary, token types, merges or scores, special ids, and the chat template."""
    from gguf import TokenType

    spec = tokenizer_spec(tokenizer)
    kind = tokenizer_kind(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif kind == "spm" and token == tokenizer.unk_token:  # an added token in HF, UNKNOWN in SentencePiece
            tokens.append(token)
            types.append(TokenType.UNKNOWN)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token].special else TokenType.USER_DEFINED)
        elif kind == "spm" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            tokens.append(token)
            types.append(TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    if kind == "bpe":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(spec, vocab_size))
        writer.add_token_types(types)
        writer.add_add_space_prefix(_add_space_prefix(spec))
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
