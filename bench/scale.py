"""How a rollout scales with the cluster: N nodes x M RegistryMirrors on the real control plane and operator.

For each N, on a fresh etcd + kube-apiserver (``tests.harness.controlplane``) with the shipped manifests:

1. N Node objects, and N simulated nodes running the agent's own watch-and-report code (``bench.simnodes``),
   each with a token bound to its Node (so the admission policy judges it as an agent's); the real operator
   (``kopf run`` as its Deployment runs it, with its service account's token). The agents report "0/0" once
   the operator publishes the empty document: the cluster before any RegistryMirror exists.
2. ``apply``: M RegistryMirrors are created; the clock runs until every one says ``Ready`` with ``N/N``.
3. One quiet minute at rest.

It prints one JSON document per N (and writes it to ``--out``): apply -> all Ready, per-node latency p50/p99,
CPU seconds of kube-apiserver, etcd, the operator and the simulated nodes during the rollout, requests by verb
and code and by resource (from the apiserver's ``/metrics``), object sizes, the operator's peak memory, and the
quiet minute's requests. ``--plot`` draws nodes Ready over time for every N into a PNG.

    python -m bench.scale --nodes 100,300,1000,3000 --mirrors 5 --out bench/results --plot

This is a benchmark, not a test: it asserts nothing; the figures are for people.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from regmirror_api import contract, models
from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO

NS = contract.NAMESPACE
NODES_PER_PROCESS = 150  # more processes, fewer threads each: less GIL convoy in the simulation itself
PYTHONPATH = os.pathsep.join(str(REPO / d) for d in ("api", "agent", "operator", "."))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- a small admin client (keep-alive, one connection per thread) ------------------------------------------


class Api:
    def __init__(self, plane: cp.ControlPlane) -> None:
        url = plane.server.removeprefix("https://")
        self.host, self.port = url.rsplit(":", 1)[0], int(url.rsplit(":", 1)[1])
        self.token = plane.token
        self.ssl = ssl.create_default_context(cafile=str(plane.ca_path))
        self.local = threading.local()

    def _conn(self, timeout: float = 60.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, accept: str = "application/json") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": accept, "Content-Type": "application/json"}
        for attempt in (1, 2):
            conn = getattr(self.local, "conn", None) or self._conn()
            self.local.conn = conn
            try:
                conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        text = raw.decode(errors="replace")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def watch(self, path: str, stop: threading.Event) -> Iterator[dict[str, Any]]:
        """Events of a watch from now on (list first for the resourceVersion), until ``stop``."""
        while True:  # a CRD just created answers 429 "storage is (re)initializing" for a moment
            status, listed = self.call("GET", path)
            if status == 200:
                break
            assert status == 429, listed
            time.sleep(0.5)
        for item in listed.get("items") or []:
            yield {"type": "ADDED", "object": item}
        version = listed["metadata"]["resourceVersion"]
        while not stop.is_set():
            conn = self._conn(timeout=600)
            try:
                sep = "&" if "?" in path else "?"
                conn.request("GET", f"{path}{sep}watch=true&allowWatchBookmarks=true&resourceVersion={version}",
                             headers={"Authorization": f"Bearer {self.token}"})
                response = conn.getresponse()
                while not stop.is_set():
                    line = response.readline()
                    if not line:
                        break
                    event = json.loads(line)
                    version = event["object"].get("metadata", {}).get("resourceVersion", version)
                    if event["type"] != "BOOKMARK":
                        yield event
            except (OSError, http.client.HTTPException):
                time.sleep(0.2)
            finally:
                conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


METRIC_LINE = re.compile(r'^(?P<name>apiserver_request_total|apiserver_request_duration_seconds_(?:sum|count))'
                         r'\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+-]+)$')


def request_counts(api: Api) -> Counter[tuple[str, str, str]]:
    """apiserver_request_total as (verb, resource[/subresource], code) -> count, and the request durations as
    ("seconds"|"count", verb, resource) -> value."""
    status, text = api.call("GET", "/metrics", accept="text/plain")
    assert status == 200
    counts: Counter[tuple[str, str, str]] = Counter()
    for line in str(text).splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        resource = labels.get("resource", "") + ("/" + labels["subresource"] if labels.get("subresource") else "")
        value = float(match["value"])
        if match["name"] == "apiserver_request_total":
            counts[(labels.get("verb", ""), resource, labels.get("code", ""))] += int(value)
        elif labels.get("verb") != "WATCH":
            kind = "seconds" if match["name"].endswith("_sum") else "count"
            counts[(f"~{kind}", labels.get("verb", ""), resource)] += value  # type: ignore[assignment]
    return counts


def summarize(delta: Counter[tuple[str, str, str]]) -> dict[str, Any]:
    by_verb_code: Counter[str] = Counter()
    by_resource: Counter[str] = Counter()
    latency = {f"{verb} {resource}": round(delta[("~seconds", verb, resource)] / n * 1000, 1)
               for (kind, verb, resource), n in delta.items() if kind == "~count" and n}
    delta = Counter({k: v for k, v in delta.items() if not k[0].startswith("~")})
    for (verb, resource, code), n in delta.items():
        if n:
            by_verb_code[f"{verb} {code}"] += n
            by_resource[f"{verb} {resource}"] += n
    writes = sum(n for (verb, _, _), n in delta.items() if verb in ("POST", "PUT", "PATCH", "DELETE", "APPLY"))
    return {"total": sum(delta.values()), "writes": writes,
            "5xx": sum(n for (_, _, code), n in delta.items() if code.startswith("5")),
            "byVerbAndCode": dict(sorted(by_verb_code.items())), "byVerbAndResource": dict(sorted(by_resource.items())),
            "meanLatencyMs": dict(sorted(latency.items()))}


def etcd_db_bytes(plane: cp.ControlPlane) -> int:
    import urllib.request

    with urllib.request.urlopen(plane.etcd_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("etcd_mvcc_db_total_size_in_bytes "):
                return int(float(line.split()[1]))
    return 0


# --- one run -------------------------------------------------------------------------------------------------


def run(nodes: int, mirrors: int, workdir: Path, log: Any) -> dict[str, Any]:
    plane = cp.ControlPlane()
    plane.start()
    procs: list[subprocess.Popen[str]] = []
    stop = threading.Event()
    try:
        return _run(plane, nodes, mirrors, workdir, log, procs, stop)
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        plane.stop()


def _run(plane: cp.ControlPlane, n: int, m: int, workdir: Path, log: Any, procs: list[subprocess.Popen[str]],
         stop: threading.Event) -> dict[str, Any]:
    api = Api(plane)
    t_setup = time.monotonic()
    plane.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
    plane.kubectl("wait", "--for=condition=Established", "crd/registrymirrors.regmirror.io",
                  "crd/registrymirrornodes.regmirror.io", "--timeout=60s")
    names = [f"node-{i:05d}" for i in range(n)]

    def make_node(name: str) -> tuple[str, str]:
        status, node = api.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name}}})
        assert status == 201, node
        status, review = api.call("POST", f"/api/v1/namespaces/{NS}/serviceaccounts/regmirror-agent/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 7200, "boundObjectRef": {
                "apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}}})
        assert status == 201, review
        return name, review["status"]["token"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(make_node, names))
    print(f"[bench] N={n}: {n} Nodes and tokens in {time.monotonic() - t_setup:.0f} s", file=log, flush=True)

    # The operator, as its Deployment runs it, with its own service account's token.
    op_token = plane.kubectl("create", "token", "regmirror-operator", "-n", NS, "--duration=2h").stdout.strip()
    op_kubeconfig = plane.write_kubeconfig(workdir / "operator.kubeconfig", token=op_token,
                                           user="regmirror-operator", namespace=NS)
    op_log = workdir / f"operator-{n}.log"
    operator = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
         f"--liveness=http://127.0.0.1:{cp.free_port()}/healthz", "-m", "regmirror_operator.main"],
        cwd=REPO, env={**os.environ, "KUBECONFIG": str(op_kubeconfig), "PYTHONPATH": PYTHONPATH,
                       "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL, stdout=op_log.open("w"), stderr=subprocess.STDOUT, text=True)
    procs.append(operator)

    # The simulated nodes, NODES_PER_PROCESS per process.
    url = plane.server.removeprefix("https://")
    sims: list[subprocess.Popen[str]] = []
    for i in range(0, n, NODES_PER_PROCESS):
        spec = workdir / f"sim-{n}-{i}.json"
        spec.write_text(json.dumps({"host": url.rsplit(":", 1)[0], "port": url.rsplit(":", 1)[1],
                                    "ca": str(plane.ca_path), "nodes": tokens[i:i + NODES_PER_PROCESS]}))
        sim = subprocess.Popen([sys.executable, "-m", "bench.simnodes", str(spec)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": PYTHONPATH,
                                    "REGMIRROR_LOG_LEVEL": os.environ.get("REGMIRROR_LOG_LEVEL", "WARNING")},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=(workdir / f"sim-{n}-{i}.log").open("w"), text=True)
        sims.append(sim)
        procs.append(sim)
    for sim in sims:
        assert sim.stdout is not None and sim.stdout.readline().startswith("started"), "a simulated node process died"

    # Follow every node's report and every RegistryMirror, with one watch each.
    ready_at: dict[str, float] = {}
    mirror_status: dict[str, dict[str, Any]] = {}
    reports_seen: set[str] = set()
    uids: dict[str, str] = {}
    t0_box: list[float] = []
    lock = threading.Lock()

    def follow_reports() -> None:
        for event in api.watch(contract.NODE_REPORTS_PATH, stop):
            obj = event["object"]
            name = obj["metadata"]["name"]
            entries = {r["name"]: r for r in obj.get("status", {}).get("mirrors", [])}
            with lock:
                reports_seen.add(name)
                if t0_box and name not in ready_at and len(uids) == m and all(
                        entries.get(k, {}).get("uid") == u and entries[k].get("state") == "Applied"
                        for k, u in uids.items()):
                    ready_at[name] = time.monotonic() - t0_box[0]

    def follow_mirrors() -> None:
        path = f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}"
        for event in api.watch(path, stop):
            obj = event["object"]
            with lock:
                mirror_status[obj["metadata"]["name"]] = obj.get("status") or {}

    for target in (follow_reports, follow_mirrors):
        threading.Thread(target=target, daemon=True).start()

    deadline = time.monotonic() + 300
    while len(reports_seen) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(reports_seen)} of {n} nodes reported before any RegistryMirror")
        time.sleep(0.5)
    print(f"[bench] N={n}: every agent reported its empty set; setup {time.monotonic() - t_setup:.0f} s",
          file=log, flush=True)
    time.sleep(5)  # let the setup's writes settle

    pids = {"kube-apiserver": plane._apiserver.pid, "etcd": plane._etcd.pid,  # type: ignore[union-attr]
            "operator": operator.pid}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    sim_cpu0 = sum(cpu_seconds(s.pid) for s in sims)
    requests0 = request_counts(api)

    # --- apply ---
    specs = [{"apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": models.KIND,
              "metadata": {"name": f"bench-{j}"},
              "spec": {"registry": f"registry-{j}.example.com", "mirrors": [{"url": f"https://mirror-{j}.example.com"}]}}
             for j in range(m)]
    t0 = time.monotonic()
    with lock:
        t0_box.append(t0)
    for body in specs:
        status, created = api.call("POST", f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}", body)
        assert status == 201, created
        with lock:
            uids[created["metadata"]["name"]] = created["metadata"]["uid"]
    timeline: list[tuple[float, int]] = [(0.0, 0)]
    all_ready: float | None = None
    deadline = t0 + 900
    while time.monotonic() < deadline:
        with lock:
            count = len(ready_at)
            done = len(mirror_status) >= m and all(
                s.get("ready") == f"{n}/{n}" and s.get("observedGeneration") == 1
                and any(c.get("type") == "Ready" and c.get("status") == "True" for c in s.get("conditions", []))
                for name, s in mirror_status.items() if name in uids)
        if count != timeline[-1][1]:
            timeline.append((round(time.monotonic() - t0, 3), count))
        if done:
            all_ready = time.monotonic() - t0
            break
        time.sleep(0.05)
    timeline.append((round(time.monotonic() - t0, 3), len(ready_at)))
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    sim_cpu1 = sum(cpu_seconds(s.pid) for s in sims)
    requests1 = request_counts(api)
    print(f"[bench] N={n}: all Ready after {all_ready}", file=log, flush=True)

    # --- sizes ---
    _, rm = api.call("GET", f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}/bench-0")
    _, rmn = api.call("GET", f"{contract.NODE_REPORTS_PATH}/{names[0]}")
    _, cm = api.call("GET", f"/api/v1/namespaces/{NS}/configmaps/{contract.CONFIGMAP}")
    sizes = {"registryMirrorBytes": len(json.dumps(rm)),
             "registryMirrorStatusBytes": len(json.dumps(rm.get("status"))),
             "registryMirrorNodeBytes": len(json.dumps(rmn)),
             "desiredConfigMapBytes": len(json.dumps(cm)),
             "etcdDbBytes": etcd_db_bytes(plane)}

    # --- one quiet minute ---
    time.sleep(10)
    quiet_cpu0 = cpu_seconds(pids["kube-apiserver"])
    quiet0 = request_counts(api)
    time.sleep(60)
    quiet1 = request_counts(api)
    quiet_cpu1 = cpu_seconds(pids["kube-apiserver"])

    latencies = sorted(ready_at.values())

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) if latencies else None

    return {
        "nodes": n, "registryMirrors": m,
        "applyToAllReadySeconds": None if all_ready is None else round(all_ready, 3),
        "nodesReady": len(ready_at),
        "perNodeLatencySeconds": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0),
                                  "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "cpuSecondsDuringRollout": {**{k: round(cpu1[k] - cpu0[k], 2) for k in pids},
                                    "simulatedNodes": round(sim_cpu1 - sim_cpu0, 2)},
        "requestsDuringRollout": summarize(requests1 - requests0),
        "objectSizes": sizes,
        "operatorPeakMemoryMiB": peak_rss_mib(operator.pid),
        "quietMinute": {**summarize(quiet1 - quiet0), "apiserverCpuSeconds": round(quiet_cpu1 - quiet_cpu0, 2)},
        "timeline": timeline,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for result in results:
        times = [t for t, _ in result["timeline"]]
        counts = [c / result["nodes"] * 100 for _, c in result["timeline"]]
        label = (f"{result['nodes']:,} nodes x {result['registryMirrors']} "
                 f"(all Ready {result['applyToAllReadySeconds']} s)")
        ax.step(times, counts, where="post", label=label)
    ax.set_xlabel("seconds after kubectl apply")
    ax.set_ylabel("nodes Ready (% of N)")
    ax.set_title("regmirror rollout on a 2-core machine: real kube-apiserver, etcd and operator; simulated agents")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="100,300,1000", help="comma-separated node counts (default 100,300,1000)")
    parser.add_argument("--mirrors", type=int, default=5, help="RegistryMirrors applied at once (default 5)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--plot", action="store_true", help="also write ready-over-time.png into --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="regmirror-bench-"))
    print(f"[bench] logs in {tmp}", file=sys.stderr)
    for n in (int(x) for x in args.nodes.split(",")):
        result = run(n, args.mirrors, tmp, sys.stderr)
        results.append(result)
        text = json.dumps(result, indent=1)
        print(text, flush=True)
        (args.out / f"scale-{n}x{args.mirrors}.json").write_text(text + "\n")
    if args.plot:
        plot(results, args.out / "ready-over-time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
