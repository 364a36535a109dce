"""Leases: one slot of shared memory in the hands of this process."""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import LeaseClosedError
from .protocol import SlotRef

if TYPE_CHECKING:
    from .client import Pool

__all__ = ["Lease"]


class _Slot:
    """A slot this process holds (in a Lease or in its local cache)."""

    __slots__ = ("capacity", "cls", "home", "ref", "view")

    def __init__(self, ref: SlotRef, view: memoryview, cls: int, home: list[_Slot] | None) -> None:
        self.ref = ref
        self.view = view  # the whole slot; a Lease gets its own slice of it
        self.capacity = len(view)
        self.cls = cls  # class index, -1 for oversize
        self.home = home  # the cache list it returns to; None: give it to the manager


class Lease:
    """A leased buffer: ``view`` is a writable memoryview over shared memory.

    ``len(lease.view)`` is the size asked for; ``capacity`` is the size class
    behind it. Release it with ``release()`` or by leaving a ``with`` block;
    releasing twice is harmless. After release, ``view`` raises
    ``LeaseClosedError`` and the memoryview handed out earlier is released
    too (slices taken from it are not: do not keep them).
    """

    __slots__ = ("__weakref__", "_pool", "_slot", "_view")

    def __init__(self, pool: Pool, slot: _Slot, size: int) -> None:
        self._pool = pool
        self._slot = slot
        self._view: memoryview | None = slot.view[:size]

    @property
    def view(self) -> memoryview:
        """The writable memoryview; raises ``LeaseClosedError`` once released."""
        v = self._view
        if v is None:
            raise LeaseClosedError("this lease was released; acquire a new one")
        return v

    @property
    def capacity(self) -> int:
        """The size class of the slot (a power of two, or the oversize length)."""
        return self._slot.capacity

    @property
    def size(self) -> int:
        """The number of bytes asked for, ``len(lease.view)``."""
        return len(self.view)

    @property
    def closed(self) -> bool:
        return self._view is None

    def release(self) -> None:
        """Give the slot back to the pool; calling it again does nothing."""
        v = self._view
        if v is None:
            return
        self._view = None
        v.release()
        self._pool._put(self._slot)

    close = release

    def __len__(self) -> int:
        return len(self.view)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        if self._view is not None:
            warnings.warn(
                f"unreleased {self!r} was garbage-collected; release leases explicitly",
                ResourceWarning,
                stacklevel=2,
            )
            self._view = None
            self._pool._put(self._slot, from_gc=True)

    def __repr__(self) -> str:
        ref = self._slot.ref
        state = "released" if self._view is None else f"size={len(self._view)}"
        return f"<shmpool.Lease {ref.segment}:{ref.index} capacity={self._slot.capacity} {state}>"
