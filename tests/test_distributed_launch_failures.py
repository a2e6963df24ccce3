"""The launcher under failure: a rank that hangs outside any collective is named and killed, the rank that
ended first is named as the cause, and nothing the launcher started outlives its caller, however it ends."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from impl.distributed import spawn
from impl.distributed.launch import RankPool, SpawnError

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

TIMEOUT_S = 10
REPO = Path(__file__).resolve().parents[1]


def _hang_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(3600)  # outside any collective: no peer is waiting on it, so no collective times out
    return rank


def _hang_everywhere(rank: int, world_size: int) -> None:
    time.sleep(3600)


def _die_in_a_collective(rank: int, world_size: int, dying: int, how: str) -> None:
    """Every rank joins all-reduces; `dying` ends its process between two of them, the others are its victims."""
    for step in range(3):
        if step == 1 and rank == dying:
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(torch.ones(1))


def test_a_rank_hanging_outside_a_collective_is_named_and_killed():
    start = time.monotonic()
    with pytest.raises(SpawnError, match=r"rank 1 failed") as info:
        spawn(_hang_on_rank_1, 2, timeout_s=2)
    assert [f.rank for f in info.value.failures] == [1]
    assert "still running 2s after rank 0 returned; killed" in info.value.failures[0].message
    assert time.monotonic() - start < 60  # bounded by timeout_s, not by the hour the rank sleeps


def test_join_timeout_bounds_the_whole_call():
    with pytest.raises(SpawnError, match=r"rank 0 failed \(2 rank\(s\) in all\)") as info:
        spawn(_hang_everywhere, 2, timeout_s=TIMEOUT_S, join_timeout_s=1)
    assert all("still running at join_timeout_s=1; killed" in f.message for f in info.value.failures)


@pytest.mark.parametrize("join_timeout_s", [0, -1.0, float("nan"), "5"], ids=repr)
def test_join_timeout_must_be_a_positive_number(join_timeout_s):
    with pytest.raises(ValueError, match=r"join_timeout_s must be a positive number, got"):
        spawn(_hang_on_rank_1, 2, join_timeout_s=join_timeout_s)


@pytest.mark.parametrize(
    ("world_size", "dying", "how"),
    [(2, 1, "exit"), (2, 1, "kill"), (4, 2, "exit"), (4, 3, "kill")],
    ids=["2-ranks-exit", "2-ranks-sigkill", "4-ranks-exit", "4-ranks-sigkill"],
)
def test_the_cause_is_the_rank_that_ended_first_not_a_victim(world_size, dying, how):
    for _ in range(3):  # the victims' gloo errors race the cause's exit: one lucky ordering proves nothing
        with pytest.raises(SpawnError) as info:
            spawn(_die_in_a_collective, world_size, dying, how, timeout_s=TIMEOUT_S)
        first, *victims = info.value.failures
        assert info.value.rank == first.rank == dying
        expected = "exited with code 3" if how == "exit" else "was killed by SIGKILL"
        assert first.message == f"process {expected} before replying"
        assert sorted(f.rank for f in victims) == sorted(set(range(world_size)) - {dying})
        assert [f.at for f in info.value.failures] == sorted(f.at for f in info.value.failures)


def _pool_serve(rank: int, world_size: int, conn) -> None:
    """A RankPool server: "hang" makes rank 1 sleep without replying, "die" makes it exit; others reply."""
    conn.send(rank)
    while (command := conn.recv()) != "stop":
        if rank == 1 and command == "hang":
            time.sleep(3600)
        if rank == 1 and command == "die":
            os._exit(5)
        conn.send(command)


@pytest.mark.parametrize("command", ["hang", "die"])
def test_a_pool_call_fails_naming_the_rank_that_hung_or_died(command):
    pool = RankPool(_pool_serve, 2, timeout_s=5)
    try:
        assert pool.ready == [0, 1]
        assert pool.send("echo") == ["echo", "echo"]
        with pytest.raises(SpawnError, match=r"rank 1 failed") as info:
            pool.send(command)
        expected = "no reply within 5s; killed" if command == "hang" else "process exited with code 5 before replying"
        assert info.value.failures[0].message == expected
        with pytest.raises(RuntimeError, match="the pool has ended"):
            pool.send("echo")
    finally:
        pool.close()  # after a failure: nothing left to stop, and no second error
    assert all(not proc.is_alive() for proc in pool.processes)


_CALLER = """
import os, sys, time
from impl.distributed import spawn
from impl.distributed.launch import RankPool

def record_and_sleep(rank, world_size, folder):
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}")  # the rank and the fork server it came from
    time.sleep(3600)

def serve(rank, world_size, conn, folder):
    record_and_sleep(rank, world_size, folder)

if __name__ == "__main__":
    if sys.argv[1] == "spawn":
        spawn(record_and_sleep, 2, sys.argv[2], timeout_s=600)
    else:
        RankPool(serve, 2, sys.argv[2], timeout_s=600)
"""


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by a PID 1 that may never reap) counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow  # each case starts a fresh interpreter and fork server
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
@pytest.mark.parametrize(
    ("how", "sig"),  # SIGTERM and SIGKILL end the caller without running its code, SIGINT through its cleanup
    [
        ("spawn", signal.SIGTERM),
        ("spawn", signal.SIGINT),
        ("spawn", signal.SIGKILL),
        ("pool", signal.SIGINT),
        ("pool", signal.SIGKILL),
    ],
    ids=lambda value: getattr(value, "name", value),
)
def test_nothing_outlives_the_caller(tmp_path, how, sig):
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(_CALLER))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    caller = subprocess.Popen([sys.executable, str(script), how, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    pids = set()
    try:
        records = [tmp_path / f"rank{rank}" for rank in range(2)]
        deadline = time.monotonic() + 60
        while not all(r.exists() and r.read_text() for r in records):
            assert caller.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        pids = {int(pid) for r in records for pid in r.read_text().split()}  # both ranks and the fork server
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
        caller.send_signal(sig)
        caller.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        if caller.poll() is None:
            caller.kill()
        caller.wait(timeout=30)
        caller.stderr.close()
        for pid in [pid for pid in pids if _alive(pid)]:  # a failed run leaves no sleepers behind
            os.kill(pid, signal.SIGKILL)
