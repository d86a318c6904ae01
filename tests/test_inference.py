"""Batched greedy decoding: the two-part (cascade) attention path against the model's own forward."""

from __future__ import annotations

import logging

import pytest
import torch

from tunesmith import cascade, evaluate, inference
from tunesmith.starter import support_tickets

SYSTEM_PROMPT = "You sort support tickets into billing, shipping, account or technical. Answer with one word only."
MAX_NEW_TOKENS = 12


def tiny_lm(kind: str):
    """A random 2-layer model of `kind` for the tiny model's 512-token tokenizer (offline).

    Untied embeddings: the tied tiny model of conftest answers one token over and over, which
    would not show a step that attends to the wrong keys."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024)
    torch.manual_seed(1)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen2":  # q/k/v projections with bias
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if kind == "lora":  # adapter weights injected into the projections the two-part path calls
        from peft import LoraConfig, get_peft_model

        base = LlamaForCausalLM(LlamaConfig(**common))
        return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16)).eval()


def shared_prompt_batch(tokenizer) -> list[list[int]]:
    """A shared system prompt, distinct user turns, and rows of very different lengths."""
    convs = [evaluate.Conversation.from_openai(r) for r in support_tickets(9, seed=5)]
    prompts = [inference.render_ids(tokenizer, evaluate.prompt_messages(c, SYSTEM_PROMPT)) for c in convs]
    prefix = inference.shared_prefix_length(prompts)
    prompts[3] = prompts[3][: prefix + 2]  # two tokens of its own: lots of padding in its batch
    return prompts


def greedy(model, prompts, stop_ids, two_part, share_prefix=True):
    gens = inference.generate_greedy(model, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=4, stop_ids=stop_ids, pad_id=0,
                                     decode=lambda ids: "", share_prefix=share_prefix, two_part=two_part)
    return [g.token_ids for g in gens], [g.stopped for g in gens]


def stops_at_different_steps(model, prompts) -> set[int]:
    """Stop ids taken from the model's own answers, chosen so that rows end at three or more
    different steps and at least one row runs to max_new_tokens."""
    import itertools

    free, _ = greedy(model, prompts, set(), two_part=False)

    def lengths(stop_ids):
        return [next((n + 1 for n, t in enumerate(row) if t in stop_ids), len(row)) for row in free]

    candidates = sorted({t for row in free for t in row})
    for size in (1, 2):
        for stop_ids in itertools.combinations(candidates, size):
            ends = lengths(set(stop_ids))
            if len(set(ends)) >= 3 and MAX_NEW_TOKENS in ends:
                return set(stop_ids)
    raise AssertionError("no stop ids end these rows at different steps")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "lora"])
def test_two_part_attention_gives_the_same_tokens_as_the_models_forward(tiny_model_dir, kind):
    """fp32: greedy tokens equal the previous loop's (the model's forward, the prefix's cache
    copied per row), with and without the shared prefix, for rows that stop at different steps."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_lm(kind)
    assert cascade.unsupported_reason(model, 4096) is None
    prompts = shared_prompt_batch(tokenizer)
    assert inference.shared_prefix_length(prompts) >= inference.MIN_SHARED_PREFIX
    stop_ids = stops_at_different_steps(model, prompts)
    for share_prefix in (True, False):
        expected, expected_stopped = greedy(model, prompts, stop_ids, two_part=False, share_prefix=share_prefix)
        got, stopped = greedy(model, prompts, stop_ids, two_part=True, share_prefix=share_prefix)
        assert got == expected and stopped == expected_stopped
    lengths = {len(t) for t in got}
    assert len(lengths) >= 3 and MAX_NEW_TOKENS in lengths and any(stopped)  # the case the test is about


def test_two_part_tokens_equal_one_at_a_time_generate(tiny_model_dir):
    """The two-part batched answers are `model.generate`'s, one prompt at a time."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_lm("llama")
    prompts = shared_prompt_batch(tokenizer)
    stop_ids = stops_at_different_steps(model, prompts)
    got, _ = greedy(model, prompts, stop_ids, two_part=True)
    for ids, tokens in zip(prompts, got):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, eos_token_id=sorted(stop_ids), pad_token_id=0)
        assert out[0, len(ids) : len(ids) + len(tokens)].tolist() == tokens


def test_other_architectures_fall_back_to_the_models_forward_and_say_why(tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_lm("gemma2")
    reason = cascade.unsupported_reason(model, 4096)
    assert reason is not None and "Gemma2DecoderLayer" in reason
    prompts = shared_prompt_batch(tokenizer)
    with caplog.at_level(logging.WARNING, logger="tunesmith.inference"):
        got, _ = greedy(model, prompts, set(), two_part=True)
    assert got == greedy(model, prompts, set(), two_part=False)[0]
    assert "without two-part attention" in caplog.text and "Gemma2DecoderLayer" in caplog.text


def test_a_sliding_window_shorter_than_the_sequence_falls_back(tiny_model_dir):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=64))
    assert cascade.unsupported_reason(model, 64) is None
    assert "sliding window of 64" in cascade.unsupported_reason(model, 65)


def test_long_prefill_in_chunks_equals_one_chunk(monkeypatch):
    """The chunked attention (bounded memory on long prompts) computes what one chunk does."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    bias = torch.zeros(2, 1, 40, 50).masked_fill_(torch.rand(2, 1, 40, 50) < 0.3, float("-inf"))
    whole = cascade.attend(q, k, v, bias, 0.35)
    monkeypatch.setattr(cascade, "SCORES_PER_CHUNK", 2 * 3 * 50 * 7)  # 7 queries per chunk
    chunked = cascade.attend(q, k, v, bias, 0.35)
    reference = torch.softmax(q @ k.transpose(-1, -2) * 0.35 + bias, dim=-1) @ v
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    torch.testing.assert_close(whole[0], reference)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_part_logits_equal_the_models_forward(tiny_model_dir, kind):
    """Closer than tokens: the logits after the prompt and after one more token are the
    model's own forward on each whole sequence, to fp32 rounding (the log-sum-exp merge)."""
    from transformers import AutoTokenizer

    model = tiny_lm(kind)
    prompts = shared_prompt_batch(AutoTokenizer.from_pretrained(tiny_model_dir))[:4]
    prefix_len = inference.shared_prefix_length(prompts)
    decoder = cascade.TwoPartDecoder(model)
    own = [p[prefix_len:] for p in prompts]
    width = max(map(len, own))
    input_ids = torch.tensor([[0] * (width - len(o)) + o for o in own])
    positions = torch.tensor([[0] * (width - len(o)) + list(range(prefix_len, prefix_len + len(o))) for o in own])
    with torch.inference_mode():
        prefix = [cascade.PrefixGroup(decoder.prefix(prompts[0][:prefix_len]))]
        cache = decoder.new_cache(len(own), width + 1, torch.tensor([width - len(o) for o in own]))
        first = decoder.forward(input_ids, positions, cache, prefix)
        following = first.argmax(-1)
        second = decoder.forward(following[:, None], positions[:, -1:] + 1, cache, prefix)
        for r, ids in enumerate(prompts):
            reference = model(torch.tensor([ids + [int(following[r])]])).logits[0]
            torch.testing.assert_close(first[r], reference[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(second[r], reference[-1], rtol=1e-5, atol=1e-5)


def test_rows_of_one_batch_attend_to_different_prefixes(tiny_model_dir):
    """A server batch mixes system prompts: two rows share one prefix, one row another (shorter)
    prefix, one row none (its whole prompt is its own part). Each row's logits, after its prompt
    and after one more token, are the model's forward on its whole sequence (fp32)."""
    from transformers import AutoTokenizer

    model = tiny_lm("llama")
    prompts = shared_prompt_batch(AutoTokenizer.from_pretrained(tiny_model_dir))[:4]
    shared = inference.shared_prefix_length(prompts)
    starts = [shared, shared, 0, shared - 5]  # prefix tokens of each row
    decoder = cascade.TwoPartDecoder(model)
    own = [p[n:] for p, n in zip(prompts, starts)]
    width = max(map(len, own))
    input_ids = torch.tensor([[0] * (width - len(o)) + o for o in own])
    positions = torch.tensor([[0] * (width - len(o)) + list(range(n, n + len(o))) for o, n in zip(own, starts)])
    with torch.inference_mode():
        groups = [cascade.PrefixGroup(decoder.prefix(prompts[0][:shared]), torch.tensor([0, 1])),
                  cascade.PrefixGroup(decoder.prefix(prompts[3][: shared - 5]), torch.tensor([3]))]
        cache = decoder.new_cache(len(own), width + 1, torch.tensor([width - len(o) for o in own]))
        first = decoder.forward(input_ids, positions, cache, groups)
        following = first.argmax(-1)
        second = decoder.forward(following[:, None], positions[:, -1:] + 1, cache, groups)
        for r, ids in enumerate(prompts):
            reference = model(torch.tensor([ids + [int(following[r])]])).logits[0]
            torch.testing.assert_close(first[r], reference[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(second[r], reference[-1], rtol=1e-5, atol=1e-5)
