"""Where a pickled Lease or SharedBuffer comes back to life: a pool of this process.

Pickling a lease hands its slot over (see ``shmpool.handle``): the pickle
holds the handle's fields and names ``rebuild_lease``, which the unpickling
process runs. It attaches the handle in a pool of that process connected
to the manager that issued it: the one it used last, else any open one
(or one whose manager restarted, once it reconnects), else a pool it opens
itself (named ``shmpool-unpickle``) and keeps for the next, at the address
``shmpool.get_pool()`` would use (``set_default_address()``, else
``$SHMPOOL_ADDRESS``), else at the default address of ``shmpool serve``.
``rebuild_buffer`` does the same for a ``SharedBuffer``. The pickle carries
no address: the handle's fields are all it holds (``Handle``).

When no manager can be found, unpickling raises ``ManagerGoneError`` (or
``StaleHandleError``, for a manager that did not issue the handle), whose
message says how to give the process an address. Except in the two places
where an exception would be lost: ``multiprocessing.Pool`` reads its tasks
(in a worker) and their results (in a thread of the parent) with no way to
report a failed unpickling, so the task or result would vanish and
``get()``/``map()`` would wait for it forever. There, the lease comes back as
an ``UnreceivedLease``, whose every use raises that error: a task that uses
its argument fails, and ``get()`` raises the error in the parent.

This module depends on the client and the lease modules and nothing
depends on it but the package, which imports it first thing; it tells
``buffer`` and ``sharedbuffer`` (and the C ``LeaseBase``) which functions
their ``__reduce__`` names, so that no import runs in a circle.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from . import buffer, default, sharedbuffer
from ._native import speedups
from .address import resolve
from .buffer import Lease
from .client import _POOLS, Pool, live_pools
from .errors import ManagerGoneError, ShmpoolError
from .handle import Handle
from .sharedbuffer import SharedBuffer

__all__ = ["UnreceivedLease", "pool_for", "rebuild_buffer", "rebuild_lease"]

#: What the error of an unpickling that found no manager tells the user to do.
FIX = (
    "give this process the manager's address before it receives leases: "
    "shmpool.set_default_address(address) or $SHMPOOL_ADDRESS (set before a "
    "spawn child starts, or the forkserver starts), or open a pool with "
    "shmpool.connect(address); for multiprocessing.Pool and ProcessPoolExecutor "
    "workers, pass **shmpool.mp.initializer_kwargs(address)"
)


def _no_pool() -> Pool | None:
    return None


_last_pool: Callable[[], Pool | None] = _no_pool
_default: Pool | None = None
_default_lock = threading.Lock()


def pool_for(handle: Handle) -> Pool:
    """A live pool of this process connected to the manager that issued ``handle``.

    The last one found is tried first: a process that unpickles many leases
    should not walk every pool for each. With none open, a pool connected
    by ``connect()`` (its address from ``$SHMPOOL_ADDRESS``) is opened and
    kept.

    Raises:
        ManagerGoneError: no pool is open and no manager answers at the address
            (the message says how to give this process one).
    """
    global _last_pool
    pool = _last_pool()
    if pool is not None and pool.manager_instance == handle.instance and pool._live():
        return pool
    for pool in live_pools():
        if pool.manager_instance == handle.instance:
            break
    else:
        pool = _restarted_pool(handle) or _default_pool()
    _last_pool = weakref.ref(pool)
    return pool


def _restarted_pool(handle: Handle) -> Pool | None:
    """A pool of ours whose manager hung up, once it reached ``handle``'s manager, or None.

    A lease sent by a process that already reconnected to a restarted
    manager may reach one that has not yet.
    """
    for pool in sorted(list(_POOLS), key=lambda pool: pool._serial):
        if pool._conn.can_reopen() and pool._conn.pid == os.getpid():
            try:
                with pool._conn.lock:
                    pool._conn.ensure()
            except ShmpoolError:
                continue
            if pool.manager_instance == handle.instance:
                return pool
    return None


def _default_pool() -> Pool:
    """The pool unpickled leases attach to when none is open, opened once and kept.

    At the address ``shmpool.get_pool()`` would connect to, if one is set,
    else at ``connect()``'s default.

    Raises:
        ManagerGoneError: no manager answers there (with what to do).
    """
    global _default
    address = default.configured_address()
    which = "the address set in this process"
    if address is None:
        address, which = resolve(None), "the default address: none is set"
    try:
        with _default_lock:
            if (
                _default is None
                or _default.address != address
                or not (_default._live() or _default._conn.can_reopen())
            ):
                _default = Pool(address, name="shmpool-unpickle")
            return _default
    except ManagerGoneError:
        raise ManagerGoneError(
            f"cannot unpickle a shmpool Lease in process {os.getpid()}: no pool of this "
            f"process is connected to the manager that issued it, and no manager answers "
            f"at {address} ({which}); {FIX}"
        ) from None


_fast_take = speedups.take if speedups is not None else None


def rebuild_lease(*fields: int) -> Lease:
    """Unpickle a Lease: attach its handle (given field by field) in a pool of this process.

    Raises:
        StaleHandleError: attached already, expired, forged, or another manager's.
        ManagerGoneError: no pool of this process can reach the manager.
    """
    pool = _last_pool()
    if pool is not None and pool._conn.instance == fields[0] and _fast_take is not None:
        # Lending.take, called straight: C with the pool's collaborators as arguments
        lease: Lease | None = _fast_take(pool._conn, pool._lending, fields)
        if lease is not None:
            return lease
    handle = Handle(*fields)
    try:
        return pool_for(handle).attach(handle)
    except ShmpoolError as exc:
        if not _in_pool_plumbing():
            raise
        return UnreceivedLease(exc)  # type: ignore[return-value]


def rebuild_buffer(handle: Handle) -> SharedBuffer:
    """Unpickle a SharedBuffer: attach its handle in a pool of this process.

    Raises:
        StaleHandleError, ManagerGoneError: as ``rebuild_lease``.
    """
    try:
        return pool_for(handle).attach_buffer(handle)
    except ShmpoolError as exc:
        if not _in_pool_plumbing():
            raise
        return UnreceivedLease(exc)  # type: ignore[return-value]


class UnreceivedLease:
    """A Lease (or SharedBuffer) that a ``multiprocessing.Pool`` passed but could not attach.

    Stands in for it in the task's arguments (in a worker) or in the results
    (in the parent), where raising while unpickling would lose the task and
    hang the pool. Every use (``view``, ``release()``, ``with``, ``len()``,
    pickling it on) raises the error the attach raised (``ManagerGoneError``
    or ``StaleHandleError``, with what to do), so a task that uses it fails
    and its ``get()`` raises that error in the parent.
    """

    __slots__ = ("error",)

    def __init__(self, error: ShmpoolError) -> None:
        self.error = error

    def _fail(self) -> NoReturn:
        raise type(self.error)(str(self.error))  # a fresh one each time: no growing traceback

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()

    def __enter__(self) -> NoReturn:
        self._fail()

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ raised
        pass

    def __len__(self) -> int:
        self._fail()

    def __reduce__(self) -> NoReturn:
        self._fail()

    def __repr__(self) -> str:
        return f"<shmpool.registry.UnreceivedLease: {type(self.error).__name__}: {self.error}>"


def _in_pool_plumbing() -> bool:
    """Whether this unpickling reads a ``multiprocessing.Pool`` task or result.

    There, an exception ends the worker (or the pool's result thread) and
    the task is never answered: ``multiprocessing.pool.worker`` reading its
    next task, ``Pool._handle_results`` reading a result.
    """
    pool_module: Any = sys.modules.get("multiprocessing.pool")
    if pool_module is None:
        return False
    plumbing = (pool_module.worker.__code__, pool_module.Pool._handle_results.__code__)
    frame = sys._getframe(1)
    for _ in range(_PLUMBING_DEPTH):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        if frame.f_code in plumbing:
            return True
    return False


#: How many frames up ``_in_pool_plumbing`` looks (the pool's own ``recv``/``get`` in between).
_PLUMBING_DEPTH = 8


buffer.configure_pickling(rebuild_lease)
sharedbuffer.configure_pickling(rebuild_buffer)
if speedups is not None:
    speedups.configure_pickling(rebuild_lease)  # what the C Lease.__reduce__ names
