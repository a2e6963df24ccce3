"""The rank processes of one launch (see `impl.distributed.launch` for what they promise): each rank's body,
its lifeline to the caller, and `Ranks`, which starts them and turns what they report into events ordered by
when they happened."""

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


def set_device(backend: str, local_rank: int) -> None:
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
        set_device(backend, rank)
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


def context(start_method: str):
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


class Ranks:
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
        ctx = context(method)
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

    def ordered_failures(self) -> list[RankFailure]:
        """The failures, first first. The caller learns that a rank ended without a word some time after it did; a
        failing peer that found it exiting places it just before that peer's own failure."""
        for failure in self.failures:
            if failure.rank in self.seen_gone:
                failure.at = min(failure.at, math.nextafter(self.seen_gone[failure.rank], -math.inf))
        return sorted(self.failures, key=lambda f: f.at)

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
