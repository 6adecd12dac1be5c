"""Configured is not used: each node proves its runtime uses the mirror (issue 10, item 4), on real components.

Two simulated nodes on the real control plane, each with its own real containerd (Debian's 1.6, and 2.x built
from its Go module when it is there), their agents, the real operator, and the real registry as the mirror. The
agent asks the running containerd itself (its CRI status over the socket; on 2.x, config.toml as the running
process read it) and resolves ``spec.verify.image`` through the node's configuration, as containerd would. The
steps run in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from regmirror_api import contract, models
from tests.e2e.simcluster import Cluster, NodeSpec, running
from tests.harness import controlplane as cp
from tests.harness.containerd import flavor_dir
from tests.harness.fixtures import require_crictl
from tests.harness.proofs import QUAY_IMAGE
from tests.harness.registry import Registry
from tests.harness.waiting import wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.integration]

FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cluster(controlplane: cp.ControlPlane, installed: str, registry: Registry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_crictl()
    two = flavor_dir("2.x")
    assert (two / "containerd").exists(), "containerd 2.x is built by hack/install-deps.sh"
    specs = [NodeSpec("use-a"), NodeSpec("use-b", config_version=3, binaries=two)]
    with running(controlplane, registry, tmp_path_factory.mktemp("in-use"), specs, state_prefix="rmu-") as cluster:
        try:
            yield cluster
        finally:
            print("\nregmirror in-use figures: " + json.dumps(FIGURES))


def apply(cluster: Cluster, urls: list[str], verify: str | None) -> None:
    spec: dict[str, Any] = {"registry": "quay.io", "mirrors": [{"url": u} for u in urls]}
    if verify:
        spec["verify"] = {"image": verify}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": models.KIND,
        "metadata": {"name": "quay-io"}, "spec": spec}))


def test_1_both_nodes_show_their_runtime_uses_the_mirror_and_the_verify_image_came_from_it(
        cluster: Cluster) -> None:
    since = cluster.registry.mark()
    t0 = time.monotonic()
    apply(cluster, [cluster.registry.url], QUAY_IMAGE)
    status = wait_for("quay-io 2/2 in use", lambda: (s := cluster.converged("quay-io", "2/2"))
                      and s["nodes"].get("inUse") == 2 and s, timeout=90)
    FIGURES["apply_to_in_use_on_both_seconds"] = round(time.monotonic() - t0, 1)
    reports = cluster.node_reports("quay-io")
    for name in ("use-a", "use-b"):
        seen = reports[name]["inUse"]
        assert (seen["status"], seen["reason"]) == ("True", "InUse"), (name, seen)
        assert seen["message"] == f"{QUAY_IMAGE} resolves through the mirror {cluster.registry.url} (HTTP 200)", seen
    assert status["nodes"]["inUse"] == 2
    assert cluster.registry.requests_for("/v2/k8scsi/csi-resizer/manifests/v0.5.0?ns=quay.io", since=since,
                                         method="HEAD", status=200, agent="regmirror-verify") >= 2
    cluster.alive()


def test_2_containerd_2_with_a_hand_set_config_path_list_is_repaired(cluster: Cluster) -> None:
    node = cluster.nodes["use-b"]
    config = node.containerd.config_path
    text = config.read_text()
    assert 'config_path = "/etc/containerd/certs.d"' in text
    # What someone does by hand on a 2.x node: a list, which 2.1+ ignores for CRI pulls; then a restart. Pulls
    # no longer use the mirror. regmirror owns that key: it puts it back (a restart, in a restart slot) and the
    # runtime's own view says the mirror is in use again.
    node.stop_agent()  # the edit and the restart happen between two looks of the agent, as a person's would
    config.write_text(text.replace('config_path = "/etc/containerd/certs.d"',
                                   'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"'))
    node.containerd.restart()
    by_hand = node.containerd.pid
    bypassed = node.containerd.crictl_pull(QUAY_IMAGE, timeout=60)
    assert bypassed.returncode != 0, "containerd 2.x ignores the list for CRI pulls: the mirror is not used"
    t0 = time.monotonic()
    node.start_agent()

    def repaired() -> dict[str, Any] | None:
        report = cluster.node_reports("quay-io")["use-b"]
        ok = (report["state"] == "Applied" and report.get("inUse", {}).get("status") == "True"
              and config.read_text() == text and node.containerd.pid != by_hand)
        return report if ok else None

    wait_for("use-b repaired", repaired, timeout=90, detail=lambda: json.dumps(cluster.node_reports("quay-io")))
    FIGURES["config_path_list_repaired_seconds"] = round(time.monotonic() - t0, 1)
    assert config.read_text() == text, "config_path is regmirror's own again"
    assert node.containerd.crictl_pull(QUAY_IMAGE).returncode == 0, "pulls go through the mirror again"
    cluster.alive()


def test_3_a_verify_image_the_mirror_does_not_serve_fails_the_nodes_with_the_reason(cluster: Cluster) -> None:
    apply(cluster, [cluster.registry.url], "quay.io/regmirror-test/not-there:1")

    def both_failed() -> dict[str, Any] | None:
        s = cluster.status("quay-io")
        return s if s.get("observedGeneration") == s["generation"] and s["nodes"]["failed"] == 2 else None

    status = wait_for("both nodes Failed", both_failed, timeout=60)
    reports = cluster.node_reports("quay-io")
    for name in ("use-a", "use-b"):
        assert reports[name]["inUse"]["status"] == "False", reports[name]
        assert reports[name]["inUse"]["reason"] == "NotServed", reports[name]
        assert reports[name]["state"] == contract.STATE_FAILED, reports[name]
    assert {f["name"] for f in status["failingNodes"]} == {"use-a", "use-b"}
    apply(cluster, [cluster.registry.url], None)
    wait_for("quay-io 2/2 again", lambda: cluster.converged("quay-io", "2/2"), timeout=60)
    cluster.alive()
