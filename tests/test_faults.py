"""Faults: a manager killed with SIGKILL, and clients that lie, babble or never read.

The hostile clients speak the wire protocol over a raw SOCK_SEQPACKET socket,
so nothing in ``shmpool.client`` can paper over what the manager does.
"""

from __future__ import annotations

import array
import contextlib
import os
import random
import signal
import socket
import time

import msgpack
import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries, shm_names, wait_for

import shmpool
from shmpool import protocol
from shmpool.manager import PEER_QUEUE_BYTES

pytestmark = pytest.mark.timeout(60)

_ANCBUF = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)


def _pattern(tag: str, n: int) -> bytes:
    unit = tag.encode()
    return (unit * (n // len(unit) + 1))[:n]


class RawClient:
    """A client that speaks the protocol by hand (and can speak it badly)."""

    def __init__(self, address: str, timeout: float = MP_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.req = 1

    def hello(self, name: str = "evil") -> protocol.Welcome:
        reply = self.call(protocol.Hello(self.next_req(), protocol.VERSION, os.getpid(), name))
        assert isinstance(reply, protocol.Welcome), reply
        return reply

    def next_req(self) -> int:
        self.req += 1
        return self.req

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def call(self, message: protocol.Message) -> protocol.Message | None:
        self.send_raw(protocol.encode(message))
        return self.receive()

    def receive(self) -> protocol.Message | None:
        """The next message from the manager, or None at end-of-file."""
        try:
            data, ancdata, _flags, _ = self.sock.recvmsg(protocol.MAX_REPLY + 1, _ANCBUF)
        except ConnectionResetError:
            return None
        for level, kind, payload in ancdata:  # segment fds of a Grant: not ours to keep
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                for fd in array.array("i", payload[:usable]):
                    os.close(fd)
        if not data:
            return None
        return protocol.decode(data)

    def expect_closed(self) -> list[protocol.Message]:
        """Read until end-of-file; return what came before it."""
        seen = []
        while (msg := self.receive()) is not None:
            seen.append(msg)
            assert len(seen) < 10_000, "the manager never closed the connection"
        return seen

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _healthy(manager: shmpool.ManagerProcess, pool: shmpool.Pool) -> None:
    """The manager is alive and serves a well-behaved client as before."""
    assert manager.running
    for size in (100, 5000, 100_000):
        with pool.acquire(size) as lease:
            data = _pattern(f"ok{size}", size)
            lease.view[:] = data
            assert bytes(lease.view) == data
    assert_balanced(pool.stats())


def _clients_named(manager: shmpool.ManagerProcess, name: str) -> list[dict]:
    return [c for c in manager.stats()["clients"] if c["name"] == name]


# ------------------------------------------------------------ manager death


def test_manager_sigkill(tmp_path) -> None:
    with shmpool.start(memory="64MiB") as mgr:
        pool = mgr.connect(name="survivor", timeout=30)
        lease = pool.acquire(5000)
        lease.view[:] = _pattern("still mapped", 5000)
        assert any(c["name"] == "survivor" for c in pool.stats()["clients"])

        os.kill(mgr.pid, signal.SIGKILL)
        wait_for(lambda: not mgr.running)

        # Segments were unlinked at birth: nothing named outlives the manager.
        assert not [n for n in shm_names() if n.startswith(f"shmpool.{mgr.pid}.")]
        # Memory we mapped stays valid after the manager is gone.
        assert bytes(lease.view) == _pattern("still mapped", 5000)

        start = time.monotonic()
        with pytest.raises(shmpool.ManagerGoneError):
            pool.acquire(1 << 20)  # a class never used: must reach the manager
        assert time.monotonic() - start < pool.timeout / 2  # noticed, not timed out
        # Once gone, every path that needs the manager says so.
        with pytest.raises(shmpool.ManagerGoneError):
            pool.acquire(5000)  # the cache died with the connection
        with pytest.raises(shmpool.ManagerGoneError):
            pool.acquire(100 << 20)
        with pytest.raises(shmpool.ManagerGoneError):
            pool.stats()
        with pytest.raises(shmpool.ManagerGoneError):
            shmpool.connect(mgr.address, timeout=30)
        lease.release()  # giving back to a dead manager is not an error
        lease.release()
        pool.close()
        assert mgr.stop() == -signal.SIGKILL
    assert not os.path.exists(mgr.address)


def test_manager_sigkill_with_idle_pool() -> None:
    """A pool that never acquired anything learns of the death on its first acquire."""
    with shmpool.start(memory="16MiB") as mgr:
        with mgr.connect(timeout=30) as pool:
            os.kill(mgr.pid, signal.SIGKILL)
            wait_for(lambda: not mgr.running)
            start = time.monotonic()
            with pytest.raises(shmpool.ManagerGoneError):
                pool.acquire(100)
            assert time.monotonic() - start < pool.timeout / 2
        assert not [n for n in shm_names() if n.startswith(f"shmpool.{mgr.pid}.")]


# ---------------------------------------------------------- forged release


def test_forged_release_is_refused(manager: shmpool.ManagerProcess) -> None:
    with manager.connect(name="A") as a:
        lease = a.acquire(5000)
        data = _pattern("belongs to A", 5000)
        lease.view[:] = data
        ref = lease._slot.ref
        before = a.stats()
        (a_before,) = [c for c in before["clients"] if c["name"] == "A"]

        with RawClient(manager.address) as b:
            b.hello()
            forged = [
                ref,  # A's slot, exactly as A holds it
                protocol.SlotRef(ref.segment, ref.index, ref.generation + 1),  # wrong generation
                protocol.SlotRef(ref.segment, 10**6, ref.generation),  # no such index
                protocol.SlotRef(10**9, 0, 1),  # no such segment
            ]
            for slot in forged:
                reply = b.call(protocol.Release(b.next_req(), (slot,)))
                assert isinstance(reply, protocol.Error), reply
                assert reply.code == "stale", reply
                assert reply.req == b.req
            # The same slot twice, or mixed with nothing of B's: still refused as a whole.
            reply = b.call(protocol.Release(b.next_req(), (ref, ref)))
            assert isinstance(reply, protocol.Error) and reply.code == "stale"
            # A refused release is B's error, not a protocol breach: B stays connected.
            reply = b.call(protocol.Stats(b.next_req()))
            assert isinstance(reply, protocol.StatsReply)
            (b_entry,) = [c for c in reply.stats["clients"] if c["name"] == "evil"]
            assert b_entry["leased"] == 0

        after = a.stats()
        assert after["classes"] == before["classes"]
        (a_after,) = [c for c in after["clients"] if c["name"] == "A"]
        assert a_after["leased"] == a_before["leased"]
        # A's lease is intact and still A's: nobody else can be handed that slot.
        assert bytes(lease.view) == data
        others = [a.acquire(5000) for _ in range(20)]
        assert ref[:2] not in {o._slot.ref[:2] for o in others}
        for other in others:
            other.release()
        lease.view[:4] = b"mine"
        lease.release()
        assert_balanced(a.stats())


def test_forged_return_closes_only_the_forger(manager: shmpool.ManagerProcess) -> None:
    """``Return`` expects no reply, so a bad one is treated as a protocol breach."""
    if not hasattr(protocol, "Return"):
        pytest.skip("this protocol has no Return message")
    with manager.connect(name="A") as a:
        lease = a.acquire(5000)
        lease.view[:] = _pattern("A", 5000)
        ref = lease._slot.ref
        before = a.stats()["classes"]
        with RawClient(manager.address) as b:
            b.hello()
            b.send_raw(protocol.encode(protocol.Return(b.next_req(), (ref,))))
            seen = b.expect_closed()
            assert all(isinstance(m, protocol.Error) for m in seen), seen
        assert a.stats()["classes"] == before
        assert bytes(lease.view) == _pattern("A", 5000)
        lease.release()
        _healthy(manager, a)


# -------------------------------------------------------------- bad bytes


def _frames() -> dict[str, bytes]:
    acquire = protocol.encode(protocol.Acquire(2, 4096, 1))
    welcome = protocol.Welcome(2, protocol.VERSION, 1, 4096, 8192, 1)
    return {
        "garbage": b"\xc1\xc1\xc1 this is not msgpack \xff\x00",
        "truncated": acquire[:-1],
        "truncated-header": acquire[:1],
        "oversized": msgpack.packb([4, 2, "x" * (protocol.MAX_REQUEST + 100)]),
        "reply-type": protocol.encode(welcome),
        "unknown-type": msgpack.packb([99, 2, 1, 2, 3]),
        "string-size": msgpack.packb([2, 2, "4096", 1, 0]),
        "negative-size": msgpack.packb([2, 2, -5, 1, 0]),
        "zero-count": msgpack.packb([2, 2, 4096, 0, 0]),
        "huge-count": msgpack.packb([2, 2, 4096, 10**6, 0]),
        "float-req": msgpack.packb([4, 2.5]),
        "bin-field": msgpack.packb([2, 2, b"\x00" * 8, 1, 0], use_bin_type=True),
        "not-an-array": msgpack.packb({"type": 2, "req": 2}),
        "bare-int": msgpack.packb(7),
        "short-array": msgpack.packb([2]),
        "bad-slot": msgpack.packb([3, 2, [[1, 2]], 0]),
        "too-many-slots": msgpack.packb([3, 2, [[1, 0, 1]] * (protocol.MAX_BATCH + 1), 0]),
        "array32-bomb": b"\xdd\xff\xff\xff\xff",
        "map32-bomb": b"\xdf\xff\xff\xff\xff",
        "deep-nesting": b"\x91" * 10_000 + b"\xc0",
        "trailing-bytes": protocol.encode(protocol.Stats(2)) + b"\x00",
        "empty": b"",
    }


@pytest.mark.parametrize("name", list(_frames()))
def test_bad_frame_hurts_only_its_sender(manager: shmpool.ManagerProcess, name: str) -> None:
    frame = _frames()[name]
    with manager.connect(name="bystander") as pool:
        held = pool.acquire(5000)
        held.view[:] = _pattern("held across the attack", 5000)
        _healthy(manager, pool)
        with RawClient(manager.address) as bad:
            bad.hello(name="bad")
            bad.send_raw(frame)
            seen = bad.expect_closed()  # an error reply at most, then the door shuts
            assert len(seen) <= 1, seen
            for msg in seen:
                assert isinstance(msg, protocol.Error), msg
                assert msg.code == "protocol", msg
            with pytest.raises(OSError):
                for _ in range(3):
                    bad.send_raw(protocol.encode(protocol.Stats(bad.next_req())))
        wait_for(lambda: not _clients_named(manager, "bad"))
        assert bytes(held.view) == _pattern("held across the attack", 5000)
        _healthy(manager, pool)
        held.release()


@pytest.mark.parametrize("name", ["garbage", "truncated", "oversized", "empty"])
def test_bad_frame_before_hello(manager: shmpool.ManagerProcess, name: str) -> None:
    with manager.connect(name="bystander") as pool, RawClient(manager.address) as bad:
        bad.send_raw(_frames()[name])
        seen = bad.expect_closed()
        assert all(isinstance(m, protocol.Error) for m in seen), seen
        _healthy(manager, pool)


def test_random_frames(manager: shmpool.ManagerProcess) -> None:
    rng = random.Random(20240611)
    with manager.connect(name="bystander") as pool:
        for _ in range(40):
            frame = rng.randbytes(rng.randrange(1, 64))
            with RawClient(manager.address) as bad:
                bad.hello(name="fuzz")
                bad.send_raw(frame)
                # Random bytes may even decode to a valid request; whatever the reply,
                # the manager must answer or hang up, and never die.
                bad.sock.settimeout(0.2)
                with contextlib.suppress(TimeoutError, shmpool.ProtocolError):
                    bad.receive()
            assert manager.running
        _healthy(manager, pool)
        wait_for(lambda: not _clients_named(manager, "fuzz"))
        assert_balanced(pool.stats())


# --------------------------------------------------------- protocol order


@pytest.mark.parametrize(
    "first",
    [
        protocol.Acquire(1, 4096, 1),
        protocol.Stats(1),
        protocol.Release(1, (protocol.SlotRef(1, 0, 1),)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_request_before_hello_is_refused(manager: shmpool.ManagerProcess, first) -> None:
    with manager.connect(name="bystander") as pool, RawClient(manager.address) as raw:
        raw.send_raw(protocol.encode(first))
        seen = raw.expect_closed()
        assert len(seen) == 1 and isinstance(seen[0], protocol.Error), seen
        assert seen[0].code == "protocol"
        assert not any(isinstance(m, (protocol.Grant, protocol.StatsReply)) for m in seen)
        stats = pool.stats()
        assert sum(c["leased"] for c in stats["classes"]) == 0  # nothing was granted
        assert all_returned(stats)
        _healthy(manager, pool)


def test_second_hello_and_wrong_version_are_refused(manager: shmpool.ManagerProcess) -> None:
    with RawClient(manager.address) as raw:
        raw.hello()
        reply = raw.call(protocol.Hello(raw.next_req(), protocol.VERSION, os.getpid(), "again"))
        assert isinstance(reply, protocol.Error) and reply.code == "protocol"
        assert raw.expect_closed() == []
    with RawClient(manager.address) as raw:
        reply = raw.call(protocol.Hello(1, protocol.VERSION + 1, os.getpid(), "future"))
        assert isinstance(reply, protocol.Error), reply
        assert raw.expect_closed() == []
    with manager.connect() as pool:
        _healthy(manager, pool)


def test_huge_requests_get_errors_not_crashes(manager: shmpool.ManagerProcess) -> None:
    with RawClient(manager.address) as raw:
        raw.hello()
        reply = raw.call(protocol.Acquire(raw.next_req(), protocol.MAX_BUFFER, 1))
        assert isinstance(reply, protocol.Error) and reply.code == "exhausted", reply
        # The largest batch of the smallest class is served (or partly served).
        reply = raw.call(protocol.Acquire(raw.next_req(), 1, protocol.MAX_BATCH))
        assert isinstance(reply, protocol.Grant), reply
        assert 1 <= len(reply.slots) <= protocol.MAX_BATCH
        granted = reply.slots
        ok = raw.call(protocol.Release(raw.next_req(), granted))
        assert isinstance(ok, protocol.Ok), ok
        # Releasing them again is stale now.
        again = raw.call(protocol.Release(raw.next_req(), granted[:1]))
        assert isinstance(again, protocol.Error) and again.code == "stale"
        stats = raw.call(protocol.Stats(raw.next_req()))
        assert isinstance(stats, protocol.StatsReply)
        assert all_returned(stats.stats)
    with manager.connect() as pool:
        _healthy(manager, pool)


def test_client_that_never_reads_is_throttled_not_dropped(
    manager: shmpool.ManagerProcess,
) -> None:
    """A client that leaves its replies unread is not read from; it keeps its leases.

    (Issue 10: dropping it handed its live leases to others while it could
    still write them.) Its queue stays bounded; it catches up when it reads.
    """
    with manager.connect(name="bystander") as pool:
        held = pool.acquire(5000)
        held.view[:] = _pattern("bystander", 5000)
        with RawClient(manager.address) as flood:
            flood.hello(name="flood")
            grant = flood.call(protocol.Acquire(flood.next_req(), 100, 1))
            assert isinstance(grant, protocol.Grant)
            flood.sock.settimeout(0)
            sent: list[int] = []

            def throttled() -> bool:
                with contextlib.suppress(BlockingIOError):
                    for _ in range(200):
                        req = flood.next_req()
                        flood.send_raw(protocol.encode(protocol.Stats(req)))
                        sent.append(req)
                return bool(manager.stats()["manager"]["throttled"])

            wait_for(throttled)
            stats = pool.stats()
            limit = PEER_QUEUE_BYTES + protocol.MAX_REPLY
            assert 0 < stats["manager"]["queued_bytes"] <= limit
            (entry,) = _clients_named(manager, "flood")
            assert entry["leased"] == 1  # its slot is still its own
            assert bytes(held.view) == _pattern("bystander", 5000)
            _healthy(manager, pool)
            # It reads at last: every reply comes, in order, and it is served again.
            flood.sock.settimeout(MP_TIMEOUT)
            for req in sent:
                reply = flood.receive()
                assert isinstance(reply, protocol.StatsReply) and reply.req == req, reply
            assert isinstance(flood.call(protocol.Stats(flood.next_req())), protocol.StatsReply)
        wait_for(lambda: not _clients_named(manager, "flood"))
        stats = pool.stats()
        assert_balanced(stats)
        assert stats["manager"]["throttled"] == 0
        # The slot the flooder held went back when it hung up.
        (mine,) = client_entries(stats, os.getpid())
        assert sum(c["leased"] for c in stats["classes"]) == mine["leased"]
        held.release()
        _healthy(manager, pool)


# ------------------------------------------------------------ prefetch


def test_a_prefetch_is_refused_at_once_and_recalls_nothing() -> None:
    """``Acquire(wait=0)`` on a spent budget: an ``exhausted`` Error now, no park, no Recall.

    R1 holds every slot. R2's prefetch is refused at once; its ordinary
    acquire then parks and recalls (every class: the budget is spent). The
    Recall R1 gets is the ordinary acquire's (count 3): had the prefetch
    recalled, the first would carry its count, 5. Once R1 returns slots, the
    parked acquire is served.
    """
    size = 64 << 10
    with shmpool.start(min_size="64KiB", max_size="64KiB", memory="1MiB") as mgr:
        with RawClient(mgr.address) as r1, RawClient(mgr.address) as r2:
            r1.hello("holder")
            r2.hello("prefetcher")
            grant = r1.call(protocol.Acquire(r1.next_req(), size, 16))
            assert isinstance(grant, protocol.Grant) and len(grant.slots) == 16

            refused = r2.call(protocol.Acquire(r2.next_req(), size, 5, 0, 0))
            assert isinstance(refused, protocol.Error) and refused.code == "exhausted"
            req = r2.next_req()
            r2.send_raw(protocol.encode(protocol.Acquire(req, size, 3)))  # parks
            recall = r1.receive()
            assert isinstance(recall, protocol.Recall)
            assert (recall.slot_size, recall.count) == (0, 3)

            r1.send_raw(protocol.encode(protocol.Return(r1.next_req(), grant.slots[:3])))
            served = r2.receive()
            assert isinstance(served, protocol.Grant) and served.req == req
            assert {tuple(s)[:2] for s in served.slots} <= {tuple(s)[:2] for s in grant.slots}
        assert_balanced(mgr.stats())


def test_a_prefetch_answer_never_lands_on_a_closed_or_trimmed_pool() -> None:
    """A hot class has a prefetch on its way; ``trim()`` takes its answer and returns it too.

    And a pool closed with a prefetch unanswered leaves nothing leased.
    """
    size = 64 << 10
    with shmpool.start(min_size="64KiB", max_size="64KiB", memory="64MiB") as mgr:
        pool = shmpool.Pool(mgr.address, name="hot", idle_timeout=None)
        leases = []
        while not pool._conn.prefetching:
            leases.append(pool.acquire(size))
        for lease in leases:
            lease.release()
        leases.clear()
        pool.trim()
        assert not pool._conn.prefetching
        assert not any(pool._caches)
        stats = pool.stats()
        assert _clients_named(mgr, "hot")[0]["leased"] == 0
        assert_balanced(stats)

        while not pool._conn.prefetching:
            leases.append(pool.acquire(size))
        pool.close()
        leases.clear()
        wait_for(lambda: not _clients_named(mgr, "hot"))
        assert sum(c["leased"] for c in mgr.stats()["classes"]) == 0
