"""GPipe and 1F1B pipelines against the single-process GPT and torch.distributed.pipelining's schedules.

One spawned group per world size (2 and 4 stages of a 4-block GPT) runs both schedules at 1, 2, 4 and 8
micro-batches, torch's ScheduleGPipe and Schedule1F1B on the same split, and the bad-input checks that need a
group; the tests below read its per-rank results. The single-process reference is computed here.
"""

import pytest
import torch
import torch.distributed as dist

from impl.common import MemoryMeter, tolerance
from impl.distributed import GPTStage, PipelineSchedule, spawn, split_gpt
from impl.distributed.pipeline import SCHEDULES, gpt_loss, schedule_order, sync_tied_gradients
from impl.gpt import GPT, GPTConfig

pytestmark = pytest.mark.distributed

WORLD_SIZES = (2, 4)
MICROBATCHES = (1, 2, 4, 8)
TORCH_MICROBATCHES = 4
TIMEOUT_S = 60
CONFIG = dict(block_size=8, vocab_size=11, n_layer=4, n_head=2, n_embd=8)
BATCH, SEQ = 8, 8
MICRO_SIZE = 2  # sequences per micro-batch in the memory runs


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**CONFIG))


def _tokens(perturb: bool = False, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG["vocab_size"], (batch, SEQ), generator=g)
    targets = torch.randint(0, CONFIG["vocab_size"], (batch, SEQ), generator=g)
    if perturb:
        idx[-1, 0] = (idx[-1, 0] + 1) % CONFIG["vocab_size"]
    return idx, targets


def _grads(module) -> dict:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


# ---- what the spawned ranks run ----


def _ours_run(schedule: str, n_microbatches: int, rank: int, world_size: int) -> dict:
    stage = split_gpt(_gpt(), world_size)[rank]
    pipeline = PipelineSchedule(stage, dist.group.WORLD, schedule, n_microbatches, gpt_loss)
    loss = pipeline.step(*_tokens())
    timeline = [(t.kind, t.microbatch, t.start, t.end) for t in pipeline.timeline]
    return {
        "loss": loss,
        "grads": _grads(stage),
        "in_flight": pipeline.max_in_flight,
        "timeline": (timeline, pipeline.order, pipeline.step_time, pipeline.bubble_fraction()),
    }


def _peak_bytes(schedule: str, n_microbatches: int, rank: int, world_size: int) -> int:
    """Peak bytes allocated during a step whose micro-batches are MICRO_SIZE sequences each."""
    stage = split_gpt(_gpt(), world_size)[rank]
    pipeline = PipelineSchedule(stage, dist.group.WORLD, schedule, n_microbatches, gpt_loss)
    tokens = _tokens(batch=MICRO_SIZE * n_microbatches)
    with MemoryMeter("cpu") as meter:
        pipeline.step(*tokens)
    return meter.peak


def _torch_run(schedule: str, rank: int, world_size: int) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = split_gpt(_gpt(), world_size)[rank]
    pipeline_stage = PipelineStage(stage, rank, world_size, torch.device("cpu"), group=dist.group.WORLD)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    pipeline = cls(pipeline_stage, TORCH_MICROBATCHES, loss_fn=gpt_loss)
    idx, targets = _tokens()
    losses = []
    if rank == 0:
        pipeline.step(idx)
    elif rank == world_size - 1:
        pipeline.step(target=targets, losses=losses)
    else:
        pipeline.step()
    sync_tied_gradients(stage, dist.group.WORLD)  # torch does not know the embedding is tied to the head
    loss = torch.stack(losses).mean() if losses else None
    return {"loss": loss, "grads": _grads(stage)}


def _bad_input_run(rank: int, world_size: int) -> dict:
    def error(fn) -> str:
        try:
            fn()
        except (ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    stage = split_gpt(_gpt(), world_size)[rank]
    idx, targets = _tokens()
    out = {"no_loss_fn": error(lambda: PipelineSchedule(stage, dist.group.WORLD, "gpipe", 2))}
    pipeline = PipelineSchedule(stage, dist.group.WORLD, "gpipe", 3, gpt_loss)
    if rank == 0:  # fails before any communication, so the other stages are not left waiting
        out["indivisible"] = error(lambda: pipeline.step(idx, targets))
    return out


def _run_all(rank: int, world_size: int) -> dict:
    out = {"ours": {(s, m): _ours_run(s, m, rank, world_size) for s in SCHEDULES for m in MICROBATCHES}}
    out["peak"] = {(s, m): _peak_bytes(s, m, rank, world_size) for s in SCHEDULES for m in MICROBATCHES}
    out["torch"] = {s: _torch_run(s, rank, world_size) for s in SCHEDULES}
    out["bad_input"] = _bad_input_run(rank, world_size)
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return {n: spawn(_run_all, n, timeout_s=TIMEOUT_S) for n in WORLD_SIZES}


@pytest.fixture(scope="module")
def single() -> dict:
    """The single-process loss and gradients (the tied embedding's also under the last stage's name)."""
    out = {}
    for perturb in (False, True):
        gpt = _gpt()
        _, loss = gpt(*_tokens(perturb))
        loss.backward()
        grads = _grads(gpt)
        grads["lm_head.weight"] = grads["transformer.wte.weight"]
        out[perturb] = (loss.detach(), grads)
    return out


def _assert_stages_match(results: list, reference: tuple) -> None:
    loss, grads = reference
    torch.testing.assert_close(results[-1]["loss"], loss, **tolerance(torch.float32))
    names = set()
    for result in results:
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, grads[name], **tolerance(torch.float32), msg=name)
            names.add(name)
    assert names | {"lm_head.weight"} == set(grads)  # every parameter is on some stage


# ---- equivalence ----


@pytest.mark.parametrize("n_microbatches", MICROBATCHES, ids=lambda m: f"m{m}")
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"pp{n}")
def test_one_step_matches_single_process(runs, single, world_size, schedule, n_microbatches):
    results = [rank_result["ours"][(schedule, n_microbatches)] for rank_result in runs[world_size]]
    _assert_stages_match(results, single[False])
    with pytest.raises(AssertionError):  # negative control: one changed token breaks the match
        _assert_stages_match(results, single[True])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"pp{n}")
def test_torch_pipelining_matches_ours_on_the_same_split(runs, single, world_size, schedule):
    theirs = [rank_result["torch"][schedule] for rank_result in runs[world_size]]
    _assert_stages_match(theirs, single[False])
    ours = [rank_result["ours"][(schedule, TORCH_MICROBATCHES)] for rank_result in runs[world_size]]
    for our, their in zip(ours, theirs, strict=True):
        for name, grad in our["grads"].items():
            torch.testing.assert_close(grad, their["grads"][name], **tolerance(torch.float32), msg=name)
    with pytest.raises(AssertionError):
        _assert_stages_match(theirs, single[True])


# ---- activation memory ----


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"pp{n}")
def test_1f1b_holds_at_most_as_many_microbatches_as_stages_gpipe_holds_all(runs, world_size):
    for stage, rank_result in enumerate(runs[world_size]):
        for m in MICROBATCHES:
            assert rank_result["ours"][("gpipe", m)]["in_flight"] == m
            assert rank_result["ours"][("1f1b", m)]["in_flight"] == min(world_size - stage, m)


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"pp{n}")
def test_peak_memory_grows_with_microbatches_for_gpipe_only(runs, world_size):
    """Measured bytes on each stage with micro-batches of fixed size: GPipe's peak grows with their number m,
    1F1B's activations stop growing once m reaches the micro-batches it keeps in flight (what still grows a
    little is the loss list and gradients sent but not yet received)."""
    for stage, rank_result in enumerate(runs[world_size]):
        peak = rank_result["peak"]
        gpipe = [peak[("gpipe", m)] for m in MICROBATCHES]
        one_f_one_b = [peak[("1f1b", m)] for m in MICROBATCHES]
        assert gpipe[-1] > 1.7 * gpipe[-2] > 1.7**2 * gpipe[-3], f"stage {stage}: {gpipe}"
        assert one_f_one_b[-1] < 1.25 * one_f_one_b[-2], f"stage {stage}: {one_f_one_b}"  # sent buffers, losses
        assert one_f_one_b[-1] < 0.75 * gpipe[-1]


# ---- the schedules themselves ----


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"pp{n}")
def test_timeline_records_every_operation_in_schedule_order(runs, world_size):
    for rank_result in runs[world_size]:
        for (schedule, m), result in rank_result["ours"].items():
            timeline, order, step_time, bubble = result["timeline"]
            assert [(kind, i) for kind, i, _, _ in timeline] == order
            bounds = [t for _, _, start, end in timeline for t in (start, end)]
            assert bounds == sorted(bounds) and bounds[0] >= 0 and bounds[-1] <= step_time, (schedule, m)
            assert 0.0 <= bubble < 1.0


@pytest.mark.parametrize("n_microbatches", MICROBATCHES, ids=lambda m: f"m{m}")
@pytest.mark.parametrize("n_stages", [1, 2, 4, 5])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_runs_each_microbatch_forward_then_backward_once(schedule, n_stages, n_microbatches):
    for stage in range(n_stages):
        order = schedule_order(schedule, n_stages, stage, n_microbatches)
        assert sorted(order) == sorted(
            [("F", i) for i in range(n_microbatches)] + [("B", i) for i in range(n_microbatches)]
        )
        assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(n_microbatches))
        assert [i for kind, i in order if kind == "B"] == list(range(n_microbatches))  # neighbours agree on order


# ---- bad input ----


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"pp{n}")
def test_bad_input_on_a_group(runs, world_size):
    assert (
        runs[world_size][-1]["bad_input"]["no_loss_fn"]
        == "ValueError: loss_fn must be given on the last stage, got None"
    )
    assert runs[world_size][0]["bad_input"]["indivisible"] == (
        f"ValueError: inputs's batch size must be divisible by n_microbatches=3, got {BATCH}"
    )


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match=r"schedule must be one of \('gpipe', '1f1b'\), got 'zero-bubble'"):
        PipelineSchedule(torch.nn.Linear(2, 2), None, "zero-bubble")


@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_microbatch_count_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"n_microbatches must be a positive int, got {bad!r}"):
        PipelineSchedule(torch.nn.Linear(2, 2), None, "gpipe", bad)


def test_pipeline_needs_a_process_group():
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup, got NoneType"):
        PipelineSchedule(torch.nn.Linear(2, 2), None, "gpipe", 2)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_stages_are_the_gpt_with_the_other_parts_removed(n_stages):
    """Each stage is a GPT (its trunk, its forward) holding its own blocks under their global names, the
    embeddings on the first stage only and ln_f + lm_head on the last only; chained, the stages give the
    single-process logits, and a stage's blocks are copies (the source GPT is untouched)."""
    gpt = _gpt()
    stages = split_gpt(gpt, n_stages)
    names = []
    for s, stage in enumerate(stages):
        assert isinstance(stage, GPTStage) and isinstance(stage, GPT)
        tr = stage.transformer
        assert (tr["wte"] is not None, tr["wpe"] is not None) == (s == 0, s == 0)
        assert (tr["ln_f"] is not None, stage.lm_head is not None) == (s == n_stages - 1,) * 2
        assert not any(p is q for p in stage.parameters() for q in gpt.parameters())
        names += [name for name, _ in stage.named_parameters()]
    assert stages[-1].tied_weight is stages[-1].lm_head.weight
    assert (stages[0].lm_head is None) == (n_stages > 1)
    assert sorted(set(names) - {"lm_head.weight"}) == sorted(name for name, _ in gpt.named_parameters())
    wpe = gpt.transformer.wpe.weight.numel()  # num_params leaves the position embedding out, where a stage has it
    counts = [stage.num_params() + (wpe if s == 0 else 0) for s, stage in enumerate(stages)]
    assert counts == [sum(p.numel() for p in stage.parameters()) for stage in stages]
    idx, _ = _tokens()
    x = idx
    for stage in stages:
        x = stage(x)
    reference, _ = gpt(idx)
    torch.testing.assert_close(x, reference, **tolerance(torch.float32))
    with pytest.raises(AssertionError):  # negative control: skipping the middle of the chain breaks it
        torch.testing.assert_close(stages[-1](stages[0](idx)) if n_stages > 2 else x + 1e-3, reference)


def test_more_stages_than_blocks_is_rejected():
    with pytest.raises(ValueError, match=r"n_stages must be at most n_layer=4, got 5"):
        split_gpt(_gpt(), 5)
