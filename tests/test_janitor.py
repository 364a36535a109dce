"""The janitor thread: it works in a process with many files open, survives a
failed tick, and makes its pool fail loudly when it cannot go on.

The recall tests fill one pool's cache on a starved manager (a budget of
exactly 16 slots) and let another pool of the same process acquire them all:
only the first pool's janitor, answering the manager's Recall, can free them.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import all_returned, assert_balanced, wait_for

import shmpool
from shmpool.janitor import JANITOR_FAILURES

SLOT = 64 << 10
STARVED = {"min_size": "64KiB", "max_size": "64KiB", "memory": "1MiB", "acquire_wait": 5.0}
SLOTS = 16
#: select() refuses descriptors from FD_SETSIZE (1024) on.
MANY_FDS = 1100


@contextmanager
def many_files_open(count: int = MANY_FDS) -> Iterator[None]:
    """Hold ``count`` more descriptors open, so that every new one is numbered above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + len(os.listdir("/proc/self/fd")) + 256  # sockets, segments, pipes
    if need > soft:
        if hard != resource.RLIM_INFINITY and need > hard:
            pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} is below {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fds: list[int] = []
    try:
        fds.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(count))
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fill_cache(pool: shmpool.Pool) -> int:
    """Take the whole budget into ``pool``, release it into its cache; return how many stay."""
    leases = [pool.acquire(SLOT) for _ in range(SLOTS)]
    for lease in leases:
        lease.release()
    cached = len(pool._caches[0])
    assert cached >= 1  # the rest went back as surplus
    return cached


def take_everything(pool: shmpool.Pool) -> None:
    """Acquire every slot of the budget: only a recall of the other pool's cache frees them."""
    leases = [pool.acquire(SLOT) for _ in range(SLOTS)]
    assert len({lease._slot.ref[:2] for lease in leases}) == SLOTS
    for lease in leases:
        lease.release()


def test_the_janitor_works_with_descriptors_above_1024() -> None:
    """Its poll of the socket, numbered above 1024, neither fails nor stops it."""
    with (
        shmpool.start(**STARVED) as mgr,
        many_files_open(),
        shmpool.Pool(mgr.address, name="idle", idle_timeout=None) as idle,
        shmpool.Pool(mgr.address, name="busy", idle_timeout=None) as busy,
    ):
        assert idle._conn.sock is not None and idle._conn.sock.fileno() >= 1024
        fill_cache(idle)
        janitor = idle._janitor
        assert janitor is not None
        take_everything(busy)  # the manager recalls idle's cache; its janitor answers
        assert janitor.is_alive() and idle._janitor is janitor
        assert idle._conn.broken is None
        assert_balanced(busy.stats())
        idle.trim()
        busy.trim()
        wait_for(lambda: all_returned(mgr.stats()))


def test_an_idle_cache_goes_back_with_descriptors_above_1024() -> None:
    with (
        shmpool.start(**STARVED) as mgr,
        many_files_open(),
        shmpool.Pool(mgr.address, name="idle", idle_timeout=0.2) as pool,
    ):
        assert pool._conn.sock is not None and pool._conn.sock.fileno() >= 1024
        fill_cache(pool)
        wait_for(lambda: all_returned(mgr.stats()))
        assert pool._janitor is not None and pool._janitor.is_alive()


def test_start_works_with_descriptors_above_1024() -> None:
    """``shmpool.start()`` waits for the manager's ready line on a pipe numbered above 1024."""
    with many_files_open(), shmpool.start(**STARVED) as mgr, mgr.connect() as pool:
        lease = pool.acquire(SLOT)
        lease.view[:2] = b"ok"
        lease.release()


def test_a_failed_tick_is_logged_and_the_janitor_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        shmpool.start(**STARVED) as mgr,
        shmpool.Pool(mgr.address, name="idle", idle_timeout=None) as idle,
        shmpool.Pool(mgr.address, name="busy", idle_timeout=None) as busy,
    ):
        fill_cache(idle)
        calls = []
        poll = idle._poll_manager

        def fails_once() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom, once")
            poll()

        monkeypatch.setattr(idle, "_poll_manager", fails_once)
        wait_for(lambda: len(calls) >= 3)  # ticks after the failed one
        assert idle._janitor is not None and idle._janitor.is_alive()
        assert idle._conn.broken is None
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.exc_info is not None and "boom, once" in str(record.exc_info[1])
        take_everything(busy)  # recalls are still answered
        assert_balanced(busy.stats())
        idle.trim()
        busy.trim()
        wait_for(lambda: all_returned(mgr.stats()))


def test_a_janitor_that_keeps_failing_breaks_its_pool_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with shmpool.start(**STARVED) as mgr:
        with shmpool.Pool(mgr.address, name="idle", idle_timeout=None) as pool:
            fill_cache(pool)
            janitor = pool._janitor
            assert janitor is not None

            def fails() -> None:
                raise RuntimeError("boom, always")

            monkeypatch.setattr(pool, "_poll_manager", fails)
            wait_for(lambda: pool._conn.broken is not None)
            wait_for(lambda: not janitor.is_alive())
            failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(failed) == JANITOR_FAILURES  # each failure, with its traceback
            # The idle cache went back before it gave up; nothing is in anyone's hands.
            wait_for(lambda: all_returned(mgr.stats()))
            match = r"janitor.*RuntimeError: boom, always"
            with pytest.raises(shmpool.ShmpoolError, match=match):
                pool.acquire(SLOT)
            with pytest.raises(shmpool.ShmpoolError, match=match):
                pool.stats()
            assert repr(pool).endswith("broken>")
            pool._ensure_janitor()  # a broken pool gets no new janitor
            assert pool._janitor is janitor
        assert pool.closed


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_janitor_thread_that_ended_is_replaced_at_the_next_refill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with (
        shmpool.start(**STARVED) as mgr,
        shmpool.Pool(mgr.address, name="idle", idle_timeout=None) as pool,
    ):
        pool.acquire(SLOT).release()
        janitor = pool._janitor
        assert janitor is not None

        def exits() -> None:
            raise SystemExit  # ends the thread: no failure of a tick does

        monkeypatch.setattr(pool, "_poll_manager", exits)
        janitor.join(10)
        assert not janitor.is_alive()
        monkeypatch.delattr(pool, "_poll_manager")
        pool.trim()
        pool.acquire(SLOT).release()  # a refill: it starts a new janitor
        assert pool._janitor is not janitor
        assert pool._janitor is not None and pool._janitor.is_alive()


def test_a_dead_manager_stops_the_janitor_quietly(caplog: pytest.LogCaptureFixture) -> None:
    with shmpool.start(**STARVED) as mgr, mgr.connect(name="idle") as pool:
        fill_cache(pool)
        janitor = pool._janitor
        assert janitor is not None
        os.kill(mgr.pid, signal.SIGKILL)
        wait_for(lambda: pool._conn.broken is not None)  # the janitor saw end-of-file
        wait_for(lambda: not janitor.is_alive())
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        with pytest.raises(shmpool.ManagerGoneError):
            pool.acquire(SLOT)
