"""Power-of-two size-class math, as small pure functions.

The seed is GWS's buffer pool, which rounds a request up with ``binaryCeil``
on a 32-bit integer and so wraps to 0 above ``2**31``. Python integers do not
wrap, but we still bound every value explicitly: a class is ``2**k`` bytes with
``0 <= k <= MAX_SHIFT``.
"""

from __future__ import annotations

import operator
import re

__all__ = [
    "MAX_SHIFT",
    "Classes",
    "ceil_pow2",
    "format_size",
    "parse_size",
    "shift_of",
]

#: The largest size class we ever consider: 2**48 bytes (256 TiB).
MAX_SHIFT = 48

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` as a positive number of bytes.

    Accepts a positive ``int`` or a string such as ``"4096"``, ``"64KiB"``,
    ``"1 MiB"``, ``"1.5GiB"`` or ``"10MB"`` (binary and decimal units).

    Raises:
        TypeError: ``value`` is neither an ``int`` nor a ``str`` (``bool`` too).
        ValueError: the string does not parse, or the size is not positive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"{name} must be an int or a string like '64KiB', not {type(value).__name__}"
        )
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"{name}: cannot parse {value!r}; use bytes or units like '64KiB', '1MiB', '1GiB'"
            )
        n = (
            int(float(m.group(1)) * _UNITS[unit])
            if "." in m.group(1)
            else int(m.group(1)) * _UNITS[unit]
        )
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return n


def format_size(n: int) -> str:
    """Render a byte count compactly: ``4096 -> '4KiB'``, ``1536 -> '1.5KiB'``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


def shift_of(n: int) -> int:
    """Return the smallest ``k`` with ``2**k >= n`` (``n >= 1``)."""
    return (n - 1).bit_length()


def ceil_pow2(n: int) -> int:
    """Round ``n >= 1`` up to a power of two (``binaryCeil``, without the 32-bit wrap)."""
    return 1 << shift_of(n)


class Classes:
    """The size classes of one pool: ``2**min_shift .. 2**max_shift``.

    ``index_of(n)`` maps a request of ``n`` bytes to a class index, or returns
    ``None`` when ``n`` is above ``max_size`` (an oversize request).
    """

    __slots__ = ("count", "max_shift", "max_size", "min_shift", "min_size")

    def __init__(self, min_size: int | str, max_size: int | str) -> None:
        lo = parse_size(min_size, name="min_size")
        hi = parse_size(max_size, name="max_size")
        self.min_shift = shift_of(lo)
        self.max_shift = shift_of(hi)
        if self.max_shift > MAX_SHIFT:
            raise ValueError(f"max_size {hi} is above the largest class 2**{MAX_SHIFT}")
        if self.min_shift > self.max_shift:
            raise ValueError(f"min_size ({lo}) must not exceed max_size ({hi})")
        self.min_size = 1 << self.min_shift
        self.max_size = 1 << self.max_shift
        self.count = self.max_shift - self.min_shift + 1

    def size_of(self, index: int) -> int:
        """The capacity in bytes of class ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"class index {index} out of range 0..{self.count - 1}")
        return 1 << (self.min_shift + index)

    def index_of(self, n: int) -> int | None:
        """The class index for a request of ``n`` bytes; ``None`` if oversize.

        Raises:
            TypeError: ``n`` is not an ``int``.
            ValueError: ``n <= 0``.
        """
        check_request(n)
        if n <= self.min_size:
            return 0
        k = shift_of(n)
        return k - self.min_shift if k <= self.max_shift else None

    def sizes(self) -> list[int]:
        return [1 << k for k in range(self.min_shift, self.max_shift + 1)]

    def __repr__(self) -> str:
        return f"Classes({format_size(self.min_size)}..{format_size(self.max_size)})"


def check_request(n: object) -> int:
    """Validate a requested byte count; return it.

    Raises:
        TypeError: ``n`` is not an integer (``operator.index``; ``bool`` is refused).
        ValueError: ``n <= 0`` or ``n`` is above ``2**MAX_SHIFT``.
    """
    if type(n) is not int:
        if isinstance(n, bool):
            raise TypeError("size must be an int, not bool")
        try:
            n = operator.index(n)  # type: ignore[arg-type]  # int subclasses, numpy ints
        except TypeError:
            raise TypeError(f"size must be an int, not {type(n).__name__}") from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {n}")
    if n > 1 << MAX_SHIFT:
        raise ValueError(f"size {n} is above the largest supported buffer (2**{MAX_SHIFT} bytes)")
    return n
