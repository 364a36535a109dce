"""gunicorn server hooks: one manager in the master, a lazy pool in each worker.

In the gunicorn config file (it runs in the master)::

    from shmpool.gunicorn import *  # noqa: F403  (the hooks below)
    import shmpool.gunicorn
    shmpool.gunicorn.configure(memory="512MiB")  # optional: shmpool.start()'s settings

and in the app, ``shmpool.get_pool()`` wherever a buffer is needed.

The order of events, and what each hook does about it:

- gunicorn executes the config file, which imports this module. Nothing
  starts yet: ``gunicorn --check-config`` must not start a manager, and with
  ``daemon = True`` the process that reads the config is not the master.
- With ``--preload``, the master imports the app *before* ``on_starting``.
  An app that calls ``get_pool()`` at import time finds no address; this
  module's fallback then starts the manager right there, in the master
  (only in a process that runs gunicorn and is not one of its workers).
- ``on_starting`` starts the manager, unless it already runs or
  ``$SHMPOOL_ADDRESS`` names one (a separate ``shmpool serve``, which is
  then used and left alone). ``shmpool.start()`` exports its address as
  ``$SHMPOOL_ADDRESS``, which every worker inherits.
- Workers fork. Each connects on its first ``get_pool()``, or through the
  pool the master made at preload, which reconnects in each child by itself.
  ``post_fork`` only marks the process as a worker, so that the fallback
  never starts a manager in one.
- A worker dies (SIGKILL, out of memory, ``max_requests``, a timeout). The
  manager watches each client's process (its pidfd) and socket, so its
  slots are back before gunicorn even reaps it; ``child_exit`` only checks
  that the manager still runs, and starts it again at the same address if
  it died (new workers, and old ones whose ``get_pool()`` finds their pool
  broken, connect to the new one).
- ``HUP``: gunicorn executes the config file again, but this module stays
  imported, and so does its manager: nothing is started twice, nothing is
  lost. ``on_reload`` restarts the manager only if it died. Settings given
  to ``configure()`` take effect at the next start of the manager.
- ``on_exit`` closes the master's own pool (if preload made one) and stops
  the manager. gunicorn reaps every child of its master, so the manager's
  exit status is lost there: ``stop()`` returns 0 then.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from typing import Any

from .default import _set_fallback, close_pool, configured_address
from .embedded import ManagerProcess, start

__all__ = [
    "ENV_SETTINGS",
    "child_exit",
    "configure",
    "ensure_manager",
    "manager",
    "on_exit",
    "on_reload",
    "on_starting",
    "post_fork",
]

log = logging.getLogger("shmpool")

#: Environment variables read (when the manager starts) as its settings;
#: ``configure()`` overrides them.
ENV_SETTINGS = {
    "SHMPOOL_MIN_SIZE": "min_size",
    "SHMPOOL_MAX_SIZE": "max_size",
    "SHMPOOL_MEMORY": "memory",
}

_START_PARAMETERS = frozenset(inspect.signature(start).parameters) - {"address"}

_lock = threading.RLock()
_manager: ManagerProcess | None = None
_settings: dict[str, Any] = {}
_master_pid: int | None = None  # set by on_starting
_in_worker = False  # set by post_fork
_stopped = False  # set by on_exit


def configure(**settings: Any) -> None:
    """Settings for the embedded manager: the keyword arguments of ``shmpool.start()``.

    Call it in the gunicorn config file. They apply when the manager
    starts; a manager already running keeps its own (until it is restarted).

    Raises:
        TypeError: a name ``shmpool.start()`` does not take (or ``address``:
            set ``$SHMPOOL_ADDRESS`` to use a manager of your own instead).
    """
    unknown = sorted(set(settings) - _START_PARAMETERS)
    if unknown:
        raise TypeError(f"shmpool.gunicorn.configure() got unknown settings: {unknown}")
    with _lock:
        _settings.clear()
        _settings.update(settings)


def manager() -> ManagerProcess | None:
    """The manager these hooks started in this process, if any."""
    return _manager


def ensure_manager() -> str:
    """Start the embedded manager if none runs; return the address to connect to.

    The address of the manager these hooks started (started again at the
    same address if it died), else that of ``$SHMPOOL_ADDRESS`` (a manager
    run by someone else), else that of a new embedded manager.

    Raises:
        ShmpoolError: the manager failed to start.
        ValueError, TypeError: bad settings.
    """
    global _manager
    with _lock:
        if _manager is not None:
            if _manager.running:
                return _manager.address
            address = _manager.address
            log.error("shmpool: the manager at %s exited; starting it again", address)
            _manager.stop()  # closes our end of its lifeline, removes its socket
            _manager = start(address=address, **_start_settings())
            return _manager.address
        configured = configured_address()
        if configured is not None:
            return configured
        _manager = start(**_start_settings())
        log.info("shmpool: manager %d listens at %s", _manager.pid, _manager.address)
        return _manager.address


def _start_settings() -> dict[str, Any]:
    settings: dict[str, Any] = {
        name: os.environ[var] for var, name in ENV_SETTINGS.items() if os.environ.get(var)
    }
    settings.update(_settings)
    return settings


# ---------------------------------------------------------------- the hooks


def on_starting(server: Any) -> None:
    """gunicorn hook, in the master before the workers: start the manager."""
    global _master_pid, _stopped
    _master_pid = os.getpid()
    _stopped = False
    address = ensure_manager()
    if _manager is None:
        server.log.info("shmpool: using the manager at %s ($SHMPOOL_ADDRESS)", address)
    else:
        server.log.info("shmpool: manager %d listens at %s", _manager.pid, address)


def on_reload(server: Any) -> None:
    """gunicorn hook, in the master on HUP: keep the manager (start it again if it died)."""
    if _manager is not None and not _manager.running:
        server.log.error("shmpool: the manager exited; starting it again")
    ensure_manager()


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook, in each new worker: it connects on its first ``get_pool()``."""
    global _in_worker
    _in_worker = True


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook, in the master when a worker has exited: check the manager.

    The manager has already taken the worker's slots back: it watched the
    worker's process and socket. If the manager itself died, it is started
    again at the same address.
    """
    if _stopped or _manager is None or _manager.running:
        return
    server.log.error("shmpool: the manager exited; starting it again")
    ensure_manager()


def on_exit(server: Any) -> None:
    """gunicorn hook, in the master at shutdown: stop the manager."""
    global _manager, _stopped
    _stopped = True
    close_pool()  # the master's own, if the app made one at preload
    with _lock:
        ours, _manager = _manager, None
    if ours is not None:
        ours.stop()
        server.log.info("shmpool: manager %d stopped", ours.pid)


# ------------------------------------------------------------- the fallback


def _fallback() -> str | None:
    """``get_pool()`` found no address: in the master before ``on_starting``, start the manager.

    That is the ``--preload`` case. Never in a worker (``post_fork`` ran, or
    this is not the process that ran ``on_starting``), nor in a process that
    does not run gunicorn (a script that merely imported this module).
    """
    if _in_worker or _stopped or "gunicorn.arbiter" not in sys.modules:
        return None
    if _master_pid is not None and _master_pid != os.getpid():
        return None
    return ensure_manager()


_set_fallback(_fallback)
