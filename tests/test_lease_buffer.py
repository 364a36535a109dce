"""A Lease is a buffer: memoryview(lease), bytes(lease), numpy.asarray(lease), lease.ndarray().

Every export of a lease is an export of its view, so it pins the lease as a
``PickleBuffer`` of ``lease.view`` does (tests/test_release_export.py):
``release()`` refuses with ``BufferError`` while one lives. These tests run
in the mode of the run (C, or ``SHMPOOL_NO_SPEEDUPS=1``); CI runs both.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import all_returned, wait_for

import shmpool
from shmpool import buffer

SIZE = 5000  # class 8192

#: Whether ``memoryview(lease)`` can work in this run.
HAS_BUFFER = buffer.SPEEDUPS or sys.version_info >= (3, 12)
needs_buffer = pytest.mark.skipif(
    not HAS_BUFFER,
    reason="without the C extension a Python class gets the buffer protocol only through "
    "PEP 688's __buffer__, which needs Python 3.12+",
)


@pytest.fixture
def pool(manager: shmpool.ManagerProcess) -> Iterator[shmpool.Pool]:
    with shmpool.Pool(manager.address, name="buffers", idle_timeout=None) as p:
        yield p


def _filled(pool: shmpool.Pool, size: int = SIZE) -> shmpool.Lease:
    lease = pool.acquire(size)
    lease.view[:] = bytes(i % 251 for i in range(size))
    return lease


def _assert_pinned(lease: shmpool.Lease) -> None:
    with pytest.raises(BufferError, match="exported"):
        lease.release()
    assert not lease.closed
    lease.view[:2] = b"ok"  # still open and usable


def _assert_back(pool: shmpool.Pool, manager: shmpool.ManagerProcess) -> None:
    pool.trim()
    wait_for(lambda: all_returned(manager.stats()))


@needs_buffer
def test_memoryview_shows_the_view_and_writes_through(pool: shmpool.Pool) -> None:
    with _filled(pool) as lease:
        with memoryview(lease) as mv:
            assert len(mv) == lease.size == SIZE  # the size asked for, as view shows
            assert mv.format == "B" and not mv.readonly
            assert mv.tobytes() == bytes(lease.view)
            mv[:5] = b"hello"
        assert bytes(lease.view[:5]) == b"hello"


@needs_buffer
def test_bytes_copies_the_size_asked_for(pool: shmpool.Pool) -> None:
    with _filled(pool) as lease:
        data = bytes(lease)
        assert len(data) == SIZE < lease.capacity
        assert data == bytes(lease.view)
        assert bytearray(lease) == data


@needs_buffer
def test_numpy_asarray_shares_the_memory(pool: shmpool.Pool) -> None:
    with _filled(pool) as lease:
        array = np.asarray(lease)
        assert array.shape == (SIZE,) and array.dtype == np.uint8
        array[:3] = (7, 8, 9)
        assert bytes(lease.view[:3]) == b"\x07\x08\x09"
        del array


@needs_buffer
@pytest.mark.parametrize("export", ["memoryview", "numpy", "ndarray"])
def test_an_export_pins_the_lease_until_it_goes(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess, export: str
) -> None:
    lease = _filled(pool)
    slot = lease._slot
    held = {
        "memoryview": memoryview,
        "numpy": np.asarray,
        "ndarray": lambda lease: lease.ndarray("u1"),
    }[export](lease)
    _assert_pinned(lease)
    with pytest.raises(BufferError, match="exported"):
        lease.detach()
    assert not lease.closed
    del held
    lease.release()
    assert lease.closed
    assert pool._caches[1].count(slot) == 1  # back once
    _assert_back(pool, manager)


@needs_buffer
def test_a_released_lease_exports_nothing(pool: shmpool.Pool) -> None:
    lease = pool.acquire(SIZE)
    lease.release()
    for export in (memoryview, bytes, bytearray):
        with pytest.raises(shmpool.LeaseClosedError):
            export(lease)
    # numpy.asarray() swallows the error and makes a 0-d object array: ndarray() raises.
    with pytest.raises(shmpool.LeaseClosedError):
        lease.ndarray()


@pytest.mark.skipif(HAS_BUFFER, reason="this run has the buffer protocol")
def test_pure_python_311_has_no_buffer_protocol_but_view_and_ndarray_work(
    pool: shmpool.Pool,
) -> None:
    with _filled(pool) as lease:
        with pytest.raises(TypeError, match="bytes-like"):
            memoryview(lease)
        assert bytes(lease.view) == bytes(lease.view[:SIZE])
        array = lease.ndarray()
        _assert_pinned(lease)  # a PickleBuffer of the view carries it
        del array


def test_ndarray_dtype_and_shape(pool: shmpool.Pool) -> None:
    with pool.acquire(4000) as lease:
        a = lease.ndarray(np.float64, (10, 50))
        assert a.shape == (10, 50) and a.dtype == np.float64 and a.flags.writeable
        a[9, 49] = 1.5
        b = lease.ndarray("<f8")  # the whole size: 4000 / 8 items
        assert b.shape == (500,)
        assert b[-1] == 1.5
        c = lease.ndarray("u1", 3)
        assert c.shape == (3,)
        del a, b, c


def test_ndarray_refuses_what_does_not_fit(pool: shmpool.Pool) -> None:
    with pool.acquire(SIZE) as lease:
        with pytest.raises(ValueError, match=rf"needs 8000 bytes; this lease shows {SIZE} \(its "
                           r"slot holds 8192\)"):  # fmt: skip
            lease.ndarray("u8", (1000,))
        with pytest.raises(ValueError, match="not a whole number of"):
            lease.ndarray("V3")  # 5000 is not a multiple of 3
        with pytest.raises(ValueError, match="needs"):
            lease.ndarray("u1", (-1,))
        with pytest.raises(TypeError):
            lease.ndarray("not a dtype")
        lease.ndarray("u1", (SIZE,))  # exactly the size fits


def test_ndarray_of_a_released_lease(pool: shmpool.Pool) -> None:
    lease = pool.acquire(SIZE)
    lease.release()
    with pytest.raises(shmpool.LeaseClosedError):
        lease.ndarray("u1")


def test_ndarray_without_numpy(pool: shmpool.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now fails
    with pool.acquire(SIZE) as lease:
        with pytest.raises(ModuleNotFoundError, match="needs numpy"):
            lease.ndarray("u1")
        assert not lease.closed


def test_a_readers_lease_gives_read_only_buffers(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess
) -> None:
    lease = _filled(pool)
    handle = lease.share(readers=1)
    with pool.attach(handle) as reader:
        array = reader.ndarray("u1")
        assert not array.flags.writeable
        assert array[:4].tolist() == [0, 1, 2, 3]
        if HAS_BUFFER:
            with memoryview(reader) as mv:
                assert mv.readonly
        del array
    _assert_back(pool, manager)
