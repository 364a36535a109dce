"""``shmpool bench``: the shape of its report (never its timings, machines are noisy)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

from shmpool import _native, bench
from shmpool.sizeclass import format_size

SIZES = (4096, 65536)
PER_SIZE = (
    "shmpool.acquire_release",
    "shmpool.acquire_release_cold",
    "shmpool.acquire_write_release",
    "bytearray",
    "bytearray.touch",
    "shared_memory.create_unlink",
    "shared_memory.create_touch_unlink",
    "posix_ipc.create_unlink",
    "shared_memory_manager.create",
    "floor.memoryview_slice",
)
ONCE = (
    "floor.socket_roundtrip",
    "floor.pipe_message",
    "scaling.1",
    "scaling.2",
    "manager.request",
    "manager.request_under_stats_spam",
)
HANDOFF = ("handoff.shmpool", "handoff.queue", "handoff.pipe")
#: Per size in ``bench.RECOMMIT_SIZES``: the first acquire of a slot whose pages went back, or not.
MEMORY = ("memory.recommit", "memory.committed")
PHASE_KEYS = {
    "phase", "acquired", "failed", "skipped", "held_bytes", "requested_bytes",
    "workers_requested_bytes", "leased_bytes", "committed_bytes", "committed/requested", "seconds",
}  # fmt: skip
#: The CLI run is only worth it while it stays a smoke test.
CLI_BUDGET = 60

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return bench.run(quick=True, sizes=SIZES)


def _check_report(report: dict[str, Any], sizes: tuple[int, ...]) -> None:
    assert set(report) == {"results", "ratios", "machine", "memory"}
    results = report["results"]
    keys = [(r["case"], r["size"]) for r in results]
    assert len(keys) == len(set(keys)), "a case was reported twice"
    for case in PER_SIZE:
        for size in sizes:
            assert (case, size) in keys, (case, size)
    names = {case for case, _ in keys}
    for case in ONCE:
        assert case in names, case
        assert sum(1 for c, _ in keys if c == case) == 1, case
    for case in HANDOFF:
        for size in bench.HANDOFF_SIZES:
            assert (case, size) in keys, (case, size)
    for case in MEMORY:
        for size in bench.RECOMMIT_SIZES:
            assert (case, size) in keys, (case, size)
    expected = set(PER_SIZE) | set(ONCE) | set(HANDOFF) | set(MEMORY)
    optional = {"handoff.iceoryx2"}  # only when the optional iceoryx2 package is installed
    assert expected <= names <= expected | optional, names ^ expected
    for r in results:
        assert set(r) == {"case", "size", "median_ns", "min_ns", "max_ns"}, r
        assert isinstance(r["case"], str) and isinstance(r["size"], int)
        for key in ("median_ns", "min_ns", "max_ns"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), r
        assert 0 < r["min_ns"] <= r["median_ns"] <= r["max_ns"], r

    ratios = report["ratios"]
    assert ratios
    for name, entry in ratios.items():
        assert isinstance(name, str)
        assert set(entry) == {"value", "want"}, (name, entry)
        assert isinstance(entry["value"], (int, float)) and math.isfinite(entry["value"]), name
        if name.startswith(("memory.idle", "memory.shift acquires failed")):
            assert entry["value"] >= 0, (name, entry)  # a share left, a count: 0 is the aim
        else:
            assert entry["value"] > 0, (name, entry)
        assert isinstance(entry["want"], str), (name, entry)
    assert "steady.pairs_per_message" in ratios
    assert "scaling.2_over_1" in ratios
    for name in MEMORY_RATIOS:
        assert name in ratios, name
    assert ratios["memory.shift acquires failed (count)"]["want"] == "<= 0"
    assert (
        ratios["memory.shift acquires failed (count)"]["value"]
        == report["memory"]["shift"]["failed"]
    )
    assert ratios["memory.shift mixed peak committed/requested"]["want"] == "<= 2"
    _check_memory(report["memory"])
    for size in sizes:
        assert any(name.endswith(f"@{format_size(size)}") for name in ratios), size

    machine = report["machine"]
    assert machine["python"] == sys.version.split()[0]
    assert isinstance(machine["cpus"], int) and machine["cpus"] >= 1

    again = json.loads(json.dumps(report))
    assert again == report


MEMORY_RATIOS = (
    "memory.shift acquires failed (count)",
    "memory.shift mixed peak committed/requested",
    "memory.idle (free) committed left/peak at 2x idle_release",
    "memory.idle (cached) committed left/peak at 2x idle_release",
    "memory.recommit/memory.committed@64KiB",
    "memory.recommit/memory.committed@1MiB",
)


def _check_memory(memory: dict[str, Any]) -> None:
    """The memory cases' figures: complete, and the books add up (no targets: those
    are the report's to judge)."""
    assert set(memory) == {"shift", "idle", "recommit"}
    shift = memory["shift"]
    names = [ph["phase"] for ph in shift["phases"]]
    assert names[:3] == ["small", "large", "oversize"], names
    assert names[3:] == [f"mixed.{i}" for i in range(1, shift["rounds"] + 1)], names
    assert shift["rounds"] >= 1
    budget = shift["budget"]
    for ph in shift["phases"]:
        assert set(ph) == PHASE_KEYS, ph
        for key in PHASE_KEYS - {"phase", "committed/requested", "seconds"}:
            assert isinstance(ph[key], int) and ph[key] >= 0, (key, ph)
        assert ph["acquired"] > 0, ph
        # What the manager was told is what the workers count (each flushed its Usage).
        assert ph["requested_bytes"] == ph["workers_requested_bytes"] > 0, ph
        # Slots hold at least what was asked; leased adds the caches to the slots held.
        assert ph["requested_bytes"] <= ph["held_bytes"] <= ph["leased_bytes"], ph
        assert ph["leased_bytes"] <= ph["committed_bytes"] <= budget, ph
        assert ph["committed/requested"] == ph["committed_bytes"] / ph["requested_bytes"]
    assert shift["acquired"] == sum(ph["acquired"] for ph in shift["phases"])
    assert shift["failed"] == sum(ph["failed"] for ph in shift["phases"])
    assert shift["skipped"] == sum(ph["skipped"] for ph in shift["phases"])
    assert 0 < shift["peak_committed_bytes"] <= budget
    assert shift["mixed_peak_ratio"] == max(
        ph["committed/requested"] for ph in shift["phases"] if ph["phase"].startswith("mixed")
    )

    idle = memory["idle"]
    assert idle["idle_release"] > 0 and idle["deadline"] > idle["idle_release"]
    for run in ("free", "cached"):
        r = idle[run]
        assert set(r) == {"peak_bytes", "seconds", "left", "left_bytes"}, r
        assert r["peak_bytes"] > 0 and 0 <= r["left_bytes"] <= r["peak_bytes"], r
        assert r["left"] == r["left_bytes"] / r["peak_bytes"], r
        assert r["seconds"] is None or 0 <= r["seconds"] <= idle["deadline"], r

    recommit = memory["recommit"]
    assert [n for n, _ in recommit["slots_per_pass"]] == list(bench.RECOMMIT_SIZES)
    assert all(count >= 1 for _, count in recommit["slots_per_pass"])
    # The oversize push took every free page back: the recommit passes did recommit.
    assert recommit["left_committed_bytes"] == 0


def test_report_shape(report: dict[str, Any]) -> None:
    _check_report(report, SIZES)


def test_report_lists_only_the_sizes_asked_for(report: dict[str, Any]) -> None:
    sizes = {r["size"] for r in report["results"] if r["case"] in PER_SIZE}
    assert sizes == set(SIZES)


def test_format_report_mentions_every_case(report: dict[str, Any]) -> None:
    text = bench.format_report(report)
    for case in (*PER_SIZE, *ONCE, *MEMORY, *MEMORY_RATIOS, "memory.shift", "memory.idle"):
        assert case in text, case
    for phase in report["memory"]["shift"]["phases"]:
        assert f"\n{phase['phase']} " in text, phase["phase"]
    assert report["machine"]["python"] in text


def test_cli_bench_quick_json() -> None:
    env = dict(os.environ)
    env.pop("SHMPOOL_ADDRESS", None)
    try:
        done = subprocess.run(
            # Python 3.12+ warns of a fork in a multi-threaded process: the
            # bench must fork none (a queue's feeder thread once made it).
            [
                sys.executable,
                "-W",
                "always::DeprecationWarning",
                "-m",
                "shmpool",
                "bench",
                "--quick",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=CLI_BUDGET,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"`shmpool bench --quick` took over {CLI_BUDGET} s on this machine")
    assert done.returncode == 0, done.stderr
    if _native.speedups is not None:  # without it a janitor may run at a fork (design.md)
        assert "multi-threaded" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    sizes = tuple(sorted({r["size"] for r in report["results"] if r["case"] in PER_SIZE}))
    assert set(SIZES) <= set(sizes)
    _check_report(report, sizes)
