"""Near-duplicate detection: b-bit MinHash signatures of word 3-grams, and LSH banding.

`minhash_signatures` turns texts into compact (n, 64) uint16 signatures; `near_duplicates`
finds, for each row, an earlier row whose estimated Jaccard similarity reaches a threshold,
without comparing every pair. `rows_per_band` and `band_keys` are the banding, shared with the
check's eval-leakage search.

Separate from `check.py`, which decides what text of a conversation is compared and reports
the pairs: this module is numpy on texts and signatures only.
"""

from __future__ import annotations

import itertools
import re
import zlib

import numpy as np

# MinHash: 64 permutations, the low 16 bits of each minimum kept (b-bit MinHash). LSH bands of
# 4 rows (16 bands) for high thresholds; narrower bands find the less similar pairs low
# thresholds ask for (see `rows_per_band`).
MINHASH_PERMUTATIONS = 64
MINHASH_BATCH = 2048
_rng = np.random.default_rng(20240601)
_MINHASH_A = (_rng.integers(1, 2**63, MINHASH_PERMUTATIONS, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
_MINHASH_B = _rng.integers(0, 2**63, MINHASH_PERMUTATIONS, dtype=np.uint64)
_WORD = re.compile(r"\w+")


# ASCII bytes -> themselves lowercased when `\w` matches them (A-Z a-z 0-9 _), else a space.
_ASCII_WORD_BYTES = bytes(
    c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c == 95) else 32 for c in range(256)
)


def casefold_words(text: str) -> list[bytes]:
    """The casefolded `\\w+` words of `text`, each UTF-8 encoded (what MinHash hashes).

    An ASCII text (most) is split as bytes, where lower() is casefold() and `\\w` matches what
    it matches in str: every other byte becomes a space and bytes.split() cuts there, two C
    passes instead of a regex, without encoding each word afterwards.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORD_BYTES).split()
    return [w.encode("utf-8", "surrogatepass") for w in _WORD.findall(text.casefold())]


def minhash_signatures(texts: list[str]) -> np.ndarray:
    """(len(texts), 64) uint16 b-bit MinHash signatures over word 3-gram shingles.

    A text with fewer than three words is one shingle; an empty text gets all-0xFFFF (and is
    never called a near-duplicate). Words are `casefold_words`.
    """
    return minhash_word_signatures([casefold_words(text) for text in texts])


def minhash_word_signatures(rows_words: list[list[bytes]]) -> np.ndarray:
    """`minhash_signatures` of texts already split by `casefold_words` (a caller that needs
    the words anyway splits each text once).

    Words are hashed with crc32, shingles combined in numpy, and rows processed in chunks of
    bounded word count, so long documents stay small.
    """
    out = np.full((len(rows_words), MINHASH_PERMUTATIONS), 0xFFFF, dtype=np.uint16)
    lengths = np.fromiter(map(len, rows_words), dtype=np.int64, count=len(rows_words))
    rows = np.nonzero(lengths)[0]
    ends = np.cumsum(lengths[rows])  # words up to and with each non-empty row
    begin = 0
    while begin < len(rows):
        # Rows up to the one that brings the chunk to 32,768 words (a row's signature is its own:
        # where chunks end changes nothing but memory).
        base = int(ends[begin - 1]) if begin else 0
        end = min(int(np.searchsorted(ends, base + 32768)) + 1, len(rows))
        chunk = rows[begin:end]
        words = itertools.chain.from_iterable([rows_words[i] for i in chunk.tolist()])
        hashes = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=int(ends[end - 1]) - base)
        out[chunk] = _signatures(hashes, lengths[chunk])
        begin = end
    return out


def _signatures(wh: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """MinHash of rows given as their word hashes end to end (`wh`) and their word counts
    (`lengths`, each at least one)."""
    starts = np.cumsum(lengths) - lengths
    # One shingle per window of three words; a row shorter than three words is one shingle.
    counts = np.maximum(lengths - 2, 1)
    p = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    end = np.repeat(starts + lengths, counts)
    golden, mix = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
    seg_starts = np.cumsum(counts) - counts
    mins = np.empty((MINHASH_PERMUTATIONS, len(lengths)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = wh[p] * golden
        second = p + 1 < end
        h[second] += wh[np.minimum(p + 1, len(wh) - 1)][second] * mix
        third = p + 2 < end
        h[third] += wh[np.minimum(p + 2, len(wh) - 1)][third]
        # One permutation at a time: a shingle-long buffer stays in cache, a (64, shingles)
        # matrix would not.
        permuted = np.empty_like(h)
        for k in range(MINHASH_PERMUTATIONS):
            np.multiply(h, _MINHASH_A[k], out=permuted)
            permuted += _MINHASH_B[k]
            mins[k] = np.minimum.reduceat(permuted, seg_starts)
    return (mins & np.uint64(0xFFFF)).astype(np.uint16).T


def rows_per_band(threshold: float) -> int:
    """Rows per LSH band: a pair of similarity s becomes a candidate with 1-(1-s^r)^(64/r)."""
    return 4 if threshold >= 0.75 else 2 if threshold >= 0.4 else 1


def band_keys(signatures: np.ndarray, band: int, rows_per_band: int) -> np.ndarray:
    """One key per row: the `rows_per_band` 16-bit values of band `band`, packed into a uint64."""
    part = signatures[:, band * rows_per_band : (band + 1) * rows_per_band].astype(np.uint64)
    key = np.zeros(len(signatures), dtype=np.uint64)
    for j in range(rows_per_band):
        key = (key << np.uint64(16)) | part[:, j]
    return key


def near_duplicates(signatures: np.ndarray, eligible: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row, an earlier row with estimated Jaccard >= threshold (-1 if none), and the estimate.

    LSH banding proposes candidates (rows sharing a band with the first row of the bucket);
    the signatures' agreement estimates the similarity.
    """
    n = len(signatures)
    match = np.full(n, -1, dtype=np.int64)
    similarity = np.zeros(n, dtype=np.float32)
    index = np.nonzero(eligible)[0]
    if len(index) < 2:
        return match, similarity
    sig = signatures[index]
    r = rows_per_band(threshold)
    for band in range(MINHASH_PERMUTATIONS // r):
        keys = band_keys(sig, band, r)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
        candidates = np.nonzero(~starts)[0]
        if not len(candidates):
            continue
        member, first = order[candidates], group_first[candidates]
        open_ = match[index[member]] < 0
        member, first = member[open_], first[open_]
        for chunk in range(0, len(member), 65536):
            m, f = member[chunk : chunk + 65536], first[chunk : chunk + 65536]
            agree = (sig[m] == sig[f]).mean(axis=1)
            hit = agree >= threshold
            match[index[m[hit]]] = index[f[hit]]
            similarity[index[m[hit]]] = agree[hit]
    return match, similarity
