"""Leases passed around a ring of processes by ticket words, with one killed mid-stream.

Each lease carries its own id and hop count in its first bytes, and each
holder checks them, bumps the count and passes it on. A slot held by two
processes at once, or memory re-leased while in use, shows up as a wrong
count or a torn record. After the killed process and the others are gone,
the manager's books must balance with nothing leased or in transit.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
from typing import Any

import pytest
from conftest import MP_TIMEOUT, assert_balanced, wait_for

import shmpool
from shmpool import buffer

RECORD = struct.Struct("<QQQ")  # lease id, hops, check (id * 7919 + hops)
SIZES = (5000, 70_000, 300_000)
WORKERS = 3
LEASES = 24
HOPS = 40  # a lease that made this many hops is released and a fresh one sent on

pytestmark = pytest.mark.skipif(not buffer.SPEEDUPS, reason="ticket words need the C extension")


def _record(view: memoryview) -> tuple[int, int, int]:
    return RECORD.unpack_from(view)  # type: ignore[return-value]


def _ring_worker(address: str, me: int, seed: Any, inbox: Any, outbox: Any) -> None:
    """Take a lease, check and bump its record, hand it on; stop on None from ``seed``.

    Reports ("torn", record) for a bad record, then ("done", handoffs) on ``seed``.
    """
    from multiprocessing.connection import wait

    with shmpool.connect(address, name=f"ring{me}") as pool:
        seed.send(("ready", os.getpid()))
        passed, torn = 0, []
        while True:
            for conn in wait([seed, inbox]):
                lease = conn.recv()  # unpickling attaches it, by ticket word when it can
                if lease is None:
                    seed.send(("done", passed, torn))
                    return
                ident, hops, check = _record(lease.view)
                if check != ident * 7919 + hops:
                    torn.append((ident, hops, check))
                    lease.release()
                    continue
                if hops >= HOPS:  # retire it; a fresh lease of another size goes on
                    lease.release()
                    lease = pool.acquire(SIZES[(ident + hops) % len(SIZES)])
                    ident, hops = ident + 1000, 0
                RECORD.pack_into(lease.view, 0, ident, hops + 1, ident * 7919 + hops + 1)
                outbox.send(lease)  # pickling detaches it here
                passed += 1
                if passed % 25 == 0:
                    seed.send(("progress", passed))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_ring_of_handoffs_survives_a_kill(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="64MiB", transit_timeout=1) as m:
        seeds = [ctx.Pipe() for _ in range(WORKERS)]
        ring = [ctx.Pipe(duplex=False) for _ in range(WORKERS)]  # (reader, writer) into i
        procs = [
            ctx.Process(
                target=_ring_worker,
                args=(m.address, i, seeds[i][1], ring[i][0], ring[(i + 1) % WORKERS][1]),
            )
            for i in range(WORKERS)
        ]
        for proc in procs:
            proc.start()
        ours = [parent_end for parent_end, _ in seeds]
        for conn in ours:
            assert conn.poll(MP_TIMEOUT) and conn.recv()[0] == "ready"
        with m.connect(name="feeder") as feeder:
            for ident in range(LEASES):
                lease = feeder.acquire(SIZES[ident % len(SIZES)])
                RECORD.pack_into(lease.view, 0, ident, 0, ident * 7919)
                ours[ident % WORKERS].send(lease)
            # let the leases go round, then kill one worker in the middle of it all
            progress = 0
            while progress < 20:
                assert ours[1].poll(MP_TIMEOUT), "the ring stalled"
                progress += ours[1].recv()[0] == "progress"
            victim = procs[1]
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(MP_TIMEOUT)
            # leases now sent to the dead worker are handles nobody attaches
            results = []
            for i in (0, 2):
                ours[i].send(None)
                while (msg := ours[i].recv())[0] != "done":
                    pass
                results.append(msg)
                procs[i].join(MP_TIMEOUT)
                assert procs[i].exitcode == 0
            assert all(not torn for _, _, torn in results), results
            assert all(passed > 0 for _, passed, _ in results), results
            for a, b in (*seeds, *ring):
                a.close()
                b.close()
            # every lease comes back: held ones with their holders, sent ones
            # (handles nobody attached) when their transit time runs out
            feeder.trim()
            stats = wait_for(
                lambda: (
                    (s := feeder.stats())["in_transit"] == 0
                    and sum(c["leased"] for c in s["clients"]) == 0
                    and s
                ),
            )
            assert_balanced(stats)
            assert all(c["leased"] == 0 for c in stats["classes"])
