"""Launching a function on every rank of a process group, the way `torchrun` does, from inside Python.

`spawn(fn, world_size)` starts `world_size` processes, joins them into one process group over a store that the
caller holds (the store listens on a port the OS picks, so no port is ever hard-coded or raced for), runs
`fn(rank, world_size, *args)` in each and returns the per-rank results. Every collective carries `timeout_s`:
a rank that raises, exits or stalls makes its peers fail instead of waiting forever, and the caller gets a
`SpawnError` naming the rank and carrying its traceback. Under `torchrun` (RANK / WORLD_SIZE in the
environment) the same call joins the group torchrun set up and runs `fn` in the current process only.

Children start from a fork server that has imported torch once, so a run pays torch's import time once per
session rather than once per rank (`start_method="spawn"` is the slow, plain alternative).
"""

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
START_METHODS = ("forkserver", "spawn")
_HOST = "127.0.0.1"
# Imported once by the fork server, so that ranks do not each pay for them (torch._dynamo comes with the first
# optimizer; the rest are what data-parallel references need).
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.optim", "torch.nn.parallel"]


@dataclass
class RankFailure:
    rank: int
    message: str  # the rank's traceback, or how its process ended when it could not say


class SpawnError(RuntimeError):
    """One or more ranks failed; `failures` lists them in the order the caller saw them, the cause first."""

    def __init__(self, failures: list[RankFailure]):
        self.failures = failures
        self.rank = failures[0].rank
        parts = [f"--- rank {f.rank} ---\n{f.message}" for f in failures]
        super().__init__(f"rank {self.rank} failed ({len(failures)} rank(s) in all)\n" + "\n".join(parts))


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _check(fn: Callable, world_size: int, backend: str, timeout_s: float, start_method: str) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")


def _set_device(backend: str, local_rank: int) -> None:
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker(rank, world_size, port, backend, timeout_s, fn, args, conn) -> None:
    """Body of one spawned rank: join the group, run fn, send back ("ok", result) or ("error", traceback)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        _set_device(backend, rank)
        if backend == "gloo":  # share the cores out, as torchrun's OMP_NUM_THREADS=1 does: oversubscribed
            torch.set_num_threads(max(1, _cores() // world_size))  # thread pools spin and run 10x slower
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        reply = ("ok", fn(rank, world_size, *args))
    except BaseException:  # the caller re-raises it; swallowing SystemExit/KeyboardInterrupt here is deliberate
        reply = ("error", traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(reply))  # plain pickle: tensors travel by value, not as shared memory
    except Exception:
        conn.send_bytes(pickle.dumps(("error", "result could not be sent back:\n" + traceback.format_exc())))
    if dist.is_initialized():
        dist.destroy_process_group()
    conn.close()
    if reply[0] != "ok":
        sys.exit(1)


def _context(start_method: str):
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    return ctx


def spawn(
    fn: Callable,
    world_size: int,
    *args,
    backend: str = "gloo",
    timeout_s: float = 30.0,
    start_method: str = "forkserver",
) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; return the results in rank order.

    `fn` and `args` must be picklable (a module-level function). Any rank failing raises `SpawnError` within
    `timeout_s` (each collective's limit) plus the time ranks take to exit; stragglers are then killed.
    Under torchrun, `fn` runs in this process as its rank and the list holds that one result.
    """
    _check(fn, world_size, backend, timeout_s, start_method)
    if under_torchrun():
        return [_run_under_torchrun(fn, world_size, args, backend, timeout_s)]

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(_HOST, 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
    ctx = _context(start_method)
    procs, conns = [], []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker, args=(rank, world_size, store.port, backend, timeout_s, fn, args, send), daemon=True
        )
        proc.start()
        send.close()
        procs.append(proc)
        conns.append(recv)
    try:
        results, failures = _collect(procs, conns, timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        del store
    if failures:
        raise SpawnError(failures)
    return [results[rank] for rank in range(world_size)]


def _collect(procs, conns, grace_s: float) -> tuple[dict, list[RankFailure]]:
    """Wait for every rank's reply and exit. After the first failure the others get `grace_s` to finish (a
    collective waiting on the failed rank times out by then); ranks still running after that are killed."""
    results, failures = {}, []
    unread = set(range(len(procs)))
    running = {proc.sentinel: rank for rank, proc in enumerate(procs)}

    def read(rank: int) -> None:
        unread.discard(rank)
        try:
            status, payload = pickle.loads(conns[rank].recv_bytes())
        except (EOFError, OSError):  # ended without a word; its exit code tells the rest
            return
        if status == "ok":
            results[rank] = payload
        else:
            failures.append(RankFailure(rank, payload))

    deadline = None
    while running:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait([conns[r] for r in unread] + list(running), timeout=left)
        if not ready:
            stuck = [r for r in running.values() if r not in results]
            failures += [RankFailure(r, f"still running {grace_s}s after the first failure; killed") for r in stuck]
            break
        for obj in ready:
            rank = running.pop(obj) if obj in running else conns.index(obj)
            if rank in unread:
                read(rank)
            ended = obj is procs[rank].sentinel
            if ended and rank not in results and all(f.rank != rank for f in failures):
                failures.append(RankFailure(rank, f"process exited with code {procs[rank].exitcode} before replying"))
        if failures and deadline is None:
            deadline = time.monotonic() + grace_s
    return results, failures


def _run_under_torchrun(fn: Callable, world_size: int, args: tuple, backend: str, timeout_s: float):
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise ValueError(f"world_size must match torchrun's WORLD_SIZE={env_world}, got {world_size}")
    rank = int(os.environ["RANK"])
    _set_device(backend, int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _pool_rank(rank: int, world_size: int, serve: Callable, conns: list, args: tuple) -> None:
    serve(rank, world_size, conns[rank], *args)


class RankPool:
    """Ranks kept alive in the background and driven from this process, so a benchmark can time steps here.

    Each rank runs `serve(rank, world_size, conn, *args)`: it sends one reply once it is ready, then answers every
    command it receives on `conn` with one reply until the command is "stop". A rank that fails raises here
    (with its traceback, through `spawn`) instead of leaving the caller waiting.
    """

    def __init__(self, serve: Callable, world_size: int, *args, backend: str = "gloo", timeout_s: float = 60.0):
        import threading

        pipes = [_context("forkserver").Pipe() for _ in range(world_size)]
        self.conns = [ours for ours, _ in pipes]
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        target = (_pool_rank, world_size, serve, [theirs for _, theirs in pipes], args)
        self.thread = threading.Thread(target=self._run, args=(target, backend), daemon=True)
        self.thread.start()
        self.ready = self.replies()

    def _run(self, target: tuple, backend: str) -> None:
        try:
            spawn(*target, backend=backend, timeout_s=self.timeout_s)
        except BaseException as err:  # raised again in the caller's thread by replies() and close()
            self.error = err

    def replies(self) -> list:
        """One reply from every rank, in rank order."""
        out = []
        for conn in self.conns:
            while not conn.poll(0.5):
                if self.error is not None or not self.thread.is_alive():
                    raise RuntimeError("a rank failed before replying") from self.error
            out.append(conn.recv())
        return out

    def send(self, command: str) -> list:
        """Send `command` to every rank and return their replies."""
        for conn in self.conns:
            conn.send(command)
        return self.replies()

    def close(self) -> None:
        for conn in self.conns:
            conn.send("stop")
        self.thread.join(self.timeout_s)
        if self.error is not None:
            raise self.error
