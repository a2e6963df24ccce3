"""Parallelism composed with other techniques on the one GPT (issue 20, point 4): each combination equals the same
computation done without it, on the same weights and batches.

- TP + activation checkpointing: a tensor-parallel GPT whose blocks are checkpointed (`impl.memory`) gives the
  loss and gradients of the same TP GPT without checkpointing and of the single-process GPT, keeps fewer bytes
  alive after forward (MemoryMeter), and really replays: backward issues each block's forward all-reduces again.
- ZeRO-3 (ours) on the GPT: a few AdamW steps over 2 ranks (half the batch each) equal single-process AdamW on
  the whole batches, with each rank holding 1/world of the parameter bytes.
- TP on pipeline stages: a stage cut from the GPT, tensor-parallelized, gives the unsplit stage's output.
- Data x tensor parallelism: 4 ranks as 2 (dp) x 2 (tp) groups from `tp_groups`; ZeRO-3 or DDP over the dp group
  wraps the TP'd GPT; its steps equal single-process AdamW (each rank's state is its TP slice of the reference).

The ranks run under the project's launcher (`spawn`, gloo), so a dead or hung rank fails the run fast.
"""

import pytest
import torch
import torch.distributed as dist

from impl.common import MemoryMeter, tolerance
from impl.distributed import Zero, full_logits, shard_state_dict, spawn, split_gpt, tensor_parallelize, tp_groups
from impl.gpt import GPT, GPTConfig
from impl.memory import apply_checkpointing

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60
VOCAB = 11
CONFIG = dict(block_size=16, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=16)
BATCH, SEQ, STEPS = 4, 16, 3
# Adam's eps: the key bias's true gradient is zero (softmax ignores a shift shared by every key), so what it
# gets is float noise (~1e-10) that differs with the reduction order, and Adam scales it to lr * noise / eps.
# At lr=1e-2 and the default eps=1e-8 that is ~1e-5 after a few steps, at the fp32 tolerance; so is the same
# amplification of other near-zero gradients (a position-embedding entry reached 9e-6). lr=1e-3, eps=1e-6 keep
# every difference ~1e-6 while a changed token still moves the parameters by ~lr (the negative controls).
OPT = {"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6}


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**CONFIG))


def _batch(step: int = 0, perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if perturb:
        idx[-1, 0] = (idx[-1, 0] + 1) % VOCAB
    return idx, targets


def _rows(batch: tuple, part: int, parts: int) -> tuple:
    n = BATCH // parts
    return tuple(t[part * n : (part + 1) * n] for t in batch)


def _grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _reference_grads(perturb: bool = False) -> tuple[torch.Tensor, dict]:
    gpt = _gpt()
    _, loss = gpt(*_batch(perturb=perturb))
    loss.backward()
    grads = _grads(gpt)
    grads["lm_head.weight"] = grads["transformer.wte.weight"]  # tied: named once by named_parameters
    return loss.detach(), grads


def _reference_training(perturb: bool = False) -> dict:
    """The single-process GPT after STEPS AdamW steps on the whole batches."""
    gpt = _gpt()
    optimizer = torch.optim.AdamW(gpt.parameters(), **OPT)
    for step in range(STEPS):
        _, loss = gpt(*_batch(step, perturb))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in gpt.named_parameters()}


# ---- what the spawned ranks run ----


def _tp_run(policy: str, group) -> dict:
    """One forward and backward of the TP'd GPT with checkpointing `policy`: loss, grads, the bytes created in
    forward still alive after it (the activations kept for backward, and the logits), and all-reduce counts."""
    gpt = tensor_parallelize(_gpt(), group)
    apply_checkpointing(gpt, policy)
    calls, real = [], dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    try:
        with MemoryMeter("cpu") as meter:
            _, loss = gpt(*_batch())
        forward = len(calls)
        loss.backward()
    finally:
        dist.all_reduce = real
    return {
        "loss": loss.detach(),
        "grads": _grads(gpt),
        "kept": meter.current,
        "all_reduces": (forward, len(calls) - forward),
        "reference": shard_state_dict(gpt, _reference_grads()[1]),
        "reference_perturbed": shard_state_dict(gpt, _reference_grads(perturb=True)[1]),
    }


def _zero3_run(rank: int, world_size: int, group=None) -> dict:
    """STEPS steps of ZeRO-3 + AdamW on this rank's share of each batch (its dp share when `group` is given)."""
    gpt = _gpt()
    full_bytes = sum(p.numel() * p.element_size() for p in gpt.parameters())
    zero = Zero(gpt, torch.optim.AdamW, stage=3, process_group=group, **OPT)
    dp_rank, dp = dist.get_rank(group), dist.get_world_size(group)
    losses = []
    for step in range(STEPS):
        _, loss = zero(*_rows(_batch(step), dp_rank, dp))
        loss.backward()
        zero.step()
        zero.zero_grad()
        losses.append(loss.detach())
    return {
        "model": zero.state_dict()["model"],
        "memory": zero.memory_breakdown(),
        "full_bytes": full_bytes,
        "losses": losses,
    }


def _dp_tp_run(rank: int, world_size: int) -> dict:
    groups = tp_groups(2)
    gpt = tensor_parallelize(_gpt(), groups.tp_group)
    zero = Zero(gpt, torch.optim.AdamW, stage=3, process_group=groups.dp_group, **OPT)
    for step in range(STEPS):
        _, loss = zero(*_rows(_batch(step), groups.dp_rank, groups.dp))
        loss.backward()
        zero.step()
        zero.zero_grad()
    state = zero.state_dict()["model"]  # collective over dp: this rank's TP slices, whole
    members = {}
    for kind, group in (("tp", groups.tp_group), ("dp", groups.dp_group)):
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, torch.tensor([rank]), group=group)
        members[kind] = [int(t) for t in gathered]
    ddp_gpt = tensor_parallelize(_gpt(), groups.tp_group)  # the same with torch's DDP over the dp group
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_gpt, process_group=groups.dp_group)
    optimizer = torch.optim.AdamW(ddp_gpt.parameters(), **OPT)
    for step in range(STEPS):
        _, loss = ddp(*_rows(_batch(step), groups.dp_rank, groups.dp))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {
        "groups": (members, (groups.dp_rank, groups.tp_rank, groups.dp, groups.tp)),
        "ddp": {name: p.detach().clone() for name, p in ddp_gpt.named_parameters()},
        "model": state,
        "reference": shard_state_dict(gpt, _reference_training()),
        "reference_perturbed": shard_state_dict(gpt, _reference_training(perturb=True)),
    }


def _tp_stages_run(group) -> dict:
    """Pipeline stages of the GPT, each tensor-parallelized: the first (embeddings, no head) and the last (no
    embeddings, its own copy of the tied head) give the unsplit stages' outputs."""
    stages, parallel = split_gpt(_gpt(), 2), [tensor_parallelize(s, group) for s in split_gpt(_gpt(), 2)]
    idx, _ = _batch()
    hidden = stages[0](idx)
    out = {"hidden": (parallel[0](idx).detach(), hidden.detach())}
    out["logits"] = (full_logits(parallel[1], parallel[1](hidden)).detach(), stages[1](hidden).detach())
    out["absent"] = (parallel[0].lm_head, parallel[1].transformer["wte"])
    split_after = split_gpt(tensor_parallelize(_gpt(), group), 2)  # TP first, then cut: the same stages
    out["split_after"] = (split_after[0](idx).detach(), full_logits(split_after[1], split_after[1](hidden)).detach())
    return out


def _world2(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    return {
        "tp": {p: _tp_run(p, group) for p in ("none", "every")},
        "zero3": _zero3_run(rank, world_size),
        "stages": _tp_stages_run(group),
    }


@pytest.fixture(scope="module")
def world2() -> list:
    return spawn(_world2, 2, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def world4() -> list:
    return spawn(_dp_tp_run, 4, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def single() -> dict:
    loss, _ = _reference_grads()
    return {"loss": loss, "trained": _reference_training(), "perturbed": _reference_training(perturb=True)}


def _assert_close(ours, reference, name: str = "") -> None:
    torch.testing.assert_close(ours, reference, **tolerance(torch.float32), msg=name or None)


def _assert_all_close(ours: dict, reference: dict) -> None:
    assert ours.keys() <= reference.keys() and ours
    for name, t in ours.items():
        _assert_close(t, reference[name], name)


# ---- TP + activation checkpointing ----


def test_tp_with_checkpointing_matches_tp_without_and_single_process(world2, single):
    for rank_result in world2:
        plain, checkpointed = rank_result["tp"]["none"], rank_result["tp"]["every"]
        _assert_close(checkpointed["loss"], plain["loss"])
        _assert_close(checkpointed["loss"], single["loss"])
        _assert_all_close(checkpointed["grads"], plain["grads"])
        _assert_all_close(checkpointed["grads"], checkpointed["reference"])
        assert checkpointed["grads"].keys() == plain["grads"].keys()
    with pytest.raises(AssertionError):  # negative control: one changed token in the reference's batch
        _assert_all_close(checkpointed["grads"], checkpointed["reference_perturbed"])


def test_tp_with_checkpointing_keeps_fewer_bytes_and_replays_the_blocks(world2):
    """Checkpointing every block keeps only block inputs: the bytes alive after forward drop. Backward replays
    each block's forward, so it issues that block's 2 forward all-reduces again (2 per block more); the forward
    itself issues the same ones as without checkpointing."""
    n_layer = CONFIG["n_layer"]
    for rank_result in world2:
        plain, checkpointed = rank_result["tp"]["none"], rank_result["tp"]["every"]
        assert checkpointed["kept"] < 0.6 * plain["kept"], (checkpointed["kept"], plain["kept"])
        assert checkpointed["all_reduces"][0] == plain["all_reduces"][0]
        assert checkpointed["all_reduces"][1] == plain["all_reduces"][1] + 2 * n_layer


def test_tp_on_pipeline_stages_matches_the_unsplit_stages(world2):
    """TP x PP: tensor_parallelize skips the parts a stage does not hold and splits the last stage's own head;
    cutting a TP'd GPT into stages gives the same stages."""
    for rank_result in world2:
        stages = rank_result["stages"]
        assert stages["absent"] == (None, None)
        for name in ("hidden", "logits"):
            _assert_close(*stages[name], name)
        _assert_close(stages["split_after"][0], stages["hidden"][1])
        _assert_close(stages["split_after"][1], stages["logits"][1])
    with pytest.raises(AssertionError):  # negative control: a 1% change in the hidden states is caught
        _assert_close(stages["hidden"][0], stages["hidden"][1] * 1.01)


# ---- ZeRO-3 on the GPT ----


def test_zero3_on_the_gpt_matches_single_process_adamw(world2, single):
    for rank_result in world2:
        model = rank_result["zero3"]["model"]
        assert model.keys() == single["trained"].keys()
        _assert_all_close(model, single["trained"])
    with pytest.raises(AssertionError):  # negative control: one changed token in one batch
        _assert_all_close(model, single["perturbed"])
    first = sum(r["zero3"]["losses"][0] for r in world2) / len(world2)  # equal halves: the mean is the batch's
    _assert_close(first, single["loss"])


def test_zero3_holds_a_world_share_of_the_parameter_bytes(world2):
    """Outside forward and backward each rank holds only its shard: (numel + padding) / world fp32 values, about
    1/world of the GPT's parameter bytes."""
    for rank_result in world2:
        memory, full = rank_result["zero3"]["memory"], rank_result["zero3"]["full_bytes"]
        world = memory["world_size"]
        assert memory["params"] == 4 * (memory["numel"] + memory["padding"]) // world
        assert memory["numel"] * 4 == full and memory["padding"] < world * 64
        assert abs(memory["params"] / full - 1 / world) < 0.01


# ---- data x tensor parallelism ----


def test_tp_groups_cut_the_world_into_a_dp_by_tp_grid(world4):
    """tp_groups(2) on 4 ranks: TP groups of consecutive ranks, DP groups of the ranks with the same TP index."""
    for rank, rank_result in enumerate(world4):
        start = rank - rank % 2
        members, coords = rank_result["groups"]
        assert members == {"tp": [start, start + 1], "dp": [rank % 2, rank % 2 + 2]}
        assert coords == (rank // 2, rank % 2, 2, 2)


def test_zero3_and_ddp_over_dp_wrap_the_tp_gpt(world4):
    """dp 2 x tp 2: ZeRO-3 (ours) or torch's DDP over the data-parallel group of a TP'd GPT trains like one
    process (each rank holds its TP slices of the trained reference); the replicated LayerNorms stay equal
    across TP ranks because their gradients are."""
    for rank_result in world4:
        _assert_all_close(rank_result["model"], rank_result["reference"])
        _assert_all_close(rank_result["ddp"], rank_result["reference"])
    with pytest.raises(AssertionError):
        _assert_all_close(rank_result["model"], rank_result["reference_perturbed"])
    with pytest.raises(AssertionError):
        _assert_all_close(rank_result["ddp"], rank_result["reference_perturbed"])
    for a, b in ((0, 1), (2, 3)):  # the two TP ranks of each group
        _assert_close(world4[a]["model"]["transformer.ln_f.weight"], world4[b]["model"]["transformer.ln_f.weight"])
