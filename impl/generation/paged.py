"""A paged key/value cache: fixed-size blocks of token slots, a free list, and one block table per sequence.

Paper: Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(vLLM), sec. 4.1-4.2. A static cache reserves max_tokens slots for every batch row, so a short request wastes the
rest of its row; here the KV memory is a pool of `num_blocks` blocks of `block_size` token slots, a sequence
owns the blocks its block table lists (logical block i of the sequence -> physical block table[i]), and a block
is taken from the free list only when the sequence's tokens reach it. The only waste is the unused tail of each
sequence's last block (internal fragmentation, under block_size slots per sequence, sec. 4.2).

Token t of a sequence lives in slot `table[t // block_size] * block_size + t % block_size` of the pool. One
forward serves a packed batch: `prepare(...)` turns each scheduled sequence's (context, new tokens) into the
slots its new keys/values are written to and the slots its queries read, and `update(layer, start, k, v)` (the
hook `Llama.forward` calls per layer) scatters the new k, v into their slots and gathers every scheduled
sequence's keys/values, concatenated in the packed order. Which query may see which key is the caller's
attention mask (impl.generation.batching builds the block-diagonal causal one).

    nbytes = num_blocks x block_size x 2 (K and V) x layers x kv_heads x head_dim x bytes per element
"""

import math

import torch

from impl.common.checks import check_positive_int


def paged_cache_bytes(
    *, num_blocks: int, block_size: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of a paged cache's pool: blocks x block_size x 2 x layers x kv_heads x head_dim x element size
    (Kwon et al. 2023, sec. 4.1: every block holds K and V of block_size tokens for every layer)."""
    element = torch.empty((), dtype=dtype).element_size()
    return num_blocks * block_size * 2 * layers * kv_heads * head_dim * element


class PagedKVCache:
    """A pool of `num_blocks` blocks of `block_size` token slots per layer, for K and V; sequences (any hashable
    id) own blocks through their block tables. Allocate with `reserve`, release with `free`."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("num_blocks", num_blocks), ("block_size", block_size)):  # fmt: skip
            check_positive_int(name, value)
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)  # one row per token slot, block b = rows [b*bs, (b+1)*bs)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives block 0 first
        self.block_tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}  # tokens whose K/V a sequence has written
        self._write: torch.Tensor | None = None
        self._read: torch.Tensor | None = None

    # -- bookkeeping ----------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (all layers' keys and values)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks owned by sequences now."""
        return self.used_blocks * self.bytes_per_block

    @property
    def token_bytes(self) -> int:
        """Bytes of the slots holding a token now (the used blocks minus their unused tails)."""
        return sum(self.lengths.values()) * (self.bytes_per_block // self.block_size)

    @property
    def fragmentation(self) -> float:
        """Share of the owned slots that hold no token: the unused tails of the sequences' last blocks."""
        owned = self.used_blocks * self.block_size
        return 0.0 if owned == 0 else 1 - sum(self.lengths.values()) / owned

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` slots."""
        return math.ceil(tokens / self.block_size)

    def can_reserve(self, seq, tokens: int) -> bool:
        """Whether `seq` could grow to `tokens` slots with the blocks free now."""
        have = len(self.block_tables.get(seq, ()))
        return self.blocks_for(tokens) - have <= len(self.free_blocks)

    def reserve(self, seq, tokens: int) -> None:
        """Give `seq` (new or known) blocks for `tokens` slots in all, from the free list; ValueError when too
        few are free (the scheduler asks `can_reserve` first)."""
        table = self.block_tables.setdefault(seq, [])
        self.lengths.setdefault(seq, 0)
        missing = self.blocks_for(tokens) - len(table)
        if missing > len(self.free_blocks):
            raise ValueError(f"sequence {seq!r} needs {missing} more blocks, only {len(self.free_blocks)} are free")
        table.extend(self.free_blocks.pop() for _ in range(max(missing, 0)))

    def free(self, seq) -> None:
        """Return `seq`'s blocks to the free list and forget it."""
        self.free_blocks.extend(reversed(self.block_tables.pop(seq, [])))
        self.lengths.pop(seq, None)

    def slots(self, seq, begin: int, end: int) -> torch.Tensor:
        """Pool slots of `seq`'s tokens [begin, end), through its block table (PagedAttention, sec. 4.1)."""
        table = self.block_tables[seq]
        if end > len(table) * self.block_size:
            raise ValueError(f"tokens [{begin}, {end}) of sequence {seq!r} lie past its {len(table)} blocks")
        t = torch.arange(begin, end)
        return torch.tensor(table, dtype=torch.long)[t // self.block_size] * self.block_size + t % self.block_size

    # -- one packed forward -----------------------------------------------------------------------------------

    def prepare(self, batch: list[tuple[object, int]]) -> None:
        """Lay out the next forward: `batch` lists (seq, new tokens) in packed order; each sequence's new tokens
        follow its `lengths[seq]` cached ones. Its write slots are those of the new tokens, its read slots those
        of all its tokens; the sequences' blocks must already be reserved. Advances `lengths`."""
        write, read = [], []
        for seq, new in batch:
            done = self.lengths[seq]
            write.append(self.slots(seq, done, done + new))
            read.append(self.slots(seq, 0, done + new))
            self.lengths[seq] = done + new
        device = self.keys[0].device
        self._write = torch.cat(write).to(device)
        self._read = torch.cat(read).to(device)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the packed row's new k, v (1, kv_heads, T, head_dim) into their slots; return the keys and values
        of every scheduled sequence, in packed order, (1, kv_heads, S, head_dim). `start` is unused: each token's
        slot comes from `prepare`."""
        if self._write is None or k.shape[0] != 1 or k.shape[2] != self._write.numel():
            got = tuple(k.shape)
            raise ValueError(f"k must be (1, kv_heads, T, head_dim) for the T tokens laid out by prepare(), got {got}")
        keys, values = self.keys[layer], self.values[layer]
        keys[self._write] = k[0].transpose(0, 1)  # (T, kv_heads, head_dim)
        values[self._write] = v[0].transpose(0, 1)
        return keys[self._read].transpose(0, 1)[None], values[self._read].transpose(0, 1)[None]
