"""The command line: ``shmpool serve | stats | top | demo | bench`` (also ``python -m shmpool``).

Conventions: ``--version``; ``--log-level`` before or after the command;
every option of ``serve`` (and ``--log-level``) takes its default from a
``SHMPOOL_*`` variable (``envdefaults``), the flag winning; ``serve`` stops
cleanly on SIGINT or SIGTERM and logs a one-line summary of the stats on
SIGHUP. Exit status: 0, 1 for a shmpool error (no manager, say), 2 for a
bad argument or an OS error, 130 for Ctrl-C (``top``: 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from . import __version__
from .address import ENV_VAR
from .embedded import check_idle_release
from .envdefaults import EnvValue, checked, env_default, variable
from .errors import ShmpoolError
from .manager import HELLO_TIMEOUT, IDLE_RELEASE, MAX_CLIENTS
from .sizeclass import parse_size

__all__ = ["LOG_LEVELS", "main"]

log = logging.getLogger("shmpool")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: ``shmpool stats --format``
FORMATS = ("text", "json", "openmetrics", "prometheus")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmpool",
        description="Recycle byte buffers across processes.",
        epilog="Each option of 'serve' (and --log-level) defaults to the environment "
        "variable SHMPOOL_<OPTION> (e.g. SHMPOOL_MEMORY=2GiB) when set; the option wins.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _log_level_option(parser, env_default("--log-level", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a manager in the foreground (SIGINT/SIGTERM stop it, SIGHUP logs its stats)",
    )
    _serve_options(serve)

    stats = sub.add_parser("stats", help="show a running manager's statistics")
    _log_level_option(stats)
    stats.add_argument("--address", help=f"socket path (default: ${ENV_VAR})")
    form = stats.add_mutually_exclusive_group()
    form.add_argument(
        "--format", choices=FORMATS, default="text",
        help="text (a table, the default), json, openmetrics or prometheus (exposition "
        "text, see docs/metrics.md)",
    )  # fmt: skip
    form.add_argument(
        "--json", action="store_const", const="json", dest="format", help="--format json"
    )
    stats.add_argument(
        "--suggest", action="store_true",
        help="propose --min-size, --max-size and --memory for 'shmpool serve' from the "
        "sizes acquired so far (with --json: the proposal as JSON)",
    )  # fmt: skip
    _leases_options(stats)

    top = sub.add_parser("top", help="a live view of a manager's classes and clients")
    _log_level_option(top)
    top.add_argument("--address", help=f"socket path (default: ${ENV_VAR})")
    top.add_argument(
        "--interval", type=checked(_interval, "a number of seconds > 0"), default=1.0,
        metavar="SECONDS", help="seconds between frames (default 1)",
    )  # fmt: skip
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    demo = sub.add_parser("demo", help="workers doing real work through an embedded manager")
    _log_level_option(demo)
    demo.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    demo.add_argument("--seconds", type=float, default=1.5, help="work time (default 1.5)")

    bench = sub.add_parser("bench", help="measure shmpool beside its peers, in one run")
    _log_level_option(bench)
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--quick", action="store_true", help="few short trials (a smoke test)")
    return parser


def _serve_options(serve: argparse.ArgumentParser) -> None:
    """The options of ``serve``, each with its ``SHMPOOL_*`` default."""
    _log_level_option(serve)

    def option(flag: str, default: Any, help: str, **kwargs: Any) -> None:
        kwargs.setdefault("type", str)
        serve.add_argument(
            flag, default=env_default(flag, default), help=f"{help} [${variable(flag)}]", **kwargs
        )

    size = checked(_size, "a size such as 4096, 64KiB or 1.5GiB")
    seconds = checked(_seconds, "a number of seconds >= 0")
    count = checked(_count, "a whole number >= 1")
    option("--address", None, "socket path (default: a private per-user directory)")
    option("--min-size", "4KiB", "smallest size class (default 4KiB)", type=size)
    option("--max-size", "64MiB", "largest size class (default 64MiB)", type=size)
    option("--memory", "1GiB", "memory budget (default 1GiB)", type=size)
    option(
        "--allow-uid", None,
        "also accept clients of this uid (repeatable, or comma-separated; default: only "
        "our own uid)",
        type=checked(_uids, "a list of uids"), action=_Uids, metavar="UID",
    )  # fmt: skip
    option(
        "--acquire-wait", 2.0, "seconds a short acquire may wait for recalled slots (default 2)",
        type=seconds,
    )  # fmt: skip
    option(
        "--transit-timeout", 30.0,
        "seconds a detached slot waits to be attached before it is freed (default 30)",
        type=seconds,
    )  # fmt: skip
    option(
        "--max-clients", MAX_CLIENTS, f"most connections at once (default {MAX_CLIENTS})",
        type=count,
    )  # fmt: skip
    option(
        "--max-clients-per-uid", None, "most connections of one user (default: --max-clients)",
        type=count,
    )  # fmt: skip
    option(
        "--hello-timeout", HELLO_TIMEOUT,
        f"seconds a new connection has to say Hello (default {HELLO_TIMEOUT:g})",
        type=checked(_positive_seconds, "a number of seconds > 0"),
    )  # fmt: skip
    option(
        "--max-queued-bytes", "64MiB",
        "replies left unread by all clients together before slow readers are throttled "
        "(default 64MiB)",
        type=size,
    )  # fmt: skip
    option(
        "--client-quota", None,
        "most memory one connection may hold, e.g. 256MiB (default: no quota)", type=size,
    )  # fmt: skip
    option(
        "--idle-release", IDLE_RELEASE,
        "seconds a free slot stays unused before its pages are given back to the "
        f"system; 0: never (default {IDLE_RELEASE:g})",
        type=checked(_idle_release, "a number of seconds >= 0 (0: never)"),
        metavar="SECONDS",
    )  # fmt: skip
    option(
        "--metrics-port", None,
        "serve Prometheus/OpenMetrics metrics over HTTP on this port (0: any free port; "
        "needs pip install 'shmpool[metrics]')",
        type=checked(_port, "a TCP port number (0-65535)"), metavar="PORT",
    )  # fmt: skip
    option(
        "--metrics-host", "127.0.0.1",
        "address the metrics server binds (default 127.0.0.1; 0.0.0.0 or :: for all)",
        metavar="HOST",
    )  # fmt: skip
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)


def _log_level_option(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """``--log-level``, on the main parser and again on every command.

    On a command its default is SUPPRESS: given there, it wins; not given,
    the main parser's value (or its ``SHMPOOL_LOG_LEVEL`` default) stays.
    """
    parser.add_argument(
        "--log-level", type=checked(_log_level, f"a log level ({', '.join(LOG_LEVELS)})"),
        choices=LOG_LEVELS, default=default,
        help="logging level for the 'shmpool' logger, any case (default INFO) "
        f"[${variable('--log-level')}]",
    )  # fmt: skip


class _Uids(argparse.Action):
    """``--allow-uid``: values add up, but the first one given replaces the environment's."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current: Any = getattr(namespace, self.dest, None)
        fresh = current is None or current is self.default or isinstance(current, EnvValue)
        before: list[int] = [] if fresh else list(current)
        setattr(namespace, self.dest, before + list(values))


# ------------------------------------------------------------- the types


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(text)
    return level


def _size(text: str) -> int:
    return parse_size(text)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _interval(text: str) -> float:
    return _positive_seconds(text)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def _uids(text: str) -> list[int]:
    uids = [int(part) for part in text.replace(",", " ").split()]
    if not uids or any(uid < 0 for uid in uids):
        raise ValueError(text)
    return uids


def _idle_release(text: str) -> float:
    """``--idle-release``: seconds >= 0 (0: never), as ``start(idle_release=...)`` takes."""
    return check_idle_release(float(text))


# ------------------------------------------------------------ the commands


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s shmpool[%(process)d] %(message)s")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "top":
            from .top import run as top

            return top(args.address, interval=args.interval, once=args.once)
        if args.command == "demo":
            from .demo import run

            return run(workers=args.workers, seconds=args.seconds)
        if args.command == "bench":
            return _bench(args)
    except ShmpoolError as exc:
        print(f"shmpool: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as exc:
        print(f"shmpool: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


class _Stop(Exception):
    """SIGTERM before the manager's own handler is in place (or after it is gone)."""


def _serve(args: argparse.Namespace) -> int:
    from . import metrics

    if args.metrics_port is not None and not metrics.have_prometheus_client():
        print(
            f"shmpool: --metrics-port needs the prometheus_client package: {metrics.INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    exporter: metrics.MetricsServer | None = None
    try:
        with _serve_signals(args.address):
            try:
                if args.metrics_port is not None:
                    exporter = metrics.serve_metrics(
                        args.address, args.metrics_port, args.metrics_host
                    )
                    log.info("metrics on http://%s:%d/metrics", exporter.host, exporter.port)
                _run_manager(args)
            finally:
                if exporter is not None:
                    exporter.close()
    except _Stop:
        pass
    return 0


def _run_manager(args: argparse.Namespace) -> None:
    """Make the manager of ``shmpool serve`` and serve until it stops."""
    from .manager import Manager

    manager = Manager(
        args.address,
        min_size=args.min_size,
        max_size=args.max_size,
        memory=args.memory,
        allow_uids=args.allow_uid,
        acquire_wait=args.acquire_wait,
        transit_timeout=args.transit_timeout,
        max_clients=args.max_clients,
        max_clients_per_uid=args.max_clients_per_uid,
        hello_timeout=args.hello_timeout,
        max_queued_bytes=args.max_queued_bytes,
        client_quota=args.client_quota,
        idle_release=args.idle_release,
    )
    manager.serve(ready_fd=args.ready_fd, lifeline_fd=args.lifeline_fd)


@contextlib.contextmanager
def _serve_signals(address: str | None) -> Iterator[None]:
    """SIGHUP logs a summary; SIGTERM stops even before the manager handles it.

    The manager installs its own SIGINT/SIGTERM handlers while it serves,
    and puts these back after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    hangup = _HangupSummary(address)
    try:
        old = {
            signal.SIGHUP: signal.signal(signal.SIGHUP, hangup.on_signal),
            signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
        }
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    finally:
        hangup.close()


class _HangupSummary:
    """SIGHUP to ``serve``: log a one-line summary of the stats at INFO, and go on serving.

    The signal handler runs on the main thread, which is the manager's loop,
    at any point of a turn: the books may be half changed there, and the
    loop must not wait. So the handler only writes a byte to a pipe; a
    thread of its own reads it, asks the manager like any client (the loop
    answers between turns) and logs the answer. Signals that come while a
    summary is being made fold into the next one.
    """

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._w, False)
        self._thread = threading.Thread(target=self._run, name="shmpool-sighup", daemon=True)
        self._thread.start()

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):  # the pipe is full: a summary is due anyway
            os.write(self._w, b"h")

    def close(self) -> None:
        """End the thread (it ends after the summary it is making, if any)."""
        os.close(self._w)
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        try:
            while os.read(self._r, 4096):  # end of file: close()
                self._log()
        finally:
            os.close(self._r)

    def _log(self) -> None:
        from .metrics import read_stats
        from .report import format_summary

        try:
            stats = read_stats(self._address, name="shmpool sighup", timeout=10.0)
            log.info("SIGHUP: %s", format_summary(stats))
        except Exception as exc:
            log.warning("SIGHUP: cannot read the statistics: %s", exc)


def _leases_options(stats: argparse.ArgumentParser) -> None:
    stats.add_argument(
        "--leases", action="store_true",
        help="list the leases held long in the processes that track theirs (SHMPOOL_TRACK=1 "
        "or connect(track=True)): age, size, slot, client and where each was acquired",
    )  # fmt: skip
    stats.add_argument(
        "--older-than", type=checked(_seconds, "a number of seconds >= 0"), default=None,
        metavar="SECONDS", help="with --leases: only those held this long or longer (default 0)",
    )  # fmt: skip


def _stats_leases(args: argparse.Namespace) -> int:
    """``shmpool stats --leases``: the long-held leases, as tracking clients reported them."""
    from .client import connect
    from .leasereport import format_section

    if args.suggest or args.format not in ("text", "json"):
        print("shmpool: --leases prints text or json, without --suggest", file=sys.stderr)
        return 2
    with connect(args.address, name="shmpool stats") as pool:
        stats: dict[str, Any] = dict(pool.stats(leases_older_than=args.older_than or 0.0))
    stats.pop("local", None)
    section = stats.get("leases")
    if section is None:
        print("shmpool: this manager does not list leases (an older version)", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.format == "json" else format_section(section))
    return 0


def _stats(args: argparse.Namespace) -> int:
    if args.leases or args.older_than is not None:  # --older-than alone implies --leases
        return _stats_leases(args)
    from .client import connect
    from .metrics import exposition, without_client
    from .report import format_stats, format_suggestion
    from .suggest import suggest

    if args.suggest and args.format not in ("text", "json"):
        print(f"shmpool: --suggest prints text or json, not {args.format}", file=sys.stderr)
        return 2
    name = "shmpool stats"
    with connect(args.address, name=name) as pool:
        stats: dict[str, Any] = dict(pool.stats())
    stats.pop("local", None)
    if args.suggest:  # no suggestion (too few acquires) is an answer too: exit 0
        proposal = suggest(stats)
        print(
            json.dumps(proposal.to_dict(), indent=2)
            if args.format == "json"
            else format_suggestion(proposal)
        )
        return 0
    if args.format in ("openmetrics", "prometheus"):
        # our own connection left out: each run's new pid would make new series
        text = exposition(without_client(stats, name), openmetrics=args.format == "openmetrics")
        sys.stdout.write(text)
        return 0
    print(json.dumps(stats, indent=2) if args.format == "json" else format_stats(stats))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run

    report = run(quick=args.quick)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
