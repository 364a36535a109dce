"""This process's default pool: ``shmpool.get_pool()``.

Code that runs in many processes (a gunicorn worker's request handler, a
``multiprocessing`` task) wants "this process's pool" without passing one
around and without knowing which process it runs in. ``get_pool()`` is that.

One connection per process. The first call connects while holding a lock,
so threads that call it at the same moment (a fresh gthread worker taking
its first requests) share one connection; every later call returns the pool
without taking the lock.

Fork. A forked child inherits the pool object, and ``Pool`` already takes
care of it: in the child it drops the parent's connection and cache and
opens its own connection the first time it needs the manager (see the fork
note in ``client``). So the child's ``get_pool()`` returns the same object,
which from then on is the child's own client of the manager. The lock is
made anew in the child, in case a thread of the parent held it at the fork.
Children made by spawn or forkserver import this module afresh.

Replacement. A pool that was closed, or that lost its manager, is replaced
by a new connection on the next call, so a manager restarted at the same
address is found again, whatever its size classes; otherwise the pool lives
as long as the process. (A pool of one's own reaches a restarted manager by
itself: ``Pool(reconnect=True)``; this one is replaced instead, which
needs no wait and takes any size classes.)

The address. ``set_default_address()``, else ``$SHMPOOL_ADDRESS``, else
the fallback ``shmpool.gunicorn`` registers in a gunicorn master (it starts
the embedded manager), else ``AddressNotSetError``. Unlike
``shmpool.connect()``, never the default socket of ``shmpool serve``: a
worker that was not told where its manager is should hear so, not connect
to whichever manager happens to listen there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from .address import ENV_VAR, resolve
from .client import Pool
from .errors import AddressNotSetError

__all__ = ["close_pool", "configured_address", "get_pool", "set_default_address"]

#: What ``AddressNotSetError`` tells the user to do.
FIX = (
    "set SHMPOOL_ADDRESS to the manager's socket (shmpool.start() sets it for its "
    "children; `shmpool serve --address PATH` listens there), or call "
    "shmpool.set_default_address(address); under gunicorn, use the shmpool.gunicorn "
    "hooks in the config file (`from shmpool.gunicorn import *`); for multiprocessing, "
    "pass **shmpool.mp.initializer_kwargs(address) to Pool or ProcessPoolExecutor"
)

_lock = threading.Lock()
_pool: Pool | None = None
_address: str | None = None  # set_default_address()
_fallback: Callable[[], str | None] | None = None  # shmpool.gunicorn's, in the master


def get_pool() -> Pool:
    """This process's pool, connected to the default manager on first use.

    Safe to call from any thread, as often as you like (once per request
    is fine); threads share one connection. After ``os.fork`` the child's
    pool opens its own connection on first use. A pool that was closed or
    lost its manager is replaced by a new connection.

    Raises:
        AddressNotSetError: no manager address is known (the message says how to set one).
        ManagerGoneError: no manager listens at the address.
        AccessDeniedError: the manager refused this user.
    """
    pool = _pool
    if pool is not None and _usable(pool):
        return pool
    with _lock:
        pool = _pool
        if pool is not None and _usable(pool):
            return pool
        if pool is not None:
            pool.close()  # broken: its leases died with the connection
        return _connect()


def _connect() -> Pool:
    """Open this process's default pool (the lock is held)."""
    global _pool
    _pool = None
    address = configured_address()
    if address is None and _fallback is not None:
        address = _fallback()
    if address is None:
        raise AddressNotSetError(f"no shmpool manager address is set in this process: {FIX}")
    _pool = Pool(address)
    return _pool


def _usable(pool: Pool) -> bool:
    """Open, and not cut off from its manager (a forked child's copy counts as usable)."""
    return pool._live()


def configured_address() -> str | None:
    """The address ``get_pool()`` connects to, or None if none is set.

    ``set_default_address()``'s, else ``$SHMPOOL_ADDRESS``.
    """
    return _address or os.environ.get(ENV_VAR) or None


def set_default_address(address: str | os.PathLike[str] | None) -> None:
    """Make ``get_pool()`` in this process connect to the manager at ``address``.

    Also exports it as ``$SHMPOOL_ADDRESS``, so that processes started from
    here on (subprocesses, spawn children) find the same manager. A default
    pool already open to another address is closed: leases of it must not
    be used afterwards. ``None`` forgets the address (and takes it out of
    the environment, if it is still there); an open pool stays.

    Raises:
        ValueError: the path is longer than a socket address may be.
    """
    global _address
    with _lock:
        if address is None:
            if _address is not None and os.environ.get(ENV_VAR) == _address:
                del os.environ[ENV_VAR]
            _address = None
            return
        path = resolve(address)
        _address = path
        os.environ[ENV_VAR] = path
        if _pool is not None and _pool.address != path:
            _close_locked()


def close_pool() -> None:
    """Close this process's default pool, if it has one; ``get_pool()`` connects again.

    Its leases must not be used afterwards (the manager takes their slots back).
    """
    with _lock:
        _close_locked()


def _close_locked() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.close()


def _set_fallback(fallback: Callable[[], str | None] | None) -> None:
    """Ask ``fallback`` for an address when none is set (``shmpool.gunicorn``, in the master)."""
    global _fallback
    _fallback = fallback


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
