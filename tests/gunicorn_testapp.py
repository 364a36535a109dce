"""The WSGI app tests/test_gunicorn.py serves with gunicorn (JSON answers, small bodies).

With ``SHMPOOL_TESTAPP_EAGER=1`` it calls ``shmpool.get_pool()`` when it is
imported, as an app that connects at module level does: with ``--preload``
that happens in the gunicorn master, before ``on_starting``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import shmpool

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

#: Leases ``/hold`` keeps until the process dies.
_held: list[shmpool.Lease] = []

if os.environ.get("SHMPOOL_TESTAPP_EAGER") == "1":
    shmpool.get_pool()


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ.get("PATH_INFO", "/")
    try:
        if path == "/big":
            answer = big(int(query.get("size", "100000")))
        elif path == "/hold":
            answer = hold(int(query.get("n", "4")), int(query.get("size", "50000")))
        elif path == "/pid":
            answer = {"pid": os.getpid(), "address": shmpool.get_pool().address}
        else:
            return _reply(start_response, "404 Not Found", {"error": path})
    except shmpool.ShmpoolError as exc:
        error = {"error": type(exc).__name__, "message": str(exc)}
        return _reply(start_response, "503 Service Unavailable", error)
    return _reply(start_response, "200 OK", answer)


def big(size: int) -> dict[str, Any]:
    """Fill a lease with a pattern of this worker and checksum it."""
    with shmpool.get_pool().acquire(size) as lease:
        lease.view[:] = bytes([os.getpid() % 251]) * size
        return {"pid": os.getpid(), "crc32": zlib.crc32(lease.view), "size": size}


def hold(n: int, size: int) -> dict[str, Any]:
    """Take ``n`` leases and keep them: they go back only when this worker dies."""
    pool = shmpool.get_pool()
    _held.extend(pool.acquire(size) for _ in range(n))
    return {"pid": os.getpid(), "held": len(_held)}


def _reply(start_response: StartResponse, status: str, value: object) -> list[bytes]:
    body = json.dumps(value).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
