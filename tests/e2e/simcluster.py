"""Simulated nodes on the real control plane, for the end-to-end tests (test_system, test_dead_mirrors, test_metrics).

Each node is a Node object, a node root with its own real containerd, and its own agent process on a token bound
to an agent Pod on that node (as the kubelet would mount it); the operator is a real ``kopf run`` process with its
service account's token and the Deployment's own command. :func:`running` sets them up and always takes them
down, leaving the control plane as it found it (no RegistryMirror, no published desired state).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regmirror_api import contract, models
from tests.harness import controlplane as cp
from tests.harness.containerd import ContainerdNode
from tests.harness.controlplane import REPO
from tests.harness.product import contents, snapshot
from tests.harness.registry import Registry

NS = contract.NAMESPACE
PYTHONPATH = os.pathsep.join(str(REPO / d) for d in ("api", "agent", "operator"))
#: The agent's default flags here: a short resync and health wait, so the tests' steps take seconds.
AGENT_ARGS = ("--resync", "5", "--health-timeout", "8")


@dataclass
class SimNode:
    name: str
    containerd: ContainerdNode
    kubeconfig: Path
    agent: subprocess.Popen[str] | None = None
    log: Path = field(default_factory=Path)
    #: Extra environment of the agent process (REGMIRROR_PROBE_SECONDS, REGMIRROR_METRICS_PORT, ...).
    env: dict[str, str] = field(default_factory=dict)
    args: Sequence[str] = AGENT_ARGS

    def start_agent(self) -> None:
        self.log = self.containerd.state_dir / "agent.log"
        # The runner's own REGMIRROR_* settings never leak into an agent: each test says what it runs with.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
        env = {**inherited, "KUBECONFIG": str(self.kubeconfig), "PYTHONPATH": PYTHONPATH,
               "NODE_NAME": self.name, "REGMIRROR_ROOT": str(self.containerd.node_root), **self.env}
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "regmirror_agent.cli", "agent", "--restart",
             "command:" + self.containerd.ctl_command(), *self.args],
            env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT, text=True)

    def stop_agent(self) -> None:
        assert self.agent is not None
        self.agent.send_signal(signal.SIGTERM)
        self.agent.wait(timeout=20)

    def files(self) -> dict[str, tuple[bytes, int]]:
        return snapshot(self.containerd.node_root, lambda p: p.name != "containerd.log")

    def config(self) -> dict[str, bytes]:
        return contents(self.containerd.etc_dir)

    def rss_kib(self) -> int:
        assert self.agent is not None
        for line in Path(f"/proc/{self.agent.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@dataclass
class Cluster:
    plane: cp.ControlPlane
    registry: Registry
    nodes: dict[str, SimNode]
    operator: subprocess.Popen[str]
    operator_log: Path
    operator_command: list[str] = field(default_factory=list)
    operator_env: dict[str, str] = field(default_factory=dict)

    def kill_operator(self) -> None:
        """SIGKILL: no cleanup, as when its node dies mid-rollout."""
        self.operator.kill()
        self.operator.wait(timeout=10)

    def start_operator(self) -> None:
        self.operator = subprocess.Popen(self.operator_command, cwd=REPO, text=True, env=self.operator_env,
                                         stdout=self.operator_log.open("a"), stderr=subprocess.STDOUT)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, input=input, check=check)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply_mirror(self, name: str, registry: str, urls: list[str], selector: dict[str, Any] | None = None,
                     upstream: str | None = None) -> None:
        spec: dict[str, Any] = {"registry": registry, "mirrors": [{"url": u} for u in urls]}
        if selector:
            spec["nodeSelector"] = selector
        if upstream:
            spec["upstream"] = upstream
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": models.KIND,
            "metadata": {"name": name}, "spec": spec}))

    def status(self, name: str) -> dict[str, Any]:
        obj = self.get("registrymirror", name)
        return {"generation": obj["metadata"]["generation"], **(obj.get("status") or {})}

    def node_reports(self, name: str) -> dict[str, dict[str, Any]]:
        """Each node's report on RegistryMirror ``name``, from the nodes' RegistryMirrorNode objects."""
        items = self.get("registrymirrornodes")["items"]
        return {o["metadata"]["name"]: r for o in items for r in o.get("status", {}).get("mirrors", [])
                if r["name"] == name}

    def converged(self, name: str, ready: str) -> dict[str, Any] | None:
        """The status once ``name`` is Ready with ``ready`` nodes for its generation, else None (a poll: an
        apiserver that does not answer yet, just after an outage a test made, is a "not yet" too)."""
        try:
            s = self.status(name)
        except (cp.KubectlError, subprocess.TimeoutExpired):
            return None
        conditions = {c["type"]: c["status"] for c in s.get("conditions", [])}
        ok = (s.get("observedGeneration") == s["generation"] and s.get("ready") == ready
              and conditions.get("Ready") == "True")
        return s if ok else None

    def alive(self) -> None:
        assert self.operator.poll() is None, f"the operator exited:\n{self.operator_log.read_text()[-3000:]}"
        for node in self.nodes.values():
            assert node.agent is not None and node.agent.poll() is None, \
                f"{node.name}'s agent exited:\n{node.log.read_text()[-3000:]}"


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node: its Node labels, its containerd (config schema, binaries) and its agent's settings."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    config_version: int = 1  # the seed's own format: no version key, [plugins.cri]
    binaries: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = AGENT_ARGS


def token_kubeconfig(plane: cp.ControlPlane, path: Path, *args: str, user: str) -> Path:
    token = plane.kubectl("create", "token", *args, "--duration=2h").stdout.strip()
    return plane.write_kubeconfig(path, token=token, user=user, namespace=NS)


@contextlib.contextmanager
def agent_pod_token(plane: cp.ControlPlane, node: str, pod: str, duration: str = "10m") -> Iterator[str]:
    """A token of the agent's service account bound to an agent Pod on ``node``, as the kubelet would mount it (the
    apiserver puts the Pod's node into the user extra authentication.kubernetes.io/node-name). No kubelet runs
    here to confirm a graceful deletion, so the Pod is removed forcibly afterwards."""
    plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS},
        "spec": {"serviceAccountName": "regmirror-agent", "nodeName": node,
                 "containers": [{"name": "agent", "image": "regmirror:0.1.0"}]}}))
    try:
        yield plane.kubectl("create", "token", "regmirror-agent", "-n", NS, "--bound-object-kind=Pod",
                            f"--bound-object-name={pod}", f"--duration={duration}").stdout.strip()
    finally:
        plane.kubectl("delete", "pod", pod, "-n", NS, "--grace-period=0", "--force", "--ignore-not-found")


def _clean_slate(plane: cp.ControlPlane, *, wait: bool) -> None:
    """No RegistryMirror and no published desired state: what other tests left would reach these nodes."""
    plane.kubectl("delete", "registrymirrors", "--all", *(("--wait", "--timeout=30s") if wait else ("--wait=false",)),
                  check=not wait)
    plane.kubectl("patch", "configmap", contract.CONFIGMAP, "-n", NS, "--type=json",
                  "-p", '[{"op": "remove", "path": "/data"}]', check=False)


@contextlib.contextmanager
def running(plane: cp.ControlPlane, registry: Registry, work: Path, specs: Sequence[NodeSpec], *,
            operator_env: Mapping[str, str] | None = None, state_prefix: str = "rms-") -> Iterator[Cluster]:
    """The nodes of ``specs`` with their agents, and the operator; everything stopped and removed on exit."""
    nodes: dict[str, SimNode] = {}
    operator: subprocess.Popen[str] | None = None
    cluster: Cluster | None = None
    _clean_slate(plane, wait=True)
    try:
        for spec in specs:
            plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": spec.name, "labels": {
                    "kubernetes.io/os": "linux", "kubernetes.io/hostname": spec.name, **spec.labels}}}))
            pod = f"regmirror-agent-{spec.name}"
            plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS},
                "spec": {"serviceAccountName": "regmirror-agent", "nodeName": spec.name,
                         "containers": [{"name": "agent", "image": "regmirror:0.1.0"}]}}))
            kubeconfig = token_kubeconfig(plane, work / f"{spec.name}.kubeconfig", "regmirror-agent", "-n", NS,
                                          "--bound-object-kind=Pod", f"--bound-object-name={pod}", user=spec.name)
            state = Path(tempfile.mkdtemp(prefix=state_prefix, dir="/tmp"))
            containerd = ContainerdNode(work / spec.name, state, name=spec.name, binaries_dir=spec.binaries)
            containerd.write_config(spec.config_version)
            containerd.start()
            nodes[spec.name] = SimNode(spec.name, containerd, kubeconfig, env=dict(spec.env), args=spec.args)
        op_kubeconfig = token_kubeconfig(plane, work / "operator.kubeconfig", "regmirror-operator", "-n", NS,
                                         user="regmirror-operator")
        deployment = json.loads(plane.kubectl("get", "deployment", "regmirror-operator", "-n", NS,
                                              "-o", "json").stdout)
        command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        args = [a if not a.startswith("--liveness=") else f"--liveness=http://127.0.0.1:{cp.free_port()}/healthz"
                for a in command[1:]]
        operator_log = work / "operator.log"
        operator_command = [sys.executable, "-m", "kopf", *args]
        env = {**os.environ, "KUBECONFIG": str(op_kubeconfig), "PYTHONPATH": PYTHONPATH, **(operator_env or {})}
        operator = subprocess.Popen(operator_command, cwd=REPO, text=True, env=env,
                                    stdout=operator_log.open("w"), stderr=subprocess.STDOUT)
        for node in nodes.values():
            node.start_agent()
        cluster = Cluster(plane, registry, nodes, operator, operator_log, operator_command, env)
        yield cluster
    finally:
        # The operator a test restarted, not only the first one: none may outlive this module and publish.
        operators = [cluster.operator] if cluster is not None else [operator] if operator else []
        procs = [n.agent for n in nodes.values() if n.agent] + operators
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for node in nodes.values():
            node.containerd.stop()
            shutil.rmtree(node.containerd.state_dir, ignore_errors=True)
        for name in nodes:
            plane.kubectl("delete", "pod", f"regmirror-agent-{name}", "-n", NS, "--grace-period=0",
                          "--force", "--ignore-not-found", check=False)
            plane.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
            # No garbage collector runs here to remove the report with its Node: the next module must not see it.
            plane.kubectl("delete", contract.NODE_PLURAL, name, "--ignore-not-found", "--wait=false", check=False)
        _clean_slate(plane, wait=False)
