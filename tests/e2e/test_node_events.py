"""Events on the Node, from a real agent on a real control plane: posted once for a change, never per resync.

The cluster is test_system's kind: etcd and kube-apiserver with manifests/ installed (so the agent posts with the
RBAC the install grants it), the operator as a ``kopf run`` process, and one node with its own real containerd and
agent process on a pod-bound token. The Events are read the way an admin would, with ``kubectl get events -n
default --field-selector involvedObject.kind=Node,involvedObject.name=<node>``. The steps run in order.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.simcluster import Cluster, NodeSpec, running
from tests.harness import controlplane as cp
from tests.harness.controlplane import free_port
from tests.harness.fixtures import require_crictl
from tests.harness.forwarding import Forwarder
from tests.harness.registry import Registry
from tests.harness.waiting import wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.integration]

NODE = "events-a"
RESYNC = 2
#: Probes every second, a dead mirror out after 2 failed ones and back after 2 good ones and 3 s out at least.
ENV = {"REGMIRROR_PROBE_SECONDS": "1", "REGMIRROR_PROBE_TIMEOUT": "1", "REGMIRROR_PROBE_MIN_OUT_SECONDS": "3",
       "REGMIRROR_RETRY_SECONDS": "2"}  # a rolled-back change is tried again after 2 s (times the tries)


@pytest.fixture(scope="module")
def cluster(controlplane: cp.ControlPlane, installed: str, registry: Registry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_crictl()
    specs = [NodeSpec(NODE, env=ENV, args=("--resync", str(RESYNC), "--health-timeout", "8"))]
    # Tries to spare: test_4 puts containerd right after the second rolled-back try, and a loaded machine must not
    # make the node give up on the change first.
    with running(controlplane, registry, tmp_path_factory.mktemp("events"), specs, state_prefix="rme-",
                 operator_env={"REGMIRROR_RESTART_ATTEMPTS": "5"}) as cluster:
        yield cluster


def node_events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    items = cluster.get("events", "-n", "default", "--field-selector",
                        f"involvedObject.kind=Node,involvedObject.name={NODE}")["items"]
    return [e for e in items if e["reason"] == reason]


def failures_logged(cluster: Cluster) -> int:
    return cluster.nodes[NODE].log.read_text().count("applying failed, node unchanged")


def test_1_a_failed_apply_is_one_event_on_the_node_however_often_it_fails(cluster: Cluster) -> None:
    cluster.apply_mirror("quay-io", "quay.io", [cluster.registry.url])
    wait_for("the node applied", lambda: cluster.converged("quay-io", "1/1"), timeout=60)
    folder = cluster.nodes[NODE].containerd.certs_dir / "quay.io"
    saved = folder.with_name("quay.io.saved")
    # A file where the registry's folder was: its hosts.toml cannot be written back, every resync.
    folder.rename(saved)
    folder.write_text("not a folder\n")
    try:
        wait_for("the node reported Failed", lambda: cluster.node_reports("quay-io").get(NODE, {}).get("state")
                 == "Failed", timeout=30)
        (event,) = wait_for("the Event on the Node", lambda: node_events(cluster, "MirrorApplyFailed"), timeout=30)
        node = cluster.get("node", NODE)
        assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": NODE,
                                           "uid": node["metadata"]["uid"]}
        assert event["type"] == "Warning" and event["count"] == 1
        assert event["source"] == {"component": "regmirror-agent", "host": NODE}
        assert (event["reportingComponent"], event["reportingInstance"]) == ("regmirror-agent", NODE)
        assert "quay-io" in event["message"] and "node keeps its files" in event["message"], event["message"]
        # It keeps failing at every resync: no Event for that.
        seen = failures_logged(cluster)
        wait_for("three more failed resyncs", lambda: failures_logged(cluster) >= seen + 3, timeout=10 * RESYNC + 30)
        assert len(node_events(cluster, "MirrorApplyFailed")) == 1
    finally:
        folder.unlink()
        saved.rename(folder)
    wait_for("the node applied again", lambda: cluster.converged("quay-io", "1/1"), timeout=30)
    cluster.alive()


def test_2_the_same_failure_again_within_minutes_posts_no_second_event(cluster: Cluster) -> None:
    folder = cluster.nodes[NODE].containerd.certs_dir / "quay.io"
    shutil.rmtree(folder)
    folder.write_text("not a folder\n")
    try:
        seen = failures_logged(cluster)
        wait_for("the node failed again", lambda: failures_logged(cluster) >= seen + 2, timeout=10 * RESYNC + 30)
        assert cluster.node_reports("quay-io")[NODE]["state"] == "Failed"
        (event,) = node_events(cluster, "MirrorApplyFailed")
        assert event["count"] == 1
        # The agent did see a new failure (it had applied in between), and left the Event out as a repeat.
        assert "event MirrorApplyFailed on node events-a (quay-io) posted" in cluster.nodes[NODE].log.read_text()
    finally:
        folder.unlink()
    wait_for("the node applied again", lambda: cluster.converged("quay-io", "1/1"), timeout=30)
    cluster.alive()


def test_3_a_mirror_out_and_back_is_one_event_each(cluster: Cluster) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    cluster.apply_mirror("quay-io", "quay.io", [dead, cluster.registry.url])
    (out,) = wait_for("MirrorOut on the Node", lambda: node_events(cluster, "MirrorOut"), timeout=60)
    assert out["type"] == "Warning" and dead in out["message"], out
    forwarder = Forwarder("127.0.0.1", port, cluster.registry.port)  # it answers: the registry behind its port
    try:
        (back,) = wait_for("MirrorBack on the Node", lambda: node_events(cluster, "MirrorBack"), timeout=60)
        assert back["type"] == "Normal" and dead in back["message"], back
        hosts = Path(cluster.nodes[NODE].containerd.certs_dir / "quay.io" / "hosts.toml")
        wait_for("the mirror back in hosts.toml", lambda: dead in hosts.read_text(), timeout=30)
    finally:
        forwarder.close()
    assert len(node_events(cluster, "MirrorOut")) == 1
    cluster.alive()


def test_4_containerd_not_healthy_on_a_change_is_one_rolled_back_event(cluster: Cluster) -> None:
    node = cluster.nodes[NODE]
    state = node.containerd.state_dir / "state"
    # containerd can no longer start (a file where its state folder was), and config.toml loses config_path by
    # hand: putting it back needs a restart, which fails, so the agent puts the previous files back.
    state.rename(state.with_name("state.saved"))
    state.write_text("not a directory")
    config = node.containerd.config_path
    config.write_text(config.read_text().replace('config_path = "/etc/containerd/certs.d"', 'config_path = ""'))
    try:
        (event,) = wait_for("RuntimeRolledBack on the Node", lambda: node_events(cluster, "RuntimeRolledBack"),
                            timeout=90)
        assert event["type"] == "Warning" and "quay-io" in event["message"], event
        assert "did not come back healthy" in event["message"], event["message"]
        tries = "applying failed, node unchanged: containerd did not come back healthy"  # one line a try
        wait_for("a second try rolled back", lambda: node.log.read_text().count(tries) >= 2, timeout=60)
    finally:  # at once: the next try comes 4 s after the second (RETRY_SECONDS times the tries)
        state.unlink()
        state.with_name("state.saved").rename(state)
        node.containerd.start()
    assert len(node_events(cluster, "RuntimeRolledBack")) == 1, "one Event for the rolled-back change, not one a try"
    wait_for("the node applied again", lambda: cluster.converged("quay-io", "1/1"), timeout=120)
    assert 'config_path = "/etc/containerd/certs.d"' in config.read_text()
    cluster.alive()
