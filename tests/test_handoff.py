"""Handing a leased slot to another process: Lease.detach, Pool.attach, pickled Leases.

Worker functions live at module level so that spawn and forkserver children can
import them. A forkserver child inherits the environment of the forkserver (started
before any manager), not ``$SHMPOOL_ADDRESS``, so children get the address explicitly
except in the one test that relies on the variable (spawn only).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
from typing import Any

import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries, wait_for

import shmpool

KiB = 1024
MiB = 1024 * KiB
#: Class sizes of the default manager, and one above the 1 MiB max_size used below.
SIZES = (100, 5000, 70_000, 3 * MiB)


def pattern(tag: str, n: int) -> bytes:
    """``n`` bytes repeating ``tag``: a content only its writer would produce."""
    unit = tag.encode()
    return (unit * (n // len(unit) + 1))[:n]


def slot_state(stats: dict[str, Any]) -> dict[str, Any]:
    """What a refused attach must leave unchanged: every slot count and the memory."""
    return {
        "classes": stats["classes"],
        "oversize": stats["oversize"],
        "in_transit": stats["in_transit"],
        "mapped_bytes": stats["mapped_bytes"],
    }


def assert_transit_balanced(stats: dict[str, Any]) -> None:
    """Per class total == free + leased + in_transit; the top-level count covers them."""
    for cls in stats["classes"]:
        assert cls["total"] == cls["free"] + cls["leased"] + cls["in_transit"], cls
        assert min(cls["free"], cls["leased"], cls["in_transit"]) >= 0, cls
    assert stats["in_transit"] >= sum(cls["in_transit"] for cls in stats["classes"])
    assert stats["committed_bytes"] <= stats["memory_limit"]


def class_of(stats: dict[str, Any], size: int) -> dict[str, Any]:
    return next(c for c in stats["classes"] if c["size"] == size)


def _get(q: Any, timeout: float = MP_TIMEOUT) -> Any:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message from a child within {timeout} s") from None


def _recv(conn: Any, timeout: float = MP_TIMEOUT) -> Any:
    if not conn.poll(timeout):
        raise AssertionError(f"no message from a child within {timeout} s")
    return conn.recv()


def _reap(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(MP_TIMEOUT)


@pytest.fixture
def pool(manager: shmpool.ManagerProcess):
    with manager.connect(name="test-handoff") as p:
        yield p


@pytest.fixture
def manager_1m():
    """Classes up to 1 MiB, so an oversize lease (3 MiB) fits the 64 MiB budget."""
    with shmpool.start(max_size="1MiB", memory="64MiB") as mgr:
        yield mgr


# ------------------------------------------------------------ children


def handle_echo_child(address: str, conn: Any) -> None:
    """Attach every handle received, check the parent's pattern, write ours, detach back."""
    with shmpool.connect(address, name="echo") as pool:
        while True:
            item = conn.recv()
            if item is None:
                break
            handle, expected_tag = item
            lease = pool.attach(handle)
            report = {
                "pid": os.getpid(),
                "length": len(lease.view),
                "capacity": lease.capacity,
                "intact": bytes(lease.view) == pattern(expected_tag, handle.length),
            }
            lease.view[:] = pattern(f"child{handle.length}|", len(lease.view))
            conn.send((report, lease.detach()))
    conn.close()


def lease_queue_child(address: str, inbox: Any, outbox: Any) -> None:
    """Receive Leases (unpickled: attached here), check, rewrite, send the Leases back."""
    with shmpool.connect(address, name="queue-child") as pool:
        while True:
            lease = inbox.get(timeout=MP_TIMEOUT)
            if lease is None:
                break
            n = len(lease.view)
            report = {
                "type": type(lease).__name__,
                "intact": bytes(lease.view) == pattern(f"parent{n}|", n),
                "mine": client_entries(pool.stats(), os.getpid())[0]["leased"] >= 1,
            }
            lease.view[:] = pattern(f"child{n}|", n)
            outbox.put((report, lease))
        # A Queue pickles in its feeder thread: flush it while our pool is still open.
        outbox.close()
        outbox.join_thread()


def detach_and_hang(address: str, conn: Any, done: Any) -> None:
    """Lease a slot, detach it, hand the handle to the parent, then wait to be killed."""
    pool = shmpool.connect(address, name="doomed-sender")
    lease = pool.acquire(5000)
    lease.view[:] = pattern("doomed", 5000)
    conn.send((os.getpid(), lease.detach()))
    done.wait(MP_TIMEOUT)  # never set: the test kills us first
    pool.close()


def attach_and_hang(address: str, conn: Any, done: Any) -> None:
    """Attach the handle the parent sends, report, then wait to be killed."""
    pool = shmpool.connect(address, name="doomed-receiver")
    handle = conn.recv()
    lease = pool.attach(handle)
    conn.send((os.getpid(), bytes(lease.view)))
    done.wait(MP_TIMEOUT)  # never set: the test kills us first
    lease.release()
    pool.close()


_WORKER_POOL: shmpool.Pool | None = None


def connect_worker(address: str) -> None:
    """multiprocessing.Pool initializer: one open pool per worker."""
    global _WORKER_POOL
    _WORKER_POOL = shmpool.connect(address, name="map-worker")


def rewrite_lease(item: tuple[int, shmpool.Lease]) -> tuple[int, bool, int, shmpool.Lease]:
    """Check the parent's pattern in a Lease received as an argument; return it rewritten."""
    i, lease = item
    n = len(lease.view)
    intact = bytes(lease.view) == pattern(f"arg{i}|", n)
    lease.view[:] = pattern(f"result{i}|", n)
    return i, intact, os.getpid(), lease


# ----------------------------------------------------- one process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [100, 5000, 70_000, 1 * MiB])
def test_detach_attach_in_one_process(manager: shmpool.ManagerProcess, size: int) -> None:
    with manager.connect(name="a") as a, manager.connect(name="b") as b:
        lease = a.acquire(size)
        lease.view[:] = pattern("sender|", size)
        ref = lease._slot.ref
        capacity = lease.capacity
        peek = lease.view[:]  # a slice outlives the lease: it shows the same memory

        handle = lease.detach()
        assert isinstance(handle, shmpool.Handle)
        assert handle.instance == a.manager_instance == b.manager_instance
        assert (handle.segment, handle.index) == (ref.segment, ref.index)
        assert handle.generation > ref.generation
        assert handle.length == size
        assert handle.capacity == capacity
        assert lease.closed
        with pytest.raises(shmpool.LeaseClosedError):
            lease.view  # noqa: B018

        got = b.attach(handle)
        assert len(got.view) == size
        assert got.capacity == capacity
        assert (got._slot.ref.segment, got._slot.ref.index) == (ref.segment, ref.index)
        assert bytes(got.view) == pattern("sender|", size)

        # No copy: what b writes is in the very memory a's old slice shows.
        got.view[:] = pattern("receiver|", size)
        assert bytes(peek) == pattern("receiver|", size)
        peek.release()

        stats = b.stats()
        assert stats["in_transit"] == 0
        assert_transit_balanced(stats)
        (entry,) = [c for c in stats["clients"] if c["name"] == "b"]
        assert entry["leased"] == 1  # the attached slot, and nothing else
        got.release()
        assert got.closed


@pytest.mark.timeout(60)
def test_attach_back_in_the_same_pool(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    lease.view[:] = pattern("same|", 5000)
    handle = lease.detach()
    again = pool.attach(handle)
    assert bytes(again.view) == pattern("same|", 5000)
    again.view[:10] = b"0123456789"
    handle2 = again.detach()
    assert handle2.generation > handle.generation
    assert handle2.token != handle.token
    last = pool.attach(handle2)
    assert bytes(last.view[:10]) == b"0123456789"
    assert bytes(last.view[10:]) == pattern("same|", 5000)[10:]
    last.release()
    stats = pool.stats()
    assert stats["in_transit"] == 0
    assert_transit_balanced(stats)


def test_handle_is_small_and_picklable(pool: shmpool.Pool) -> None:
    lease = pool.acquire(70_000)
    lease.view[:] = pattern("pickled|", 70_000)
    handle = lease.detach()
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(handle, protocol=protocol)
        assert len(data) < 100, (protocol, len(data))
        assert pickle.loads(data) == handle
    copy = pickle.loads(pickle.dumps(handle))
    assert type(copy) is shmpool.Handle
    got = pool.attach(copy)
    assert bytes(got.view) == pattern("pickled|", 70_000)
    got.release()


def test_handle_fields() -> None:
    assert shmpool.Handle._fields == (
        "instance",
        "segment",
        "index",
        "generation",
        "token",
        "length",
        "capacity",
        "readers",
    )


def test_pickling_a_lease_detaches_and_unpickling_attaches(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    lease.view[:] = pattern("whole lease|", 5000)
    data = pickle.dumps(lease)
    assert lease.closed  # the sender lost it at pickling time
    with pytest.raises(shmpool.LeaseClosedError):
        lease.view  # noqa: B018
    assert len(data) < 200
    stats = pool.stats()
    assert stats["in_transit"] == 1
    assert_transit_balanced(stats)

    got = pickle.loads(data)
    assert type(got) is shmpool.Lease
    assert bytes(got.view) == pattern("whole lease|", 5000)
    assert pool.stats()["in_transit"] == 0
    got.release()
    # the same bytes cannot be unpickled twice: the handle inside was used
    with pytest.raises(shmpool.StaleHandleError):
        pickle.loads(data)


#: Changes to a pickled Lease's fields (instance, segment, index, generation,
#: token, length, capacity, readers) that make it name a slot it does not
#: own, or make no sense. (``capacity`` and ``readers`` only say how to
#: attach: the manager decides by slot, generation and token.)
TAMPERED = {
    "token": lambda f: (*f[:4], f[4] ^ 1, *f[5:]),
    "index": lambda f: (*f[:2], f[2] + 1, *f[3:]),
    "index out of range": lambda f: (*f[:2], 1 << 40, *f[3:]),
    "negative index": lambda f: (*f[:2], -1, *f[3:]),
    "negative length": lambda f: (*f[:5], -1, *f[6:]),
    "segment": lambda f: (f[0], f[1] + 1000, *f[2:]),
    "a float": lambda f: (*f[:4], float(f[4]), *f[5:]),
    "too many": lambda f: (*f, 0),
    # the genuine token beside another generation: the ticket word mixes both
    "generation": lambda f: (*f[:3], f[3] + 1, *f[4:]),
    "older generation": lambda f: (*f[:3], f[3] - 1, *f[4:]),
}


@pytest.mark.parametrize("change", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_tampered_pickle_attaches_nothing(pool: shmpool.Pool, change: Any) -> None:
    """Unpickling takes a short path for the common case; a changed field must not.

    Whatever field a pickle stream changes, unpickling raises (a
    StaleHandleError, or TypeError for a handle with fields missing), takes
    no slot, and the genuine fields still attach once.
    """

    lease = pool.acquire(5000)
    lease.view[:] = pattern("tampered|", 5000)
    _, fields = lease.__reduce__()
    before = slot_state(pool.stats())
    with pytest.raises((shmpool.StaleHandleError, TypeError)):
        shmpool.rebuild_lease(*change(fields))
    assert slot_state(pool.stats()) == before
    got = shmpool.rebuild_lease(*fields)
    assert bytes(got.view) == pattern("tampered|", 5000)
    got.release()
    with pytest.raises(shmpool.StaleHandleError):
        shmpool.rebuild_lease(*fields)


def test_unpickling_picks_the_pool_of_the_issuing_manager(pool: shmpool.Pool) -> None:
    with shmpool.start(memory="8MiB") as other, other.connect(name="other") as other_pool:
        other_before = slot_state(other.stats())
        lease = pool.acquire(5000)
        lease.view[:] = pattern("routed|", 5000)
        got = pickle.loads(pickle.dumps(lease))
        assert bytes(got.view) == pattern("routed|", 5000)
        assert slot_state(other_pool.stats()) == other_before  # nothing landed there
        stats = pool.stats()
        assert stats["in_transit"] == 0
        got.release()


# ------------------------------------------------------------- stats


def test_in_transit_stats_and_balance(pool: shmpool.Pool) -> None:
    leases = [pool.acquire(5000) for _ in range(3)]
    before = pool.stats()
    cls = class_of(before, 8 * KiB)
    assert cls["in_transit"] == 0 and before["in_transit"] == 0
    assert_transit_balanced(before)

    handles = [lease.detach() for lease in leases[:2]]
    during = pool.stats()
    dcls = class_of(during, 8 * KiB)
    assert during["in_transit"] == 2
    assert dcls["in_transit"] == 2
    assert dcls["leased"] == cls["leased"] - 2
    assert dcls["free"] == cls["free"]
    assert dcls["total"] == cls["total"]
    assert_transit_balanced(during)
    assert sum(c["in_transit"] for c in during["classes"]) == 2

    # release() after detach does nothing: the slot stays in transit, not in our cache
    leases[0].release()
    assert slot_state(pool.stats()) == slot_state(during)

    attached = pool.attach(handles[0])
    after_one = pool.stats()
    assert after_one["in_transit"] == 1
    assert class_of(after_one, 8 * KiB)["leased"] == cls["leased"] - 1
    assert_transit_balanced(after_one)

    rest = pool.attach(handles[1])
    after = pool.stats()
    assert after["in_transit"] == 0
    assert class_of(after, 8 * KiB) == cls
    assert_transit_balanced(after)
    assert_balanced(after)
    for lease in (attached, rest, leases[2]):
        lease.release()


# ---------------------------------------------------------- refusals


@pytest.mark.timeout(60)
def test_second_attach_is_refused(manager: shmpool.ManagerProcess) -> None:
    with manager.connect(name="a") as a, manager.connect(name="b") as b:
        lease = a.acquire(5000)
        handle = lease.detach()
        got = b.attach(handle)
        before = slot_state(b.stats())
        for p in (a, b):
            with pytest.raises(shmpool.StaleHandleError):
                p.attach(handle)
        assert slot_state(b.stats()) == before
        got.view[:4] = b"live"  # the first receiver keeps its lease
        got.release()
        # still refused once the slot is free again, and once it is leased anew
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        held = [a.acquire(5000) for _ in range(8)]
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(handle)
        for lease in held:
            lease.release()
        assert_transit_balanced(a.stats())


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda h: h._replace(token=h.token ^ 1), id="token-bit"),
        pytest.param(lambda h: h._replace(token=(h.token + 1) % 2**63), id="token-next"),
        pytest.param(lambda h: h._replace(token=0), id="token-zero"),
        pytest.param(lambda h: h._replace(generation=h.generation + 1), id="generation-next"),
        pytest.param(lambda h: h._replace(generation=h.generation - 1), id="generation-prev"),
        pytest.param(lambda h: h._replace(index=h.index + 1), id="other-index"),
        pytest.param(lambda h: h._replace(segment=h.segment + 1000), id="unknown-segment"),
    ],
)
@pytest.mark.parametrize("by_ticket", [False, True], ids=["attach-message", "ticket-word"])
def test_forged_handle_is_refused(
    manager: shmpool.ManagerProcess, forge: Any, by_ticket: bool
) -> None:
    """Refused by the manager, or (segment mapped already) at the ticket word."""
    with manager.connect(name="a") as a, manager.connect(name="b") as b:
        if by_ticket:
            b.acquire(5000).release()  # b maps the class's segment: attaches go by the word
        lease = a.acquire(5000)
        lease.view[:] = pattern("genuine|", 5000)
        neighbour = a.acquire(5000)  # another slot of the same segment is leased, not in transit
        handle = lease.detach()
        assert (handle.segment in b._conn.segments) == by_ticket
        forged = forge(handle)
        assert forged != handle
        before = slot_state(a.stats())  # a request sends a's queued notice first
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(forged)
        assert slot_state(b.stats()) == before
        assert before["in_transit"] == 1
        # the refusal spent nothing: the genuine handle still attaches, and b still works
        got = b.attach(handle)
        assert bytes(got.view) == pattern("genuine|", 5000)
        got.release()
        neighbour.release()
        assert_transit_balanced(b.stats())


def _attach_outcome(pool: shmpool.Pool, handle: Any) -> str:
    """How ``pool.attach(handle)`` ends; keeps no traceback (it would pin mappings)."""
    try:
        pool.attach(handle).release()
    except shmpool.StaleHandleError:
        return "StaleHandleError"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "attached"


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda h: h._replace(token=-1), id="negative-token"),
        pytest.param(lambda h: h._replace(token=2**64), id="huge-token"),
        pytest.param(lambda h: h._replace(generation=-1), id="negative-generation"),
        pytest.param(lambda h: h._replace(index=2**70), id="huge-index"),
    ],
)
def test_out_of_range_forgery_is_a_stale_handle(manager: shmpool.ManagerProcess, forge) -> None:
    """The docs promise StaleHandleError for any forged handle, before anything is mapped."""
    with manager.connect(name="a") as a:
        handle = a.acquire(5000).detach()
        before = slot_state(a.stats())
        outcome = _attach_outcome(a, forge(handle))
        unchanged = slot_state(a.stats()) == before
        genuine = _attach_outcome(a, handle)
    assert genuine == "attached"  # the refusal spent nothing, and the pool still works
    assert unchanged
    assert outcome == "StaleHandleError"


@pytest.mark.timeout(60)
def test_expired_handle_is_refused_and_slot_comes_back() -> None:
    with shmpool.start(memory="64MiB", transit_timeout=0.5) as mgr, mgr.connect() as pool:
        lease = pool.acquire(5000)
        lease.view[:] = pattern("late|", 5000)
        held = pool.stats()
        handle = lease.detach()
        during = pool.stats()
        assert during["in_transit"] == 1
        assert_transit_balanced(during)

        expired = wait_for(lambda: (s := pool.stats())["in_transit"] == 0 and s)
        assert_transit_balanced(expired)
        assert_balanced(expired)
        cls, hcls = class_of(expired, 8 * KiB), class_of(held, 8 * KiB)
        assert cls["in_transit"] == 0
        if pool._conn.tickets_on:  # lent: back with its lender (this pool, in its cache)
            assert cls["leased"] == hcls["leased"]
            assert cls["free"] == hcls["free"]
        else:  # in the manager's keeping: back on the free list
            assert cls["leased"] == hcls["leased"] - 1
            assert cls["free"] == hcls["free"] + 1

        before = slot_state(pool.stats())
        with pytest.raises(shmpool.StaleHandleError):
            pool.attach(handle)
        assert slot_state(pool.stats()) == before

        pool.trim()
        wait_for(lambda: all_returned(pool.stats()))


@pytest.mark.timeout(60)
def test_handle_of_another_manager_is_refused(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    lease.view[:] = pattern("mine|", 5000)
    handle = lease.detach()
    with shmpool.start(memory="64MiB") as other, other.connect(name="other") as other_pool:
        assert other_pool.manager_instance != pool.manager_instance
        decoy = other_pool.acquire(5000)  # the same segment and index exist there too
        assert (decoy._slot.ref.segment, decoy._slot.ref.index) == (handle.segment, handle.index)
        before = slot_state(other_pool.stats())
        with pytest.raises(shmpool.StaleHandleError):
            other_pool.attach(handle)
        with pytest.raises(shmpool.StaleHandleError):
            other_pool.attach(handle._replace(generation=decoy._slot.ref.generation + 1))
        assert slot_state(other_pool.stats()) == before
        decoy.release()
    assert pool.stats()["in_transit"] == 1  # the issuing manager still has it in transit
    got = pool.attach(handle)
    assert bytes(got.view) == pattern("mine|", 5000)
    got.release()


def test_detach_of_a_closed_lease_raises(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    lease.release()
    with pytest.raises(shmpool.LeaseClosedError):
        lease.detach()
    with pytest.raises(shmpool.LeaseClosedError):
        pickle.dumps(lease)

    lease = pool.acquire(5000)
    handle = lease.detach()
    with pytest.raises(shmpool.LeaseClosedError):
        lease.detach()  # detached already
    assert pool.stats()["in_transit"] == 1
    pool.attach(handle).release()
    assert pool.stats()["in_transit"] == 0


def test_detach_releases_the_view_handed_out(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    view = lease.view
    handle = lease.detach()
    with pytest.raises(ValueError):
        view[0]
    pool.attach(handle).release()


@pytest.mark.parametrize(
    "thing",
    [None, "handle", 42, (1, 2, 3, 4, 5, 6, 7), [1, 2, 3, 4, 5, 6, 7], {"token": 1}],
    ids=["none", "str", "int", "tuple", "list", "dict"],
)
def test_attach_needs_a_handle(pool: shmpool.Pool, thing: Any) -> None:
    before = slot_state(pool.stats())
    with pytest.raises(TypeError):
        pool.attach(thing)
    assert slot_state(pool.stats()) == before


def test_attach_a_plain_tuple_of_a_real_handle(pool: shmpool.Pool) -> None:
    handle = pool.acquire(5000).detach()
    with pytest.raises(TypeError):
        pool.attach(tuple(handle))
    pool.attach(handle).release()


# ------------------------------------------------------------ oversize


@pytest.mark.timeout(60)
def test_oversize_lease_detach_attach(manager_1m: shmpool.ManagerProcess) -> None:
    size = 3 * MiB + 5
    with manager_1m.connect(name="a") as a, manager_1m.connect(name="b") as b:
        base = a.stats()
        assert base["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        lease = a.acquire(size)
        lease.view[:] = pattern("big|", size)
        capacity = lease.capacity
        assert capacity > manager_1m.stats()["max_size"]
        held = a.stats()
        assert held["oversize"]["leases"] == 1

        handle = lease.detach()
        assert handle.capacity == capacity and handle.length == size
        during = a.stats()
        assert during["in_transit"] == 1
        assert sum(c["in_transit"] for c in during["classes"]) == 0  # not a class slot
        assert during["oversize"] == dict(held["oversize"], requested_bytes=0)  # no lease open
        assert during["mapped_bytes"] == held["mapped_bytes"]
        assert held["oversize"]["requested_bytes"] == size
        assert_transit_balanced(during)

        got = b.attach(handle)
        assert len(got.view) == size
        assert got.capacity == capacity
        assert bytes(got.view) == pattern("big|", size)
        got.view[:7] = b"b wrote"
        after = b.stats()
        assert after["in_transit"] == 0
        assert after["oversize"] == held["oversize"]  # b's open lease is requested now
        with pytest.raises(shmpool.StaleHandleError):
            a.attach(handle)

        # and back again, to the pool that first held it (and unmapped it on detach)
        back = a.attach(got.detach())
        assert bytes(back.view[:7]) == b"b wrote"
        assert bytes(back.view[7:]) == pattern("big|", size)[7:]
        now = a.stats()["oversize"]  # (b's report of its lease closing may lag)
        assert (now["leases"], now["bytes"]) == (1, capacity)
        back.release()
        b.stats()  # b reports that its lease closed (it has no janitor to say so sooner)
        final = a.stats()
        assert final["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        assert final["in_transit"] == 0
        assert final["mapped_bytes"] == base["mapped_bytes"]
        assert_transit_balanced(final)


@pytest.mark.timeout(60)
def test_oversize_handle_expires() -> None:
    with (
        shmpool.start(max_size="1MiB", memory="64MiB", transit_timeout=0.5) as mgr,
        mgr.connect() as pool,
    ):
        base = pool.stats()
        handle = pool.acquire(2 * MiB).detach()
        assert pool.stats()["oversize"]["leases"] == 1
        gone = wait_for(lambda: (s := pool.stats())["in_transit"] == 0 and s)
        assert gone["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        assert gone["mapped_bytes"] == base["mapped_bytes"]
        with pytest.raises(shmpool.StaleHandleError):
            pool.attach(handle)
        assert slot_state(pool.stats()) == slot_state(gone)


# ------------------------------------------------------ other processes


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_handle_round_trip_to_a_child(manager_1m: shmpool.ManagerProcess, mp_context) -> None:
    manager = manager_1m
    parent_end, child_end = mp_context.Pipe()
    proc = mp_context.Process(target=handle_echo_child, args=(manager.address, child_end))
    proc.start()
    child_end.close()
    try:
        with manager.connect(name="parent") as pool:
            for size in SIZES:
                lease = pool.acquire(size)
                tag = f"parent{size}|"
                lease.view[:] = pattern(tag, size)
                capacity = lease.capacity
                peek = lease.view[:]  # the same memory, seen after we let go of the lease
                handle = lease.detach()
                in_transit = pool.stats()
                assert in_transit["in_transit"] == 1
                assert_transit_balanced(in_transit)
                parent_end.send((handle, tag))

                report, back = _recv(parent_end)
                assert report == {
                    "pid": proc.pid,
                    "length": size,
                    "capacity": capacity,
                    "intact": True,
                }
                assert isinstance(back, shmpool.Handle)
                assert (back.segment, back.index) == (handle.segment, handle.index)
                assert back.length == size
                # the child wrote into the memory we still see: nothing was copied
                assert bytes(peek) == pattern(f"child{size}|", size)
                peek.release()

                got = pool.attach(back)
                assert len(got.view) == size
                assert bytes(got.view) == pattern(f"child{size}|", size)
                with pytest.raises(shmpool.StaleHandleError):
                    pool.attach(handle)  # the first handle was used by the child
                got.release()
                settled = pool.stats()
                assert settled["in_transit"] == 0
                assert_transit_balanced(settled)
            parent_end.send(None)
            proc.join(MP_TIMEOUT)
            assert proc.exitcode == 0
            stats = wait_for(lambda: not client_entries(s := pool.stats(), proc.pid) and s)
            assert stats["in_transit"] == 0
            assert stats["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
            assert_transit_balanced(stats)
    finally:
        _reap(proc)
        parent_end.close()


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_handle_outlives_its_sender(manager: shmpool.ManagerProcess, mp_context) -> None:
    """A child detaches and exits cleanly; the parent attaches afterwards."""
    parent_end, child_end = mp_context.Pipe()
    done = mp_context.Event()
    done.set()  # the sender exits right after sending
    proc = mp_context.Process(target=detach_and_hang, args=(manager.address, child_end, done))
    proc.start()
    child_end.close()
    try:
        pid, handle = _recv(parent_end)
        proc.join(MP_TIMEOUT)
        assert proc.exitcode == 0
        with manager.connect(name="late-receiver") as pool:
            wait_for(lambda: not client_entries(pool.stats(), pid))
            assert pool.stats()["in_transit"] == 1  # the sender's exit did not free it
            got = pool.attach(handle)
            assert bytes(got.view) == pattern("doomed", 5000)
            got.release()
            assert pool.stats()["in_transit"] == 0
    finally:
        _reap(proc)
        parent_end.close()


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_lease_through_a_queue(manager: shmpool.ManagerProcess, mp_context) -> None:
    inbox, outbox = mp_context.Queue(), mp_context.Queue()
    proc = mp_context.Process(target=lease_queue_child, args=(manager.address, inbox, outbox))
    proc.start()
    try:
        with manager.connect(name="parent") as pool:
            for size in SIZES[:3]:
                lease = pool.acquire(size)
                lease.view[:] = pattern(f"parent{size}|", size)
                inbox.put(lease)  # pickled (so detached) by the queue's feeder thread
                report, back = _get(outbox)
                assert lease.closed  # the sender's Lease went with the message
                with pytest.raises(shmpool.LeaseClosedError):
                    lease.view  # noqa: B018
                assert report == {"type": "Lease", "intact": True, "mine": True}
                assert type(back) is shmpool.Lease  # unpickled: attached in our pool
                assert len(back.view) == size
                assert bytes(back.view) == pattern(f"child{size}|", size)
                stats = pool.stats()
                assert stats["in_transit"] == 0
                assert_transit_balanced(stats)
                back.release()
            inbox.put(None)
            proc.join(MP_TIMEOUT)
            assert proc.exitcode == 0
            stats = wait_for(lambda: not client_entries(s := pool.stats(), proc.pid) and s)
            assert stats["in_transit"] == 0
            assert_transit_balanced(stats)
            pool.trim()
            wait_for(lambda: all_returned(pool.stats()))
    finally:
        _reap(proc)
        for q in (inbox, outbox):
            q.close()
            q.join_thread()


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_leases_through_pool_map(manager: shmpool.ManagerProcess, mp_context) -> None:
    sizes = [100, 5000, 70_000, 5000, 100, 300_000]
    with manager.connect(name="parent") as pool:
        leases = []
        for i, size in enumerate(sizes):
            lease = pool.acquire(size)
            lease.view[:] = pattern(f"arg{i}|", size)
            leases.append(lease)
        with mp_context.Pool(2, initializer=connect_worker, initargs=(manager.address,)) as mp:
            results = mp.map(rewrite_lease, list(enumerate(leases)), chunksize=1)
            worker_pids = {pid for _, _, pid, _ in results}
            assert os.getpid() not in worker_pids
        assert all(lease.closed for lease in leases)  # every argument was detached
        assert [i for i, _, _, _ in results] == list(range(len(sizes)))
        for i, intact, _, back in results:
            assert intact, i
            assert type(back) is shmpool.Lease
            assert len(back.view) == sizes[i]
            assert bytes(back.view) == pattern(f"result{i}|", sizes[i])
        stats = pool.stats()
        assert stats["in_transit"] == 0
        assert_transit_balanced(stats)
        for _, _, _, back in results:
            back.release()

        def workers_gone():
            s = pool.stats()
            return not any(client_entries(s, pid) for pid in worker_pids) and s

        stats = wait_for(workers_gone)
        assert stats["in_transit"] == 0
        pool.trim()
        wait_for(lambda: all_returned(pool.stats()))


@pytest.mark.slow
@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_leases_through_pool_map_relying_on_the_environment(
    manager: shmpool.ManagerProcess,
) -> None:
    """Spawned workers open no pool themselves: unpickling connects via SHMPOOL_ADDRESS."""
    assert os.environ[shmpool.ENV_VAR] == manager.address
    ctx = multiprocessing.get_context("spawn")
    sizes = [100, 5000, 70_000]
    with manager.connect(name="parent") as pool:
        leases = []
        for i, size in enumerate(sizes):
            lease = pool.acquire(size)
            lease.view[:] = pattern(f"arg{i}|", size)
            leases.append(lease)
        with ctx.Pool(2) as mp:
            results = mp.map(rewrite_lease, list(enumerate(leases)), chunksize=1)
            worker_pids = {pid for _, _, pid, _ in results}
            during = pool.stats()
            # the workers reached the manager on their own, as "shmpool-unpickle"
            names = {c["name"] for pid in worker_pids for c in client_entries(during, pid)}
            assert names == {"shmpool-unpickle"}
        for i, intact, _, back in results:
            assert intact, i
            assert bytes(back.view) == pattern(f"result{i}|", sizes[i])
            back.release()
        assert all(lease.closed for lease in leases)
        stats = pool.stats()
        assert stats["in_transit"] == 0
        assert_transit_balanced(stats)


# ----------------------------------------------------------- crashes


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_sender_killed_before_anyone_attaches(mp_context) -> None:
    with shmpool.start(memory="64MiB", transit_timeout=4.0) as mgr:
        parent_end, child_end = mp_context.Pipe()
        done = mp_context.Event()
        proc = mp_context.Process(target=detach_and_hang, args=(mgr.address, child_end, done))
        proc.start()
        child_end.close()
        try:
            with mgr.connect(name="bystander") as pool:
                pid, handle = _recv(parent_end)
                assert pid == proc.pid
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(MP_TIMEOUT)
                assert proc.exitcode == -signal.SIGKILL

                dropped = wait_for(lambda: not client_entries(s := pool.stats(), pid) and s)
                # the sender's own slots (its cache) came back; the detached one waits
                assert dropped["in_transit"] == 1
                cls = class_of(dropped, 8 * KiB)
                assert cls["in_transit"] == 1 and cls["leased"] == 0
                assert_transit_balanced(dropped)

                freed = wait_for(lambda: (s := pool.stats())["in_transit"] == 0 and s)
                assert all_returned(freed)
                assert_transit_balanced(freed)
                assert_balanced(freed)

                before = slot_state(freed)
                with pytest.raises(shmpool.StaleHandleError):
                    pool.attach(handle)
                assert slot_state(pool.stats()) == before
        finally:
            _reap(proc)
            parent_end.close()


@pytest.mark.timeout(MP_TIMEOUT * 2)
def test_receiver_killed_after_attach(manager: shmpool.ManagerProcess, mp_context) -> None:
    parent_end, child_end = mp_context.Pipe()
    done = mp_context.Event()
    proc = mp_context.Process(target=attach_and_hang, args=(manager.address, child_end, done))
    proc.start()
    child_end.close()
    try:
        with manager.connect(name="sender") as pool:
            lease = pool.acquire(70_000)
            lease.view[:] = pattern("handed over|", 70_000)
            handle = lease.detach()
            parent_end.send(handle)
            pid, seen = _recv(parent_end)
            assert pid == proc.pid
            assert seen == pattern("handed over|", 70_000)

            held = pool.stats()
            assert held["in_transit"] == 0
            (entry,) = client_entries(held, pid)
            assert entry["name"] == "doomed-receiver"
            assert entry["leased"] == 1
            assert class_of(held, 128 * KiB)["leased"] >= 1
            assert_transit_balanced(held)

            os.kill(proc.pid, signal.SIGKILL)
            proc.join(MP_TIMEOUT)
            assert proc.exitcode == -signal.SIGKILL

            after = wait_for(lambda: not client_entries(s := pool.stats(), pid) and s)
            assert after["in_transit"] == 0
            (mine,) = [c for c in after["clients"] if c["name"] == "sender"]
            # only what our own connection holds (its cache) is still leased
            assert sum(c["leased"] for c in after["classes"]) == mine["leased"]
            (before_mine,) = [c for c in held["clients"] if c["name"] == "sender"]
            if pool._conn.tickets_on:  # lent: the dead receiver's slot went back to its lender
                assert mine["leased"] == before_mine["leased"] + 1
                assert class_of(after, 128 * KiB)["leased"] == class_of(held, 128 * KiB)["leased"]
            else:  # it was the receiver's: freed with the rest of its leases
                assert mine["leased"] == before_mine["leased"]
                assert (
                    class_of(after, 128 * KiB)["leased"] == class_of(held, 128 * KiB)["leased"] - 1
                )
            assert_transit_balanced(after)
            assert_balanced(after)
            with pytest.raises(shmpool.StaleHandleError):
                pool.attach(handle)  # attached already, by the dead child
            pool.trim()
            wait_for(lambda: all_returned(pool.stats()))
    finally:
        _reap(proc)
        parent_end.close()


@pytest.mark.timeout(MP_TIMEOUT)
@pytest.mark.parametrize("size", [5000, 3 * MiB + 5], ids=["class", "oversize"])
def test_an_inherited_lease_cannot_be_detached_in_the_child(
    manager_1m: shmpool.ManagerProcess, size: int
) -> None:
    """A forked child holds a copy of the parent's Lease, not the slot: it may not hand it on."""
    with manager_1m.connect() as pool:
        lease = pool.acquire(size)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            outcome = b"detached"
            try:
                lease.detach()
            except shmpool.UsageError:
                outcome = b"refused"
            except BaseException as exc:  # reported to the parent
                outcome = type(exc).__name__.encode()
            os.write(w, outcome)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            outcome = f.read()
        os.waitpid(pid, 0)
        assert outcome == b"refused"
        pool.attach(lease.detach()).release()  # still the parent's to hand on
        assert_balanced(pool.stats())
