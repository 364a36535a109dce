"""Table-driven tests of the power-of-two size-class math (pure, no I/O)."""

from __future__ import annotations

import enum
import random

import pytest

from shmpool.sizeclass import MAX_SHIFT, Classes, ceil_pow2, format_size, parse_size, shift_of

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# ------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (4096, 4096),
        (2**40, 2**40),
        (2**70, 2**70),
        ("1", 1),
        ("4096", 4096),
        ("  4096  ", 4096),
        ("64KiB", 64 * KiB),
        ("64kib", 64 * KiB),
        ("64 KiB", 64 * KiB),
        ("1 MiB", MiB),
        ("1MiB", MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5KiB", 512),
        ("2TiB", 2 * TiB),
        ("10MB", 10_000_000),
        ("10mb", 10_000_000),
        ("10M", 10_000_000),
        ("3k", 3000),
        ("3KB", 3000),
        ("2G", 2 * 10**9),
        ("1tb", 10**12),
        ("7B", 7),
        ("7 b", 7),
    ],
)
def test_parse_size_accepts(value: int | str, expected: int) -> None:
    result = parse_size(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "abc",
        "KiB",
        "64 KiBs",
        "64 K iB",
        "1 PiB",
        "1.2.3",
        ".5KiB",
        "5.",
        "1e3",
        "0x10",
        "1,000",
        "1_000",
        "+5",
        "-5",
        "-1KiB",
        "5 5",
        "64KiB!",
    ],
)
def test_parse_size_rejects_bad_strings(value: str) -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size(value)


@pytest.mark.parametrize("value", [0, -1, -(2**70), "0", "0KiB", "0.0001KiB", "0.4"])
def test_parse_size_rejects_non_positive(value: int | str) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, False, 1.0, 4096.0, None, b"4096", [4096], object()])
def test_parse_size_rejects_other_types(value: object) -> None:
    with pytest.raises(TypeError):
        parse_size(value)  # type: ignore[arg-type]


def test_parse_size_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="memory"):
        parse_size(0, name="memory")
    with pytest.raises(ValueError, match="memory"):
        parse_size("lots", name="memory")
    with pytest.raises(TypeError, match="memory"):
        parse_size(None, name="memory")  # type: ignore[arg-type]


# ---------------------------------------------------------- shift_of, ceil_pow2


def gws_binary_ceil32(v: int) -> int:
    """GWS's binaryCeil on a uint32: the value we must not reproduce above 2**31."""
    v = (v - 1) & 0xFFFFFFFF
    for s in (1, 2, 4, 8, 16):
        v |= v >> s
    return (v + 1) & 0xFFFFFFFF


@pytest.mark.parametrize(
    ("n", "shift", "ceil"),
    [
        (1, 0, 1),
        (2, 1, 2),
        (3, 2, 4),
        (4, 2, 4),
        (5, 3, 8),
        (4095, 12, 4096),
        (4096, 12, 4096),
        (4097, 13, 8192),
        (2**31 - 1, 31, 2**31),
        (2**31, 31, 2**31),
        (2**31 + 1, 32, 2**32),
        (3 * 2**30, 32, 2**32),
        (2**32 - 1, 32, 2**32),
        (2**32, 32, 2**32),
        (2**32 + 1, 33, 2**33),
        (2**40 + 12345, 41, 2**41),
        (2**48 - 1, 48, 2**48),
        (2**48, 48, 2**48),
        (2**48 + 1, 49, 2**49),
        (2**63 - 1, 63, 2**63),
        (2**64 + 1, 65, 2**65),
    ],
)
def test_shift_of_and_ceil_pow2(n: int, shift: int, ceil: int) -> None:
    assert shift_of(n) == shift
    assert ceil_pow2(n) == ceil


@pytest.mark.parametrize("n", [2**31 + 1, 3 * 2**30, 2**32 - 1, 2**32, 2**32 + 1, 2**40])
def test_ceil_pow2_does_not_wrap_like_a_32_bit_binary_ceil(n: int) -> None:
    assert gws_binary_ceil32(n) < n  # the seed's 32-bit wrap, for the record
    assert ceil_pow2(n) >= n > 2**31


def test_gws_binary_ceil32_agrees_below_the_wrap() -> None:
    for n in [1, 2, 3, 1000, 4097, 2**20 + 1, 2**31 - 1, 2**31]:
        assert ceil_pow2(n) == gws_binary_ceil32(n)


def test_ceil_pow2_is_the_smallest_power_of_two_at_least_n() -> None:
    rng = random.Random(1234)
    values = list(range(1, 2050)) + [rng.randrange(1, 2**64) for _ in range(2000)]
    values += [2**k + d for k in range(1, 64) for d in (-1, 0, 1)]
    for n in values:
        c = ceil_pow2(n)
        assert c & (c - 1) == 0, n
        assert c >= n, n
        assert c // 2 < n, n
        assert c == 1 << shift_of(n), n


# --------------------------------------------------------------------- Classes


@pytest.mark.parametrize(
    ("lo", "hi", "min_size", "max_size", "count"),
    [
        (4096, 65536, 4096, 65536, 5),
        ("4KiB", "64MiB", 4 * KiB, 64 * MiB, 15),
        (3000, 50000, 4096, 65536, 5),
        (4097, 65537, 8192, 131072, 5),
        (1, 1, 1, 1, 1),
        (5, 5, 8, 8, 1),
        (5000, 4097, 8192, 8192, 1),  # both round up to the same class
        ("1.5KiB", "1.5MiB", 2 * KiB, 2 * MiB, 11),
        (1, 2**48, 1, 2**48, 49),
        (2**32 + 1, 2**40 - 1, 2**33, 2**40, 8),
    ],
)
def test_classes_round_bounds_up_to_powers_of_two(
    lo: int | str, hi: int | str, min_size: int, max_size: int, count: int
) -> None:
    c = Classes(lo, hi)
    assert (c.min_size, c.max_size, c.count) == (min_size, max_size, count)
    assert c.sizes() == [min_size << i for i in range(count)]
    assert [c.size_of(i) for i in range(c.count)] == c.sizes()


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(8192, 4096), (4097, 4096), ("1MiB", "64KiB"), (2**33, 2**32)],
)
def test_classes_reject_min_above_max(lo: int | str, hi: int | str) -> None:
    with pytest.raises(ValueError, match="exceed"):
        Classes(lo, hi)


@pytest.mark.parametrize("hi", [2**48 + 1, 2**49, 2**64])
def test_classes_reject_max_above_largest_class(hi: int) -> None:
    with pytest.raises(ValueError, match="largest class"):
        Classes(1, hi)


@pytest.mark.parametrize(
    ("lo", "hi", "exc"),
    [
        (None, 10, TypeError),
        (10, None, TypeError),
        (True, 10, TypeError),
        (1, 2.0, TypeError),
        (0, 10, ValueError),
        (10, -1, ValueError),
        ("abc", 10, ValueError),
    ],
)
def test_classes_reject_bad_bounds(lo: object, hi: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Classes(lo, hi)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "index"),
    [
        (1, 0),
        (2, 0),
        (4095, 0),
        (4096, 0),  # min_size
        (4097, 1),  # min_size + 1
        (8192, 1),  # 2**k
        (8193, 2),  # 2**k + 1
        (16384, 2),
        (16385, 3),
        (32768, 3),
        (32769, 4),
        (65535, 4),
        (65536, 4),  # max_size
        (65537, None),  # max_size + 1: oversize
        (2**31 + 1, None),
        (2**32, None),
        (2**32 + 1, None),
        (2**48, None),
    ],
)
def test_index_of_boundaries(n: int, index: int | None) -> None:
    assert Classes(4096, 65536).index_of(n) == index


def test_index_of_picks_the_smallest_class_that_fits_far_above_2_32() -> None:
    c = Classes(64, 2**46)
    rng = random.Random(99)
    values = [rng.randrange(1, 2**46 + 1) for _ in range(2000)]
    values += [2**k + d for k in range(0, 47) for d in (-1, 0, 1) if 1 <= 2**k + d <= 2**46]
    for n in values:
        i = c.index_of(n)
        assert i is not None, n
        assert c.size_of(i) >= n, n
        assert i == 0 or c.size_of(i - 1) < n, n
    assert c.index_of(2**46) == c.count - 1
    assert c.index_of(2**46 + 1) is None
    assert c.index_of(2**33 + 1) == 34 - 6


def test_index_of_at_the_largest_supported_class() -> None:
    c = Classes(1, 2**MAX_SHIFT)
    assert c.index_of(2**MAX_SHIFT) == MAX_SHIFT
    assert c.index_of(2**MAX_SHIFT - 1) == MAX_SHIFT
    with pytest.raises(ValueError):
        c.index_of(2**MAX_SHIFT + 1)


@pytest.mark.parametrize(
    ("n", "exc"),
    [
        (1.0, TypeError),
        (4096.0, TypeError),
        ("4096", TypeError),
        (None, TypeError),
        (True, TypeError),
        (False, TypeError),
        (b"1", TypeError),
        (0, ValueError),
        (-1, ValueError),
        (-(2**64), ValueError),
        (2**MAX_SHIFT + 1, ValueError),
        (2**64, ValueError),
    ],
)
def test_index_of_rejects_bad_requests(n: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Classes(4096, 65536).index_of(n)  # type: ignore[arg-type]


def test_index_of_accepts_int_subclasses() -> None:
    class Size(enum.IntEnum):
        PAGE = 4096
        PAGE_PLUS = 4097

    c = Classes(4096, 65536)
    assert c.index_of(Size.PAGE) == 0
    assert c.index_of(Size.PAGE_PLUS) == 1


@pytest.mark.parametrize("index", [-1, 5, 100])
def test_size_of_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        Classes(4096, 65536).size_of(index)


def test_classes_repr() -> None:
    assert repr(Classes("4KiB", "64MiB")) == "Classes(4KiB..64MiB)"
    assert repr(Classes(1, 1023)) == "Classes(1B..1KiB)"


# ----------------------------------------------------------------- format_size


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (4096, "4KiB"),
        (65536, "64KiB"),
        (MiB, "1MiB"),
        (3 * MiB // 2, "1.5MiB"),
        (GiB, "1GiB"),
        (3 * GiB // 2, "1.5GiB"),
        (2**32, "4GiB"),
        (TiB, "1TiB"),
        (2**48, "256TiB"),
        (2**50, "1024TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize("k", range(MAX_SHIFT + 1))
def test_format_size_round_trips_powers_of_two(k: int) -> None:
    assert parse_size(format_size(2**k)) == 2**k
    if k >= 11:
        assert parse_size(format_size(3 * 2 ** (k - 1))) == 3 * 2 ** (k - 1)
