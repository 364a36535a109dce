"""``shmpool.get_pool()``: one connection a process, from any thread, after fork, renewed."""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import MP_TIMEOUT, client_entries, wait_for

import shmpool
import shmpool.default
from shmpool.address import ENV_VAR, unique_address

THREADS = 8


pytestmark = pytest.mark.usefixtures("fresh_default_pool")


def in_threads(target: Callable[[], object], n: int = THREADS) -> list[object]:
    """Run ``target`` in ``n`` threads released at the same moment; their results."""
    barrier = threading.Barrier(n)
    results: list[object] = []

    def run() -> None:
        barrier.wait(MP_TIMEOUT)
        try:
            results.append(target())
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(MP_TIMEOUT)
    return results


def in_child(body: Callable[[], dict[str, object]]) -> tuple[int, dict[str, object]]:
    """Run ``body`` in a child of ``os.fork``; its pid and the dict it returned (as JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            os.write(w, json.dumps(body()).encode())
            code = 0
        except BaseException as exc:
            os.write(w, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + MP_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if select.select([r], [], [], deadline - time.monotonic())[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
        try:
            wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid)
        except AssertionError:
            os.kill(pid, signal.SIGKILL)  # it hung: do not leave it behind
            os.waitpid(pid, 0)
            raise
    return pid, json.loads(data or b"{}")


# ------------------------------------------------------------------ the address


def test_without_an_address_the_error_names_the_fix() -> None:
    os.environ.pop(ENV_VAR, None)
    with pytest.raises(shmpool.AddressNotSetError) as info:
        shmpool.get_pool()
    assert isinstance(info.value, shmpool.UsageError)
    message = str(info.value)
    for fix in ("SHMPOOL_ADDRESS", "set_default_address", "shmpool.gunicorn", "shmpool.mp"):
        assert fix in message, fix


def test_the_environment_names_the_manager(manager: shmpool.ManagerProcess) -> None:
    assert os.environ[ENV_VAR] == manager.address  # shmpool.start() exported it
    pool = shmpool.get_pool()
    assert pool.address == manager.address
    assert shmpool.get_pool() is pool
    with pool.acquire(10_000) as lease:
        lease.view[:5] = b"hello"
    assert len(client_entries(manager.stats(), os.getpid())) == 1


def test_set_default_address_wins_and_switches(manager: shmpool.ManagerProcess) -> None:
    with shmpool.start(memory="16MiB") as other:  # exports its own address
        shmpool.set_default_address(manager.address)
        assert os.environ[ENV_VAR] == manager.address  # for processes started from here on
        first = shmpool.get_pool()
        assert first.address == manager.address
        shmpool.set_default_address(manager.address)  # the same: the pool stays
        assert shmpool.get_pool() is first
        shmpool.set_default_address(other.address)  # another: the old pool is closed
        assert first.closed
        second = shmpool.get_pool()
        assert second.address == other.address
        assert len(client_entries(other.stats(), os.getpid())) == 1
        shmpool.set_default_address(None)
        assert ENV_VAR not in os.environ
        assert shmpool.get_pool() is second  # forgetting the address keeps the pool
        shmpool.default.close_pool()
        with pytest.raises(shmpool.AddressNotSetError):
            shmpool.get_pool()
    with pytest.raises(ValueError, match="longer"):
        shmpool.set_default_address("/tmp/" + "x" * 200)


# ------------------------------------------------------------------ threads


def test_eight_threads_open_one_connection(manager: shmpool.ManagerProcess) -> None:
    pools = in_threads(shmpool.get_pool)
    assert len(pools) == THREADS
    assert all(isinstance(p, shmpool.Pool) for p in pools), pools
    assert len({id(p) for p in pools}) == 1
    assert len(client_entries(manager.stats(), os.getpid())) == 1

    def use() -> int:
        with shmpool.get_pool().acquire(50_000) as lease:
            lease.view[:] = b"x" * 50_000
            return len(lease.view)

    assert in_threads(use) == [50_000] * THREADS
    assert len(client_entries(manager.stats(), os.getpid())) == 1


def test_a_thread_cannot_take_the_slot_a_refill_got(
    manager: shmpool.ManagerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: another thread's acquire runs right when the first refill starts the janitor.

    What that acquire does without the lock, it does here: it pops a slot from the cache.
    """
    pool = shmpool.get_pool()
    stolen: list[Any] = []
    start_janitor = shmpool.Pool._ensure_janitor

    def meddle(self: shmpool.Pool) -> None:
        start_janitor(self)
        for cache in self._caches:
            if cache:
                stolen.append(cache.pop())

    monkeypatch.setattr(shmpool.Pool, "_ensure_janitor", meddle)
    try:
        with pool.acquire(600_000) as lease:  # a class whose first batch is one slot
            assert len(lease.view) == 600_000
    finally:
        # Dropped, not put back: pytest keeps the frames of the traceback, and a slot in
        # one of them would keep its segment mapped. The manager takes it back at close.
        stolen.clear()


def test_closed_and_dead_pools_are_replaced() -> None:
    address = unique_address()
    with shmpool.start(memory="16MiB", address=address):
        pool = shmpool.get_pool()
        pool.close()  # closed by its user: the next call connects again
        pool = shmpool.get_pool()
        assert not pool.closed
        pool.acquire(4096).release()
    with pytest.raises(shmpool.ManagerGoneError):
        pool.stats()  # the manager is gone, and the pool knows it now
    with shmpool.start(memory="16MiB", address=address) as again:  # restarted, same address
        fresh = shmpool.get_pool()
        assert fresh is not pool and pool.closed
        fresh.acquire(4096).release()
        assert len(client_entries(again.stats(), os.getpid())) == 1


# ------------------------------------------------------------------ fork


def test_a_forked_child_gets_its_own_connection(manager: shmpool.ManagerProcess) -> None:
    parent = shmpool.get_pool()
    with parent.acquire(100_000) as lease:
        lease.view[:6] = b"parent"

    def child() -> dict[str, object]:
        pool = shmpool.get_pool()
        # Eight threads at once, as in a gthread worker of a preloaded app.
        sizes = in_threads(lambda: len(shmpool.get_pool().acquire(70_000).view))
        stats = pool.stats()
        return {
            "same": pool is parent,
            "sizes": sizes,
            "mine": len(client_entries(stats, os.getpid())),
            "parents": len(client_entries(stats, os.getppid())),
        }

    pid, result = in_child(child)
    assert result == {"same": True, "sizes": [70_000] * THREADS, "mine": 1, "parents": 1}
    # The parent's connection was left alone; the child's went with it.
    assert shmpool.get_pool() is parent
    with parent.acquire(100_000) as lease:
        lease.view[:6] = b"parent"
    wait_for(lambda: not client_entries(manager.stats(), pid))
    assert len(client_entries(manager.stats(), os.getpid())) == 1


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_while_another_thread_connects(manager: shmpool.ManagerProcess) -> None:
    """The child does not inherit a held lock: its get_pool() does not hang."""
    holding, done = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with shmpool.default._lock:
            holding.set()
            done.wait(MP_TIMEOUT)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert holding.wait(MP_TIMEOUT)
        _, result = in_child(lambda: {"leased": len(shmpool.get_pool().acquire(4096).view)})
    finally:
        done.set()
        holder.join(MP_TIMEOUT)
    assert result == {"leased": 4096}
