"""The operator alone against a real kube-apiserver, as a real process with its own service account's token.

No agents run here: their reports are the RegistryMirrorNode objects an agent writes, sent with node-bound
tokens of the agent's service account, so the admission policy and RBAC judge them as they would an agent's.
Running the operator with ``kubectl create token regmirror-operator`` proves the shipped RBAC is enough.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from regmirror_api import contract
from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO

pytestmark = pytest.mark.controlplane

NS = contract.NAMESPACE
NODES = {"node-a": "a", "node-b": "b", "node-c": "c"}
EXAMPLES = REPO / "examples"
T = TypeVar("T")


def eventually(probe: Callable[[], T], *, until: Callable[[T], Any] = bool, timeout: float = 15.0,
               what: str = "condition") -> T:
    """Poll ``probe`` until ``until`` holds for its value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.1)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_kubeconfig(plane: cp.ControlPlane, path: Path, token: str, user: str) -> Path:
    assert plane.ca_path is not None
    config = {"apiVersion": "v1", "kind": "Config",
              "clusters": [{"name": "e2e", "cluster": {
                  "server": plane.server,
                  "certificate-authority-data": base64.b64encode(plane.ca_path.read_bytes()).decode()}}],
              "users": [{"name": user, "user": {"token": token}}],
              "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
              "current-context": "e2e"}
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class Operator:
    """``kopf run`` as the Deployment runs it, logged to a file; start and stop at will."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log
        self.port = cp.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
                 f"--liveness=http://127.0.0.1:{self.port}/healthz", "-m", "regmirror_operator.main"],
                cwd=REPO, env={**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1",
                               # The source folders, so an editable install made before a package existed
                               # does not matter.
                               "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("api", "agent", "operator"))},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        eventually(lambda: " RegistryMirrorNodes" in self.log()[offset:] or self._died(), timeout=30,
                   what="the operator's first listing")

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result


def node_names(plane: cp.ControlPlane) -> set[str]:
    return set(plane.kubectl("get", "nodes", "-o", "name").stdout.replace("node/", "").split())


@pytest.fixture(scope="module")
def nodes(controlplane: cp.ControlPlane, installed: str) -> Iterator[list[str]]:
    with only_these_nodes(controlplane, NODES) as names:
        yield names


@contextlib.contextmanager
def only_these_nodes(controlplane: cp.ControlPlane, pools: dict[str, str]) -> Iterator[list[str]]:
    """Node objects named after ``pools`` (label ``pool``), and no other: status counts ("0/3") assume it."""
    eventually(lambda: node_names(controlplane), until=lambda names: not names - set(pools), timeout=20,
               what="no Nodes left by other tests")
    for name, pool in pools.items():
        controlplane.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"pool": pool, "kubernetes.io/os": "linux"}}}))
    try:
        yield list(pools)
    finally:
        controlplane.kubectl("delete", "nodes", *pools, "--ignore-not-found")


@pytest.fixture(scope="module")
def operator(controlplane: cp.ControlPlane, installed: str, nodes: list[str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with running_operator(controlplane, tmp_path_factory.mktemp("operator")) as op:
        yield op


@contextlib.contextmanager
def running_operator(controlplane: cp.ControlPlane, folder: Path) -> Iterator[Operator]:
    """The operator as a ``kopf run`` process with its service account's token; always stopped."""
    token = controlplane.kubectl("create", "token", "regmirror-operator", "-n", NS, "--duration=2h").stdout.strip()
    op = Operator(write_kubeconfig(controlplane, folder / "kubeconfig", token, "regmirror-operator"),
                  folder / "operator.log")
    try:
        op.start()  # inside the try: an operator that never got ready must not outlive the test
        yield op
    finally:
        op.stop()


@pytest.fixture(autouse=True)
def no_permission_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that ran the operator: it never met a 403 and never logged a traceback."""
    yield
    if "operator" in request.fixturenames:
        log = request.getfixturevalue("operator").log()
        for words in ("HTTP 403", "Forbidden", "forbidden", "Traceback"):
            assert words not in log, log[-4000:]


@pytest.fixture
def cleanup(controlplane: cp.ControlPlane) -> Iterator[list[str]]:
    """Names of RegistryMirrors to delete after the test."""
    names: list[str] = []
    yield names
    if names:
        controlplane.kubectl("delete", "registrymirrors", *names, "--ignore-not-found", "--wait", "--timeout=20s")


_agent_tokens: dict[str, str] = {}
_node_reports: dict[str, dict[str, contract.Report]] = {}


def report_as_agent(plane: cp.ControlPlane, name: str, node: str, generation: int, state: str = "Applied",
                    message: str = "", time: str | None = None) -> None:
    """What the agent on ``node`` sends: its own RegistryMirrorNode (with every report it holds), with a token
    bound to its Node."""
    if node not in _agent_tokens:
        _agent_tokens[node] = plane.kubectl("create", "token", "regmirror-agent", "-n", NS, "--duration=1h",
                                            "--bound-object-kind=Node", f"--bound-object-name={node}").stdout.strip()
    uid = get(plane, name)["metadata"]["uid"]
    reports = _node_reports.setdefault(node, {})
    reports[name] = contract.Report(name, generation, state, message, uid=uid)
    body = json.dumps(contract.render_node_report(node, "", list(reports.values()), time=time or now()))
    token = ["--token", _agent_tokens[node]]
    done = plane.kubectl(*token, "patch", "registrymirrornode", node, "--type=merge", "-p", body, check=False)
    if done.returncode != 0:
        assert "NotFound" in done.stderr or "not found" in done.stderr, done.stderr
        plane.kubectl(*token, "create", "-f", "-", input=body)


@pytest.fixture(autouse=True)
def forget_reports(controlplane: cp.ControlPlane) -> Iterator[None]:
    """Each test starts with no node reports."""
    yield
    _node_reports.clear()
    controlplane.kubectl("delete", "registrymirrornodes", "--all", "--wait", "--timeout=20s")


def get(plane: cp.ControlPlane, name: str) -> dict[str, Any]:
    done = plane.kubectl("get", "registrymirror", name, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj.get("status", {}).get("conditions", [])}


def published(plane: cp.ControlPlane) -> dict[str, contract.Entry]:
    cm = json.loads(plane.kubectl("get", "configmap", contract.CONFIGMAP, "-n", NS, "-o", "json").stdout)
    text = (cm.get("data") or {}).get(contract.CONFIGMAP_KEY)
    return {e.name: e for e in contract.parse_desired(text).entries} if text else {}


def apply(plane: cp.ControlPlane, name: str, registry: str, url: str, **spec: Any) -> None:
    plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
        "apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": name},
        "spec": {"registry": registry, "mirrors": [{"url": url}], **spec}}))


def events_about(plane: cp.ControlPlane, name: str) -> list[tuple[str, str, str]]:
    items = json.loads(plane.kubectl("get", "events", "-A", "-o", "json",
                                     f"--field-selector=involvedObject.name={name}").stdout)["items"]
    return [(e["type"], e["reason"], e["message"]) for e in items]


# --- the tests -----------------------------------------------------------------------------------------------


def test_examples_are_published_and_reconciling_at_once(controlplane: cp.ControlPlane, operator: Operator,
                                                         cleanup: list[str]) -> None:
    cleanup += ["docker-io", "quay-io"]
    t0 = time.monotonic()
    controlplane.kubectl("apply", "-f", str(EXAMPLES))
    entries = eventually(lambda: published(controlplane), until=lambda p: {"docker-io", "quay-io"} <= set(p),
                         what="the examples in the ConfigMap")
    seconds = time.monotonic() - t0
    assert entries["quay-io"].spec == {"registry": "quay.io",
                                       "mirrors": [{"url": "https://quay.tencentcloudcr.com"}]}
    assert entries["quay-io"].generation == 1 and entries["quay-io"].node_selector == {}

    for name in ("docker-io", "quay-io"):
        obj = eventually(lambda n=name: get(controlplane, n), until=lambda o: o.get("status", {}).get("conditions"),
                         what=f"the first status of {name}")
        # Brand new: nodes have not reported, so it is Reconciling and not Ready, never mistaken for healthy.
        assert conditions(obj) == {"Ready": ("False", "Progressing"), "Reconciling": ("True", "Progressing"),
                                   "Stalled": ("False", "Progressing")}
        assert obj["status"]["ready"] == "0/3" and obj["status"]["observedGeneration"] == 1
        assert "finalizers" not in obj["metadata"]
        assert not {k for k in obj["metadata"].get("annotations", {}) if "kopf" in k}
    table = controlplane.kubectl("get", "registrymirrors", "quay-io", "--no-headers").stdout.split()
    assert table[3] == "0/3"
    print(f"\n[e2e] kubectl apply -> published and Reconciling: {seconds:.2f} s")
    assert operator.health()["reconciler"]["failuresInARow"] == 0


def test_agent_reports_make_it_ready_and_kubectl_wait_succeeds(controlplane: cp.ControlPlane,
                                                               operator: Operator, cleanup: list[str]) -> None:
    cleanup.append("quay-io")
    controlplane.kubectl("apply", "-f", str(EXAMPLES / "quay-io.yaml"))
    eventually(lambda: "quay-io" in published(controlplane), what="quay-io published")
    report_as_agent(controlplane, "quay-io", "node-a", 1)
    report_as_agent(controlplane, "quay-io", "node-b", 1, "Failed", "containerd did not come back; rolled back")
    status = eventually(lambda: get(controlplane, "quay-io").get("status", {}),
                        until=lambda s: s.get("nodes", {}).get("failed") == 1, what="the failure counted")
    assert status["ready"] == "1/3" and status["failingNodes"] == [
        {"name": "node-b", "reason": "containerd did not come back; rolled back"}]
    assert status["message"] == ("1 of 3 nodes failed generation 1 (1 applied): "
                                 "node-b: containerd did not come back; rolled back")
    assert conditions({"status": status})["Ready"] == ("False", "NodesFailed")
    assert controlplane.kubectl("wait", "--for=condition=Ready", "registrymirror/quay-io", "--timeout=1s",
                                check=False).returncode != 0

    t0 = time.monotonic()
    report_as_agent(controlplane, "quay-io", "node-b", 1)
    report_as_agent(controlplane, "quay-io", "node-c", 1)
    controlplane.kubectl("wait", "--for=condition=Ready", "registrymirror/quay-io", "--timeout=30s")
    print(f"\n[e2e] last agent report -> Ready: {time.monotonic() - t0:.2f} s")
    status = get(controlplane, "quay-io")["status"]
    assert status["ready"] == "3/3"
    assert status["nodes"] == {"selected": 3, "applied": 3, "failed": 0, "waiting": 0, "inUse": 0}
    assert status["message"] == "3/3 nodes run generation 1"
    assert conditions({"status": status})["Reconciling"] == ("False", "Applied")

    found = eventually(lambda: events_about(controlplane, "quay-io"),
                       until=lambda e: ("Normal", "Ready", "3/3 nodes run generation 1") in e, what="the Ready event")
    assert ("Warning", "NodesFailed", "1 node failed generation 1; newly failing: node-b: "
                                      "containerd did not come back; rolled back") in found
    described = controlplane.kubectl("describe", "registrymirror", "quay-io").stdout
    assert "NodesFailed" in described and "3/3 nodes run generation 1" in described

    # A new generation is not Ready until the nodes report it.
    controlplane.kubectl("patch", "registrymirror", "quay-io", "--type=merge", "-p",
                         json.dumps({"spec": {"mirrors": [{"url": "https://quay-mirror.example.com"}]}}))
    eventually(lambda: get(controlplane, "quay-io")["status"]["observedGeneration"] == 2, what="generation 2")
    assert conditions(get(controlplane, "quay-io"))["Ready"] == ("False", "Progressing")
    assert published(controlplane)["quay-io"].generation == 2
    for node in NODES:
        report_as_agent(controlplane, "quay-io", node, 2)
    controlplane.kubectl("wait", "--for=condition=Ready", "registrymirror/quay-io", "--timeout=30s")


def test_a_second_registrymirror_for_one_registry_is_stalled_naming_the_winner(
        controlplane: cp.ControlPlane, operator: Operator, cleanup: list[str]) -> None:
    cleanup += ["e2e-first", "e2e-second"]
    apply(controlplane, "e2e-first", "ghcr.io", "https://ghcr-mirror.example.com")
    eventually(lambda: "e2e-first" in published(controlplane), what="the first one published")
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    apply(controlplane, "e2e-second", "ghcr.io", "https://other.example.com")
    controlplane.kubectl("wait", "--for=condition=Stalled", "registrymirror/e2e-second", "--timeout=15s")
    loser = get(controlplane, "e2e-second")
    assert conditions(loser) == {"Ready": ("False", "Conflict"), "Reconciling": ("False", "Conflict"),
                                 "Stalled": ("True", "Conflict")}
    assert "already mirrored by RegistryMirror 'e2e-first'" in loser["status"]["message"]
    assert published(controlplane)["e2e-first"].spec["mirrors"] == [{"url": "https://ghcr-mirror.example.com"}]
    assert "e2e-second" not in published(controlplane)
    assert eventually(lambda: [e for e in events_about(controlplane, "e2e-second") if e[1] == "Conflict"],
                      what="the Conflict event")
    assert conditions(get(controlplane, "e2e-first"))["Stalled"] == ("False", "Progressing")

    # The winner goes: the other one takes over.
    controlplane.kubectl("delete", "registrymirror", "e2e-first", "--wait", "--timeout=5s")
    eventually(lambda: "e2e-second" in published(controlplane) and "e2e-first" not in published(controlplane),
               what="the other one published")
    eventually(lambda: conditions(get(controlplane, "e2e-second")).get("Stalled") == ("False", "Progressing"),
               what="no longer Stalled")


def test_a_nodeselector_matching_one_node_counts_only_that_node(
        controlplane: cp.ControlPlane, operator: Operator, cleanup: list[str]) -> None:
    cleanup.append("e2e-pool-b")
    apply(controlplane, "e2e-pool-b", "registry.example.com:5000", "http://10.0.0.5:5000",
          nodeSelector={"matchLabels": {"pool": "b"}})
    eventually(lambda: get(controlplane, "e2e-pool-b").get("status", {}).get("ready") == "0/1", what="0/1")
    assert published(controlplane)["e2e-pool-b"].node_selector == {"matchLabels": {"pool": "b"}}
    report_as_agent(controlplane, "e2e-pool-b", "node-b", 1)
    # A report left by a node that no longer matches counts for nothing.
    report_as_agent(controlplane, "e2e-pool-b", "node-a", 1, "Failed", "left over")
    controlplane.kubectl("wait", "--for=condition=Ready", "registrymirror/e2e-pool-b", "--timeout=15s")
    assert get(controlplane, "e2e-pool-b")["status"]["ready"] == "1/1"

    # node-c joins the pool: the object is no longer Ready until node-c reports.
    controlplane.kubectl("label", "node", "node-c", "pool=b", "--overwrite")
    try:
        eventually(lambda: get(controlplane, "e2e-pool-b")["status"]["ready"] == "1/2", what="1/2")
        assert conditions(get(controlplane, "e2e-pool-b"))["Ready"] == ("False", "Progressing")
    finally:
        controlplane.kubectl("label", "node", "node-c", "pool=c", "--overwrite")
    eventually(lambda: get(controlplane, "e2e-pool-b")["status"]["ready"] == "1/1", what="back to 1/1")


def test_the_report_of_a_node_that_is_gone_is_deleted(controlplane: cp.ControlPlane, operator: Operator,
                                                      cleanup: list[str]) -> None:
    # No garbage collector runs here, so the operator's own fallback is what removes it. A fresh report of a
    # node the operator has not seen yet is kept for a while; this one was written long ago.
    cleanup.append("quay-io")
    controlplane.kubectl("apply", "-f", str(EXAMPLES / "quay-io.yaml"))
    controlplane.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-gone"}}))
    try:
        report_as_agent(controlplane, "quay-io", "node-gone", 1, time="2025-01-01T00:00:00Z")
    finally:
        controlplane.kubectl("delete", "node", "node-gone")
    report_as_agent(controlplane, "quay-io", "node-a", 1)
    eventually(lambda: controlplane.kubectl("get", "rmn", "node-gone", check=False).returncode != 0,
               what="the departed node's report deleted")
    assert controlplane.kubectl("get", "rmn", "node-a", check=False).returncode == 0


def test_a_thousand_reports_leave_the_registrymirror_small(controlplane: cp.ControlPlane, operator: Operator,
                                                           cleanup: list[str]) -> None:
    cleanup.append("quay-io")
    controlplane.kubectl("apply", "-f", str(EXAMPLES / "quay-io.yaml"))
    eventually(lambda: get(controlplane, "quay-io").get("status", {}).get("ready") == "0/3", what="0/3")
    for node in NODES:
        report_as_agent(controlplane, "quay-io", node, 1, "Failed", "x" * 600)
    status = eventually(lambda: get(controlplane, "quay-io").get("status", {}),
                        until=lambda st: st.get("nodes", {}).get("failed") == 3, what="three failures")
    obj = get(controlplane, "quay-io")
    assert len(json.dumps(obj)) < 10 * 1024, len(json.dumps(obj))
    assert "nodeReports" not in status


def test_deleting_completes_at_once_and_the_configmap_drops_it(controlplane: cp.ControlPlane,
                                                               operator: Operator, cleanup: list[str]) -> None:
    cleanup.append("e2e-delete")
    apply(controlplane, "e2e-delete", "gcr.io", "https://gcr-mirror.example.com")
    eventually(lambda: "e2e-delete" in published(controlplane), what="published")
    eventually(lambda: get(controlplane, "e2e-delete").get("status"), what="a status")
    t0 = time.monotonic()
    controlplane.kubectl("delete", "registrymirror", "e2e-delete", "--wait", "--timeout=5s")
    assert time.monotonic() - t0 < 5
    eventually(lambda: "e2e-delete" not in published(controlplane), what="dropped from the ConfigMap")


def test_the_operator_catches_up_after_being_stopped(controlplane: cp.ControlPlane, operator: Operator,
                                                     cleanup: list[str]) -> None:
    cleanup += ["e2e-before", "e2e-while-down"]
    apply(controlplane, "e2e-before", "mcr.microsoft.com", "https://mcr-mirror.example.com")
    eventually(lambda: "e2e-before" in published(controlplane), what="published")
    operator.stop()
    try:
        controlplane.kubectl("delete", "registrymirror", "e2e-before", "--wait", "--timeout=5s")
        apply(controlplane, "e2e-while-down", "registry.k8s.io", "https://k8s-mirror.example.com")
        time.sleep(1)
        assert "e2e-before" in published(controlplane)  # nobody published while the operator was down
    finally:
        operator.start()
    eventually(lambda: published(controlplane), until=lambda p: "e2e-before" not in p and "e2e-while-down" in p,
               what="the ConfigMap caught up")
    eventually(lambda: get(controlplane, "e2e-while-down").get("status", {}).get("ready") == "0/3",
               what="the status of the object created while down")


def test_a_document_too_large_for_the_configmap_stalls_the_newest_and_keeps_the_last_good_one(
        controlplane: cp.ControlPlane, operator: Operator, cleanup: list[str]) -> None:
    # Ten mirrors with a 64 KB caBundle each is a valid RegistryMirror; two of them do not fit in a ConfigMap.
    cleanup += ["e2e-big-old", "e2e-big-new"]
    pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join(["A" * 64] * 1000) + "\n-----END CERTIFICATE-----\n"
    big = [{"url": f"https://m{i}.example.com", "caBundle": pem[:65536]} for i in range(10)]
    apply(controlplane, "e2e-big-old", "quay.io", "https://unused.example.com")
    controlplane.kubectl("patch", "registrymirror", "e2e-big-old", "--type=merge", "--patch-file=/dev/stdin",
                         input=json.dumps({"spec": {"mirrors": big}}))
    eventually(lambda: "e2e-big-old" in published(controlplane), what="the first big one published")
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    apply(controlplane, "e2e-big-new", "ghcr.io", "https://unused.example.com")
    controlplane.kubectl("patch", "registrymirror", "e2e-big-new", "--type=merge", "--patch-file=/dev/stdin",
                         input=json.dumps({"spec": {"mirrors": big}}))
    controlplane.kubectl("wait", "--for=condition=Stalled", "registrymirror/e2e-big-new", "--timeout=30s")
    stalled = get(controlplane, "e2e-big-new")
    assert conditions(stalled)["Stalled"] == ("True", "DocumentTooLarge")
    assert "a ConfigMap can hold" in stalled["status"]["message"], stalled["status"]["message"]
    # The new one's generation 1 (a small spec) was published before it grew: its nodes keep that.
    entries = published(controlplane)
    assert entries["e2e-big-old"].generation == 2 and len(entries["e2e-big-old"].spec["mirrors"]) == 10
    assert entries.get("e2e-big-new") is None or entries["e2e-big-new"].generation == 1
    assert "Traceback" not in operator.log()
