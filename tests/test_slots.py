"""The slot states of the manager's books: the table of moves, and the one function that moves."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from shmpool import slots
from shmpool.slots import (
    FREE,
    MOVES,
    ORPHAN,
    SHARED,
    TRANSIT,
    BooksError,
    ClassBooks,
    ClientBooks,
    Segment,
    SlotState,
    move,
    state_of,
)


class _Backing:
    fd = -1

    def close(self) -> None:
        pass


def _segment(nslots: int = 4, *, oversize: bool = False) -> Segment:
    cls = None if oversize else ClassBooks(64, nslots)
    seg = Segment(1, 64 * nslots, 64, _Backing(), cls, [0] * nslots, [0] * nslots)
    if cls is not None:
        cls.segments.append(seg)
        cls.total = nslots
        cls.free = [(seg, i) for i in reversed(range(nslots))]
    return seg


def _balanced(seg: Segment) -> None:
    """Per class, total == free + leased + in_transit, and each counter counts its states."""
    cls = seg.cls
    assert cls is not None
    states = [state_of(h) for h in seg.holders]
    assert len(cls.free) == states.count(SlotState.FREE)
    assert cls.leased == states.count(SlotState.LEASED) + states.count(SlotState.SHARED)
    assert cls.in_transit == states.count(SlotState.TRANSIT) + states.count(SlotState.ORPHAN)
    assert cls.total == len(cls.free) + cls.leased + cls.in_transit


def _holder_for(state: SlotState, conn: ClientBooks) -> int:
    return conn.id if state is SlotState.LEASED else int(state)


def test_state_of_reads_the_holder_field() -> None:
    assert state_of(0) is SlotState.FREE
    assert state_of(1) is SlotState.LEASED
    assert state_of(123456) is SlotState.LEASED
    assert (state_of(TRANSIT), state_of(SHARED), state_of(ORPHAN)) == (
        SlotState.TRANSIT,
        SlotState.SHARED,
        SlotState.ORPHAN,
    )
    with pytest.raises(ValueError):
        state_of(-4)


def test_every_state_can_be_reached_and_left() -> None:
    sources = {a for a, _ in MOVES}
    targets = {b for _, b in MOVES}
    assert sources == set(SlotState)
    assert targets == set(SlotState)
    # every state but FREE goes back to FREE in one move: no slot can be stranded
    for state in set(SlotState) - {SlotState.FREE}:
        assert (state, SlotState.FREE) in MOVES


def test_counters_in_the_table_match_what_each_state_counts_in() -> None:
    counted = {
        SlotState.FREE: (0, 0),
        SlotState.LEASED: (1, 0),
        SlotState.SHARED: (1, 0),
        SlotState.TRANSIT: (0, 1),
        SlotState.ORPHAN: (0, 1),
    }
    for (a, b), m in MOVES.items():
        assert (m.leased, m.in_transit) == (
            counted[b][0] - counted[a][0],
            counted[b][1] - counted[a][1],
        ), m.name


@pytest.mark.parametrize("pair", list(MOVES), ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_each_allowed_move_keeps_the_books(pair: tuple[SlotState, SlotState]) -> None:
    a, b = pair
    seg = _segment()
    cls = seg.cls
    assert cls is not None
    first, second = ClientBooks(1, 100, "a"), ClientBooks(2, 200, "b")
    cls.free.remove((seg, 0))  # a grant pops the slot from the free list, then moves it
    if a is not SlotState.FREE:  # get slot 0 to state a by allowed moves: granted, then on
        move(seg, 0, first.id, 1, None, first)
        if a is not SlotState.LEASED:
            move(seg, 0, int(a), 2, first)
        _balanced(seg)
    giver = first if a is SlotState.LEASED else None
    taker = second if b is SlotState.LEASED else None
    move(seg, 0, _holder_for(b, second), 7, giver, taker)
    assert state_of(seg.holders[0]) is b
    assert seg.generations[0] == 7
    assert ((seg.id, 0) in second.held) == (b is SlotState.LEASED)
    assert (seg.id, 0) not in first.held
    assert ((seg, 0) in cls.free) == (b is SlotState.FREE)
    _balanced(seg)


@pytest.mark.parametrize(
    "pair",
    [p for p in itertools.product(SlotState, repeat=2) if p not in MOVES],
    ids=lambda p: f"{p[0].name}-{p[1].name}",
)
def test_a_move_not_in_the_table_is_refused_and_changes_nothing(
    pair: tuple[SlotState, SlotState],
) -> None:
    a, b = pair
    seg = _segment()
    conn, other = ClientBooks(1, 100, "a"), ClientBooks(2, 200, "b")
    holder = conn.id if a is SlotState.LEASED else int(a)
    seg.holders[0] = holder
    if a is SlotState.LEASED:
        conn.held.add((seg.id, 0))
    before = (list(seg.holders), list(seg.generations), set(conn.held), set(other.held))
    cls = seg.cls
    assert cls is not None
    counters = (cls.leased, cls.in_transit, list(cls.free))
    with pytest.raises(BooksError, match=f"no move from {a.name}"):
        move(
            seg,
            0,
            other.id if b is SlotState.LEASED else int(b),
            9,
            conn if a is SlotState.LEASED else None,
            other if b is SlotState.LEASED else None,
        )
    assert (list(seg.holders), list(seg.generations), set(conn.held), set(other.held)) == before
    assert (cls.leased, cls.in_transit, list(cls.free)) == counters


def test_the_same_holder_is_no_move() -> None:
    seg = _segment()
    conn = ClientBooks(1, 100, "a")
    seg.cls.free.remove((seg, 0))  # type: ignore[union-attr]
    move(seg, 0, conn.id, 1, None, conn)
    with pytest.raises(BooksError, match="no move from LEASED"):
        move(seg, 0, conn.id, 2, conn, conn)
    assert seg.generations[0] == 1


def test_giver_and_taker_must_be_the_holders() -> None:
    seg = _segment()
    a, b, c = ClientBooks(1, 1, "a"), ClientBooks(2, 2, "b"), ClientBooks(3, 3, "c")
    seg.cls.free.remove((seg, 0))  # type: ignore[union-attr]
    with pytest.raises(BooksError, match="taker None"):
        move(seg, 0, a.id, 1)  # a grant must say who takes it
    with pytest.raises(BooksError, match="taker 2"):
        move(seg, 0, a.id, 1, None, b)  # ... and it must be the holder named
    move(seg, 0, a.id, 1, None, a)
    with pytest.raises(BooksError, match="giver 3"):
        move(seg, 0, TRANSIT, 2, c)  # only its holder lets it go
    with pytest.raises(BooksError, match="giver None"):
        move(seg, 0, FREE, 2)
    assert seg.holders[0] == a.id and (seg.id, 0) in a.held
    move(seg, 0, b.id, 5, a, b)  # its lender went with b's claim in the word
    assert (seg.id, 0) in b.held and (seg.id, 0) not in a.held
    _balanced(seg)


def test_an_oversize_slot_moves_without_a_class() -> None:
    seg = _segment(1, oversize=True)
    conn = ClientBooks(1, 100, "a")
    move(seg, 0, conn.id, 1, None, conn)
    move(seg, 0, SHARED, 2, conn)
    move(seg, 0, FREE, 3)
    assert seg.holders == [0] and not conn.held
    with pytest.raises(BooksError):
        move(seg, 0, ORPHAN, 4)


def test_only_move_writes_a_holder_field() -> None:
    """No path of the manager sets ``holders[i]`` or changes a class counter by hand.

    ``slots.move`` is the one place (segments are made with every slot free).
    """
    package = Path(slots.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        if path.name == "slots.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Attribute)
                    and target.value.attr == "holders"
                ) or (
                    isinstance(target, ast.Attribute) and target.attr in {"leased", "in_transit"}
                ):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
