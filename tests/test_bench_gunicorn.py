"""``python -m shmpool.bench_gunicorn``: the shape of its report (never its timings).

One tiny run through the command line (a real gunicorn, stopped at the end),
then checks that every cell and ratio is there for both variants, that
gunicorn and its manager are gone, and (the autouse ``_no_leaks`` fixture,
and here explicitly) that nothing is left in /dev/shm.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import MP_TIMEOUT, shm_names

from shmpool import bench_gunicorn

pytest.importorskip("gunicorn")

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]

SIZES = (4096, 65536)
ROUNDS = 2
REQUESTS = 3
CELL_KEYS = {
    "endpoint", "variant", "size", "rps", "rps_best", "p50_ms", "p99_ms",
    "server_cpu_ms", "client_cpu_ms", "requests", "rounds",
}  # fmt: skip


def _bench_processes() -> set[int]:
    """Live processes that run in a directory of the bench's (gunicorn, its manager, ...)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if "shmpool-bench-gunicorn-" in os.readlink(f"/proc/{entry}/cwd"):
                    found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    before = shm_names()
    running = _bench_processes()
    cmd = [
        sys.executable, "-m", "shmpool.bench_gunicorn", "--json", "--workers", "1",
        "--concurrency", "2", "--rounds", str(ROUNDS), "--requests", str(REQUESTS),
        *[arg for size in SIZES for arg in ("--body-size", str(size))],
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=5 * MP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert not shm_names() - before
    assert not _bench_processes() - running, "a process of the bench was left running"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_every_cell_for_both_variants(report: dict[str, Any]) -> None:
    cells = {(r["endpoint"], r["variant"], r["size"]): r for r in report["results"]}
    want = {
        (endpoint, variant, size)
        for endpoint in bench_gunicorn.ENDPOINTS
        for variant in bench_gunicorn.VARIANTS
        for size in SIZES
    }
    assert set(cells) == want
    assert len(report["results"]) == len(want)
    for cell in report["results"]:
        assert set(cell) == CELL_KEYS, cell
        assert cell["requests"] == ROUNDS * REQUESTS
        assert len(cell["rounds"]) == ROUNDS
        for figure in ("rps", "rps_best", "p50_ms", "p99_ms"):
            assert math.isfinite(cell[figure]) and cell[figure] > 0, (figure, cell)
        assert cell["p50_ms"] <= cell["p99_ms"]
        assert cell["rps"] <= cell["rps_best"]
        assert cell["server_cpu_ms"] >= 0 and cell["client_cpu_ms"] >= 0


def test_a_ratio_per_endpoint_and_size(report: dict[str, Any]) -> None:
    ratios = {(q["endpoint"], q["size"]): q for q in report["ratios"]}
    assert set(ratios) == {(e, s) for e in bench_gunicorn.ENDPOINTS for s in SIZES}
    for q in report["ratios"]:
        assert len(q["rounds"]) == ROUNDS
        assert q["rps"] > 0 and q["p50"] > 0
        assert q["server_cpu"] is None or q["server_cpu"] >= 0  # CPU clocks tick coarsely
    setup = report["setup"]
    assert setup["workers"] == 1 and setup["concurrency"] == 2 and setup["rounds"] == ROUNDS
    assert report["machine"]["cpus"] == os.cpu_count()


def test_the_tables_name_every_cell(report: dict[str, Any]) -> None:
    text = bench_gunicorn.format_report(report)
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith(("| report ", "| checksum "))]
    assert len(rows) == len(report["results"]) + len(report["ratios"])
    for variant in bench_gunicorn.VARIANTS:
        assert sum(f"| {variant} |" in row for row in rows) == len(SIZES) * 2
