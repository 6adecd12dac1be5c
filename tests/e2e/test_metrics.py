"""Metrics on real components: each agent's and the operator's ``GET /metrics``, scraped over HTTP and read with
Prometheus' own text-format parser, move with what really happens on the nodes.

The cluster is test_system's: etcd and kube-apiserver, the operator as a ``kopf run`` process, and two nodes with
their own real containerd and agent processes on pod-bound tokens. ``metrics-a``'s agent serves metrics
(``REGMIRROR_METRICS_PORT``, bound to loopback with ``REGMIRROR_METRICS_ADDRESS``), ``metrics-b``'s does not (the
default), so their resident memory compares metrics on and off after the same work. The steps run in order.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from regmirror_api import contract
from tests.e2e.simcluster import Cluster, NodeSpec, running
from tests.harness import controlplane as cp
from tests.harness.fixtures import require_crictl
from tests.harness.registry import Registry
from tests.harness.waiting import wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.integration]

NS = contract.NAMESPACE
ON, OFF = "metrics-a", "metrics-b"
FIGURES: dict[str, Any] = {}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def cluster(controlplane: cp.ControlPlane, installed: str, registry: Registry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_crictl()
    args = ("--resync", "3", "--health-timeout", "8")
    metrics = {"REGMIRROR_METRICS_PORT": str(cp.free_port()), "REGMIRROR_METRICS_ADDRESS": "127.0.0.1"}
    specs = [NodeSpec(ON, env={"REGMIRROR_PROBE_SECONDS": "2", **metrics}, args=args),
             NodeSpec(OFF, env={"REGMIRROR_PROBE_SECONDS": "2"}, args=args)]
    operator_env = {"REGMIRROR_METRICS_PORT": str(cp.free_port()), "REGMIRROR_METRICS_ADDRESS": "127.0.0.1"}
    with running(controlplane, registry, tmp_path_factory.mktemp("metrics"), specs, operator_env=operator_env,
                 state_prefix="rmm-") as cluster:
        try:
            yield cluster
        finally:
            if FIGURES:
                print("\nregmirror metrics figures: " + json.dumps(FIGURES))


def agent_port(cluster: Cluster) -> int:
    return int(cluster.nodes[ON].env["REGMIRROR_METRICS_PORT"])


def operator_port(cluster: Cluster) -> int:
    return int(cluster.operator_env["REGMIRROR_METRICS_PORT"])


def agent_scrape(cluster: Cluster) -> Samples:
    return wait_for("the agent's metrics endpoint", lambda: _try(scrape, agent_port(cluster)), timeout=30)


def operator_scrape(cluster: Cluster) -> Samples:
    return wait_for("the operator's metrics endpoint", lambda: _try(scrape, operator_port(cluster)), timeout=30)


def _try(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError:
        return None


AG = "regmirror_agent_"
OP = "regmirror_operator_"


def test_1_a_first_apply_counts_a_change_a_restart_and_moves_the_last_success(cluster: Cluster) -> None:
    before, op_before = agent_scrape(cluster), operator_scrape(cluster)
    assert value(before, AG + "applies_total", result="changed") == 0
    t0 = time.time()
    # 0 before anything is published; the operator's first, empty, document may already be applied (a no-op).
    assert value(before, AG + "last_successful_apply_timestamp_seconds") < t0
    cluster.apply_mirror("quay-io", "quay.io", [cluster.registry.url])
    cluster.kubectl("wait", "--for=condition=Ready", "registrymirror/quay-io", "--timeout=90s")
    after = agent_scrape(cluster)
    assert value(after, AG + "applies_total", result="changed") == 1
    assert value(after, AG + "applies_total", result="failed") == 0
    assert value(after, AG + "runtime_restarts_total") == 1, "moving to hosts mode sets config_path: one restart"
    assert value(after, AG + "last_successful_apply_timestamp_seconds") >= t0
    assert value(after, AG + "report_writes_total") >= 1
    assert value(after, AG + "mirror_probes_total", result="alive") >= 1  # probed before its first apply
    assert value(after, AG + "mirrors_out") == 0
    # Later resyncs find the node as desired: unchanged, and the last success keeps moving.
    first = value(after, AG + "last_successful_apply_timestamp_seconds")
    unchanged = value(after, AG + "applies_total", result="unchanged")
    later = wait_for("a resync", lambda: (s := agent_scrape(cluster)) and
                     value(s, AG + "applies_total", result="unchanged") > unchanged and s)
    assert value(later, AG + "last_successful_apply_timestamp_seconds") > first
    assert value(later, AG + "applies_total", result="changed") == 1

    def operator_saw_ready() -> Samples | None:
        s = operator_scrape(cluster)
        return s if value(s, OP + "registrymirrors", condition="Ready") == 1 else None

    op = wait_for("the operator's gauge of Ready RegistryMirrors", operator_saw_ready, timeout=30)
    passes = OP + "reconcile_duration_seconds_count"
    assert value(op, passes) > value(op_before, passes)
    assert value(op, OP + "reconcile_duration_seconds_sum") > 0
    assert value(op, OP + "reconciles_total", result="success") > value(op_before, OP + "reconciles_total",
                                                                        result="success")
    assert value(op, OP + "status_writes_total") >= 1
    assert value(op, OP + "nodes_failed") == 0
    assert value(op, OP + "registrymirrors", condition="Stalled") == 0
    cluster.alive()


def test_2_agent_memory_with_metrics_on_and_off(cluster: Cluster) -> None:
    """Both agents did the same work; one serves metrics and has been scraped. Recorded, not asserted, as in
    test_system (target: at most 40 MiB)."""
    for _ in range(5):
        agent_scrape(cluster)
    time.sleep(4)
    FIGURES["agent_rss_mib"] = {"metrics_on": round(cluster.nodes[ON].rss_kib() / 1024, 1),
                                "metrics_off": round(cluster.nodes[OFF].rss_kib() / 1024, 1)}
    assert cluster.nodes[ON].rss_kib() < 64 * 1024
    cluster.alive()


def test_3_a_hand_edited_hosts_toml_is_counted_as_a_drift_repair(cluster: Cluster) -> None:
    before = agent_scrape(cluster)
    hosts = cluster.nodes[ON].containerd.certs_dir / "quay.io/hosts.toml"
    good = hosts.read_text()
    hosts.write_text(good.replace(cluster.registry.url, "https://somewhere.else.example"))
    wait_for("the agent to repair the drift", lambda: hosts.read_text() == good, timeout=30)
    after = wait_for("the repair counted", lambda: (s := agent_scrape(cluster)) and
                     value(s, AG + "drift_repairs_total") > value(before, AG + "drift_repairs_total") and s)
    assert value(after, AG + "drift_repairs_total") == value(before, AG + "drift_repairs_total") + 1
    assert value(after, AG + "applies_total", result="changed") == value(before, AG + "applies_total",
                                                                         result="changed") + 1
    assert value(after, AG + "runtime_restarts_total") == value(before, AG + "runtime_restarts_total")
    cluster.alive()


def test_4_a_change_the_runtime_does_not_survive_counts_a_failure_and_a_rollback(cluster: Cluster) -> None:
    node = cluster.nodes[ON]
    before = agent_scrape(cluster)
    state = node.containerd.state_dir / "state"
    # containerd can no longer start, and config.toml is edited by hand: putting config_path back needs a restart.
    state.rename(state.with_name("state.saved"))
    state.write_text("not a directory")
    config = node.containerd.config_path
    config.write_text(config.read_text().replace('config_path = "/etc/containerd/certs.d"', 'config_path = ""'))
    try:
        failed = wait_for("a failed apply and a rollback", lambda: (s := agent_scrape(cluster)) and
                          value(s, AG + "rollbacks_total") > value(before, AG + "rollbacks_total") and s, timeout=90)
        assert value(failed, AG + "applies_total", result="failed") > value(before, AG + "applies_total",
                                                                            result="failed")
        assert value(failed, AG + "runtime_restarts_total") == value(before, AG + "runtime_restarts_total")

        def operator_saw_failure() -> Samples | None:
            s = operator_scrape(cluster)
            return s if value(s, OP + "nodes_failed") == 1 else None

        op = wait_for("the operator's failing-nodes gauge", operator_saw_failure, timeout=60)
        assert value(op, OP + "registrymirrors", condition="Ready") == 0
    finally:
        state.unlink()
        state.with_name("state.saved").rename(state)
        node.containerd.start()
    healed = wait_for("the node applied again", lambda: (s := agent_scrape(cluster)) and
                      value(s, AG + "runtime_restarts_total") > value(before, AG + "runtime_restarts_total") and s,
                      timeout=90)
    assert value(healed, AG + "last_successful_apply_timestamp_seconds") > value(
        failed, AG + "last_successful_apply_timestamp_seconds")
    wait_for("the operator's gauges back", lambda: (s := operator_scrape(cluster)) and
             value(s, OP + "nodes_failed") == 0 and value(s, OP + "registrymirrors", condition="Ready") == 1,
             timeout=60)
    cluster.alive()


def test_5_a_mirror_that_does_not_answer_is_counted_out(cluster: Cluster) -> None:
    before = agent_scrape(cluster)
    dead = f"http://127.0.0.1:{cp.free_port()}"
    cluster.apply_mirror("ghcr-io", "ghcr.io", [dead, cluster.registry.url])
    hosts = cluster.nodes[ON].containerd.certs_dir / "ghcr.io/hosts.toml"
    wait_for("ghcr.io applied", lambda: hosts.exists() and f'[host."{cluster.registry.url}"]' in hosts.read_text(),
             timeout=60)
    assert f'[host."{dead}"]' not in hosts.read_text(), "probed before its first apply: out from the start"
    after = agent_scrape(cluster)
    assert value(after, AG + "mirrors_out") == 1
    assert value(after, AG + "mirror_probes_total", result="dead") > value(before, AG + "mirror_probes_total",
                                                                           result="dead")
    cluster.alive()
