"""The manager's bookkeeping: classes, segments, free lists, leases, budget.

Pure data structures, no I/O: memory comes from an injected ``allocate(size)``
callable returning a ``Backing`` (something with ``fd`` and ``close()``), so
every rule here is unit-tested without a process or a byte of shared memory.

Each slot is in one of five states, and moves between them only by
``slots.move``, which checks each move against the table of allowed ones
(``slots.MOVES``) and keeps the counters. A move that lets a slot go bumps
its *generation*, so a reference taken before it (stale generation) is
refused, as is a reference to a slot held by another connection.
``release`` checks every reference in a batch before it frees any, so a bad
batch changes nothing. Per class, ``total == free + leased + in_transit``
always.

Clients write the ticket words, so the books never trust a word beyond what
they could have made (see ``reconcile``, which reads the words of lent slots
where the books cannot: a dropped lender, orphans, gone borrowers, the
census).

Memory moves. The budget counts memory *committed* (pages backed in
``/dev/shm``), not segments made: a class segment is made with no slot
committed, a slot is committed as it is granted (``_commit_unit``), and a free
slot keeps its pages while it is likely to be reused. When a grant finds the
budget spent, the pages of other classes' free slots are decommitted first,
oldest first (``_reclaim``), so a spent budget serves whichever class needs it;
and ``release_idle`` decommits free slots nobody took for ``idle_release``
seconds. Pages are committed and freed in *units*: one slot, or for slots
smaller than a page, the page holding several (freed only when all of them
are free). Only a free slot (holder 0: in its class's free list) ever loses
its pages; a leased, cached, lent, in-transit, shared or orphaned one never does.

Each class's free list is a stack: slots go back on top and are granted from
the top, so its bottom holds the slots free the longest. ``low`` (the least
height since the last idle pass) says how much of the bottom nobody took.

Oversize requests (above ``max_size``) get a segment of their own holding one
slot, committed whole; it is destroyed when released, so its memory goes back
to the budget at once. Class segments are kept once made (their address space
only: a free slot's pages go back).
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import PoolExhaustedError, StaleHandleError
from .protocol import (
    MAX_BATCH,
    MAX_FDS,
    NOTICE_DETACHED,
    NOTICE_RETURNED,
    NOTICE_WORDS,
    SegmentInfo,
    SlotRef,
)
from .reconcile import LEND_AHEAD, MAX_GENERATION, Reconciler, TicketOps, Words, ahead
from .sizeclass import MAX_SHIFT, Classes, format_size
from .slots import (
    FREE,
    ORPHAN,
    SHARED,
    TRANSIT,
    Backing,
    BooksError,
    ClassBooks,
    ClientBooks,
    Segment,
    move,
)
from .ticket import (
    claim_word,
    is_claim_for,
    lent_word,
    returned_word,
    ticket_word,
    token_maker,
)

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "LEND_AHEAD",
    "MAX_GENERATION",
    "ORPHAN",
    "SHARED",
    "TRANSIT",
    "Arena",
    "Backing",
    "BooksError",
    "Grant",
    "TicketOps",
]

#: Small classes pack slots into segments of about this many bytes.
DEFAULT_SEGMENT_BYTES = 4 << 20
#: How much longer a late slot waits for a live claimer's notice.
CLAIM_GRACE = 1.0
#: Oversize segments are rounded up to whole pages, not to a power of two.
PAGE = 4096
#: A slot granted past this generation goes on from its generation minus this
#: (``_grant``). Only forged generations get there; a slot they pushed up
#: leaves every next holder all of ``LEND_AHEAD`` below ``MAX_GENERATION``.
GENERATION_WRAP = 1 << 62


@dataclass(eq=False)
class _Share:
    """A slot published to several readers: who holds it, how many may still attach."""

    token: int
    pending: int
    deadline: float
    readers: dict[int, int] = field(default_factory=dict)  # conn id -> leases held


@dataclass(frozen=True)
class Grant:
    """What ``Arena.acquire`` hands out: slots, and segments new to the client."""

    slot_size: int
    slots: list[SlotRef]
    segments: list[SegmentInfo]
    fds: list[int]
    lent: bool = False  # the one slot is lent to the client: its word holds its claim


class Arena:
    """Slots, leases and the memory budget of one manager."""

    def __init__(
        self,
        classes: Classes,
        memory: int,
        allocate: Callable[..., Backing],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        tickets: TicketOps | None = None,
    ) -> None:
        self.classes = classes
        self.memory = memory
        self._allocate = allocate
        # With ticket operations, every segment starts with a ticket word per
        # slot and allocate(size, header) must give backings with ``tickets``.
        self._tickets = tickets
        self._classes = [
            ClassBooks(size, max(1, segment_bytes // size)) for size in classes.sizes()
        ]
        self._segments: dict[int, Segment] = {}
        self._conns: dict[int, ClientBooks] = {}
        self._ids = itertools.count(1)
        self.mapped = 0  # slot bytes of every segment (address space, not memory)
        self.committed = 0  # slot bytes backed by memory: what the budget counts
        self.peak_committed = 0
        self.ticket_bytes = 0
        # acquires by (size - 1).bit_length(), as clients report them (Usage)
        self.request_sizes = [0] * (MAX_SHIFT + 1)
        self.oversize_leases = 0
        self.oversize_bytes = 0
        # (segment id, index) -> (token, deadline) for slots handed between clients
        self._transit: dict[tuple[int, int], tuple[int, float]] = {}
        self._shares: dict[tuple[int, int], _Share] = {}
        # the ticket words, and the reconciling of lent slots by them
        self._words = Words(tickets) if tickets is not None else None
        self._lent = (
            Reconciler(
                self._words,
                self._segments,
                self._conns,
                self._classes,
                self._free,
                self._put_in_transit,
            )
            if self._words is not None
            else None
        )
        # (segment id, index) -> [word seen, deadline, timeout] for ORPHAN slots
        self._orphans: dict[tuple[int, int], list[Any]] = (
            self._lent.orphans if self._lent is not None else {}
        )

    # ------------------------------------------------------------ connections

    def add_conn(
        self, conn: int, pid: int, name: str = "", key: int = 0, *, lends: bool = False
    ) -> None:
        """Start the books of a connection; ``key`` derives its handles' tokens.

        ``lends``: it hands class slots on by lending them (``lent_word``),
        never by a notice, so a handle of its class slot that its word does
        not back is stale (``_handed_on`` does not apply).
        """
        if conn in self._conns or conn <= 0:
            raise ValueError(f"connection id {conn} is taken or invalid")
        token = token_maker(key) if key else None
        self._conns[conn] = ClientBooks(conn, pid, name, token=token, lends=lends)

    def drop_conn(self, conn: int, now: float = 0.0, transit_timeout: float = 30.0) -> int:
        """Forget a connection and return every slot it held; returns how many.

        With ticket words, a slot the connection was handing on when it went
        (its word holds a token, or another live client's claim) is not freed:
        it goes in transit until ``now + transit_timeout``, or to its claimer.
        """
        c = self._conns.pop(conn, None)
        if c is None:
            return 0
        held = list(c.held)
        for seg_id, index in held:
            seg = self._segments[seg_id]
            if not (
                seg.header
                and self._lent is not None
                and self._lent.dropped(seg, index, c, now, transit_timeout)
            ):
                self._free(seg, index, c)
        if self._lent is not None:
            self._lent.return_borrowed(c)
        for key, share in list(self._shares.items()):
            if share.readers.pop(conn, 0):
                self._settle_share(key)
        return len(held)

    # ---------------------------------------------------------------- transit

    def detach(self, conn: int, ref: SlotRef, token: int, deadline: float) -> SlotRef | None:
        """Move a slot of ``conn`` in transit under ``token`` until ``deadline``.

        Returns the reference an ``attach`` must name (generation + 1), or
        None if a receiver's claim or attach already did this: it came first
        and proved the token (see ``_handed_on``), and this notice carries
        the same token for the same handoff.

        Raises:
            StaleHandleError: ``ref`` is not a slot ``conn`` holds, nor one
                it provably handed on.
        """
        c = self._conns[conn]
        if c.handed and c.handed.get((ref.segment, ref.index)) == token:
            del c.handed[(ref.segment, ref.index)]
            return None  # its receiver's notice came first and did this
        seg, index = self._check(c, ref)
        self._put_in_transit(seg, index, c, token, deadline)
        return SlotRef(seg.id, index, seg.generations[index])

    def _matching_transit(
        self, seg: Segment | None, ref: SlotRef, token: int, deadline: float
    ) -> tuple[int, float] | None:
        """The transit entry of ``ref`` if ``ref`` and ``token`` match it, else None.

        A slot still leased to its sender is first handed on if ``token``
        proves the sender let go of it (``_handed_on``); ``deadline`` is then
        its transit deadline.
        """
        if seg is None or not 0 <= ref.index < seg.nslots:
            return None
        entry = self._transit.get((ref.segment, ref.index))
        if entry is None and self._handed_on(seg, ref, token, deadline):
            entry = self._transit[(ref.segment, ref.index)]
        if (
            entry is None
            or seg.generations[ref.index] != ref.generation
            or not hmac.compare_digest(_token_bytes(entry[0]), _token_bytes(token))
        ):
            return None
        return entry

    def _handed_on(self, seg: Segment, ref: SlotRef, token: int, deadline: float) -> bool:
        """Apply a handoff whose sender's notice has not come yet, if ``token`` proves it.

        ``ref`` names the generation after the handoff. Only the holder (and
        the manager) can compute the token, so a matching one means the holder
        let go of the slot and gave this handle away: the slot goes in transit
        as the sender's notice would have put it. True if it did.
        """
        index = ref.index
        holder = self._conns.get(seg.holders[index])
        if (
            holder is None
            or holder.token is None
            or (holder.lends and seg.cls is not None and self._tickets is not None)
            or seg.generations[index] != ref.generation - 1
            or not hmac.compare_digest(
                _token_bytes(token), _token_bytes(holder.token(seg.id, index, ref.generation))
            )
        ):
            return False
        self._put_in_transit(seg, index, holder, token, deadline)
        holder.handed[(seg.id, index)] = token  # its own notice, when it comes, is moot
        return True

    def _put_in_transit(
        self, seg: Segment, index: int, c: ClientBooks, token: int, deadline: float
    ) -> None:
        """The holder ``c`` lets go of a slot, which waits for an attach under ``token``."""
        move(seg, index, TRANSIT, seg.generations[index] + 1, c)  # the handle names the next
        if seg.cls is None:
            c.known.discard(seg.id)  # the client unmaps a detached oversize segment
        self._transit[(seg.id, index)] = (token, deadline)
        if seg.header:  # a sender without atomics leaves the word at 0: publish for it
            self._cas(seg, index, 0, ticket_word(token, seg.generations[index]))

    def share(self, conn: int, ref: SlotRef, token: int, readers: int, deadline: float) -> SlotRef:
        """Publish a slot of ``conn`` to ``readers`` attaches, read-only.

        The slot stays leased (to the group) until every reader that attached
        has released it and no attach is pending; attaches not made by
        ``deadline`` lapse. Returns the reference readers must name.

        Raises:
            StaleHandleError: ``ref`` is not a slot ``conn`` holds.
        """
        c = self._conns[conn]
        seg, index = self._check(c, ref)
        move(seg, index, SHARED, seg.generations[index] + 1, c)
        if seg.cls is None:
            c.known.discard(seg.id)  # the client unmaps it; a reader maps it anew
        self._shares[(seg.id, index)] = _Share(token, readers, deadline)
        return SlotRef(seg.id, index, seg.generations[index])

    def _attach_shared(self, c: ClientBooks, seg: Segment, ref: SlotRef, token: int) -> Grant:
        share = self._shares[(seg.id, ref.index)]
        if (
            share.pending <= 0
            or seg.generations[ref.index] != ref.generation
            or not hmac.compare_digest(_token_bytes(share.token), _token_bytes(token))
        ):
            raise StaleHandleError(
                f"shared slot {ref.segment}:{ref.index}: every reader attached already, "
                "the time to attach ran out, or the handle is forged"
            )
        share.pending -= 1
        share.readers[c.id] = share.readers.get(c.id, 0) + 1
        segments, fds = [], []
        if seg.id not in c.known:
            c.known.add(seg.id)
            segments.append(seg.info())
            fds.append(seg.backing.fd)
        return Grant(seg.slot_size, [SlotRef(seg.id, ref.index, ref.generation)], segments, fds)

    def _settle_share(self, key: tuple[int, int]) -> None:
        """Free a shared slot once nobody holds it and nobody may attach."""
        share = self._shares[key]
        if share.pending <= 0 and not share.readers:
            del self._shares[key]
            self._free(self._segments[key[0]], key[1], None)

    def attach(
        self,
        conn: int,
        ref: SlotRef,
        token: int,
        deadline: float = 0.0,
        *,
        capacity: int | None = None,
        readers: int | None = None,
    ) -> Grant:
        """Lease a slot in transit to ``conn``, if ``ref`` and ``token`` match.

        A slot still leased to its sender is handed on first if ``token``
        proves the sender let go of it (``_handed_on``; ``deadline`` is its
        transit deadline should this attach lose to a claim).

        ``capacity`` and ``readers`` are the handle's (``Attach`` carries
        them): the slot's size and whether it is shared must be what they
        say, so that no handle makes the receiver take a shared slot for
        its own, or the other way round. (None: not checked, for tests of
        the books.) ``token`` is the handoff's, which the handle carries
        sealed with its length, capacity and readers (``seal_token``).

        Raises:
            StaleHandleError: attached already, expired, a forged token,
                generation, capacity or readers, or a slot this manager
                never put in transit.
        """
        c = self._conns[conn]
        key = (ref.segment, ref.index)
        seg = self._segments.get(ref.segment)
        shared = key in self._shares
        if seg is not None and capacity is not None and capacity != seg.slot_size:
            raise StaleHandleError(
                f"handle for slot {ref.segment}:{ref.index} is forged: its capacity "
                f"{capacity} is not the slot's ({seg.slot_size})"
            )
        if readers is not None and bool(readers) != shared:
            what = "no readers of a shared slot" if shared else "readers of a slot not shared"
            raise StaleHandleError(
                f"handle for slot {ref.segment}:{ref.index} is stale or forged: it names {what}"
            )
        if shared and seg is not None:
            return self._attach_shared(c, seg, ref, token)
        if seg is not None and 0 <= ref.index < seg.nslots and ref.generation > 0:
            lent = self._attach_lent(c, seg, ref, token)
            if lent is not None:
                return lent
        entry = self._matching_transit(seg, ref, token, deadline)
        if seg is None or entry is None:
            raise StaleHandleError(
                f"handle for slot {ref.segment}:{ref.index} is stale: it was attached "
                "already, its transit time ran out, or it is forged"
            )
        word = ticket_word(entry[0], ref.generation)
        if seg.header and not self._cas(seg, ref.index, word, 0):
            raise StaleHandleError(f"handle for slot {ref.segment}:{ref.index} was claimed already")
        del self._transit[key]
        return self._grant(c, seg.slot_size, [(seg, ref.index)])

    # ---------------------------------------------------------------- tickets

    def _cas(self, seg: Segment, index: int, expected: int, new: int) -> bool:
        assert self._words is not None
        return self._words.cas(seg, index, expected, new)

    def give_back(self, conn: int, ref: SlotRef) -> None:
        """``conn`` lets go of a slot lent to it, for which the manager claimed it.

        Its claim becomes ``returned_word``, which the lender takes back. If
        the lender went meanwhile and the slot was given to ``conn``, it is
        freed like a release.

        Raises:
            StaleHandleError: the slot is not lent to ``conn``.
        """
        c = self._conns[conn]
        seg = self._segments.get(ref.segment)
        if seg is None or not seg.header or not 0 <= ref.index < seg.nslots:
            raise StaleHandleError(f"no slot {ref.segment}:{ref.index} is lent to this client")
        claimed = claim_word(c.id, ref.generation)
        c.borrowed.pop((ref.segment, ref.index), None)
        if self._cas(seg, ref.index, claimed, returned_word(ref.generation)):
            if seg.holders[ref.index] == ORPHAN:
                assert self._lent is not None
                self._lent.settle_orphan((seg.id, ref.index), None)  # lender gone: free it now
            return
        if seg.holders[ref.index] == c.id and seg.generations[ref.index] == ref.generation:
            self._free(seg, ref.index, c)
            return
        raise StaleHandleError(f"slot {ref.segment}:{ref.index} is not lent to this client")

    def _attach_lent(self, c: ClientBooks, seg: Segment, ref: SlotRef, token: int) -> Grant | None:
        """``attach`` of a lent slot (or an orphan) whose word holds the handle's ticket.

        The manager claims it for ``c`` (the client may lack the mapping, or
        atomics): the books stay as they are, the lender keeps it, and the
        client returns it by its word (or a ``NOTICE_RETURNED``).

        Clients write the words, so a matching word is believed only where
        lending can put one: on a class slot, for a generation ahead of the
        books by no more than lending reaches (``_ahead``).
        """
        index = ref.index
        holder = seg.holders[index]
        if (
            not seg.header
            or seg.cls is None
            or not (holder == ORPHAN or holder in self._conns)
            or not ahead(seg.generations[index], ref.generation)
        ):
            return None
        lent = lent_word(token, ref.generation)
        if holder == ORPHAN:  # its lender is gone: the slot becomes the client's
            if not self._cas(seg, index, lent, 0):
                return None
            del self._orphans[(seg.id, index)]
            seg.generations[index] = ref.generation - 1  # _grant names the handle's
            return self._grant(c, seg.slot_size, [(seg, index)])
        if not self._cas(seg, index, lent, claim_word(c.id, ref.generation)):
            return None
        if not c.lends:  # it names the whole generation when it lets go: remember it
            c.borrowed[(seg.id, index)] = ref.generation
        segments, fds = [], []
        if seg.id not in c.known:
            c.known.add(seg.id)
            segments.append(seg.info())
            fds.append(seg.backing.fd)
        return Grant(seg.slot_size, [SlotRef(seg.id, index, ref.generation)], segments, fds, True)

    def claim(self, conn: int, ref: SlotRef, token: int, deadline: float = 0.0) -> None:
        """Record that ``conn`` took a slot in transit by its ticket (no Grant).

        The client already swapped the ticket word from ``token`` to
        ``claim_word(conn, ref.generation)``; this moves the books and clears
        the word. A slot
        still leased to its sender is handed on first if ``token`` proves the
        sender let go of it (``_handed_on``).

        Raises:
            StaleHandleError: no such slot is in transit under ``token``, nor
                provably about to be.
        """
        c = self._conns[conn]
        key = (ref.segment, ref.index)
        seg = self._segments.get(ref.segment)
        if (
            key not in self._transit
            and seg is not None
            and 0 <= ref.index < seg.nslots
            and seg.holders[ref.index] == c.id
            and seg.generations[ref.index] == ref.generation
        ):
            return  # applied already, when the sender's connection was dropped
        entry = self._matching_transit(seg, ref, token, deadline)
        if seg is None or entry is None:
            raise StaleHandleError(f"no slot {ref.segment}:{ref.index} in transit under that token")
        del self._transit[key]
        move(seg, ref.index, c.id, seg.generations[ref.index], None, c)
        c.known.add(seg.id)
        if seg.header:
            # unless handed on again already (a later claim has another generation)
            self._cas(seg, ref.index, claim_word(c.id, ref.generation), 0)

    def apply_notices(self, conn: int, flat: tuple[int, ...], deadline: float) -> int:
        """Apply ``conn``'s handoff notices (``Notices.flat``) in order.

        Returns the offset in ``flat`` of the first claim that does not
        apply now (``len(flat)`` if every notice did): the caller asks
        ``awaits_detach`` whether it may yet. The common notice, a class slot
        detached by its holder or claimed from transit under the right
        token, is applied here in a few steps; any other goes through
        ``detach`` or ``claim``, which decide it in full.

        Raises:
            StaleHandleError: a DETACHED notice that ``detach`` refuses.
        """
        c = self._conns[conn]
        cid = c.id
        segments = self._segments
        transit = self._transit
        handed = c.handed
        cas = self._tickets.cas64 if self._tickets is not None else None
        for i in range(0, len(flat), NOTICE_WORDS):
            kind, segment, index, generation, token = flat[i : i + NOTICE_WORDS]
            key = (segment, index)
            seg = segments.get(segment)
            cls = seg.cls if seg is not None else None
            if kind == NOTICE_DETACHED:
                if handed and handed.get(key) == token:
                    del handed[key]  # its receiver's notice came first and did this
                elif (
                    cls is not None
                    and 0 <= index < len(seg.holders)  # type: ignore[union-attr]
                    and seg.holders[index] == cid  # type: ignore[union-attr]
                    and seg.generations[index] == generation  # type: ignore[union-attr]
                ):  # _put_in_transit, for a class slot this client holds
                    move(seg, index, TRANSIT, generation + 1, c)  # type: ignore[arg-type]
                    transit[key] = (token, deadline)
                    if cas is not None and seg.header:  # type: ignore[union-attr]
                        word = ticket_word(token, generation + 1)
                        cas(seg.backing.tickets, 8 * index, 0, word)  # type: ignore[union-attr]
                else:
                    self.detach(conn, SlotRef(segment, index, generation), token, deadline)
                continue
            if kind == NOTICE_RETURNED:
                self.give_back(conn, SlotRef(segment, index, generation))
                continue
            entry = transit.get(key)
            if (
                entry is not None
                and cls is not None
                and seg.generations[index] == generation  # type: ignore[union-attr]
                and not entry[0] ^ token  # every bit compared: no early exit to time
            ):  # claim, for a class slot in transit under this token
                del transit[key]
                move(seg, index, cid, generation, None, c)  # type: ignore[arg-type]
                c.known.add(segment)
                if cas is not None and seg.header:  # type: ignore[union-attr]
                    word = claim_word(cid, generation)
                    cas(seg.backing.tickets, 8 * index, word, 0)  # type: ignore[union-attr]
                continue
            try:
                self.claim(conn, SlotRef(segment, index, generation), token, deadline)
            except StaleHandleError:
                return i
        return len(flat)

    def awaits_detach(self, ref: SlotRef, shared: bool = False) -> bool:
        """True if ``ref`` names a slot some messages not read yet may bring to ``ref``.

        A handle travels beside the sender's notice, on another socket, so an
        Attach or a claim may reach the manager first. The slot may be
        further behind than one handoff: handed A to B to C by tickets, C's
        claim may come while B's notices are still unread; it should wait. So
        any slot that is leased or in transit at an older generation may yet
        match. ``shared``: an Attach of a share, whose ``Share`` message may
        be on its way even from a client that lends.
        """
        seg = self._segments.get(ref.segment)
        if seg is None or not 0 <= ref.index < seg.nslots:
            return False
        holder = seg.holders[ref.index]
        c = self._conns.get(holder)
        lender = c is not None and c.lends and seg.cls is not None and self._tickets is not None
        if lender and not shared:
            return False  # it lends class slots by their words: no notice will come
        return (holder > 0 or holder == TRANSIT) and seg.generations[ref.index] < ref.generation

    def expire_transit(self, now: float) -> int:
        """Free slots whose transit deadline passed, settle orphans; returns how many."""
        settled = self._lent.settle_orphans(now) if self._orphans and self._lent else 0
        lapsed = [key for key, sh in self._shares.items() if sh.pending and sh.deadline <= now]
        for key in lapsed:
            self._shares[key].pending = 0
            self._settle_share(key)
        late = [key for key, (_, deadline) in self._transit.items() if deadline <= now]
        for seg_id, index in list(late):
            seg = self._segments[seg_id]
            if seg.header and not self._expire_ticket(seg, index, now):
                late.remove((seg_id, index))
                continue
            del self._transit[(seg_id, index)]
            self._free(seg, index, None)
        return len(late) + len(lapsed) + settled

    def _expire_ticket(self, seg: Segment, index: int, now: float) -> bool:
        """Take a late slot's ticket back; False if a live claimer's notice is on its way.

        A claim counts only if a live client could have made it (``Reconciler.claimer``)
        by this slot's handle (its generation in the word); any other value
        is garbage, and the slot is freed.
        """
        assert self._lent is not None
        token, _ = self._transit[(seg.id, index)]
        generation = seg.generations[index]
        if self._cas(seg, index, ticket_word(token, generation), 0):
            return True
        value = self._lent.words.load(seg, index)
        if is_claim_for(value, generation) and self._lent.claimer(seg, value):
            self._transit[(seg.id, index)] = (token, now + CLAIM_GRACE)
            return False  # claimed: its notice is on its way from that connection
        return True  # claimed by a client that died before saying so, or garbage: free it

    def next_deadline(self) -> float | None:
        """The earliest time a transit or a pending share attach lapses, if any."""
        if not self._transit and not self._shares and not self._orphans:
            return None
        times = [deadline for _, deadline in self._transit.values()]
        times += [entry[1] for entry in self._orphans.values()]
        times += [sh.deadline for sh in self._shares.values() if sh.pending]
        return min(times) if times else None

    def in_transit(self) -> int:
        """Slots waiting for an attach (in transit, or shared with attaches pending)."""
        pending = sum(1 for sh in self._shares.values() if sh.pending)
        return len(self._transit) + len(self._orphans) + pending

    def messages_of(self, conn: int) -> int:
        """How many messages ``conn`` sent (-1 before its Hello)."""
        c = self._conns.get(conn)
        return -1 if c is None else c.messages

    def note_message(self, conn: int, cache_hits: int | None = None) -> None:
        c = self._conns[conn]
        c.messages += 1
        if cache_hits is not None:
            c.cache_hits = cache_hits

    def class_size(self, size: int) -> int | None:
        """The slot size a request of ``size`` bytes gets; ``None`` if oversize."""
        index = self.classes.index_of(size)
        return None if index is None else self._classes[index].slot_size

    def free_slots(self, slot_size: int) -> int:
        return len(self._classes[self._index(slot_size)].free)

    def holders(self, slot_size: int) -> dict[int, int]:
        """Connections holding slots of one class, with how many each holds."""
        counts: dict[int, int] = {}
        for c in self._conns.values():
            n = 0
            for seg_id, _ in c.held:
                seg = self._segments[seg_id]
                n += seg.cls is not None and seg.slot_size == slot_size
            if n:
                counts[c.id] = n
        return counts

    def holds_anything(self, conn: int) -> bool:
        """True if ``conn`` holds a slot, or has one lent to it (a claim by it in a word)."""
        c = self._conns.get(conn)
        if c is None:
            return False
        if c.held or c.borrowed:
            return True
        return self._lent is not None and self._lent.claims(conn)

    def held_bytes(self, conn: int) -> int:
        """Bytes of the slots ``conn`` holds (class capacity, or an oversize segment's size)."""
        c = self._conns.get(conn)
        if c is None:
            return 0
        segments = self._segments
        total = 0
        for seg_id, _ in c.held:
            seg = segments[seg_id]
            total += seg.slot_size if seg.cls is not None else seg.size - seg.header
        return total

    def held_by(self, conn: int, slot_size: int | None = None) -> int:
        """How many slots ``conn`` holds (of one class if ``slot_size``); 0 if unknown."""
        c = self._conns.get(conn)
        if c is None:
            return 0
        if slot_size is None:
            return len(c.held)
        segments = self._segments
        return sum(
            1
            for seg_id, _ in c.held
            if segments[seg_id].cls is not None and segments[seg_id].slot_size == slot_size
        )

    def transit_count(self, slot_size: int) -> int:
        """Slots of one class in transit (detached, not attached yet)."""
        index = self._index(slot_size)
        return self._classes[index].in_transit + self._census()[0][index]

    def _index(self, slot_size: int) -> int:
        index = self.classes.index_of(slot_size)
        if index is None or self._classes[index].slot_size != slot_size:
            raise ValueError(f"{slot_size} is not a size class")
        return index

    # ------------------------------------------------------------------ leases

    def acquire(self, conn: int, size: int, count: int = 1) -> Grant:
        """Lease up to ``count`` slots fitting ``size`` bytes to ``conn``.

        Grants at least one slot, or raises ``PoolExhaustedError``. Fewer than
        ``count`` come back when the budget allows no more, or when more would
        need more than ``MAX_FDS`` new segment descriptors in one message.
        """
        c = self._conns[conn]
        if not 1 <= count <= MAX_BATCH:
            raise ValueError(f"count must be 1..{MAX_BATCH}")
        index = self.classes.index_of(size)
        if index is None:
            seg = self._new_oversize(-(-size // PAGE) * PAGE)
            picked = [(seg, 0)]
            slot_size = seg.slot_size
        else:
            cls = self._classes[index]
            picked = self._take(cls, count, c)
            slot_size = cls.slot_size
        c.manager_acquires += len(picked)
        return self._grant(c, slot_size, picked)

    def release(self, conn: int, refs: Iterable[SlotRef]) -> int:
        """Return slots leased to ``conn``; all or nothing.

        Raises:
            StaleHandleError: a reference names an unknown slot, a slot held by
                someone else, or an old generation; nothing is released then.
        """
        c = self._conns[conn]
        refs = list(refs)
        if not self._shares and self._release_class_slots(c, refs):
            return len(refs)
        shared = [ref for ref in refs if self._is_shared_by(c, ref)]
        checked = [(*self._checked(c, ref), ref.generation) for ref in refs if ref not in shared]
        keys = {(seg.id, index) for seg, index, _ in checked}
        if len(keys) != len(checked) or len(set(shared)) != len(shared):
            raise StaleHandleError("the same slot appears twice in one release")
        for seg, index, generation in checked:  # all checked: now the books may change
            self._free(seg, index, c, generation)  # a lender's newer one stands
        for ref in shared:
            key = (ref.segment, ref.index)
            readers = self._shares[key].readers
            readers[c.id] -= 1
            if not readers[c.id]:
                del readers[c.id]
            self._settle_share(key)
        return len(refs)

    def _release_class_slots(self, c: ClientBooks, refs: list[SlotRef]) -> bool:
        """``release`` of class slots, all held by ``c``: the common case, in few steps.

        Returns False, having changed nothing, if any reference is not that
        (``release`` then checks each and raises).
        """
        segments = self._segments
        cid = c.id
        picked = []
        for segment, index, generation in refs:
            seg = segments.get(segment)
            if (
                seg is None
                or seg.cls is None
                or not 0 <= index < len(seg.holders)
                or seg.holders[index] != cid
                or (
                    seg.generations[index] != generation
                    and not _lent_ahead(c, seg, seg.generations[index], generation)
                )
            ):
                return False
            picked.append((seg, index, generation))
        keys = {(seg.id, index) for seg, index, _ in picked}
        if len(keys) != len(picked):
            return False
        store = self._tickets.store64 if self._tickets is not None else None
        for seg, index, generation in picked:
            move(seg, index, FREE, generation + 1, c)
            if store is not None and seg.header:
                store(seg.backing.tickets, 8 * index, 0)  # type: ignore[attr-defined]
        return True

    def _is_shared_by(self, c: ClientBooks, ref: SlotRef) -> bool:
        share = self._shares.get((ref.segment, ref.index))
        seg = self._segments.get(ref.segment)
        return (
            share is not None
            and seg is not None
            and seg.generations[ref.index] == ref.generation
            and share.readers.get(c.id, 0) > 0
        )

    def _check(self, c: ClientBooks, ref: SlotRef) -> tuple[Segment, int]:
        """``_checked``; the books then take a lender's newer generation."""
        seg, index = self._checked(c, ref)
        seg.generations[index] = ref.generation
        return seg, index

    def _checked(self, c: ClientBooks, ref: SlotRef) -> tuple[Segment, int]:
        """The slot ``ref`` names if ``c`` holds it by that generation (changes nothing).

        Raises:
            StaleHandleError: it does not.
        """
        seg = self._segments.get(ref.segment)
        if seg is None or not 0 <= ref.index < seg.nslots:
            raise StaleHandleError(f"no slot {ref.segment}:{ref.index} exists in this manager")
        if seg.holders[ref.index] != c.id:
            raise StaleHandleError(f"slot {ref.segment}:{ref.index} is not leased to this client")
        now = seg.generations[ref.index]
        if now != ref.generation and not _lent_ahead(c, seg, now, ref.generation):
            raise StaleHandleError(
                f"slot {ref.segment}:{ref.index} generation {ref.generation} is stale "
                f"(now {seg.generations[ref.index]})"
            )
        return seg, ref.index

    def _take(self, cls: ClassBooks, count: int, c: ClientBooks) -> list[tuple[Segment, int]]:
        # A batch is a hint: free slots are handed out before any memory is
        # added, and the class grows (to fill the batch) only when it has none
        # left. Growing to fill every batch would let a class swell up to the
        # whole budget in a producer/consumer pattern, where slots come back a
        # few at a time. Growing adds address space only; each slot is
        # committed (within the budget, taking other classes' free pages if
        # need be) as it is picked.
        free = cls.free
        grown = len(cls.segments)
        if not free and self._room(
            min(cls.per_segment, PAGE // cls.slot_size or 1) * cls.slot_size, cls
        ):
            try:
                while len(free) < count and self._grow(cls):
                    pass
            except PoolExhaustedError:
                if not free:  # e.g. /dev/shm is full; serve what we have, if anything
                    raise
        picked: list[tuple[Segment, int]] = []
        new_segments: set[int] = set()
        try:
            while free and len(picked) < count:
                seg, index = free[-1]
                if seg.id not in c.known and seg.id not in new_segments:
                    if len(new_segments) == MAX_FDS:
                        break
                    new_segments.add(seg.id)
                unit = index >> seg.unit_shift
                if not (seg.units[unit] or self._commit_unit(seg, unit)):
                    if self._committed_to_top(cls):
                        continue  # a committed one is on top now: take that
                    break
                free.pop()
                picked.append((seg, index))
        except PoolExhaustedError:  # /dev/shm is full: serve what we have, if anything
            if not picked:
                self._ungrow(cls, cls.segments[grown:])
                raise
        height = len(free)
        if height < cls.low:
            cls.low = height
        if height < cls.bare:
            cls.bare = height
        if not picked:
            self._ungrow(cls, cls.segments[grown:])
            raise PoolExhaustedError(
                f"no free {format_size(cls.slot_size)} slot and the memory budget "
                f"({format_size(self.memory)}, {format_size(self.committed)} committed) has "
                "no room, even after taking back the pages of every free slot; release "
                "leases or start the manager with more memory"
            )
        return picked

    def _committed_to_top(self, cls: ClassBooks) -> bool:
        """Bring a free slot whose pages are committed to the top of ``cls.free``.

        The budget has no room to commit the top one. Only slots smaller
        than a page leave committed slots under uncommitted ones (a page
        goes when all its slots are free, wherever they are in the list).
        False if there is none.
        """
        free = cls.free
        for i in range(len(free) - 2, -1, -1):
            seg, index = free[i]
            if seg.units[index >> seg.unit_shift]:
                free[i], free[-1] = free[-1], free[i]
                cls.low = min(cls.low, i)
                cls.bare = min(cls.bare, i)
                return True
        return False

    def _ungrow(self, cls: ClassBooks, segments: list[Segment]) -> None:
        """Undo the growth of a grant that failed: its new segments, all free, go."""
        if not segments:
            return
        gone = {seg.id for seg in segments}
        cls.free[:] = [entry for entry in cls.free if entry[0].id not in gone]
        del cls.segments[-len(segments) :]
        for seg in segments:
            cls.total -= seg.nslots
            self._destroy(seg)
        cls.low = min(cls.low, len(cls.free))
        cls.bare = min(cls.bare, len(cls.free))

    # ------------------------------------------------------ committed memory

    def _unit_span(self, seg: Segment, unit: int) -> tuple[int, int]:
        """Offset and length of unit ``unit`` of ``seg`` (the last may be short)."""
        first = unit << seg.unit_shift
        last = min(seg.nslots, first + (1 << seg.unit_shift))
        return seg.header + first * seg.slot_size, (last - first) * seg.slot_size

    def _room(self, nbytes: int, keep: ClassBooks | None) -> bool:
        """Make room in the budget for ``nbytes`` more committed; False if there is none.

        Takes the pages of free slots of classes other than ``keep``.
        """
        short = self.committed + nbytes - self.memory
        return short <= 0 or self._reclaim(short, keep)

    def _commit_unit(self, seg: Segment, unit: int) -> bool:
        """Back unit ``unit`` of ``seg`` with memory; False if the budget has no room.

        Raises:
            PoolExhaustedError: ``/dev/shm`` is full.
        """
        offset, length = self._unit_span(seg, unit)
        if not self._room(length, seg.cls):
            return False
        self._back(seg, offset, length)
        seg.units[unit] = 1
        self._count_committed(seg.cls, length)
        return True

    def _back(self, seg: Segment, offset: int, length: int) -> None:
        """Commit ``length`` bytes of ``seg`` from ``offset`` in its backing.

        A full ``/dev/shm`` first gives up the pages of free slots (they make
        room there as in the budget), then the commit is tried once more.

        Raises:
            PoolExhaustedError: ``/dev/shm`` is full all the same.
        """
        commit = getattr(seg.backing, "commit", None)
        if commit is None:
            return
        try:
            commit(offset, length)
        except PoolExhaustedError:
            if not self._reclaim(length, None):
                raise
            commit(offset, length)

    def _count_committed(self, cls: ClassBooks | None, nbytes: int) -> None:
        self.committed += nbytes
        if cls is not None:
            cls.committed += nbytes
        if self.committed > self.peak_committed:
            self.peak_committed = self.committed

    def _decommit_unit(self, seg: Segment, unit: int) -> int:
        """Free the pages of a unit whose slots are all free; returns its bytes."""
        offset, length = self._unit_span(seg, unit)
        decommit = getattr(seg.backing, "decommit", None)
        if decommit is not None:
            decommit(offset, length)  # first: if it fails, the books still say committed
        seg.units[unit] = 0
        self.committed -= length
        seg.cls.committed -= length  # type: ignore[union-attr]
        return length

    def _decommit_free(self, cls: ClassBooks, want: int, start: int, stop: int) -> tuple[int, int]:
        """Decommit free slots ``cls.free[start:stop]``, bottom up, until ``want`` bytes went.

        A unit of several slots goes only when all of them are free. Returns
        the bytes freed and the position reached.
        """
        freed = 0
        free = cls.free
        i = start
        while i < stop and freed < want:
            seg, index = free[i]
            i += 1
            unit = index >> seg.unit_shift
            if not seg.units[unit]:
                continue
            if seg.unit_shift:
                first = unit << seg.unit_shift
                if any(seg.holders[first : first + (1 << seg.unit_shift)]):
                    continue  # another slot of the page is out
            freed += self._decommit_unit(seg, unit)
        return freed, i

    def _reclaim(self, need: int, keep: ClassBooks | None) -> bool:
        """Decommit free slots of classes but ``keep``, oldest first, until ``need`` bytes went.

        Classes with the most idle committed bytes give first. True if
        enough went. Nothing goes unless the free slots' committed bytes add
        up to ``need`` (exactly what can go, but for slots smaller than a
        page, which go a page at a time).
        """
        idle = [
            (cls.committed - (cls.total - len(cls.free)) * cls.slot_size, i)
            for i, cls in enumerate(self._classes)
            if cls is not keep and cls.committed
        ]
        if sum(n for n, _ in idle) < need:
            return False
        freed = 0
        for _, i in sorted(idle, reverse=True):
            cls = self._classes[i]
            got, cls.bare = self._decommit_free(cls, need - freed, cls.bare, len(cls.free))
            freed += got
            if freed >= need:
                return True
        return False

    def release_idle(self) -> int:
        """Decommit free slots nobody took since the pass before last; returns the bytes freed.

        Called every ``idle_release / 2`` seconds: a slot at the bottom of its
        free list, below the least height of the last two intervals, sat
        free and untouched for at least ``idle_release`` seconds (and at most
        1.5 times that by the time it goes).
        """
        freed = 0
        for cls in self._classes:
            cold = min(cls.low, cls.prev_low, len(cls.free))
            if cls.committed and cls.slot_size >= PAGE:
                start = min(cls.bare, cold)
                got, reached = self._decommit_free(cls, cls.committed, start, cold)
                freed += got
                cls.bare = max(cls.bare, reached)
            elif cls.committed:
                freed += self._decommit_cold_pages(cls, cold)
            cls.prev_low, cls.low = cls.low, len(cls.free)
        return freed

    def _decommit_cold_pages(self, cls: ClassBooks, cold: int) -> int:
        """``release_idle`` for slots under a page: a page goes once all its slots are cold."""
        seen: dict[tuple[Segment, int], int] = {}
        for seg, index in cls.free[:cold]:
            unit = index >> seg.unit_shift
            if seg.units[unit]:
                seen[seg, unit] = seen.get((seg, unit), 0) + 1
        freed = 0
        for (seg, unit), n in seen.items():
            if n == self._unit_span(seg, unit)[1] // seg.slot_size:
                freed += self._decommit_unit(seg, unit)
        return freed

    def note_usage(
        self, conn: int, requested: Iterable[tuple[int, int]], sizes: Iterable[tuple[int, int]]
    ) -> None:
        """A client's report (``Usage``): its open lease bytes now, its acquires since the last."""
        c = self._conns[conn]
        c.requested = {k: n for k, n in requested if n}
        counts = self.request_sizes
        for k, n in sizes:
            counts[k] += n

    def _header(self, nslots: int) -> int:
        """Bytes of ticket words (8 a slot, whole pages) a segment starts with."""
        return -(-8 * nslots // PAGE) * PAGE if self._tickets is not None else 0

    def _grow(self, cls: ClassBooks) -> bool:
        """Add a segment to ``cls``, none of it committed; False if the class fills the budget."""
        nslots = min(cls.per_segment, (self.memory - cls.total * cls.slot_size) // cls.slot_size)
        if nslots <= 0:
            return False
        self._new_segment(cls.slot_size, nslots, cls)
        return True

    def _new_oversize(self, size: int) -> Segment:
        """A segment of one ``size``-byte slot, committed whole."""
        if not self._room(size, None):
            raise PoolExhaustedError(
                f"a {format_size(size)} buffer does not fit the memory budget "
                f"({format_size(self.memory)}, {format_size(self.committed)} committed), "
                "even after taking back the pages of every free slot"
            )
        seg = self._new_segment(size, 1, None)  # may raise PoolExhaustedError (/dev/shm full)
        try:
            self._back(seg, seg.header, size)
        except BaseException:
            self._destroy(seg)
            raise
        seg.units[0] = 1
        self._count_committed(None, size)
        self.oversize_leases += 1
        self.oversize_bytes += size
        return seg

    def _new_segment(self, slot_size: int, nslots: int, cls: ClassBooks | None) -> Segment:
        header = self._header(nslots)
        size = header + slot_size * nslots
        # The budget counts committed slot bytes; ticket words (8 bytes a
        # slot, whole pages, always committed) come on top: ticket_bytes.
        # may raise PoolExhaustedError (e.g. /dev/shm full)
        backing = self._allocate(size, header) if header else self._allocate(size)
        per_unit = min(max(1, PAGE // slot_size), nslots)
        shift = (per_unit - 1).bit_length()
        seg = Segment(
            next(self._ids),
            size,
            slot_size,
            backing,
            cls,
            [0] * nslots,
            [0] * nslots,
            header,
            shift,
            bytearray(-(-nslots >> shift)),
        )
        self._segments[seg.id] = seg
        self.mapped += size - header
        self.ticket_bytes += header
        if cls is not None:
            cls.segments.append(seg)
            cls.total += nslots
            cls.free.extend((seg, i) for i in reversed(range(nslots)))
        return seg

    def _grant(self, c: ClientBooks, slot_size: int, picked: list[tuple[Segment, int]]) -> Grant:
        slots: list[SlotRef] = []
        segments: list[SegmentInfo] = []
        fds: list[int] = []
        cid, known = c.id, c.known
        for seg, index in picked:
            generation = seg.generations[index] + 1
            if generation > GENERATION_WRAP:  # pushed up by forged generations: go on lower
                generation -= GENERATION_WRAP
            move(seg, index, cid, generation, None, c)  # from free, in transit, or an orphan
            if seg.id not in known:
                known.add(seg.id)
                segments.append(seg.info())
                fds.append(seg.backing.fd)
            slots.append(_new_ref(SlotRef, (seg.id, index, generation)))
        return Grant(slot_size, slots, segments, fds)

    def _free(
        self, seg: Segment, index: int, c: ClientBooks | None, generation: int | None = None
    ) -> None:
        """Free a slot (held by ``c``, or by nobody: in transit, shared, an orphan).

        It moves on from ``generation`` if given (a lender's newer one),
        else from the books'. An oversize slot's segment is destroyed.
        """
        move(
            seg, index, FREE, (seg.generations[index] if generation is None else generation) + 1, c
        )
        if seg.header:
            assert self._words is not None
            self._words.store(seg, index, 0)
        if seg.cls is None:
            self._destroy(seg)
            for other in self._conns.values():
                other.known.discard(seg.id)

    def _destroy(self, seg: Segment) -> None:
        del self._segments[seg.id]
        self.mapped -= seg.size - seg.header
        self.ticket_bytes -= seg.header
        if seg.cls is None and seg.units and seg.units[0]:  # an oversize segment in use
            self.committed -= seg.size - seg.header
            self.oversize_leases -= 1
            self.oversize_bytes -= seg.size - seg.header
        seg.backing.close()

    def close(self) -> None:
        """Release every segment's backing (manager shutdown)."""
        for seg in list(self._segments.values()):
            seg.backing.close()
        self._segments.clear()

    # ------------------------------------------------------------------- stats

    def _census(self) -> tuple[list[int], dict[int, int]]:
        """``Reconciler.census``: lent slots per class and client; nothing without words."""
        if self._lent is None:
            return [0] * len(self._classes), {}
        return self._lent.census()

    def _requested(self) -> tuple[list[int], int]:
        """Bytes of open leases clients reported, per class and oversize."""
        per_class = [0] * len(self._classes)
        oversize = 0
        lo, hi = self.classes.min_shift, self.classes.max_shift
        for c in self._conns.values():
            for k, n in c.requested.items():
                if k > hi:
                    oversize += n
                else:
                    per_class[max(0, k - lo)] += n
        return per_class, oversize

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot; per class ``total == free + leased + in_transit``.

        Memory, per class and in all: ``committed_bytes`` (backed by memory:
        what the budget counts), ``leased_bytes`` (capacity of the slots out
        with clients: leased or cached, in transit, shared) and
        ``requested_bytes`` (the lengths of the leases clients have open, as
        they last reported). ``request_sizes``: ``[2**k, count]`` of the
        acquires of ``2**(k-1) < n <= 2**k`` bytes clients reported.
        """
        if self._orphans and self._lent is not None:
            self._lent.settle_orphans(None)  # claimed or returned since (no clock: no expiry)
        lent, shift = self._census()
        requested, oversize_requested = self._requested()
        classes = [
            {
                "size": cls.slot_size,
                "segments": len(cls.segments),
                "total": cls.total,
                "free": len(cls.free),
                "leased": cls.leased - out,
                "in_transit": cls.in_transit + out,
                "committed_bytes": cls.committed,
                "leased_bytes": (cls.total - len(cls.free)) * cls.slot_size,
                "requested_bytes": asked,
            }
            for cls, out, asked in zip(self._classes, lent, requested, strict=True)
        ]
        return {
            "classes": classes,
            "oversize": {
                "leases": self.oversize_leases,
                "bytes": self.oversize_bytes,
                "requested_bytes": oversize_requested,
            },
            "in_transit": len(self._transit) + len(self._orphans) + sum(lent),
            "shared": len(self._shares),
            "committed_bytes": self.committed,
            "peak_committed_bytes": self.peak_committed,
            "leased_bytes": sum(c["leased_bytes"] for c in classes) + self.oversize_bytes,
            "requested_bytes": sum(requested) + oversize_requested,
            "mapped_bytes": self.mapped,
            "ticket_bytes": self.ticket_bytes,
            "memory_limit": self.memory,
            "min_size": self.classes.min_size,
            "max_size": self.classes.max_size,
            "request_sizes": [[1 << k, n] for k, n in enumerate(self.request_sizes) if n],
            "clients": [
                {
                    "id": c.id,
                    "pid": c.pid,
                    "name": c.name,
                    "leased": len(c.held) + shift.get(c.id, 0),
                    "requested_bytes": sum(c.requested.values()),
                    "messages": c.messages,
                    "manager_acquires": c.manager_acquires,
                    "cache_hits": c.cache_hits,
                }
                for c in self._conns.values()
            ],
        }


_new_ref = tuple.__new__  # a SlotRef from fields the arena made, without its Python __new__


def _lent_ahead(c: ClientBooks, seg: Segment, books: int, generation: int) -> bool:
    """True if ``c`` may name ``generation`` for its slot the books have at ``books``.

    A slot it lent out and took back has moved on some generations without
    us (``lent_word``): a lender's newer generation of a class slot stands.
    """
    return c.lends and seg.header > 0 and seg.cls is not None and ahead(books, generation)


def _token_bytes(token: int) -> bytes:
    return token.to_bytes(8, "big", signed=False)
