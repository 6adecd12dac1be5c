"""The agent's Prometheus metrics, and the small HTTP thread that serves them on ``GET /metrics``.

Off unless a port is given (``REGMIRROR_METRICS_PORT`` or ``--metrics-port``): the agent runs on the node's
network, where any fixed port may already be taken. A port that cannot be bound is logged and the agent runs on
without metrics; metrics never stop the node from being configured. No ``node`` label: one agent runs per node,
and Prometheus adds the target's ``instance`` (and, through a PodMonitor, the pod and node).
"""

from __future__ import annotations

import http.server
import logging

from regmirror_api import metrics

log = logging.getLogger("regmirror.agent")

CHANGED, UNCHANGED, FAILED = "changed", "unchanged", "failed"
ALIVE, DEAD = "alive", "dead"


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = metrics.Registry()
        add = self.registry.add
        self.applies = add(metrics.Counter(
            "regmirror_agent_applies_total",
            "Reconciles that applied the desired state to the node, by result: changed (files written), unchanged "
            "(the node already had it), failed (refused or rolled back: the node kept what it had).",
            ["result"], initial=[(CHANGED,), (UNCHANGED,), (FAILED,)]))
        self.restarts = add(metrics.Counter(
            "regmirror_agent_runtime_restarts_total",
            "Applies that restarted (containerd) or reloaded (Docker) the runtime and kept the change."))
        self.rollbacks = add(metrics.Counter(
            "regmirror_agent_rollbacks_total",
            "Changes put back because the runtime was not healthy after them."))
        self.drift_repairs = add(metrics.Counter(
            "regmirror_agent_drift_repairs_total",
            "Managed files edited on the node since regmirror wrote them, and put back."))
        self.probes = add(metrics.Counter(
            "regmirror_agent_mirror_probes_total",
            "Probes of mirrors from this node, by result (alive: it answered; dead: it did not).",
            ["result"], initial=[(ALIVE,), (DEAD,)]))
        self.mirrors_out = add(metrics.Gauge(
            "regmirror_agent_mirrors_out",
            "Mirrors left out of this node's configuration because they do not answer from it."))
        self.last_success = add(metrics.Gauge(
            "regmirror_agent_last_successful_apply_timestamp_seconds",
            "Unix time of the last apply that left the node as desired (changed or unchanged); 0 before the first."))
        self.report_writes = add(metrics.Counter(
            "regmirror_agent_report_writes_total",
            "Writes of this node's RegistryMirrorNode report to the apiserver."))


def serve(registry: metrics.Registry, address: str, port: int) -> http.server.HTTPServer | None:
    """``regmirror_api.metrics.serve`` with this side's logger."""
    return metrics.serve(registry, address, port, log)
