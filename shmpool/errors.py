"""The exceptions shmpool raises.

Two families, as in h11: ``UsageError`` subclasses mean *you called it wrong*
(a released lease, a closed pool); ``ProtocolError`` means *the peer broke the
protocol* (garbage on the socket). Everything else names a condition a caller
may want to handle: the pool is full, the manager is gone, a handle is stale.
Errors cross the wire as a code and a message, never as a traceback; ``CODES``
maps each code to its class.

Three of them are also the built-in exception a caller would catch without
knowing shmpool: ``LeaseClosedError`` is a ``ValueError`` (as an operation on
a closed file is), ``ManagerGoneError`` a ``ConnectionError`` (so an
``OSError``), ``PoolExhaustedError`` a ``MemoryError``. Each still takes one
argument, its message: ``ManagerGoneError(errno, text)`` would make an
``OSError`` of another shape, so shmpool never builds one so.
"""

from __future__ import annotations

__all__ = [
    "CODES",
    "AccessDeniedError",
    "AddressNotSetError",
    "LeaseClosedError",
    "ManagerGoneError",
    "PoolClosedError",
    "PoolExhaustedError",
    "ProtocolError",
    "QuotaExceededError",
    "ShmpoolError",
    "StaleHandleError",
    "TooManyClientsError",
    "UsageError",
    "error_from_code",
]


class ShmpoolError(Exception):
    """Base class of every error shmpool raises on purpose."""

    code = "error"


class UsageError(ShmpoolError):
    """The caller used the API wrongly (a closed object, a foreign lease)."""

    code = "usage"


class LeaseClosedError(UsageError, ValueError):
    """The lease was released or detached; it can no longer be used (also a ``ValueError``)."""

    code = "lease_closed"


class PoolClosedError(UsageError):
    """The pool (client connection) was closed by this process."""

    code = "pool_closed"


class AddressNotSetError(UsageError):
    """No manager address is known to this process, so the default pool cannot connect."""

    code = "no_address"


class PoolExhaustedError(ShmpoolError, MemoryError):
    """No slot could be leased: the memory budget (or /dev/shm) is used up (a ``MemoryError``)."""

    code = "exhausted"


class QuotaExceededError(PoolExhaustedError):
    """This client already holds as much memory as the manager's per-client quota allows."""

    code = "quota"


class ManagerGoneError(ShmpoolError, ConnectionError):
    """The manager cannot be reached, stopped answering, or hung up (a ``ConnectionError``)."""

    code = "manager_gone"


class StaleHandleError(ShmpoolError):
    """A slot reference was refused: stale generation, unknown id, or not yours."""

    code = "stale"


class AccessDeniedError(ShmpoolError):
    """The manager refused this peer (another user, or a failed handshake)."""

    code = "denied"


class TooManyClientsError(AccessDeniedError):
    """The manager serves as many connections as it allows (in all, or for this user)."""

    code = "too_many_clients"


class ProtocolError(ShmpoolError):
    """The peer sent bytes that break the shmpool protocol."""

    code = "protocol"


CODES: dict[str, type[ShmpoolError]] = {
    cls.code: cls
    for cls in (
        ShmpoolError,
        UsageError,
        LeaseClosedError,
        PoolClosedError,
        AddressNotSetError,
        PoolExhaustedError,
        QuotaExceededError,
        ManagerGoneError,
        StaleHandleError,
        AccessDeniedError,
        TooManyClientsError,
        ProtocolError,
    )
}


def error_from_code(code: str, message: str) -> ShmpoolError:
    """Build the exception for an error reply received from the manager."""
    return CODES.get(code, ShmpoolError)(message)
