"""Helpers for tests of the arena's books: backings with ticket words, and a books checker.

``word_arena`` builds a pure ``Arena`` whose segments start with real ticket
words (a bytearray each), driven either by the C extension's atomics or by
``PyWords``, a pure-Python twin without ``find_words`` (the arena's fallback
scan). ``check_books`` asserts every invariant of the books at once.
"""

from __future__ import annotations

import itertools
from typing import Any

from shmpool.arena import ORPHAN, SHARED, TRANSIT, Arena
from shmpool.errors import PoolExhaustedError
from shmpool.protocol import MAX_ID
from shmpool.sizeclass import Classes

try:
    from shmpool import _speedups
except ImportError:  # pragma: no cover - the C extension is built in-tree
    _speedups = None  # type: ignore[assignment]

# Classes 16, 32, 64, 128, 256 bytes; 64-byte segments pack 4, 2, 1, 1, 1 slots.
MIN, MAX, SEGMENT_BYTES = 16, 256, 64
SIZES = [16, 32, 64, 128, 256]


class WordBacking:
    """A segment's memory as the arena sees it: an fd, and its ticket words."""

    def __init__(self, fd: int, size: int, header: int = 0) -> None:
        self.fd = fd
        self.size = size
        self.tickets = bytearray(header)
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class PyWords:
    """``TicketOps`` on a bytearray, in Python, without ``find_words``."""

    def cas64(self, buf: bytearray, offset: int, expected: int, new: int) -> bool:
        if int.from_bytes(buf[offset : offset + 8], "little") != expected:
            return False
        buf[offset : offset + 8] = new.to_bytes(8, "little")
        return True

    def load64(self, buf: bytearray, offset: int) -> int:
        return int.from_bytes(buf[offset : offset + 8], "little")

    def store64(self, buf: bytearray, offset: int, value: int) -> None:
        buf[offset : offset + 8] = value.to_bytes(8, "little")


def ticket_ops(kind: str) -> Any:
    """``"c"``: the C extension's atomics (with ``find_words``); ``"py"``: ``PyWords``."""
    return _speedups if kind == "c" else PyWords()


class Backings:
    """``allocate(size[, header])`` for the arena; keeps every backing it made."""

    def __init__(self) -> None:
        self.made: list[WordBacking] = []
        self._fds = itertools.count(100)

    def __call__(self, size: int, header: int = 0) -> WordBacking:
        backing = WordBacking(next(self._fds), size, header)
        self.made.append(backing)
        return backing

    @property
    def live(self) -> list[WordBacking]:
        return [b for b in self.made if not b.closes]


def word_arena(memory: int = 1 << 20, ops: Any = None) -> tuple[Arena, Backings]:
    """An arena of classes 16..256 bytes; with ``ops``, every segment has ticket words."""
    backings = Backings()
    arena = Arena(Classes(MIN, MAX), memory, backings, segment_bytes=SEGMENT_BYTES, tickets=ops)
    return arena, backings


def load_word(arena: Arena, segment: int, index: int) -> int:
    seg = arena._segments[segment]
    assert arena._tickets is not None
    return arena._tickets.load64(seg.backing.tickets, 8 * index)


def check_books(arena: Arena, backings: Backings | None = None) -> dict[str, Any]:
    """Assert every invariant of the books; returns the stats it read.

    Each slot is exactly one of: free (once in its class's free list), held
    by one live connection (in its ``held``), in transit, shared, or an
    orphan; the class counters and the stats agree with that; generations
    stay in the protocol's range; committed memory stays within the budget
    and covers every slot that is not free.
    """
    stats = arena.stats()  # first: it may settle orphans
    for cls in stats["classes"]:
        assert cls["total"] == cls["free"] + cls["leased"] + cls["in_transit"], cls
        assert min(cls["free"], cls["leased"], cls["in_transit"]) >= 0, cls
    check_memory(arena, stats)
    conns = arena._conns
    owners: dict[tuple[int, int], int] = {}
    for c in conns.values():
        for key in c.held:
            assert key not in owners, f"slot {key} held by {owners[key]} and {c.id}"
            owners[key] = c.id
    for cls in arena._classes:
        free = [(seg.id, index) for seg, index in cls.free]
        assert len(set(free)) == len(free), f"a slot is free twice: {free}"
        free_set = set(free)
        counts = {"free": 0, "leased": 0, "transit": 0, "total": 0}
        for seg in cls.segments:
            assert arena._segments.get(seg.id) is seg
            counts["total"] += seg.nslots
            for index, holder in enumerate(seg.holders):
                key = (seg.id, index)
                _check_slot(arena, key, holder, key in free_set, owners)
                counts["free"] += holder == 0
                counts["leased"] += holder > 0 or holder == SHARED
                counts["transit"] += holder in (TRANSIT, ORPHAN)
        assert counts["free"] == len(cls.free)
        assert (cls.total, cls.leased, cls.in_transit) == (
            counts["total"],
            counts["leased"],
            counts["transit"],
        ), cls
    oversize = [seg for seg in arena._segments.values() if seg.cls is None]
    for seg in oversize:
        assert seg.holders[0] != 0, "a free oversize segment was kept"
        _check_slot(arena, (seg.id, 0), seg.holders[0], False, owners)
    assert stats["oversize"]["leases"] == len(oversize)
    for key in owners:
        assert key[0] in arena._segments, f"a held slot {key} of a destroyed segment"
    for keys, mark in (
        (arena._transit, TRANSIT),
        (arena._orphans, ORPHAN),
        (arena._shares, SHARED),
    ):
        for seg_id, index in keys:
            assert arena._segments[seg_id].holders[index] == mark
    if backings is not None:
        assert len(backings.live) == len(arena._segments)
    return stats


def _check_slot(
    arena: Arena, key: tuple[int, int], holder: int, free: bool, owners: dict[tuple[int, int], int]
) -> None:
    seg = arena._segments[key[0]]
    assert 0 <= seg.generations[key[1]] <= MAX_ID, (key, seg.generations[key[1]])
    assert (holder == 0) == free, f"slot {key}: holder {holder}, free {free}"
    if holder > 0:
        assert holder in arena._conns, f"slot {key} held by a connection that is gone"
        assert owners.get(key) == holder, f"slot {key}: holder {holder}, held by {owners.get(key)}"
    else:
        assert key not in owners, f"slot {key} is {holder} and held by {owners[key]}"
        assert holder in (0, TRANSIT, SHARED, ORPHAN), holder
    assert (holder == TRANSIT) == (key in arena._transit)
    assert (holder == ORPHAN) == (key in arena._orphans)
    assert (holder == SHARED) == (key in arena._shares)


def check_memory(arena: Arena, stats: dict[str, Any]) -> None:
    """The books of committed memory.

    Within the budget; per class, the sum of its committed units; and every
    slot that is not free (leased, cached, lent, in transit, shared, an
    orphan's) lies in a committed unit: only free slots ever lose their pages.
    """
    assert 0 <= stats["committed_bytes"] <= stats["memory_limit"]
    assert stats["committed_bytes"] <= stats["peak_committed_bytes"]
    total = 0
    for cls in arena._classes:
        committed = 0
        for seg in cls.segments:
            for unit, on in enumerate(seg.units):
                if on:
                    committed += arena._unit_span(seg, unit)[1]
            for index, holder in enumerate(seg.holders):
                if holder:
                    assert seg.units[index >> seg.unit_shift], (
                        f"slot {seg.id}:{index} is out (holder {holder}) but not committed"
                    )
        assert committed == cls.committed, (cls.slot_size, committed, cls.committed)
        total += committed
    for seg in arena._segments.values():
        if seg.cls is None:
            assert seg.units[0]
            total += seg.size - seg.header
    assert total == arena.committed == stats["committed_bytes"]


# ------------------------------------------------------------- backed pages


class PagedBacking(WordBacking):
    """A ``WordBacking`` that knows which of its bytes are backed, as tmpfs does.

    ``commit`` backs bytes (``posix_fallocate``: free if backed already),
    ``decommit`` frees them (``MADV_REMOVE``); the ticket words are backed at
    birth, as ``ShmSegment`` backs them. ``data`` stands in for the memory:
    bytes written while backed, zeros once freed (a freed page reads back 0).
    """

    def __init__(self, owner: PagedBackings, fd: int, size: int, header: int = 0) -> None:
        super().__init__(fd, size, header)
        self._owner = owner
        self.backed = bytearray(size)  # 1 per backed byte
        self.nbacked = 0
        self.data = bytearray(size)
        self.commits: list[tuple[int, int]] = []
        self.decommits: list[tuple[int, int]] = []
        if header:
            self.commit(0, header)

    def _check_span(self, offset: int, length: int) -> None:
        assert length > 0 and offset >= 0 and offset + length <= self.size, (offset, length)
        page = self._owner.page
        assert offset % page == 0, f"offset {offset} is not page-aligned"
        assert length % page == 0 or offset + length == self.size, f"length {length}"

    def commit(self, offset: int, length: int) -> None:
        self._check_span(offset, length)
        assert not self.closes, "commit on a closed segment"
        new = length - sum(self.backed[offset : offset + length])
        owner = self._owner
        if owner.capacity is not None and owner.used() + new > owner.capacity:
            raise PoolExhaustedError(
                f"cannot commit {length} bytes of shared memory (No space left on device): "
                "/dev/shm is full (simulated)"
            )
        self.backed[offset : offset + length] = b"\x01" * length
        self.nbacked += new
        self.commits.append((offset, length))

    def decommit(self, offset: int, length: int) -> None:
        self._check_span(offset, length)
        assert not self.closes, "decommit on a closed segment"
        self.nbacked -= sum(self.backed[offset : offset + length])
        self.backed[offset : offset + length] = bytes(length)
        self.data[offset : offset + length] = bytes(length)
        self.decommits.append((offset, length))

    def write(self, offset: int, payload: bytes) -> None:
        """A holder writes its slot (backed bytes only: the real one would SIGBUS)."""
        end = offset + len(payload)
        assert all(self.backed[offset:end]), f"write to unbacked bytes {offset}..{end}"
        self.data[offset:end] = payload

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def close(self) -> None:
        super().close()
        self.backed = bytearray(self.size)
        self.nbacked = 0


class PagedBackings(Backings):
    """``allocate(size[, header])`` making ``PagedBacking``s, in a ``/dev/shm`` of ``capacity``.

    ``page``: commits and decommits must be aligned to it (the arena's
    ``PAGE`` for segments of real slot sizes; 1 for the tiny classes of
    ``word_arena``, whose units are not whole pages). ``capacity`` (None:
    no limit) is how many bytes all live backings may have backed together;
    a commit past it raises ``PoolExhaustedError`` as a full ``/dev/shm`` does.
    """

    def __init__(self, page: int = 1, capacity: int | None = None) -> None:
        super().__init__()
        self.page = page
        self.capacity = capacity
        self.made: list[PagedBacking] = []  # type: ignore[assignment]

    def __call__(self, size: int, header: int = 0) -> PagedBacking:
        backing = PagedBacking(self, next(self._fds), size, header)
        self.made.append(backing)
        return backing

    @property
    def live(self) -> list[PagedBacking]:  # type: ignore[override]
        return [b for b in self.made if not b.closes]

    def used(self) -> int:
        """Bytes backed in all live backings (what ``/dev/shm`` would count)."""
        return sum(b.nbacked for b in self.live)


def paged_arena(
    classes: Classes,
    memory: int,
    *,
    segment_bytes: int,
    ops: Any = None,
    page: int = 1,
    capacity: int | None = None,
) -> tuple[Arena, PagedBackings]:
    """An arena whose backings know their backed bytes (``check_pages`` reads them)."""
    backings = PagedBackings(page, capacity)
    arena = Arena(classes, memory, backings, segment_bytes=segment_bytes, tickets=ops)
    return arena, backings


def check_pages(arena: Arena, backings: PagedBackings) -> int:
    """The books of committed memory against the bytes really backed; returns those bytes.

    Every segment's backing has exactly the bytes of its committed units
    (and its ticket words) backed, so every slot that is not free is backed
    whole; the bytes backed in all add up to ``committed + ticket_bytes``.
    """
    live = {id(b) for b in backings.live}
    for seg in arena._segments.values():
        backing = seg.backing
        assert isinstance(backing, PagedBacking) and id(backing) in live
        assert all(backing.backed[: seg.header]), f"segment {seg.id}: ticket words not backed"
        for unit, on in enumerate(seg.units):
            offset, length = arena._unit_span(seg, unit)
            span = backing.backed[offset : offset + length]
            assert sum(span) == (length if on else 0), (
                f"segment {seg.id} unit {unit}: books say {'committed' if on else 'free'}, "
                f"{sum(span)} of {length} bytes backed"
            )
        for index, holder in enumerate(seg.holders):
            if holder:
                offset = seg.header + index * seg.slot_size
                assert all(backing.backed[offset : offset + seg.slot_size]), (
                    f"slot {seg.id}:{index} is out (holder {holder}) but its pages are gone"
                )
    used = backings.used()
    assert used == sum(sum(b.backed) for b in backings.live)
    assert used == arena.committed + arena.ticket_bytes, (used, arena.committed)
    return used
