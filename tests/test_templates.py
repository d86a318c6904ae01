"""Chat templates: resolving model.chat_template, and the end-of-turn token read off a template."""

from __future__ import annotations

import hashlib

import pytest

from families import FAMILIES
from tunesmith import templates
from tunesmith.errors import UserError
from tunesmith.models import load_tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_end_of_turn_is_the_token_after_the_answer(family, family_model_dir):
    spec = FAMILIES[family]
    tokenizer = load_tokenizer(str(family_model_dir(family)))
    chosen = templates.apply_chat_template(tokenizer, spec.chat_template)
    assert chosen.source == (spec.chat_template or "model")
    token_id, token = templates.end_of_turn_token(tokenizer)
    assert token == spec.end_of_turn and token_id == tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    assert tokenizer.eos_token == spec.eos


def test_named_templates_render_the_real_models_turns(family_model_dir):
    tokenizer = load_tokenizer(str(family_model_dir("llama3")))
    templates.apply_chat_template(tokenizer, "llama3")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": " A "}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
    )
    gemma = load_tokenizer(str(family_model_dir("gemma3")))
    templates.apply_chat_template(gemma, "gemma")
    assert gemma.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
    )
    assert gemma.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True).endswith("<start_of_turn>model\n")
    phi3 = load_tokenizer(str(family_model_dir("phi3")))
    assert phi3.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n A <|end|>\n<|endoftext|>"
    )


def test_a_base_model_is_refused_naming_the_key(family_model_dir):
    tokenizer = load_tokenizer(str(family_model_dir("llama3")))  # Llama 3.2's tokenizer ships no template
    for spec in (None, "model"):
        with pytest.raises(UserError, match="no chat template") as refused:
            templates.resolve_chat_template(tokenizer, spec)
        assert "model.chat_template" in refused.value.one_line() and "\n" not in refused.value.one_line()


def test_a_template_file_is_read_relative_to_the_config(tmp_path, family_model_dir):
    tokenizer = load_tokenizer(str(family_model_dir("llama3")))
    (tmp_path / "tpl").mkdir()
    path = tmp_path / "tpl" / "mine.jinja"
    path.write_text(templates.LLAMA3)
    chosen = templates.apply_chat_template(tokenizer, "tpl/mine.jinja", tmp_path)
    assert (chosen.source, chosen.path) == ("file", str(path.resolve()))
    assert chosen.file_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == chosen.sha256
    assert templates.ChatTemplate.from_record(chosen.record()) == chosen
    assert templates.end_of_turn_token(tokenizer)[1] == "<|eot_id|>"
    with pytest.raises(UserError, match="model.chat_template: template file .*missing.jinja not found"):
        templates.resolve_chat_template(tokenizer, "missing.jinja", tmp_path)
    with pytest.raises(UserError, match="'vicuna' is neither 'model', a named template"):
        templates.resolve_chat_template(tokenizer, "vicuna", tmp_path)


def test_a_template_whose_closing_text_is_not_a_token_is_refused(family_model_dir):
    tokenizer = load_tokenizer(str(family_model_dir("llama3")))
    templates.apply_chat_template(tokenizer, "gemma")  # Llama 3's vocabulary has no <end_of_turn>
    with pytest.raises(UserError, match="closes an assistant turn with '<end_of_turn> ', which is not one special token"):
        templates.end_of_turn_token(tokenizer)
