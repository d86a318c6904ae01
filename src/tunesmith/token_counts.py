"""Token counts of many conversations through a chat template, without rendering each one.

`tunesmith data check --model` needs, per example, the tokens of the full render and of the
prompt render (with the generation prompt). Rendering jinja and tokenising a long shared system
prompt for every row costs milliseconds; this module renders each distinct structure (the
system prompt and the roles) once with placeholder contents, so a row's render is the skeleton
filled with its contents, and tokenises the shared prefix once. Only each row's own part is
tokenised, many rows in one call, and a piece that recurs (a label answer) only once.

Why the counts add up: a fast tokenizer cuts its text at added tokens (`<|im_start|>`, ...) and
tokenises the pieces between them apart, so a render has one token per added token plus the
tokens of each piece between them; the prefix ends just before an added token. Every structure
is checked against full renders of its first rows (text and token count) before its skeleton is
trusted; a template that trims, tests or rewrites contents, a tokenizer whose added tokens strip
spaces or are normalized, or any mismatch sends those rows to the full render, row by row.

The rows' own pieces are many short texts, and a fast tokenizer costs tens of microseconds per
text however they are batched. For a byte-level BPE tokenizer with GPT-2's split (SmolLM2), a
text's tokens are the BPE model's tokens of each pre-token, so an ASCII piece is cut into GPT-2
pre-tokens here and each distinct pre-token goes through the model once; the first pieces are
counted both ways, and one difference sends every piece back to the tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tunesmith.schema import Message

# Rows of each structure compared with their full render before its skeleton is trusted.
VERIFY_ROWS = 8
# Distinct structures given a skeleton; rows of further ones take the full render.
MAX_STRUCTURES = 256
# Token counts of text pieces kept (then forgotten at once): a user turn rarely recurs.
MAX_PIECES = 65536
# A placeholder content: private-use characters, with spaces a trimming template would drop.
_HOLE = " \ue000{}\ue001 "
# Templates that look into a message's content (a test, a filter, a split) rather than only
# printing it: the skeleton could not follow them.
_CONTENT_LOOKED_INTO = re.compile(
    r"\bin\s+[\w.\[\]'\"]*content|content['\"]?\]?\s*(?:\||\.|\[|==|!=|is\s+not\s+string)|content['\"]?\]?\s*\)\s*\|"
)


# GPT-2's pre-tokenizer split (a ByteLevel pre-tokenizer with use_regex), for ASCII text, with
# its Unicode classes spelt out: \p{L} is A-Za-z there, \p{N} 0-9, \s the six ASCII spaces.
_ASCII_PRETOKEN = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^ \t\n\v\f\rA-Za-z0-9]+|[ \t\n\v\f\r]+(?![^ \t\n\v\f\r])|[ \t\n\v\f\r]+"
)
# Control characters whose class (a space or not) another regex engine might see otherwise: a
# piece holding one is tokenised by the tokenizer itself.
_ODD_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
# Pieces counted both ways (by pre-tokens and by the tokenizer) before the split is trusted.
VERIFY_PIECES = 64
# Pre-tokens whose token count is kept (then forgotten at once).
MAX_PRETOKENS = 1 << 18


def _byte_level_ascii() -> dict[int, str]:
    """GPT-2's byte -> character map (`bytes_to_unicode`), for the ASCII bytes: what a ByteLevel
    pre-tokenizer hands the BPE model instead of each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {b: mapping[b] for b in range(128)}


_BYTE_LEVEL_ASCII = _byte_level_ascii()


def _splits_like_gpt2(backend: Any) -> bool:
    """A byte-level BPE tokenizer with GPT-2's pre-tokenizer and nothing before it: its tokens of a
    text are its BPE model's tokens of each pre-token, so they can be counted per pre-token."""
    from tokenizers import models, pre_tokenizers

    pre, model = backend.pre_tokenizer, backend.model
    return (
        backend.normalizer is None
        and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex is True and pre.add_prefix_space is False
        and isinstance(model, models.BPE) and model.dropout is None
    )


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """What the chat template is given for each message."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if "tool_calls" in m.extra:
            d["tool_calls"] = m.extra["tool_calls"]
        out.append(d)
    return out


@dataclass
class _Skeleton:
    """A structure's renders as literal pieces around its contents, and its prefix's tokens."""

    full: list[str]  # pieces between the non-system contents, for the full render
    prompt: list[str]  # the same for the prompt render with the generation prompt
    prefix_chars: int  # the shared prefix: this many characters of both renders
    prefix_tokens: int
    verified: int = 0
    broken: bool = False
    # The pieces with the prefix cut off: a row's renders past the prefix are built from these,
    # so a long system prompt is not copied for every row.
    full_tail: list[str] = field(init=False)
    prompt_tail: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.full_tail = [self.full[0][self.prefix_chars :], *self.full[1:]]
        self.prompt_tail = [self.prompt[0][self.prefix_chars :], *self.prompt[1:]]

    def tails(self, contents: list[str]) -> tuple[str, str]:
        """The full and the prompt render of a row past the prefix."""
        return _fill(self.full_tail, contents), _fill(self.prompt_tail, contents)


@dataclass
class TokenCounts:
    """Counts the tokens of conversations in batches; see the module docstring."""

    tokenizer: Any
    skeletons: dict[tuple, _Skeleton | None] = field(default_factory=dict)
    usable: bool = True

    def __post_init__(self) -> None:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        template = getattr(self.tokenizer, "chat_template", None)
        added = backend.get_added_tokens_decoder() if backend is not None else {}
        # Longest first, as the tokenizer matches them. One that eats the spaces around it, or
        # is matched after normalization, has no clean edge: no skeleton then.
        self.added = sorted((t.content for t in added.values()), key=len, reverse=True)
        clean = not any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values())
        self.added_pattern = re.compile("|".join(map(re.escape, self.added))) if self.added else None
        self.piece_tokens: dict[str, int] = {}
        # Pieces of ASCII text are counted from their pre-tokens (each distinct one tokenised once)
        # where the tokenizer splits like GPT-2; checked against the tokenizer on the first pieces.
        self.pretoken_split = backend is not None and _splits_like_gpt2(backend)
        self.pretoken_tokens: dict[str, int] = {}
        self.pieces_verified = 0
        self.usable = bool(
            backend is not None and clean and self.added and isinstance(template, str) and not _CONTENT_LOOKED_INTO.search(template)
        )
        self.backend = backend

    def render(self, messages: list[Message]) -> tuple[str, str]:
        """The full render and the prompt render (the messages before the last answer, with the
        generation prompt) of a conversation, by jinja; raises what the template raises."""
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "assistant"), None)
        prompt_messages = messages if last is None else messages[:last]
        full = self.tokenizer.apply_chat_template(message_dicts(messages), tokenize=False)
        prompt = self.tokenizer.apply_chat_template(message_dicts(prompt_messages), tokenize=False, add_generation_prompt=True)
        return full, prompt

    def count(self, texts: list[str]) -> list[int]:
        """Tokens of each text, tokenised on its own."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _structure(self, messages: list[Message]) -> tuple | None:
        if not self.usable or any([m.extra for m in messages]):
            return None
        return tuple([(m.role, m.content if m.role == "system" else None) for m in messages])

    def _skeleton(self, messages: list[Message]) -> _Skeleton | None:
        """Render the structure once with placeholders and cut it into pieces; None when the
        template does not print each content once, as is."""
        holes = [_HOLE.format(i) for i in range(len(messages))]
        shaped = [Message(m.role, m.content if m.role == "system" else holes[i]) for i, m in enumerate(messages)]
        try:
            full, prompt = self.render(shaped)
        except Exception:  # the template refuses the structure: each row reports it
            return None
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "assistant"), len(messages))
        pieces = []
        for text, upto in ((full, len(messages)), (prompt, last)):
            parts = [text]
            for i in range(upto):
                if messages[i].role == "system":
                    continue
                if parts[-1].count(holes[i]) != 1:
                    return None
                parts[-1:] = parts[-1].split(holes[i])
            pieces.append(parts)
        head = min(len(pieces[0][0]), len(pieces[1][0]))
        common = 0
        while common < head and pieces[0][0][common] == pieces[1][0][common]:
            common += 1
        # The prefix ends just before the last added token of the shared head.
        cut = max((pieces[0][0].rfind(t, 0, common) for t in self.added), default=-1)
        if cut <= 0:
            return None
        prefix = pieces[0][0][:cut]
        return _Skeleton(pieces[0], pieces[1], cut, self.count([prefix])[0])

    def counts(self, batch: list[list[Message]]) -> list[tuple[int, int] | Exception]:
        """(full tokens, prompt tokens) per conversation, or the exception its render raised."""
        out: list[tuple[int, int] | Exception | None] = [None] * len(batch)
        parts: list[str] = []
        owners: list[tuple[int, _Skeleton]] = []
        slow: list[int] = []
        for i, messages in enumerate(batch):
            skeleton = self._skeleton_for(messages)
            if skeleton is not None and skeleton.verified < VERIFY_ROWS:
                self._render_rows(batch, [i], out)  # checks the skeleton on this row
                skeleton = self._skeleton_for(messages)
                if out[i] is not None:
                    continue
            if skeleton is None or skeleton.verified < VERIFY_ROWS:
                slow.append(i)
                continue
            contents = [m.content for m in messages if m.role != "system"]
            parts.extend(skeleton.tails(contents))
            owners.append((i, skeleton))
        part_tokens = self._count_parts(parts) if parts else []
        for k, (i, skeleton) in enumerate(owners):
            out[i] = (skeleton.prefix_tokens + part_tokens[2 * k], skeleton.prefix_tokens + part_tokens[2 * k + 1])
        self._render_rows(batch, slow, out)
        return out  # type: ignore[return-value]

    def _skeleton_for(self, messages: list[Message]) -> _Skeleton | None:
        key = self._structure(messages)
        if key is None:
            return None
        if key not in self.skeletons:
            if len(self.skeletons) >= MAX_STRUCTURES:
                return None
            self.skeletons[key] = self._skeleton(messages)
        skeleton = self.skeletons[key]
        return None if skeleton is None or skeleton.broken else skeleton

    def _render_rows(self, batch, rows: list[int], out: list) -> None:
        """Full renders of `rows`, tokenised; each also checks its structure's skeleton while
        that is not yet trusted."""
        renders: list[tuple[int, str, str]] = []
        for i in rows:
            try:
                full, prompt = self.render(batch[i])
            except Exception as e:  # jinja raises from inside the template; the template is data here
                out[i] = e
                continue
            renders.append((i, full, prompt))
        if not renders:
            return
        tokens = self.count([text for _, full, prompt in renders for text in (full, prompt)])
        for k, (i, full, prompt) in enumerate(renders):
            out[i] = (tokens[2 * k], tokens[2 * k + 1])
            skeleton = self._skeleton_for(batch[i])
            if skeleton is not None and skeleton.verified < VERIFY_ROWS:
                self._verify(skeleton, batch[i], full, prompt, tokens[2 * k], tokens[2 * k + 1])

    def _verify(self, skeleton: _Skeleton, messages, full: str, prompt: str, full_tokens: int, prompt_tokens: int) -> None:
        contents = [m.content for m in messages if m.role != "system"]
        filled_full, filled_prompt = _fill(skeleton.full, contents), _fill(skeleton.prompt, contents)
        parts = self._count_parts([filled_full[skeleton.prefix_chars :], filled_prompt[skeleton.prefix_chars :]])
        if (
            filled_full != full or filled_prompt != prompt
            or skeleton.prefix_tokens + parts[0] != full_tokens or skeleton.prefix_tokens + parts[1] != prompt_tokens
        ):
            skeleton.broken = True
        else:
            skeleton.verified += 1

    def _count_parts(self, parts: list[str]) -> list[int]:
        """Tokens of each part: one per added token in it, plus the tokens of each piece between
        them, each distinct piece tokenised once (a label answer or the generation prompt
        recurs on every row) and the new ones in one call."""
        split = [self.added_pattern.split(part) for part in parts]
        new = list({piece for pieces in split for piece in pieces if piece and piece not in self.piece_tokens})
        if len(self.piece_tokens) + len(new) > MAX_PIECES:
            self.piece_tokens.clear()
        if self.pretoken_split and new:
            new = self._count_by_pretokens(new)
        if new:
            encoded = self.backend.encode_batch_fast(new, add_special_tokens=False)
            self.piece_tokens.update(zip(new, map(len, encoded)))
        tokens = self.piece_tokens
        return [len(pieces) - 1 + sum([tokens[piece] for piece in pieces if piece]) for pieces in split]

    def _pretoken_count(self, piece: str) -> int:
        """Tokens of an ASCII piece: the BPE model's tokens of each pre-token, each distinct
        pre-token asked once."""
        words = _ASCII_PRETOKEN.findall(piece)
        known = self.pretoken_tokens
        try:
            return sum(map(known.__getitem__, words))  # most pre-tokens are known words
        except KeyError:
            pass
        if len(known) >= MAX_PRETOKENS:
            known.clear()
        for word in words:
            if word not in known:
                known[word] = len(self.backend.model.tokenize(word.translate(_BYTE_LEVEL_ASCII)))
        return sum(map(known.__getitem__, words))

    def _count_by_pretokens(self, new: list[str]) -> list[str]:
        """Count the ASCII pieces of `new` by `_pretoken_count` (into `piece_tokens`); the others
        are returned for the tokenizer. The first VERIFY_PIECES are also tokenised whole: one
        difference and this tokenizer is never counted so again."""
        rest = []
        counted = {}
        for piece in new:
            if piece.isascii() and not _ODD_CONTROL.search(piece):
                counted[piece] = self._pretoken_count(piece)
            else:
                rest.append(piece)
        if counted and self.pieces_verified < VERIFY_PIECES:
            sample = list(counted)[: VERIFY_PIECES - self.pieces_verified]
            whole = [len(e) for e in self.backend.encode_batch_fast(sample, add_special_tokens=False)]
            if whole != [counted[piece] for piece in sample]:
                self.pretoken_split = False
                return new
            self.pieces_verified += len(sample)
        self.piece_tokens.update(counted)
        return rest


def _fill(pieces: list[str], contents: list[str]) -> str:
    """The render: the pieces with the contents between them (an answer the prompt does not
    hold: its pieces are one fewer)."""
    out = [pieces[0]]
    for piece, content in zip(pieces[1:], contents):
        out.append(content)
        out.append(piece)
    return "".join(out)
