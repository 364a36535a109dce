"""Metrics: the exposition text of the stats, the collector, and ``serve --metrics-port``.

The text is parsed back with prometheus_client's own parsers and its
values checked against the stats of a real manager after real acquires;
prometheus_client's rendering of the collector must parse to the same
families. A real ``shmpool serve --metrics-port`` is scraped over HTTP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MP_TIMEOUT, wait_for
from prometheus_client import CollectorRegistry
from prometheus_client import parser as prom_parser
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from serving import Serve, child_env, free_port, listening, shmpool_cmd

import shmpool
from shmpool import cli, metrics
from shmpool.address import unique_address
from shmpool.metrics import StatsCollector, exposition, families, without_client

KiB = 1024
MiB = 1024 * KiB
pytestmark = pytest.mark.timeout(120)

#: Classes 4 KiB .. 1 MiB: a 2 MiB acquire is oversize.
SMALL: dict[str, Any] = dict(min_size="4KiB", max_size="1MiB", memory="64MiB")
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def parse_om(text: str) -> list[Any]:
    """The families of OpenMetrics text (prometheus_client's parser, which is not typed)."""
    return list(om_parser.text_string_to_metric_families(text))  # type: ignore[no-untyped-call]


def parse_prometheus(text: str) -> list[Any]:
    """The families of Prometheus 0.0.4 text."""
    return list(prom_parser.text_string_to_metric_families(text))


def openmetrics_of(registry: CollectorRegistry) -> str:
    """prometheus_client's OpenMetrics rendering of ``registry``."""
    text: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
    return text.decode()


def samples(text: str, *, openmetrics: bool = True) -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample of ``text``: (sample name, its labels) -> value."""
    parse = parse_om if openmetrics else parse_prometheus
    return {
        (s.name, frozenset(s.labels.items())): s.value for fam in parse(text) for s in fam.samples
    }


def value(found: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@pytest.fixture
def busy() -> Iterator[dict[str, Any]]:
    """A manager, a client ``metrics-test`` holding three leases (one oversize), and its stats."""
    with shmpool.start(**SMALL) as manager, manager.connect(name="metrics-test") as pool:
        leases = [pool.acquire(100_000), pool.acquire(5000), pool.acquire(2 * MiB)]
        stats = pool.stats()
        stats.pop("local")
        try:
            yield stats
        finally:
            for lease in leases:
                lease.release()


# ------------------------------------------------------------ the text


def test_openmetrics_text_matches_the_stats(busy: dict[str, Any]) -> None:
    stats = busy
    text = exposition(stats)
    assert text.endswith("# EOF\n")
    found = samples(text)
    assert value(found, "shmpool_up") == 1
    for name, key in (
        ("shmpool_committed_bytes", "committed_bytes"),
        ("shmpool_leased_bytes", "leased_bytes"),
        ("shmpool_requested_bytes", "requested_bytes"),
        ("shmpool_memory_limit_bytes", "memory_limit"),
        ("shmpool_peak_committed_bytes", "peak_committed_bytes"),
    ):
        assert value(found, name) == stats[key], name
    assert value(found, "shmpool_memory_limit_bytes") == 64 * MiB
    assert value(found, "shmpool_max_size_bytes") == MiB
    assert value(found, "shmpool_oversize_leases") == stats["oversize"]["leases"] == 1
    assert value(found, "shmpool_oversize_bytes") == stats["oversize"]["bytes"] >= 2 * MiB
    assert value(found, "shmpool_uptime_seconds") == stats["manager"]["uptime"]
    info = value(
        found,
        "shmpool_manager_info",
        address=stats["manager"]["address"],
        pid=str(stats["manager"]["pid"]),
        protocol=str(stats["manager"]["version"]),
    )
    assert info == 1


def test_class_series_match_the_stats(busy: dict[str, Any]) -> None:
    stats = busy
    found = samples(exposition(stats))
    assert len(stats["classes"]) == 9  # 4 KiB .. 1 MiB
    for c in stats["classes"]:
        size = str(c["size"])
        states = {s: value(found, "shmpool_class_slots", **{"class": size, "state": s}) for s in (
            "free", "leased", "in_transit")}  # fmt: skip
        assert states == {"free": c["free"], "leased": c["leased"], "in_transit": c["in_transit"]}
        assert sum(states.values()) == c["total"]
        assert value(found, "shmpool_class_segments", **{"class": size}) == c["segments"]
        for key in ("committed_bytes", "leased_bytes", "requested_bytes"):
            assert value(found, f"shmpool_class_{key}", **{"class": size}) == c[key]
    by_size = {c["size"]: c for c in stats["classes"]}
    assert by_size[128 * KiB]["leased"] >= 1 and by_size[8 * KiB]["leased"] >= 1
    assert value(found, "shmpool_class_requested_bytes", **{"class": str(128 * KiB)}) == 100_000


def test_client_series_match_the_stats(busy: dict[str, Any]) -> None:
    stats = busy
    found = samples(exposition(stats))
    (me,) = [c for c in stats["clients"] if c["name"] == "metrics-test"]
    labels = {"client": f"metrics-test:{os.getpid()}", "id": str(me["id"])}
    assert value(found, "shmpool_client_leased_slots", **labels) == me["leased"] >= 3
    assert value(found, "shmpool_client_requested_bytes", **labels) == 100_000 + 5000 + 2 * MiB
    assert value(found, "shmpool_client_messages_total", **labels) == me["messages"]
    assert value(found, "shmpool_client_manager_acquires_total", **labels) == me["manager_acquires"]
    assert value(found, "shmpool_client_cache_hits_total", **labels) == me["cache_hits"]
    assert value(found, "shmpool_clients") == len(stats["clients"])


def test_acquire_sizes_are_a_histogram_at_the_classes(
    busy: dict[str, Any],
) -> None:
    stats = busy
    (hist,) = [f for f in parse_om(exposition(stats)) if f.name == "shmpool_acquire_size_bytes"]
    assert hist.type == "histogram" and hist.unit == "bytes"
    buckets = [(s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")]
    assert [le for le, _ in buckets] == [str(float(4 * KiB << k)) for k in range(9)] + ["+Inf"]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)  # cumulative
    sizes = stats["request_sizes"]
    assert buckets[-1][1] == sum(n for _, n in sizes) >= 3
    for le, n in buckets[:-1]:
        assert n == sum(count for size, count in sizes if size <= float(le))


def test_types_units_and_names_follow_the_conventions(
    busy: dict[str, Any],
) -> None:
    stats = busy
    fams = list(parse_om(exposition(stats)))
    assert len({f.name for f in fams}) == len(fams)
    for fam in fams:
        assert fam.name.startswith("shmpool_"), fam.name
        assert fam.documentation, fam.name
        if fam.unit:
            assert fam.name.endswith("_" + fam.unit), fam.name
        if fam.name.endswith(("_bytes", "_seconds")):
            assert fam.unit in ("bytes", "seconds"), fam.name
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples), fam.name
        else:
            assert not fam.name.endswith("_total"), fam.name
    kinds = {f.name: f.type for f in fams}
    assert kinds["shmpool_client_cache_hits"] == "counter"
    assert kinds["shmpool_committed_bytes"] == "gauge"
    assert kinds["shmpool_manager"] == "info"


def test_prometheus_text_carries_the_same_samples(
    busy: dict[str, Any],
) -> None:
    stats = busy
    text = exposition(stats, openmetrics=False)
    assert "# EOF" not in text and "# UNIT" not in text
    assert "# TYPE shmpool_client_messages_total counter" in text
    assert samples(text, openmetrics=False) == samples(exposition(stats))


def test_the_collector_renders_the_same_families(
    busy: dict[str, Any],
) -> None:
    """prometheus_client's own rendering of StatsCollector parses to what we write."""
    stats = busy
    registry = CollectorRegistry()
    registry.register(StatsCollector(lambda: stats))
    ours = list(parse_om(exposition(stats)))
    assert list(parse_om(openmetrics_of(registry))) == ours
    assert list(parse_prometheus(generate_latest(registry).decode())) == list(
        parse_prometheus(exposition(stats, openmetrics=False))
    )


def test_a_failing_source_scrapes_as_down() -> None:
    def broken() -> dict[str, Any]:
        raise shmpool.ManagerGoneError("no manager")

    collected = list(StatsCollector(broken).collect())
    assert [(m.name, [s.value for s in m.samples]) for m in collected] == [("shmpool_up", [0])]


def test_labels_are_escaped() -> None:
    name = 'we"ird\\name\nwith {} in it'
    stats = {"clients": [{"id": 7, "pid": 42, "name": name, "leased": 1, "messages": 2}]}
    for openmetrics in (True, False):
        found = samples(exposition(stats, openmetrics=openmetrics), openmetrics=openmetrics)
        assert value(found, "shmpool_client_leased_slots", client=f"{name}:42", id="7") == 1


def test_missing_keys_leave_their_series_out() -> None:
    """An older manager's stats: only what the dict has; unnamed clients by pid."""
    old = {
        "classes": [{"size": 4096, "segments": 1, "total": 8, "free": 8, "leased": 0}],
        "oversize": {"leases": 0, "bytes": 0},
        "mapped_bytes": 1 << 20,
        "memory_limit": 1 << 30,
        "clients": [{"id": 1, "pid": 9, "name": "", "leased": 0}],
    }
    found = samples(exposition(old))
    assert value(found, "shmpool_mapped_bytes") == 1 << 20
    assert value(found, "shmpool_class_slots", **{"class": "4096", "state": "free"}) == 8
    assert value(found, "shmpool_client_leased_slots", client="9", id="1") == 0
    names = {fam.name for fam in families(old)}
    assert "shmpool_committed_bytes" not in names and "shmpool_acquire_size_bytes" not in names
    assert "shmpool_class_committed_bytes" not in names
    assert "shmpool_client_cache_hits" not in names


def test_without_client_leaves_out_only_our_own_connection() -> None:
    stats: dict[str, Any] = {
        "local": {},
        "clients": [
            {"pid": os.getpid(), "name": "shmpool stats"},
            {"pid": os.getpid(), "name": "worker"},
            {"pid": os.getpid() + 1, "name": "shmpool stats"},
        ],
    }
    out = without_client(stats, "shmpool stats")
    assert "local" not in out and len(stats["clients"]) == 3
    assert out["clients"] == stats["clients"][1:]


# ------------------------------------------------------- shmpool stats


def test_cli_stats_openmetrics(capsys: pytest.CaptureFixture[str]) -> None:
    with (
        shmpool.start(**SMALL) as manager,
        manager.connect(name="metrics-cli") as pool,
        pool.acquire(3000),
    ):
        pool.stats()  # our usage reaches the manager
        assert cli.main(["stats", "--address", manager.address, "--format", "openmetrics"]) == 0
        text = capsys.readouterr().out
        assert cli.main(["stats", "--address", manager.address, "--format", "prometheus"]) == 0
        prom = capsys.readouterr().out
    assert text.endswith("# EOF\n")
    found = samples(text)
    clients = {
        dict(labels)["client"] for name, labels in found if name.startswith("shmpool_client_")
    }
    assert clients == {f"metrics-cli:{os.getpid()}"}  # not the stats command's own connection
    mine = {"client": f"metrics-cli:{os.getpid()}"}
    assert [v for (name, labels), v in found.items() if name == "shmpool_client_requested_bytes"
            and mine.items() <= dict(labels).items()] == [3000]  # fmt: skip
    assert "# EOF" not in prom and any(fam.name == "shmpool_up" for fam in parse_prometheus(prom))


@pytest.mark.parametrize(
    "args",
    [["--json", "--format", "openmetrics"], ["--format", "yaml"]],
)
def test_cli_stats_format_refuses(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["stats", *args])
    assert exc.value.code == 2
    assert "--format" in capsys.readouterr().err


def test_cli_suggest_takes_text_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stats", "--suggest", "--format", "openmetrics"]) == 2
    assert "--suggest prints text or json" in capsys.readouterr().err


# ------------------------------------------------ serve --metrics-port


def scrape(port: int, accept: str = OPENMETRICS) -> tuple[str, str]:
    """GET /metrics: the content type and the text."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=MP_TIMEOUT) as response:
        return response.headers["Content-Type"], response.read().decode()


def scrapes(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_serve_metrics_port_is_scraped(tmp_path: Path) -> None:
    port = free_port()
    address = unique_address()
    args = ("--max-size", "1MiB", "--memory", "64MiB", "--metrics-port", str(port))
    with Serve(address, *args, log=tmp_path / "serve.log") as server:
        wait_for(lambda: scrapes(port))
        with (
            shmpool.connect(address, name="scrape-test") as pool,
            pool.acquire(2 * MiB),
            pool.acquire(100_000),
        ):
            pool.stats()  # our usage reaches the manager
            kind, text = scrape(port)
            _, plain = scrape(port, accept="text/plain")
        assert kind.startswith("application/openmetrics-text")
        found = samples(text)
        assert value(found, "shmpool_up") == 1
        assert value(found, "shmpool_oversize_leases") == 1
        assert value(found, "shmpool_memory_limit_bytes") == 64 * MiB
        mine = [
            (dict(labels), v)
            for (name, labels), v in found.items()
            if name == "shmpool_client_requested_bytes"
        ]
        assert [(labels["client"], v) for labels, v in mine] == [
            (f"scrape-test:{os.getpid()}", 2 * MiB + 100_000)
        ]  # the scrape's own connection is not listed
        leased = value(found, "shmpool_class_slots", **{"class": str(128 * KiB), "state": "leased"})
        assert leased >= 1
        assert value(found, "process_open_fds") > 0  # prometheus_client's process metrics
        assert value(samples(plain, openmetrics=False), "shmpool_up") == 1
        assert "metrics on http://127.0.0.1:" in server.text()
        assert server.stop() == 0
    assert not listening(address) and not os.path.exists(address)


def test_a_scrape_without_manager_is_down(tmp_path: Path) -> None:
    """A scrape that cannot reach the manager succeeds, saying ``shmpool_up 0``."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(lambda: metrics.read_stats(str(tmp_path / "none.sock"))))
    fams = list(parse_om(openmetrics_of(registry)))
    assert [(f.name, [s.value for s in f.samples]) for f in fams] == [("shmpool_up", [0.0])]


def test_serve_metrics_port_without_prometheus_client(tmp_path: Path) -> None:
    """A clear error naming the extra, before anything listens."""
    address = str(tmp_path / "m.sock")
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from shmpool.cli import main\n"
        f"sys.exit(main(['serve', '--address', {address!r}, '--metrics-port', '0']))\n"
    )
    result = subprocess.run(
        [shmpool_cmd()[0], "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=MP_TIMEOUT,
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'shmpool[metrics]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(address)


def test_serve_metrics_port_taken(tmp_path: Path) -> None:
    """A port in use: exit 2 with the reason, and no manager left listening."""
    address = str(tmp_path / "m.sock")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            shmpool_cmd("serve", "--address", address, "--metrics-port", str(port)),
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=MP_TIMEOUT,
        )
    assert result.returncode == 2, result.stderr
    assert "shmpool: " in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(address)


def test_metrics_port_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("SHMPOOL_METRICS_PORT", "SHMPOOL_METRICS_HOST"):
        monkeypatch.delenv(name, raising=False)
    parse = cli._parser().parse_args
    assert parse(["serve"]).metrics_port is None
    assert parse(["serve", "--metrics-port", "9464"]).metrics_port == 9464
    assert parse(["serve"]).metrics_host == "127.0.0.1"
    for bad in ("-1", "65536", "http"):
        with pytest.raises(SystemExit):
            parse(["serve", "--metrics-port", bad])
        assert "is not a TCP port number" in capsys.readouterr().err
