"""Model parallelism on the project's GPT: the pipeline bubble and activation memory of GPipe and 1F1B, and the
step time and per-rank memory of Megatron tensor parallelism at TP 1, 2, 4 (CPU ranks on gloo; the memory
figures are MemoryMeter's exact CPU tensor accounting).

Pipeline (`pipeline-schedules`): p stages, m micro-batches of a fixed size, so a step's work grows with m. Each
row records the bubble fraction every stage measured from its own timeline (1 - compute time / step time,
averaged over the stages and the timed steps) beside the ideal (p - 1) / (m + p - 1) of equal stages with free
communication, and every stage's peak bytes during a step (MemoryMeter: exact on CPU): GPipe's grow with m,
1F1B's stop at the p - s micro-batches stage s keeps in flight. The row's peak memory is stage 0's.

Tensor parallel (`tensor-parallel-gpt`): one training step (forward, vocab-parallel loss, backward, AdamW) of the
same GPT split over TP ranks in place (`tensor_parallelize`); the row records rank 0's parameter bytes and its
peak bytes during the step. The `megatron-tp+checkpoint` rows compose it with activation checkpointing of every
block (`impl.memory.apply_checkpointing`): lower peak, one more forward of the blocks (and their all-reduces)
in backward, the same losses.

Ranks stay up for a whole benchmark; one timed call is one synchronized step on every rank, driven from here
through pipes. The ranks run on gloo, so every row is recorded on the CPU, whatever the session's device.

Error columns: a pipeline row compares its first step's loss (last stage) and every stage's gradients (the tied
embedding's summed over first and last stage) with the same GPT in one process on the whole batch; a TP row
compares the loss of its first step and of the step after one AdamW update (so the gradients, sharded over the
ranks, are judged through the update they make) with the single-process GPT and AdamW. MFU is the training
step's model FLOPs (`train_flops`) for the whole world: the ranks share one machine.
"""

import pytest
import torch
import torch.distributed as dist

from impl.common import MemoryMeter, tensor_bytes
from impl.common.roofline import train_flops
from impl.distributed import PipelineSchedule, split_gpt, tensor_parallelize
from impl.distributed.launch import RankPool
from impl.distributed.pipeline import gpt_loss
from impl.gpt import GPT, GPTConfig
from impl.memory import apply_checkpointing

SWEEPS = {
    "n_microbatches": {"smoke": [1, 4], "small": [1, 2, 4, 8, 16], "full": [1, 2, 4, 8, 16, 32]},
    "tp": {"smoke": [1, 2], "small": [1, 2, 4], "full": [1, 2, 4]},
}
# (n_embd, n_head, n_layer, seq, batch): batch is sequences per micro-batch (pipeline) or per step (TP).
SIZES = {"smoke": (32, 4, 4, 16, 2), "small": (128, 4, 4, 64, 4), "full": (256, 8, 8, 128, 8)}
STAGES = {"smoke": 2, "small": 4, "full": 4}
VOCAB = 65
TIMEOUT_S = 120
LR = 1e-4
CPU = torch.device("cpu")  # gloo ranks


def _gpt(size: str) -> GPT:
    n_embd, n_head, n_layer, seq, _ = SIZES[size]
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=seq, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd))


def _tokens(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (batch, seq), generator=g), torch.randint(0, VOCAB, (batch, seq), generator=g)


class _PipelineRank:
    def __init__(self, size: str, schedule: str, n_microbatches: int):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        self.stage = split_gpt(_gpt(size), world_size)[rank]
        self.pipeline = PipelineSchedule(self.stage, dist.group.WORLD, schedule, n_microbatches, gpt_loss)
        _, _, _, seq, micro = SIZES[size]
        self.tokens = _tokens(micro * n_microbatches, seq)
        self.bubbles = []

    def step(self) -> None:
        self.pipeline.step(*self.tokens)
        self.stage.zero_grad(set_to_none=False)
        self.bubbles.append(self.pipeline.bubble_fraction())

    def measure(self) -> dict:
        """The first step: this stage's peak bytes, its gradients and (last stage) the loss."""
        with MemoryMeter("cpu") as meter:
            loss = self.pipeline.step(*self.tokens)
        tied = {"lm_head.weight"} if self.stage.last and not self.stage.first else set()  # a copy of wte
        grads = {n: p.grad.clone() for n, p in self.stage.named_parameters() if n not in tied}
        self.stage.zero_grad(set_to_none=False)
        return {"peak": meter.peak, "loss": loss, "grads": grads}

    def stats(self) -> dict:
        return {"bubble": sum(self.bubbles) / max(1, len(self.bubbles))}


class _TensorParallelRank:
    def __init__(self, size: str, checkpointing: str = "none"):
        self.model = apply_checkpointing(tensor_parallelize(_gpt(size), dist.group.WORLD), checkpointing)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
        _, _, _, seq, batch = SIZES[size]
        self.tokens = _tokens(batch, seq)

    def step(self) -> torch.Tensor:
        _, loss = self.model(*self.tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()

    def measure(self) -> dict:
        first = self.step()  # the optimizer's state exists from here on, as in every later step
        with MemoryMeter("cpu") as meter:
            second = self.step()
        return {"peak": meter.peak, "params": tensor_bytes(*self.model.parameters()), "losses": (first, second)}

    def stats(self) -> dict:
        return {}


def _reference_grads(size: str, n_microbatches: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pipeline's first step in one process: the loss on the whole batch and every parameter's gradient."""
    _, _, _, seq, micro = SIZES[size]
    gpt = _gpt(size)
    _, loss = gpt(*_tokens(micro * n_microbatches, seq))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in gpt.named_parameters()}


def _reference_losses(size: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The TP rank's first two losses in one process: before and after one AdamW step."""
    _, _, _, seq, batch = SIZES[size]
    gpt, tokens = _gpt(size), _tokens(batch, seq)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=LR)
    losses = []
    for _ in range(2):
        _, loss = gpt(*tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return tuple(losses)


def _step_flops(size: str, tokens: int) -> float:
    n_embd, _, n_layer, seq, _ = SIZES[size]
    return train_flops(sum(p.numel() for p in _gpt(size).parameters()), n_layer, n_embd, seq, tokens)


def _serve(rank: int, world_size: int, conn, kind: str, args: tuple) -> None:
    """A rank's loop (run by RankPool): build, answer one measured step, then obey "step" / "stats" until "stop"."""
    runner = _PipelineRank(*args) if kind == "pipeline" else _TensorParallelRank(*args)
    conn.send(runner.measure())
    while (command := conn.recv()) != "stop":
        if command == "step":
            runner.step()
            conn.send(None)
        else:
            conn.send(runner.stats())


@pytest.mark.benchmark(group="pipeline-schedules")
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline(bench, size, schedule, n_microbatches):
    p = STAGES[size]
    _, _, n_layer, seq, micro = SIZES[size]
    ranks = RankPool(_serve, p, "pipeline", (size, schedule, n_microbatches), timeout_s=TIMEOUT_S)
    try:
        peaks = [reply["peak"] for reply in ranks.ready]
        got_grads = {n: g for reply in ranks.ready for n, g in reply["grads"].items()}
        loss, grads = _reference_grads(size, n_microbatches)
        info = bench(
            lambda: ranks.send("step"),
            variant=schedule,
            params={"n_microbatches": n_microbatches, "stages": p, "microbatch": micro, "seq": seq, "layers": n_layer},
            sweep="n_microbatches",
            dtype=torch.float32,
            baseline=schedule == "gpipe",
            flops=_step_flops(size, micro * n_microbatches * seq),
            mfu=True,
            tokens=micro * n_microbatches * seq,
            metrics={
                "bubble formula": round((p - 1) / (n_microbatches + p - 1), 3),
                **{f"peak KiB stage {s}": round(peak / 1024, 1) for s, peak in enumerate(peaks)},
            },
            plot=("bubble measured", "bubble formula", "peak KiB stage 0"),
            expected=(loss, grads),
            output=lambda: (ranks.ready[-1]["loss"], {n: got_grads[n] for n in grads}),  # the first step's
            device=CPU,
        )
        bubbles = [reply["bubble"] for reply in ranks.send("stats")]
        info["metrics"]["bubble measured"] = round(sum(bubbles) / len(bubbles), 3)
        info["peak_bytes"] = peaks[0]  # the parent holds no activations; stage 0 holds the most
    finally:
        ranks.close()


@pytest.mark.benchmark(group="tensor-parallel-gpt")
@pytest.mark.parametrize("checkpointing", ["none", "every"])
def test_tensor_parallel(bench, size, tp, checkpointing):
    n_embd, _, n_layer, seq, batch = SIZES[size]
    ranks = RankPool(_serve, tp, "tp", (size, checkpointing), timeout_s=TIMEOUT_S)
    try:
        rank0 = ranks.ready[0]
        info = bench(
            lambda: ranks.send("step"),
            variant="megatron-tp" if checkpointing == "none" else "megatron-tp+checkpoint",
            params={"tp": tp, "n_embd": n_embd, "layers": n_layer, "seq": seq, "batch": batch},
            sweep="tp",
            dtype=torch.float32,
            baseline=tp == 1 and checkpointing == "none",
            flops=_step_flops(size, batch * seq),
            mfu=True,
            tokens=batch * seq,
            metrics={
                "param KiB/rank": round(rank0["params"] / 1024, 1),
                "step peak KiB/rank": round(rank0["peak"] / 1024, 1),
            },
            plot=("param KiB/rank", "step peak KiB/rank"),
            expected=_reference_losses(size),
            output=lambda: rank0["losses"],  # the first two steps, before bench's own calls
            device=CPU,
        )
        info["peak_bytes"] = rank0["peak"]
    finally:
        ranks.close()
