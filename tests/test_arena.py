"""The manager's bookkeeping, driven with a fake allocator (no shared memory)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from shmpool.arena import PAGE, Arena
from shmpool.errors import PoolExhaustedError, StaleHandleError
from shmpool.protocol import (
    MAX_BATCH,
    MAX_FDS,
    NOTICE_CLAIMED,
    NOTICE_DETACHED,
    NOTICE_WORDS,
    SlotRef,
    StatsReply,
    claim_word,
    decode,
    encode,
    ticket_word,
    token_maker,
)
from shmpool.sizeclass import Classes

# Classes 16, 32, 64, 128, 256 bytes; with 64-byte segments the 16-byte class
# packs 4 slots per segment, the 32-byte class 2, the others 1.
MIN, MAX, SEGMENT_BYTES = 16, 256, 64
SIZES = [16, 32, 64, 128, 256]
PER_SEGMENT = {16: 4, 32: 2, 64: 1, 128: 1, 256: 1}


class FakeBacking:
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


class FakeAllocator:
    """``allocate(size)`` for the arena; records every backing it hands out."""

    def __init__(self) -> None:
        self.backings: list[FakeBacking] = []
        self.fail = False  # raise on every call while set
        self.fail_on: set[int] = set()  # raise on these call numbers (1-based)
        self.calls = 0
        self._fds = itertools.count(100)

    def __call__(self, size: int) -> FakeBacking:
        self.calls += 1
        if self.fail or self.calls in self.fail_on:
            raise PoolExhaustedError("/dev/shm is full (simulated)")
        backing = FakeBacking(next(self._fds), size)
        self.backings.append(backing)
        return backing

    @property
    def live(self) -> list[FakeBacking]:
        return [b for b in self.backings if b.closes == 0]

    def by_fd(self, fd: int) -> FakeBacking:
        (backing,) = [b for b in self.backings if b.fd == fd]
        return backing


def make_arena(
    memory: int = 1 << 20, conns: int = 2, segment_bytes: int = SEGMENT_BYTES
) -> tuple[Arena, FakeAllocator]:
    alloc = FakeAllocator()
    arena = Arena(Classes(MIN, MAX), memory, alloc, segment_bytes=segment_bytes)
    for conn in range(1, conns + 1):
        arena.add_conn(conn, pid=1000 + conn, name=f"w{conn}")
    return arena, alloc


def class_stats(arena: Arena, size: int) -> dict[str, int]:
    (entry,) = [c for c in arena.stats()["classes"] if c["size"] == size]
    return entry  # type: ignore[no-any-return]


def assert_books(arena: Arena, alloc: FakeAllocator) -> None:
    """The invariants that must hold after any sequence of calls."""
    stats = arena.stats()
    for c in stats["classes"]:
        assert c["total"] == c["free"] + c["leased"], c
        assert c["leased"] >= 0
    assert 0 <= stats["committed_bytes"] <= stats["memory_limit"]
    assert stats["committed_bytes"] <= stats["peak_committed_bytes"]
    assert stats["mapped_bytes"] == sum(b.size for b in alloc.live)
    for c in stats["classes"]:  # every slot out with a client is committed
        assert c["leased_bytes"] <= c["committed_bytes"] <= c["total"] * c["size"], c
    assert stats["committed_bytes"] == (
        sum(c["committed_bytes"] for c in stats["classes"]) + stats["oversize"]["bytes"]
    )
    assert all(b.closes <= 1 for b in alloc.backings)
    assert stats["oversize"]["leases"] >= 0


# ------------------------------------------------------------------ acquire


@pytest.mark.parametrize(
    ("size", "slot_size"),
    [(1, 16), (15, 16), (16, 16), (17, 32), (32, 32), (33, 64), (100, 128), (129, 256), (256, 256)],
)
def test_acquire_returns_a_slot_of_the_class_size(size: int, slot_size: int) -> None:
    arena, alloc = make_arena()
    grant = arena.acquire(1, size)
    assert grant.slot_size == slot_size
    assert len(grant.slots) == 1
    (seg,) = grant.segments
    assert seg.slot_size == slot_size
    assert seg.size == slot_size * PER_SEGMENT[slot_size]
    assert class_stats(arena, slot_size)["leased"] == 1
    assert_books(arena, alloc)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 9, MAX_FDS, MAX_BATCH])
def test_acquire_grants_the_batch_count(count: int) -> None:
    arena, alloc = make_arena()
    grant = arena.acquire(1, 16, count)
    assert len(grant.slots) == count
    assert len({(s.segment, s.index) for s in grant.slots}) == count
    assert arena.held_by(1) == count
    assert class_stats(arena, 16)["leased"] == count
    assert len(grant.segments) == -(-count // PER_SEGMENT[16])
    assert_books(arena, alloc)


@pytest.mark.parametrize("count", [0, -1, MAX_BATCH + 1])
def test_acquire_refuses_a_bad_count(count: int) -> None:
    arena, alloc = make_arena()
    before = arena.stats()
    with pytest.raises(ValueError):
        arena.acquire(1, 16, count)
    assert arena.stats() == before
    assert alloc.calls == 0


@pytest.mark.parametrize(("size", "exc"), [(0, ValueError), (-5, ValueError), (1.0, TypeError)])
def test_acquire_refuses_a_bad_size(size: Any, exc: type[Exception]) -> None:
    arena, alloc = make_arena()
    before = arena.stats()
    with pytest.raises(exc):
        arena.acquire(1, size)
    assert arena.stats() == before
    assert alloc.calls == 0


def test_a_new_segment_is_reported_once_per_connection() -> None:
    arena, alloc = make_arena()
    first = arena.acquire(1, 16)
    assert [s.segment for s in first.segments] == [first.slots[0].segment]
    assert first.fds == [alloc.backings[0].fd]
    second = arena.acquire(1, 16, 3)  # the rest of the same segment
    assert {s.segment for s in second.slots} == {first.slots[0].segment}
    assert second.segments == []
    assert second.fds == []
    other = arena.acquire(2, 16)  # a new segment for the same class
    assert len(other.segments) == 1
    assert other.fds == [alloc.backings[1].fd]


def test_another_connection_is_told_about_a_segment_it_has_not_seen() -> None:
    arena, _ = make_arena()
    grant = arena.acquire(1, 16)
    arena.release(1, grant.slots)
    reused = arena.acquire(2, 16)
    assert reused.slots[0].segment == grant.slots[0].segment
    assert [s.segment for s in reused.segments] == [grant.slots[0].segment]
    assert len(reused.fds) == 1


def test_fds_match_segments_one_for_one() -> None:
    arena, alloc = make_arena()
    grant = arena.acquire(1, 16, 11)
    assert len(grant.fds) == len(grant.segments) == 3
    for info, fd in zip(grant.segments, grant.fds, strict=True):
        backing = alloc.by_fd(fd)
        assert backing.size == info.size
    assert {s.segment for s in grant.slots} == {s.segment for s in grant.segments}


def test_a_grant_never_needs_more_than_max_fds_new_segments() -> None:
    # one slot per segment: a full batch would need MAX_BATCH descriptors
    arena, alloc = make_arena(segment_bytes=1)
    first = arena.acquire(1, 16, MAX_BATCH)
    assert len(first.segments) == len(first.fds) == MAX_FDS
    assert len(first.slots) == MAX_FDS
    second = arena.acquire(1, 16, MAX_BATCH)
    assert len(second.segments) <= MAX_FDS
    assert not {s.segment for s in first.segments} & {s.segment for s in second.segments}
    assert_books(arena, alloc)


def test_generation_bumps_on_every_transition() -> None:
    arena, _ = make_arena()
    (ref,) = arena.acquire(1, 16).slots
    arena.release(1, [ref])
    (again,) = arena.acquire(1, 16).slots
    assert (again.segment, again.index) == (ref.segment, ref.index)  # LIFO reuse
    assert again.generation > ref.generation
    arena.drop_conn(1)
    arena.add_conn(3, pid=3)
    (third,) = arena.acquire(3, 16).slots
    assert (third.segment, third.index) == (ref.segment, ref.index)
    assert third.generation > again.generation


def test_release_returns_the_count_and_frees_the_slots() -> None:
    arena, alloc = make_arena()
    grant = arena.acquire(1, 32, 5)
    assert arena.release(1, grant.slots[:2]) == 2
    assert arena.held_by(1) == 3
    assert class_stats(arena, 32) == {
        "size": 32,
        "segments": 3,
        "total": 6,
        "free": 3,
        "leased": 3,
        "in_transit": 0,
        "committed_bytes": 3 * 64,  # a segment of two 32-byte slots is one unit
        "leased_bytes": 3 * 32,
        "requested_bytes": 0,
    }
    assert arena.release(1, iter(grant.slots[2:])) == 3
    assert arena.held_by(1) == 0
    assert_books(arena, alloc)


def test_release_of_nothing_is_a_no_op() -> None:
    arena, _ = make_arena()
    arena.acquire(1, 16)
    before = arena.stats()
    assert arena.release(1, []) == 0
    assert arena.stats() == before


def test_freed_slots_are_reused_before_growing() -> None:
    arena, alloc = make_arena()
    grant = arena.acquire(1, 64, 3)
    assert alloc.calls == 3
    arena.release(1, grant.slots)
    arena.acquire(2, 64, 3)
    assert alloc.calls == 3


# ---------------------------------------------------------------- refusals


def _scenario(arena: Arena, name: str) -> list[SlotRef]:
    """A Release batch for conn 1 that must be refused."""
    mine = list(arena.acquire(1, 16, 3).slots)
    theirs = arena.acquire(2, 16).slots[0]
    one = mine[0]
    if name == "another conn's slot":
        return [theirs]
    if name == "another conn's slot among mine":
        return [*mine, theirs]
    if name == "stale generation":
        return [one._replace(generation=one.generation - 1)]
    if name == "future generation":
        return [one._replace(generation=one.generation + 1)]
    if name == "unknown segment":
        return [one._replace(segment=9999)]
    if name == "index past the segment":
        return [one._replace(index=PER_SEGMENT[16])]
    if name == "negative index":
        return [one._replace(index=-1)]
    if name == "duplicate in one batch":
        return [one, mine[1], one]
    if name == "one bad ref among good ones":
        return [mine[0], mine[1], mine[2]._replace(generation=0)]
    if name == "already released":
        arena.release(1, [one])
        return [mine[1], one]
    if name == "released and leased again":
        arena.release(1, [one])
        again = arena.acquire(1, 16).slots[0]
        assert (again.segment, again.index) == (one.segment, one.index)
        return [one]
    raise AssertionError(name)


REFUSALS = [
    "another conn's slot",
    "another conn's slot among mine",
    "stale generation",
    "future generation",
    "unknown segment",
    "index past the segment",
    "negative index",
    "duplicate in one batch",
    "one bad ref among good ones",
    "already released",
    "released and leased again",
]


@pytest.mark.parametrize("name", REFUSALS)
def test_release_refusals_raise_and_change_nothing(name: str) -> None:
    arena, alloc = make_arena()
    batch = _scenario(arena, name)
    before = arena.stats()
    held = (arena.held_by(1), arena.held_by(2))
    with pytest.raises(StaleHandleError):
        arena.release(1, batch)
    assert arena.stats() == before
    assert (arena.held_by(1), arena.held_by(2)) == held
    assert_books(arena, alloc)


def test_a_refused_batch_leaves_its_good_refs_releasable() -> None:
    arena, _ = make_arena()
    good = list(arena.acquire(1, 16, 3).slots)
    bad = good[0]._replace(generation=good[0].generation + 2)
    with pytest.raises(StaleHandleError):
        arena.release(1, [*good, bad])
    assert arena.release(1, good) == 3
    assert arena.held_by(1) == 0


def test_the_owner_can_still_release_after_a_foreign_attempt() -> None:
    arena, _ = make_arena()
    ref = arena.acquire(1, 16).slots[0]
    with pytest.raises(StaleHandleError):
        arena.release(2, [ref])
    assert arena.release(1, [ref]) == 1


# ---------------------------------------------------------- connections


def test_add_conn_refuses_taken_or_invalid_ids() -> None:
    arena, _ = make_arena(conns=1)
    for conn in (1, 0, -3):
        with pytest.raises(ValueError):
            arena.add_conn(conn, pid=1)


def test_drop_conn_returns_every_slot_to_the_free_lists() -> None:
    arena, alloc = make_arena(memory=1 << 16)
    arena.acquire(1, 16, 6)
    arena.acquire(1, 100, 2)
    arena.acquire(1, 1000)  # oversize
    keep = arena.acquire(2, 16, 2)
    arena.drop_conn(1)
    stats = arena.stats()
    assert [c["id"] for c in stats["clients"]] == [2]
    assert class_stats(arena, 16)["leased"] == 2
    assert class_stats(arena, 128) == {
        "size": 128,
        "segments": 2,
        "total": 2,
        "free": 2,
        "leased": 0,
        "in_transit": 0,
        "committed_bytes": 2 * 128,  # free slots keep their pages until idle or needed
        "leased_bytes": 0,
        "requested_bytes": 0,
    }
    assert stats["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
    assert arena.held_by(2) == 2
    assert arena.release(2, keep.slots) == 2
    assert_books(arena, alloc)


def test_drop_conn_returns_how_many_slots_it_reclaimed() -> None:
    arena, _ = make_arena()
    arena.acquire(1, 16, 3)
    assert arena.drop_conn(1) == 3


def test_drop_conn_of_an_unknown_conn_is_zero() -> None:
    arena, _ = make_arena()
    before = arena.stats()
    assert arena.drop_conn(42) == 0
    assert arena.stats() == before


def test_a_dropped_conn_cannot_release() -> None:
    arena, _ = make_arena()
    ref = arena.acquire(1, 16).slots[0]
    arena.drop_conn(1)
    with pytest.raises(KeyError):
        arena.release(1, [ref])
    arena.add_conn(1, pid=1)  # the id may come back, but holds nothing
    with pytest.raises(StaleHandleError):
        arena.release(1, [ref])


# ------------------------------------------------------------------ budget


def test_the_budget_is_never_exceeded_and_exhaustion_raises() -> None:
    arena, alloc = make_arena(memory=200)
    granted = []
    with pytest.raises(PoolExhaustedError):
        for _ in range(100):
            granted.extend(arena.acquire(1, 16).slots)
            assert arena.mapped <= 200
            assert_books(arena, alloc)
    assert len(granted) == 200 // 16
    assert arena.mapped == 192
    assert alloc.calls == 3  # no segment is tried when not one slot would fit
    assert sum(b.size for b in alloc.backings) == 192


def test_exhaustion_changes_nothing() -> None:
    arena, alloc = make_arena(memory=64)
    arena.acquire(1, 64)
    before = arena.stats()
    calls = alloc.calls
    for size in (1, 16, 64, 256, 1000):
        with pytest.raises(PoolExhaustedError):
            arena.acquire(2, size)
    assert arena.stats() == before
    assert alloc.calls == calls


def test_a_batch_gets_what_the_budget_allows() -> None:
    arena, alloc = make_arena(memory=100)
    grant = arena.acquire(1, 16, 10)
    assert len(grant.slots) == 100 // 16
    assert arena.mapped == 96
    with pytest.raises(PoolExhaustedError):
        arena.acquire(1, 16)
    assert_books(arena, alloc)


def test_a_partial_last_segment_fits_the_remaining_room() -> None:
    arena, alloc = make_arena(memory=64 + 32)
    arena.acquire(1, 16, 6)
    assert [b.size for b in alloc.backings] == [64, 32]
    assert class_stats(arena, 16)["total"] == 6


def test_released_memory_is_reusable_within_the_same_class() -> None:
    arena, alloc = make_arena(memory=64)
    grant = arena.acquire(1, 16, 4)
    with pytest.raises(PoolExhaustedError):
        arena.acquire(2, 16)
    arena.release(1, grant.slots[:1])
    assert len(arena.acquire(2, 16).slots) == 1
    assert alloc.calls == 1


def test_class_segments_are_kept_after_release_but_their_memory_moves() -> None:
    arena, alloc = make_arena(memory=64)
    arena.release(1, arena.acquire(1, 16, 4).slots)
    assert arena.mapped == 64
    assert alloc.live == alloc.backings
    assert arena.committed == 64  # free, but kept committed while nobody needs it
    grant = arena.acquire(1, 64)  # the budget is spent: the 16-byte class's pages go
    assert grant.slot_size == 64
    assert class_stats(arena, 16)["committed_bytes"] == 0
    assert class_stats(arena, 64)["committed_bytes"] == 64
    assert arena.committed == 64
    assert_books(arena, alloc)


# ---------------------------------------------------------------- oversize


@pytest.mark.parametrize(("size", "segment"), [(257, PAGE), (PAGE, PAGE), (PAGE + 1, 2 * PAGE)])
def test_oversize_gets_a_dedicated_page_rounded_segment(size: int, segment: int) -> None:
    arena, alloc = make_arena()
    grant = arena.acquire(1, size, 5)
    assert grant.slot_size == segment
    assert len(grant.slots) == 1
    assert grant.slots[0].index == 0
    (info,) = grant.segments
    assert (info.size, info.slot_size) == (segment, segment)
    assert grant.fds == [alloc.backings[0].fd]
    assert alloc.backings[0].size == segment
    stats = arena.stats()
    assert stats["oversize"] == {"leases": 1, "bytes": segment, "requested_bytes": 0}
    assert stats["mapped_bytes"] == segment
    assert all(c["total"] == 0 for c in stats["classes"])
    assert arena.held_by(1) == 1


def test_oversize_is_destroyed_on_release() -> None:
    arena, alloc = make_arena()
    small = arena.acquire(1, 16)
    big = arena.acquire(1, 5000)
    mapped = arena.mapped
    assert arena.release(1, big.slots) == 1
    (backing,) = [alloc.by_fd(fd) for fd in big.fds]
    assert backing.closes == 1
    assert arena.mapped == mapped - 2 * PAGE
    assert arena.stats()["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
    with pytest.raises(StaleHandleError):
        arena.release(1, big.slots)
    assert alloc.by_fd(small.fds[0]).closes == 0
    assert_books(arena, alloc)


def test_oversize_is_destroyed_on_drop_conn() -> None:
    arena, alloc = make_arena()
    big = [arena.acquire(1, 1000), arena.acquire(1, 3 * PAGE)]
    other = arena.acquire(2, 1000)
    assert arena.stats()["oversize"] == {"leases": 3, "bytes": 5 * PAGE, "requested_bytes": 0}
    arena.drop_conn(1)
    assert [alloc.by_fd(g.fds[0]).closes for g in big] == [1, 1]
    assert alloc.by_fd(other.fds[0]).closes == 0
    assert arena.stats()["oversize"] == {"leases": 1, "bytes": PAGE, "requested_bytes": 0}
    assert arena.mapped == PAGE
    assert_books(arena, alloc)


def test_oversize_memory_goes_back_to_the_budget() -> None:
    arena, alloc = make_arena(memory=PAGE)
    first = arena.acquire(1, 1000)
    with pytest.raises(PoolExhaustedError):
        arena.acquire(2, 1000)
    arena.release(1, first.slots)
    second = arena.acquire(2, 1000)
    assert second.slots[0].segment != first.slots[0].segment
    assert arena.mapped == PAGE
    assert_books(arena, alloc)


def test_oversize_over_budget_never_calls_the_allocator() -> None:
    arena, alloc = make_arena(memory=PAGE)
    before = arena.stats()
    with pytest.raises(PoolExhaustedError):
        arena.acquire(1, PAGE + 1)
    assert alloc.calls == 0
    assert arena.stats() == before


def test_oversize_of_another_conn_is_refused() -> None:
    arena, alloc = make_arena()
    big = arena.acquire(1, 1000)
    with pytest.raises(StaleHandleError):
        arena.release(2, big.slots)
    assert alloc.backings[0].closes == 0
    assert arena.stats()["oversize"]["leases"] == 1


# -------------------------------------------------------- allocator failures


@pytest.mark.parametrize("size", [16, 100, 256, 1000])
def test_allocator_failure_leaves_the_books_unchanged(size: int) -> None:
    arena, alloc = make_arena()
    arena.acquire(1, 32)
    before = arena.stats()
    alloc.fail = True
    with pytest.raises(PoolExhaustedError):
        arena.acquire(2, size)
    assert arena.stats() == before
    assert arena.held_by(2) == 0
    assert_books(arena, alloc)
    alloc.fail = False
    grant = arena.acquire(2, size)
    assert len(grant.segments) == 1
    assert_books(arena, alloc)


def test_allocator_failure_with_free_slots_left_serves_them() -> None:
    arena, alloc = make_arena()
    arena.acquire(1, 16)
    alloc.fail = True
    assert len(arena.acquire(1, 16, 3).slots) == 3  # no allocation needed
    with pytest.raises(PoolExhaustedError):
        arena.acquire(1, 16)
    assert_books(arena, alloc)


def test_allocator_failure_mid_batch_grants_what_is_there() -> None:
    arena, alloc = make_arena()
    alloc.fail_on = {2}  # the first segment is made, the second fails
    grant = arena.acquire(1, 16, 8)
    assert len(grant.slots) == PER_SEGMENT[16]


def test_allocator_failure_mid_batch_keeps_the_books_consistent() -> None:
    arena, alloc = make_arena()
    alloc.fail_on = {2}
    try:
        arena.acquire(1, 16, 8)
    except PoolExhaustedError:
        assert arena.held_by(1) == 0
        assert class_stats(arena, 16)["leased"] == 0
    assert_books(arena, alloc)


# ------------------------------------------------------------------ stats


def test_stats_shape() -> None:
    arena, _ = make_arena(memory=12345)
    arena.acquire(1, 20, 2)
    stats = arena.stats()
    assert {"classes", "oversize", "mapped_bytes", "memory_limit", "clients"} <= stats.keys()
    assert [c["size"] for c in stats["classes"]] == SIZES
    for c in stats["classes"]:
        assert {"size", "segments", "total", "free", "leased"} <= c.keys()
    assert stats["classes"][1] == {
        "size": 32,
        "segments": 1,
        "total": 2,
        "free": 0,
        "leased": 2,
        "in_transit": 0,
        "committed_bytes": 64,
        "leased_bytes": 64,
        "requested_bytes": 0,
    }
    assert stats["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
    assert stats["committed_bytes"] == stats["peak_committed_bytes"] == 64
    assert stats["request_sizes"] == []
    assert stats["mapped_bytes"] == 64
    assert stats["memory_limit"] == 12345
    clients = {c["id"]: c for c in stats["clients"]}
    assert clients[1]["pid"] == 1001
    assert clients[1]["leased"] == 2
    assert clients[2]["pid"] == 1002
    assert clients[2]["leased"] == 0


def test_stats_are_json_and_wire_safe() -> None:
    arena, _ = make_arena()
    arena.acquire(1, 16, 3)
    arena.acquire(2, 1000)
    stats = arena.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert decode(encode(StatsReply(1, stats))) == StatsReply(1, stats)


def test_close_releases_every_backing() -> None:
    arena, alloc = make_arena()
    arena.acquire(1, 16, 5)
    arena.acquire(2, 1000)
    arena.close()
    assert alloc.backings
    assert all(b.closes == 1 for b in alloc.backings)


# --------------------------------------------------------------- random walk


class Model:
    """What the clients believe they hold, built only from grants."""

    def __init__(self, arena: Arena, alloc: FakeAllocator) -> None:
        self.arena = arena
        self.alloc = alloc
        self.held: dict[int, dict[tuple[int, int], SlotRef]] = {}
        self.known: dict[int, set[int]] = {}
        self.slot_size: dict[int, int] = {}  # segment id -> slot size
        self.oversize: set[int] = set()  # oversize segment ids

    def add(self, conn: int) -> None:
        self.arena.add_conn(conn, pid=conn)
        self.held[conn] = {}
        self.known[conn] = set()

    def acquire(self, conn: int, size: int, count: int) -> None:
        grant = self.arena.acquire(conn, size, count)
        assert 1 <= len(grant.slots) <= count
        assert len(grant.fds) == len(grant.segments)
        for info, fd in zip(grant.segments, grant.fds, strict=True):
            assert info.segment not in self.known[conn], "segment reported twice"
            backing = self.alloc.by_fd(fd)
            assert backing.closes == 0
            assert backing.size == info.size
            self.known[conn].add(info.segment)
            self.slot_size[info.segment] = info.slot_size
            if self.arena.classes.index_of(size) is None:
                self.oversize.add(info.segment)
        for ref in grant.slots:
            key = (ref.segment, ref.index)
            assert ref.segment in self.known[conn]
            assert self.slot_size[ref.segment] == grant.slot_size
            for other in self.held.values():
                assert key not in other, f"slot {key} leased twice"
            self.held[conn][key] = ref

    def release(self, conn: int, refs: list[SlotRef]) -> None:
        assert self.arena.release(conn, refs) == len(refs)
        for ref in refs:
            del self.held[conn][(ref.segment, ref.index)]

    def drop(self, conn: int) -> None:
        self.arena.drop_conn(conn)
        del self.held[conn]
        del self.known[conn]

    def check(self) -> None:
        assert_books(self.arena, self.alloc)
        stats = self.arena.stats()
        leased = dict.fromkeys(SIZES, 0)
        oversize = 0
        for conn, slots in self.held.items():
            assert self.arena.held_by(conn) == len(slots)
            for seg, _ in slots:
                if seg in self.oversize:
                    oversize += 1
                else:
                    leased[self.slot_size[seg]] += 1
        assert {c["size"]: c["leased"] for c in stats["classes"]} == leased
        assert stats["oversize"]["leases"] == oversize
        assert {c["id"]: c["leased"] for c in stats["clients"]} == {
            conn: len(slots) for conn, slots in self.held.items()
        }


def without_memory(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without what moves when free slots give their pages back."""
    stats = dict(stats, classes=[dict(c) for c in stats["classes"]])
    del stats["committed_bytes"]
    for c in stats["classes"]:
        del c["committed_bytes"]
    return stats


def _step(rng: random.Random, model: Model, next_conn: Callable[[], int]) -> None:
    arena, alloc = model.arena, model.alloc
    conn = rng.choice(sorted(model.held))
    roll = rng.random()
    if roll < 0.45:
        size = rng.choice([1, 16, 17, 32, 50, 64, 100, 128, 200, 256, 257, 3000, 5000])
        count = rng.choice([1, 1, 2, 3, 5, 8, 16])
        alloc.fail = rng.random() < 0.05  # /dev/shm full for this one call
        before = arena.stats()
        try:
            model.acquire(conn, size, count)
        except PoolExhaustedError:
            # nothing changed but that free slots may have given their pages back
            after = arena.stats()
            assert after["committed_bytes"] <= before["committed_bytes"]
            assert without_memory(after) == without_memory(before)
        finally:
            alloc.fail = False
    elif roll < 0.75 and model.held[conn]:
        refs = list(model.held[conn].values())
        model.release(conn, rng.sample(refs, rng.randrange(1, len(refs) + 1)))
    elif roll < 0.85:
        before = arena.stats()
        batch = _bad_batch(rng, model, conn)
        with pytest.raises(StaleHandleError):
            arena.release(conn, batch)
        assert arena.stats() == before
    elif roll < 0.93:
        model.drop(conn)
        model.add(next_conn())
    else:
        model.add(next_conn())


def _bad_batch(rng: random.Random, model: Model, conn: int) -> list[SlotRef]:
    """Some of ``conn``'s good refs plus exactly one that must be refused."""
    mine = list(model.held[conn].values())
    good = rng.sample(mine, min(len(mine), rng.randrange(0, 4)))
    others = [r for c, held in model.held.items() if c != conn for r in held.values()]
    kinds = ["unknown segment"]
    kinds += ["foreign"] if others else []
    kinds += ["generation", "index"] if mine else []
    kinds += ["duplicate"] if good else []
    kind = rng.choice(kinds)
    if kind == "unknown segment":
        bad = SlotRef(10**9, 0, 1)
    elif kind == "foreign":
        bad = rng.choice(others)
    elif kind == "generation":
        ref = rng.choice(mine)
        bad = ref._replace(generation=ref.generation + rng.choice([-1, 1, 2]))
    elif kind == "index":
        bad = rng.choice(mine)._replace(index=10**6)
    else:
        bad = rng.choice(good)
    batch = [*good, bad]
    rng.shuffle(batch)
    return batch


@pytest.mark.parametrize("seed", range(8))
def test_random_walk_keeps_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    alloc = FakeAllocator()
    arena = Arena(Classes(MIN, MAX), 3 * PAGE + 700, alloc, segment_bytes=SEGMENT_BYTES)
    model = Model(arena, alloc)
    ids = itertools.count(1)
    for _ in range(3):
        model.add(next(ids))
    model.check()
    for _ in range(600):
        _step(rng, model, lambda: next(ids))
        model.check()
    for conn in list(model.held):
        model.drop(conn)
    model.check()
    stats = arena.stats()
    assert all(c["leased"] == 0 for c in stats["classes"])
    assert stats["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}


# ------------------------------------------------------------------ transit


def test_a_handle_may_run_ahead_of_the_books_by_several_handoffs() -> None:
    """A to B to C by ticket words: C's notice can come before B's Claimed and Detach.

    The manager must wait for those (they are on another socket), not call
    C's notice bogus; a slot that is free, or a handle from the past, is never
    awaited.
    """
    arena, _ = make_arena(conns=3)
    (ref,) = arena.acquire(1, 16).slots
    ahead = SlotRef(ref.segment, ref.index, ref.generation + 2)  # after A's and B's Detach
    assert arena.awaits_detach(SlotRef(ref.segment, ref.index, ref.generation + 1))
    assert arena.awaits_detach(ahead)  # leased to A, two Detaches behind
    moved = arena.detach(1, ref, token=7, deadline=1e9)
    assert arena.awaits_detach(ahead)  # in transit; B's Claimed and Detach still unread
    assert not arena.awaits_detach(moved)  # matches now: nothing to wait for
    assert not arena.awaits_detach(ref)  # the past never comes back
    (held,) = arena.attach(2, moved, token=7).slots
    arena.release(2, [held])
    assert not arena.awaits_detach(SlotRef(ref.segment, ref.index, held.generation + 5))  # free
    assert not arena.awaits_detach(SlotRef(ref.segment + 99, ref.index, 1))


# ------------------------------------------------------------------ notices in a batch


class _WordBacking(FakeBacking):
    def __init__(self, fd: int, size: int, header: int) -> None:
        super().__init__(fd, size)
        self.tickets = [0] * (header // 8)


class _Words:
    """``TicketOps`` on a list of ints, one per ticket word."""

    def cas64(self, buf: list[int], offset: int, expected: int, new: int) -> bool:
        if buf[offset // 8] != expected:
            return False
        buf[offset // 8] = new
        return True

    def load64(self, buf: list[int], offset: int) -> int:
        return buf[offset // 8]

    def store64(self, buf: list[int], offset: int, value: int) -> None:
        buf[offset // 8] = value


def _word_arena(conns: int) -> Arena:
    fds = itertools.count(100)
    arena = Arena(
        Classes(MIN, MAX),
        1 << 20,
        lambda size, header=0: _WordBacking(next(fds), size, header),
        segment_bytes=SEGMENT_BYTES,
        tickets=_Words(),
    )
    for conn in range(1, conns + 1):
        arena.add_conn(conn, pid=1000 + conn, key=conn * 7919)
    return arena


def _one_by_one(arena: Arena, conn: int, flat: tuple[int, ...], deadline: float) -> int:
    """The reference: each notice through ``detach`` or ``claim``, as before batching."""
    for i in range(0, len(flat), NOTICE_WORDS):
        kind, segment, index, generation, token = flat[i : i + NOTICE_WORDS]
        ref = SlotRef(segment, index, generation)
        if kind == NOTICE_DETACHED:
            arena.detach(conn, ref, token, deadline)
            continue
        try:
            arena.claim(conn, ref, token, deadline)
        except StaleHandleError:
            return i
    return len(flat)


def _books(arena: Arena) -> Any:
    segs = {
        sid: (list(s.holders), list(s.generations), list(s.backing.tickets))  # type: ignore[attr-defined]
        for sid, s in arena._segments.items()
    }
    conns = {cid: (set(c.held), set(c.known), dict(c.handed)) for cid, c in arena._conns.items()}
    return segs, conns, dict(arena._transit), arena.stats()["classes"]


@pytest.mark.parametrize("seed", range(6))
def test_notices_in_a_batch_move_the_books_as_one_by_one(seed: int) -> None:
    """``apply_notices`` (with its few-step common case) against ``detach``/``claim``.

    Three clients hand slots around by ticket words, queueing notices and
    sending them at random moments, in both orders (a claim may come before
    its sender's notice). Both arenas must end every step with the same
    books, the same ticket words and the same answer.
    """
    rng = random.Random(seed)
    fast, slow = _word_arena(3), _word_arena(3)
    tokens = {conn: token_maker(conn * 7919) for conn in (1, 2, 3)}
    held: dict[int, list[SlotRef]] = {1: [], 2: [], 3: []}  # what each client holds
    queued: dict[int, list[int]] = {1: [], 2: [], 3: []}  # each client's unsent notices
    waiting: dict[int, list[int]] = {1: [], 2: [], 3: []}  # notices the manager holds back
    handles: list[tuple[SlotRef, int]] = []  # (ref of the next generation, token) in flight

    def word(arena: Arena, ref: SlotRef) -> list[int]:
        return arena._segments[ref.segment].backing.tickets  # type: ignore[attr-defined, no-any-return]

    def send(conn: int) -> None:
        flat = (*waiting[conn], *queued[conn])
        queued[conn] = []
        if not flat:
            return
        a = fast.apply_notices(conn, flat, 1e9)
        b = _one_by_one(slow, conn, flat, 1e9)
        assert a == b
        waiting[conn] = list(flat[a:])
        if a < len(flat):
            _, segment, index, generation, _ = flat[a : a + NOTICE_WORDS]
            assert fast.awaits_detach(SlotRef(segment, index, generation))

    for _ in range(300):
        conn = rng.randint(1, 3)
        step = rng.random()
        if step < 0.25:
            size, count = rng.choice(SIZES), rng.randint(1, 3)
            grants = [a.acquire(conn, size, count) for a in (fast, slow)]
            assert grants[0].slots == grants[1].slots
            held[conn] += grants[0].slots
        elif step < 0.5 and held[conn]:
            ref = held[conn].pop(rng.randrange(len(held[conn])))
            token = tokens[conn](ref.segment, ref.index, ref.generation + 1)
            for a in (fast, slow):  # the word holds 0, or our claim not cleared yet
                words = word(a, ref)
                assert words[ref.index] in (0, claim_word(conn, ref.generation))
                words[ref.index] = ticket_word(token, ref.generation + 1)
            queued[conn] += [NOTICE_DETACHED, *ref, token]
            handles.append((SlotRef(ref.segment, ref.index, ref.generation + 1), token))
        elif step < 0.7 and handles:
            ref, token = handles.pop(rng.randrange(len(handles)))
            for a in (fast, slow):
                assert word(a, ref)[ref.index] == ticket_word(token, ref.generation)
                word(a, ref)[ref.index] = claim_word(conn, ref.generation)
            queued[conn] += [NOTICE_CLAIMED, *ref, token]
            held[conn].append(ref)
        elif step < 0.9:
            send(conn)
        elif held[conn] and not waiting[conn]:
            send(conn)  # a client sends its notices before anything else
            if not waiting[conn]:
                refs = [r for r in held[conn] if rng.random() < 0.5]
                ok = [a.release(conn, refs) for a in (fast, slow)]
                assert ok[0] == ok[1] == len(refs)
                held[conn] = [r for r in held[conn] if r not in refs]
        assert _books(fast) == _books(slow)
    for conn in (1, 2, 3, 1, 2, 3):
        send(conn)
    assert _books(fast) == _books(slow)
    assert not any(waiting.values())
