"""Mirror credentials from a Secret, on the real control plane, the real operator and real agents on containerd 1.6
and 2.x nodes, through the loopback registry with htpasswd auth (a mirror that answers 401 without the login).

In order: a RegistryMirror naming a Secret that does not exist is Failed on each node, naming it (and nothing is
pulled through the mirror); the Secret created, each node pulls ``quay.io/...`` through the mirror, hosts.toml mode
0600; a wrong password is Failed on each node, "refused the credentials"; the registry and the Secret rotated,
each node's hosts.toml follows within seconds, containerd keeps its pid and pulls again. The password and its
Basic token are nowhere else: not in the ConfigMap, a report, a status, an Event, a log or any other file on the
node. Figures go to ``.cache/figures/credentials.json``.
"""

from __future__ import annotations

import base64
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from regmirror_api import contract, models
from tests.e2e.simcluster import Cluster, NodeSpec, running
from tests.harness import controlplane as cp
from tests.harness.containerd import flavor_dir
from tests.harness.controlplane import REPO
from tests.harness.fixtures import require_crictl
from tests.harness.product import contents
from tests.harness.proofs import QUAY_IMAGE
from tests.harness.registry import Registry
from tests.harness.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.controlplane]

NS = contract.NAMESPACE
SECRET = "quay-mirror-login"
USER = "mirror-user"
PASSWORDS = ("first-Secret-pw", "wrong-Secret-pw", "second-Secret-pw")
FIGURES_FILE = REPO / ".cache" / "figures" / "credentials.json"
FIGURES: dict[str, Any] = {}


def token(password: str) -> str:
    return base64.b64encode(f"{USER}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def cluster(controlplane: cp.ControlPlane, installed: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_crictl()
    two = flavor_dir("2.x")
    assert (two / "containerd").exists(), "containerd 2.x is built by hack/install-deps.sh"
    registry = Registry(tmp_path_factory.mktemp("auth-registry"), users={USER: PASSWORDS[0]})
    controlplane.kubectl("delete", "secret", SECRET, "-n", NS, "--ignore-not-found")
    try:
        registry.push("k8scsi/csi-resizer", "v0.5.0")
        specs = [NodeSpec("cred-a", config_version=2),
                 NodeSpec("cred-b", config_version=3, binaries=two)]
        with running(controlplane, registry, tmp_path_factory.mktemp("credentials"), specs,
                     state_prefix="rmc-") as cluster:
            yield cluster
    finally:
        controlplane.kubectl("delete", "secret", SECRET, "-n", NS, "--ignore-not-found", check=False)
        registry.close()
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
        print("\nregmirror credentials figures: " + json.dumps(FIGURES))


def put_secret(cluster: Cluster, password: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
        "metadata": {"name": SECRET, "namespace": NS},
        "stringData": {"username": USER, "password": password}}))


def apply_mirror(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": models.KIND,
        "metadata": {"name": "quay-io"},
        "spec": {"registry": "quay.io", "verify": {"image": QUAY_IMAGE},
                 "mirrors": [{"url": cluster.registry.url, "credentials": {"secretName": SECRET}}]}}))


def hosts_toml(cluster: Cluster, node: str) -> Path:
    return cluster.nodes[node].containerd.certs_dir / "quay.io" / "hosts.toml"


def all_failed_with(cluster: Cluster, text: str) -> dict[str, dict[str, Any]] | None:
    reports = cluster.node_reports("quay-io")
    ok = len(reports) == 2 and all(r["state"] == contract.STATE_FAILED and text in r.get("message", "")
                                   for r in reports.values())
    return reports if ok else None


def published(cluster: Cluster) -> str:
    return str(cluster.get("configmap", contract.CONFIGMAP, "-n", NS)["data"][contract.CONFIGMAP_KEY])


def test_1_a_missing_secret_is_failed_on_each_node_naming_it(cluster: Cluster) -> None:
    since = cluster.registry.mark()
    apply_mirror(cluster)
    reports = wait_for("both nodes Failed on the missing Secret",
                       lambda: all_failed_with(cluster, f"Secret {NS}/{SECRET} does not exist"), timeout=60,
                       detail=lambda: json.dumps(cluster.node_reports("quay-io")))
    status = wait_for("the RegistryMirror names the failing nodes",
                      lambda: (s := cluster.status("quay-io")).get("nodes", {}).get("failed") == 2 and s, timeout=30)
    assert f"Secret {NS}/{SECRET} does not exist" in status["message"], status
    FIGURES["missing_secret_message"] = next(iter(reports.values()))["message"]
    mirror = json.loads(published(cluster))["mirrors"][0]["spec"]["mirrors"][0]
    assert mirror["credentials"] == {"secretName": SECRET}, "no Secret yet: no resourceVersion, and no content"
    for name in cluster.nodes:
        assert not hosts_toml(cluster, name).exists(), "never applied without its login"
        assert cluster.nodes[name].containerd.crictl_pull(QUAY_IMAGE, timeout=60).returncode != 0
    assert cluster.registry.requests_for("/v2/k8scsi/csi-resizer/manifests", since=since, status=200) == 0
    cluster.alive()


def test_2_with_the_secret_each_node_pulls_through_the_mirror_that_demands_it(cluster: Cluster) -> None:
    t0 = time.monotonic()
    put_secret(cluster, PASSWORDS[0])
    wait_for("quay-io 2/2", lambda: cluster.converged("quay-io", "2/2"), timeout=60,
             detail=lambda: json.dumps(cluster.node_reports("quay-io")))
    FIGURES["secret_created_to_ready_seconds"] = round(time.monotonic() - t0, 2)
    # In use is checked in the same pass, with short timeouts: on a loaded machine a first answer may be Unknown,
    # and the next resync tells. False would fail the entry, so Ready above already rules it out.
    wait_for("both nodes' in-use check", lambda: all(r.get("inUse", {}).get("status") == "True"
                                                   for r in cluster.node_reports("quay-io").values()), timeout=30,
             detail=lambda: json.dumps(cluster.node_reports("quay-io")))
    for name, report in cluster.node_reports("quay-io").items():  # the in-use check sends the login too
        assert (report["inUse"]["status"], report["inUse"]["reason"]) == ("True", "InUse"), (name, report)
    version = cluster.get("secret", SECRET, "-n", NS)["metadata"]["resourceVersion"]
    mirror = json.loads(published(cluster))["mirrors"][0]["spec"]["mirrors"][0]
    assert mirror["credentials"] == {"secretName": SECRET, "resourceVersion": version}
    pulls = {}
    for name, node in cluster.nodes.items():
        path = hosts_toml(cluster, name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f'Authorization = ["Basic {token(PASSWORDS[0])}"]' in path.read_text()
        since = cluster.registry.mark()
        t1 = time.monotonic()
        pulled = node.containerd.crictl_pull(QUAY_IMAGE, timeout=60)
        pulls[name] = round(time.monotonic() - t1, 2)
        assert pulled.returncode == 0, pulled.stderr
        assert cluster.registry.requests_for("/v2/k8scsi/csi-resizer/manifests/v0.5.0?ns=quay.io", since=since,
                                             status=200, agent="containerd") >= 1
        assert node.containerd.crictl("rmi", QUAY_IMAGE).returncode == 0
    FIGURES["pull_seconds"] = pulls
    cluster.alive()


def test_3_a_wrong_password_is_failed_on_each_node_and_the_mirror_stays_in(cluster: Cluster) -> None:
    put_secret(cluster, PASSWORDS[1])
    reports = wait_for("both nodes Failed: the mirror refused the credentials",
                       lambda: all_failed_with(cluster, f"refused the credentials from Secret {NS}/{SECRET}"),
                       timeout=60, detail=lambda: json.dumps(cluster.node_reports("quay-io")))
    FIGURES["wrong_password_message"] = next(iter(reports.values()))["message"]
    status = wait_for("the RegistryMirror says 2 failed", lambda: (s := cluster.status("quay-io"))
                      .get("nodes", {}).get("failed") == 2 and s, timeout=30)
    assert "refused the credentials" in status["message"], status
    for name, report in reports.items():
        assert not report.get("out"), "the mirror answers: it is not left out"
        assert f'Authorization = ["Basic {token(PASSWORDS[1])}"]' in hosts_toml(cluster, name).read_text()
    cluster.alive()


def test_4_a_rotation_reaches_each_node_within_seconds_without_a_restart(cluster: Cluster) -> None:
    pids = {name: node.containerd.pid for name, node in cluster.nodes.items()}
    cluster.registry.set_users({USER: PASSWORDS[2]})
    t0 = time.monotonic()
    put_secret(cluster, PASSWORDS[2])
    seen: dict[str, float] = {}

    def every_node_has_it() -> bool:
        for name in cluster.nodes:
            if name not in seen and token(PASSWORDS[2]) in hosts_toml(cluster, name).read_text():
                seen[name] = round(time.monotonic() - t0, 2)
        return len(seen) == len(cluster.nodes)

    wait_for("the new login in every node's hosts.toml", every_node_has_it, timeout=60, every=0.05)
    FIGURES["rotation_to_node_seconds"] = seen
    wait_for("quay-io 2/2 again", lambda: cluster.converged("quay-io", "2/2"), timeout=60,
             detail=lambda: json.dumps(cluster.node_reports("quay-io")))
    FIGURES["rotation_to_ready_seconds"] = round(time.monotonic() - t0, 2)
    FIGURES["containerd_pid_unchanged"] = {n: cluster.nodes[n].containerd.pid == pid for n, pid in pids.items()}
    for name, node in cluster.nodes.items():
        assert node.containerd.pid == pids[name], "a rotation is a hosts.toml change: no restart"
        assert stat.S_IMODE(hosts_toml(cluster, name).stat().st_mode) == 0o600
        pulled = node.containerd.crictl_pull(QUAY_IMAGE, timeout=60)
        assert pulled.returncode == 0, pulled.stderr
    cluster.alive()


def test_5_the_login_is_nowhere_but_in_the_hosts_toml(cluster: Cluster) -> None:
    secrets = [s for p in PASSWORDS for s in (p, token(p))]
    views = {
        "ConfigMap": published(cluster),
        "RegistryMirror": json.dumps(cluster.get("registrymirror", "quay-io")),
        "RegistryMirrorNodes": json.dumps(cluster.get("registrymirrornodes")),
        "Events": json.dumps(cluster.get("events", "-A")),
        "operator log": cluster.operator_log.read_text(errors="replace"),
    }
    for name, node in cluster.nodes.items():
        views[f"{name} agent log"] = node.log.read_text(errors="replace")
        allowed = hosts_toml(cluster, name)
        files = contents(node.containerd.node_root, lambda p, allowed=allowed: p != allowed and not p.is_symlink())
        views.update({f"{name}:{p}": data.decode(errors="replace") for p, data in files.items()})
    leaked = sorted(f"{where}: {s[:4]}..." for where, text in views.items() for s in secrets if s in text)
    assert leaked == []
    FIGURES["views_scanned"] = len(views)
