"""Rendering statistics for people (``shmpool stats``, ``shmpool demo``)."""

from __future__ import annotations

from typing import Any

from .sizeclass import format_size

__all__ = ["balanced", "format_stats"]


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of a ``Pool.stats()`` dict."""
    lines = []
    mgr = stats.get("manager", {})
    lines.append(
        f"manager pid {mgr.get('pid', '?')} at {mgr.get('address', '?')}: "
        f"{format_size(stats['mapped_bytes'])} mapped of {format_size(stats['memory_limit'])}"
    )
    lines.append(f"{'class':>8} {'segments':>8} {'total':>7} {'free':>7} {'leased':>7}")
    for c in stats["classes"]:
        if c["total"] == 0:
            continue
        lines.append(
            f"{format_size(c['size']):>8} {c['segments']:>8} {c['total']:>7} "
            f"{c['free']:>7} {c['leased']:>7}"
        )
    over = stats["oversize"]
    lines.append(f"oversize: {over['leases']} leases, {format_size(over['bytes'])}")
    clients = stats.get("clients", [])
    lines.append(f"clients: {len(clients)}")
    for c in clients:
        lines.append(
            f"  pid {c['pid']:>7} {c.get('name', '')[:20]:<20} leased {c['leased']:>5}  "
            f"messages {c.get('messages', 0):>6}  cache hits {c.get('cache_hits', 0):>8}"
        )
    return "\n".join(lines)


def balanced(stats: dict[str, Any]) -> bool:
    """True if every class satisfies ``total == free + leased`` (+ in transit)."""
    return all(
        c["total"] == c["free"] + c["leased"] + c.get("in_transit", 0) for c in stats["classes"]
    )
