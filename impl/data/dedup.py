"""Deduplication: exact (hash of normalized text) and near-duplicate by MinHash with LSH banding
(Broder 1997, "On the resemblance and containment of documents"; Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3; as used for LLM corpora by Lee et al. 2022, "Deduplicating Training Data Makes
Language Models Better").

A document is the set S of its character n-grams (shingles) after normalization. For a random hash h,
P[min h(S_a) = min h(S_b)] = J(S_a, S_b) = |S_a & S_b| / |S_a | S_b|, so the share of equal entries of two
signatures of `num_perm` such minima estimates Jaccard with standard error sqrt(J (1 - J) / num_perm). The
hashes are h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 over 32-bit shingle hashes x, a_i odd (Dietzfelbinger's
multiply-add-shift family).

LSH banding cuts each signature into b bands of r rows; two documents become candidates when some band
matches entirely, which happens with probability 1 - (1 - J^r)^b, an S-curve with its step near
(1 / b)^(1 / r). Candidates are then checked against the threshold with the signature estimate, and
connected pairs form clusters; the kept set holds every singleton and the first member of each cluster.
"""

import hashlib
import itertools
import re
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from impl.common.checks import check_positive_int, check_probability

_MASK32 = (1 << 32) - 1


class Dedup(NamedTuple):
    clusters: list[list[int]]  # groups of >= 2 duplicate document indices, each sorted, ordered by first member
    kept: list[int]  # sorted indices that survive: singletons and the first member of each cluster


def _check_docs(docs: Sequence[str]) -> None:
    if isinstance(docs, str) or not isinstance(docs, Sequence):
        raise TypeError(f"docs must be a sequence of str, got {type(docs).__name__}")
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise TypeError(f"docs[{i}] must be a str, got {type(doc).__name__}")


def normalize(text: str) -> str:
    """NFKC, lower case, runs of whitespace collapsed to one space, ends stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def clusters_from_pairs(n: int, pairs: list[tuple[int, int]]) -> Dedup:
    """Connected components of n documents under the duplicate `pairs` (union-find), and the kept set."""
    parent = list(range(n))  # union-find over documents

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    clusters = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    return Dedup(clusters, sorted(g[0] for g in groups.values()))


def exact_duplicates(docs: Sequence[str]) -> Dedup:
    """Clusters of documents whose normalized text has the same blake2b hash, and the kept set."""
    _check_docs(docs)
    first: dict[bytes, int] = {}
    pairs = []
    for i, doc in enumerate(docs):
        key = hashlib.blake2b(normalize(doc).encode(), digest_size=16).digest()
        pairs.append((first.setdefault(key, i), i))
    return clusters_from_pairs(len(docs), pairs)


def _shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Distinct 32-bit hashes of the byte n-grams of the normalized text (the text itself if shorter)."""
    data = np.frombuffer(normalize(text).encode(), dtype=np.uint8).astype(np.uint64)
    if len(data) < ngram:
        data = np.concatenate([data, np.zeros(ngram - len(data), dtype=np.uint64)])
    windows = np.lib.stride_tricks.sliding_window_view(data, ngram)  # (n_shingles, ngram)
    codes = windows @ (np.uint64(257) ** np.arange(ngram - 1, -1, -1, dtype=np.uint64))  # base-257, wraps mod 2^64
    codes = (codes ^ (codes >> np.uint64(32))) * np.uint64(0x9E3779B97F4A7C15)  # mix the high bytes down
    return np.unique((codes >> np.uint64(32)) & np.uint64(_MASK32))


def minhash_signatures(docs: Sequence[str], num_perm: int = 128, ngram: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signatures (len(docs), num_perm) uint64 over the character n-gram sets of the normalized docs."""
    _check_docs(docs)
    check_positive_int("num_perm", num_perm)
    check_positive_int("ngram", ngram)
    if not docs:
        return np.empty((0, num_perm), dtype=np.uint64)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    shingles = [_shingle_hashes(doc, ngram) for doc in docs]
    x = np.concatenate(shingles)  # every document's shingle hashes, one after another
    starts = np.cumsum([0] + [len(h) for h in shingles[:-1]])  # where each document's run begins
    out = np.empty((len(docs), num_perm), dtype=np.uint64)
    for i in range(num_perm):
        hashed = (a[i] * x + b[i]) >> np.uint64(32)  # multiply-add-shift, products wrap mod 2^64
        out[:, i] = np.minimum.reduceat(hashed, starts)
    return out


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands * rows = num_perm whose S-curve step (1 / bands)^(1 / rows) is nearest the
    threshold."""
    options = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    return min(options, key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold))


def near_duplicates(
    docs: Sequence[str],
    threshold: float = 0.8,
    *,
    num_perm: int = 128,
    ngram: int = 5,
    bands: int | None = None,
    seed: int = 0,
) -> Dedup:
    """Clusters of documents whose estimated n-gram Jaccard reaches `threshold` in (0, 1], found by MinHash LSH
    (`bands` must divide num_perm; by default chosen from the threshold), and the kept set."""
    check_probability("threshold", threshold, low_open=True)
    check_positive_int("num_perm", num_perm)
    if bands is None:
        bands, rows = lsh_bands(num_perm, threshold)
    else:
        check_positive_int("bands", bands)
        if num_perm % bands:
            raise ValueError(f"bands must divide num_perm={num_perm}, got {bands}")
        rows = num_perm // bands
    sig = minhash_signatures(docs, num_perm=num_perm, ngram=ngram, seed=seed)
    candidates = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, key in enumerate(sig[:, band * rows : (band + 1) * rows]):
            buckets.setdefault(key.tobytes(), []).append(i)
        for members in buckets.values():
            candidates.update(itertools.combinations(members, 2))
    pairs = np.array(sorted(candidates), dtype=np.int64).reshape(-1, 2)  # (candidates, 2)
    estimate = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1)  # (candidates,) estimated Jaccard
    return clusters_from_pairs(len(docs), pairs[estimate >= threshold].tolist())
