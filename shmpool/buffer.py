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

A lease is a buffer. ``memoryview(lease)``, ``bytes(lease)`` and
``numpy.asarray(lease)`` export the lease's own view (the ``size`` bytes
asked for), so each export pins the lease exactly as a ``PickleBuffer`` of
``lease.view`` does: ``release()`` refuses with ``BufferError`` while one
lives. In C that is ``bf_getbuffer``; in pure Python it takes PEP 688's
``__buffer__``, so Python 3.12 or later (``lease.view`` works everywhere).

Dropped leases. A lease destroyed while still open gives its slot back
(``_dropped_slot``, from the C dealloc, or ``__del__`` here) and warns with
``ResourceWarning``. A finalizer may run anywhere, even inside the pool's
own locked code (a garbage collection there), and the pool's lock is not
reentrant: so a class slot only goes back on its cache list (lock-free, as
every release), and a slot whose way back needs the lock (oversize, a
reader's share, a borrowed one) goes back at once only while that lock is
free, else at the pool's next ``tick()`` (``return_dropped``). An exported
lease cannot give its slot back (someone still uses the memory): it stays
leased to this process until its pool closes, and the warning says so.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._native import speedups
from .errors import LeaseClosedError
from .handle import Handle
from .protocol import SlotRef
from .sizeclass import MAX_SHIFT

if TYPE_CHECKING:
    import numpy

    if sys.version_info >= (3, 11):
        from typing import Self
    else:
        from typing_extensions import Self

__all__ = ["Lease", "LeaseHome"]

log = logging.getLogger("shmpool")


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
    # _origin: (monotonic time, frames) of the acquire when its pool tracks
    # leases (unset otherwise); __weakref__: such a pool lists its leases weakly.
    __slots__ = ("__weakref__", "_bucket", "_length", "_meter", "_origin", "_slot", "_view")
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

    def __del__(self) -> None:
        try:
            if self._view is None:
                return
        except AttributeError:  # never finished being made
            return
        _dropped(self)

    if sys.version_info >= (3, 12):

        def __buffer__(self, flags: int) -> memoryview:
            """PEP 688: an export of ``view`` (see the module's doc); raises once released."""
            return self.view  # Python exports it, and holds this lease while it lives

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


#: Slots of leases collected unreleased whose way back needs their pool's
#: lock, which was taken then: ``return_dropped`` sends them (``list.append``
#: and ``list.pop`` are atomic under the GIL).
_dropped_slots: list[_Slot] = []


def _dropped(lease: _PyLeaseBase) -> None:
    """``__del__`` of a lease still open (pure Python): close it, then ``_dropped_slot``."""
    # the view first: kept by someone (``pool.acquire(n).view``: 2 is the
    # lease's reference and getrefcount's), or exported, it stays open
    if sys.getrefcount(lease._view) > 2:
        closed = False
    else:
        try:
            closed = _close(lease)
        except BufferError:
            closed = False
        else:
            if not closed:
                return  # another thread closed it meanwhile
    _dropped_slot(lease._slot, lease._length, getattr(lease, "_origin", None), closed)


def _dropped_slot(slot: _Slot, length: int, origin: Any, closed: bool) -> None:
    """A lease was destroyed unreleased (its view now closed unless ``closed`` is False):
    give its slot back, then warn.

    The C dealloc calls this (``configure_finalizer``), ``__del__`` in pure
    Python; neither passes the lease, which is being destroyed. See the
    module's doc for why some slots wait for ``return_dropped``. The warning
    comes last: a filter that turns it into an error must not keep the slot.
    """
    if not closed:
        outcome = (
            "its view was still in use (referenced or exported), so its slot stays leased "
            "to this process until the pool closes"
        )
    else:
        outcome = "its slot went back to the pool"
        home = slot.home
        if type(home) is _Cache:
            home.append(slot)  # a later release or trim takes the cache back under its mark
        else:
            _dropped_slots.append(slot)
            _return_dropped_now(slot)
    _warn_dropped(slot, length, origin, outcome)


def _return_dropped_now(slot: _Slot) -> None:
    """Send back a dropped lease's slot if its pool's lock is free now, else leave it queued."""
    lock = _lock_of(slot)
    if lock is not None and not lock.locked():  # not ours either: we could not take it then
        return_dropped()


def _lock_of(slot: _Slot) -> Any:
    """The lock of the connection ``slot`` goes back through, or None."""
    pool = getattr(slot.home, "pool", None)  # a Pool, or for a borrowed slot a Lending
    conn = getattr(pool, "_conn", None) or getattr(pool, "conn", None)
    return getattr(conn, "lock", None)


def return_dropped() -> int:
    """Send back the queued slots of dropped leases whose pool's lock is free; how many went.

    ``Pool.tick()`` calls it, without its lock held. Errors (a pool that
    lost its manager) leave the slot to the pool's close, as a release does.
    """
    sent = 0
    for _ in range(len(_dropped_slots)):
        try:
            slot = _dropped_slots.pop(0)
        except IndexError:
            break
        lock = _lock_of(slot)
        if lock is not None and lock.locked():
            _dropped_slots.append(slot)  # later
            continue
        try:
            slot.home.append(slot)
        except Exception as exc:  # its pool broke: its close() settles the slot
            log.debug("a dropped lease's slot %s did not go back: %r", slot.ref, exc)
        sent += 1
    return sent


def _warn_dropped(slot: _Slot, length: int, origin: Any, outcome: str) -> None:
    """The ``ResourceWarning`` for a lease collected without ``release()``."""
    where = format_origin(origin)
    if where:
        acquired = "it was acquired at:\n" + where
    else:
        acquired = (
            "to see where it was acquired, connect with shmpool.connect(..., track=True) "
            "or set SHMPOOL_TRACK=1"
        )
    warnings.warn(
        f"a shmpool.Lease of {length} bytes (slot {slot.ref.segment}:{slot.ref.index}, capacity "
        f"{slot.capacity}) was garbage-collected without release(); {outcome}. Release "
        f"leases with `with pool.acquire(n) as lease:` or lease.release(); {acquired}",
        ResourceWarning,
        stacklevel=2,
    )


def format_origin(origin: Any) -> str:
    """``Lease._origin``'s frames as lines ``  File "f", line n, in fn`` (innermost first)."""
    if not origin:
        return ""
    return "\n".join(f'  File "{f}", line {n}, in {fn}' for f, n, fn in origin[1])


_speedups: Any = speedups
if _speedups is None:
    _LeaseBase: Any = _PyLeaseBase
    _Meter: Any = _PyMeter
else:
    _speedups.configure(LeaseClosedError, _Slot, _Cache)
    _speedups.configure_finalizer(_dropped_slot)
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
    garbage-collected without release gives its slot back and warns with
    ``ResourceWarning``.

    A Lease is a buffer: ``memoryview(lease)``, ``bytes(lease)`` and
    ``numpy.asarray(lease)`` see the same ``size`` bytes as ``view``, and
    ``lease.ndarray(dtype, shape)`` makes a numpy array over them. Such an
    export keeps the lease open like an export of ``view`` (below); after
    release they raise ``LeaseClosedError``. (Without the C extension this
    needs Python 3.12+, PEP 688.)

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
        if self._view is None:
            raise LeaseClosedError("this lease was released; acquire a new one")
        length: int = self._length  # len(view) fails on a view its user released
        return length

    @property
    def closed(self) -> bool:
        return self._view is None

    def __len__(self) -> int:
        return self.size

    if TYPE_CHECKING:  # the base's, in C or in Python; typed here

        def __enter__(self) -> Self: ...

        def __exit__(self, *exc: object) -> None: ...

        def __buffer__(self, flags: int) -> memoryview: ...

        _origin: tuple[float, tuple[tuple[str, int, str], ...]] | None

    def _origin_or_none(self) -> tuple[float, tuple[tuple[str, int, str], ...]] | None:
        """``_origin``, or None when its pool does not track leases (pure Python: unset)."""
        return getattr(self, "_origin", None)

    def ndarray(
        self, dtype: Any = "u1", shape: int | tuple[int, ...] | None = None
    ) -> numpy.ndarray[Any, Any]:
        """A numpy array of ``dtype`` over this lease's memory (no copy).

        ``shape`` None: one dimension, as many items as the lease's ``size``
        bytes hold (``size`` must be a multiple of the item size). The array
        covers the ``size`` bytes asked for, like ``view``; ask for a larger
        lease to use more of the slot. It is read-only for a reader's lease
        (``share()``). While the array (or anything made from it) lives, the
        lease stays open: ``release()`` raises ``BufferError``.

        Raises:
            LeaseClosedError: the lease was released.
            ModuleNotFoundError: numpy is not installed.
            ValueError: the shape does not fit in ``size`` bytes, or
                ``shape`` is None and ``size`` is not a multiple of the item size.
            TypeError: ``dtype`` is not a numpy dtype.
        """
        view = self.view  # raises LeaseClosedError once released
        try:
            import numpy as np
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                "Lease.ndarray() needs numpy (pip install numpy); lease.view works without it",
                name="numpy",
            ) from exc
        dt = np.dtype(dtype)
        size = len(view)
        if shape is None:
            if dt.itemsize == 0 or size % dt.itemsize:
                raise ValueError(
                    f"the lease's {size} bytes are not a whole number of {dt} items "
                    f"({dt.itemsize} bytes each): pass a shape"
                )
            shape = (size // dt.itemsize,)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        need = dt.itemsize * _product(dims)
        if any(d < 0 for d in dims) or need > size:
            raise ValueError(
                f"an array of shape {dims} and dtype {dt} needs {need} bytes; this lease "
                f"shows {size} (its slot holds {self.capacity}): acquire a larger lease"
            )
        array: numpy.ndarray[Any, Any] = np.ndarray(dims, dt, buffer=_pinning(view))
        return array

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
        state = "released" if view is None else f"size={self._length}"
        return f"<shmpool.Lease {ref.segment}:{ref.index} capacity={self._slot.capacity} {state}>"


def _product(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _pinning(view: memoryview) -> Any:
    """An object whose buffer is an export of ``view``, held while the object lives.

    numpy's ``ndarray(buffer=obj)`` releases the buffer it got at once and
    keeps ``obj`` as its base: with the lease as ``obj`` nothing would pin
    the lease. A ``PickleBuffer`` holds its export of the view until it goes,
    and it goes with the last array made from it.
    """
    import pickle

    return pickle.PickleBuffer(view)


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
