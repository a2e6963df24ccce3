"""`python -m impl train` on several ranks (impl.gpt.train_parallel): every data-parallel engine, tensor
parallelism and their product give the loss curve of the single-process run on the same global batch (fp32,
gloo on CPU); checkpoints written at one world size and mode resume at another; bad options are one error line.

The reference is the unchanged single-process trainer (`impl.training.Trainer`) in this process. Ranks run
either under real torchrun (`python -m torch.distributed.run ... -m impl train`, a subprocess) or under the
project's launcher (`impl.distributed.spawn`, which forks them from a server that has torch imported already,
so a run costs a few seconds rather than torchrun's interpreter start-ups).
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impl.common.tolerance import tolerance
from impl.distributed import spawn
from impl.distributed.launch import SpawnError
from impl.gpt.parallel import plan_layout
from impl.gpt.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
    "resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius Marcius "
    "is chief enemy to the people. All: We know't, we know't. First Citizen: Let us kill him, and we'll have corn "
)
# A tiny run that exercises every part of a step: 2 accumulated micro-batches of a global batch of 8, AdamW with
# weight decay, a learning rate high enough to move the curve, and a gradient clip that bites on every step.
RUN = [
    "--n-layer=2", "--n-head=2", "--n-embd=32", "--block-size=16", "--batch-size=8", "--grad-accum-steps=2",
    "--learning-rate=1e-2", "--min-lr=1e-3", "--warmup-iters=1", "--lr-decay-iters=6", "--grad-clip=0.05",
    "--eval-interval=3", "--eval-iters=2", "--final-eval-iters=2", "--checkpoint-every=3", "--sample-chars=8",
    "--device=cpu", "--no-progress",
]  # fmt: skip
# Losses of the same steps on 2 or 4 ranks sum the gradient in another order than one process (gloo's reduction,
# the ranks' partial means); measured max relative difference over the 6 steps, every mode here at world 2 and 4:
# 7.4e-8 (x86, torch 2.13). The fp32 bound (rtol 1e-5) is >100x that; the negative control moves the curve by 2e-2.
TOL = tolerance(torch.float32)
TIMEOUT_S = 120


def _rank(rank: int, world_size: int, argv: list[str], wrong_slices: bool = False, crash_at: int = 0) -> int:
    """One rank of a spawned run: the CLI's own main. `wrong_slices`: every rank takes the first slice of the
    global batch instead of its own (the negative control). `crash_at`: the last rank dies in that step."""
    from impl.gpt import train_parallel

    if wrong_slices:
        train_parallel.RankRun.slice = lambda run, batch: tuple(t[: run.per_rank] for t in batch)
    if crash_at and rank == world_size - 1:
        step = train_parallel.RankRun.step

        def dying(run, index):
            if index + 1 == crash_at:
                os._exit(9)  # no cleanup, as a kill
            return step(run, index)

        train_parallel.RankRun.step = dying
    return train_main(argv)


def _args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--data", str(corpus), *RUN, *extra]


def _losses(out: Path) -> torch.Tensor:
    with open(out / "losses.csv", newline="") as f:
        return torch.tensor([float(r["loss"]) for r in csv.DictReader(f)], dtype=torch.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(world: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", f"--master-port={_free_port()}",
           "-m", "impl", "train", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT * 4)
    return path


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The single-process run (the unchanged Trainer path), 6 steps."""
    out = tmp_path_factory.mktemp("reference")
    assert train_main(_args(out, corpus, "--max-iters=6")) == 0
    return out


def _same_run(out: Path, reference: Path, steps: slice = slice(None)) -> None:
    ours, ref = _losses(out), _losses(reference)
    assert len(ours) == len(ref) == 6
    torch.testing.assert_close(ours[steps], ref[steps], **TOL)
    ours_eval = json.loads((out / "log.json").read_text())["evals"]
    ref_eval = json.loads((reference / "log.json").read_text())["evals"]
    assert [int(e["step"]) for e in ours_eval] == [int(e["step"]) for e in ref_eval] == [3, 6]  # rows read back: str
    for a, b in zip(ours_eval, ref_eval):
        ours, ref = (torch.tensor([float(e["train"]), float(e["val"])], dtype=torch.float64) for e in (a, b))
        torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "zero1", "zero2", "zero3"])
def test_data_parallel_modes_match_one_process(mode, corpus, reference, tmp_path):
    """Each rank on its half of every global batch: the same curve, evaluations and final state as one process."""
    assert spawn(_rank, 2, _args(tmp_path, corpus, "--max-iters=6", f"--parallel={mode}"), timeout_s=TIMEOUT_S)
    _same_run(tmp_path, reference)
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["parallel"] == {"mode": mode, "world_size": 2, "tp": 1, "dp": 2}
    assert len((tmp_path / "sample.txt").read_text()) == 8  # written by rank 0 from the gathered model


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_matches_one_process(corpus, reference, tmp_path):
    """--tp 2 on 2 ranks (dp = 1): the heads, the MLP and the vocabulary split in two, the curve unchanged."""
    spawn(_rank, 2, _args(tmp_path, corpus, "--max-iters=6", "--tp=2"), timeout_s=TIMEOUT_S)
    _same_run(tmp_path, reference)
    assert json.loads((tmp_path / "log.json").read_text())["parallel"]["tp"] == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_under_torchrun_ddp_on_2_ranks(corpus, reference, tmp_path):
    """The real launcher: torchrun sets RANK/WORLD_SIZE/MASTER_ADDR and the CLI joins the gloo group itself."""
    proc = _torchrun(2, _args(tmp_path, corpus, "--max-iters=6", "--parallel=ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val loss") == 1  # rank 0 prints, the others do not
    _same_run(tmp_path, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_under_torchrun_tp2_by_zero3_on_4_ranks(corpus, reference, tmp_path):
    """World 4: two TP groups of 2 consecutive ranks, ZeRO-3 across the groups, each group on half the batch."""
    proc = _torchrun(4, _args(tmp_path, corpus, "--max-iters=6", "--parallel=zero3", "--tp=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_run(tmp_path, reference)
    assert json.loads((tmp_path / "log.json").read_text())["parallel"] == {
        "mode": "zero3", "world_size": 4, "tp": 2, "dp": 2,
    }  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_on_4_ranks(corpus, reference, tmp_path):
    """World 4, dp 4: two windows per rank per micro-batch."""
    spawn(_rank, 4, _args(tmp_path, corpus, "--max-iters=6", "--parallel=fsdp2"), timeout_s=TIMEOUT_S)
    _same_run(tmp_path, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_on_the_same_slice_leave_the_curve(corpus, reference, tmp_path):
    """Negative control: per-rank batches that are not the slices of the global batch (both ranks on the first
    half) give another curve (measured: 2e-2 relative), far outside the tolerance the tests above use."""
    spawn(_rank, 2, _args(tmp_path, corpus, "--max-iters=6", "--parallel=ddp"), True, timeout_s=TIMEOUT_S)
    ours, ref = _losses(tmp_path), _losses(reference)
    assert ours[0] != ref[0]  # the first step's loss is already the mean over another set of windows
    assert (ours - ref).abs().max() > 1e-3


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes_and_modes(corpus, reference, tmp_path):
    """Saved at world 2 with ZeRO-3 after step 3, resumed to step 6 in one process, at world 4 with DDP and at
    world 2 with TP 2: each continues the uninterrupted curve. And a single-process checkpoint resumes under
    ZeRO-2 on 2 ranks."""
    saved = tmp_path / "zero3"
    spawn(_rank, 2, _args(saved, corpus, "--max-iters=3", "--parallel=zero3"), timeout_s=TIMEOUT_S)
    assert sorted(p.name for p in (saved / "ckpt").iterdir()) == ["step_00000003"]
    runs = {"one": (1, []), "ddp4": (4, ["--parallel=ddp"]), "tp2": (2, ["--tp=2"])}
    for name, (world, extra) in runs.items():
        out = tmp_path / name
        shutil.copytree(saved / "ckpt", out / "ckpt")
        for log in ("losses.csv", "evals.csv"):  # the 3-step run's final estimate is the periodic one at step 3
            shutil.copy(saved / log, out / log)
        argv = _args(out, corpus, "--max-iters=6", *extra)
        if world == 1:
            assert train_main(argv) == 0
        else:
            spawn(_rank, world, argv, timeout_s=TIMEOUT_S)
        assert json.loads((out / "log.json").read_text())["resumed_from"] == 3, name
        _same_run(out, reference)
    one = tmp_path / "from_one"
    assert train_main(_args(one, corpus, "--max-iters=3")) == 0
    spawn(_rank, 2, _args(one, corpus, "--max-iters=6", "--parallel=zero2"), timeout_s=TIMEOUT_S)
    _same_run(one, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_dying_mid_run_loses_nothing_checkpointed(corpus, reference, tmp_path):
    """Rank 1 of a ZeRO-2 run dies in step 5: the step-3 checkpoint is whole, and the rerun continues the curve."""
    argv = _args(tmp_path, corpus, "--max-iters=6", "--parallel=zero2")
    with pytest.raises(SpawnError, match="rank 1"):
        spawn(_rank, 2, argv, False, 5, timeout_s=20)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000003"]
    spawn(_rank, 2, argv, timeout_s=TIMEOUT_S)
    assert json.loads((tmp_path / "log.json").read_text())["resumed_from"] == 3
    _same_run(tmp_path, reference)


def _clip_rank(rank: int, world_size: int) -> dict:
    """Clip pieces of two gradients held as the engines hold them; the reference clips the whole ones."""
    import torch.distributed as dist

    from impl.gpt.parallel_tp import clip_grads_

    torch.manual_seed(0)
    full = [torch.randn(8, 6), torch.randn(7)]  # a split matrix and a replicated vector (a bias, a LayerNorm)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
    for p, g in zip(params, full):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    reference = [p.grad for p in params]
    out = {}
    for name, dp, tp in (("tp", None, dist.group.WORLD), ("dp", dist.group.WORLD, None), ("wrong", None, None)):
        pieces = [full[0].chunk(world_size)[rank].clone(), full[1].clone()]
        if name == "dp":  # ZeRO and FSDP shard every gradient: the replicated vector too
            pieces[1] = full[1].tensor_split(world_size)[rank].clone()
        clip_grads_([(pieces[0], True), (pieces[1], False)], 0.5, dp, tp)
        expected = [reference[0].chunk(world_size)[rank], reference[1]]
        if name == "dp":
            expected[1] = reference[1].tensor_split(world_size)[rank]
        out[name] = max((a - b).abs().max().item() for a, b in zip(pieces, expected))
    return out


@pytest.mark.distributed
def test_clipping_pieces_is_clipping_the_whole_gradient():
    """The global norm from TP slices (summed over the TP group, replicated parts once) and from data-parallel
    shards (summed over the DP group) is torch's clip_grad_norm_ of the whole gradient; a norm left local is not."""
    for result in spawn(_clip_rank, 2, timeout_s=TIMEOUT_S):
        assert result["tp"] < 1e-6 and result["dp"] < 1e-6, result
        assert result["wrong"] > 1e-3, result  # the negative control: the local norm clips by another factor


# ---- bad input: one error line, exit 2, before any work ----------------------------------------------------


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    from impl.__main__ import main

    code = main(["train", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--parallel=zero4"], "invalid choice: 'zero4'"),
        (["--parallel=ddp"], "--parallel ddp needs a distributed launch"),
        (["--tp=2"], "--tp 2 needs a distributed launch"),
        (["--tp=0"], "--tp"),
    ],
)
def test_bad_parallel_options_without_a_launch(extra, match, corpus, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code, err = _cli(_args(tmp_path / "out", corpus, *extra), capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err


@pytest.mark.parametrize(
    ("world", "extra", "match"),
    [
        (4, ["--tp=3", "--parallel=ddp"], "--tp must divide the world size 4, got 3"),
        (2, ["--tp=2", "--n-head=1", "--n-embd=32"], "--tp must divide n_head=1"),
        (2, ["--parallel=zero2", "--batch-size=7"], "divisible by the 2 data-parallel ranks, got 7"),
        (2, [], "--parallel none with 2 ranks and --tp 1 would train 2 separate copies"),
    ],
)
def test_bad_parallel_options_under_torchrun(world, extra, match, corpus, tmp_path, capsys, monkeypatch):
    """As torchrun's environment says: refused before any process group is joined."""
    env = {"RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = _cli(_args(tmp_path / "out", corpus, *extra), capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err


def test_layout_of_ranks():
    """TP groups of consecutive ranks: rank 5 of 8 with tp 2 is TP rank 1 of data-parallel rank 2; world 1 under
    torchrun with any mode is a one-rank group (dp 1); no launch is the plain run."""
    layout = plan_layout("zero3", 2, 8, 4, (5, 8, 1))
    assert (layout.dp, layout.dp_rank, layout.tp_rank, layout.local_rank) == (4, 2, 1, 1)
    assert plan_layout("ddp", 1, 8, 4, (0, 1, 0)).dp == 1
    assert plan_layout("none", 1, 8, 4, None).world_size == 1
