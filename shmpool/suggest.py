"""Proposing ``min_size``, ``max_size`` and ``memory`` from a manager's stats.

``shmpool stats --suggest`` reads the histogram of acquire sizes the manager
keeps (``stats["request_sizes"]``: ``[2**k, count]`` pairs, a request of
``n`` bytes counted under ``2**k`` with ``k = (n - 1).bit_length()``) and its
memory figures, and proposes settings for the next ``shmpool serve`` or
``shmpool.start()``. It is a pure function of the stats dict.

The idea is bytebufferpool's ``calibrate`` (valyala/bytebufferpool): it
counts calls per power-of-two bucket, sorts the buckets by how many calls
they got, takes the most frequent bucket as the default capacity and, walking
down that order until ~95% of calls are covered, the largest bucket met as
the largest capacity it keeps; bigger buffers are dropped, not pooled. It
recounts from zero every ~42000 calls, so it follows recent traffic. We
differ where our costs differ:

- Our cut is made in size order: every request above ``max_size`` goes
  oversize (a segment created, mapped and unlinked for it alone), so what
  matters is the share of requests *above* a size, not the rank of its
  bucket. bytebufferpool's frequency order survives in the second rule for
  ``max_size``: a size that carries much of the traffic stays pooled even
  when rare by count.
- Our small end costs too: each request below ``min_size`` is rounded up to
  it, but each class also costs segments, cached idle slots in every client
  and, below a page, pages that free slots share and cannot give back alone.
- The manager's histogram counts since it started, not over a window: the
  suggestion reflects the whole run.

The rules, with their thresholds as constants below:

1. Fewer than ``MIN_REQUESTS`` acquires counted: too little to go on,
   suggest nothing.
2. ``max_size``: the smallest power of two that ``MAX_COVER_PERCENT`` of the
   requests fit in; raised to the largest size whose requests carry
   ``HEAVY_PERCENT`` of the bytes asked for (count x size), and to the
   largest class holding ``HEAVY_PERCENT`` of the leased class bytes now.
3. ``min_size``: the largest power of two that at most ``SMALL_PERCENT`` of
   the requests are below; so rounding them up adds at most that share to
   the bytes leased, since every other request takes a slot at least as
   large. Never below ``FLOOR`` (a cache line: smaller slots of different
   processes would share cache lines); it is at most ``max_size`` by rule 2,
   and when the floor lifts it above, ``max_size`` rises to it.
4. ``memory``: the peak of committed bytes plus ``HEADROOM_PERCENT``, at
   least what is committed or leased now and one slot of ``max_size``,
   rounded up to a MiB.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .sizeclass import ceil_pow2, format_size

__all__ = ["Suggestion", "covering", "request_histogram", "suggest"]

#: Fewer acquires than this say too little about the sizes a program uses.
MIN_REQUESTS = 1000
#: ``max_size`` covers at least this share of the requests; the rest go oversize.
MAX_COVER_PERCENT = 99
#: A size carrying this share of the bytes (or of the leased bytes now) stays pooled.
HEAVY_PERCENT = 10
#: At most this share of the requests may be below ``min_size`` (rounded up to it).
SMALL_PERCENT = 5
#: The smallest ``min_size`` we propose: a cache line.
FLOOR = 64
#: Room above the peak, for a busier day.
HEADROOM_PERCENT = 25
MIB = 1 << 20


@dataclass(frozen=True)
class Suggestion:
    """Proposed settings, or none (all three ``None``) with the reason why.

    Attributes:
        min_size, max_size, memory: bytes (powers of two for the sizes,
            whole MiB for memory), or ``None`` when nothing is suggested.
        reasons: one sentence per rule that set a value, or why there is none.
        requests: the acquires the histogram counts.
        current: the manager's settings now (``min_size``, ``max_size``,
            ``memory``), those it reports.
    """

    min_size: int | None
    max_size: int | None
    memory: int | None
    reasons: tuple[str, ...]
    requests: int = 0
    current: dict[str, int] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """True if there are values to use."""
        return None not in (self.min_size, self.max_size, self.memory)

    def command(self) -> str | None:
        """``shmpool serve --min-size .. --max-size .. --memory ..``, or None."""
        if self.min_size is None or self.max_size is None or self.memory is None:
            return None
        return (
            f"shmpool serve --min-size {exact_size(self.min_size)} "
            f"--max-size {exact_size(self.max_size)} --memory {exact_size(self.memory)}"
        )

    def start_call(self) -> str | None:
        """The same settings as a ``shmpool.start(...)`` call, or None."""
        if self.min_size is None or self.max_size is None or self.memory is None:
            return None
        return (
            f'shmpool.start(min_size="{exact_size(self.min_size)}", '
            f'max_size="{exact_size(self.max_size)}", memory="{exact_size(self.memory)}")'
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (what ``shmpool stats --suggest --json`` prints)."""
        return {
            "min_size": self.min_size,
            "max_size": self.max_size,
            "memory": self.memory,
            "command": self.command(),
            "start": self.start_call(),
            "requests": self.requests,
            "current": dict(self.current),
            "reasons": list(self.reasons),
        }


def suggest(stats: Mapping[str, Any]) -> Suggestion:
    """Propose ``min_size``, ``max_size`` and ``memory`` from ``stats``.

    ``stats`` is a ``Pool.stats()`` dict. Without ``request_sizes`` (an older
    manager) or with fewer than ``MIN_REQUESTS`` acquires counted, the
    suggestion holds no values, only the reason. Raises nothing for missing
    keys; a malformed histogram entry raises ``ValueError`` or ``TypeError``.
    """
    current = {
        key: stats[name]
        for key, name in (
            ("min_size", "min_size"),
            ("max_size", "max_size"),
            ("memory", "memory_limit"),
        )
        if isinstance(stats.get(name), int)
    }
    hist = request_histogram(stats)
    if hist is None:
        why = "this manager does not count the sizes it is asked for (an older version)"
        return Suggestion(None, None, None, (f"No suggestion: {why}.",), 0, current)
    total = sum(count for _, count in hist)
    if total < MIN_REQUESTS:
        counted = f"only {total} acquire{'' if total == 1 else 's'}" if total else "no acquires"
        why = (
            f"{counted} counted, and at least {MIN_REQUESTS} are needed; "
            "run the workload longer and ask again"
        )
        return Suggestion(None, None, None, (f"No suggestion: {why}.",), total, current)
    max_size, reasons = _max_size(hist, total, stats)
    min_size, min_reasons = _min_size(hist, total)
    reasons += min_reasons
    if min_size > max_size:
        reasons.append(f"max_size raised to min_size, {format_size(min_size)}: one class.")
        max_size = min_size
    memory, memory_reason = _memory(stats, max_size)
    reasons.append(memory_reason)
    return Suggestion(min_size, max_size, memory, tuple(reasons), total, current)


def request_histogram(stats: Mapping[str, Any]) -> list[tuple[int, int]] | None:
    """``stats["request_sizes"]`` as sorted ``(size, count)`` pairs, counts > 0.

    ``None`` when the stats have no histogram. Sizes that are not a power of
    two are rounded up to one (the manager sends only powers of two).
    """
    raw = stats.get("request_sizes")
    if raw is None:
        return None
    counts: dict[int, int] = {}
    for size, count in raw:
        if int(size) >= 1 and int(count) > 0:
            key = ceil_pow2(int(size))
            counts[key] = counts.get(key, 0) + int(count)
    return sorted(counts.items())


def covering(hist: Iterable[tuple[int, int]], percent: float) -> int | None:
    """The smallest size that at least ``percent`` % of the requests fit in.

    ``hist`` is sorted by size; ``None`` if it is empty.
    """
    pairs = list(hist)
    total = sum(count for _, count in pairs)
    run = 0
    for size, count in pairs:
        run += count
        if run * 100 >= percent * total:
            return size
    return pairs[-1][0] if pairs else None


def exact_size(n: int) -> str:
    """``n`` bytes in the largest unit that holds it exactly: ``'1229MiB'``, ``'2GiB'``.

    Unlike ``format_size`` it never rounds, so it can be pasted back.
    """
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# ------------------------------------------------------------------ rules


def _max_size(
    hist: list[tuple[int, int]], total: int, stats: Mapping[str, Any]
) -> tuple[int, list[str]]:
    """Rule 2: cover ``MAX_COVER_PERCENT`` of requests; keep heavy sizes pooled."""
    cover = covering(hist, MAX_COVER_PERCENT)
    assert cover is not None  # total >= MIN_REQUESTS
    above = sum(count for size, count in hist if size > cover)
    reasons = [
        f"max_size {format_size(cover)}: {_pct(total - above, total)} of the acquires ask "
        f"for at most {format_size(cover)}; the other {above} ({_pct(above, total)}) go "
        "oversize, each creating and mapping a segment of its own."
    ]
    best = cover
    volume = sum(size * count for size, count in hist)
    heavy = max(
        (size for size, count in hist if size * count * 100 >= HEAVY_PERCENT * volume),
        default=0,
    )
    if heavy > best:
        share = next(size * count for size, count in hist if size == heavy)
        reasons.append(
            f"Raised to {format_size(heavy)}: the acquires sized for that class carry "
            f"{_pct(share, volume)} of the bytes asked for; pooled, a slot's pages are "
            "reused, while oversize every acquire faults its pages in afresh."
        )
        best = heavy
    busy, busy_share, leased = _busiest_class(stats)
    if busy > best:
        reasons.append(
            f"Raised to {format_size(busy)}: that class holds {_pct(busy_share, leased)} "
            "of the leased class bytes now."
        )
        best = busy
    return best, reasons


def _busiest_class(stats: Mapping[str, Any]) -> tuple[int, int, int]:
    """The largest class holding ``HEAVY_PERCENT`` of the leased class bytes now.

    Returns (its size or 0, its leased bytes, all leased class bytes).
    """
    held = [
        (int(c["size"]), int(c.get("leased_bytes", c.get("leased", 0) * c["size"])))
        for c in stats.get("classes", [])
        if "size" in c
    ]
    leased = sum(b for _, b in held)
    heavy = [(s, b) for s, b in held if b > 0 and b * 100 >= HEAVY_PERCENT * leased]
    if not heavy:
        return 0, 0, leased
    size, share = max(heavy)
    return size, share, leased


def _min_size(hist: list[tuple[int, int]], total: int) -> tuple[int, list[str]]:
    """Rule 3: at most ``SMALL_PERCENT`` of requests below it, and not below ``FLOOR``."""
    below = 0
    size = hist[-1][0]
    for s, count in hist:
        if (below + count) * 100 > SMALL_PERCENT * total:
            size = s  # a larger min_size would have more than SMALL_PERCENT below it
            break
        below += count
    if size < FLOOR:
        under = sum(count for s, count in hist if s < FLOOR)
        return FLOOR, [
            f"min_size {format_size(FLOOR)}: {under} acquires ({_pct(under, total)}) ask for "
            "less, but slots smaller than a cache line would share cache lines between "
            "processes, and every class costs segments and idle cached slots."
        ]
    under = sum(count for s, count in hist if s < size)
    return size, [
        f"min_size {format_size(size)}: {under} acquires ({_pct(under, total)}) ask for less "
        f"and get a {format_size(size)} slot; as every other acquire takes a slot at least "
        f"that large, that adds at most {_pct(under, total)} to the slot bytes leased, and "
        "saves the classes below (their segments, pages and cached slots)."
    ]


def _memory(stats: Mapping[str, Any], max_size: int) -> tuple[int, str]:
    """Rule 4: the peak plus headroom, at least what is in use now, in whole MiB."""
    if "peak_committed_bytes" in stats:
        peak, what = int(stats["peak_committed_bytes"]), "the peak of committed bytes"
    elif "committed_bytes" in stats:
        peak, what = int(stats["committed_bytes"]), "the committed bytes (no peak reported)"
    else:
        peak, what = int(stats.get("mapped_bytes", 0)), "the mapped bytes (no committed reported)"
    want = -(-peak * (100 + HEADROOM_PERCENT) // 100)
    steps = [f"{what}, {format_size(peak)}, plus {HEADROOM_PERCENT}% headroom"]
    now = max(int(stats.get("committed_bytes", 0)), int(stats.get("leased_bytes", 0)))
    if now > want:
        want = now
        steps.append(f"raised to what is in use now, {format_size(now)}")
    if max_size > want:
        want = max_size
        steps.append(f"raised to one slot of max_size, {format_size(max_size)}")
    memory = max(MIB, -(-want // MIB) * MIB)
    return memory, f"memory {format_size(memory)}: {'; '.join(steps)}; in whole MiB."


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
