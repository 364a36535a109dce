"""What a process uses: the pool's meter, the ``Usage`` reports, and ``Recall(0)``.

The meter tests run against a real manager, with whichever hot path this run
uses (the suite runs with and without ``SHMPOOL_NO_SPEEDUPS``); one test runs
a scenario in both and compares. The wire tests talk to a fake manager in a
process of its own, which answers just enough of the protocol to lease slots
and tells the test every request it gets, so they check what the client
sends whatever the real manager does with it.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import pickle
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import MP_TIMEOUT, wait_for

import shmpool
from shmpool import buffer, client
from shmpool import protocol as p
from shmpool.janitor import JANITOR_PERIOD

MiB = 1 << 20
FAKE_MIN, FAKE_MAX = 4096, MiB


def usage(pool: shmpool.Pool) -> tuple[int, dict[int, int], dict[int, int]]:
    u = pool.usage()
    assert u["requested_bytes"] == sum(u["requested"].values())
    assert all(v > 0 for v in (*u["requested"].values(), *u["sizes"].values())), u
    return u["requested_bytes"], u["requested"], u["sizes"]


def requested(pool: shmpool.Pool) -> dict[int, int]:
    return usage(pool)[1]


def sizes(pool: shmpool.Pool) -> dict[int, int]:
    return usage(pool)[2]


@pytest.fixture
def manager() -> Iterator[shmpool.ManagerProcess]:
    """A manager whose max_size is 1 MiB, so that oversize leases are cheap."""
    with shmpool.start(max_size="1MiB", memory="64MiB") as mgr:
        yield mgr
    assert not mgr.running


@pytest.fixture
def pool(manager: shmpool.ManagerProcess) -> Iterator[shmpool.Pool]:
    with shmpool.Pool(manager.address, name="meter", idle_timeout=None) as pool:
        yield pool


# ------------------------------------------------------------------- meter


def test_acquires_count_while_open_hit_miss_and_oversize(pool: shmpool.Pool) -> None:
    assert pool.usage() == {"requested_bytes": 0, "requested": {}, "sizes": {}}
    miss = pool.acquire(5000)  # an empty cache: from the manager
    assert usage(pool) == (5000, {13: 5000}, {13: 1})
    miss.release()
    assert usage(pool) == (0, {}, {13: 1})
    with pool.acquire(6000) as hit:  # from the cache
        assert hit._slot is miss._slot
        assert requested(pool) == {13: 6000}
    big = pool.acquire(3 * MiB + 1)  # above max_size: a segment of its own
    assert usage(pool) == (3 * MiB + 1, {22: 3 * MiB + 1}, {13: 2, 22: 1})
    big.release()
    assert usage(pool) == (0, {}, {13: 2, 22: 1})


def test_the_lease_counts_in_its_pools_meter(pool: shmpool.Pool) -> None:
    with pool.acquire(100) as lease:
        assert lease._meter is pool._meter


def test_sizes_count_acquires_that_returned_a_lease(pool: shmpool.Pool) -> None:
    for n in (1, 2, 3, 4, 4096, 4097, 100_000, 100_000):
        pool.acquire(n).release()
    pool.acquire(300, timeout=1).release()  # the slow path: counted once
    for bad in (0, -1, True, 1.5, 1 << 49):
        with pytest.raises((TypeError, ValueError)):
            pool.acquire(bad)
    assert sizes(pool) == {0: 1, 1: 1, 2: 2, 9: 1, 12: 1, 13: 1, 17: 2}
    assert requested(pool) == {}


def test_detach_and_attach_move_the_bytes(pool: shmpool.Pool, manager: Any) -> None:
    with shmpool.Pool(manager.address, name="other", idle_timeout=None) as other:
        lease = pool.acquire(5000)
        handle = lease.detach()
        assert usage(pool) == (0, {}, {13: 1})
        got = other.attach(handle)
        assert usage(other) == (5000, {13: 5000}, {})  # an attach is no acquire
        back = pool.attach(got.detach())
        assert requested(other) == {}
        assert requested(pool) == {13: 5000}
        back.release()
        assert requested(pool) == {}


def _attach_only(address: str, handle: shmpool.Handle, conn: Connection) -> None:
    """A consumer: attaches one handle, never acquires nor asks for stats, and waits."""
    with shmpool.Pool(address, name="consumer") as pool:
        lease = pool.attach(handle)
        conn.send(len(lease.view))
        conn.recv()  # until the test has seen the report
        lease.release()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_process_that_only_attaches_reports_its_usage(
    pool: shmpool.Pool, manager: Any, method: str
) -> None:
    """Its janitor starts with the first attach: the manager hears of the open
    bytes within ``USAGE_PERIOD`` although the process sends nothing else."""
    ctx = multiprocessing.get_context(method)
    handle = pool.acquire(5000).detach()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_attach_only, args=(manager.address, handle, theirs))
    proc.start()
    theirs.close()
    try:
        assert ours.poll(MP_TIMEOUT) and ours.recv() == 5000

        def consumer() -> dict[str, Any]:
            (entry,) = [c for c in pool.stats()["clients"] if c["name"] == "consumer"]
            return entry  # type: ignore[no-any-return]

        wait_for(lambda: consumer()["requested_bytes"] == 5000)
        ours.send("done")
    finally:
        proc.join(MP_TIMEOUT)
        ours.close()
    assert proc.exitcode == 0


def test_a_share_counts_in_each_reader(pool: shmpool.Pool, manager: Any) -> None:
    with shmpool.Pool(manager.address, name="reader", idle_timeout=None) as reader:
        handle = pool.acquire(700).share(2)
        assert requested(pool) == {}
        first, second = reader.attach(handle), reader.attach(handle)
        assert usage(reader) == (1400, {10: 1400}, {})
        first.release()
        first.release()
        assert requested(reader) == {10: 700}
        second.release()
        assert requested(reader) == {}


def test_pickling_hands_the_bytes_over(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    data = pickle.dumps(lease)
    assert lease.closed
    assert requested(pool) == {}
    got = pickle.loads(data)
    assert got._meter is pool._meter  # this process's only live pool took it
    assert requested(pool) == {13: 5000}
    got.release()
    assert usage(pool) == (0, {}, {13: 1})


def test_a_shared_buffer_counts_its_leases(pool: shmpool.Pool) -> None:
    buf = pool.buffer()
    assert requested(pool) == {}
    buf.write(b"x" * 10_000)
    assert requested(pool) == {14: 10_000}
    buf.write(b"y" * 20_000)  # grows: the old lease goes back, the new one counts
    assert requested(pool) == {15: 32_768}
    handle = buf.detach()
    assert requested(pool) == {}
    again = pool.attach_buffer(handle)
    assert requested(pool) == {15: 30_000}  # its logical length
    again.close()
    assert requested(pool) == {}


def test_a_refused_release_keeps_the_lease_counted(pool: shmpool.Pool) -> None:
    lease = pool.acquire(5000)
    export = pickle.PickleBuffer(lease.view)
    for close in (lease.release, lease.detach, lambda: pickle.dumps(lease)):
        with pytest.raises(BufferError):
            close()
        assert not lease.closed
        assert requested(pool) == {13: 5000}
    export.release()
    lease.release()
    assert requested(pool) == {}
    lease.release()  # and once only
    assert requested(pool) == {}


def test_a_view_its_user_released_still_counts_out(pool: shmpool.Pool) -> None:
    lease = pool.acquire(300)
    with lease.view as view:  # releases the lease's own view on exit
        view[0] = 1
    assert requested(pool) == {9: 300}
    assert (lease.size, len(lease)) == (300, 300)  # not read off the released view
    assert "size=300" in repr(lease)
    lease.release()
    assert requested(pool) == {}
    with pytest.raises(shmpool.LeaseClosedError):
        len(lease)


@pytest.mark.timeout(60)
def test_threads_closing_at_once_count_each_lease_out_once(pool: shmpool.Pool) -> None:
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads trade the GIL as often as they can
    try:
        for round_ in range(20):
            leases = [pool.acquire(5000 + k) for k in range(32)]
            closers: list[Callable[[shmpool.Lease], Any]] = [
                lambda lease: lease.release(),
                lambda lease: lease.__exit__(None, None, None),
                lambda lease: lease._disown(),
            ]
            if round_ % 2:  # detach races too: the one that closes gets the handle
                closers.append(lambda lease: lease.detach())
            handles = _close_in_threads(leases, closers)
            assert requested(pool) == {}
            assert all(lease.closed for lease in leases)
            for handle in handles:
                pool.attach(handle).release()
            assert requested(pool) == {}
    finally:
        sys.setswitchinterval(switch)


def _close_in_threads(
    leases: list[shmpool.Lease], closers: list[Callable[[shmpool.Lease], Any]]
) -> list[shmpool.Handle]:
    """Each closer on its own thread, all on every lease at once; the handles detach gave."""
    start = threading.Barrier(len(closers))
    handles: list[shmpool.Handle] = []
    errors: list[BaseException] = []

    def run(close: Callable[[shmpool.Lease], Any]) -> None:
        start.wait()
        for lease in leases:
            try:
                result = close(lease)
            except shmpool.LeaseClosedError:
                continue
            except BaseException as exc:
                errors.append(exc)
                continue
            if isinstance(result, shmpool.Handle):
                handles.append(result)

    threads = [threading.Thread(target=run, args=(close,)) for close in closers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return handles


SCENARIO = textwrap.dedent(
    """
    import json, pickle, sys
    import shmpool
    from shmpool import buffer

    assert buffer.SPEEDUPS is (sys.argv[2] == "c"), buffer.SPEEDUPS
    seen = []

    def note(*pools):
        seen.append([pool.usage() for pool in pools])

    with shmpool.Pool(sys.argv[1]) as a, shmpool.Pool(sys.argv[1]) as b:
        first, one, big = a.acquire(5000), a.acquire(1), a.acquire(3 << 20)
        note(a)
        got = b.attach(first.detach())
        note(a, b)
        got.release()
        got.release()
        data = pickle.dumps(one)
        note(a)
        one = pickle.loads(data)
        note(a, b)
        export = pickle.PickleBuffer(big.view)
        try:
            big.release()
        except BufferError:
            note(a)
        export.release()
        big.release()
        lease = a.acquire(300)
        with lease.view as view:
            view[0] = 1
        lease.release()
        buf = a.buffer()
        buf.write(b"x" * 10000)
        note(a)
        buf.close()
        one.release()
        handle = a.acquire(777, timeout=1).share(2)
        readers = [b.attach(handle), b.attach(handle)]
        note(a, b)
        for reader in readers:
            reader.release()
        for n in range(1, 70000, 997):
            a.acquire(n).release()
        note(a, b)
    print(json.dumps(seen))
    """
)


@pytest.mark.timeout(120)
def test_the_c_and_python_meters_agree(manager: shmpool.ManagerProcess, tmp_path: Path) -> None:
    if not buffer.SPEEDUPS:
        pytest.skip("the C hot path is not built here")
    runs = {}
    for impl in ("c", "python"):
        env = dict(os.environ)
        env.pop("SHMPOOL_NO_SPEEDUPS", None)
        if impl == "python":
            env["SHMPOOL_NO_SPEEDUPS"] = "1"
        result = subprocess.run(
            [sys.executable, "-c", SCENARIO, manager.address, impl],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=MP_TIMEOUT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        runs[impl] = json.loads(result.stdout)
    assert runs["c"] == runs["python"]
    assert runs["c"][0] == [
        {
            "requested_bytes": 5000 + 1 + (3 << 20),
            "requested": {"0": 1, "13": 5000, "22": 3 << 20},
            "sizes": {"0": 1, "13": 1, "22": 1},
        }
    ]


def test_the_meters_count_acquires_alike() -> None:
    """The pure-Python meter, and the one this run uses (the C one, if built)."""
    meters = [buffer._PyMeter(), buffer._Meter()]
    for meter in meters:
        for n in (1, 2, 3, 4096, 4097, 1 << 48):
            meter.count_acquire(n)
    expected = [0] * 49
    for k in (0, 1, 2, 12, 13, 48):
        expected[k] = 1
    assert [m.snapshot() for m in meters] == [((0,) * 49, tuple(expected))] * 2


# ------------------------------------------------------ a lost connection


def test_leases_of_a_lost_connection_settle_with_their_old_meter(fake: Fake) -> None:
    with shmpool.Pool(fake.path, name="lost", idle_timeout=None) as pool:
        lease = pool.acquire(5000)
        old = pool._meter
        fake.drop(0)

        def gone() -> bool:
            try:
                pool.stats()
            except shmpool.ManagerGoneError:
                return True
            return False

        wait_for(gone)
        assert pool._meter is not old
        assert pool.usage() == {"requested_bytes": 0, "requested": {}, "sizes": {}}
        assert lease._meter is old
        lease.release()
        assert pool.usage()["requested_bytes"] == 0
        assert old.snapshot()[0] == (0,) * 49


# ----------------------------------------------------- the fake manager


class Received(NamedTuple):
    conn: int  # the fake's number for the connection, in the order they came
    at: float  # time.monotonic() when the fake read it (the clock is the system's)
    msg: p.Message


def fake_manager(path: str, ctl: Connection) -> None:
    """Serve clients at ``path`` just enough to lease slots; send ``ctl`` every request.

    Each Acquire gets a new memfd segment with the slots asked for; Stats an
    empty reply; Release an Ok. ``ctl`` may ask for a Recall on a
    connection, for a connection to be dropped, or for the end.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(ctl, selectors.EVENT_READ, "ctl")
    conns: list[socket.socket] = []
    segments = itertools.count(1)
    ctl.send("ready")
    while True:
        for key, _ in sel.select():
            if key.data == "listen":
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ, len(conns))
                conns.append(conn)
            elif key.data == "ctl":
                order = ctl.recv()
                if order[0] == "stop":
                    return
                conn = conns[order[1]]
                if order[0] == "recall":
                    conn.send(p.encode(p.Recall(0, order[2], 1)))
                else:  # drop
                    sel.unregister(conn)
                    conn.close()
            else:
                conn = key.fileobj  # type: ignore[assignment]
                data = conn.recv(p.MAX_REQUEST + 1)
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    continue
                ctl.send((key.data, time.monotonic(), data))
                _answer(conn, key.data, p.decode(data, max_size=p.MAX_REQUEST), segments)


def _answer(conn: socket.socket, n: int, msg: p.Message, segments: Iterator[int]) -> None:
    if isinstance(msg, p.Hello):
        welcome = p.Welcome(msg.req, p.VERSION, os.getpid(), FAKE_MIN, FAKE_MAX, n + 1, key=n + 7)
        conn.send(p.encode(welcome))
    elif isinstance(msg, p.Acquire):
        size = max(FAKE_MIN, 1 << (msg.size - 1).bit_length())
        segment = next(segments)
        fd = os.memfd_create(f"fake-segment-{segment}")
        try:
            os.ftruncate(fd, size * msg.count)
            refs = [p.SlotRef(segment, i, 0) for i in range(msg.count)]
            info = p.SegmentInfo(segment, size * msg.count, size)
            socket.send_fds(conn, [p.encode_grant(msg.req, size, refs, [info])], [fd])
        finally:
            os.close(fd)
    elif isinstance(msg, p.Stats):
        conn.send(p.encode(p.StatsReply(msg.req, {})))
    elif isinstance(msg, p.Release):
        conn.send(p.encode(p.Ok(msg.req)))


class Fake:
    """The test's end of a ``fake_manager``: what it received, and orders for it."""

    def __init__(self, path: str, ctl: Connection) -> None:
        self.path = path
        self._ctl = ctl
        self.log: list[Received] = []

    def _read(self) -> None:
        while self._ctl.poll():
            conn, at, data = self._ctl.recv()
            self.log.append(Received(conn, at, p.decode(data, max_size=p.MAX_REQUEST)))

    def received(self, kind: type[Any], conn: int = 0) -> list[Any]:
        """Every ``kind`` message the connection sent so far, oldest first."""
        self._read()
        return [r for r in self.log if r.conn == conn and isinstance(r.msg, kind)]

    def wait(
        self, kind: type[Any], count: int, conn: int = 0, timeout: float = MP_TIMEOUT
    ) -> list[Any]:
        """Poll until the connection sent ``count`` ``kind`` messages; all of them."""
        return wait_for(lambda: len(got := self.received(kind, conn)) >= count and got, timeout)

    def recall(self, conn: int, slot_size: int) -> None:
        self._ctl.send(("recall", conn, slot_size))

    def drop(self, conn: int) -> None:
        self._ctl.send(("drop", conn))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Fake]:
    ctx = multiprocessing.get_context("spawn")  # no thread here: the fork test forks this process
    ours, theirs = ctx.Pipe()
    path = str(tmp_path / "fake.sock")
    proc = ctx.Process(target=fake_manager, args=(path, theirs), daemon=True)
    proc.start()
    theirs.close()
    try:
        assert ours.poll(MP_TIMEOUT) and ours.recv() == "ready"
        yield Fake(path, ours)
    finally:
        ours.send(("stop",))
        proc.join(MP_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
        ours.close()


def _requests(fake: Fake, conn: int = 0) -> list[type[Any]]:
    fake._read()
    return [type(r.msg) for r in fake.log if r.conn == conn]


# --------------------------------------------------------------- on the wire


def test_stats_sends_the_usage_first(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "USAGE_PERIOD", 3600.0)  # no report from the janitor here
    with shmpool.Pool(fake.path, name="stats", idle_timeout=None) as pool:
        big, small = pool.acquire(5000), pool.acquire(100)
        pool.stats()
        (report,) = fake.received(p.Usage)
        assert report.msg.requested == ((7, 100), (13, 5000))
        assert report.msg.sizes == ((7, 1), (13, 1))
        assert _requests(fake)[-2:] == [p.Usage, p.Stats]

        big.release()
        pool.acquire(5000).release()  # a hit
        pool.acquire(5001).release()
        pool.stats()
        report = fake.received(p.Usage)[-1]
        assert report.msg.requested == ((7, 100),)  # what is open now
        assert report.msg.sizes == ((13, 2),)  # the acquires since the last report
        assert _requests(fake)[-2:] == [p.Usage, p.Stats]

        pool.stats()  # nothing changed: no report
        assert _requests(fake)[-2:] == [p.Stats, p.Stats]
        assert len(fake.received(p.Usage)) == 2

        small.release()
        pool.stats()
        report = fake.received(p.Usage)[-1]
        assert (report.msg.requested, report.msg.sizes) == ((), ())  # all closed: zeros


@pytest.mark.timeout(60)
def test_the_janitor_reports_changes_at_most_every_period(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = [0]
    tick = shmpool.Pool._tick

    def counted(self: shmpool.Pool) -> None:
        ticks[0] += 1
        tick(self)

    monkeypatch.setattr(shmpool.Pool, "_tick", counted)
    period = client.USAGE_PERIOD
    connected = time.monotonic()
    with shmpool.Pool(fake.path, name="janitor", idle_timeout=None) as pool:
        lease = pool.acquire(5000)  # its refill starts the janitor
        (first,) = fake.wait(p.Usage, 1)
        assert first.at - connected >= period  # not before a period has passed
        assert (first.msg.requested, first.msg.sizes) == (((13, 5000),), ((13, 1),))

        lease.release()
        second = fake.wait(p.Usage, 2)[1]
        # (stamped on receipt: allow for the first taking longer to arrive)
        assert second.at - first.at >= period - 0.05
        assert (second.msg.requested, second.msg.sizes) == ((), ())

        quiet = ticks[0] + 2 * round(period / JANITOR_PERIOD)
        wait_for(lambda: ticks[0] >= quiet, timeout=30)  # two periods of ticks, unchanged
        assert len(fake.received(p.Usage)) == 2

        pool.acquire(100).release()
        third = fake.wait(p.Usage, 3)[2]
        assert (third.msg.requested, third.msg.sizes) == ((), ((7, 1),))  # only the new acquire
        assert not any(r.conn != 0 for r in fake.log)
    assert pool.messages == len(_requests(fake)) - 3  # the usage reports are not counted


@pytest.mark.timeout(60)
def test_a_forked_child_starts_at_zero_on_its_own_connection(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "USAGE_PERIOD", 3600.0)  # no report from the janitors here
    with shmpool.Pool(fake.path, name="parent", idle_timeout=None) as pool:
        lease = pool.acquire(5000)
        pool.stats()
        assert len(fake.received(p.Usage)) == 1
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it sees, and leave at once
            os.close(read)
            seen = [pool.usage()]
            lease.release()  # the parent's: its bytes are not the child's
            seen.append(pool.usage())
            with pool.acquire(100):
                seen.append(pool.usage())
                pool.stats()  # on the child's own connection
            seen.append(pool.usage())
            os.write(write, json.dumps(seen).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            seen = json.loads(f.read())
        assert os.waitpid(pid, 0)[1] == 0
        zero = {"requested_bytes": 0, "requested": {}, "sizes": {}}
        assert seen == [
            zero,
            zero,
            {"requested_bytes": 100, "requested": {"7": 100}, "sizes": {"7": 1}},
            {"requested_bytes": 0, "requested": {}, "sizes": {"7": 1}},
        ]
        (child,) = fake.wait(p.Usage, 1, conn=1)
        assert (child.msg.requested, child.msg.sizes) == (((7, 100),), ((7, 1),))
        assert usage(pool) == (5000, {13: 5000}, {13: 1})  # the parent's lease is still open
        pool.stats()
        assert _requests(fake)[-2:] == [p.Stats, p.Stats]  # nothing changed here: no report
        assert len(fake.received(p.Usage)) == 1  # and nothing from the child on this connection
        lease.release()


def _cached_refs(pool: shmpool.Pool) -> dict[int, set[p.SlotRef]]:
    return {cache.cls: {slot.ref for slot in cache} for cache in pool._caches if cache}


def _returned(fake: Fake, since: int) -> set[p.SlotRef]:
    return {ref for r in fake.received(p.Return)[since:] for ref in r.msg.slots}


@pytest.mark.timeout(60)
def test_a_recall_of_size_0_returns_every_class(fake: Fake) -> None:
    with shmpool.Pool(fake.path, name="recalled", idle_timeout=None) as pool:
        for n in (4096, 20_000, 100_000):
            pool.acquire(n).release()  # its refill starts the janitor, which reads recalls
        cached = _cached_refs(pool)
        assert set(cached) == {0, 3, 5}

        fake.recall(0, 4096)  # one class: only that one goes back
        wait_for(lambda: _returned(fake, 0) == cached[0])
        assert _cached_refs(pool) == {3: cached[3], 5: cached[5]}

        returns = len(fake.received(p.Return))
        fake.recall(0, 0)  # every class
        wait_for(lambda: _returned(fake, returns) == cached[3] | cached[5])
        assert _cached_refs(pool) == {}
        assert pool._batch == pool._first_batch
