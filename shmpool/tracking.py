"""Lease tracking: where each lease of a pool was acquired, and which are held long.

Off by default, and then it costs nothing: ``Pool.acquire`` stays the C
``Acquirer`` (or the plain method). A pool made with ``track=True`` (or with
``$SHMPOOL_TRACK`` set) shadows ``acquire`` with ``Tracker.acquire``, a
Python wrapper that calls the untracked acquire and then notes, on the
lease (``Lease._origin``), the time and the few frames of its caller
(``sys._getframe``: about a microsecond, no source lines read), and keeps a
weak reference to it. From those it lists the leases still open
(``Pool.held_leases()``), names the acquire in the ``ResourceWarning`` of a
lease collected unreleased, and reports the long-held ones to the manager
(``leasereport``), which only this process can see.
"""

from __future__ import annotations

import math
import os
import sys
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import protocol as p
from .buffer import Lease
from .leasereport import REPORT_AFTER, REPORT_PERIOD, frame_text

__all__ = ["TRACK_VAR", "Tracker", "wanted"]

#: Set to anything but empty or ``0`` to track the leases of every pool.
TRACK_VAR = "SHMPOOL_TRACK"

Origin = tuple[float, tuple[tuple[str, int, str], ...]]


def wanted(track: bool | None) -> bool:
    """``track`` if given, else whether ``$SHMPOOL_TRACK`` asks for tracking."""
    if track is None:
        return os.environ.get(TRACK_VAR, "") not in ("", "0")
    if not isinstance(track, bool):
        raise TypeError(f"track must be a bool or None, not {type(track).__name__}")
    return track


def frames(
    frame: FrameType | None, limit: int = p.MAX_LEASE_FRAMES
) -> tuple[tuple[str, int, str], ...]:
    """``(file, line, function)`` of ``frame`` and its callers, innermost first."""
    out: list[tuple[str, int, str]] = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    return tuple(out)


class Tracker:
    """One pool's tracked leases (weakly held), and what it last told the manager."""

    def __init__(self, acquire: Callable[..., Lease]) -> None:
        self._acquire = acquire  # the untracked acquire (C Acquirer or the method)
        self._leases: set[weakref.ref[Lease]] = set()
        self._sent: tuple[tuple[int, float], ...] = ()  # (id, acquired) of the last report
        self._sent_at = -math.inf

    def acquire(self, size: int, timeout: float | None = None) -> Lease:
        """``Pool.acquire``, noting where and when (the same arguments, errors and result)."""
        # The C Acquirer serves a cache hit only when called with the size alone.
        lease = self._acquire(size) if timeout is None else self._acquire(size, timeout)
        # A base slot (C: a getset) that Lease's empty __slots__ hides from mypy.
        lease._origin = (time.monotonic(), frames(sys._getframe(1)))  # type: ignore[misc]
        self._leases.add(weakref.ref(lease, self._leases.discard))
        return lease

    def open_leases(self, older_than: float = 0.0, now: float | None = None) -> list[Lease]:
        """The tracked leases still open, held ``older_than`` seconds or more, oldest first."""
        now = time.monotonic() if now is None else now
        found = []
        for ref in list(self._leases):  # list(): atomic, while acquires add to the set
            lease = ref()
            if lease is None:
                continue
            if lease.closed:
                self._leases.discard(ref)
                continue
            origin = lease._origin_or_none()
            if origin is not None and now - origin[0] >= older_than:
                found.append((origin[0], lease))
        found.sort(key=lambda pair: pair[0])
        return [lease for _, lease in found]

    def entries(self, older_than: float = 0.0) -> list[dict[str, Any]]:
        """``Pool.held_leases()``: one dict per open tracked lease, oldest first."""
        now = time.monotonic()
        out = []
        for lease in self.open_leases(older_than, now):
            origin = lease._origin_or_none()
            if origin is None or lease.closed:  # released meanwhile, by another thread
                continue
            ref = lease._slot.ref
            out.append(
                {
                    "slot": f"{ref.segment}:{ref.index}",
                    "size": lease._length,
                    "capacity": lease.capacity,
                    "age": round(now - origin[0], 3),
                    "where": [frame_text(*f) for f in origin[1]],
                }
            )
        return out

    def report(self, req: Callable[[], int], older_than: float | None = None) -> p.Leases | None:
        """The ``Leases`` report to send now, or None when none is due.

        ``older_than`` None (the janitor): at most every ``REPORT_PERIOD``,
        the leases held ``REPORT_AFTER`` or more, and only if that list
        changed (the manager ages them itself). Else (before a Stats that
        asks for leases) at once, down to ``older_than``.
        """
        now = time.monotonic()
        if older_than is None and now - self._sent_at < REPORT_PERIOD:
            return None
        after = REPORT_AFTER if older_than is None else min(REPORT_AFTER, older_than)
        open_now = self.open_leases(0.0, now)
        records: list[p.LeaseRecord] = []
        key: list[tuple[int, float]] = []
        for lease in open_now:
            origin = lease._origin_or_none()
            if origin is None or now - origin[0] < after or len(records) == p.MAX_LEASE_RECORDS:
                continue
            ref = lease._slot.ref
            where = tuple(frame_text(*f) for f in origin[1])
            age_ms = min(p.MAX_LEASE_AGE_MS, int((now - origin[0]) * 1000))
            records.append(p.LeaseRecord(ref.segment, ref.index, lease._length, age_ms, where))
            key.append((id(lease), origin[0]))
        if older_than is None and tuple(key) == self._sent:
            return None
        self._sent, self._sent_at = tuple(key), now
        return p.Leases(req(), max(len(open_now), len(records)), tuple(records))
