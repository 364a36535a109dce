"""Claiming a handed-over slot by its ticket word, without a manager round trip."""

from __future__ import annotations

import os
from typing import Any

import pytest
from conftest import assert_balanced, client_entries, wait_for

import shmpool
from shmpool import buffer
from shmpool.client import CLAIMED

pytestmark = pytest.mark.skipif(not buffer.SPEEDUPS, reason="ticket words need the C extension")

SIZE = 5000  # an 8 KiB slot


@pytest.fixture
def mgr() -> Any:
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="16MiB", transit_timeout=30) as m:
        yield m


def _mapped(sender: shmpool.Pool, receiver: shmpool.Pool) -> None:
    """Let the receiver map the sender's 8 KiB segment (the first attach asks the manager)."""
    lease = sender.acquire(SIZE)
    receiver.attach(lease.detach()).release()


def _ticket(pool: shmpool.Pool, handle: shmpool.Handle) -> int:
    seg = pool._segments[handle.segment]
    return int(buffer._speedups.load64(seg.tickets, 8 * handle.index))


def test_the_manager_says_tickets_are_on(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as pool:
        assert pool._tickets_on
        lease = pool.acquire(SIZE)
        handle = lease.detach()
        assert _ticket(pool, handle) == handle.token  # published before the handle left
        pool.attach(handle).release()


def test_a_claim_sends_one_notice_and_waits_for_nothing(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        lease = a.acquire(SIZE)
        lease.view[:4] = b"tick"
        handle = lease.detach()
        before = b.messages
        got = b.attach(handle)
        assert b.messages == before + 1  # the Claimed notice, no request
        assert bytes(got.view[:4]) == b"tick"
        stats = wait_for(lambda: (s := a.stats())["in_transit"] == 0 and s)
        assert_balanced(stats)
        mine = client_entries(stats, os.getpid())
        assert sum(c["leased"] for c in mine) >= 1
        assert _ticket(b, handle) == 0  # the manager cleared the claim
        got.release()


def test_forged_and_repeated_claims_are_refused_locally(mgr: shmpool.ManagerProcess) -> None:
    with mgr.connect() as a, mgr.connect() as b:
        _mapped(a, b)
        handle = a.acquire(SIZE).detach()
        before = b.messages
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle._replace(token=handle.token ^ 2))
        assert b.messages == before  # refused without asking anyone
        b.attach(handle).release()
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        with pytest.raises(shmpool.StaleHandleError):
            a.attach(handle)
        assert_balanced(a.stats())


def test_expiry_wins_against_a_late_claim() -> None:
    with (
        shmpool.start(memory="16MiB", transit_timeout=0.3) as m,
        m.connect() as a,
        m.connect() as b,
    ):
        _mapped(a, b)
        handle = a.acquire(SIZE).detach()
        wait_for(lambda: a.stats()["in_transit"] == 0)
        assert _ticket(b, handle) == 0
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        assert_balanced(a.stats())


def _claim_and_die(address: str, handle: shmpool.Handle, w: int) -> None:
    """A receiver that takes the slot by its ticket and dies before saying so."""
    try:
        pool = shmpool.connect(address, name="claimer")
        pool.acquire(SIZE).release()  # maps the segment the handle names
        seg = pool._segments[handle.segment]
        ok = buffer._speedups.cas64(
            seg.tickets, 8 * handle.index, handle.token, CLAIMED | pool.client_id
        )
        os.write(w, b"1" if ok else b"0")
    finally:
        os._exit(0)  # no Claimed notice, no goodbye


@pytest.mark.timeout(60)
def test_a_claimer_that_dies_before_its_notice_frees_the_slot() -> None:
    with shmpool.start(memory="16MiB", transit_timeout=0.5) as m, m.connect() as a:
        lease = a.acquire(SIZE)
        handle = lease.detach()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _claim_and_die(m.address, handle, w)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"1"
        os.waitpid(pid, 0)
        stats = wait_for(lambda: (s := a.stats())["in_transit"] == 0 and s, timeout=10)
        assert not client_entries(stats, pid)
        assert_balanced(stats)
        assert _ticket(a, handle) == 0  # reset when the slot went back
        with pytest.raises(shmpool.StaleHandleError):
            a.attach(handle)
