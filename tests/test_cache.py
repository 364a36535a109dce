"""The per-process slot cache: batches, the high-water mark, trim, recall and idleness.

Worker functions live at module level so that spawn and forkserver children
can import them; the manager's address is always passed explicitly.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from typing import Any

import pytest
from conftest import MP_TIMEOUT, all_returned, assert_balanced, client_entries, wait_for

import shmpool
from shmpool.client import HOT_INTERVAL
from shmpool.protocol import MAX_BATCH

#: The starvation manager: one 64 KiB class and a budget of exactly 16 slots.
SLOT = 64 << 10
STARVED = {"min_size": "64KiB", "max_size": "64KiB", "memory": "1MiB"}
STARVED_SLOTS = 16


# ------------------------------------------------------------------ helpers


def _index(pool: shmpool.Pool, size: int) -> int:
    return max(0, (size - 1).bit_length() - (pool.min_size.bit_length() - 1))


def _entry(stats: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in stats["clients"] if c["name"] == name]
    assert len(found) == 1, stats["clients"]
    return found[0]


def _class(stats: dict[str, Any], size: int) -> dict[str, Any]:
    return next(c for c in stats["classes"] if c["size"] == size)


def _cached(stats: dict[str, Any]) -> int:
    return sum(stats["local"]["cached"].values())


def _pattern(tag: str, n: int) -> bytes:
    unit = tag.encode()
    return (unit * (n // len(unit) + 1))[:n]


# ------------------------------------------------------- worker processes


def caching_worker(address, count, hold, ready, orders, results, finish) -> None:
    """Process A of the starvation tests.

    Acquires ``count`` 64 KiB leases; keeps them live (``hold``) or releases
    them into its cache. Reports, sets ``ready`` and sits idle (an idle
    timeout far beyond the test, so only a recall can take its cache) until
    told how many leases to take next; takes them, checks them, reports, and
    waits for ``finish``.
    """
    try:
        with shmpool.Pool(address, name="A", idle_timeout=600) as pool:
            leases = [pool.acquire(SLOT) for _ in range(count)]
            for k, lease in enumerate(leases):
                lease.view[:] = _pattern(f"A{k}|", SLOT)
            if not hold:
                for lease in leases:
                    lease.release()
                leases = []
            stats = pool.stats()
            mine = client_entries(stats, os.getpid())
            results.put(
                {
                    "phase": "ready",
                    "pid": os.getpid(),
                    "live": len(leases),
                    "cached": _cached(stats),
                    "leased": mine[0]["leased"] if len(mine) == 1 else -1,
                }
            )
            ready.set()
            work = orders.get(timeout=MP_TIMEOUT)  # idle here: only the janitor runs
            for lease in leases:
                lease.release()
            taken = [pool.acquire(SLOT) for _ in range(work)]
            for k, lease in enumerate(taken):
                lease.view[:] = _pattern(f"A-work{k}|", SLOT)
            ok = all(
                bytes(lease.view) == _pattern(f"A-work{k}|", SLOT) for k, lease in enumerate(taken)
            )
            distinct = len({tuple(lease._slot.ref[:2]) for lease in taken})
            for lease in taken:
                lease.release()
            results.put({"phase": "worked", "acquired": len(taken), "distinct": distinct, "ok": ok})
            finish.wait(MP_TIMEOUT)
    except BaseException as exc:
        results.put({"phase": "error", "error": repr(exc)})
        raise


def full_cache_worker(address, count, results, never) -> None:
    """Fill a cache (``count`` leases taken at once, then all released), report, wait."""
    pool = shmpool.Pool(address, name="full-cache", idle_timeout=None)
    leases = [pool.acquire(4096) for _ in range(count)]
    for lease in leases:
        lease.release()
    stats = pool.stats()
    results.put({"pid": os.getpid(), "cached": _cached(stats)})
    never.wait(MP_TIMEOUT)  # never set: the test kills us first
    pool.close()


def _start_a(ctx, address: str, count: int, hold: bool) -> tuple[Any, ...]:
    ready, finish = ctx.Event(), ctx.Event()
    orders, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(
        target=caching_worker, args=(address, count, hold, ready, orders, results, finish)
    )
    proc.start()
    info = results.get(timeout=MP_TIMEOUT)
    assert info["phase"] == "ready", info
    assert ready.wait(MP_TIMEOUT), "process A did not signal ready"
    return proc, orders, results, finish, info


def _stop_a(proc: Any, finish: Any, orders: Any, results: Any) -> None:
    finish.set()
    proc.join(MP_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join()
    orders.close()
    results.close()
    orders.join_thread()
    results.join_thread()


# ------------------------------------------------------------------ batches


@pytest.mark.timeout(60)
def test_first_refill_brings_one_batch(manager: shmpool.ManagerProcess) -> None:
    with shmpool.Pool(manager.address, name="first", idle_timeout=None) as pool:
        i = _index(pool, 4096)
        batch = pool._batch[i]
        assert batch == min(4, pool._max_batch[i])
        before = pool.messages
        lease = pool.acquire(4096)
        assert pool.messages - before == 1
        assert pool.manager_acquires == batch
        assert len(pool._caches[i]) == batch - 1
        lease.release()
        stats = pool.stats()
        assert stats["local"]["cached"] == {"4096": batch}
        assert _entry(stats, "first")["leased"] == batch


@pytest.mark.timeout(60)
def test_steady_loop_sends_no_message(manager: shmpool.ManagerProcess) -> None:
    with shmpool.Pool(manager.address, name="steady", idle_timeout=None) as pool:
        pool.acquire(4096).release()
        before, acquires = pool.messages, pool.manager_acquires
        for _ in range(5000):
            with pool.acquire(3000) as lease:
                lease.view[0] = 7
        assert pool.messages == before
        assert pool.manager_acquires == acquires


@pytest.fixture
def big_manager() -> Any:
    """A manager with room for several full caches of large classes (untouched pages)."""
    with shmpool.start(memory="2GiB") as mgr:
        yield mgr


def _fill_past_high(pool: shmpool.Pool, size: int) -> list[shmpool.Lease]:
    """Hold enough leases that releasing them all takes the cache past its mark."""
    cache = pool._caches[_index(pool, size)]
    leases = [pool.acquire(size)]
    while len(leases) + len(cache) <= cache.high + pool._batch[cache.cls]:
        leases.append(pool.acquire(size))
    return leases


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [4096, 1 << 20, 4 << 20])
def test_hot_refills_double_the_batch_up_to_its_cap(
    big_manager: shmpool.ManagerProcess, size: int
) -> None:
    with shmpool.Pool(big_manager.address, name="hot", idle_timeout=None) as pool:
        i = _index(pool, size)
        cap = pool._max_batch[i]
        assert 1 <= cap <= 256
        grants: list[int] = []
        batches: list[int] = []  # the batch after each refill
        leases = []
        last = pool.manager_acquires
        while batches[-2:] != [cap, cap] and len(grants) < 20:
            misses = pool._misses
            leases.append(pool.acquire(size))
            if pool._misses != misses:
                batches.append(pool._batch[i])
            if pool.manager_acquires != last:
                grants.append(pool.manager_acquires - last)
                last = pool.manager_acquires
            assert pool._batch[i] <= cap
            assert pool._caches[i].high == 2 * pool._batch[i]
        first = pool._first_batch[i]
        assert first == max(1, min(4, (256 << 10) // size, cap))  # 4 slots, 256 KiB at most
        assert grants[0] == first
        assert all(g <= cap for g in grants), grants
        # Each hot refill doubles the batch, up to the cap, where it stays. (A
        # grant may bring fewer: the first hot refill also asks for the next
        # batch ahead, and the manager grants the free slots a segment has
        # left before it makes a new one.)
        assert batches[0] == first
        for prev, nxt in itertools.pairwise(batches):
            assert nxt == min(2 * prev, cap), batches
        assert batches[-2:] == [cap, cap], batches  # it reached the cap and stayed there
        assert grants[-1] == cap, grants

        # A refill more than HOT_INTERVAL after the previous one keeps the batch.
        for lease in leases:
            lease.release()
        pool.trim()
        pool._batch[i] = first
        pool._caches[i].high = 2 * pool._batch[i]
        pool._last_batch[i] = time.monotonic() - 2 * HOT_INTERVAL
        before = pool.manager_acquires
        pool.acquire(size).release()
        assert pool.manager_acquires - before == first
        assert pool._batch[i] == first


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [4096, 1 << 20])
def test_a_hot_refill_takes_the_batch_asked_ahead(
    big_manager: shmpool.ManagerProcess, size: int
) -> None:
    """A hot class asks for its next batch ahead; the refill after takes it without waiting.

    That refill sends one message (the next prefetch), not an Acquire to
    wait for as well; and whatever answered, stats then count every slot.
    """
    with shmpool.Pool(big_manager.address, name="ahead", idle_timeout=None) as pool:
        i = _index(pool, size)
        leases = []
        while not pool._conn.prefetching:
            leases.append(pool.acquire(size))
        ((req, cls),) = pool._conn.prefetching.items()
        assert cls == i
        while pool._caches[i]:
            leases.append(pool.acquire(size))
        messages, acquired = pool.messages, pool.manager_acquires
        leases.append(pool.acquire(size))  # the cache was empty: a refill
        assert pool.messages == messages + 1  # the next prefetch; the answer was waiting
        assert pool.manager_acquires > acquired
        assert req not in pool._conn.prefetching
        assert list(pool._conn.prefetching.values()) == [i]
        stats = pool.stats()  # its answer comes before the reply to this
        assert not pool._conn.prefetching
        assert _entry(stats, "ahead")["leased"] == len(leases) + len(pool._caches[i])
        for lease in leases:
            lease.release()
        assert_balanced(pool.stats())


def _acquire_in_child(pool: shmpool.Pool, size: int, out: Any) -> None:
    lease = pool.acquire(size)  # the first use after the fork: a connection of its own
    lease.view[:4] = b"mine"
    out.put((bytes(lease.view[:4]), list(pool._conn.prefetching.values()), os.getpid()))
    lease.release()
    pool.close()


@pytest.mark.timeout(60)
def test_a_fork_with_a_prefetch_in_flight(manager: shmpool.ManagerProcess) -> None:
    """The answer to the parent's prefetch is the parent's alone.

    The child starts from an empty cache on its own connection; the parent
    still takes its answer at its next refill, without asking again.
    """
    size = 4096
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    with shmpool.Pool(manager.address, name="parent", idle_timeout=None) as pool:
        i = _index(pool, size)
        leases = []
        while not pool._conn.prefetching:
            leases.append(pool.acquire(size))
        child = ctx.Process(target=_acquire_in_child, args=(pool, size, out))
        child.start()
        data, prefetching, pid = out.get(timeout=MP_TIMEOUT)
        child.join(MP_TIMEOUT)
        assert child.exitcode == 0
        assert data == b"mine"
        assert prefetching == []  # the parent's was dropped; its own first refill is cold
        assert pid != os.getpid()

        while pool._caches[i]:
            leases.append(pool.acquire(size))
        messages = pool.messages
        leases.append(pool.acquire(size))
        assert pool.messages == messages + 1  # the answer was waiting: only the next prefetch
        for lease in leases:
            lease.release()
        wait_for(lambda: [c["name"] for c in pool.stats()["clients"]] == ["parent"])
        assert_balanced(pool.stats())  # the child's connection is gone, and all it held


# --------------------------------------------------------- high-water mark


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [4096, 64 << 10, 512 << 10])
def test_release_past_high_water_returns_surplus(
    big_manager: shmpool.ManagerProcess, size: int
) -> None:
    with shmpool.Pool(big_manager.address, name="hw", idle_timeout=None) as pool:
        i = _index(pool, size)
        leases = _fill_past_high(pool, size)
        before = pool.stats()
        assert _entry(before, "hw")["leased"] == len(leases) + len(pool._caches[i])
        assert_balanced(before)
        for lease in leases:
            lease.release()
        after = pool.stats()
        cache = pool._caches[i]
        assert len(cache) <= cache.high
        assert len(cache) >= pool._batch[i]  # it keeps one batch
        assert after["local"]["cached"] == {str(size): len(cache)}
        returned = _entry(before, "hw")["leased"] - _entry(after, "hw")["leased"]
        assert returned > 0
        assert _entry(after, "hw")["leased"] == len(cache)  # no live lease: all cached
        assert _class(after, size)["free"] - _class(before, size)["free"] == returned
        assert_balanced(after)


def _below_max_batch(pool: shmpool.Pool) -> int:
    """The smallest class whose largest batch is below MAX_BATCH."""
    i = next(i for i, cap in enumerate(pool._max_batch) if cap < MAX_BATCH)
    return 1 << (pool.min_size.bit_length() - 1 + i)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("at_max_batch", [False, True])
def test_each_high_water_crossing_sends_one_message(
    big_manager: shmpool.ManagerProcess, at_max_batch: bool
) -> None:
    with shmpool.Pool(big_manager.address, name="hw1", idle_timeout=None) as pool:
        size = 4096 if at_max_batch else _below_max_batch(pool)
        i = _index(pool, size)
        assert (pool._max_batch[i] == MAX_BATCH) == at_max_batch
        leases = _fill_past_high(pool, size)
        assert pool._batch[i] == pool._max_batch[i]
        sends = []
        while leases:
            before = pool.messages
            leases.pop(0).release()
            if pool.messages != before:
                sends.append(pool.messages - before)
        assert len(pool._caches[i]) <= pool._caches[i].high
    # Checked after the pool closed, so a failure keeps no slot mapped.
    assert sends, "no release crossed the high-water mark"
    assert sends == [1] * len(sends), sends


# ------------------------------------------------------------------- trim


@pytest.mark.timeout(60)
def test_trim_returns_every_cached_slot(manager: shmpool.ManagerProcess) -> None:
    with shmpool.Pool(manager.address, name="trim", idle_timeout=None) as pool:
        before = pool.messages
        assert pool.trim() == 0  # nothing cached: nothing sent
        assert pool.messages == before
        live = [pool.acquire(4096), pool.acquire(70_000)]
        for _ in range(50):
            pool.acquire(4096).release()
            pool.acquire(5000).release()
        stats = pool.stats()
        cached = _cached(stats)
        assert cached > 0
        assert _entry(stats, "trim")["leased"] == cached + len(live)
        assert pool.trim() == cached
        stats = pool.stats()
        assert stats["local"]["cached"] == {}
        assert _entry(stats, "trim")["leased"] == len(live)  # live leases are not touched
        for lease in live:
            lease.view[:] = b"x" * len(lease.view)
            lease.release()
        assert pool.trim() == len(live)
        stats = pool.stats()
        assert _entry(stats, "trim")["leased"] == 0
        assert all_returned(stats)
        assert_balanced(stats)
        # The cache refills on the next acquire.
        before = pool.manager_acquires
        pool.acquire(4096).release()
        assert pool.manager_acquires > before


# ---------------------------------------------------------------- counters


@pytest.mark.timeout(60)
def test_counters_match_what_was_done(manager: shmpool.ManagerProcess) -> None:
    pairs = 5000
    with shmpool.Pool(manager.address, name="count", idle_timeout=None) as pool:
        hello = pool.messages
        assert hello == 1  # the handshake
        for _ in range(pairs):
            pool.acquire(4096).release()
        assert pool.cache_hits == pairs - 1
        assert pool.manager_acquires == 4
        assert pool.messages == hello + 1  # one Acquire
        assert pool.trim() == 4  # one Return, carrying the hit count
        stats = pool.stats()  # one Stats
        local = stats["local"]
        assert local["cache_hits"] == pairs - 1
        assert local["manager_acquires"] == 4
        assert local["messages"] == hello + 3
        assert local["pid"] == os.getpid()
        assert local["cached"] == {}
        mine = _entry(stats, "count")
        assert mine["pid"] == os.getpid()
        assert mine["manager_acquires"] == 4
        assert mine["cache_hits"] == pairs - 1  # piggybacked on the Return
        assert mine["messages"] == 3  # Acquire, Return, Stats (Hello is not counted)
        assert mine["leased"] == 0


@pytest.mark.timeout(60)
def test_steady_loop_pairs_per_message(manager: shmpool.ManagerProcess) -> None:
    with shmpool.Pool(manager.address, name="ppm", idle_timeout=None) as pool:
        before_msgs = pool.messages
        before_hits = pool.cache_hits
        pairs = 0
        for i in range(3000):  # bursts of 1..16 leases held at once, two sizes
            depth = 1 + (i * 7) % 16
            held = [pool.acquire(4096 if k % 3 else 20_000) for k in range(depth)]
            for lease in held:
                lease.release()
            pairs += depth
        messages = pool.messages - before_msgs
        assert messages >= 1  # the first refills
        assert pairs / messages >= 32, (pairs, messages)
        assert pool.cache_hits - before_hits >= pairs - pool.manager_acquires
        pool.stats()  # a prefetch answered meanwhile lands (and a surplus goes back) first
        stats = pool.stats()
        mine = _entry(stats, "ppm")
        assert mine["manager_acquires"] == pool.manager_acquires
        assert mine["messages"] == pool.messages - 1
        assert mine["leased"] == _cached(stats)
        assert_balanced(stats)


# --------------------------------------------------------- recall (starved)


@pytest.mark.timeout(120)
def test_recall_frees_idle_cache_of_another_process(mp_context) -> None:
    with shmpool.start(acquire_wait=10.0, **STARVED) as mgr:
        proc, orders, results, finish, info = _start_a(mp_context, mgr.address, 14, False)
        try:
            assert info["live"] == 0
            assert info["cached"] >= STARVED_SLOTS // 2  # most of the budget, all idle
            assert info["leased"] == info["cached"]
            with shmpool.Pool(mgr.address, name="B", idle_timeout=None) as pool:
                stats = pool.stats()
                need = 8
                assert _class(stats, SLOT)["free"] < need
                assert _class(stats, SLOT)["total"] == STARVED_SLOTS
                leases = [pool.acquire(SLOT) for _ in range(need)]  # succeeds by recall
                for k, lease in enumerate(leases):
                    lease.view[:] = _pattern(f"B{k}|", SLOT)
                stats = pool.stats()
                assert_balanced(stats)
                assert client_entries(stats, info["pid"])[0]["leased"] < info["cached"]
                mine = _entry(stats, "B")
                b_cached = _cached(stats)
                assert mine["leased"] == need + b_cached
                assert b_cached >= 1
                free = _class(stats, SLOT)["free"]

                # A keeps working, and needs slots that only B's idle cache holds:
                # the recall now goes the other way, answered by B's janitor.
                orders.put(free + b_cached)
                done = results.get(timeout=MP_TIMEOUT)
                assert done["phase"] == "worked", done
                assert done["acquired"] == free + b_cached
                assert done["distinct"] == free + b_cached
                assert done["ok"]
                for k, lease in enumerate(leases):  # A never got B's live slots
                    assert bytes(lease.view) == _pattern(f"B{k}|", SLOT)
                    lease.release()
                assert_balanced(pool.stats())
        finally:
            _stop_a(proc, finish, orders, results)
        assert proc.exitcode == 0
        wait_for(lambda: all_returned(mgr.stats()))
        assert_balanced(mgr.stats())


@pytest.mark.timeout(120)
def test_live_leases_are_not_recalled(mp_context) -> None:
    with shmpool.start(acquire_wait=0.5, **STARVED) as mgr:
        proc, orders, results, finish, info = _start_a(mp_context, mgr.address, STARVED_SLOTS, True)
        try:
            assert info["live"] == STARVED_SLOTS
            assert info["leased"] == STARVED_SLOTS
            assert info["cached"] == 0
            with shmpool.Pool(mgr.address, name="B", idle_timeout=None) as pool:
                assert _class(pool.stats(), SLOT)["free"] == 0
                with pytest.raises(shmpool.PoolExhaustedError):
                    pool.acquire(SLOT)
                stats = pool.stats()  # the pool is still usable
                assert client_entries(stats, info["pid"])[0]["leased"] == STARVED_SLOTS
                assert _entry(stats, "B")["leased"] == 0
                assert_balanced(stats)

                # A releases its leases into its cache, works a little, then idles:
                # now a recall does free them.
                orders.put(4)
                done = results.get(timeout=MP_TIMEOUT)
                assert done["phase"] == "worked", done
                assert done["ok"]
                with pool.acquire(SLOT) as lease:
                    lease.view[:] = b"b" * SLOT
                assert_balanced(pool.stats())
        finally:
            _stop_a(proc, finish, orders, results)
        assert proc.exitcode == 0


# -------------------------------------------------------------- idleness


@pytest.mark.timeout(60)
def test_idle_cache_goes_back_by_itself(manager: shmpool.ManagerProcess) -> None:
    with (
        shmpool.Pool(manager.address, name="observer", idle_timeout=None) as observer,
        shmpool.Pool(manager.address, name="keeper", idle_timeout=None) as keeper,
        shmpool.Pool(manager.address, name="idle", idle_timeout=0.3) as idle,
    ):
        keeper.acquire(4096).release()
        # Busy for longer than the idle timeout: nothing goes back meanwhile.
        idle.acquire(4096).release()
        before = idle.messages
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            idle.acquire(4096).release()
        assert idle.messages == before

        wait_for(lambda: _entry(observer.stats(), "idle")["leased"] == 0, timeout=10)
        stats = observer.stats()
        assert _entry(stats, "keeper")["leased"] == 4  # no idle timeout: kept
        assert_balanced(stats)
        assert idle.messages > before  # the janitor sent the Return

        # The next acquire refills with a first-size batch.
        acquires = idle.manager_acquires
        idle.acquire(4096).release()
        assert idle.manager_acquires - acquires == 4


def test_handoffs_go_round_without_the_manager(manager: shmpool.ManagerProcess) -> None:
    """A lent slot goes back to its lender by its ticket word: no message at all.

    The consumer only attaches and releases: it sends nothing and keeps
    nothing. The producer takes its slots back when its cache runs dry, so
    after the first batches it asks the manager for nothing more.
    """
    size = 64 << 10
    with (
        shmpool.Pool(manager.address, name="producer", idle_timeout=None) as producer,
        shmpool.Pool(manager.address, name="consumer", idle_timeout=0.3) as consumer,
    ):
        if not producer._conn.tickets_on:
            pytest.skip("lending needs the C extension")
        i = _index(consumer, size)
        consumer.attach(producer.acquire(size).detach()).release()  # maps the segment
        for _ in range(200):  # the producer's batches grow to their steady size
            consumer.attach(producer.acquire(size).detach()).release()
        sent, granted = consumer.messages, producer.manager_acquires
        producer_sent = producer.messages
        for _ in range(5000):
            lease = producer.acquire(size)
            lease.view[0] = 7
            got = consumer.attach(lease.detach())
            assert got.view[0] == 7
            got.release()
        assert consumer.messages == sent  # not a notice, not a return
        assert not consumer._caches[i]  # every slot went back to its lender
        assert producer.manager_acquires == granted  # its own slots came back
        assert producer.messages == producer_sent
        stats = producer.stats()
        assert_balanced(stats)
        assert stats["in_transit"] == 0


# ------------------------------------------------------------ crash


@pytest.mark.timeout(120)
def test_killed_process_full_cache_comes_back(manager: shmpool.ManagerProcess, mp_context) -> None:
    results, never = mp_context.Queue(), mp_context.Event()
    proc = mp_context.Process(target=full_cache_worker, args=(manager.address, 64, results, never))
    proc.start()
    try:
        info = results.get(timeout=MP_TIMEOUT)
        assert info["cached"] >= 64  # every slot it took is cached, none is live
        stats = manager.stats()
        mine = client_entries(stats, info["pid"])
        assert len(mine) == 1
        assert mine[0]["leased"] == info["cached"]
        assert _class(stats, 4096)["free"] < _class(stats, 4096)["total"]
        os.kill(info["pid"], signal.SIGKILL)
        proc.join(MP_TIMEOUT)
        assert proc.exitcode == -signal.SIGKILL
        wait_for(lambda: not client_entries(manager.stats(), info["pid"]))
        stats = manager.stats()
        assert all_returned(stats)
        assert_balanced(stats)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        results.close()
        results.join_thread()
