"""The manager's books of a slot: its five states, the moves between them, one move function.

Each slot is in exactly one state, which its holder field says
(``Segment.holders``):

    holder    state      counted in its class's
    ------    -----      ----------------------
    0         FREE       free list (``ClassBooks.free``)
    id > 0    LEASED     leased    (held by that connection: cached, open, or lent out)
    -1        TRANSIT    in_transit (detached under a token, waiting for an attach)
    -2        SHARED     leased    (published read-only to several readers)
    -3        ORPHAN     in_transit (lent out when its lender went; its word is watched)

``MOVES`` is every move the books allow, h11-style: a move not in the table
is a bug, and ``move`` refuses it before it changes anything. ``move`` is
the one place a slot changes state: it checks the move, sets the holder and
the generation, keeps the class's ``leased`` and ``in_transit`` counters, the
free list (a slot moved to FREE goes on top) and the connections' ``held``
sets. So per class, ``total == len(free) + leased + in_transit`` holds
whichever path moved the slot, the fast ones included. A slot leaves FREE
only by a grant, whose ``_take`` pops it from the free list first.

An oversize segment (``cls`` None) has one slot and no class: its moves are
checked the same way and count in no class (freed, it is destroyed).

    ::

        FREE ----grant----> LEASED ----release, drop, give back----> FREE
                            |  ^  \\--share--> SHARED --last reader--> FREE
                     detach |  | attach, claim
                            v  |
                          TRANSIT --expiry--> FREE
        LEASED --lender gone, word lent--> ORPHAN --claimed--> LEASED
                                           ORPHAN --returned, expired--> FREE
        LEASED --lender gone, word claimed--> LEASED (the claimer)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .protocol import SegmentInfo

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "FREE",
    "MOVES",
    "ORPHAN",
    "SHARED",
    "TRANSIT",
    "Backing",
    "BooksError",
    "ClassBooks",
    "ClientBooks",
    "Move",
    "Segment",
    "SlotState",
    "move",
    "state_of",
]


class SlotState(enum.IntEnum):
    """A slot's state; its value is the holder field's (LEASED: any connection id > 0)."""

    ORPHAN = -3
    SHARED = -2
    TRANSIT = -1
    FREE = 0
    LEASED = 1


#: The holder of a free slot.
FREE = 0
#: The holder of a slot in transit between clients (connection ids are > 0).
TRANSIT = -1
#: The holder of a slot shared read-only by several clients.
SHARED = -2
#: The holder of a slot whose lender went while it was lent out (its word
#: says where it is: in transit, claimed, or returned).
ORPHAN = -3


class Move(NamedTuple):
    """One allowed move: its name, what it does to the class's counters, and its cause."""

    name: str
    leased: int  # added to the class's ``leased``
    in_transit: int  # added to the class's ``in_transit``
    cause: str


_S = SlotState
#: Every move the books allow, by (from, to). docs/design.md draws them.
MOVES: dict[tuple[SlotState, SlotState], Move] = {
    (_S.FREE, _S.LEASED): Move("grant", 1, 0, "an Acquire answered with a Grant"),
    (_S.LEASED, _S.FREE): Move(
        "free", -1, 0, "a Return, a give back, an oversize release, or the connection ended"
    ),
    (_S.LEASED, _S.TRANSIT): Move("detach", -1, 1, "a DETACHED notice, or a handoff proved"),
    (_S.TRANSIT, _S.LEASED): Move("attach", 1, -1, "an Attach, or a claim by the ticket word"),
    (_S.TRANSIT, _S.FREE): Move("expire", 0, -1, "nobody attached within transit_timeout"),
    (_S.LEASED, _S.SHARED): Move("share", 0, 0, "a Share to readers"),
    (_S.SHARED, _S.FREE): Move("unshare", -1, 0, "the last reader went, no attach pending"),
    (_S.LEASED, _S.ORPHAN): Move("orphan", -1, 1, "its lender went while the word was lent"),
    (_S.ORPHAN, _S.LEASED): Move("adopt", 1, -1, "an orphan claimed or attached"),
    (_S.ORPHAN, _S.FREE): Move("settle", 0, -1, "an orphan returned, expired or nobody's"),
    (_S.LEASED, _S.LEASED): Move(
        "inherit", 0, 0, "its lender went while a live client's claim was in the word"
    ),
}
del _S

# The same table keyed by plain ints, for ``move``: (from, to) -> (leased, in_transit).
_DELTAS: dict[tuple[int, int], tuple[int, int]] = {
    (int(a), int(b)): (m.leased, m.in_transit) for (a, b), m in MOVES.items()
}


class BooksError(RuntimeError):
    """A move the books do not allow: a bug in the manager, never a client's doing.

    Raised before anything changes, so the books stay as they were.
    """


class Backing(Protocol):
    """The memory behind a segment, as the arena sees it."""

    fd: int

    def close(self) -> None: ...


@dataclass(eq=False)
class Segment:
    id: int
    size: int
    slot_size: int
    backing: Backing
    cls: ClassBooks | None  # None for an oversize segment
    holders: list[int] = field(default_factory=list)  # per slot: its state (see SlotState)
    generations: list[int] = field(default_factory=list)
    header: int = 0  # bytes of ticket words before the first slot
    unit_shift: int = 0  # a unit of committed memory holds 2**unit_shift slots
    units: bytearray = field(default_factory=bytearray)  # per unit: 1 if committed

    @property
    def nslots(self) -> int:
        return len(self.holders)

    def info(self) -> SegmentInfo:
        return SegmentInfo(self.id, self.size, self.slot_size, self.header)


@dataclass(eq=False)
class ClassBooks:
    """One size class: its segments, its free list and its counters."""

    slot_size: int
    per_segment: int
    free: list[tuple[Segment, int]] = field(default_factory=list)  # a stack: top is hot
    segments: list[Segment] = field(default_factory=list)
    total: int = 0
    leased: int = 0  # LEASED and SHARED slots
    in_transit: int = 0  # TRANSIT and ORPHAN slots
    committed: int = 0  # bytes of this class's slots backed by memory
    low: int = 0  # the free list's least height since the last idle pass
    prev_low: int = 0  # ... and in the interval before it
    bare: int = 0  # free[:bare] was looked at by a decommit pass and nothing taken since


@dataclass(eq=False)
class ClientBooks:
    """One connection: the slots it holds and what the manager knows of it."""

    id: int
    pid: int
    name: str
    held: set[tuple[int, int]] = field(default_factory=set)
    known: set[int] = field(default_factory=set)  # segment ids this client has mapped
    # handoffs applied before this client's own notice came: (segment, index) -> token
    handed: dict[tuple[int, int], int] = field(default_factory=dict)
    # ticket_token with its key; None: its tokens are not checked (tests of the books)
    token: Callable[[int, int, int], int] | None = None
    lends: bool = False  # it lends class slots by their words (no DETACHED notice)
    # slots the manager claimed for it (it has no atomics) -> the handle's generation
    borrowed: dict[tuple[int, int], int] = field(default_factory=dict)
    messages: int = 0
    manager_acquires: int = 0
    cache_hits: int = 0
    # bytes of its open leases, by (length - 1).bit_length() (its last Usage)
    requested: dict[int, int] = field(default_factory=dict)


def state_of(holder: int) -> SlotState:
    """The state a holder field says."""
    return SlotState(holder if holder <= 0 else SlotState.LEASED)


def move(
    seg: Segment,
    index: int,
    holder: int,
    generation: int,
    giver: ClientBooks | None = None,
    taker: ClientBooks | None = None,
) -> None:
    """Move slot ``index`` of ``seg`` to ``holder`` at ``generation``: the one way states change.

    ``giver`` is the connection that held it (when it leaves LEASED; it may
    be one the arena dropped already), ``taker`` the one that gets it (when
    ``holder`` is a connection id). Their ``held`` sets follow; a slot
    moved to FREE goes on top of its class's free list.

    Raises:
        BooksError: the move is not in ``MOVES``, or ``giver``/``taker``
            do not match the holders; nothing changed.
    """
    was = seg.holders[index]
    delta = _DELTAS.get((was if was <= 0 else 1, holder if holder <= 0 else 1))
    if (
        delta is None
        or was == holder
        or (was > 0 and (giver is None or giver.id != was))
        or (holder > 0 and (taker is None or taker.id != holder))
    ):
        raise BooksError(_refusal(seg, index, was, holder, giver, taker))
    seg.holders[index] = holder
    seg.generations[index] = generation
    key = (seg.id, index)
    if giver is not None:
        giver.held.discard(key)
    if taker is not None:
        taker.held.add(key)
    cls = seg.cls
    if cls is not None:
        cls.leased += delta[0]
        cls.in_transit += delta[1]
        if not holder:
            cls.free.append((seg, index))


def _refusal(
    seg: Segment,
    index: int,
    was: int,
    holder: int,
    giver: ClientBooks | None,
    taker: ClientBooks | None,
) -> str:
    where = f"slot {seg.id}:{index}"
    a, b = state_of(was), state_of(holder)
    if (a, b) not in MOVES or was == holder:
        return f"{where}: no move from {a.name} ({was}) to {b.name} ({holder})"
    who: Any = giver.id if giver is not None else None
    got: Any = taker.id if taker is not None else None
    return f"{where}: {a.name} ({was}) to {b.name} ({holder}) named giver {who}, taker {got}"
