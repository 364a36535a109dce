"""A WSGI app that builds its responses in shmpool buffers, served by gunicorn.

Run, from the repository root (``pip install gunicorn`` first):

    gunicorn -c examples/gunicorn.conf.py

then, in another terminal:

    curl -s 'http://127.0.0.1:8000/report?size=1000000' | tail -c 60
    head -c 5000000 /dev/urandom | curl -s --data-binary @- http://127.0.0.1:8000/checksum
    curl -s http://127.0.0.1:8000/stats

``/report`` writes a large text body into a leased buffer and streams it
from there; the buffer goes back to this worker's cache when gunicorn
closes the response. ``/checksum`` reads the request body into a buffer and
hands the buffer, not its bytes, to a background process of this worker (a
``multiprocessing`` pool started with ``shmpool.mp.initializer_kwargs()``),
which checksums it and gives it back. ``/stats`` shows the manager's books.
``/report-bytes`` and ``/checksum-bytes`` do the same without shmpool (a
``bytearray``, and ``bytes`` pickled to the background process), for
``python -m shmpool.bench_gunicorn`` to compare.

The app never says where the manager is: the config file's hooks start one
in the gunicorn master, and ``shmpool.get_pool()`` connects each worker on
first use.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import shmpool
import shmpool.mp

#: The largest body either endpoint takes or makes.
MAX_BODY = 16 << 20
#: Bytes per chunk of a streamed response.
CHUNK = 256 << 10

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class LeaseBody:
    """A response body streamed from a lease, which goes back when gunicorn closes it."""

    def __init__(self, lease: shmpool.Lease) -> None:
        self.lease = lease

    def __iter__(self) -> Iterator[bytes]:
        # A chunk at a time, as bytes: gunicorn's Response.write refuses anything
        # but bytes (PEP 3333), so neither [lease] nor memoryview chunks will do,
        # and sendfile from shared memory is not safe (docs/guide.md, "Sending a
        # lease as an HTTP response").
        view = self.lease.view
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])

    def close(self) -> None:  # WSGI calls it when the response is done, or abandoned
        self.lease.release()


def report(size: int) -> LeaseBody:
    """``size`` bytes of numbered lines, written straight into a leased buffer."""
    lease = shmpool.get_pool().acquire(size)
    try:
        view, pos, line = lease.view, 0, 0
        while pos < size:
            text = f"line {line:08d} of a report built in shared memory\n".encode()[: size - pos]
            view[pos : pos + len(text)] = text
            pos += len(text)
            line += 1
    except BaseException:
        lease.release()
        raise
    return LeaseBody(lease)


def report_bytes(size: int) -> list[bytes]:
    """The twin of ``report()`` without shmpool, for ``shmpool.bench_gunicorn``.

    The same lines, written by the same loop into a new ``bytearray``,
    returned as ``bytes`` (WSGI servers take ``bytes`` only: one copy).
    """
    buffer = bytearray(size)
    view, pos, line = memoryview(buffer), 0, 0
    while pos < size:
        text = f"line {line:08d} of a report built in shared memory\n".encode()[: size - pos]
        view[pos : pos + len(text)] = text
        pos += len(text)
        line += 1
    view.release()
    return [bytes(buffer)]


def crc_of(lease: shmpool.Lease) -> int:
    """In a background process: checksum a buffer handed over by a web worker."""
    with lease:  # unpickling attached it here; releasing it gives it back
        return zlib.crc32(lease.view)


_background: multiprocessing.pool.Pool | None = None
_background_pid = 0
_background_lock = threading.Lock()


def background() -> multiprocessing.pool.Pool:
    """This worker's background process pool, started on first use (spawn: no fork of threads)."""
    global _background, _background_pid
    with _background_lock:
        if _background is None or _background_pid != os.getpid():
            ctx = multiprocessing.get_context("spawn")
            _background = ctx.Pool(1, **shmpool.mp.initializer_kwargs())
            _background_pid = os.getpid()
        return _background


def checksum(environ: dict[str, Any], length: int) -> dict[str, int]:
    """Read the request body into a buffer and have a background process checksum it."""
    lease = shmpool.get_pool().acquire(max(1, length))
    try:
        stream, view, got = environ["wsgi.input"], lease.view, 0
        while got < length:
            data = stream.read(min(CHUNK, length - got))
            if not data:
                break
            view[got : got + len(data)] = data
            got += len(data)
    except BaseException:
        lease.release()
        raise
    if got < length:
        lease.release()
        raise ValueError(f"the body ended after {got} of {length} bytes")
    # Pickling the lease hands its slot to the background process: no copy.
    crc = background().apply(crc_of, (lease,))
    return {"bytes": length, "crc32": crc, "worker": os.getpid()}


def checksum_bytes(environ: dict[str, Any], length: int) -> dict[str, int]:
    """The twin of ``checksum()`` without shmpool: the body read as ``bytes`` and
    pickled, copy and all, through the background pool's pipe."""
    data = environ["wsgi.input"].read(length)
    if len(data) < length:
        raise ValueError(f"the body ended after {len(data)} of {length} bytes")
    crc = background().apply(zlib.crc32, (data,))
    return {"bytes": length, "crc32": crc, "worker": os.getpid()}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point."""
    path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        if path == "/report" and method == "GET":
            size = int(query.get("size", ["1048576"])[0])
            if not 0 < size <= MAX_BODY:
                return _reply(start_response, "400 Bad Request", b"size out of range\n")
            body = report(size)
            start_response(
                "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(size))]
            )
            return body
        if path == "/checksum" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if not 0 <= length <= MAX_BODY:
                return _reply(start_response, "413 Content Too Large", b"body too large\n")
            return _json(start_response, checksum(environ, length))
        if path == "/report-bytes" and method == "GET":  # the twin without shmpool
            size = int(query.get("size", ["1048576"])[0])
            if not 0 < size <= MAX_BODY:
                return _reply(start_response, "400 Bad Request", b"size out of range\n")
            chunks = report_bytes(size)
            start_response(
                "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(size))]
            )
            return chunks
        if path == "/checksum-bytes" and method == "POST":  # the twin without shmpool
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if not 0 <= length <= MAX_BODY:
                return _reply(start_response, "413 Content Too Large", b"body too large\n")
            return _json(start_response, checksum_bytes(environ, length))
        if path == "/stats" and method == "GET":
            return _json(start_response, shmpool.get_pool().stats())
    except shmpool.ShmpoolError as exc:
        return _reply(start_response, "503 Service Unavailable", f"{exc}\n".encode())
    return _reply(start_response, "404 Not Found", b"try /report, /checksum or /stats\n")


def _json(start_response: StartResponse, value: object) -> list[bytes]:
    return _reply(start_response, "200 OK", json.dumps(value).encode(), "application/json")


def _reply(
    start_response: StartResponse, status: str, body: bytes, kind: str = "text/plain"
) -> list[bytes]:
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
