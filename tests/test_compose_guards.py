"""Compositions that used to fail or be silently wrong (found by the memory planner's validation), now correct or
refused up front. Each correct one equals the same computation without the composition, on the same weights and
batches; each refused one raises a ValueError naming both techniques before anything runs.

- ZeRO-3 + activation checkpointing: a replay inside backward re-gathers the freed weights (the modules' forward
  pre-hooks fire again) and keeps them until their gradients are reduced. A few AdamW steps over 2 ranks equal
  single-process AdamW on the whole batches.
- LoRA + tensor parallelism: LoRA applied before `tensor_parallelize` is split with its layers (column-parallel:
  B by output rows, row-parallel: A by input columns) and its r-wide activation goes through Megatron's f/g. The
  loss and every adapter gradient equal the single-process LoRA GPT's (each rank holds its slice). Negative
  controls: a changed token in the reference's batch, and the adapter run without its collectives (the old,
  silently wrong composition). LoRA applied after it is refused (the adapters could not be split consistently).
- LoRA + pipeline parallelism: the frozen tied embedding gets no gradient from the tied-weight sync; the adapter
  gradients of the two stages equal the single-process LoRA GPT's.
- Pipeline + ZeRO-2/3 on a stage that holds one end of the tied embedding: refused (ZeRO drops the tied gradient
  before the pipeline can sum it); ZeRO-1 on the same stage is accepted.

fp32 tolerance (impl.common.tolerance): the distributed runs sum the same products in another order (all-reduces of
partial sums), a few ulps per op; the negative controls move the compared values by orders of magnitude more.
"""

import pytest
import torch
import torch.distributed as dist

from impl.common import tolerance
from impl.distributed import PipelineSchedule, Zero, shard_state_dict, spawn, split_gpt, tensor_parallelize
from impl.finetune import apply_lora
from impl.gpt import GPT, GPTConfig, cross_entropy
from impl.memory import apply_checkpointing

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60
VOCAB = 11
CONFIG = dict(block_size=16, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=16)
BATCH, SEQ, STEPS = 4, 16, 3
TARGETS, R, ALPHA = ["c_attn", "c_proj", "c_fc"], 2, 4.0
OPT = {"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6}  # as tests/test_compose_parallel.py, which says why


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**CONFIG))


def _lora_gpt() -> GPT:
    """The GPT with LoRA on every block linear, B random (zero would make the adapters a no-op)."""
    gpt = apply_lora(_gpt(), TARGETS, R, ALPHA)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return gpt


def _batch(step: int = 0, perturb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if perturb:
        idx[-1, 0] = (idx[-1, 0] + 1) % VOCAB
    return idx, targets


def _grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _lora_reference(perturb: bool = False) -> tuple[torch.Tensor, dict]:
    gpt = _lora_gpt()
    _, loss = gpt(*_batch(perturb=perturb))
    loss.backward()
    return loss.detach(), _grads(gpt)


def _reference_training(perturb: bool = False) -> dict:
    gpt = _gpt()
    optimizer = torch.optim.AdamW(gpt.parameters(), **OPT)
    for step in range(STEPS):
        _, loss = gpt(*_batch(step, perturb))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in gpt.named_parameters()}


# ---- what the spawned ranks run ----


def _zero3_checkpointed(rank: int, world_size: int) -> dict:
    zero = Zero(apply_checkpointing(_gpt(), "every"), torch.optim.AdamW, stage=3, **OPT)
    for step in range(STEPS):
        idx, targets = (t.chunk(world_size)[rank] for t in _batch(step))
        _, loss = zero(idx, targets)
        loss.backward()
        zero.step()
        zero.zero_grad()
    return {"model": zero.state_dict()["model"], "memory": zero.memory_breakdown()}


def _tp_lora(group) -> dict:
    gpt = tensor_parallelize(_lora_gpt(), group)
    _, loss = gpt(*_batch())
    loss.backward()
    out = {
        "loss": loss.detach(),
        "grads": _grads(gpt),
        "frozen": [n for n, p in gpt.named_parameters() if p.grad is not None and "lora_" not in n],
    }
    out["reference"] = shard_state_dict(gpt, _lora_reference()[1])
    out["reference_perturbed"] = shard_state_dict(gpt, _lora_reference(perturb=True)[1])
    gpt.zero_grad()
    for module in gpt.modules():  # the old composition: the adapter's path without f/g
        if hasattr(module, "lora_update"):
            module.lora_update = None
    _, loss = gpt(*_batch())
    loss.backward()
    out["no_collectives"] = _grads(gpt)
    return out


def _pp_lora(group) -> dict:
    stage = split_gpt(_lora_gpt(), 2)[dist.get_rank(group)]
    schedule = PipelineSchedule(stage, group, "1f1b", n_microbatches=2, loss_fn=cross_entropy)
    loss = schedule.step(*_batch())
    return {"loss": loss, "grads": _grads(stage), "tied_grad": stage.tied_weight.grad}


def _refusals(group) -> dict:
    def message(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    rank = dist.get_rank(group)
    dp = [dist.new_group([r]) for r in range(dist.get_world_size(group))][rank]  # pp 2 x dp 1: ZeRO over dp
    stage = split_gpt(_gpt(), 2)[rank]
    lora_head = apply_lora(_gpt(), ["c_fc", "lm_head"], R, ALPHA)
    zero1 = Zero(split_gpt(_gpt(), 2)[rank], torch.optim.AdamW, stage=1, process_group=dp)
    return {
        "lora_after_tp": message(lambda: apply_lora(tensor_parallelize(_gpt(), group), TARGETS, R, ALPHA)),
        "lora_head_tp": message(lambda: tensor_parallelize(lora_head, group)),
        "pp_zero2": message(lambda: Zero(stage, torch.optim.AdamW, stage=2, process_group=dp)),
        "pp_zero3": message(lambda: Zero(stage, torch.optim.AdamW, stage=3, process_group=dp)),
        "pp_zero1": zero1.stage,
    }


def _world2(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    return {
        "zero3": _zero3_checkpointed(rank, world_size),
        "tp_lora": _tp_lora(group),
        "pp_lora": _pp_lora(group),
        "refusals": _refusals(group),
    }


@pytest.fixture(scope="module")
def world2() -> list:
    return spawn(_world2, 2, timeout_s=TIMEOUT_S)


def _assert_all_close(ours: dict, reference: dict) -> None:
    assert ours and ours.keys() <= reference.keys()
    for name, t in ours.items():
        torch.testing.assert_close(t, reference[name], **tolerance(torch.float32), msg=name)


# ---- ZeRO-3 + checkpointing ----


def test_zero3_with_checkpointing_matches_single_process_adamw(world2):
    trained = _reference_training()
    for rank_result in world2:
        assert rank_result["zero3"]["model"].keys() == trained.keys()
        _assert_all_close(rank_result["zero3"]["model"], trained)
        memory = rank_result["zero3"]["memory"]  # after the steps each rank holds its shards only again
        assert memory["params"] == 4 * (memory["numel"] + memory["padding"]) // memory["world_size"]
    with pytest.raises(AssertionError):  # negative control: one changed token in one batch
        _assert_all_close(world2[0]["zero3"]["model"], _reference_training(perturb=True))


# ---- LoRA + tensor parallelism ----


def test_lora_before_tp_matches_the_single_process_lora_gpt(world2):
    loss, _ = _lora_reference()
    for rank_result in world2:
        tp = rank_result["tp_lora"]
        torch.testing.assert_close(tp["loss"], loss, **tolerance(torch.float32))
        assert tp["frozen"] == []  # only the adapters train
        assert len(tp["grads"]) == 2 * 4 * CONFIG["n_layer"]  # A and B of the 4 linears of each block
        _assert_all_close(tp["grads"], tp["reference"])
    with pytest.raises(AssertionError):  # negative control: one changed token in the reference's batch
        _assert_all_close(tp["grads"], tp["reference_perturbed"])


def test_lora_adapter_without_f_and_g_gets_wrong_gradients(world2):
    """Negative control for the fix: the adapters run without their collectives (what LoRA after TP did) give
    gradients that are not the single-process ones."""
    for rank_result in world2:
        tp = rank_result["tp_lora"]
        with pytest.raises(AssertionError):
            _assert_all_close(tp["no_collectives"], tp["reference"])


def test_lora_after_tp_and_lora_on_the_tied_head_are_refused(world2):
    refusals = world2[0]["refusals"]
    assert "apply LoRA before tensor_parallelize" in refusals["lora_after_tp"], refusals["lora_after_tp"]
    assert "ColumnParallelLinear" in refusals["lora_after_tp"]
    assert "lm_head" in refusals["lora_head_tp"] and "LoRALinear" in refusals["lora_head_tp"]


# ---- LoRA + pipeline parallelism ----


def test_lora_on_pipeline_stages_matches_single_process_and_leaves_the_tied_embedding_without_gradient(world2):
    loss, grads = _lora_reference()
    first, last = (r["pp_lora"] for r in world2)
    torch.testing.assert_close(last["loss"], loss, **tolerance(torch.float32))
    assert first["tied_grad"] is None and last["tied_grad"] is None
    assert first["grads"].keys().isdisjoint(last["grads"].keys())
    both = {**first["grads"], **last["grads"]}
    assert both.keys() == grads.keys()  # every adapter, nothing frozen
    _assert_all_close(both, grads)
    with pytest.raises(AssertionError):  # negative control: one changed token in the reference's batch
        _assert_all_close(both, _lora_reference(perturb=True)[1])


# ---- pipeline + ZeRO-2/3 ----


def test_zero2_and_zero3_on_a_tied_pipeline_stage_are_refused_zero1_accepted(world2):
    for rank_result in world2:
        refusals = rank_result["refusals"]
        for stage in (2, 3):
            text = refusals[f"pp_zero{stage}"]
            assert f"ZeRO stage {stage}" in text and "PipelineSchedule" in text and "stage 0 or 1" in text, text
        assert refusals["pp_zero1"] == 1
