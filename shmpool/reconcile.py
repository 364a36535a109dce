"""Reconciling lent slots: what their ticket words say, where the books cannot.

A client with the C extension lends a class slot by its ticket word alone
(``lent_word``) and tells the manager nothing; the books keep the slot with
its lender all the while. The words therefore say things the books do not:
when the lender's connection ends (``dropped``), when a borrower goes
(``return_borrowed``), when an orphan settles (``settle_orphans``) and when
the stats count what is out (``census``), the manager reads them here.

Clients write the words, so nothing here trusts a word beyond what a client
could have made: a claim counts only for a live client that maps the segment
(``claimer``), a generation only as far ahead as lending reaches, and any
other value is garbage with one safe outcome per function (each says which).
Every change of a slot's state goes through ``slots.move``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .protocol import MAX_ID
from .slots import ORPHAN, ClassBooks, ClientBooks, Segment, move
from .ticket import (
    ANY_CLAIM,
    ANY_LENT,
    claimer_of,
    claims_by,
    generation_at_least,
    generation_low31,
    is_claimed,
    is_lent,
    is_ticket,
    returned_word,
    token_of,
    word_low31,
)

__all__ = ["LEND_AHEAD", "MAX_GENERATION", "Reconciler", "TicketOps", "Words", "ahead"]

#: How far a lender may name a generation ahead of the books. It moves its
#: slot on without telling the manager: 1 for each handoff of a lend, 1 + 2**31
#: for a lend that expired (client ``_reclaim_lent``). 2**48 is some 130,000
#: expired lends, or years of handoffs, of one slot between two releases.
LEND_AHEAD = 1 << 48
#: No generation a client names is taken past this: the manager's own steps
#: (1 each) then never take one past ``MAX_ID``, the most the wire carries.
MAX_GENERATION = MAX_ID - LEND_AHEAD


def ahead(books: int, generation: int) -> bool:
    """True if lending can take a slot the books have at ``books`` to ``generation``.

    As far ahead as lending reaches (``LEND_AHEAD``), and never past
    ``MAX_GENERATION``: clients name these numbers, and any other is forged.
    """
    return books < generation <= books + LEND_AHEAD and generation <= MAX_GENERATION


class TicketOps(Protocol):
    """Atomic operations on the ticket words at the start of a segment."""

    def cas64(self, buffer: Any, offset: int, expected: int, new: int) -> bool: ...

    def load64(self, buffer: Any, offset: int) -> int: ...

    def store64(self, buffer: Any, offset: int, value: int) -> None: ...

    # optional: find_words(buffer, count, mask, value) -> indices of matching words


class Words:
    """The ticket words of the arena's segments, through the injected atomics."""

    __slots__ = ("cas64", "find_words", "load64", "ops", "store64")

    def __init__(self, ops: TicketOps) -> None:
        self.ops = ops
        self.cas64 = ops.cas64
        self.load64 = ops.load64
        self.store64 = ops.store64
        self.find_words = getattr(ops, "find_words", None)

    def load(self, seg: Segment, index: int) -> int:
        return self.load64(seg.backing.tickets, 8 * index)  # type: ignore[attr-defined]

    def cas(self, seg: Segment, index: int, expected: int, new: int) -> bool:
        return self.cas64(seg.backing.tickets, 8 * index, expected, new)  # type: ignore[attr-defined]

    def store(self, seg: Segment, index: int, value: int) -> None:
        self.store64(seg.backing.tickets, 8 * index, value)  # type: ignore[attr-defined]

    def find(self, seg: Segment, mask: int, value: int) -> list[int]:
        """Indices of ``seg``'s ticket words ``w`` with ``w & mask == value``."""
        tickets = seg.backing.tickets  # type: ignore[attr-defined]
        if self.find_words is not None:
            return self.find_words(tickets, seg.nslots, mask, value)  # type: ignore[no-any-return]
        load = self.load64
        return [i for i in range(seg.nslots) if load(tickets, 8 * i) & mask == value]


class Reconciler:
    """The manager's side of lent slots: dropped lenders, orphans, gone borrowers, the census.

    It shares the arena's ``segments``, ``conns`` and ``classes`` (read
    only) and frees or puts in transit through the arena's own functions,
    so that memory and transit stay the arena's. It owns ``orphans``.
    """

    def __init__(
        self,
        words: Words,
        segments: dict[int, Segment],
        conns: dict[int, ClientBooks],
        classes: list[ClassBooks],
        free: Callable[[Segment, int, ClientBooks | None], None],
        put_in_transit: Callable[[Segment, int, ClientBooks, int, float], None],
    ) -> None:
        self.words = words
        self._segments = segments
        self._conns = conns
        self._classes = classes
        self._free = free
        self._put_in_transit = put_in_transit
        # (segment id, index) -> [word seen, deadline, timeout] for ORPHAN slots
        self.orphans: dict[tuple[int, int], list[Any]] = {}

    def claimer(self, seg: Segment, word: int) -> ClientBooks | None:
        """The live client that a claimed ``word`` of ``seg`` names, or None.

        Clients write the words, so a claim counts only if its client could
        have made it: one that has ``seg`` mapped (claiming by the word needs
        the mapping; a claim the manager made for it mapped it too). A claim
        naming anyone else, and ``returned_word`` (client 0), name nobody.
        """
        c = self._conns.get(claimer_of(word))
        return c if c is not None and seg.id in c.known else None

    def dropped(self, seg: Segment, index: int, c: ClientBooks, now: float, timeout: float) -> bool:
        """A dropped holder's slot, by what its ticket word says; True if kept.

        0 or returned: the slot is free (the caller frees it). Claimed by a
        live client: it is that client's now (it holds it, lent or handed
        on). A lender's ticket: an orphan, in transit until ``now + timeout``,
        its word watched. The manager's own ticket (a handoff it was told
        of): in transit.

        The word may hold anything, and whatever it holds the slot goes to
        one place: a claim that names nobody (``claimer``) and a lender's
        ticket on a slot nobody lends (oversize) free it; any other ticket
        puts it in transit, under a token nobody may have, until it expires.
        """
        words = self.words
        for _ in range(8):  # the word may move while we look: a borrower acts meanwhile
            value = words.load(seg, index)
            if value == 0:
                return False
            if is_claimed(value):
                claimer = self.claimer(seg, value)
                if not words.cas(seg, index, value, 0):
                    continue
                if claimer is None:
                    return False  # returned, or claimed by a client that is gone too
                generation = self.claimed_generation(seg, index, claimer, value)
                self.give(seg, index, claimer, generation, giver=c)
                return True
            if is_lent(value):
                if seg.cls is None:
                    return False  # only class slots are lent: the word is garbage
                self.orphan(seg, index, c, value, now, timeout)
                return True
            token = token_of(value, seg.generations[index] + 1)
            self._put_in_transit(seg, index, c, token, now + timeout)
            return True
        self.orphan(seg, index, c, words.load(seg, index), now, timeout)
        return True

    def claimed_generation(self, seg: Segment, index: int, claimer: ClientBooks, word: int) -> int:
        """The generation of the handle ``claimer`` holds the slot by (its claim ``word``).

        The word keeps 31 bits of it; a lender's generations move on without
        the books, so the books' one is only a floor. The manager remembers
        the whole generation for a client it claimed for (one without atomics,
        which names it exactly when it lets go), if the word and the books
        still agree with it (the word may have been written over since).
        Never past ``MAX_GENERATION``: only a written word takes it there.
        """
        low31 = word_low31(word)
        books = seg.generations[index]
        known = claimer.borrowed.pop((seg.id, index), None)
        if known is not None and generation_low31(known) == low31 and ahead(books, known):
            return known
        return min(generation_at_least(low31, books), max(books, MAX_GENERATION))

    @staticmethod
    def give(
        seg: Segment,
        index: int,
        c: ClientBooks,
        generation: int,
        giver: ClientBooks | None = None,
    ) -> None:
        """``c`` holds the slot now: from its dropped lender ``giver``, or an orphan's."""
        move(seg, index, c.id, generation, giver, c)
        c.known.add(seg.id)

    def orphan(
        self, seg: Segment, index: int, c: ClientBooks, word: int, now: float, timeout: float
    ) -> None:
        """The lender ``c`` went while the slot was out: watch its word until it settles."""
        move(seg, index, ORPHAN, seg.generations[index], c)
        self.orphans[(seg.id, index)] = [word, now + timeout, timeout]

    def settle_orphans(self, now: float | None) -> int:
        """Orphans whose words settled: claimed (to the claimer), returned or expired (freed).

        With ``now`` None (no clock at hand), only claimed and returned ones
        settle; a ticket waits for the next call with the time. Returns how
        many left the orphans.
        """
        return sum(self.settle_orphan(key, now) for key in list(self.orphans))

    def settle_orphan(self, key: tuple[int, int], now: float | None) -> bool:
        """``settle_orphans`` for one orphan; True if it settled.

        The word may hold anything. A claim counts only if its client could
        have made it (``claimer``); any other claim names nobody, and the
        slot is freed, as for 0 (which only the manager writes to an orphan's
        word, and then it is no orphan). Only a new lender's ticket (a
        borrower handed the slot on) gives it a new handle's time; any other
        ticket waits out the time it has.
        """
        entry = self.orphans[key]
        seg = self._segments[key[0]]
        index = key[1]
        value = self.words.load(seg, index)
        claimer = self.claimer(seg, value) if is_claimed(value) else None
        if is_ticket(value):  # it waits for its handle's time
            if now is None:
                return False
            if is_lent(value) and value != entry[0]:
                entry[0], entry[1] = value, now + entry[2]  # handed on: a new handle's time
                return False
            if entry[1] > now:
                return False
        if not self.words.cas(seg, index, value, 0):
            return False  # it moved: next time
        del self.orphans[key]
        if claimer is None:
            self._free(seg, index, None)  # returned, expired, or nobody's
        else:
            self.give(seg, index, claimer, self.claimed_generation(seg, index, claimer, value))
        return True

    def return_borrowed(self, c: ClientBooks) -> None:
        """The dropped client ``c`` held slots lent to it: back to their lenders.

        Its claim in a word becomes ``returned_word``, which a live lender
        takes back; an orphan's claim frees the slot. A word that only looks
        like its claim (written over) goes the same way: it names a slot
        that a live lender holds or that nobody does.
        """
        words = self.words
        mask, want = claims_by(c.id)
        orphans = []
        for seg in list(self._segments.values()):
            if not seg.header:
                continue
            for index in words.find(seg, mask, want):
                value = words.load(seg, index)
                holder = seg.holders[index]
                if value & mask != want or not (holder == ORPHAN or holder in self._conns):
                    continue
                returned = words.cas(seg, index, value, returned_word(word_low31(value)))
                if returned and holder == ORPHAN:
                    orphans.append((seg.id, index))
        for key in orphans:  # each one looked at once, however many there are
            if key in self.orphans:
                self.settle_orphan(key, None)  # frees it (returned)

    def claims(self, conn: int) -> bool:
        """True if some word holds a claim by ``conn`` (a slot is lent to it)."""
        mask, want = claims_by(conn)
        return any(
            seg.header and self.words.find(seg, mask, want) for seg in self._segments.values()
        )

    def census(self) -> tuple[list[int], dict[int, int]]:
        """What the books do not count of lent slots, read from their words.

        Per class, the slots live clients lent out and nobody claimed yet
        (the books count them leased to their lenders; they are in transit).
        Per client, slots lent to it minus slots it lent out: a slot a live
        client lent out is in transit (a ticket) or held by its claimer; a
        returned one is back with its lender.
        """
        lent = [0] * len(self._classes)
        shift: dict[int, int] = {}
        conns = self._conns
        words = self.words
        for i, cls in enumerate(self._classes):
            for seg in cls.segments:
                if not seg.header:
                    continue
                for index in words.find(seg, *ANY_LENT):
                    holder = seg.holders[index]
                    if holder in conns:
                        lent[i] += 1
                        shift[holder] = shift.get(holder, 0) - 1
                for index in words.find(seg, *ANY_CLAIM):
                    holder = seg.holders[index]
                    c = self.claimer(seg, words.load(seg, index))
                    if c is None or c.id == holder:
                        continue  # returned, or claimed from itself, or by nobody who could
                    if holder in conns:
                        shift[holder] = shift.get(holder, 0) - 1
                        shift[c.id] = shift.get(c.id, 0) + 1
                    elif holder == ORPHAN:
                        shift[c.id] = shift.get(c.id, 0) + 1
        return lent, shift
