"""Rendering statistics for people (``shmpool stats``, ``shmpool demo``).

The stats of older managers lack the memory figures of issue 11
(``committed_bytes``, ``requested_bytes``, ``request_sizes`` and the rest):
every line shows what the dict has and leaves out what it has not, so
``shmpool stats`` works against any manager that speaks the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .sizeclass import format_size
from .suggest import Suggestion, covering, request_histogram

__all__ = [
    "balanced",
    "efficiency",
    "format_stats",
    "format_suggestion",
    "format_summary",
    "printable",
]

# (header, width) of the class table; the byte columns only when the stats have them
_SLOT_COLUMNS = (("class", 8), ("segments", 8), ("total", 7), ("free", 7), ("leased", 7))
_TRANSIT_COLUMN = (("transit", 7),)
_BYTE_COLUMNS = (("committed", 9), ("leased", 9), ("requested", 9), ("eff", 6))
_CLASS_BYTE_KEYS = ("committed_bytes", "leased_bytes", "requested_bytes")


def format_stats(stats: Mapping[str, Any]) -> str:
    """A readable table of a ``Pool.stats()`` dict.

    Shows memory committed against the budget, its peak, the bytes leased
    and requested and the efficiency (committed / requested), the idle
    release setting, the acquire sizes, and per class the slots and bytes;
    keys an older manager does not send are left out.
    """
    lines = [_headline(stats)]
    lines += _memory_lines(stats)
    lines += _class_table(stats)
    lines.append(_oversize_line(stats.get("oversize", {})))
    lines += _client_lines(stats)
    return "\n".join(lines)


def efficiency(committed: Any, requested: Any) -> str:
    """``committed / requested`` as ``'1.42x'``; ``'-'`` when nothing is requested.

    1.00x is every committed byte in use; more is the price of rounding up to
    a class and of free slots that keep their pages.
    """
    if not isinstance(committed, int) or not isinstance(requested, int) or requested <= 0:
        return "-"
    return f"{committed / requested:.2f}x"


def balanced(stats: Mapping[str, Any]) -> bool:
    """True if every class satisfies ``total == free + leased`` (+ in transit)."""
    return all(
        c["total"] == c["free"] + c["leased"] + c.get("in_transit", 0) for c in stats["classes"]
    )


def format_suggestion(suggestion: Suggestion) -> str:
    """What ``shmpool stats --suggest`` prints: the values, why, and the command."""
    if not suggestion.ready:
        return "\n".join(suggestion.reasons)
    current = suggestion.current
    lines = [f"Suggested settings, from {suggestion.requests} acquires since the manager started:"]
    for name, value in (
        ("min_size", suggestion.min_size),
        ("max_size", suggestion.max_size),
        ("memory", suggestion.memory),
    ):
        assert value is not None
        now = f"(now {format_size(current[name])})" if name in current else ""
        lines.append(f"  {name:<9} {format_size(value):>8}  {now}".rstrip())
    lines.append("Why:")
    lines += [f"  - {reason}" for reason in suggestion.reasons]
    lines.append("Use:")
    lines.append(f"  {suggestion.command()}")
    lines.append(f"  {suggestion.start_call()}")
    return "\n".join(lines)


# --------------------------------------------------------------- the parts


def _size(value: Any) -> str:
    return format_size(value) if isinstance(value, int) else "-"


def _headline(stats: Mapping[str, Any]) -> str:
    mgr = stats.get("manager", {})
    head = f"manager pid {mgr.get('pid', '?')} at {mgr.get('address', '?')}:"
    limit = _size(stats.get("memory_limit"))
    if "committed_bytes" not in stats:  # an older manager: its budget counted mapped bytes
        return f"{head} {_size(stats.get('mapped_bytes'))} mapped of {limit}"
    peak = stats.get("peak_committed_bytes")
    peak_text = f" (peak {format_size(peak)})" if isinstance(peak, int) else ""
    return (
        f"{head} {format_size(stats['committed_bytes'])} committed of {limit}{peak_text}, "
        f"{_size(stats.get('mapped_bytes'))} mapped"
    )


def _memory_lines(stats: Mapping[str, Any]) -> list[str]:
    """Leased, requested, efficiency and idle release; then the acquire sizes."""
    parts = [
        f"{label} {format_size(stats[key])}"
        for label, key in (("leased", "leased_bytes"), ("requested", "requested_bytes"))
        if isinstance(stats.get(key), int)
    ]
    if "requested_bytes" in stats and "committed_bytes" in stats:
        eff = efficiency(stats["committed_bytes"], stats["requested_bytes"])
        parts.append(f"efficiency {eff} (committed/requested)")
    idle = stats.get("idle_release")
    if isinstance(idle, (int, float)):
        parts.append(f"idle release after {idle:g} s" if idle > 0 else "idle release: never")
    lines = [", ".join(parts)] if parts else []
    sizes = _sizes_line(stats)
    if sizes:
        lines.append(sizes)
    return lines


def _sizes_line(stats: Mapping[str, Any]) -> str:
    """The acquire-size histogram in one line: its percentiles and its ends."""
    hist = request_histogram(stats)
    if not hist:
        return "" if hist is None else "acquires: none counted yet"
    total = sum(count for _, count in hist)
    marks = ", ".join(
        f"{label} <= {_size(covering(hist, percent))}"
        for label, percent in (("half", 50), ("95%", 95), ("99%", 99))
    )
    line = f"acquires: {total}; {marks}, largest {format_size(hist[-1][0])}"
    max_size = stats.get("max_size")
    if isinstance(max_size, int):
        over = sum(count for size, count in hist if size > max_size)
        line += f"; {over} oversize"
    return line


def _class_table(stats: Mapping[str, Any]) -> list[str]:
    classes = stats.get("classes", [])
    with_bytes = any(key in c for c in classes for key in _CLASS_BYTE_KEYS)
    with_transit = any("in_transit" in c for c in classes)
    columns = _SLOT_COLUMNS + (_TRANSIT_COLUMN if with_transit else ())
    if with_bytes:
        columns += _BYTE_COLUMNS
    lines = []
    if with_bytes:  # two "leased" columns: say which counts slots and which bytes
        slots = sum(w + 1 for _, w in columns[1 : -len(_BYTE_COLUMNS)]) - 1
        wide = sum(w + 1 for _, w in _BYTE_COLUMNS) - 1
        lines.append(
            " " * (_SLOT_COLUMNS[0][1] + 1) + f"{' slots ':-^{slots}} {' bytes ':-^{wide}}"
        )
    lines.append(" ".join(f"{name:>{width}}" for name, width in columns))
    for c in classes:
        if c.get("total", 0) == 0 and not any(c.get(key) for key in _CLASS_BYTE_KEYS):
            continue
        cells = [format_size(c["size"]), c.get("segments", "-"), c.get("total", "-")]
        cells += [c.get("free", "-"), c.get("leased", "-")]
        if with_transit:
            cells.append(c.get("in_transit", "-"))
        if with_bytes:
            cells += [_size(c.get(key)) for key in _CLASS_BYTE_KEYS]
            cells.append(efficiency(c.get("committed_bytes"), c.get("requested_bytes")))
        lines.append(
            " ".join(f"{cell!s:>{w}}" for cell, (_, w) in zip(cells, columns, strict=True))
        )
    return lines


def _oversize_line(over: dict[str, Any]) -> str:
    leases = over.get("leases", 0)
    line = f"oversize: {leases} lease{'' if leases == 1 else 's'}, {_size(over.get('bytes', 0))}"
    if "requested_bytes" in over:
        line += f" (requested {format_size(over['requested_bytes'])})"
    return line


def _client_lines(stats: Mapping[str, Any]) -> list[str]:
    """One line per client, its whole name shown (made printable), then the cache counters."""
    clients = stats.get("clients", [])
    omitted = stats.get("clients_omitted", 0)
    lines = [f"clients: {len(clients) + omitted}" + (f" ({omitted} not listed)" if omitted else "")]
    names = [printable(c.get("name", "")) for c in clients]
    width = max(map(len, names), default=0)
    for c, name in zip(clients, names, strict=True):
        requested = c.get("requested_bytes")
        req = f"  requested {format_size(requested):>8}" if isinstance(requested, int) else ""
        line = (
            f"  pid {c['pid']:>7} {name:<{width}}  leased {c['leased']:>5}{req}  "
            f"messages {c.get('messages', 0):>6}  cache hits {c.get('cache_hits', 0):>8}"
        )
        if isinstance(c.get("manager_acquires"), int):
            line += f"  slots from manager {c['manager_acquires']:>6}"
        lines.append(line.rstrip())
    lines += _cache_lines(stats)
    return lines


def _cache_lines(stats: Mapping[str, Any]) -> list[str]:
    """The cache counters of all clients together, and of the asking process (``local``)."""
    clients = stats.get("clients", [])
    lines = []
    if any(isinstance(c.get("manager_acquires"), int) for c in clients):
        hits = sum(c.get("cache_hits", 0) for c in clients)
        refills = sum(c.get("manager_acquires", 0) for c in clients)
        lines.append(f"local caches: {hits} hits, {refills} slots granted by the manager")
    local = stats.get("local")
    if isinstance(local, dict) and "cache_hits" in local:
        cached = local.get("cached") or {}
        slots = ", ".join(
            f"{n} x {format_size(int(size))}" for size, n in sorted(cached.items(), key=_by_size)
        )
        lines.append(
            f"this process (pid {local.get('pid', '?')}): {local['cache_hits']} cache hits, "
            f"{local.get('manager_acquires', 0)} slots from the manager, "
            f"cached: {slots or 'none'}"
        )
    return lines


def _by_size(item: tuple[str, Any]) -> int:
    return int(item[0])


def printable(text: str) -> str:
    """``text`` with control characters escaped: a client chooses its name, not our terminal."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_summary(stats: Mapping[str, Any]) -> str:
    """The stats in one line, for a log (``shmpool serve`` on SIGHUP)."""
    classes = stats.get("classes", [])
    over = stats.get("oversize", {})
    clients = stats.get("clients", [])
    parts = [
        f"clients {len(clients) + stats.get('clients_omitted', 0)}",
        f"committed {_size(stats.get('committed_bytes'))} of {_size(stats.get('memory_limit'))}"
        f" (peak {_size(stats.get('peak_committed_bytes'))})",
        f"leased {_size(stats.get('leased_bytes'))}",
        f"requested {_size(stats.get('requested_bytes'))}",
        f"slots leased {sum(c.get('leased', 0) for c in classes)}"
        f"/{sum(c.get('total', 0) for c in classes)}",
        f"in transit {stats.get('in_transit', 0)}",
        f"oversize {over.get('leases', 0)} ({_size(over.get('bytes', 0))})",
    ]
    if any("manager_acquires" in c for c in clients):
        hits = sum(c.get("cache_hits", 0) for c in clients)
        refills = sum(c.get("manager_acquires", 0) for c in clients)
        parts.append(f"cache hits {hits}, slots granted {refills}")
    waiting = stats.get("manager", {}).get("waiting")
    if waiting:
        parts.append(f"{waiting} acquires waiting")
    return ", ".join(parts)
