"""``shmpool bench``: shmpool and its peers measured side by side, in one run.

Machines here are shared and noisy, so absolute times drift; what we report
are medians over interleaved trials (every trial runs every case once, in a
shuffled order, so drift hits all cases alike) and ratios between cases of
the same run. Each trial of a case is a timed loop long enough to dwarf the
timer; the per-operation time is the loop time divided by its iterations.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import multiprocessing as mp
import os
import platform
import random
import resource
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from multiprocessing.managers import SharedMemoryManager
from typing import Any, NamedTuple

import msgpack
import posix_ipc

from . import protocol as p
from .buffer import Lease
from .client import Pool
from .embedded import start
from .errors import PoolExhaustedError
from .sizeclass import format_size

__all__ = ["run"]

SIZES = (256, 4 << 10, 64 << 10, 1 << 20, 16 << 20)
PAGE = 4096
_perf = time.perf_counter_ns

#: A timed loop: given an iteration count, run and return elapsed nanoseconds.
Loop = Callable[[int], int]


def _touch(view: Any, n: int) -> None:
    """Write one byte in every page, the cheapest way to fault each page in."""
    view[::PAGE] = b"\x01" * ((n + PAGE - 1) // PAGE)


# ------------------------------------------------------------------ the cases


def _case_slice(mv: memoryview, n: int) -> Loop:
    def loop(iters: int) -> int:
        t = _perf()
        for _ in range(iters):
            mv[0:n]
        return _perf() - t

    return loop


def _case_acquire_release(pool: Pool, n: int) -> Loop:
    acquire = pool.acquire
    acquire(n).release()

    def loop(iters: int) -> int:
        t = _perf()
        for _ in range(iters):
            acquire(n).release()
        return _perf() - t

    return loop


def _case_acquire_write_release(pool: Pool, n: int) -> Loop:
    acquire = pool.acquire

    def loop(iters: int) -> int:
        t = _perf()
        for _ in range(iters):
            lease = acquire(n)
            _touch(lease.view, n)
            lease.release()
        return _perf() - t

    return loop


def _case_cold(pool: Pool, n: int) -> Loop:
    """Every slot comes from the manager: take a batch, give it all back, repeat."""
    acquire = pool.acquire
    index = max(0, (n - 1).bit_length() - (pool.min_size.bit_length() - 1))
    batch = pool._max_batch[index]

    def loop(iters: int) -> int:
        rounds = max(1, iters // batch)
        t = _perf()
        for _ in range(rounds):
            leases = [acquire(n) for _ in range(batch)]
            for lease in leases:
                lease.release()
            pool.trim()
        return (_perf() - t) * iters // (rounds * batch)

    return loop


def _case_bytearray(n: int, touch: bool) -> Loop:
    def loop(iters: int) -> int:
        t = _perf()
        if touch:
            for _ in range(iters):
                _touch(bytearray(n), n)
        else:
            for _ in range(iters):
                bytearray(n)
        return _perf() - t

    return loop


def _case_shared_memory(n: int, touch: bool) -> Loop:
    def loop(iters: int) -> int:
        t = _perf()
        for _ in range(iters):
            shm = shared_memory.SharedMemory(create=True, size=n)
            if touch:
                _touch(shm.buf, n)
            shm.close()
            shm.unlink()
        return _perf() - t

    return loop


def _case_posix_ipc(n: int) -> Loop:
    def loop(iters: int) -> int:
        t = _perf()
        for _ in range(iters):
            shm = posix_ipc.SharedMemory(
                f"/shmpool.bench.{os.getpid()}.{secrets.token_hex(4)}", posix_ipc.O_CREX, size=n
            )
            mm = mmap.mmap(shm.fd, n)
            shm.close_fd()
            mm.close()
            shm.unlink()
        return _perf() - t

    return loop


def _case_smm(n: int) -> Loop:
    def loop(iters: int) -> int:
        done = min(iters, 20)  # each segment lives until its manager shuts down
        # Its server process comes from the forkserver (3.14's default): the
        # bench's own threads (a queue's feeder) make a plain fork unsafe.
        with SharedMemoryManager(ctx=mp.get_context("forkserver")) as smm:
            t = _perf()
            for _ in range(done):
                smm.SharedMemory(n).close()
            elapsed = _perf() - t
        return elapsed * iters // done

    return loop


def _echo_server(sock: socket.socket, theirs: socket.socket) -> None:
    # The forked child inherits the client's end too: holding it, it would
    # never see end-of-file, so the bench waited out its join, and a bench
    # killed mid-run left this process behind for good.
    theirs.close()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        msg = msgpack.unpackb(data)
        sock.send(msgpack.packb([65, msg[1], 4096, [[1, 2, 3]], []]))


def _case_socket_roundtrip(sock: socket.socket) -> Loop:
    def loop(iters: int) -> int:
        t = _perf()
        for i in range(iters):
            sock.send(msgpack.packb([2, i, 4096, 1, 0]))
            msgpack.unpackb(sock.recv(65536))
        return _perf() - t

    return loop


# ------------------------------------------------------------- handoff cases
#
# A producer (this process) hands n-byte payloads to a consumer process, which
# reads the first and last byte and lets go. At most WINDOW messages are in
# flight: the consumer acks every ACK_EVERY-th message (credit-based flow
# control), so no case can run ahead of the consumer, and the acks cost every
# case the same small share of a message.

HANDOFF_SIZES = (64 << 10, 1 << 20, 16 << 20)
WINDOW = 8
ACK_EVERY = 4


def _handoff_consumer(address: str, kind: str, conn: Any, queue: Any) -> None:
    pool = Pool(address, name="bench-consumer") if kind == "shmpool" else None
    seen = 0
    try:
        while True:
            if kind == "queue":
                msg = queue.get()
            elif kind == "pipe":
                msg = conn.recv_bytes()
            else:
                msg = conn.recv()  # a Lease (unpickling attaches it here), or the bare fields
            if msg is None or msg == b"":
                return
            if kind == "handle":
                pass  # the bare message: nothing to read behind it
            elif kind == "shmpool":
                view = msg.view
                view[0] + view[-1]
                msg.release()
            else:
                msg[0] + msg[-1]
            seen += 1
            if seen % ACK_EVERY == 0:
                conn.send_bytes(b"a")
    finally:
        if pool is not None:
            pool.close()


def _windowed(send: Callable[[], None], conn: Any) -> Loop:
    """A producer loop: ``send`` messages, at most ``WINDOW`` unacknowledged.

    It sends whole groups of ``ACK_EVERY`` (the consumer acks the last of
    each), waits for every ack, and reports the time for ``iters`` messages
    at the rate it measured.
    """

    def run(iters: int) -> int:
        total = -(-iters // ACK_EVERY) * ACK_EVERY
        inflight = 0
        t = _perf()
        for _ in range(total):
            send()
            inflight += 1
            if inflight >= WINDOW:
                conn.recv_bytes()
                inflight -= ACK_EVERY
        while inflight > 0:
            conn.recv_bytes()
            inflight -= ACK_EVERY
        return (_perf() - t) * iters // total

    return run


def _iox_service(name: str) -> tuple[Any, Any, Any, Any]:
    import ctypes

    import iceoryx2 as iox2

    iox2.set_log_level(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    service = (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_byte])
        .subscriber_max_buffer_size(2 * WINDOW)
        .open_or_create()
    )
    events = node.service_builder(iox2.ServiceName.new(name + ".event")).event().open_or_create()
    return iox2, node, service, events


def _iox_consumer(name: str, conn: Any) -> None:
    """The iceoryx2 consumer: sleeps on an iceoryx2 event (as our consumers sleep on
    a pipe; a busy-polling one would steal a core from every other case)."""
    _, _node, service, events = _iox_service(name)
    sub = service.subscriber_builder().create()
    listener = events.listener_builder().create()
    conn.send_bytes(b"ready")
    seen = 0
    while True:
        sample = sub.receive()
        if sample is None:
            listener.blocking_wait()
            continue
        data = sample.payload()
        n = data.len()
        if n == 1:
            return
        data[0] + data[n - 1]
        del data, sample
        seen += 1
        if seen % ACK_EVERY == 0:
            conn.send_bytes(b"a")


class _IoxHandoff:
    """``handoff.iceoryx2``: the same loop over an iceoryx2 publish-subscribe service."""

    kind = "iceoryx2"

    def __init__(self) -> None:
        name = f"shmpool-bench-{os.getpid()}-{secrets.token_hex(4)}"
        self.iox2, self.node, self.service, events = _iox_service(name)
        self.notifier = events.notifier_builder().create()
        self.publisher = (
            self.service.publisher_builder()
            .initial_max_slice_len(max(HANDOFF_SIZES))
            .allocation_strategy(self.iox2.AllocationStrategy.PowerOfTwo)
            .create()
        )
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_iox_consumer, args=(name, theirs))
        self.proc.start()
        theirs.close()
        if not self.conn.poll(60):
            raise RuntimeError("the iceoryx2 consumer did not start")
        self.conn.recv_bytes()

    def _send(self, n: int) -> None:
        sample = self.publisher.loan_slice_uninit(n)
        payload = sample.payload()
        payload[0] = 1
        payload[n - 1] = 1
        del payload
        sample.assume_init().send()
        self.notifier.notify()

    def loop(self, pool: Pool, n: int) -> Loop:
        return _windowed(lambda: self._send(n), self.conn)

    def close(self) -> None:
        self._send(1)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


def _iceoryx2_available() -> bool:
    try:
        import iceoryx2  # noqa: F401
    except ImportError:
        return False
    return True


class _Handoff:
    """One consumer process per kind, fed by the producer loop below."""

    def __init__(self, address: str, kind: str) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, theirs = ctx.Pipe()
        self.queue = ctx.Queue() if kind == "queue" else None
        self.proc = ctx.Process(target=_handoff_consumer, args=(address, kind, theirs, self.queue))
        self.proc.start()
        theirs.close()

    def loop(self, pool: Pool, n: int) -> Loop:
        payload = b"\x01" * n
        conn, queue = self.conn, self.queue

        def send_lease() -> None:
            lease = pool.acquire(n)
            view = lease.view
            view[0] = view[-1] = 1
            conn.send(lease)  # pickling detaches: the consumer attaches it

        if self.kind == "shmpool":
            return _windowed(send_lease, conn)
        if self.kind == "handle":
            fields = tuple(range(1, 9))  # what a pickled Lease carries, without the attach
            return _windowed(lambda: conn.send(fields), conn)
        if self.kind == "queue":
            assert queue is not None
            return _windowed(lambda: queue.put(payload), conn)
        return _windowed(lambda: conn.send_bytes(payload), conn)

    def close(self) -> None:
        if self.kind == "queue":
            assert self.queue is not None
            self.queue.put(None)
        elif self.kind == "pipe":
            self.conn.send_bytes(b"")
        else:
            self.conn.send(None)
        self.proc.join(30)
        self.conn.close()
        if self.queue is not None:
            # Its feeder thread would outlive the case: close and join it, so
            # that the bench leaves no thread of its own running.
            self.queue.close()
            self.queue.join_thread()


# ------------------------------------------------------- memory that moves
#
# The manager's budget counts committed pages, and they move to whichever
# class needs them: free slots of other classes give theirs first, then the
# clients are asked for the slots they cache. ``memory.shift`` runs phases of different size
# mixes under one budget and counts what was served and what was committed
# for it; ``memory.recommit`` prices the pages coming back; ``memory.idle``
# checks that an idle manager gives a burst's pages back to the system.

SHIFT_BUDGET = 64 << 20
SHIFT_MIN_SIZE = 4 << 10
SHIFT_MAX_SIZE = 8 << 20
SHIFT_WORKERS = 2
#: Each worker takes leases until their slots hold this share of the budget:
#: the workers hold ~70% of it together at each phase's peak.
SHIFT_SHARE = 0.35
#: The phases before the mixed one: name, the least and the largest request.
SHIFT_PHASES = (
    ("small", 4 << 10, 64 << 10),
    ("large", 512 << 10, 8 << 20),
    ("oversize", 10 << 20, 20 << 20),
)
#: The mixed phase draws every size from this range, log-uniformly (oversize too).
SHIFT_MIXED = (4 << 10, 20 << 20)
#: Target: committed at most this many times requested (and every acquire served).
SHIFT_RATIO = 2.0
#: No mixed round starts after the case ran this long (a failed acquire waits 2 s);
#: ``--quick``: 2 rounds, 3 s.
SHIFT_ROUNDS, SHIFT_SECONDS = 6, 10.0
RECOMMIT_SIZES = (64 << 10, 1 << 20)
#: The recommit case's budget: one oversize buffer this large pushes every free page out.
RECOMMIT_BUDGET = 256 << 20
#: The idle check's manager setting (seconds; half with ``--quick``), and its burst:
#: (request size, count).
IDLE_RELEASE = 1.0
IDLE_BURST = ((1 << 20, 16), (64 << 10, 64), (4 << 20, 4))
#: Target: committed falls to this share of the burst's peak ...
IDLE_LEFT = 0.05
#: ... within this many times ``idle_release``.
IDLE_WITHIN = 2.0


class Answer(NamedTuple):
    """A ``memory.shift`` worker's answer to one command."""

    acquired: int
    failed: int
    skipped: int  # requests not made after a failure
    held_bytes: int  # capacity of the slots behind its open leases
    own_bytes: int  # bytes of its open leases by its own count (``usage()``)
    seconds: float


def _capacity(n: int) -> int:
    """Bytes of the slot serving an ``n``-byte request in the shift case's manager."""
    if n > SHIFT_MAX_SIZE:
        return n  # oversize: a segment of its own, committed as asked
    return max(SHIFT_MIN_SIZE, 1 << (n - 1).bit_length())


def _draw(rng: random.Random, lo: int, hi: int, room: int, log: bool = False) -> list[int]:
    """Request sizes in ``[lo, hi]`` whose slots fill ``room`` bytes; a draw that overflows
    is skipped, and twenty in a row end the list."""
    sizes: list[int] = []
    misses = 0
    span = (math.log(lo), math.log(hi))
    while misses < 20 and room >= _capacity(lo):
        n = int(math.exp(rng.uniform(*span))) if log else rng.randint(lo, hi)
        if _capacity(n) > room:
            misses += 1
            continue
        misses = 0
        sizes.append(n)
        room -= _capacity(n)
    return sizes


def _shift_worker(address: str, conn: Any) -> None:
    """Takes and drops leases as the parent says, and answers with an ``Answer``.

    ``("take", sizes)`` acquires them (with the manager's default wait) and
    flushes this process's usage to the manager; after a failed acquire it
    skips the rest, so that each take waits out at most one wait.
    ``("drop", half)`` releases every lease held, or every other one. The
    releases go to the cache: only the manager's recalls move them on.
    """
    held: list[Lease] = []
    with Pool(address, name="bench-shift", idle_timeout=None) as pool:
        while (cmd := conn.recv()) is not None:
            what, arg = cmd
            started = time.perf_counter()
            acquired = failed = 0
            if what == "take":
                for n in arg:
                    try:
                        lease = pool.acquire(n)
                    except PoolExhaustedError:
                        failed += 1
                        break
                    lease.view[0] = lease.view[-1] = 1
                    held.append(lease)
                    acquired += 1
                pool.stats()  # sends our Usage first: the parent reads exact figures
            else:
                going, held = (held[0::2], held[1::2]) if arg else (held, [])
                for lease in going:
                    lease.release()
            held_bytes = sum(_capacity(len(lease.view)) for lease in held)
            own = pool.usage()["requested_bytes"]
            skipped = len(arg) - acquired - failed if what == "take" else 0
            elapsed = time.perf_counter() - started
            conn.send(Answer(acquired, failed, skipped, held_bytes, own, elapsed))


class _ShiftWorkers:
    """The processes of ``memory.shift``, one pipe each."""

    def __init__(self, address: str) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for _ in range(SHIFT_WORKERS):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_shift_worker, args=(address, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    def ask(self, cmds: list[tuple[str, Any]]) -> list[Answer]:
        """Give every worker its command at once; their answers, in order."""
        for conn, cmd in zip(self.conns, cmds, strict=True):
            conn.send(cmd)
        answers = []
        for conn in self.conns:
            try:
                if not conn.poll(120):
                    raise RuntimeError("a memory.shift worker stopped answering")
                answers.append(conn.recv())
            except (EOFError, OSError) as exc:
                raise RuntimeError("a memory.shift worker died") from exc
        return answers

    def drop(self, half: bool = False) -> list[Answer]:
        return self.ask([("drop", half)] * len(self.conns))

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _peak(name: str, answers: list[Answer], stats: Mapping[str, Any]) -> dict[str, Any]:
    """One phase's figures, read at its peak (every worker holds its leases)."""
    requested = stats["requested_bytes"]
    return {
        "phase": name,
        "acquired": sum(a.acquired for a in answers),
        "failed": sum(a.failed for a in answers),
        "skipped": sum(a.skipped for a in answers),
        "held_bytes": sum(a.held_bytes for a in answers),
        "requested_bytes": requested,
        "workers_requested_bytes": sum(a.own_bytes for a in answers),
        "leased_bytes": stats["leased_bytes"],
        "committed_bytes": stats["committed_bytes"],
        "committed/requested": stats["committed_bytes"] / requested if requested else 0.0,
        "seconds": max(a.seconds for a in answers),
    }


def _shift(rounds: int = SHIFT_ROUNDS, seconds: float = SHIFT_SECONDS) -> dict[str, Any]:
    """``memory.shift``: size mixes that follow one another under one budget."""
    rng = random.Random(11)
    share = int(SHIFT_SHARE * SHIFT_BUDGET)
    phases: list[dict[str, Any]] = []
    started = time.perf_counter()
    with start(
        min_size=SHIFT_MIN_SIZE, max_size=SHIFT_MAX_SIZE, memory=SHIFT_BUDGET, idle_release=0
    ) as manager:
        reader = Pool(manager.address, name="bench-shift-reader", idle_timeout=None)
        workers = _ShiftWorkers(manager.address)
        try:
            for name, lo, hi in SHIFT_PHASES:
                answers = workers.ask([("take", _draw(rng, lo, hi, share)) for _ in workers.conns])
                phases.append(_peak(name, answers, reader.stats()))
                workers.drop()
            lo, hi = SHIFT_MIXED
            for i in range(rounds):
                if i and time.perf_counter() - started > seconds:
                    break
                # A round takes a mix, lets every other lease go, and takes again.
                first = workers.ask(
                    [("take", _draw(rng, lo, hi, share, True)) for _ in workers.conns]
                )
                halves = workers.drop(half=True)
                more = workers.ask(
                    [("take", _draw(rng, lo, hi, share - h.held_bytes, True)) for h in halves]
                )
                answers = [
                    Answer(
                        a.acquired + b.acquired, a.failed + b.failed, a.skipped + b.skipped,
                        b.held_bytes, b.own_bytes, a.seconds + b.seconds,
                    )
                    for a, b in zip(first, more, strict=True)
                ]  # fmt: skip
                phases.append(_peak(f"mixed.{i + 1}", answers, reader.stats()))
                workers.drop()
            peak = reader.stats()["peak_committed_bytes"]
        finally:
            workers.close()
            reader.close()
    return {
        "budget": SHIFT_BUDGET,
        "max_size": SHIFT_MAX_SIZE,
        "workers": SHIFT_WORKERS,
        "rounds": sum(ph["phase"].startswith("mixed") for ph in phases),
        "phases": phases,
        "acquired": sum(ph["acquired"] for ph in phases),
        "failed": sum(ph["failed"] for ph in phases),
        "skipped": sum(ph["skipped"] for ph in phases),
        "mixed_peak_ratio": max(
            ph["committed/requested"] for ph in phases if ph["phase"].startswith("mixed")
        ),
        "peak_committed_bytes": peak,
        "seconds": time.perf_counter() - started,
    }


def _take_touch(pool: Pool, n: int, count: int) -> float:
    """Ns per slot to acquire ``count`` slots through the manager and write every page;
    then they go back to the manager (released, and the cache trimmed)."""
    acquire = pool.acquire
    t = _perf()
    leases = [acquire(n) for _ in range(count)]
    for lease in leases:
        _touch(lease.view, n)
    elapsed = _perf() - t
    for lease in leases:
        lease.release()
    pool.trim()
    return elapsed / count


def _recommit(trials: int) -> tuple[dict[tuple[str, int], list[float]], dict[str, Any]]:
    """``memory.recommit`` against ``memory.committed``: the first acquire of free slots
    whose pages went back, and of free slots that kept theirs.

    Each pass takes one batch of the class (as ``acquire_release_cold``: one
    ``Acquire`` round trip) and writes every page. One oversize buffer as
    large as the budget takes every free slot's pages (the manager gives
    them up to make room) and gives them back to the system on release;
    nothing else moves them (``idle_release`` 0). A committed pass follows
    two untimed ones: a hot class also prefetches a batch, which the manager
    commits but nobody writes, and a slot committed but never written still
    pays for its first touch (the kernel zeroes the page then). Returns the
    samples, and the batch sizes with the most bytes left committed after a
    push (0).
    """
    samples: dict[tuple[str, int], list[float]] = {}
    left = 0
    with (
        start(min_size="4KiB", max_size="8MiB", memory=RECOMMIT_BUDGET, idle_release=0) as manager,
        Pool(manager.address, name="bench-recommit", idle_timeout=None) as pool,
    ):
        low = pool.min_size.bit_length() - 1
        batch = {n: pool._max_batch[(n - 1).bit_length() - low] for n in RECOMMIT_SIZES}
        for n in RECOMMIT_SIZES:  # segments made and mapped, batches grown
            for _ in range(3):
                _take_touch(pool, n, batch[n])
        for _ in range(trials):
            for n in RECOMMIT_SIZES:
                _take_touch(pool, n, batch[n])
                _take_touch(pool, n, batch[n])
                ns = _take_touch(pool, n, batch[n])
                samples.setdefault(("memory.committed", n), []).append(ns)
            pool.acquire(RECOMMIT_BUDGET).release()
            left = max(left, pool.stats()["committed_bytes"])
            for n in RECOMMIT_SIZES:
                ns = _take_touch(pool, n, batch[n])
                samples.setdefault(("memory.recommit", n), []).append(ns)
    slots = [[n, batch[n]] for n in RECOMMIT_SIZES]
    return samples, {"slots_per_pass": slots, "left_committed_bytes": left}


def _idle(idle_release: float = IDLE_RELEASE) -> dict[str, Any]:
    """``memory.idle``: a burst, then no load; how soon its pages go back to the system.

    Two managers side by side: in one the burst's process hands its cache
    back at once (``trim()``: every slot free in the manager), in the other it
    keeps it (``idle_timeout=None``), so the manager must recall it from the
    idle process first. Each is read from a connection of its own.
    """
    deadline = 4 * idle_release
    with (
        start(min_size="4KiB", max_size="8MiB", memory="256MiB", idle_release=idle_release) as a,
        start(min_size="4KiB", max_size="8MiB", memory="256MiB", idle_release=idle_release) as b,
    ):
        runs = {"free": a.address, "cached": b.address}
        bursts = {k: Pool(addr, name="bench-burst", idle_timeout=None) for k, addr in runs.items()}
        readers = {k: Pool(addr, name="bench-idle", idle_timeout=None) for k, addr in runs.items()}
        try:
            peaks = {k: _burst(pool, readers[k]) for k, pool in bursts.items()}
            bursts["free"].trim()
            started = time.monotonic()
            seen = {k: _Fall(peaks[k], idle_release) for k in runs}
            while time.monotonic() - started < deadline:
                now = time.monotonic() - started
                for k, reader in readers.items():
                    seen[k].note(now, reader.stats()["committed_bytes"])
                if all(s.done is not None for s in seen.values()):
                    break
                time.sleep(0.02)
        finally:
            for pool in (*bursts.values(), *readers.values()):
                pool.close()
    out: dict[str, Any] = {"idle_release": idle_release, "deadline": deadline}
    for k, s in seen.items():
        out[k] = {"peak_bytes": s.peak, "seconds": s.done, "left": s.left, "left_bytes": s.at}
    return out


def _burst(pool: Pool, reader: Pool) -> int:
    """Acquire ``IDLE_BURST``, write every page, release; the committed bytes at its peak."""
    leases = [pool.acquire(n) for n, count in IDLE_BURST for _ in range(count)]
    for lease in leases:
        _touch(lease.view, len(lease.view))
    peak: int = reader.stats()["committed_bytes"]
    for lease in leases:
        lease.release()
    return peak


class _Fall:
    """What one idle manager's committed bytes did after the burst."""

    def __init__(self, peak: int, idle_release: float) -> None:
        self.peak = peak
        self.by = IDLE_WITHIN * idle_release
        self.done: float | None = None  # seconds until at most IDLE_LEFT of the peak
        self.at = peak  # committed bytes at IDLE_WITHIN * idle_release (the last reading by then)

    @property
    def left(self) -> float:
        return self.at / self.peak if self.peak else 0.0

    def note(self, seconds: float, committed: int) -> None:
        if seconds <= self.by:
            self.at = committed
        if self.done is None and committed <= IDLE_LEFT * self.peak:
            self.done = seconds


# -------------------------------------------------------------- the runner


def _calibrate(loop: Loop, target_ns: int, min_iters: int = 1, warm_ns: int = 0) -> int:
    """Iterations that make one trial last about ``target_ns`` (at least ``min_iters``).

    The case is measured in its steady state. Calls of ``min_iters`` warm it
    up (first-time mappings) for at least ``warm_ns``; then the count grows
    until a call lasts a quarter of the target, and is set from the fastest
    rate seen, measured again on full-length calls. A handoff makes its
    segments and grows its caches, batches and prefetches over its first few
    hundred messages (at 1 MiB, a 4 MiB segment every four slots), and one
    stalled call would otherwise set the count: a 1 MiB handoff was once
    calibrated at 32 messages a trial, which timed a trial's start-up
    rather than the stream.
    """
    deadline = _perf() + warm_ns
    loop(min_iters)
    while _perf() < deadline:
        loop(min_iters)
    iters = min_iters
    best = float("inf")  # the fastest time per iteration seen
    while True:
        elapsed = max(1, loop(iters))
        best = min(best, elapsed / iters)
        if elapsed >= target_ns // 4 or iters >= 1 << 22:
            break
        iters *= 4
    for _ in range(3):
        iters = max(min_iters, min(1 << 22, int(target_ns / best)))
        best = min(best, max(1, loop(iters)) / iters)
    return iters


def _measure(
    cases: dict[tuple[str, int], Loop],
    trials: int,
    target_ns: int,
    min_iters: Callable[[str], int] = lambda case: 1,
    warm_ns: Callable[[str], int] = lambda case: 0,
) -> dict[Any, list[float]]:
    iters = {
        key: _calibrate(loop, target_ns, min_iters(key[0]), warm_ns(key[0]))
        for key, loop in cases.items()
    }
    samples: dict[Any, list[float]] = {key: [] for key in cases}
    order = list(cases)
    rng = random.Random(1)
    for _ in range(trials):
        rng.shuffle(order)
        for key in order:
            n = iters[key]
            samples[key].append(cases[key](n) / n)
    return samples


def _scaling_worker(address: str, size: int, seconds: float, go: Any, out: Any) -> None:
    with Pool(address, name="bench-scaling") as pool:
        acquire = pool.acquire
        acquire(size).release()
        go.wait()
        ops, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(1000):
                acquire(size).release()
            ops += 1000
        out.put(ops)


def _scaling(address: str, procs: int, seconds: float, size: int = 4096) -> float:
    """Acquire/release pairs per second, summed over ``procs`` processes at once."""
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_scaling_worker, args=(address, size, seconds, go, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(0.5)  # let the interpreters start; the Event then starts all at once
    go.set()
    total: int = sum(out.get(timeout=60 + seconds) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


#: Idle connections open while ``_stats_spam`` measures (the Stats reply lists them).
SPAM_CONNECTIONS = 1000


def _raw_client(address: str, name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    sock.connect(address)
    sock.send(p.encode(p.Hello(1, p.VERSION, os.getpid(), name)))
    sock.recv(p.MAX_REPLY + 1)
    return sock


def _stats_spammer(address: str, ready: Any, stop: Any) -> None:
    with _raw_client(address, "bench-stats-spam") as sock:
        ready.set()
        req = 1
        while not stop.is_set():
            req += 1
            sock.send(p.encode(p.Stats(req)))
            sock.recv(p.MAX_REPLY + 1)


def _manager_requests(sock: socket.socket, count: int) -> float:
    """Median ns of an Acquire round trip (its slot then returned) on a raw connection."""
    times = []
    for req in range(2, 2 * count + 2, 2):
        started = _perf()
        sock.send(p.encode(p.Acquire(req, 4096, 1, 0, 0)))
        data, ancdata, _, _ = sock.recvmsg(p.MAX_REPLY + 1, socket.CMSG_SPACE(4 * p.MAX_FDS))
        times.append(_perf() - started)
        for _level, _kind, fds in ancdata:  # a new segment's descriptor: not needed here
            for i in range(0, len(fds) - len(fds) % 4, 4):
                os.close(int.from_bytes(fds[i : i + 4], sys.byteorder))
        grant = p.decode(data)
        assert isinstance(grant, p.Grant)
        sock.send(p.encode(p.Return(req + 1, grant.slots, 0)))
    return statistics.median(times)


def _stats_spam(address: str, requests: int) -> tuple[float, float]:
    """Another client's round trip, without and with a client asking for Stats in a loop,
    while ``SPAM_CONNECTIONS`` idle connections make each Stats reply costly to build."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < SPAM_CONNECTIONS + 512 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (SPAM_CONNECTIONS + 512, hard))
    idle: list[socket.socket] = []
    try:
        idle += (_raw_client(address, f"bench-idle-{i}") for i in range(SPAM_CONNECTIONS))
        return _spammed(address, requests)
    finally:
        for conn in idle:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _spammed(address: str, requests: int) -> tuple[float, float]:
    # Spawned, not forked: the pools' janitor threads run here, and a fork
    # stops them for at most a second (a loaded machine can take longer), so
    # Python 3.12+ could warn of a fork with threads. Its start is not timed.
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    spammer = ctx.Process(target=_stats_spammer, args=(address, ready, stop), daemon=True)
    try:
        with _raw_client(address, "bench-requests") as sock:
            quiet = _manager_requests(sock, requests)
            spammer.start()
            ready.wait(30)
            loud = _manager_requests(sock, requests)
    finally:
        stop.set()
        if spammer.pid is not None:
            spammer.join(30)
    return quiet, loud


def run(*, quick: bool = False, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """Run every case; return ``{"results", "ratios", "machine", "memory"}``."""
    trials, target_ns = (3, 2_000_000) if quick else (15, 20_000_000)
    results: list[dict[str, Any]] = []
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = mp.get_context("fork").Process(target=_echo_server, args=(child, parent), daemon=True)
    server.start()
    child.close()
    big = mmap.mmap(-1, max(sizes))
    mv = memoryview(big)
    try:
        # The cold case gets a manager of its own, so that segments other cases
        # make (and it would have to map on first sight) do not land in it.
        with (
            start(min_size="256", max_size="64MiB", memory="2GiB") as manager,
            start(min_size="256", max_size="64MiB", memory="2GiB") as cold_manager,
        ):
            hot = Pool(manager.address, name="bench-hot", idle_timeout=None)
            cold = Pool(cold_manager.address, name="bench-cold", idle_timeout=None)
            cases: dict[tuple[str, int], Loop] = {
                ("floor.socket_roundtrip", 0): _case_socket_roundtrip(parent)
            }
            for n in sizes:
                cases.update({
                    ("floor.memoryview_slice", n): _case_slice(mv, n),
                    ("shmpool.acquire_release", n): _case_acquire_release(hot, n),
                    ("shmpool.acquire_release_cold", n): _case_cold(cold, n),
                    ("shmpool.acquire_write_release", n): _case_acquire_write_release(hot, n),
                    ("bytearray", n): _case_bytearray(n, False),
                    ("bytearray.touch", n): _case_bytearray(n, True),
                    ("shared_memory.create_unlink", n): _case_shared_memory(n, False),
                    ("shared_memory.create_touch_unlink", n): _case_shared_memory(n, True),
                    ("posix_ipc.create_unlink", n): _case_posix_ipc(n),
                    ("shared_memory_manager.create", n): _case_smm(n),
                })  # fmt: skip
            handoffs: list[Any] = [
                _Handoff(manager.address, kind) for kind in ("shmpool", "queue", "pipe", "handle")
            ]
            if _iceoryx2_available():
                handoffs.append(_IoxHandoff())
            try:
                for h in handoffs:
                    if h.kind == "handle":  # the size does not matter: measured once
                        cases[("floor.pipe_message", 0)] = h.loop(hot, 0)
                        continue
                    for n in HANDOFF_SIZES:
                        cases[(f"handoff.{h.kind}", n)] = h.loop(hot, n)
                # A handoff trial must keep the window full: one message alone
                # measures a round trip's latency, not the stream's rate.
                samples = _measure(
                    cases,
                    trials,
                    target_ns,
                    lambda case: 8 * WINDOW if "handoff" in case else 1,
                    lambda case: 10 * target_ns if "handoff" in case else 0,
                )
            finally:
                for h in handoffs:
                    h.close()
            pairs_per_message = _pairs_per_message(hot, 4096, 100_000 if not quick else 10_000)
            final = hot.stats()
            seconds = 0.5 if quick else 2.0
            one = _scaling(manager.address, 1, seconds)
            two = _scaling(manager.address, 2, seconds)
            quiet, loud = _stats_spam(manager.address, 300 if quick else 3000)
            hot.close()
            cold.close()
    finally:
        mv.release()
        big.close()
        parent.close()
        server.join(5)
    # Memory that moves, after the rest: its managers and processes come and go.
    # The idle check only waits and reads, so it runs beside the shift case.
    memory: dict[str, Any] = {}
    with ThreadPoolExecutor(1) as beside:
        idle = beside.submit(_idle, IDLE_RELEASE / 2 if quick else IDLE_RELEASE)
        memory["shift"] = _shift(2, 3.0) if quick else _shift()
        memory["idle"] = idle.result()
    moved, memory["recommit"] = _recommit(2 if quick else 9)
    samples.update(moved)
    for (case, size), values in sorted(samples.items()):
        results.append({
            "case": case, "size": size, "median_ns": statistics.median(values),
            "min_ns": min(values), "max_ns": max(values),
        })  # fmt: skip
    results.append(
        {
            "case": "scaling.1",
            "size": 4096,
            "median_ns": 1e9 / one,
            "min_ns": 1e9 / one,
            "max_ns": 1e9 / one,
        }
    )
    results.append(
        {
            "case": "scaling.2",
            "size": 4096,
            "median_ns": 1e9 / two,
            "min_ns": 1e9 / two,
            "max_ns": 1e9 / two,
        }
    )
    for case, ns in (("manager.request", quiet), ("manager.request_under_stats_spam", loud)):
        results.append({"case": case, "size": 0, "median_ns": ns, "min_ns": ns, "max_ns": ns})
    ratios = _ratios(results, sizes)
    med = {(r["case"], r["size"]): r["median_ns"] for r in results}
    for n, want in zip(HANDOFF_SIZES, (">= 4", ">= 50", ""), strict=True):
        ratios[f"handoff.queue/handoff.shmpool (messages/s)@{format_size(n)}"] = {
            "value": med[("handoff.queue", n)] / med[("handoff.shmpool", n)],
            "want": want,
        }
        ratios[f"handoff.pipe/handoff.shmpool (messages/s)@{format_size(n)}"] = {
            "value": med[("handoff.pipe", n)] / med[("handoff.shmpool", n)],
            "want": "",
        }
        ratios[f"handoff.shmpool/floor.pipe_message (time)@{format_size(n)}"] = {
            "value": med[("handoff.shmpool", n)] / med[("floor.pipe_message", 0)],
            "want": "",
        }
        ratios[f"handoff.queue/floor.pipe_message (messages/s)@{format_size(n)}"] = {
            "value": med[("handoff.queue", n)] / med[("floor.pipe_message", 0)],
            "want": "",
        }
        if ("handoff.iceoryx2", n) in med:
            ratios[f"handoff.iceoryx2/handoff.shmpool (messages/s)@{format_size(n)}"] = {
                "value": med[("handoff.iceoryx2", n)] / med[("handoff.shmpool", n)],
                "want": "",
            }
    ratios["steady.pairs_per_message"] = {"value": pairs_per_message, "want": ">= 32"}
    ratios["scaling.2_over_1"] = {"value": two / one, "want": ">= 1.7"}
    ratios["manager.request_under_stats_spam/manager.request"] = {
        "value": loud / quiet,
        "want": "<= 2",
    }
    ratios.update(_memory_ratios(memory, med))
    machine = _machine(trials, target_ns)
    machine["manager_mapped_bytes"] = final["mapped_bytes"]
    machine["manager_memory_limit"] = final["memory_limit"]
    return {"results": results, "ratios": ratios, "machine": machine, "memory": memory}


def _memory_ratios(memory: dict[str, Any], med: dict[tuple[str, int], float]) -> dict[str, Any]:
    shift, idle = memory["shift"], memory["idle"]
    out: dict[str, Any] = {
        "memory.shift acquires failed (count)": {"value": shift["failed"], "want": "<= 0"},
        "memory.shift mixed peak committed/requested": {
            "value": shift["mixed_peak_ratio"],
            "want": f"<= {SHIFT_RATIO:g}",
        },
    }
    for run, want in (("free", f"<= {IDLE_LEFT:g}"), ("cached", "")):
        out[f"memory.idle ({run}) committed left/peak at {IDLE_WITHIN:g}x idle_release"] = {
            "value": idle[run]["left"],
            "want": want,
        }
    for n in RECOMMIT_SIZES:
        out[f"memory.recommit/memory.committed@{format_size(n)}"] = {
            "value": med[("memory.recommit", n)] / med[("memory.committed", n)],
            "want": "",
        }
    return out


def _pairs_per_message(pool: Pool, size: int, pairs: int) -> float:
    acquire = pool.acquire
    acquire(size).release()
    before = pool.messages
    for _ in range(pairs):
        acquire(size).release()
    return pairs / max(1, pool.messages - before) if pool.messages > before else float(pairs)


def _ratios(results: list[dict[str, Any]], sizes: tuple[int, ...]) -> dict[str, Any]:
    med = {(r["case"], r["size"]): r["median_ns"] for r in results}
    rt = med[("floor.socket_roundtrip", 0)]
    out: dict[str, Any] = {}
    for n in sizes:
        s = format_size(n)
        hot = med[("shmpool.acquire_release", n)]
        out[f"acquire_release/memoryview_slice@{s}"] = {
            "value": hot / med[("floor.memoryview_slice", n)],
            "want": "<= 6",
        }
        out[f"shared_memory.create_unlink/acquire_release@{s}"] = {
            "value": med[("shared_memory.create_unlink", n)] / hot,
            "want": ">= 100",
        }
        out[f"bytearray/acquire_release@{s}"] = {
            "value": med[("bytearray", n)] / hot,
            "want": {64 << 10: ">= 2", 1 << 20: ">= 30"}.get(n, ""),
        }
        out[f"shared_memory.create_touch_unlink/acquire_write_release@{s}"] = {
            "value": med[("shared_memory.create_touch_unlink", n)]
            / med[("shmpool.acquire_write_release", n)],
            "want": ">= 20" if n == 1 << 20 else "",
        }
        out[f"acquire_release_cold/socket_roundtrip@{s}"] = {
            "value": med[("shmpool.acquire_release_cold", n)] / rt,
            "want": "<= 1",
        }
    return out


def _machine(trials: int, target_ns: int) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "trials": trials,
        "trial_ms": target_ns / 1e6,
    }


def _ok(want: str, value: float) -> str:
    if not want:
        return ""
    op, bound = want.split()
    good = value <= float(bound) if op == "<=" else value >= float(bound)
    return "ok" if good else "MISS"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'case':<36} {'size':>7} {'median':>11} {'min':>11} {'max':>11}"]
    for r in report["results"]:
        lines.append(
            f"{r['case']:<36} {format_size(r['size']) if r['size'] else '-':>7} "
            f"{_ns(r['median_ns']):>11} {_ns(r['min_ns']):>11} {_ns(r['max_ns']):>11}"
        )
    if "memory" in report:
        lines += _format_memory(report["memory"])
    lines.append("")
    lines.append(f"{'ratio (same run)':<62} {'value':>9}  {'want':<7}")
    for name, r in report["ratios"].items():
        lines.append(f"{name:<62} {r['value']:>9.2f}  {r['want']:<7} {_ok(r['want'], r['value'])}")
    m = report["machine"]
    lines.append("")
    lines.append(
        f"Python {m['python']} on {m['platform']}, {m['cpus']} CPUs; "
        f"{m['trials']} trials of ~{m['trial_ms']:.0f} ms per case"
    )
    return "\n".join(lines)


def _format_memory(memory: dict[str, Any]) -> list[str]:
    shift, idle = memory["shift"], memory["idle"]
    lines = [
        "",
        f"memory.shift: {shift['workers']} processes, budget {format_size(shift['budget'])}, "
        f"max_size {format_size(shift['max_size'])}; {shift['acquired']} acquires, "
        f"{shift['failed']} failed ({shift['skipped']} not made after them), "
        f"{shift['seconds']:.1f} s; at each phase's peak:",
        f"{'phase':<10} {'acquired':>8} {'failed':>6} {'held':>9} {'requested':>9} "
        f"{'leased':>9} {'committed':>9} {'c/r':>5} {'s':>6}",
    ]
    for ph in shift["phases"]:
        lines.append(
            f"{ph['phase']:<10} {ph['acquired']:>8} {ph['failed']:>6} "
            f"{format_size(ph['held_bytes']):>9} {format_size(ph['requested_bytes']):>9} "
            f"{format_size(ph['leased_bytes']):>9} {format_size(ph['committed_bytes']):>9} "
            f"{ph['committed/requested']:>5.2f} {ph['seconds']:>6.2f}"
        )
    lines.append(
        f"memory.idle: idle_release {idle['idle_release']:g} s; a burst, then no load, "
        f"until committed <= {IDLE_LEFT:.0%} of its peak:"
    )
    for run in ("free", "cached"):
        r = idle[run]
        took = f"{r['seconds']:.2f} s" if r["seconds"] is not None else "not yet"
        lines.append(
            f"  {run:<7} peak {format_size(r['peak_bytes'])}, {took} "
            f"(deadline {idle['deadline']:g} s); {r['left']:.0%} left at "
            f"{IDLE_WITHIN:g}x idle_release"
        )
    return lines


def _ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"
