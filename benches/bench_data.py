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

Error columns: with the document mask and per-document positions, every layout must give the same loss and
gradients as running the GPT on each document alone (one pad row at a time, plain causal forward): each packing
row compares its (loss, gradients) with that. A histogram row checks that packing kept the bucket's tokens
(sorted, exactly); the exact-dedup row that it keeps the first of each group of equal normalized texts, as a
dict does. Packing and dedup run on the CPU, and those rows say so; the training steps run on the device.
"""

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impl.data import attention_document_ids, exact_duplicates, near_duplicates, pack_documents
from impl.data.dedup import Dedup, clusters_from_pairs, normalize
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
CPU = torch.device("cpu")
EXACT = {"atol": 0.0, "rtol": 0.0}


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
    attn_doc = attention_document_ids(doc)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=seq_len, vocab_size=65, n_layer=2, n_head=2, n_embd=64)).to(device)

    def loss_fn():
        logits, _ = model(ids, position_ids=pos, document_ids=attn_doc)  # (rows, seq_len, vocab)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def step():
        loss_fn().backward()
        model.zero_grad(set_to_none=True)

    real = int((batch.document_ids >= 0).sum())
    padded = pack_documents(_sample(docs, TOKEN_BUDGET[size]), seq_len, "pad", long_docs="split")
    expected = _loss_and_grads(model, lambda: _one_document_at_a_time(model, padded, device))
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
        expected=expected,
        output=lambda: _loss_and_grads(model, loss_fn),
    )


def _one_document_at_a_time(model, padded, device) -> torch.Tensor:
    """The reference loss: the plain causal GPT on each document (one per pad row) alone, mean over targets."""
    total, count = 0.0, 0
    for ids, doc in zip(padded.input_ids, padded.document_ids):
        ids = ids[doc >= 0].to(device)[None]  # (1, n): the document, without its padding
        logits, _ = model(ids)
        total = total + F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        count += ids.shape[1] - 1
    return total / count


def _loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


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
    packed = [None]

    def pack():
        packed[0] = pack_documents(members, BUCKETS[-1], "ffd") if members else None
        return packed[0]

    def kept_tokens() -> torch.Tensor:
        p = packed[0]
        return p.input_ids[p.document_ids >= 0].sort().values if p is not None else torch.zeros(0, dtype=torch.long)

    bench(
        pack,
        variant=dist,
        params={"length_bucket": length_bucket},
        sweep="length_bucket",
        items=max(1, len(members)),
        items_unit="docs/s",
        metrics={"count": len(members), "share %": 100 * len(members) / len(docs)},
        plot=("count",),
        expected=torch.tensor([t for d in members for t in d], dtype=torch.long).sort().values,
        output=kept_tokens,
        tol=EXACT,
        device=CPU,
    )


def _all_pairs(docs: list[str]) -> Dedup:
    """The naive baseline: the exact n-gram Jaccard of every pair; pairs at or above the threshold cluster."""
    sets = [{t[i : i + NGRAM] for i in range(max(1, len(t) - NGRAM + 1))} for t in map(normalize, docs)]
    pairs = [(i, j) for i, j in itertools.combinations(range(len(sets)), 2) if _jaccard(sets[i], sets[j]) >= THRESHOLD]
    return clusters_from_pairs(len(docs), pairs)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _first_of_each_text(docs: list[str]) -> list[int]:
    """Exact dedup's reference: the index of the first document of each normalized text."""
    first = {}
    for i, text in enumerate(docs):
        first.setdefault(normalize(text), i)
    return sorted(first.values())


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
        expected=torch.tensor(_first_of_each_text(docs)) if method == "exact" else None,
        output=(lambda: torch.tensor(result.kept)) if method == "exact" else None,
        tol=EXACT,
        device=CPU,
    )
