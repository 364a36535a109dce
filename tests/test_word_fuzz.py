"""Clients may write anything into ticket words: the manager's books never break.

Ticket words live in shared memory that every client mapping a segment can
write. Whatever value any word holds at any moment, an arena method either
does its job or refuses the caller with a ``ShmpoolError``; it never raises
anything else, never takes long, and its books stay whole: per class
``total == free + leased + in_transit``, and every slot is exactly one of
free, held by one client, in transit, shared or an orphan.

A client may also name a generation newer than the books for a slot it lent
and took back (``_reclaim_lent``); a forged one far ahead is refused, so that
no generation ever grows past what the wire can carry.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import random
import signal
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from arena_books import SIZES, check_books, load_word, ticket_ops, word_arena
from conftest import MP_TIMEOUT, all_returned, assert_balanced, wait_for

import shmpool
from shmpool import buffer
from shmpool.arena import Arena
from shmpool.errors import ShmpoolError, StaleHandleError
from shmpool.protocol import (
    CLAIMED,
    LENT,
    MAX_ID,
    NOTICE_CLAIMED,
    NOTICE_DETACHED,
    NOTICE_RETURNED,
    SlotRef,
    claim_word,
    encode_grant,
    generation_at_least,
    is_returned,
    lent_word,
    returned_word,
    ticket_word,
    token_maker,
)

TIMEOUT = 30.0  # transit timeout of the simulated manager (fake seconds)
SLOW = 0.5  # no arena call may take this long (real seconds)
OPS = ["py", "c"] if buffer.SPEEDUPS else ["py"]


@dataclass
class Sim:
    """A simulated client: what it believes it holds, lends and borrows."""

    id: int
    lends: bool  # it has atomics: it lends class slots and claims by words
    token: Callable[[int, int, int], int]
    holds: dict[tuple[int, int], int] = field(default_factory=dict)  # key -> generation
    lent: dict[tuple[int, int], int] = field(default_factory=dict)  # key -> generation lent at
    borrowed: dict[tuple[int, int], int] = field(default_factory=dict)  # key -> generation
    reading: dict[tuple[int, int], int] = field(default_factory=dict)  # shared: key -> generation
    queued: list[int] = field(default_factory=list)  # DETACHED notices not sent yet


class Fuzz:
    """Random client operations and random ticket words against one arena."""

    def __init__(
        self, seed: int, ops: str, *, forging: bool = False, memory: int = 1 << 16
    ) -> None:
        self.rng = random.Random(seed)
        self.forging = forging  # also release slots under forged generations
        self.arena, self.backings = word_arena(memory, ticket_ops(ops))
        self.ops = self.arena._tickets
        self.now = 1000.0
        self.sims: dict[int, Sim] = {}
        self.next_id = 1
        self.handles: list[tuple[SlotRef, int]] = []  # (ref, token) given away
        self.shares: list[tuple[SlotRef, int]] = []  # (ref, token) published to readers

    # ------------------------------------------------------------ plumbing

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``: a ShmpoolError is a refusal (None); anything else fails the test."""
        start = time.perf_counter()
        try:
            return fn(*args)
        except ShmpoolError:
            return None
        finally:
            assert time.perf_counter() - start < SLOW, f"{fn.__name__} took too long"

    def word(self, key: tuple[int, int]) -> int:
        return load_word(self.arena, *key)

    def cas(self, key: tuple[int, int], expected: int, new: int) -> bool:
        seg = self.arena._segments.get(key[0])
        if seg is None or not seg.header:
            return False
        return bool(self.ops.cas64(seg.backing.tickets, 8 * key[1], expected, new))

    def sim(self) -> Sim:
        return self.sims[self.rng.choice(sorted(self.sims))]

    def add(self) -> None:
        cid = self.next_id
        self.next_id += 1
        key = self.rng.getrandbits(63) | 1
        lends = self.rng.random() < 0.7
        self.arena.add_conn(cid, pid=cid, key=key, lends=lends)
        self.sims[cid] = Sim(cid, lends, token_maker(key))

    # ---------------------------------------------------------- operations

    def acquire(self, s: Sim) -> None:
        size = self.rng.choice([*SIZES, 1, 100, 300, 5000])
        grant = self.call(self.arena.acquire, s.id, size, self.rng.choice([1, 1, 2, 4]))
        if grant is not None:
            assert all(0 < ref.generation <= MAX_ID for ref in grant.slots)
            encode_grant(1, grant.slot_size, grant.slots, grant.segments, grant.lent)
            s.holds.update(((r.segment, r.index), r.generation) for r in grant.slots)

    def release(self, s: Sim) -> None:
        if not s.holds:
            return
        keys = self.rng.sample(sorted(s.holds), self.rng.randint(1, len(s.holds)))
        refs = [SlotRef(*key, s.holds[key]) for key in keys]
        if self.call(self.arena.release, s.id, refs) is None:
            for ref in refs:  # which of them does the manager refuse?
                self.call(self.arena.release, s.id, [ref])
        for key in keys:
            del s.holds[key]

    def forged_release(self, s: Sim) -> None:
        """A generation no lending can reach, or one from the past: refused."""
        if not s.holds:
            return
        key = self.rng.choice(sorted(s.holds))
        generation = self.rng.choice([MAX_ID, 2**62, s.holds[key] + (1 << 60)])
        books = self.arena._segments[key[0]].generations[key[1]]
        with pytest.raises(StaleHandleError):
            self.arena.release(s.id, [SlotRef(*key, generation)])
        assert self.arena._segments[key[0]].generations[key[1]] == books

    def hand_over(self, s: Sim) -> None:
        """Detach a slot: lent by its word (a lender's class slot) or by a notice."""
        if not s.holds:
            return
        key = self.rng.choice(sorted(s.holds))
        generation = s.holds.pop(key)
        token = s.token(*key, generation + 1)
        seg = self.arena._segments.get(key[0])
        if s.lends and seg is not None and seg.cls is not None:
            if self.cas(key, 0, lent_word(token, generation + 1)):
                s.lent[key] = generation
                self.handles.append((SlotRef(*key, generation + 1), token))
            return  # else the word is not 0: it is no longer ours to lend
        s.queued += [NOTICE_DETACHED, *key, generation, token]  # sent now or a little later
        if self.rng.random() < 0.5:
            self.send(s)
        self.handles.append((SlotRef(*key, generation + 1), token))

    def send(self, s: Sim) -> None:
        """``s`` sends its queued DETACHED notices (a receiver may have come first)."""
        flat, s.queued = tuple(s.queued), []
        if flat:
            self.call(self.arena.apply_notices, s.id, flat, self.now + TIMEOUT)

    def share(self, s: Sim) -> None:
        if not s.holds:
            return
        key = self.rng.choice(sorted(s.holds))
        generation = s.holds.pop(key)
        token = self.rng.getrandbits(62) | 1
        readers = self.rng.randint(1, 3)
        deadline = self.now + TIMEOUT
        ref = self.call(self.arena.share, s.id, SlotRef(*key, generation), token, readers, deadline)
        if ref is not None:
            self.shares.append((ref, token))

    def read(self, s: Sim) -> None:
        """Attach a shared slot as a reader, or let go of one."""
        if s.reading and self.rng.random() < 0.5:
            key = self.rng.choice(sorted(s.reading))
            self.call(self.arena.release, s.id, [SlotRef(*key, s.reading.pop(key))])
        elif self.shares:
            ref, token = self.rng.choice(self.shares)
            key = (ref.segment, ref.index)
            grant = self.call(self.arena.attach, s.id, ref, token, self.now + TIMEOUT)
            if grant is not None and key not in s.reading:
                s.reading[key] = grant.slots[0].generation

    def forge(self, s: Sim) -> None:
        """A notice, claim, attach or give-back naming numbers nobody was given."""
        seg = self.rng.choice([None, *self.arena._segments.values()])
        segment = seg.id if seg is not None else self.rng.choice([0, 10**6, MAX_ID])
        nslots = seg.nslots if seg is not None else 1
        index = self.rng.choice([0, self.rng.randrange(nslots), nslots, MAX_ID])
        books = seg.generations[index] if seg is not None and index < nslots else 0
        generation = self.rng.choice([0, books, books + 1, books + 2, MAX_ID, books + (1 << 31)])
        generation = min(generation, MAX_ID)
        token = self.rng.choice([0, 1, self.rng.getrandbits(62), MAX_ID])
        ref = SlotRef(segment, index, generation)
        kind = self.rng.choice([NOTICE_DETACHED, NOTICE_CLAIMED, NOTICE_RETURNED])
        which = self.rng.randrange(4)
        if which == 0:
            self.call(self.arena.apply_notices, s.id, (kind, *ref, token), self.now + TIMEOUT)
        elif which == 1:
            self.call(self.arena.claim, s.id, ref, token, self.now + TIMEOUT)
        elif which == 2:
            grant = self.call(self.arena.attach, s.id, ref, token, self.now + TIMEOUT)
            if grant is not None:  # a handle the scribbles made good: the slot is ours
                got = grant.slots[0]
                (s.borrowed if grant.lent else s.holds)[(got.segment, got.index)] = got.generation
        else:
            self.call(self.arena.give_back, s.id, ref)
        self.arena.awaits_detach(ref)

    def take(self, s: Sim) -> None:
        """Attach a handle: by its word (a lent or published ticket) or by the manager."""
        if not self.handles:
            return
        ref, token = self.handles.pop(self.rng.randrange(len(self.handles)))
        key = (ref.segment, ref.index)
        mine = claim_word(s.id, ref.generation)
        if s.lends and self.rng.random() < 0.7:
            if self.cas(key, lent_word(token, ref.generation), mine):
                s.borrowed[key] = ref.generation
                return
            if self.cas(key, ticket_word(token, ref.generation), mine):
                flat = (NOTICE_CLAIMED, *ref, token)
                i = self.call(self.arena.apply_notices, s.id, flat, self.now + TIMEOUT)
                if i == len(flat):
                    s.holds[key] = ref.generation
                elif i is not None:
                    self.arena.awaits_detach(ref)
                return
        grant = self.call(self.arena.attach, s.id, ref, token, self.now + TIMEOUT)
        if grant is None:
            self.arena.awaits_detach(ref)
            return
        (got,) = grant.slots
        assert 0 < got.generation <= MAX_ID
        encode_grant(1, grant.slot_size, grant.slots, grant.segments, grant.lent)
        if grant.lent:
            s.borrowed[key] = got.generation
        else:
            s.holds[key] = got.generation

    def give_back(self, s: Sim) -> None:
        """A borrower lets go: ``returned_word`` by its word, or a RETURNED notice."""
        if not s.borrowed:
            return
        key = self.rng.choice(sorted(s.borrowed))
        generation = s.borrowed.pop(key)
        if s.lends and self.cas(key, claim_word(s.id, generation), returned_word(generation)):
            return
        flat = (NOTICE_RETURNED, *key, generation, 0)
        self.call(self.arena.apply_notices, s.id, flat, self.now + TIMEOUT)

    def reclaim(self, s: Sim) -> None:
        """A lender takes back what came back, or what waited too long (``_reclaim_lent``)."""
        for key, generation in list(s.lent.items()):
            word = self.word(key) if key[0] in self.arena._segments else 0
            if word == 0:
                del s.lent[key]  # the manager took it over
            elif is_returned(word):
                after = generation_at_least(word >> 32 & 0x7FFF_FFFF, generation + 1)
            elif word >> 63 or self.rng.random() < 0.5:
                continue  # claimed (in use), or not waited long enough yet
            else:
                after = generation + 1 + (1 << 31)
            if word and self.cas(key, word, 0):
                del s.lent[key]
                s.holds[key] = after

    def drop(self, s: Sim) -> None:
        self.call(self.arena.drop_conn, s.id, self.now, TIMEOUT)
        del self.sims[s.id]
        if not self.sims:
            self.add()

    def expire(self) -> None:
        self.now += self.rng.choice([0.5, 5.0, TIMEOUT, 2 * TIMEOUT])
        self.call(self.arena.expire_transit, self.now)
        self.arena.next_deadline()
        self.arena.in_transit()

    def look(self, s: Sim) -> None:
        """What the manager asks the arena besides: none of it may raise."""
        arena = self.arena
        for size in SIZES:
            arena.transit_count(size)
            arena.holders(size)
            arena.free_slots(size)
            arena.held_by(s.id, size)
        for name in ("holds_anything", "held_bytes"):  # newer queries, where there
            if hasattr(arena, name):
                getattr(arena, name)(s.id)
        arena.held_by(s.id)
        arena.in_transit()
        arena.next_deadline()
        arena.note_message(s.id, 1)

    def scribble(self) -> None:
        """Any value into any word, now and then one that looks real."""
        if not self.arena._segments:
            return
        seg = self.rng.choice(list(self.arena._segments.values()))
        if not seg.header:
            return
        index = self.rng.randrange(seg.nslots)
        live = self.rng.choice(sorted(self.sims))
        generation = seg.generations[index] + self.rng.choice([-1, 0, 1, 2, 1 << 31])
        token = self.rng.getrandbits(62)
        value = self.rng.choice(
            [
                self.rng.getrandbits(64),
                CLAIMED | self.rng.getrandbits(32),
                CLAIMED | live,
                claim_word(live, max(0, generation)),
                LENT | self.rng.getrandbits(62),
                lent_word(token, max(0, generation)),
                ticket_word(token, max(0, generation)),
                returned_word(self.rng.getrandbits(31)),
                returned_word(max(0, generation)),
                0,
                2**64 - 1,
            ]
        )
        self.ops.store64(seg.backing.tickets, 8 * index, value)

    def step(self) -> None:
        s = self.sim()
        roll = self.rng.random()
        if roll < 0.14:
            self.acquire(s)
        elif roll < 0.22:
            self.release(s)
        elif roll < 0.24:
            if self.forging:
                self.forged_release(s)
        elif roll < 0.34:
            self.hand_over(s)
        elif roll < 0.37:
            self.send(s)
        elif roll < 0.47:
            self.take(s)
        elif roll < 0.52:
            self.give_back(s)
        elif roll < 0.56:
            self.reclaim(s)
        elif roll < 0.58:
            self.share(s)
        elif roll < 0.62:
            self.read(s)
        elif roll < 0.65:
            self.forge(s)
        elif roll < 0.68:
            self.drop(s)
        elif roll < 0.71:
            self.add()
        elif roll < 0.76:
            self.expire()
        elif roll < 0.78:
            self.look(s)
        else:
            self.scribble()


def _run(fuzz: Fuzz, steps: int) -> None:
    for _ in range(3):
        fuzz.add()
    for step in range(steps):
        fuzz.step()
        try:
            check_books(fuzz.arena, fuzz.backings)
        except AssertionError as exc:
            raise AssertionError(f"after step {step}: {exc}") from exc


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("seed", range(6))
def test_no_word_breaks_the_books(seed: int, ops: str) -> None:
    fuzz = Fuzz(seed, ops)
    _run(fuzz, 1500)
    _everyone_goes(fuzz)


def _everyone_goes(fuzz: Fuzz) -> None:
    for s in list(fuzz.sims.values()):  # everyone goes: nothing stays held
        fuzz.drop(s)
    fuzz.now += 10 * TIMEOUT
    fuzz.arena.expire_transit(fuzz.now)
    fuzz.now += 10 * TIMEOUT
    fuzz.arena.expire_transit(fuzz.now)
    for s in list(fuzz.sims.values()):
        fuzz.call(fuzz.arena.drop_conn, s.id, fuzz.now, TIMEOUT)
    fuzz.arena.expire_transit(fuzz.now + 10 * TIMEOUT)
    stats = check_books(fuzz.arena, fuzz.backings)
    assert all(c["free"] == c["total"] for c in stats["classes"]), stats["classes"]
    assert stats["oversize"]["leases"] == 0


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("seed", range(3))
def test_forged_generations_never_break_the_books(seed: int, ops: str) -> None:
    fuzz = Fuzz(100 + seed, ops, forging=True)
    _run(fuzz, 1000)
    _everyone_goes(fuzz)


# ------------------------------------------------------------ one word at a time


def _store(arena: Arena, ref: SlotRef, value: int) -> None:
    seg = arena._segments[ref.segment]
    assert arena._tickets is not None
    arena._tickets.store64(seg.backing.tickets, 8 * ref.index, value)


def _arena(ops: str, conns: int = 3, memory: int = 1 << 16) -> Arena:
    arena, _ = word_arena(memory, ticket_ops(ops))
    for conn in range(1, conns + 1):
        arena.add_conn(conn, pid=conn, key=1000 + conn, lends=True)
    return arena


@pytest.mark.parametrize("ops", OPS)
def test_two_orphans_written_over_do_not_crash_a_drop(ops: str) -> None:
    """Issue 10: a claim by the dropped client, then 0, in two orphans' words."""
    arena = _arena(ops)
    a, b = arena.acquire(1, 16, 2).slots
    arena.acquire(2, 16)  # client 2 maps the segment
    for ref in (a, b):
        _store(arena, ref, lent_word(77, ref.generation + 1))  # lent out by client 1
    arena.drop_conn(1, 0.0, TIMEOUT)  # two orphans
    _store(arena, a, claim_word(2, a.generation + 1))  # "claimed" by client 2
    _store(arena, b, 0)
    arena.drop_conn(2, 1.0, TIMEOUT)  # gives a back, settles the orphans: b too
    stats = check_books(arena)
    assert stats["in_transit"] == 0
    assert all(c["free"] == c["total"] for c in stats["classes"])


@pytest.mark.parametrize("ops", OPS)
def test_a_claim_nobody_could_make_is_garbage(ops: str) -> None:
    """A dropped holder's slot, "claimed" by a client that never mapped its segment: freed."""
    arena = _arena(ops)
    (ref,) = arena.acquire(1, 16).slots
    _store(arena, ref, claim_word(3, ref.generation + 1))  # client 3 knows no segment
    arena.drop_conn(1, 0.0, TIMEOUT)
    assert arena.held_by(3) == 0
    stats = check_books(arena)
    assert all(c["free"] == c["total"] for c in stats["classes"])


@pytest.mark.parametrize("ops", OPS)
def test_a_written_claim_holds_a_late_slot_only_if_it_could_be_real(ops: str) -> None:
    """A late slot waits for a claimer's notice only while a claim like a real one is there."""
    arena = _arena(ops, conns=2)
    arena.add_conn(3, pid=3, key=1003)  # a sender without lending: Detach notices
    arena.acquire(2, 16)  # client 2 maps the segment
    (ref,) = arena.acquire(3, 16).slots
    moved = arena.detach(3, ref, 77, 10.0)
    assert moved is not None
    _store(arena, moved, CLAIMED | 2)  # client 2, but not this handle's generation
    assert arena.expire_transit(11.0) == 1  # garbage: freed
    (ref,) = arena.acquire(3, 16).slots
    moved = arena.detach(3, ref, 77, 20.0)
    assert moved is not None
    _store(arena, moved, claim_word(2, moved.generation))  # as client 2 would claim it
    for now in (21.0, 22.5, 24.0):
        assert arena.expire_transit(now) == 0  # its notice may be on its way
    arena.drop_conn(2, 25.0, TIMEOUT)
    assert arena.expire_transit(26.0) == 1  # its claimer went without a word
    stats = check_books(arena)
    assert stats["in_transit"] == 0


# ------------------------------------------------------------ generations


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("ahead", [MAX_ID, 2**62, 2**61, 1 << 50])
def test_a_generation_no_lending_reaches_is_refused(ops: str, ahead: int) -> None:
    """Issue 10: a Return with generation 2**63-1 broke every later client of the class."""
    arena = _arena(ops)
    (ref,) = arena.acquire(1, 16).slots
    forged = ref._replace(generation=min(MAX_ID, ref.generation + ahead))
    for attempt in (
        lambda: arena.release(1, [forged]),
        lambda: arena.detach(1, forged, 77, 10.0),
        lambda: arena.share(1, forged, 77, 2, 10.0),
    ):
        with pytest.raises(StaleHandleError):
            attempt()
        assert arena._segments[ref.segment].generations[ref.index] == ref.generation
    arena.release(1, [ref])
    for conn in (2, 3):  # the next clients get that slot, and give it back
        grant = arena.acquire(conn, 16)
        assert grant.slots[0][:2] == ref[:2]
        assert grant.slots[0].generation <= MAX_ID
        encode_grant(1, grant.slot_size, grant.slots, grant.segments, grant.lent)
        arena.release(conn, grant.slots)
    check_books(arena)


@pytest.mark.parametrize("ops", OPS)
def test_a_refused_batch_leaves_a_lenders_generation_alone(ops: str) -> None:
    """All or nothing: the good reference of a refused batch changes nothing either."""
    arena = _arena(ops)
    ref, other = arena.acquire(1, 16, 2).slots
    arena.share(1, other, 77, 1, 10.0)  # (a share sends release the long way)
    ahead = ref._replace(generation=ref.generation + (1 << 31) + 1)  # a lend that expired
    with pytest.raises(StaleHandleError):
        arena.release(1, [ahead, SlotRef(10**9, 0, 1)])
    assert arena._segments[ref.segment].generations[ref.index] == ref.generation
    with pytest.raises(StaleHandleError):
        arena.release(1, [ahead, ahead._replace(generation=ahead.generation + 1)])
    assert arena._segments[ref.segment].generations[ref.index] == ref.generation
    assert arena.release(1, [ahead]) == 1
    check_books(arena)


@pytest.mark.parametrize("ops", OPS)
def test_what_lending_really_does_to_a_generation_stands(ops: str) -> None:
    """Handoffs (1 each) and expired lends (1 + 2**31 each) between two releases."""
    arena = _arena(ops)
    for advance in (1, 1000, 3 * (1 + (1 << 31)) + 7, 1000 * (1 + (1 << 31))):
        (ref,) = arena.acquire(1, 16).slots
        arena.release(1, [ref._replace(generation=ref.generation + advance)])
    (ref,) = arena.acquire(1, 16).slots
    moved = arena.detach(1, ref._replace(generation=ref.generation + (1 << 33)), 77, 10.0)
    assert moved is not None and moved.generation == ref.generation + (1 << 33) + 1
    check_books(arena)


@pytest.mark.parametrize("ops", OPS)
def test_a_client_pushing_generations_up_hurts_nobody(ops: str) -> None:
    """A lender naming the biggest generation it gets away with, again and again.

    It hands the slot to itself by detach and claim (no grant), each time as
    far ahead as the manager takes: no generation passes ``MAX_ID``, and the
    next client of the slot gets one it can lend on and give back.
    """
    arena = _arena(ops)
    (ref,) = arena.acquire(1, 16).slots
    step, rounds = MAX_ID, 0
    while step and rounds < 100_000:
        rounds += 1
        ahead = ref._replace(generation=min(MAX_ID, ref.generation + step))
        try:
            moved = arena.detach(1, ahead, 77, 10.0)
        except StaleHandleError:
            step //= 2
            continue
        assert moved is not None and moved.generation <= MAX_ID
        _store(arena, moved, claim_word(1, moved.generation))  # claimed by its own word
        arena.claim(1, moved, 77)
        ref = moved
    assert step == 0, "the pushing never stopped"
    arena.release(1, [ref])
    check_books(arena)
    (got,) = arena.acquire(2, 16).slots
    assert got[:2] == ref[:2]
    lent_back = got.generation + 5 * (1 + (1 << 31))
    arena.release(2, [got._replace(generation=lent_back)])
    check_books(arena)


# ------------------------------------------------------------ a real manager


def _forge_a_return(address: str, generation: int) -> None:
    """Lease a slot as a lender speaking the protocol by hand, and Return it as ``generation``.

    Exits 0 if the manager refused it (an Error, and the connection closed).
    """
    from test_faults import RawClient

    from shmpool import protocol

    with RawClient(address, timeout=10.0) as raw:  # no reply within it: the Return was accepted
        hello = protocol.Hello(raw.next_req(), protocol.VERSION, os.getpid(), "forger", 1)
        assert isinstance(raw.call(hello), protocol.Welcome)
        grant = raw.call(protocol.Acquire(raw.next_req(), 5000))
        assert isinstance(grant, protocol.Grant)
        forged = [grant.slots[0]._replace(generation=generation)]
        raw.send_raw(protocol.encode(protocol.Return(raw.next_req(), forged)))
        # Nothing more is sent: a request the manager leaves unread when it closes
        # would reset the connection and lose its Error. A Return accepted gets no
        # reply at all, so the receive times out and the child exits 1.
        try:
            reply = raw.receive()  # an Error if the Return was refused
        except TimeoutError:
            reply = None
    os._exit(0 if isinstance(reply, protocol.Error) else 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("generation", [MAX_ID, 2**62])
def test_a_forged_return_hurts_only_its_sender(generation: int) -> None:
    """Issue 10: a Return of generation 2**63-1 broke every later client of the class."""
    ctx = multiprocessing.get_context("fork")
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="16MiB") as mgr:
        forger = ctx.Process(target=_forge_a_return, args=(mgr.address, generation))
        forger.start()
        forger.join(MP_TIMEOUT)
        for _ in range(3):  # later clients of the class get that slot, and give it back
            with mgr.connect() as pool:
                with pool.acquire(5000) as lease:
                    lease.view[:5] = b"fine!"
                pool.trim()
                assert_balanced(pool.stats())
        with mgr.connect() as pool:
            assert_balanced(wait_for(lambda: all_returned(s := pool.stats()) and s))
        assert forger.exitcode == 0  # its Return was refused


RECORD = struct.Struct("<QI")  # length of the data after it, its crc32
REAL_SIZES = (5000, 70_000, 300_000, 2 << 20)  # three classes and an oversize slot
WORKERS = 3


def _fill(lease: shmpool.Lease, rng: random.Random) -> None:
    n = min(len(lease.view) - RECORD.size, 512)
    data = rng.randbytes(n)
    lease.view[RECORD.size : RECORD.size + n] = data
    RECORD.pack_into(lease.view, 0, n, zlib.crc32(data))


def _intact(lease: shmpool.Lease) -> bool:
    n, crc = RECORD.unpack_from(lease.view)
    return n <= len(lease.view) - RECORD.size and zlib.crc32(lease.view[8 + 4 : 12 + n]) == crc


def _good_worker(
    address: str, me: int, inboxes: list[Any], results: Any, stop: Any, handoffs: Any
) -> None:
    """Acquire, fill, hand on, attach, check and release until ``stop``; report what went wrong.

    Writes a byte to the pipe ``handoffs`` for each handoff, and reports
    (me, stage, counts): how many handoffs it made, and each error by name.
    A StaleHandleError or UsageError may come of a word the scribbler wrote
    (a handle whose word it changed, a slot whose word is not ours to lend).
    """
    rng = random.Random(me)
    counts: Counter[str] = Counter()
    held: list[shmpool.Lease] = []

    def attach(handle: shmpool.Handle) -> None:
        lease = pool.attach(handle)
        counts["attached"] += 1
        if not _intact(lease):
            counts["torn"] += 1
        held.append(lease)

    def step() -> None:
        with contextlib.suppress(queue.Empty):
            attach(inboxes[me].get_nowait())
        roll = rng.random()
        if len(held) > 4:
            held.pop(0).release()
        elif roll < 0.35 or not held:
            lease = pool.acquire(rng.choice(REAL_SIZES))
            _fill(lease, rng)
            held.append(lease)
        elif roll < 0.75:
            lease = held.pop(rng.randrange(len(held)))
            try:
                handle = lease.detach()
            except shmpool.UsageError:  # its word is not ours to lend (written over)
                lease.release()
                raise
            inboxes[rng.randrange(WORKERS)].put(handle)
            counts["handed"] += 1
            with contextlib.suppress(BlockingIOError):
                os.write(handoffs, b"h")
        else:
            held.pop(rng.randrange(len(held))).release()

    stopped = False
    try:
        with shmpool.connect(address, name=f"good{me}") as pool:
            while not stop.is_set():
                try:
                    step()
                except (
                    shmpool.StaleHandleError,
                    shmpool.UsageError,
                    shmpool.PoolExhaustedError,
                ) as exc:
                    counts[type(exc).__name__] += 1
            for lease in held:
                lease.release()
            held.clear()
            stopped = True
            results.put((me, "stopped", {}))  # it hands nothing on from now on
            while (handle := inboxes[me].get()) is not None:  # those sent to us
                try:
                    attach(handle)
                    held.pop().release()
                except (shmpool.StaleHandleError, shmpool.UsageError) as exc:
                    counts[type(exc).__name__] += 1
    except BaseException as exc:
        counts[f"{type(exc).__name__}: {exc}"] += 1
    finally:
        if not stopped:
            results.put((me, "stopped", {}))
        results.put((me, "closed", dict(counts)))


def _scribbler(address: str, ready: Any) -> None:
    """Map the segments of every class and write anything into every ticket word, for ever."""
    rng = random.Random(99)
    pool = shmpool.connect(address, name="scribbler")
    keep = [pool.acquire(size) for size in REAL_SIZES for _ in range(3)]
    ready.set()
    while keep:
        for seg in list(pool._conn.segments.values()):
            if seg.tickets is None:
                continue
            for offset in range(0, len(seg.tickets), 8):
                # Not 0: a borrower whose word reads 0 takes the slot for its own
                # (client ``_give_back``: "the manager gave it to us"), and its
                # Return of it then gets it dropped. Only the manager may write 0.
                value = rng.choice(
                    [
                        rng.getrandbits(64) or 1,
                        CLAIMED | rng.randint(1, 12),
                        claim_word(rng.randint(1, 12), rng.getrandbits(31)),
                        LENT | rng.getrandbits(62),
                        returned_word(rng.getrandbits(31)),
                        2**64 - 1,
                    ]
                )
                buffer._speedups.store64(seg.tickets, offset, value)


class _Counted:
    """Bytes read so far from a non-blocking pipe: ``made()`` reads more and says how many."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 0

    def __call__(self) -> int:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, 65536):
                self.count += len(data)
        return self.count


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not buffer.SPEEDUPS, reason="ticket words need the C extension")
def test_a_client_scribbling_every_word_hurts_nobody_else() -> None:
    ctx = multiprocessing.get_context("fork")
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="64MiB", transit_timeout=2) as mgr:
        inboxes = [ctx.Queue() for _ in range(WORKERS)]
        results, stop, ready = ctx.Queue(), ctx.Event(), ctx.Event()
        progress, handoffs = os.pipe2(os.O_NONBLOCK)
        args = (inboxes, results, stop, handoffs)
        workers = [
            ctx.Process(target=_good_worker, args=(mgr.address, i, *args)) for i in range(WORKERS)
        ]
        scribbler = ctx.Process(target=_scribbler, args=(mgr.address, ready))
        scribbler.start()
        assert ready.wait(MP_TIMEOUT)
        for proc in workers:
            proc.start()
        made = _Counted(progress)
        wait_for(lambda: made() >= 1000)  # beside the scribbler
        os.kill(scribbler.pid, signal.SIGKILL)
        scribbler.join(MP_TIMEOUT)
        wait_for(lambda: made() >= 1300)  # and a little without it
        stop.set()
        seen = [results.get(timeout=MP_TIMEOUT)]
        while sum(stage == "stopped" for _, stage, _ in seen) < WORKERS:
            seen.append(results.get(timeout=MP_TIMEOUT))
        for inbox in inboxes:  # nobody hands on any more: the last handles are in
            inbox.put(None)
        while sum(stage == "closed" for _, stage, _ in seen) < WORKERS:
            seen.append(results.get(timeout=MP_TIMEOUT))
        reports = [report for report in seen if report[1] == "closed"]
        for proc in workers:
            proc.join(MP_TIMEOUT)
            assert proc.exitcode == 0
        for q in (*inboxes, results):
            q.close()
            q.join_thread()
        os.close(progress)
        os.close(handoffs)
        assert mgr.running
        with mgr.connect(name="after") as pool:
            with pool.acquire(5000) as lease:
                lease.view[:2] = b"ok"
            pool.trim()
            stats = wait_for(lambda: all_returned(s := pool.stats()) and s)
            assert_balanced(stats)
    allowed = {"attached", "handed", "StaleHandleError", "UsageError", "LeaseClosedError"}
    allowed.add("PoolExhaustedError")  # the scribbler's leases count against the budget
    for _, _, counts in reports:
        assert set(counts) <= allowed, reports
    assert not any(c.get("torn") for _, _, c in reports), reports  # no slot held twice
