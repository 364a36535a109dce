"""Issue 10: a live process's slots are never given away, and one client cannot hurt the others.

Real managers, real processes, real sockets: a paused client, a client the
manager closes on, a process whose forked child keeps its socket, the
limits on connections and handshakes, the per-client quota, and acquires
that wait for memory.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
from typing import Any

import numpy as np
import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries, wait_for

import shmpool
from shmpool import protocol
from shmpool.errors import PoolExhaustedError

pytestmark = pytest.mark.timeout(120)

SLOT = 64 << 10
#: 16 slots of 64 KiB and nothing else: easy to fill.
SMALL = dict(min_size="64KiB", max_size="64KiB", memory="1MiB")


def _pattern(tag: int, n: int = SLOT) -> bytes:
    return bytes([tag % 251]) * n


def _manager_info(mgr: shmpool.ManagerProcess) -> dict[str, Any]:
    info: dict[str, Any] = mgr.stats()["manager"]
    return info


def _hold_all(address: str, ready: Any, verdict: Any, go: Any) -> None:
    """Take every slot, fill each with its own pattern, and check them after ``go``."""
    with shmpool.connect(address, name="holder") as pool:
        leases = [pool.acquire(SLOT) for _ in range(16)]
        for i, lease in enumerate(leases):
            lease.view[:] = _pattern(i)
        ready.set()
        go.wait(MP_TIMEOUT)
        verdict.put(sum(bytes(lease.view) != _pattern(i) for i, lease in enumerate(leases)))
        for lease in leases:
            lease.release()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_paused_client_keeps_its_leases(method: str) -> None:
    """SIGSTOPped with every slot leased: 400 acquires elsewhere fail; nothing is taken from it.

    (Before: after ~256 unread recalls the manager dropped it and granted
    its live slots to others while it could still write them.)
    """
    ctx = multiprocessing.get_context(method)
    with shmpool.start(**SMALL) as mgr, mgr.connect(name="asker") as pool:
        ready, go, verdict = ctx.Event(), ctx.Event(), ctx.Queue()
        holder = ctx.Process(target=_hold_all, args=(mgr.address, ready, verdict, go))
        holder.start()
        try:
            assert ready.wait(MP_TIMEOUT)
            os.kill(holder.pid, signal.SIGSTOP)
            for _ in range(400):
                with pytest.raises(PoolExhaustedError):
                    pool.acquire(SLOT, timeout=0.001)
            stats = pool.stats()
            (entry,) = client_entries(stats, holder.pid)
            assert entry["leased"] == 16
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        go.set()
        assert verdict.get(timeout=MP_TIMEOUT) == 0  # every byte it wrote is still there
        holder.join(MP_TIMEOUT)
        assert holder.exitcode == 0
        wait_for(lambda: all_returned(pool.stats()))
        with pool.acquire(SLOT, timeout=5) as lease:  # and the memory serves others again
            lease.view[:4] = b"mine"


def _break_protocol(address: str, ready: Any, done: Any) -> None:
    """Hold every slot by hand, then send garbage; stay alive until told."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(address)
    sock.send(protocol.encode(protocol.Hello(1, protocol.VERSION, os.getpid(), "rogue")))
    sock.recv(protocol.MAX_REPLY)
    for req in range(2, 18):
        sock.send(protocol.encode(protocol.Acquire(req, SLOT, 1)))
        _, ancdata, _, _ = sock.recvmsg(protocol.MAX_REPLY, socket.CMSG_SPACE(64 * 4))
        for _level, _kind, data in ancdata:  # keep no segment descriptor
            for i in range(0, len(data) - len(data) % 4, 4):
                os.close(int.from_bytes(data[i : i + 4], "little"))
    sock.send(b"\xc1 not msgpack")
    ready.set()
    done.wait(MP_TIMEOUT)
    sock.close()


def test_slots_of_a_client_closed_on_wait_for_its_process_to_exit() -> None:
    """The manager closes on a client that broke the protocol; its process may still write
    the slots it held, so they are quarantined until it exits."""
    ctx = multiprocessing.get_context("fork")
    with shmpool.start(**SMALL) as mgr, mgr.connect(name="asker") as pool:
        ready, done = ctx.Event(), ctx.Event()
        rogue = ctx.Process(target=_break_protocol, args=(mgr.address, ready, done))
        rogue.start()
        assert ready.wait(MP_TIMEOUT)
        wait_for(lambda: _manager_info(mgr)["quarantined"] == 1)
        with pytest.raises(PoolExhaustedError):
            pool.acquire(SLOT, timeout=0.05)
        assert_balanced(pool.stats())
        done.set()
        rogue.join(MP_TIMEOUT)
        with pool.acquire(SLOT, timeout=10) as lease:  # its process ended: the slots are free
            lease.view[:4] = b"free"
        assert _manager_info(mgr)["quarantined"] == 0
        pool.trim()
        wait_for(lambda: all_returned(pool.stats()))


def _connect_then_fork(address: str, ready: Any) -> None:
    """Lease slots on a raw connection, fork a child that keeps the socket, exit at once."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(address)
    sock.send(protocol.encode(protocol.Hello(1, protocol.VERSION, os.getpid(), "parent")))
    sock.recv(protocol.MAX_REPLY)
    sock.send(protocol.encode(protocol.Acquire(2, SLOT, 4)))
    _, ancdata, _, _ = sock.recvmsg(protocol.MAX_REPLY, socket.CMSG_SPACE(64 * 4))
    for _level, _kind, data in ancdata:
        for i in range(0, len(data) - len(data) % 4, 4):
            os.close(int.from_bytes(data[i : i + 4], "little"))
    r, w = os.pipe()
    if os.fork() == 0:  # the grandchild: holds the socket until the pipe closes
        os.close(w)
        ready.put(os.getpid())
        os.read(r, 1)
        os._exit(0)
    os._exit(0)


def test_a_process_that_exits_returns_its_slots_though_a_child_keeps_its_socket() -> None:
    ctx = multiprocessing.get_context("fork")
    with shmpool.start(**SMALL) as mgr, mgr.connect(name="asker") as pool:
        ready = ctx.SimpleQueue()  # written at once (os._exit would lose a Queue's feeder)
        parent = ctx.Process(target=_connect_then_fork, args=(mgr.address, ready))
        parent.start()
        grandchild = ready.get()
        try:
            parent.join(MP_TIMEOUT)
            # The socket is still open in the grandchild: no end-of-file, yet the
            # process that made the connection is gone, and so are its leases.
            wait_for(lambda: all_returned(pool.stats()))
            assert not [c for c in pool.stats()["clients"] if c["name"] == "parent"]
        finally:
            os.kill(grandchild, signal.SIGKILL)


def test_a_connection_that_says_nothing_is_closed() -> None:
    with shmpool.start(hello_timeout=0.2) as mgr, mgr.connect() as pool:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        silent.settimeout(MP_TIMEOUT)
        silent.connect(mgr.address)
        try:
            reply = protocol.decode(silent.recv(protocol.MAX_REPLY))
            assert isinstance(reply, protocol.Error) and "Hello" in reply.message
            assert silent.recv(protocol.MAX_REPLY) == b""  # then closed
        finally:
            silent.close()
        assert_balanced(pool.stats())


def test_connections_are_capped_in_all_and_per_user() -> None:
    with shmpool.start(max_clients=3) as mgr:
        pools = [mgr.connect(name=f"p{i}") for i in range(3)]
        try:
            with pytest.raises(shmpool.TooManyClientsError, match="--max-clients"):
                mgr.connect()
            pools.pop().close()
            wait_for(lambda: _count_named(pools[0], "p2") == 0)
            pools.append(mgr.connect(name="again"))  # room again
        finally:
            for pool in pools:
                pool.close()
    with shmpool.start(max_clients_per_uid=1) as mgr, mgr.connect() as pool:
        with pytest.raises(shmpool.AccessDeniedError, match="--max-clients-per-uid"):
            mgr.connect()
        with pool.acquire(100) as lease:
            lease.view[:1] = b"w"


def _count_named(pool: shmpool.Pool, name: str) -> int:
    return sum(1 for c in pool.stats()["clients"] if c["name"] == name)


def test_client_quota() -> None:
    with (
        shmpool.start(client_quota="256KiB", **SMALL) as mgr,
        mgr.connect() as pool,
        mgr.connect() as other,
    ):
        leases = [pool.acquire(SLOT) for _ in range(4)]
        with pytest.raises(shmpool.QuotaExceededError, match="quota"):
            pool.acquire(SLOT)
        with pytest.raises(PoolExhaustedError):  # a QuotaExceededError is one too
            pool.acquire(SLOT, timeout=5)  # and it does not wait: only it can help
        more = [other.acquire(SLOT) for _ in range(4)]  # the others are not affected
        for lease in leases + more:
            lease.release()
        pool.trim()
        with pool.acquire(SLOT) as lease:
            lease.view[:1] = b"x"


def test_timeout_zero_fails_at_once_and_a_long_wait_is_not_a_dead_manager() -> None:
    with (
        shmpool.start(acquire_wait=30, **SMALL) as mgr,
        mgr.connect() as holder,
        mgr.connect(timeout=0.3) as pool,
    ):
        leases = [holder.acquire(SLOT) for _ in range(16)]
        with pytest.raises(PoolExhaustedError):
            pool.acquire(SLOT, timeout=0)
        # 1 s of waiting is more than the pool's 0.3 s socket timeout: still only
        # "exhausted", and the pool is not broken.
        with pytest.raises(PoolExhaustedError):
            pool.acquire(SLOT, timeout=1.0)
        leases.pop().release()
        holder.trim()
        with pool.acquire(SLOT, timeout=10) as lease:
            lease.view[:1] = b"y"
        for lease in leases:
            lease.release()


def test_waiters_are_served_in_order_as_memory_comes_back() -> None:
    with shmpool.start(**SMALL) as mgr, mgr.connect() as holder:
        leases = [holder.acquire(SLOT) for _ in range(16)]
        got: list[str] = []
        errors: list[BaseException] = []
        pools = [mgr.connect(name=f"w{i}") for i in range(2)]

        def wait_in(pool: shmpool.Pool, tag: str) -> None:
            try:
                lease = pool.acquire(SLOT, timeout=60)
                got.append(tag)
                lease.release()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = []
        try:
            for i, pool in enumerate(pools):
                thread = threading.Thread(target=wait_in, args=(pool, f"w{i}"))
                thread.start()
                threads.append(thread)
                wait_for(lambda n=i + 1: _manager_info(mgr)["waiting"] == n)
            leases.pop().release()
            holder.trim()  # one slot back: the first waiter gets it
            wait_for(lambda: got)
            assert got == ["w0"]
            leases.pop().release()
            holder.trim()
            wait_for(lambda: len(got) == 2)
            assert got == ["w0", "w1"] and not errors
        finally:
            for lease in leases:
                lease.release()
            for thread in threads:
                thread.join(60)
            for pool in pools:
                pool.close()


def test_an_oversize_acquire_may_wait_for_the_budget() -> None:
    with (
        shmpool.start(min_size="4KiB", max_size="64KiB", memory="1MiB") as mgr,
        mgr.connect() as pool,
        mgr.connect() as other,
    ):
        big = pool.acquire(700 << 10)
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(other.acquire(600 << 10, timeout=60))
        )
        thread.start()
        wait_for(lambda: _manager_info(mgr)["waiting"] == 1)
        big.release()  # an oversize segment is freed at once: the budget serves the waiter
        thread.join(60)
        (lease,) = result
        assert len(lease.view) == 600 << 10
        lease.release()


@pytest.mark.parametrize(
    "size", [np.int64(5000), np.uint16(5000), np.int32(70_000)], ids=lambda v: type(v).__name__
)
def test_sizes_of_any_integer_type(manager: shmpool.ManagerProcess, size: Any) -> None:
    with manager.connect() as pool, pool.acquire(size) as lease:
        assert len(lease.view) == int(size)
        assert lease.capacity >= int(size)


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_bad_timeouts_are_refused(manager: shmpool.ManagerProcess, bad: Any) -> None:
    with manager.connect() as pool, pytest.raises((TypeError, ValueError)):
        pool.acquire(100, timeout=bad)


def test_stats_requests_in_a_loop_are_all_answered_in_order(
    manager: shmpool.ManagerProcess,
) -> None:
    """A Stats request may wait for the next build (they cost the others); none is lost."""
    with manager.connect() as pool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(MP_TIMEOUT)
        sock.connect(manager.address)
        try:
            sock.send(protocol.encode(protocol.Hello(1, protocol.VERSION, os.getpid(), "spam")))
            sock.recv(protocol.MAX_REPLY)
            reqs = list(range(2, 202))
            for req in reqs:
                sock.send(protocol.encode(protocol.Stats(req)))
            with pool.acquire(100) as lease:  # others are served meanwhile
                lease.view[:1] = b"z"
            for req in reqs:
                reply = protocol.decode(sock.recv(protocol.MAX_REPLY + 1))
                assert isinstance(reply, protocol.StatsReply) and reply.req == req
        finally:
            sock.close()
        assert_balanced(pool.stats())


def test_the_pure_python_acquire_passes_its_timeout_on() -> None:
    """``Pool.acquire`` itself (the C twin shadows it when built) must not drop ``timeout``.

    With the manager's default wait at 100 s, a dropped ``timeout=0`` would
    park this acquire far past the test's time limit.
    """
    with (
        shmpool.start(acquire_wait=100, **SMALL) as mgr,
        mgr.connect() as holder,
        mgr.connect() as pool,
    ):
        leases = [holder.acquire(SLOT) for _ in range(16)]
        with pytest.raises(PoolExhaustedError):
            shmpool.Pool.acquire(pool, SLOT, timeout=0)
        assert _manager_info(mgr)["waiting"] == 0
        for lease in leases:
            lease.release()
