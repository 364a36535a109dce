"""``shmpool demo``: workers doing real work through an embedded manager.

Several worker processes fill buffers, checksum them and give them back; one
more takes a handful of leases and is killed with SIGKILL while it holds them.
The statistics before and after the kill show its slots coming back. The demo
exits 0 only if the books balance at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
import zlib
from multiprocessing.synchronize import Event
from typing import Any

from .client import Pool, connect
from .embedded import start
from .report import balanced, format_stats
from .statstypes import ClientStats, PoolStats

__all__ = ["run"]

_SIZES = (1_000, 16_000, 100_000, 700_000, 3_000_000)


def _worker(address: str, wid: int, seconds: float, results: Any) -> None:
    rng = random.Random(wid)
    block = rng.randbytes(max(_SIZES))
    ops = nbytes = bad = 0
    with connect(address, name=f"demo-worker-{wid}") as pool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = rng.choice(_SIZES)
            with pool.acquire(n) as lease:
                start_at = (ops * 7919) % (len(block) - n + 1)
                data = block[start_at : start_at + n]
                lease.view[:] = data
                if zlib.crc32(lease.view) != zlib.crc32(data):
                    bad += 1
            ops += 1
            nbytes += n
        results.put((wid, ops, nbytes, bad, pool.stats()["local"]))


def _victim(address: str, holding: Any, never: Event) -> None:
    pool = connect(address, name="demo-victim")
    leases = [pool.acquire(n) for n in (64_000, 64_000, 1_000_000, 1_000_000, 5_000_000)]
    for lease in leases:
        lease.view[:] = b"\xaa" * len(lease.view)
    holding.put(sum(lease.capacity for lease in leases))
    never.wait()  # until SIGKILL


def _client(stats: PoolStats, pid: int) -> ClientStats | None:
    return next((c for c in stats["clients"] if c["pid"] == pid), None)


def run(workers: int = 3, seconds: float = 1.5) -> int:
    ctx = mp.get_context("spawn")
    print(f"starting a manager and {workers} workers (+1 to be killed) for {seconds:.1f} s")
    with start(min_size="1KiB", max_size="4MiB", memory="256MiB") as manager:
        results, holding = ctx.Queue(), ctx.Queue()
        never = ctx.Event()
        victim = ctx.Process(target=_victim, args=(manager.address, holding, never))
        victim.start()
        vpid = victim.pid
        assert vpid is not None
        procs = [
            ctx.Process(target=_worker, args=(manager.address, i, seconds, results))
            for i in range(workers)
        ]
        for proc in procs:
            proc.start()
        held = holding.get(timeout=60)
        with connect(manager.address, name="demo") as pool:
            before = pool.stats()
            print(f"\n-- before: the victim (pid {victim.pid}) holds {held} bytes of leases --")
            print(format_stats(before))
            os.kill(vpid, signal.SIGKILL)
            victim.join()
            after = _wait_until_gone(pool, vpid)
            print(f"\n-- after SIGKILL of pid {vpid} --")
            print(format_stats(after))
            done = [results.get(timeout=seconds + 60) for _ in procs]
            for proc in procs:
                proc.join()
            final = pool.stats()
        ok = _report(done, before, after, final, vpid)
    print("\nOK: every slot came back and the books balance" if ok else "\nFAILED")
    return 0 if ok else 1


def _wait_until_gone(pool: Pool, pid: int, timeout: float = 10.0) -> PoolStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.stats()
        if _client(stats, pid) is None or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def _report(
    done: list[Any], before: PoolStats, after: PoolStats, final: PoolStats, pid: int
) -> bool:
    print("\n-- workers --")
    bad_total = 0
    for wid, ops, nbytes, bad, local in sorted(done):
        bad_total += bad
        print(
            f"worker {wid}: {ops} buffers, {nbytes / 1e6:.1f} MB checksummed, {bad} bad; "
            f"{local['cache_hits']} cache hits, {local['messages']} messages to the manager"
        )
    victim_before = _client(before, pid)
    checks = {
        "the victim held leases before the kill": bool(victim_before and victim_before["leased"]),
        "its connection was reclaimed after SIGKILL": _client(after, pid) is None,
        "every checksum matched": bad_total == 0,
        "total == free + leased in every class": all(map(balanced, (before, after, final))),
        "nothing leased once the workers exited": sum(c["leased"] for c in final["clients"]) == 0
        and final["oversize"]["leases"] == 0,
    }
    print()
    for what, good in checks.items():
        print(f"[{'ok' if good else 'FAIL'}] {what}")
    return all(checks.values())
