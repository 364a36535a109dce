"""Many readers: one filled slot read by several processes, read-only."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from conftest import MP_TIMEOUT, assert_balanced, client_entries, wait_for

import shmpool

PATTERN = bytes(range(256)) * 64  # 16 KiB


def _reader(address: str, handle: shmpool.Handle, results: Any, hold: Any) -> None:
    with shmpool.connect(address, name="reader") as pool:
        lease = pool.attach(handle)
        ok = bytes(lease.view) == PATTERN[: len(lease.view)] and lease.view.readonly
        results.put((os.getpid(), ok))
        if hold is not None:
            hold.wait()  # until SIGKILL
        lease.release()


def _shared(stats: dict[str, Any]) -> int:
    return int(stats["shared"])


@pytest.fixture
def mgr() -> Any:
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="16MiB", transit_timeout=30) as m:
        yield m


def test_readers_see_the_bytes_read_only(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as owner, mgr.connect() as other:
        lease = owner.acquire(len(PATTERN))
        lease.view[:] = PATTERN
        handle = lease.share(readers=3)
        assert lease.closed and handle.readers == 3
        readers = [owner.attach(handle), other.attach(handle), other.attach(handle)]
        for r in readers:
            assert bytes(r.view) == PATTERN
            assert r.view.readonly
            with pytest.raises(TypeError):
                r.view[0] = 0
        with pytest.raises(shmpool.StaleHandleError):  # a fourth reader was not invited
            other.attach(handle)
        with pytest.raises(shmpool.UsageError):  # a reader cannot hand the slot on
            readers[0].detach()
        stats = other.stats()
        assert _shared(stats) == 1
        assert_balanced(stats)
        free_before = {c["size"]: c["free"] for c in stats["classes"]}
        for r in readers[:2]:
            r.release()
        assert _shared(other.stats()) == 1  # one reader still holds it
        readers[2].release()
        stats = other.stats()
        assert _shared(stats) == 0
        assert {c["size"]: c["free"] for c in stats["classes"]}[16384] == free_before[16384] + 1
        assert_balanced(stats)


def test_unclaimed_attaches_lapse() -> None:
    with shmpool.start(memory="8MiB", transit_timeout=0.3) as m, m.connect() as pool:
        handle = pool.acquire(5000).share(readers=2)
        reader = pool.attach(handle)
        reader.release()
        wait_for(lambda: _shared(pool.stats()) == 0)
        with pytest.raises(shmpool.StaleHandleError):
            pool.attach(handle)
        assert_balanced(pool.stats())


@pytest.mark.timeout(120)
def test_many_reader_processes_one_killed(mgr: shmpool.ManagerProcess, mp_context: Any) -> None:
    results, hold = mp_context.Queue(), mp_context.Event()
    with mgr.connect() as owner:
        lease = owner.acquire(len(PATTERN))
        lease.view[:] = PATTERN
        handle = lease.share(readers=3)
        victim = mp_context.Process(target=_reader, args=(mgr.address, handle, results, hold))
        victim.start()
        procs = [
            mp_context.Process(target=_reader, args=(mgr.address, handle, results, None))
            for _ in range(2)
        ]
        for proc in procs:
            proc.start()
        seen = dict(results.get(timeout=MP_TIMEOUT) for _ in range(3))
        assert all(seen.values()), seen
        for proc in procs:
            proc.join(MP_TIMEOUT)
        assert _shared(owner.stats()) == 1  # the victim still reads it
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(MP_TIMEOUT)
        wait_for(lambda: _shared(owner.stats()) == 0)
        stats = owner.stats()
        assert not client_entries(stats, victim.pid)
        assert_balanced(stats)
    results.close()
    results.join_thread()


def test_share_arguments(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as pool:
        lease = pool.acquire(100)
        for bad in (0, -1, 1 << 17, 1.5, True):
            with pytest.raises(ValueError):
                lease.share(readers=bad)
        lease.release()
        with pytest.raises(shmpool.LeaseClosedError):
            lease.share()
