"""shmpool: recycle byte buffers across processes.

One manager process owns POSIX shared-memory segments carved into
power-of-two size classes and leases slots to worker processes over a Unix
socket; workers write through a memoryview and give the slot back.

    with shmpool.start(memory="1GiB") as manager:
        pool = manager.connect()
        with pool.acquire(100_000) as lease:
            lease.view[:5] = b"hello"
"""

from . import mp as mp  # shmpool.mp.initializer works after a plain `import shmpool`
from .address import ENV_VAR
from .buffer import Lease
from .client import Pool, connect
from .default import get_pool, set_default_address
from .embedded import ManagerProcess, start
from .errors import (
    AccessDeniedError,
    AddressNotSetError,
    LeaseClosedError,
    ManagerGoneError,
    PoolClosedError,
    PoolExhaustedError,
    ProtocolError,
    QuotaExceededError,
    ShmpoolError,
    StaleHandleError,
    TooManyClientsError,
    UsageError,
)
from .handle import Handle
from .manager import Manager
from .registry import rebuild_buffer, rebuild_lease
from .report import format_stats
from .sharedbuffer import SharedBuffer
from .sizeclass import parse_size
from .statstypes import (
    ClassStats,
    ClientStats,
    LocalStats,
    ManagerInfo,
    ManagerStats,
    OversizeStats,
    PoolStats,
    PoolUsage,
)

__version__ = "0.1.0"

#: The name pickles of leases used before ``rebuild_lease`` (they still load).
_attach_anywhere = rebuild_lease

__all__ = [
    "ENV_VAR",
    "AccessDeniedError",
    "AddressNotSetError",
    "ClassStats",
    "ClientStats",
    "Handle",
    "Lease",
    "LeaseClosedError",
    "LocalStats",
    "Manager",
    "ManagerGoneError",
    "ManagerInfo",
    "ManagerProcess",
    "ManagerStats",
    "OversizeStats",
    "Pool",
    "PoolClosedError",
    "PoolExhaustedError",
    "PoolStats",
    "PoolUsage",
    "ProtocolError",
    "QuotaExceededError",
    "SharedBuffer",
    "ShmpoolError",
    "StaleHandleError",
    "TooManyClientsError",
    "UsageError",
    "__version__",
    "connect",
    "format_stats",
    "get_pool",
    "parse_size",
    "rebuild_buffer",
    "rebuild_lease",
    "set_default_address",
    "start",
]
