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

Usage. Every lease counts its bytes in the pool's meter while it is open, and
every acquire its size (``buffer``'s note on metering); the janitor sends the
manager what changed (``Usage``) at most every ``USAGE_PERIOD``, and
``stats()`` sends it first, so that the manager's figures for this process are
exact. The meter starts over with the caches: a forked child does not
report its parent's leases, and leases of a lost connection settle with the
meter they were counted in, not with the new one.

Restart. A manager that hangs up (it exited, or was killed) breaks the
connection, and the caches start over at once: their slots were the dead
manager's. The next call that needs a manager connects again to the same
address (``Connection.reopen``; ``reconnect`` bounds how long it tries) and
goes on with the manager restarted there; an acquire or ``stats()`` that
finds the manager gone tries once more that way. Leases from before stay
readable (their segments stay mapped while they use them); they are orphans
like a parent's leases in a forked child: releasing one drops its slot, and
nothing of it reaches the new manager, whose ids may well name other slots.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import numbers
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import protocol as p
from . import tracking
from ._native import speedups
from .address import resolve
from .buffer import (
    Lease,
    _Borrowed,
    _Cache,
    _dropped_slots,
    _Meter,
    _new_lease,
    _OversizeHome,
    _SharedHome,
    _Slot,
    make_lease,
    return_dropped,
)
from .connection import NOTICE_BATCH, RECONNECT_WAIT, Connection, close_fds
from .errors import (
    AccessDeniedError,
    ManagerGoneError,
    PoolClosedError,
    PoolExhaustedError,
    ProtocolError,
    ShmpoolError,
    StaleHandleError,
    UsageError,
    error_from_code,
)
from .handle import Handle
from .janitor import Janitor
from .lending import Lending
from .sharedbuffer import SharedBuffer
from .sizeclass import check_request
from .statstypes import PoolStats, PoolUsage

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Self
    else:
        from typing_extensions import Self

_getpid = os.getpid

__all__ = ["Pool", "connect"]

log = logging.getLogger("shmpool")

#: A class's cache may hold about this many bytes before surplus goes back.
CACHE_BYTES = 64 << 20
#: The first refill of a class asks for at most this many slots...
FIRST_BATCH = 4
#: ... and this many bytes (but one slot at least): a process that takes one
#: 8 MiB buffer should not commit 32 MiB of the manager's memory to its cache.
FIRST_BATCH_BYTES = 256 << 10
#: Refills (or trims) closer together than this double the class's batch (it is hot).
HOT_INTERVAL = 1.0
#: Default seconds without an acquire after which a cache is given back.
IDLE_TIMEOUT = 5.0
#: The janitor sends the manager a changed ``Usage`` at most this often (seconds).
USAGE_PERIOD = 0.5

_T = TypeVar("_T")

_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()
_serials = itertools.count()
_speedups: Any = speedups
if _speedups is not None:
    _speedups.configure_handoff(p.SlotRef, Lease, NOTICE_BATCH, _Borrowed)


#: Pools whose janitor ``_before_fork`` stopped, to restart in the parent.
_paused: list[Pool] = []


def _before_fork() -> None:
    """Stop the janitor threads, so that none is in the middle of a tick at the fork.

    A fork copies only the forking thread; whatever another thread held at
    that moment (a lock, a half-done send on the pool's socket) stays so in
    the child. Janitors hold nothing between ticks, and a tick is short, so
    each is asked to end and joined (for a second at most). The parent
    restarts them once the fork is done (``_after_fork_in_parent``), because
    an idle pool needs its janitor to answer recalls and return its cache;
    the child starts its own when it first needs one.
    """
    pid = os.getpid()
    janitors = [t for t in threading.enumerate() if isinstance(t, Janitor) and t._pid == pid]
    if janitors:
        _forker.frame = sys._getframe(1)  # the caller of os.fork(): see _restart_when_forked
        _forker.thread = threading.get_ident()
    for janitor in janitors:  # those of closed pools too, which may not have ended yet
        pool = janitor._pool()
        if isinstance(pool, Pool) and pool._janitor is janitor:
            pool._janitor = None  # the thread sees this and ends
            _paused.append(pool)
        janitor.wake()
    for janitor in janitors:
        janitor.join(1.0)


def _after_fork_in_parent() -> None:
    """Start the janitors ``_before_fork`` stopped again, once ``os.fork()`` has returned.

    Started here, they would already run when ``os.fork()`` counts the
    process's threads (after the at-fork callbacks), and Python 3.12+ would
    warn that the process forked with threads. So the C extension queues the
    restart as a pending call, which the main thread runs at its next
    bytecode boundary: right after ``os.fork()`` returns when the main thread
    forked (multiprocessing, prefork servers), else as soon as the main
    thread runs Python again; meanwhile any pool call that needs its janitor
    starts it. Without the extension they start here, and Python warns.
    """
    if _paused and _speedups is not None and _speedups.call_soon(_restart_when_forked):
        return
    _restart_paused()


class _Forker:
    """The fork in progress, as ``_restart_when_forked`` needs to know it."""

    frame: Any = None  # the Python frame that called os.fork() (seen from _before_fork)
    thread = 0  # the thread that forked
    requeues = 0  # how many times _restart_when_forked put itself back in the queue


_forker = _Forker()
#: ``_restart_when_forked`` waits for ``os.fork()`` to return at most this many turns.
MAX_REQUEUES = 10_000


def _restart_when_forked() -> None:
    """A pending call: restart the janitors if ``os.fork()`` has returned, else wait again.

    Pending calls run at the next bytecode boundary, which may still be in
    an at-fork callback (ours, or a library's such as ``logging``'s) before
    ``os.fork()`` counts threads. It has returned once the frame running is
    the one that called it.
    """
    frame = _forker.frame
    if (
        frame is not None
        and sys._getframe(1) is not frame
        and threading.get_ident() == _forker.thread  # else the main thread runs other code
        and _forker.requeues < MAX_REQUEUES
        and _speedups.call_soon(_restart_when_forked)
    ):
        _forker.requeues += 1
        return
    _forker.requeues = 0
    _restart_paused()


def _restart_paused() -> None:
    _forker.frame = None
    pools = list(_paused)
    _paused.clear()
    for pool in pools:
        if pool._live() and pool._janitor is None:
            pool._ensure_janitor()


def _after_fork_in_child() -> None:
    _paused.clear()  # the parent restarts its own janitors
    _forker.frame = None
    for pool in list(_POOLS):
        pool._forget_parent()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


class _Closed:
    """Stands in for the cache table once the pool is closed: acquire raises."""

    def __getitem__(self, index: int) -> list[_Slot]:
        raise PoolClosedError("this pool was closed; connect again")


class Pool:
    """A connection to a shmpool manager, with this process's slot cache.

    Use ``shmpool.connect()`` to make one. Safe to share between threads;
    after ``os.fork`` the child opens its own connection on first use.
    ``idle_timeout`` is how long a cache may sit unused before its slots go
    back to the manager (``None``: never, except when the manager recalls
    them). ``track`` (default: ``$SHMPOOL_TRACK`` set to anything but
    empty or ``0``) records where each lease is acquired: see
    ``held_leases()``.

    ``reconnect``: once the manager exits or dies, the next call connects
    to the manager restarted at the same address, trying for
    ``RECONNECT_WAIT`` seconds (a number: that many). ``False``: never;
    every later call raises ``ManagerGoneError``.

    Raises:
        ManagerGoneError: no manager listens at the address.
        AccessDeniedError: the manager refused this user.
        TypeError, ValueError: ``reconnect`` is not a bool or a number >= 0.
    """

    _fast: Any = None  # the C twin of acquire() (_speedups.Acquirer), if built
    _track: tracking.Tracker | None = None  # when this pool tracks its leases

    def __init__(
        self,
        address: str | os.PathLike[str] | None = None,
        *,
        name: str = "",
        timeout: float = 30.0,
        idle_timeout: float | None = IDLE_TIMEOUT,
        track: bool | None = None,
        reconnect: bool | float = True,
    ) -> None:
        wait = _reconnect_wait(reconnect)
        self.address = resolve(address)
        self.name = (name or os.path.basename(sys.argv[0] or "python"))[:64]
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._serial = next(_serials)  # the order live_pools() lists pools in
        self._janitor: Janitor | None = None
        self._idle_seen = -1  # the activity count at the janitor's last tick
        self._idle_since = time.monotonic()  # when the cache was last in use
        # The connection: the socket, its lock, requests and replies, queued
        # notices, prefetches in flight, the segments mapped.
        conn = self._conn = Connection(
            self.address, self.name, timeout, _speedups is not None, reconnect=wait
        )
        conn.on_unasked = self._on_unasked  # (before the caches: only an Error comes before)
        self._reset_counters()
        welcome = conn.open()
        self.min_size = welcome.min_size
        self.max_size = welcome.max_size
        self._min_shift = welcome.min_size.bit_length() - 1
        self._nclasses = welcome.max_size.bit_length() - self._min_shift
        sizes = [1 << (self._min_shift + i) for i in range(self._nclasses)]
        self._max_batch = [max(2, min(p.MAX_BATCH, CACHE_BYTES // s)) for s in sizes]
        self._first_batch = [
            max(1, min(FIRST_BATCH, FIRST_BATCH_BYTES // s, m))
            for s, m in zip(sizes, self._max_batch, strict=True)
        ]
        # Lending: slots handed over by their ticket words, and taken back.
        self._lending = Lending(self, conn, self._min_shift)
        self._new_caches()
        if _speedups is not None:  # the C twin of acquire(), shadowing the method
            self._fast = self.__dict__["acquire"] = _speedups.Acquirer(
                self._lookup, self._acquire_slow, Lease, self._meter
            )
        conn.on_lost = self._new_caches  # cached slots died with the connection
        conn.on_reconnected = self._on_reconnected
        conn.on_forked = self._forget_parent
        conn.on_notice = self._ensure_janitor  # it sends them within JANITOR_PERIOD
        if tracking.wanted(track):  # acquire() goes through Python, which notes where
            untracked = self._fast or types.MethodType(Pool.acquire, self)
            self._track = tracking.Tracker(untracked)
            self.__dict__["acquire"] = self._track.acquire
        _POOLS.add(self)

    def _reset_counters(self) -> None:
        # Requests sent, usage reports aside: those are the pool's bookkeeping,
        # not its use (counted, each would look like activity to the janitor's
        # idle check, and blur how many acquires a message costs).
        self._conn.messages = 0
        self.manager_acquires = 0
        self._acquires = 0  # slow-path acquires, and hot-path ones without the C twin
        self._misses = 0
        self._recall_returns = 0  # slots returned on the manager's recalls, ever
        fast = self._fast
        if fast is not None:
            fast.hits = 0

    def _activity(self) -> int:
        """A count that moves whenever this process uses the pool (cheap: for idle detection).

        Acquires, and messages sent: a process that only receives leases
        handed over and releases them acquires nothing, yet it is busy, and
        it sends their notices and returns their slots.
        """
        return self._acquired() + self.messages

    def _acquired(self) -> int:
        """How many acquires this process made."""
        fast = self._fast
        return self._acquires + (fast.hits if fast is not None else 0)

    @property
    def manager_pid(self) -> int:
        """The process id of the manager this pool talks to (a restarted one's, once reached)."""
        return self._conn.manager_pid

    @property
    def manager_instance(self) -> int:
        """The id of the manager's run, which its handles carry (``Handle.instance``)."""
        return self._conn.instance

    @property
    def reconnects(self) -> bool:
        """Whether this pool connects to a restarted manager (``reconnect`` was not False)."""
        return self._conn.reconnect > 0

    def _new_caches(self) -> None:
        """Fresh, empty caches; slots in the old ones are no longer ours to hand out.

        The old caches are emptied, so that their slots' views let go of the
        mappings, and their high-water mark set below any length: a lease of
        theirs released later goes to ``_trim``, which drops it too.
        """
        for cache in getattr(self, "_caches", ()):
            cache.high = -1
            cache.clear()
        self._batch = list(self._first_batch)
        self._last_batch = [0.0] * self._nclasses
        self._caches = [_Cache(self, i, 2 * b) for i, b in enumerate(self._batch)]
        self._oversize_home = _OversizeHome(self)
        self._shared_home = _SharedHome(self)
        # Indexed by (size - 1).bit_length(): every size up to min_size maps to
        # class 0; sizes above max_size fall off the end (IndexError: slow path).
        # Entry 0 (size 1, and True, which equals 1) is a list that stays empty,
        # so those take the slow path, where check_request refuses a bool.
        self._lookup: Any = [[], *[self._caches[0]] * self._min_shift, *self._caches[1:]]
        # Leases made from now on count here; those still open keep the old meter.
        self._meter: Any = _Meter()
        self._usage_sent = self._meter.snapshot()  # what the manager was told last: nothing
        self._usage_at = time.monotonic()  # and when (the first report waits a period too)
        self._lending.reset(self._caches, self._meter, self._oversize_home)
        fast = self._fast
        if fast is not None:
            fast.lookup = self._lookup
            fast.meter = self._meter

    # ------------------------------------------------------------ hot path

    def acquire(self, size: int, timeout: float | None = None) -> Lease:
        """Lease a buffer of ``size`` bytes; ``len(lease.view) == size``.

        The slot behind it has the smallest power-of-two capacity that holds
        ``size`` (at least the manager's ``min_size``). Sizes above
        ``max_size`` get a dedicated segment, freed on release. ``size`` may
        be any integer type (``operator.index``: numpy integers too).

        ``timeout`` is how long to wait for memory when the budget is spent
        and no slot is free: None waits the manager's ``acquire_wait`` (2 s
        by default, and only while other clients hold slots of the class);
        0 fails at once; a number of seconds waits that long whatever
        (``math.inf``: until memory comes). Waiters are served first come,
        first served, as releases, recalls and exits free memory.

        Raises:
            TypeError, ValueError: ``size`` is not a positive integer, or
                ``timeout`` is negative or not a number.
            PoolExhaustedError: no memory came within the wait
                (``QuotaExceededError``: this client holds its whole quota).
            ManagerGoneError: the manager died or stopped answering.
            PoolClosedError: this pool was closed.
        """
        try:
            if size > 0 and timeout is None:
                k = (size - 1).bit_length()
                slot = self._lookup[k].pop()
            else:
                raise ValueError
        except (IndexError, ValueError, TypeError, AttributeError):
            return self._acquire_slow(size, timeout)
        self._acquires += 1
        lease: Lease = _new_lease(Lease)  # make_lease(), inlined: this is the hot path
        lease._slot = slot
        lease._view = slot.view[:size]  # size bytes: the slot's class holds them
        lease._length = size
        lease._bucket = k
        meter = lease._meter = self._meter
        meter.requested[k] += size
        meter.sizes[k] += 1
        return lease

    # ----------------------------------------------------------- slow path

    def _acquire_slow(self, size: int, timeout: float | None = None) -> Lease:
        if self._conn.closed:
            raise PoolClosedError("this pool was closed; connect again")
        size = check_request(size)
        wait = _wait_ms(timeout)
        lease = self._after_restart(lambda: self._acquire_checked(size, wait))
        self._meter.count_acquire(size)  # a hit counts itself (acquire(), in C or not)
        return lease

    def _acquire_checked(self, size: int, wait: int) -> Lease:
        index = (size - 1).bit_length() - self._min_shift
        if index >= self._nclasses:
            return self._acquire_oversize(size, wait)
        self._acquires += 1
        return make_lease(self._refill(max(0, index), wait), size, self._meter)

    def _after_restart(self, call: Callable[[], _T]) -> _T:
        """``call()``; once more if it found that the manager hung up, to reach a restarted one.

        Only when the connection was live before the call: a pool that
        already knew the manager gone tries to reconnect within the call
        (``Connection.ensure``), and a second try would only wait again.
        """
        conn = self._conn
        live = conn.broken is None
        try:
            return call()
        except ManagerGoneError:
            if not (live and conn.can_reopen()):
                raise
            log.info("the manager at %s hung up; connecting to the one there now", self.address)
        return call()

    def _on_reconnected(self, welcome: p.Welcome) -> None:
        """The connection reached a restarted manager (``Connection.reopen``, lock held).

        The caches started over when the old manager was lost; the counters
        start over now, as for a new connection.
        """
        self._reset_counters()
        log.info(
            "reconnected to the manager restarted at %s (pid %d)", self.address, welcome.manager_pid
        )

    def _refill(self, index: int, wait: int = p.WAIT_DEFAULT) -> _Slot:
        """The cache of class ``index`` is empty: fill it from the manager.

        A hot class (refilled within ``HOT_INTERVAL`` of the last time) asks
        for its next batch at once, without waiting for the answer: a
        prefetch, which the manager answers from free memory or refuses,
        never making anyone wait. The next refill then finds that answer on
        the socket (or in the cache, if another call read it first) instead
        of waiting a round trip.
        """
        with self._conn.lock:
            # Other threads pop from the cache without the lock: a slot seen
            # there may be gone by the time we pop, so every pop may miss.
            cache = self._caches[index]
            first = _pop(cache)  # another thread refilled while we waited
            if first is None and self._lending.lent and self._lending.reclaim_returned():
                first = _pop(cache)
            if first is not None:
                return first
            self._misses += 1
            hot = self._note_batch(index)
            size = 1 << (self._min_shift + index)
            pending = [req for req, cls in self._conn.prefetching.items() if cls == index]
            if pending:
                self._conn.await_reply(pending[0])  # its slots join the cache, or it was refused
                first = _pop(cache)
            if first is None:
                slots = self._grant_or_return(
                    lambda req, wait: p.encode_acquire(
                        req, size, self._batch[index], self.cache_hits, wait
                    ),
                    cache,
                    wait,
                )
                first = slots.pop()  # ours before the rest is anyone's
                cache.extend(slots)
            self._ensure_janitor()
            if hot:
                req = self._conn.next_req()
                self._conn.send(p.encode_acquire(req, size, self._batch[index], self.cache_hits, 0))
                self._conn.prefetching[req] = index
            return first

    def _on_prefetched(self, index: int, reply: p.Message, fds: list[int]) -> None:
        """The answer to a prefetch of class ``index`` (lock held): slots join the cache."""
        if isinstance(reply, p.Error) and reply.code == "exhausted":
            close_fds(fds)  # nothing free now: the next refill asks and waits
            return
        if isinstance(reply, p.Error):
            close_fds(fds)
            raise self._conn.gone(error_from_code(reply.code, reply.message))
        cache = self._caches[index]
        cache.extend(self._granted(reply, fds, cache))
        if len(cache) > cache.high:  # releases refilled the cache meanwhile
            self._return(cache, self._batch[index])

    def _note_batch(self, index: int) -> bool:
        """A batch of class ``index`` comes or goes (lock held): grow batches of a hot class.

        Refills make a class hot in a process that acquires; trims make it hot
        in one that mostly releases slots other processes handed to it (a
        consumer), which then returns them in batches as large. Returns
        whether the class is hot.
        """
        now = time.monotonic()
        hot = now - self._last_batch[index] < HOT_INTERVAL
        if hot:
            self._batch[index] = min(2 * self._batch[index], self._max_batch[index])
            self._caches[index].high = 2 * self._batch[index]
        self._last_batch[index] = now
        return hot

    def _acquire_oversize(self, size: int, wait: int = p.WAIT_DEFAULT) -> Lease:
        with self._conn.lock:
            slots = self._grant_or_return(
                lambda req, wait: p.encode_acquire(req, size, 1, self.cache_hits, wait),
                self._oversize_home,
                wait,
            )
        self._acquires += 1
        self._misses += 1
        return make_lease(slots[0], size, self._meter)

    def _release_shared(self, slot: _Slot) -> None:
        """A reader let go of a shared slot: tell the manager (no reply awaited)."""
        with self._conn.lock:
            if slot.home is self._shared_home and self._live():
                self._conn.send(p.encode_return(self._conn.next_req(), [slot.ref], self.cache_hits))
            # An oversize segment stays mapped here (another reader lease of this
            # process may use it, and the manager will not send it twice).

    def _release_oversize(self, slot: _Slot) -> None:
        with self._conn.lock:
            if slot.home is self._oversize_home and self._live():
                self._conn.call(p.Release(self._conn.next_req(), (slot.ref,), self.cache_hits))
            seg = self._conn.segments.get(slot.ref.segment)
            if seg is not None and slot.view.obj is seg.mm:  # not a restarted manager's namesake
                self._conn.unmap(slot.ref.segment)

    def _grant_or_return(
        self, encode: Callable[[int, int], bytes], home: Any, wait: int = p.WAIT_DEFAULT
    ) -> list[_Slot]:
        """Acquire through the manager (lock held); once more if it refused after
        recalling this process's own idle slots, within what is left of ``wait``.

        ``encode(req, wait)`` makes the Acquire. The manager recalls the
        caches of every client, this one's too, for an acquire that memory
        could serve; this one reads its recall before the refusal (one that
        nobody else could help is refused at once), and the memory it gave
        back may serve the second try.
        """
        started = time.monotonic()
        returns = self._recall_returns
        req = self._conn.next_req()
        try:
            return self._grant(req, encode(req, wait), home, wait)
        except PoolExhaustedError:
            if self._recall_returns == returns:
                raise
            log.debug("refused after returning this process's idle slots: asking again")
        if wait != p.WAIT_DEFAULT:
            wait = max(0, wait - int((time.monotonic() - started) * 1000))
        req = self._conn.next_req()
        return self._grant(req, encode(req, wait), home, wait)

    def _grant(
        self, req: int, request: bytes, home: Any, wait: int = p.WAIT_DEFAULT
    ) -> list[_Slot]:
        """Send an Acquire and take its Grant; a long ``wait`` (ms) outlasts ``timeout``."""
        deadline = None
        if wait != p.WAIT_DEFAULT and wait / 1000 > self.timeout / 2:
            deadline = time.monotonic() + wait / 1000 + self.timeout
        reply, fds = self._conn.roundtrip(req, request, deadline=deadline)
        return self._granted(reply, fds, home)

    def _granted(self, reply: p.Message, fds: list[int], home: Any) -> list[_Slot]:
        """The slots of a ``Grant`` (its new segments mapped), going to ``home``."""
        if not isinstance(reply, p.Grant):
            close_fds(fds)
            raise self._conn.gone(ProtocolError(f"expected a Grant, got {type(reply).__name__}"))
        self._conn.map(reply.segments, fds)
        size = reply.slot_size
        segments = self._conn.segments
        if _speedups is not None:  # the loop below in C; None if a slot lies outside
            carved: list[_Slot] | None = _speedups.carve(segments, size, home, reply.slots)
            if carved is not None:
                self.manager_acquires += len(carved)
                return carved
        slots = []
        for ref in reply.slots:
            seg = segments.get(ref.segment)
            offset = (seg.header if seg is not None else 0) + ref.index * size
            if seg is None or offset + size > len(seg.view):
                raise self._conn.gone(ProtocolError(f"granted slot {ref} lies outside its segment"))
            slots.append(_Slot(ref, seg.view[offset : offset + size], home))
        self.manager_acquires += len(slots)
        return slots

    def _live(self) -> bool:
        """True if this process's connection is usable for returning slots."""
        return self._conn.live()

    def _trim(self, cache: _Cache) -> None:
        """A release took a cache past its high-water mark: return the surplus."""
        with self._conn.lock:
            caches = self._caches_list()
            if cache.cls >= len(caches) or caches[cache.cls] is not cache:
                cache.clear()  # an orphan (after fork, close or a lost manager)
                return
            self._return(cache, max(0, len(cache) - self._batch[cache.cls]))  # one batch goes
            self._note_batch(cache.cls)

    def _return(self, cache: _Cache, keep: int) -> int:
        """Send all but ``keep`` of a cache's slots back (lock held); no reply awaited."""
        refs = []
        while len(cache) > keep:
            try:
                refs.append(cache.pop(0).ref)  # the coldest slots go back
            except IndexError:
                break
        for start in range(0, len(refs), p.MAX_BATCH):
            batch = refs[start : start + p.MAX_BATCH]
            self._conn.send(p.encode_return(self._conn.next_req(), batch, self.cache_hits))
        return len(refs)

    def _caches_list(self) -> list[_Cache]:
        return self._caches if self._live() else []

    # ----------------------------------------------------- the manager asks

    def _on_recall(self, msg: p.Recall) -> None:
        """Another client is short of ``msg.slot_size`` slots: give ours back.

        ``slot_size`` 0: the manager's budget is spent, or this process sat
        idle too long by its measure: every class goes back, as when the
        janitor finds the pool idle.
        """
        if msg.slot_size == 0:
            returned = self._return_idle()
            if returned:
                log.debug("returned every idle slot on recall")
        else:
            returned = self._return_recalled(msg.slot_size)
        self._recall_returns += returned
        if self._conn.notices and self._live():
            self._conn.flush_notices()  # the manager's books catch up: it may recall elsewhere

    def _return_recalled(self, slot_size: int) -> int:
        """Give back the cached ``slot_size`` slots, and halve that class's batch (lock held).

        Returns how many went back.
        """
        if self._lending.lent and self._live():
            self._lending.reclaim_lent()  # those returned to us go back too
        index = slot_size.bit_length() - 1 - self._min_shift
        caches = self._caches_list()
        if not 0 <= index < len(caches):
            return 0
        self._batch[index] = max(1, self._batch[index] // 2)
        caches[index].high = 2 * self._batch[index]
        returned = self._return(caches[index], 0)
        if returned:
            log.debug("returned idle %d-byte slots on recall", slot_size)
        return returned

    def _return_idle(self) -> int:
        """Give back every cached slot (lock held): the process sits idle."""
        if self._lending.lent and self._live():
            self._lending.reclaim_lent()
        returned = 0
        for i, cache in enumerate(self._caches_list()):
            self._batch[i] = self._first_batch[i]
            cache.high = 2 * self._batch[i]
            returned += self._return(cache, 0)
        return returned

    def _on_unasked(self, reply: p.Message, fds: list[int]) -> None:
        """A message that answers no request a caller waits for (lock held).

        A ``Recall``, or the answer to a prefetch; anything else breaks the
        protocol.
        """
        if isinstance(reply, p.Recall):
            close_fds(fds)
            self._on_recall(reply)
            return
        index = self._conn.prefetching.pop(reply.req, None)
        if index is not None:
            self._on_prefetched(index, reply, fds)
            return
        close_fds(fds)
        if isinstance(reply, p.Error):
            err = error_from_code(reply.code, reply.message)
            if isinstance(err, AccessDeniedError):  # refused at the door (also: too many)
                raise self._conn.gone(err)
        self._note_stray(reply)

    def _note_stray(self, reply: p.Message) -> None:
        if isinstance(reply, p.Error):
            err = error_from_code(reply.code, reply.message)
            raise self._conn.gone(
                err
                if isinstance(err, ManagerGoneError)
                else ManagerGoneError(f"the manager refused this client: {reply.message}")
            )
        raise self._conn.gone(ProtocolError(f"unexpected {type(reply).__name__} (req {reply.req})"))

    def _ensure_janitor(self) -> None:
        """Start the janitor thread, or a new one if it ended (not for a pool out of use)."""
        if (self._janitor is None or not self._janitor.is_alive()) and self._live():
            self._idle_seen = -1  # the activity count at the last tick
            self._idle_since = time.monotonic()
            self._janitor = Janitor(self)
            self._janitor.start()

    def tick(self) -> bool:
        """One round of this pool's background work; the janitor thread calls it.

        Answers what the manager sent unasked (recalls, or end-of-file when
        it died), sends queued handoff notices, takes back lent slots that
        came back, reports usage if it changed (at most every
        ``USAGE_PERIOD``), and returns the cache once it sat unused for
        ``idle_timeout``. It never blocks: if another thread holds the pool
        (talking to the manager, and handling recalls itself meanwhile) it
        returns False at once. Calling it by hand is harmless.

        Raises:
            ManagerGoneError: the manager is gone (the pool is broken then).
        """
        if not self._conn.lock.acquire(blocking=False):
            return False
        try:
            if self._live():
                self._tick()
        finally:
            self._conn.lock.release()
        if _dropped_slots:
            return_dropped()  # slots of leases collected while a pool's lock was held
        return True

    def _poll_manager(self) -> None:
        """Handle whatever the manager sent unasked (lock held): ``_on_unasked`` gets it."""
        self._conn.poll()

    def _tick(self) -> None:
        """``tick()``, the lock held."""
        self._poll_manager()
        if self._conn.notices:
            self._conn.flush_notices()  # handoffs the manager has not heard of yet
        if self._lending.lent:
            self._lending.reclaim_lent()  # lent slots returned, or whose handles expired
        self._report_usage(due_only=True)  # if it changed, at most every USAGE_PERIOD
        if self._track is not None:
            self._report_leases()  # those held long, if that changed
        now = time.monotonic()
        idle = self.idle_timeout
        activity = self._activity()
        if activity != self._idle_seen:
            self._idle_seen, self._idle_since = activity, now
        elif idle is not None and now - self._idle_since >= idle:
            if self._return_idle():
                log.debug("returned an idle cache after %.1f s", now - self._idle_since)
            self._idle_since = now

    def _janitor_failed(self, cause: BaseException, failures: int) -> None:
        """The janitor failed ``failures`` ticks in a row and ends: break the pool.

        Without it recalls go unanswered and an idle cache never goes back,
        so from now on every call that needs the manager raises, naming the
        cause. The cached slots, in no one's hands, go back first if that
        still works. The connection stays open: the slots of live leases stay
        this process's, not given to another process while this one may
        still write them; ``close()`` returns them.
        """
        with self._conn.lock:
            self._break_for_janitor(cause, failures)

    def _break_for_janitor(self, cause: BaseException, failures: int) -> None:
        try:
            for req in list(self._conn.prefetching):
                self._conn.await_reply(req)  # its slots are cached ones too
            self._return_idle()
        except Exception as exc:
            log.warning("could not return the cache of a pool whose janitor failed: %r", exc)
        if self._conn.broken is None:
            self._conn.broken = ManagerGoneError(
                f"this pool's janitor thread failed {failures} times in a row "
                f"({type(cause).__name__}: {cause}), so the pool no longer answers the "
                "manager; close it and connect again"
            )

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's connection and cached slots.

        The connection forgets the parent's socket, notices and mappings
        (``Connection.forget_parent``); the caches, the lent slots and the
        meter start over: the parent's leases are not the child's.
        """
        self._conn.forget_parent()
        self._janitor = None
        self._reset_counters()
        if not self._conn.closed:
            self._new_caches()
        else:
            self._meter = _Meter()

    # ------------------------------------------------------------ public

    @property
    def cache_hits(self) -> int:
        """Acquires served from this process's cache since connecting."""
        return max(0, self._acquired() - self._misses)

    def stats(self, *, leases_older_than: float | None = None) -> PoolStats:
        """The manager's statistics, plus this process's in ``"local"``.

        This process's usage (``usage()``) goes to the manager first, so its
        figures for this process are current. The keys and their types are
        ``shmpool.PoolStats``'s (a ``TypedDict``: a plain dict at run time).

        ``leases_older_than`` (seconds): also list, under ``"leases"``, the
        leases held that long or longer in every process that tracks its
        leases (``track=True``), as they last reported them, this one's
        first brought up to date (see the guide's "Finding leaked leases").

        Raises:
            ManagerGoneError, PoolClosedError.
            TypeError, ValueError: ``leases_older_than`` is not seconds >= 0.
        """
        leases = _leases_ms(leases_older_than)
        reply, fds = self._after_restart(lambda: self._ask_stats(leases, leases_older_than))
        close_fds(fds)
        if not isinstance(reply, p.StatsReply):
            raise self._conn.gone(ProtocolError(f"expected StatsReply, got {type(reply).__name__}"))
        stats = cast(PoolStats, dict(reply.stats))
        stats["local"] = {
            "pid": os.getpid(),
            "cache_hits": self.cache_hits,
            "manager_acquires": self.manager_acquires,
            "messages": self.messages,
            "cached": {str(1 << (self._min_shift + c.cls)): len(c) for c in self._caches if c},
        }
        return stats

    def _ask_stats(
        self, leases: int, leases_older_than: float | None
    ) -> tuple[p.Message, list[int]]:
        with self._conn.lock:
            self._report_usage()
            if leases != p.NO_LEASES and self._track is not None:
                self._report_leases(leases_older_than)  # this process's, current
            return self._conn.call(p.Stats(self._conn.next_req(), leases))

    def usage(self) -> PoolUsage:
        """What this process uses of the pool, as it reports it to the manager.

        ``"requested"`` maps ``k`` to the bytes of the leases open in this
        process whose length ``n`` (``len(lease.view)``) has
        ``(n - 1).bit_length() == k``, and ``"requested_bytes"`` is their
        sum: every lease counts, however it was made (acquired, attached,
        unpickled, a reader's share, a ``SharedBuffer``'s), from when it is
        made until its view is released (``release()``, a ``with`` block,
        ``detach()``, ``share()``, pickling, or its garbage collection: it
        gives its slot back then, with a ``ResourceWarning``). ``"sizes"`` maps ``k`` to how
        many ``acquire(size)`` calls with ``(size - 1).bit_length() == k``
        returned a lease since this connection began (not attaches). Only
        nonzero entries are listed. Read without the lock: a snapshot.

        A forked child starts from zero, and so does a pool that lost its
        connection; the leases from before settle with the meter they were
        counted in, not this one.
        """
        requested, sizes = self._meter.snapshot()
        return {
            "requested_bytes": sum(requested),
            "requested": {k: n for k, n in enumerate(requested) if n},
            "sizes": {k: c for k, c in enumerate(sizes) if c},
        }

    def held_leases(self, older_than: float = 0.0) -> list[dict[str, Any]]:
        """The leases of this pool open now and held ``older_than`` seconds or more.

        Oldest first, one dict each: ``slot`` (``"segment:index"``),
        ``size`` (bytes asked for), ``capacity``, ``age`` (seconds), and
        ``where``: ``"file:line in function"`` of the acquire and its
        callers, innermost first. Needs tracking (``track=True`` or
        ``$SHMPOOL_TRACK``); only leases from ``acquire()`` are tracked.

        Raises:
            UsageError: this pool does not track its leases.
        """
        if self._track is None:
            raise UsageError(
                "this pool does not track its leases: connect with track=True "
                f"or set {tracking.TRACK_VAR}=1 before connecting"
            )
        return self._track.entries(older_than)

    def _report_leases(self, older_than: float | None = None) -> None:
        """Send the manager this process's long-held leases if due (tracking; lock held).

        ``older_than`` None: the janitor's report (``Tracker.report``); a
        number: at once, for a Stats that asks for leases that old.
        """
        if self._track is None or not self._live():
            return
        report = self._track.report(self._conn.next_req, older_than)
        if report is not None:
            self._conn.send(p.encode(report), counted=False)

    def _report_usage(self, due_only: bool = False) -> None:
        """Send the manager a ``Usage`` if what this process uses changed (lock held).

        ``due_only`` (the janitor's ticks): only once ``USAGE_PERIOD`` has
        passed since the last report. The report carries the bytes of the
        open leases (the manager replaces its last figures with them) and
        the acquires since the last report; nonzero pairs only. Nothing goes
        on a connection that is not this process's own and live.
        """
        now = time.monotonic()
        if not self._live() or (due_only and now - self._usage_at < USAGE_PERIOD):
            return
        requested, sizes = self._meter.snapshot()
        sent_requested, sent_sizes = self._usage_sent
        if requested == sent_requested and sizes == sent_sizes:
            return
        acquired = (c - was for c, was in zip(sizes, sent_sizes, strict=True))
        usage = p.Usage(self._conn.next_req(), _nonzero(requested), _nonzero(acquired))
        self._conn.send(p.encode(usage), counted=False)
        self._usage_sent = (requested, sizes)
        self._usage_at = now

    @property
    def messages(self) -> int:
        """Requests this process sent the manager on this connection (usage reports aside)."""
        return self._conn.messages

    @property
    def client_id(self) -> int:
        """The manager's id of this process's connection (-1 until a forked child connects)."""
        return self._conn.client_id

    # ------------------------------------------------------------ handoff
    # A lease calls these (LeaseHome); lending does the work.

    def _detach(self, lease: Lease, readers: int = 0) -> Handle:
        return self._lending.detach(lease, readers)

    def _hand_off(self, lease: Lease) -> tuple[int, ...]:
        """``tuple(lease.detach())``: what pickling a Lease sends (the C ``__reduce__`` too).

        ``Lending.hand_off``, its common case (in C) called straight from here.
        """
        conn = self._conn
        if conn.tickets_on:
            fields: tuple[int, ...] | None = _speedups.hand_off(conn, self._lending, lease)
            if fields is not None:
                return fields
        return self._lending.hand_off(lease)

    def _give_back(self, slot: _Slot) -> None:  # pragma: no cover - a borrowed home is lending's
        self._lending.give_back(slot)

    def _take(self, fields: tuple[int, ...]) -> Lease | None:
        """Claim a pickled Lease's slot by its ticket word (``Lending.take``), or None."""
        return self._lending.take(fields)

    def attach(self, handle: Handle) -> Lease:
        """Lease the slot behind ``handle`` (from ``Lease.detach()``) to this process.

        No byte is copied: the Lease shows the same memory the sender wrote.

        Raises:
            StaleHandleError: attached already, expired, forged, or issued by
                another manager; no memory is mapped then.
            TypeError: ``handle`` is not a ``Handle``.
            ManagerGoneError, PoolClosedError.
        """
        if not isinstance(handle, Handle):
            raise TypeError(f"attach() needs a shmpool.Handle, not {type(handle).__name__}")
        if handle.instance != self._conn.instance and self._conn.can_reopen():
            with self._conn.lock:  # a restarted manager's handle, maybe: reach it first
                self._conn.ensure()
        if handle.instance != self._conn.instance:
            raise StaleHandleError(
                "this handle was issued by another manager (or by an earlier run of this "
                "one, since restarted); attach it in a process connected to the manager "
                "that issued it, within its transit timeout"
            )
        if not all(type(v) is int and 0 <= v <= p.MAX_ID for v in handle):
            raise StaleHandleError("this handle is forged: a field is out of range")
        _, segment, index, generation, sealed, length, capacity, readers = handle
        if not 0 < capacity <= p.MAX_BUFFER or length > capacity or readers > p.MAX_READERS:
            raise StaleHandleError("this handle is forged: a field is out of range")
        lease = self._lending.claim(handle)
        if lease is not None:
            return lease
        # The manager checks the capacity and the readers against its record
        # of the slot, and the token, unsealed with them and the length,
        # against the handoff's: a handle with any of them changed is refused.
        token = p.seal_token(sealed, length, capacity, readers)
        with self._conn.lock:
            ref = p.SlotRef(segment, index, generation)
            req = self._conn.next_req()
            request = p.encode(p.Attach(req, ref, token, capacity, readers))
            reply, fds = self._conn.roundtrip(req, request)
            size = reply.slot_size if isinstance(reply, p.Grant) else capacity
            if readers:
                home: Any = self._shared_home
            elif isinstance(reply, p.Grant) and reply.lent:
                home = self._lending.borrowed  # lent: it goes back to its lender on release
            elif size > self.max_size or size & (size - 1):
                home = self._oversize_home
            else:
                home = self._caches[max(0, size.bit_length() - 1 - self._min_shift)]
            slots = self._granted(reply, fds, home)
            meter = self._meter  # this connection's, as home is
            self._ensure_janitor()  # recalls answered, usage reported, idle cache returned
        slot = slots[0]
        if readers:
            slot.view = slot.view.toreadonly()
        return make_lease(slot, min(length, slot.capacity), meter)

    def buffer(self, size_hint: int = 0) -> SharedBuffer:
        """A growable file-like ``SharedBuffer`` in this pool (see ``shmpool.SharedBuffer``).

        ``size_hint`` bytes are reserved at once (none if 0: the first write does).
        """
        return SharedBuffer(self, size_hint)

    def attach_buffer(self, handle: Handle) -> SharedBuffer:
        """Rebuild a ``SharedBuffer`` from ``SharedBuffer.detach()`` (raises as ``attach``)."""
        return SharedBuffer(self, _lease=self.attach(handle))

    def trim(self) -> int:
        """Give every slot cached in this process back to the manager now.

        Worth calling before a process goes to sleep for long; the cache
        refills on the next acquire. Returns how many slots went back.
        """
        with self._conn.lock:
            if not self._live():
                return 0
            for req in list(self._conn.prefetching):
                self._conn.await_reply(req)  # its slots are ours too: they go back as well
            if self._lending.lent:
                self._lending.reclaim_lent()  # and those lent out and returned since
            return sum(self._return(cache, 0) for cache in self._caches)

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def close(self) -> None:
        """Close the connection; the manager reclaims every slot this process held.

        Leases still open keep their memory mapped but must not be used
        afterwards (another process may be given the same slot).
        """
        if self._conn.closed:
            return
        with self._conn.lock:
            if self._conn.notices:
                with contextlib.suppress(ShmpoolError):
                    self._conn.flush_notices()  # the manager learns where the slots went
            for cache in self._caches:
                cache.clear()
            self._lending.forget()  # the manager settles lent slots by their words
            self._lookup = _Closed()
            fast = self._fast
            if fast is not None:
                fast.lookup = []  # every call takes the slow path, which raises
            self._conn.close()  # a mapping a lease still exports stays until GC
        if self._janitor is not None:
            self._janitor.wake()
        _POOLS.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn.closed else "broken" if self._conn.broken else "open"
        return f"<shmpool.Pool {self.address} {state}>"


_new_ref = tuple.__new__  # SlotRef from checked ints, without the NamedTuple's Python __new__


def _pop(cache: _Cache) -> _Slot | None:
    """The last slot of ``cache``, or None if it is empty (or another thread emptied it)."""
    try:
        return cache.pop()  # type: ignore[no-any-return]
    except IndexError:
        return None


def _wait_ms(timeout: float | None) -> int:
    """``Acquire.wait`` for an ``acquire(timeout=...)``.

    Raises:
        TypeError, ValueError: not a number, or negative (or NaN).
    """
    if timeout is None:
        return p.WAIT_DEFAULT
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
        )
    timeout = float(timeout)  # numpy floats and the like too
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    return min(p.WAIT_DEFAULT - 1, math.ceil(timeout * 1000))


def _leases_ms(older_than: float | None) -> int:
    """``Stats.leases`` for ``stats(leases_older_than=...)``.

    Raises:
        TypeError, ValueError: not a number of seconds >= 0.
    """
    if older_than is None:
        return p.NO_LEASES
    if isinstance(older_than, bool) or not isinstance(older_than, numbers.Real):
        raise TypeError(f"leases_older_than must be seconds or None, not {older_than!r}")
    if not 0 <= float(older_than) <= p.MAX_LEASE_AGE_MS / 1000:
        raise ValueError(f"leases_older_than must be >= 0 seconds, got {older_than}")
    return int(float(older_than) * 1000)


def _nonzero(counts: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """The pairs ``(k, n)`` of ``counts`` whose ``n`` is not 0, as ``Usage`` carries them."""
    return tuple((k, n) for k, n in enumerate(counts) if n)


def connect(
    address: str | os.PathLike[str] | None = None,
    *,
    name: str = "",
    timeout: float = 30.0,
    track: bool | None = None,
    reconnect: bool | float = True,
) -> Pool:
    """Connect to a running manager.

    ``address`` defaults to ``$SHMPOOL_ADDRESS``, then to the address a plain
    ``shmpool serve`` uses. ``timeout`` bounds every wait for a reply.
    ``track``: record where each lease is acquired (``Pool.held_leases()``;
    default ``$SHMPOOL_TRACK``). ``reconnect``: after the manager exits or
    dies, the next call reaches the manager restarted at the same address,
    trying for ``RECONNECT_WAIT`` seconds (a number: that many; ``False``:
    never, and the pool stays broken; see ``Pool``).

    Raises:
        ManagerGoneError: no manager listens there.
        AccessDeniedError: the manager refused this user.
    """
    return Pool(address, name=name, timeout=timeout, track=track, reconnect=reconnect)


def _reconnect_wait(reconnect: object) -> float:
    """Seconds to try reaching a restarted manager for ``Pool(reconnect=...)`` (0: never).

    Raises:
        TypeError, ValueError: not a bool, nor a number of seconds >= 0.
    """
    if reconnect is True:
        return RECONNECT_WAIT
    if reconnect is False:
        return 0.0
    if not isinstance(reconnect, numbers.Real):
        raise TypeError(f"reconnect must be a bool or seconds, not {type(reconnect).__name__}")
    seconds = float(reconnect)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"reconnect must be a bool or seconds >= 0, got {reconnect!r}")
    return seconds


def live_pools() -> list[Pool]:
    """The pools of this process that are open and usable, oldest first."""
    return sorted((pool for pool in list(_POOLS) if pool._live()), key=_age)


def _age(pool: Pool) -> int:
    return pool._serial
