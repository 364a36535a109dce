"""The per-pool janitor thread: recalls, a dead manager, and idle caches."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .errors import ShmpoolError

if TYPE_CHECKING:
    from .client import Pool

__all__ = ["JANITOR_PERIOD", "Janitor"]

log = logging.getLogger("shmpool")

#: How often the janitor thread looks for recalls and idleness.
JANITOR_PERIOD = 0.05


class Janitor(threading.Thread):
    """Per-pool daemon thread: answers recalls, sends handoff notices, takes back
    lent slots, returns an idle cache.

    Every ``JANITOR_PERIOD`` it looks, without blocking anyone, whether the
    manager spoke unasked (a Recall, or end-of-file when it died) and
    whether the cache sat unused for ``idle_timeout``. It does not sleep on
    the socket itself: then every reply to the acquiring thread would wake it
    and the two would trade the GIL on the slow path. A thread that is busy
    talking to the manager handles recalls inline anyway. The pool is held
    by a weak reference only.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__(name=f"shmpool-janitor-{os.getpid()}", daemon=True)
        self._pool = weakref.ref(pool)
        self._wake = threading.Event()
        self._pid = os.getpid()

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        seen, idle_since = -1, time.monotonic()
        while True:
            pool = self._pool()
            if pool is None or os.getpid() != self._pid or pool._janitor is not self:
                return
            if not pool._live():
                return
            idle = pool.idle_timeout
            del pool
            period = JANITOR_PERIOD if idle is None else min(JANITOR_PERIOD, idle / 2)
            if self._wake.wait(period):
                self._wake.clear()
            pool = self._pool()
            if pool is None or not pool._lock.acquire(blocking=False):
                continue  # busy talking to the manager: it handles recalls itself
            try:
                if not pool._live() or pool._janitor is not self:
                    return
                pool._poll_manager()
                if pool._notices:
                    pool._flush_notices()  # handoffs the manager has not heard of yet
                if pool._lent:
                    pool._reclaim_lent()  # lent slots returned, or whose handles expired
                now = time.monotonic()
                if pool._activity() != seen:
                    seen, idle_since = pool._activity(), now
                elif idle is not None and now - idle_since >= idle:
                    if pool._return_idle():
                        log.debug("returned an idle cache after %.1f s", now - idle_since)
                    idle_since = now
            except ShmpoolError as exc:
                log.debug("janitor stopping: %s", exc)
                return
            finally:
                pool._lock.release()
                del pool
