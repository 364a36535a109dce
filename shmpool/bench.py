"""``shmpool bench``: shmpool and its peers measured side by side, in one run.

Machines here are shared and noisy, so absolute times drift; what we report
are medians over interleaved trials (every trial runs every case once, in a
shuffled order, so drift hits all cases alike) and ratios between cases of
the same run. Each trial of a case is a timed loop long enough to dwarf the
timer; the per-operation time is the loop time divided by its iterations.
"""

from __future__ import annotations

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
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.managers import SharedMemoryManager
from typing import Any

import msgpack
import posix_ipc

from . import protocol as p
from .client import Pool
from .embedded import start
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
        with SharedMemoryManager() as smm:
            t = _perf()
            for _ in range(done):
                smm.SharedMemory(n).close()
            elapsed = _perf() - t
        return elapsed * iters // done

    return loop


def _echo_server(sock: socket.socket) -> None:
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
    ctx = mp.get_context("fork")
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
    """Run every case; return ``{"results", "ratios", "machine"}``."""
    trials, target_ns = (3, 2_000_000) if quick else (15, 20_000_000)
    results: list[dict[str, Any]] = []
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = mp.get_context("fork").Process(target=_echo_server, args=(child,), daemon=True)
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
    machine = _machine(trials, target_ns)
    machine["manager_mapped_bytes"] = final["mapped_bytes"]
    machine["manager_memory_limit"] = final["memory_limit"]
    return {"results": results, "ratios": ratios, "machine": machine}


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


def _ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"
