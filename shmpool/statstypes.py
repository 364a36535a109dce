"""The shapes of the statistics: ``TypedDict``s for what ``stats()`` returns.

The manager builds its statistics as plain dicts (``Arena.stats`` and
``Manager.stats``), sends them to clients in msgpack, and ``Pool.stats()``
adds this process's numbers under ``"local"``. These classes name every key
of those dicts and its type, for type checkers and readers; at run time the
values are ordinary dicts. ``tests/test_errors_builtin.py`` compares the
keys of real statistics with these classes, so the two cannot drift apart:
a key added to the manager's statistics is added here too.

Every key is always present, except two of ``ManagerStats``:
``clients_omitted`` (only when more clients are connected than the manager
lists) and ``leases`` (only when asked for: ``stats(leases_older_than=...)``;
its shape is ``shmpool.leasereport``'s). What each key means is in the user
guide, under Statistics.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = [
    "ClassStats",
    "ClientStats",
    "LocalStats",
    "ManagerInfo",
    "ManagerStats",
    "OversizeStats",
    "PoolStats",
    "PoolUsage",
]


class ClassStats(TypedDict):
    """One size class, in ``ManagerStats["classes"]`` (smallest first)."""

    size: int
    segments: int
    total: int
    free: int
    leased: int
    in_transit: int
    committed_bytes: int
    leased_bytes: int
    requested_bytes: int


class OversizeStats(TypedDict):
    """The leases above ``max_size``, each in a segment of its own."""

    leases: int
    bytes: int
    requested_bytes: int


class ClientStats(TypedDict):
    """One client connection, in ``ManagerStats["clients"]``."""

    id: int
    pid: int
    name: str
    leased: int
    requested_bytes: int
    messages: int
    manager_acquires: int
    cache_hits: int


class ManagerInfo(TypedDict):
    """The manager itself: ``ManagerStats["manager"]``."""

    pid: int
    address: str
    version: int
    uptime: float
    connections: int
    quarantined: int
    queued_bytes: int
    throttled: int
    waiting: int


class _ManagerStatsKeys(TypedDict):
    classes: list[ClassStats]
    oversize: OversizeStats
    in_transit: int
    shared: int
    committed_bytes: int
    peak_committed_bytes: int
    leased_bytes: int
    requested_bytes: int
    mapped_bytes: int
    ticket_bytes: int
    memory_limit: int
    min_size: int
    max_size: int
    #: ``[2**k, count]`` pairs, smallest first, nonzero counts only.
    request_sizes: list[list[int]]
    clients: list[ClientStats]
    manager: ManagerInfo
    idle_release: float


class ManagerStats(_ManagerStatsKeys, total=False):
    """A manager's statistics (``Manager.stats()``, ``shmpool stats --json``)."""

    #: Only when more clients are connected than the manager lists.
    clients_omitted: int
    #: Only when asked for (``Pool.stats(leases_older_than=...)``): the leases held long.
    leases: dict[str, Any]


class LocalStats(TypedDict):
    """This process's own numbers: ``PoolStats["local"]``."""

    pid: int
    cache_hits: int
    manager_acquires: int
    messages: int
    #: A class's size, as a string such as ``"4096"`` -> its free slots cached here
    #: (non-empty classes only).
    cached: dict[str, int]


class PoolStats(ManagerStats):
    """What ``Pool.stats()`` returns: the manager's statistics plus ``"local"``."""

    local: LocalStats


class PoolUsage(TypedDict):
    """What ``Pool.usage()`` returns (nonzero entries only, keyed by ``k``)."""

    requested_bytes: int
    requested: dict[int, int]
    sizes: dict[int, int]
