"""The operator's Prometheus metrics, and the small HTTP thread that serves them on ``GET /metrics``.

Off unless ``REGMIRROR_METRICS_PORT`` names a port (kopf has no metrics of its own; its ``--liveness`` endpoint
only answers probes). The operator runs on the host's network (manifests/operator.yaml), so no port is taken by
default. A port that cannot be bound is logged and the operator runs on without metrics.
"""

from __future__ import annotations

import http.server
import logging
import os
from collections.abc import Mapping
from typing import Any

from regmirror_api import metrics

log = logging.getLogger("regmirror.operator")

SUCCESS, FAILURE = "success", "failure"
CONDITIONS = ("Ready", "Reconciling", "Stalled")
#: A pass over 1,000 nodes plans in milliseconds; its API writes (a ConfigMap, rate-limited status patches) take
#: longer. Buckets from 5 ms to a minute.
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = metrics.Registry()
        add = self.registry.add
        self.pass_duration = add(metrics.Histogram(
            "regmirror_operator_reconcile_duration_seconds",
            "Seconds each reconcile pass took: planning every RegistryMirror and writing what differs.",
            PASS_BUCKETS))
        self.passes = add(metrics.Counter(
            "regmirror_operator_reconciles_total",
            "Reconcile passes, by result (failure: an API call or a bug; the pass is retried with backoff).",
            ["result"], initial=[(SUCCESS,), (FAILURE,)]))
        self.status_writes = add(metrics.Counter(
            "regmirror_operator_status_writes_total",
            "RegistryMirror status patches written."))
        self.mirrors = add(metrics.Gauge(
            "regmirror_operator_registrymirrors",
            "RegistryMirrors whose condition is True, by condition, as of the last pass.",
            ["condition"], initial=[(c,) for c in CONDITIONS]))
        self.nodes_failed = add(metrics.Gauge(
            "regmirror_operator_nodes_failed",
            "Nodes failing the current generation of a RegistryMirror that selects them, summed over "
            "RegistryMirrors, as of the last pass."))

    def record_statuses(self, statuses: Mapping[str, Mapping[str, Any]]) -> None:
        """Set the gauges from the statuses a pass planned (every live RegistryMirror's)."""
        true = dict.fromkeys(CONDITIONS, 0)
        failed = 0
        for status in statuses.values():
            for condition in status.get("conditions") or []:
                if condition.get("type") in true and condition.get("status") == "True":
                    true[condition["type"]] += 1
            failed += int((status.get("nodes") or {}).get("failed") or 0)
        for condition, count in true.items():
            self.mirrors.set(count, condition)
        self.nodes_failed.set(failed)


def port_from_environment() -> int:
    """``REGMIRROR_METRICS_PORT``, 0 (off) when unset; a value that is not a port is refused with a ValueError."""
    text = os.environ.get("REGMIRROR_METRICS_PORT") or "0"
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"REGMIRROR_METRICS_PORT={text!r}: expected a port number (0 for no metrics)")
    return port


def serve(registry: metrics.Registry, address: str, port: int) -> http.server.HTTPServer | None:
    """``regmirror_api.metrics.serve`` with this side's logger."""
    return metrics.serve(registry, address, port, log)
