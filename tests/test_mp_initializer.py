"""``shmpool.mp``: pool workers find the manager under fork, spawn and forkserver.

The parent's ``$SHMPOOL_ADDRESS`` is taken away in these tests, so the
address can only reach the workers through ``initargs``. Task functions
live at module level, for spawn and forkserver children to import.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import zlib
from concurrent.futures import ProcessPoolExecutor

import pytest
from conftest import MP_TIMEOUT, client_entries, wait_for

import shmpool
import shmpool.default
import shmpool.mp
from shmpool.address import ENV_VAR

SIZES = [4096 * (1 + i % 16) for i in range(40)]

_tag = ""


pytestmark = pytest.mark.usefixtures("fresh_default_pool")  # a fork child would inherit them


def crc_task(size: int) -> tuple[int, int, str]:
    """Fill a buffer of the default pool: (pid, its crc32, the worker's $SHMPOOL_ADDRESS)."""
    with shmpool.get_pool().acquire(size) as lease:
        lease.view[:] = bytes([size % 251]) * size
        return os.getpid(), zlib.crc32(lease.view), os.environ.get(ENV_VAR, "")


def remember(tag: str) -> None:
    global _tag
    _tag = tag


def tagged_task(size: int) -> tuple[str, int]:
    _, crc, _ = crc_task(size)
    return _tag, crc


def no_address_task(_: int) -> str:
    try:
        shmpool.get_pool()
    except shmpool.AddressNotSetError as exc:
        return str(exc)
    return "connected"


def expected(sizes: list[int]) -> list[int]:
    return [zlib.crc32(bytes([n % 251]) * n) for n in sizes]


def test_pool_workers_connect_on_first_use(
    manager: shmpool.ManagerProcess, mp_context: multiprocessing.context.BaseContext
) -> None:
    address = manager.address
    del os.environ[ENV_VAR]
    with mp_context.Pool(2, **shmpool.mp.initializer_kwargs(address)) as workers:
        results = workers.map(crc_task, SIZES, chunksize=2)
        stats = manager.stats()
    pids = {pid for pid, _, _ in results}
    for pid in pids:
        assert len(client_entries(stats, pid)) == 1  # one connection each, however many tasks
    assert [crc for _, crc, _ in results] == expected(SIZES)
    assert {env for _, _, env in results} == {address}  # exported, for the worker's children
    # The pool's exit terminates its workers; the manager takes their slots back.
    wait_for(lambda: not any(client_entries(manager.stats(), pid) for pid in pids))


def test_an_executor_runs_your_initializer_too(
    manager: shmpool.ManagerProcess, mp_context: multiprocessing.context.BaseContext
) -> None:
    address = manager.address
    del os.environ[ENV_VAR]
    kwargs = shmpool.mp.initializer_kwargs(address, initializer=remember, initargs=("mine",))
    with ProcessPoolExecutor(2, mp_context=mp_context, **kwargs) as executor:
        results = list(executor.map(tagged_task, SIZES[:8], timeout=MP_TIMEOUT))
    assert results == [("mine", crc) for crc in expected(SIZES[:8])]


def test_a_worker_without_an_address_is_told_the_fix(
    mp_context: multiprocessing.context.BaseContext,
) -> None:
    os.environ.pop(ENV_VAR, None)
    with mp_context.Pool(1) as workers:
        message = workers.apply_async(no_address_task, (0,)).get(MP_TIMEOUT)
    assert "shmpool.mp.initializer_kwargs" in message
    assert "SHMPOOL_ADDRESS" in message


@pytest.mark.slow
def test_the_plain_initializer_form(manager: shmpool.ManagerProcess) -> None:
    address = manager.address
    del os.environ[ENV_VAR]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, initializer=shmpool.mp.initializer, initargs=(address,)) as workers:
        results = workers.map(crc_task, SIZES[:4])
    assert [crc for _, crc, _ in results] == expected(SIZES[:4])


def test_initializer_kwargs_finds_the_address_here(manager: shmpool.ManagerProcess) -> None:
    assert shmpool.mp.initializer_kwargs() == {
        "initializer": shmpool.mp.initializer,
        "initargs": (manager.address,),
    }
    del os.environ[ENV_VAR]
    with pytest.raises(shmpool.AddressNotSetError, match="SHMPOOL_ADDRESS"):
        shmpool.mp.initializer_kwargs()
    shmpool.set_default_address(manager.address)
    assert shmpool.mp.initializer_kwargs()["initargs"] == (manager.address,)


def test_the_initializer_without_an_address_leaves_it_unset() -> None:
    os.environ.pop(ENV_VAR, None)
    shmpool.mp.initializer()  # a worker that inherited no address: get_pool() will say so
    assert shmpool.default.configured_address() is None
    os.environ[ENV_VAR] = "/tmp/somewhere.sock"
    shmpool.mp.initializer()
    assert shmpool.default._address == "/tmp/somewhere.sock"
