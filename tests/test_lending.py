"""Lending class slots by their ticket words: chains, deaths, expiry and mixed clients.

With the C extension, ``detach()`` of a class slot *lends* it: the lender writes
``lent_word`` into the slot's ticket word and tells nobody; a receiver claims it
by compare-and-swap (``claim_word``) and, on release, writes ``returned_word``,
which the lender takes back into its cache. A borrower may hand the slot on.

Covered here:

* a chain A -> B -> C and back to A, without a message to the manager;
* a lender killed before its handle is attached (attached late, or expired);
* a lender killed while a borrower holds the slot (the slot becomes the borrower's);
* a borrower killed holding the slot (the slot goes back to its lender);
* ``share()`` of a borrowed lease (refused; the lease stays usable);
* a single-process stress of three pools lending, borrowing and handing on;
* a borrower without the C extension (it returns the slot by a notice).

Worker functions live at module level so that spawn and forkserver children can
import them; they get the manager's address explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import pickle
import random
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries, wait_for
from test_handoff import _reap, _recv, assert_transit_balanced, class_of, pattern
from test_tickets import _pure, _token

import shmpool
from shmpool import buffer, janitor
from shmpool.buffer import _Borrowed, _Slot
from shmpool.protocol import claim_word, lent_word, returned_word

pytestmark = pytest.mark.skipif(not buffer.SPEEDUPS, reason="lending needs the C extension")

KiB = 1024
SIZE = 5000  # an 8 KiB slot (class 1 of a manager with min_size 4 KiB)
SLOT = 8 * KiB
CLASS = 1


# ------------------------------------------------------------ helpers


def _pool(address: str, name: str) -> shmpool.Pool:
    """A pool that keeps its cache (no idle return), so a test can look into it."""
    return shmpool.Pool(address, name=name, idle_timeout=None)


def _word(pool: shmpool.Pool, handle: shmpool.Handle) -> int:
    """The ticket word of ``handle``'s slot, as ``pool`` (which mapped it) sees it."""
    tickets = pool._conn.segments[handle.segment].tickets
    return int(buffer._speedups.load64(tickets, 8 * handle.index))


def _cached(pool: shmpool.Pool, handle: shmpool.Handle) -> _Slot | None:
    """The slot of ``handle`` if it sits in one of ``pool``'s class caches."""
    for cache in pool._caches:
        for slot in list(cache):
            if (slot.ref.segment, slot.ref.index) == (handle.segment, handle.index):
                return slot
    return None


def _entry(stats: dict[str, Any], pool: shmpool.Pool) -> dict[str, Any]:
    """The manager's record of ``pool``'s connection."""
    (entry,) = [c for c in stats["clients"] if c["id"] == pool.client_id]
    return entry


def _mapped(lender: shmpool.Pool, *receivers: shmpool.Pool) -> None:
    """Let each receiver map the lender's 8 KiB segment; the lender takes the slots back."""
    for receiver in receivers:
        receiver.attach(lender.acquire(SIZE).detach()).release()
    with lender._conn.lock:
        assert lender._lending.reclaim_lent() == len(receivers)
    assert not lender._lending.lent


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(MP_TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL


def _gone(pool: shmpool.Pool, pid: int) -> dict[str, Any]:
    """Wait until the manager dropped ``pid``'s connection; its stats then."""
    stats: dict[str, Any] = wait_for(lambda: not client_entries(s := pool.stats(), pid) and s)
    return stats


@pytest.fixture
def quiet_janitors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Janitors that sleep for an hour: only the pools' own calls send or take back."""
    monkeypatch.setattr(janitor, "JANITOR_PERIOD", 3600.0)


# ------------------------------------------------------------ children


def lend_and_hang(address: str, conn: Any, done: Any) -> None:
    """Lease a slot, write a pattern, lend it (detach) to the parent, wait to be killed."""
    pool = shmpool.connect(address, name="doomed-lender")
    lease = pool.acquire(SIZE)
    lease.view[:] = pattern("lender|", SIZE)
    conn.send((os.getpid(), lease.detach()))
    done.wait(MP_TIMEOUT)  # never set: the test kills us first
    pool.close()


@contextlib.contextmanager
def _lender(ctx: Any, address: str) -> Iterator[tuple[Any, int, shmpool.Handle]]:
    """A child (``lend_and_hang``) that lent a slot: it, its pid, the handle; reaped after."""
    parent_end, child_end = ctx.Pipe()
    done = ctx.Event()
    proc = ctx.Process(target=lend_and_hang, args=(address, child_end, done))
    proc.start()
    child_end.close()
    try:
        pid, handle = _recv(parent_end)
        yield proc, pid, handle
    finally:
        _reap(proc)
        parent_end.close()


def borrow_and_hang(address: str, conn: Any, done: Any) -> None:
    """Attach the handle the parent sends, report what we see, wait to be killed."""
    pool = shmpool.connect(address, name="doomed-borrower")
    handle = conn.recv()
    lease = pool.attach(handle)
    intact = bytes(lease.view) == pattern("lender|", handle.length)
    conn.send((os.getpid(), pool.client_id, type(lease._slot.home).__name__, intact))
    done.wait(MP_TIMEOUT)  # never set: the test kills us first
    lease.release()
    pool.close()


# ----------------------------------------------------------- a chain


@pytest.mark.timeout(60)
def test_a_chain_of_borrowers_sends_nothing_and_the_slot_comes_home(
    manager: shmpool.ManagerProcess, quiet_janitors: None
) -> None:
    """A lends to B, B hands on to C, C releases: back in A's cache, no message sent."""
    with (
        _pool(manager.address, "a") as a,
        _pool(manager.address, "b") as b,
        _pool(manager.address, "c") as c,
    ):
        _mapped(a, b, c)
        lease = a.acquire(SIZE)
        lease.view[:] = pattern("from a|", SIZE)
        assert (
            lease._slot.ref.segment in b._conn.segments
            and lease._slot.ref.segment in c._conn.segments
        )
        sent = (a.messages, b.messages, c.messages)

        h1 = lease.detach()
        assert _word(a, h1) == lent_word(_token(h1), h1.generation)
        assert [s.ref[:2] for s in a._lending.lent] == [(h1.segment, h1.index)]
        lent = manager.stats()  # through a connection of its own: our counters stay
        assert lent["in_transit"] == 1 and class_of(lent, SLOT)["in_transit"] == 1
        assert_transit_balanced(lent)

        got_b = b.attach(h1)
        assert got_b._slot.home is b._lending.borrowed
        assert _word(a, h1) == claim_word(b.client_id, h1.generation)
        assert bytes(got_b.view) == pattern("from a|", SIZE)
        got_b.view[:6] = b"from b"

        h2 = got_b.detach()  # handed on: lent under b's token, one generation on
        assert got_b.closed
        assert (h2.segment, h2.index) == (h1.segment, h1.index)
        assert h2.generation == h1.generation + 1 and h2.token != h1.token
        assert _word(a, h2) == lent_word(_token(h2), h2.generation)
        with pytest.raises(shmpool.StaleHandleError):
            c.attach(h1)  # refused at the word: the first handle was used

        got_c = c.attach(h2)
        assert got_c._slot.home is c._lending.borrowed
        assert _word(a, h2) == claim_word(c.client_id, h2.generation)
        assert bytes(got_c.view) == b"from b" + pattern("from a|", SIZE)[6:]
        held = manager.stats()
        assert held["in_transit"] == 0
        assert _entry(held, c)["leased"] == 1  # the claimer's, by its word
        assert _entry(held, b)["leased"] == 0
        assert_transit_balanced(held)
        assert_balanced(held)

        got_c.release()
        assert _word(a, h2) == returned_word(h2.generation)
        assert (a.messages, b.messages, c.messages) == sent  # not a word to the manager
        assert a._lending.lent  # not taken back yet: the janitors sleep

        with a._conn.lock:
            assert a._lending.reclaim_lent() == 1
        assert not a._lending.lent
        assert _word(a, h2) == 0
        slot = _cached(a, h2)
        assert slot is not None and slot.home is a._caches[CLASS]
        assert slot.ref.generation == h2.generation  # moved on by the hop B made
        assert (a.messages, b.messages, c.messages) == sent

        for pool, handle in ((b, h1), (c, h2), (a, h2)):
            with pytest.raises(shmpool.StaleHandleError):
                pool.attach(handle)
        back = a.acquire(SIZE)  # the slot is usable again, from A's cache
        assert (back._slot.ref.segment, back._slot.ref.index) == (h2.segment, h2.index)
        handle = back.detach()
        assert handle.generation == h2.generation + 1  # newer than every handle before
        b.attach(handle).release()
        stats = a.stats()
        assert stats["in_transit"] == 0
        assert_transit_balanced(stats)
        for pool in (a, b, c):
            pool.trim()
        wait_for(lambda: all_returned(a.stats()))


# ------------------------------------------------- a lender that dies


@pytest.mark.timeout(MP_TIMEOUT * 2)
@pytest.mark.parametrize("mapped", [False, True], ids=["via-manager", "by-word"])
def test_a_handle_attached_after_its_lender_was_killed(
    manager: shmpool.ManagerProcess, mp_context: Any, mapped: bool
) -> None:
    """The orphaned slot waits in transit; a late attach gets it, content intact.

    ``mapped``: the receiver has the lender's segment mapped already, so it
    claims the word itself; otherwise the manager hands it over.
    """
    with _pool(manager.address, "late-receiver") as pool:
        if mapped:
            pool.acquire(SIZE).release()  # maps the 8 KiB segment the lender will use
        with _lender(mp_context, manager.address) as (proc, pid, handle):
            assert (handle.segment in pool._conn.segments) == mapped
            _kill(proc)
            dropped = _gone(pool, pid)
            assert dropped["in_transit"] == 1  # the lender's exit did not free it
            assert class_of(dropped, SLOT)["in_transit"] == 1
            assert_transit_balanced(dropped)
            before = _entry(dropped, pool)["leased"]

            got = pool.attach(handle)
            assert bytes(got.view) == pattern("lender|", SIZE)
            held = pool.stats()  # settles a claim made by the word: the slot is ours now
            assert held["in_transit"] == 0
            assert _entry(held, pool)["leased"] == before + 1
            assert_transit_balanced(held)
            assert _word(pool, handle) == 0  # nobody to give it back to
            with pytest.raises(shmpool.StaleHandleError):
                pool.attach(handle)

            got.release()
            slot = _cached(pool, handle)
            assert slot is not None and slot.ref.generation == handle.generation
            stats = pool.stats()
            assert stats["in_transit"] == 0
            assert_transit_balanced(stats)
            assert_balanced(stats)
            pool.trim()
            wait_for(lambda: all_returned(pool.stats()))


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_a_killed_lenders_handle_expires(mp_context: Any) -> None:
    """Nobody attaches: after the transit timeout the slot is free and the handle stale."""
    with (
        shmpool.start(memory="16MiB", transit_timeout=0.5) as mgr,
        mgr.connect(name="bystander") as pool,
        _lender(mp_context, mgr.address) as (proc, pid, handle),
    ):
        assert pool.stats()["in_transit"] == 1  # lent, unclaimed
        _kill(proc)
        _gone(pool, pid)
        freed = wait_for(lambda: (s := pool.stats())["in_transit"] == 0 and s)
        assert class_of(freed, SLOT)["in_transit"] == 0
        assert_transit_balanced(freed)
        assert_balanced(freed)
        with pytest.raises(shmpool.StaleHandleError):
            pool.attach(handle)
        pool.trim()
        wait_for(lambda: all_returned(pool.stats()))


@pytest.mark.timeout(MP_TIMEOUT * 2)
@pytest.mark.parametrize("mapped", [False, True], ids=["via-manager", "by-word"])
def test_a_lender_killed_while_we_hold_its_slot(
    manager: shmpool.ManagerProcess, mp_context: Any, mapped: bool
) -> None:
    """The manager gives the slot to its borrower; released, it joins the borrower's cache."""
    with _pool(manager.address, "borrower") as pool:
        if mapped:
            pool.acquire(SIZE).release()
        with _lender(mp_context, manager.address) as (proc, pid, handle):
            assert (handle.segment in pool._conn.segments) == mapped
            got = pool.attach(handle)
            assert got._slot.home is pool._lending.borrowed
            assert _word(pool, handle) == claim_word(pool.client_id, handle.generation)
            held = pool.stats()
            before = _entry(held, pool)["leased"]
            assert held["in_transit"] == 0
            assert_transit_balanced(held)

            _kill(proc)
            gone = _gone(pool, pid)
            assert _word(pool, handle) == 0  # the manager gave it to us
            assert gone["in_transit"] == 0
            assert _entry(gone, pool)["leased"] == before  # still ours, in the books now
            assert_transit_balanced(gone)
            assert bytes(got.view) == pattern("lender|", SIZE)  # the dead lender's bytes
            got.view[:4] = b"mine"

            got.release()
            slot = _cached(pool, handle)
            assert slot is not None and slot.home is pool._caches[CLASS]
            assert slot.ref.generation == handle.generation
            assert bytes(slot.view[:4]) == b"mine"
            stats = pool.stats()
            assert _entry(stats, pool)["leased"] == before  # in our cache: still leased to us
            assert stats["in_transit"] == 0
            assert_transit_balanced(stats)
            assert_balanced(stats)
            again = pool.acquire(SIZE)  # and it serves our own acquires
            assert (again._slot.ref.segment, again._slot.ref.index) == (
                handle.segment,
                handle.index,
            )
            again.release()
            pool.trim()
            wait_for(lambda: all_returned(pool.stats()))


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_a_borrower_hands_on_a_slot_whose_lender_died(
    manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    """The slot became the borrower's: it lends it on as one of its own."""
    with _pool(manager.address, "borrower") as pool, _pool(manager.address, "next") as nxt:
        pool.acquire(SIZE).release()
        nxt.acquire(SIZE).release()
        with _lender(mp_context, manager.address) as (proc, pid, handle):
            got = pool.attach(handle)
            _kill(proc)
            _gone(pool, pid)
            assert _word(pool, handle) == 0  # the manager gave it to us
            onward = got.detach()  # lent on, as a slot of our own
            assert got.closed
            assert onward.generation == handle.generation + 1
            assert _word(pool, handle) == lent_word(_token(onward), onward.generation)
            there = nxt.attach(onward)
            assert bytes(there.view) == pattern("lender|", SIZE)
            there.release()
            stats = pool.stats()
            assert stats["in_transit"] == 0
            assert_balanced(stats)
            pool.trim()
            nxt.trim()
            wait_for(lambda: all_returned(pool.stats()))


# ----------------------------------------------- a borrower that dies


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_a_borrower_killed_holding_the_slot(
    manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    """The manager writes the returned word for the dead borrower; the lender takes it back."""
    parent_end, child_end = mp_context.Pipe()
    done = mp_context.Event()
    proc = mp_context.Process(target=borrow_and_hang, args=(manager.address, child_end, done))
    proc.start()
    child_end.close()
    try:
        with _pool(manager.address, "lender") as lender:
            lease = lender.acquire(SIZE)
            lease.view[:] = pattern("lender|", SIZE)
            handle = lease.detach()
            parent_end.send(handle)
            pid, client_id, home, intact = _recv(parent_end)
            assert pid == proc.pid
            assert (home, intact) == ("_Borrowed", True)
            assert _word(lender, handle) == claim_word(client_id, handle.generation)
            held = lender.stats()
            (entry,) = client_entries(held, pid)
            assert entry["leased"] == 1
            assert held["in_transit"] == 0
            assert_transit_balanced(held)
            assert lender._lending.lent

            _kill(proc)
            _gone(lender, pid)
            # the lender's janitor takes it back
            wait_for(lambda: not lender._lending.lent and _cached(lender, handle))
            slot = _cached(lender, handle)
            assert slot is not None and slot.home is lender._caches[CLASS]
            assert slot.ref.generation == handle.generation
            assert _word(lender, handle) == 0
            stats = lender.stats()
            assert stats["in_transit"] == 0
            assert_transit_balanced(stats)
            assert_balanced(stats)
            with pytest.raises(shmpool.StaleHandleError):
                lender.attach(handle)
            lender.trim()
            wait_for(lambda: all_returned(lender.stats()))
    finally:
        _reap(proc)
        parent_end.close()


# ------------------------------------------------------------- share


@pytest.mark.timeout(60)
def test_sharing_a_borrowed_lease_is_refused_and_harmless(
    manager: shmpool.ManagerProcess,
) -> None:
    with _pool(manager.address, "a") as a, _pool(manager.address, "b") as b:
        lease = a.acquire(SIZE)
        lease.view[:] = pattern("shared?|", SIZE)
        handle = lease.detach()
        got = b.attach(handle)
        assert got._slot.home is b._lending.borrowed
        sent = b.messages
        for readers in (1, 3):
            with pytest.raises(shmpool.UsageError):
                got.share(readers)
        assert b.messages == sent
        assert not got.closed
        assert _word(a, handle) == claim_word(b.client_id, handle.generation)  # still b's
        assert bytes(got.view) == pattern("shared?|", SIZE)
        got.view[:5] = b"still"
        assert bytes(got.view[:5]) == b"still"

        got.release()
        assert got.closed
        assert _word(a, handle) == returned_word(handle.generation)
        wait_for(lambda: not a._lending.lent and _cached(a, handle))  # a's janitor takes it back
        assert _word(a, handle) == 0
        stats = a.stats()
        assert stats["in_transit"] == 0
        assert_transit_balanced(stats)
        assert_balanced(stats)
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)


# ------------------------------------------------------------ stress


STRESS_SEED = 20240611
STRESS_STEPS = 3000
STRESS_SIZES = (100, 5000, 70_000)
STRESS_HELD = 24  # above this many leases held, the steps give some back


def _check_content(lease: shmpool.Lease, tag: str) -> None:
    n = len(lease.view)
    assert bytes(lease.view) == pattern(tag, n), (lease, tag)


@pytest.mark.timeout(120)
def test_stress_lending_among_three_pools(manager: shmpool.ManagerProcess) -> None:
    """Random acquires, lends, attaches (by word or through the manager), hand-ons, releases.

    Every lease holds a pattern unique to the step that last wrote it; any
    slot held twice, or taken back while in use, shows up as a wrong pattern.
    Besides the janitors (and the refills, in C), the steps take back
    returned slots themselves, as the janitor does, so that it happens often.
    """
    rng = random.Random(STRESS_SEED)
    pools = [manager.connect(name=f"stress{i}") for i in range(3)]
    held: list[tuple[shmpool.Lease, str]] = []  # (lease, the tag its content repeats)
    handles: list[tuple[shmpool.Handle, str]] = []
    kinds = ("acquire", "lend", "hand on", "pickled", "attach", "release", "taken back")
    counts = dict.fromkeys(kinds, 0)
    try:
        for step in range(STRESS_STEPS):
            ops = ["acquire"] * (3 if len(held) < STRESS_HELD else 0)
            ops += ["detach", "detach", "release"] * bool(held)
            ops += ["release"] * (len(held) >= STRESS_HELD)
            ops += ["attach", "attach", "attach"] * bool(handles)
            ops += ["take back"]
            op = rng.choice(ops)
            if op == "acquire":
                size = rng.choice(STRESS_SIZES)
                lease = rng.choice(pools).acquire(size)
                tag = f"acquired {step}|"
                lease.view[:] = pattern(tag, size)
                counts["acquire"] += 1
                held.append((lease, tag))
            elif op == "detach":
                lease, tag = held.pop(rng.randrange(len(held)))
                _check_content(lease, tag)
                tag = f"sent {step}|"
                lease.view[:] = pattern(tag, len(lease.view))
                borrowed = type(lease._slot.home) is _Borrowed
                counts["hand on" if borrowed else "lend"] += 1
                if rng.random() < 0.3:  # what pickling sends: the C hand_off when it applies
                    counts["pickled"] += 1
                    _, fields = lease.__reduce__()
                    handle = shmpool.Handle(*fields)
                else:
                    handle = lease.detach()
                assert lease.closed
                handles.append((handle, tag))
            elif op == "attach":
                handle, tag = handles.pop(rng.randrange(len(handles)))
                lease = rng.choice(pools).attach(handle)
                assert len(lease.view) == handle.length
                _check_content(lease, tag)
                counts["attach"] += 1
                held.append((lease, tag))
            elif op == "release":
                lease, tag = held.pop(rng.randrange(len(held)))
                _check_content(lease, tag)
                lease.release()
                counts["release"] += 1
            else:
                pool = rng.choice(pools)
                with pool._conn.lock:
                    counts["taken back"] += pool._lending.reclaim_lent()
            if step % 500 == 499:
                stats = rng.choice(pools).stats()
                assert_balanced(stats)
                assert_transit_balanced(stats)
                assert stats["in_transit"] == len(handles)  # each unclaimed lend, by its word

        for lease, tag in held:
            _check_content(lease, tag)
            lease.release()
        for handle, tag in handles:
            lease = rng.choice(pools).attach(handle)
            _check_content(lease, tag)
            lease.release()
        held.clear()
        handles.clear()
        assert min(counts.values()) > 100, counts  # every kind of step was taken, often
        stats = pools[0].stats()
        assert stats["in_transit"] == 0
        assert_balanced(stats)
        for pool in pools:
            pool.trim()
        wait_for(lambda: all_returned(pools[0].stats()))
        assert not any(pool._lending.lent for pool in pools)
    finally:
        for lease, _ in held:
            lease.release()
        for pool in pools:
            pool.close()


# ------------------------------------------------ a pure-Python borrower


PURE_BORROWER = """
import hashlib, pickle, sys
import shmpool
from shmpool import buffer
assert not buffer.SPEEDUPS
pool = shmpool.connect(sys.argv[1], name="pure-borrower")
lease = pool.attach(pickle.loads(bytes.fromhex(sys.stdin.readline())))
try:
    lease.detach()
    refused = "handed on"
except shmpool.UsageError:
    refused = "refused"
print(type(lease._slot.home).__name__, hashlib.sha256(lease.view).hexdigest(), refused)
sys.stdout.flush()
lease.release()
print("released")
sys.stdout.flush()
sys.stdin.read()  # stay connected: its janitor, not its close, sends the notice
pool.close()
"""


@pytest.fixture
def pure_borrower(manager: shmpool.ManagerProcess, tmp_path: Any) -> Iterator[Any]:
    proc = _pure(PURE_BORROWER, manager.address, tmp_path)
    try:
        yield proc
    finally:
        if proc.returncode is None:  # the test did not see it out
            proc.kill()
            proc.communicate(timeout=MP_TIMEOUT)


@pytest.mark.timeout(MP_TIMEOUT)
def test_a_borrower_without_the_extension_returns_the_slot_by_notice(
    manager: shmpool.ManagerProcess, pure_borrower: Any
) -> None:
    proc = pure_borrower
    with _pool(manager.address, "lender") as lender:
        lease = lender.acquire(SIZE)
        lease.view[:] = pattern("to a pure borrower|", SIZE)
        handle = lease.detach()
        assert lender._lending.lent
        proc.stdin.write(pickle.dumps(handle).hex() + "\n")
        proc.stdin.flush()

        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        home, digest, hand_on = line.split()
        assert home == "_Borrowed"  # lent to it: the manager claimed the word for it
        assert digest == hashlib.sha256(pattern("to a pure borrower|", SIZE)).hexdigest()
        assert hand_on == "refused"  # no atomics there: it cannot lend the slot on
        assert proc.stdout.readline() == "released\n"

        # its janitor sends NOTICE_RETURNED; the manager writes the word; ours takes it back
        wait_for(lambda: not lender._lending.lent and _cached(lender, handle))
        assert proc.poll() is None  # still connected: its close did not do it
        assert _word(lender, handle) == 0
        slot = _cached(lender, handle)
        assert slot is not None and slot.ref.generation == handle.generation
        stats = lender.stats()
        (entry,) = client_entries(stats, proc.pid)
        assert entry["leased"] == 0
        assert stats["in_transit"] == 0
        assert_transit_balanced(stats)
        assert_balanced(stats)
        with pytest.raises(shmpool.StaleHandleError):
            lender.attach(handle)

        out, err = proc.communicate("", timeout=MP_TIMEOUT)
        assert (proc.returncode, out) == (0, ""), err
        lender.trim()
        wait_for(lambda: all_returned(lender.stats()))


# ------------------------------------------------ found in review (regressions)


def _dead_lender(address: str) -> tuple[int, shmpool.Handle]:
    """A forked child that lends a slot and is killed: its pid and its handle, unattached."""
    with _lender(multiprocessing.get_context("fork"), address) as (proc, pid, handle):
        _kill(proc)
    return pid, handle


@pytest.mark.timeout(MP_TIMEOUT)
def test_an_orphan_handed_on_keeps_its_time_when_stats_are_read(
    manager: shmpool.ManagerProcess,
) -> None:
    """Reading stats (which settles orphans without a clock) must not expire a handle."""
    with _pool(manager.address, "b") as b, _pool(manager.address, "c") as c:
        b.acquire(SIZE).release()  # maps the segment: b claims by word, no message
        pid, handle = _dead_lender(manager.address)
        _gone(b, pid)
        onward = b.attach(handle).detach()  # claimed and handed on, the manager unaware
        b.stats()
        b.stats()  # a manager loop turn in between, with stats read
        got = c.attach(onward)  # well within the 30 s transit timeout
        assert bytes(got.view) == pattern("lender|", SIZE)
        got.release()
        stats = c.stats()
        assert_balanced(stats)
        b.trim()
        c.trim()
        wait_for(lambda: all_returned(c.stats()))


@pytest.mark.timeout(MP_TIMEOUT)
def test_pickling_a_lease_another_thread_releases_lends_nothing(
    manager: shmpool.ManagerProcess,
) -> None:
    """The lease closes once: a release that comes first makes pickling refuse."""
    import threading

    with _pool(manager.address, "p") as p, _pool(manager.address, "q") as q:
        _mapped(p, q)
        lease = p.acquire(SIZE)
        out: dict[str, Any] = {}

        def pickle_it() -> None:
            try:
                out["data"] = pickle.dumps(lease)
            except shmpool.LeaseClosedError as exc:
                out["error"] = exc

        with p._conn.lock:  # the pickler waits for it, inside hand_off
            thread = threading.Thread(target=pickle_it)
            thread.start()
            wait_for(lambda: thread.is_alive())
            lease.release()  # the owner releases meanwhile...
            again = p.acquire(SIZE)  # ...and acquires the same slot again
        thread.join(MP_TIMEOUT)
        assert "error" in out and "data" not in out
        assert not any(slot is again._slot for slot in p._lending.lent)
        assert _word(p, shmpool.Handle(0, *again._slot.ref, 0, 0, 0, 0)) == 0
        again.release()
        assert_balanced(p.stats())


@pytest.mark.timeout(MP_TIMEOUT)
def test_a_consumer_that_lends_on_takes_its_slot_back(manager: shmpool.ManagerProcess) -> None:
    """A pool that never acquired still runs the janitor once it lends."""
    with _pool(manager.address, "c") as c, shmpool.Pool(manager.address, name="b") as b:
        c.acquire(SIZE).release()
        pid, handle = _dead_lender(manager.address)
        got = b.attach(handle)
        _gone(c, pid)
        onward = got.detach()  # the slot is b's now: lent on as b's own
        assert b._lending.lent and b._janitor is not None
        c.attach(onward).release()  # returned to b, by its word
        wait_for(lambda: not b._lending.lent and _word(b, handle) == 0)
        assert _cached(b, handle) is not None
        assert_balanced(c.stats())
