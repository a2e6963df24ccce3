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
- Pipeline + checkpointing: each stage's blocks (a ModuleDict) are checkpointed after split_gpt and give the plain
  GPT's gradients; checkpointing before split_gpt is refused (the copied blocks would run the originals' forward).
- Pipeline + ZeRO-2/3 (pp 2 x dp 2 on 4 ranks): ZeRO reduces the tied embedding's gradient in step(), after the
  pipeline has summed the first and last stage's; a few AdamW steps equal single-process AdamW, and afterwards
  each rank holds ZeRO's gradient shards only (`zero_state_bytes`), no whole tied gradient.

fp32 tolerance (impl.common.tolerance): the distributed runs sum the same products in another order (all-reduces of
partial sums), a few ulps per op; the negative controls move the compared values by orders of magnitude more.
"""

import pytest
import torch
import torch.distributed as dist

from impl.common import tolerance
from impl.distributed import (
    PipelineSchedule,
    Zero,
    shard_state_dict,
    spawn,
    split_gpt,
    tensor_parallelize,
    tp_groups,
    zero_state_bytes,
)
from impl.finetune import apply_lora, apply_qlora
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


def _full_reference(perturb: bool = False) -> tuple[torch.Tensor, dict]:
    """The plain GPT's loss and gradients on the whole batch; the tied head's gradient under both names."""
    gpt = _gpt()
    _, loss = gpt(*_batch(perturb=perturb))
    loss.backward()
    grads = _grads(gpt)
    grads["lm_head.weight"] = grads["transformer.wte.weight"]
    return loss.detach(), grads


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


def _pp_checkpointed(group) -> dict:
    """Each pipeline stage checkpoints every block (applied after split_gpt); its blocks' forward runs counted."""
    stage = split_gpt(_gpt(), 2)[dist.get_rank(group)]
    apply_checkpointing(stage, "every")
    runs = []
    for block in stage.transformer.h.values():
        block.ln_1.register_forward_hook(lambda *_: runs.append(1))
    schedule = PipelineSchedule(stage, group, "1f1b", n_microbatches=2, loss_fn=cross_entropy)
    loss = schedule.step(*_batch())
    return {"loss": loss, "grads": _grads(stage), "runs": len(runs), "blocks": len(stage.transformer.h)}


def _refusals(group) -> dict:
    def message(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no error"

    lora_head = apply_lora(_gpt(), ["c_fc", "lm_head"], R, ALPHA)
    return {
        "lora_after_tp": message(lambda: apply_lora(tensor_parallelize(_gpt(), group), TARGETS, R, ALPHA)),
        "lora_head_tp": message(lambda: tensor_parallelize(lora_head, group)),
        "qlora_tp": message(lambda: tensor_parallelize(apply_qlora(_gpt(), TARGETS, R, ALPHA, blocksize=16), group)),
    }


def _pp_zero(rank: int, world_size: int) -> dict:
    """pp 2 (consecutive ranks) x dp 2: each stage trained by ZeRO-2 or -3 over its dp group, STEPS steps; and
    ZeRO-2 with the tied embedding's reduce left in backward ("old": the composition before the fix)."""
    groups = tp_groups(2)  # "tp" groups are consecutive ranks: here, the pipeline's
    pp, dp, dp_rank = groups.tp_group, groups.dp_group, groups.dp_rank
    out = {}
    for zero_stage in (2, 3, "old"):
        stage = split_gpt(_gpt(), 2)[dist.get_rank(pp)]
        # "old": Zero gets the stage inside a container, so it does not see the stage's tied_weight
        wrapped = torch.nn.ModuleDict({"stage": stage}) if zero_stage == "old" else stage
        zero = Zero(wrapped, torch.optim.AdamW, stage=2 if zero_stage == "old" else zero_stage, process_group=dp, **OPT)
        schedule = PipelineSchedule(stage, pp, "1f1b", n_microbatches=2, loss_fn=cross_entropy)
        for step in range(STEPS):
            schedule.step(*(t.chunk(2)[dp_rank] for t in _batch(step)))
            zero.step()
            if step < STEPS - 1:  # the last step's gradient shards stay, to be counted
                zero.zero_grad()
        numels = [p.numel() for p in stage.parameters() if p.requires_grad]
        expected = zero_state_bytes(numels, stage=zero.stage, world_size=2, rank=dp_rank)["grads"]
        model = {name.removeprefix("stage."): t for name, t in zero.state_dict()["model"].items()}
        out[zero_stage] = {"model": model, "grads": (zero.memory_breakdown()["grads"], expected)}
    return out


def _world2(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    return {
        "zero3": _zero3_checkpointed(rank, world_size),
        "tp_lora": _tp_lora(group),
        "pp_lora": _pp_lora(group),
        "pp_checkpointed": _pp_checkpointed(group),
        "refusals": _refusals(group),
    }


@pytest.fixture(scope="module")
def world2() -> list:
    return spawn(_world2, 2, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def pp_zero() -> list:
    return spawn(_pp_zero, 4, timeout_s=TIMEOUT_S)


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


def test_lora_after_tp_lora_on_the_tied_head_and_qlora_under_tp_are_refused(world2):
    refusals = world2[0]["refusals"]
    assert "apply LoRA before tensor_parallelize" in refusals["lora_after_tp"], refusals["lora_after_tp"]
    assert "ColumnParallelLinear" in refusals["lora_after_tp"]
    assert "lm_head" in refusals["lora_head_tp"] and "LoRALinear" in refusals["lora_head_tp"]
    assert "Linear4bit" in refusals["qlora_tp"] and "plain LoRA" in refusals["qlora_tp"], refusals["qlora_tp"]


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


# ---- pipeline + checkpointing ----


def test_checkpointed_pipeline_stages_match_single_process(world2):
    """Each stage checkpoints its blocks (a ModuleDict keyed by global index): every block runs twice per
    micro-batch (forward and replay), and the two stages' gradients (the tied embedding's summed) are the plain
    GPT's on the whole batch."""
    loss, grads = _full_reference()
    for rank_result in world2:
        run = rank_result["pp_checkpointed"]
        assert run["runs"] == 2 * 2 * run["blocks"]  # 2 micro-batches, forward + replay
        _assert_all_close(run["grads"], grads)
    torch.testing.assert_close(world2[-1]["pp_checkpointed"]["loss"], loss, **tolerance(torch.float32))
    with pytest.raises(AssertionError):  # negative control: one changed token in the reference's batch
        _assert_all_close(world2[0]["pp_checkpointed"]["grads"], _full_reference(perturb=True)[1])


def test_split_gpt_refuses_a_checkpointed_gpt():
    """A deep copy of a wrapped block would keep running the original block's forward (silently wrong)."""
    with pytest.raises(ValueError, match="apply checkpointing to each stage after split_gpt"):
        split_gpt(apply_checkpointing(_gpt(), "every"), 2)


# ---- pipeline + ZeRO-2/3 ----


def _stage_vs_reference(model: dict, reference: dict) -> tuple[dict, dict]:
    """A stage's parameters beside the reference's of the same name (the last stage's head is the tied wte)."""
    names = {n: "transformer.wte.weight" if n == "lm_head.weight" else n for n in model}
    ours = {n: t for n, t in model.items() if names[n] in reference}
    return ours, {n: reference[names[n]] for n in ours}


@pytest.mark.parametrize("zero_stage", [2, 3], ids=["zero2", "zero3"])
def test_pipeline_with_zero_matches_single_process_adamw(pp_zero, zero_stage):
    trained, perturbed = _reference_training(), _reference_training(perturb=True)
    seen = set()
    for rank_result in pp_zero:
        ours, reference = _stage_vs_reference(rank_result[zero_stage]["model"], trained)
        _assert_all_close(ours, reference)
        seen |= set(ours)
        held, expected = rank_result[zero_stage]["grads"]
        assert held == expected, (held, expected)  # shards only: no whole tied gradient left behind
    assert {"transformer.wte.weight", "lm_head.weight"} <= seen
    assert {n for n in seen if n != "lm_head.weight"} == set(trained)
    with pytest.raises(AssertionError):  # negative control: one changed token in one batch
        _assert_all_close(*_stage_vs_reference(pp_zero[-1][zero_stage]["model"], perturbed))


def test_pipeline_with_zero2_reducing_the_tied_gradient_in_backward_is_wrong(pp_zero):
    """Negative control for the fix: the tied gradient reduced during backward (before the fix) misses the other
    stage's half, so the tied embedding ends up wrong, and a whole gradient is left beside ZeRO's shards."""
    trained = _reference_training()
    for rank_result in pp_zero:
        ours, reference = _stage_vs_reference(rank_result["old"]["model"], trained)
        tied = "lm_head.weight" if "lm_head.weight" in ours else "transformer.wte.weight"
        with pytest.raises(AssertionError):
            _assert_all_close({tied: ours[tied]}, reference)
        held, expected = rank_result["old"]["grads"]
        assert held > expected
