"""Leases: one slot of shared memory in the hands of this process.

The hot path lives here and in ``Pool.acquire``: a release appends the slot to
the cache list it came from (``_Slot.home``), and only a cache grown past its
high-water mark calls back into the pool. No lock, no syscall, no allocation
beyond the Lease and its memoryview.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import LeaseClosedError
from .handle import Handle
from .protocol import SlotRef

if TYPE_CHECKING:
    from .client import Pool

__all__ = ["Lease"]


class _Cache(list):  # type: ignore[type-arg]
    """One class's free slots in this process, with its high-water mark."""

    __slots__ = ("cls", "high", "pool")

    def __init__(self, pool: Pool, cls: int, high: int) -> None:
        super().__init__()
        self.pool = pool
        self.cls = cls
        self.high = high


class _OversizeHome:
    """Where an oversize slot "returns" on release: straight to the manager."""

    __slots__ = ("pool",)
    high = 1

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def append(self, slot: _Slot) -> None:
        self.pool._release_oversize(slot)

    def __len__(self) -> int:
        return 0


class _SharedHome(_OversizeHome):
    """Where a reader's share of a slot goes on release: back to the manager."""

    __slots__ = ()

    def append(self, slot: _Slot) -> None:
        self.pool._release_shared(slot)


class _Borrowed(_OversizeHome):
    """Where a slot lent by another process goes on release: back to its lender.

    Its ticket word says so (``Pool._give_back``); the lender takes it back
    into its cache. No message is sent.
    """

    __slots__ = ()

    def append(self, slot: _Slot) -> None:
        self.pool._give_back(slot)


class _Slot:
    """A slot this process holds (in a Lease or in its local cache)."""

    __slots__ = ("capacity", "home", "ref", "view")

    def __init__(self, ref: SlotRef, view: memoryview, home: Any) -> None:
        self.ref = ref
        self.view = view  # the whole slot; each Lease gets its own slice of it
        self.capacity = len(view)
        self.home = home  # a _Cache, or an _OversizeHome (or one of its kinds)


class _PyLeaseBase:
    """The pure-Python core of Lease (the C twin is ``_speedups.LeaseBase``)."""

    __slots__ = ("_slot", "_view")
    _slot: _Slot
    _view: memoryview | None

    def __init__(self) -> None:
        raise TypeError("leases come from Pool.acquire()")

    @property
    def view(self) -> memoryview:
        """The writable memoryview; raises ``LeaseClosedError`` once released."""
        v = self._view
        if v is None:
            raise LeaseClosedError("this lease was released; acquire a new one")
        return v

    def release(self) -> None:
        """Give the slot back to the pool; calling it again does nothing.

        Raises:
            BufferError: the view is still exported; the lease stays open.
        """
        v = self._view
        if v is None:
            return
        try:
            v.release()  # first: it refuses while exported, and the lease stays open
        except BufferError as exc:
            raise _still_exported(exc) from None
        if self._view is not v:
            return  # another thread closed it meanwhile (see _close)
        self._view = None
        slot = self._slot
        home = slot.home
        home.append(slot)
        if len(home) > home.high:
            home.pool._trim(home)

    close = release

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __reduce__(self) -> Any:
        return self._reduce_slow()  # type: ignore[attr-defined]

    def _disown(self) -> bool:
        """Forget the slot without returning it (its ownership moved); False if closed.

        Raises:
            BufferError: the view is still exported; the lease stays open.
        """
        return _close(self)


def _close(lease: _PyLeaseBase) -> bool:
    """Release the lease's view, then mark it closed; False if closed already.

    ``release()`` does the same inline (it is the hot path). The view goes
    first: while something exports it (a ``PickleBuffer``, a C extension,
    I/O in another thread) it refuses, and the lease must stay open then,
    its slot neither returned nor lost. Releasing a released view does
    nothing, and no call stands between the check and the store below: of
    two threads closing the lease at once, one does.
    """
    view = lease._view
    if view is None:
        return False
    _release_view(view)
    if lease._view is not view:
        return False
    lease._view = None
    return True


def _release_view(view: memoryview) -> None:
    """Release a lease's view, the step of closing it that can fail.

    Raises:
        BufferError: the view is still exported (a clearer message than memoryview's).
    """
    try:
        view.release()
    except BufferError as exc:
        raise _still_exported(exc) from None


def _still_exported(cause: BufferError) -> BufferError:
    """The error for closing a lease whose view is exported (``cause``: memoryview's)."""
    return BufferError(
        f"the lease's view is still exported ({cause}): release that export (a "
        "PickleBuffer, a buffer held by a C extension or by I/O in another thread) "
        "first, then close the lease again; it stays open until then"
    )


try:
    if os.environ.get("SHMPOOL_NO_SPEEDUPS", "0") not in ("", "0"):
        raise ImportError("disabled by SHMPOOL_NO_SPEEDUPS")
    from . import _speedups  # type: ignore[attr-defined]
except ImportError:
    _speedups = None
    _LeaseBase: Any = _PyLeaseBase
else:
    _speedups.configure(LeaseClosedError, _Slot, _Cache)
    _LeaseBase = _speedups.LeaseBase

#: True when the C hot path is in use.
SPEEDUPS = _speedups is not None


class Lease(_LeaseBase):  # type: ignore[misc]
    """A leased buffer: ``view`` is a writable memoryview over shared memory.

    ``len(lease.view)`` is the size asked for; ``capacity`` is the size class
    behind it. Release it with ``release()`` (or ``close()``) or by leaving a
    ``with`` block; releasing twice is harmless. After release, ``view``
    raises ``LeaseClosedError`` and the memoryview handed out earlier is
    released too (slices taken from it are not: do not keep them). A Lease
    dropped without release stays leased to this process until its pool
    closes.

    While the view is exported (a ``pickle.PickleBuffer`` of it is alive, a C
    extension or another thread's I/O holds its buffer), ``release()``,
    leaving a ``with`` block, ``detach()``, ``share()`` and pickling refuse
    with ``BufferError`` and leave the lease open and usable: release the
    export, then close the lease again.
    """

    __slots__ = ()

    @property
    def capacity(self) -> int:
        """The size class of the slot (a power of two, or the oversize length)."""
        return self._slot.capacity  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        """The number of bytes asked for, ``len(lease.view)``."""
        return len(self.view)

    @property
    def closed(self) -> bool:
        return self._view is None

    def __len__(self) -> int:
        return len(self.view)

    def detach(self) -> Handle:
        """Give up this lease here and return a ``Handle`` for another process.

        The Lease is unusable afterwards, as if released; the slot waits
        until some process calls ``pool.attach(handle)`` (once), or comes
        back after the manager's transit timeout. A slot of a size class is
        lent: it returns to this process's cache when the last process it
        was handed to releases it.

        Raises:
            LeaseClosedError: released or detached already.
            UsageError: the lease was inherited from a parent process.
            BufferError: the view is still exported; the lease stays open.
            ManagerGoneError, PoolClosedError.
        """
        if self._view is None:
            raise LeaseClosedError("this lease was released or detached already")
        return self._slot.home.pool._detach(self)  # type: ignore[no-any-return]

    def share(self, readers: int = 1) -> Handle:
        """Publish this buffer read-only to ``readers`` attaches of the returned handle.

        Like ``detach()``, the Lease is unusable here afterwards. Each
        ``pool.attach(handle)``, in any process, gives a Lease with a read-only
        view of the same memory; the slot returns to the pool when the last
        of them is released.

        Raises:
            ValueError: ``readers`` is not 1..65536.
            BufferError: the view is still exported; the lease stays open.
            LeaseClosedError, UsageError, ManagerGoneError, PoolClosedError.
        """
        if type(readers) is not int or not 1 <= readers <= 1 << 16:
            raise ValueError(f"readers must be an int in 1..65536, not {readers!r}")
        if self._view is None:
            raise LeaseClosedError("this lease was released or detached already")
        return self._slot.home.pool._detach(self, readers)  # type: ignore[no-any-return]

    def __copy__(self) -> Lease:
        raise TypeError("a Lease cannot be copied: it is the one owner of its slot")

    def __deepcopy__(self, memo: Any) -> Lease:
        raise TypeError("a Lease cannot be copied: it is the one owner of its slot")

    def _reduce_slow(self) -> tuple[Any, tuple[int, ...]]:
        # Pickling hands the slot over: see shmpool.handle for when ownership moves.
        # The handle goes as plain ints: cheaper to pickle than the NamedTuple.
        # (__reduce__ is the base's: in C, the common case of this, else this.)
        if self._view is None:
            raise LeaseClosedError("this lease was released or detached already")
        return (_unpickle, self._slot.home.pool._hand_off(self))

    def __repr__(self) -> str:
        ref = self._slot.ref
        view = self._view
        state = "released" if view is None else f"size={len(view)}"
        return f"<shmpool.Lease {ref.segment}:{ref.index} capacity={self._slot.capacity} {state}>"


_new_lease = object.__new__


def _unpickle(*fields: int) -> Lease:
    """Stands in until ``shmpool.client`` (which imports this module) sets the real one."""
    raise RuntimeError("shmpool.client is not imported")  # pragma: no cover


def make_lease(slot: _Slot, size: int) -> Lease:
    """A new Lease over ``slot`` showing its first ``size`` bytes."""
    if _speedups is not None:
        return _speedups.make_lease(Lease, slot, size)  # type: ignore[no-any-return]
    lease: Lease = _new_lease(Lease)
    lease._slot = slot
    lease._view = slot.view[:size]
    return lease
