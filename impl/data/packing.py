"""Sequence packing with document masking (Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination: Accelerating Large Language Models without Impacting Performance").

Variable-length documents are placed into rows of `seq_len` tokens instead of one padded row each:

- `greedy`: next-fit in arrival order, a new row whenever the next document does not fit the current one;
- `ffd`: first-fit decreasing (Johnson 1973), longest document first, each into the first row with room;
  at most 11/9 OPT + 6/9 rows, where OPT >= ceil(total tokens / seq_len);
- `pad`: the baseline, one document per row, the rest padding.

Position ids restart at 0 for each document, so a packed document sees the positions it would see alone, and
the document-causal mask (block diagonal, Krell et al. section 3.2) lets token i attend token j only when
both belong to the same document and j <= i:

    M[i, j] = (doc[i] == doc[j]) and (j <= i)

Padding carries document id -1 and forms one segment of its own at the end of a row (positions restarting at
0 too), so no row of the mask is empty and every attention output stays finite. The model reads packed rows
through `GPT.trunk(..., position_ids=, document_ids=attention_document_ids(doc))`, whose attention front takes
the mask as non-decreasing ids (padding becomes the row's last document).
"""

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from impl.common.checks import check_int, check_one_of, check_positive_int, check_tensor, check_token_list

STRATEGIES = ("ffd", "greedy", "pad")
LONG_DOCS = ("reject", "split")
TOKEN_LIMIT = 2**63  # token ids are stored as int64
IGNORE_INDEX = -100  # cross-entropy's ignore_index: labels at padding and across document boundaries


class Packed(NamedTuple):
    input_ids: torch.Tensor  # (rows, seq_len) token ids, pad_id at padding
    position_ids: torch.Tensor  # (rows, seq_len) position within the token's document, restarting at 0
    document_ids: torch.Tensor  # (rows, seq_len) index of the token's document in `docs`, -1 at padding


def _check_docs(docs: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(docs, str | bytes) or not isinstance(docs, Sequence):
        raise TypeError(f"docs must be a sequence of token-id sequences, got {type(docs).__name__}")
    out = []
    for i, doc in enumerate(docs):
        if isinstance(doc, list):  # the common case, ahead of the slower abstract Sequence check
            out.append(doc)
            continue
        if isinstance(doc, torch.Tensor):
            if doc.dim() != 1:
                raise ValueError(f"docs[{i}] must be a 1-D token tensor, got shape {tuple(doc.shape)}")
            doc = doc.tolist()
        if isinstance(doc, str | bytes) or not isinstance(doc, Sequence):
            raise TypeError(f"docs[{i}] must be a sequence of token ids, got {type(doc).__name__}")
        out.append(list(doc))
    for i, doc in enumerate(out):
        if not doc:
            raise ValueError(f"docs[{i}] must hold at least one token, got an empty document")
        # Fast path for plain ints in range; anything else (numpy ints, floats, bools, str, nested lists, ids
        # out of int64) goes through the shared check, which converts or names the offending token.
        if not all(type(t) is int for t in doc) or min(doc) < 0 or max(doc) >= TOKEN_LIMIT:
            out[i] = check_token_list(f"docs[{i}]", doc, TOKEN_LIMIT)
    return out


def _pieces(docs: list[list[int]], seq_len: int, long_docs: str) -> list[tuple[int, list[int]]]:
    """(document index, tokens) pieces no longer than seq_len; an over-long document is split or rejected."""
    pieces = []
    for i, doc in enumerate(docs):
        if len(doc) > seq_len and long_docs == "reject":
            raise ValueError(
                f"docs[{i}] has {len(doc)} tokens, more than seq_len={seq_len}; "
                f"pass long_docs='split' to cut it into seq_len pieces"
            )
        pieces += [(i, doc[s : s + seq_len]) for s in range(0, len(doc), seq_len)]
    return pieces


def _assign_rows(lengths: list[int], seq_len: int, strategy: str) -> list[list[int]]:
    """Which pieces go into which row, as lists of piece indices."""
    if strategy == "pad":
        return [[p] for p in range(len(lengths))]
    rows: list[list[int]] = []
    if strategy == "greedy":
        room: list[int] = []
        for p, n in enumerate(lengths):
            if not room or room[-1] < n:
                rows.append([])
                room.append(seq_len)
            rows[-1].append(p)
            room[-1] -= n
        return rows
    free = np.full(len(lengths), seq_len)  # ffd: free[r] is row r's room; unopened rows are empty
    for p in sorted(range(len(lengths)), key=lambda p: -lengths[p]):  # stable sort: ties keep their order
        r = int(np.argmax(free[: len(rows) + 1] >= lengths[p]))  # the first row with room, else a fresh one
        if r == len(rows):
            rows.append([])
        rows[r].append(p)
        free[r] -= lengths[p]
    return rows


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    strategy: str = "ffd",
    *,
    long_docs: str = "reject",
    pad_id: int = 0,
) -> Packed:
    """Pack token-id documents into rows of seq_len; returns input ids, restarting position ids and document ids
    (-1 at padding), each (rows, seq_len). A document over seq_len is rejected or split (`long_docs`)."""
    docs = _check_docs(docs)
    check_positive_int("seq_len", seq_len)
    check_one_of("strategy", strategy, STRATEGIES)
    check_one_of("long_docs", long_docs, LONG_DOCS)
    check_int("pad_id", pad_id, low=-TOKEN_LIMIT, high=TOKEN_LIMIT, high_open=True)
    pieces = _pieces(docs, seq_len, long_docs)
    rows = _assign_rows([len(toks) for _, toks in pieces], seq_len, strategy)
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    position_ids = np.empty((len(rows), seq_len), dtype=np.int64)  # every slot is written below
    document_ids = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, members in enumerate(rows):
        start = 0
        for p in members:
            doc, toks = pieces[p]
            end = start + len(toks)
            input_ids[r, start:end] = toks
            position_ids[r, start:end] = np.arange(len(toks))
            document_ids[r, start:end] = doc
            start = end
        position_ids[r, start:] = np.arange(seq_len - start)  # the padding segment restarts its positions too
    return Packed(*(torch.from_numpy(x) for x in (input_ids, position_ids, document_ids)))


def document_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Boolean (rows, T, T) mask, True where query i may attend key j: same document id (and j <= i if causal)."""
    check_tensor("document_ids", document_ids, shape=("rows", "seq_len"), integer=True)
    mask = document_ids[:, :, None] == document_ids[:, None, :]  # (rows, T, T)
    if causal:
        T = document_ids.shape[1]
        mask &= torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return mask


def attention_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """The ids the attention front takes, non-decreasing along each row: the index of each token's run of equal
    ids within its row (FFD places documents out of id order; padding, -1 at a row's end, is the last run, so it
    attends only to itself, as the -1 segment of `document_mask`)."""
    check_tensor("document_ids", document_ids, shape=("rows", "seq_len"), integer=True)
    starts = document_ids[:, 1:] != document_ids[:, :-1]  # (rows, seq_len - 1): a new run begins at t + 1
    return torch.cat([torch.zeros_like(document_ids[:, :1]), starts.long().cumsum(1)], dim=1)


def next_token_labels(packed: Packed) -> torch.Tensor:
    """Targets (rows, seq_len): the next token of the same document, IGNORE_INDEX at a document's last token
    and at padding, so no loss term crosses a document boundary."""
    labels = torch.full_like(packed.input_ids, IGNORE_INDEX)
    same = (packed.document_ids[:, 1:] == packed.document_ids[:, :-1]) & (packed.document_ids[:, :-1] >= 0)
    labels[:, :-1] = torch.where(same, packed.input_ids[:, 1:], IGNORE_INDEX)
    return labels


def padding_fraction(packed: Packed) -> float:
    """Share of the packed token slots that hold padding: the compute spent on nothing."""
    return (packed.document_ids < 0).float().mean().item()


def split_speeches(text: str) -> list[str]:
    """The blank-line separated blocks of `text` (in tiny-shakespeare, one speech each: speaker line + lines)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]


@dataclass
class LoaderConfig:
    seq_len: int = 256  # tokens per row
    batch_size: int = 8  # rows per batch
    strategy: str = "ffd"  # ffd, greedy or pad (the padding baseline)
    long_docs: str = "split"  # what to do with a document over seq_len: split or reject
    pad_id: int = 0  # token id written at padding
    shuffle: bool = True  # shuffle documents before packing and rows after, per epoch
    seed: int = 0  # the shuffle's seed; epoch e uses seed + e

    def __post_init__(self) -> None:
        check_positive_int("LoaderConfig.seq_len", self.seq_len)
        check_positive_int("LoaderConfig.batch_size", self.batch_size)
        check_one_of("LoaderConfig.strategy", self.strategy, STRATEGIES)
        check_one_of("LoaderConfig.long_docs", self.long_docs, LONG_DOCS)
        check_int("LoaderConfig.pad_id", self.pad_id, low=-TOKEN_LIMIT, high=TOKEN_LIMIT, high_open=True)


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, seq_len)
    labels: torch.Tensor  # (B, seq_len) next token in the same document, IGNORE_INDEX elsewhere
    position_ids: torch.Tensor  # (B, seq_len)
    document_ids: torch.Tensor  # (B, seq_len) index into the loader's docs, -1 at padding


class PackedLoader:
    """Batches of packed (or padded) rows over a corpus of token-id documents, one pass per iteration."""

    def __init__(self, docs: Sequence[Sequence[int]], config: LoaderConfig):
        if not isinstance(config, LoaderConfig):
            raise TypeError(f"config must be a LoaderConfig, got {type(config).__name__}")
        self.docs = _check_docs(docs)
        self.config = config
        self.epoch = 0

    def pack(self, epoch: int = 0) -> Packed:
        """All rows of one epoch: documents shuffled (if configured), packed, rows shuffled."""
        c = self.config
        order = list(range(len(self.docs)))
        rng = random.Random(c.seed + epoch)
        if c.shuffle:
            rng.shuffle(order)
        packed = pack_documents(
            [self.docs[i] for i in order], c.seq_len, c.strategy, long_docs=c.long_docs, pad_id=c.pad_id
        )
        index = torch.tensor([*order, -1])  # maps the packed document ids back to self.docs; -1 stays -1
        rows = list(range(packed.input_ids.shape[0]))
        if c.shuffle:
            rng.shuffle(rows)
        return Packed(packed.input_ids[rows], packed.position_ids[rows], index[packed.document_ids[rows]])

    def __iter__(self) -> Iterator[Batch]:
        packed = self.pack(self.epoch)
        self.epoch += 1
        labels = next_token_labels(packed)
        for s in range(0, packed.input_ids.shape[0], self.config.batch_size):
            rows = slice(s, s + self.config.batch_size)
            yield Batch(packed.input_ids[rows], labels[rows], packed.position_ids[rows], packed.document_ids[rows])
