"""Data efficiency: what packing saves over padding, and what deduplication costs.

Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination": one training step (forward and
backward of a tiny GPT with the document-causal mask through SDPA) over the same documents laid out by the
padding baseline (one document per row), greedy next-fit and first-fit-decreasing packing, swept over the row
length, on the tiny-shakespeare speech lengths and on a long-tailed (log-normal) synthetic distribution. The
throughput column counts only real tokens, so it is the effective tokens/s; `padding %` is the share of the
step's token slots spent on padding, `padding % (corpus)` the same share for the whole distribution.

`data-length-histogram` is the length histogram of both distributions: the sweep is the bucket's upper edge
(power-of-two buckets), the `count` column the number of documents in it; the timed call packs that bucket's
documents with FFD.

Deduplication throughput (documents/s) on the speeches: exact (normalized hash), MinHash-LSH near-duplicates,
and the naive baseline that computes the exact n-gram Jaccard of every pair (quadratic, so small sizes only).
"""

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impl.data import exact_duplicates, near_duplicates, pack_documents
from impl.data.dedup import Dedup, clusters_from_pairs, normalize
from impl.data.packed_attention import gpt_packed_forward
from impl.data.packing import IGNORE_INDEX, next_token_labels, padding_fraction, split_speeches
from impl.gpt import GPT, CharTokenizer, GPTConfig, load_shakespeare

SWEEPS = {
    "seq_len": {"smoke": [128], "small": [128, 256, 512], "full": [256, 512, 1024, 2048]},
    "n_docs": {"smoke": [100], "small": [500, 2000, 7222], "full": [500, 2000, 7222]},
}
TOKEN_BUDGET = {"smoke": 512, "small": 4096, "full": 65536}  # real tokens per measured training step
STRATEGIES = ("pad", "greedy", "ffd")
BUCKETS = [2**k for k in range(3, 13)]  # upper edges: (0, 8], (8, 16], ..., (2048, 4096]
ALL_PAIRS_MAX_DOCS = 600  # the quadratic baseline runs only up to here
NGRAM, THRESHOLD = 5, 0.8


@pytest.fixture(scope="module")
def speeches(shakespeare_path) -> list[str]:
    if shakespeare_path is None:
        pytest.skip("tiny-shakespeare not provided (set TINYSHAKESPEARE)")
    return split_speeches(load_shakespeare(shakespeare_path))


@pytest.fixture(scope="module")
def corpora(speeches) -> dict[str, list[list[int]]]:
    """Token-id documents: the speeches (characters) and a log-normal synthetic set of about the same size."""
    tok = CharTokenizer("".join(speeches))
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=4.5, sigma=1.1, size=len(speeches)), 1, 4096).astype(int)
    synthetic = [rng.integers(0, tok.vocab_size, size=n).tolist() for n in lengths]
    return {"shakespeare": [tok.encode(s) for s in speeches], "longtail": synthetic}


def _sample(docs: list[list[int]], budget: int) -> list[list[int]]:
    """A seeded random sample of documents holding about `budget` tokens."""
    order = random.Random(0).sample(range(len(docs)), len(docs))
    total = list(itertools.accumulate(len(docs[i]) for i in order))
    return [docs[i] for i in order[: max(1, sum(t < budget for t in total))]]


def _packing(bench, device, size, corpora, dist, strategy, seq_len):
    docs = corpora[dist]
    batch = pack_documents(_sample(docs, TOKEN_BUDGET[size]), seq_len, strategy, long_docs="split")
    corpus_packed = pack_documents(docs, seq_len, strategy, long_docs="split")
    labels = next_token_labels(batch).to(device)
    ids, pos, doc = (t.to(device) for t in batch)
    model = GPT(GPTConfig(block_size=seq_len, vocab_size=65, n_layer=2, n_head=2, n_embd=64)).to(device)

    def step():
        logits = gpt_packed_forward(model, ids, pos, doc, method="sdpa")  # (rows, seq_len, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        model.zero_grad(set_to_none=True)

    real = int((batch.document_ids >= 0).sum())
    bench(
        step,
        variant=strategy,
        params={"dist": dist, "seq_len": seq_len},
        sweep="seq_len",
        dtype=torch.float32,
        baseline=strategy == "pad",
        tokens=real,
        metrics={
            "rows": batch.input_ids.shape[0],
            "padding %": 100 * padding_fraction(batch),
            "padding % (corpus)": 100 * padding_fraction(corpus_packed),
            "rows (corpus)": corpus_packed.input_ids.shape[0],
        },
        plot=("throughput", "padding %"),
    )


@pytest.mark.benchmark(group="data-packing-shakespeare")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packing_shakespeare(bench, device, size, corpora, strategy, seq_len):
    _packing(bench, device, size, corpora, "shakespeare", strategy, seq_len)


@pytest.mark.benchmark(group="data-packing-longtail")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packing_longtail(bench, device, size, corpora, strategy, seq_len):
    _packing(bench, device, size, corpora, "longtail", strategy, seq_len)


@pytest.mark.benchmark(group="data-length-histogram")
@pytest.mark.parametrize("dist", ["shakespeare", "longtail"])
@pytest.mark.parametrize("length_bucket", BUCKETS)
def test_length_histogram(bench, corpora, dist, length_bucket):
    docs = corpora[dist]
    lower = 0 if length_bucket == BUCKETS[0] else length_bucket // 2
    members = [d for d in docs if lower < len(d) <= length_bucket]
    bench(
        lambda: pack_documents(members, BUCKETS[-1], "ffd") if members else None,
        variant=dist,
        params={"length_bucket": length_bucket},
        sweep="length_bucket",
        items=max(1, len(members)),
        items_unit="docs/s",
        metrics={"count": len(members), "share %": 100 * len(members) / len(docs)},
        plot=("count",),
    )


def _all_pairs(docs: list[str]) -> Dedup:
    """The naive baseline: the exact n-gram Jaccard of every pair; pairs at or above the threshold cluster."""
    sets = [{t[i : i + NGRAM] for i in range(max(1, len(t) - NGRAM + 1))} for t in map(normalize, docs)]
    pairs = [(i, j) for i, j in itertools.combinations(range(len(sets)), 2) if _jaccard(sets[i], sets[j]) >= THRESHOLD]
    return clusters_from_pairs(len(docs), pairs)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


DEDUP = {
    "exact": exact_duplicates,
    "minhash-lsh": lambda docs: near_duplicates(docs, threshold=THRESHOLD, ngram=NGRAM),
    "all-pairs": _all_pairs,
}


@pytest.mark.benchmark(group="data-dedup")
@pytest.mark.parametrize("method", list(DEDUP))
def test_dedup(bench, speeches, method, n_docs):
    if method == "all-pairs" and n_docs > ALL_PAIRS_MAX_DOCS:
        pytest.skip(f"the quadratic all-pairs baseline runs only up to {ALL_PAIRS_MAX_DOCS} documents")
    docs = speeches[:n_docs]
    result = DEDUP[method](docs)
    bench(
        lambda: DEDUP[method](docs),
        variant=method,
        params={"n_docs": len(docs), "threshold": THRESHOLD if method != "exact" else None},
        sweep="n_docs",
        baseline=method == "all-pairs",
        items=len(docs),
        items_unit="docs/s",
        metrics={"removed": len(docs) - len(result.kept), "clusters": len(result.clusters)},
    )
