"""Lending: handing a slot to another process by its ticket word, and taking it back.

A slot of a class cache is *lent* when its lease is detached or pickled: its
ticket word gets a ``lent_word`` and the manager hears nothing; the slot
stays this process's in the manager's books and is listed in ``lent``. The
receiver claims it (``claim``/``take``: a compare-and-swap to its
``claim_word``), and when it lets go it writes ``returned_word``
(``give_back``); the lender takes it back into its cache (``reclaim_lent``)
when the cache runs dry or from its janitor. A borrower may lend the slot
on (``hand_on``); it still comes home to the first lender. A slot whose word
the lender cannot use (oversize, a share, no C extension, a segment without
words) goes in the manager's keeping instead, with a notice. The word's
layout is ``shmpool.ticket``'s; the manager's side is ``arena``'s.

One ``Lending`` per ``Pool``, over the pool's ``Connection``; every method
that touches the books takes the connection's lock. The common cases run in
C with this object and its connection as explicit arguments
(``_speedups.take``, ``hand_off``, ``reclaim``, and the release of a
borrowed slot), which read by name ``conn``, ``borrowed``, ``lent``,
``caches``, ``meter`` and ``min_shift`` here and call ``watch``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Protocol

from . import protocol as p
from ._native import speedups
from .buffer import (
    Lease,
    LeaseHome,
    _Borrowed,
    _Cache,
    _Meter,
    _OversizeHome,
    _release_view,
    _SharedHome,
    _Slot,
    make_lease,
)
from .connection import Connection
from .errors import LeaseClosedError, PoolClosedError, StaleHandleError, UsageError
from .handle import Handle
from .ticket import (
    claim_word,
    generation_at_least,
    is_returned,
    lent_word,
    returned_word,
    seal_token,
    ticket_word,
    word_low31,
)

__all__ = ["Lender", "Lending"]

log = logging.getLogger("shmpool")

_speedups: Any = speedups

#: Set in the generation a share's token is computed from (generations stay
#: below 2**63), so that no share's token is ever the token of a handoff.
_SHARE_TOKENS = 1 << 63

_new_ref = tuple.__new__  # SlotRef from checked ints, without the NamedTuple's Python __new__


class Lender(LeaseHome, Protocol):
    """The pool lending works for (a ``Pool``): its leases' home, and its janitor."""

    def _ensure_janitor(self) -> None: ...


class Lending:
    """This process's lent and borrowed slots (see the module's doc)."""

    __slots__ = ("borrowed", "caches", "conn", "lent", "meter", "min_shift", "oversize", "pool",
                 "seen")  # fmt: skip

    def __init__(self, pool: Lender, conn: Connection, min_shift: int) -> None:
        self.pool = pool
        self.conn = conn
        self.min_shift = min_shift
        self.caches: list[_Cache] = []
        self.meter: Any = _Meter()
        self.oversize: _OversizeHome | None = None
        self.borrowed = _Borrowed(self)
        self.lent: list[_Slot] = []
        self.seen: dict[tuple[int, int], tuple[int, float]] = {}

    def reset(self, caches: list[_Cache], meter: Any, oversize: _OversizeHome) -> None:
        """Lend from these caches from now on; what was lent before is not ours to take back.

        A new ``borrowed`` home too: a slot lent to the old connection goes
        nowhere on release (``give_back`` sees it is not ours).
        """
        self.caches = caches
        self.meter = meter
        self.oversize = oversize
        self.borrowed = _Borrowed(self)  # home of slots lent to us: they go back by word
        self.lent = []  # slots we lent out, to take back when returned
        # (segment, index) of a lent slot whose word holds a ticket -> (word, seen since)
        self.seen = {}

    def watch(self) -> None:
        """A slot was lent: the janitor takes it back, or expires its ticket."""
        self.pool._ensure_janitor()

    def _home_of(self, capacity: int) -> _Cache:
        return self.caches[max(0, capacity.bit_length() - 1 - self.min_shift)]

    # ----------------------------------------------------------- lending

    def detach(self, lease: Lease, readers: int = 0) -> Handle:
        """``lease.detach()`` / ``lease.share(readers)``: a handle for another process."""
        conn = self.conn
        slot = lease._slot
        home = slot.home
        if type(home) is _Borrowed and home is self.borrowed:
            if readers:
                raise UsageError(
                    "a lease handed to this process cannot be shared from here; share it "
                    "where it was acquired, or copy it into a lease of this pool"
                )
            return self.hand_on(lease)
        with conn.lock:
            if conn.closed:
                raise PoolClosedError("this pool was closed; its leases cannot be detached")
            if type(home) is _SharedHome:
                raise UsageError("a reader's lease of a shared slot cannot be detached or shared")
            if conn.pid != os.getpid() or not (
                home is self.oversize
                or (type(home) is _Cache and home.pool is self.pool and self._current(home))
            ):  # else an orphan: its pool was reset (a fork, a lost connection) since
                raise UsageError("this lease belongs to another process (or connection)")
            if conn.sock is None or conn.broken is not None:
                conn.ensure()
            view = lease._view
            if view is None:
                raise LeaseClosedError("this lease was released or detached already")
            length = lease._length  # len(view) fails once a racing release() released it
            ref = slot.ref
            segment, index, generation = ref
            # A share's token is made apart (_SHARE_TOKENS): the manager, which
            # computes a handoff's token to apply an Attach that overtook its
            # sender's notice (Arena._handed_on), never mistakes it for one.
            token = conn.token(segment, index, generation + 1 | (_SHARE_TOKENS if readers else 0))
            seg = conn.segments.get(segment)
            tickets = seg.tickets if seg is not None and conn.tickets_on else None
            # A class slot is lent: its word says so, and we watch it for its
            # return (``reclaim_lent``); the manager hears nothing. An
            # oversize slot, or one without a word, goes in the manager's keeping.
            lend = tickets is not None and not readers and type(home) is _Cache
            word = lent_word(token, generation + 1)
            if lend and ref[:2] in conn.claims:
                conn.flush_notices()  # our claim of it goes first: the manager knows it ours
            # the word of a slot we hold is 0, or our own claim not cleared yet
            published = lend and (
                _speedups.cas64(tickets, 8 * index, 0, word)
                or self._publish_ticket(ref, word)  # may raise: the lease stays ours
            )
            _disown_or_undo(lease, tickets if published else None, index, word, 0)
            if readers:
                conn.send(p.encode(p.Share(conn.next_req(), ref, token, readers)))
            elif published:
                self.lent.append(slot)
                self.watch()
            else:
                conn.note(p.NOTICE_DETACHED, ref, token, urgent=True)
            if slot.home is self.oversize:
                conn.unmap(ref.segment)  # its new holder maps it; we must not pin it
        capacity = slot.capacity
        return Handle(
            conn.instance, ref.segment, ref.index, ref.generation + 1,
            seal_token(token, length, capacity, readers), length, capacity, readers,
        )  # fmt: skip

    def _current(self, cache: _Cache) -> bool:
        """Whether ``cache`` is one of this connection's (not one from before a reset)."""
        caches = self.caches
        return cache.cls < len(caches) and caches[cache.cls] is cache

    def hand_off(self, lease: Lease) -> tuple[int, ...]:
        """``tuple(lease.detach())``: what pickling a Lease sends.

        The common case, a slot of a class cache whose ticket word is 0, is
        done in C (``_speedups.hand_off``: the checks, the token, the word,
        as ``detach`` does them). Anything else goes through ``detach``,
        which checks each condition again and raises what applies.
        """
        conn = self.conn
        if conn.tickets_on:  # which needs the C extension
            fields: tuple[int, ...] | None = _speedups.hand_off(conn, self, lease)
            if fields is not None:
                return fields
        if type(lease._slot.home) is _Borrowed:
            return tuple(self.hand_on(lease))
        return tuple(self.detach(lease))

    def hand_on(self, lease: Lease) -> Handle:
        """``detach()`` of a lease lent to us: lend it on, by its word.

        Its lender still holds it in the manager's books and takes it back
        when the last borrower returns it.
        """
        conn = self.conn
        slot = lease._slot
        with conn.lock:
            if conn.closed:
                raise PoolClosedError("this pool was closed; its leases cannot be detached")
            if slot.home is not self.borrowed or conn.pid != os.getpid() or conn.broken:
                raise UsageError("this lease belongs to another process (or connection)")
            view = lease._view
            if view is None:
                raise LeaseClosedError("this lease was released or detached already")
            segment, index, generation = slot.ref
            seg = conn.segments.get(segment)
            if not conn.tickets_on or seg is None or seg.tickets is None:
                raise UsageError(
                    "a lease handed to this process can be handed on only with shmpool's C "
                    "extension (this process runs without it); copy it into a lease of this pool"
                )
            token = conn.token(segment, index, generation + 1)
            claimed = claim_word(conn.client_id, generation)
            lent = _speedups.cas64(
                seg.tickets, 8 * index, claimed, lent_word(token, generation + 1)
            )
            if not lent:
                if _speedups.load64(seg.tickets, 8 * index) != 0:
                    raise UsageError(f"slot {segment}:{index} is no longer ours to hand on")
                # Its lender died and the manager gave the slot to us: ours to lend.
                slot.home = self._home_of(slot.capacity)
            else:
                length = lease._length
                word = lent_word(token, generation + 1)
                _disown_or_undo(lease, seg.tickets, index, word, claimed)
        if not lent:
            return self.detach(lease)
        capacity = slot.capacity
        return Handle(
            conn.instance, segment, index, generation + 1,
            seal_token(token, length, capacity, 0), length, capacity, 0,
        )  # fmt: skip

    def _publish_ticket(self, ref: p.SlotRef, word: int) -> bool:
        """Put ``word`` (a ``lent_word`` of the handle) in the slot's ticket word (lock held).

        The word holds 0, or our own claim of it (by a handle of the slot's
        generation) that the manager has not cleared yet.
        Returns False if the slot has no word this process can write.
        """
        conn = self.conn
        seg = conn.segments.get(ref.segment)
        if not conn.tickets_on or seg is None or seg.tickets is None:
            return False
        offset = 8 * ref.index
        ours = claim_word(conn.client_id, ref.generation)
        for _ in range(3):  # the manager may clear our claim meanwhile: retry
            current = _speedups.load64(seg.tickets, offset)
            if current not in (0, ours):
                raise UsageError(f"slot {ref.segment}:{ref.index} is not ours to hand on")
            if _speedups.cas64(seg.tickets, offset, current, word):
                return True
        raise UsageError(f"the ticket of slot {ref.segment}:{ref.index} keeps changing")

    # --------------------------------------------------------- taking back

    def reclaim_returned(self) -> int:
        """``reclaim_lent`` on the hot path: no expiry (the janitor sees to it); in C."""
        if _speedups is not None:
            return _speedups.reclaim(self.conn, self)  # type: ignore[no-any-return]
        return self.reclaim_lent()

    def reclaim_lent(self) -> int:
        """Take back the lent slots whose borrowers returned them (lock held).

        A lent slot whose word still holds the same ticket after the
        transit timeout (its handle was never attached) is taken back too;
        the handle is stale from then on. A word of 0 means the manager took
        the slot over (attached through it, or its borrower died holding
        it): it is no longer ours. Returns how many slots came back.
        """
        lent, self.lent = self.lent, []
        seen = self.seen
        segments = self.conn.segments
        transit = self.conn.transit_timeout
        load, cas = _speedups.load64, _speedups.cas64
        now = time.monotonic()
        back = done = 0
        try:
            for done in range(len(lent)):
                slot = lent[done]
                segment, index, generation = slot.ref
                home = slot.home
                seg = segments.get(segment)
                if seg is None or seg.tickets is None or type(home) is not _Cache:
                    continue
                if not self._current(home):
                    continue  # lent by the connection this pool had before a reset
                word = load(seg.tickets, 8 * index)
                key = (segment, index)
                if word == 0:
                    seen.pop(key, None)
                    continue
                if is_returned(word):
                    after = generation_at_least(word_low31(word), generation + 1)
                elif word >> 63:  # claimed: in use
                    self.lent.append(slot)
                    continue
                else:  # a ticket, ours or a borrower's: is it waiting too long?
                    since = seen.get(key)
                    if since is None or since[0] != word:
                        seen[key] = (word, now)
                        self.lent.append(slot)
                        continue
                    if now - since[1] < transit:
                        self.lent.append(slot)
                        continue
                    # Past every generation a handle of this lend may carry.
                    after = generation + 1 + (1 << 31)
                if not cas(seg.tickets, 8 * index, word, 0):
                    self.lent.append(slot)  # it moved on meanwhile: look again next time
                    continue
                seen.pop(key, None)
                slot.ref = _new_ref(p.SlotRef, (segment, index, after))
                home.append(slot)
                back += 1
        except BaseException:  # the slot it failed on, and those after it, stay lent
            self.lent.extend(lent[done:])
            raise
        if len(seen) > len(self.lent):  # forget slots taken back by the C pass
            out = {slot.ref[:2] for slot in self.lent}
            for key in [key for key in seen if key not in out]:
                del seen[key]
        return back

    # ---------------------------------------------------------- borrowing

    def claim(self, handle: Handle) -> Lease | None:
        """Take ``handle``'s slot by its ticket word, without a round trip.

        Returns None when that path does not apply (no tickets, a segment this
        process has not mapped, a share); the caller then asks the manager.

        Raises:
            StaleHandleError: the handle's capacity is not the segment's slot
                size, or the word does not hold the handle's token (unsealed
                with its length and capacity: see ``ticket.seal_token``)
                and generation.
        """
        conn = self.conn
        _, segment, index, generation, sealed, length, capacity, readers = handle
        seg = conn.segments.get(segment)
        if not conn.tickets_on or readers or seg is None or seg.tickets is None:
            return None
        size = seg.slot_size
        if size != capacity:  # the segment's record, not the handle, says how big its slots are
            raise StaleHandleError("this handle is forged: its capacity is not its slot's")
        token = seal_token(sealed, length, capacity, 0)
        offset = seg.header + index * size
        if 8 * index + 8 > seg.header or offset + size > len(seg.view):
            raise StaleHandleError("this handle is forged: its slot lies outside its segment")
        with conn.lock:
            if conn.sock is None or conn.pid != os.getpid() or conn.closed or conn.broken:
                conn.ensure()  # our own connection (after a fork: a new one) first
            claimed = claim_word(conn.client_id, generation)
            word = ticket_word(token, generation)
            ref = _new_ref(p.SlotRef, (segment, index, generation))
            home: Any = self.borrowed
            if not _speedups.cas64(seg.tickets, 8 * index, lent_word(token, generation), claimed):
                if not _speedups.cas64(seg.tickets, 8 * index, word, claimed):
                    if _speedups.load64(seg.tickets, 8 * index) == 0:
                        return None  # not published (yet): let the manager decide
                    raise StaleHandleError(
                        "this handle is stale: attached already, expired, or forged"
                    )
                conn.note(p.NOTICE_CLAIMED, ref, token)  # in the manager's keeping
                home = self._home_of(capacity)
            meter = self.meter  # this connection's, as home is
        slot = _Slot(ref, seg.view[offset : offset + size], home)
        return make_lease(slot, min(length, size), meter)

    def take(self, fields: tuple[int, ...]) -> Lease | None:
        """Claim a pickled Lease's slot by its ticket word: ``claim`` in C.

        Only the common case (a class slot in a segment mapped here, the
        word holding the handle's token, this process's live connection) is
        taken by ``_speedups.take``; None sends the caller through
        ``Pool.attach``, which checks everything and raises what applies.
        """
        conn = self.conn
        if not conn.tickets_on:  # which needs the C extension
            return None
        return _speedups.take(conn, self, fields)  # type: ignore[no-any-return]

    def give_back(self, slot: _Slot) -> None:
        """A lease lent to us was released: its slot goes back to its lender, by its word.

        If the lender died meanwhile, the manager gave the slot to us (the
        word is 0 then): it joins our cache like any slot of ours.
        """
        conn = self.conn
        if slot.home is not self.borrowed or conn.pid != os.getpid() or conn.closed:
            return  # lent to the connection this pool had before a fork or a reset
        segment, index, generation = slot.ref
        seg = conn.segments.get(segment)
        if not conn.tickets_on or seg is None or seg.tickets is None:
            with conn.lock:  # no atomics here: the manager writes the word for us
                if slot.home is self.borrowed and conn.live():
                    conn.note(p.NOTICE_RETURNED, slot.ref, 0)
            return
        claimed = claim_word(conn.client_id, generation)
        if _speedups.cas64(seg.tickets, 8 * index, claimed, returned_word(generation)):
            return
        if _speedups.load64(seg.tickets, 8 * index) != 0:
            log.warning("slot %d:%d changed hands while lent to this process", segment, index)
            return
        cache = self._home_of(slot.capacity)
        slot.home = cache
        cache.append(slot)
        self.watch()  # an idle cache goes back in time
        if len(cache) > cache.high:
            self.pool._trim(cache)

    def forget(self) -> None:
        """The pool closed: the manager settles lent slots by their words."""
        self.lent.clear()
        self.seen.clear()

    # A _Borrowed home calls these as a LeaseHome's (buffer.py).

    def _give_back(self, slot: _Slot) -> None:
        self.give_back(slot)

    def _detach(self, lease: Lease, readers: int = 0) -> Handle:
        return self.detach(lease, readers)

    def _hand_off(self, lease: Lease) -> tuple[int, ...]:
        return self.hand_off(lease)

    def _trim(self, cache: _Cache) -> None:
        self.pool._trim(cache)

    def _release_oversize(self, slot: _Slot) -> None:  # pragma: no cover - never a borrowed home
        raise AssertionError("a borrowed slot is not oversize")

    def _release_shared(self, slot: _Slot) -> None:  # pragma: no cover - never a borrowed home
        raise AssertionError("a borrowed slot is not shared")


def _disown_or_undo(lease: Lease, tickets: Any, index: int, word: int, before: int) -> None:
    """Close ``lease`` as handed over; if it cannot be, put its ticket word back.

    Another thread may have released the lease while we published its
    word; nobody has the handle yet, so the word goes back to ``before``.

    Raises:
        LeaseClosedError: released meanwhile.
        BufferError: its view is still exported; the lease stays open.
    """
    try:
        view = lease._view
        if view is not None:
            # Released first, as the C _disown does not: it marks the lease
            # closed before its view refuses (BufferError, still exported),
            # and the lease must stay open then.
            _release_view(view)
        if lease._disown():
            return
        error: BaseException = LeaseClosedError("this lease was released or detached already")
    except BaseException as exc:  # e.g. BufferError: its view is still exported
        error = exc
    if tickets is not None:
        _speedups.cas64(tickets, 8 * index, word, before)
    raise error
