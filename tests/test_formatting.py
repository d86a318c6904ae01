import random

import pytest

from tunesmith.config import DataConfig
from tunesmith import formatting
from tunesmith.errors import UserError
from tunesmith.formatting import (
    IGNORE_INDEX,
    collate,
    length_grouped_batches,
    packed_batches,
    preflight,
    tokenize_conversation,
    tokenize_dataset,
)
from tunesmith.schema import Conversation


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from tunesmith.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def conv(*turns, line=1):
    """conv(("user", "hi"), ("assistant", "yo", 0), ...) -> Conversation."""
    messages = [{"role": t[0], "content": t[1], **({"weight": t[2]} if len(t) > 2 else {})} for t in turns]
    return Conversation.from_openai({"messages": messages}, line)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def trained_runs(tokenizer, example) -> list[str]:
    """The trained tokens as contiguous runs of text."""
    runs, current = [], []
    for i, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_single_turn_trains_answer_and_end_of_turn_only(tokenizer):
    c = conv(("system", "You route tickets."), ("user", "my parcel is late"), ("assistant", '{"team": "shipping"}'))
    example, problems = tokenize_conversation(tokenizer, c, max_length=512)
    assert problems == []
    assert trained_runs(tokenizer, example) == ['{"team": "shipping"}<|im_end|>']
    # Labels equal the input ids where trained; the ids are the template's own tokenisation.
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(example.input_ids, example.labels))
    full = tokenizer.apply_chat_template(c.to_openai()["messages"], tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert example.input_ids == list(full)[: len(example.input_ids)]
    assert example.input_ids[-1] == tokenizer.eos_token_id  # the untrained newline after it is dropped


def test_multi_turn_with_weight_zero(tokenizer):
    c = conv(
        ("user", "hello"),
        ("assistant", "Hi there", 1),
        ("user", "and now?"),
        ("assistant", "context only", 0),
        ("user", "last one"),
        ("assistant", "final answer"),
    )
    example, problems = tokenize_conversation(tokenizer, c, max_length=512)
    assert problems == []
    assert trained_runs(tokenizer, example) == ["Hi there<|im_end|>", "final answer<|im_end|>"]
    # The template's default system prompt (no system message) is context, never trained.
    assert "helpful" in tokenizer.decode(example.input_ids) and "helpful" not in trained_text(tokenizer, example)


def test_config_system_prompt_is_added_and_not_trained(tokenizer):
    c = conv(("user", "hi"), ("assistant", "yes"))
    example, _ = tokenize_conversation(tokenizer, c, max_length=512, system_prompt="Answer in JSON.")
    assert "Answer in JSON." in tokenizer.decode(example.input_ids)
    assert trained_text(tokenizer, example) == "yes<|im_end|>"


def test_preflight_collects_every_problem_with_lines(tokenizer):
    convs = [
        conv(("user", "a"), ("assistant", "fine"), line=1),
        conv(("user", "no answer here"), line=2),
        conv(("user", "b"), ("assistant", "only context", 0), line=3),
        conv(("user", "c " * 20), ("assistant", "long answer " * 80), line=4),
        conv(("user", "d"), ("assistant", "fine too"), line=5),
    ]
    with pytest.raises(UserError) as err:
        preflight(tokenizer, convs, DataConfig(train="x", max_length=200), "data.jsonl")
    message = err.value.message
    assert "3 of 5" in message
    assert "no trained token (lines 2, 3)" in message
    assert "would cut assistant tokens (line 4)" in message
    assert "data.truncate" in err.value.hint

    # With truncation allowed, line 4 still fails: only its answer is long, and the final answer is never cut.
    with pytest.raises(UserError) as err:
        preflight(tokenizer, [convs[0], convs[3]], DataConfig(train="x", max_length=200, truncate=True), "d")
    assert "1 of 2" in err.value.message and "final answer (no earlier turn or prompt left to cut) (line 4)" in err.value.message


def test_preflight_catches_untrained_end_of_turn_and_unstable_templates(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # A template that never closes assistant turns with a special token: the model would not
    # learn to stop. Refused for the template as a whole, naming the key that picks another.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] != 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
    )
    with pytest.raises(UserError, match="closes an assistant turn with nothing, which is not one special token") as refused:
        tokenize_conversation(tok, conv(("user", "a"), ("assistant", "b")), max_length=512)
    assert "model.chat_template" in refused.value.one_line()
    # A template whose render of earlier messages changes when later ones are added.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    _, problems = tokenize_conversation(tok, conv(("user", "a"), ("assistant", "b")), max_length=512)
    assert "template_not_incremental" in problems


def test_length_grouped_batches_cover_every_example_once_and_repeat_per_seed():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 46, 10]
    batches = length_grouped_batches(lengths, 4, seed=1, epoch=0)
    flat = sorted(i for batch in batches for row in batch for i in row)
    assert flat == list(range(len(lengths)))
    assert batches == length_grouped_batches(lengths, 4, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, 4, seed=1, epoch=1)


def test_length_grouping_cuts_padding_and_each_seed_draws_its_own_batches():
    """Grouped batches waste far less on padding than random ones, yet a small set is not sorted
    whole: with one window, every seed trained the same length-sorted batches (only their
    order changed), so seeds did not sample batch compositions at all."""
    rng = random.Random(0)
    lengths = rng.sample(range(5, 400), 96)  # no ties: a sort alone would fix every batch

    def padding(batches):
        return sum(max(lengths[r[0]] for r in b) * len(b) - sum(lengths[r[0]] for r in b) for b in batches)

    order = list(range(96))
    rng.shuffle(order)
    unsorted = [[[i] for i in order[b : b + 8]] for b in range(0, 96, 8)]
    grouped = length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert padding(grouped) < 0.5 * padding(unsorted)

    def compositions(seed):
        return {frozenset(r[0] for r in b) for b in length_grouped_batches(lengths, 8, seed=seed, epoch=0)}

    # Most batches differ between seeds (with one sorted window, all 12 were the same).
    assert all(len(compositions(a) & compositions(b)) <= 3 for a, b in ((0, 1), (0, 2), (1, 2)))


def test_packing_restarts_positions_and_fits_rows(tokenizer):
    convs = [conv(("user", f"question {i}"), ("assistant", "answer " * (i + 1)), line=i + 1) for i in range(6)]
    examples, _ = tokenize_dataset(tokenizer, convs, max_length=512)
    lengths = [len(e) for e in examples]
    batches = packed_batches(lengths, 2, max(lengths) * 2, seed=0, epoch=0)
    rows = [row for batch in batches for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= max(lengths) * 2 for row in rows)
    packed = next(row for row in rows if len(row) > 1)
    tensors = collate(examples, [packed], tokenizer.pad_token_id)
    positions = tensors["position_ids"][0].tolist()
    second_start = lengths[packed[0]]
    assert positions[0] == 0 and positions[second_start] == 0 and positions[second_start - 1] == second_start - 1
    assert tensors["shared_prefix_len"] == 0  # never with packing
    assert tensors["trained_tokens"] == sum(examples[i].trained_tokens for i in packed)


def test_shared_prefix_stops_before_first_trained_prediction(tokenizer):
    convs = [conv(("system", "Same system prompt for all."), ("user", f"u{i}"), ("assistant", f"a{i}")) for i in range(3)]
    examples, _ = tokenize_dataset(tokenizer, convs, max_length=512)
    tensors = collate(examples, [[0], [1], [2]], tokenizer.pad_token_id)
    k = tensors["shared_prefix_len"]
    ids = tensors["input_ids"]
    assert k > 0 and bool((ids[:, :k] == ids[0, :k]).all())
    assert all(k <= e.first_trained_position - 1 for e in examples)
    assert "Same system prompt" in tokenizer.decode(ids[0, :k])


def test_show_mask_cli(cli, tiny_model_dir, tmp_path, write_jsonl):
    write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "UNIQUEANSWER"}]}] * 3, "train.jsonl")
    (tmp_path / "c.yaml").write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: train.jsonl}}\n")
    result = cli("train", str(tmp_path / "c.yaml"), "--show-mask", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("UNIQUEANSWER") == 2 and "3 examples" in result.stdout


def test_train_cli_preflight_failure_is_one_line(cli, tiny_model_dir, tmp_path, write_jsonl):
    short, long = ("ok", "a long answer " * 40)
    write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]} for a in (short, long, long)], "train.jsonl")
    (tmp_path / "c.yaml").write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: train.jsonl, max_length: 100}}\n")
    result = cli("train", str(tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "would cut assistant tokens (lines 2, 3)" in result.stderr


def test_truncation_cuts_the_prompt_and_keeps_the_answer(tokenizer):
    from tunesmith.config import DataConfig

    long_prompt = conv(("user", "words " * 150), ("assistant", "spam"), line=7)
    full, _ = tokenize_conversation(tokenizer, long_prompt, max_length=10_000)
    examples, report = preflight(tokenizer, [long_prompt], DataConfig(train="x", max_length=100, truncate=True), "d")
    cut = examples[0]
    assert len(cut) == 100 and report.truncated_lines == [7]
    assert cut.cut_prompt_tokens == len(full) - 100 and cut.cut_trained_tokens == 0
    # The answer, its end-of-turn token and the assistant header survive, token for token.
    tail = formatting.PROMPT_TAIL_KEPT + full.trained_tokens + 1
    assert cut.input_ids[-tail:] == full.input_ids[-tail:] and cut.labels[-tail:] == full.labels[-tail:]
    assert cut.input_ids[:20] == full.input_ids[:20]


def multi_turn(long_first: str, long_last: str, line=9):
    return conv(
        ("system", "You route tickets."),
        ("user", "first question " + long_first),
        ("assistant", "first answer"),
        ("user", "second question " + long_last),
        ("assistant", "final answer"),
        line=line,
    )


@pytest.mark.parametrize("where", ["first", "last"])
def test_multi_turn_truncation_drops_earliest_turns_and_keeps_the_final_answer(tokenizer, where):
    """Whatever turn is long, the final answer and its end-of-turn token survive token for token,
    the system message stays, and the first exchange goes before the final prompt is cut."""
    long_text = "words " * 150
    c = multi_turn(long_text if where == "first" else "", long_text if where == "last" else "")
    full, _ = tokenize_conversation(tokenizer, c, max_length=10_000)
    examples, report = preflight(tokenizer, [c], DataConfig(train="x", max_length=100, truncate=True), "d")
    cut = examples[0]
    assert len(cut) <= 100 and report.truncated_lines == [9]
    assert trained_runs(tokenizer, cut) == ["final answer<|im_end|>"]
    tail = formatting.PROMPT_TAIL_KEPT + cut.trained_tokens
    assert cut.input_ids[-tail:] == full.input_ids[-tail:] and cut.labels[-tail:] == full.labels[-tail:]
    text = tokenizer.decode(cut.input_ids)
    assert text.startswith("<|im_start|>system\nYou route tickets.<|im_end|>\n<|im_start|>user\nsecond question")
    assert "first" not in text
    assert cut.cut_trained_tokens == full.trained_tokens - cut.trained_tokens > 0
    assert cut.cut_prompt_tokens + cut.cut_trained_tokens == len(full) - len(cut)


def test_truncation_that_would_cut_the_final_answer_is_refused_alike_by_training_and_estimate(tokenizer):
    from tunesmith.estimate import count_tokens

    c = multi_turn("", "", line=5)
    c_long = conv(("user", "hi"), ("assistant", "long answer " * 80), line=6)
    data_cfg = DataConfig(train="x", max_length=60, truncate=True)
    with pytest.raises(UserError) as err:
        preflight(tokenizer, [c, c_long], data_cfg, "d")
    assert "final answer" in err.value.message and "(line 6)" in err.value.message and "1 of 2" in err.value.message
    assert "data.max_length" in err.value.hint
    assert count_tokens([c, c_long], tokenizer, 60)["problems"] == {"final_answer_too_long": [6]}


def test_eval_prompt_truncation_is_the_training_rule(tokenizer):
    """formatting.truncate_prompt leaves exactly the prompt that training's data.truncate kept in
    front of the answer, so evaluation asks the fine-tune what it was trained on."""
    from tunesmith.formatting import truncate_prompt
    from tunesmith.inference import render_ids

    long_user = " ".join(["the parcel was late and the courier lost the invoice again"] * 12)
    example, problems = tokenize_conversation(tokenizer, conv(("user", long_user), ("assistant", "billing")), max_length=64, truncate=True)
    assert problems == [] and example.cut_prompt_tokens > 0
    prompt = render_ids(tokenizer, [{"role": "user", "content": long_user}])
    answer_tokens = len(tokenizer("billing", add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
    cut_prompt, cut = truncate_prompt(prompt, answer_tokens, 64)
    assert cut == example.cut_prompt_tokens and len(cut_prompt) == len(prompt) - cut
    assert example.input_ids[: len(cut_prompt)] == cut_prompt
    # A prompt that fits is left alone.
    short = render_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert truncate_prompt(short, answer_tokens, len(short) + answer_tokens) == (short, 0)


def test_preflight_without_a_chat_template_is_one_user_error(tokenizer):
    """A base model with no chat template: one line with the fix, not a transformers traceback."""
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        preflight(bare, [conv(("user", "hi"), ("assistant", "ok"))], DataConfig(train="x"), "d")


def test_estimate_counts_the_tokens_left_after_a_whole_exchange_is_dropped(tokenizer):
    """Dropping an earlier exchange can leave an example well under max_length: the estimate's
    fed tokens (and squared lengths) are what the truncated example holds, as training feeds it."""
    from tunesmith.estimate import count_tokens

    c = multi_turn("and more " * 30, "", line=5)
    examples, report = tokenize_dataset(tokenizer, [c], max_length=60, truncate=True)
    assert report.truncated_lines == [5] and len(examples[0]) < 60
    counted = count_tokens([c], tokenizer, 60)
    assert counted["fed_tokens"] == report.tokens == len(examples[0])
    assert counted["trained_tokens"] == report.trained_tokens
    assert counted["sum_squared_lengths"] == len(examples[0]) ** 2
