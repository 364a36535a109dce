"""``python -m shmpool.bench_gunicorn``: the gunicorn example, with shmpool and without.

It starts a real gunicorn with ``examples/gunicorn.conf.py`` (the hooks run
the manager in its master) serving ``examples/gunicorn_app.py``, and loads,
in one run, two pairs of endpoints that do the same work:

- ``report``: ``/report?size=n`` writes n bytes of numbered text lines into a
  lease and sends them; ``/report-bytes?size=n`` writes the same lines, by
  the same loop, into a new ``bytearray`` and sends it as ``bytes``.
- ``checksum``: ``POST /checksum`` reads an n-byte body into a lease and
  hands the lease (not its bytes) to the worker's background process, which
  checksums it; ``POST /checksum-bytes`` reads the body as ``bytes`` and
  pickles them through the same background pool's pipe.

Machines here are shared and have few cores, so the run is made of rounds:
each round runs every (endpoint, size) cell for both variants back to back,
the variant that goes first alternating from cell to cell and round to
round, so that drift hits both alike. Per cell it reports the median over
rounds of requests/s, p50 and p99 latency over every request of every
round, and the CPU per request of the server (every process of gunicorn's
session: master, workers, manager, background processes) and of the
client. The figure to read is the ratio shmpool/bytes: the median over
rounds of each round's ratio of the two variants, measured seconds apart.

The client is this process: ``--concurrency`` threads, one connection each
(kept alive where the worker allows it, as gthread does; the sync worker
closes each), plain HTTP/1.1 over a socket, every response read with
``recv_into`` into a buffer the thread reuses. It runs on the same cores as
the server, so it lowers both variants' requests/s alike; its CPU per
request is in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .address import ENV_VAR
from .sizeclass import format_size, parse_size

__all__ = ["format_report", "main", "run"]

SIZES = (64 << 10, 1 << 20, 4 << 20)
#: endpoint: (method, the shmpool path, the bytes twin's path)
ENDPOINTS = {
    "report": ("GET", "/report", "/report-bytes"),
    "checksum": ("POST", "/checksum", "/checksum-bytes"),
}
VARIANTS = ("shmpool", "bytes")
#: Requests per cell and round at 1 MiB when ``--requests`` is not given;
#: other sizes get this times sqrt(1 MiB / size), so every cell takes a while.
REQUESTS_AT_1MIB = 40
CONFIG = Path(__file__).resolve().parent.parent / "examples" / "gunicorn.conf.py"
#: How long gunicorn may take to start, and to stop after SIGTERM, before SIGKILL.
START_TIMEOUT, STOP_TIMEOUT = 60.0, 30.0
_HEADER_ROOM = 64 << 10
#: Rounds: many short ones pair the variants more closely than a few long ones.
ROUNDS = 12


# ------------------------------------------------------------------ the server


class Gunicorn:
    """A gunicorn master in a session of its own, its port, and its log."""

    def __init__(self, workers: int, worker_class: str, threads: int, config: Path) -> None:
        if not config.exists():
            raise FileNotFoundError(f"{config} not found: run from a source checkout of shmpool")
        self.dir = Path(tempfile.mkdtemp(prefix="shmpool-bench-gunicorn-"))
        self.log = self.dir / "gunicorn.log"
        cmd = [
            sys.executable, "-m", "gunicorn", "-c", str(config), "--bind", "127.0.0.1:0",
            "--workers", str(workers), "--worker-class", worker_class,
            "--threads", str(threads), "--timeout", "120", "--graceful-timeout", "10",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}  # the hooks start a manager
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=out, env=env, cwd=self.dir,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.port = 0

    def wait_ready(self) -> None:
        """Wait for the port in the log, then for an answer from a worker."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.tail()}")
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                self.port = int(found.group(1))
                conn = _Connection(self.port, 1 << 20)
                try:
                    if conn.request(_head("GET", "/stats"), b"")[0] == 200:
                        return
                except OSError:
                    pass
                finally:
                    conn.close()
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer within {START_TIMEOUT:g} s:\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in gunicorn's session."""
        ticks = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid:  # the session id
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (gunicorn's graceful stop: on_exit stops the manager), then SIGKILL
        whatever is left of the session; always returns."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(STOP_TIMEOUT)
            deadline = time.monotonic() + 5
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the master if this process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def gunicorn(
    workers: int, worker_class: str, threads: int, config: Path = CONFIG
) -> Iterator[Gunicorn]:
    """Run gunicorn until the block ends, whatever ends it."""
    server = Gunicorn(workers, worker_class, threads, config)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------ the client


def _head(method: str, path: str, length: int = 0) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if method == "POST":
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
    return (head + "\r\n").encode()


class _Connection:
    """One HTTP/1.1 connection, reopened when the server closed it; bodies land in ``sink``."""

    def __init__(self, port: int, body_room: int) -> None:
        self.port = port
        self.sink = bytearray(body_room + _HEADER_ROOM)
        self.sock: socket.socket | None = None

    def request(self, head: bytes, body: bytes) -> tuple[int, memoryview]:
        """Send one request; the status and a view of the response body (valid until the next)."""
        reused = self.sock is not None
        try:
            return self._exchange(head, body)
        except ConnectionError:
            self.close()
            if not reused:
                raise
            return self._exchange(head, body)  # the server had closed a kept-alive connection

    def _exchange(self, head: bytes, body: bytes) -> tuple[int, memoryview]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock, view = self.sock, memoryview(self.sink)
        sock.sendall(head)
        if body:
            sock.sendall(body)
        got, end = 0, -1
        while end < 0:
            if got >= _HEADER_ROOM:
                raise ConnectionError("response headers too long")
            n = sock.recv_into(view[got:_HEADER_ROOM])
            if not n:
                raise ConnectionError("the server closed the connection")
            got += n
            end = self.sink.find(b"\r\n\r\n", 0, got)
        status, headers = _parse_head(bytes(view[:end]))
        start = end + 4
        total = start + int(headers.get("content-length", "0"))
        if total > len(self.sink):
            raise ConnectionError(f"a body of {total - start} bytes does not fit")
        while got < total:
            n = sock.recv_into(view[got:total])
            if not n:
                raise ConnectionError("the server closed the connection mid-body")
            got += n
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, view[start:total]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def _load(
    port: int, head: bytes, body: bytes, count: int, concurrency: int, body_room: int
) -> tuple[float, list[float]]:
    """``count`` requests from ``concurrency`` threads; wall seconds and each latency (s)."""
    tickets = iter(range(count))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def client() -> None:
        conn = _Connection(port, body_room)
        mine: list[float] = []
        try:
            while True:
                with lock:
                    if next(tickets, None) is None:
                        break
                started = time.perf_counter()
                status, answer = conn.request(head, body)
                mine.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {bytes(answer[:300])!r}")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, latencies


# ------------------------------------------------------------------ the run


def _requests_for(size: int, requests: int | None, concurrency: int) -> int:
    if requests is not None:
        return max(1, requests)
    return max(2 * concurrency, round(REQUESTS_AT_1MIB * math.sqrt((1 << 20) / size)))


def _check(server: Gunicorn, endpoint: str, size: int, payload: bytes) -> None:
    """Both variants give the same answer, and the right one."""
    method, *paths = ENDPOINTS[endpoint]
    answers: list[tuple[int, bytes]] = []
    for path in paths:
        conn = _Connection(server.port, size)
        try:
            head = _head(method, f"{path}?size={size}" if method == "GET" else path, size)
            status, view = conn.request(head, payload if method == "POST" else b"")
            answers.append((status, bytes(view)))
        finally:
            conn.close()
    for status, body in answers:
        if status != 200:
            raise RuntimeError(f"{endpoint} {format_size(size)}: HTTP {status}: {body[:300]!r}")
        if method == "GET":
            if len(body) != size or not body.startswith(b"line 00000000 "):
                raise RuntimeError(f"{endpoint} {format_size(size)}: a bad body {body[:60]!r}")
        elif json.loads(body)["crc32"] != zlib.crc32(payload):
            raise RuntimeError(f"{endpoint} {format_size(size)}: a wrong checksum {body!r}")
    if answers[0][1] != answers[1][1] and method == "GET":
        raise RuntimeError(f"{endpoint} {format_size(size)}: the variants' bodies differ")


def run(
    *,
    sizes: tuple[int, ...] = SIZES,
    endpoints: tuple[str, ...] = tuple(ENDPOINTS),
    workers: int = 2,
    worker_class: str = "sync",
    threads: int = 4,
    requests: int | None = None,
    concurrency: int | None = None,
    rounds: int = ROUNDS,
    config: Path = CONFIG,
) -> dict[str, Any]:
    """Start gunicorn, measure every (endpoint, variant, size), stop it; the report.

    Raises:
        RuntimeError: gunicorn did not start, or a request failed or was answered wrongly.
        FileNotFoundError: no ``examples/gunicorn.conf.py`` (not a source checkout).
    """
    sizes = tuple(sorted(set(sizes)))
    concurrency = concurrency or 2 * workers
    payloads = {size: os.urandom(size) for size in sizes}
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    latencies: dict[tuple[str, str, int], list[float]] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    with gunicorn(workers, worker_class, threads, config) as server:
        pairs = list(itertools.product(endpoints, sizes))
        for endpoint, size in pairs:  # warm up: segments, caches, background processes
            _check(server, endpoint, size, payloads[size])
            for variant in VARIANTS:
                head, body = _request(endpoint, variant, size, payloads[size])
                _load(server.port, head, body, 4 * concurrency, concurrency, size)
        for r in range(rounds):
            for i, (endpoint, size) in enumerate(pairs):
                order = VARIANTS if (r + i) % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    head, body = _request(endpoint, variant, size, payloads[size])
                    count = _requests_for(size, requests, concurrency)
                    cpu, server_cpu = time.process_time(), server.cpu_seconds()
                    elapsed, times = _load(server.port, head, body, count, concurrency, size)
                    server_cpu = server.cpu_seconds() - server_cpu
                    cpu = time.process_time() - cpu
                    key = (endpoint, variant, size)
                    cells.setdefault(key, []).append(
                        {
                            "requests": count,
                            "seconds": elapsed,
                            "rps": count / elapsed,
                            "p50_ms": _quantile(times, 0.50) * 1e3,
                            "server_cpu_s": server_cpu,
                            "client_cpu_s": cpu,
                        }
                    )
                    latencies.setdefault(key, []).extend(times)
    setup = {
        "workers": workers, "worker_class": worker_class,
        "threads": threads if worker_class == "gthread" else None,
        "concurrency": concurrency, "rounds": rounds, "requests": requests,
    }  # fmt: skip
    return {
        "results": [
            _summary(key, cells[key], latencies[key])
            for endpoint, size, variant in itertools.product(endpoints, sizes, VARIANTS)
            for key in [(endpoint, variant, size)]
        ],
        "ratios": _ratios(cells, endpoints, sizes),
        "setup": setup,
        "machine": _machine(load_before, time.monotonic() - started),
    }


def _request(endpoint: str, variant: str, size: int, payload: bytes) -> tuple[bytes, bytes]:
    method, shm_path, bytes_path = ENDPOINTS[endpoint]
    path = shm_path if variant == "shmpool" else bytes_path
    if method == "GET":
        return _head(method, f"{path}?size={size}"), b""
    return _head(method, path, size), payload


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _summary(
    key: tuple[str, str, int], rows: list[dict[str, Any]], times: list[float]
) -> dict[str, Any]:
    endpoint, variant, size = key
    return {
        "endpoint": endpoint,
        "variant": variant,
        "size": size,
        "rps": statistics.median(r["rps"] for r in rows),
        "rps_best": max(r["rps"] for r in rows),
        "p50_ms": _quantile(times, 0.50) * 1e3,
        "p99_ms": _quantile(times, 0.99) * 1e3,
        "server_cpu_ms": _per_request(rows, "server_cpu_s") * 1e3,
        "client_cpu_ms": _per_request(rows, "client_cpu_s") * 1e3,
        "requests": sum(r["requests"] for r in rows),
        "rounds": rows,
    }


def _per_request(rows: list[dict[str, Any]], field: str) -> float:
    """Seconds per request over every round (CPU clocks tick coarsely: sum, then divide)."""
    seconds: float = sum(r[field] for r in rows)
    count: int = sum(r["requests"] for r in rows)
    return seconds / count


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _ratios(
    cells: dict[tuple[str, str, int], list[dict[str, Any]]],
    endpoints: tuple[str, ...],
    sizes: tuple[int, ...],
) -> list[dict[str, Any]]:
    """shmpool/bytes per (endpoint, size): each a median of the rounds' own ratios."""
    out = []
    for endpoint, size in itertools.product(endpoints, sizes):
        shm, byt = cells[(endpoint, "shmpool", size)], cells[(endpoint, "bytes", size)]
        out.append(
            {
                "endpoint": endpoint,
                "size": size,
                "rps": _median_ratio("rps", shm, byt),
                "rounds": [x["rps"] / y["rps"] for x, y in zip(shm, byt, strict=True)],
                "p50": _median_ratio("p50_ms", shm, byt),
                "server_cpu": _ratio(
                    _per_request(shm, "server_cpu_s"), _per_request(byt, "server_cpu_s")
                ),
            }
        )
    return out


def _median_ratio(field: str, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """The median over rounds of ``a``'s figure over ``b``'s in the same round."""
    return float(statistics.median(x[field] / y[field] for x, y in zip(a, b, strict=True)))


def _machine(load_before: tuple[float, float, float], seconds: float) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gunicorn": metadata.version("gunicorn"),
        "loadavg_before": load_before[0],
        "loadavg_after": os.getloadavg()[0],
        "seconds": seconds,
    }


# ------------------------------------------------------------------ the report


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables (a cell per endpoint, size and variant, then the ratios)."""
    s, m = report["setup"], report["machine"]
    threads = f" --threads {s['threads']}" if s["threads"] else ""
    lines = [
        f"gunicorn {m['gunicorn']} --workers {s['workers']} --worker-class {s['worker_class']}"
        f"{threads}; {s['concurrency']} client connections; {s['rounds']} rounds; "
        f"Python {m['python']}, {m['cpus']} CPUs, load {m['loadavg_before']:.2f} before, "
        f"{m['loadavg_after']:.2f} after; {m['seconds']:.0f} s",
        "",
        "| endpoint | size | variant | req/s (median) | req/s (best) | p50 ms | p99 ms "
        "| server CPU ms/req | client CPU ms/req |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['endpoint']} | {format_size(r['size'])} | {r['variant']} | {r['rps']:.1f} "
            f"| {r['rps_best']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |"
        )
    lines += [
        "",
        "| endpoint | size | req/s shmpool/bytes | rounds' middle half | p50 shmpool/bytes "
        "| server CPU shmpool/bytes |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for q in report["ratios"]:
        low, high = _middle_half(q["rounds"])
        lines.append(
            f"| {q['endpoint']} | {format_size(q['size'])} | {q['rps']:.2f}x "
            f"| {low:.2f}-{high:.2f} | {q['p50']:.2f}x | {_times(q['server_cpu'])} |"
        )
    return "\n".join(lines)


def _middle_half(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles (the lowest and highest value when there are few)."""
    if len(values) < 4:
        return min(values), max(values)
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shmpool.bench_gunicorn",
        description="requests/s of the gunicorn example with shmpool against the same app "
        "building bytes, in one run",
    )
    parser.add_argument(
        "--body-size", action="append", type=parse_size, dest="sizes", metavar="N",
        help="a body size, e.g. 64KiB (repeatable; default 64KiB, 1MiB, 4MiB)",
    )  # fmt: skip
    parser.add_argument(
        "--endpoint", action="append", choices=tuple(ENDPOINTS), dest="endpoints",
        help="report (response built in a lease) or checksum (request body handed to a "
        "background process); repeatable, default both",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--worker-class", choices=("sync", "gthread"), default="sync")
    parser.add_argument("--threads", type=int, default=4, help="per gthread worker (default 4)")
    parser.add_argument(
        "--requests", type=int, metavar="R",
        help=f"requests per cell and round (default {REQUESTS_AT_1MIB} at 1 MiB, "
        "times sqrt(1 MiB / size) at other sizes)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=int, metavar="C", help="client connections (default 2 x workers)"
    )
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"alternating rounds (default {ROUNDS})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A SIGTERM to this process unwinds it, so that gunicorn is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run(
            sizes=tuple(args.sizes or SIZES),
            endpoints=tuple(args.endpoints or ENDPOINTS),
            workers=args.workers,
            worker_class=args.worker_class,
            threads=args.threads,
            requests=args.requests,
            concurrency=args.concurrency,
            rounds=args.rounds,
        )
    except KeyboardInterrupt:  # gunicorn was stopped on the way out
        return 130
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
