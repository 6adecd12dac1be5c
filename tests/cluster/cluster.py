"""A real Kubernetes cluster on this machine: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
and kubelet nodes, each on its own containerd (see ``node.py``). Everything is built from Go modules by
``hack/build-control-plane.sh``; nothing comes from a registry.

What stands in for what a cloud gives a cluster:

* kube-proxy's one job that Pods here need, the ``kubernetes`` Service: its address (``10.0.0.1:443``, what every
  Pod gets in ``KUBERNETES_SERVICE_HOST``) is put on loopback and forwarded to the apiserver by
  :class:`ServiceAddress`. A real kube-proxy (or a CNI's replacement) does this before any CNI exists;
* kubelets authenticate with static tokens as ``system:node:<name>`` in ``system:nodes``, and the apiserver runs
  the Node authorizer and the NodeRestriction admission plugin, as kubeadm sets them up;
* no CNI at first: nodes are NotReady and only ``hostNetwork`` Pods run, as on a fresh cluster;
  :meth:`KubeletNode.install_cni` later drops a point-to-point network config from Debian's plugins.

By hand: ``python -m tests.cluster.cluster`` starts two nodes and prints a KUBECONFIG, until Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster import sleeper
from tests.cluster.node import SANDBOX_IMAGES, KubeletNode, NodeError
from tests.harness.controlplane import CACHE_BIN, SERVICE_CIDR, ControlPlane, find_binaries, terminate
from tests.harness.forwarding import Forwarder
from tests.harness.waiting import wait_for

#: Metadata (who, with which credential) of every write of a node's report; nothing else.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, patch, update]
    resources:
      - group: regmirror.io
        resources: [registrymirrornodes]
  - level: None
"""
SERVICE_IP = "10.0.0.1"  # the first address of SERVICE_CIDR: the `kubernetes` Service
assert SERVICE_CIDR.startswith("10.0.0.")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    flavor: str  # "1.6" (Debian's containerd, schema-1 config) or "2.x" (built, version 3)
    taints: tuple[str, ...] = ()
    #: Booted with its images, but its kubelet starts (and the node registers) only on ``Cluster.join``.
    joins_later: bool = False


class ServiceAddress:
    """``10.0.0.1:443`` on loopback, forwarded to the apiserver: the part of kube-proxy Pods here need."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._forwarder: Forwarder | None = None
        self._added_ip = False

    def start(self) -> None:
        added = subprocess.run(["ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "lo"], capture_output=True,
                               text=True, check=False)
        self._added_ip = added.returncode == 0
        if added.returncode != 0 and "File exists" not in added.stderr:
            raise RuntimeError(f"cannot put {SERVICE_IP} on loopback: {added.stderr.strip()}")
        self._forwarder = Forwarder(SERVICE_IP, 443, self.target_port)

    def stop(self) -> None:
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None
        if self._added_ip:
            subprocess.run(["ip", "addr", "del", f"{SERVICE_IP}/32", "dev", "lo"], capture_output=True, check=False)
            self._added_ip = False


@dataclass
class Cluster:
    """The control plane and its nodes. ``start()`` returns once every node is registered."""

    specs: Sequence[NodeSpec]
    #: Image archives every node gets preloaded (name -> archive), as a node image would carry them.
    preload: dict[str, Path] = field(default_factory=dict)
    cp: ControlPlane | None = None
    nodes: dict[str, KubeletNode] = field(default_factory=dict)
    _service: ServiceAddress | None = None
    _components: list[subprocess.Popen[bytes]] = field(default_factory=list)
    audit_dir: Path | None = None

    def start(self, timeout: float = 120.0) -> Cluster:
        find_binaries()
        for binary in ("kubelet", "kube-controller-manager", "kube-scheduler"):
            if not (CACHE_BIN / binary).is_file():
                raise RuntimeError(f"{CACHE_BIN / binary} is missing: run hack/build-control-plane.sh")
        # An audit log of the nodes' report writes: which credential (token id) each request carried.
        self.audit_dir = Path(tempfile.mkdtemp(prefix="regmirror-audit-"))
        (self.audit_dir / "policy.yaml").write_text(AUDIT_POLICY)
        self.cp = ControlPlane(
            users={f"system:node:{s.name}": ["system:nodes"] for s in self.specs},
            extra_apiserver_args=["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                                  "--kubelet-preferred-address-types=InternalIP",
                                  f"--audit-policy-file={self.audit_dir / 'policy.yaml'}",
                                  f"--audit-log-path={self.audit_dir / 'audit.log'}"])
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        assert self.cp is not None
        cp = self.cp.start()
        workdir = cp.workdir
        assert workdir is not None and cp.kubeconfig is not None
        self._service = ServiceAddress(int(cp.server.rsplit(":", 1)[1]))
        self._service.start()
        self._components.append(cp.spawn("kube-controller-manager", [
            str(CACHE_BIN / "kube-controller-manager"), f"--kubeconfig={cp.kubeconfig}",
            f"--authentication-kubeconfig={cp.kubeconfig}", f"--authorization-kubeconfig={cp.kubeconfig}",
            f"--root-ca-file={cp.ca_path}", f"--service-account-private-key-file={workdir / 'sa.key'}",
            "--leader-elect=false", "--secure-port=0", "--controllers=*", "--use-service-account-credentials=false",
            "--node-monitor-grace-period=20s", "--v=1"]))
        self._components.append(cp.spawn("kube-scheduler", [
            str(CACHE_BIN / "kube-scheduler"), f"--kubeconfig={cp.kubeconfig}",
            f"--authentication-kubeconfig={cp.kubeconfig}", f"--authorization-kubeconfig={cp.kubeconfig}",
            "--leader-elect=false", "--secure-port=0", "--v=1"]))
        sleepers = {flavor: sleeper.build_archive(workdir / f"pause-{flavor}.tar", image)
                    for flavor, image in SANDBOX_IMAGES.items()}
        for i, spec in enumerate(self.specs):
            node = KubeletNode(spec.name, flavor=spec.flavor, server=cp.server, ca_path=cp.ca_path or Path(),
                               token=cp.user_tokens[f"system:node:{spec.name}"], kubelet=CACHE_BIN / "kubelet",
                               taints=spec.taints, subnet=f"10.244.{i}.0/24", ip=f"10.250.0.{i + 1}")
            self.nodes[spec.name] = node
            node.start()  # here, in the main thread: its PID 1 must die with this process

        def preload(spec: NodeSpec) -> None:
            node = self.nodes[spec.name]
            node.import_image(sleepers[spec.flavor])
            for name, archive in self.preload.items():
                node.import_image(archive, name)
            if not spec.joins_later:
                node.start_kubelet()

        # The images go into every node at once: most of a cluster's start is unpacking them.
        with concurrent.futures.ThreadPoolExecutor(len(self.specs)) as pool:
            list(pool.map(preload, self.specs))
        first = {s.name for s in self.specs if not s.joins_later}
        wait_for("every node registered", lambda: self._registered() == first, timeout, every=0.5,
                 detail=lambda: f"nodes registered: {sorted(self._registered())}\n" + "\n".join(
                     n.tail("kubelet", 15) for n in self.nodes.values()))

    def _registered(self) -> set[str]:
        out = self.kubectl("get", "nodes", "-o", "json", check=False)
        if out.returncode != 0:
            return set()
        return {item["metadata"]["name"] for item in json.loads(out.stdout)["items"]}

    def audit(self) -> list[dict[str, Any]]:
        """The audit log's events so far (writes of RegistryMirrorNodes, see AUDIT_POLICY)."""
        assert self.audit_dir is not None, "start() first"
        try:
            lines = (self.audit_dir / "audit.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def join(self, name: str, timeout: float = 60.0) -> KubeletNode:
        """Start a ``joins_later`` node's kubelet (a node pool scaling up); return once it is registered."""
        node = self.nodes[name]
        node.start_kubelet()
        wait_for(f"{name} registered", lambda: name in self._registered(), timeout, every=0.5,
                 detail=lambda: node.tail("kubelet", 15))
        return node

    def stop(self) -> None:
        for node in self.nodes.values():
            try:
                node.remove()
            except (NodeError, OSError) as exc:
                print(f"[cluster] stopping node {node.name}: {exc}", file=sys.stderr)
        self.nodes.clear()
        for proc in self._components:
            if proc.poll() is None:
                terminate(proc)
        self._components.clear()
        if self._service is not None:
            self._service.stop()
            self._service = None
        if self.cp is not None:
            self.cp.stop()
        if self.audit_dir is not None:
            shutil.rmtree(self.audit_dir, ignore_errors=True)
            self.audit_dir = None

    # --- for tests ----------------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        assert self.cp is not None
        return self.cp.kubectl(*args, input=input, check=check, timeout=timeout)

    def get(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)  # type: ignore[no-any-return]


    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(specs: Sequence[NodeSpec], preload: dict[str, Path] | None = None) -> Iterator[Cluster]:
    cluster = Cluster(specs, preload=dict(preload or {}))
    with cluster:
        yield cluster


def main() -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with running([NodeSpec("node-a", "1.6"), NodeSpec("node-b", "2.x")]) as cluster:
        assert cluster.cp is not None
        print(f"export KUBECONFIG={cluster.cp.kubeconfig}\nnodes: {', '.join(cluster.nodes)}", flush=True)
        for node in cluster.nodes.values():
            print(f"  {node.name}: {node.dir} (init pid {node.init_pid})")
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
