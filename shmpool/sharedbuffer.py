"""SharedBuffer: a growable file-like buffer in pooled shared memory.

The analogue of Go's ``bytes.Buffer`` that GWS pools, with the
``io.BufferedIOBase`` interface (``write``, ``read``, ``readinto``, ``seek``,
``tell``, ``truncate``, ``getbuffer``, ``len``), so ``pickle.dump(obj, buf)``
and ``numpy.save(buf, arr)`` write straight into shared memory.

Growth: when a write does not fit, the buffer moves to a larger size class
(at least double, as ``bytes.Buffer`` does): it acquires the larger slot,
copies what it holds, and releases the smaller one. It never grows past what
the pool allows: ``PoolExhaustedError`` then, with the buffer unchanged.
As with ``io.BytesIO``, it refuses to move (``BufferError``) while the view
``getbuffer()`` returned is still alive. Views derived from it (a slice, a
numpy array) cannot be counted on Python 3.11, so a slot that ever lent a
view is kept, not recycled, when the buffer outgrows it, until the buffer is
closed or detached: such a view only ever sees this buffer's old bytes,
never another lease's.

Handing it over: ``detach()`` returns a ``Handle`` (the logical length is
its ``length``), ``pool.attach_buffer(handle)`` rebuilds the buffer in
another process, and pickling does both, as for a Lease.
"""

from __future__ import annotations

import io
import operator
import sys
from collections.abc import Callable
from typing import Any, Protocol

from .buffer import Lease
from .errors import LeaseClosedError
from .handle import Handle
from .protocol import seal_token

__all__ = ["BufferHome", "SharedBuffer", "configure_pickling"]


class BufferHome(Protocol):
    """What a SharedBuffer needs of its pool (a ``Pool``): leases to grow into."""

    def acquire(self, size: int, timeout: float | None = None) -> Lease: ...


def _not_configured(handle: Handle) -> SharedBuffer:
    raise RuntimeError("shmpool.registry is not imported")  # pragma: no cover


#: What a pickled SharedBuffer names to rebuild it: ``registry.rebuild_buffer``.
_rebuild: Callable[[Handle], SharedBuffer] = _not_configured


def configure_pickling(rebuild: Callable[[Handle], SharedBuffer]) -> None:
    """Name ``rebuild`` (called with a handle) in the pickles of shared buffers.

    ``shmpool.registry`` calls it once, at import (it imports this module).
    """
    global _rebuild
    _rebuild = rebuild


class SharedBuffer(io.BufferedIOBase):
    """A growable, seekable byte buffer whose bytes live in a pooled slot."""

    def __init__(
        self, pool: BufferHome, size_hint: int = 0, *, _lease: Lease | None = None
    ) -> None:
        super().__init__()
        if type(size_hint) is not int or size_hint < 0:
            raise ValueError(f"size_hint must be a non-negative int, not {size_hint!r}")
        self._pool = pool
        if _lease is None and size_hint:
            _lease = pool.acquire(size_hint)
            self._len = 0
        else:
            self._len = 0 if _lease is None else len(_lease.view)
        self._lease = _lease
        # The whole slot, not just the length the lease was acquired with.
        self._view = memoryview(b"") if _lease is None else self._lease_view(_lease)
        self._pos = 0
        self._exports: list[memoryview] = []
        # Slots outgrown: kept, not recycled, until close() or detach(), so a
        # view derived from an old getbuffer() can never reach another lease.
        self._retired: list[Lease] = []
        self._exported = False  # getbuffer() was called on the current slot

    # ------------------------------------------------------------- growth

    @property
    def capacity(self) -> int:
        """Bytes the buffer can hold before it must move to a larger slot."""
        return 0 if self._lease is None else self._lease.capacity

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self._check_exports()
        new = self._pool.acquire(max(needed, 2 * self.capacity))
        view = self._lease_view(new)
        view[: self._len] = self._view[: self._len]
        old, self._lease, self._view = self._lease, new, view
        if old is not None:
            if self._exported:
                self._retired.append(old)
            else:
                old.release()
        self._exported = False

    @staticmethod
    def _lease_view(lease: Lease) -> memoryview:
        """The whole slot of ``lease``, whatever length it was acquired with."""
        if lease.closed:
            raise LeaseClosedError("the buffer's lease is closed")
        return lease._slot.view  # type: ignore[no-any-return]

    def _check_exports(self) -> None:
        alive = []
        for v in self._exports:
            try:
                _ = v.nbytes
            except ValueError:
                continue  # released by its user
            if sys.getrefcount(v) > 3:  # ours, the loop's, getrefcount's
                alive.append(v)
            else:
                v.release()
        self._exports = alive
        if alive:
            raise BufferError("existing exports of data: the buffer cannot be resized")

    # ------------------------------------------------------------ file API

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed SharedBuffer")

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Write ``data`` (any bytes-like object) at the position; grow if needed."""
        self._check_open()
        with memoryview(data) as src, src.cast("B") as b:
            n = len(b)
            if not n:
                return 0  # as io.BytesIO: an empty write changes nothing
            end = self._pos + n
            self._reserve(end)
            if self._pos > self._len:  # a seek past the end: fill the gap with zeros
                self._view[self._len : self._pos] = bytes(self._pos - self._len)
            self._view[self._pos : end] = b
        self._pos = end
        self._len = max(self._len, end)
        return n

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        end = self._len if size is None or size < 0 else min(self._len, self._pos + size)
        start = min(self._pos, end)
        data = bytes(self._view[start:end])
        self._pos = max(self._pos, end)
        return data

    read1 = read

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        with memoryview(buffer) as dst, dst.cast("B") as b:
            n = max(0, min(len(b), self._len - self._pos))
            b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    readinto1 = readinto

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        offset = operator.index(offset)  # TypeError for a float, as io.BytesIO
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence})")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        """Cut the content to ``size`` bytes (default: the position); never grows."""
        self._check_open()
        size = self._pos if size is None else size
        if size < 0:
            raise ValueError(f"negative size value {size}")
        self._len = min(self._len, size)
        return size

    def getvalue(self) -> bytes:
        self._check_open()
        return bytes(self._view[: self._len])

    def getbuffer(self) -> memoryview:
        """A writable view of the content; the buffer cannot grow while it lives."""
        self._check_open()
        view = self._view[: self._len]
        self._exports.append(view)
        self._exported = True
        return view

    def __len__(self) -> int:
        return self._len

    def __del__(self) -> None:
        # Garbage-collected while a getbuffer() view lives: keep the slot leased
        # (the view stays valid; the pool reclaims it when it closes) rather
        # than recycle memory someone can still write.
        if "_exports" not in self.__dict__:
            return  # __init__ failed before there was anything to give back
        try:
            self.close()
        except BufferError:
            self._lease = None
            self._retired = []
            super().close()

    def close(self) -> None:
        """Give the slot back to the pool; the buffer is unusable afterwards.

        Raises:
            BufferError: a ``getbuffer()`` view is still alive.
        """
        if self.closed:
            return
        self._check_exports()
        lease, self._lease = self._lease, None
        self._view = memoryview(b"")
        if lease is not None:
            lease.release()
        self._release_retired()
        super().close()

    def _release_retired(self) -> None:
        retired, self._retired = self._retired, []
        for old in retired:
            old.release()

    # ----------------------------------------------------------- handoff

    def detach(self) -> Handle:  # type: ignore[override]
        """Give the buffer to another process: a ``Handle`` for ``pool.attach_buffer``.

        Raises:
            BufferError: a ``getbuffer()`` view is still alive.
            LeaseClosedError: the buffer is closed.
        """
        if self.closed:
            raise LeaseClosedError("this SharedBuffer is closed")
        self._check_exports()
        if self._lease is None:
            self._reserve(1)
        lease = self._lease
        assert lease is not None
        handle = lease.detach()
        self._release_retired()
        self._lease = None
        self._view = memoryview(b"")
        super().close()
        # The handle's token is sealed with its length (protocol.seal_token): reseal it.
        length, capacity, readers = self._len, handle.capacity, handle.readers
        token = seal_token(handle.token, handle.length, capacity, readers)
        return handle._replace(token=seal_token(token, length, capacity, readers), length=length)

    def __reduce__(self) -> tuple[Any, tuple[Handle]]:
        return (_rebuild, (self.detach(),))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"len={self._len} capacity={self.capacity}"
        return f"<shmpool.SharedBuffer {state}>"
