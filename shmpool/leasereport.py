"""Long-held leases: what tracking clients report, and what the manager lists.

A pool that tracks its leases (``shmpool.connect(..., track=True)`` or
``SHMPOOL_TRACK=1``) records where each lease was acquired. Only that
process knows; so its janitor sends the manager, now and then, a ``Leases``
report of its oldest leases held past ``REPORT_AFTER``, and the manager
keeps the latest report of each client (``LeaseReports``, no I/O here) to
list in a Stats reply that asks for them (``shmpool stats --leases``).

Bounds. A report holds at most ``protocol.MAX_LEASE_RECORDS`` records of at
most ``MAX_LEASE_FRAMES`` short frames each (checked when decoded), so one
client's report is a few KiB; the manager keeps one per live connection and
lists at most ``MAX_LISTED`` leases in a reply, oldest first.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from . import protocol as p

__all__ = [
    "MAX_LISTED",
    "REPORT_AFTER",
    "REPORT_PERIOD",
    "LeaseReports",
    "format_section",
    "frame_text",
]

#: A tracking client reports a lease once it is held this long (seconds).
REPORT_AFTER = 1.0
#: ... and sends a changed report at most this often (seconds).
REPORT_PERIOD = 0.5
#: The most leases one Stats reply lists (the rest are counted in ``omitted``).
MAX_LISTED = 50


def frame_text(filename: str, lineno: int, name: str) -> str:
    """``"file:line in function"``, cut to ``MAX_FRAME_TEXT`` (the file's tail stays)."""
    tail = f":{lineno} in {name}"[: p.MAX_FRAME_TEXT // 2]
    room = p.MAX_FRAME_TEXT - len(tail)
    if len(filename) > room:
        filename = "..." + filename[-(room - 3) :]
    return filename + tail


class LeaseReports:
    """The manager's copy of each tracking client's latest ``Leases`` report."""

    def __init__(self) -> None:
        # connection id -> (when it came, monotonic; the report)
        self._latest: dict[int, tuple[float, p.Leases]] = {}

    def note(self, conn: int, report: p.Leases, now: float | None = None) -> None:
        """Keep ``report`` as ``conn``'s (it replaces the one before)."""
        self._latest[conn] = (time.monotonic() if now is None else now, report)

    def forget(self, conn: int) -> None:
        self._latest.pop(conn, None)

    def section(
        self, older_than_ms: int, peers: Mapping[int, Any], now: float | None = None
    ) -> dict[str, Any]:
        """The ``"leases"`` section of a Stats reply: leases held ``older_than_ms`` or longer.

        ``peers`` maps live connection ids to objects with ``pid`` and
        ``name``; reports of connections gone are forgotten here. Ages are
        the reported ones plus the time since the report came.
        """
        now = time.monotonic() if now is None else now
        held: list[dict[str, Any]] = []
        unlisted = 0  # held leases the clients did not detail (over their record limit)
        for conn in [c for c in self._latest if c not in peers]:
            del self._latest[conn]
        for conn, (came, report) in self._latest.items():
            peer = peers[conn]
            since = now - came
            unlisted += report.held - len(report.records)
            for r in report.records:
                age = r.age_ms / 1000 + since
                if age * 1000 >= older_than_ms:
                    held.append(
                        {
                            "client": conn,
                            "pid": peer.pid,
                            "name": peer.name,
                            "slot": f"{r.segment}:{r.index}",
                            "size": r.size,
                            "age": round(age, 3),
                            "where": list(r.where),
                        }
                    )
        held.sort(key=lambda entry: -entry["age"])
        return {
            "older_than": older_than_ms / 1000,
            "reporting_clients": len(self._latest),
            "held": held[:MAX_LISTED],
            "omitted": max(0, len(held) - MAX_LISTED),
            "unreported": unlisted,
        }


def format_section(section: Mapping[str, Any]) -> str:
    """A readable listing of a Stats reply's ``"leases"`` (``shmpool stats --leases``)."""
    clients = section.get("reporting_clients", 0)
    if not clients:
        return (
            "no client tracks its leases: start the processes to watch with "
            "SHMPOOL_TRACK=1 (or connect with track=True)"
        )
    held = section.get("held", [])
    lines = [
        f"leases held {section.get('older_than', 0):g} s or longer, as {clients} tracking "
        f"client{'s' if clients != 1 else ''} last reported them: {len(held)} listed"
    ]
    if section.get("omitted"):
        lines[0] += f", {section['omitted']} more not listed"
    if section.get("unreported"):
        lines.append(
            f"({section['unreported']} other tracked leases are open, held under "
            f"{REPORT_AFTER:g} s or past a client's {p.MAX_LEASE_RECORDS} oldest)"
        )
    if held:
        lines.append(f"{'age':>10}  {'size':>12}  {'slot':>10}  {'client':>6}  {'pid':>7}  name")
    for entry in held:
        lines.append(
            f"{entry['age']:>9.1f}s  {entry['size']:>12}  {entry['slot']:>10}  "
            f"{entry['client']:>6}  {entry['pid']:>7}  {entry['name']}"
        )
        lines += [f"{'':>12}at {frame}" for frame in entry.get("where", [])]
    return "\n".join(lines)
