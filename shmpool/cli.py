"""The command line: ``shmpool serve | stats | demo | bench`` (also ``python -m shmpool``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .address import ENV_VAR
from .embedded import check_idle_release
from .errors import ShmpoolError
from .manager import HELLO_TIMEOUT, IDLE_RELEASE, MAX_CLIENTS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmpool", description="Recycle byte buffers across processes."
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level for the 'shmpool' logger (default INFO)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a manager in the foreground (SIGINT/SIGTERM stop it)")
    serve.add_argument(
        "--address", help=f"socket path (default: ${ENV_VAR}, else a private per-user directory)"
    )
    serve.add_argument("--min-size", default="4KiB", help="smallest size class (default 4KiB)")
    serve.add_argument("--max-size", default="64MiB", help="largest size class (default 64MiB)")
    serve.add_argument("--memory", default="1GiB", help="memory budget (default 1GiB)")
    serve.add_argument(
        "--allow-uid", type=int, action="append", default=None,
        help="also accept clients of this uid (repeatable; default: only our own uid)",
    )  # fmt: skip
    serve.add_argument(
        "--acquire-wait", type=float, default=2.0,
        help="seconds a short acquire may wait for recalled slots (default 2)",
    )  # fmt: skip
    serve.add_argument(
        "--transit-timeout", type=float, default=30.0,
        help="seconds a detached slot waits to be attached before it is freed (default 30)",
    )  # fmt: skip
    serve.add_argument(
        "--max-clients", type=int, default=MAX_CLIENTS,
        help=f"most connections at once (default {MAX_CLIENTS})",
    )  # fmt: skip
    serve.add_argument(
        "--max-clients-per-uid", type=int, default=None,
        help="most connections of one user (default: --max-clients)",
    )  # fmt: skip
    serve.add_argument(
        "--hello-timeout", type=float, default=HELLO_TIMEOUT,
        help=f"seconds a new connection has to say Hello (default {HELLO_TIMEOUT:g})",
    )  # fmt: skip
    serve.add_argument(
        "--max-queued-bytes", default="64MiB",
        help="replies left unread by all clients together before slow readers are "
        "throttled (default 64MiB)",
    )  # fmt: skip
    serve.add_argument(
        "--client-quota", default=None,
        help="most memory one connection may hold, e.g. 256MiB (default: no quota)",
    )  # fmt: skip
    serve.add_argument(
        "--idle-release", type=_idle_seconds, default=IDLE_RELEASE, metavar="SECONDS",
        help="seconds a free slot stays unused before its pages are given back to the "
        f"system; 0: never (default {IDLE_RELEASE:g})",
    )  # fmt: skip
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)

    stats = sub.add_parser("stats", help="show a running manager's statistics")
    stats.add_argument("--address", help=f"socket path (default: ${ENV_VAR})")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument(
        "--suggest", action="store_true",
        help="propose --min-size, --max-size and --memory for 'shmpool serve' from the "
        "sizes acquired so far (with --json: the proposal as JSON)",
    )  # fmt: skip

    demo = sub.add_parser("demo", help="workers doing real work through an embedded manager")
    demo.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    demo.add_argument("--seconds", type=float, default=1.5, help="work time (default 1.5)")

    bench = sub.add_parser("bench", help="measure shmpool beside its peers, in one run")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--quick", action="store_true", help="few short trials (a smoke test)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s shmpool[%(process)d] %(message)s"
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "stats":
            return _stats(args)
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


def _idle_seconds(text: str) -> float:
    try:
        return check_idle_release(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds >= 0 (0: never)"
        ) from None


def _serve(args: argparse.Namespace) -> int:
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
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .client import connect
    from .report import format_stats, format_suggestion
    from .suggest import suggest

    with connect(args.address, name="shmpool stats") as pool:
        stats = pool.stats()
    stats.pop("local", None)
    if args.suggest:  # no suggestion (too few acquires) is an answer too: exit 0
        proposal = suggest(stats)
        print(
            json.dumps(proposal.to_dict(), indent=2) if args.json else format_suggestion(proposal)
        )
        return 0
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run

    report = run(quick=args.quick)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
