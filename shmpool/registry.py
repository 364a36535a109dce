"""Where a pickled Lease or SharedBuffer comes back to life: a pool of this process.

Pickling a lease hands its slot over (see ``shmpool.handle``): the pickle
holds the handle's fields and names ``rebuild_lease``, which the unpickling
process runs. It attaches the handle in a pool of that process connected
to the manager that issued it: the one it used last, else any open one,
else a pool it opens itself with ``connect()`` (``$SHMPOOL_ADDRESS``), kept
for the next. ``rebuild_buffer`` does the same for a ``SharedBuffer``.

This module depends on the client and the lease modules and nothing
depends on it but the package, which imports it first thing; it tells
``buffer`` and ``sharedbuffer`` (and the C ``LeaseBase``) which functions
their ``__reduce__`` names, so that no import runs in a circle.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from . import buffer, sharedbuffer
from ._native import speedups
from .buffer import Lease
from .client import Pool, live_pools
from .handle import Handle
from .sharedbuffer import SharedBuffer

__all__ = ["pool_for", "rebuild_buffer", "rebuild_lease"]


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
        ManagerGoneError: no pool is open and no manager answers at the address.
    """
    global _last_pool
    pool = _last_pool()
    if pool is not None and pool.manager_instance == handle.instance and pool._live():
        return pool
    for pool in live_pools():
        if pool.manager_instance == handle.instance:
            break
    else:
        pool = _default_pool()
    _last_pool = weakref.ref(pool)
    return pool


def _default_pool() -> Pool:
    """The pool unpickled leases attach to when none is open: ``connect()``."""
    global _default
    with _default_lock:
        if _default is None or not _default._live():
            _default = Pool(name="shmpool-unpickle")
        return _default


_fast_take = speedups.take if speedups is not None else None


def rebuild_lease(*fields: int) -> Lease:
    """Unpickle a Lease: attach its handle (given field by field) in a pool of this process.

    Raises:
        StaleHandleError: attached already, expired, forged, or another manager's.
        ManagerGoneError: no pool of this process can reach the manager.
    """
    pool = _last_pool()
    if pool is not None and pool.manager_instance == fields[0] and _fast_take is not None:
        # Lending.take, called straight: C with the pool's collaborators as arguments
        lease: Lease | None = _fast_take(pool._conn, pool._lending, fields)
        if lease is not None:
            return lease
    handle = Handle(*fields)
    return pool_for(handle).attach(handle)


def rebuild_buffer(handle: Handle) -> SharedBuffer:
    """Unpickle a SharedBuffer: attach its handle in a pool of this process.

    Raises:
        StaleHandleError, ManagerGoneError: as ``rebuild_lease``.
    """
    return pool_for(handle).attach_buffer(handle)


buffer.configure_pickling(rebuild_lease)
sharedbuffer.configure_pickling(rebuild_buffer)
if speedups is not None:
    speedups.configure_pickling(rebuild_lease)  # what the C Lease.__reduce__ names
