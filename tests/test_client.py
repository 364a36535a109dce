"""The client API in one process: leases, validation, errors, threads, fork."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

import pytest
from conftest import assert_balanced, client_entries, wait_for

import shmpool
from shmpool import protocol

KiB = 1024
MiB = 1024 * KiB


def pattern(tag: str, n: int) -> bytes:
    """``n`` bytes repeating ``tag``: a content only its writer would produce."""
    unit = tag.encode()
    return (unit * (n // len(unit) + 1))[:n]


def class_of(stats: dict, size: int) -> dict:
    return next(c for c in stats["classes"] if c["size"] == size)


@pytest.fixture
def pool(manager: shmpool.ManagerProcess):
    with manager.connect(name="test-client") as p:
        yield p


@pytest.fixture
def small_manager():
    """64 KiB .. 256 KiB classes in a 1 MiB budget: easy to exhaust, oversize above 256 KiB."""
    with shmpool.start(min_size="64KiB", max_size="256KiB", memory="1MiB", acquire_wait=0) as mgr:
        yield mgr


# ------------------------------------------------------------------ leases


@pytest.mark.parametrize(
    ("size", "capacity"),
    [
        (1, 4 * KiB),
        (100, 4 * KiB),
        (4 * KiB, 4 * KiB),
        (4 * KiB + 1, 8 * KiB),
        (100_000, 128 * KiB),
        (1 * MiB, 1 * MiB),
        (3 * MiB + 5, 4 * MiB),
    ],
)
def test_acquire_view_and_capacity(pool: shmpool.Pool, size: int, capacity: int) -> None:
    with pool.acquire(size) as lease:
        view = lease.view
        assert isinstance(view, memoryview)
        assert len(view) == size == len(lease) == lease.size
        assert lease.capacity == capacity
        assert not view.readonly
        data = pattern(f"size{size}|", size)
        view[:] = data
        assert bytes(lease.view) == data
        stats = pool.stats()
        assert class_of(stats, capacity)["leased"] >= 1
        assert_balanced(stats)
    assert lease.closed


def test_capacity_is_the_size_class(manager: shmpool.ManagerProcess) -> None:
    with manager.connect() as pool:
        sizes = [1, 4095, 4096, 4097, 8192, 65_536, 65_537, 16 * MiB]
        leases = [pool.acquire(n) for n in sizes]
        try:
            for n, lease in zip(sizes, leases, strict=True):
                cap = lease.capacity
                assert cap >= n and cap & (cap - 1) == 0 and cap >= 4 * KiB
                assert cap == 4 * KiB or cap // 2 < n
        finally:
            for lease in leases:
                lease.release()


def test_oversize_lease(small_manager: shmpool.ManagerProcess) -> None:
    with small_manager.connect() as pool:
        assert pool.stats()["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        size = 300_000  # above max_size (256 KiB)
        lease = pool.acquire(size)
        assert len(lease.view) == size
        assert lease.capacity >= size
        data = pattern("oversize!", size)
        lease.view[:] = data
        held = pool.stats()
        assert held["oversize"]["leases"] == 1
        assert held["oversize"]["bytes"] == lease.capacity
        assert held["mapped_bytes"] >= lease.capacity
        assert held["committed_bytes"] >= lease.capacity
        assert bytes(lease.view) == data
        lease.release()
        after = pool.stats()
        assert after["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        assert after["mapped_bytes"] == held["mapped_bytes"] - lease.capacity
        assert after["committed_bytes"] == held["committed_bytes"] - lease.capacity
        lease.release()  # idempotent for oversize leases too
        assert pool.stats()["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}


def test_two_oversize_leases_are_distinct(small_manager: shmpool.ManagerProcess) -> None:
    with small_manager.connect() as pool:
        a = pool.acquire(300_000)
        b = pool.acquire(260 * KiB)
        a.view[:] = pattern("A", len(a.view))
        b.view[:] = pattern("B", len(b.view))
        assert bytes(a.view) == pattern("A", len(a.view))
        assert pool.stats()["oversize"]["leases"] == 2
        a.release()
        assert bytes(b.view) == pattern("B", len(b.view))
        assert pool.stats()["oversize"]["leases"] == 1
        b.release()
        assert pool.stats()["oversize"]["leases"] == 0


def test_release_is_idempotent(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    lease.release()
    lease.release()
    lease.close()
    # The slot went to the local cache exactly once: two acquires get two slots.
    a, b = pool.acquire(5000), pool.acquire(5000)
    try:
        assert a._slot.ref != b._slot.ref
    finally:
        a.release()
        b.release()


def test_use_after_release(pool: shmpool.Pool) -> None:
    lease = pool.acquire(1000)
    view = lease.view
    view[:3] = b"abc"
    lease.release()
    assert lease.closed
    with pytest.raises(shmpool.LeaseClosedError):
        lease.view  # noqa: B018
    with pytest.raises(shmpool.LeaseClosedError):
        len(lease)
    with pytest.raises(shmpool.LeaseClosedError):
        lease.size  # noqa: B018
    assert issubclass(shmpool.LeaseClosedError, shmpool.UsageError)
    # The memoryview handed out earlier was released with the lease.
    with pytest.raises(ValueError, match="released"):
        view[0]
    with pytest.raises(ValueError, match="released"):
        view[:1] = b"x"


def test_lease_context_manager_releases_on_error(pool: shmpool.Pool) -> None:
    with pytest.raises(RuntimeError), pool.acquire(100) as lease:
        assert not lease.closed
        raise RuntimeError("boom")
    assert lease.closed
    with pytest.raises(shmpool.LeaseClosedError):
        lease.view  # noqa: B018


def test_pool_context_manager(manager: shmpool.ManagerProcess) -> None:
    with shmpool.connect(manager.address, name="ctx") as pool:
        assert not pool.closed
        lease = pool.acquire(10)
        assert len(client_entries(manager.stats(), os.getpid())) == 1
        lease.release()
    assert pool.closed
    wait_for(lambda: not client_entries(manager.stats(), os.getpid()))


BAD_SIZES = [
    (0, ValueError),
    (-1, ValueError),
    (-(2**70), ValueError),
    (2**49, ValueError),
    (1.5, TypeError),
    (4096.0, TypeError),
    ("10", TypeError),
    (b"10", TypeError),
    (None, TypeError),
    (True, TypeError),
    (False, TypeError),
]


@pytest.mark.parametrize(
    ("bad", "error", "warm"),
    [
        pytest.param(
            bad,
            error,
            warm,
            id=f"{bad!r}-{'warm' if warm else 'cold'}",
        )
        for warm in (False, True)
        for bad, error in BAD_SIZES
    ],
)
def test_acquire_validates_its_argument(
    pool: shmpool.Pool, bad: object, error: type, warm: bool
) -> None:
    if warm:  # a slot of every small class sits in the local cache (the hot path)
        for size in (10, 5000, 70_000):
            pool.acquire(size).release()
    with pytest.raises(error):
        lease = pool.acquire(bad)  # type: ignore[arg-type]
        lease.release()
    with pool.acquire(10) as lease:  # the pool is unharmed
        assert len(lease.view) == 10


def test_pool_exhausted(small_manager: shmpool.ManagerProcess) -> None:
    with small_manager.connect(name="hog") as hog, small_manager.connect(name="other") as other:
        leases = []
        with pytest.raises(shmpool.PoolExhaustedError):
            for _ in range(100):  # 1 MiB / 64 KiB = 16 slots at most
                leases.append(hog.acquire(64 * KiB))
        assert len(leases) == 16
        stats = other.stats()
        assert stats["committed_bytes"] == stats["memory_limit"]
        assert_balanced(stats)
        # Every class, and oversize, is out of budget for everyone.
        for size in (64 * KiB, 128 * KiB, 256 * KiB, 300 * KiB):
            with pytest.raises(shmpool.PoolExhaustedError):
                other.acquire(size)
        # Releasing one makes room again (served from the hog's cache).
        leases.pop().release()
        leases.append(hog.acquire(64 * KiB))
        for lease in leases:
            lease.release()
    # Once both connections are gone every slot is back and others can use them.
    with small_manager.connect() as pool:
        wait_for(lambda: class_of(pool.stats(), 64 * KiB)["leased"] == 0)
        with pool.acquire(64 * KiB) as lease:
            assert lease.capacity == 64 * KiB


def test_oversize_beyond_budget_is_exhausted(small_manager: shmpool.ManagerProcess) -> None:
    with small_manager.connect() as pool:
        with pytest.raises(shmpool.PoolExhaustedError):
            pool.acquire(2 * MiB)  # oversize and bigger than the whole budget
        stats = pool.stats()
        assert stats["oversize"] == {"leases": 0, "bytes": 0, "requested_bytes": 0}
        assert stats["committed_bytes"] == stats["mapped_bytes"] == 0


def test_closed_pool(manager: shmpool.ManagerProcess) -> None:
    pool = manager.connect()
    lease = pool.acquire(100)
    pool.close()
    assert pool.closed
    pool.close()  # idempotent
    for size in (100, 1 * MiB, 128 * MiB):  # cached class, new class, oversize
        with pytest.raises(shmpool.PoolClosedError):
            pool.acquire(size)
    with pytest.raises(shmpool.PoolClosedError):
        pool.stats()
    assert issubclass(shmpool.PoolClosedError, shmpool.UsageError)
    lease.release()  # harmless after close
    wait_for(lambda: not client_entries(manager.stats(), os.getpid()))


def _segment_fds_and_maps() -> tuple[int, int]:
    fds = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds += os.readlink(f"/proc/self/fd/{name}").startswith("/dev/shm/shmpool.")
    with open("/proc/self/maps") as f:
        maps = sum("/dev/shm/shmpool." in line for line in f)
    return fds, maps


def test_close_unmaps_segments(manager: shmpool.ManagerProcess) -> None:
    before = _segment_fds_and_maps()
    pool = manager.connect()
    for size in (100, 10_000, 100_000):
        with pool.acquire(size):
            pass
    assert _segment_fds_and_maps()[1] > before[1]
    pool.close()  # no lease is open: nothing needs the maps any more
    assert _segment_fds_and_maps() == before


def test_connect_to_nonexistent_address(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(shmpool.ManagerGoneError):
        shmpool.connect(str(tmp_path / "nobody.sock"), timeout=30)
    with pytest.raises(shmpool.ManagerGoneError):
        shmpool.connect(str(tmp_path / "no-such-dir" / "x.sock"), timeout=30)
    # A socket file nobody listens on any more (a killed manager's leftover).
    stale = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(stale)
    sock.close()
    with pytest.raises(shmpool.ManagerGoneError):
        shmpool.connect(stale, timeout=30)
    assert time.monotonic() - start < 15  # refused at once, not after the reply timeout


def test_connect_uses_environment(manager: shmpool.ManagerProcess, monkeypatch) -> None:
    assert os.environ[shmpool.ENV_VAR] == manager.address  # set by start()
    monkeypatch.setenv(shmpool.ENV_VAR, manager.address)
    with shmpool.connect(name="from-env") as pool:
        assert pool.address == manager.address
        assert pool.manager_pid == manager.pid
        with pool.acquire(10) as lease:
            lease.view[:] = b"0123456789"
        names = [c["name"] for c in client_entries(pool.stats(), os.getpid())]
        assert "from-env" in names


def test_stats_invariant(pool: shmpool.Pool) -> None:
    leases = [pool.acquire(n) for n in (1, 5000, 5000, 70_000, 1 * MiB, 1 * MiB)]
    stats = pool.stats()
    assert_balanced(stats)
    assert stats["memory_limit"] == 64 * MiB
    assert sum(c["leased"] for c in stats["classes"]) >= len(leases)
    (me,) = [c for c in stats["clients"] if c["name"] == "test-client"]
    assert me["pid"] == os.getpid()
    assert me["leased"] == sum(c["leased"] for c in stats["classes"])
    assert stats["local"]["pid"] == os.getpid()
    for lease in leases:
        lease.release()
    stats = pool.stats()
    assert_balanced(stats)
    # Released slots stay in this process's cache, still leased to it.
    cached = sum(stats["local"]["cached"].values())
    assert cached == sum(c["leased"] for c in stats["classes"])


def test_threads_never_share_a_slot(pool: shmpool.Pool) -> None:
    threads_n, rounds = 6, 200
    sizes = (100, 4096, 5000, 20_000, 70_000)
    held: dict[tuple[int, int], int] = {}
    held_lock = threading.Lock()
    errors: list[str] = []
    start = threading.Barrier(threads_n)

    def work(tid: int) -> None:
        try:
            start.wait()
            for i in range(rounds):
                size = sizes[(tid + i) % len(sizes)]
                with pool.acquire(size) as lease:
                    ref = lease._slot.ref
                    key = (ref.segment, ref.index)
                    with held_lock:
                        if key in held:
                            errors.append(f"slot {key} given to threads {held[key]} and {tid}")
                        held[key] = tid
                    data = pattern(f"t{tid}i{i};", size)
                    lease.view[:] = data
                    time.sleep(0)  # let other threads run while we hold it
                    if bytes(lease.view) != data:
                        errors.append(f"thread {tid} round {i}: slot {key} was overwritten")
                    with held_lock:
                        del held[key]
        except Exception as exc:
            errors.append(f"thread {tid}: {exc!r}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not any(t.is_alive() for t in workers)
    assert errors == []
    assert held == {}
    assert_balanced(pool.stats())


# -------------------------------------------------------------------- fork


def _child_report(write_fd: int, body) -> None:
    """Run ``body()`` in a forked child, send its result as JSON, never return."""
    code = 1
    try:
        result = body()
        os.write(write_fd, json.dumps(result).encode())
        code = 0
    except BaseException as exc:
        os.write(write_fd, json.dumps({"error": repr(exc)}).encode())
    finally:
        os._exit(code)


def _fork_and_read(body) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child_report(w, body)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, result
    result["pid"] = pid
    return result


@pytest.mark.timeout(60)
def test_fork_child_gets_its_own_connection(pool: shmpool.Pool) -> None:
    lease = pool.acquire(1000)
    parent_ref = lease._slot.ref
    data = pattern("parent;", 1000)
    lease.view[:] = data
    parent_clients = client_entries(pool.stats(), os.getpid())
    (parent_entry,) = [c for c in parent_clients if c["name"] == "test-client"]

    def child() -> dict:
        stats = pool.stats()  # opens the child's own connection
        lease.release()  # the parent's lease: must not feed the child's cache
        refs = []
        leases = [pool.acquire(1000) for _ in range(64)]
        for i, child_lease in enumerate(leases):
            refs.append(list(child_lease._slot.ref[:2]))
            child_lease.view[:] = pattern(f"child{i};", 1000)
        after = pool.stats()
        for child_lease in leases:
            child_lease.release()
        return {
            "local_pid": stats["local"]["pid"],
            "clients": [[c["id"], c["pid"]] for c in after["clients"]],
            "refs": refs,
            "mine": [c["leased"] for c in after["clients"] if c["pid"] == os.getpid()],
        }

    result = _fork_and_read(child)
    assert "error" not in result, result
    child_pid = result["pid"]
    assert result["local_pid"] == child_pid
    ids = {cid for cid, pid in result["clients"] if pid == child_pid}
    assert len(ids) == 1 and parent_entry["id"] not in ids
    assert any(pid == os.getpid() and cid == parent_entry["id"] for cid, pid in result["clients"])
    assert result["mine"] and result["mine"][0] >= 64
    assert [parent_ref.segment, parent_ref.index] not in result["refs"]
    assert len({tuple(r) for r in result["refs"]}) == 64
    # The parent's lease is untouched and still the parent's.
    assert bytes(lease.view) == data
    wait_for(lambda: not client_entries(pool.stats(), child_pid))
    now = client_entries(pool.stats(), os.getpid())
    (entry,) = [c for c in now if c["id"] == parent_entry["id"]]
    assert entry["leased"] == parent_entry["leased"]
    lease.view[:4] = b"mine"
    lease.release()
    assert_balanced(pool.stats())


@pytest.mark.timeout(60)
def test_fork_child_without_prior_use_of_connection(manager: shmpool.ManagerProcess) -> None:
    pool = manager.connect(name="forked")
    try:

        def child() -> dict:
            with pool.acquire(50_000) as child_lease:
                child_lease.view[:] = pattern("c", 50_000)
                ok = bytes(child_lease.view) == pattern("c", 50_000)
            return {"ok": ok, "pids": [c["pid"] for c in pool.stats()["clients"]]}

        result = _fork_and_read(child)
        assert result.get("ok") is True, result
        assert result["pid"] in result["pids"]
        # The parent's connection still works after the child used (and left) the pool.
        with pool.acquire(50_000) as lease:
            lease.view[:2] = b"ok"
        wait_for(lambda: not client_entries(manager.stats(), result["pid"]))
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_fork_child_releasing_inherited_oversize_lease(
    small_manager: shmpool.ManagerProcess,
) -> None:
    with small_manager.connect() as pool:
        big = pool.acquire(300_000)
        big.view[:6] = b"parent"

        def child() -> dict:
            big.release()  # the parent's lease: harmless in the child, like class slots
            return {"ok": True}

        result = _fork_and_read(child)
        assert result.get("ok") is True, result
        assert pool.stats()["oversize"]["leases"] == 1
        assert bytes(big.view[:6]) == b"parent"
        big.release()


def test_protocol_round_trip_sanity() -> None:
    """The raw messages the fault tests forge encode and decode as the manager expects."""
    hello = protocol.Hello(1, protocol.VERSION, os.getpid(), "evil")
    assert protocol.decode(protocol.encode(hello)) == hello
    ref = protocol.SlotRef(1, 2, 3)
    release = protocol.Release(2, (ref,))
    assert protocol.decode(protocol.encode(release)) == release


@pytest.mark.timeout(60)
def test_fork_stops_the_janitor_and_the_parent_gets_a_new_one(
    manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No janitor is mid-tick when the process is copied; the parent's pool keeps working."""
    monkeypatch.setattr(shmpool.janitor, "JANITOR_PERIOD", 3600.0)  # it sends no notice here
    with shmpool.Pool(manager.address, idle_timeout=None) as pool:
        pool.acquire(5000).release()  # starts the pool's janitor thread
        handle = pool.acquire(5000).detach()  # lent (or a notice waits in the queue)
        before = pool._janitor
        assert before is not None and before.is_alive()
        pid = os.fork()
        if pid == 0:
            ok = not pool._conn.notices and not pool._lending.lent and pool._janitor is None
            try:
                with pool.acquire(5000) as lease:  # the child's own connection
                    lease.view[:2] = b"ok"
            finally:
                os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not before.is_alive()  # stopped and joined before the fork
        after = pool._janitor
        assert after is not None and after is not before and after.is_alive()
        if pool._conn.tickets_on:
            assert pool._lending.lent  # still ours to watch
        pool.attach(handle).release()
        assert_balanced(pool.stats())
