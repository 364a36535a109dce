"""Real processes over every start method: sharing the pool, and dying while holding it.

Worker functions live at module level so that spawn and forkserver children
can import them; the manager's address is always passed explicitly.
"""

from __future__ import annotations

import os
import queue
import signal

import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries, wait_for

import shmpool

WORKERS = 4
ROUNDS = 60
SIZES = (100, 4096, 6000, 40_000, 100_000, 300_000)
HELD_SIZES = (100, 5000, 5000, 70_000, 1 << 20, 3 << 20)  # the last one is oversize


def _pattern(tag: str, n: int) -> bytes:
    unit = tag.encode()
    return (unit * (n // len(unit) + 1))[:n]


def share_worker(address: str, wid: int, rounds: int, results) -> None:
    """Acquire, write a pattern naming this worker and round, check it, release."""
    errors = []
    refs = set()
    try:
        with shmpool.connect(address, name=f"worker{wid}") as pool:
            for i in range(rounds):
                size = SIZES[(wid + i) % len(SIZES)]
                held = []
                for k in range(3):  # hold several at once, so slots are really shared out
                    lease = pool.acquire(size)
                    data = _pattern(f"w{wid}.i{i}.k{k}|", size)
                    lease.view[:] = data
                    held.append((lease, data))
                    refs.add(tuple(lease._slot.ref[:2]))
                os.sched_yield()
                for lease, data in held:
                    if bytes(lease.view) != data:
                        errors.append(f"worker {wid} round {i}: slot {lease!r} overwritten")
                    lease.release()
            stats = pool.stats()
            mine = [c for c in stats["clients"] if c["pid"] == os.getpid()]
            results.put(
                {
                    "wid": wid,
                    "pid": os.getpid(),
                    "errors": errors,
                    "slots": len(refs),
                    "clients": len(mine),
                    "leased": mine[0]["leased"] if mine else -1,
                    "cached": sum(stats["local"]["cached"].values()),
                }
            )
    except BaseException as exc:
        results.put({"wid": wid, "pid": os.getpid(), "errors": [*errors, repr(exc)]})
        raise


def holding_worker(address: str, sizes, ready, done) -> None:
    """Lease ``sizes``, write into them, report, then wait to be killed."""
    pool = shmpool.connect(address, name="doomed")
    leases = [pool.acquire(n) for n in sizes]
    for lease in leases:
        lease.view[:] = _pattern("doomed", len(lease.view))
    ready.put({"pid": os.getpid(), "held": len(leases)})
    done.wait(MP_TIMEOUT)  # never set: the test kills us first
    for lease in leases:
        lease.release()
    pool.close()


def _get(q, timeout: float = MP_TIMEOUT):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message from a worker within {timeout} s") from None


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_workers_share_the_pool(manager: shmpool.ManagerProcess, mp_context) -> None:
    results = mp_context.Queue()
    procs = [
        mp_context.Process(target=share_worker, args=(manager.address, w, ROUNDS, results))
        for w in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [_get(results) for _ in procs]
    finally:
        for proc in procs:
            proc.join(MP_TIMEOUT)
    results.close()
    results.join_thread()
    assert [proc.exitcode for proc in procs] == [0] * WORKERS
    assert sorted(r["wid"] for r in reports) == list(range(WORKERS))
    for report in reports:
        assert report["errors"] == [], report
        assert report["clients"] == 1  # one connection per worker process
        assert report["slots"] >= 3
        # all its leases are released: what its connection holds is its cache
        # every slot it holds is cached (or on its way back: a prefetch read
        # while its Stats was answered may push the cache past its mark, and
        # that Return follows the Stats)
        assert 0 < report["cached"] <= report["leased"]
    pids = {r["pid"] for r in reports}
    assert len(pids) == WORKERS and os.getpid() not in pids

    def workers_gone():
        stats = manager.stats()
        return not any(c["pid"] in pids for c in stats["clients"]) and stats

    stats = wait_for(workers_gone)
    assert_balanced(stats)
    assert all_returned(stats)
    assert stats["clients"] == [c for c in stats["clients"] if c["name"] == "stats"]
    used = [c for c in stats["classes"] if c["total"]]
    assert used  # the workers did go through the manager


@pytest.fixture
def manager_1m():
    """Classes up to 1 MiB, so that a worker can hold an oversize lease in the budget."""
    with shmpool.start(max_size="1MiB", memory="64MiB") as mgr:
        yield mgr


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_worker_killed_while_holding_leases(manager_1m: shmpool.ManagerProcess, mp_context) -> None:
    manager = manager_1m
    with manager.connect(name="bystander") as bystander:
        keep = bystander.acquire(5000)
        keep.view[:] = _pattern("bystander", 5000)
        before = bystander.stats()
        ready, done = mp_context.Queue(), mp_context.Event()
        proc = mp_context.Process(
            target=holding_worker, args=(manager.address, HELD_SIZES, ready, done)
        )
        proc.start()
        try:
            report = _get(ready)
            assert report["pid"] == proc.pid
            assert report["held"] == len(HELD_SIZES)

            held = bystander.stats()
            (entry,) = client_entries(held, proc.pid)
            assert entry["name"] == "doomed"
            assert entry["leased"] >= len(HELD_SIZES)
            assert held["oversize"]["leases"] == 1
            # the doomed worker's class slots (all but the oversize one) are leased
            assert sum(c["leased"] for c in held["classes"]) >= entry["leased"] - 1
            assert len(client_entries(before, proc.pid)) == 0
            assert_balanced(held)

            os.kill(proc.pid, signal.SIGKILL)
            proc.join(MP_TIMEOUT)
            assert proc.exitcode == -signal.SIGKILL
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
            ready.close()
            ready.join_thread()

        def reclaimed():
            stats = bystander.stats()
            return not client_entries(stats, proc.pid) and stats

        after = wait_for(reclaimed)
        assert_balanced(after)
        assert after["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        assert after["mapped_bytes"] == held["mapped_bytes"] - held["oversize"]["bytes"]
        # Exactly the bystander's slots are still leased; the dead worker's are free.
        (mine,) = [c for c in after["clients"] if c["name"] == "bystander"]
        assert sum(c["leased"] for c in after["classes"]) == mine["leased"]
        assert mine["leased"] >= 1  # its lease (and maybe a cache it has not given back)
        # The slots are reusable: another process can lease all the freed memory.
        freed = {c["size"]: c["free"] for c in after["classes"]}
        for c in held["classes"]:
            assert freed[c["size"]] >= c["free"]
        assert bytes(keep.view) == _pattern("bystander", 5000)
        keep.release()
    wait_for(lambda: all_returned(manager.stats()))


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_killed_worker_memory_is_reusable(mp_context) -> None:
    """A budget the dead worker used up entirely is available again after it dies."""
    with shmpool.start(min_size="64KiB", max_size="64KiB", memory="1MiB", acquire_wait=0) as mgr:
        ready, done = mp_context.Queue(), mp_context.Event()
        sizes = [65536] * 16  # the whole budget
        proc = mp_context.Process(target=holding_worker, args=(mgr.address, sizes, ready, done))
        proc.start()
        try:
            assert _get(ready)["held"] == 16
            with mgr.connect() as pool:
                with pytest.raises(shmpool.PoolExhaustedError):
                    pool.acquire(65536)
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(MP_TIMEOUT)

                def lease_all():
                    got = []
                    try:
                        while len(got) < 16:
                            got.append(pool.acquire(65536))
                    except shmpool.PoolExhaustedError:
                        for lease in got:
                            lease.release()
                        return None
                    return got

                leases = wait_for(lease_all)
                assert len({lease._slot.ref[:2] for lease in leases}) == 16
                for lease in leases:
                    lease.release()
                assert pool.stats()["committed_bytes"] == 1 << 20
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
            ready.close()
            ready.join_thread()
