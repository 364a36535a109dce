"""A manager restart is survived: a pool reconnects to the manager restarted at its address.

Leases from before stay readable, and releasing one does nothing (nothing
reaches the new manager, whose ids may name other slots); new acquires come
from the new manager; the dead manager's segments are unmapped once no lease
uses them; handles from before are refused. ``reconnect=False`` keeps the
old behaviour: ``ManagerGoneError`` for good.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    MP_TIMEOUT,
    all_returned,
    assert_balanced,
    client_entries,
    piped_child,
    wait_for,
)

import shmpool
from shmpool.address import unique_address

BUDGET = "64MiB"
MAX_SIZE = "1MiB"  # 2 MiB is oversize: a segment of its own


def start(address: str, **kwargs: Any) -> shmpool.ManagerProcess:
    kwargs.setdefault("max_size", MAX_SIZE)
    return shmpool.start(memory=BUDGET, address=address, **kwargs)


def kill(mgr: shmpool.ManagerProcess, how: str = "SIGKILL") -> None:
    """End ``mgr`` the way ``how`` says: killed, or stopped."""
    if how == "SIGKILL":
        os.kill(mgr.pid, signal.SIGKILL)
    mgr.stop()


def mapped(manager_pid: int) -> tuple[int, int]:
    """How many mappings and descriptors of this process are segments of ``manager_pid``."""
    prefix = f"/dev/shm/shmpool.{manager_pid}."
    with open("/proc/self/maps") as f:
        maps = sum(prefix in line for line in f)
    fds = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{name}").startswith(prefix)
        except OSError:
            continue
    return maps, fds


@pytest.fixture
def unpickle_pool() -> Iterator[None]:
    """Close the pool unpickling opens for itself (``registry._default_pool``) afterwards."""
    yield
    pool, shmpool.registry._default = shmpool.registry._default, None
    if pool is not None:
        pool.close()


@pytest.fixture
def address() -> Iterator[str]:
    path = unique_address()
    yield path
    if os.path.exists(path):  # pragma: no cover - a manager was left behind
        os.unlink(path)


@pytest.mark.parametrize("how", ["SIGKILL", "stop"])
def test_a_restart_is_survived(address: str, how: str) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address)
        old = pool.acquire(5000)
        old.view[:5] = b"hello"
        big = pool.acquire(2 << 20)  # oversize: its own segment
        big.view[:3] = b"big"
        first_instance, first_pid = pool.manager_instance, pool.manager_pid
    finally:
        kill(first, how)
    with start(address) as second, pool:
        new = pool.acquire(5000)  # the next call reconnects
        assert pool.manager_pid == second.pid != first_pid
        assert pool.manager_instance != first_instance
        new.view[:5] = b"world"
        assert bytes(old.view[:5]) == b"hello"  # still mapped, and other memory
        assert bytes(big.view[:3]) == b"big"
        sent = pool.messages
        old.release()  # nothing to do: its manager is gone
        big.release()  # must not unmap the new manager's segment of the same id
        assert pool.messages == sent  # nothing reached the new manager
        assert new._slot.ref.segment in pool._conn.segments
        got = pickle.loads(pickle.dumps(new))  # by its ticket word, in that segment
        assert bytes(got.view[:5]) == b"world"
        stats = pool.stats()
        assert_balanced(stats)
        (ours,) = client_entries(stats, os.getpid())
        cached = sum(stats["local"]["cached"].values())
        assert ours["leased"] == cached + 1  # the new lease and its batch: nothing from before
        assert stats["oversize"]["leases"] == 0
        got.release()
        more = [pool.acquire(5000) for _ in range(20)]  # refills from the new manager
        for lease in more:
            lease.release()
        pool.close()
        wait_for(lambda: all_returned(second.stats()))


def test_old_segments_are_unmapped_once_no_lease_uses_them(address: str) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address)
        kept = pool.acquire(5000)
        kept.view[:4] = b"kept"
        pool.acquire(6000).release()  # a slot back in the cache
        dead_pid = first.pid
        assert mapped(dead_pid)[0] >= 1
    finally:
        kill(first)
    with start(address) as second, pool:
        pool.acquire(5000).release()
        assert mapped(second.pid)[0] >= 1
        gc.collect()
        maps, _ = mapped(dead_pid)
        assert maps >= 1  # the lease still uses its segment: no SIGBUS
        assert bytes(kept.view[:4]) == b"kept"
        kept.release()
        del kept
        gc.collect()
        assert mapped(dead_pid) == (0, 0)  # unmapped, descriptor closed
        assert mapped(second.pid)[0] >= 1


def test_reconnect_false_keeps_the_pool_broken(address: str) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address, reconnect=False)
        assert not pool.reconnects
        lease = pool.acquire(5000)
    finally:
        kill(first)
    with start(address), pool:
        with pytest.raises(shmpool.ManagerGoneError):
            pool.acquire(5000)
        with pytest.raises(shmpool.ManagerGoneError):
            pool.stats()  # for good, though a manager listens again
        lease.release()


@pytest.mark.usefixtures("unpickle_pool")  # unpickling opens a pool to ask
def test_handles_and_pickles_from_before_are_refused(address: str) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address)
        handle = pool.acquire(5000).detach()
        pickled = pickle.dumps(pool.acquire(5000))
        kept = pool.acquire(5000)
    finally:
        kill(first)
    with start(address) as second, pool:
        pool.acquire(5000).release()  # reconnected
        segments = set(pool._conn.segments)
        with pytest.raises(shmpool.StaleHandleError, match="earlier run of this one"):
            pool.attach(handle)
        with pytest.raises(shmpool.StaleHandleError, match="another manager"):
            pickle.loads(pickled)
        with pytest.raises(shmpool.UsageError):
            kept.detach()  # a lease of the dead manager cannot be handed on
        with pytest.raises(shmpool.UsageError):
            pickle.dumps(kept)
        assert bytes(kept.view[:1]) is not None  # still readable
        kept.release()
        assert set(pool._conn.segments) == segments  # nothing of the old manager was mapped
        assert_balanced(second.stats())


def test_a_pool_whose_manager_does_not_come_back(address: str) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address, reconnect=0.3)
        pool.acquire(5000).release()
    finally:
        kill(first)
    try:
        wait_for(lambda: not pool._live())  # its janitor saw it go: the cache is dropped
        started = time.monotonic()
        with pytest.raises(shmpool.ManagerGoneError, match="the next call tries again"):
            pool.acquire(5000)
        assert time.monotonic() - started < MP_TIMEOUT / 4  # bounded by reconnect (0.3 s)
        started = time.monotonic()
        with pytest.raises(shmpool.ManagerGoneError):
            pool.stats()
        assert time.monotonic() - started < 0.3  # once, not for long again
        with start(address) as second:
            pool.acquire(5000).release()  # it came back after all
            assert pool.manager_pid == second.pid
            pool.close()
    finally:
        pool.close()


def test_a_manager_with_other_size_classes_breaks_the_pool(address: str) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address)
        pool.acquire(5000).release()
    finally:
        kill(first)
    with start(address, min_size="8KiB"), pool:
        with pytest.raises(shmpool.ManagerGoneError, match="size classes"):
            pool.acquire(5000)
        started = time.monotonic()
        with pytest.raises(shmpool.ManagerGoneError, match="size classes"):
            pool.acquire(5000)  # for good: no more tries
        assert time.monotonic() - started < 0.3
        other = shmpool.connect(address)  # a new pool takes the new classes
        other.acquire(5000).release()
        other.close()


def test_a_reader_holding_only_leases_reconnects_to_attach(address: str) -> None:
    """A handle of the new manager reaches a pool that has not reconnected yet."""
    first = start(address)
    try:
        receiver = shmpool.connect(address, name="receiver")
        receiver.acquire(5000).release()  # the janitor runs: it notices the death
    finally:
        kill(first)
    with start(address) as second, receiver:
        wait_for(lambda: not receiver._live())
        with shmpool.connect(address, name="sender") as sender:
            lease = sender.acquire(5000)
            lease.view[:4] = b"news"
            got = pickle.loads(pickle.dumps(lease))
            assert got._slot.home is not None
            assert bytes(got.view[:4]) == b"news"
            got.release()
            handle = sender.acquire(5000)
            handle.view[:4] = b"more"
            mine = receiver.attach(handle.detach())  # reconnects first
            assert receiver.manager_pid == second.pid
            assert bytes(mine.view[:4]) == b"more"
            mine.release()
        receiver.close()
        wait_for(lambda: all_returned(second.stats()))


def _send_a_lease(address: str, conn: Any) -> None:
    with shmpool.connect(address, name="child") as pool:
        lease = pool.acquire(5000)
        lease.view[:5] = b"child"
        conn.send(lease)
        conn.recv()  # the parent has it: its slot may go when this pool closes
    conn.close()


def test_a_child_of_the_new_manager_hands_a_lease_to_a_pool_that_lost_the_old(
    address: str, mp_context: Any
) -> None:
    first = start(address)
    try:
        pool = shmpool.connect(address)
        pool.acquire(5000).release()
    finally:
        kill(first)
    with start(address) as second, pool:
        wait_for(lambda: not pool._live())  # the janitor saw the old manager go
        with piped_child(mp_context, _send_a_lease, address) as (ours, child):
            assert ours.poll(MP_TIMEOUT)
            lease = ours.recv()  # unpickling reconnects our pool to the new manager
            assert pool._live() and pool.manager_pid == second.pid
            assert bytes(lease.view[:5]) == b"child"
            lease.release()
            ours.send(None)
            child.join(MP_TIMEOUT)
            assert child.exitcode == 0
        pool.close()
        wait_for(lambda: all_returned(second.stats()))
