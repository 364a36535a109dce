"""Errors are also the built-ins callers catch; statistics have the keys their TypedDicts name."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pytest

import shmpool
from shmpool import metrics, statstypes
from shmpool.address import unique_address
from shmpool.errors import CODES, error_from_code

#: Each error that is also a built-in, and that built-in.
BUILTINS = {
    shmpool.LeaseClosedError: ValueError,
    shmpool.ManagerGoneError: ConnectionError,
    shmpool.PoolExhaustedError: MemoryError,
    shmpool.QuotaExceededError: MemoryError,  # a PoolExhaustedError
}


@pytest.mark.parametrize("cls", BUILTINS, ids=lambda cls: cls.__name__)
def test_each_error_is_its_builtin_with_its_message_unchanged(cls: type[Exception]) -> None:
    err = cls("the message")
    assert isinstance(err, BUILTINS[cls])
    assert isinstance(err, shmpool.ShmpoolError)
    assert str(err) == "the message"
    assert err.args == ("the message",)
    assert repr(err) == f"{cls.__name__}('the message')"
    again = pickle.loads(pickle.dumps(err))  # it crosses multiprocessing as it was
    assert type(again) is cls and str(again) == "the message"
    made = error_from_code(cls.code, "from the wire")  # type: ignore[attr-defined]
    assert type(made) is cls and isinstance(made, BUILTINS[cls])
    assert str(made) == "from the wire"


def test_manager_gone_is_an_oserror_without_an_errno() -> None:
    err = shmpool.ManagerGoneError("gone")
    assert isinstance(err, OSError)
    assert err.errno is None and err.strerror is None and err.filename is None


def test_the_other_errors_are_not_builtins_they_were_not() -> None:
    for cls in CODES.values():
        if cls in BUILTINS:
            continue
        for builtin in (ValueError, OSError, MemoryError):
            assert not issubclass(cls, builtin), (cls, builtin)


def test_raised_errors_are_caught_as_builtins(manager: shmpool.ManagerProcess) -> None:
    nowhere = unique_address()
    with pytest.raises(ConnectionError) as gone:
        shmpool.connect(nowhere)
    assert type(gone.value) is shmpool.ManagerGoneError
    assert str(gone.value).startswith(f"no shmpool manager listens at {nowhere}")
    with manager.connect() as pool:
        lease = pool.acquire(100)
        lease.release()
        with pytest.raises(ValueError) as closed:
            lease.view  # noqa: B018
        assert type(closed.value) is shmpool.LeaseClosedError
        assert str(closed.value) == "this lease was released; acquire a new one"
        with pytest.raises(MemoryError) as full:
            pool.acquire(128 << 20, timeout=0)  # the budget is 64 MiB
        assert isinstance(full.value, shmpool.PoolExhaustedError)


# ------------------------------------------------------------------ statistics


def keys_match(stats: Mapping[str, Any], typed: Any) -> None:
    """Every required key of ``typed`` is there, and nothing it does not name."""
    keys = set(stats)
    assert typed.__required_keys__ <= keys, typed.__required_keys__ - keys
    assert keys <= typed.__required_keys__ | typed.__optional_keys__, keys - set(
        typed.__annotations__
    )


def check_manager_stats(stats: Mapping[str, Any], typed: Any) -> None:
    keys_match(stats, typed)
    assert stats["classes"], "a manager has at least one class"
    for cls in stats["classes"]:
        keys_match(cls, statstypes.ClassStats)
    keys_match(stats["oversize"], statstypes.OversizeStats)
    keys_match(stats["manager"], statstypes.ManagerInfo)
    assert stats["clients"]
    for client in stats["clients"]:
        keys_match(client, statstypes.ClientStats)


def test_stats_have_the_keys_their_typeddicts_name(manager: shmpool.ManagerProcess) -> None:
    with manager.connect() as pool:
        leases = [pool.acquire(5000), pool.acquire(1 << 20)]
        stats = pool.stats()
        check_manager_stats(stats, statstypes.PoolStats)
        keys_match(stats["local"], statstypes.LocalStats)
        assert stats["local"]["cached"]  # the refill's batch: keys are sizes as strings
        keys_match(pool.usage(), statstypes.PoolUsage)
        check_manager_stats(manager.stats(), statstypes.PoolStats)
        asked = pool.stats(leases_older_than=0)  # the one optional key a client asks for
        check_manager_stats(asked, statstypes.PoolStats)
        assert "leases" in asked
        scraped = metrics.read_stats(manager.address)  # what `shmpool stats` and scrapes read
        check_manager_stats(scraped, statstypes.ManagerStats)
        assert "local" not in scraped
        for lease in leases:
            lease.release()


def test_the_cli_json_has_the_manager_stats_keys(manager: shmpool.ManagerProcess) -> None:
    with manager.connect() as pool, pool.acquire(5000):
        out = subprocess.run(
            [sys.executable, "-m", "shmpool", "stats", "--json", "--address", manager.address],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(shmpool.__file__))},
        )
    assert out.returncode == 0, out.stderr
    check_manager_stats(json.loads(out.stdout), statstypes.ManagerStats)


def test_the_typeddicts_are_exported_and_only_clients_omitted_is_optional() -> None:
    for name in statstypes.__all__:
        assert getattr(shmpool, name) is getattr(statstypes, name)
        assert name in shmpool.__all__
    assert statstypes.ManagerStats.__optional_keys__ == {"clients_omitted", "leases"}
    assert statstypes.PoolStats.__optional_keys__ == {"clients_omitted", "leases"}
    assert statstypes.PoolStats.__required_keys__ == (
        statstypes.ManagerStats.__required_keys__ | {"local"}
    )
