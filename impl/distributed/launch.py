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
ranks alive between calls for benchmarks, with the same guarantees per call.
"""

import contextlib
import datetime
import math
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from impl.common.checks import check_one_of, check_positive_int, check_positive_number

BACKENDS = ("gloo", "nccl")
START_METHODS = ("forkserver", "spawn")
_HOST = "127.0.0.1"
# Imported once by the fork server, so that ranks do not each pay for them (torch._dynamo comes with the first
# optimizer; the rest are what data-parallel references need).
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.optim", "torch.nn.parallel"]
_ORPHANED = 70  # exit code of a rank whose caller is gone
_PIDS_KEY = "impl.launch/pids"  # in the store: every rank's pid, set once all have started
_PF_EXITING = 0x4  # Linux's task flag set first thing when a process exits, before its descriptors are closed
_EXIT_WAIT_S = 5.0  # how long a rank that has replied or closed its pipe gets to finish exiting


@dataclass
class RankFailure:
    rank: int
    message: str  # the rank's traceback, or how its process ended when it could not say
    at: float = 0.0  # time.monotonic() when it happened; the clock is shared by every process of the machine


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


def _set_device(backend: str, local_rank: int) -> None:
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _die_with_caller(lifeline) -> None:
    """Exit this rank once the caller is gone: the caller holds the only write end of `lifeline`, so the kernel
    closes it when the caller ends, however it ends, and the read below returns."""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv_bytes()
        os._exit(_ORPHANED)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _exiting(pid: int) -> bool:
    """True once process `pid` has begun to exit (read from Linux's /proc; elsewhere never known, so False)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # reaped already, or no /proc at all
        return Path("/proc/self/stat").exists()
    except OSError:
        return False
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def _peers_gone(store, rank: int) -> list[int]:
    """The peers that have begun to exit by now. A peer whose exit broke this rank's collective had begun before
    the break (its sockets close long after the flag is set), so it is found here."""
    try:
        if not store.check([_PIDS_KEY]):
            return []
        pids = [int(pid) for pid in store.get(_PIDS_KEY).split()]
    except Exception:  # the store is part of what failed: the timestamps alone will order the failures
        return []
    return [peer for peer, pid in enumerate(pids) if peer != rank and _exiting(pid)]


def _worker(rank, world_size, port, backend, timeout_s, fn, args, conn, lifeline) -> None:
    """Body of one rank: join the group, run fn, send back (status, result or traceback, when it happened, the
    peers that had already begun to exit by then)."""
    _die_with_caller(lifeline)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    try:
        _set_device(backend, rank)
        if backend == "gloo":  # share the cores out, as torchrun's OMP_NUM_THREADS=1 does: oversubscribed
            torch.set_num_threads(max(1, _cores() // world_size))  # thread pools spin and run 10x slower
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args)
        reply = ("ok", result, time.monotonic(), [])
    except BaseException:  # the caller re-raises it; swallowing SystemExit/KeyboardInterrupt here is deliberate
        failed_at = time.monotonic()  # first: the order of failures across ranks is the diagnosis
        gone = [] if store is None else _peers_gone(store, rank)
        reply = ("error", traceback.format_exc(), failed_at, gone)
    try:
        conn.send_bytes(pickle.dumps(reply))  # plain pickle: tensors travel by value, not as shared memory
    except Exception:
        reply = ("error", "result could not be sent back:\n" + traceback.format_exc(), time.monotonic(), [])
        conn.send_bytes(pickle.dumps(reply))
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


def _how_it_ended(proc) -> str:
    proc.join(_EXIT_WAIT_S)  # its pipe is closed, so it is exiting; the exit code follows within moments
    code = proc.exitcode
    if code is None:
        return "closed its result pipe without replying"
    if code >= 0:
        return f"process exited with code {code} before replying"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"process was killed by {name} before replying"


class _Ranks:
    """The processes of one launch, and what they report as events (status, rank, payload, when it happened),
    each delivered by a reader thread the moment it arrives."""

    def __init__(self, world_size: int, target: Callable[[int], tuple], backend: str, timeout_s: float, method: str):
        self.timeout_s = timeout_s
        self.events: queue.Queue = queue.Queue()
        self.procs, self.results, self.failures, self.ended = [], {}, [], set()
        self.seen_gone: dict[int, float] = {}  # rank -> earliest time a failing peer found it already ended
        self.threads: list[threading.Thread] = []
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(_HOST, 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
        ctx = _context(method)
        lifeline, self.lifeline = ctx.Pipe(duplex=False)
        try:
            for rank in range(world_size):
                recv, send = ctx.Pipe(duplex=False)
                fn, args = target(rank)
                worker_args = (rank, world_size, self.store.port, backend, timeout_s, fn, args, send, lifeline)
                proc = ctx.Process(target=_worker, args=worker_args, daemon=True)
                proc.start()
                send.close()
                self.procs.append(proc)
                self.watch(self._read_result, rank, recv)
            self.store.set(_PIDS_KEY, " ".join(str(proc.pid) for proc in self.procs))
        except BaseException:
            self.close()
            raise
        finally:
            lifeline.close()  # the ranks hold it now; the caller keeps only the write end

    def watch(self, body: Callable, rank: int, conn) -> None:
        thread = threading.Thread(target=body, args=(rank, conn), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _read_result(self, rank: int, conn) -> None:
        try:
            status, payload, at, gone = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the kernel closed the rank's end: its process has ended without a word
            status, payload, at, gone = "ended", None, time.monotonic(), []
        except Exception:
            status, payload, at, gone = "error", "result unreadable:\n" + traceback.format_exc(), time.monotonic(), []
        conn.close()
        for peer in gone:
            self.seen_gone[peer] = min(at, self.seen_gone.get(peer, at))
        self.events.put((status, rank, payload, at))

    def next_event(self, deadline: float | None) -> tuple | None:
        """The next event, or None once `deadline` (on time.monotonic()) has passed."""
        try:
            return self.events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def record(self, event: tuple) -> None:
        """Note how a rank ended: its result, or a failure stamped with the time it happened."""
        status, rank, payload, at = event
        self.ended.add(rank)
        if status == "ok":
            self.results[rank] = payload
        else:
            message = _how_it_ended(self.procs[rank]) if status == "ended" else payload
            self.failures.append(RankFailure(rank, message, at))

    def error(self) -> SpawnError:
        """The failures as one error. The caller learns that a rank ended without a word some time after it did; a
        failing peer that found it exiting places it just before that peer's own failure."""
        for failure in self.failures:
            if failure.rank in self.seen_gone:
                failure.at = min(failure.at, math.nextafter(self.seen_gone[failure.rank], -math.inf))
        return SpawnError(self.failures)

    def kill_running(self, reason: str, spare: frozenset = frozenset()) -> None:
        """Kill every rank that has not ended (but those in `spare`), each recorded as a failure for `reason`."""
        for rank, proc in enumerate(self.procs):
            if rank not in self.ended and rank not in spare:
                proc.kill()
                self.ended.add(rank)
                self.failures.append(RankFailure(rank, reason, time.monotonic()))

    def wait_all(self, deadline: float | None = None, why: str = "") -> None:
        """Wait until every rank has ended. Ending counts as a collective: once one rank has ended, the others get
        `timeout_s` to follow. Whoever is still running at that point, or at `deadline`, is killed."""
        first = None  # (when, rank, how) of the first rank that ended
        while len(self.ended) < len(self.procs):
            straggle = None if first is None else first[0] + self.timeout_s
            limit = min((d for d in (deadline, straggle) if d is not None), default=None)
            event = self.next_event(limit)
            if event is None:
                if straggle is not None and (deadline is None or straggle <= deadline):
                    why = f"still running {self.timeout_s:g}s after rank {first[1]} {first[2]}; killed"
                self.kill_running(why)
                return
            if event[0] == "reply":  # a pool's answer to a command, no longer awaited
                continue
            self.record(event)
            if first is None:
                first = (event[3], event[1], "returned" if event[0] == "ok" else "failed")

    def close(self) -> None:
        """Let go of the ranks: any still running exits on its own once the lifeline closes, or is killed."""
        self.lifeline.close()
        deadline = time.monotonic() + _EXIT_WAIT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for thread in self.threads:
            thread.join(_EXIT_WAIT_S)
        self.store = None


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
    ranks = _Ranks(world_size, lambda rank: (fn, args), backend, timeout_s, start_method)
    try:
        ranks.wait_all(deadline, f"still running at join_timeout_s={join_timeout_s:g}; killed" if deadline else "")
    finally:
        ranks.close()
    if ranks.failures:
        raise ranks.error()
    return [ranks.results[rank] for rank in range(world_size)]


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


class RankPool:
    """Ranks kept alive in the background and driven from this process, so a benchmark can time steps here.

    Each rank runs `serve(rank, world_size, conn, *args)`: it sends one reply once it is ready, then answers every
    command it receives on `conn` with one reply until the command is "stop". Every call waits at most
    `timeout_s` for the replies; a rank that fails, is killed or does not reply in time ends the pool and raises
    `SpawnError` here, the first failure first, as `spawn` does.
    """

    def __init__(self, serve: Callable, world_size: int, *args, backend: str = "gloo", timeout_s: float = 60.0):
        _check(serve, world_size, backend, timeout_s, "forkserver")
        pipes = [_context("forkserver").Pipe() for _ in range(world_size)]
        self.conns = [ours for ours, _ in pipes]
        self.timeout_s = timeout_s
        self._closed = False
        own_end = lambda rank: (serve, (pipes[rank][1], *args))  # each rank gets only its own end
        self._ranks = _Ranks(world_size, own_end, backend, timeout_s, "forkserver")
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
                raise self._ranks.error()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RankPool: the pool has ended (closed, or a rank failed); start a new one")

    def _fail(self) -> None:
        self._shut(f"still running {self.timeout_s:g}s after the first failure; killed")
        raise self._ranks.error()

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
