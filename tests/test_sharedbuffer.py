"""SharedBuffer: a growable file-like buffer in pooled shared memory.

Growth across size classes, the file API compared with ``io.BytesIO``, ``getbuffer``
exports, pickle and numpy round trips, oversize growth, an exhausted budget, and
handing a buffer to another process (detach/attach and pickling) under every start
method. Child functions live at module level so spawn and forkserver can import them;
the manager's address is always passed explicitly.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries

import shmpool

KiB = 1024
MiB = 1024 * KiB


def pattern(tag: str, n: int) -> bytes:
    """``n`` bytes repeating ``tag``: a content only its writer would produce."""
    unit = tag.encode()
    return (unit * (n // len(unit) + 1))[:n]


def _recv(conn: Any, timeout: float = MP_TIMEOUT) -> Any:
    if not conn.poll(timeout):
        raise AssertionError(f"no message from the other end within {timeout} s")
    return conn.recv()


def _reap(proc: Any) -> None:
    proc.join(MP_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join(MP_TIMEOUT)


def _held_by(pool: shmpool.Pool, pid: int) -> int:
    """Slots leased to any connection of ``pid``.

    A forked child also inherits the parent's Pool objects, and an unpickled
    buffer may attach in any live pool of this process connected to the manager.
    """
    return sum(c["leased"] for c in client_entries(pool.stats(), pid))


def _eventually(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll ``predicate`` until true or ``timeout`` s pass (in a child: no assert)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _leased(stats: dict[str, Any], size: int) -> int:
    return next(c["leased"] for c in stats["classes"] if c["size"] == size)


@pytest.fixture
def pool(manager: shmpool.ManagerProcess):
    with manager.connect(name="test-sharedbuffer") as p:
        yield p


@pytest.fixture
def tiny_manager():
    """Classes from 256 bytes, so growth walks through many classes quickly."""
    with shmpool.start(min_size="256", max_size="64MiB", memory="64MiB") as mgr:
        yield mgr


@pytest.fixture
def manager_1m():
    """Classes up to 1 MiB: a buffer growing past it goes oversize."""
    with shmpool.start(max_size="1MiB", memory="64MiB") as mgr:
        yield mgr


@pytest.fixture
def small_manager():
    """A 1 MiB budget that refuses at once (no waiting): easy to exhaust."""
    with shmpool.start(max_size="256KiB", memory="1MiB", acquire_wait=0) as mgr:
        yield mgr


# ------------------------------------------------------------ children


def attach_append_child(address: str, conn: Any) -> None:
    """Attach the handle received, check it, append, detach it back to the parent."""
    with shmpool.connect(address, name="buffer-child") as pool:
        handle, expected = conn.recv()
        buf = pool.attach_buffer(handle)
        report = {
            "pid": os.getpid(),
            "type": type(buf).__name__,
            "len": len(buf),
            "tell": buf.tell(),
            "intact": buf.read() == expected,
            "mine": _held_by(pool, os.getpid()) >= 1,
        }
        buf.seek(0, io.SEEK_END)
        buf.write(pattern(f"child{os.getpid()}|", 200_000))  # grows past the parent's class
        report["capacity"] = buf.capacity
        conn.send((report, buf.detach()))
        assert buf.closed
    conn.close()


def pickled_buffer_child(address: str, conn: Any) -> None:
    """Receive a pickled SharedBuffer (attached here), check it, append, send it back."""
    with shmpool.connect(address, name="pickle-child") as pool:
        expected = conn.recv()
        buf = conn.recv()  # unpickled: attached in ``pool``
        report = {
            "type": type(buf).__name__,
            "len": len(buf),
            "tell": buf.tell(),
            "intact": buf.getvalue() == expected,
            # the pool it attached in (under fork, maybe one inherited from the
            # parent) tells the manager with its next message or janitor tick
            "mine": _eventually(lambda: _held_by(pool, os.getpid()) >= 1),
        }
        buf.seek(0, io.SEEK_END)
        buf.write(b"|appended by the child")
        conn.send(report)
        conn.send(buf)  # pickled: detached here
        report2 = {"closed": buf.closed}
        conn.send(report2)
    conn.close()


# ----------------------------------------------------------------- growth


@pytest.mark.timeout(60)
def test_growth_through_size_classes(tiny_manager: shmpool.ManagerProcess) -> None:
    rng = random.Random(1234)
    with tiny_manager.connect() as pool:
        buf = pool.buffer()
        assert buf.capacity == 0 and len(buf) == 0 and buf.getvalue() == b""
        written = bytearray()
        capacities = []
        for _ in range(400):
            chunk = rng.randbytes(rng.randrange(1, 200))
            assert buf.write(chunk) == len(chunk)
            written += chunk
            assert len(buf) == len(written) == buf.tell()
            assert buf.capacity >= len(buf)
            if not capacities or capacities[-1] != buf.capacity:
                capacities.append(buf.capacity)
        # Small writes: every move is to exactly the next (doubled) class.
        assert capacities[0] == 256
        assert capacities == [256 << i for i in range(len(capacities))]
        assert len(capacities) >= 8
        assert buf.getvalue() == bytes(written)
        buf.seek(0)
        assert buf.read() == bytes(written)
        buf.close()
        pool.trim()
        assert all_returned(pool.stats())


@pytest.mark.timeout(60)
def test_big_write_jumps_several_classes(tiny_manager: shmpool.ManagerProcess) -> None:
    with tiny_manager.connect() as pool, pool.buffer() as buf:
        buf.write(b"x" * 10)
        assert buf.capacity == 256
        data = pattern("big|", 10_000)
        buf.write(data)
        assert buf.capacity == 16 * KiB  # the smallest class holding 10 010 bytes
        assert buf.getvalue() == b"x" * 10 + data
        buf.write(b"y")  # fits: no move
        assert buf.capacity == 16 * KiB


def test_size_hint(pool: shmpool.Pool) -> None:
    with pool.buffer(5000) as buf:
        assert buf.capacity == 8 * KiB
        assert len(buf) == 0 and buf.tell() == 0 and buf.getvalue() == b""
        buf.write(b"a" * 8 * KiB)
        assert buf.capacity == 8 * KiB  # exactly full: still no move
        buf.write(b"b")
        assert buf.capacity == 16 * KiB
        assert buf.getvalue() == b"a" * 8 * KiB + b"b"
    for bad in (-1, 1.5, "10", None, True):
        with pytest.raises(ValueError):
            pool.buffer(bad)  # type: ignore[arg-type]


def test_file_object_flags(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        assert isinstance(buf, io.BufferedIOBase)
        assert buf.readable() and buf.writable() and buf.seekable()
        assert not buf.closed
        assert "len=0" in repr(buf)
    assert "closed" in repr(buf)


# ------------------------------------------------------- write/read/seek


def test_overwrite_in_the_middle(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(b"0123456789")
        assert buf.seek(3) == 3
        assert buf.write(b"abc") == 3
        assert buf.tell() == 6
        assert buf.getvalue() == b"012abc6789"
        assert len(buf) == 10
        buf.seek(8)
        buf.write(b"XYZW")  # overlaps the end and extends it
        assert buf.getvalue() == b"012abc67XYZW"
        assert len(buf) == 12 and buf.tell() == 12


def test_write_bytes_like_objects(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(bytearray(b"ab"))
        buf.write(memoryview(b"cd"))
        assert buf.write(np.arange(3, dtype=np.uint16)) == 6  # counted in bytes
        buf.write(np.array([[1, 2], [3, 4]], dtype=np.uint8))  # multi-dimensional
        expected = b"abcd" + np.arange(3, dtype=np.uint16).tobytes() + bytes([1, 2, 3, 4])
        assert buf.getvalue() == expected
        with pytest.raises(TypeError):
            buf.write("text")  # type: ignore[arg-type]
        assert buf.getvalue() == expected


def test_empty_write_to_fresh_buffer(pool: shmpool.Pool) -> None:
    assert io.BytesIO().write(b"") == 0
    with pool.buffer() as buf:
        assert buf.write(b"") == 0
        assert buf.getvalue() == b"" and buf.tell() == 0


@pytest.mark.parametrize("gap", [1, 100, 5000, 100_000])
def test_seek_past_end_leaves_zero_gap(pool: shmpool.Pool, gap: int) -> None:
    ref = io.BytesIO()
    with pool.buffer() as buf:
        for f in (buf, ref):
            f.write(pattern("head|", 3000))
            assert f.seek(gap, io.SEEK_END) == 3000 + gap
            assert f.getvalue() == pattern("head|", 3000)  # a seek alone does not extend
            f.write(b"tail")
        assert buf.getvalue() == ref.getvalue()
        assert buf.getvalue()[3000 : 3000 + gap] == bytes(gap)
        assert len(buf) == 3000 + gap + 4


def test_gap_after_truncate_is_zeroed(pool: shmpool.Pool) -> None:
    ref = io.BytesIO()
    with pool.buffer() as buf:
        for f in (buf, ref):
            f.write(b"abcdefghij")
            f.truncate(3)  # old bytes stay in the slot past the logical end
            f.write(b"!")  # position is still 10
        assert buf.getvalue() == ref.getvalue() == b"abc" + bytes(7) + b"!"


def test_empty_write_past_end_does_not_extend(pool: shmpool.Pool) -> None:
    ref = io.BytesIO()
    with pool.buffer() as buf:
        for f in (buf, ref):
            f.write(b"ab")
            f.seek(5)
            assert f.write(b"") == 0
        assert buf.getvalue() == ref.getvalue() == b"ab"


def test_read_at_various_positions(pool: shmpool.Pool) -> None:
    data = pattern("0123456789abcdef", 10_000)
    with pool.buffer() as buf:
        buf.write(data)
        assert buf.read() == b""  # at the end
        buf.seek(0)
        assert buf.read(0) == b"" and buf.tell() == 0
        assert buf.read(5) == data[:5]
        assert buf.read(7) == data[5:12]
        assert buf.tell() == 12
        assert buf.read1(100) == data[12:112]
        assert buf.read1() == data[112:]
        buf.seek(9_995)
        assert buf.read(100) == data[9_995:]  # short read at the end
        assert buf.tell() == 10_000
        buf.seek(4000)
        assert buf.read(None) == data[4000:]
        buf.seek(4000)
        assert buf.read(-1) == data[4000:]
        buf.seek(20_000)  # past the end: nothing, and the position stays
        assert buf.read() == b"" and buf.read(10) == b"" and buf.read1(3) == b""
        assert buf.tell() == 20_000
        assert len(buf) == 10_000


def test_readinto_at_various_positions(pool: shmpool.Pool) -> None:
    data = pattern("readinto|", 3000)
    with pool.buffer() as buf:
        buf.write(data)
        buf.seek(10)
        target = bytearray(100)
        assert buf.readinto(target) == 100
        assert target == data[10:110]
        assert buf.tell() == 110
        mv = memoryview(bytearray(20))
        assert buf.readinto1(mv[5:15]) == 10
        assert bytes(mv) == bytes(5) + data[110:120] + bytes(5)
        arr = np.zeros(4, dtype=np.uint32)  # counted in bytes
        assert buf.readinto(arr) == 16
        assert arr.tobytes() == data[120:136]
        buf.seek(2990)
        big = bytearray(b"-" * 50)
        assert buf.readinto(big) == 10  # short: only the rest
        assert big == data[2990:] + b"-" * 40
        assert buf.readinto(big) == 0
        buf.seek(5000)
        assert buf.readinto(big) == 0 and buf.tell() == 5000
        assert buf.readinto(bytearray()) == 0


def test_readline_and_iteration(pool: shmpool.Pool) -> None:
    lines = [b"first\n", b"second line\n", b"\n", b"last without newline"]
    with pool.buffer() as buf:
        buf.writelines(lines)
        buf.seek(0)
        assert buf.readline() == lines[0]
        assert list(buf) == lines[1:]
        buf.seek(0)
        assert buf.readlines() == lines


def test_seek_whence(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(b"0123456789")
        assert buf.seek(4) == 4 and buf.tell() == 4
        assert buf.seek(4, io.SEEK_SET) == 4
        assert buf.seek(2, io.SEEK_CUR) == 6
        assert buf.seek(-3, io.SEEK_CUR) == 3
        assert buf.seek(0, io.SEEK_CUR) == 3
        assert buf.seek(0, io.SEEK_END) == 10
        assert buf.seek(-4, io.SEEK_END) == 6
        assert buf.read() == b"6789"
        assert buf.seek(5, io.SEEK_END) == 15
        assert buf.seek(-10, io.SEEK_END) == 0  # relative to the length, not the position


@pytest.mark.parametrize(
    ("offset", "whence"),
    [(-1, io.SEEK_SET), (-6, io.SEEK_CUR), (-11, io.SEEK_END), (-(10**9), io.SEEK_SET)],
)
def test_seek_to_negative_position(pool: shmpool.Pool, offset: int, whence: int) -> None:
    with pool.buffer() as buf:
        buf.write(b"0123456789")
        buf.seek(5)
        with pytest.raises(ValueError):
            buf.seek(offset, whence)
        assert buf.tell() == 5  # unchanged
        assert buf.read() == b"56789"


@pytest.mark.parametrize("whence", [3, -1, 42])
def test_seek_bad_whence(pool: shmpool.Pool, whence: int) -> None:
    with pool.buffer() as buf:
        buf.write(b"abc")
        buf.seek(1)
        with pytest.raises(ValueError):
            buf.seek(0, whence)
        with pytest.raises(ValueError):
            io.BytesIO(b"abc").seek(0, whence)  # as BytesIO does
        assert buf.tell() == 1


def test_seek_float_offset_is_refused(pool: shmpool.Pool) -> None:
    with pytest.raises(TypeError):
        io.BytesIO(b"abc").seek(1.5)  # type: ignore[arg-type]
    with pool.buffer() as buf:
        buf.write(b"abc")
        with pytest.raises(TypeError):
            buf.seek(1.5)  # type: ignore[arg-type]


def test_truncate(pool: shmpool.Pool) -> None:
    ref = io.BytesIO()
    with pool.buffer() as buf:
        for f in (buf, ref):
            f.write(b"0123456789")
            f.seek(4)
        for args in [(8,), (None,), (), (20,), (0,)]:
            assert buf.truncate(*args) == ref.truncate(*args)
            assert buf.getvalue() == ref.getvalue()
            assert buf.tell() == ref.tell() == 4  # truncate never moves the position
        assert len(buf) == 0
        with pytest.raises(ValueError):
            buf.truncate(-1)
        with pytest.raises(ValueError):
            ref.truncate(-1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(8))
def test_differential_against_bytesio(tiny_manager: shmpool.ManagerProcess, seed: int) -> None:
    """The same random operations on a SharedBuffer and an io.BytesIO give the same results.

    Writes are never empty (see the xfail test above); seeks never go below 0
    (BytesIO clamps relative seeks, SharedBuffer refuses them: tested apart).
    """
    rng = random.Random(seed)
    ref = io.BytesIO()
    with tiny_manager.connect() as pool, pool.buffer(rng.choice([0, 0, 100, 3000])) as buf:
        for step in range(600):
            op = rng.choice(["write", "write", "write", "read", "readinto", "seek", "truncate"])
            size = len(ref.getvalue())
            where = f"seed {seed} step {step} {op}"
            if op == "write":
                n = rng.choice([1, rng.randrange(1, 50), rng.randrange(1, 3000)])
                data = rng.randbytes(n)
                assert buf.write(data) == ref.write(data), where
            elif op == "read":
                n = rng.choice([None, -1, 0, rng.randrange(1, 100), rng.randrange(1, 5000)])
                assert buf.read(n) == ref.read(n), where
            elif op == "readinto":
                a, b = bytearray(rng.randrange(0, 400)), None
                b = bytearray(len(a))
                assert buf.readinto(a) == ref.readinto(b), where
                assert a == b, where
            elif op == "seek":
                whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
                base = {io.SEEK_SET: 0, io.SEEK_CUR: ref.tell(), io.SEEK_END: size}[whence]
                target = rng.randrange(0, size + 500)
                assert buf.seek(target - base, whence) == ref.seek(target - base, whence), where
            else:
                arg = rng.choice([None, rng.randrange(0, size + 100)])
                assert buf.truncate(arg) == ref.truncate(arg), where
            assert buf.tell() == ref.tell(), where
            assert buf.getvalue() == ref.getvalue(), where
            assert len(buf) == len(ref.getvalue()) <= buf.capacity, where


# ---------------------------------------------------------------- getbuffer


def test_getbuffer_is_writable_and_shared(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(b"hello world")
        view = buf.getbuffer()
        assert not view.readonly
        assert len(view) == 11 and bytes(view) == b"hello world"
        view[0:5] = b"HELLO"
        assert buf.getvalue() == b"HELLO world"
        buf.seek(6)
        buf.write(b"WORLD")  # fits: allowed while the view lives, and it shows
        assert bytes(view) == b"HELLO WORLD"
        view.release()


def test_getbuffer_blocks_growth_until_released(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(pattern("grow|", 4000))
        cap = buf.capacity
        view = buf.getbuffer()
        buf.seek(0, io.SEEK_END)
        with pytest.raises(BufferError):
            buf.write(b"x" * (cap + 1))
        assert buf.capacity == cap and len(buf) == 4000  # unchanged
        assert buf.getvalue() == pattern("grow|", 4000)
        assert buf.tell() == 4000
        with pytest.raises(BufferError):
            buf.seek(cap + 10)
            buf.write(b"y")  # a gap past the capacity is growth too
        with pytest.raises(BufferError):
            buf.close()
        assert not buf.closed
        with pytest.raises(BufferError):
            buf.detach()
        assert not buf.closed
        view.release()
        buf.seek(4000)
        buf.write(b"x" * (cap + 1))
        assert buf.capacity >= 2 * cap
        assert buf.getvalue() == pattern("grow|", 4000) + b"x" * (cap + 1)


def test_getbuffer_dropped_or_released_allows_growth(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(b"abc")
        view = buf.getbuffer()
        del view  # dropped without release
        buf.write(b"d" * 10_000)
        assert buf.getvalue() == b"abc" + b"d" * 10_000
        with buf.getbuffer() as view2:  # released by the with block
            view2[0] = ord("A")
        buf.write(b"e" * 50_000)
        assert buf.getvalue() == b"Abc" + b"d" * 10_000 + b"e" * 50_000
        kept = [buf.getbuffer()]  # held through a container: still alive
        with pytest.raises(BufferError):
            buf.write(b"f" * 200_000)
        kept.clear()
        buf.write(b"f" * 200_000)
        assert len(buf) == 3 + 10_000 + 50_000 + 200_000


def test_getbuffer_on_empty_buffer(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        view = buf.getbuffer()
        assert len(view) == 0
        with pytest.raises(BufferError):
            buf.write(b"x")
        view.release()
        buf.write(b"x")
        assert buf.getvalue() == b"x"


@pytest.mark.xfail(
    strict=True,
    reason="Known limitation on Python 3.11: views derived from getbuffer() cannot be "
    "counted, so growth proceeds (safely: the old slot is kept, not recycled, until close)",
)
def test_getbuffer_slice_blocks_growth(pool: shmpool.Pool) -> None:
    ref = io.BytesIO(b"abcd")
    ref_slice = ref.getbuffer()[:4]
    with pytest.raises(BufferError):
        ref.write(b"x" * 1000)  # BytesIO refuses while a slice of its view lives
    ref_slice.release()
    with pool.buffer() as buf:
        buf.write(b"abcd")
        part = buf.getbuffer()[:4]
        try:
            with pytest.raises(BufferError):
                buf.write(b"x" * 10_000)
        finally:
            part.release()


def _grow_with_numpy_view_then_scribble(pool: shmpool.Pool) -> tuple[bool, bytes]:
    """Whether the buffer moved while a numpy array over its view lived, and what a
    lease acquired afterwards shows once that array is written through."""
    buf = pool.buffer()
    buf.write(b"abcd")
    arr = np.asarray(buf.getbuffer())  # a numpy array sharing the view's memory
    try:
        buf.write(b"x" * 10_000)  # must raise BufferError, as io.BytesIO does
    except BufferError:
        grew = False
    else:
        grew = True
    other = pool.acquire(4)  # if it moved, the old slot comes straight back from the cache
    try:
        arr[:] = np.frombuffer(b"WXYZ", dtype=np.uint8)
        seen = bytes(other.view)
    finally:
        other.release()
        del arr
        buf.close()
    return grew, seen


def test_derived_view_cannot_corrupt_a_recycled_slot(pool: shmpool.Pool) -> None:
    grew, seen = _grow_with_numpy_view_then_scribble(pool)
    assert seen != b"WXYZ", "another lease's slot was overwritten through a stale view"
    assert grew  # it may move (the view cannot be counted), but never into reuse


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_dump_load_roundtrip(pool: shmpool.Pool, protocol: int) -> None:
    obj = {
        "ints": list(range(5000)),
        "text": "ünïcode " * 300,
        "bytes": os.urandom(70_000),
        "nested": [(1, 2.5, None), {"a": frozenset({1, 2})}],
    }
    with pool.buffer() as buf:
        pickle.dump(obj, buf, protocol=protocol)
        pickle.dump("second", buf, protocol=protocol)
        assert buf.getvalue() == pickle.dumps(obj, protocol) + pickle.dumps("second", protocol)
        buf.seek(0)
        assert pickle.load(buf) == obj
        assert pickle.load(buf) == "second"
        assert buf.tell() == len(buf)


NUMPY_ARRAYS = {
    "float64-2d": lambda: np.arange(12, dtype=np.float64).reshape(3, 4) / 7,
    "int8-1d": lambda: np.arange(-100, 100, dtype=np.int8),
    "uint16-3d": lambda: np.arange(2 * 3 * 5, dtype=np.uint16).reshape(2, 3, 5),
    "complex128": lambda: np.array([1 + 2j, -3.5j, 0], dtype=np.complex128),
    "bool": lambda: np.array([True, False, True]),
    "0d": lambda: np.array(42, dtype=np.int64),
    "empty": lambda: np.zeros((0, 3), dtype=np.float32),
    "fortran": lambda: np.asfortranarray(np.arange(20, dtype=np.int32).reshape(4, 5)),
    "big-endian": lambda: np.arange(10, dtype=">i4"),
    "structured": lambda: np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    "unicode": lambda: np.array(["a", "bcd", "ef"]),
    "6MiB": lambda: np.random.default_rng(7).standard_normal(6 * MiB // 8),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(NUMPY_ARRAYS))
def test_numpy_save_load_roundtrip(pool: shmpool.Pool, name: str) -> None:
    arr = NUMPY_ARRAYS[name]()
    with pool.buffer() as buf:
        capacities = {buf.capacity}
        np.save(buf, arr)
        capacities.add(buf.capacity)
        ref = io.BytesIO()
        np.save(ref, arr)
        assert buf.getvalue() == ref.getvalue()
        buf.seek(0)
        back = np.load(buf)
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
        if arr.nbytes > MiB:
            assert buf.capacity >= arr.nbytes > 4 * MiB  # grew from nothing through the classes
    if arr.nbytes > MiB:
        assert capacities == {0, 8 * MiB}


@pytest.mark.timeout(60)
def test_numpy_big_array_grows_through_classes(pool: shmpool.Pool) -> None:
    """Several arrays saved one after another, so the big one grows a used buffer."""
    arrays = [np.arange(1000, dtype=np.int16), NUMPY_ARRAYS["6MiB"](), np.ones((3, 3))]
    with pool.buffer() as buf:
        seen = []
        for a in arrays:
            np.save(buf, a)
            seen.append(buf.capacity)
        assert seen[0] == 4 * KiB and seen[1] == seen[2] == 8 * MiB
        buf.seek(0)
        for a in arrays:
            np.testing.assert_array_equal(np.load(buf), a)
        assert buf.tell() == len(buf)


# ------------------------------------------------------- oversize, budget


@pytest.mark.timeout(60)
def test_oversize_growth(manager_1m: shmpool.ManagerProcess) -> None:
    with manager_1m.connect() as pool:
        buf = pool.buffer()
        chunk = pattern("over|", 100 * KiB)
        for _ in range(10):
            buf.write(chunk)
        assert buf.capacity == 1 * MiB  # the largest class, not yet oversize
        assert pool.stats()["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        for _ in range(10):
            buf.write(chunk)
        assert buf.capacity >= 2 * MiB
        stats = pool.stats()
        assert stats["oversize"]["leases"] == 1
        assert stats["oversize"]["bytes"] >= 2 * MiB
        first = buf.capacity
        buf.write(pattern("more|", 3 * MiB))  # from one oversize segment to a bigger one
        assert buf.capacity >= max(len(buf), 2 * first)
        stats = pool.stats()
        assert stats["oversize"]["leases"] == 1  # the old one went back
        assert stats["oversize"]["bytes"] >= buf.capacity
        assert buf.getvalue() == chunk * 20 + pattern("more|", 3 * MiB)
        buf.close()
        stats = pool.stats()
        assert stats["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        assert_balanced(stats)


@pytest.mark.timeout(60)
def test_pool_exhausted_leaves_buffer_unchanged(small_manager: shmpool.ManagerProcess) -> None:
    with small_manager.connect() as pool:
        buf = pool.buffer()
        chunk = pattern("budget|", 16 * KiB)
        written = b""
        for _ in range(200):  # 1 MiB budget: 64 chunks cannot all fit
            before = (buf.capacity, len(buf), buf.tell())
            try:
                buf.write(chunk)
            except shmpool.PoolExhaustedError:
                break
            written += chunk
        else:
            pytest.fail("the 1 MiB budget never ran out")
        assert (buf.capacity, len(buf), buf.tell()) == before
        assert len(buf) == len(written) > 0
        assert buf.getvalue() == written
        # A seek past the capacity that cannot grow does not zero-fill anything.
        buf.seek(buf.capacity + 100)
        with pytest.raises(shmpool.PoolExhaustedError):
            buf.write(b"z")
        assert buf.getvalue() == written
        stats = pool.stats()
        assert_balanced(stats)
        assert stats["committed_bytes"] <= stats["memory_limit"]
        # Still usable within its capacity.
        room = buf.capacity - len(buf)
        buf.seek(0)
        buf.write(b"HEAD")
        buf.seek(0, io.SEEK_END)
        buf.write(b"t" * room)
        assert len(buf) == buf.capacity
        buf.seek(0)
        assert buf.read(4) == b"HEAD"
        assert buf.getvalue() == b"HEAD" + written[4:] + b"t" * room
        buf.close()
        pool.trim()
        assert all_returned(pool.stats())


# ------------------------------------------------------------ close


def test_close_returns_the_slot(pool: shmpool.Pool) -> None:
    buf = pool.buffer()
    buf.write(b"a" * 5000)
    assert buf.capacity == 8 * KiB
    pool.trim()  # only the buffer's slot stays leased to us
    stats = pool.stats()
    assert _leased(stats, 8 * KiB) == 1
    assert client_entries(stats, os.getpid())[0]["leased"] == 1
    buf.close()
    assert buf.closed
    assert stats["local"]["cached"].get(str(8 * KiB), 0) == 0
    assert pool.stats()["local"]["cached"].get(str(8 * KiB), 0) == 1  # back in our cache
    pool.trim()
    assert all_returned(pool.stats())
    buf.close()  # twice is harmless


def test_io_after_close_raises(pool: shmpool.Pool) -> None:
    buf = pool.buffer()
    buf.write(b"data")
    buf.close()
    assert buf.capacity == 0
    for call in (
        lambda: buf.write(b"x"),
        lambda: buf.read(),
        lambda: buf.read1(1),
        lambda: buf.readinto(bytearray(4)),
        lambda: buf.seek(0),
        lambda: buf.tell(),
        lambda: buf.truncate(0),
        lambda: buf.getvalue(),
        lambda: buf.getbuffer(),
        lambda: buf.readline(),
        lambda: buf.flush(),
    ):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError), buf:
        pass
    with pytest.raises(shmpool.LeaseClosedError):
        buf.detach()


def test_context_manager(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(b"inside")
        assert not buf.closed
    assert buf.closed
    with pytest.raises(ValueError):
        buf.getvalue()
    with pytest.raises(RuntimeError), pool.buffer() as buf2:
        buf2.write(b"x" * 10_000)
        raise RuntimeError("boom")
    assert buf2.closed
    pool.trim()
    assert all_returned(pool.stats())


def test_close_of_never_written_buffer(pool: shmpool.Pool) -> None:
    buf = pool.buffer()
    buf.close()
    assert buf.closed and buf.capacity == 0


# ------------------------------------------------------------ handoff


@pytest.mark.parametrize("size", [0, 1, 5000, 70_000, 3 * MiB])
def test_detach_attach_in_one_process(manager_1m: shmpool.ManagerProcess, size: int) -> None:
    with manager_1m.connect(name="a") as a, manager_1m.connect(name="b") as b:
        buf = a.buffer()
        data = pattern("sender|", size)
        buf.write(data + b"extra tail")
        buf.truncate(size)  # the logical length, not the capacity, travels
        buf.seek(size // 2)
        cap = buf.capacity
        handle = buf.detach()
        assert isinstance(handle, shmpool.Handle)
        assert handle.length == size
        assert buf.closed
        with pytest.raises(ValueError):
            buf.read()
        got = b.attach_buffer(handle)
        assert isinstance(got, shmpool.SharedBuffer)
        assert len(got) == size
        assert got.tell() == 0
        assert got.capacity == cap == handle.capacity
        assert got.getvalue() == data
        assert got.read() == data
        got.write(b"+more")
        assert got.getvalue() == data + b"+more"
        with pytest.raises(shmpool.StaleHandleError):
            a.attach_buffer(handle)  # only once
        got.close()


def test_detach_then_attach_in_the_same_pool(pool: shmpool.Pool) -> None:
    buf = pool.buffer(100)
    buf.write(b"same pool")
    again = pool.attach_buffer(buf.detach())
    with again:
        assert again.getvalue() == b"same pool"
        again.seek(0, io.SEEK_END)
        again.write(b"!" * 10_000)  # and it can still grow
        assert again.getvalue() == b"same pool" + b"!" * 10_000


def test_pickle_through_pipe_in_one_process(pool: shmpool.Pool) -> None:
    send, recv = multiprocessing.Pipe()
    with send, recv:
        buf = pool.buffer()
        buf.write(pattern("piped|", 100_000))
        buf.seek(10)
        send.send(buf)
        assert buf.closed
        got = _recv(recv)
        with got:
            assert isinstance(got, shmpool.SharedBuffer)
            assert got.tell() == 0 and len(got) == 100_000
            assert got.getvalue() == pattern("piped|", 100_000)
    pool.trim()
    assert all_returned(pool.stats())


def test_pickle_with_live_view_refused(pool: shmpool.Pool) -> None:
    with pool.buffer() as buf:
        buf.write(b"abc")
        view = buf.getbuffer()
        with pytest.raises(BufferError):
            pickle.dumps(buf)
        assert not buf.closed and buf.getvalue() == b"abc"
        view.release()


@pytest.mark.timeout(120)
def test_detach_attach_across_processes(
    manager: shmpool.ManagerProcess, mp_context: multiprocessing.context.BaseContext
) -> None:
    with manager.connect(name="parent") as pool:
        buf = pool.buffer()
        data = pattern("parent|", 50_000)
        buf.write(data)
        parent_end, child_end = mp_context.Pipe()
        proc = mp_context.Process(target=attach_append_child, args=(manager.address, child_end))
        proc.start()
        child_end.close()
        try:
            with parent_end:
                parent_end.send((buf.detach(), data))
                assert buf.closed
                report, handle = _recv(parent_end)
        finally:
            _reap(proc)
        assert proc.exitcode == 0
        assert report == {
            "pid": proc.pid,
            "type": "SharedBuffer",
            "len": 50_000,
            "tell": 0,
            "intact": True,
            "mine": True,
            "capacity": 256 * KiB,
        }
        back = pool.attach_buffer(handle)
        with back:
            expected = data + pattern(f"child{proc.pid}|", 200_000)
            assert len(back) == len(expected) and back.tell() == 0
            assert back.read() == expected
            assert back.capacity == 256 * KiB
        pool.trim()
        assert all_returned(pool.stats())


@pytest.mark.timeout(120)
def test_pickled_buffer_across_processes(
    manager: shmpool.ManagerProcess, mp_context: multiprocessing.context.BaseContext
) -> None:
    with manager.connect(name="parent") as pool:
        buf = pool.buffer()
        data = pattern("pickled|", 30_000)
        buf.write(data)
        parent_end, child_end = mp_context.Pipe()
        proc = mp_context.Process(target=pickled_buffer_child, args=(manager.address, child_end))
        proc.start()
        child_end.close()
        try:
            with parent_end:
                parent_end.send(data)
                parent_end.send(buf)  # pickled: detached
                assert buf.closed
                report = _recv(parent_end)
                back = _recv(parent_end)  # unpickled: attached in ``pool``
                report2 = _recv(parent_end)
        finally:
            _reap(proc)
        assert proc.exitcode == 0
        assert report == {
            "type": "SharedBuffer",
            "len": 30_000,
            "tell": 0,
            "intact": True,
            "mine": True,
        }
        assert report2 == {"closed": True}
        with back:
            assert isinstance(back, shmpool.SharedBuffer)
            assert back.tell() == 0
            assert back.getvalue() == data + b"|appended by the child"
            assert client_entries(pool.stats(), os.getpid())
        pool.trim()
        assert all_returned(pool.stats())
