"""A lease sent to a child with no manager in reach fails clearly, and never hangs a pool.

``multiprocessing.Pool`` reads a task's arguments (in a worker) and its
result (in a thread of the parent) where an exception raised while
unpickling is lost with the task: ``get()`` would wait forever. A lease that
cannot be attached there becomes an ``UnreceivedLease`` whose every use
raises the error, so the failure reaches ``get()``. Every wait here is
bounded (``MP_TIMEOUT``): a hang fails the test instead of stalling it.

And the rule for ``apply_async``/``Queue.put``: the lease is pickled later,
in another thread; releasing it before then makes that pickling fail with
``LeaseClosedError``, which ``apply_async`` reports through ``get()``.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MP_TIMEOUT, wait_for

import shmpool
from shmpool.registry import UnreceivedLease


def touch(lease: Any) -> bytes:
    with lease:
        return bytes(lease.view[:5])


def make(n: int) -> shmpool.Lease:
    lease = shmpool.get_pool().acquire(n)
    lease.view[:5] = b"built"
    return lease


def what_arrived(lease: Any) -> str:
    return type(lease).__name__


@pytest.fixture
def no_address(manager: shmpool.ManagerProcess, fresh_default_pool: None) -> Iterator[None]:
    """A manager, but no ``$SHMPOOL_ADDRESS`` (a spawn child inherits none), no default pool."""
    saved = os.environ.pop(shmpool.ENV_VAR, None)
    yield
    if saved is not None:
        os.environ[shmpool.ENV_VAR] = saved


@pytest.fixture
def unpickle_pool() -> Iterator[None]:
    """Close the pool unpickling opens for itself (``registry._default_pool``) afterwards."""
    yield
    pool, shmpool.registry._default = shmpool.registry._default, None
    if pool is not None:
        pool.close()


def expected_failure(method: str) -> bool:
    """Whether a child of ``method`` has no way to the manager (fork inherits the pool)."""
    return method != "fork"


@pytest.mark.usefixtures("no_address")
def test_a_task_lease_with_no_manager_in_reach_fails_in_get(
    manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    method = mp_context.get_start_method()
    with manager.connect() as pool, mp_context.Pool(1) as workers:
        lease = pool.acquire(100)
        lease.view[:5] = b"hello"
        result = workers.apply_async(touch, (lease,))
        if not expected_failure(method):
            assert result.get(MP_TIMEOUT) == b"hello"
            return
        with pytest.raises((shmpool.ManagerGoneError, shmpool.StaleHandleError)) as failed:
            result.get(MP_TIMEOUT)  # raises, rather than waiting forever
        if isinstance(failed.value, shmpool.ManagerGoneError):  # else another manager answered
            message = str(failed.value)
            assert message.startswith("cannot unpickle a shmpool Lease in process")
            assert "shmpool.mp.initializer_kwargs" in message and "SHMPOOL_ADDRESS" in message
        # The worker lives on, and the pool with it.
        assert workers.apply_async(what_arrived, (1,)).get(MP_TIMEOUT) == "int"
        many = [pool.acquire(100) for _ in range(3)]
        with pytest.raises((shmpool.ManagerGoneError, shmpool.StaleHandleError)):
            workers.map(touch, many, chunksize=1)  # map too: raises, never hangs
        workers.terminate()


@pytest.mark.usefixtures("no_address")
def test_an_unused_task_lease_arrives_as_an_unreceived_lease(
    manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    if not expected_failure(mp_context.get_start_method()):
        pytest.skip("a fork child reaches the manager through its parent's pool")
    with manager.connect() as pool, mp_context.Pool(1) as workers:
        result = workers.apply_async(what_arrived, (pool.acquire(100),))
        assert result.get(MP_TIMEOUT) == "UnreceivedLease"
        workers.terminate()


def test_with_the_initializer_every_start_method_attaches(
    manager: shmpool.ManagerProcess, mp_context: Any, no_address: None
) -> None:
    kwargs = shmpool.mp.initializer_kwargs(manager.address)
    with manager.connect() as pool, mp_context.Pool(2, **kwargs) as workers:
        leases = []
        for i in range(4):
            lease = pool.acquire(100)
            lease.view[:5] = b"lease"
            leases.append(lease)
            assert i >= 0
        assert workers.map(touch, leases, chunksize=1) == [b"lease"] * 4
        workers.terminate()


@pytest.mark.usefixtures("no_address")
def test_a_result_lease_with_no_manager_in_reach_fails_on_use(
    manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    """The parent's result thread must not die: the result comes as an UnreceivedLease."""
    kwargs = shmpool.mp.initializer_kwargs(manager.address)
    with mp_context.Pool(1, **kwargs) as workers:  # the workers reach it; this process does not
        got = workers.apply_async(make, (100,)).get(MP_TIMEOUT)
        if isinstance(got, shmpool.Lease):  # pragma: no cover - a manager at the default address
            pytest.skip("a manager listens at the default address and took it")
        assert isinstance(got, UnreceivedLease)
        with pytest.raises((shmpool.ManagerGoneError, shmpool.StaleHandleError)):
            got.view  # noqa: B018
        with pytest.raises((shmpool.ManagerGoneError, shmpool.StaleHandleError)):
            got.release()
        with pytest.raises((shmpool.ManagerGoneError, shmpool.StaleHandleError)):
            pickle.dumps(got)
        # The pool still answers: its result thread lives.
        assert workers.apply_async(what_arrived, (1,)).get(MP_TIMEOUT) == "int"
        workers.terminate()


@pytest.mark.usefixtures("no_address", "unpickle_pool")
def test_outside_a_pool_unpickling_raises_what_to_do(manager: shmpool.ManagerProcess) -> None:
    with manager.connect() as pool:
        data = pickle.dumps(pool.acquire(100))
    with pytest.raises((shmpool.ManagerGoneError, shmpool.StaleHandleError)) as failed:
        pickle.loads(data)  # no pool here and no address: raised, not swallowed
    if isinstance(failed.value, shmpool.ManagerGoneError):
        assert "set_default_address" in str(failed.value)
    # With the address set, the same process finds its manager.
    shmpool.set_default_address(manager.address)
    with manager.connect() as pool:
        lease = pool.acquire(100)
        lease.view[:2] = b"ok"
        data = pickle.dumps(lease)
        pool.close()
        got = pickle.loads(data)  # through a pool of its own, at that address
        assert bytes(got.view[:2]) == b"ok"
        assert got._slot.home.pool.name == "shmpool-unpickle"
        got.release()


# ------------------------------------------------------- after handing it over


def test_a_lease_handed_over_fails_clearly_when_touched(manager: shmpool.ManagerProcess) -> None:
    with manager.connect() as pool:
        lease = pool.acquire(100)
        data = pickle.dumps(lease)  # what Pipe.send() does before it returns
        assert lease.closed
        with pytest.raises(shmpool.LeaseClosedError) as closed:
            lease.view  # noqa: B018
        assert isinstance(closed.value, ValueError)
        with pytest.raises(shmpool.LeaseClosedError):
            lease.detach()
        with pytest.raises(shmpool.LeaseClosedError):
            pickle.dumps(lease)
        lease.release()  # harmless, as ending a `with` block after sending it is
        got = pickle.loads(data)
        got.release()


class _Gate:
    """Pickles only once ``opened`` is set: holds the pool's task thread at a known point."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        self.reached.set()
        self.opened.wait(MP_TIMEOUT)
        return (int, (0,))


def test_releasing_after_apply_async_fails_in_get(
    manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    """apply_async pickles later, in the pool's task thread: release first, and get() says so."""
    kwargs = shmpool.mp.initializer_kwargs(manager.address)
    with manager.connect() as pool, mp_context.Pool(1, **kwargs) as workers:
        gate = _Gate()
        held = workers.apply_async(what_arrived, (gate,))
        wait_for(gate.reached.is_set)  # the task thread waits in the gate's pickling
        lease = pool.acquire(100)
        result = workers.apply_async(touch, (lease,))
        lease.release()  # too early: the lease is not pickled yet
        gate.opened.set()
        assert held.get(MP_TIMEOUT) == "int"
        with pytest.raises(shmpool.LeaseClosedError):
            result.get(MP_TIMEOUT)
        workers.terminate()
