"""``shmpool top``: a live view of a manager's size classes and clients.

One connection, named ``shmpool top`` and left out of the view, asks the
manager for its statistics every ``interval`` seconds. On a terminal each
frame is drawn over the last (plain ANSI: cursor home, clear screen) and
cut to the terminal's size; anywhere else the frames follow one another,
a blank line apart, whole. Rates per second come from the change of the
clients' counters since the previous frame, so the first frame (and
``--once``) has none.

Ctrl-C ends the view with status 0. A manager that is not there, or goes
away, or stops answering, ends it with one line on stderr and status 1.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO

from .errors import ShmpoolError
from .metrics import without_client
from .report import efficiency, printable
from .sizeclass import format_size

__all__ = ["TOP_NAME", "format_frame", "run"]

#: The client name of the view's own connection.
TOP_NAME = "shmpool top"
#: Seconds the view waits for each answer before it counts the manager as gone.
TIMEOUT = 10.0
_CLEAR = "\x1b[H\x1b[2J"

_CLASS_HEAD = (
    f"{'class':>9} {'segs':>5} {'total':>7} {'free':>7} {'leased':>7} {'transit':>7} "
    f"{'committed':>10} {'requested':>10}"
)
_CLIENT_HEAD = (
    f"{'pid':>8} {'leased':>7} {'requested':>10} {'cache hits':>11} {'granted':>9} "
    f"{'hits/s':>9} {'granted/s':>9}  client"
)

Snapshot = tuple[float, dict[str, Any]]


def run(
    address: str | None,
    *,
    interval: float = 1.0,
    once: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Show frames until Ctrl-C (or one, with ``once``); the exit status."""
    from .client import connect

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    live = not once and out.isatty()
    previous: Snapshot | None = None
    try:
        with connect(address, name=TOP_NAME, timeout=TIMEOUT) as pool:
            while True:
                stats = without_client(pool.stats(), TOP_NAME)
                now = time.monotonic()
                size = shutil.get_terminal_size() if live else None
                frame = format_frame(
                    stats,
                    previous,
                    now,
                    interval=None if once else interval,
                    width=size.columns if size else None,
                    height=size.lines if size else None,
                )
                out.write(_CLEAR + frame if live else frame + "\n")
                out.flush()
                if once:
                    return 0
                previous = (now, stats)
                time.sleep(interval)
                if not live:
                    out.write("\n")
    except KeyboardInterrupt:
        return 0
    except ShmpoolError as exc:  # ManagerGoneError above all: none there, gone, or mute
        err.write(f"shmpool top: {exc}\n")
        return 1


def format_frame(
    stats: dict[str, Any],
    previous: Snapshot | None = None,
    now: float | None = None,
    *,
    interval: float | None = None,
    width: int | None = None,
    height: int | None = None,
) -> str:
    """One frame of the view: the manager, its classes, its clients (pure).

    ``previous`` (a time and the stats then) gives the rates; ``width`` and
    ``height`` cut the frame to a terminal (clients past the height are
    counted, not shown).
    """
    lines = _head(stats, interval)
    lines += _rates(stats, previous, now)
    lines += ["", _CLASS_HEAD]
    lines += _class_rows(stats) or ["(no class has slots yet)"]
    lines += ["", _CLIENT_HEAD]
    rows = _client_rows(stats, previous, now)
    if height is not None and len(lines) + len(rows) > height - 1:
        room = max(height - 2 - len(lines), 0)
        rows = [*rows[:room], f"... and {len(rows) - room} more clients"]
    lines += rows or ["(no clients)"]
    if width is not None:
        lines = [line[:width] for line in lines]
    return "\n".join(lines)


# --------------------------------------------------------------- the parts


def _head(stats: dict[str, Any], interval: float | None) -> list[str]:
    mgr = stats.get("manager", {})
    every = f"  (every {interval:g} s; Ctrl-C quits)" if interval is not None else ""
    title = (
        f"shmpool top - manager pid {mgr.get('pid', '?')} at {mgr.get('address', '?')}, "
        f"up {_duration(mgr.get('uptime'))}{every}"
    )
    memory = (
        f"memory   {_size(stats.get('committed_bytes'))} committed of "
        f"{_size(stats.get('memory_limit'))} (peak {_size(stats.get('peak_committed_bytes'))}), "
        f"leased {_size(stats.get('leased_bytes'))}, "
        f"requested {_size(stats.get('requested_bytes'))}, "
        f"efficiency {efficiency(stats.get('committed_bytes'), stats.get('requested_bytes'))}"
    )
    over = stats.get("oversize", {})
    clients = len(stats.get("clients", [])) + stats.get("clients_omitted", 0)
    load = (
        f"clients  {clients}; {stats.get('in_transit', 0)} slots in transit, "
        f"{mgr.get('waiting', 0)} acquires waiting, {mgr.get('throttled', 0)} throttled, "
        f"{mgr.get('quarantined', 0)} quarantined; oversize {over.get('leases', 0)} leases, "
        f"{_size(over.get('bytes', 0))}"
    )
    return [title, memory, load]


def _rates(stats: dict[str, Any], previous: Snapshot | None, now: float | None) -> list[str]:
    rates = _client_rates(stats, previous, now)
    if rates is None:
        return []
    hits = sum(rate[0] for rate in rates.values())
    granted = sum(rate[1] for rate in rates.values())
    return [
        f"acquires {hits:.1f}/s from local caches, {granted:.1f}/s slots granted by the manager"
    ]


def _class_rows(stats: dict[str, Any]) -> list[str]:
    rows = []
    for c in stats.get("classes", []):
        if not c.get("total") and not c.get("committed_bytes"):
            continue
        rows.append(
            f"{format_size(c['size']):>9} {c.get('segments', '-'):>5} {c.get('total', '-'):>7} "
            f"{c.get('free', '-'):>7} {c.get('leased', '-'):>7} {c.get('in_transit', '-'):>7} "
            f"{_size(c.get('committed_bytes')):>10} {_size(c.get('requested_bytes')):>10}"
        )
    return rows


def _client_rows(stats: dict[str, Any], previous: Snapshot | None, now: float | None) -> list[str]:
    rates = _client_rates(stats, previous, now) or {}
    clients = sorted(stats.get("clients", []), key=lambda c: (-c.get("leased", 0), c.get("pid", 0)))
    rows = []
    for c in clients:
        rate = rates.get(c.get("id"))
        hits_s, granted_s = (f"{rate[0]:.1f}", f"{rate[1]:.1f}") if rate else ("-", "-")
        rows.append(
            f"{c.get('pid', '?'):>8} {c.get('leased', 0):>7} "
            f"{_size(c.get('requested_bytes')):>10} {c.get('cache_hits', 0):>11} "
            f"{c.get('manager_acquires', 0):>9} {hits_s:>9} {granted_s:>9}  "
            f"{printable(str(c.get('name', '')))}"
        )
    return rows


def _client_rates(
    stats: dict[str, Any], previous: Snapshot | None, now: float | None
) -> dict[Any, tuple[float, float]] | None:
    """Per connection id, cache hits and slots granted per second since ``previous``.

    None without a previous frame; a connection new since then has no entry.
    """
    if previous is None or now is None or now <= previous[0]:
        return None
    then, old = previous
    before = {c.get("id"): c for c in old.get("clients", [])}
    rates = {}
    for c in stats.get("clients", []):
        last = before.get(c.get("id"))
        if last is None or last.get("pid") != c.get("pid"):
            continue  # new, or a reused id
        hits, granted = (
            max(c.get(key, 0) - last.get(key, 0), 0) / (now - then)
            for key in ("cache_hits", "manager_acquires")
        )
        rates[c.get("id")] = (hits, granted)
    return rates


def _size(value: Any) -> str:
    return format_size(value) if isinstance(value, int) else "-"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    clock = f"{hours}:{minutes:02}:{secs:02}"
    return f"{days}d {clock}" if days else clock
