"""Leaks: a lease collected unreleased gives its slot back and warns; lease tracking.

Tracking (``track=True`` or ``SHMPOOL_TRACK=1``) notes where each lease was
acquired: ``pool.held_leases()`` lists them, the ResourceWarning names the
acquire, and the janitor reports the long-held ones to the manager, which
``pool.stats(leases_older_than=...)`` and ``shmpool stats --leases`` list
from any process. Runs in the mode of the run (C or ``SHMPOOL_NO_SPEEDUPS=1``).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from conftest import MP_TIMEOUT, all_returned, piped_child, wait_for
from test_faults import RawClient

import shmpool
from shmpool import buffer, protocol
from shmpool.tracking import TRACK_VAR

SIZE = 5000  # class 8192


@pytest.fixture
def manager() -> Iterator[shmpool.ManagerProcess]:
    """conftest's manager, with classes up to 1 MiB: oversize leases fit the budget."""
    with shmpool.start(max_size="1MiB", memory="64MiB") as mgr:
        yield mgr
    assert not mgr.running


@pytest.fixture
def pool(manager: shmpool.ManagerProcess) -> Iterator[shmpool.Pool]:
    with shmpool.Pool(manager.address, name="leaks", idle_timeout=None, track=False) as p:
        yield p


@pytest.fixture
def tracked(manager: shmpool.ManagerProcess) -> Iterator[shmpool.Pool]:
    with shmpool.connect(manager.address, name="tracked", track=True) as p:
        yield p


def _leased(manager: shmpool.ManagerProcess) -> int:
    return sum(c["leased"] for c in manager.stats()["classes"])


def _acquire_here(pool: shmpool.Pool, size: int = SIZE) -> shmpool.Lease:
    return pool.acquire(size)


# ------------------------------------------------------------ dropped leases


def test_a_dropped_lease_gives_its_slot_back_and_warns(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess
) -> None:
    lease = pool.acquire(SIZE)
    slot = lease._slot
    assert pool.usage()["requested_bytes"] == SIZE
    with pytest.warns(ResourceWarning, match=r"Lease of 5000 bytes .*capacity 8192\).*"
                      r"went back.*SHMPOOL_TRACK=1") as record:  # fmt: skip
        del lease
        gc.collect()
    assert len(record) == 1
    assert pool._caches[1].count(slot) == 1  # in the cache, once
    assert pool.usage()["requested_bytes"] == 0
    again = pool.acquire(SIZE)
    assert again._slot is slot  # handed out again
    again.release()
    pool.trim()
    wait_for(lambda: all_returned(manager.stats()))


def test_a_dropped_oversize_lease_goes_back_to_the_manager(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess
) -> None:
    lease = pool.acquire(pool.max_size + 1)
    assert manager.stats()["oversize"]["leases"] == 1
    with pytest.warns(ResourceWarning, match="went back"):
        del lease
        gc.collect()
    wait_for(lambda: manager.stats()["oversize"]["leases"] == 0)


def test_a_lease_in_a_garbage_cycle(pool: shmpool.Pool, manager: shmpool.ManagerProcess) -> None:
    lease = pool.acquire(SIZE)
    slot = lease._slot
    cycle: list[Any] = [lease]
    cycle.append(cycle)
    del lease
    with pytest.warns(ResourceWarning, match="went back"):
        del cycle
        gc.collect()
    assert pool._caches[1].count(slot) == 1


def test_a_dropped_exported_lease_keeps_its_slot(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess
) -> None:
    lease = pool.acquire(SIZE)
    slot = lease._slot
    export = pickle.PickleBuffer(lease.view)
    with pytest.warns(ResourceWarning, match=r"still in use \(referenced or exported\)"):
        del lease
        gc.collect()
    assert len(export.raw()) == SIZE  # still mapped, still someone's
    export.release()
    assert slot not in pool._caches[1]  # never handed out again here
    pool.trim()
    assert _leased(manager) == 1
    pool.close()
    wait_for(lambda: all_returned(manager.stats()))


def test_a_view_kept_from_a_dropped_lease_stays_usable(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess
) -> None:
    """``view = pool.acquire(n).view``: the lease goes at once, its view lives on.

    The view is not released under its holder (it stays readable and
    writable) and the slot is not handed out again while it lives.
    """
    with pytest.warns(ResourceWarning, match=r"still in use \(referenced or exported\)"):
        view = pool.acquire(SIZE).view
        gc.collect()
    view[:3] = b"abc"
    assert len(view) == SIZE and bytes(view[:3]) == b"abc"
    with pool.acquire(SIZE) as other:
        other.view[:3] = b"xyz"
    assert bytes(view[:3]) == b"abc"  # another lease never got this slot
    del view
    pool.close()
    wait_for(lambda: all_returned(manager.stats()))


def test_a_released_lease_warns_nothing(pool: shmpool.Pool) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        lease = pool.acquire(SIZE)
        lease.release()
        del lease
        with pool.acquire(SIZE):
            pass
        gc.collect()


def test_a_slot_whose_pool_lock_is_held_waits_for_the_janitor(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess
) -> None:
    """A dropped lease whose way back needs the pool's lock, while it is held, is queued."""
    lease = pool.acquire(pool.max_size + 1)
    with pool._conn.lock, pytest.warns(ResourceWarning):
        del lease
        gc.collect()
        assert len(buffer._dropped_slots) == 1  # not sent: the lock is held
    assert manager.stats()["oversize"]["leases"] == 1
    assert pool.tick()
    assert buffer._dropped_slots == []
    wait_for(lambda: manager.stats()["oversize"]["leases"] == 0)


# ------------------------------------------------------------ tracking


def test_tracking_is_off_by_default_and_costs_no_wrapper(pool: shmpool.Pool) -> None:
    assert pool._track is None
    if buffer.SPEEDUPS:
        assert type(pool.acquire).__name__ == "Acquirer"  # the C hot path, unwrapped
    else:
        assert pool.acquire.__func__ is shmpool.Pool.acquire  # type: ignore[attr-defined]
    with pytest.raises(shmpool.UsageError, match="track=True"):
        pool.held_leases()


def test_env_turns_tracking_on(
    manager: shmpool.ManagerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRACK_VAR, "1")
    with shmpool.connect(manager.address) as p:
        assert p._track is not None
    monkeypatch.setenv(TRACK_VAR, "0")
    with shmpool.connect(manager.address) as p:
        assert p._track is None


def test_held_leases_name_the_acquire(tracked: shmpool.Pool) -> None:
    first = _acquire_here(tracked)
    second = tracked.acquire(100)
    held = tracked.held_leases()
    assert [h["size"] for h in held] == [SIZE, 100]  # oldest first
    entry = held[0]
    assert entry["slot"] == f"{first._slot.ref.segment}:{first._slot.ref.index}"
    assert entry["capacity"] == 8192 and entry["age"] >= 0
    assert "test_leak_tracking.py" in entry["where"][0]
    assert entry["where"][0].endswith("in _acquire_here")
    assert entry["where"][1].endswith("in test_held_leases_name_the_acquire")
    assert tracked.held_leases(older_than=3600) == []
    first.release()
    assert [h["size"] for h in tracked.held_leases()] == [100]
    second.release()
    assert tracked.held_leases() == []


def test_tracked_acquire_still_hits_the_cache(tracked: shmpool.Pool) -> None:
    tracked.acquire(SIZE).release()
    hits = tracked.cache_hits
    with tracked.acquire(SIZE) as lease:
        assert lease.size == SIZE
    assert tracked.cache_hits == hits + 1
    with tracked.acquire(SIZE, timeout=1.0):  # the slow path's arguments pass through
        pass


def test_a_dropped_tracked_lease_says_where_it_was_acquired(tracked: shmpool.Pool) -> None:
    lease = _acquire_here(tracked)
    with pytest.warns(ResourceWarning, match=r"(?s)acquired at:\n  File .*test_leak_tracking"
                      r"\.py\", line \d+, in _acquire_here"):  # fmt: skip
        del lease
        gc.collect()
    assert tracked.held_leases() == []


def test_stats_lists_this_process_leases(tracked: shmpool.Pool) -> None:
    lease = _acquire_here(tracked)
    stats: dict[str, Any] = dict(tracked.stats(leases_older_than=0))
    section = stats["leases"]
    assert section["reporting_clients"] == 1
    (entry,) = section["held"]
    assert entry["client"] == tracked.client_id and entry["pid"] == os.getpid()
    assert entry["size"] == SIZE and entry["name"] == "tracked"
    assert entry["where"][0].endswith("in _acquire_here")
    assert "leases" not in tracked.stats()  # only when asked
    assert dict(tracked.stats(leases_older_than=3600))["leases"]["held"] == []
    lease.release()
    assert dict(tracked.stats(leases_older_than=0))["leases"]["held"] == []


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_stats_refuses_a_bad_age(tracked: shmpool.Pool, bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        tracked.stats(leases_older_than=bad)


# ------------------------------------------------- from another process

HOLDER = textwrap.dedent(
    """
    import sys
    import shmpool

    def take(pool):
        return pool.acquire(5000)

    pool = shmpool.connect(sys.argv[1], name="holder")
    lease = take(pool)
    print("ready", pool.client_id, flush=True)
    sys.stdin.readline()
    lease.release()
    pool.close()
    """
)


def _cli_leases(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmpool", "stats", "--leases", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=MP_TIMEOUT,
    )


def _held_by(address: str, client: int) -> list[dict[str, Any]]:
    done = _cli_leases(address, "--older-than", "0", "--json")
    assert done.returncode == 0, done.stderr
    return [e for e in json.loads(done.stdout)["leases"]["held"] if e["client"] == client]


def test_cli_lists_the_leases_another_process_holds(manager: shmpool.ManagerProcess) -> None:
    env = dict(os.environ, **{TRACK_VAR: "1"})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, manager.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        word, client = holder.stdout.readline().split()
        assert word == "ready"
        # Its janitor reports a lease once it is held a second (poll, with a deadline).
        (entry,) = wait_for(lambda: _held_by(manager.address, int(client)))
        assert entry["pid"] == holder.pid and entry["name"] == "holder"
        assert entry["size"] == SIZE and entry["age"] >= 1.0
        assert entry["where"][0] == "<string>:6 in take"
        text = _cli_leases(manager.address)
        assert text.returncode == 0, text.stderr
        assert "at <string>:6 in take" in text.stdout and str(holder.pid) in text.stdout
        assert _cli_leases(manager.address, "--older-than", "3600", "--json").returncode == 0
        assert not [
            e
            for e in json.loads(
                _cli_leases(manager.address, "--older-than", "3600", "--json").stdout
            )["leases"]["held"]
            if e["client"] == int(client)
        ]
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(MP_TIMEOUT) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        if holder.stdin is not None:
            holder.stdin.close()
    wait_for(lambda: not _held_by(manager.address, int(client)))  # gone with its connection


def test_cli_without_tracking_clients_says_how(manager: shmpool.ManagerProcess) -> None:
    done = _cli_leases(manager.address)
    assert done.returncode == 0, done.stderr
    assert "SHMPOOL_TRACK=1" in done.stdout


def test_cli_leases_refuses_other_formats(manager: shmpool.ManagerProcess) -> None:
    done = _cli_leases(manager.address, "--format", "prometheus")
    assert done.returncode == 2 and "--leases" in done.stderr


def _drop_in_a_worker(address: str, conn: Any) -> None:
    """Receive a lease, acquire one, drop both unreleased, give the cache back, report."""
    import warnings

    with shmpool.connect(address, name="dropper", track=True) as pool:
        got = conn.recv()  # handed over by the parent: unpickled into this pool
        text = bytes(got.view[:4])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine = _acquire_here(pool)
            del got, mine
            gc.collect()
        buffer.return_dropped()  # a slot queued while a lock was held (none here) goes too
        pool.trim()
        warned = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        conn.send((text, warned, pool.usage()["requested_bytes"]))
        conn.recv()  # the parent has seen every slot free while this pool is still open


def test_leases_dropped_in_a_worker_come_back_while_it_lives(
    pool: shmpool.Pool, manager: shmpool.ManagerProcess, mp_context: Any
) -> None:
    with piped_child(mp_context, _drop_in_a_worker, manager.address) as (ours, child):
        lease = pool.acquire(SIZE)
        lease.view[:4] = b"gift"
        ours.send(lease)  # pickling hands the slot over
        assert ours.poll(MP_TIMEOUT)
        text, warned, requested = ours.recv()
        assert text == b"gift" and requested == 0
        assert len(warned) == 2 and all("went back" in w for w in warned)
        (tracked,) = [w for w in warned if "acquired at" in w]
        assert "in _acquire_here" in tracked
        pool.trim()
        # The worker is alive and connected: its exit cannot be what freed the slots.
        wait_for(lambda: all_returned(manager.stats()))
        assert child.is_alive()
        ours.send(None)
        child.join(MP_TIMEOUT)
        assert child.exitcode == 0


# ------------------------------------------------------------ hostile reports


def _leases_frame(*items: Any) -> bytes:
    return msgpack.packb([protocol.Leases.TYPE, 2, *items])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "frame",
    [
        _leases_frame(1, [[1, 2, 3]]),  # short record
        _leases_frame(0, [[1, 2, 3, 4, []]]),  # more records than held
        _leases_frame(1, [[1, 2, 3, 4, ["x" * 500]]]),  # frame text too long
        _leases_frame(1, [[1, 2, 3, 4, ["a", "b", "c", "d", "e"]]]),  # too many frames
        _leases_frame(99, [[1, 2, 3, 4, []]] * 99),  # too many records
        _leases_frame(1, [[1, 2, 3, -4, []]]),  # negative age
        _leases_frame(1, [[1, 2, 3, 4, [7]]]),  # a frame that is not text
        _leases_frame("many", []),
        msgpack.packb([protocol.Stats.TYPE, 2, "old"]),  # Stats asking with a bad age
    ],
)
def test_a_bad_report_hurts_only_its_sender(
    manager: shmpool.ManagerProcess, tracked: shmpool.Pool, frame: bytes
) -> None:
    lease = tracked.acquire(SIZE)
    with RawClient(manager.address) as bad:
        bad.hello(name="bad")
        bad.send_raw(frame)
        seen = bad.expect_closed()
        assert [type(m) for m in seen] == [protocol.Error], seen
    section = dict(tracked.stats(leases_older_than=0))["leases"]
    assert [e["size"] for e in section["held"]] == [SIZE]  # the others go on
    lease.release()


def test_a_good_raw_report_is_listed_and_replaced(
    manager: shmpool.ManagerProcess, pool: shmpool.Pool
) -> None:
    with RawClient(manager.address) as raw:
        welcome = raw.hello(name="raw")
        record = protocol.LeaseRecord(1, 2, 3, 4000, ("f.py:1 in g",))
        raw.send_raw(protocol.encode(protocol.Leases(raw.next_req(), 5, (record,))))
        section = wait_for(lambda: dict(pool.stats(leases_older_than=3))["leases"]["held"])
        (entry,) = section
        assert entry["client"] == welcome.client_id and entry["slot"] == "1:2"
        assert entry["age"] >= 4.0 and entry["where"] == ["f.py:1 in g"]
        assert dict(pool.stats(leases_older_than=0))["leases"]["unreported"] == 4
        raw.send_raw(protocol.encode(protocol.Leases(raw.next_req(), 0, ())))
        wait_for(lambda: not dict(pool.stats(leases_older_than=0))["leases"]["held"])


def test_every_message_type_has_its_own_number() -> None:
    kinds = (*protocol.REQUESTS, *protocol.REPLIES)
    assert len({cls.TYPE for cls in kinds}) == len(kinds)
