"""regmirror installed the way a user installs it, on a real cluster, through a node's whole life.

The cluster (``cluster.py``): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and three kubelet
nodes, each on its own containerd in a "host" of its own (``node.py``):

* ``node-a``: Debian's containerd 1.6 with a schema-1 config.toml like the seed's;
* ``node-b``: containerd 2.x (built from its Go module) with a version-3 config.toml;
* ``node-c``: containerd 1.6, which joins later, registering with ``regmirror.io/mirrors-pending:NoSchedule``.

No node has a CNI when regmirror is installed: nodes are NotReady and only hostNetwork Pods run, as on a new
cluster whose CNI images are to come through the mirrors. The image is built from the shipped Dockerfile on a
Debian base (``image.py``) and preloaded into every node's containerd; the manifests are the shipped ones,
applied through a kustomize overlay that only sets the image tag.

The tests run in order and share the cluster (like a day in its life); each asserts what a user sees: ``kubectl
get``, the nodes' files, the mirror's access log, containerd's processes. Figures go to ``FIGURES`` (printed at
the end) for the closing note.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import image as images
from tests.cluster import sleeper
from tests.cluster.cluster import Cluster, NodeSpec
from tests.cluster.node import KubeletNode
from tests.cluster.test_chart import CHART, helm_binary
from tests.harness.registry import SKOPEO_BIN, Registry
from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
NS = "regmirror-system"
PENDING = "regmirror.io/mirrors-pending"
WORKLOAD_IMAGE = "quay.io/regmirror-test/sleeper:1"
NEW_TAG = f"{images.DEFAULT_TAG}-r2"  # the second revision test_image.py builds too
FIGURES: dict[str, Any] = {}
#: Where the figures go for hack/test.sh to print (pytest keeps a passing test's output to itself).
FIGURES_FILE = REPO / ".cache" / "figures" / "cluster.json"


@dataclass
class World:
    cluster: Cluster
    registry: Registry
    first: images.BuiltImage
    second: images.BuiltImage
    overlay: Path
    before: dict[str, dict[str, bytes]]

    @property
    def nodes(self) -> dict[str, KubeletNode]:
        return self.cluster.nodes

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check)

    def get(self, *args: str) -> Any:
        return self.cluster.get(*args)

    def install(self, tag: str) -> float:
        """``kubectl apply --server-side -k`` of the shipped manifests with the image tag set; seconds taken."""
        (self.overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(REPO / "manifests", self.overlay)],
            "images": [{"name": "regmirror", "newTag": tag}]}))
        t0 = time.monotonic()
        self.kubectl("apply", "--server-side", "-k", str(self.overlay))
        return time.monotonic() - t0

    def agents(self) -> dict[str, dict[str, Any]]:
        """The agent Pods by node (a Pod the scheduler has not bound yet is on none)."""
        pods = self.get("pods", "-n", NS, "-l", "app.kubernetes.io/name=regmirror-agent")["items"]
        return {p["spec"]["nodeName"]: p for p in pods
                if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")}

    def ready_column(self) -> dict[str, str]:
        rows = [line.split() for line in self.kubectl("get", "registrymirrors").stdout.splitlines()[1:]]
        header = self.kubectl("get", "registrymirrors").stdout.splitlines()[0].split()
        return {r[0]: r[header.index("READY")] for r in rows}

    def reports(self) -> dict[str, dict[str, Any]]:
        return {o["metadata"]["name"]: o for o in self.get("registrymirrornodes")["items"]}

    def wait(self, what: str, predicate: Any, timeout: float = 120.0) -> None:
        wait_for(what, predicate, timeout, every=0.5, detail=self.debug)

    def debug(self) -> str:
        out = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout,
               self.kubectl("get", "registrymirrors,registrymirrornodes", check=False).stdout]
        for name, pod in self.agents().items():
            logs = self.kubectl("logs", "-n", NS, pod["metadata"]["name"], "--tail=15", check=False)
            out.append(f"--- agent on {name}:\n{logs.stdout}{logs.stderr}")
        op = self.kubectl("logs", "-n", NS, "deployment/regmirror-operator", "--tail=15", check=False)
        out.append(f"--- operator:\n{op.stdout}{op.stderr}")
        return "\n".join(out)


def node_files(node: KubeletNode) -> dict[str, bytes]:
    """Every file regmirror may touch on the node (its /etc/containerd, /etc/docker, /var/lib/regmirror)."""
    out: dict[str, bytes] = {}
    for sub in ("etc/containerd", "etc/docker", "var/lib/regmirror"):
        root = node.dir / sub
        if root.exists():
            out[sub + "/"] = b"(folder)"
        for path in sorted(root.rglob("*")) if root.exists() else []:
            out[str(path.relative_to(node.dir))] = path.read_bytes() if path.is_file() else b"(folder)"
    return out


def node_stamps(node: KubeletNode) -> dict[str, int]:
    """Each file's modification time: a rewrite with the same bytes still changes it."""
    return {str(p.relative_to(node.dir)): p.stat().st_mtime_ns
            for sub in ("etc/containerd", "var/lib/regmirror") for p in (node.dir / sub).rglob("*") if p.is_file()}


def workload(name: str, node: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "app", "image": WORKLOAD_IMAGE, "imagePullPolicy": "Always"}]}})


def seed_mirrors(url: str) -> str:
    """The seed's two RegistryMirrors (examples/), pointed at the loopback mirror instead of Tencent's."""
    docs = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        doc["spec"]["mirrors"] = [{"url": url}]
        docs.append(doc)
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("cluster")
    t0 = time.monotonic()
    builder = images.start_dockerd(work)
    try:
        first = images.ensure_image(builder)
        second = images.ensure_image(builder, tag=NEW_TAG, revision=2)
    finally:
        builder.close()
    FIGURES["image"] = first.describe()
    FIGURES["image_size_mb"] = round(first.size / 1e6, 1)
    FIGURES["image_seconds"] = round(time.monotonic() - t0, 1)
    registry = Registry(work / "mirror")
    cluster = Cluster([NodeSpec("node-a", "1.6"), NodeSpec("node-b", "2.x"),
                       NodeSpec("node-c", "1.6", taints=(f"{PENDING}:NoSchedule",), joins_later=True)],
                      preload={first.containerd_reference: first.tar})
    try:
        layout = sleeper.build_layout(work / "sleeper", "1", marker=WORKLOAD_IMAGE)
        pushed = subprocess.run([SKOPEO_BIN, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                                 f"oci:{layout}:1", f"docker://{registry.host}/regmirror-test/sleeper:1"],
                                capture_output=True, text=True, timeout=120, check=False)
        assert pushed.returncode == 0, pushed.stderr
        t0 = time.monotonic()
        cluster.start()
        FIGURES["cluster_start_seconds"] = round(time.monotonic() - t0, 1)
        overlay = work / "overlay"
        overlay.mkdir()
        before = {name: node_files(node) for name, node in cluster.nodes.items()}
        yield World(cluster, registry, first, second, overlay, before)
    finally:
        cluster.stop()
        registry.stop()
        print("\nregmirror cluster figures: " + json.dumps(FIGURES))
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2) + "\n")


def test_1_the_install_runs_on_every_node_before_any_cni(world: World) -> None:
    for name in ("node-a", "node-b"):
        assert not list((world.nodes[name].dir / "etc/cni/net.d").iterdir()), "no CNI yet"
    t0 = time.monotonic()
    world.install(images.DEFAULT_TAG)

    def ready() -> bool:
        ds = world.get("daemonset", "regmirror-agent", "-n", NS)["status"]
        op = world.get("deployment", "regmirror-operator", "-n", NS)["status"]
        return bool(ds.get("numberReady") == ds.get("desiredNumberScheduled") == 2 and op.get("availableReplicas") == 1)

    world.wait("the DaemonSet and the operator to be Ready", ready)
    FIGURES["apply_to_daemonset_ready_seconds"] = round(time.monotonic() - t0, 1)
    pods = world.kubectl("get", "pods", "-n", NS, "-o", "wide").stdout
    print(pods)
    agents = world.agents()
    assert set(agents) == {"node-a", "node-b"}
    for pod in agents.values():
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["containers"][0]["image"] == f"regmirror:{images.DEFAULT_TAG}"
    # No CNI: the nodes are NotReady, and regmirror runs anyway.
    nodes = world.get("nodes")["items"]
    assert all(c["status"] != "True" for n in nodes for c in n["status"]["conditions"] if c["type"] == "Ready")


def test_2_the_seed_mirrors_reach_2_of_2_and_each_agent_restarts_its_containerd_from_its_pod(world: World) -> None:
    agents_before = {n: p["status"]["containerStatuses"][0]["containerID"] for n, p in world.agents().items()}
    starts = {n: world.nodes[n].containerd_starts() for n in ("node-a", "node-b")}
    t0 = time.monotonic()
    world.kubectl("apply", "--server-side", "-f", "-", input=seed_mirrors(world.registry.url))
    world.wait("both RegistryMirrors 2/2", lambda: world.ready_column() == {"docker-io": "2/2", "quay-io": "2/2"})
    FIGURES["seed_apply_to_2_of_2_seconds"] = round(time.monotonic() - t0, 1)
    print(world.kubectl("get", "registrymirrors").stdout)
    for name in ("node-a", "node-b"):
        node = world.nodes[name]
        # Moving into hosts mode sets config_path: one restart of the node's containerd, by the agent.
        assert node.containerd_starts() == starts[name] + 1, name
        assert world.registry.url in (node.etc_containerd / "certs.d/quay.io/hosts.toml").read_text()
        # ... from inside its Pod, through the host's namespaces: the new containerd is the node's PID 1's child,
        # not in the agent's cgroup, and the agent's own container is the same one, never restarted.
        cgroup = node.run("cat", f"/proc/{node.containerd_pid()}/cgroup").stdout
        ppid = node.run("sh", "-c", f"grep PPid /proc/{node.containerd_pid()}/status").stdout.split()[-1]
        assert ppid == "1", f"containerd's parent on {name}: {ppid}"
        assert agents_before[name].split("//")[-1] not in cgroup, cgroup
    after = world.agents()
    for name, pod in after.items():
        status = pod["status"]["containerStatuses"][0]
        assert status["containerID"] == agents_before[name] and status["restartCount"] == 0, status


def test_3_a_workload_pulls_its_quay_io_image_through_the_mirror_once_the_cni_is_there(world: World) -> None:
    for name in ("node-a", "node-b"):
        world.nodes[name].install_cni()
    world.wait("node-a Ready with its CNI", lambda: _node_ready(world, "node-a"))
    since = world.registry.mark()
    world.kubectl("apply", "-f", "-", input=workload("workload-a", "node-a"))
    world.wait("the workload Running", lambda: _phase(world, "workload-a") == "Running")
    pulls = world.registry.requests_for("/v2/regmirror-test/sleeper/manifests/1", since=since, agent="containerd")
    assert pulls >= 1, world.registry.requests(since)


def test_4_a_new_node_takes_workloads_only_once_its_mirrors_are_applied(world: World) -> None:
    node = world.nodes["node-c"]
    node.install_cni()  # a node image with its CNI: the mirrors are all it waits for
    world.kubectl("apply", "-f", "-", input=workload("workload-c", "node-c"))
    world.cluster.join("node-c")
    taints = world.get("node", "node-c")["spec"].get("taints", [])
    assert PENDING in {t["key"] for t in taints}, taints
    world.wait("node-c untainted by its agent", lambda: PENDING not in {
        t["key"] for t in world.get("node", "node-c")["spec"].get("taints", [])})
    world.wait("the workload on node-c Running", lambda: _phase(world, "workload-c") == "Running")
    world.wait("both RegistryMirrors 3/3", lambda: world.ready_column() == {"docker-io": "3/3", "quay-io": "3/3"})
    hosts = node.etc_containerd / "certs.d/quay.io/hosts.toml"
    pod = world.get("pod", "workload-c", "-n", "default")
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    # The mirrors were on the node before the workload was bound to it.
    assert _epoch(scheduled["lastTransitionTime"]) >= int(hosts.stat().st_mtime), (scheduled, hosts.stat())
    # An agent may remove that taint from its own node only: node-a's agent token cannot touch node-c.
    token = _agent_token(world, "node-a")
    status, body = world.cluster.cp.request(  # type: ignore[union-attr]
        "PATCH", "/api/v1/nodes/node-b", [{"op": "add", "path": "/spec/taints", "value": [
            {"key": PENDING, "effect": "NoSchedule"}]}],  # type: ignore[arg-type]
        content_type="application/json-patch+json", token=token)
    assert status in (403, 422), (status, body)
    assert "node-a" in json.dumps(body), body


def test_5_rolling_the_daemonset_to_a_new_image_touches_no_node(world: World) -> None:
    files = {n: node_files(node) for n, node in world.nodes.items()}
    stamps = {n: node_stamps(node) for n, node in world.nodes.items()}
    starts = {n: node.containerd_starts() for n, node in world.nodes.items()}
    versions = {n: o["metadata"]["resourceVersion"] for n, o in world.reports().items()}
    for node in world.nodes.values():  # the new image in reach of every node, as a registry would have it
        node.import_image(world.second.tar, world.second.containerd_reference)
    world.install(NEW_TAG)

    def rolled() -> bool:
        agents = world.agents()
        return len(agents) == 3 and all(
            p["spec"]["containers"][0]["image"] == f"regmirror:{NEW_TAG}" and p["status"].get("phase") == "Running"
            and all(c.get("ready") for c in p["status"].get("containerStatuses", [])) for p in agents.values())

    world.wait("every agent on the new image", rolled, timeout=240)
    time.sleep(5)  # the new agents have read their node and their report
    assert {n: node_files(node) for n, node in world.nodes.items()} == files
    assert {n: node_stamps(node) for n, node in world.nodes.items()} == stamps
    assert {n: node.containerd_starts() for n, node in world.nodes.items()} == starts
    assert {n: o["metadata"]["resourceVersion"] for n, o in world.reports().items()} == versions


def test_6_the_agent_survives_its_pod_and_the_apiserver_restarting_and_stays_small(world: World) -> None:
    node = world.nodes["node-b"]
    files, stamps, starts = node_files(node), node_stamps(node), node.containerd_starts()
    version = world.reports()["node-b"]["metadata"]["resourceVersion"]
    old = world.agents()["node-b"]["metadata"]["name"]
    world.kubectl("delete", "pod", "-n", NS, old)
    world.wait("a new agent Pod on node-b", lambda: (p := world.agents().get("node-b")) is not None
               and p["metadata"]["name"] != old and p["status"].get("phase") == "Running")
    time.sleep(5)
    assert node_files(node) == files and node_stamps(node) == stamps and node.containerd_starts() == starts
    assert world.reports()["node-b"]["metadata"]["resourceVersion"] == version
    assert world.cluster.cp is not None
    all_starts = {k: n.containerd_starts() for k, n in world.nodes.items()}
    all_files = {k: (node_files(n), node_stamps(n)) for k, n in world.nodes.items()}
    versions = {n: o["metadata"]["resourceVersion"] for n, o in world.reports().items()}
    world.cluster.cp.restart_apiserver(5)
    time.sleep(10)  # the agents' watches break and are made again
    assert {k: (node_files(n), node_stamps(n)) for k, n in world.nodes.items()} == all_files
    assert {n: o["metadata"]["resourceVersion"] for n, o in world.reports().items()} == versions
    restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                for p in world.agents().values()}
    assert set(restarts.values()) == {0}, restarts
    # After the outage every agent still follows changes: a second mirror URL reaches every node's hosts.toml
    # (hosts mode: no containerd restart).
    second_url = world.registry.url.replace("127.0.0.1", "localhost")
    world.kubectl("patch", "registrymirror", "quay-io", "--type=merge", "-p", json.dumps(
        {"spec": {"mirrors": [{"url": world.registry.url}, {"url": second_url}]}}))
    world.wait("every node on generation 2", lambda: all(
        second_url in (n.etc_containerd / "certs.d/quay.io/hosts.toml").read_text() for n in world.nodes.values())
        and world.ready_column().get("quay-io") == "3/3")
    assert {k: n.containerd_starts() for k, n in world.nodes.items()} == all_starts
    memory = _agent_memory(world, node)
    FIGURES["agent_memory_in_pod_cgroup"] = memory
    assert memory["rss_mib"] < memory["limit_mib"], memory


def test_6b_the_agent_uses_its_rotated_token(world: World) -> None:
    """The kubelet rotates a projected token by writing a new one (atomically: a new timestamped folder, then the
    ``..data`` link renamed over). It does so at 80% of the token's life, an hour here; the test writes a newly
    issued token for the same Pod exactly that way and then changes a RegistryMirror: the agent's report write
    must carry the new token (the audit log names each request's credential by its JWT id)."""
    node = world.nodes["node-b"]
    pod = world.agents()["node-b"]
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    token = world.kubectl("create", "token", "regmirror-agent", "-n", NS, "--bound-object-kind=Pod",
                          f"--bound-object-name={name}", f"--bound-object-uid={uid}", "--duration=1h").stdout.strip()
    jti = _jwt_id(token)
    assert jti not in {_credential(e) for e in world.cluster.audit()}, "a token nobody has used yet"
    folder = f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected"
    node.run("sh", "-c", f"""set -e
        cd {folder}/*/
        mkdir ..rotated && cp ..data/ca.crt ..data/namespace ..rotated/
        cat > ..rotated/token
        ln -s ..rotated ..data_new && mv -T ..data_new ..data""", input=token)
    world.kubectl("patch", "registrymirror", "quay-io", "--type=merge", "-p", json.dumps(
        {"spec": {"mirrors": [{"url": world.registry.url}]}}))

    def used() -> bool:
        return any(_credential(e) == jti and e["objectRef"].get("name") == "node-b"
                   and e["responseStatus"]["code"] == 200 for e in world.cluster.audit())

    world.wait("a report write of node-b's agent with the rotated token", used, timeout=60)


def _jwt_id(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def _credential(event: dict[str, Any]) -> str:
    ids = event.get("user", {}).get("extra", {}).get("authentication.kubernetes.io/credential-id", [])
    return ids[0].removeprefix("JTI=") if ids else ""


def test_7_the_documented_uninstall_gives_every_node_back_byte_for_byte(world: World) -> None:
    # README, "Uninstall": remove every RegistryMirror, wait until every node reports none, then the install.
    world.kubectl("delete", "registrymirrors", "--all")
    world.kubectl("wait", "registrymirrornodes", "--all", "--for=jsonpath={.status.ready}=0/0", "--timeout=180s")
    world.kubectl("delete", "-k", str(world.overlay), "--wait=true", "--timeout=180s")
    assert world.kubectl("get", "namespace", NS, check=False).returncode != 0
    for name, node in world.nodes.items():
        assert node_files(node) == world.before[name], name
    for name in ("node-a", "node-b", "node-c"):
        assert "ok" in world.nodes[name].ctr("plugins", "ls")


def _node_ready(world: World, name: str) -> bool:
    conditions = world.get("node", name)["status"]["conditions"]
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _phase(world: World, pod: str) -> str:
    return str(world.get("pod", pod, "-n", "default").get("status", {}).get("phase"))


def _epoch(stamp: str) -> int:
    return int(datetime.datetime.fromisoformat(stamp).timestamp())


def _agent_token(world: World, name: str) -> str:
    """The agent Pod's own projected token, read on the node (the kubelet keeps it on a tmpfs of the node's)."""
    uid = world.agents()[name]["metadata"]["uid"]
    folder = f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected"
    return world.nodes[name].run("sh", "-c", f"cat {folder}/*/token").stdout.strip()


def _agent_memory(world: World, node: KubeletNode) -> dict[str, float]:
    """Resident memory of the agent's container, from its memory cgroup (what the limit applies to)."""
    cid = world.agents()[node.name]["status"]["containerStatuses"][0]["containerID"].split("//")[-1]
    pid = _task_pid(node, cid)
    line = next(x for x in node.run("cat", f"/proc/{pid}/cgroup").stdout.splitlines() if ":memory:" in x)
    folder = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
    stat = dict(x.split() for x in (folder / "memory.stat").read_text().splitlines())
    mib = 1024 * 1024
    return {"rss_mib": round(int(stat["total_rss"]) / mib, 1),
            "usage_mib": round(int((folder / "memory.usage_in_bytes").read_text()) / mib, 1),
            "limit_mib": round(int((folder / "memory.limit_in_bytes").read_text()) / mib, 1)}


def _task_pid(node: KubeletNode, container_id: str) -> int:
    for line in node.ctr("tasks", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1])
    raise AssertionError(f"no task {container_id} on {node.name}")



def test_8_the_helm_chart_installs_and_upgrades_without_touching_a_node(world: World) -> None:
    helm = [str(helm_binary()), "--kubeconfig", str(world.cluster.cp.kubeconfig)]  # type: ignore[union-attr]
    t0 = time.monotonic()
    _run(*helm, "install", "regmirror", str(CHART), "--namespace", "default",
         "--set", f"image.tag={images.DEFAULT_TAG}", "--wait", "--timeout", "3m")
    FIGURES["helm_install_seconds"] = round(time.monotonic() - t0, 1)
    world.kubectl("apply", "--server-side", "-f", "-", input=seed_mirrors(world.registry.url))
    world.wait("both RegistryMirrors 3/3 through the chart",
               lambda: world.ready_column() == {"docker-io": "3/3", "quay-io": "3/3"})
    files = {n: node_files(node) for n, node in world.nodes.items()}
    stamps = {n: node_stamps(node) for n, node in world.nodes.items()}
    starts = {n: node.containerd_starts() for n, node in world.nodes.items()}
    versions = {n: o["metadata"]["resourceVersion"] for n, o in world.reports().items()}
    _run(*helm, "upgrade", "regmirror", str(CHART), "--namespace", "default", "--set", f"image.tag={NEW_TAG}",
         "--wait", "--timeout", "4m")
    world.wait("every agent on the new image", lambda: len(agents := world.agents()) == 3 and all(
        p["spec"]["containers"][0]["image"] == f"regmirror:{NEW_TAG}" for p in agents.values()))
    time.sleep(5)
    assert {n: node_files(node) for n, node in world.nodes.items()} == files
    assert {n: node_stamps(node) for n, node in world.nodes.items()} == stamps
    assert {n: node.containerd_starts() for n, node in world.nodes.items()} == starts
    assert {n: o["metadata"]["resourceVersion"] for n, o in world.reports().items()} == versions


def test_9_helm_uninstall_gives_every_node_back_byte_for_byte(world: World) -> None:
    helm = [str(helm_binary()), "--kubeconfig", str(world.cluster.cp.kubeconfig)]  # type: ignore[union-attr]
    t0 = time.monotonic()
    out = _run(*helm, "uninstall", "regmirror", "--namespace", "default", "--wait", "--timeout", "5m")
    FIGURES["helm_uninstall_seconds"] = round(time.monotonic() - t0, 1)
    assert "uninstalled" in out, out
    assert world.get("registrymirrors")["items"] == []  # the pre-delete hook removed them first
    assert world.kubectl("get", "namespace", NS, check=False).returncode != 0
    for name, node in world.nodes.items():
        assert node_files(node) == world.before[name], name


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(argv[3:])}:\n{done.stderr}{done.stdout}"
    return done.stdout
