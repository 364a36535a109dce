"""The C hot path (shmpool._speedups) and its pure-Python twin behave alike."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import MP_TIMEOUT

import shmpool
from shmpool import buffer

SCRIPT = textwrap.dedent(
    """
    import sys
    import shmpool
    from shmpool import buffer

    assert buffer.SPEEDUPS is (sys.argv[1] == "c"), buffer.SPEEDUPS
    with shmpool.start(min_size="4KiB", max_size="1MiB", memory="64MiB") as manager:
        with manager.connect() as pool:
            lease = pool.acquire(5000)
            assert isinstance(lease, shmpool.Lease)
            assert (len(lease.view), lease.capacity, lease.size) == (5000, 8192, 5000)
            lease.view[:3] = b"abc"
            view = lease.view
            lease.release()
            lease.release()
            assert lease.closed
            for use in (lambda: lease.view, lambda: len(lease)):
                try:
                    use()
                except shmpool.LeaseClosedError:
                    pass
                else:
                    raise AssertionError("use after release did not raise")
            try:
                view[0]
            except ValueError:
                pass
            else:
                raise AssertionError("the handed-out view was not released")
            for bad, error in ((True, TypeError), (0, ValueError), (1.5, TypeError)):
                try:
                    pool.acquire(bad)
                except error:
                    pass
                else:
                    raise AssertionError(f"acquire({bad!r}) did not raise")
            with pool.acquire(1) as one:
                assert len(one.view) == 1
            for _ in range(1000):
                pool.acquire(5000).release()
            leases = [pool.acquire(5000) for _ in range(50)]
            for held in leases:
                held.release()
            local = pool.stats()["local"]
            assert local["cache_hits"] + local["manager_acquires"] >= 1000, local
            assert local["cached"]["8192"] <= pool._caches[1].high, local
            big = pool.acquire(2 << 20)
            assert big.capacity >= 2 << 20
            big.release()
            assert pool.stats()["oversize"]["leases"] == 0
        try:
            pool.acquire(5000)
        except shmpool.PoolClosedError:
            pass
        else:
            raise AssertionError("a closed pool acquired")
    print("OK")
    """
)


@pytest.mark.skipif(bool(os.environ.get("SHMPOOL_NO_SPEEDUPS")), reason="disabled on purpose")
def test_the_c_hot_path_is_built() -> None:
    assert buffer.SPEEDUPS, "shmpool._speedups did not build: check the compiler and headers"
    assert isinstance(shmpool.Lease.__mro__[1], type)
    assert shmpool.Lease.__mro__[1].__module__ == "shmpool._speedups"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["c", "python"])
def test_both_implementations_behave_alike(impl: str, tmp_path: Path) -> None:
    if impl == "c" and not buffer.SPEEDUPS:
        pytest.skip("the C hot path is not built here")
    env = dict(os.environ)
    env.pop("SHMPOOL_NO_SPEEDUPS", None)
    if impl == "python":
        env["SHMPOOL_NO_SPEEDUPS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, impl],
        env=env,
        cwd=tmp_path,  # import the installed shmpool, not the source tree
        capture_output=True,
        text=True,
        timeout=MP_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "OK"


@pytest.mark.skipif(not buffer.SPEEDUPS, reason="the C hot path is not built here")
def test_c_and_python_seal_handle_tokens_alike() -> None:
    """``_speedups.seal_token`` (hand_off, take) is ``protocol.seal_token``, bit for bit."""
    import random

    from shmpool import protocol

    seal = buffer._speedups.seal_token
    rng = random.Random(1010)
    edges = [0, 1, (1 << 62) - 1, (1 << 63) - 1]
    for _ in range(20_000):
        capacity = 1 << rng.randrange(0, protocol.MAX_SHIFT + 1)
        fields = (
            rng.choice([*edges, rng.randrange(1 << 62), rng.randrange(1 << 63)]),
            rng.choice([0, capacity, rng.randrange(capacity + 1)]),
            rng.choice([capacity, rng.randrange(1, protocol.MAX_BUFFER + 1)]),
            rng.choice([0, 1, protocol.MAX_READERS, rng.randrange(protocol.MAX_READERS + 1)]),
        )
        assert seal(*fields) == protocol.seal_token(*fields), fields


@pytest.mark.skipif(not buffer.SPEEDUPS, reason="the C hot path is not built here")
def test_c_and_python_handoffs_read_each_others_handles() -> None:
    """A handle C's hand_off sealed attaches in Python, and one Python sealed is taken in C.

    Random lengths; the same handle with its length or capacity changed is
    refused by both (C's take declines it, and Python raises).
    """
    import random

    rng = random.Random(2020)
    with (
        shmpool.start(min_size="4KiB", max_size="1MiB", memory="16MiB") as manager,
        manager.connect() as pool,
    ):
        for _ in range(300):
            length = rng.randrange(1, 16 * 1024 + 1)
            lease = pool.acquire(length)
            lease.view[-1:] = b"x"
            sealed_in_c = rng.random() < 0.5
            # hand_off seals and Python's attach (_claim) unseals, or the other way round
            fields = lease.__reduce__()[1] if sealed_in_c else tuple(lease.detach())
            handle = shmpool.Handle(*fields)
            for forged in (
                handle._replace(length=handle.length + 1),
                handle._replace(length=handle.length - 1),
                handle._replace(capacity=handle.capacity * 2),
            ):
                assert pool._take(tuple(forged)) is None
                with pytest.raises(shmpool.StaleHandleError):
                    pool.attach(forged)
            got: Any = pool.attach(handle) if sealed_in_c else pool._take(tuple(handle))
            assert got is not None
            assert (len(got.view), got.view[-1:].tobytes()) == (length, b"x")
            got.release()
