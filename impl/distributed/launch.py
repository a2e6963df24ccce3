"""Launching a function on every rank of a process group, the way `torchrun` does, from inside Python.

`spawn(fn, world_size)` starts `world_size` processes, joins them into one process group over a store that the
caller holds (the store listens on a port the OS picks, so no port is ever hard-coded or raced for), runs
`fn(rank, world_size, *args)` in each and returns the per-rank results. Under `torchrun` (RANK / WORLD_SIZE in
the environment) the same call joins the group torchrun set up and runs `fn` in the current process only.

What the launcher promises, and how:
- **Nothing waits forever.** Every collective carries `timeout_s`. Ending counts as a collective too: once one
  rank has returned or failed, the others must end within `timeout_s` or are killed and named, so a rank that
  hangs outside any collective cannot hang the run. `join_timeout_s` (default: none) bounds the whole call.
- **The cause comes first.** `SpawnError.failures` is ordered by when each failure happened, on the monotonic
  clock that all processes of a machine share. A rank that raises stamps its error when it catches it. A rank
  that ends without a word (exit, signal, crash) is stamped when a reader thread in the caller sees its result
  pipe close, which can be after its peers already failed because of it; so a failing rank also reports which
  peers had begun to exit by then (Linux's PF_EXITING flag, read from /proc), and such a peer is placed just
  before it. `SpawnError.rank` is the rank whose failure started it all, not a peer that saw a gloo error.
- **Nothing outlives the caller.** Each rank holds the read end of a "lifeline" pipe whose only write end the
  caller holds. However the caller ends (return, exception, SIGTERM, SIGINT, SIGKILL), the kernel closes that
  end, the read in a watcher thread of every rank returns, and the rank exits. The fork server then exits on
  its own: it lives while any process holds its "alive" pipe, which are the caller and the ranks. (A rank stuck
  in C code that holds the GIL cannot run its watcher; torch's collectives and kernels release it.)

Children start from a fork server that has imported torch once, so a run pays torch's import time once per
session rather than once per rank (`start_method="spawn"` is the slow, plain alternative). `RankPool` keeps
ranks alive between calls for benchmarks, with the same guarantees per call. The processes themselves (each
rank's body, its lifeline, the events they report) live in `impl.distributed.processes`.
"""

import contextlib
import datetime
import os
import time
from collections.abc import Callable

import torch.distributed as dist

from impl.common.checks import check_one_of, check_positive_int, check_positive_number
from impl.distributed.processes import RankFailure, Ranks, context, set_device

BACKENDS = ("gloo", "nccl")
START_METHODS = ("forkserver", "spawn")
__all__ = ["RankFailure", "RankPool", "SpawnError", "spawn", "under_torchrun"]


class SpawnError(RuntimeError):
    """One or more ranks failed; `failures` lists them in the order they happened, so `rank` is the cause."""

    def __init__(self, failures: list[RankFailure]):
        self.failures = sorted(failures, key=lambda f: f.at)
        self.rank = self.failures[0].rank
        parts = [f"--- rank {f.rank} ---\n{f.message}" for f in self.failures]
        super().__init__(f"rank {self.rank} failed ({len(failures)} rank(s) in all)\n" + "\n".join(parts))


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _check(fn, world_size, backend, timeout_s, start_method, join_timeout_s=None) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    check_positive_int("world_size", world_size)
    check_one_of("backend", backend, BACKENDS)
    check_positive_number("timeout_s", timeout_s)
    check_one_of("start_method", start_method, START_METHODS)
    if join_timeout_s is not None:
        check_positive_number("join_timeout_s", join_timeout_s)


def spawn(
    fn: Callable,
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout_s: float = 30.0,
    start_method: str = "forkserver",
    join_timeout_s: float | None = None,
) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; return the results in rank order.

    `fn` and `args` must be picklable (a module-level function). `timeout_s` limits every collective and how
    long ranks may keep running after the first one returned or failed; `join_timeout_s` limits the whole call.
    Any rank failing, hanging past those limits or being killed raises `SpawnError`, the first failure first.
    Under torchrun, `fn` runs in this process as its rank and the list holds that one result.
    """
    _check(fn, world_size, backend, timeout_s, start_method, join_timeout_s)
    if under_torchrun():
        return [_run_under_torchrun(fn, world_size, args, backend, timeout_s)]
    deadline = None if join_timeout_s is None else time.monotonic() + join_timeout_s
    ranks = Ranks(world_size, lambda rank: (fn, args), backend, timeout_s, start_method)
    try:
        ranks.wait_all(deadline, f"still running at join_timeout_s={join_timeout_s:g}; killed" if deadline else "")
    finally:
        ranks.close()
    if ranks.failures:
        raise SpawnError(ranks.ordered_failures())
    return [ranks.results[rank] for rank in range(world_size)]


def _run_under_torchrun(fn: Callable, world_size: int, args: tuple, backend: str, timeout_s: float):
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise ValueError(f"world_size must match torchrun's WORLD_SIZE={env_world}, got {world_size}")
    rank = int(os.environ["RANK"])
    set_device(backend, int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


class RankPool:
    """Ranks kept alive in the background and driven from this process, so a benchmark can time steps here.

    Each rank runs `serve(rank, world_size, conn, *args)`: it sends one reply once it is ready, then answers every
    command it receives on `conn` with one reply until the command is "stop". Every call waits at most
    `timeout_s` for the replies; a rank that fails, is killed or does not reply in time ends the pool and raises
    `SpawnError` here, the first failure first, as `spawn` does.
    """

    def __init__(self, serve: Callable, world_size: int, *args, backend: str = "gloo", timeout_s: float = 60.0):
        _check(serve, world_size, backend, timeout_s, "forkserver")
        pipes = [context("forkserver").Pipe() for _ in range(world_size)]
        self.conns = [ours for ours, _ in pipes]
        self.timeout_s = timeout_s
        self._closed = False
        own_end = lambda rank: (serve, (pipes[rank][1], *args))  # each rank gets only its own end
        self._ranks = Ranks(world_size, own_end, backend, timeout_s, "forkserver")
        self.processes = self._ranks.procs
        for rank, (ours, theirs) in enumerate(pipes):
            theirs.close()
            self._ranks.watch(self._relay, rank, ours)
        try:
            self.ready = self.replies()
        except BaseException:  # SpawnError has shut the pool already; an interrupt lets go at once
            self._shut("", wait=False)
            raise

    def _relay(self, rank: int, conn) -> None:
        """Reader thread of one rank's command pipe: every reply becomes an event."""
        while True:
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                return
            self._ranks.events.put(("reply", rank, reply, time.monotonic()))

    def replies(self) -> list:
        """One reply from every rank, in rank order."""
        self._check_open()
        deadline = time.monotonic() + self.timeout_s
        got = {}
        while len(got) < len(self.conns):
            event = self._ranks.next_event(deadline)
            if event is None:
                self._ranks.kill_running(f"no reply within {self.timeout_s:g}s; killed", spare=frozenset(got))
                self._fail()
            status, rank, payload, at = event
            if status == "reply":
                got[rank] = payload
                continue
            self._ranks.record(event)
            if status == "ok":
                self._ranks.failures.append(RankFailure(rank, "serve returned without replying", at))
            self._fail()
        return [got[rank] for rank in range(len(self.conns))]

    def send(self, command: str) -> list:
        """Send `command` to every rank and return their replies."""
        self._check_open()
        for conn in self.conns:
            conn.send(command)
        return self.replies()

    def close(self) -> None:
        """Stop every rank; raises `SpawnError` if one failed on the way. Does nothing once the pool has ended."""
        if not self._closed:
            self._shut(f"still running {self.timeout_s:g}s after stop; killed")
            if self._ranks.failures:
                raise SpawnError(self._ranks.ordered_failures())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RankPool: the pool has ended (closed, or a rank failed); start a new one")

    def _fail(self) -> None:
        self._shut(f"still running {self.timeout_s:g}s after the first failure; killed")
        raise SpawnError(self._ranks.ordered_failures())

    def _shut(self, why: str, wait: bool = True) -> None:
        """Ask the ranks still serving to stop, give them `timeout_s`, kill the rest, release everything."""
        if self._closed:
            return
        self._closed = True
        try:
            if wait:
                for rank, conn in enumerate(self.conns):
                    if rank not in self._ranks.ended:
                        with contextlib.suppress(OSError):
                            conn.send("stop")
                self._ranks.wait_all(time.monotonic() + self.timeout_s, why)
        finally:
            self._ranks.close()
            for conn in self.conns:
                conn.close()
