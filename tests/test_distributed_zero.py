"""ZeRO stages 0-3 against one process, torch's ZeroRedundancyOptimizer and FSDP2, and the paper's byte counts.

Two spawned groups do all the distributed work (world size 2, then 4, which resumes world size 2's checkpoint);
the tests below read their results, and the single-process references are computed here in the test process.
"""

from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from impl.common import assert_close_to_reference_error, tolerance
from impl.distributed import Zero, spawn

pytestmark = pytest.mark.distributed

STAGES = (0, 1, 2, 3)
WORLD_SIZES = (2, 4)
STEPS, RESUME_STEPS, GLOBAL_BATCH = 3, 2, 8
D_IN, D_HIDDEN, D_OUT = 5, 7, 3  # numels 35, 7, 21, 3: none splits evenly over 2 or 4 ranks
OPT = {"lr": 1e-2, "weight_decay": 0.1}
TIMEOUT_S = 30
# ZeRO paper, Fig. 1: bytes per parameter on each rank, as a function of the world size N.
PAPER_BYTES = {
    (0, False): lambda n: 4 + 4 + 8,
    (1, False): lambda n: 4 + 4 + Fraction(8, n),
    (2, False): lambda n: 4 + Fraction(12, n),
    (3, False): lambda n: Fraction(16, n),
    (0, True): lambda n: 2 + 2 + 12,
    (1, True): lambda n: 2 + 2 + Fraction(12, n),
    (2, True): lambda n: 2 + Fraction(14, n),
    (3, True): lambda n: Fraction(16, n),
}


def _model(seed: int = 0, even: bool = False) -> nn.Module:
    """A tiny MLP; `even` has 76 parameters in tensors of 32, 4, 32, 8, which split evenly over 2 and 4 ranks."""
    torch.manual_seed(seed)
    d_in, d_hidden, d_out = (8, 4, 8) if even else (D_IN, D_HIDDEN, D_OUT)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def _batch(step: int, rank: int = 0, world_size: int = 1, perturb: bool = False):
    """Step `step`'s global batch, or this rank's 1/world_size of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randn(GLOBAL_BATCH, D_OUT, generator=g)
    if perturb:
        x[-1, 0] += 0.5
    n = GLOBAL_BATCH // world_size
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


def _train(run, steps, rank: int, world_size: int, start: int = 0) -> None:
    """`steps` steps of this rank's share of the batches from `start` on; `run` is a Zero or a `_Plain`."""
    for step in range(start, start + steps):
        x, y = _batch(step, rank, world_size)
        _loss(run(x), y).backward()
        run.step()
        run.zero_grad()


class _Plain:
    """A model and a torch optimizer behind Zero's calling convention."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def __call__(self, x):
        return self.model(x)

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()


# ---- what the spawned ranks run ----


def _zero_run(stage: int, mixed: bool, rank: int, world_size: int) -> dict:
    zero = Zero(_model(), torch.optim.AdamW, stage=stage, mixed_precision=mixed, **OPT)
    out = {}
    for step in range(STEPS):
        x, y = _batch(step, rank, world_size)
        before = zero.comm.bytes_moved
        _loss(zero(x), y).backward()
        zero.step()
        if step == 0:
            out["comm"] = zero.comm.bytes_moved - before
            out["memory"] = zero.memory_breakdown()
        zero.zero_grad()
    out["model"] = zero.state_dict()["model"]
    even = Zero(_model(even=True), torch.optim.AdamW, stage=stage, mixed_precision=mixed, **OPT)
    even(torch.randn(2, 8)).square().mean().backward()
    even.step()
    out["memory_even"] = even.memory_breakdown()
    return out


def _accumulation_run(stage: int, rank: int, world_size: int) -> dict:
    """One step over two micro-batches (each loss halved): stages 2-3 reduce each micro-batch's gradient
    as backward makes it and add the shards up; stages 0-1 let autograd add the full gradients."""
    zero = Zero(_model(), torch.optim.AdamW, stage=stage, **OPT)
    x, y = _batch(0, rank, world_size)
    for x_micro, y_micro in zip(x.chunk(2), y.chunk(2), strict=True):
        (_loss(zero(x_micro), y_micro) / 2).backward()
    zero.step()
    return zero.state_dict()["model"]


def _zero_redundancy_run(rank: int, world_size: int) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    ddp = DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **OPT)
    _train(_Plain(ddp, opt), STEPS, rank, world_size)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _fsdp2_run(mixed: bool, rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if mixed else None
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for layer in (model[0], model[2], model):
        fully_shard(layer, **kwargs)
    _train(_Plain(model, torch.optim.AdamW(model.parameters(), **OPT)), STEPS, rank, world_size)
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def _resume_run(ckpt_in: str | None, ckpt_out: str | None, rank: int, world_size: int) -> dict:
    """World size 2 trains STEPS steps at stage 3 and saves; world size 4 loads that into stages 3 and 1.
    Both then train RESUME_STEPS more steps."""
    out = {}
    if ckpt_out is not None:
        zero = Zero(_model(), torch.optim.AdamW, stage=3, **OPT)
        _train(zero, STEPS, rank, world_size)
        state = zero.state_dict()
        if rank == 0:
            torch.save(state, ckpt_out)
        dist.barrier()
        _train(zero, RESUME_STEPS, rank, world_size, start=STEPS)
        out[3] = zero.state_dict()["model"]
        try:
            zero.load_state_dict({"model": {}, "optimizer": state["optimizer"]})
        except ValueError as err:
            out["bad_load"] = str(err)
    if ckpt_in is not None:
        state = torch.load(ckpt_in)
        for stage in (3, 1):
            zero = Zero(_model(seed=1), torch.optim.AdamW, stage=stage, **OPT)
            zero.load_state_dict(state)
            _train(zero, RESUME_STEPS, rank, world_size, start=STEPS)
            out[stage] = zero.state_dict()["model"]
    return out


def _run_all(rank: int, world_size: int, ckpt_in: str | None, ckpt_out: str | None) -> dict:
    out = {"zero": {(s, m): _zero_run(s, m, rank, world_size) for s in STAGES for m in (False, True)}}
    out["accumulation"] = {s: _accumulation_run(s, rank, world_size) for s in STAGES}
    out["zero_redundancy"] = _zero_redundancy_run(rank, world_size)
    out["fsdp2"] = _fsdp2_run(False, rank, world_size)
    out["fsdp2_mixed"] = _fsdp2_run(True, rank, world_size)
    out["resume"] = _resume_run(ckpt_in, ckpt_out, rank, world_size)
    return out


# ---- fixtures: the two spawned groups and the single-process references ----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("zero") / "world2.pt")


@pytest.fixture(scope="module")
def runs(checkpoint) -> dict:
    """Per world size, the list of per-rank results."""
    world2 = spawn(_run_all, 2, None, checkpoint, timeout_s=TIMEOUT_S)
    world4 = spawn(_run_all, 4, checkpoint, None, timeout_s=TIMEOUT_S)
    return {2: world2, 4: world4}


def _single(steps: int, perturb: bool = False, start: int = 0, state: dict | None = None):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    for step in range(start, start + steps):
        x, y = _batch(step, perturb=perturb)
        _loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _params(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def single() -> dict:
    """fp32 parameters after STEPS AdamW steps in one process on the whole batch, and on a perturbed batch."""
    return {"truth": _params(_single(STEPS)[0]), "perturbed": _params(_single(STEPS, perturb=True)[0])}


def _assert_params_close(ours: dict, reference: dict, **tol) -> None:
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], **(tol or tolerance(torch.float32)), msg=name)


def _assert_params_differ(ours: dict, reference: dict) -> None:
    with pytest.raises(AssertionError):
        _assert_params_close(ours, reference)


# ---- equivalence ----


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_fp32_matches_single_process_on_the_whole_batch(runs, single, stage, world_size):
    for rank_result in runs[world_size]:  # every rank's consolidated state is the same, and right
        ours = rank_result["zero"][(stage, False)]["model"]
        _assert_params_close(ours, single["truth"])
    _assert_params_differ(ours, single["perturbed"])  # negative control: one changed input breaks the match


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_gradient_accumulation_matches_one_large_batch(runs, single, stage, world_size):
    ours = runs[world_size][0]["accumulation"][stage]
    _assert_params_close(ours, _params(_single(1)[0]))
    _assert_params_differ(ours, _params(_single(1, perturb=True)[0]))


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
def test_stage1_matches_zero_redundancy_optimizer(runs, single, world_size):
    ours = runs[world_size][0]["zero"][(1, False)]["model"]
    reference = runs[world_size][0]["zero_redundancy"]
    _assert_params_close(ours, reference)
    _assert_params_differ(reference, single["perturbed"])


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
def test_stage3_matches_fsdp2(runs, single, world_size):
    ours = runs[world_size][0]["zero"][(3, False)]["model"]
    reference = runs[world_size][0]["fsdp2"]
    _assert_params_close(ours, reference)
    _assert_params_differ(reference, single["perturbed"])


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_mixed_precision_is_as_close_to_fp32_as_fsdp2_mixed_precision(runs, single, stage, world_size):
    """bf16 parameters and gradients with fp32 masters: our masters are off the fp32 run by no more than FSDP2's
    (param_dtype=reduce_dtype=bf16) are, and not off by nothing (the bf16 path is really taken)."""
    ours = runs[world_size][0]["zero"][(stage, True)]["model"]
    reference = runs[world_size][0]["fsdp2_mixed"]
    for name, truth in single["truth"].items():
        assert ours[name].dtype == torch.float32
        assert_close_to_reference_error(ours[name], reference[name], truth, factor=2.0, name=name)
    _assert_params_differ(ours, single["truth"])


# ---- memory and communication against the paper ----


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-mixed"])
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_bytes_per_parameter_match_the_paper(runs, stage, world_size, mixed):
    """Tensors that split evenly: each rank holds exactly Ψ x the paper's bytes per parameter."""
    for rank_result in runs[world_size]:
        memory = rank_result["zero"][(stage, mixed)]["memory_even"]
        assert memory["padding"] == 0 and memory["numel"] == 76
        assert memory["total"] == memory["numel"] * PAPER_BYTES[(stage, mixed)](world_size)
        assert memory["optimizer_scalars"] == 4 * 4  # Adam's step counter, one fp32 scalar per tensor


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-mixed"])
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"stage{s}")
def test_padding_is_counted_where_tensors_do_not_split_evenly(runs, stage, world_size, mixed):
    """Each tensor is padded to a multiple of N; whatever is sharded is stored padded, so it costs
    (Ψ + padding) / N per rank, and stages 1-2 keep their full parameters padded too."""
    numel = D_IN * D_HIDDEN + D_HIDDEN + D_HIDDEN * D_OUT + D_OUT
    padding = {2: 1 + 1 + 1 + 1, 4: 1 + 1 + 3 + 1}[world_size]  # 35, 7, 21, 3 -> 36/40, 8, 22/24, 4
    full, shard = numel, (numel + padding) // world_size
    low, high = (2, 2) if mixed else (4, 4)
    expected = {
        "params": low * (full if stage == 0 else (numel + padding) if stage < 3 else shard),
        "grads": high * (full if stage < 2 else shard),
        "master": 4 * (full if stage == 0 else shard) if mixed else 0,
        "optimizer": 8 * (full if stage == 0 else shard),
    }
    for rank_result in runs[world_size]:
        memory = rank_result["zero"][(stage, mixed)]["memory"]
        assert (memory["numel"], memory["padding"]) == (numel, padding if stage > 0 else 0)
        assert {k: memory[k] for k in expected} == expected


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-mixed"])
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda n: f"world{n}")
def test_stage3_moves_one_and_a_half_times_the_bytes(runs, world_size, mixed):
    """Sec. 7: stages 0-2 move 2Ψ per step (all-reduce = reduce-scatter + all-gather), stage 3 moves 3Ψ."""
    comm = {s: runs[world_size][0]["zero"][(s, mixed)]["comm"] for s in STAGES}
    numel = runs[world_size][0]["zero"][(1, mixed)]["memory"]["numel"]
    padded = numel + runs[world_size][0]["zero"][(1, mixed)]["memory"]["padding"]
    width = 2 if mixed else 4
    assert comm == {0: 2 * width * numel, 1: 2 * width * padded, 2: 2 * width * padded, 3: 3 * width * padded}
    assert Fraction(comm[3], comm[2]) == Fraction(3, 2)


# ---- checkpoints ----


def test_consolidated_checkpoint_is_a_single_process_state(runs, checkpoint):
    """World size 2's stage-3 checkpoint holds full fp32 tensors equal to a single-process run's, optimizer
    state included, and loads into plain torch.optim.AdamW."""
    state = torch.load(checkpoint)
    model, opt = _single(STEPS)
    _assert_params_close(state["model"], dict(model.state_dict()))
    reference = opt.state_dict()["state"]
    for index, moments in reference.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                state["optimizer"]["state"][index][key], moments[key], **tolerance(torch.float32)
            )
    _assert_params_differ(state["model"], _params(_single(STEPS, perturb=True)[0]))


@pytest.mark.parametrize("resume_at", ["world1", "world4-stage3", "world4-stage1"])
def test_resume_at_another_world_size_continues_identically(runs, checkpoint, resume_at):
    continued = runs[2][0]["resume"][3]  # world size 2 went on without stopping
    if resume_at == "world1":
        model, _ = _single(RESUME_STEPS, start=STEPS, state=torch.load(checkpoint))
        resumed = _params(model)
    else:
        resumed = runs[4][0]["resume"][int(resume_at[-1])]
    _assert_params_close(resumed, continued)
    _assert_params_differ(resumed, runs[2][0]["zero"][(3, False)]["model"])  # the extra steps did move them


def test_load_state_dict_names_the_missing_key(runs):
    assert "state_dict['model'] is missing '0.weight'" in runs[2][0]["resume"]["bad_load"]


# ---- bad input (no process group needed: checked before one is looked for) ----


def test_unknown_stage_is_rejected():
    with pytest.raises(ValueError, match=r"stage must be one of \(0, 1, 2, 3\), got 4"):
        Zero(_model(), torch.optim.AdamW, stage=4)


def test_non_floating_point_parameters_are_rejected():
    model = _model()
    model.register_parameter("counts", nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match=r"parameters must be floating point; 'counts' has dtype torch.int64"):
        Zero(model, torch.optim.AdamW, stage=1)


def test_optimizer_cls_must_be_an_optimizer_class():
    with pytest.raises(TypeError, match=r"optimizer_cls must be a torch.optim.Optimizer subclass, got 'adamw'"):
        Zero(_model(), "adamw", stage=1)


def test_zero_needs_a_process_group():
    with pytest.raises(ValueError, match=r"process_group: Zero needs an initialized process group"):
        Zero(_model(), torch.optim.AdamW, stage=2)
