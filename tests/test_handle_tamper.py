"""A handle whose length, capacity or readers was altered is refused (issue 10).

The token a ``Handle`` carries is sealed with its ``length``, ``capacity``
and ``readers`` (``protocol.seal_token``), so a receiver that reads a changed
field derives a token that matches neither the slot's ticket word nor the
manager's books. The capacity and the read-only-ness are also checked against
the record: the receiver's own mapping of the segment, or the manager's
(``Attach`` carries both). Each altered handle here changes one field and
keeps the genuine token, as a bug or a careless edit would.

Every alteration is tried on every kind of handle (a detached class slot, a
pickled one, one handed on by its borrower, an oversize slot, a share), by a
receiver that has the slot's segment mapped (the ticket word decides, or for
a share the manager) and by one that has not (the manager decides); then by
a fresh process (spawn). The refusal must spend nothing: the books are as
before, and the genuine handle still attaches, once, with its length and its
read-only-ness.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, wait_for
from test_handoff import pattern
from test_handoff import slot_state as handoff_slot_state

import shmpool
from shmpool import Handle
from shmpool import protocol as p
from shmpool.connection import Connection

KiB = 1024
MiB = 1024 * KiB
LENGTH = 5000  # an 8 KiB slot
OVERSIZE = 2 * MiB + 100  # above max_size below

KINDS = ("detached", "pickled", "handed-on", "oversize", "shared", "shared-oversize")

#: name -> the alteration, one field changed, the token kept
ALTERATIONS: dict[str, Callable[[Handle], Handle]] = {
    "length-up": lambda h: h._replace(length=h.length + 1),
    "length-to-capacity": lambda h: h._replace(length=h.capacity),
    "length-down": lambda h: h._replace(length=h.length - 1),
    "length-zero": lambda h: h._replace(length=0),
    "capacity-up": lambda h: h._replace(capacity=2 * h.capacity),
    "capacity-down": lambda h: h._replace(capacity=h.capacity // 2),
    "readers-flipped": lambda h: h._replace(readers=0 if h.readers else 2),  # 0 <-> n
    "readers-more": lambda h: h._replace(readers=h.readers + 1),
}


def slot_state(stats: dict[str, Any]) -> dict[str, Any]:
    """What a refused attach must leave unchanged: ``test_handoff``'s counts, and shares."""
    return {**handoff_slot_state(stats), "shared": stats["shared"]}


def receive(pool: shmpool.Pool, handle: Handle, pickled: bool) -> shmpool.Lease:
    """``pool.attach(handle)``, or what unpickling a Lease does in ``pool``."""
    if not pickled:
        return pool.attach(handle)
    lease = pool._take(tuple(handle))  # the C fast path (None: not applicable)
    return lease if lease is not None else pool.attach(handle)


@pytest.fixture
def mgr() -> Iterator[shmpool.ManagerProcess]:
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="32MiB") as m:
        yield m


def make_handle(kind: str, sender: shmpool.Pool, middle: shmpool.Pool) -> tuple[Handle, bytes]:
    """A genuine handle of ``kind`` sent by ``sender`` (and ``middle``), and its bytes."""
    size = OVERSIZE if kind.endswith("oversize") else LENGTH
    data = pattern(f"{kind}|", size)
    lease = sender.acquire(size)
    lease.view[:] = data
    if kind == "pickled":
        fn, fields = lease.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        assert fn is shmpool.rebuild_lease
        return Handle(*fields), data
    if kind.startswith("shared"):
        return lease.share(readers=1), data
    handle = lease.detach()
    if kind == "handed-on":  # a borrower (or, without lending, a new holder) hands it on
        return middle.attach(handle).detach(), data
    return handle, data


def drain(*pools: shmpool.Pool) -> None:
    for pool in pools:
        pool.trim()
    wait_for(lambda: all_returned(pools[0].stats()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alteration", sorted(ALTERATIONS))
@pytest.mark.parametrize(
    ("kind", "mapped"),
    [
        pytest.param(kind, mapped, id=f"{kind}-{'mapped' if mapped else 'unmapped'}")
        for mapped in (True, False)
        for kind in KINDS
        # an oversize segment is never mapped by a receiver before it attaches
        if not (mapped and kind.endswith("oversize"))
    ],
)
def test_altered_handle_is_refused(
    mgr: shmpool.ManagerProcess, kind: str, alteration: str, mapped: bool
) -> None:
    with mgr.connect(name="a") as a, mgr.connect(name="b") as b, mgr.connect(name="c") as c:
        if mapped:
            b.acquire(LENGTH).release()  # b maps the class's only segment
        handle, data = make_handle(kind, a, c)
        altered = ALTERATIONS[alteration](handle)
        assert altered != handle
        assert (handle.segment in b._conn.segments) == mapped
        pickled = kind == "pickled"
        a.stats(), c.stats()  # their queued notices go first
        before = slot_state(b.stats())
        with pytest.raises(shmpool.StaleHandleError):
            receive(b, altered, pickled)
        assert slot_state(b.stats()) == before
        assert_balanced(b.stats())

        # The refusal spent nothing: the genuine handle attaches, once, as it was sent.
        got = receive(b, handle, pickled)
        assert len(got.view) == handle.length
        assert got.capacity == handle.capacity
        assert got.view.readonly == kind.startswith("shared")
        assert bytes(got.view) == data
        with pytest.raises(shmpool.StaleHandleError):
            receive(b, handle, pickled)
        with pytest.raises(shmpool.StaleHandleError):  # and the altered one after it
            receive(b, altered, pickled)
        got.release()
        assert_balanced(b.stats())
        drain(a, b, c)


def tamper_child(address: str, handle: Handle, conn: Any) -> None:
    """A fresh process, nothing mapped: every alteration, then the genuine handle."""
    outcomes: dict[str, Any] = {}
    with shmpool.connect(address, name="child") as pool:
        for name, alter in sorted(ALTERATIONS.items()):
            try:
                pool.attach(alter(handle)).release()
                outcomes[name] = "attached"
            except shmpool.StaleHandleError:
                outcomes[name] = "StaleHandleError"
            except Exception as exc:  # reported, not raised: the parent asserts
                outcomes[name] = f"{type(exc).__name__}: {exc}"
        lease = pool.attach(handle)
        outcomes["genuine"] = (len(lease.view), lease.capacity, lease.view.readonly)
        outcomes["bytes"] = bytes(lease.view[:64])
        lease.release()
        try:
            pool.attach(handle).release()
            outcomes["again"] = "attached"
        except shmpool.StaleHandleError:
            outcomes["again"] = "StaleHandleError"
    conn.send(outcomes)
    conn.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["detached", "handed-on", "oversize", "shared", "shared-oversize"])
def test_altered_handle_is_refused_in_a_fresh_process(
    mgr: shmpool.ManagerProcess, kind: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    with mgr.connect(name="a") as a, mgr.connect(name="c") as c:
        handle, data = make_handle(kind, a, c)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=tamper_child, args=(mgr.address, handle, child))
        proc.start()
        child.close()
        try:
            assert parent.poll(MP_TIMEOUT), "the child did not answer"
            outcomes = parent.recv()
        finally:
            proc.join(MP_TIMEOUT)
            parent.close()
        assert proc.exitcode == 0
        refused = {name: "StaleHandleError" for name in ALTERATIONS}
        assert {name: outcomes[name] for name in ALTERATIONS} == refused
        assert outcomes["genuine"] == (handle.length, handle.capacity, kind.startswith("shared"))
        assert outcomes["bytes"] == data[:64]
        assert outcomes["again"] == "StaleHandleError"
        drain(a, c)


def test_a_resealed_handle_still_gets_the_record(mgr: shmpool.ManagerProcess) -> None:
    """The seal is a check, not a secret: who reseals a changed field gets the record's view.

    The capacity and the read-only-ness come from the manager's record (the
    Attach names both), so a share resealed as a plain handoff, or a plain
    handoff resealed as a share, is refused all the same.
    """
    with mgr.connect(name="a") as a, mgr.connect(name="b") as b:
        for kind in ("detached", "shared", "oversize", "shared-oversize"):
            handle, data = make_handle(kind, a, b)
            token = p.seal_token(handle.token, handle.length, handle.capacity, handle.readers)
            for alter in (ALTERATIONS["readers-flipped"], ALTERATIONS["capacity-up"]):
                altered = alter(handle)
                resealed = altered._replace(
                    token=p.seal_token(token, altered.length, altered.capacity, altered.readers)
                )
                with pytest.raises(shmpool.StaleHandleError):
                    b.attach(resealed)
            got = b.attach(handle)
            assert (bytes(got.view), got.view.readonly) == (data, kind.startswith("shared"))
            got.release()
        drain(a, b)


def test_seal_token_is_its_own_inverse_and_binds_each_field() -> None:
    import random

    rng = random.Random(10)
    for _ in range(2000):
        token = rng.randrange(1, 1 << 62) | 1
        capacity = 1 << rng.randrange(12, 40)
        length = rng.randrange(0, capacity + 1)
        readers = rng.choice([0, 0, 1, rng.randrange(1, p.MAX_READERS + 1)])
        sealed = p.seal_token(token, length, capacity, readers)
        assert 0 <= sealed < 1 << 62
        assert p.seal_token(sealed, length, capacity, readers) == token
        others = [
            (length ^ 1 if length ^ 1 <= capacity else length - 1, capacity, readers),
            (length, capacity * 2, readers),
            (length, capacity // 2, readers),
            (length, capacity, readers + 1),
            (length, capacity, 0 if readers else 1),
        ]
        for fields in others:
            assert p.seal_token(sealed, *fields) != token, fields


def _delay_shares(pool: shmpool.Pool, seconds: float) -> list[threading.Timer]:
    """Make ``pool`` send its ``Share`` messages ``seconds`` late (on another thread)."""
    timers: list[threading.Timer] = []

    class Delaying(Connection):
        __slots__ = ()

        def send(self, data: bytes, hello: bool = False, counted: bool = True) -> Any:
            if isinstance(p.decode(data, max_size=p.MAX_REQUEST), p.Share):
                sock = self.sock
                timer = threading.Timer(seconds, self.send_on, (sock, data))
                timer.start()
                timers.append(timer)
                return sock
            return super().send(data, hello, counted)

    pool._conn.__class__ = Delaying  # this pool's connection only
    return timers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["shared", "shared-oversize"])
def test_an_attach_that_overtakes_its_share_waits_for_it(
    mgr: shmpool.ManagerProcess, kind: str
) -> None:
    """The manager reads the reader's Attach before the owner's Share.

    The genuine handle waits for the Share and gets a reader's lease; the
    same handle resealed as a plain handoff (readers 0) is not taken for
    one (a share's token is never a handoff's), and is refused once the
    Share is read. The owner's connection lives on either way.
    """
    with mgr.connect(name="a") as a, mgr.connect(name="b") as b:
        timers = _delay_shares(a, 0.3)
        handle, data = make_handle(kind, a, b)
        got = b.attach(handle)
        assert (bytes(got.view), got.view.readonly) == (data, True)
        got.release()

        handle, data = make_handle(kind, a, b)
        token = p.seal_token(handle.token, handle.length, handle.capacity, handle.readers)
        plain = handle._replace(token=p.seal_token(token, handle.length, handle.capacity, 0))
        with pytest.raises(shmpool.StaleHandleError):
            b.attach(plain._replace(readers=0))
        got = b.attach(handle)
        assert (bytes(got.view), got.view.readonly) == (data, True)
        got.release()
        for timer in timers:
            timer.join()
        assert a._conn.broken is None
        assert_balanced(a.stats())
        drain(a, b)


def test_the_arena_checks_capacity_and_readers_against_its_record() -> None:
    """``Arena.attach`` refuses, changing nothing, what the record contradicts."""
    from test_arena import MIN, _word_arena, make_arena

    from shmpool.protocol import SlotRef

    arena, _ = make_arena(conns=3)
    (ref,) = arena.acquire(1, MIN).slots
    size = arena.class_size(MIN)
    assert size is not None
    moved = arena.detach(1, ref, token=7, deadline=1e9)
    (other,) = arena.acquire(1, MIN).slots
    shared = arena.share(1, other, token=9, readers=1, deadline=1e9)
    before = arena.stats()
    for bad in (
        lambda: arena.attach(2, moved, 7, capacity=2 * size, readers=0),
        lambda: arena.attach(2, moved, 7, capacity=size // 2, readers=0),
        lambda: arena.attach(2, moved, 7, capacity=size, readers=1),  # not shared
        lambda: arena.attach(2, shared, 9, capacity=size, readers=0),  # shared
        lambda: arena.attach(2, shared, 9, capacity=2 * size, readers=1),
        lambda: arena.attach(2, SlotRef(99, 0, 1), 7, capacity=size, readers=0),
    ):
        with pytest.raises(shmpool.StaleHandleError):
            bad()
        assert arena.stats() == before
    (granted,) = arena.attach(2, moved, 7, capacity=size, readers=0).slots
    (reader,) = arena.attach(3, shared, 9, capacity=size, readers=1).slots
    arena.release(2, [granted])
    arena.release(3, [reader])
    assert all(c["leased"] == 0 for c in arena.stats()["classes"])

    # With ticket words, a lender's class slot gets no notice, but it may get a Share.
    words = _word_arena(conns=1)
    words.add_conn(4, pid=1004, key=4, lends=True)
    (lent,) = words.acquire(4, MIN).slots
    ahead = lent._replace(generation=lent.generation + 1)
    assert not words.awaits_detach(ahead)
    assert words.awaits_detach(ahead, shared=True)
