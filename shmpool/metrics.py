"""Prometheus/OpenMetrics exposition of a manager's statistics.

Three layers, each usable alone:

- ``families(stats)`` turns a ``stats()`` dict into metric families, with
  no I/O and no dependency: names, types, units, help texts and samples.
- ``exposition(stats)`` renders them as text, OpenMetrics 1.0 (``# EOF``
  at the end) or the older Prometheus text format 0.0.4
  (``shmpool stats --format openmetrics|prometheus``).
- ``StatsCollector`` yields the same families to ``prometheus_client``
  (an optional dependency: ``pip install 'shmpool[metrics]'``), and
  ``serve_metrics`` serves them over HTTP (``shmpool serve --metrics-port``).

The collector reads the statistics the way ``shmpool stats`` does: it
connects to the manager, asks, and disconnects, once per scrape. The
manager builds the reply between two turns of its loop, where its books
are consistent; reading them from the HTTP thread directly would race the
loop, and a scrape must never make the loop wait. The scraper's own
connection is left out of the per-client series: its pid changes with
every ``shmpool stats`` run, and each new pid would make new series.

Naming follows the Prometheus and OpenMetrics conventions: the prefix
``shmpool_``, base units in the name (``_bytes``, ``_seconds``), counters
end in ``_total``, per-class series carry ``class="<slot size in bytes>"``
and per-client series ``client="<name>:<pid>"`` and ``id="<connection
id>"`` (one process may hold several connections of one name). A key the
stats dict lacks (an older manager) leaves its family out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "INSTALL_HINT",
    "SCRAPER_NAME",
    "Family",
    "MetricsServer",
    "Sample",
    "StatsCollector",
    "exposition",
    "families",
    "have_prometheus_client",
    "read_stats",
    "serve_metrics",
    "without_client",
]

PREFIX = "shmpool_"
#: What to install for ``--metrics-port``.
INSTALL_HINT = "pip install 'shmpool[metrics]'"
#: The client name of the collector's connection to the manager.
SCRAPER_NAME = "shmpool metrics"
#: Seconds a scrape waits for the manager (Prometheus' default scrape timeout is 10 s).
SCRAPE_TIMEOUT = 5.0

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    """One line of a family: ``<family name><suffix>{labels} value``."""

    suffix: str
    labels: Labels
    value: float


@dataclass(frozen=True)
class Family:
    """One metric family: OpenMetrics name (no ``_total``), type, unit, help, samples."""

    name: str
    type: str  # "gauge", "counter", "info" or "histogram"
    help: str
    unit: str
    samples: tuple[Sample, ...]


# --------------------------------------------------------------- the table

# (name without the prefix, where in the stats dict, unit, help) of the gauges
# of the whole manager; the unit, when there is one, ends the name.
_GAUGES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("memory_limit_bytes", ("memory_limit",), "bytes",
     "The memory budget: the most bytes of slots backed by memory at once."),
    ("committed_bytes", ("committed_bytes",), "bytes",
     "Bytes of slots backed by memory now (what the budget counts)."),
    ("peak_committed_bytes", ("peak_committed_bytes",), "bytes",
     "The most bytes committed at once since the manager started."),
    ("leased_bytes", ("leased_bytes",), "bytes",
     "Capacity of the slots out with clients (leased or cached, in transit, shared)."),
    ("requested_bytes", ("requested_bytes",), "bytes",
     "Bytes the open leases asked for, as clients last reported."),
    ("mapped_bytes", ("mapped_bytes",), "bytes", "Bytes of segments the manager has mapped."),
    ("ticket_bytes", ("ticket_bytes",), "bytes",
     "Bytes of ticket words at the start of segments, on top of the budget."),
    ("min_size_bytes", ("min_size",), "bytes", "The smallest size class."),
    ("max_size_bytes", ("max_size",), "bytes", "The largest size class."),
    ("idle_release_seconds", ("idle_release",), "seconds",
     "Seconds a free slot stays unused before its pages go back to the system (0: never)."),
    ("in_transit_slots", ("in_transit",), "",
     "Slots handed to another process (detached or lent) and not yet attached."),
    ("shared_slots", ("shared",), "", "Slots shared read-only with readers (Lease.share())."),
    ("oversize_leases", ("oversize", "leases"), "",
     "Open oversize leases (larger than the largest class)."),
    ("oversize_bytes", ("oversize", "bytes"), "bytes", "Bytes of the open oversize leases."),
    ("oversize_requested_bytes", ("oversize", "requested_bytes"), "bytes",
     "Bytes the open oversize leases asked for."),
    ("uptime_seconds", ("manager", "uptime"), "seconds", "Seconds since the manager started."),
    ("connections", ("manager", "connections"), "", "Client connections open now."),
    ("quarantined_connections", ("manager", "quarantined"), "",
     "Connections the manager closed whose slots wait for their process to exit."),
    ("queued_bytes", ("manager", "queued_bytes"), "bytes",
     "Reply bytes queued for clients and not yet read by them."),
    ("throttled_connections", ("manager", "throttled"), "",
     "Connections not read from until they read their replies."),
    ("waiting_acquires", ("manager", "waiting"), "",
     "Acquires waiting for slots recalled from other clients."),
)  # fmt: skip

# (name, key in a class entry, unit, help): gauges per size class
_CLASS_GAUGES = (
    ("class_segments", "segments", "", "Shared-memory segments of this size class."),
    ("class_committed_bytes", "committed_bytes", "bytes",
     "Bytes of this class's slots backed by memory."),
    ("class_leased_bytes", "leased_bytes", "bytes",
     "Capacity of this class's slots out with clients."),
    ("class_requested_bytes", "requested_bytes", "bytes",
     "Bytes the open leases of this class asked for."),
)  # fmt: skip
_SLOT_STATES = (("free", "free"), ("leased", "leased"), ("in_transit", "in_transit"))

# (name, key in a client entry, type, unit, help): series per client connection
_CLIENT_SERIES = (
    ("client_leased_slots", "leased", "gauge", "",
     "Slots held by this connection: its leases and its process's cached free slots."),
    ("client_cached_slots", "cached", "gauge", "",
     "Free slots cached by this connection's process."),
    ("client_requested_bytes", "requested_bytes", "gauge", "bytes",
     "Bytes this connection's open leases asked for, as it last reported."),
    ("client_messages", "messages", "counter", "",
     "Messages the manager received on this connection."),
    ("client_manager_acquires", "manager_acquires", "counter", "",
     "Slots the manager granted to this connection (refills of its cache)."),
    ("client_cache_hits", "cache_hits", "counter", "",
     "Acquires this connection's process served from its local cache, as it last reported."),
)  # fmt: skip


# ------------------------------------------------------------ the families


def families(stats: dict[str, Any]) -> list[Family]:
    """The metric families of a ``Pool.stats()`` / ``Manager.stats()`` dict, in a fixed order.

    Pure: no I/O. ``shmpool_up`` is 1 (the stats were read). Values the dict
    lacks, or that are not numbers, leave their series out.
    """
    out = [_family("up", "gauge", "", "1 if the manager's statistics were read.", [((), 1)])]
    out += _manager_info(stats)
    for name, path, unit, text in _GAUGES:
        value = _number(_lookup(stats, path))
        if value is not None:
            out.append(_family(name, "gauge", unit, text, [((), value)]))
    clients = stats.get("clients")
    if isinstance(clients, list):
        listed = len(clients) + (_number(stats.get("clients_omitted")) or 0)
        out.append(
            _family("clients", "gauge", "", "Clients connected (past their Hello).", [((), listed)])
        )
    out += _class_families(stats)
    out += _histogram(stats)
    out += _client_families(stats)
    return out


def _family(
    name: str, kind: str, unit: str, text: str, rows: Sequence[tuple[Labels, float]]
) -> Family:
    suffix = {"counter": "_total", "info": "_info"}.get(kind, "")
    samples = tuple(Sample(suffix, labels, value) for labels, value in rows)
    return Family(PREFIX + name, kind, text, unit, samples)


def _manager_info(stats: dict[str, Any]) -> list[Family]:
    mgr = stats.get("manager")
    if not isinstance(mgr, dict):
        return []
    labels = tuple(
        (label, str(mgr[key]))
        for label, key in (("address", "address"), ("pid", "pid"), ("protocol", "version"))
        if key in mgr
    )
    return [
        _family("manager", "info", "", "The manager: its socket, pid and protocol.", [(labels, 1)])
    ]


def _class_families(stats: dict[str, Any]) -> list[Family]:
    classes = [c for c in stats.get("classes", []) if isinstance(c, dict) and "size" in c]
    out = []
    rows: list[tuple[Labels, float]] = [
        ((("class", str(c["size"])), ("state", state)), value)
        for c in classes
        for state, key in _SLOT_STATES
        if (value := _number(c.get(key))) is not None
    ]
    if rows:
        text = "Slots of this size class by state; their sum is the class's slots."
        out.append(_family("class_slots", "gauge", "", text, rows))
    for name, key, unit, text in _CLASS_GAUGES:
        rows = [
            ((("class", str(c["size"])),), value)
            for c in classes
            if (value := _number(c.get(key))) is not None
        ]
        if rows:
            out.append(_family(name, "gauge", unit, text, rows))
    return out


def _histogram(stats: dict[str, Any]) -> list[Family]:
    """The sizes clients acquired, since the manager started: buckets at the size classes.

    ``request_sizes`` counts acquires of ``2**(k-1) < n <= 2**k`` bytes; the
    buckets are the classes (stable from one scrape to the next), sizes below
    the smallest class fall in its bucket and sizes above the largest in
    ``+Inf`` only. There is no ``_sum``: the exact sizes are not kept.
    """
    pairs = stats.get("request_sizes")
    if not isinstance(pairs, list):
        return []
    counts = [(int(size), int(n)) for size, n in pairs]
    low, high = stats.get("min_size"), stats.get("max_size")
    if isinstance(low, int) and isinstance(high, int) and 0 < low <= high:
        bounds = [1 << k for k in range(low.bit_length() - 1, high.bit_length())]
    else:
        bounds = sorted(size for size, _ in counts)
    rows: list[tuple[Labels, float]] = [
        ((("le", _le(bound)),), sum(n for size, n in counts if size <= bound)) for bound in bounds
    ]
    rows.append(((("le", "+Inf"),), sum(n for _, n in counts)))
    text = "Sizes of the acquires clients reported, in buckets at the size classes."
    samples = tuple(Sample("_bucket", labels, value) for labels, value in rows)
    return [Family(PREFIX + "acquire_size_bytes", "histogram", text, "bytes", samples)]


def _client_families(stats: dict[str, Any]) -> list[Family]:
    clients = [c for c in stats.get("clients", []) if isinstance(c, dict) and "pid" in c]
    out = []
    for name, key, kind, unit, text in _CLIENT_SERIES:
        rows = [
            (_client_labels(c), value)
            for c in clients
            if (value := _number(c.get(key))) is not None
        ]
        if rows:
            out.append(_family(name, kind, unit, text, rows))
    return out


def _client_labels(client: dict[str, Any]) -> Labels:
    name = str(client.get("name") or "")
    who = f"{name}:{client['pid']}" if name else str(client["pid"])
    return (("client", who), ("id", str(client.get("id", ""))))


def _lookup(stats: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = stats
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _le(bound: int) -> str:
    return repr(float(bound))  # "4096.0", as prometheus_client writes bucket bounds


# ---------------------------------------------------------------- the text


def exposition(stats: dict[str, Any], *, openmetrics: bool = True) -> str:
    """``families(stats)`` as exposition text: OpenMetrics 1.0, or Prometheus text 0.0.4.

    OpenMetrics (``application/openmetrics-text; version=1.0.0``) has
    ``# UNIT`` lines and ends with ``# EOF``; the Prometheus text format
    (``text/plain; version=0.0.4``, what node_exporter's textfile collector
    reads) names counters by their ``_total`` samples.
    """
    lines: list[str] = []
    for fam in families(stats):
        lines += _om_family(fam) if openmetrics else _prom_family(fam)
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _om_family(fam: Family) -> list[str]:
    lines = [f"# HELP {fam.name} {_escape(fam.help, quote=True)}", f"# TYPE {fam.name} {fam.type}"]
    if fam.unit:
        lines.append(f"# UNIT {fam.name} {fam.unit}")
    lines += [_sample_line(fam.name, s) for s in fam.samples]
    return lines


def _prom_family(fam: Family) -> list[str]:
    # 0.0.4 has no counter/info split of names, and no info type: an info is a gauge
    name = fam.name + ("_total" if fam.type == "counter" else "_info" if fam.type == "info" else "")
    kind = "gauge" if fam.type == "info" else fam.type
    lines = [f"# HELP {name} {_escape(fam.help, quote=False)}", f"# TYPE {name} {kind}"]
    lines += [_sample_line(fam.name, s) for s in fam.samples]
    return lines


def _sample_line(name: str, sample: Sample) -> str:
    labels = ",".join(f'{key}="{_escape(value, quote=True)}"' for key, value in sample.labels)
    return f"{name}{sample.suffix}{'{' + labels + '}' if labels else ''} {_value(sample.value)}"


def _escape(text: str, *, quote: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# ------------------------------------------------------ reading the stats


def without_client(stats: Mapping[str, Any], name: str, pid: int | None = None) -> dict[str, Any]:
    """``stats`` less the connections of process ``pid`` (default: ours) named ``name``.

    For a tool's own short-lived connection (``shmpool stats``, a scrape),
    which would otherwise show up as a client; ``clients``, the count of
    the clients, shrinks with it. Also drops the asking process's ``local``.
    """
    pid = os.getpid() if pid is None else pid
    out = dict(stats)
    out.pop("local", None)
    clients = stats.get("clients")
    if isinstance(clients, list):
        out["clients"] = [c for c in clients if not (c.get("pid") == pid and c.get("name") == name)]
    return out


def read_stats(
    address: str | None, *, name: str = SCRAPER_NAME, timeout: float = SCRAPE_TIMEOUT
) -> dict[str, Any]:
    """The statistics of the manager at ``address``, through a short-lived connection.

    Leaves this connection out (``without_client``).

    Raises:
        ManagerGoneError: no manager there, or it did not answer within ``timeout``.
    """
    from .client import connect

    with connect(address, name=name, timeout=timeout) as pool:
        stats = pool.stats()
    return without_client(stats, name)


# ------------------------------------------------------ prometheus_client


def have_prometheus_client() -> bool:
    """Whether the optional ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class StatsCollector:
    """A ``prometheus_client`` collector of a manager's statistics.

    ``source`` returns a stats dict and is called once per scrape; when it
    raises, the scrape still succeeds, with ``shmpool_up 0`` alone, and the
    error goes to the ``shmpool`` logger at WARNING.
    """

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            stats = self._source()
        except Exception as exc:
            import logging

            logging.getLogger("shmpool").warning("metrics: cannot read the statistics: %s", exc)
            yield GaugeMetricFamily(PREFIX + "up", "1 if the manager's statistics were read.", 0)
            return
        for fam in families(stats):
            yield _to_prometheus(fam)

    def describe(self) -> list[Metric]:
        """Nothing: the registry must not call ``collect`` (a round trip) at registration."""
        return []


def _to_prometheus(fam: Family) -> Metric:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    names = [key for key, _ in fam.samples[0].labels] if fam.samples else []
    if fam.type == "info":
        info = InfoMetricFamily(fam.name, fam.help)
        for s in fam.samples:
            info.add_metric([], dict(s.labels))
        return info
    if fam.type == "histogram":
        hist = HistogramMetricFamily(fam.name, fam.help, labels=[], unit=fam.unit)
        hist.add_metric([], [(dict(s.labels)["le"], s.value) for s in fam.samples], None)
        return hist
    metric: CounterMetricFamily | GaugeMetricFamily
    if fam.type == "counter":
        metric = CounterMetricFamily(fam.name, fam.help, labels=names, unit=fam.unit)
    else:
        metric = GaugeMetricFamily(fam.name, fam.help, labels=names, unit=fam.unit)
    for s in fam.samples:
        metric.add_metric([value for _, value in s.labels], s.value)
    return metric


class MetricsServer:
    """The HTTP server of ``serve_metrics``: where it listens, and ``close()``."""

    def __init__(self, server: Any, thread: Any) -> None:
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]

    def close(self) -> None:
        """Stop serving and close the socket (waits for a scrape in progress)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(address: str | None, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve the manager's metrics at ``http://host:port/`` from a thread of this process.

    Each scrape reads the statistics from the manager at ``address`` (see
    ``read_stats``); the registry also has prometheus_client's ``process_*``
    metrics of this process. Both text formats are served, by the scraper's
    ``Accept`` header. ``port`` 0 picks a free port (``.port`` says which).

    Raises:
        ModuleNotFoundError: prometheus_client is not installed (``INSTALL_HINT``).
        OSError: the port cannot be bound.
    """
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the metrics server needs prometheus_client: {INSTALL_HINT}", name=exc.name
        ) from exc
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(StatsCollector(lambda: read_stats(address)))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
