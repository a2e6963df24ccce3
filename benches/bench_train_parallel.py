"""The GPT's training step under each parallel mode of `python -m impl train` (impl.gpt.train_parallel): tokens/s
and per-rank peak memory at world size 2 (gloo on CPU; one GPU per rank with nccl).

Rows: `none` (one process, the whole global batch: the baseline), `ddp`, `fsdp2`, `zero1`, `zero2`, `zero3` (data
parallel over 2 ranks, each on half the global batch) and `tp` (tensor parallel over 2 ranks, dp = 1). Every row
runs the trainer's own step (`RankRun.step`: micro-batch slices, backward, global-norm clipping, AdamW) on a
small GPT over a fixed random token stream; one timed call is one synchronized optimizer step on every rank,
driven from here through pipes (`RankPool`, as bench_zero.py does). Throughput is the global batch's tokens per
second of that step.

Memory is per rank, in the rank's own process: the bytes of the tensors it holds before a step (its parameters
or their shards, its optimizer state; read off the tensors, a DTensor counting its local shard) plus the most
bytes allocated at once during the step (`impl.common.MemoryMeter`: the CPU tensor accounting, or the CUDA
allocator's peak). DDP's gradient buckets, allocated when the model is wrapped, are outside both on CPU (as in
bench_zero.py). The row's peak memory is the larger rank's; the metrics list each rank.

The error column compares rank 0's full parameters after the first step (gathered from shards and TP slices
where a mode has them) with one step of the single-process trainer on the same global batch.
"""

import pytest
import torch

from impl.common import MemoryMeter
from impl.common.roofline import train_flops
from impl.distributed.launch import RankPool

MODES = ["none", "ddp", "fsdp2", "zero1", "zero2", "zero3", "tp"]
SWEEPS = {"mode": {"smoke": MODES, "small": MODES, "full": MODES}}
# (n_layer, n_head, n_embd, block_size, global batch)
SIZES = {"smoke": (2, 2, 32, 16, 4), "small": (4, 4, 128, 64, 8), "full": (6, 6, 384, 128, 8)}
VOCAB = 65
TIMEOUT_S = 300
# One AdamW step from the same weights: the ranks sum the gradient in another order than one process, and Adam's
# first update is ~lr·g/|g|, so a gradient element within rounding of zero can move by up to lr (1e-3) either way
# (bench_zero.py measured <= 2.5e-7 on its MLP); a missing or doubled update moves weights by ~lr everywhere.
STEP_TOL = {"atol": 1e-4, "rtol": 1e-5}


def _config(size: str):
    from impl.gpt.train import TrainConfig

    n_layer, n_head, n_embd, block, batch = SIZES[size]
    return TrainConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, batch_size=batch,
                       max_iters=1000, warmup_iters=0, device="cpu")  # fmt: skip


def _stream() -> torch.Tensor:
    return torch.randint(0, VOCAB, (50_000,), generator=torch.Generator().manual_seed(0))


def _local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor counts its local shard)."""
    seen = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = getattr(t, "_local_tensor", t)
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def _resident_bytes(engine) -> int:
    """What the rank holds between steps: parameters (or shards) and optimizer state."""
    if engine.zero is not None:
        m = engine.zero.memory_breakdown()
        return m["params"] + m["master"] + m["optimizer"] + m["optimizer_scalars"]
    state = [t for s in engine.optimizer.state.values() for t in s.values()]
    return _local_bytes(engine.module.parameters()) + _local_bytes(state)


def _serve(rank: int, world_size: int, conn, mode: str, size: str) -> None:
    from impl.gpt.parallel import launch_env, plan_layout
    from impl.gpt.train_parallel import build_run

    on_gpu = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    cfg = _config(size)
    dp_mode, tp = ("none", world_size) if mode == "tp" else (mode, 1)
    layout = plan_layout(dp_mode, tp, cfg.batch_size, cfg.n_head, launch_env())
    data = _stream()
    run = build_run(cfg, layout, device, {"train": data, "val": data}, VOCAB)
    torch.manual_seed(1)  # the data draws, the same in every rank and in the reference
    run.step(0)
    state = run.engine.full_state()  # every rank joins the gathers; rank 0's copy goes back
    run.engine.zero_grad()
    resident = _resident_bytes(run.engine)
    with MemoryMeter(device) as mem:
        run.step(1)
    reply = {"peak": resident + mem.peak, "params": None if state is None else state[0]}
    conn.send(reply)
    step = 2
    while conn.recv() == "step":
        run.step(step)
        step += 1
        if on_gpu:
            torch.cuda.synchronize(device)
        conn.send(None)


def _reference(size: str) -> dict[str, torch.Tensor]:
    """One step of the single-process trainer (impl.training.Trainer) on the same global batch."""
    from impl.gpt import GPT
    from impl.gpt.data import get_batch
    from impl.gpt.train import _autocast, lr_at, make_optimizer
    from impl.training import Trainer

    cfg = _config(size)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(VOCAB))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, cfg) / cfg.learning_rate)
    data = _stream()
    torch.manual_seed(1)

    def loss_fn(m, batch):
        with _autocast(torch.device("cpu")):
            return m(*batch)[1]

    trainer = Trainer(model, optimizer, loss_fn, lambda: get_batch(data, cfg.block_size, cfg.batch_size),
                      scheduler=scheduler, clip_grad_norm=cfg.grad_clip, progress=False)  # fmt: skip
    trainer.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}  # the tied head once, as ZeRO keeps it


@pytest.mark.benchmark(group="gpt-train-parallel")
def test_train_step(bench, device, size, mode):
    world_size = 1 if mode == "none" else 2
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        pytest.skip(f"world_size={world_size} needs that many GPUs, found {torch.cuda.device_count()}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    ranks = RankPool(_serve, world_size, mode, size, backend=backend, timeout_s=TIMEOUT_S)
    try:
        replies = ranks.ready
        n_layer, _, n_embd, block, batch = SIZES[size]
        expected = _reference(size)
        numel = sum(t.numel() for t in expected.values())
        tokens = batch * block
        peaks = [r["peak"] for r in replies]
        metrics = {"rank peak MiB": " / ".join(f"{p / 2**20:.2f}" for p in peaks), "world size": world_size}
        info = bench(
            lambda: ranks.send("step"),
            variant=mode,
            params={"n_layer": n_layer, "n_embd": n_embd, "block": block, "batch": batch},
            sweep="mode",
            dtype=torch.float32,
            baseline=mode == "none",
            flops=train_flops(numel, n_layer, n_embd, block, tokens),
            mfu=True,
            tokens=tokens,
            metrics=metrics,
            expected=expected,
            output=lambda: {k: replies[0]["params"][k] for k in expected},
            tol=STEP_TOL,
            device=device if backend == "nccl" else torch.device("cpu"),
        )
        info["peak_bytes"] = max(peaks)  # the larger rank's; the parent process holds none of it
    finally:
        ranks.close()
