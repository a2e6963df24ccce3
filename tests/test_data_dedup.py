"""Deduplication: exact clusters match pandas on the same normalization, MinHash estimates the exact n-gram
Jaccard within its standard error, LSH finds planted near-duplicates at recall and precision >= 0.95, every
exact duplicate is also a near one, and bad input gets a named error."""

import itertools
import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.data import exact_duplicates, minhash_signatures, near_duplicates
from impl.data.dedup import lsh_bands, normalize
from impl.data.packing import split_speeches
from impl.gpt import load_shakespeare

NGRAM = 5


def _vocabulary(rng: random.Random, n: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(n)]


def _mutate(words: list[str], rng: random.Random, vocab: list[str], changes: int) -> list[str]:
    """A copy with `changes` edits: a word replaced, deleted or inserted."""
    words = list(words)
    for _ in range(changes):
        i = rng.randrange(len(words))
        kind = rng.choice(("replace", "delete", "insert"))
        if kind == "replace":
            words[i] = rng.choice(vocab)
        elif kind == "delete":
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return words


def _jaccard(a: str, b: str, n: int = NGRAM) -> float:
    """The exact n-gram Jaccard, from Python sets of substrings (texts here are already normalized ASCII)."""
    sa, sb = ({t[i : i + n] for i in range(len(t) - n + 1)} for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def _pandas_exact(docs):
    keys = pd.Series([" ".join(d.lower().split()) for d in docs])  # lower case, whitespace collapsed
    kept = [i for i, dup in enumerate(keys.duplicated(keep="first")) if not dup]
    clusters = sorted(sorted(g) for g in keys.groupby(keys).groups.values() if len(g) > 1)
    return [[int(i) for i in c] for c in clusters], kept


def test_exact_duplicates_match_pandas():
    docs = ["To be, or not", "to be,  or NOT", "that is", "the question", "That is\n", "x", "To be, or not"]
    result = exact_duplicates(docs)
    clusters, kept = _pandas_exact(docs)
    assert result.clusters == clusters == [[0, 1, 6], [2, 4]]
    assert result.kept == kept == [0, 2, 3, 5]
    assert exact_duplicates([d + "!" if i == 1 else d for i, d in enumerate(docs)]).clusters == [[0, 6], [2, 4]]


def test_exact_duplicates_on_speeches_match_pandas(shakespeare_path):
    if shakespeare_path is None:
        pytest.skip("tiny-shakespeare not provided (set TINYSHAKESPEARE)")
    speeches = split_speeches(load_shakespeare(shakespeare_path))
    result = exact_duplicates(speeches)
    assert (result.clusters, result.kept) == _pandas_exact(speeches)
    assert result.clusters  # the corpus has repeats ("GLOUCESTER:" alone, "All:\nAmen." ...)


def test_minhash_estimates_jaccard_within_its_standard_error():
    rng = random.Random(0)
    vocab = _vocabulary(rng)
    num_perm = 256
    pairs = []
    for changes in (2, 5, 10, 20, 40, 60, 90, 120, 150, 200):
        base = rng.choices(vocab, k=150)
        pairs.append((" ".join(base), " ".join(_mutate(base, rng, vocab, changes))))
    docs = [t for pair in pairs for t in pair]
    assert all(normalize(d) == d for d in docs)
    sig = minhash_signatures(docs, num_perm=num_perm)
    truth = np.array([_jaccard(a, b) for a, b in pairs])
    estimate = (sig[0::2] == sig[1::2]).mean(axis=1)
    sigma = np.sqrt(truth * (1 - truth) / num_perm)
    assert truth.min() < 0.2 and truth.max() > 0.9  # the pairs span the range
    assert np.all(np.abs(estimate - truth) <= 4 * sigma + 1 / num_perm)
    assert abs((estimate - truth).mean()) <= 3 * np.sqrt((sigma**2).sum()) / len(pairs) + 1 / num_perm  # unbiased
    other = minhash_signatures(docs, num_perm=num_perm, seed=1)  # negative control: another seed, other hashes
    assert not np.array_equal(sig, other)
    assert np.array_equal(sig, minhash_signatures(docs, num_perm=num_perm))  # deterministic for a seed


def _planted(seed: int, changes: tuple[int, int]) -> tuple[list[str], set[tuple[int, int]]]:
    """300 random documents plus 60 edited copies of some of them; the (base, copy) pairs are the truth."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    bases = [rng.choices(vocab, k=rng.randint(60, 120)) for _ in range(300)]
    docs = [" ".join(b) for b in bases]
    truth = set()
    for base in rng.sample(range(len(bases)), 60):
        truth.add((base, len(docs)))
        docs.append(" ".join(_mutate(bases[base], rng, vocab, rng.randint(*changes))))
    return docs, truth


def _pairs(result) -> set[tuple[int, int]]:
    return {pair for c in result.clusters for pair in itertools.combinations(c, 2)}


def test_near_duplicates_found_with_recall_and_precision():
    docs, truth = _planted(seed=1, changes=(1, 3))
    assert min(_jaccard(docs[i], docs[j]) for i, j in truth) > 0.75
    result = near_duplicates(docs, threshold=0.6)
    found = _pairs(result)
    hits = len(found & truth)
    assert hits / len(truth) >= 0.95, f"recall {hits / len(truth):.3f}"
    assert hits / len(found) >= 0.95, f"precision {hits / len(found):.3f}"
    assert {j for _, j in found & truth}.isdisjoint(result.kept)  # a found copy is dropped, its base kept
    assert {i for i, _ in found & truth} <= set(result.kept)


def test_heavily_edited_copies_are_not_near_duplicates():
    """Negative control: copies far below the threshold (true Jaccard < 0.5 against 0.6) are not reported."""
    docs, truth = _planted(seed=2, changes=(70, 80))
    assert max(_jaccard(docs[i], docs[j]) for i, j in truth) < 0.5
    assert len(_pairs(near_duplicates(docs, threshold=0.6)) & truth) <= 0.05 * len(truth)


_texts = st.text(alphabet="ab c", min_size=1, max_size=30)


@settings(max_examples=30, deadline=None)
@given(docs=st.lists(_texts, min_size=1, max_size=12), copies=st.lists(st.integers(0, 11), max_size=6))
def test_every_exact_duplicate_is_a_near_duplicate(docs, copies):
    docs = docs + [docs[i % len(docs)].upper() + "  " for i in copies]  # planted copies, case and space changed
    near = near_duplicates(docs, threshold=0.9, num_perm=32)
    where = {i: k for k, c in enumerate(near.clusters) for i in c}
    for cluster in exact_duplicates(docs).clusters:
        assert all(i in where and where[i] == where[cluster[0]] for i in cluster)
    assert set(near.kept) <= set(exact_duplicates(docs).kept)


def test_lsh_bands_step_near_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_bands(128, threshold)
        assert bands * rows == 128
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.1


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, True, "0.5"])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match=rf"threshold must be a number in \(0, 1\], got {threshold!r}"):
        near_duplicates(["a", "b"], threshold=threshold)


def test_bad_dedup_inputs():
    with pytest.raises(ValueError, match=r"bands must divide num_perm=128, got 7"):
        near_duplicates(["a"], bands=7)
    with pytest.raises(ValueError, match=r"num_perm must be a positive int, got 0"):
        minhash_signatures(["a"], num_perm=0)
    with pytest.raises(ValueError, match=r"ngram must be a positive int, got 0"):
        minhash_signatures(["a"], ngram=0)
    with pytest.raises(TypeError, match=r"docs must be a sequence of str, got str"):
        exact_duplicates("abc")
    with pytest.raises(TypeError, match=r"docs\[1\] must be a str, got int"):
        near_duplicates(["a", 3])
