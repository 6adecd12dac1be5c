"""Prometheus metrics without a dependency: counters, gauges and histograms, rendered in the text format 0.0.4.

Both sides keep a handful of series, so a client library (and its memory) would buy nothing; this module only
holds numbers and renders them (``# HELP``, ``# TYPE``, one line a series, label values escaped), and serves them
on ``GET /metrics`` from a small HTTP thread (:func:`serve`), the same for both sides. Names follow Prometheus'
conventions: ``snake_case``, base units in the name (``_seconds``), ``_total`` on counters.

https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
"""

from __future__ import annotations

import http.server
import logging
import math
import threading
from collections.abc import Iterable, Sequence
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

LabelValues = tuple[str, ...]


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), *, initial: Iterable[LabelValues] = ()
                 ) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[LabelValues, float] = {}
        if not self.label_names:
            self._values[()] = 0.0
        for values in initial:  # series shown at 0 before their first event, so rate() sees the first one
            self._values[self._key(values)] = 0.0

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: labels {tuple(values)!r}, expected values for {self.label_names!r}")
        return tuple(str(v) for v in values)

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {format_value(v)}" for k, v in items]

    def render(self) -> str:
        head = f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    kind = "counter"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up, not by {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Without labels: one histogram is all either side needs."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def samples(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        # ``le`` as a float ("1.0", not "1"), as client libraries write it: a bound's series keeps one name.
        lines = [f'{self.name}_bucket{{le="{float(b)!r}"}} {c}' for b, c in zip(self.buckets, counts, strict=True)]
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        lines.append(f"{self.name}_sum {format_value(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


M = TypeVar("M", bound=_Metric)


class Registry:
    """The metrics one process exposes, rendered in the order they were added."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "".join(m.render() for m in self._metrics)


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: Registry

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = self.registry.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # a scrape every 30 s is not worth a log line
        pass


def serve(registry: Registry, address: str, port: int, log: logging.Logger) -> http.server.HTTPServer | None:
    """Serve ``registry`` on ``address:port`` from a daemon thread; None (logged) when the port cannot be bound:
    metrics never stop the component they describe."""
    handler = type("MetricsHandler", (_Handler,), {"registry": registry})
    try:
        server = http.server.HTTPServer((address, port), handler)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d, running on without them: %s", address, port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("serving metrics on http://%s:%d/metrics", address, server.server_address[1])
    return server
