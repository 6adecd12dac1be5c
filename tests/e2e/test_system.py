"""The whole product, end to end: `kubectl apply` a RegistryMirror and every selected node converges.

Real components only: etcd and kube-apiserver, the operator as a `kopf run` process with its service account's
token, and three simulated nodes. Each node is a Node object, a node root folder with its own real containerd
(in a private mount namespace, so config.toml says /etc/containerd/certs.d as on a real node), and its own
agent process using a token bound to an agent Pod on that node (as the kubelet would mount it). The mirror
is a real registry on loopback; nothing else can serve the images.

The steps run in order and share one cluster (a module fixture): that is how an admin lives through them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from regmirror_api import contract
from tests.e2e.simcluster import Cluster, NodeSpec, running
from tests.harness import controlplane as cp
from tests.harness.fixtures import require_crictl
from tests.harness.proofs import HUB_IMAGE, QUAY_IMAGE
from tests.harness.registry import Registry
from tests.harness.waiting import wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.integration]

NS = contract.NAMESPACE
NODES = {"worker-a": "a", "worker-b": "b", "worker-c": "c"}
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cluster(controlplane: cp.ControlPlane, installed: str, registry: Registry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_crictl()
    specs = [NodeSpec(name, labels={"pool": pool}) for name, pool in NODES.items()]
    with running(controlplane, registry, tmp_path_factory.mktemp("system"), specs) as cluster:
        cluster.initial = {n: node.config() for n, node in cluster.nodes.items()}  # type: ignore[attr-defined]
        try:
            yield cluster
        finally:
            if FIGURES:
                print("\nregmirror e2e figures: " + json.dumps(FIGURES))


def test_1_apply_the_seed_example_every_node_is_ready_and_pulls_through_the_mirror(cluster: Cluster) -> None:
    url = cluster.registry.url
    t0 = time.monotonic()
    cluster.apply_mirror("quay-io", "quay.io", [url])
    cluster.apply_mirror("docker-io", "docker.io", [url])
    # The GitOps health gate: kubectl wait on the Ready condition.
    cluster.kubectl("wait", "--for=condition=Ready", "registrymirror/quay-io", "registrymirror/docker-io",
                    "--timeout=90s")
    FIGURES["apply_to_3of3_ready_seconds"] = round(time.monotonic() - t0, 2)
    table = cluster.kubectl("get", "registrymirrors").stdout
    assert "quay-io" in table and "3/3" in table, table
    since = cluster.registry.mark()
    for node in cluster.nodes.values():
        for image in (QUAY_IMAGE, HUB_IMAGE):
            pulled = node.containerd.crictl_pull(image)
            assert pulled.returncode == 0, f"{node.name}: {pulled.stderr}{node.containerd.log_tail()}"
    assert cluster.registry.requests_for("/v2/k8scsi/csi-resizer/manifests/", since=since, agent="containerd") >= 3
    reports = cluster.node_reports("quay-io")
    assert {n: r["state"] for n, r in reports.items()} == dict.fromkeys(NODES, "Applied")
    # The per-node view: every node runs both RegistryMirrors, at generation 1.
    rows = [line.split() for line in cluster.kubectl("get", "registrymirrornodes").stdout.splitlines()[1:]]
    assert {r[0]: (r[1], r[2]) for r in rows} == dict.fromkeys(NODES, ("2/2", "docker-io=1")), rows
    assert all(r[3] == "quay-io=1" for r in rows), rows
    assert all(r["restarted"] for r in reports.values()), f"moving to hosts mode sets config_path: {reports}"
    cluster.alive()


def test_2_changing_the_mirror_url_converges_with_no_containerd_restart(cluster: Cluster) -> None:
    pids = {n: node.containerd.pid for n, node in cluster.nodes.items()}
    new_url = cluster.registry.url.replace("127.0.0.1", "localhost")
    cluster.apply_mirror("quay-io", "quay.io", [new_url])
    s = wait_for("generation 2 on 3/3 nodes", lambda: cluster.converged("quay-io", "3/3"), timeout=60)
    assert s["observedGeneration"] == s["generation"] == 2
    reports = cluster.node_reports("quay-io")
    assert {n: r["generation"] for n, r in reports.items()} == dict.fromkeys(NODES, 2)
    assert not any(r["restarted"] for r in reports.values())
    assert {n: node.containerd.pid for n, node in cluster.nodes.items()} == pids
    for node in cluster.nodes.values():
        assert new_url in (node.containerd.certs_dir / "quay.io/hosts.toml").read_text()
        assert node.containerd.crictl("rmi", QUAY_IMAGE).returncode == 0
        pulled = node.containerd.crictl_pull(QUAY_IMAGE)
        assert pulled.returncode == 0, pulled.stderr


def test_3_a_node_selector_for_one_node_leaves_the_other_nodes_untouched(cluster: Cluster) -> None:
    others = {n: node.files() for n, node in cluster.nodes.items() if n != "worker-a"}
    cluster.apply_mirror("ghcr-io", "ghcr.io", [cluster.registry.url], selector={"matchLabels": {"pool": "a"}})
    # In use is checked in the same pass with short timeouts: a first answer on a loaded machine may be Unknown.
    s = wait_for("ghcr-io 1/1, in use", lambda: (s := cluster.converged("ghcr-io", "1/1")) and
                 s["nodes"].get("inUse") == 1 and s, timeout=60)
    assert s["nodes"] == {"selected": 1, "applied": 1, "failed": 0, "waiting": 0, "inUse": 1}
    assert (cluster.nodes["worker-a"].containerd.certs_dir / "ghcr.io/hosts.toml").exists()
    time.sleep(6)  # one agent resync period: nothing is rewritten on the other nodes either
    assert {n: node.files() for n, node in cluster.nodes.items() if n != "worker-a"} == others


def test_3a_a_restarted_agent_whose_node_is_current_writes_nothing(cluster: Cluster) -> None:
    node = cluster.nodes["worker-b"]
    before = cluster.get("registrymirrornode", "worker-b")["metadata"]["resourceVersion"]
    files = node.files()
    node.stop_agent()
    node.start_agent()
    # It lists the ConfigMap and its Node, reads its report once, applies (nothing to do) and finds the report
    # current: no write. Several resync periods later, still none.
    time.sleep(12)
    assert cluster.get("registrymirrornode", "worker-b")["metadata"]["resourceVersion"] == before
    assert node.files() == files
    cluster.alive()


def test_3b_a_hand_edited_hosts_toml_is_put_back_on_resync(cluster: Cluster) -> None:
    node = cluster.nodes["worker-b"]
    hosts = node.containerd.certs_dir / "docker.io/hosts.toml"
    good = hosts.read_text()
    hosts.write_text(good.replace(cluster.registry.url, "https://somewhere.else.example"))
    wait_for("the agent to repair the drift", lambda: hosts.read_text() == good, timeout=30)
    cluster.alive()


def test_4_a_node_whose_containerd_cannot_restart_rolls_back_and_is_reported(cluster: Cluster) -> None:
    node = cluster.nodes["worker-c"]
    state = node.containerd.state_dir / "state"
    # The node's containerd can no longer start (its state directory is gone, a file sits in its place) ...
    state.rename(state.with_name("state.saved"))
    state.write_text("not a directory")
    # ... and someone edits config.toml by hand, dropping config_path: putting it back needs a restart.
    config = node.containerd.config_path
    config.write_text(config.read_text().replace('config_path = "/etc/containerd/certs.d"', 'config_path = ""'))
    edited = node.config()
    try:
        def failed() -> dict[str, Any] | None:
            s = cluster.status("quay-io")
            report = cluster.node_reports("quay-io").get("worker-c", {})
            return s if report.get("state") == "Failed" and s.get("ready") == "2/3" else None

        s = wait_for("worker-c reported Failed", failed, timeout=90)
        reports = cluster.node_reports("quay-io")
        reason = reports["worker-c"]["message"]
        assert "did not come back healthy" in reason and "put the previous files back" in reason, reason
        conditions = {c["type"]: c for c in s["conditions"]}
        assert conditions["Ready"]["status"] == "False"
        assert "worker-c" in conditions["Ready"]["message"], conditions["Ready"]
        assert s["failingNodes"][0]["name"] == "worker-c"
        assert node.config() == edited, "the node keeps its previous files after the rollback"
        for other in ("worker-a", "worker-b"):
            assert reports[other]["state"] == "Applied"
        assert "worker-c" in cluster.kubectl("get", "registrymirrornode", "worker-c").stdout
        assert "2/3" in cluster.kubectl("get", "registrymirror", "quay-io").stdout
    finally:
        state.unlink()
        state.with_name("state.saved").rename(state)
        node.containerd.start()
    wait_for("worker-c recovered by the agent alone", lambda: cluster.converged("quay-io", "3/3"), timeout=90)
    assert 'config_path = "/etc/containerd/certs.d"' in config.read_text()
    cluster.alive()


def test_5_an_apiserver_outage_during_a_change_heals_without_a_hand(cluster: Cluster) -> None:
    cluster.apply_mirror("docker-io", "docker.io", [cluster.registry.url.replace("127.0.0.1", "localhost")])
    cluster.plane.restart_apiserver(down_seconds=10)
    s = wait_for("docker-io generation 2 on 3/3 after the outage",
                 lambda: cluster.converged("docker-io", "3/3"), timeout=120)
    assert s["observedGeneration"] == 2
    cluster.alive()


def assert_every_node_runs(cluster: Cluster, registry: str, url: str) -> None:
    """No node half-configured: each node's hosts.toml names ``url`` and its CRI plugin is healthy."""
    for name, node in cluster.nodes.items():
        hosts = (node.containerd.certs_dir / registry / "hosts.toml").read_text()
        assert url in hosts, f"{name}: {hosts}"
        ok, detail = node.containerd.wait_cri()
        assert ok, f"{name}: {detail}"


def test_5b_an_etcd_outage_during_a_change_heals_without_a_hand(cluster: Cluster) -> None:
    url = cluster.registry.url
    cluster.apply_mirror("docker-io", "docker.io", [url])
    cluster.plane.restart_etcd(down_seconds=10)
    s = wait_for("docker-io generation 3 on 3/3 after the etcd outage",
                 lambda: cluster.converged("docker-io", "3/3"), timeout=120)
    assert s["observedGeneration"] == 3
    assert_every_node_runs(cluster, "docker.io", url)
    cluster.alive()


def test_5c_the_operator_killed_in_the_middle_of_a_rollout_converges_when_it_returns(cluster: Cluster) -> None:
    url = cluster.registry.url.replace("127.0.0.1", "localhost")
    cluster.apply_mirror("docker-io", "docker.io", [url])
    time.sleep(0.3)  # the operator has heard of it, and may be halfway through publishing or writing statuses
    cluster.kill_operator()
    time.sleep(3)
    cluster.start_operator()
    s = wait_for("docker-io generation 4 on 3/3 after the operator's return",
                 lambda: cluster.converged("docker-io", "3/3"), timeout=120)
    assert s["observedGeneration"] == 4
    assert_every_node_runs(cluster, "docker.io", url)
    # Through the apiserver's and etcd's outages the operator logged failures and retries, never a traceback.
    assert "Traceback" not in cluster.operator_log.read_text()
    cluster.alive()


def test_6_deleting_the_mirrors_gives_every_node_its_own_configuration_back(cluster: Cluster) -> None:
    t0 = time.monotonic()
    cluster.kubectl("delete", "registrymirror", "quay-io", "docker-io", "ghcr-io", "--timeout=20s")
    FIGURES["delete_seconds"] = round(time.monotonic() - t0, 2)
    assert cluster.get("registrymirrors")["items"] == []
    initial = cluster.initial  # type: ignore[attr-defined]
    for name, node in cluster.nodes.items():
        # The state folder goes last, after the node's files are back: wait for both.
        wait_for(f"{name} back to its own files, and regmirror's state gone",
                 lambda node=node, name=name: node.config() == initial[name]
                 and not (node.containerd.node_root / "var/lib/regmirror").exists(), timeout=60)
        ok, detail = node.containerd.wait_cri()
        assert ok, detail
    cluster.alive()


def test_7_agent_memory_after_it_settles(cluster: Cluster) -> None:
    """Recorded for the closing note (target: at most 40 MiB); memory is a benchmark figure, not asserted."""
    FIGURES["agent_rss_mib"] = {n: round(node.rss_kib() / 1024, 1) for n, node in cluster.nodes.items()}
    cluster.alive()
