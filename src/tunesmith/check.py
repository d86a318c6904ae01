"""`tunesmith data check`: every problem of a data file, at once.

The check streams the file once. Per-row problems (format, roles, weights) come from the
readers in `data.py` and `parsers.py`, each with its line. Everything that needs the whole file
(duplicates, conflicting answers, near-duplicates, leakage, label balance) is kept as
fixed-size numbers per row in compact arrays and worked out with numpy at the end: a million
rows stay well under a GiB. Valid examples are worked on in batches of BATCH_ROWS, so MinHash
and the personal-data search run over whole batches. Token counts only run with a model, because
loading its tokenizer costs seconds; `token_counts.py` renders each distinct system prompt once.

The detectors it runs per row live apart: personal data in `pii.py`, MinHash signatures and
LSH banding in `minhash.py`.

`advise.py` turns the same statistics into "fine-tune, prompt, or retrieve" with its reasons.
"""

from __future__ import annotations

import gc
import json
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith import metrics as M
from tunesmith.data import (
    conversation_line,
    normalize_text,
    open_source,
)
from tunesmith.errors import UserError
from tunesmith.humanize import plural
from tunesmith.minhash import (
    MINHASH_BATCH,
    MINHASH_PERMUTATIONS,
    band_keys,
    casefold_words,
    minhash_signatures,
    minhash_word_signatures,
    near_duplicates,
    rows_per_band,
)
from tunesmith.pii import PII_KINDS, find_pii_batch, redact_text
from tunesmith.schema import Conversation, Message

# OpenAI refuses fewer than 10 examples; the guide's sizes for advice.
MIN_EXAMPLES = 10
FEW_EXAMPLES = 300  # "fewer than a few hundred good examples: prompt engineering first"
SWEET_SPOT = (500, 5000)
IMBALANCE_RATIO = 10.0  # largest label / smallest label above which the set is called imbalanced
# Findings kept per code (their count is always exact): a file broken on every line stays small.
MAX_FINDINGS_PER_CODE = 1000

FIXES = {
    "too_few_examples": f"collect at least {MIN_EXAMPLES} examples (OpenAI's minimum); a few hundred reviewed ones to fine-tune well",
    "small_dataset": "start with prompt engineering (few-shot with these examples); fine-tune once you have 500+ reviewed examples",
    "duplicate": "remove the repeated example: duplicates weigh it double in training",
    "near_duplicate": "review the pair: keep one, or make them differ where it matters",
    "conflicting_outputs": "make the answers agree, or add the context that decides between them",
    "eval_leakage": "remove these inputs from the eval file (or from training): the score would measure memory",
    "eval_unreadable": "run `tunesmith data check` on the eval file and fix it",
    "over_max_length": "shorten the example, raise --max-length, or allow truncation knowing the dropped tokens",
    "template_error": "fix the conversation so the model's chat template accepts it (often: roles must alternate)",
    "label_imbalance": "collect more examples of the rare labels, or accept a model biased to the frequent ones",
    "rare_label": "add examples of this label (at least ~10), or merge it into another",
    "invalid_json_output": "fix the answer so it parses as JSON: the model will learn the broken format",
    "pii": "remove or mask personal data before training: write a redacted copy with --redact OUT",
    "unreadable": "",
}


@dataclass
class Finding:
    """One problem: its code, severity, what is wrong, how to fix it, and where (1-based lines)."""

    code: str
    severity: str
    message: str
    fix: str
    line: int | None = None
    related_lines: list[int] = field(default_factory=list)


@dataclass
class CheckReport:
    path: str
    format: str | None
    rows: int
    examples: int
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # exact count per code, even past the cap
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(n for code, n in self.counts.items() if self._severity.get(code) == "error")

    @property
    def warning_count(self) -> int:
        return sum(n for code, n in self.counts.items() if self._severity.get(code) == "warning")

    @property
    def _severity(self) -> dict[str, str]:
        return {f.code: f.severity for f in self.errors + self.warnings}

    def exit_code(self, strict: bool = False) -> int:
        """0 clean, 2 on errors, 1 on warnings when strict."""
        if self.errors:
            return 2
        return 1 if strict and self.warnings else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "rows": self.rows,
            "examples": self.examples,
            "error_count": self.error_count,
            "warning_count": self.warning_count,
            "counts": self.counts,
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
            "stats": self.stats,
        }


class _Findings:
    """Collects findings, keeping at most MAX_FINDINGS_PER_CODE per code but counting all."""

    def __init__(self, cap: int = MAX_FINDINGS_PER_CODE):
        self.cap = cap
        self.items: list[Finding] = []
        self.counts: Counter[str] = Counter()

    def add(self, code: str, severity: str, message: str, fix: str, line: int | None = None, related=(), count: int = 1):
        self.counts[code] += count
        if self.counts[code] - count < self.cap:
            self.items.append(Finding(code, severity, message, fix, line, list(related)))


# --------------------------------------------------------------------------------------------
# Hashes (exact duplicates, conflicts, leakage) and what near-duplicates compare


def _hash64(key: str | tuple) -> int:
    """A 64-bit hash of a text or a tuple of texts, equal within this process only: Python's
    own keyed SipHash, computed in C and cached by each str. Nothing outside the check ever
    sees these numbers."""
    return hash(key) & 0xFFFFFFFFFFFFFFFF


def _conversation_key(conv: Conversation) -> tuple | str:
    """What makes two examples the same (for `_hash64`): the fields `to_openai` writes.

    A conversation without extra fields is a tuple of (role, content, name, an answer's
    weight), which Python hashes in C from the strings' cached hashes; any other is its
    canonical JSON (sorted keys). Equal conversations are both of one kind.
    """
    messages = conv.messages
    if not conv.extra and not any([m.extra for m in messages]):
        return tuple([(m.role, m.content, m.name, m.weight if m.role == "assistant" else 1) for m in messages])
    return json.dumps(conv.to_openai(), ensure_ascii=False, sort_keys=True)


def _prompt_key(prompt_messages: list[Message], normalized: dict[str, tuple[str, ...]]) -> tuple:
    """The prompt's roles and texts as `normalize_text` sees them (the casefolded whitespace-split
    words, equal exactly when the normalized texts are); `normalized` caches the texts that
    repeat (system prompts), each split once."""
    parts = []
    for m in prompt_messages:
        words = normalized.get(m.content) if m.role == "system" else None
        if words is None:
            words = tuple(m.content.casefold().split())
            if m.role == "system" and len(normalized) < 1000:
                normalized[m.content] = words
        parts.append((m.role, words))
    return tuple(parts)


def _row_words(conv: Conversation, last: int | None, cache: dict[str, list[bytes]]) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """`casefold_words` of the input (`input_text`), of the answer and of every non-system turn
    (what near-duplicates compare: a shared system prompt is not content), each turn split once.
    `last`: the index of the last assistant turn; `cache`: answers' words (answers repeat)."""
    prompt: list[bytes] = []
    answer: list[bytes] = []
    compared: list[bytes] = []
    for i, m in enumerate(conv.messages):
        if m.role == "system":
            continue
        words = cache.get(m.content) if m.role == "assistant" else None
        if words is None:
            words = casefold_words(m.content)
            if m.role == "assistant":
                if len(cache) >= 4096:
                    cache.clear()
                cache[m.content] = words
        compared += words
        if last is None or i < last:
            prompt += words
        elif i == last:
            answer = words
    return prompt, answer, compared


def _percentiles(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {
        "min": int(values.min()),
        "p10": float(p10),
        "median": float(median),
        "p90": float(p90),
        "max": int(values.max()),
        "mean": float(values.mean()),
    }


def _json_answer(text: str) -> tuple[bool, Any]:
    """(looks like JSON, parsed value or None). Code fences around JSON are accepted."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`")
        body = body[4:] if body.lower().startswith("json") else body
        body = body.strip()
    if not body or body[0] not in "{[":
        return False, None
    try:
        return True, json.loads(body)
    except ValueError:
        return True, None


def size_advice(examples: int) -> str:
    if examples < MIN_EXAMPLES:
        return f"{plural(examples, 'example')}: too few to fine-tune (OpenAI requires {MIN_EXAMPLES}); use prompt engineering"
    if examples < FEW_EXAMPLES:
        return f"{plural(examples, 'example')}: fewer than a few hundred; try prompt engineering (few-shot) first"
    if examples < SWEET_SPOT[0]:
        return f"{plural(examples, 'example')}: enough to try LoRA; {SWEET_SPOT[0]:,}-{SWEET_SPOT[1]:,} reviewed examples is the sweet spot"
    if examples <= SWEET_SPOT[1]:
        return f"{plural(examples, 'example')}: the sweet spot ({SWEET_SPOT[0]:,}-{SWEET_SPOT[1]:,} reviewed examples)"
    return f"{plural(examples, 'example')}: more than the sweet spot; quality beats quantity, review a sample"


# --------------------------------------------------------------------------------------------
# Token counts through the model's chat template


class _TokenCounter:
    """Counts total / prompt / answer tokens per example, in batches (`token_counts`: each
    distinct system prompt and structure rendered and tokenised once)."""

    def __init__(self, tokenizer, findings: _Findings, batch: int = 1024, max_length: int | None = None):
        from tunesmith.token_counts import TokenCounts

        self.tokenizer = tokenizer
        self.counts = TokenCounts(tokenizer)
        self.findings = findings
        self.batch = batch
        self.max_length = max_length
        self.pending: list[tuple[int, Conversation]] = []
        self.total, self.prompt, self.answer = array("I"), array("I"), array("I")
        self.lines = array("I")
        # Per example over max_length: does training's data.truncate keep the final answer?
        # Asked of formatting.truncate_example itself (the one truncation rule), only for the
        # few rows that are too long.
        self.answer_kept: dict[int, bool] = {}

    def add(self, line: int, conv: Conversation) -> None:
        self.pending.append((line, conv))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        counted = self.counts.counts([conv.messages for _, conv in pending])
        for (line, conv), result in zip(pending, counted):
            if isinstance(result, Exception):
                self.findings.add("template_error", "error", f"the chat template refuses this example ({result})", FIXES["template_error"], line)
                continue
            total, prompt = result[0], min(result[1], result[0])
            if self.max_length is not None and total > self.max_length:
                from tunesmith.formatting import tokenize_conversation

                _, problems = tokenize_conversation(self.tokenizer, conv, max_length=self.max_length, truncate=True)
                self.answer_kept[len(self.total)] = "final_answer_too_long" not in problems
            self.total.append(total)
            self.prompt.append(prompt)
            self.answer.append(total - prompt)
            self.lines.append(line)


# --------------------------------------------------------------------------------------------
# The check


def _read_eval(path: Path, format: str, input_col, output_col, system_prompt, want_signatures: bool):
    """Input hashes (and input signatures) of an eval file, with lines; count of unreadable rows."""
    _, rows = open_source(path, format, input_col, output_col, system_prompt)
    hashes, lines, texts, signatures = array("Q"), array("I"), [], []
    bad = 0
    for row in rows:
        if row.conversation is None or any(p.severity == "error" for p in row.problems):
            bad += 1
            continue
        hashes.append(_hash64(normalize_text(row.conversation.input_text)))
        lines.append(row.line)
        if want_signatures:
            texts.append(row.conversation.input_text)
            if len(texts) >= MINHASH_BATCH:
                signatures.append(minhash_signatures(texts))
                texts = []
    if want_signatures and texts:
        signatures.append(minhash_signatures(texts))
    sig = np.concatenate(signatures) if signatures else np.zeros((0, MINHASH_PERMUTATIONS), dtype=np.uint16)
    return np.frombuffer(hashes, dtype=np.uint64), np.frombuffer(lines, dtype=np.uint32), sig, bad


@dataclass
class _RowStats:
    """What the one pass over the rows keeps per example, in compact arrays: this is what keeps
    a million rows small. Every whole-file analysis below reads it after the pass."""

    want_input_signatures: bool = False
    lines: array = field(default_factory=lambda: array("I"))
    conv_hash: array = field(default_factory=lambda: array("Q"))
    prompt_hash: array = field(default_factory=lambda: array("Q"))
    target_hash: array = field(default_factory=lambda: array("Q"))
    input_hash: array = field(default_factory=lambda: array("Q"))
    input_words: array = field(default_factory=lambda: array("I"))
    answer_words: array = field(default_factory=lambda: array("I"))
    overlap: array = field(default_factory=lambda: array("f"))
    signature_batches: list[np.ndarray] = field(default_factory=list)
    input_signature_batches: list[np.ndarray] = field(default_factory=list)
    # Normalized system prompts, each normalized once for the prompt hashes; answers' words.
    normalized: dict[str, tuple[str, ...]] = field(default_factory=dict)
    answer_words_cache: dict[str, list[bytes]] = field(default_factory=dict)
    # Shape of the task (metrics.task_kind's counts), for the label check and `advise`; labels is
    # None once the answers cannot be a label set.
    labels: Counter[str] | None = field(default_factory=Counter)
    label_keys: set[str] = field(default_factory=set)
    json_answers: int = 0
    json_like: int = 0
    json_ok: int = 0
    questions: int = 0
    multi_turn: int = 0
    key_sets: Counter[str] = field(default_factory=Counter)
    pii_counts: Counter[str] = field(default_factory=Counter)
    pii_lines: dict[str, list[int]] = field(default_factory=dict)
    # Contents that repeat on every row (a system prompt) are scanned once.
    pii_cache: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    # Examples per system prompt (the first 1,000 distinct ones): `advise` weighs a long shared one.
    system_prompts: Counter[str] = field(default_factory=Counter)
    redacted_rows: int = 0

    @staticmethod
    def _stack(batches: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(batches) if batches else np.zeros((0, MINHASH_PERMUTATIONS), np.uint16)

    def signatures(self) -> np.ndarray:
        return self._stack(self.signature_batches)

    def input_signatures(self) -> np.ndarray:
        return self._stack(self.input_signature_batches)


_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass
class _BatchParts:
    """What each example of a batch contributes, one list per field in file order."""

    lines: list[int] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # the last answer, stripped
    user_texts: list[str] = field(default_factory=list)  # `input_text`
    prompt_words: list[list[bytes]] = field(default_factory=list)
    answer_words: list[list[bytes]] = field(default_factory=list)
    compared_words: list[list[bytes]] = field(default_factory=list)
    conversation_keys: list = field(default_factory=list)
    prompt_keys: list[tuple] = field(default_factory=list)
    multi_turn: int = 0


def _system_words(text: str, normalized: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """`_prompt_key`'s words of a system prompt, through its cache."""
    words = normalized.get(text)
    if words is None:
        words = tuple(text.casefold().split())
        if len(normalized) < 1000:
            normalized[text] = words
    return words


def _answer_words(text: str, cache: dict[str, list[bytes]]) -> list[bytes]:
    """`casefold_words` of an answer, through `_row_words`'s cache (answers repeat)."""
    words = cache.get(text)
    if words is None:
        words = casefold_words(text)
        if len(cache) >= 4096:
            cache.clear()
        cache[text] = words
    return words


def _plain_exchange(conv: Conversation) -> tuple[Message | None, Message, Message] | None:
    """(system turn or None, user turn, answer) of a plain exchange: an optional system turn, a
    user turn and a weight-1 answer, no name and no extra field anywhere; None for any other."""
    messages = conv.messages
    if len(messages) == 3:
        system, user, answer = messages
        if system.role != "system" or system.name is not None or system.extra:
            return None
    elif len(messages) == 2:
        system = None
        user, answer = messages
    else:
        return None
    if (
        conv.extra or user.role != "user" or answer.role != "assistant" or answer.weight != 1
        or user.name is not None or answer.name is not None or user.extra or answer.extra
    ):
        return None
    return system, user, answer


def _batch_parts(stats: _RowStats, batch: list[tuple[int, Conversation]]) -> _BatchParts:
    """Each example's answer, input, words and keys.

    A plain exchange (an optional system turn, a user turn, a weight-1 answer; no name, no extra
    field), the bulk of a large file, is read straight off its messages: the same values
    `_row_words`, `_conversation_key` and `_prompt_key` give, without their loops. Any other
    example takes them.
    """
    parts = _BatchParts()
    normalized, cache = stats.normalized, stats.answer_words_cache
    for line, conv in batch:
        parts.lines.append(line)
        messages = conv.messages
        plain = _plain_exchange(conv)
        if plain is not None:
            system, user, answer = plain
            u, a = user.content, answer.content
            prompt_words, answer_words = casefold_words(u), _answer_words(a, cache)
            user_key = ("user", tuple(u.casefold().split()))
            if system is None:
                conversation_key = (("user", u, None, 1), ("assistant", a, None, 1))
                prompt_key = (user_key,)
            else:
                conversation_key = (("system", system.content, None, 1), ("user", u, None, 1), ("assistant", a, None, 1))
                prompt_key = (("system", _system_words(system.content, normalized)), user_key)
            parts.targets.append(a.strip())
            parts.user_texts.append(u)
            parts.prompt_words.append(prompt_words)
            parts.answer_words.append(answer_words)
            parts.compared_words.append(prompt_words + answer_words)
            parts.conversation_keys.append(conversation_key)
            parts.prompt_keys.append(prompt_key)
            continue
        # conv.prompt_messages, conv.target and conv.input_text, finding the last answer once.
        last = conv.last_assistant_index()
        prompt = messages if last is None else messages[:last]
        parts.targets.append("" if last is None else messages[last].content.strip())
        parts.user_texts.append("\n".join([m.content for m in prompt if m.role != "system"]))
        prompt_words, answer_words, compared_words = _row_words(conv, last, cache)
        parts.prompt_words.append(prompt_words)
        parts.answer_words.append(answer_words)
        parts.compared_words.append(compared_words)
        parts.conversation_keys.append(_conversation_key(conv))
        parts.prompt_keys.append(_prompt_key(prompt, normalized))
        parts.multi_turn += [m.role for m in messages].count("user") > 1
    return parts


def _add_hashes(stats: _RowStats, parts: _BatchParts) -> None:
    """Hashes for duplicates, conflicts and leakage (`_hash64` of each key)."""
    stats.lines.extend(parts.lines)
    stats.conv_hash.extend([hash(key) & _MASK64 for key in parts.conversation_keys])
    stats.prompt_hash.extend([hash(key) & _MASK64 for key in parts.prompt_keys])
    stats.target_hash.extend([hash(target) & _MASK64 for target in parts.targets])
    if stats.want_input_signatures:
        stats.input_hash.extend([hash(normalize_text(text)) & _MASK64 for text in parts.user_texts])


def _add_labels(stats: _RowStats, targets: list[str]) -> None:
    """Count the answers as labels while every answer is one (`M.is_label`) and at most
    LABEL_MAX_COUNT distinct; else labels become None. Each new answer is judged once, in
    the order it first appears, so the counts keep first-seen order."""
    labels = stats.labels
    if labels is None:
        return
    for target in dict.fromkeys(targets):
        if target in labels:  # seen: a label, already normalized
            continue
        if not M.is_label(target):
            stats.labels = None
            return
        stats.label_keys.add(M.normalize_label(target))
        if len(stats.label_keys) > M.LABEL_MAX_COUNT:
            stats.labels = None
            return
    labels.update(targets)


def _add_shape(stats: _RowStats, findings: _Findings, parts: _BatchParts) -> None:
    """Labels, JSON answers, word counts and overlap, questions, turns: the shape of the task."""
    targets = parts.targets
    # Only an answer starting with {, [ or a code fence can be JSON (or look like it).
    for i in [i for i, target in enumerate(targets) if target.startswith(("{", "[", "```"))]:
        target = targets[i]
        looks_json, parsed = _json_answer(target)
        stats.json_answers += (looks_json or target.startswith("```")) and M.is_json_answer(target)
        if not looks_json:
            continue
        stats.json_like += 1
        if parsed is None:
            findings.add("invalid_json_output", "warning", "the answer looks like JSON but does not parse", FIXES["invalid_json_output"], parts.lines[i])
        else:
            stats.json_ok += 1
            if isinstance(parsed, dict) and len(stats.key_sets) < 1000:
                stats.key_sets[",".join(sorted(parsed))] += 1
    _add_labels(stats, targets)
    stats.input_words.extend(map(len, parts.prompt_words))
    stats.answer_words.extend(map(len, parts.answer_words))
    # The share of answer words found in the input (a short answer: a list is searched faster
    # than a set is built).
    stats.overlap.extend([
        sum(map((prompt if len(answer) < 4 else set(prompt)).__contains__, answer)) / len(answer) if answer else 0.0
        for prompt, answer in zip(parts.prompt_words, parts.answer_words)
    ])
    stats.questions += sum(["?" in text for text in parts.user_texts])
    stats.multi_turn += parts.multi_turn


def _batch_pii(stats: _RowStats, batch: list[tuple[int, Conversation]], systems: list[str]) -> dict[str, list[tuple[int, int, str]]]:
    """Personal-data spans of every message content of the batch, each distinct content scanned
    once (`pii.find_pii_batch`); the batch's system prompts stay cached across batches."""
    cache = stats.pii_cache
    spans: dict[str, list[tuple[int, int, str]] | None] = dict.fromkeys([m.content for _, conv in batch for m in conv.messages])
    todo = []
    for text in spans:
        found = cache.get(text)
        if found is None:
            todo.append(text)  # to scan
        else:
            spans[text] = found
    spans.update(zip(todo, find_pii_batch(todo)))
    for text in dict.fromkeys(systems):
        if len(cache) < 1000:
            cache[text] = spans[text]  # type: ignore[assignment]
    return spans  # type: ignore[return-value]


def _add_pii(stats: _RowStats, line: int, conv: Conversation, spans: dict, redact: bool) -> list[Message]:
    """Count personal data per kind (with up to 20 lines each); the redacted messages when asked."""
    redacted_messages = []
    for m in conv.messages:
        found = spans[m.content]
        for _, _, kind in found:
            stats.pii_counts[kind] += 1
            seen = stats.pii_lines.setdefault(kind, [])
            if len(seen) < 20 and (not seen or seen[-1] != line):
                seen.append(line)
        if redact:
            redacted_messages.append(Message(m.role, redact_text(m.content, found) if found else m.content, m.weight, m.name, m.extra))
    return redacted_messages


# Examples per batch of the pass: MinHash and the personal-data search run over whole batches.
BATCH_ROWS = MINHASH_BATCH


def _add_batch(stats: _RowStats, findings: _Findings, batch: list[tuple[int, Conversation]], counter, out) -> None:
    """Every per-example statistic of a batch of valid examples, in file order."""
    if not batch:
        return
    parts = _batch_parts(stats, batch)
    # An example's system turn is its first (one elsewhere is a system_not_first error).
    systems = [conv.messages[0].content for _, conv in batch if conv.messages[0].role == "system"]
    _add_system_prompts(stats.system_prompts, systems)
    _add_hashes(stats, parts)
    _add_shape(stats, findings, parts)
    stats.signature_batches.append(minhash_word_signatures(parts.compared_words))
    if stats.want_input_signatures:
        stats.input_signature_batches.append(minhash_word_signatures(parts.prompt_words))
    spans = _batch_pii(stats, batch, systems)
    if out is not None or any(spans.values()):  # most batches hold no personal data at all
        for line, conv in batch:
            redacted = _add_pii(stats, line, conv, spans, out is not None)
            if out is not None:
                out.write(conversation_line(Conversation(redacted, conv.source_line, conv.extra)) + "\n")
                stats.redacted_rows += 1
    if counter is not None:
        for line, conv in batch:
            counter.add(line, conv)


def _add_system_prompts(counts: Counter[str], systems: list[str]) -> None:
    """Count the examples of each system prompt (the first 1,000 distinct ones)."""
    for text, count in Counter(systems).items():
        if text in counts or len(counts) < 1000:
            counts[text] += count


def _consume(rows, report: CheckReport, findings: _Findings, stats: _RowStats, counter: "_TokenCounter | None", out) -> None:
    """The one pass: each row's problems, then every per-example statistic of a valid example
    (in batches); a reader that cannot go on still has the rows before it counted."""
    batch: list[tuple[int, Conversation]] = []
    collecting = gc.isenabled()
    gc.disable()  # the pass makes no reference cycles: collections would only walk its objects
    try:
        for row in rows:
            report.rows += 1
            problems = row.problems
            if problems:
                for p in problems:
                    findings.add(p.code, p.severity, p.message, p.fix, p.line)
                if any([p.severity == "error" for p in problems]):
                    continue
            conv = row.conversation
            if conv is None:
                continue
            report.examples += 1
            batch.append((row.line, conv))
            if len(batch) >= BATCH_ROWS:
                _add_batch(stats, findings, batch, counter, out)
                batch = []
    except UserError:
        _add_batch(stats, findings, batch, counter, out)
        raise
    finally:
        if collecting:
            gc.enable()
    _add_batch(stats, findings, batch, counter, out)


def _read_rows(report, findings, stats, counter, rows, redact_path, inputs, force) -> None:
    """Run the pass, writing the redacted copy alongside when asked; a reader that cannot go on
    (a JSON array with a bad byte, a corrupt Parquet page) is reported with what was read so far."""
    from tunesmith.artifacts import atomic_output

    try:
        if redact_path is not None:
            with atomic_output(Path(redact_path), inputs, force) as tmp, open(tmp, "w", encoding="utf-8") as out:
                _consume(rows, report, findings, stats, counter, out)
            report.stats["redacted"] = {"path": str(redact_path), "examples": stats.redacted_rows, "skipped_rows": report.rows - stats.redacted_rows}
        else:
            _consume(rows, report, findings, stats, counter, None)
    except UserError as e:
        findings.add("unreadable", "error", e.message, e.hint or "", None)
    if counter is not None:
        counter.flush()


def _size_findings(report: CheckReport, findings: _Findings, n: int) -> None:
    report.stats["size_advice"] = size_advice(n)
    if n < MIN_EXAMPLES:
        findings.add("too_few_examples", "error", f"only {plural(n, 'valid example')} (at least {MIN_EXAMPLES} needed)", FIXES["too_few_examples"])
    elif n < FEW_EXAMPLES:
        findings.add("small_dataset", "warning", f"{n} examples: fewer than a few hundred", FIXES["small_dataset"])


def _exact_duplicates(report: CheckReport, findings: _Findings, stats: _RowStats, line_arr: np.ndarray) -> np.ndarray:
    """Index of the first copy of each example that repeats one, else -1: a stable sort by hash,
    where every non-first member of a run repeats the first."""
    n = len(line_arr)
    dup_first = np.full(n, -1, dtype=np.int64)
    if n:
        h = np.frombuffer(stats.conv_hash, dtype=np.uint64)
        order = np.argsort(h, kind="stable")
        sh = h[order]
        starts = np.r_[True, sh[1:] != sh[:-1]]
        first_pos = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        dups = np.nonzero(~starts)[0]
        dup_first[order[dups]] = order[first_pos[dups]]
        for i in np.sort(order[dups]):
            findings.add("duplicate", "warning", f"repeats line {line_arr[dup_first[i]]} exactly", FIXES["duplicate"], int(line_arr[i]), [int(line_arr[dup_first[i]])])
    report.stats["exact_duplicates"] = int((dup_first >= 0).sum())
    return dup_first


def _conflicting_outputs(report: CheckReport, findings: _Findings, stats: _RowStats, line_arr: np.ndarray) -> None:
    """Same prompt, different answers."""
    n = len(line_arr)
    conflicts = 0
    if n:
        ph = np.frombuffer(stats.prompt_hash, dtype=np.uint64)
        th = np.frombuffer(stats.target_hash, dtype=np.uint64)
        order = np.lexsort((np.arange(n), ph))
        sp = ph[order]
        starts = np.nonzero(np.r_[True, sp[1:] != sp[:-1]])[0]
        ends = np.r_[starts[1:], n]
        repeated = ends - starts > 1
        for s, e in zip(starts[repeated], ends[repeated]):
            if len(np.unique(th[order[s:e]])) > 1:
                conflicts += 1
                members = sorted(int(line_arr[i]) for i in order[s:e])
                answers = len(np.unique(th[order[s:e]]))
                findings.add(
                    "conflicting_outputs", "warning",
                    f"the same prompt appears on {e - s} lines with {answers} different answers",
                    FIXES["conflicting_outputs"], members[0], members[1:21],
                )
    report.stats["conflicting_inputs"] = conflicts


def _near_duplicate_findings(report, findings, stats: _RowStats, line_arr, dup_first, threshold: float) -> None:
    """Near-duplicates (exact duplicates and empty texts excluded: they are reported otherwise)."""
    signatures = stats.signatures()
    eligible = (dup_first < 0) & ~(signatures == 0xFFFF).all(axis=1) if len(line_arr) else np.zeros(0, bool)
    match, similarity = near_duplicates(signatures, eligible, threshold)
    near = np.nonzero(match >= 0)[0]
    for i in near:
        findings.add(
            "near_duplicate", "warning",
            f"near-duplicate of line {line_arr[match[i]]} (estimated similarity {similarity[i]:.2f})",
            FIXES["near_duplicate"], int(line_arr[i]), [int(line_arr[match[i]])],
        )
    report.stats["near_duplicates"] = {"count": int(len(near)), "threshold": threshold}


def _label_findings(report: CheckReport, findings: _Findings, stats: _RowStats, n: int) -> None:
    """Label counts, imbalance and rare labels: present exactly when the task is classification,
    by eval's own rule (metrics.task_kind)."""
    labels = stats.labels
    task = M.task_kind(n, stats.json_answers, labels is not None, len(stats.label_keys))
    report.stats["task"] = task
    if labels is not None and task == "classification":
        counts = dict(labels.most_common())
        ratio = max(counts.values()) / min(counts.values())
        report.stats["labels"] = {"distinct": len(counts), "counts": counts, "imbalance_ratio": round(ratio, 2)}
        if ratio >= IMBALANCE_RATIO:
            top, bottom = next(iter(counts)), list(counts)[-1]
            findings.add(
                "label_imbalance", "warning",
                f"labels are imbalanced: {top!r} has {counts[top]} examples, {bottom!r} {counts[bottom]} ({ratio:.0f}x)",
                FIXES["label_imbalance"],
            )
        for label, count in counts.items():
            if count < 5 and n >= 100:
                findings.add("rare_label", "warning", f"label {label!r} has only {plural(count, 'example')}", FIXES["rare_label"])
    else:
        report.stats["labels"] = None


def _shape_stats(stats: _RowStats, n: int) -> dict[str, Any]:
    """Shape of inputs and answers (what `advise` reads)."""
    return {
        "input_words": _percentiles(np.frombuffer(stats.input_words, dtype=np.uint32)) if n else None,
        "answer_words": _percentiles(np.frombuffer(stats.answer_words, dtype=np.uint32)) if n else None,
        "answer_overlap_with_prompt_median": float(np.median(np.frombuffer(stats.overlap, dtype=np.float32))) if n else None,
        "question_share": stats.questions / n if n else 0.0,
        "multi_turn_share": stats.multi_turn / n if n else 0.0,
        "json_answer_share": stats.json_like / n if n else 0.0,
        "json_parse_share": stats.json_ok / stats.json_like if stats.json_like else None,
        "json_top_keys_share": stats.key_sets.most_common(1)[0][1] / stats.json_ok if stats.key_sets and stats.json_ok else None,
        "system_prompt": _system_prompt_stats(stats.system_prompts, n),
    }


def _system_prompt_stats(counts: Counter[str], n: int) -> dict[str, Any] | None:
    """The most common system prompt: the share of examples it opens, and its length."""
    if not counts or not n:
        return None
    text, count = counts.most_common(1)[0]
    return {"share": count / n, "words": len(text.split()), "chars": len(text), "distinct": len(counts)}


def _pii_findings(report: CheckReport, findings: _Findings, stats: _RowStats) -> None:
    report.stats["pii"] = dict(stats.pii_counts)
    for kind in PII_KINDS:
        if stats.pii_counts.get(kind):
            where = stats.pii_lines[kind]
            findings.add(
                "pii", "warning", f"{stats.pii_counts[kind]} {kind.replace('_', ' ')} match(es)",
                FIXES["pii"], where[0], where[1:],
            )


def _token_findings(report: CheckReport, findings: _Findings, counter: _TokenCounter, model: str | None, max_length: int | None) -> None:
    """Token percentiles; with max_length, what cutting the end (or data.truncate) would lose."""
    total = np.frombuffer(counter.total, dtype=np.uint32).astype(np.int64)
    prompt = np.frombuffer(counter.prompt, dtype=np.uint32).astype(np.int64)
    answer = np.frombuffer(counter.answer, dtype=np.uint32).astype(np.int64)
    token_stats: dict[str, Any] = {
        "model": model or getattr(counter.tokenizer, "name_or_path", None),
        "total": _percentiles(total),
        "prompt": _percentiles(prompt),
        "assistant": _percentiles(answer),
        "total_tokens": int(total.sum()),
        "assistant_tokens": int(answer.sum()),
    }
    report.stats["tokens"] = token_stats
    if max_length is None:
        return
    over = np.nonzero(total > max_length)[0]
    dropped = np.minimum(total[over] - max_length, answer[over])
    # What training does with data.truncate (formatting.truncate_example, asked per row by the
    # counter): drop earlier exchanges, then cut the prompt, never the final answer; else refuse.
    answer_kept = np.array([counter.answer_kept.get(int(i), False) for i in over], dtype=bool)
    token_stats.update(
        max_length=max_length,
        over_max_length=int(len(over)),
        dropped_assistant_tokens=int(dropped.sum()),
        examples_losing_whole_answer=int((prompt[over] >= max_length).sum()),
        answer_kept_by_prompt_truncation=int(answer_kept.sum()),
    )
    token_lines = np.frombuffer(counter.lines, dtype=np.uint32)
    for i, d, kept in zip(over, dropped, answer_kept):
        whole = " (the whole answer)" if prompt[i] >= max_length else ""
        how = (
            "; data.truncate cuts the prompt (earliest turns first) instead and keeps the answer"
            if kept
            else "; the prompt is too short to cut instead, so data.truncate refuses this row (final_answer_too_long)"
        )
        findings.add(
            "over_max_length", "warning",
            f"{total[i]} tokens > max length {max_length}: cutting the end would drop {d} of {answer[i]} answer tokens{whole}{how}",
            FIXES["over_max_length"], int(token_lines[i]),
        )


def _eval_leakage_findings(report, findings, stats: _RowStats, line_arr, eval_path: Path, read_args: tuple, threshold: float) -> None:
    """Leakage between this file and the eval file."""
    try:
        eval_hash, eval_lines, eval_sig, eval_bad = _read_eval(eval_path, *read_args, True)
    except UserError as e:
        findings.add("eval_unreadable", "error", f"eval file: {e.message}", e.hint or FIXES["eval_unreadable"])
        return
    if eval_bad:
        findings.add("eval_unreadable", "warning", f"eval file: {plural(eval_bad, 'row')} with problems skipped", FIXES["eval_unreadable"])
    report.stats["leakage"] = _leakage(
        findings, np.frombuffer(stats.input_hash, dtype=np.uint64), line_arr, stats.input_signatures(),
        eval_hash, eval_lines, eval_sig, threshold, str(eval_path),
    )


def check_file(
    path: str | Path,
    *,
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
    model: str | None = None,
    max_length: int | None = None,
    eval_path: str | Path | None = None,
    near_dup_threshold: float = 0.9,
    redact_path: str | Path | None = None,
    tokenizer: Any = None,
    force: bool = False,
    chat_template: Any = None,
    config_dir: str | Path | None = None,
) -> CheckReport:
    """Check a data file and return every problem found, with lines and fixes.

    Never raises for a bad file: an unreadable one is a report with one error. `tokenizer` may
    be passed instead of `model` by a caller that already holds one. `force` lets the redacted
    copy replace a file tunesmith did not write (never the input itself). `chat_template` (read
    relative to `config_dir`) is `model.chat_template`: the template `model` renders with.
    """
    from tunesmith.artifacts import guard_output

    if not 0.0 < near_dup_threshold <= 1.0:
        raise UserError(f"near-duplicate threshold {near_dup_threshold} is outside (0, 1]", "use e.g. 0.9")
    started = time.perf_counter()
    path = Path(path)
    inputs = [path, Path(eval_path) if eval_path is not None else None]
    if redact_path is not None:
        guard_output(Path(redact_path), inputs, force)  # a refusal, not a report: nothing was checked
    findings = _Findings()
    report = CheckReport(path=str(path), format=None, rows=0, examples=0)
    try:
        source, rows = open_source(path, format, input_col, output_col, system_prompt)
    except UserError as e:
        findings.add("unreadable", "error", e.message, e.hint or "", None)
        return _finish(report, findings, started)
    report.format = source.format
    if source.input_col:
        report.stats["columns"] = {"input": source.input_col, "output": source.output_col}
    if tokenizer is None and model is not None:
        from tunesmith.models import load_tokenizer

        loading = time.perf_counter()
        tokenizer = load_tokenizer(model, chat_template=chat_template, config_dir=config_dir)
        report.stats["tokenizer_load_s"] = round(time.perf_counter() - loading, 3)
        started += time.perf_counter() - loading  # rows/s measures the check, not the model load
    counter = _TokenCounter(tokenizer, findings, max_length=max_length) if tokenizer is not None else None

    # One pass over the rows, then each whole-file analysis on what it kept.
    stats = _RowStats(want_input_signatures=eval_path is not None)
    _read_rows(report, findings, stats, counter, rows, redact_path, inputs, force)
    n = report.examples
    line_arr = np.frombuffer(stats.lines, dtype=np.uint32) if n else np.zeros(0, dtype=np.uint32)
    _size_findings(report, findings, n)
    dup_first = _exact_duplicates(report, findings, stats, line_arr)
    _conflicting_outputs(report, findings, stats, line_arr)
    _near_duplicate_findings(report, findings, stats, line_arr, dup_first, near_dup_threshold)
    _label_findings(report, findings, stats, n)
    report.stats["shape"] = _shape_stats(stats, n)
    _pii_findings(report, findings, stats)
    if counter is not None:
        _token_findings(report, findings, counter, model, max_length)
    elif max_length is not None:
        report.stats["tokens"] = {"note": "pass --model to count tokens against --max-length"}
    if eval_path is not None:
        read_args = (format, input_col, output_col, system_prompt)
        _eval_leakage_findings(report, findings, stats, line_arr, Path(eval_path), read_args, near_dup_threshold)
    return _finish(report, findings, started)


def _leakage(findings, train_hash, train_lines, train_sig, eval_hash, eval_lines, eval_sig, threshold, eval_name) -> dict:
    """Eval examples whose input is in training, exactly or nearly."""
    exact = 0
    leaked = np.zeros(len(eval_hash), dtype=bool)
    if len(train_hash) and len(eval_hash):
        order = np.argsort(train_hash, kind="stable")
        pos = np.searchsorted(train_hash[order], eval_hash)
        pos = np.minimum(pos, len(order) - 1)
        hit = train_hash[order][pos] == eval_hash
        for j in np.nonzero(hit)[0]:
            exact += 1
            leaked[j] = True
            findings.add(
                "eval_leakage", "warning", f"{eval_name} line {eval_lines[j]} has the same input as line {train_lines[order[pos[j]]]}",
                FIXES["eval_leakage"], int(train_lines[order[pos[j]]]), [int(eval_lines[j])],
            )
    near = 0
    if len(train_sig) and len(eval_sig):
        usable = ~leaked & ~(eval_sig == 0xFFFF).all(axis=1)
        r = rows_per_band(threshold)
        for band in range(MINHASH_PERMUTATIONS // r):
            tk, ek = band_keys(train_sig, band, r), band_keys(eval_sig, band, r)
            order = np.argsort(tk, kind="stable")
            pos = np.minimum(np.searchsorted(tk[order], ek), len(order) - 1)
            candidates = np.nonzero(usable & (tk[order][pos] == ek))[0]
            for j in candidates:
                i = order[pos[j]]
                agree = float((train_sig[i] == eval_sig[j]).mean())
                if agree >= threshold:
                    near += 1
                    usable[j] = False
                    findings.add(
                        "eval_leakage", "warning",
                        f"{eval_name} line {eval_lines[j]} is a near-duplicate of line {train_lines[i]} (estimated similarity {agree:.2f})",
                        FIXES["eval_leakage"], int(train_lines[i]), [int(eval_lines[j])],
                    )
    return {"eval_examples": int(len(eval_hash)), "exact": exact, "near": near}


def _finish(report: CheckReport, findings: _Findings, started: float) -> CheckReport:
    report.counts = dict(findings.counts)
    report.errors = [f for f in findings.items if f.severity == "error"]
    report.warnings = [f for f in findings.items if f.severity == "warning"]
    report.errors.sort(key=lambda f: (f.line is None, f.line or 0))
    report.warnings.sort(key=lambda f: (f.line is None, f.line or 0))
    elapsed = time.perf_counter() - started
    report.stats["rows"] = report.rows
    report.stats["examples"] = report.examples
    report.stats["seconds"] = round(elapsed, 3)
    report.stats["rows_per_s"] = round(report.rows / elapsed) if elapsed > 0 else None
    return report


def run(cfg) -> CheckReport:
    """The pipeline's data check: the config's train file (and eval file), report saved in the run."""
    from tunesmith.artifacts import CHECK_REPORT_FILE, write_json_atomic
    from tunesmith.runs import base_model_ref, tokenizer_options

    report = check_file(
        cfg.resolve(cfg.data.train),
        format=cfg.data.format,
        input_col=cfg.data.input_col,
        output_col=cfg.data.output_col,
        system_prompt=cfg.data.system_prompt,
        model=base_model_ref(cfg),
        max_length=cfg.data.max_length,
        eval_path=cfg.resolve(cfg.data.eval),
        chat_template=tokenizer_options(cfg)["chat_template"],
        config_dir=cfg.base_dir,
    )
    write_json_atomic(cfg.run_dir / CHECK_REPORT_FILE, report.to_dict())
    return report


# --------------------------------------------------------------------------------------------
# The terminal report


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_report(report: CheckReport, console, per_code: int = 10) -> None:
    """Print a check report: summary, then every problem kind with its lines and fix."""
    from rich.table import Table

    stats = report.stats
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_row("file", f"{report.path} ({report.format or 'unreadable'})")
    summary.add_row("rows / examples", f"{report.rows} / {report.examples}")
    if stats.get("columns"):
        summary.add_row("columns", f"input={stats['columns']['input']} output={stats['columns']['output']}")
    summary.add_row("size", stats.get("size_advice", ""))
    if report.examples:
        summary.add_row("duplicates", f"{stats['exact_duplicates']} exact, {stats['near_duplicates']['count']} near "
                        f"(>= {stats['near_duplicates']['threshold']}), {stats['conflicting_inputs']} prompts with conflicting answers")
    if stats.get("labels"):
        labels = stats["labels"]
        shown = ", ".join(f"{_short(k) or '(empty)'}: {v}" for k, v in list(labels["counts"].items())[:12])
        more = " ..." if labels["distinct"] > 12 else ""
        summary.add_row("labels", f"{labels['distinct']} distinct ({shown}{more}); imbalance {labels['imbalance_ratio']}x")
    shape = stats.get("shape") or {}
    if shape.get("json_answer_share"):
        summary.add_row("JSON answers", f"{shape['json_answer_share']:.0%} look like JSON, "
                        f"{(shape['json_parse_share'] or 0):.0%} of those parse")
    if stats.get("pii"):
        summary.add_row("PII", ", ".join(f"{k}: {v}" for k, v in stats["pii"].items()))
    tokens = stats.get("tokens")
    if tokens and "total" in tokens and tokens["total"]:
        for part in ("total", "prompt", "assistant"):
            p = tokens[part]
            summary.add_row(f"{part} tokens", f"min {p['min']}  p10 {p['p10']:.0f}  median {p['median']:.0f}  p90 {p['p90']:.0f}  max {p['max']}")
        if "max_length" in tokens:
            summary.add_row("max length", f"{plural(tokens['over_max_length'], 'example')} over {tokens['max_length']}; "
                            f"cutting the end would drop {tokens['dropped_assistant_tokens']} answer tokens; "
                            f"data.truncate keeps the whole answer of {tokens.get('answer_kept_by_prompt_truncation', 0)} of them")
    elif tokens:
        summary.add_row("tokens", tokens.get("note", ""))
    if stats.get("leakage"):
        lk = stats["leakage"]
        summary.add_row("eval leakage", f"{lk['exact']} exact, {lk['near']} near of {lk['eval_examples']} eval examples")
    if stats.get("redacted"):
        summary.add_row("redacted copy", f"{stats['redacted']['path']} ({plural(stats['redacted']['examples'], 'example')})")
    summary.add_row("time", f"{stats.get('seconds')} s ({stats.get('rows_per_s')} rows/s)")
    console.print(summary)

    for title, items, style in (("errors", report.errors, "red"), ("warnings", report.warnings, "yellow")):
        if not items:
            continue
        by_code: dict[str, list[Finding]] = {}
        for f in items:
            by_code.setdefault(f.code, []).append(f)
        total = sum(report.counts[c] for c in by_code)
        console.print(f"\n[bold {style}]{plural(total, title[:-1])}[/]")
        for code, group in by_code.items():
            console.print(f"[{style}]{code}[/] ({report.counts[code]}): fix: {group[0].fix}", highlight=False)
            for f in group[:per_code]:
                where = f"line {f.line}: " if f.line is not None else ""
                console.print(f"  {where}{f.message}", markup=False, highlight=False)
            if report.counts[code] > per_code:
                console.print(f"  ... and {report.counts[code] - per_code} more (--json lists up to {MAX_FINDINGS_PER_CODE})")
    if not report.errors and not report.warnings:
        console.print("\n[green]no problems found[/]")
