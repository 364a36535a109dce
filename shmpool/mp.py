"""multiprocessing workers that find the manager: ``shmpool.mp.initializer``.

A worker of ``multiprocessing.Pool`` or ``ProcessPoolExecutor`` needs the
manager's address before its first ``shmpool.get_pool()``. How it would
get one by itself depends on the start method: a fork child inherits the
parent's environment and pool; a spawn child inherits the environment as it
was at spawn time; a forkserver child inherits the environment the fork
server had when it started, which may predate ``shmpool.start()``. So the
address travels in ``initargs``, which every start method delivers, and the
initializer makes it the worker's default (and exports it as
``$SHMPOOL_ADDRESS``, for the worker's own children). The worker connects
on first use, not in the initializer: a worker that never touches a buffer
never costs the manager a connection.

    import shmpool.mp
    with ctx.Pool(4, **shmpool.mp.initializer_kwargs(manager.address)) as workers:
        ...                                  # tasks call shmpool.get_pool()
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .address import ENV_VAR
from .default import FIX, configured_address, set_default_address
from .errors import AddressNotSetError

__all__ = ["initializer", "initializer_kwargs"]


def initializer(address: str | None = None) -> None:
    """Run in each worker: ``shmpool.get_pool()`` there connects to ``address``.

    ``address`` None: the worker's ``$SHMPOOL_ADDRESS``, if it has one (else
    ``get_pool()`` raises ``AddressNotSetError`` when first called). Use as
    ``initializer=shmpool.mp.initializer, initargs=(manager.address,)``.

    Raises:
        ValueError: the path is longer than a socket address may be.
    """
    if address is None:
        address = os.environ.get(ENV_VAR) or None
    if address is not None:
        set_default_address(address)


def initializer_kwargs(
    address: str | os.PathLike[str] | None = None,
    *,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """``initializer`` and ``initargs`` for ``multiprocessing.Pool``/``ProcessPoolExecutor``.

    ``address`` None: this process's default (``set_default_address()``,
    else ``$SHMPOOL_ADDRESS``), looked up now, in the parent. Your own
    ``initializer(*initargs)``, if given, runs in each worker after shmpool's.

    Raises:
        AddressNotSetError: no address was given and none is set here.
    """
    if address is None:
        address = configured_address()
        if address is None:
            raise AddressNotSetError(f"no shmpool manager address to give the workers: {FIX}")
    path = os.fspath(address)
    if initializer is None:
        return {"initializer": _initialize, "initargs": (path,)}
    return {"initializer": _initialize_then, "initargs": (path, initializer, initargs)}


# Module-level (and so picklable) for spawn and forkserver; the public
# ``initializer`` is shadowed by the keyword argument in ``initializer_kwargs``.
_initialize = initializer


def _initialize_then(address: str, then: Callable[..., object], then_args: tuple[Any, ...]) -> None:
    initializer(address)
    then(*then_args)
