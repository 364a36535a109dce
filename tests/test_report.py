"""``shmpool stats`` (the table, ``--suggest``) and ``--idle-release``.

The memory figures of issue 11 come from hand-made stats dicts here, old
style and new; the command line runs against a real manager. One test needs
the manager to count acquire sizes (``request_sizes``) and skips, saying so,
while it does not.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
from typing import Any

import pytest
from conftest import wait_for
from hypothesis import given
from hypothesis import strategies as st

import shmpool
from shmpool import cli, embedded
from shmpool.manager import IDLE_RELEASE
from shmpool.report import efficiency, format_stats, format_suggestion
from shmpool.sizeclass import Classes, parse_size
from shmpool.suggest import (
    FLOOR,
    MIN_REQUESTS,
    Suggestion,
    covering,
    exact_size,
    request_histogram,
    suggest,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

WAITS_FOR_SIZES = "waits for the manager to report request_sizes (issue 11, manager side)"
WAITS_FOR_USAGE = "waits for clients to report their acquire sizes (Usage, issue 11, client side)"
WAITS_FOR_IDLE = "waits for Manager(idle_release=...) (issue 11, manager side)"


CLASS_KEYS = ("size", "segments", "total", "free", "leased", "in_transit")
CLASS_BYTES = ("committed_bytes", "leased_bytes", "requested_bytes")


def a_class(*values: int) -> dict[str, Any]:
    """A class entry from its values in the order of CLASS_KEYS, then CLASS_BYTES."""
    return dict(zip(CLASS_KEYS + CLASS_BYTES, values, strict=True))


def new_stats(**over: Any) -> dict[str, Any]:
    """A stats dict with every key of issue 11, as a manager would send it."""
    stats: dict[str, Any] = {
        "manager": {"pid": 4242, "address": "/tmp/m.sock"},
        "committed_bytes": 10 * MiB,
        "leased_bytes": 8 * MiB,
        "requested_bytes": 6 * MiB,
        "peak_committed_bytes": 40 * MiB,
        "idle_release": 30.0,
        "memory_limit": 1 * GiB,
        "mapped_bytes": 64 * MiB,
        "ticket_bytes": 4096,
        "min_size": 4 * KiB,
        "max_size": 64 * MiB,
        "request_sizes": [[4 * KiB, 9000], [64 * KiB, 1000]],
        "classes": [
            a_class(4 * KiB, 1, 1024, 900, 120, 4, 4 * MiB, 496 * KiB, 300 * KiB),
            a_class(8 * KiB, 0, 0, 0, 0, 0, 0, 0, 0),
            a_class(64 * KiB, 1, 64, 60, 4, 0, 2 * MiB, 256 * KiB, 0),
        ],
        "oversize": {"leases": 1, "bytes": 65 * MiB, "requested_bytes": 64 * MiB},
        "clients": [
            {"id": 1, "pid": 100, "name": "worker", "leased": 5, "messages": 10}
            | {"cache_hits": 1000, "requested_bytes": 3 * MiB}
        ],
    }
    stats.update(over)
    return stats


NEW_KEYS = (
    "committed_bytes",
    "leased_bytes",
    "requested_bytes",
    "peak_committed_bytes",
    "idle_release",
    "request_sizes",
)


def old_stats() -> dict[str, Any]:
    """The same stats as a manager before issue 11 sends them."""
    stats = {k: v for k, v in new_stats().items() if k not in NEW_KEYS}
    stats["classes"] = [
        {k: v for k, v in c.items() if not k.endswith("_bytes")} for c in stats["classes"]
    ]
    stats["oversize"] = {"leases": 1, "bytes": 65 * MiB}
    stats["clients"] = [
        {k: v for k, v in c.items() if k != "requested_bytes"} for c in stats["clients"]
    ]
    return stats


def hist_stats(pairs: list[list[int]], **over: Any) -> dict[str, Any]:
    """New-style stats with this acquire histogram and no leases now."""
    stats = new_stats(request_sizes=pairs, classes=[], **over)
    return stats


# ------------------------------------------------------------ format_stats


def test_format_stats_shows_memory_that_moves() -> None:
    text = format_stats(new_stats())
    head, usage, sizes, *_ = text.splitlines()
    assert "10MiB committed of 1GiB (peak 40MiB), 64MiB mapped" in head
    assert "leased 8MiB" in usage and "requested 6MiB" in usage
    assert "efficiency 1.67x (committed/requested)" in usage
    assert "idle release after 30 s" in usage
    assert sizes.startswith("acquires: 10000;") and "99% <= 64KiB" in sizes
    assert "0 oversize" in sizes
    assert "oversize: 1 lease, 65MiB (requested 64MiB)" in text
    assert "requested     3MiB" in text  # the client's


def test_format_stats_class_rows() -> None:
    lines = format_stats(new_stats()).splitlines()
    header = next(line for line in lines if line.split()[:1] == ["class"])
    assert header.split() == [
        "class", "segments", "total", "free", "leased", "transit",
        "committed", "leased", "requested", "eff",
    ]  # fmt: skip
    assert any("slots" in line and "bytes" in line for line in lines)  # the group header
    rows = {line.split()[0]: line.split() for line in lines if line.strip()[:1].isdigit()}
    assert set(rows) == {"4KiB", "64KiB"}  # the empty 8KiB class is left out
    eff = efficiency(4 * MiB, 300 * KiB)
    assert rows["4KiB"][1:] == ["1", "1024", "900", "120", "4", "4MiB", "496KiB", "300KiB", eff]
    assert rows["64KiB"][-1] == "-"  # nothing requested: no efficiency
    widths = {len(line) for line in lines if line.strip()[:1].isdigit()} | {len(header)}
    assert len(widths) == 1, "the columns line up"


@pytest.mark.parametrize(
    ("committed", "requested", "text"),
    [(142, 100, "1.42x"), (100, 100, "1.00x"), (5, 0, "-"), (0, 0, "-"), (None, 10, "-")],
)
def test_efficiency(committed: Any, requested: Any, text: str) -> None:
    assert efficiency(committed, requested) == text


def test_format_stats_nothing_requested_and_never_released() -> None:
    text = format_stats(new_stats(requested_bytes=0, idle_release=0))
    assert "efficiency - (committed/requested)" in text
    assert "idle release: never" in text


def test_format_stats_of_an_older_manager() -> None:
    text = format_stats(old_stats())
    assert text.splitlines()[0].endswith(": 64MiB mapped of 1GiB")
    for word in ("committed", "requested", "efficiency", "idle", "acquires:", "peak"):
        assert word not in text, word
    assert "oversize: 1 lease, 65MiB" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0] == ["4KiB", "1", "1024", "900", "120", "4"]


def test_format_stats_with_some_keys_only() -> None:
    """A manager part way: committed, no peak, classes without requested_bytes."""
    stats = new_stats()
    for key in ("peak_committed_bytes", "requested_bytes", "request_sizes", "idle_release"):
        del stats[key]
    for c in stats["classes"]:
        del c["requested_bytes"]
    text = format_stats(stats)
    assert "10MiB committed of 1GiB, 64MiB mapped" in text
    assert "efficiency" not in text.splitlines()[1]
    row = next(line.split() for line in text.splitlines() if line.startswith("    4KiB"))
    assert row[-2:] == ["-", "-"]


def test_format_stats_of_nearly_nothing() -> None:
    assert "oversize: 0 leases" in format_stats({})
    assert "acquires: none counted yet" in format_stats(new_stats(request_sizes=[]))


# ----------------------------------------------------------------- suggest


def test_suggest_small_sizes() -> None:
    """Mostly a few hundred bytes, a thin tail: the classes hug the requests."""
    s = suggest(
        hist_stats([[8, 3000], [128, 60000], [512, 30000], [2 * KiB, 6500], [4 * KiB, 500]])
    )
    assert (s.min_size, s.max_size) == (128, 2 * KiB)  # 3% below 128 B; 99.5% fit 2 KiB
    assert s.memory == 50 * MiB  # the 40 MiB peak + 25%
    assert s.requests == 100_000
    assert s.command() == "shmpool serve --min-size 128 --max-size 2KiB --memory 50MiB"
    assert s.start_call() == 'shmpool.start(min_size="128", max_size="2KiB", memory="50MiB")'
    assert [r.split(" ")[0] for r in s.reasons] == ["max_size", "min_size", "memory"]
    assert "500 (0.5%) go oversize" in s.reasons[0]


def test_suggest_large_sizes() -> None:
    s = suggest(
        hist_stats([[MiB, 5000], [4 * MiB, 4000], [16 * MiB, 1000]], peak_committed_bytes=300 * MiB)
    )
    assert (s.min_size, s.max_size, s.memory) == (MiB, 16 * MiB, 375 * MiB)


def test_suggest_when_most_requests_are_oversize() -> None:
    """A manager capped at 64 KiB while most acquires want 1 MiB or more."""
    stats = hist_stats([[4 * KiB, 200], [MiB, 1500], [8 * MiB, 300]], max_size=64 * KiB)
    assert "1800 oversize" in format_stats(stats)
    s = suggest(stats)
    assert (s.min_size, s.max_size) == (4 * KiB, 8 * MiB)
    assert s.current["max_size"] == 64 * KiB
    assert "(now 64KiB)" in format_suggestion(s)


def test_suggest_keeps_sizes_that_carry_the_bytes_pooled() -> None:
    """0.5% of acquires are 16 MiB but carry most bytes: oversize, each faults 16 MiB in."""
    s = suggest(hist_stats([[KiB, 99_500], [16 * MiB, 500]]))
    assert s.max_size == 16 * MiB
    assert s.reasons[1].startswith("Raised to 16MiB: the acquires sized for that class carry")


def test_suggest_keeps_the_class_in_heavy_use_now() -> None:
    classes = [
        {"size": KiB, "total": 4096, "free": 0, "leased": 4096, "leased_bytes": 4 * MiB},
        {"size": MiB, "total": 64, "free": 0, "leased": 60, "leased_bytes": 60 * MiB},
    ]
    stats = hist_stats([[KiB, 99_990], [MiB, 10]])
    stats["classes"] = classes
    s = suggest(stats)
    assert s.max_size == MiB
    assert any("holds 93.8% of the leased class bytes now" in r for r in s.reasons)


def test_suggest_never_below_a_cache_line() -> None:
    s = suggest(
        hist_stats([[8, 5000]], peak_committed_bytes=10, committed_bytes=10, leased_bytes=0)
    )
    assert (s.min_size, s.max_size, s.memory) == (FLOOR, FLOOR, MiB)
    assert any("one class" in r for r in s.reasons)


def test_suggest_memory_covers_what_is_in_use_and_the_largest_slot() -> None:
    base = [[4 * KiB, 2000]]
    assert suggest(hist_stats(base, leased_bytes=100 * MiB)).memory == 100 * MiB
    big = suggest(hist_stats([[64 * MiB, 2000]], peak_committed_bytes=MiB))
    assert big.memory == 64 * MiB
    odd = suggest(hist_stats(base, peak_committed_bytes=1000 * MiB + 1))
    assert odd.memory == 1251 * MiB and "--memory 1251MiB" in (odd.command() or "")


def test_suggest_memory_from_an_incomplete_stats_dict() -> None:
    stats = hist_stats([[4 * KiB, 2000]])
    del stats["peak_committed_bytes"]
    assert suggest(stats).memory == 13 * MiB  # committed 10 MiB, +25%, whole MiB
    del stats["committed_bytes"], stats["leased_bytes"]
    assert suggest(stats).memory == 80 * MiB  # mapped 64 MiB, +25%


@pytest.mark.parametrize(
    ("pairs", "says"),
    [
        ([[4 * KiB, MIN_REQUESTS - 1]], f"only {MIN_REQUESTS - 1} acquires counted"),
        ([[4 * KiB, 1]], "only 1 acquire counted"),
        ([], "no acquires counted"),
        ([[4 * KiB, 0]], "no acquires counted"),
    ],
)
def test_suggest_nothing_from_too_few_requests(pairs: list[list[int]], says: str) -> None:
    s = suggest(hist_stats(pairs))
    assert not s.ready and s.command() is None and s.start_call() is None
    assert (s.min_size, s.max_size, s.memory) == (None, None, None)
    assert len(s.reasons) == 1 and says in s.reasons[0]
    assert format_suggestion(s) == s.reasons[0]
    assert json.loads(json.dumps(s.to_dict()))["min_size"] is None


def test_suggest_from_an_older_manager() -> None:
    s = suggest(old_stats())
    assert not s.ready
    assert "does not count the sizes" in s.reasons[0]
    assert s.current == {"min_size": 4 * KiB, "max_size": 64 * MiB, "memory": GiB}


def test_suggest_at_the_threshold() -> None:
    assert suggest(hist_stats([[4 * KiB, MIN_REQUESTS]])).ready


def test_suggestion_to_dict() -> None:
    s = suggest(hist_stats([[4 * KiB, 9000], [64 * KiB, 1000]]))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["command"] == s.command() and d["start"] == s.start_call()
    assert (d["min_size"], d["max_size"], d["memory"]) == (s.min_size, s.max_size, s.memory)
    assert d["requests"] == 10_000 and d["reasons"] == list(s.reasons)
    assert d["current"] == {"min_size": 4 * KiB, "max_size": 64 * MiB, "memory": GiB}


def test_suggested_command_parses_back() -> None:
    """What we print is what ``shmpool serve`` understands, to the byte."""
    s = suggest(hist_stats([[8, 3000], [128, 60000], [2 * KiB, 36500], [4 * KiB, 500]]))
    assert s.command() is not None
    args = cli._parser().parse_args(s.command().split()[1:])
    classes = Classes(args.min_size, args.max_size)
    assert (classes.min_size, classes.max_size) == (s.min_size, s.max_size)
    assert parse_size(args.memory) == s.memory


_histograms = st.dictionaries(
    st.integers(0, 40).map(lambda k: 1 << k), st.integers(1, 10**6), min_size=1, max_size=12
)


@given(_histograms)
def test_suggest_rules_hold(counts: dict[int, int]) -> None:
    pairs = sorted([size, n] for size, n in counts.items())
    total = sum(counts.values())
    s = suggest(hist_stats(pairs))
    if total < MIN_REQUESTS:
        assert not s.ready
        return
    assert s.min_size is not None and s.max_size is not None and s.memory is not None
    for size in (s.min_size, s.max_size):
        assert size & (size - 1) == 0
    assert FLOOR <= s.min_size <= s.max_size
    assert s.memory % MiB == 0 and s.memory >= s.max_size
    above = sum(n for size, n in counts.items() if size > s.max_size)
    assert above * 100 <= (100 - 99) * total  # at most 1% go oversize
    below = sum(n for size, n in counts.items() if size < s.min_size)
    assert s.min_size == FLOOR or below * 100 <= 5 * total


def test_covering_and_histogram() -> None:
    hist = request_histogram({"request_sizes": [[1, 1], [3, 1], [4, 2], [1024, 0]]})
    assert hist == [(1, 1), (4, 3)]  # 3 is no power of two: counted as 4; empty left out
    assert request_histogram({}) is None
    assert covering(hist, 25) == 1 and covering(hist, 26) == 4 and covering(hist, 100) == 4
    assert covering([], 50) is None


@pytest.mark.parametrize(
    ("n", "text"),
    [(64, "64"), (4 * KiB, "4KiB"), (1229 * MiB, "1229MiB"), (2 * GiB, "2GiB"), (1536, "1536")],
)
def test_exact_size(n: int, text: str) -> None:
    assert exact_size(n) == text
    assert parse_size(text) == n


def test_format_suggestion() -> None:
    s = suggest(hist_stats([[4 * KiB, 9000], [64 * KiB, 1000]]))
    text = format_suggestion(s)
    assert text.startswith("Suggested settings, from 10000 acquires")
    assert "min_size      4KiB  (now 4KiB)" in text
    assert "memory       50MiB  (now 1GiB)" in text
    assert text.count("\n  - ") == len(s.reasons)
    assert text.splitlines()[-2:] == [f"  {s.command()}", f"  {s.start_call()}"]
    bare = Suggestion(64, 64, MiB, ("why",), 1000)  # a manager that sent no settings
    assert ["min_size", "64B"] in [line.split() for line in format_suggestion(bare).splitlines()]


# ----------------------------------------------------- the command line


def test_cli_stats_table_and_json(
    manager: shmpool.ManagerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["stats", "--address", manager.address]) == 0
    assert f"manager pid {manager.pid}" in capsys.readouterr().out
    assert cli.main(["stats", "--address", manager.address, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert "classes" in stats and "local" not in stats


def test_cli_suggest_without_enough_acquires(
    manager: shmpool.ManagerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before issue 11's manager: no histogram; after it: too few. Either way exit 0."""
    assert cli.main(["stats", "--address", manager.address, "--suggest"]) == 0
    assert capsys.readouterr().out.startswith("No suggestion: ")
    assert cli.main(["stats", "--address", manager.address, "--suggest", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["min_size"] is None and d["command"] is None and d["reasons"]
    assert d["current"]["memory"] == 64 * MiB


def test_cli_suggest_with_a_histogram(
    manager: shmpool.ManagerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The ready path of ``--suggest``, whatever the manager counts: the sizes added here."""
    real = shmpool.Pool.stats

    def stats(pool: shmpool.Pool) -> dict[str, Any]:
        return {**real(pool), "request_sizes": [[4 * KiB, 9000], [64 * KiB, 1000]]}

    monkeypatch.setattr(shmpool.Pool, "stats", stats)
    assert cli.main(["stats", "--address", manager.address, "--suggest"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Suggested settings, from 10000 acquires")
    assert "(now 64MiB)" in text  # the fixture's budget
    assert "  shmpool serve --min-size 4KiB --max-size 64KiB --memory " in text
    assert cli.main(["stats", "--address", manager.address, "--suggest", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["min_size"], d["max_size"], d["requests"]) == (4 * KiB, 64 * KiB, 10_000)
    assert d["memory"] >= MiB and d["command"].startswith("shmpool serve --min-size 4KiB")


def test_cli_suggest_from_real_acquires(
    manager: shmpool.ManagerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    if "request_sizes" not in manager.stats():
        pytest.skip(WAITS_FOR_SIZES)
    wanted = MIN_REQUESTS + 200
    with manager.connect(name="sizes") as pool:
        for i in range(wanted):
            with pool.acquire(50_000 if i % 10 == 0 else 3000):
                pass

        def counted() -> int:  # clients report their counts now and then
            with pool.acquire(3000):
                pass
            return sum(n for _, n in manager.stats()["request_sizes"])

        try:
            wait_for(lambda: counted() >= wanted, timeout=10, interval=0.1)
        except AssertionError:
            if counted() == 0:
                pytest.skip(WAITS_FOR_USAGE)
            raise
        assert cli.main(["stats", "--address", manager.address, "--suggest"]) == 0
        text = capsys.readouterr().out
        assert "shmpool serve --min-size 4KiB --max-size 64KiB --memory " in text
        assert cli.main(["stats", "--address", manager.address, "--suggest", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
    assert (d["min_size"], d["max_size"]) == (4 * KiB, 64 * KiB)
    assert d["memory"] % MiB == 0 and d["memory"] >= 64 * KiB
    assert d["requests"] >= wanted


# ------------------------------------------------------------ idle_release


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", ""])
def test_cli_idle_release_refuses_bad_values(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--idle-release", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--idle-release" in err and "is not a number of seconds >= 0 (0: never)" in err


def test_cli_idle_release_parses() -> None:
    parse = cli._parser().parse_args
    assert parse(["serve", "--idle-release", "0"]).idle_release == 0.0
    assert parse(["serve", "--idle-release", "2.5"]).idle_release == 2.5
    assert parse(["serve"]).idle_release == IDLE_RELEASE == 30.0


class _FakeManager:
    made: list[dict[str, Any]] = []

    def __init__(self, address: str | None, **kwargs: Any) -> None:
        self.made.append(kwargs)

    def serve(self, **kwargs: Any) -> None:
        pass


def test_cli_serve_passes_idle_release(monkeypatch: pytest.MonkeyPatch) -> None:
    import shmpool.manager

    monkeypatch.setattr(shmpool.manager, "Manager", _FakeManager)
    _FakeManager.made.clear()
    assert cli.main(["serve", "--idle-release", "2.5"]) == 0
    assert cli.main(["serve"]) == 0
    assert _FakeManager.made[0]["idle_release"] == 2.5
    assert _FakeManager.made[1]["idle_release"] == IDLE_RELEASE


class _Launched(Exception):
    pass


def test_start_passes_idle_release(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.append(cmd)
        raise _Launched  # start() closes its pipes and lets this through

    monkeypatch.setattr(embedded.subprocess, "Popen", popen)
    for value in (0, 0.5, None):
        with pytest.raises(_Launched):
            shmpool.start(idle_release=value)
    assert seen[0][seen[0].index("--idle-release") + 1] == "0"
    assert seen[1][seen[1].index("--idle-release") + 1] == "0.5"
    assert "--idle-release" not in seen[2]
    for cmd in seen[:2]:  # what start() passes, serve parses back
        value = cmd[cmd.index("--idle-release") + 1]
        assert cli._parser().parse_args(["serve", "--idle-release", value]).idle_release >= 0


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("5", TypeError),
     (True, TypeError)],
)  # fmt: skip
def test_start_refuses_bad_idle_release(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="idle_release"):
        shmpool.start(idle_release=value)


def test_start_with_idle_release() -> None:
    if "idle_release" not in inspect.signature(shmpool.Manager).parameters:
        pytest.skip(WAITS_FOR_IDLE)
    with shmpool.start(memory="16MiB", idle_release=0) as mgr:
        stats = mgr.stats()
        assert stats.get("idle_release", 0) == 0
    assert not mgr.running
