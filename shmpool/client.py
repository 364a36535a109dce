"""The client: a connection to the manager and a per-process cache of slots.

Hot path. ``acquire`` pops a slot from the class's cache list and ``release``
appends it back; ``list.pop``/``list.append`` are atomic under the GIL, so
threads share the cache with no lock and no syscall. Only an empty cache (one
``Acquire`` brings a batch) or a cache past its high-water mark (one
``Release`` returns the surplus) takes the connection lock and talks to the
manager. Cached slots are leased to this process's connection, so a crash
returns them like any other lease.

Fork. A child of ``os.fork`` inherits the parent's socket, cache and leases.
It must never talk through the parent's connection (the manager keys leases
by connection, and replies would go to whichever process reads first), nor
hand out the parent's cached slots. An ``os.register_at_fork`` hook gives every
live pool in the child fresh, empty caches and forgets the inherited socket
without shutting it down; the first acquire then opens the child's own
connection. Each slot remembers the cache list it came from (``_Slot.home``),
so a parent's lease released in the child lands in a list nobody reads again:
the parent's slots stay the parent's. Processes made without ``os.fork``
callbacks are caught by comparing ``os.getpid()`` on the slow path.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import Any

from . import protocol as p
from .address import resolve
from .buffer import Lease, _Slot
from .errors import (
    AccessDeniedError,
    ManagerGoneError,
    PoolClosedError,
    ProtocolError,
    ShmpoolError,
    error_from_code,
)
from .segment import map_segment
from .sizeclass import check_request

__all__ = ["Pool", "connect"]

log = logging.getLogger("shmpool")

#: A class's cache may hold about this many bytes before surplus goes back.
CACHE_BYTES = 8 << 20
#: Refills closer together than this double the class's batch (it is hot).
HOT_INTERVAL = 1.0

_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Segment:
    __slots__ = ("mm", "view")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.view = memoryview(mm)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a user still holds a slice: GC unmaps it
            self.mm.close()


class _ClosedCaches:
    """Stands in for the cache lists once the pool is closed: acquire raises."""

    def __getitem__(self, index: int) -> list[_Slot]:
        raise PoolClosedError("this pool was closed; connect again")


class Pool:
    """A connection to a shmpool manager, with this process's slot cache.

    Use ``shmpool.connect()`` to make one. Safe to share between threads;
    after ``os.fork`` the child opens its own connection on first use.
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | None = None,
        *,
        name: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.address = resolve(address)
        self.name = name or os.path.basename(sys.argv[0] or "python")[:64]
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = -1
        self._req = 0
        self._closed = False
        self._broken: ManagerGoneError | None = None
        self._segments: dict[int, _Segment] = {}
        self._pending: list[p.SlotRef] = []  # releases the garbage collector made
        self.messages = 0
        self.manager_acquires = 0
        self._misses = 0
        self._acquires = 0
        welcome = self._connect()
        self.manager_pid = welcome.manager_pid
        self.min_size = welcome.min_size
        self.max_size = welcome.max_size
        self._min_shift = welcome.min_size.bit_length() - 1
        self._nclasses = welcome.max_size.bit_length() - self._min_shift
        sizes = [1 << (self._min_shift + i) for i in range(self._nclasses)]
        self._max_batch = [max(1, min(p.MAX_BATCH, CACHE_BYTES // s)) for s in sizes]
        self._caches: Any = [[] for _ in sizes]
        self._batch = [min(4, m) for m in self._max_batch]
        self._high = [2 * b for b in self._batch]
        self._last_refill = [0.0] * self._nclasses
        _POOLS.add(self)

    # ------------------------------------------------------------ hot path

    def acquire(self, size: int) -> Lease:
        """Lease a buffer of ``size`` bytes; ``len(lease.view) == size``.

        The slot behind it has the smallest power-of-two capacity that holds
        ``size`` (at least the manager's ``min_size``). Sizes above
        ``max_size`` get a dedicated segment, freed on release.

        Raises:
            TypeError, ValueError: ``size`` is not a positive ``int``.
            PoolExhaustedError: the manager's memory budget is used up.
            ManagerGoneError: the manager died or stopped answering.
            PoolClosedError: this pool was closed.
        """
        if type(size) is not int:
            size = check_request(size)
        if size <= self.min_size:
            if size <= 0:
                check_request(size)
            index = 0
        else:
            index = (size - 1).bit_length() - self._min_shift
            if index >= self._nclasses:
                return self._acquire_oversize(size)
        self._acquires += 1
        try:
            slot = self._caches[index].pop()
        except IndexError:
            slot = self._refill(index)
        return Lease(self, slot, size)

    def _put(self, slot: _Slot, from_gc: bool = False) -> None:
        home = slot.home
        if home is None:
            self._give_back([slot.ref], from_gc)
            self._unmap(slot.ref.segment)
            return
        home.append(slot)
        if len(home) > self._high[slot.cls] and home is self._cache_list(slot.cls):
            self._trim(slot.cls, from_gc)

    # ----------------------------------------------------------- slow path

    def _refill(self, index: int) -> _Slot:
        with self._lock:
            cache = self._caches[index]
            if cache:  # another thread refilled while we waited
                return cache.pop()  # type: ignore[no-any-return]
            self._misses += 1
            now = time.monotonic()
            if now - self._last_refill[index] < HOT_INTERVAL:
                self._batch[index] = min(2 * self._batch[index], self._max_batch[index])
                self._high[index] = 2 * self._batch[index]
            self._last_refill[index] = now
            size = 1 << (self._min_shift + index)
            slots = self._grant(
                p.Acquire(self._next_req(), size, self._batch[index], self.cache_hits), index
            )
            cache = self._caches[index]
            first = slots.pop()
            cache.extend(slots)
            return first

    def _acquire_oversize(self, size: int) -> Lease:
        with self._lock:
            slots = self._grant(p.Acquire(self._next_req(), size, 1, self.cache_hits), -1)
        return Lease(self, slots[0], size)

    def _grant(self, request: p.Acquire, index: int) -> list[_Slot]:
        reply, fds = self._roundtrip(request)
        if not isinstance(reply, p.Grant):
            _close_fds(fds)
            raise self._gone(ProtocolError(f"expected a Grant, got {type(reply).__name__}"))
        self._map(reply.segments, fds)
        home = self._caches[index] if index >= 0 else None
        slots = []
        for ref in reply.slots:
            seg = self._segments.get(ref.segment)
            offset = ref.index * reply.slot_size
            if seg is None or offset + reply.slot_size > len(seg.view):
                raise self._gone(ProtocolError(f"granted slot {ref} lies outside its segment"))
            slots.append(_Slot(ref, seg.view[offset : offset + reply.slot_size], index, home))
        self.manager_acquires += len(slots)
        return slots

    def _map(self, segments: tuple[p.SegmentInfo, ...], fds: list[int]) -> None:
        if len(fds) != len(segments):
            _close_fds(fds)
            raise self._gone(ProtocolError(f"{len(segments)} segments came with {len(fds)} fds"))
        for i, (info, fd) in enumerate(zip(segments, fds, strict=True)):
            try:
                mm = map_segment(fd, info.size)
            except (OSError, ValueError) as exc:
                _close_fds(fds[i:])
                raise self._gone(
                    ProtocolError(f"cannot map segment {info.segment}: {exc}")
                ) from None
            os.close(fd)
            old = self._segments.pop(info.segment, None)
            if old is not None:
                old.close()
            self._segments[info.segment] = _Segment(mm)

    def _cache_list(self, index: int) -> list[_Slot] | None:
        try:
            return self._caches[index]  # type: ignore[no-any-return]
        except PoolClosedError:
            return None

    def _trim(self, index: int, from_gc: bool) -> None:
        """Return a hot cache's surplus to the manager, keeping one batch."""
        cache = self._caches[index]
        keep = self._batch[index]
        refs = []
        while len(cache) > keep:
            try:
                refs.append(cache.pop(0).ref)  # the coldest slots go back
            except IndexError:
                break
        if refs:
            self._give_back(refs, from_gc)

    def _give_back(self, refs: list[p.SlotRef], from_gc: bool) -> None:
        if self._closed or self._broken is not None or self._pid != os.getpid():
            return  # the connection is gone (or not ours): the manager reclaimed them
        if not self._lock.acquire(blocking=not from_gc):
            self._pending.extend(refs)  # the GC ran while we hold the lock: send later
            return
        try:
            refs = self._pending + refs
            self._pending = []
            for start in range(0, len(refs), p.MAX_BATCH):
                batch = tuple(refs[start : start + p.MAX_BATCH])
                self._roundtrip(p.Release(self._next_req(), batch, self.cache_hits))
        finally:
            self._lock.release()

    def _unmap(self, segment: int) -> None:
        seg = self._segments.pop(segment, None)
        if seg is not None:
            seg.close()

    # ----------------------------------------------------------- the wire

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    def _connect(self) -> p.Welcome:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ManagerGoneError(
                f"no shmpool manager listens at {self.address} ({exc.strerror}); start one "
                "with `shmpool serve` or shmpool.start(), or set SHMPOOL_ADDRESS"
            ) from None
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._pid = os.getpid()
        self._broken = None
        reply, fds = self._roundtrip(p.Hello(self._next_req(), p.VERSION, self._pid, self.name))
        _close_fds(fds)
        if not isinstance(reply, p.Welcome):
            raise self._gone(ProtocolError(f"expected Welcome, got {type(reply).__name__}"))
        return reply

    def _ensure_connection(self) -> socket.socket:
        if self._closed:
            raise PoolClosedError("this pool was closed; connect again")
        if self._pid != os.getpid():
            self._forget_parent()
        if self._broken is not None:
            raise ManagerGoneError(str(self._broken))
        if self._sock is None:
            welcome = self._connect()
            if (welcome.min_size, welcome.max_size) != (self.min_size, self.max_size):
                raise self._gone(ProtocolError("the manager's size classes changed"))
        assert self._sock is not None
        return self._sock

    def _roundtrip(self, request: p.Message) -> tuple[p.Message, list[int]]:
        """Send one request and return its reply (the lock must be held)."""
        sock = self._sock if isinstance(request, p.Hello) else self._ensure_connection()
        assert sock is not None
        try:
            sock.send(p.encode(request))
        except OSError as exc:
            raise self._gone(exc) from None
        self.messages += 1
        while True:
            reply, fds = self._receive(sock)
            if isinstance(reply, p.Recall):
                _close_fds(fds)
                continue  # the cache keeps only a batch per class; nothing to do yet
            if reply.req != request.req:
                _close_fds(fds)
                raise self._gone(
                    ProtocolError(f"reply to request {reply.req}, expected {request.req}")
                )
            if isinstance(reply, p.Error):
                _close_fds(fds)
                err = error_from_code(reply.code, reply.message)
                if isinstance(err, (AccessDeniedError, ProtocolError)):
                    raise self._gone(err)
                raise err
            return reply, fds

    def _receive(self, sock: socket.socket) -> tuple[p.Message, list[int]]:
        try:
            data, ancdata, flags, _ = sock.recvmsg(p.MAX_REPLY + 1, _ANCBUF)
        except TimeoutError:
            raise self._gone(
                ManagerGoneError(f"the manager did not answer within {self.timeout} s")
            ) from None
        except OSError as exc:
            raise self._gone(exc) from None
        fds = _fds_from(ancdata)
        if not data:
            _close_fds(fds)
            raise self._gone(
                ManagerGoneError(f"the manager at {self.address} closed the connection")
            )
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_fds(fds)
            raise self._gone(ProtocolError("the manager sent an oversized message"))
        try:
            return p.decode(data), fds
        except ProtocolError as exc:
            _close_fds(fds)
            raise self._gone(exc) from None

    def _gone(self, cause: BaseException) -> ShmpoolError:
        """Mark the connection dead; return the error to raise."""
        if isinstance(cause, ShmpoolError) and not isinstance(cause, ProtocolError):
            err: ShmpoolError = cause
        else:
            detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
            err = ManagerGoneError(f"lost the manager at {self.address}: {detail}")
        if not isinstance(err, ManagerGoneError):
            err.__cause__ = None
        self._broken = err if isinstance(err, ManagerGoneError) else ManagerGoneError(str(err))
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for cache in self._caches_or_empty():
            cache.clear()
        return err

    def _caches_or_empty(self) -> list[list[_Slot]]:
        caches = getattr(self, "_caches", [])
        return caches if isinstance(caches, list) else []

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's connection and cached slots.

        Closing our copy of the socket's descriptor leaves the parent's
        connection open (no shutdown), and lets the manager see the parent's
        end-of-file promptly when the parent dies.
        """
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._pid = os.getpid()
        self._req = 0
        self._lock = threading.Lock()
        self._pending = []
        if isinstance(self._caches, list):
            self._caches = [[] for _ in self._caches]
        self.messages = self.manager_acquires = self._misses = self._acquires = 0
        self._broken = None

    # ------------------------------------------------------------ public

    @property
    def cache_hits(self) -> int:
        """Acquires served from this process's cache since connecting."""
        return max(0, self._acquires - self._misses)

    def stats(self) -> dict[str, Any]:
        """The manager's statistics, plus this process's in ``"local"``.

        Raises:
            ManagerGoneError, PoolClosedError.
        """
        with self._lock:
            reply, _ = self._roundtrip(p.Stats(self._next_req()))
        assert isinstance(reply, p.StatsReply)
        stats = dict(reply.stats)
        stats["local"] = {
            "pid": os.getpid(),
            "cache_hits": self.cache_hits,
            "manager_acquires": self.manager_acquires,
            "messages": self.messages,
            "cached": {
                str(1 << (self._min_shift + i)): len(c)
                for i, c in enumerate(self._caches_or_empty())
                if c
            },
        }
        return stats

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection; the manager reclaims every slot this process held.

        Leases still open keep their memory mapped but must not be used
        afterwards (another process may be given the same slot).
        """
        if self._closed:
            return
        with self._lock:
            self._closed = True
            for cache in self._caches_or_empty():
                cache.clear()
            self._caches = _ClosedCaches()
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close()
            self._sock = None
        _POOLS.discard(self)

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<shmpool.Pool {self.address} {state}>"


_ANCBUF = socket.CMSG_SPACE(p.MAX_FDS * 4)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(memoryview(data)[:usable].cast("i"))
    return fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def connect(
    address: str | os.PathLike[str] | None = None, *, name: str = "", timeout: float = 30.0
) -> Pool:
    """Connect to a running manager.

    ``address`` defaults to ``$SHMPOOL_ADDRESS``, then to the address a plain
    ``shmpool serve`` uses. ``timeout`` bounds every wait for a reply.

    Raises:
        ManagerGoneError: no manager listens there.
        AccessDeniedError: the manager refused this user.
    """
    return Pool(address, name=name, timeout=timeout)
