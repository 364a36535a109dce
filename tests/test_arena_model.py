"""A model of who holds each slot, against the arena's books, step by random step.

Hypothesis drives a pure ``Arena`` (fake backings, with and without ticket
words) through random client steps: acquire (class and oversize), release
(and forged releases, refused with nothing changed), detach and attach (also
an attach that overtakes its sender's notice), claims by ticket words,
shares and their readers, lending by ticket words (borrow, give back, take
back, a lend that expires), dropped clients and passing time. The model says
where each slot must be: free, held by one client, in transit, shared, lent
or an orphan; after every step the books must say the same, every slot must
be in exactly one place, and per class ``total == free + leased + in_transit``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from arena_books import SIZES, check_books, ticket_ops, word_arena
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmpool.arena import ORPHAN, SHARED, TRANSIT
from shmpool.errors import PoolExhaustedError, StaleHandleError
from shmpool.protocol import (
    MAX_ID,
    NOTICE_RETURNED,
    SlotRef,
    claim_word,
    lent_word,
    returned_word,
    ticket_word,
    token_maker,
)

TIMEOUT = 10.0  # the transit timeout (fake seconds)
MEMORY = 4096 + 1024  # room for one oversize segment, or a few class segments
Key = tuple[int, int]


@dataclass
class Where:
    """Where the model says one slot is (a free class slot has no entry)."""

    state: str  # held, pending, transit, shared, lent, orphan
    owner: int = 0  # held: holder; pending, lent: sender or lender
    generation: int = 0  # held: the lease's; otherwise the handle's
    token: int = 0
    claimer: int = 0  # lent: who claimed it (0: nobody yet)
    returned: bool = False  # lent: its borrower let go of it
    deadline: float = 0.0
    pending: int = 0  # shared: attaches still allowed
    readers: Counter[int] = field(default_factory=Counter)  # shared: conn -> leases


class ArenaModel(RuleBasedStateMachine):
    """The arena against a model of where every slot is."""

    tickets = False

    def __init__(self) -> None:
        super().__init__()
        self.arena, self.backings = word_arena(MEMORY, ticket_ops("py") if self.tickets else None)
        self.where: dict[Key, Where] = {}
        self.lends: dict[int, bool] = {}  # live clients: conn -> lends by ticket words
        self.ids = itertools.count(1)
        self.now = 0.0
        self.oversize: set[int] = set()  # segment ids

    # ---------------------------------------------------------------- helpers

    def _token(self, conn: int, key: Key, generation: int) -> int:
        return token_maker(conn * 7919)(*key, generation)

    def _keys(self, state: str, owner: int | None = None) -> list[Key]:
        return sorted(
            k
            for k, w in self.where.items()
            if w.state == state and (owner is None or w.owner == owner)
        )

    def _word(self, key: Key) -> int:
        seg = self.arena._segments[key[0]]
        assert self.arena._tickets is not None
        return self.arena._tickets.load64(seg.backing.tickets, 8 * key[1])

    def _cas(self, key: Key, old: int, new: int) -> bool:
        seg = self.arena._segments[key[0]]
        assert self.arena._tickets is not None
        return self.arena._tickets.cas64(seg.backing.tickets, 8 * key[1], old, new)

    def _books(self) -> Any:
        a = self.arena
        segs = {s.id: (list(s.holders), list(s.generations)) for s in a._segments.values()}
        conns = {c.id: (set(c.held), set(c.known), dict(c.borrowed)) for c in a._conns.values()}
        words = {
            s.id: bytes(s.backing.tickets)  # type: ignore[attr-defined]
            for s in a._segments.values()
        }
        # what a failed acquire may still change: free slots give their pages back
        stats = a.stats()
        for key in ("committed_bytes", "mapped_bytes"):
            del stats[key]
        for c in stats["classes"]:
            del c["committed_bytes"]
        return segs, conns, words, dict(a._transit), dict(a._orphans), stats

    def _class_slot(self, key: Key) -> bool:
        return key[0] not in self.oversize

    def _free(self, key: Key) -> None:
        """The model's side of the arena freeing a slot (an oversize one is destroyed)."""
        del self.where[key]
        self.oversize.discard(key[0])

    def _granted(self, conn: int, grant: Any, lent: bool = False) -> None:
        assert grant.lent is lent
        for ref in grant.slots:
            key = (ref.segment, ref.index)
            assert 0 < ref.generation <= MAX_ID
            if not lent:
                was = self.where.get(key)
                assert was is None or was.state in ("pending", "transit", "orphan"), was
                self.where[key] = Where("held", conn, ref.generation)
        for info in grant.segments:
            if info.slot_size > SIZES[-1]:
                self.oversize.add(info.segment)

    # ------------------------------------------------------------------ rules

    @initialize(lends=st.lists(st.booleans(), min_size=3, max_size=3))
    def clients(self, lends: list[bool]) -> None:
        for lender in [True, *lends]:
            self.add_client(lender)

    def add_client(self, lends: bool) -> None:
        conn = next(self.ids)
        lends = lends and self.tickets
        self.arena.add_conn(conn, pid=conn, key=conn * 7919, lends=lends)
        self.lends[conn] = lends

    @precondition(lambda self: self.lends)
    @rule(
        data=st.data(),
        size=st.sampled_from([*SIZES, 1, 17, 100, 257, 3000]),
        count=st.integers(1, 5),
    )
    def acquire(self, data: st.DataObject, size: int, count: int) -> None:
        conn = data.draw(st.sampled_from(sorted(self.lends)))
        oversize = self.arena.classes.index_of(size) is None
        before = self._books()
        try:
            grant = self.arena.acquire(conn, size, count)
        except PoolExhaustedError:
            assert self._books() == before  # nothing changed
            return
        assert 1 <= len(grant.slots) <= count
        for ref in grant.slots:
            assert (ref.segment, ref.index) not in self.where, "a slot granted twice"
        if oversize:
            self.oversize.update(info.segment for info in grant.segments)
        self._granted(conn, grant)

    @precondition(lambda self: self._keys("held"))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self._keys("held")))
        conn = self.where[key].owner
        mine = self._keys("held", conn)
        keys = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True))
        if key not in keys:
            keys.append(key)
        refs = [SlotRef(*k, self.where[k].generation) for k in keys]
        assert self.arena.release(conn, refs) == len(refs)
        for k in keys:
            self._free(k)

    @precondition(lambda self: self.lends)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            ["unknown", "foreign", "stale", "ahead", "index", "twice", "transit", "shared"]
        ),
    )
    def release_forged(self, data: st.DataObject, kind: str) -> None:
        """A batch with one bad reference: refused, nothing changed."""
        conn = data.draw(st.sampled_from(sorted(self.lends)))
        mine = [SlotRef(*k, self.where[k].generation) for k in self._keys("held", conn)]
        good = data.draw(st.lists(st.sampled_from(mine), unique=True)) if mine else []
        bad: SlotRef | None = None
        if kind == "unknown":
            bad = SlotRef(10**9, 0, 1)
        elif kind == "foreign":
            others = [k for k in self._keys("held") if self.where[k].owner != conn]
            if others:
                k = data.draw(st.sampled_from(others))
                bad = SlotRef(*k, self.where[k].generation)
        elif kind in ("stale", "ahead", "index") and mine:
            ref = data.draw(st.sampled_from(mine))
            if kind == "stale":  # older than the books (a lender's newer one may stand)
                books = self.arena._segments[ref.segment].generations[ref.index]
                bad = ref._replace(generation=books - 1)
            elif kind == "ahead":  # past anything lending reaches, or a non-lender's
                ahead = 1 if not self.lends[conn] else data.draw(st.sampled_from([2**49, 2**62]))
                bad = ref._replace(generation=min(MAX_ID, ref.generation + ahead))
            else:
                bad = ref._replace(index=10**6)
        elif kind == "twice" and good:
            bad = good[0]
        elif kind in ("transit", "shared"):
            keys = [k for k in self._keys(kind) if not self.where[k].readers[conn]]
            if keys:
                k = data.draw(st.sampled_from(keys))
                bad = SlotRef(*k, self.where[k].generation)
        if bad is None:
            return
        batch = [*good, bad]
        before = self._books()
        with pytest.raises(StaleHandleError):
            self.arena.release(conn, data.draw(st.permutations(batch)))
        assert self._books() == before

    @precondition(lambda self: self._keys("held"))
    @rule(data=st.data(), notice=st.booleans())
    def detach(self, data: st.DataObject, notice: bool) -> None:
        """Hand a slot on: the sender's Detach now, or (``notice`` False) later."""
        key = data.draw(st.sampled_from(self._keys("held")))
        w = self.where[key]
        generation = w.generation + 1
        token = self._token(w.owner, key, generation)
        if not notice:
            self.where[key] = Where("pending", w.owner, generation, token)
            return
        moved = self.arena.detach(w.owner, SlotRef(*key, w.generation), token, self.now + TIMEOUT)
        assert moved == SlotRef(*key, generation)
        self.where[key] = Where("transit", 0, generation, token, deadline=self.now + TIMEOUT)
        if self.tickets:
            assert self._word(key) == ticket_word(token, generation)  # published for it
        if not self._class_slot(key):
            assert key[0] not in self.arena._conns[w.owner].known  # it unmaps it

    @precondition(lambda self: self._keys("pending"))
    @rule(data=st.data())
    def send_detach(self, data: st.DataObject) -> None:
        """The sender's late Detach: in transit now, or done already by its receiver."""
        key = data.draw(st.sampled_from(self._keys("pending")))
        w = self.where[key]
        ref = SlotRef(*key, w.generation - 1)
        moved = self.arena.detach(w.owner, ref, w.token, self.now + TIMEOUT)
        assert moved == SlotRef(*key, w.generation)
        self.where[key] = Where("transit", 0, w.generation, w.token, deadline=self.now + TIMEOUT)

    def _handles(self) -> list[Key]:
        pending = [k for k in self._keys("pending") if not self._lender_slot(k)]
        return self._keys("transit") + pending

    def _lender_slot(self, key: Key) -> bool:
        """A lender's class slot: only its own notice moves it (no proof by token)."""
        w = self.where[key]
        return self.tickets and self.lends.get(w.owner, False) and self._class_slot(key)

    @precondition(lambda self: self.lends and self._handles())
    @rule(data=st.data(), by_word=st.booleans())
    def attach(self, data: st.DataObject, by_word: bool) -> None:
        """Take a handle: by Attach, or (with ticket words) by claiming its word."""
        key = data.draw(st.sampled_from(self._handles()))
        conn = data.draw(st.sampled_from(sorted(self.lends)))
        w = self.where[key]
        ref = SlotRef(*key, w.generation)
        if by_word and self.tickets and w.state == "transit":
            assert self._cas(
                key, ticket_word(w.token, w.generation), claim_word(conn, ref.generation)
            )
            self.arena.claim(conn, ref, w.token, self.now + TIMEOUT)
            self.where[key] = Where("held", conn, w.generation)
            if self.tickets:
                assert self._word(key) == 0  # the manager cleared the claim
            return
        grant = self.arena.attach(conn, ref, w.token, self.now + TIMEOUT)
        if w.state == "pending":  # its sender's notice, when it comes, does nothing
            assert (
                self.arena.detach(
                    w.owner,
                    ref._replace(generation=ref.generation - 1),
                    w.token,
                    self.now + TIMEOUT,
                )
                is None
            )
        self._granted(conn, grant)

    @precondition(lambda self: self.lends and self._handles())
    @rule(data=st.data(), forged=st.sampled_from(["token", "generation", "twice"]))
    def attach_forged(self, data: st.DataObject, forged: str) -> None:
        key = data.draw(st.sampled_from(self._handles()))
        conn = data.draw(st.sampled_from(sorted(self.lends)))
        w = self.where[key]
        ref, token = SlotRef(*key, w.generation), w.token
        if forged == "token":
            token ^= 2
        elif forged == "generation":
            ref = ref._replace(generation=ref.generation + 1)
        else:
            ref = ref._replace(generation=ref.generation - 1)  # the handle before this one
        before = self._books()
        with pytest.raises(StaleHandleError):
            self.arena.attach(conn, ref, token, self.now + TIMEOUT)
        assert self._books() == before

    @precondition(lambda self: self._keys("held"))
    @rule(data=st.data(), readers=st.integers(1, 3))
    def share(self, data: st.DataObject, readers: int) -> None:
        key = data.draw(st.sampled_from(self._keys("held")))
        w = self.where[key]
        token = self._token(w.owner, key, w.generation + 1) ^ 1
        ref = self.arena.share(
            w.owner, SlotRef(*key, w.generation), token, readers, self.now + TIMEOUT
        )
        assert ref == SlotRef(*key, w.generation + 1)
        self.where[key] = Where(
            "shared", w.owner, ref.generation, token, deadline=self.now + TIMEOUT, pending=readers
        )

    @precondition(lambda self: self.lends and self._keys("shared"))
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """A reader attaches a shared slot, or lets go of one it reads."""
        key = data.draw(st.sampled_from(self._keys("shared")))
        w = self.where[key]
        conn = data.draw(st.sampled_from(sorted(self.lends)))
        ref = SlotRef(*key, w.generation)
        if w.readers[conn]:
            assert self.arena.release(conn, [ref]) == 1
            w.readers[conn] -= 1
            self._settle_share(key)
        elif w.pending:
            grant = self.arena.attach(conn, ref, w.token, self.now + TIMEOUT)
            assert grant.slots == [ref]
            w.pending -= 1
            w.readers[conn] += 1
        else:
            with pytest.raises(StaleHandleError):
                self.arena.attach(conn, ref, w.token, self.now + TIMEOUT)

    def _settle_share(self, key: Key) -> None:
        w = self.where[key]
        if not w.pending and not +w.readers:
            self._free(key)

    # ------------------------------------------------------------ lending

    def _lendable(self) -> list[Key]:
        return [
            k
            for k in self._keys("held")
            if self.tickets and self.lends[self.where[k].owner] and self._class_slot(k)
        ]

    @precondition(lambda self: self._lendable())
    @rule(data=st.data())
    def lend(self, data: st.DataObject) -> None:
        """A lender publishes its slot's word and tells nobody."""
        key = data.draw(st.sampled_from(self._lendable()))
        w = self.where[key]
        generation = w.generation + 1
        token = self._token(w.owner, key, generation) ^ 4  # any token: only its word says it
        assert self._cas(key, 0, lent_word(token, generation))
        self.where[key] = Where("lent", w.owner, generation, token)

    @precondition(lambda self: self._keys("lent") or self._keys("orphan"))
    @rule(data=st.data(), by_word=st.booleans(), expired=st.booleans())
    def lent_step(self, data: st.DataObject, by_word: bool, expired: bool) -> None:
        """The next step of a lend (or of an orphan's handle), by its word or the manager.

        Nobody took it yet: a client borrows it, or its lender takes it back
        (``expired``: 2**31 generations further); an orphan: a client adopts
        it; borrowed: its borrower gives it back; given back: its lender takes
        it back.
        """
        key = data.draw(st.sampled_from(self._keys("lent") + self._keys("orphan")))
        w = self.where[key]
        conn = data.draw(st.sampled_from(sorted(self.lends)))
        by_word = by_word and self.lends[conn] and key[0] in self.arena._conns[conn].known
        if w.state == "orphan":
            self._adopt(key, w, conn, by_word)
        elif w.claimer:
            self._give_back(key, w)
        elif w.returned or expired:
            self._take_back(key, w)
        else:
            self._borrow(key, w, conn, by_word)

    def _borrow(self, key: Key, w: Where, conn: int, by_word: bool) -> None:
        """Claim a lent slot: by its word (a client with atomics), or by an Attach."""
        if by_word:
            assert self._cas(key, lent_word(w.token, w.generation), claim_word(conn, w.generation))
        else:
            ref = SlotRef(*key, w.generation)
            grant = self.arena.attach(conn, ref, w.token, self.now + TIMEOUT)
            assert grant.lent and grant.slots == [ref]
            assert self._word(key) == claim_word(conn, w.generation)
        w.claimer = conn

    def _give_back(self, key: Key, w: Where) -> None:
        """A borrower lets go: by its word, or by a RETURNED notice (no atomics)."""
        if self.lends[w.claimer]:
            assert self._cas(key, claim_word(w.claimer, w.generation), returned_word(w.generation))
        else:
            flat = (NOTICE_RETURNED, *key, w.generation, 0)
            assert self.arena.apply_notices(w.claimer, flat, self.now + TIMEOUT) == len(flat)
            assert self._word(key) == returned_word(w.generation)
        w.claimer, w.returned = 0, True

    def _take_back(self, key: Key, w: Where) -> None:
        """The lender takes its slot back: returned, or its lend expired (client side)."""
        if w.returned:
            assert self._cas(key, returned_word(w.generation), 0)
            generation = w.generation
        else:
            assert self._cas(key, lent_word(w.token, w.generation), 0)
            generation = w.generation + (1 << 31)
        self.where[key] = Where("held", w.owner, generation)

    def _adopt(self, key: Key, w: Where, conn: int, by_word: bool) -> None:
        """A handle of a lender that went: the slot becomes its taker's."""
        if by_word:
            assert self._cas(key, lent_word(w.token, w.generation), claim_word(conn, w.generation))
            self.where[key] = Where("held", conn, w.generation)  # stats() settles it
        else:
            ref = SlotRef(*key, w.generation)
            self._granted(conn, self.arena.attach(conn, ref, w.token, self.now + TIMEOUT))

    # ---------------------------------------------------------- the end of things

    @rule(data=st.data(), lends=st.booleans())
    def churn(self, data: st.DataObject, lends: bool) -> None:
        """A client goes (its connection dropped), and another comes."""
        self.drop(data.draw(st.sampled_from(sorted(self.lends))))
        self.add_client(lends)

    def drop(self, conn: int) -> None:
        self.arena.drop_conn(conn, self.now, TIMEOUT)
        del self.lends[conn]
        for key, w in list(self.where.items()):
            if w.state == "held" and w.owner == conn:
                self._free(key)
            elif w.state == "pending" and w.owner == conn:
                self._free(key)  # its Detach never came: the handle is stale
            elif w.state == "shared":
                w.readers.pop(conn, None)
                self._settle_share(key)
            elif w.state == "lent" and w.owner == conn:
                self._lender_gone(key, w)
            elif w.state == "lent" and w.claimer == conn:
                w.claimer, w.returned = 0, True  # back to its lender, by its word

    def _lender_gone(self, key: Key, w: Where) -> None:
        if w.returned or w.claimer == w.owner:  # claimed by itself: gone with it
            self._free(key)
        elif w.claimer:  # the slot is its borrower's now
            self.where[key] = Where("held", w.claimer, w.generation)
        else:
            self.where[key] = Where("orphan", 0, w.generation, w.token, deadline=self.now + TIMEOUT)

    @precondition(lambda self: any(w.deadline for w in self.where.values()))
    @rule(dt=st.sampled_from([0.5, TIMEOUT / 2, TIMEOUT, 3 * TIMEOUT]))
    def expire(self, dt: float) -> None:
        self.now += dt
        self.arena.expire_transit(self.now)
        for key, w in list(self.where.items()):
            if w.state in ("transit", "orphan") and w.deadline <= self.now:
                self._free(key)
            elif w.state == "shared" and w.deadline <= self.now:
                w.pending = 0
                self._settle_share(key)

    # ------------------------------------------------------------- invariants

    @invariant()
    def books_match_the_model(self) -> None:
        arena = self.arena
        stats = check_books(arena, self.backings)
        expect = {
            "held": lambda w: w.owner,
            "pending": lambda w: w.owner,
            "transit": lambda w: TRANSIT,
            "shared": lambda w: SHARED,
            "lent": lambda w: w.owner,
            "orphan": lambda w: ORPHAN,
        }
        for key, w in self.where.items():
            seg = arena._segments[key[0]]
            assert seg.holders[key[1]] == expect[w.state](w), (key, w)
            books = seg.generations[key[1]]
            if w.state in ("transit", "shared"):
                assert books == w.generation, (key, w, books)
            elif w.state == "held":
                assert books <= w.generation, (key, w, books)  # a lender runs ahead
        for seg in arena._segments.values():
            if seg.cls is None:
                assert seg.id in self.oversize
            for index, holder in enumerate(seg.holders):
                if (seg.id, index) not in self.where:
                    assert holder == 0, (seg.id, index, holder)
        self._stats_match(stats)

    def _stats_match(self, stats: dict[str, Any]) -> None:
        classes = {size: Counter() for size in SIZES}
        leased: Counter[int] = Counter()
        for key, w in self.where.items():
            if not self._class_slot(key):
                leased[w.owner] += w.state in ("held", "pending")
                continue
            counts = classes[self.arena._segments[key[0]].slot_size]
            out = w.state == "lent" and not w.claimer and not w.returned  # nobody took it yet
            if w.state in ("transit", "orphan") or out:
                counts["in_transit"] += 1
            else:
                counts["leased"] += 1
            if w.state in ("held", "pending") or (w.state == "lent" and w.returned):
                leased[w.owner] += 1
            elif w.state == "lent" and w.claimer:
                leased[w.claimer] += 1
        for cls in stats["classes"]:
            c = classes[cls["size"]]
            assert (cls["leased"], cls["in_transit"]) == (c["leased"], c["in_transit"]), cls
        assert stats["shared"] == len(self._keys("shared"))
        assert {c["id"]: c["leased"] for c in stats["clients"]} == {
            conn: leased[conn] for conn in self.lends
        }
        assert stats["oversize"]["leases"] == len(self.oversize)


class ArenaWithTicketsModel(ArenaModel):
    tickets = True


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestArenaBooks = ArenaModel.TestCase
TestArenaBooks.settings = SETTINGS
TestArenaBooksWithTickets = ArenaWithTicketsModel.TestCase
TestArenaBooksWithTickets.settings = SETTINGS
