"""Chat template -> (input_ids, labels); the loss-mask pre-flight check; batching and packing.

The labels are where fine-tuning goes silently wrong, so they are built from the model's own
chat template and then checked. The template is rendered incrementally (messages[:1],
messages[:2], ...), so each message owns a character span of the full render; tokens are
mapped to spans through the tokenizer's offsets. A token is trained when it starts inside an
assistant turn's content-and-end-of-turn span (weight 1). The end-of-turn token is trained so
the model learns to stop; the newline the template writes after it is not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import UserError
from tunesmith.humanize import plural
from tunesmith.schema import Conversation
from tunesmith.templates import TEMPLATE_FIX, end_of_turn_token

IGNORE_INDEX = -100  # the label of a position that is not trained (PyTorch's cross-entropy default)

# Pre-flight problem kinds, each with the fix the user is told.
PROBLEMS = {
    "no_trained_token": ("no trained token", "give each example an assistant turn with weight 1 and non-empty content"),
    "end_of_turn_not_trained": (
        "the end-of-turn token of an assistant turn is not trained (the model would not learn to stop)",
        "report this template: its end-of-turn token is not where its assistant turns end",
    ),
    "prompt_token_trained": ("a system/user token would be trained", "report this template; it renders messages out of order"),
    "template_not_incremental": (
        "the chat template renders earlier messages differently once later ones are added",
        "use a template whose render of messages[:k] is a prefix of the full render",
    ),
    "too_long": ("truncation to data.max_length would cut assistant tokens", "raise data.max_length or set data.truncate: true"),
    "final_answer_too_long": (
        "data.truncate cannot fit the example without cutting its final answer (no earlier turn or prompt left to cut)",
        "raise data.max_length, or shorten the final answer of these examples",
    ),
}


@dataclass
class Example:
    """One tokenised conversation. `labels[t]` is `input_ids[t]` where trained, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    source_line: int | None = None
    cut_trained_tokens: int = 0  # assistant tokens dropped by truncation (data.truncate)
    cut_prompt_tokens: int = 0  # prompt tokens dropped by truncation (data.truncate)
    turn_starts: list[int] = field(default_factory=list)  # token position where each message starts
    turn_roles: list[str] = field(default_factory=list)  # the role of each message

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def first_trained_position(self) -> int:
        return next((t for t, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))

    @property
    def shareable_length(self) -> int:
        """Tokens at the start that a batch may compute once for all its rows (train.shared_prefix):
        they end before the position whose hidden state predicts the first trained label."""
        return max(0, self.first_trained_position - 1)


@dataclass
class FormatReport:
    """What the pre-flight saw: totals, truncations, and every problem with its example lines."""

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_lines: list[int | None] = field(default_factory=list)
    problems: dict[str, list[int | None]] = field(default_factory=dict)

    def add(self, kind: str, line: int | None) -> None:
        self.problems.setdefault(kind, []).append(line)

    def raise_if_problems(self, source: str) -> None:
        if not self.problems:
            return
        bad = len({line for lines in self.problems.values() for line in lines})
        parts, hints = [], []
        for kind, lines in self.problems.items():
            what, fix = PROBLEMS[kind]
            shown = ", ".join(str(x) for x in lines[:8]) + (f" and {len(lines) - 8} more" if len(lines) > 8 else "")
            parts.append(f"{what} (line{'s' if len(lines) > 1 else ''} {shown})")
            hints.append(fix)
        raise UserError(
            f"{source}: loss-mask pre-flight failed for {bad} of {plural(self.examples, 'example')}: " + "; ".join(parts),
            "; ".join(dict.fromkeys(hints)),
        )


def _chat_messages(conv: Conversation, system_prompt: str | None) -> list[dict[str, Any]]:
    messages = [{k: v for k, v in m.to_openai().items() if k != "weight"} for m in conv.messages]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _render(tokenizer, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _incremental_renders(tokenizer, messages: list[dict[str, Any]]) -> list[str]:
    """The renders of messages[:1], messages[:2], ..., each a prefix of the next when the template is incremental.

    A template may close a finished conversation with eos (Phi-3 writes `<|end|>\n<|endoftext|>`
    after the last turn): that eos is not part of the last message of a shorter render, so it
    is dropped there, and the last message of the full render owns it (an untrained tail).
    """
    renders = [_render(tokenizer, messages[: i + 1]) for i in range(len(messages))]
    eos = tokenizer.eos_token or ""
    full = renders[-1] if renders else ""
    for i, text in enumerate(renders[:-1]):
        if eos and not full.startswith(text) and text.endswith(eos) and full.startswith(text[: -len(eos)]):
            renders[i] = text[: -len(eos)]
    return renders


def tokenize_conversation(
    tokenizer, conv: Conversation, *, max_length: int, truncate: bool = False, system_prompt: str | None = None
) -> tuple[Example, list[str]]:
    """(example, problem kinds) for one conversation; the problems are those of PROBLEMS."""
    problems: list[str] = []
    eot_id, eot_text = end_of_turn_token(tokenizer)
    messages = _chat_messages(conv, system_prompt)
    weights = [1] * (len(messages) - len(conv.messages)) + [m.weight for m in conv.messages]

    # 1. Character spans: message i owns full[prev_end:end_i]; a trained assistant turn trains
    #    [after its header, through its end-of-turn token].
    renders = _incremental_renders(tokenizer, messages)
    full = renders[-1] if renders else ""
    owners: list[tuple[int, int, bool]] = []  # (start, end, trained) per message
    trained_spans: list[tuple[int, int]] = []
    prev = ""
    for i, message in enumerate(messages):
        text = renders[i]
        if not text.startswith(prev) or not full.startswith(text):
            problems.append("template_not_incremental")
            break
        start, end = len(prev), len(text)
        trained = message["role"] == "assistant" and weights[i] > 0
        if trained:
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            content_start = len(header) if text.startswith(header) and len(header) >= start else full.find(message["content"], start, end)
            eot_at = full.rfind(eot_text, content_start, end)
            trained_spans.append((content_start, eot_at + len(eot_text) if eot_at >= 0 else end))
        owners.append((start, end, trained))
        prev = text

    # 2. Tokens: trained when the token starts inside a trained span.
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for t, (char_start, _) in enumerate(encoded["offset_mapping"]):
        if any(s <= char_start < e for s, e in trained_spans):
            labels[t] = input_ids[t]

    # 3. Checks on the labels, independent of how they were built: trained tokens belong to
    #    trained assistant turns, and every trained turn's end-of-turn token is trained.
    owner_of = []
    for char_start, _ in encoded["offset_mapping"]:
        owner_of.append(next((k for k, (s, e, _) in enumerate(owners) if s <= char_start < e), None))
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX and (owner_of[t] is None or not owners[owner_of[t]][2]):
            problems.append("prompt_token_trained")
            break
    for k, (_, _, trained) in enumerate(owners):
        if trained:
            eots = [t for t in range(len(input_ids)) if owner_of[t] == k and input_ids[t] == eot_id]
            if not eots or labels[eots[-1]] == IGNORE_INDEX:
                problems.append("end_of_turn_not_trained")
                break

    # Nothing predicts the first token, so it is never trained (and in a packed row it must not
    # be predicted from the previous example).
    if labels:
        labels[0] = IGNORE_INDEX

    # 4. Drop the untrained tail (the newline after the last end-of-turn): it predicts nothing.
    last = max((t for t, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    input_ids, labels = input_ids[: last + 1], labels[: last + 1]
    kept_turns = [k for k in range(len(owners)) if k in owner_of[: last + 1]]
    turn_starts, turn_roles = [owner_of.index(k) for k in kept_turns], [messages[k]["role"] for k in kept_turns]
    example = Example(input_ids, labels, conv.source_line, turn_starts=turn_starts, turn_roles=turn_roles)
    if len(input_ids) > max_length:
        if truncate:
            example, cut_problems = truncate_example(example, max_length)
            problems += cut_problems
        else:
            problems.append("too_long")
    if example.trained_tokens == 0:
        problems.append("no_trained_token")
    return example, list(dict.fromkeys(problems))


# Tokens kept untouched just before the first trained token when the prompt is shortened: the
# end of the user turn and the assistant header (`<|im_end|>\n<|im_start|>assistant\n` is 5).
PROMPT_TAIL_KEPT = 16


def truncate_example(example: Example, max_length: int) -> tuple[Example, list[str]]:
    """(example fitted into `max_length`, problem kinds): earliest exchanges first, never the final answer.

    The final answer is what the example teaches (the label of a classification row, the last
    reply of a chat), so it and its end-of-turn token are never cut. First whole earlier
    exchanges go, oldest first, each from its user turn up to the next user turn (an explicit
    system message stays: it frames every turn). If the final exchange alone is still too long,
    its prompt is cut just before its last PROMPT_TAIL_KEPT tokens (the turn boundary and the
    assistant header stay intact). When even that cannot fit, the problem
    `final_answer_too_long` is returned, with the end-cut example for counting what would be lost.
    """
    if len(example) <= max_length:
        return example, []
    ids, labels, starts, roles = example.input_ids, example.labels, example.turn_starts, example.turn_roles
    first_kept = 1 if roles[:1] == ["system"] else 0
    last_trained = max(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    final_turn = max((k for k, start in enumerate(starts) if start <= last_trained), default=0)
    # Where the kept part may resume: each later user turn up to the final answer's exchange.
    resume_at = [k for k in range(first_kept + 1, final_turn + 1) if roles[k] == "user"]
    drop_from = starts[first_kept] if first_kept < len(starts) else 0
    drop_to = drop_from
    for k in resume_at:
        drop_to = starts[k]
        if len(ids) - (drop_to - drop_from) <= max_length:
            break
    ids, labels = ids[:drop_from] + ids[drop_to:], labels[:drop_from] + labels[drop_to:]
    cut_trained = example.trained_tokens - sum(1 for label in labels if label != IGNORE_INDEX)
    cut_prompt = (drop_to - drop_from) - cut_trained
    excess = len(ids) - max_length
    if excess > 0:
        first_trained = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
        cut_end = first_trained - PROMPT_TAIL_KEPT
        cut_start = cut_end - excess
        if cut_start < 1:  # keep at least the first token (the first turn's header starts there)
            lost = sum(1 for label in example.labels[max_length:] if label != IGNORE_INDEX)
            end_cut = Example(example.input_ids[:max_length], example.labels[:max_length], example.source_line, cut_trained_tokens=lost)
            return end_cut, ["final_answer_too_long"]
        ids, labels = ids[:cut_start] + ids[cut_end:], labels[:cut_start] + labels[cut_end:]
        cut_prompt += excess
    return Example(ids, labels, example.source_line, cut_trained_tokens=cut_trained, cut_prompt_tokens=cut_prompt), []


def truncate_prompt(prompt_ids: list[int], answer_tokens: int, max_length: int) -> tuple[list[int], int]:
    """(prompt ids, tokens cut): a generation prompt as training's truncation (data.truncate)
    leaves it when the example's answer is `answer_tokens` long, so evaluation prompts the model
    with what it was trained on. The rule is `truncate_example`'s, applied to the prompt
    followed by a stand-in answer; only its prompt part is returned.
    """
    if len(prompt_ids) + answer_tokens <= max_length:
        return prompt_ids, 0
    # One exchange: the prompt, then a stand-in answer of the right length. (A multi-turn eval
    # prompt is treated as one exchange too: its earlier turns are not dropped whole.)
    labels = [IGNORE_INDEX] * len(prompt_ids) + [0] * answer_tokens
    stand_in = Example(list(prompt_ids) + [0] * answer_tokens, labels, turn_starts=[0, len(prompt_ids)], turn_roles=["user", "assistant"])
    cut, _ = truncate_example(stand_in, max_length)
    if not cut.cut_prompt_tokens:  # training cut the answer instead: the prompt stays whole
        return prompt_ids, 0
    return cut_before_tail(prompt_ids, cut.cut_prompt_tokens), cut.cut_prompt_tokens


def cut_before_tail(prompt_ids: list[int], count: int) -> list[int]:
    """`prompt_ids` without the `count` tokens just before its last PROMPT_TAIL_KEPT (where
    truncation cuts a prompt: the turn boundary and the assistant header stay)."""
    end = len(prompt_ids) - PROMPT_TAIL_KEPT
    return prompt_ids[: end - count] + prompt_ids[end:]


def tokenize_dataset(
    tokenizer, conversations: list[Conversation], *, max_length: int, truncate: bool = False, system_prompt: str | None = None
) -> tuple[list[Example], FormatReport]:
    """Tokenise every conversation and collect every pre-flight problem (nothing raised here)."""
    report = FormatReport(examples=len(conversations))
    examples = []
    for conv in conversations:
        example, problems = tokenize_conversation(
            tokenizer, conv, max_length=max_length, truncate=truncate, system_prompt=system_prompt
        )
        for kind in problems:
            report.add(kind, conv.source_line)
        if example.cut_trained_tokens or example.cut_prompt_tokens:
            report.truncated_lines.append(conv.source_line)
        report.tokens += len(example)
        report.trained_tokens += example.trained_tokens
        examples.append(example)
    return examples, report


def preflight(tokenizer, conversations: list[Conversation], data_cfg, source: str) -> tuple[list[Example], FormatReport]:
    """Tokenise with the config's limits; raise one UserError listing every failing example."""
    if not getattr(tokenizer, "chat_template", None):
        # The loss mask is built from the chat template: without one there is nothing to mask.
        raise UserError(f"the model has no chat template (a base model?), so {source} cannot be formatted as chat turns", TEMPLATE_FIX)
    examples, report = tokenize_dataset(
        tokenizer,
        conversations,
        max_length=data_cfg.max_length,
        truncate=data_cfg.truncate,
        system_prompt=data_cfg.system_prompt,
    )
    report.raise_if_problems(source)
    return examples, report


MASK_OPEN, MASK_CLOSE = "[[", "]]"


def mask_text(tokenizer, example: Example, brackets: bool = False):
    """A rich Text of the example: trained tokens highlighted, the rest dimmed.

    With `brackets`, each run of trained tokens is also wrapped in [[ ]]: colour is lost in a
    file, a pipe or a log, and the mask is what the user wants to see there too.
    """
    from rich.text import Text

    text = Text()
    trained_before = False
    for token_id, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if brackets and trained != trained_before:
            text.append(MASK_OPEN if trained else MASK_CLOSE)
        trained_before = trained
        text.append(tokenizer.decode([token_id]), style="bold black on green" if trained else "dim")
    if brackets and trained_before:
        text.append(MASK_CLOSE)
    return text


# --- batching -----------------------------------------------------------------------------
# A batch is a list of rows; a row is a list of example indices (one, or several when packed).


def length_grouped_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int) -> list[list[list[int]]]:
    """Shuffle, sort by length inside windows of up to 64 batches, shuffle the batches.

    Examples of similar length share a batch, so little compute goes to padding, while the
    order stays random from epoch to epoch (the same for the same seed and epoch). An epoch has
    at least 4 windows (as transformers' length grouping): with one window, a small set would be
    sorted whole, and every seed would train the same length-sorted batches.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * max(1, min(64, len(lengths) // (4 * batch_size)))
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])
        batches += [[[i] for i in chunk[b : b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def packed_batches(lengths: list[int], batch_size: int, max_length: int, *, seed: int, epoch: int) -> list[list[list[int]]]:
    """Shuffle, then first-fit examples into rows of at most `max_length` tokens; `batch_size` rows a batch."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]


def collate(examples: list[Example], batch: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; position ids restart at each packed example.

    No attention mask is passed: right padding never leaks into earlier tokens under a causal
    mask, and transformers builds a block-diagonal mask from restarting position ids, so packed
    examples never attend to each other.
    """
    import torch

    rows_ids, rows_labels, rows_pos = [], [], []
    for row in batch:
        ids, labels, pos = [], [], []
        for i in row:
            ids += examples[i].input_ids
            labels += examples[i].labels
            pos += range(len(examples[i]))
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(pos)
    width = max(len(ids) for ids in rows_ids)
    for ids, labels, pos in zip(rows_ids, rows_labels, rows_pos):
        pad = width - len(ids)
        start = pos[-1] + 1 if pos else 0
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += range(start, start + pad)  # pads continue the last example: they come after it, untrained
    input_ids = torch.tensor(rows_ids)
    labels = torch.tensor(rows_labels)
    # A prompt prefix shared by every row is computed once (see modeling.loss_at_trained_positions).
    # It must end before the first position whose hidden state predicts a trained label.
    shared = 0
    if len(batch) > 1 and all(len(row) == 1 for row in batch):
        first = input_ids[0]
        same = (input_ids == first).all(dim=0).long()
        common = int(same.cumprod(0).sum())
        shared = min(common, min(examples[row[0]].shareable_length for row in batch))
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": torch.tensor(rows_pos),
        "shared_prefix_len": shared,
        "trained_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        # Tokens the model runs when the shared prefix is used (the prefix once, not per row).
        "fed_tokens_shared": sum(len(examples[i]) for row in batch for i in row) - shared * (len(batch) - 1),
    }
