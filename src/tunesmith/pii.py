"""Personal data and secrets in text: the patterns, their validators, and redaction.

`find_pii` returns non-overlapping (start, end, kind) spans: e-mail addresses, phone numbers,
card numbers (Luhn-checked), IBANs (mod-97-checked), US SSNs, IP addresses, API keys, bearer
tokens and private keys. `redact_text` replaces each span with its kind's placeholder.

Separate from `check.py`, which counts the matches per row and writes the redacted copy: the
detectors are plain text functions with their own tests, and the check only calls them.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import re
from typing import Any

import numpy as np


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616 mod-97 check: move the first four characters to the end, letters to 10..35."""
    iban = text.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not iban[:2].isalpha() or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _ip_v4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


def _ip_v6(text: str) -> bool:
    if sum(1 for part in text.split(":") if part) < 3:
        return False  # "::1", "a::b": too short to be someone's address, too likely to be code
    try:
        ipaddress.IPv6Address(text)
        return True
    except ValueError:
        return False


def _phone(text: str) -> bool:
    n = len(_digits(text))
    return 8 <= n <= 15 if text.startswith("+") else 10 <= n <= 15


# (kind, placeholder, pattern, validator). Order matters: a span claimed by an earlier kind is
# not matched again (a card number is not also a phone number).
PII_PATTERNS: list[tuple[str, str, re.Pattern, Any]] = [
    ("private_key", "[PRIVATE_KEY]", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.|\n)*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"), None),
    (
        "api_key",
        "[API_KEY]",
        re.compile(
            r"\bsk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}"
            r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
            r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"
            r"|\bgithub_pat_[A-Za-z0-9_]{22,}"
            r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
            r"|\bAIza[0-9A-Za-z_-]{35}"
            r"|\bhf_[A-Za-z0-9]{30,}\b"
        ),
        None,
    ),
    ("bearer_token", "[TOKEN]", re.compile(r"(?<=[Bb]earer )[A-Za-z0-9._~+/-]{16,}=*"), None),
    ("email", "[EMAIL]", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    ("iban", "[IBAN]", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), iban_valid),
    ("credit_card", "[CREDIT_CARD]", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), lambda t: luhn_valid(_digits(t))),
    ("ssn", "[SSN]", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None),
    ("ipv6", "[IP_ADDRESS]", re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), _ip_v6),
    ("ipv4", "[IP_ADDRESS]", re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"), _ip_v4),
    (
        "phone",
        "[PHONE]",
        re.compile(
            r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\w)"
            r"|(?<![\w(])\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\w)"
            r"|(?<!\w)0\d{9,10}(?!\w)"
            r"|(?<!\w)0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}(?!\w)"
        ),
        _phone,
    ),
]
PII_KINDS = [kind for kind, *_ in PII_PATTERNS]
# Characters without which no pattern can match: most texts skip the regexes entirely.
_PII_HINT = re.compile(r"[\d@]|sk-|AKIA|ASIA|gh[pousr]_|github_pat_|xox|AIza|hf_|PRIVATE KEY|[Bb]earer ")


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of personal data and secrets in `text`."""
    if not _PII_HINT.search(text):
        return []
    spans: list[tuple[int, int, str]] = []
    for kind, _, pattern, validator in PII_PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if start == end or any(start < e and s < end for s, e, _ in spans):
                continue
            if validator is not None and not validator(m.group()):
                continue
            spans.append((start, end, kind))
    return sorted(spans)


PLACEHOLDERS = {kind: placeholder for kind, placeholder, *_ in PII_PATTERNS}


def redact_text(text: str, spans: list[tuple[int, int, str]] | None = None) -> str:
    spans = find_pii(text) if spans is None else spans
    for start, end, kind in reversed(spans):
        text = text[:start] + PLACEHOLDERS[kind] + text[end:]
    return text


# Necessary conditions of the patterns above: a text that none of the gates matches holds no
# kind, so `find_pii` would return []. No gate has a lookaround or can match a newline, so run
# over texts joined by newlines, a gate finds a match in every text that has one. The literal
# gates run on the text; the digit and capital-letter gates on its skeleton (every decimal digit
# written 0, every A-Z written A), where each starts with a literal and runs at string-search
# speed instead of testing a character class at every position.
#
# Each search over a batch's text costs about as much as another, so the gates come in groups
# behind one plain string search (`in`) that every match of every gate of the group needs: in
# text without two capitals side by side, an underscore, a dash, ..., the group is skipped.
# (where, needles: one of them is in every match, [(where, gate), ...]); "compact" is the
# skeleton without spaces and dashes, where a card number's 13+ digits stand together.
_PII_GATE_GROUPS = [
    ("skeleton", ("AA",), [
        ("text", re.compile(r"PRIVATE KEY")),  # private_key
        ("text", re.compile(r"AKIA")), ("text", re.compile(r"ASIA")), ("text", re.compile(r"AIza")),  # api_key
        ("skeleton", re.compile(r"AA00")),  # iban: [A-Z]{2}\d{2}
    ]),
    ("text", ("_",), [("text", re.compile(p)) for p in (r"gh[pousr]_", r"github_pat_", r"hf_")]),  # api_key
    ("text", ("-",), [("text", re.compile(p)) for p in (r"sk-", r"xox[abprs]-")]),  # api_key
    ("text", ("earer ",), [("text", re.compile(r"earer "))]),  # bearer_token: "[Bb]earer " before it
    ("text", ("@",), [("text", re.compile(r"@"))]),  # email
    ("text", (":",), [("text", re.compile(r":[0-9A-Fa-f]{0,4}:"))]),  # ipv6: three groups at least, so two colons
    # credit_card: 13 digits, one separator apart at most
    ("compact", ("0" * 13,), [("skeleton", re.compile(r"0(?:[ -]?0){12}"))]),
    ("skeleton", ("000-00-0000",), [("skeleton", re.compile(r"000-00-0000"))]),  # ssn
    ("skeleton", ("0.0",), [("skeleton", re.compile(r"0\.0{1,3}\.0{1,3}\.0"))]),  # ipv4
    # phone, its four forms
    ("skeleton", ("+0",), [("skeleton", re.compile(r"\+0"))]),
    ("skeleton", ("0000",), [("skeleton", re.compile(r"000\)?[ .-]000[ .-]0000")), ("skeleton", re.compile(r"0000000000"))]),
    ("skeleton", ("000 000", "000-000"), [("skeleton", re.compile(r"000{1,3}[ -]000"))]),
]
_ASCII_SKELETON = str.maketrans("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0" * 10 + "A" * 26)
_unicode_skeleton: dict[int, str] = {}


def _skeleton(text: str) -> str:
    """`text` with every decimal digit (what `\\d` matches, any script) as 0 and every A-Z as A."""
    if text.isascii():
        return text.translate(_ASCII_SKELETON)
    if not _unicode_skeleton:  # once, on the first text beyond ASCII
        # Every character but the surrogates, decoded from UTF-32 in one call (a join of 1.1M
        # one-character strings would take a quarter of a second).
        codes = np.r_[np.arange(0xD800, dtype="<u4"), np.arange(0xE000, 0x110000, dtype="<u4")]
        every_character = codes.tobytes().decode("utf-32-le")
        _unicode_skeleton.update(_ASCII_SKELETON)
        _unicode_skeleton.update({ord(c): "0" for c in re.findall(r"\d", every_character)})
    return text.translate(_unicode_skeleton)


def find_pii_batch(texts: list[str]) -> list[list[tuple[int, int, str]]]:
    """`find_pii` of each text, the same spans, with the patterns run only where a gate allows.

    Why: personal data is rare, but every pattern scanning every text cost more than all the
    other checks together; the gates are string searches over one joined string per batch.
    """
    out: list[list[tuple[int, int, str]]] = [[] for _ in texts]
    if not texts:
        return out
    joined = "\n".join(texts)
    hits: list[int] = []  # where gates matched in `joined`
    skeleton = _skeleton(joined)
    texts_by_name = {"text": joined, "skeleton": skeleton, "compact": skeleton.replace(" ", "").replace("-", "")}
    for where, needles, gates in _PII_GATE_GROUPS:
        if not any([needle in texts_by_name[where] for needle in needles]):
            continue
        for gate_where, gate in gates:
            hits += [m.start() for m in gate.finditer(texts_by_name[gate_where])]
    if not hits:
        return out
    starts = [0, *itertools.accumulate(len(text) + 1 for text in texts)]  # offset of each text in `joined`
    for i in {bisect.bisect_right(starts, hit) - 1 for hit in hits}:
        out[i] = find_pii(texts[i])
    return out
