"""The installed RBAC and admission policy are enough for the real components, with their real credentials.

`kubectl auth can-i` proves single permissions; these tests prove the sum: the operator, run with a token of
its own service account, reconciles a RegistryMirror end to end, and a token bound to an agent pod on a node
makes exactly the agent's calls (its Node and the ConfigMap by name, listed and watched; its own
RegistryMirrorNode) and no more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from regmirror_api import contract, models
from tests.e2e.simcluster import agent_pod_token
from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO
from tests.harness.waiting import stop_process, wait_for

pytestmark = pytest.mark.controlplane

NS = contract.NAMESPACE
AGENT = f"system:serviceaccount:{NS}:regmirror-agent"
STATUS = f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}/{{name}}/status"
MERGE = "application/merge-patch+json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


def node_report(node: str, generation: int, mirror: str = "e2e-ghcr", uid: str = "") -> dict[str, Any]:
    return contract.render_node_report(node, "", [contract.Report(mirror, generation, contract.STATE_APPLIED,
                                                                  uid=uid)],
                                       time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def get_json(controlplane: cp.ControlPlane, *args: str) -> Any:
    return json.loads(controlplane.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture
def node(controlplane: cp.ControlPlane, installed: str) -> Iterator[str]:
    """A Node object (nothing runs on it: there is no kubelet)."""
    name = "e2e-node-1"
    controlplane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name}}}))
    yield name
    controlplane.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false")


@pytest.fixture
def mirror(controlplane: cp.ControlPlane, installed: str) -> Iterator[str]:
    name = "e2e-ghcr"
    controlplane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
        "apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": models.KIND, "metadata": {"name": name},
        "spec": {"registry": "ghcr.io", "mirrors": [{"url": "https://ghcr.example.com"}]}}))
    yield name
    controlplane.kubectl("delete", "registrymirror", name, "--ignore-not-found", "--wait", "--timeout=10s")


@pytest.fixture
def agent_token(controlplane: cp.ControlPlane, node: str) -> Iterator[str]:
    """A token of the agent's service account bound to an agent pod on ``node``, as the kubelet would mount."""
    with agent_pod_token(controlplane, node, "e2e-agent-pod") as token:
        yield token


def test_a_pod_bound_agent_token_does_exactly_the_agents_calls(
        controlplane: cp.ControlPlane, node: str, mirror: str, agent_token: str) -> None:
    def call(method: str, path: str, body: Any = None, content_type: str = "application/json") -> int:
        return controlplane.request(method, path, body, content_type, token=agent_token)[0]

    status, review = controlplane.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                          {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                                          token=agent_token)
    assert status == 201, review
    user = review["status"]["userInfo"]
    assert user["username"] == AGENT
    assert user["extra"]["authentication.kubernetes.io/node-name"] == [node]

    def by_name(name: str) -> str:
        return "fieldSelector=" + urllib.parse.quote(f"metadata.name={name}")

    configmaps = f"/api/v1/namespaces/{NS}/configmaps"
    reports = contract.NODE_REPORTS_PATH
    status, listed = controlplane.request("GET", f"/api/v1/nodes?{by_name(node)}", token=agent_token,
                                          accept=METADATA_LIST)
    assert status == 200 and listed["kind"] == "PartialObjectMetadataList", listed
    assert call("GET", f"/api/v1/nodes?{by_name(node)}&watch=1&timeoutSeconds=1") == 200
    assert call("GET", f"{configmaps}?{by_name(contract.CONFIGMAP)}") == 200
    assert call("GET", f"{configmaps}?{by_name(contract.CONFIGMAP)}&watch=1&timeoutSeconds=1") == 200
    assert call("GET", f"{configmaps}/{contract.CONFIGMAP}") == 200
    try:
        assert call("GET", f"{reports}/{node}") == 404
        assert call("POST", reports, node_report(node, 1)) == 201
        assert call("PATCH", f"{reports}/{node}", node_report(node, 2), MERGE) == 200
        assert call("GET", f"{reports}/{node}") == 200

        controlplane.kubectl("create", "-f", "-", input=json.dumps(node_report("e2e-node-2", 1)))
        assert call("POST", reports, node_report("e2e-node-3", 1)) == 403
        assert call("PATCH", f"{reports}/e2e-node-2", node_report("e2e-node-2", 2), MERGE) == 403
        assert call("DELETE", f"{reports}/{node}") == 403
    finally:
        controlplane.kubectl("delete", "registrymirrornodes", node, "e2e-node-2", "--ignore-not-found")
    assert call("GET", STATUS.format(name=mirror)) == 403
    assert call("PATCH", STATUS.format(name=mirror), {"status": {"ready": "1/1"}}, MERGE) == 403
    assert call("GET", configmaps) == 403
    assert call("GET", f"/api/v1/namespaces/{NS}/secrets") == 403
    assert call("GET", f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}/{mirror}") == 403
    assert call("PATCH", f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}/{mirror}",
                {"spec": {"registry": "quay.io"}}, MERGE) == 403
    assert call("DELETE", f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}/{mirror}") == 403


@pytest.fixture
def operator(controlplane: cp.ControlPlane, installed: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The real operator (``kopf run`` exactly as the Deployment runs it) with its service account's token."""
    token = controlplane.kubectl("create", "token", "regmirror-operator", "-n", NS,
                                 "--duration=10m").stdout.strip()
    kubeconfig = controlplane.write_kubeconfig(tmp_path / "operator.kubeconfig", token=token,
                                               user="regmirror-operator", namespace=NS)
    deployment = get_json(controlplane, "deployment", "regmirror-operator", "-n", NS)
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "kopf"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig),
           "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("api", "agent", "operator"))}
    # A free port for the liveness endpoint: the Deployment's 8080 may be taken on a developer's machine.
    args = [a if not a.startswith("--liveness=") else f"--liveness=http://127.0.0.1:{cp.free_port()}/healthz"
            for a in command[1:]]
    proc = subprocess.Popen([sys.executable, "-m", "kopf", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    controlplane.kubectl("patch", "configmap", contract.CONFIGMAP, "-n", NS, "--type=json",
                         "-p", '[{"op": "remove", "path": "/data"}]', check=False)


def test_the_operator_reconciles_with_nothing_but_its_own_rbac(
        controlplane: cp.ControlPlane, node: str, mirror: str, operator: subprocess.Popen[str]) -> None:
    def published() -> Any:
        data = get_json(controlplane, "configmap", contract.CONFIGMAP, "-n", NS).get("data") or {}
        return contract.CONFIGMAP_KEY in data and mirror in data[contract.CONFIGMAP_KEY] and data

    try:
        data = wait_for("the operator to publish desired.json", published)
        desired = contract.parse_desired(data[contract.CONFIGMAP_KEY])
        assert mirror in [e.name for e in desired.entries]
        obj = wait_for("the operator to write status", lambda: (
            (o := get_json(controlplane, "registrymirror", mirror)).get("status", {}).get("observedGeneration")
            and o))
        generation = obj["metadata"]["generation"]
        assert obj["status"]["observedGeneration"] == generation
        assert obj["status"]["ready"] == "0/1"
        assert {c["type"] for c in obj["status"]["conditions"]} == {"Ready", "Reconciling", "Stalled"}

        controlplane.kubectl(
            "create", "-f", "-", "--as", AGENT, f"--as-user-extra=authentication.kubernetes.io/node-name={node}",
            input=json.dumps(node_report(node, generation, mirror, obj["metadata"]["uid"])))
        obj = wait_for("READY 1/1", lambda: (
            (o := get_json(controlplane, "registrymirror", mirror)).get("status", {}).get("ready") == "1/1" and o))
        ready = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
        assert ready == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
        assert not obj["metadata"].get("finalizers")
        assert operator.poll() is None, "the operator exited"
    finally:
        controlplane.kubectl("delete", "registrymirrornodes", node, "--ignore-not-found")
        out = stop_process(operator)
        print(out)
    for word in ("Forbidden", "forbidden", " 403", "Traceback"):
        assert word not in out, out
