"""The per-pool janitor thread: recalls, a dead manager, usage reports, and idle caches."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Protocol

from .errors import ShmpoolError

__all__ = ["JANITOR_FAILURES", "JANITOR_PERIOD", "Janitor", "Tended"]

log = logging.getLogger("shmpool")

#: How often the janitor thread looks for recalls and idleness.
JANITOR_PERIOD = 0.05
#: Ticks in a row that may fail before the janitor gives up and breaks its pool.
JANITOR_FAILURES = 5


class Tended(Protocol):
    """What a janitor works for (a ``Pool``): all its work is one ``tick()``."""

    @property
    def idle_timeout(self) -> float | None: ...

    @property
    def _janitor(self) -> Janitor | None: ...

    def tick(self) -> bool:
        """One round of the pool's background work; False if another thread was busy."""
        ...

    def _live(self) -> bool: ...

    def _janitor_failed(self, cause: BaseException, failures: int) -> None: ...


class Janitor(threading.Thread):
    """Per-pool daemon thread: answers recalls, sends handoff notices, takes back
    lent slots, reports usage, returns an idle cache.

    Every ``JANITOR_PERIOD`` it looks, without blocking anyone, whether the
    manager spoke unasked (a Recall, or end-of-file when it died) and
    whether the cache sat unused for ``idle_timeout``. It does not sleep on
    the socket itself: then every reply to the acquiring thread would wake it
    and the two would trade the GIL on the slow path. A thread that is busy
    talking to the manager handles recalls inline anyway. The pool is held
    by a weak reference only.

    A lost manager breaks the pool (``ManagerGoneError``) and ends the
    thread quietly: the pool's next call says so. Any other failure of a
    tick is a bug, logged with its traceback; the thread goes on, since an
    idle pool has no call that would start a new one. After
    ``JANITOR_FAILURES`` failed ticks in a row it gives up and breaks the
    pool, so that its next call raises instead of the pool silently
    leaving recalls unanswered.
    """

    def __init__(self, pool: Tended) -> None:
        super().__init__(name=f"shmpool-janitor-{os.getpid()}", daemon=True)
        self._pool = weakref.ref(pool)
        self._wake = threading.Event()
        self._pid = os.getpid()
        self._failures = 0  # ticks failed in a row

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while True:
            pool = self._pool()
            if pool is None or not self._serves(pool):
                return
            idle = pool.idle_timeout
            del pool
            period = JANITOR_PERIOD if idle is None else min(JANITOR_PERIOD, idle / 2)
            if self._wake.wait(period):
                self._wake.clear()
            pool = self._pool()
            if pool is None:
                return
            try:
                if not self._serves(pool) or not self._tick_safely(pool):
                    return
            finally:
                del pool

    def _serves(self, pool: Tended) -> bool:
        """Whether this thread still works for ``pool`` (not closed, broken, forked, replaced)."""
        return os.getpid() == self._pid and pool._janitor is self and pool._live()

    def _tick_safely(self, pool: Tended) -> bool:
        """One tick; False when the thread must end."""
        try:
            pool.tick()
        except Exception as exc:
            if isinstance(exc, ShmpoolError) and not pool._live():
                log.debug("janitor stopping: %s", exc)  # the manager is gone: the pool says so
                return False
            self._failures += 1
            if self._failures < JANITOR_FAILURES:
                log.exception("a janitor tick failed (%d in a row); trying again", self._failures)
                return True
            log.exception(
                "a janitor tick failed %d times in a row; giving up: the pool is broken",
                self._failures,
            )
            pool._janitor_failed(exc, self._failures)
            return False
        self._failures = 0
        return True
