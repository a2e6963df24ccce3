"""The launcher: results come back in rank order, and a rank that raises, exits or stalls mid-step fails the
whole run with that rank's error instead of hanging it."""

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from impl.distributed import Zero, spawn
from impl.distributed.launch import RankPool, SpawnError

pytestmark = pytest.mark.distributed

TIMEOUT_S = 10  # generous for a loaded CI machine; a dead peer is noticed by gloo at once, not after this


def _rank_and_sum(rank: int, world_size: int, offset: float) -> tuple[int, float]:
    total = torch.tensor([rank + offset])
    dist.all_reduce(total)
    return rank, total.item()


def _fail_mid_step(rank: int, world_size: int, how: str) -> None:
    """ZeRO-2 training where rank 1, at step 1, fails between forward and backward; its peers are then inside
    the gradient reduce-scatter that backward runs, waiting for it."""
    torch.manual_seed(0)
    zero = Zero(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)), torch.optim.AdamW, stage=2, lr=1e-2)
    for step in range(3):
        loss = zero(torch.randn(2, 4)).square().mean()
        if step == 1 and rank == 1:
            if how == "raise":
                raise RuntimeError("rank 1 gave up at step 1")
            if how == "exit":
                os._exit(3)
            time.sleep(120)  # stalls: its peers' collective times out
        loss.backward()
        zero.step()
        zero.zero_grad()


def _counter(rank: int, world_size: int, conn, start: int) -> None:
    """A RankPool server: replies with an all-reduced counter; "fail" makes rank 1 raise."""
    count = start
    conn.send(("ready", rank))
    while (command := conn.recv()) != "stop":
        if command == "fail" and rank == 1:
            raise RuntimeError("rank 1 was told to fail")
        total = torch.tensor([float(count)])
        dist.all_reduce(total)
        count += 1
        conn.send(total.item())


def test_rank_pool_drives_live_ranks_and_surfaces_a_failure():
    pool = RankPool(_counter, 2, 5, timeout_s=TIMEOUT_S)
    assert pool.ready == [("ready", 0), ("ready", 1)]
    assert pool.send("step") == [10.0, 10.0]  # both ranks' counters (5 + 5), state kept between commands
    assert pool.send("step") == [12.0, 12.0]
    with pytest.raises(SpawnError, match="rank 1 failed") as failure:
        pool.send("fail")
    assert "RuntimeError: rank 1 was told to fail" in failure.value.failures[0].message
    pool.close()  # the pool has ended with the failure: nothing left to stop, no second error


def test_results_come_back_in_rank_order():
    assert spawn(_rank_and_sum, 2, 0.5) == [(0, 2.0), (1, 2.0)]


def test_a_rank_that_raises_fails_the_run_with_its_traceback():
    with pytest.raises(SpawnError, match=r"rank 1 failed") as info:
        spawn(_fail_mid_step, 2, "raise", timeout_s=TIMEOUT_S)
    first, *others = info.value.failures
    assert first.rank == 1 and "RuntimeError: rank 1 gave up at step 1" in first.message
    assert "_fail_mid_step" in first.message  # the traceback, not only the message
    assert [f.rank for f in others] == [0]  # rank 0 failed too (its collective broke), it was not left hanging
    assert "killed" not in others[0].message


def test_a_rank_that_exits_fails_the_others_instead_of_hanging_them():
    with pytest.raises(SpawnError, match=r"rank 1 failed") as info:
        spawn(_fail_mid_step, 2, "exit", timeout_s=TIMEOUT_S)
    first, *others = info.value.failures
    assert first.message == "process exited with code 3 before replying"
    assert [f.rank for f in others] == [0]
    assert "Traceback" in others[0].message and "killed" not in others[0].message


@pytest.mark.slow  # waits out a 2 s collective timeout on purpose
def test_a_stalled_rank_times_out_its_peers_and_is_killed():
    with pytest.raises(SpawnError, match=r"rank 0 failed") as info:
        spawn(_fail_mid_step, 2, "stall", timeout_s=2)
    first, second = info.value.failures
    assert first.rank == 0 and "Timed out" in first.message
    assert second.rank == 1 and "killed" in second.message


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True], ids=repr)
def test_world_size_must_be_a_positive_int(world_size):
    with pytest.raises(ValueError, match=rf"world_size must be a positive int, got {world_size!r}"):
        spawn(_rank_and_sum, world_size, 0.0)


def test_bad_backend_timeout_and_fn_are_named():
    with pytest.raises(ValueError, match=r"backend must be one of \('gloo', 'nccl'\), got 'mpi'"):
        spawn(_rank_and_sum, 2, 0.0, backend="mpi")
    with pytest.raises(ValueError, match=r"timeout_s must be a positive number, got 0"):
        spawn(_rank_and_sum, 2, 0.0, timeout_s=0)
    with pytest.raises(TypeError, match=r"fn must be callable, got int"):
        spawn(3, 2)


def test_under_torchrun_the_world_size_must_match(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"world_size must match torchrun's WORLD_SIZE=2, got 4"):
        spawn(_rank_and_sum, 4, 0.0)


def test_train_zero_cli_reports_every_rank_against_the_formula(capsys):
    from impl.distributed.train_zero import main

    main(["--stage", "3", "--world-size", "2", "--steps", "3", "--width", "8", "--layers", "1", "--batch", "4"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rank ")]
    assert [line.split(":")[0] for line in lines] == ["rank 0", "rank 1"]
    assert all("(paper: 8.000, padding 1 elements)" in line for line in lines)
