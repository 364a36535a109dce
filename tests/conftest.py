"""Shared fixtures: a running manager, the multiprocessing start methods, leak checks."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

import shmpool

# numpy's BLAS starts a pool of OS threads when imported, and tests fork this
# process: keep it one thread, so that a fork here is as safe as shmpool makes
# it (Python 3.12+ warns about forking with threads, counting OS threads).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

SHM_DIR = "/dev/shm"
SHM_PREFIX = "shmpool."
START_METHODS = ("fork", "spawn", "forkserver")

#: Bounds a wait for another process (a child's answer, its exit, the manager
#: acting on something): poll/join/recv/get waits, subprocess timeouts, the
#: default of ``wait_for``. Generous because CI machines are shared and slow;
#: the wait normally ends in milliseconds, and a test that hits it has hung.
#: Not for timeouts a test checks (``acquire(timeout=...)``, ``idle_release``).
MP_TIMEOUT = 60.0


def wait_for(
    predicate: Callable[[], Any], timeout: float = MP_TIMEOUT, interval: float = 0.01
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s.

    Returns the truthy value, so a test can use what it waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition {predicate!r} not met within {timeout} s")
        time.sleep(interval)


def shm_names() -> set[str]:
    """The shmpool objects currently named in /dev/shm."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def open_fds() -> set[int]:
    """This process's descriptors (``mmap`` holds one per mapped segment before 3.13)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def piped_child(
    ctx: Any, target: Callable[..., object], *args: Any
) -> Iterator[tuple[Connection, Any]]:
    """Start ``target(*args, their_end)`` in a process of ``ctx``; yield (our end, process).

    The child gets its end of a pipe as its last argument. On the way out a
    child still running (the test failed before it ended) is killed, and our
    end is closed; checking the exit code is the test's job.
    """
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=target, args=(*args, theirs))
    child.start()
    theirs.close()
    try:
        yield ours, child
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        ours.close()


def client_entries(stats: dict[str, Any], pid: int) -> list[dict[str, Any]]:
    """The manager's client records whose peer process is ``pid``.

    Leaves out the short-lived connection ``ManagerProcess.stats()`` opens to ask.
    """
    return [c for c in stats["clients"] if c["pid"] == pid and c["name"] != "stats"]


def assert_balanced(stats: dict[str, Any]) -> None:
    """Invariant 1 of the design: per class, total == free + leased + in_transit."""
    for cls in stats["classes"]:
        assert cls["total"] == cls["free"] + cls["leased"] + cls.get("in_transit", 0), cls
        assert cls["free"] >= 0 and cls["leased"] >= 0, cls
    assert stats["committed_bytes"] <= stats["memory_limit"]


def all_returned(stats: dict[str, Any]) -> bool:
    """Every class slot is free and no oversize lease is alive."""
    return (
        all(cls["leased"] == 0 and cls["free"] == cls["total"] for cls in stats["classes"])
        and stats["oversize"]["leases"] == 0
        and stats["oversize"]["bytes"] == 0
    )


def _runs_start_methods(item: pytest.Item) -> bool:
    """Whether ``item`` runs once per multiprocessing start method (or is one of those runs)."""
    if "mp_context" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(callspec.params.get(name) in START_METHODS for name in ("method", "start_method"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that runs over the start methods (fork/spawn/forkserver).

    Other multi-process tests that take seconds carry ``@pytest.mark.slow`` themselves;
    ``pytest -m "not slow and not bench and not lint"`` is the quick run.
    """
    for item in items:
        if _runs_start_methods(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _warm_multiprocessing() -> None:
    """Start the long-lived helper processes once, so their descriptors predate every test."""
    multiprocessing.forkserver.ensure_running()
    multiprocessing.resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """After each test: no new shmpool name in /dev/shm, no descriptor left open."""
    shm_before = shm_names()
    fds_before = open_fds()
    yield
    # A name is only ever visible between create and unlink (microseconds), so
    # another manager on this machine may briefly show one; a leak stays.
    new = shm_names() - shm_before
    if new:
        wait_for(lambda: not (shm_names() - shm_before) & new, timeout=2)

    def fds_settled() -> bool:
        gc.collect()  # unreferenced pools, queues and sockets close their fds
        return open_fds() <= fds_before

    try:
        wait_for(fds_settled, timeout=5, interval=0.05)
    except AssertionError:
        leaked = open_fds() - fds_before
        details = {fd: _fd_target(fd) for fd in leaked}
        pytest.fail(f"the test left file descriptors open: {details}")
    # The feeder threads of the test's multiprocessing queues end once those
    # are collected; let them, so that the next test forks a one-thread process.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(
        t.name == "QueueFeederThread" for t in threading.enumerate()
    ):
        time.sleep(0.01)


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def fresh_default_pool() -> Iterator[None]:
    """No default pool (``shmpool.get_pool()``) and no default address, before and after."""
    saved_env = os.environ.get(shmpool.ENV_VAR)
    saved_address = shmpool.default._address
    shmpool.default.close_pool()
    shmpool.default._address = None
    yield
    shmpool.default.close_pool()
    shmpool.default._address = saved_address
    if saved_env is None:
        os.environ.pop(shmpool.ENV_VAR, None)
    else:
        os.environ[shmpool.ENV_VAR] = saved_env


@pytest.fixture
def manager() -> Iterator[shmpool.ManagerProcess]:
    """A manager with a 64 MiB budget, stopped after the test."""
    with shmpool.start(memory="64MiB") as mgr:
        yield mgr
    assert not mgr.running


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """Each multiprocessing start method in turn."""
    return multiprocessing.get_context(request.param)
