"""``shmpool bench``: the shape of its report (never its timings, machines are noisy)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

from shmpool import bench
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
#: The CLI run is only worth it while it stays a smoke test.
CLI_BUDGET = 60

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return bench.run(quick=True, sizes=SIZES)


def _check_report(report: dict[str, Any], sizes: tuple[int, ...]) -> None:
    assert set(report) == {"results", "ratios", "machine"}
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
    expected = set(PER_SIZE) | set(ONCE) | set(HANDOFF)
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
        assert entry["value"] > 0, (name, entry)
        assert isinstance(entry["want"], str), (name, entry)
    assert "steady.pairs_per_message" in ratios
    assert "scaling.2_over_1" in ratios
    for size in sizes:
        assert any(name.endswith(f"@{format_size(size)}") for name in ratios), size

    machine = report["machine"]
    assert machine["python"] == sys.version.split()[0]
    assert isinstance(machine["cpus"], int) and machine["cpus"] >= 1

    again = json.loads(json.dumps(report))
    assert again == report


def test_report_shape(report: dict[str, Any]) -> None:
    _check_report(report, SIZES)


def test_report_lists_only_the_sizes_asked_for(report: dict[str, Any]) -> None:
    sizes = {r["size"] for r in report["results"] if r["case"] in PER_SIZE}
    assert sizes == set(SIZES)


def test_format_report_mentions_every_case(report: dict[str, Any]) -> None:
    text = bench.format_report(report)
    for case in (*PER_SIZE, *ONCE):
        assert case in text, case
    assert report["machine"]["python"] in text


def test_cli_bench_quick_json() -> None:
    env = dict(os.environ)
    env.pop("SHMPOOL_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shmpool", "bench", "--quick", "--json"],
            capture_output=True,
            text=True,
            timeout=CLI_BUDGET,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"`shmpool bench --quick` took over {CLI_BUDGET} s on this machine")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    sizes = tuple(sorted({r["size"] for r in report["results"] if r["case"] in PER_SIZE}))
    assert set(SIZES) <= set(sizes)
    _check_report(report, sizes)
