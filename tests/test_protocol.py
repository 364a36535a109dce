"""The sans-I/O wire protocol: round trips, constructor validation, decode fuzzing."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import msgpack
import pytest

from shmpool import protocol as p
from shmpool.errors import ProtocolError
from shmpool.protocol import (
    MAX_BATCH,
    MAX_FDS,
    MAX_REPLY,
    MAX_REQUEST,
    Acquire,
    Error,
    Grant,
    Hello,
    Ok,
    Recall,
    Release,
    Return,
    SegmentInfo,
    SlotRef,
    Stats,
    StatsReply,
    Usage,
    Welcome,
    decode,
    encode,
)

MAX_ID = 2**63 - 1
MAX_BUFFER = 2**48
ALL_TYPES = (*p.REQUESTS, *p.REPLIES)
TYPE_IDS = [cls.TYPE for cls in ALL_TYPES]
UNKNOWN_IDS = [t for t in (0, 5, 6, 7, 63, 70, 127, 255) if t not in TYPE_IDS]

SAMPLE_STATS: dict[str, Any] = {
    "classes": [{"size": 4096, "segments": 1, "total": 1024, "free": 1000, "leased": 24}],
    "oversize": {"leases": 0, "bytes": 0},
    "mapped_bytes": 4 << 20,
    "memory_limit": 1 << 30,
    "min_size": 4096,
    "max_size": 1 << 26,
    "clients": [{"id": 1, "pid": 1234, "name": "w\u00e9rker", "leased": 24}],
    "nested": {"list": [1, -2, 3.5, None, True, "x"], "empty": {}},
}

SAMPLES: list[Any] = [
    Hello(0, 1, 1234),
    Hello(7, 1, 2**31, "worker \u2603"),
    Hello(MAX_ID, 2**16, 0, "x" * 1024),
    Acquire(1, 1),
    Acquire(2, 4096, 32, 17),
    Acquire(MAX_ID, MAX_BUFFER, MAX_BATCH, MAX_ID),
    Acquire(3, 4096, 8, 0, 0),
    Release(3, (SlotRef(1, 0, 1),)),
    Release(4, [SlotRef(i, i, MAX_ID) for i in range(MAX_BATCH)], 99),
    Return(14, (SlotRef(1, 0, 1),)),
    Return(15, [SlotRef(MAX_ID, i, MAX_ID) for i in range(MAX_BATCH)], MAX_ID),
    p.Notices(16, (p.NOTICE_DETACHED, 1, 2, 3, 0)),
    p.Notices.of(17, [p.Notice(p.NOTICE_CLAIMED, MAX_ID, MAX_ID, MAX_ID, MAX_ID)]),
    p.Notices.of(22, [p.Notice(i % 2, MAX_ID, i, MAX_ID, MAX_ID) for i in range(MAX_BATCH)]),
    p.Attach(18, SlotRef(1, 2, 4), 12345, 8192, 0),
    p.Attach(23, SlotRef(1, 2, 4), 12345, 1, 1),
    p.Share(20, SlotRef(1, 2, 3), 5, 1),
    p.Share(21, SlotRef(MAX_ID, 0, MAX_ID), MAX_ID, p.MAX_READERS),
    p.Attach(19, SlotRef(0, 0, 0), MAX_ID, MAX_BUFFER, p.MAX_READERS),
    Stats(5),
    Welcome(0, 1, 4321, 4096, 1 << 26, 3),
    Welcome(1, 1, 1, 1, MAX_BUFFER, MAX_ID),
    Welcome(2, 2, 1, 1, MAX_BUFFER, 5, MAX_ID, 1, MAX_ID),
    Grant(6, 4096, (SlotRef(1, 0, 1),)),
    Grant(
        7,
        4096,
        [SlotRef(1, i, 1) for i in range(MAX_BATCH)],
        [SegmentInfo(i, 4 << 20, 4096) for i in range(MAX_FDS)],
    ),
    Grant(8, MAX_BUFFER, [SlotRef(MAX_ID, 0, 1)], [SegmentInfo(MAX_ID, MAX_BUFFER, MAX_BUFFER)]),
    Ok(9),
    StatsReply(10, {}),
    StatsReply(11, SAMPLE_STATS),
    Error(12, "exhausted", "no free 4KiB slot"),
    Error(13, "", ""),
    Recall(0, 4096, 8),
    Recall(0, MAX_BUFFER, 2**32),
    Recall(0, 0, 1),
    Usage(14),
    Usage(15, ((12, 4096), (0, 1)), ((48, MAX_ID),)),
    Usage(16, tuple((k, k) for k in range(49)), tuple((k, 1) for k in range(49))),
    p.Leases(17, 0),
    p.Leases(18, 40, tuple(p.LeaseRecord(k, k, k, k, ("f.py:1 in g",) * 4) for k in range(16))),
    Stats(19, 0),
    Stats(20, p.MAX_LEASE_AGE_MS),
]


def _id(m: Any) -> str:
    return type(m).__name__


# ----------------------------------------------------------------- round trips


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(ALL_TYPES)
    assert len({cls.TYPE for cls in ALL_TYPES}) == len(ALL_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_round_trip(message: Any) -> None:
    data = encode(message)
    assert type(data) is bytes
    back = decode(data)
    assert type(back) is type(message)
    assert back == message
    assert encode(back) == data


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_round_trip_from_bytearray_and_memoryview(message: Any) -> None:
    data = encode(message)
    assert decode(bytearray(data)) == message
    assert decode(memoryview(data)) == message


@pytest.mark.parametrize("message", [m for m in SAMPLES if type(m) in p.REQUESTS], ids=_id)
def test_requests_fit_the_request_limit(message: Any) -> None:
    assert len(encode(message)) <= MAX_REQUEST
    assert decode(encode(message), max_size=MAX_REQUEST) == message


@pytest.mark.parametrize("message", [m for m in SAMPLES if type(m) in p.REPLIES], ids=_id)
def test_replies_fit_the_reply_limit(message: Any) -> None:
    assert len(encode(message)) <= MAX_REPLY


def test_decoded_slots_are_tuples_of_slotrefs() -> None:
    msg = decode(encode(Release(1, [SlotRef(1, 2, 3), SlotRef(4, 5, 6)])))
    assert isinstance(msg, Release)
    assert type(msg.slots) is tuple
    assert all(type(s) is SlotRef for s in msg.slots)
    assert msg.slots == (SlotRef(1, 2, 3), SlotRef(4, 5, 6))
    grant = decode(encode(Grant(1, 8, [SlotRef(1, 0, 1)], [SegmentInfo(1, 64, 8)])))
    assert isinstance(grant, Grant)
    assert type(grant.segments) is tuple
    assert all(type(s) is SegmentInfo for s in grant.segments)


def test_optional_fields_may_be_omitted_on_the_wire() -> None:
    assert decode(msgpack.packb([1, 0, 1, 42])) == Hello(0, 1, 42, "")
    assert decode(msgpack.packb([2, 0, 100])) == Acquire(0, 100, 1, 0)
    assert decode(msgpack.packb([3, 0, [[1, 2, 3]]])) == Release(0, (SlotRef(1, 2, 3),), 0)
    assert decode(msgpack.packb([65, 0, 8, [[1, 2, 3]]])) == Grant(0, 8, (SlotRef(1, 2, 3),))


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_messages_are_frozen(message: Any) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.req = 1


# --------------------------------------------------------- constructor checks

_SLOT = SlotRef(1, 0, 1)

BAD_CONSTRUCTIONS: list[tuple[str, Any, tuple[Any, ...], type[Exception]]] = [
    ("hello req negative", Hello, (-1, 1, 1), ValueError),
    ("hello req bool", Hello, (True, 1, 1), TypeError),
    ("hello req float", Hello, (1.0, 1, 1), TypeError),
    ("hello req str", Hello, ("1", 1, 1), TypeError),
    ("hello req too big", Hello, (2**63, 1, 1), ValueError),
    ("hello version bool", Hello, (0, True, 1), TypeError),
    ("hello version too big", Hello, (0, 2**16 + 1, 1), ValueError),
    ("hello pid negative", Hello, (0, 1, -1), ValueError),
    ("hello pid too big", Hello, (0, 1, 2**31 + 1), ValueError),
    ("hello pid none", Hello, (0, 1, None), TypeError),
    ("hello name bytes", Hello, (0, 1, 1, b"x"), TypeError),
    ("hello name none", Hello, (0, 1, 1, None), TypeError),
    ("hello name too long", Hello, (0, 1, 1, "x" * 1025), ValueError),
    ("acquire size zero", Acquire, (0, 0), ValueError),
    ("acquire size negative", Acquire, (0, -4096), ValueError),
    ("acquire size too big", Acquire, (0, MAX_BUFFER + 1), ValueError),
    ("acquire size bool", Acquire, (0, True), TypeError),
    ("acquire size float", Acquire, (0, 4096.0), TypeError),
    ("acquire count zero", Acquire, (0, 1, 0), ValueError),
    ("acquire count too big", Acquire, (0, 1, MAX_BATCH + 1), ValueError),
    ("acquire count bool", Acquire, (0, 1, True), TypeError),
    ("acquire hits negative", Acquire, (0, 1, 1, -1), ValueError),
    ("acquire hits too big", Acquire, (0, 1, 1, 2**63), ValueError),
    ("acquire wait past the default", Acquire, (0, 1, 1, 0, 2**32), ValueError),
    ("acquire wait negative", Acquire, (0, 1, 1, 0, -1), ValueError),
    ("acquire wait bool", Acquire, (0, 1, 1, 0, False), TypeError),
    ("release no slots", Release, (0, []), ValueError),
    ("release empty tuple", Release, (0, ()), ValueError),
    ("release too many", Release, (0, [_SLOT] * (MAX_BATCH + 1)), ValueError),
    ("release slots str", Release, (0, "abc"), TypeError),
    ("release slots none", Release, (0, None), TypeError),
    ("release slots dict", Release, (0, {"a": 1}), TypeError),
    ("release slot short", Release, (0, [[1, 2]]), TypeError),
    ("release slot long", Release, (0, [[1, 2, 3, 4]]), TypeError),
    ("release slot not list", Release, (0, [7]), TypeError),
    ("release slot negative", Release, (0, [[1, 2, -1]]), ValueError),
    ("release slot bool", Release, (0, [[1, True, 3]]), TypeError),
    ("release slot str", Release, (0, [[1, 2, "3"]]), TypeError),
    ("release slot too big", Release, (0, [[2**63, 0, 0]]), ValueError),
    ("release hits bool", Release, (0, [_SLOT], False), TypeError),
    ("return no slots", Return, (0, []), ValueError),
    ("return too many", Return, (0, [_SLOT] * (MAX_BATCH + 1)), ValueError),
    ("return slots none", Return, (0, None), TypeError),
    ("return slot short", Return, (0, [[1, 2]]), TypeError),
    ("return slot negative", Return, (0, [[1, 2, -1]]), ValueError),
    ("return slot bool", Return, (0, [[1, 2, False]]), TypeError),
    ("return hits negative", Return, (0, [_SLOT], -1), ValueError),
    ("stats req bool", Stats, (False,), TypeError),
    ("stats req negative", Stats, (-1,), ValueError),
    ("welcome min not pow2", Welcome, (0, 1, 1, 3000, 4096, 1), ValueError),
    ("welcome max not pow2", Welcome, (0, 1, 1, 4096, 5000, 1), ValueError),
    ("welcome min above max", Welcome, (0, 1, 1, 8192, 4096, 1), ValueError),
    ("welcome min zero", Welcome, (0, 1, 1, 0, 4096, 1), ValueError),
    ("welcome max too big", Welcome, (0, 1, 1, 4096, 2**49, 1), ValueError),
    ("welcome pid too big", Welcome, (0, 1, 2**31 + 1, 4096, 4096, 1), ValueError),
    ("welcome client bool", Welcome, (0, 1, 1, 4096, 4096, True), TypeError),
    ("welcome key negative", Welcome, (0, 1, 1, 4096, 4096, 1, 0, 1, -1), ValueError),
    ("welcome key too big", Welcome, (0, 1, 1, 4096, 4096, 1, 0, 1, 2**63), ValueError),
    ("notices none", p.Notices, (0, []), ValueError),
    ("notices too many", p.Notices, (0, [0, 1, 0, 1, 1] * (MAX_BATCH + 1)), ValueError),
    ("notices not a list", p.Notices, (0, 5), TypeError),
    ("notices a partial notice", p.Notices, (0, [0, 1, 0, 1]), ValueError),
    ("notices nested", p.Notices, (0, [[0, [1, 0, 1], 1]]), ValueError),
    ("notice kind 3", p.Notices, (0, [3, 1, 0, 1, 1]), ValueError),
    ("notice kind bool", p.Notices, (0, [True, 1, 0, 1, 1]), TypeError),
    ("notice kind negative", p.Notices, (0, [-1, 1, 0, 1, 1]), ValueError),
    ("notice slot str", p.Notices, (0, [0, 1, "0", 1, 1]), TypeError),
    ("notice slot float", p.Notices, (0, [0, 1, 0, 1.0, 1]), TypeError),
    ("notice token negative", p.Notices, (0, [0, 1, 0, 1, -1]), ValueError),
    ("notice token too big", p.Notices, (0, [1, 1, 0, 1, 2**63]), ValueError),
    ("notice list in it", p.Notices, (0, [0, 1, 0, 1, [7]]), TypeError),
    ("attach no capacity", p.Attach, (0, _SLOT, 1), TypeError),
    ("attach capacity zero", p.Attach, (0, _SLOT, 1, 0, 0), ValueError),
    ("attach capacity too big", p.Attach, (0, _SLOT, 1, MAX_BUFFER + 1, 0), ValueError),
    ("attach capacity bool", p.Attach, (0, _SLOT, 1, True, 0), TypeError),
    ("attach readers negative", p.Attach, (0, _SLOT, 1, 4096, -1), ValueError),
    ("attach readers too many", p.Attach, (0, _SLOT, 1, 4096, p.MAX_READERS + 1), ValueError),
    ("grant no slots", Grant, (0, 4096, []), ValueError),
    ("grant too many slots", Grant, (0, 4096, [_SLOT] * (MAX_BATCH + 1)), ValueError),
    ("grant slot_size zero", Grant, (0, 0, [_SLOT]), ValueError),
    ("grant slot_size too big", Grant, (0, MAX_BUFFER + 1, [_SLOT]), ValueError),
    ("grant slot_size bool", Grant, (0, True, [_SLOT]), TypeError),
    (
        "grant too many segments",
        Grant,
        (0, 8, [_SLOT], [SegmentInfo(1, 8, 8)] * (MAX_FDS + 1)),
        ValueError,
    ),
    ("grant segments str", Grant, (0, 8, [_SLOT], "seg"), ValueError),
    ("grant segments none", Grant, (0, 8, [_SLOT], None), ValueError),
    ("grant segment short", Grant, (0, 8, [_SLOT], [[1, 8]]), TypeError),
    ("grant segment slot > size", Grant, (0, 8, [_SLOT], [[1, 8, 16]]), ValueError),
    ("grant segment size zero", Grant, (0, 8, [_SLOT], [[1, 0, 8]]), ValueError),
    ("grant segment id negative", Grant, (0, 8, [_SLOT], [[-1, 8, 8]]), ValueError),
    ("grant segment bool", Grant, (0, 8, [_SLOT], [[1, True, 1]]), TypeError),
    ("ok req bool", Ok, (True,), TypeError),
    ("ok req negative", Ok, (-5,), ValueError),
    ("statsreply list", StatsReply, (0, []), TypeError),
    ("statsreply none", StatsReply, (0, None), TypeError),
    ("statsreply str", StatsReply, (0, "{}"), TypeError),
    ("statsreply bytes value", StatsReply, (0, {"a": b""}), TypeError),
    ("statsreply int key", StatsReply, (0, {1: 2}), TypeError),
    ("statsreply nested object", StatsReply, (0, {"a": [{"b": object()}]}), TypeError),
    ("error code int", Error, (0, 1, "m"), TypeError),
    ("error message none", Error, (0, "c", None), TypeError),
    ("error message bytes", Error, (0, "c", b"m"), TypeError),
    ("error message too long", Error, (0, "c", "m" * 1025), ValueError),
    ("error code too long", Error, (0, "c" * 1025, "m"), ValueError),
    ("recall count zero", Recall, (0, 4096, 0), ValueError),
    ("recall count too big", Recall, (0, 4096, 2**32 + 1), ValueError),
    ("recall slot_size negative", Recall, (0, -1, 1), ValueError),
    ("recall count bool", Recall, (0, 4096, True), TypeError),
    ("usage k too big", Usage, (0, ((49, 1),)), ValueError),
    ("usage k twice", Usage, (0, ((3, 1), (3, 2))), ValueError),
    ("usage n negative", Usage, (0, (), ((3, -1),)), ValueError),
    ("usage pair short", Usage, (0, ((3,),)), ValueError),
    ("usage not a list", Usage, (0, 5), ValueError),
    ("usage too many", Usage, (0, tuple((k % 49, 1) for k in range(50))), ValueError),
    ("usage n bool", Usage, (0, ((3, True),)), TypeError),
]


@pytest.mark.parametrize(
    ("cls", "args", "exc"),
    [case[1:] for case in BAD_CONSTRUCTIONS],
    ids=[case[0] for case in BAD_CONSTRUCTIONS],
)
def test_constructor_refuses(cls: Any, args: tuple[Any, ...], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        cls(*args)


def _packable(value: Any) -> bool:
    try:
        msgpack.packb(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


WIRE_CASES = [
    (name, [cls.TYPE, *args])
    for name, cls, args, _ in BAD_CONSTRUCTIONS
    if _packable([cls.TYPE, *args])
]


@pytest.mark.parametrize("wire", [w for _, w in WIRE_CASES], ids=[n for n, _ in WIRE_CASES])
def test_decode_refuses_what_the_constructor_refuses(wire: list[Any]) -> None:
    data = msgpack.packb(wire, use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (Release, (0, [SlotRef(-1, 0, 0)])),
        (Release, (0, [SlotRef(1, True, 0)])),
        (Release, (0, [SlotRef(1, 0, "gen")])),
        (Return, (0, [SlotRef(1, 0, -1)])),
        (Grant, (0, 8, [SlotRef(2**63, 0, 1)])),
        (Grant, (0, 8, [_SLOT], [SegmentInfo(1, 8, 16)])),
        (Grant, (0, 8, [_SLOT], [SegmentInfo(1, 0, 0)])),
    ],
)
def test_constructor_checks_prebuilt_slotrefs_and_segmentinfos(
    cls: Any, args: tuple[Any, ...]
) -> None:
    # a SlotRef or SegmentInfo built by hand is checked like one from the wire,
    # so a message that builds always survives its own round trip
    with pytest.raises((TypeError, ValueError)):
        cls(*args)


# -------------------------------------------------------------- decode garbage


def check_decode(data: bytes, max_size: int = MAX_REPLY) -> Any:
    """decode() returns a well-formed message or raises ProtocolError, nothing else."""
    try:
        msg = decode(data, max_size=max_size)
    except ProtocolError:
        return None
    except Exception as exc:  # pragma: no cover - the failure we hunt for
        pytest.fail(f"decode({data!r}) raised {type(exc).__name__}: {exc}")
    assert isinstance(msg, ALL_TYPES), (data, msg)
    # well formed: rebuilding it through its validating constructor succeeds,
    # and it survives its own round trip
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    assert type(msg)(*values) is not None
    if isinstance(msg, StatsReply):
        json.dumps(msg.stats)  # the stats are JSON-able, whatever the bytes were
    again = encode(msg)
    assert encode(decode(again, max_size=max(max_size, len(again)))) == again
    return msg


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_random_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2500):
        check_decode(rng.randbytes(rng.randrange(0, 48)))


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_random_bytes_behind_a_plausible_header(seed: int) -> None:
    rng = random.Random(1000 + seed)
    type_ids = TYPE_IDS + UNKNOWN_IDS
    decoded = 0
    for _ in range(2500):
        header = bytes([0x90 | rng.randrange(2, 7), rng.choice(type_ids), rng.randrange(0, 128)])
        body = b""
        if rng.random() < 0.7:
            body = bytes([rng.choice((0x00, 0x01, 0x7F, 0x91, 0x93, 0xA1, 0xC0, 0xCD, 0xD3))])
            body += rng.randbytes(rng.randrange(0, 24))
        if check_decode(header + body) is not None:
            decoded += 1
    assert decoded > 0  # the fuzz does reach the message constructors


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    atoms: list[Any] = [
        0,
        1,
        -1,
        4096,
        4097,
        2**31,
        2**48,
        2**48 + 1,
        2**63 - 1,
        2**63,
        2**64 - 1,
        -(2**63),
        True,
        False,
        None,
        0.0,
        1.5,
        float("nan"),
        "",
        "x",
        "x" * 1025,
        "\u2603",
    ]
    roll = rng.random()
    if depth >= 3 or roll < 0.6:
        return rng.choice(atoms)
    if roll < 0.75:
        return [rng.choice(atoms) for _ in range(3)]
    if roll < 0.9:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(["a", "size", ""]): _random_value(rng, depth + 1)}


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_structured_values(seed: int) -> None:
    rng = random.Random(2000 + seed)
    type_ids = [*TYPE_IDS, *UNKNOWN_IDS, -1, 2**64 - 1]
    decoded = 0
    for _ in range(2500):
        wire = [rng.choice(type_ids), rng.choice([0, 1, 2**63 - 1, 2**63, -1, "0"])]
        wire += [_random_value(rng) for _ in range(rng.randrange(0, 6))]
        if check_decode(msgpack.packb(wire)) is not None:
            decoded += 1
    assert decoded > 0


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_every_truncation_is_refused(message: Any) -> None:
    data = encode(message)
    for n in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:n])


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_single_byte_mutations(message: Any) -> None:
    rng = random.Random(repr(message))
    data = encode(message)
    positions = range(len(data)) if len(data) <= 300 else rng.sample(range(len(data)), 300)
    for pos in positions:
        for value in {0x00, 0xFF, 0xC0, 0xC1, data[pos] ^ 0x01, rng.randrange(256)}:
            check_decode(data[:pos] + bytes([value]) + data[pos + 1 :])


@pytest.mark.parametrize("seed", range(3))
def test_random_truncations_and_splices(seed: int) -> None:
    rng = random.Random(seed)
    encodings = [encode(m) for m in SAMPLES]
    for _ in range(2000):
        a, b = rng.choice(encodings), rng.choice(encodings)
        cut = rng.randrange(len(a) + 1)
        check_decode(a[:cut] + b[rng.randrange(len(b) + 1) :])


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_trailing_bytes_are_refused(message: Any) -> None:
    data = encode(message)
    for extra in (b"\x00", b"\xc0", data):
        with pytest.raises(ProtocolError):
            decode(data + extra)


WRONG_SHAPES: list[tuple[str, Any]] = [
    ("nil", None),
    ("int", 1),
    ("str", "hello"),
    ("true", True),
    ("float", 1.5),
    ("empty map", {}),
    ("map", {"type": 1, "req": 0}),
    ("empty array", []),
    ("only type", [1]),
    ("only type stats", [4]),
    ("nested type", [[1], 0]),
    ("map as type", [{"a": 1}, 0]),
    ("req as array", [1, [0], 1, 1]),
    ("req as map", [4, {"a": 0}]),
    *((f"unknown type {t}", [t, 0]) for t in UNKNOWN_IDS),
    ("unknown type -1", [-1, 0]),
    ("huge type", [2**64 - 1, 0]),
    ("bool type", [True, 0]),
    ("float type", [1.0, 0]),
    ("str type", ["Hello", 0]),
    ("nil type", [None, 0]),
    ("negative req", [4, -1]),
    ("huge req", [4, 2**64 - 1]),
    ("min int req", [4, -(2**63)]),
    ("float req", [4, 0.0]),
    ("str req", [4, "0"]),
    ("bool req", [66, False]),
    ("nil req", [66, None]),
    ("stats extra", [4, 0, 0, 0]),
    ("stats leases negative", [4, 0, -2]),
    ("leases record short", [11, 0, 1, [[1, 2, 3, 4]]]),
    ("ok extra", [66, 0, 1]),
    ("hello extra", [1, 0, 1, 1, "n", "extra"]),
    ("hello too few", [1, 0, 1]),
    ("hello version str", [1, 0, "1", 1]),
    ("hello pid huge", [1, 0, 1, 2**64 - 1]),
    ("hello name int", [1, 0, 1, 1, 5]),
    ("hello name too long", [1, 0, 1, 1, "x" * 1025]),
    ("acquire size str", [2, 0, "4096"]),
    ("acquire size float", [2, 0, 4096.0]),
    ("acquire size bool", [2, 0, True]),
    ("acquire size zero", [2, 0, 0]),
    ("acquire size negative", [2, 0, -4096]),
    ("acquire size huge", [2, 0, 2**64 - 1]),
    ("acquire count huge", [2, 0, 1, 2**63]),
    ("acquire count zero", [2, 0, 1, 0]),
    ("release no slots", [3, 0, []]),
    ("release slots map", [3, 0, {"a": [1, 2, 3]}]),
    ("release flat slot", [3, 0, [1, 2, 3]]),
    ("release slot short", [3, 0, [[1, 2]]]),
    ("release slot str", [3, 0, [[1, 2, "3"]]]),
    ("release slot nested", [3, 0, [[1, 2, [3]]]]),
    ("release slot negative", [3, 0, [[1, -2, 3]]]),
    ("release slot nil", [3, 0, [None]]),
    ("release too many", [3, 0, [[1, 2, 3]] * (MAX_BATCH + 1)]),
    ("release way too many", [3, 0, [[1, 2, 3]] * 5000]),
    ("return no slots", [Return.TYPE, 0, []]),
    ("return too few", [Return.TYPE, 0]),
    ("return flat slot", [Return.TYPE, 0, [1, 2, 3]]),
    ("return too many", [Return.TYPE, 0, [[1, 2, 3]] * (MAX_BATCH + 1)]),
    ("welcome not pow2", [64, 0, 1, 1, 3000, 4096, 1]),
    ("welcome min above max", [64, 0, 1, 1, 8192, 4096, 1]),
    ("welcome too few", [64, 0, 1, 1, 4096, 4096]),
    ("grant no slots", [65, 0, 4096, []]),
    ("grant segment slot > size", [65, 0, 4096, [[1, 0, 1]], [[1, 10, 4096]]]),
    ("grant segments map", [65, 0, 4096, [[1, 0, 1]], {"a": 1}]),
    ("grant too many segments", [65, 0, 8, [[1, 0, 1]], [[1, 8, 8]] * (MAX_FDS + 1)]),
    ("statsreply list", [67, 0, []]),
    ("statsreply str", [67, 0, "stats"]),
    ("statsreply int key", [67, 0, {1: 2}]),
    ("statsreply nil key", [67, 0, {None: 2}]),
    ("error code int", [68, 0, 1, "m"]),
    ("error too few", [68, 0, "c"]),
    ("recall count zero", [69, 0, 4096, 0]),
    ("recall huge count", [69, 0, 4096, 2**64 - 1]),
    ("bin code", [68, 0, b"code", "m"]),
    ("bin name", [1, 0, 1, 1, b"name"]),
    ("bin req", [4, b"\x00"]),
    ("bin in stats", [67, 0, {"a": b"xyz"}]),
    ("bin key", [67, 0, {b"k": 1}]),
    ("ext name", [1, 0, 1, 1, msgpack.ExtType(1, b"x")]),
    ("ext in stats", [67, 0, {"a": msgpack.ExtType(5, b"xyz")}]),
    ("ext type id", [msgpack.ExtType(1, b"\x01"), 0]),
    ("timestamp in stats", [67, 0, {"t": msgpack.Timestamp(1, 0)}]),
    ("big array", list(range(5000))),
]


@pytest.mark.parametrize(
    "value", [v for _, v in WRONG_SHAPES], ids=[name for name, _ in WRONG_SHAPES]
)
def test_wrong_shapes_are_refused(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("reserved byte", b"\xc1"),
        ("array32 of 2**32-1", b"\xdd\xff\xff\xff\xff\x01\x00"),
        ("map32 of 2**32-1", b"\xdf\xff\xff\xff\xff"),
        ("str32 of 2**32-1", b"\x92\x04\xdb\xff\xff\xff\xffabc"),
        ("bin32 of 2**32-1", b"\x92\x04\xc6\xff\xff\xff\xff"),
        ("ext32 of 2**32-1", b"\x92\x04\xc9\xff\xff\xff\xff\x01"),
        ("deep nesting", b"\x91" * 100_000 + b"\xc0"),
        ("deep map nesting", b"\x93\x43\x00" + b"\x81\xa1a" * 20_000 + b"\xc0"),
        ("invalid utf-8", b"\x94\x44\x00\xa1\xff\xa1m"),
        ("empty", b""),
    ],
)
def test_hostile_encodings_are_refused(name: str, data: bytes) -> None:
    assert len(data) <= MAX_REPLY
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize("message", SAMPLES, ids=_id)
def test_max_size_boundary(message: Any) -> None:
    data = encode(message)
    assert decode(data, max_size=len(data)) == message
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(data, max_size=len(data) - 1)


@pytest.mark.parametrize("size", [MAX_REPLY + 1, 4 * MAX_REPLY])
def test_oversized_inputs_are_refused_before_parsing(size: int) -> None:
    # a valid message, padded inside a string to exceed the default limit
    big = msgpack.packb([68, 0, "c", "m" * size])
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(big)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * size)


def test_request_limit_is_enforced_when_asked() -> None:
    release = encode(Release(1, [SlotRef(MAX_ID, MAX_ID, MAX_ID)] * MAX_BATCH))
    assert len(release) <= MAX_REQUEST
    stats = encode(StatsReply(0, {"pad": "x" * MAX_REQUEST}))
    assert len(stats) > MAX_REQUEST
    with pytest.raises(ProtocolError):
        decode(stats, max_size=MAX_REQUEST)
    assert isinstance(decode(stats), StatsReply)


def test_valid_deep_stats_still_decode() -> None:
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(50):
        inner["a"] = {}
        inner = inner["a"]
    msg = check_decode(encode(StatsReply(1, nested)))
    assert msg == StatsReply(1, nested)


@pytest.mark.parametrize(
    "data",
    [
        b"\x93\x43\x00\x81\xa1a\xc4\x00",  # StatsReply(0, {"a": b""})
        b"\x93\x43\x00\x81\xc4\x00\x01",  # StatsReply(0, {b"": 1})
        b"\x93\x43\x00\x81\xa1a\xc7\x00\x05",  # StatsReply(0, {"a": ExtType(5, b"")})
    ],
)
def test_decode_refuses_zero_length_bin_and_ext(data: bytes) -> None:
    # max_bin_len=0/max_ext_len=0 still let zero-length bin and ext through
    # msgpack; StatsReply must refuse them since its stats are JSON-able
    # (``shmpool stats --json`` dumps them).
    with pytest.raises(ProtocolError):
        decode(data)


# ------------------------------------------------------------------ tokens


def test_notices_read_back_as_notice_objects() -> None:
    notices = [p.Notice(p.NOTICE_DETACHED, 1, 2, 3, 44), p.Notice(p.NOTICE_CLAIMED, 1, 2, 4, 44)]
    msg = decode(encode(p.Notices.of(9, notices)))
    assert isinstance(msg, p.Notices) and msg.items == tuple(notices)
    assert msg.items[1].slot == SlotRef(1, 2, 4)


def test_ticket_tokens_differ_per_key_slot_and_generation() -> None:
    base = p.ticket_token(12345, 1, 2, 3)
    assert base == p.ticket_token(12345, 1, 2, 3)  # the manager recomputes the client's
    others = {
        p.ticket_token(12346, 1, 2, 3),
        p.ticket_token(12345, 2, 2, 3),
        p.ticket_token(12345, 1, 3, 3),
        p.ticket_token(12345, 1, 2, 4),
    }
    assert base not in others and len(others) == 4


@pytest.mark.parametrize("seed", range(3))
def test_ticket_tokens_are_nonzero_63_bit_ints(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        key = rng.randrange(1, MAX_ID)
        token = p.ticket_token(
            key, rng.randrange(MAX_ID), rng.randrange(MAX_ID), rng.randrange(MAX_ID)
        )
        assert 1 <= token <= MAX_ID and token & 1  # never 0 ("no handoff"), never CLAIMED's bit


def test_raw_encoders_match_the_checked_ones() -> None:
    """The hot paths skip building messages; what they send must decode the same."""
    slots = [SlotRef(1, i, 7) for i in range(3)]
    segs = [SegmentInfo(1, 4 << 20, 4096, 8192)]
    flat = [p.NOTICE_DETACHED, 1, 2, 3, 99, p.NOTICE_CLAIMED, 1, 2, 4, 99]
    pairs = [
        (p.encode_acquire(5, 4096, 8, 3), Acquire(5, 4096, 8, 3)),
        (p.encode_acquire(6, 4096, 8, 3, 0), Acquire(6, 4096, 8, 3, 0)),
        (p.encode_return(6, slots, 4), Return(6, slots, 4)),
        (p.encode_grant(7, 4096, slots, segs), Grant(7, 4096, slots, segs)),
        (p.encode_grant(7, 4096, slots[:1], [], True), Grant(7, 4096, slots[:1], [], 1)),
        (p.encode_notices(8, flat), p.Notices(8, flat)),
    ]
    for raw, message in pairs:
        assert raw == encode(message)
        assert decode(raw) == message


def test_returned_and_claim_words_carry_the_generation() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        generation = rng.randrange(1, 2**40)
        floor = generation - rng.randrange(0, 2**30)
        returned = p.returned_word(generation)
        assert p.is_returned(returned)
        assert not p.is_returned(p.claim_word(rng.randrange(1, 2**32), generation))
        low = returned >> 32 & 0x7FFF_FFFF
        assert p.generation_at_least(low, max(0, floor)) == generation


def test_ticket_word_mixes_the_generation_and_gives_back_the_token() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        token = rng.randrange(1, 2**62)  # tokens are below 2**62
        generation = rng.randrange(0, 2**40)
        word = p.ticket_word(token, generation)
        assert 0 <= word < 2**62  # never mistaken for a claim (bit 63) or a lender's (62)
        assert word ^ p.ticket_word(0, generation) == token
        lent = p.lent_word(token, generation)
        assert lent == word | p.LENT and lent >> 63 == 0
        assert not p.is_returned(lent) and not p.is_returned(word)
        assert word != p.ticket_word(token, generation + 1)
        assert word != p.ticket_word(token, generation - 1 if generation else 1)


@pytest.mark.skipif(p._slot_refs is None, reason="the C extension is not built (or disabled)")
def test_the_c_slot_check_agrees_with_the_python_one() -> None:
    """``_slots`` takes the C path for the common case; it must accept and refuse alike."""
    rng = random.Random(11)
    odd: list[Any] = [True, -1, 2**63, 2**63 - 1, 0, 1.0, "1", None, [1], (1, 2, 3)]

    def python_slots(value: Any) -> Any:
        try:
            return tuple(p.SlotRef.from_wire(list(v) if type(v) is p.SlotRef else v) for v in value)
        except (TypeError, ValueError):
            return "refused"

    taken = 0
    for _ in range(3000):
        value: Any = []
        for _ in range(rng.randint(0, 4)):
            item: Any = [rng.randrange(0, 2**63) for _ in range(3)]
            roll = rng.random()
            if roll < 0.2:
                item[rng.randrange(3)] = rng.choice(odd)
            elif roll < 0.3:
                item = item[: rng.randint(0, 4)] + [0] * rng.randint(0, 1)
            elif roll < 0.4:
                item = p.SlotRef(*item)
            elif roll < 0.45:
                item = tuple(item)
            value.append(item)
        if rng.random() < 0.2:
            value = tuple(value)
        fast = p._slot_refs(value, p.SlotRef)
        slow = python_slots(value)
        common = all(
            type(v) in (list, p.SlotRef) and len(v) == 3 and all(type(x) is int for x in v)
            for v in value
        )
        if fast is None:  # the Python loop decides, as slow did
            assert not common or slow == "refused", value
            continue
        taken += 1
        assert fast == slow, value
        assert all(type(ref) is p.SlotRef for ref in fast)
    assert taken > 1000  # the C path was exercised
