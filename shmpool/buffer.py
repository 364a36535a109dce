"""Leases: one slot of shared memory in the hands of this process.

The hot path lives here and in ``Pool.acquire``: a release appends the slot to
the cache list it came from (``_Slot.home``), and only a cache grown past its
high-water mark calls back into the pool. No lock, no syscall, no allocation
beyond the Lease and its memoryview.

Metering. Each Lease counts its length in its pool's meter (``_PyMeter``, or
the C ``Meter``) from when it is made to when its view is released, whichever
way that happens (release, detach, share, pickling); ``Pool.usage()`` reads
the meter and the pool reports it to the manager. The bytes leave the meter
on the one path that closes the view, after the check that makes one thread
of several close it, and not when the release is refused (an exported view:
the lease stays open). A lease keeps the meter it was counted in: when its
pool starts over (a fork, a new connection) with a new meter, the old leases
settle with the old one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ._native import speedups
from .errors import LeaseClosedError
from .handle import Handle
from .protocol import SlotRef
from .sizeclass import MAX_SHIFT

__all__ = ["Lease", "LeaseHome"]


class LeaseHome(Protocol):
    """What a lease calls in the pool it came from (a ``Pool``), and nothing else.

    The slow half of each move a slot makes: a cache past its high-water
    mark, an oversize or shared slot going back to the manager, a borrowed
    slot going back to its lender, a detach, a pickling.
    """

    def _trim(self, cache: _Cache) -> None: ...

    def _release_oversize(self, slot: _Slot) -> None: ...

    def _release_shared(self, slot: _Slot) -> None: ...

    def _give_back(self, slot: _Slot) -> None: ...

    def _detach(self, lease: Lease, readers: int = 0) -> Handle: ...

    def _hand_off(self, lease: Lease) -> tuple[int, ...]: ...


class _Cache(list):  # type: ignore[type-arg]
    """One class's free slots in this process, with its high-water mark."""

    __slots__ = ("cls", "high", "pool")

    def __init__(self, pool: LeaseHome, cls: int, high: int) -> None:
        super().__init__()
        self.pool = pool
        self.cls = cls
        self.high = high


class _OversizeHome:
    """Where an oversize slot "returns" on release: straight to the manager."""

    __slots__ = ("pool",)
    high = 1

    def __init__(self, pool: LeaseHome) -> None:
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
    into its cache. With the C extension no message is sent; without it a
    RETURNED notice is queued for the manager.
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


class _PyMeter:
    """What a pool's leases use (the C twin is ``_speedups.Meter``).

    ``requested[k]``: the bytes of the open leases whose length ``n`` has
    ``(n - 1).bit_length() == k``; ``sizes[k]``: the acquires of such a size
    that returned a lease. ``k`` runs 0..MAX_SHIFT. The GIL guards each
    ``+=`` on a list item (no thread switch falls inside one).
    """

    __slots__ = ("requested", "sizes")

    def __init__(self) -> None:
        self.requested = [0] * (MAX_SHIFT + 1)
        self.sizes = [0] * (MAX_SHIFT + 1)

    def snapshot(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(requested, sizes)``, as they are now."""
        return tuple(self.requested), tuple(self.sizes)

    def count_acquire(self, size: int) -> None:
        """An acquire of ``size`` bytes returned a lease."""
        self.sizes[(size - 1).bit_length()] += 1


class _PyLeaseBase:
    """The pure-Python core of Lease (the C twin is ``_speedups.LeaseBase``)."""

    # _length: len(_view) when made, which a view its user released (``with
    # lease.view:``) no longer tells; what the meter counts, at _bucket (its
    # (n - 1).bit_length(), kept so that release() need not work it out again).
    __slots__ = ("_bucket", "_length", "_meter", "_slot", "_view")
    _bucket: int
    _length: int
    _meter: _PyMeter
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
        self._meter.requested[self._bucket] -= self._length
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
    two threads closing the lease at once, one does, and takes its bytes off
    its meter.
    """
    view = lease._view
    if view is None:
        return False
    _release_view(view)
    if lease._view is not view:
        return False
    lease._view = None
    lease._meter.requested[lease._bucket] -= lease._length
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


_speedups: Any = speedups
if _speedups is None:
    _LeaseBase: Any = _PyLeaseBase
    _Meter: Any = _PyMeter
else:
    _speedups.configure(LeaseClosedError, _Slot, _Cache)
    _LeaseBase = _speedups.LeaseBase
    _Meter = _speedups.Meter

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
        return (_rebuild, self._slot.home.pool._hand_off(self))

    def __repr__(self) -> str:
        ref = self._slot.ref
        view = self._view
        state = "released" if view is None else f"size={len(view)}"
        return f"<shmpool.Lease {ref.segment}:{ref.index} capacity={self._slot.capacity} {state}>"


_new_lease = object.__new__


def _not_configured(*fields: int) -> Lease:
    raise RuntimeError("shmpool.registry is not imported")  # pragma: no cover


#: What a pickled Lease names to rebuild it: ``registry.rebuild_lease``.
_rebuild: Callable[..., Lease] = _not_configured


def configure_pickling(rebuild: Callable[..., Lease]) -> None:
    """Name ``rebuild`` (called with a handle's fields) in the pickles of leases.

    ``shmpool.registry`` calls it once, at import: this module cannot import
    the registry, which imports it.
    """
    global _rebuild
    _rebuild = rebuild


def make_lease(slot: _Slot, size: int, meter: Any = None) -> Lease:
    """A new Lease over ``slot`` showing its first ``size`` bytes, counted in ``meter``.

    Every pool passes its own; without one (a lease made outside any pool)
    the lease counts in a meter of its own, which nobody reads.
    """
    if meter is None:
        meter = _Meter()
    if _speedups is not None:
        return _speedups.make_lease(Lease, slot, size, meter)  # type: ignore[no-any-return]
    lease: Lease = _new_lease(Lease)
    lease._slot = slot
    view = slot.view[:size]
    n = len(view)
    lease._view = view
    lease._length = n
    lease._bucket = k = (n - 1).bit_length()
    lease._meter = meter
    meter.requested[k] += n
    return lease
