"""The shmpool wire protocol, sans I/O.

Manager and client share this module; it has no sockets in it, so it can be
unit-tested and fuzzed on bytes alone.

Framing: the transport is a ``SOCK_SEQPACKET`` Unix socket, which keeps message
boundaries, so one datagram is one message and needs no length prefix. A
message is a msgpack array ``[type, req, *fields]``: ``type`` names the message,
``req`` is the request id a reply echoes (0 for notifications the manager sends
unasked). Segment file descriptors ride beside a ``Grant`` as SCM_RIGHTS
ancillary data, one per ``SegmentInfo`` and in the same order.

Rules:
- The client opens with ``Hello`` carrying ``VERSION``; the manager answers
  ``Welcome`` or ``Error`` and closes. Nothing else is accepted before it.
- Every request but ``Return`` gets exactly one reply with the same ``req``:
  the expected reply type or ``Error``. Replies come in request order. A
  ``Return`` gets no reply, unless it is bad: then ``Error`` and a close.
- An ``Acquire`` the manager cannot serve at once may wait (bounded) while
  the manager ``Recall``s idle slots from other clients.
- The manager may send ``Recall`` (req 0) at any time after ``Welcome``.
- A client reports what it uses (``Usage``: bytes of its open leases, and the
  sizes it asked for) now and then; it gets no reply. One that tracks its
  leases also reports those held long (``Leases``, no reply).
- Every field is checked for type and range when a message is built, so a
  decoded message is always well formed; ``decode`` turns anything else,
  whatever the bytes, into ``ProtocolError``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

import msgpack

from .errors import ProtocolError
from .sizeclass import MAX_SHIFT
from .ticket import (  # the ticket word is defined there; these names stay exported here
    CLAIMED,
    LENT,
    claim_word,
    claimer_of,
    generation_at_least,
    is_returned,
    lent_word,
    returned_word,
    seal_token,
    ticket_token,
    ticket_word,
    token_maker,
)

_slot_refs: Callable[[Any, type], Any] | None
try:  # the C extension checks slot lists (see _slots); SHMPOOL_NO_SPEEDUPS turns it off
    if os.environ.get("SHMPOOL_NO_SPEEDUPS", "0") not in ("", "0"):
        raise ImportError("disabled by SHMPOOL_NO_SPEEDUPS")
    _slot_refs = importlib.import_module("shmpool._speedups").slot_refs
except ImportError:
    _slot_refs = None

__all__ = [
    "CLAIMED",
    "LENT",
    "MAX_BATCH",
    "MAX_FDS",
    "MAX_REPLY",
    "MAX_REQUEST",
    "NOTICE_CLAIMED",
    "NOTICE_DETACHED",
    "NOTICE_RETURNED",
    "NOTICE_WORDS",
    "VERSION",
    "WAIT_DEFAULT",
    "Acquire",
    "Attach",
    "Error",
    "Grant",
    "Hello",
    "LeaseRecord",
    "Leases",
    "Message",
    "Notice",
    "Notices",
    "Ok",
    "Recall",
    "Release",
    "Return",
    "SegmentInfo",
    "Share",
    "SlotRef",
    "Stats",
    "StatsReply",
    "Usage",
    "Welcome",
    "claim_word",
    "claimer_of",
    "decode",
    "encode",
    "generation_at_least",
    "is_returned",
    "lent_word",
    "returned_word",
    "seal_token",
    "ticket_token",
    "ticket_word",
    "token_maker",
]

#: Bumped whenever clients of one manager could not work together, down to how a
#: pickled Lease names the function that loads it (5: ``shmpool._attach_anywhere``;
#: 6: ``Acquire.wait`` counts milliseconds; 7: ``Usage``, and ``Recall`` of every class;
#: 8: a pickled Lease loads by ``shmpool.registry.rebuild_lease``).
VERSION = 8
#: Largest request datagram a client may send (a full Release batch fits easily).
MAX_REQUEST = 16 * 1024
#: Largest reply datagram the manager sends (below the ~200 KiB SEQPACKET limit).
MAX_REPLY = 128 * 1024
#: Most slots in one Acquire, Grant or Release.
MAX_BATCH = 256
#: Most segment descriptors passed in one Grant (SCM_MAX_FD is 253).
MAX_FDS = 64
MAX_ID = 2**63 - 1
MAX_BUFFER = 1 << MAX_SHIFT
MAX_TEXT = 1024
#: Most readers one shared slot may be published to.
MAX_READERS = 1 << 16
#: ``Acquire.wait`` that asks for the manager's default wait; anything less is
#: milliseconds (``WAIT_DEFAULT - 1``, about 49 days, stands for "for ever").
WAIT_DEFAULT = 2**32 - 1


def _int(value: Any, name: str, lo: int = 0, hi: int = MAX_ID) -> None:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} out of range {lo}..{hi}")


def _text(value: Any, name: str) -> None:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{name} longer than {MAX_TEXT} characters")


def _json_like(value: Any, name: str, depth: int) -> None:
    """Check that ``value`` is made of JSON types only (the stats are JSON-able)."""
    if depth > 100:
        raise ValueError(f"{name} is nested too deeply")
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{name} has a non-string key")
            _json_like(item, name, depth + 1)
    elif type(value) is list:
        for item in value:
            _json_like(item, name, depth + 1)
    elif value is not None and type(value) not in (int, float, str, bool):
        raise TypeError(f"{name} holds a {type(value).__name__}, which JSON cannot")


_new_tuple = tuple.__new__  # a NamedTuple from checked fields, without its Python __new__


class SlotRef(NamedTuple):
    """A slot as the wire names it: segment id, index in it, generation."""

    segment: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose
    generation: int

    @classmethod
    def from_wire(cls, value: Any) -> SlotRef:
        if type(value) is not list or len(value) != 3:
            raise TypeError("a slot must be [segment, index, generation]")
        a, b, c = value
        ints = type(a) is int and type(b) is int and type(c) is int
        if ints and 0 <= a <= MAX_ID and 0 <= b <= MAX_ID and 0 <= c <= MAX_ID:
            return _new_tuple(cls, (a, b, c))  # the common case, checked fast
        for item, name in zip(value, cls._fields, strict=True):
            _int(item, name)
        raise AssertionError("unreachable")  # pragma: no cover


class SegmentInfo(NamedTuple):
    """A segment being sent to a client; its fd travels as ancillary data."""

    segment: int
    size: int
    slot_size: int
    header: int = 0  # ticket words before the first slot (a multiple of 8)

    @classmethod
    def from_wire(cls, value: Any) -> SegmentInfo:
        if type(value) is not list or len(value) not in (3, 4):
            raise TypeError("a segment must be [segment, size, slot_size(, header)]")
        _int(value[0], "segment")
        _int(value[1], "size", 1, MAX_BUFFER)
        _int(value[2], "slot_size", 1, MAX_BUFFER)
        header = value[3] if len(value) == 4 else 0
        _int(header, "header", 0, MAX_BUFFER)
        if header % 8 or header + value[2] > value[1]:
            raise ValueError("slot_size and header do not fit their segment")
        return cls(value[0], value[1], value[2], header)


def _slots(value: Any, name: str, lo: int = 0) -> tuple[SlotRef, ...]:
    if type(value) not in (list, tuple):
        raise TypeError(f"{name} must be a list")
    if not lo <= len(value) <= MAX_BATCH:
        raise ValueError(f"{name} must hold {lo}..{MAX_BATCH} slots, not {len(value)}")
    if _slot_refs is not None:  # the common case in C; None: the loop below says what is wrong
        refs: tuple[SlotRef, ...] | None = _slot_refs(value, SlotRef)
        if refs is not None:
            return refs
    return tuple(SlotRef.from_wire(list(v) if type(v) is SlotRef else v) for v in value)


class _Message:
    """Shared encode/decode plumbing for the message dataclasses."""

    TYPE: ClassVar[int]
    req: int

    def to_wire(self) -> list[Any]:
        return [self.TYPE, *(getattr(self, f.name) for f in fields(self))]  # type: ignore[arg-type]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Any:
        return cls(*items)


# ----------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """First message of a client: protocol version, its pid and a name for stats."""

    TYPE: ClassVar[int] = 1
    req: int
    version: int
    pid: int
    name: str = ""
    lends: int = 0  # 1: it lends class slots by their ticket words (see ``lent_word``)

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.version, "version", 0, 2**16)
        _int(self.pid, "pid", 0, 2**31)
        _text(self.name, "name")
        _int(self.lends, "lends", 0, 1)


@dataclass(frozen=True, slots=True)
class Acquire(_Message):
    """Lease ``count`` slots of the class that fits ``size`` bytes.

    ``hits`` is the client's running count of acquires served from its local
    cache, piggybacked so the manager's stats can show it. ``wait`` is how
    long (milliseconds) the acquire may wait for memory when none is free:
    ``WAIT_DEFAULT`` asks for the manager's own ``acquire_wait``; 0 makes it
    answered at once, with free slots (or a new segment within the budget)
    or an ``exhausted`` Error, never parked, recalling nothing, and refused
    while other clients wait for that class (a prefetch, or ``timeout=0``).
    """

    TYPE: ClassVar[int] = 2
    req: int
    size: int
    count: int = 1
    hits: int = 0
    wait: int = WAIT_DEFAULT

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.size, "size", 1, MAX_BUFFER)
        _int(self.count, "count", 1, MAX_BATCH)
        _int(self.hits, "hits")
        _int(self.wait, "wait", 0, WAIT_DEFAULT)


@dataclass(frozen=True, slots=True)
class _SlotBatch(_Message):
    """Shared shape of Release and Return: ``[type, req, [slots...], hits]``."""

    req: int
    slots: tuple[SlotRef, ...]
    hits: int = 0

    def __post_init__(self) -> None:
        _int(self.req, "req")
        object.__setattr__(self, "slots", _slots(self.slots, "slots", 1))
        _int(self.hits, "hits")

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.req, [list(s) for s in self.slots], self.hits]


@dataclass(frozen=True, slots=True)
class Release(_SlotBatch):
    """Give leased slots back to the manager's free lists."""

    TYPE: ClassVar[int] = 3


@dataclass(frozen=True, slots=True)
class Return(_SlotBatch):
    """Give idle cached slots back, expecting no reply.

    Sent when a cache passes its high-water mark, answers a ``Recall``, or
    sits idle. A correct client only returns slots it holds, so a bad
    ``Return`` gets an ``Error`` and the connection is closed.
    """

    TYPE: ClassVar[int] = 5


@dataclass(frozen=True, slots=True)
class _SlotToken(_Message):
    """Shared shape of Attach and Share: ``[type, req, slot, token, ...]``."""

    req: int
    slot: SlotRef
    token: int

    def __post_init__(self) -> None:
        _int(self.req, "req")
        object.__setattr__(self, "slot", SlotRef.from_wire(list(self.slot)))
        _int(self.token, "token")

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.req, list(self.slot), self.token]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Any:
        if len(items) != 3 or type(items[1]) is not list:
            raise TypeError(f"{cls.__name__} is [req, [segment, index, generation], token]")
        return cls(items[0], SlotRef.from_wire(items[1]), items[2])


@dataclass(frozen=True, slots=True)
class Share(_SlotToken):
    """Publish a leased slot read-only to ``readers`` attaches; no reply.

    Like a handoff, the slot leaves this client (generation + 1); up to
    ``readers`` Attaches naming the new generation and the token may join it
    before the transit timeout; it is freed when the last reader releases it.
    """

    TYPE: ClassVar[int] = 8
    readers: int

    def __post_init__(self) -> None:
        _SlotToken.__post_init__(self)
        _int(self.readers, "readers", 1, MAX_READERS)

    def to_wire(self) -> list[Any]:
        return [*_SlotToken.to_wire(self), self.readers]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Any:
        if len(items) != 4 or type(items[1]) is not list:
            raise TypeError("Share is [req, [segment, index, generation], token, readers]")
        return cls(items[0], SlotRef.from_wire(items[1]), items[2], items[3])


#: ``Notice.kind``: the client let go of a slot it held (handed it on).
NOTICE_DETACHED = 0
#: ``Notice.kind``: the client took a handed-on slot by its ticket word.
NOTICE_CLAIMED = 1
#: ``Notice.kind``: the client lets go of a slot lent to it (the manager
#: claimed it for the client, which has no atomics): the manager writes
#: ``returned_word`` for it. The token is 0.
NOTICE_RETURNED = 2


class Notice(NamedTuple):
    """One entry of ``Notices``: what happened to a slot, and under which token.

    ``NOTICE_DETACHED``: this client let go of the slot it held at
    ``generation``; the handle names ``generation + 1``.
    ``NOTICE_CLAIMED``: this client took the slot named by a handle
    (``generation`` is the handle's) by swapping its ticket word from
    ``token`` to ``claim_word(client id, generation)``.
    ``NOTICE_RETURNED``: this client lets go of a slot lent to it (its word
    holds ``claim_word(client id, generation)``).
    """

    kind: int
    segment: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose
    generation: int
    token: int

    @property
    def slot(self) -> SlotRef:
        return SlotRef(self.segment, self.index, self.generation)


#: Ints per notice on the wire: kind, segment, index, generation, token.
NOTICE_WORDS = 5


@dataclass(frozen=True, slots=True)
class Notices(_Message):
    """Handoffs this client made or took, in the order it made them; no reply.

    A client batches these (see ``client.NOTICE_BATCH``): the ticket words in
    shared memory already say who holds each slot, so the manager's books may
    lag a little. It applies the notices in order; one that names a slot its
    books have not caught up with waits (the messages that catch them up are
    on another client's socket), and so do the notices after it. A bogus
    notice closes the connection.

    On the wire and in ``flat`` the notices are one flat array of ints,
    ``NOTICE_WORDS`` per notice, so that the manager reads a batch without
    building an object per notice; ``items`` gives them as ``Notice`` objects.
    """

    TYPE: ClassVar[int] = 10
    req: int
    flat: tuple[int, ...]

    def __post_init__(self) -> None:
        _int(self.req, "req")
        flat = self.flat
        if type(flat) not in (list, tuple):
            raise TypeError("notices must be a flat list of ints")
        n = len(flat)
        if n % NOTICE_WORDS or not 1 <= n // NOTICE_WORDS <= MAX_BATCH:
            raise ValueError(f"notices must be 1..{MAX_BATCH} groups of {NOTICE_WORDS} ints")
        for value in flat:  # the common case, checked fast
            if type(value) is not int:
                raise TypeError(f"a notice holds a {type(value).__name__}, not an int")
        if min(flat) < 0 or max(flat) > MAX_ID:
            raise ValueError(f"a notice field is out of range 0..{MAX_ID}")
        if max(flat[::NOTICE_WORDS]) > NOTICE_RETURNED:
            raise ValueError("a notice kind is not NOTICE_DETACHED, _CLAIMED or _RETURNED")
        object.__setattr__(self, "flat", tuple(flat))

    @classmethod
    def of(cls, req: int, notices: Iterable[Notice]) -> Notices:
        """A ``Notices`` message from ``Notice`` objects."""
        return cls(req, tuple(v for notice in notices for v in notice))

    @property
    def items(self) -> tuple[Notice, ...]:
        flat, w = self.flat, NOTICE_WORDS
        return tuple(Notice(*flat[i : i + w]) for i in range(0, len(flat), w))

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.req, list(self.flat)]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Any:
        if len(items) != 2:
            raise TypeError("Notices is [req, [kind, segment, index, generation, token, ...]]")
        return cls(*items)


@dataclass(frozen=True, slots=True)
class Attach(_SlotToken):
    """Lease a slot in transit to this client; answered by a one-slot ``Grant``.

    ``token`` is the handoff's (the handle's, unsealed: see ``seal_token``);
    ``capacity`` and ``readers`` are the handle's, which the manager checks
    against its record of the slot (its size; whether it is shared) before
    it grants anything.
    """

    TYPE: ClassVar[int] = 7
    capacity: int
    readers: int

    def __post_init__(self) -> None:
        _SlotToken.__post_init__(self)
        _int(self.capacity, "capacity", 1, MAX_BUFFER)
        _int(self.readers, "readers", 0, MAX_READERS)

    def to_wire(self) -> list[Any]:
        return [*_SlotToken.to_wire(self), self.capacity, self.readers]

    @classmethod
    def from_wire(cls, items: list[Any]) -> Any:
        if len(items) != 5 or type(items[1]) is not list:
            raise TypeError(
                "Attach is [req, [segment, index, generation], token, capacity, readers]"
            )
        return cls(items[0], SlotRef.from_wire(items[1]), *items[2:])


#: ``Stats.leases`` when the reply should not list long-held leases.
NO_LEASES = -1


@dataclass(frozen=True, slots=True)
class Stats(_Message):
    """Ask for the manager's statistics.

    ``leases`` (milliseconds), when not ``NO_LEASES``: also list the leases
    that tracking clients reported held at least that long (``"leases"``).
    It is sent only then, so ``[type, req]`` stays the plain request.
    """

    TYPE: ClassVar[int] = 4
    req: int
    leases: int = NO_LEASES

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.leases, "leases", NO_LEASES, MAX_LEASE_AGE_MS)

    def to_wire(self) -> list[Any]:
        return [self.TYPE, self.req] + ([] if self.leases == NO_LEASES else [self.leases])


#: Most records in one ``Leases`` report, frames in one record's ``where``,
#: and characters in one frame: a full report stays far below ``MAX_REQUEST``.
MAX_LEASE_RECORDS = 16
MAX_LEASE_FRAMES = 4
MAX_FRAME_TEXT = 160
#: Ages beyond this (about 35 years, in ms) are refused as nonsense.
MAX_LEASE_AGE_MS = 2**40


class LeaseRecord(NamedTuple):
    """One long-held lease in a ``Leases`` report: its slot, its length, its age, where."""

    segment: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose
    size: int
    age_ms: int
    where: tuple[str, ...]  # "file:line in function", innermost first

    @classmethod
    def from_wire(cls, items: Any) -> LeaseRecord:
        if not isinstance(items, (list, tuple)) or len(items) != 5:
            raise ValueError("a lease record is [segment, index, size, age_ms, [where...]]")
        segment, index, size, age_ms, where = items
        _int(segment, "segment")
        _int(index, "index")
        _int(size, "size", 0, MAX_BUFFER)
        _int(age_ms, "age_ms", 0, MAX_LEASE_AGE_MS)
        if type(where) not in (list, tuple) or len(where) > MAX_LEASE_FRAMES:
            raise ValueError(f"where must be a list of at most {MAX_LEASE_FRAMES} frames")
        for frame in where:
            _text(frame, "where")
            if len(frame) > MAX_FRAME_TEXT:
                raise ValueError(f"a frame of where is longer than {MAX_FRAME_TEXT} characters")
        return cls(segment, index, size, age_ms, tuple(where))


@dataclass(frozen=True, slots=True)
class Leases(_Message):
    """The long-held leases of a client that tracks them (no reply).

    ``held``: how many leases it holds open that it tracks; ``records``: the
    oldest of those held long, at most ``MAX_LEASE_RECORDS``. Each report
    replaces the client's previous one; ages are as of sending.
    """

    TYPE: ClassVar[int] = 11
    req: int
    held: int
    records: tuple[LeaseRecord, ...] = ()

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.held, "held", 0, MAX_ID)
        recs = self.records
        if type(recs) not in (list, tuple) or len(recs) > MAX_LEASE_RECORDS:
            raise ValueError(f"records must be a list of at most {MAX_LEASE_RECORDS}")
        object.__setattr__(self, "records", tuple(LeaseRecord.from_wire(r) for r in recs))
        if len(self.records) > self.held:
            raise ValueError("more records than leases held")

    def to_wire(self) -> list[Any]:
        return [
            self.TYPE,
            self.req,
            self.held,
            [[r.segment, r.index, r.size, r.age_ms, list(r.where)] for r in self.records],
        ]


@dataclass(frozen=True, slots=True)
class Usage(_Message):
    """What a client uses, for the manager's stats (no reply).

    ``requested``: pairs ``(k, n)``: the open leases of this process whose
    length ``m`` has ``(m - 1).bit_length() == k`` add up to ``n`` bytes (a
    lease of ``m`` bytes sits in the class ``2**k`` when ``2**k`` is at
    least ``min_size``). It replaces the client's previous report.
    ``sizes``: pairs ``(k, c)``: ``c`` acquires of that many bytes since the
    previous report (the manager adds them up into its size histogram).
    ``k`` runs 0..MAX_SHIFT and each appears once in a list.
    """

    TYPE: ClassVar[int] = 9
    req: int
    requested: tuple[tuple[int, int], ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        _int(self.req, "req")
        object.__setattr__(self, "requested", _pairs(self.requested, "requested"))
        object.__setattr__(self, "sizes", _pairs(self.sizes, "sizes"))

    def to_wire(self) -> list[Any]:
        return [
            self.TYPE,
            self.req,
            [list(x) for x in self.requested],
            [list(x) for x in self.sizes],
        ]


def _pairs(value: Any, name: str) -> tuple[tuple[int, int], ...]:
    """Check a list of ``(k, n)`` pairs, ``k`` in 0..MAX_SHIFT at most once each."""
    if type(value) not in (list, tuple) or len(value) > MAX_SHIFT + 1:
        raise ValueError(f"{name} must be a list of at most {MAX_SHIFT + 1} pairs")
    out = []
    seen = set()
    for pair in value:
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise ValueError(f"{name} must hold [k, n] pairs")
        k, n = pair
        _int(k, f"{name} k", 0, MAX_SHIFT)
        _int(n, f"{name} n")
        if k in seen:
            raise ValueError(f"{name} names k={k} twice")
        seen.add(k)
        out.append((k, n))
    return tuple(out)


# ------------------------------------------------------------------ replies


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    """The manager accepted the Hello; its configuration follows."""

    TYPE: ClassVar[int] = 64
    req: int
    version: int
    manager_pid: int
    min_size: int
    max_size: int
    client_id: int
    instance: int = 0  # random per manager run: tells its handles from another's
    tickets: int = 0  # 1: segments start with ticket words; claim notices are understood
    key: int = 0  # this client's key for ``ticket_token``
    transit_ms: int = 30_000  # how long a handle waits for its attach, in milliseconds

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.instance, "instance")
        _int(self.tickets, "tickets", 0, 1)
        _int(self.key, "key")
        _int(self.transit_ms, "transit_ms", 0, 2**40)
        _int(self.version, "version", 0, 2**16)
        _int(self.manager_pid, "manager_pid", 0, 2**31)
        _int(self.min_size, "min_size", 1, MAX_BUFFER)
        _int(self.max_size, "max_size", 1, MAX_BUFFER)
        _int(self.client_id, "client_id")
        for size, name in ((self.min_size, "min_size"), (self.max_size, "max_size")):
            if size & (size - 1):
                raise ValueError(f"{name}={size} is not a power of two")
        if self.min_size > self.max_size:
            raise ValueError("min_size above max_size")


@dataclass(frozen=True, slots=True)
class Grant(_Message):
    """Slots leased to the client, plus the segments it has not seen yet."""

    TYPE: ClassVar[int] = 65
    req: int
    slot_size: int
    slots: tuple[SlotRef, ...]
    segments: tuple[SegmentInfo, ...] = ()
    lent: int = 0  # 1: the one slot is lent to the client (an Attach), not leased

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.slot_size, "slot_size", 1, MAX_BUFFER)
        _int(self.lent, "lent", 0, 1)
        object.__setattr__(self, "slots", _slots(self.slots, "slots", 1))
        segs = self.segments
        if type(segs) not in (list, tuple) or len(segs) > MAX_FDS:
            raise ValueError(f"segments must be a list of at most {MAX_FDS}")
        object.__setattr__(
            self,
            "segments",
            tuple(SegmentInfo.from_wire(list(s) if type(s) is SegmentInfo else s) for s in segs),
        )

    def to_wire(self) -> list[Any]:
        return [
            self.TYPE,
            self.req,
            self.slot_size,
            [list(s) for s in self.slots],
            [list(s) for s in self.segments],
            *([1] if self.lent else []),
        ]


@dataclass(frozen=True, slots=True)
class Ok(_Message):
    """A request that returns nothing succeeded."""

    TYPE: ClassVar[int] = 66
    req: int

    def __post_init__(self) -> None:
        _int(self.req, "req")


@dataclass(frozen=True, slots=True)
class StatsReply(_Message):
    """The manager's statistics, a JSON-able dict (see ``Arena.stats``)."""

    TYPE: ClassVar[int] = 67
    req: int
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _int(self.req, "req")
        if type(self.stats) is not dict:
            raise TypeError("stats must be a map")
        _json_like(self.stats, "stats", 0)


@dataclass(frozen=True, slots=True)
class Error(_Message):
    """The request failed; ``code`` names an exception class in ``errors.CODES``."""

    TYPE: ClassVar[int] = 68
    req: int
    code: str
    message: str

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _text(self.code, "code")
        _text(self.message, "message")


@dataclass(frozen=True, slots=True)
class Recall(_Message):
    """Unasked (req 0): the manager is short of ``slot_size`` slots; return idle ones.

    ``slot_size`` 0: its memory budget is spent (or the client has sat idle
    past the manager's ``idle_release``): return the idle slots of every class.
    """

    TYPE: ClassVar[int] = 69
    req: int
    slot_size: int
    count: int

    def __post_init__(self) -> None:
        _int(self.req, "req")
        _int(self.slot_size, "slot_size", 0, MAX_BUFFER)
        _int(self.count, "count", 1, 2**32)


Message = (
    Hello
    | Acquire
    | Release
    | Return
    | Notices
    | Share
    | Attach
    | Stats
    | Usage
    | Leases
    | Welcome
    | Grant
    | Ok
    | StatsReply
    | Error
    | Recall
)

_TYPES: dict[int, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Acquire,
        Release,
        Return,
        Notices,
        Share,
        Attach,
        Stats,
        Usage,
        Leases,
        Welcome,
        Grant,
        Ok,
        StatsReply,
        Error,
        Recall,
    )
}
REQUESTS = (Hello, Acquire, Release, Return, Notices, Share, Attach, Stats, Usage, Leases)
#: Requests that get no reply when they succeed.
NO_REPLY = (Return, Notices, Share, Usage, Leases)
REPLIES = (Welcome, Grant, Ok, StatsReply, Error, Recall)

_pack = msgpack.Packer(use_bin_type=True).pack


def encode(message: Message) -> bytes:
    """Serialize one message to the bytes of one datagram."""
    return _pack(message.to_wire())  # type: ignore[no-any-return]


def encode_acquire(req: int, size: int, count: int, hits: int, wait: int = WAIT_DEFAULT) -> bytes:
    """``encode(Acquire(...))`` without building the object: the client's slow path.

    The caller guarantees valid fields (this process made them); what the
    manager decodes is checked there as always.
    """
    return _pack([Acquire.TYPE, req, size, count, hits, wait])  # type: ignore[no-any-return]


def encode_return(req: int, slots: list[SlotRef], hits: int) -> bytes:
    """``encode(Return(...))`` without building the object (see ``encode_acquire``)."""
    return _pack([Return.TYPE, req, slots, hits])  # type: ignore[no-any-return]


def encode_grant(
    req: int, slot_size: int, slots: list[SlotRef], segments: list[SegmentInfo], lent: bool = False
) -> bytes:
    """``encode(Grant(...))`` without building the object: the manager's hot reply.

    The arena made every field; the client checks what it decodes.
    """
    if lent:
        return _pack([Grant.TYPE, req, slot_size, slots, segments, 1])  # type: ignore[no-any-return]
    return _pack([Grant.TYPE, req, slot_size, slots, segments])  # type: ignore[no-any-return]


def encode_notices(req: int, flat: list[int]) -> bytes:
    """``encode(Notices(req, flat))`` without building the object (see ``encode_acquire``)."""
    return _pack([Notices.TYPE, req, flat])  # type: ignore[no-any-return]


def decode(data: bytes, *, max_size: int = MAX_REPLY) -> Message:
    """Parse one datagram into a message.

    Raises:
        ProtocolError: for any input that is not exactly one well-formed message
            (garbage, wrong types, out-of-range values, unknown type, too big).
    """
    if len(data) > max_size:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        items = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=max(MAX_BATCH, 4096),
            max_map_len=4096,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
    if type(items) is not list or len(items) < 2:
        raise ProtocolError("a message must be an array [type, req, ...]")
    cls = _TYPES.get(items[0]) if type(items[0]) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {items[0]!r}")
    try:
        return cls.from_wire(items[1:])  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {cls.__name__}: {exc}") from None
