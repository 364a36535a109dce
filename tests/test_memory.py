"""Issue 11, memory that moves: the budget counts pages backed, and the pages go where needed.

Two tiers. The arena's books, with backings that know which of their bytes
are backed (``arena_books.PagedBacking``): a segment is made with nothing
committed and a slot is committed as it is granted, a page at a time for
slots smaller than a page; ``release_idle`` frees a unit on the third pass
after its last slot was freed, never earlier; a spent budget takes the
oldest free slots of the classes with the most idle bytes, and never a slot
that is out; a failed acquire changes nothing but committed memory.

Then real managers, processes and ``/dev/shm``: a budget spent by one class
serves another (and oversize requests) after a release; a cache that holds
the budget is recalled for another process; idle pages go back within about
1.5 times ``idle_release`` (measured on the manager's own descriptors in
``/proc``), never with ``idle_release=0``; a quiet client is asked for its
cache; no page of a slot that is leased, cached, lent, in transit, shared or
orphaned is ever freed, which every holder checks byte for byte after
release passes and budget pressure; and a full ``/dev/shm`` (a small tmpfs
in a private mount namespace) gives ``PoolExhaustedError``, never SIGBUS.

``requested_bytes`` is checked in the arena (``note_usage``) and, for real
clients, only right after ``pool.stats()``, which sends the pool's usage
first: elsewhere it may lag by a report.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.connection
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from arena_books import (
    PagedBacking,
    PagedBackings,
    check_books,
    check_pages,
    paged_arena,
    ticket_ops,
)
from conftest import MP_TIMEOUT, SHM_DIR, SHM_PREFIX, all_returned, assert_balanced, wait_for
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, rule
from test_arena_model import MEMORY as MODEL_MEMORY
from test_arena_model import ArenaWithTicketsModel

import shmpool
from shmpool.arena import PAGE, Arena
from shmpool.errors import PoolExhaustedError
from shmpool.protocol import SlotRef
from shmpool.sizeclass import Classes

pytestmark = pytest.mark.timeout(120)

KiB, MiB = 1 << 10, 1 << 20
ROOT = Path(__file__).resolve().parent.parent
Connection = multiprocessing.connection.Connection


# ------------------------------------------------------------------ helpers


def backed_bytes(pid: int) -> int:
    """Bytes backed in the segments process ``pid`` holds open, each segment once.

    Segments are unlinked at birth, so they are found by the descriptors in
    ``/proc/<pid>/fd`` that point at ``/dev/shm/shmpool.* (deleted)``; one
    segment may sit behind several descriptors (``mmap`` keeps a dup).
    """
    fd_dir = f"/proc/{pid}/fd"
    blocks: dict[tuple[int, int], int] = {}
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
            if not target.startswith(f"{SHM_DIR}/{SHM_PREFIX}"):
                continue
            st = os.stat(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed while we looked
        assert target.endswith(" (deleted)"), f"segment {target} still has a name"
        blocks[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(blocks.values())


def assert_memory_books(stats: dict[str, Any]) -> None:
    """The books of memory balance: per class and in all, within the budget."""
    assert_balanced(stats)
    classes = stats["classes"]
    oversize = stats["oversize"]["bytes"]
    assert stats["committed_bytes"] == sum(c["committed_bytes"] for c in classes) + oversize
    assert stats["leased_bytes"] == sum(c["leased_bytes"] for c in classes) + oversize
    for c in classes:
        assert 0 <= c["leased_bytes"] <= c["committed_bytes"] <= c["total"] * c["size"], c
    assert stats["committed_bytes"] <= stats["peak_committed_bytes"] <= stats["memory_limit"]


def pattern(tag: str, n: int) -> bytes:
    """``n`` bytes naming ``tag``, none of them zero (a freed page reads back zeros)."""
    unit = f"{tag}|".encode()
    return (unit * (n // len(unit) + 1))[:n]


def diff(data: bytes, want: bytes) -> str:
    """'' if equal, else where and how they differ first."""
    if data == want:
        return ""
    at = next((i for i, (a, b) in enumerate(zip(data, want, strict=False)) if a != b), None)
    return f"{len(data)} bytes, first difference at {at}, {data.count(0)} zero bytes"


def read_attached(pool: shmpool.Pool, handle: shmpool.Handle) -> bytes:
    """Attach ``handle``, copy its bytes and release it (no lease outlives a failed check)."""
    with pool.attach(handle) as lease:
        return bytes(lease.view)


def slot_bytes(arena: Arena, ref: SlotRef) -> tuple[PagedBacking, int, int]:
    """The backing, offset and length of a granted slot."""
    seg = arena._segments[ref.segment]
    backing = seg.backing
    assert isinstance(backing, PagedBacking)
    return backing, seg.header + ref.index * seg.slot_size, seg.slot_size


def is_backed(arena: Arena, ref: SlotRef) -> bool:
    backing, offset, length = slot_bytes(arena, ref)
    return all(backing.backed[offset : offset + length])


def class_stats(arena: Arena, size: int) -> dict[str, Any]:
    (entry,) = [c for c in arena.stats()["classes"] if c["size"] == size]
    return entry  # type: ignore[no-any-return]


def page_arena(
    memory: int,
    *,
    min_size: int = 4 * KiB,
    max_size: int = 32 * KiB,
    segment_bytes: int = 64 * KiB,
    capacity: int | None = None,
    ops: Any = None,
    conns: int = 2,
) -> tuple[Arena, PagedBackings]:
    """An arena of real slot sizes whose backings check page alignment, with ``conns`` clients."""
    arena, backings = paged_arena(
        Classes(min_size, max_size),
        memory,
        segment_bytes=segment_bytes,
        ops=ops,
        page=PAGE,
        capacity=capacity,
    )
    for conn in range(1, conns + 1):
        arena.add_conn(conn, pid=1000 + conn, name=f"c{conn}")
    return arena, backings


def books(arena: Arena, backings: PagedBackings) -> dict[str, Any]:
    """``check_books`` and ``check_pages`` at once; returns the stats."""
    stats = check_books(arena, backings)
    check_pages(arena, backings)
    return stats


def without_committed(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without what a failed acquire may change: committed memory."""
    stats = dict(stats, classes=[dict(c) for c in stats["classes"]])
    del stats["committed_bytes"]
    for c in stats["classes"]:
        del c["committed_bytes"]
    return stats


def keep_talking(pool: shmpool.Pool) -> None:
    """Send the manager a message it counts and that changes nothing.

    A client that sends nothing for two idle passes is asked for its cache,
    rightly; a test that must keep a slot cached keeps its pool talking. An
    acquire bigger than the whole budget is refused at once, with no memory
    moved (``Stats`` would do, but its replies are rationed, and a client
    waiting for one sends nothing meanwhile).
    """
    with contextlib.suppress(PoolExhaustedError):
        pool.acquire(BEYOND, timeout=0).release()


#: Beyond the budget of every manager that ``keep_talking`` is used with.
BEYOND = 256 * MiB + PAGE
Pinger = Callable[[shmpool.Pool], Callable[[], None]]


@pytest.fixture
def pinger() -> Iterator[Pinger]:
    """Keep a pool talking to its manager from a thread (``keep_talking``).

    ``pinger(pool)`` starts it and returns the function that stops it.
    """
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def halt() -> None:
        stop.set()
        for thread in threads:
            thread.join(10)

    def ping(pool: shmpool.Pool) -> Callable[[], None]:
        def run() -> None:
            while not stop.wait(0.005):
                try:
                    keep_talking(pool)
                except shmpool.ShmpoolError:
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return halt

    yield ping
    halt()


# --------------------------------------------------- arena: commit on grant


@pytest.mark.parametrize("ops", [None, "py"])
def test_growth_commits_nothing_until_a_grant(ops: str | None) -> None:
    arena, backings = page_arena(1 * MiB, ops=ticket_ops(ops) if ops else None)
    grant = arena.acquire(1, 4 * KiB)
    (backing,) = backings.made
    seg = arena._segments[grant.slots[0].segment]
    assert seg.nslots == 16  # a 64 KiB segment of 4 KiB slots, one of them committed
    stats = books(arena, backings)
    assert stats["mapped_bytes"] == 64 * KiB
    assert stats["committed_bytes"] == class_stats(arena, 4 * KiB)["committed_bytes"] == 4 * KiB
    assert stats["ticket_bytes"] == (PAGE if ops else 0)  # on top of the budget
    assert backing.commits[-1:] == [(seg.header, 4 * KiB)]
    assert backings.used() == 4 * KiB + stats["ticket_bytes"]
    # A batch commits what it grants: the other 15 slots, then a new segment's first 4.
    assert len(arena.acquire(2, 4 * KiB, 19).slots) == 15  # free slots first: no growth
    assert len(backings.made) == 1
    assert len(arena.acquire(2, 4 * KiB, 4).slots) == 4
    stats = books(arena, backings)
    assert len(backings.made) == 2
    assert stats["committed_bytes"] == 20 * 4 * KiB
    assert stats["mapped_bytes"] == 2 * 64 * KiB
    assert stats["peak_committed_bytes"] == 20 * 4 * KiB
    assert class_stats(arena, 4 * KiB)["leased_bytes"] == 20 * 4 * KiB


def test_sub_page_slots_commit_and_free_a_page_at_a_time() -> None:
    # 1 KiB slots: four to a page; the budget is 16 pages.
    arena, backings = page_arena(16 * PAGE, min_size=1 * KiB, max_size=8 * KiB)
    first = arena.acquire(1, 1 * KiB).slots
    cls = class_stats(arena, 1 * KiB)
    assert (cls["committed_bytes"], cls["leased_bytes"]) == (PAGE, 1 * KiB)
    more = arena.acquire(1, 1 * KiB, 3).slots  # the other three of the same page
    page = [*first, *more]
    assert {(r.segment, r.index // 4) for r in page} == {(page[0].segment, 0)}
    assert class_stats(arena, 1 * KiB)["committed_bytes"] == PAGE
    books(arena, backings)
    arena.release(1, page[1:])  # three of four free: the page stays
    # Fill the budget from another class: the page cannot go while one slot is out.
    eights = arena.acquire(2, 8 * KiB, 7).slots  # 14 pages, 15 with ours
    with pytest.raises(PoolExhaustedError):
        arena.acquire(2, 8 * KiB)
    for _ in range(4):
        arena.release_idle()
    assert class_stats(arena, 1 * KiB)["committed_bytes"] == PAGE
    assert is_backed(arena, page[0])
    books(arena, backings)
    arena.release(1, page[:1])  # the last one: now the whole page may go
    arena.acquire(2, 8 * KiB)
    assert class_stats(arena, 1 * KiB)["committed_bytes"] == 0
    assert not any(is_backed(arena, r) for r in page)
    stats = books(arena, backings)
    assert stats["committed_bytes"] == 8 * 8 * KiB == 16 * PAGE
    arena.release(2, eights)
    books(arena, backings)


def test_a_free_committed_sub_page_slot_serves_its_class_when_the_budget_is_spent() -> None:
    """BUG: a sub-page class whose free list has an uncommitted page on top and a
    committed one below refuses an acquire when the budget is spent, though a
    free, committed slot of the class is right there (``_take`` only looks at
    the top; ``_reclaim`` never takes from the class itself)."""
    arena, backings = page_arena(
        2 * PAGE, min_size=1 * KiB, max_size=8 * KiB, segment_bytes=2 * PAGE
    )
    slots = arena.acquire(1, 1 * KiB, 8).slots  # pages P = slots 0-3, Q = slots 4-7
    p, q = slots[:4], slots[4:]
    for ref in [p[0], *q, *p[1:]]:  # free list, bottom to top: P0, Q0-Q3, P1-P3
        arena.release(1, [ref])
    arena.acquire(2, 4 * KiB)  # the budget is spent: page P (the oldest free) goes
    assert not any(is_backed(arena, r) for r in p)
    assert all(is_backed(arena, r) for r in q)
    books(arena, backings)
    # Four free 1 KiB slots of page Q are committed and nobody holds them.
    grant = arena.acquire(1, 1 * KiB)
    assert (grant.slots[0].segment, grant.slots[0].index) in {(r.segment, r.index) for r in q}
    books(arena, backings)


# ------------------------------------------------------ arena: idle passes


def _units_committed(arena: Arena) -> dict[tuple[int, int], bool]:
    return {
        (seg.id, unit): bool(on)
        for seg in arena._segments.values()
        for unit, on in enumerate(seg.units)
    }


@pytest.mark.parametrize("slot", [4 * KiB, 1 * KiB])
@pytest.mark.parametrize("seed", range(6))
def test_release_idle_frees_a_unit_on_the_third_pass_after_its_last_slot_was_freed(
    slot: int, seed: int
) -> None:
    """A model of each unit: committed when a slot of it is granted, freed by the
    third pass after its last slot was freed (never earlier), taking a slot
    resets it. For 1 KiB slots a unit is a page of four."""
    rng = random.Random(seed)
    arena, backings = page_arena(
        64 * MiB, min_size=slot, max_size=slot, segment_bytes=8 * PAGE, conns=2
    )
    per_unit = max(1, PAGE // slot)
    passes = 0
    freed_at: dict[tuple[int, int], int] = {}  # free slot -> passes done when it was freed
    held: dict[int, list[SlotRef]] = {1: [], 2: []}
    expect: dict[tuple[int, int], bool] = {}  # unit -> committed, by the model

    def unit_slots(seg_id: int, unit: int) -> list[tuple[int, int]]:
        seg = arena._segments[seg_id]
        first = unit * per_unit
        return [(seg_id, i) for i in range(first, min(seg.nslots, first + per_unit))]

    for step in range(400):
        roll = rng.random()
        if roll < 0.35:
            conn = rng.choice([1, 2])
            known = set(arena._segments)
            grant = arena.acquire(conn, slot, rng.choice([1, 1, 2, 3, 5]))
            for seg_id in set(arena._segments) - known:  # new slots: free since now
                for index in range(arena._segments[seg_id].nslots):
                    freed_at[(seg_id, index)] = passes
                for unit in range(len(arena._segments[seg_id].units)):
                    expect[(seg_id, unit)] = False
            for ref in grant.slots:
                del freed_at[(ref.segment, ref.index)]
                expect[(ref.segment, ref.index // per_unit)] = True
            held[conn] += grant.slots
        elif roll < 0.7:
            conn = rng.choice([1, 2])
            if held[conn]:
                going = rng.sample(held[conn], rng.randrange(1, len(held[conn]) + 1))
                arena.release(conn, going)
                for ref in going:
                    held[conn].remove(ref)
                    freed_at[(ref.segment, ref.index)] = passes
        else:
            arena.release_idle()
            passes += 1
            for (seg_id, unit), on in expect.items():
                members = unit_slots(seg_id, unit)
                if (
                    on
                    and all(k in freed_at for k in members)
                    and passes - max(freed_at[k] for k in members) >= 3
                ):
                    expect[(seg_id, unit)] = False
        got = _units_committed(arena)
        early = sorted(k for k, on in expect.items() if on and not got[k])
        late = sorted(k for k, on in expect.items() if not on and got[k])
        assert not early, f"step {step}, pass {passes}: units freed too early: {early}"
        assert not late, f"step {step}, pass {passes}: units kept past their third pass: {late}"
        books(arena, backings)


def test_a_slot_freed_goes_on_the_third_pass_and_taking_it_resets_it() -> None:
    arena, backings = page_arena(64 * MiB, conns=1)
    a, b, c = arena.acquire(1, 4 * KiB, 3).slots
    arena.release(1, [a])
    for _ in range(2):
        arena.release_idle()
        assert is_backed(arena, a)
    arena.release(1, [b])  # freed after two passes: it would go on the fifth
    arena.release_idle()  # the third since a was freed
    assert not is_backed(arena, a)
    assert is_backed(arena, b)
    (again,) = arena.acquire(1, 4 * KiB).slots  # the hottest free slot: b, still backed
    assert (again.segment, again.index) == (b.segment, b.index)
    assert arena.committed == 2 * 4 * KiB
    arena.release(1, [again])  # freed again after the third pass: its count starts over
    for _ in range(2):
        arena.release_idle()
        assert is_backed(arena, again)
    arena.release_idle()
    assert not is_backed(arena, again)
    assert is_backed(arena, c)  # out all along
    stats = books(arena, backings)
    assert stats["committed_bytes"] == 4 * KiB
    assert stats["peak_committed_bytes"] == 3 * 4 * KiB


def test_a_page_of_small_slots_goes_on_the_third_pass_after_its_last_slot_was_freed() -> None:
    """BUG: ``release_idle`` frees a page as soon as one of its slots is cold and all
    are free, so a slot freed just now (the hottest of its class) loses its page
    on the next pass, and the next acquire commits it again."""
    arena, backings = page_arena(64 * MiB, min_size=1 * KiB, max_size=1 * KiB, conns=1)
    a, b, c, d = arena.acquire(1, 1 * KiB, 4).slots  # one page
    arena.release(1, [a, b, c])
    for _ in range(3):
        arena.release_idle()  # a, b, c are cold now, but d is out
    assert class_stats(arena, 1 * KiB)["committed_bytes"] == PAGE
    arena.release(1, [d])  # the page is all free from now: it goes on the third pass
    arena.release_idle()
    assert is_backed(arena, d), "the page went on the first pass after its last slot was freed"
    arena.release_idle()
    assert is_backed(arena, d)
    arena.release_idle()
    assert not is_backed(arena, d)
    books(arena, backings)


# ----------------------------------------------------------- arena: reclaim


def test_reclaim_takes_the_oldest_free_slots_of_the_class_with_most_idle_bytes() -> None:
    # Budget 40 KiB: 4 KiB slots a0 (out) and a1..a5 (freed in order), 8 KiB b1, b2 (freed).
    arena, backings = page_arena(40 * KiB, conns=2)
    a = arena.acquire(1, 4 * KiB, 6).slots
    b = arena.acquire(1, 8 * KiB, 2).slots
    for ref in [*a[1:], *b]:
        arena.release(1, [ref])
    assert arena.committed == 40 * KiB
    # Idle: 20 KiB of 4 KiB slots, 16 KiB of 8 KiB slots. A 16 KiB grant needs
    # 16 KiB: the 4 KiB class gives, oldest first: a1..a4.
    big = [arena.acquire(2, 16 * KiB).slots[0]]
    assert [is_backed(arena, r) for r in a] == [True, False, False, False, False, True]
    assert all(is_backed(arena, r) for r in b)
    books(arena, backings)
    # Idle now: 4 KiB (a5) and 16 KiB (b1, b2): the 8 KiB class gives, both.
    big += arena.acquire(2, 16 * KiB).slots
    assert not any(is_backed(arena, r) for r in b)
    assert is_backed(arena, a[5]) and is_backed(arena, a[0])
    # Only a5's 4 KiB is idle: not enough for 16 KiB, so nothing goes.
    before = arena.stats()
    with pytest.raises(PoolExhaustedError):
        arena.acquire(2, 16 * KiB)
    assert arena.stats() == before
    assert is_backed(arena, a[5])
    stats = books(arena, backings)
    assert stats["committed_bytes"] == 40 * KiB
    assert [is_backed(arena, r) for r in big] == [True, True]


def test_a_spent_budget_serves_another_class_then_the_class_grows() -> None:
    """The measured regression, in the books: a class filled and freed gives its pages."""
    arena, backings = page_arena(256 * KiB, max_size=64 * KiB, segment_bytes=64 * KiB)
    slots = arena.acquire(1, 64 * KiB, 4).slots
    assert len(slots) == 4 and arena.committed == 256 * KiB
    with pytest.raises(PoolExhaustedError):
        arena.acquire(2, 4 * KiB)
    arena.release(1, slots)
    grant = arena.acquire(2, 4 * KiB)  # a class with no segment yet: takes a page, then grows
    assert grant.slot_size == 4 * KiB
    assert class_stats(arena, 64 * KiB)["committed_bytes"] == 192 * KiB
    assert not is_backed(arena, slots[0])  # the oldest free one gave its pages
    stats = books(arena, backings)
    assert stats["committed_bytes"] == 196 * KiB
    # Oversize (above 64 KiB) takes the pages of other classes too.
    over = arena.acquire(2, 100 * KiB)
    assert over.slot_size == 100 * KiB
    assert class_stats(arena, 64 * KiB)["committed_bytes"] == 128 * KiB  # one more went
    stats = books(arena, backings)
    assert stats["oversize"]["bytes"] == 100 * KiB
    assert stats["committed_bytes"] == 128 * KiB + 4 * KiB + 100 * KiB
    arena.release(2, over.slots)  # an oversize segment gives its memory back at once
    stats = books(arena, backings)
    assert stats["committed_bytes"] == 132 * KiB
    assert stats["peak_committed_bytes"] == 256 * KiB


def test_oversize_takes_the_pages_of_every_class_it_needs() -> None:
    arena, backings = page_arena(64 * KiB)
    small = arena.acquire(1, 4 * KiB, 8).slots
    mid = arena.acquire(1, 16 * KiB, 2).slots
    arena.release(1, small[2:])
    arena.release(1, mid)
    assert arena.committed == 64 * KiB
    # 40 KiB needs 40 KiB of the 56 KiB idle: both classes give, the leased two stay.
    grant = arena.acquire(2, 40 * KiB)
    assert grant.slot_size == 40 * KiB
    assert all(is_backed(arena, r) for r in small[:2])
    stats = books(arena, backings)
    assert stats["committed_bytes"] <= 64 * KiB
    assert stats["oversize"] == {"leases": 1, "bytes": 40 * KiB, "requested_bytes": 0}


def test_a_failed_acquire_for_lack_of_budget_changes_nothing_but_committed_memory() -> None:
    arena, backings = page_arena(48 * KiB)
    held = arena.acquire(1, 16 * KiB, 2).slots
    spare = arena.acquire(1, 4 * KiB, 4).slots
    arena.release(1, spare[:3])  # 12 KiB idle: not enough for 32 KiB
    before = arena.stats()
    for size in (32 * KiB, 20 * KiB, 100 * KiB):  # a class that never grew, and oversize
        with pytest.raises(PoolExhaustedError):
            arena.acquire(2, size)
        after = arena.stats()
        assert without_committed(after) == without_committed(before)
        assert after["committed_bytes"] <= before["committed_bytes"]
    assert all(is_backed(arena, r) for r in [*held, spare[3]])
    books(arena, backings)


@pytest.mark.parametrize("grown", [True, False], ids=["class-with-a-segment", "new-class"])
def test_a_failed_acquire_on_a_full_dev_shm_changes_nothing_but_committed_memory(
    grown: bool,
) -> None:
    """/dev/shm full: ftruncate succeeds, the commit fails (``posix_fallocate``).

    BUG for a class with no segment yet: the segment made for the failed grant
    stays (the class's total, free and segments, and mapped_bytes, grow).
    """
    arena, backings = page_arena(1 * MiB, capacity=12 * KiB)  # a /dev/shm of 3 pages
    if grown:  # the 8 KiB class has a segment, its free slot decommitted
        arena.release(1, arena.acquire(1, 8 * KiB).slots)
        for _ in range(3):
            arena.release_idle()
        assert class_stats(arena, 8 * KiB)["committed_bytes"] == 0
    arena.acquire(1, 4 * KiB, 2)  # two of the three pages
    before = arena.stats()
    used = backings.used()
    with pytest.raises(PoolExhaustedError, match="/dev/shm is full"):
        arena.acquire(2, 8 * KiB)
    after = arena.stats()
    assert without_committed(after) == without_committed(before)
    assert backings.used() <= used
    books(arena, backings)


def test_requested_bytes_are_what_clients_report_per_class() -> None:
    arena, _ = page_arena(1 * MiB, max_size=32 * KiB)
    # (length - 1).bit_length(): 100 bytes -> 7 (the 4 KiB class), 5000 -> 13 (8 KiB),
    # 40_000 -> 16 (above 32 KiB: oversize).
    arena.note_usage(1, [(7, 300), (13, 5000), (16, 40_000)], [(7, 3), (13, 1), (16, 1)])
    arena.note_usage(2, [(7, 100)], [(7, 1)])
    stats = arena.stats()
    per_class = {c["size"]: c["requested_bytes"] for c in stats["classes"]}
    assert per_class == {4 * KiB: 400, 8 * KiB: 5000, 16 * KiB: 0, 32 * KiB: 0}
    assert stats["oversize"]["requested_bytes"] == 40_000
    assert stats["requested_bytes"] == 45_400
    assert {c["id"]: c["requested_bytes"] for c in stats["clients"]} == {1: 45_300, 2: 100}
    arena.note_usage(1, [], [])  # all its leases closed
    assert arena.stats()["requested_bytes"] == 100
    assert [128, 4] in arena.stats()["request_sizes"]


# ------------------------------------- the model of where slots are, with pages


class PagesModel(ArenaWithTicketsModel):
    """``test_arena_model``'s walk (lending, transit, shares, orphans, drops) on
    backings that know their backed bytes, with idle passes between steps:
    no slot that is out ever loses a byte, and the books match the pages."""

    def __init__(self) -> None:
        super().__init__()
        self.arena, self.backings = paged_arena(
            Classes(16, 256), MODEL_MEMORY, segment_bytes=64, ops=ticket_ops("py")
        )

    @rule()
    def idle_pass(self) -> None:
        self.arena.release_idle()

    @invariant()
    def pages_match_the_books(self) -> None:
        assert isinstance(self.backings, PagedBackings)
        check_pages(self.arena, self.backings)


TestPagesModel = PagesModel.TestCase
TestPagesModel.settings = settings(
    max_examples=40,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("seed", range(4))
def test_random_load_never_frees_a_byte_anyone_holds(seed: int) -> None:
    """Grants write a pattern, releases, handoffs and readers check it, between idle
    passes and grants that take other classes' pages, on a /dev/shm that fills."""
    rng = random.Random(seed)
    arena, backings = page_arena(
        96 * KiB, min_size=1 * KiB, max_size=16 * KiB, segment_bytes=32 * KiB, capacity=80 * KiB
    )
    held: dict[int, dict[tuple[int, int], tuple[SlotRef, bytes]]] = {1: {}, 2: {}}
    transit: list[tuple[SlotRef, int, bytes]] = []
    tokens = iter(range(1, 1 << 30))

    def check(ref: SlotRef, want: bytes) -> None:
        backing, offset, _ = slot_bytes(arena, ref)
        got = backing.read(offset, len(want))
        assert got == want, f"slot {ref}: {diff(got, want)}"

    for step in range(500):
        roll = rng.random()
        conn = rng.choice([1, 2])
        if roll < 0.4:
            size = rng.choice([100, 1 * KiB, 3 * KiB, 4 * KiB, 8 * KiB, 16 * KiB, 20 * KiB])
            try:
                grant = arena.acquire(conn, size, rng.choice([1, 2, 4]))
            except PoolExhaustedError:
                continue
            for ref in grant.slots:
                backing, offset, length = slot_bytes(arena, ref)
                data = pattern(f"s{step}.{ref.segment}.{ref.index}", length)
                backing.write(offset, data)
                held[conn][(ref.segment, ref.index)] = (ref, data)
        elif roll < 0.65 and held[conn]:
            keys = rng.sample(sorted(held[conn]), rng.randrange(1, len(held[conn]) + 1))
            for key in keys:
                check(*held[conn][key])
            arena.release(conn, [held[conn].pop(key)[0] for key in keys])
        elif roll < 0.75 and held[conn]:
            key = rng.choice(sorted(held[conn]))
            ref, data = held[conn].pop(key)
            token = next(tokens)
            transit.append((arena.detach(conn, ref, token, 1e9) or ref, token, data))
        elif roll < 0.85 and transit:
            ref, token, data = transit.pop(rng.randrange(len(transit)))
            (got,) = arena.attach(conn, ref, token).slots
            check(got, data)
            held[conn][(got.segment, got.index)] = (got, data)
        else:
            arena.release_idle()
        books(arena, backings)
        for mine in held.values():
            for ref, data in mine.values():
                check(ref, data)
        for ref, _, data in transit:
            check(ref, data)


# --------------------------------------------------------- real managers


@pytest.mark.parametrize("max_size", ["4MiB", "64MiB"])
def test_a_budget_spent_by_one_class_serves_others_after_release(max_size: str) -> None:
    """The measured regression: fill the 1 MiB class, release it all and trim; then a
    4 KiB acquire and a 5 MiB one (oversize, or the 8 MiB class) succeed."""
    with shmpool.start(max_size=max_size, memory="256MiB") as mgr, mgr.connect() as pool:
        leases = []
        try:
            with pytest.raises(PoolExhaustedError):
                while True:
                    leases.append(pool.acquire(MiB, timeout=0))
            assert len(leases) == 256
            full = pool.stats()
            assert full["committed_bytes"] == full["memory_limit"] == 256 * MiB
            assert backed_bytes(mgr.pid) == full["committed_bytes"] + full["ticket_bytes"]
        finally:
            while leases:
                leases.pop().release()
        pool.trim()
        with pool.acquire(4096) as small:
            small.view[:] = pattern("small", 4096)
            assert bytes(small.view) == pattern("small", 4096)
        with pool.acquire(5 * MiB) as big:
            assert big.capacity == (5 * MiB if max_size == "4MiB" else 8 * MiB)
            big.view[:] = pattern("big", 5 * MiB)
            assert bytes(big.view) == pattern("big", 5 * MiB)
            stats = pool.stats()
            assert_memory_books(stats)
            assert stats["peak_committed_bytes"] == 256 * MiB
            assert stats["requested_bytes"] == 5 * MiB  # sure: stats() reported usage first
        stats = pool.stats()
        assert_memory_books(stats)
        assert backed_bytes(mgr.pid) == stats["committed_bytes"] + stats["ticket_bytes"]


def test_a_segment_is_backed_only_where_slots_were_granted() -> None:
    with shmpool.start(max_size="1MiB", memory="64MiB") as mgr, mgr.connect() as pool:
        with pool.acquire(64 * KiB) as lease:
            lease.view[:] = pattern("one", 64 * KiB)
            stats = pool.stats()
            (cls,) = [c for c in stats["classes"] if c["total"]]
            assert cls["segments"] == 1 and cls["total"] * cls["size"] == 4 * MiB
            cached = sum(stats["local"]["cached"].values())
            assert cls["committed_bytes"] == cls["leased_bytes"] == (1 + cached) * 64 * KiB
            assert backed_bytes(mgr.pid) == stats["committed_bytes"] + stats["ticket_bytes"]
            assert backed_bytes(mgr.pid) < MiB  # of a 4 MiB segment
            assert stats["requested_bytes"] == 64 * KiB
        assert_memory_books(pool.stats())


def test_a_long_mixed_load_serves_every_request_that_fits() -> None:
    """Two clients, random class and oversize sizes: any acquire whose capacity fits
    the budget beside the leases open is served (caches recalled, pages moved).

    Under CPU load this has failed (an oversize acquire waited its 5 s out) by the
    bug ``test_slots_cached_while_an_acquire_waits_come_back_for_it`` shows: a
    batch the other pool fetched after the recall stays in its cache.
    """
    rng = random.Random(11)
    memory = 48 * MiB
    with (
        shmpool.start(max_size="1MiB", memory=memory, acquire_wait=5) as mgr,
        mgr.connect(name="one") as one,
        mgr.connect(name="two") as two,
    ):
        open_: list[tuple[shmpool.Lease, bytes]] = []
        served = {"class": 0, "oversize": 0}

        def capacity(size: int) -> int:
            if size > MiB:
                return -(-size // PAGE) * PAGE
            return max(4 * KiB, 1 << (size - 1).bit_length())

        try:
            for step in range(600):
                open_bytes = sum(lease.capacity for lease, _ in open_)
                if rng.random() < 0.55 or not open_:
                    size = rng.choice(
                        [rng.randrange(1, 4 * KiB), rng.randrange(4 * KiB, MiB), MiB]
                        + [rng.randrange(MiB + 1, 9 * MiB)] * 2
                    )
                    if open_bytes + capacity(size) > memory:
                        continue
                    pool = rng.choice([one, two])
                    lease = pool.acquire(size)
                    data = pattern(f"{step}", min(size, 64))
                    lease.view[: len(data)] = data
                    open_.append((lease, data))
                    served["oversize" if size > MiB else "class"] += 1
                else:
                    for _ in range(rng.randrange(1, len(open_) + 1)):
                        lease, data = open_.pop(rng.randrange(len(open_)))
                        assert bytes(lease.view[: len(data)]) == data
                        lease.release()
                if step % 100 == 99:
                    assert_memory_books(one.stats())
            assert served["oversize"] > 50 and served["class"] > 50, served
        finally:
            while open_:
                open_.pop()[0].release()
        one.trim()
        two.trim()
        stats = wait_for(lambda: all_returned(s := mgr.stats()) and s)
        assert_memory_books(stats)


def test_slots_cached_while_an_acquire_waits_come_back_for_it() -> None:
    """BUG: a waiting acquire recalls every class once, when it starts to wait.
    Slots a client caches after answering that recall (leases it releases, a
    batch it fetched meanwhile) stay in its cache: the acquire waits its whole
    time out and fails while the memory it needs sits idle there."""
    with shmpool.start(max_size="1MiB", memory="8MiB") as mgr:
        a = shmpool.Pool(mgr.address, name="A", idle_timeout=None)
        b = shmpool.Pool(mgr.address, name="B")
        watch = shmpool.Pool(mgr.address, name="watch")
        held = [a.acquire(MiB) for _ in range(8)]  # the whole budget
        outcome: list[str] = []

        def wait_for_4mib() -> None:
            try:
                with b.acquire(4 * MiB, timeout=3) as lease:
                    lease.view[:4] = b"mine"
                outcome.append("ok")
            except PoolExhaustedError as exc:
                outcome.append(str(exc))

        waiter = threading.Thread(target=wait_for_4mib)
        try:
            held.pop().release()  # A caches 1 MiB
            waiter.start()
            # A answers the recall with its one cached slot; 1 MiB is free now.
            wait_for(lambda: _entry(watch.stats(), "A")["leased"] == 7)
            assert watch.stats()["manager"]["waiting"] == 1
            for _ in range(3):  # and caches 3 MiB more: 4 MiB idle in all
                held.pop().release()
            waiter.join(10)
            assert outcome == ["ok"], (outcome, a.stats()["local"]["cached"])
        finally:
            waiter.join(10)
            while held:
                held.pop().release()
            for pool in (a, b, watch):
                pool.close()


def _acquire_elsewhere(address: str, size: int, results: Any) -> None:
    """Client B: acquire ``size`` bytes (the manager's default wait), report how it went."""
    with shmpool.connect(address, name="B") as pool:
        start = time.monotonic()
        try:
            with pool.acquire(size) as lease:
                lease.view[:] = pattern("B", size)
                ok = bytes(lease.view) == pattern("B", size)
                results.put(("ok" if ok else "corrupt", time.monotonic() - start))
        except Exception as exc:
            results.put((repr(exc), time.monotonic() - start))


def test_a_cache_holding_the_budget_is_recalled_for_another_process(
    mp_context: Any,
) -> None:
    with shmpool.start(max_size="1MiB", memory="8MiB", idle_release=0) as mgr:
        a = shmpool.Pool(mgr.address, name="A", idle_timeout=None)
        try:
            for _ in range(3):  # the whole budget goes through A's cache
                leases = [a.acquire(MiB) for _ in range(8)]
                for lease in leases:
                    lease.release()
            stats = a.stats()
            assert stats["local"]["cached"] == {str(MiB): 8}
            assert stats["committed_bytes"] == 8 * MiB
            results = mp_context.Queue()
            proc = mp_context.Process(
                target=_acquire_elsewhere, args=(mgr.address, 64 * KiB, results)
            )
            proc.start()
            try:
                outcome, took = results.get(timeout=MP_TIMEOUT)
            finally:
                proc.join(MP_TIMEOUT)
                results.close()
                results.join_thread()
            assert outcome == "ok", outcome
            assert took < 2.0  # within the manager's acquire_wait
            assert proc.exitcode == 0
            stats = a.stats()
            assert stats["local"]["cached"] == {}  # A's janitor gave its cache back
            assert_memory_books(stats)
        finally:
            a.close()
        wait_for(lambda: all_returned(mgr.stats()))


def _burst(pool: shmpool.Pool) -> None:
    """Lease and write 24 MiB in two classes (more with the batches the cache
    fetched ahead), then give it all back to the manager."""
    leases = [pool.acquire(MiB) for _ in range(16)] + [pool.acquire(64 * KiB) for _ in range(128)]
    for lease in leases:
        lease.view[:] = pattern("burst", len(lease.view))
    for lease in leases:
        lease.release()
    pool.trim()


@pytest.mark.parametrize("idle", [0.2, 1.0])
def test_idle_pages_go_back_within_one_and_a_half_idle_release(idle: float) -> None:
    """Measured on the manager's descriptors: the burst's pages stay at least
    ``idle_release`` seconds, and are gone (<= 5 % of the peak) within 1.5 times it.

    BUG: the manager's loop sleeps up to 1 s when no client talks, and idle
    passes are due every ``idle_release / 2``: the pages go after 2-3 s whatever
    ``idle_release`` is below 2 s (``_next_timeout`` ignores ``_idle_due``).
    """
    slack = 0.3  # polling and a busy 2-core machine
    with shmpool.start(max_size="1MiB", memory="64MiB", idle_release=idle) as mgr:
        pool = shmpool.Pool(mgr.address, name="burst", idle_timeout=None)
        try:
            _burst(pool)
            released = time.monotonic()
            stats = pool.stats()
            peak = backed_bytes(mgr.pid)
            assert peak == stats["committed_bytes"] + stats["ticket_bytes"]
            assert stats["committed_bytes"] == stats["peak_committed_bytes"] >= 24 * MiB
            while time.monotonic() < released + 1.5 * idle + 10:
                if backed_bytes(mgr.pid) <= 0.05 * peak:
                    break
                time.sleep(0.01)
            gone = time.monotonic() - released
            assert gone >= 0.9 * idle, f"pages went after {gone:.2f} s, before {idle} s"
            assert gone <= 1.5 * idle + slack, (
                f"idle_release={idle}: the pages went after {gone:.2f} s, "
                f"not within {1.5 * idle:.2f} s (+{slack} s)"
            )
            stats = wait_for(lambda: (s := mgr.stats())["committed_bytes"] == 0 and s)
            assert backed_bytes(mgr.pid) == stats["ticket_bytes"]
            assert_memory_books(stats)
        finally:
            pool.close()


def test_idle_release_zero_never_gives_pages_back() -> None:
    """Beside a manager with idle_release=0.2 as the clock: by the time that one gave
    every page back, and a second after, the one with 0 keeps them all."""
    with (
        shmpool.start(max_size="1MiB", memory="64MiB", idle_release=0) as never,
        shmpool.start(max_size="1MiB", memory="64MiB", idle_release=0.2) as clock,
    ):
        pools = [shmpool.Pool(m.address, idle_timeout=None) for m in (never, clock)]
        try:
            for pool in pools:
                _burst(pool)
            assert never.stats()["idle_release"] == 0
            peak = backed_bytes(never.pid)
            start = time.monotonic()
            wait_for(lambda: clock.stats()["committed_bytes"] == 0)
            assert time.monotonic() - start >= 0.2
            # A bounded wait that proves nothing happens late either: a second
            # more (five passes of the clock manager's), polling all along.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert backed_bytes(never.pid) == peak
                time.sleep(0.05)
            stats = never.stats()
            assert stats["committed_bytes"] == stats["peak_committed_bytes"] >= 24 * MiB
            assert_memory_books(stats)
        finally:
            for pool in pools:
                pool.close()


def _entry(stats: dict[str, Any], name: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [c for c in stats["clients"] if c["name"] == name]
    (entry,) = entries
    return entry


def test_a_quiet_client_is_asked_for_its_cache(pinger: Pinger) -> None:
    """idle_timeout=None keeps a cache for ever on the client's side; the manager
    still asks for it after two passes in which the client said nothing. A client
    that keeps talking keeps its cache."""
    idle = 0.2
    with shmpool.start(max_size="1MiB", memory="64MiB", idle_release=idle) as mgr:
        quiet = shmpool.Pool(mgr.address, name="quiet", idle_timeout=None)
        busy = shmpool.Pool(mgr.address, name="busy", idle_timeout=None)
        watch = shmpool.Pool(mgr.address, name="watch")
        try:
            for pool in (quiet, busy):
                leases = [pool.acquire(MiB) for _ in range(2)]
                leases += [pool.acquire(64 * KiB) for _ in range(4)]
                for lease in leases:
                    lease.release()
            unping = pinger(busy)
            before = time.monotonic()
            cached = sum(quiet.stats()["local"]["cached"].values())  # its last message
            assert cached >= 6
            stats = wait_for(lambda: _entry(s := watch.stats(), "quiet")["leased"] == 0 and s)
            assert time.monotonic() - before >= 0.95 * idle  # two passes of silence first
            assert _entry(stats, "busy")["leased"] >= 6
            assert quiet.stats()["local"]["cached"] == {}
            unping()
            assert sum(busy.stats()["local"]["cached"].values()) >= 6
            assert_memory_books(watch.stats())
        finally:
            for pool in (quiet, busy, watch):
                pool.close()


# ------------------------------------------- a waiter's memory in any cache


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_an_acquire_takes_the_memory_of_its_own_processes_cache(timeout: float | None) -> None:
    """The issue's measure without ``trim()``: one process fills the 1 MiB class,
    releases everything to its cache (which keeps it: ``idle_timeout=None``), then
    asks for 4 KiB and oversize buffers. No other client holds anything, so the
    acquire with the default wait is refused at once, but only after the manager
    recalled this process's cache; it asks again and is served."""
    with (
        shmpool.start(max_size="1MiB", memory="16MiB") as mgr,
        shmpool.Pool(mgr.address, name="alone", idle_timeout=None) as pool,
    ):
        leases = []
        with contextlib.suppress(PoolExhaustedError):
            while True:
                leases.append(pool.acquire(MiB, timeout=0))
        assert len(leases) >= 12
        for lease in leases:
            lease.release()
        assert pool.stats()["local"]["cached"] == {str(MiB): len(leases)}
        leases.clear()
        with pool.acquire(4 * KiB, timeout=timeout) as small:
            small.view[:] = pattern("small", 4 * KiB)
            with pool.acquire(3 * MiB, timeout=timeout) as big:  # oversize
                big.view[:] = pattern("big", 3 * MiB)
                assert diff(bytes(small.view), pattern("small", 4 * KiB)) == ""
        stats = pool.stats()
        assert stats["committed_bytes"] <= stats["memory_limit"]
        assert_memory_books(stats)


def _cache_keeper(address: str, conn: Connection) -> None:
    """Holds one 4 MiB lease (a holder of the class the test asks for) and, on
    ``"fill"``, fills the rest of the budget with 256 KiB slots and releases them
    to its cache; ``"check"`` answers whether the lease kept its bytes."""
    with shmpool.Pool(address, name="keeper", idle_timeout=None) as pool:
        lease = pool.acquire(4 * MiB)
        lease.view[:] = pattern("kept", 4 * MiB)
        conn.send("ready")
        while (cmd := conn.recv()) != "stop":
            if cmd == "fill":
                leases = []
                with contextlib.suppress(PoolExhaustedError):
                    while True:
                        leases.append(pool.acquire(256 * KiB, timeout=0))
                for each in leases:
                    each.release()
                conn.send(sum(pool.stats()["local"]["cached"].values()))
            else:
                conn.send(diff(bytes(lease.view), pattern("kept", 4 * MiB)))
        lease.release()
    conn.send("done")


def test_a_holder_of_the_class_gives_its_other_classes_back_every_time(
    mp_context: Any,
) -> None:
    """Another process holds a slot of the asked class and caches the rest of the
    budget in another class. Round after round, the waiting acquire gets that
    cache's pages. (BUG, fixed: from the second round on, the class recall sent to
    the holder was still unread when the every-class one followed, and the
    manager, which sends no recall twice while one is unread, skipped the one
    that mattered: the acquire failed after its whole wait.)"""
    with shmpool.start(max_size="4MiB", memory="16MiB", acquire_wait=5) as mgr:
        parent, child = mp_context.Pipe()
        proc = mp_context.Process(target=_cache_keeper, args=(mgr.address, child))
        proc.start()
        child.close()
        try:
            assert parent.poll(MP_TIMEOUT) and parent.recv() == "ready"
            with shmpool.Pool(mgr.address, name="asker") as pool:
                for _ in range(3):
                    parent.send("fill")
                    assert parent.poll(MP_TIMEOUT)
                    assert parent.recv() >= 8  # 2 MiB+ cached in the 256 KiB class
                    with pool.acquire(4 * MiB) as lease:
                        lease.view[:] = pattern("asked", 4 * MiB)
                        keeper = _entry(pool.stats(), "keeper")
                        assert keeper["leased"] < 8  # its cache went back
                    pool.trim()
                parent.send("check")
                assert parent.poll(MP_TIMEOUT) and parent.recv() == ""
                assert_memory_books(pool.stats())
            parent.send("stop")
            assert parent.poll(MP_TIMEOUT) and parent.recv() == "done"
        finally:
            proc.join(MP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()
        assert proc.exitcode == 0


# ----------------------------------- pages of slots that are out are never freed

#: Idle passes every 50 ms: many during the test, and a client is taken for
#: quiet (and asked for its cache) only after 100 ms without a message.
IDLE = 0.1
SLOT = 64 * KiB
CACHED = 128 * KiB  # a class nothing else takes from, so the cached slot stays cached
OVERSIZE = 1536 * KiB  # above max_size 1 MiB


def _settle(pool: shmpool.Pool, kind: str, obj: Any) -> Any:
    """What a message carried for ``kind``: a Lease already (unpickled), or a handle to attach."""
    if isinstance(obj, shmpool.Handle):
        return pool.attach(obj)
    if isinstance(obj, bytes):
        return pickle.loads(obj)
    assert isinstance(obj, shmpool.Lease), (kind, obj)
    return obj


def _other_process(address: str, conn: Connection) -> None:
    """The other holder: its own lease and cache, then what the test hands it; checks all."""
    pool = shmpool.Pool(address, name="other", idle_timeout=None)
    views: dict[str, tuple[Any, bytes]] = {}
    leases: list[shmpool.Lease] = []
    own = pool.acquire(SLOT)
    own.view[:] = pattern("o-leased", SLOT)
    views["other: leased"] = (own.view, pattern("o-leased", SLOT))
    leases.append(own)
    cached = pool.acquire(CACHED)
    cached.view[:] = pattern("o-cached", CACHED)
    views["other: cached"] = (cached.view[:], pattern("o-cached", CACHED))
    cached_ref = cached._slot.ref
    cached.release()
    conn.send("ready")
    while True:
        while not conn.poll(0.005):
            keep_talking(pool)  # a quiet client's cache is recalled, rightly
        command, items = conn.recv()
        if command == "stop":
            break
        for kind, obj, tag, length in items:
            lease = _settle(pool, kind, obj)
            leases.append(lease)
            views[kind] = (lease.view, pattern(tag, length))
        if command == "hold":
            conn.send("held")
            continue
        refs = {slot.ref for c in pool._caches for slot in c}
        bad = {kind: diff(bytes(view), want) for kind, (view, want) in views.items()}
        bad = {kind: why for kind, why in bad.items() if why}
        if cached_ref not in refs:
            bad["other: cached"] = "recalled from the cache: it could not be checked"
        conn.send(bad)
    views.clear()
    for lease in leases:
        lease.release()
    pool.close()
    conn.send("done")


def _pressure(pool: shmpool.Pool) -> None:
    """Bursts in other classes, each taking the pages the last one left free (no waits)."""
    for size, count in ((MiB, 14), (256 * KiB, 40), (4 * KiB, 300), (512 * KiB, 24)):
        leases = []
        for _ in range(count):
            try:
                leases.append(pool.acquire(size, timeout=0))
            except PoolExhaustedError:
                break
            leases[-1].view[:] = pattern("pressure", size)
        assert len(leases) >= count // 2, (size, len(leases))
        for lease in leases:
            lease.release()
        pool.trim()


def _filled(pool: shmpool.Pool, tag: str, size: int = SLOT) -> shmpool.Lease:
    lease = pool.acquire(size)
    lease.view[:] = pattern(tag, size)
    return lease


def _cached(pool: shmpool.Pool, tag: str, size: int) -> tuple[memoryview, SlotRef]:
    """Fill a slot and release it to the cache; a slice of it (which outlives the lease)."""
    lease = _filled(pool, tag, size)
    view, ref = lease.view[:], lease._slot.ref
    lease.release()
    return view, ref


def _orphaned(address: str, tag: str) -> shmpool.Handle:
    """A handle of a lent slot whose lender has gone (its pool closed)."""
    lender = shmpool.Pool(address, name="lender")
    handle = _filled(lender, tag).detach()
    lender.close()
    return handle


def test_pages_of_slots_that_are_out_are_never_freed(mp_context: Any, pinger: Pinger) -> None:
    """Leased, cached, lent (unattached, attached, pickled either way), in transit
    (oversize), orphaned (its lender closed) and shared slots, in this process and
    another: filled with patterns, then idle passes every 50 ms and bursts in other
    classes that need their pages; every holder then finds its bytes intact."""
    with shmpool.start(
        max_size="1MiB", memory="24MiB", idle_release=IDLE, transit_timeout=120
    ) as mgr:
        pool = shmpool.Pool(mgr.address, name="holder", idle_timeout=None)
        press = shmpool.Pool(mgr.address, name="pressure", idle_timeout=None)
        parent, child = mp_context.Pipe()
        proc = mp_context.Process(target=_other_process, args=(mgr.address, child))
        proc.start()
        child.close()
        # Everything that refers to a slot lives in these, emptied at the end even
        # when a check fails, so that a traceback keeps no segment mapped.
        mine: list[shmpool.Lease] = []
        views: list[memoryview] = []
        now: list[tuple[str, Any, str, int]] = []  # handed over at once
        later: list[tuple[str, Any, str, int]] = []  # handed over at check time
        try:
            assert parent.poll(MP_TIMEOUT) and parent.recv() == "ready"
            mine += [_filled(pool, "leased"), _filled(pool, "big", 2 * MiB)]
            view, cached_ref = _cached(pool, "cached", CACHED)
            views.append(view)
            later += [
                ("lent, attached at the end", _filled(pool, "late").detach(), "late", SLOT),
                ("pickled, loaded at the end", pickle.dumps(_filled(pool, "pkl")), "pkl", SLOT),
                ("oversize in transit", _filled(pool, "tr", OVERSIZE).detach(), "tr", OVERSIZE),
                ("orphan", _orphaned(mgr.address, "orphan"), "orphan", SLOT),
            ]
            shared = _filled(pool, "shared").share(readers=2)
            now += [
                ("lent, attached", _filled(pool, "lent").detach(), "lent", SLOT),
                ("pickled lease", _filled(pool, "sent"), "sent", SLOT),  # pickled by send()
                ("shared reader", shared, "shared", SLOT),
            ]
            parent.send(("hold", now))
            assert parent.poll(MP_TIMEOUT) and parent.recv() == "held"
            stats = pool.stats()
            assert stats["shared"] == 1
            assert stats["in_transit"] >= 4  # late, pickled, oversize, orphan
            unping = pinger(pool)
            _pressure(press)
            _pressure(press)

            def only_out_is_backed() -> bool:
                s = press.stats()
                return all(c["committed_bytes"] == c["leased_bytes"] for c in s["classes"])

            wait_for(only_out_is_backed)
            stats = press.stats()
            assert stats["peak_committed_bytes"] > stats["committed_bytes"] + 8 * MiB
            # This process's holders, while its pool still talks.
            assert diff(bytes(mine[0].view), pattern("leased", SLOT)) == ""
            assert diff(bytes(mine[1].view), pattern("big", 2 * MiB)) == ""
            cached = {slot.ref for c in pool._caches for slot in c}
            assert cached_ref in cached, "the cached slot was recalled: it could not be checked"
            assert diff(bytes(views[0]), pattern("cached", CACHED)) == ""
            assert diff(read_attached(pool, shared), pattern("shared", SLOT)) == ""
            unping()
            parent.send(("check", later))
            assert parent.poll(MP_TIMEOUT)
            assert parent.recv() == {}
            # The pages the books count are the pages there are.
            stats = press.stats()
            assert backed_bytes(mgr.pid) == stats["committed_bytes"] + stats["ticket_bytes"]
            parent.send(("stop", []))
            assert parent.poll(MP_TIMEOUT) and parent.recv() == "done"
            proc.join(MP_TIMEOUT)
            assert proc.exitcode == 0
        finally:
            while views:
                views.pop().release()
            while mine:
                mine.pop().release()
            now.clear()
            later.clear()
            if proc.is_alive():
                proc.kill()
                proc.join()
            proc.close()
            parent.close()
            pool.close()
            press.close()
        stats = wait_for(lambda: all_returned(s := mgr.stats()) and s)
        assert_memory_books(stats)


_PURE_SENDER = """
import json, sys, shmpool
pool = shmpool.Pool(sys.argv[1], name="pure", idle_timeout=None)
n, unit = int(sys.argv[2]), sys.argv[3].encode() + b"|"
lease = pool.acquire(n)
lease.view[:] = (unit * (n // len(unit) + 1))[:n]  # pattern(tag, n)
handle = lease.detach()  # no atomics: the manager keeps it in transit
pool.stats()  # the notice is in before we say so
print(json.dumps(list(handle)), flush=True)
sys.stdin.readline()
pool.close()
"""


def test_a_class_slot_in_the_managers_keeping_keeps_its_pages(
    pinger: Pinger,
) -> None:
    """A sender without the C extension (``SHMPOOL_NO_SPEEDUPS``) detaches a class slot:
    it waits in the manager's books, in transit, through passes and pressure."""
    data = pattern("pure", SLOT)
    env = dict(os.environ, SHMPOOL_NO_SPEEDUPS="1", PYTHONPATH=str(ROOT))
    with shmpool.start(max_size="1MiB", memory="24MiB", idle_release=IDLE) as mgr:
        sender = subprocess.Popen(
            [sys.executable, "-c", _PURE_SENDER, mgr.address, str(SLOT), "pure"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        pool = shmpool.Pool(mgr.address, name="receiver", idle_timeout=None)
        try:
            assert sender.stdout is not None and sender.stdin is not None
            handle = shmpool.Handle(*json.loads(sender.stdout.readline()))
            stats = pool.stats()
            (cls,) = [c for c in stats["classes"] if c["size"] == SLOT]
            assert cls["in_transit"] == 1
            unping = pinger(pool)
            _pressure(pool)
            wait_for(
                lambda: all(
                    c["committed_bytes"] == c["leased_bytes"] for c in pool.stats()["classes"]
                )
            )
            assert diff(read_attached(pool, handle), data) == ""
            unping()
            sender.stdin.write("\n")
            sender.stdin.flush()
            assert sender.wait(MP_TIMEOUT) == 0
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
            for stream in (sender.stdin, sender.stdout):
                if stream is not None:
                    stream.close()
            pool.close()
        stats = wait_for(lambda: all_returned(s := mgr.stats()) and s)
        assert_memory_books(stats)


# ------------------------------------------------------------ a full /dev/shm


@cache
def _namespace_problem() -> str:
    """Why a private mount namespace with its own /dev/shm cannot be made here ('' if it can)."""
    if os.getuid() != 0:
        return "mounting a tmpfs on /dev/shm needs root"
    if not (shutil.which("unshare") and shutil.which("mount")):
        return "unshare or mount is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return "" if probe.returncode == 0 else f"unshare/mount failed: {probe.stderr.strip()}"


def run_in_small_dev_shm(script: str, *args: str, size: str = "8m") -> dict[str, Any]:
    """Run ``script`` (Python) with a ``size`` tmpfs on /dev/shm in a private mount
    namespace; returns the JSON it prints last. A SIGBUS anywhere fails the test."""
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" -c "$@"',
         sys.executable, textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=1.5 * MP_TIMEOUT,  # the child runs a whole scenario, not one wait
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    return json.loads(lines[-1])  # type: ignore[no-any-return]


_FILL = """
import json, os, sys, shmpool
timeout = None if sys.argv[1] == "default" else float(sys.argv[1])
st = os.statvfs("/dev/shm")
out = {"capacity": st.f_blocks * st.f_frsize}
with shmpool.start(max_size="1MiB", memory="64MiB", acquire_wait=0.5) as mgr:
    with mgr.connect() as pool:
        leases = []
        try:
            for i in range(64):
                lease = pool.acquire(1 << 20, timeout=timeout)
                lease.view[:] = bytes([i + 1]) * len(lease.view)  # every page: a SIGBUS dies here
                leases.append(lease)
        except shmpool.PoolExhaustedError as exc:
            out["error"] = str(exc)
        out["held"] = len(leases)
        out["intact"] = all(
            bytes(lease.view) == bytes([i + 1]) * len(lease.view) for i, lease in enumerate(leases)
        )
        out["full"] = pool.stats()
        for lease in leases:
            lease.release()
        pool.trim()
        with pool.acquire(1 << 20, timeout=5) as lease:
            lease.view[:] = (b"again-" * (1 << 18))[: len(lease.view)]
            out["again"] = bytes(lease.view[:5]).decode()
        out["after"] = pool.stats()
    out["running"] = mgr.running
print(json.dumps(out))
"""


@pytest.mark.parametrize("timeout", ["0", "default"])
def test_a_full_dev_shm_gives_pool_exhausted_never_sigbus(timeout: str) -> None:
    """An 8 MiB /dev/shm under a 64 MiB budget: acquires fail with PoolExhaustedError
    saying /dev/shm is full; every byte granted is writable; the pool works on.

    BUG (timeout "default"): an acquire that may wait parks on the /dev/shm
    error as if the budget were spent, and after ``acquire_wait`` fails with
    "the memory budget is spent and other clients hold their slots" (there are
    none, and the budget is not spent).
    """
    out = run_in_small_dev_shm(_FILL, timeout)
    # The tmpfs holds about 8 MiB (how the kernel rounds and whether a
    # segment's header page fits beside eight slots varies): far below 64.
    assert out["held"] >= 4 and out["held"] * MiB <= out["capacity"] < 16 * MiB, out
    assert "/dev/shm is full" in out.get("error", ""), out.get("error")
    assert out["intact"] and out["again"] == "again" and out["running"]
    assert_memory_books(out["full"])
    assert_memory_books(out["after"])
    assert out["held"] * MiB <= out["full"]["committed_bytes"] <= (out["held"] + 1) * MiB


_RECOMMIT = """
import json, os, time, shmpool
out = {}
with shmpool.start(max_size="1MiB", memory="64MiB", idle_release=0.05) as mgr:
    with mgr.connect() as pool:
        leases = [pool.acquire(1 << 20, timeout=0) for _ in range(5)]
        for lease in leases:
            lease.view[:] = b"x" * len(lease.view)
            lease.release()
        pool.trim()
        deadline = time.monotonic() + 20
        while pool.stats()["committed_bytes"] and time.monotonic() < deadline:
            time.sleep(0.02)
        out["decommitted"] = pool.stats()
        st = os.statvfs("/dev/shm")
        fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR, 0o600)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - 256 * 1024)  # 256 KiB left
        os.close(fd)
        out["errors"] = []
        for timeout in (0, None):
            try:
                pool.acquire(1 << 20, timeout=timeout).release()
                out["errors"].append("granted")
            except shmpool.PoolExhaustedError as exc:
                out["errors"].append(str(exc))
        out["refused"] = pool.stats()
        os.unlink("/dev/shm/filler")
        with pool.acquire(1 << 20, timeout=5) as lease:
            lease.view[:] = b"y" * len(lease.view)
            out["again"] = bytes(lease.view[:1]).decode()
        out["after"] = pool.stats()
    out["running"] = mgr.running
print(json.dumps(out))
"""


def test_decommitted_slots_recommitted_on_a_full_dev_shm_give_pool_exhausted() -> None:
    out = run_in_small_dev_shm(_RECOMMIT)
    gone = out["decommitted"]
    assert gone["committed_bytes"] == 0, gone
    (cls,) = [c for c in gone["classes"] if c["total"]]
    assert cls["free"] == cls["total"] >= 5  # the slots are there, their pages are not
    assert len(out["errors"]) == 2
    for error in out["errors"]:
        assert "/dev/shm is full" in error, error
    assert out["refused"]["committed_bytes"] == 0
    assert out["again"] == "y" and out["running"]
    for stats in (gone, out["refused"], out["after"]):
        assert_memory_books(stats)


_SMALL_SHM_OVERSIZE = """
import json, shmpool
out = {}
with shmpool.start(max_size="2MiB", memory="64MiB") as mgr:
    with mgr.connect() as pool:
        leases = []
        try:
            while True:
                leases.append(pool.acquire(1 << 20, timeout=0))
        except shmpool.PoolExhaustedError:
            pass
        out["held"] = len(leases)
        for lease in leases:
            lease.release()
        pool.trim()
        out["free"] = pool.stats()
        out["results"] = {}
        for size in (3 << 20, 2 << 20):  # oversize, and the 2 MiB class
            try:
                with pool.acquire(size, timeout=0) as lease:
                    lease.view[:] = b"z" * size
                out["results"][size] = "ok"
            except shmpool.PoolExhaustedError as exc:
                out["results"][size] = str(exc)
        out["after"] = pool.stats()
print(json.dumps(out))
"""


def test_a_full_dev_shm_takes_the_pages_of_free_slots_before_refusing() -> None:
    """BUG (or a gap in the rules, which name only the budget): in a /dev/shm smaller
    than the budget (Docker's default is 64 MiB, the default budget 1 GiB), free
    slots keep their pages until idle_release (30 s by default), so after a burst
    of one class every larger request fails with "/dev/shm is full" while the
    manager itself holds most of /dev/shm in free slots nobody uses."""
    out = run_in_small_dev_shm(_SMALL_SHM_OVERSIZE)
    assert out["held"] >= 5
    assert out["free"]["committed_bytes"] >= 5 * MiB  # free slots, still backed
    assert out["results"] == {str(3 << 20): "ok", str(2 << 20): "ok"}, out["results"]
    assert_memory_books(out["after"])
