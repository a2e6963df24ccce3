"""ZeRO stages 0-3 next to torch's DDP, ZeroRedundancyOptimizer and FSDP2: step time, per-rank memory and
bytes communicated, swept over the world size (1, 2, 4 ranks on CPU with gloo; one GPU per rank with nccl).

One group per stage: ours, plain data parallel (ours at stage 0, the baseline) and torch's implementation of
the same stage where there is one (stage 2 has none: FSDP2 without resharding frees parameters after backward,
which is not ZeRO-2). Rank processes stay up for a whole benchmark; one timed call is one synchronized
training step on every rank (forward, backward, optimizer), driven from here through pipes.

Memory is what rank 0 holds in model states after a step, read off its tensors (parameters, gradients,
optimizer state; DDP's gradient buckets are not visible this way and are left out); it is recorded as the
row's peak memory, next to bytes per parameter and the ZeRO paper's formula for it. Communication is counted
by ours in the paper's units (all-reduce: 2 x the tensor, reduce-scatter and all-gather: 1 x); the paper's
claim is that stage 3 moves 1.5x what stages 0-2 move.

Every row's error column compares rank 0's full parameters after its first training step (gathered from the
shards where a variant shards them) with one AdamW step of the same MLP on the whole global batch in a single
process. MFU counts the step's model FLOPs for the whole world (6 x parameters x samples: `train_flops` with no
attention term, n_layer=0, since the model is an MLP); the ranks share one machine. With gloo the ranks run on
the CPU, and the rows say so.

`zero-stage3-gpt` runs stage 3 on the project's GPT (`impl.gpt.GPT`, tied embedding and all) beside plain data
parallelism and FSDP2 (each block and the whole model `fully_shard`ed): ZeRO-3 composed with the model the
rest of the project trains. Its error column compares one AdamW step with the single-process GPT on the whole
batch, its MFU counts the GPT's training FLOPs (attention included).
"""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from impl.common.roofline import train_flops
from impl.distributed import Zero
from impl.distributed.launch import RankPool
from impl.gpt import GPT, GPTConfig

SWEEPS = {"world_size": {"smoke": [2], "small": [1, 2, 4], "full": [1, 2, 4]}}
SIZES = {"smoke": (64, 2, 8), "small": (512, 4, 16), "full": (1024, 4, 32)}  # (width, layers, global batch)
GPT_SEQ, GPT_VOCAB, GPT_HEAD_DIM = 32, 65, 16  # the GPT rows: n_embd = width, n_layer = layers
TIMEOUT_S = 120
# Bytes per parameter on each of N ranks with fp32 Adam (ZeRO paper, Fig. 1, without mixed precision).
PAPER_BYTES = {
    0: lambda n: 16,
    1: lambda n: 8 + Fraction(8, n),
    2: lambda n: 4 + Fraction(12, n),
    3: lambda n: Fraction(16, n),
}
REFERENCES = {0: "torch-ddp", 1: "torch-zero-redundancy", 3: "torch-fsdp2"}
LR = 1e-3
# One AdamW step from the same weights: gloo/nccl sum the ranks' gradients in another order than one process
# does, and Adam's first update is ~lr·g/|g|, so a gradient element within rounding of zero can move by up to lr
# in either process. Measured on x86 CPUs (gloo, smoke and small sizes, 1-4 ranks): max abs error <= 2.5e-7.
# The bound leaves room for such an element without hiding a wrong step (a missing, doubled or stale update
# moves weights by ~lr = 1e-3: sending a live weight instead of a copy through the pipe failed at 1.0e-3).
STEP_TOL = {"atol": 1e-4, "rtol": 1e-5}


def _mlp(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())]
    return nn.Sequential(*blocks, nn.Linear(width, width))


def _gpt(width: int, layers: int) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(GPT_SEQ, GPT_VOCAB, n_layer=layers, n_head=width // GPT_HEAD_DIM, n_embd=width)
    return GPT(config)


def _model(kind: str, width: int, layers: int) -> nn.Module:
    return _gpt(width, layers) if kind == "gpt" else _mlp(width, layers)


def _rank_batch(rank: int, rows: int, width: int, kind: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    if kind == "gpt":  # token ids and next-token targets
        return tuple(torch.randint(0, GPT_VOCAB, (rows, GPT_SEQ), generator=g) for _ in range(2))
    return torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)


def _loss(kind: str, run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return run(x, y)[1] if kind == "gpt" else F.mse_loss(run(x), y)


def _reference_step(sizes: tuple, world_size: int, device: torch.device, kind: str) -> dict[str, torch.Tensor]:
    """One AdamW step of the model in a single process on the global batch (every rank's slice, concatenated)."""
    width, layers, batch = sizes
    model = _model(kind, width, layers).to(device)
    x, y = (torch.cat(t).to(device) for t in zip(*(_rank_batch(r, batch // world_size, width, kind)
                                                    for r in range(world_size))))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    _loss(kind, model, x, y).backward()
    optimizer.step()
    return {name: p.detach() for name, p in model.named_parameters()}


def _local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor counts its local shard)."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


class _Setup:
    """One rank's model, wrapped by `variant`, and its fixed slice of a fixed batch."""

    def __init__(self, variant: str, rank: int, world_size: int, device: torch.device, kind, width, layers, batch):
        model = _model(kind, width, layers).to(device)
        self.kind = kind
        self.numel = sum(p.numel() for p in model.parameters())
        self.x, self.y = (t.to(device) for t in _rank_batch(rank, batch // world_size, width, kind))
        self.zero = None
        if variant.startswith("zero-") or variant == "dp":
            stage = 0 if variant == "dp" else int(variant[-1])
            self.zero = self.run = Zero(model, torch.optim.AdamW, stage=stage, lr=LR)
            self.optimizer = self.zero
            return
        self.model = model
        if variant == "torch-fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in model.transformer.h if kind == "gpt" else model:
                if isinstance(layer, nn.Linear) or kind == "gpt":
                    fully_shard(layer)
            self.run = fully_shard(model)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            return
        from torch.nn.parallel import DistributedDataParallel

        self.run = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if variant == "torch-ddp":
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)

    def step(self, measure: bool = False) -> dict | None:
        before = self.zero.comm.bytes_moved if self.zero is not None else None
        _loss(self.kind, self.run, self.x, self.y).backward()
        self.optimizer.step()
        stats = self.stats(before) if measure else None
        self.optimizer.zero_grad()
        return stats

    def full_params(self) -> dict[str, torch.Tensor]:
        """Collective: the full parameters on this rank, on the CPU (gathered from shards where sharded)."""
        if self.zero is not None:
            return {k: v.cpu() for k, v in self.zero.state_dict()["model"].items()}
        full = {}
        for name, p in self.model.named_parameters():
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's DTensor shards
            full[name] = p.detach().cpu().clone()  # a pipe shares CPU storage: send a copy, not the live weight
        return full

    def stats(self, comm_before: int | None) -> dict:
        if self.zero is not None:
            return {
                "numel": self.numel,
                "state_bytes": self.zero.memory_breakdown()["total"],
                "comm_bytes": self.zero.comm.bytes_moved - comm_before,
            }
        optimizer = getattr(self.optimizer, "optim", self.optimizer)  # ZeroRedundancyOptimizer's local one
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
        params = list(self.model.parameters())
        total = _local_bytes(params) + _local_bytes(p.grad for p in params) + _local_bytes(state)
        return {"numel": self.numel, "state_bytes": total, "comm_bytes": None}


def _serve(rank: int, world_size: int, conn, variant: str, kind: str, sizes: tuple) -> None:
    """A rank's loop (run by RankPool): build the setup, report one measured step, then one step per "step"."""
    on_gpu = torch.distributed.get_backend() == "nccl"  # spawn() has set this rank's GPU
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    setup = _Setup(variant, rank, world_size, device, kind, *sizes)
    stats = setup.step(measure=True)
    params = setup.full_params()  # every rank joins the gathers; rank 0's copy goes back
    conn.send({**stats, "params": params} if rank == 0 else stats)
    while conn.recv() == "step":
        setup.step()
        if on_gpu:
            torch.cuda.synchronize(device)
        conn.send(None)


def _bench_variant(bench, device, size, stage: int, variant: str, world_size: int, kind: str = "mlp") -> None:
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        pytest.skip(f"world_size={world_size} needs that many GPUs, found {torch.cuda.device_count()}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    sizes = SIZES[size]
    ranks = RankPool(_serve, world_size, variant, kind, sizes, backend=backend, timeout_s=TIMEOUT_S)
    try:
        stats = ranks.ready[0]
        numel = stats["numel"]
        width, layers, batch = sizes
        metrics = {
            "bytes/param": round(stats["state_bytes"] / numel, 3),
            "paper bytes/param": round(float(PAPER_BYTES[0 if variant == "dp" else stage](world_size)), 3),
            "comm MiB/step": None if stats["comm_bytes"] is None else round(stats["comm_bytes"] / 2**20, 3),
            "comm vs 2Ψ": None if stats["comm_bytes"] is None else round(stats["comm_bytes"] / (2 * 4 * numel), 3),
        }
        expected = _reference_step(sizes, world_size, device, kind)
        params = {"world_size": world_size, "width": width, "layers": layers, "batch": batch, "params": numel}
        flops, items, unit = train_flops(numel, 0, 0, 0, batch), batch, "samples/s"  # whole world: 6·N per sample
        if kind == "gpt":  # per token, attention included
            tokens = batch * GPT_SEQ
            flops, items, unit = train_flops(numel, layers, width, GPT_SEQ, tokens), tokens, "tokens/s"
            params["seq"] = GPT_SEQ
        info = bench(
            lambda: ranks.send("step"),
            variant=variant,
            params=params,
            sweep="world_size",
            dtype=torch.float32,
            baseline=variant == "dp",
            reference=variant == REFERENCES.get(stage),
            flops=flops,
            mfu=True,
            items=items,
            items_unit=unit,
            metrics=metrics,
            expected=expected,
            output=lambda: stats["params"],  # after the first step, taken before bench's own calls
            tol=STEP_TOL,
            device=device if backend == "nccl" else torch.device("cpu"),
        )
        info["peak_bytes"] = stats["state_bytes"]  # rank 0's model states; the parent process holds none
    finally:
        ranks.close()


@pytest.mark.benchmark(group="zero-stage0-data-parallel")
@pytest.mark.parametrize("variant", ["zero-0", "torch-ddp"])
def test_stage0(bench, device, size, variant, world_size):
    _bench_variant(bench, device, size, 0, variant, world_size)


@pytest.mark.benchmark(group="zero-stage1-optimizer-state")
@pytest.mark.parametrize("variant", ["dp", "zero-1", "torch-zero-redundancy"])
def test_stage1(bench, device, size, variant, world_size):
    _bench_variant(bench, device, size, 1, variant, world_size)


@pytest.mark.benchmark(group="zero-stage2-gradients")
@pytest.mark.parametrize("variant", ["dp", "zero-2"])
def test_stage2(bench, device, size, variant, world_size):
    _bench_variant(bench, device, size, 2, variant, world_size)


@pytest.mark.benchmark(group="zero-stage3-parameters")
@pytest.mark.parametrize("variant", ["dp", "zero-3", "torch-fsdp2"])
def test_stage3(bench, device, size, variant, world_size):
    _bench_variant(bench, device, size, 3, variant, world_size)


@pytest.mark.benchmark(group="zero-stage3-gpt")
@pytest.mark.parametrize("variant", ["dp", "zero-3", "torch-fsdp2"])
def test_stage3_gpt(bench, device, size, variant, world_size):
    _bench_variant(bench, device, size, 3, variant, world_size, kind="gpt")
