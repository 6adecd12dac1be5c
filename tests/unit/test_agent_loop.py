"""The agent's loop with a fake API: what it asks of the apiserver, and when it writes.

The claims proven here on a fake are proven again on the real apiserver by tests/e2e/test_system.py and by the
benchmark (bench/scale.py); this file pins down the request pattern: two single-object watches, one GET of the
node's own report at start, one write per change and none at rest.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from regmirror_agent import engine
from regmirror_agent.agent import AgentSettings
from regmirror_agent.kubeapi import ApiError
from regmirror_agent.plans import Plan
from regmirror_api import contract, models
from regmirror_api.errors import RegmirrorError

NODE = "node-a"
CM_PATH = f"/api/v1/namespaces/{contract.NAMESPACE}/configmaps"
REPORT_PATH = f"{contract.NODE_REPORTS_PATH}/{NODE}"
NODE_PATH = f"/api/v1/nodes/{NODE}"


def desired(*names: str, generation: int = 1) -> str:
    return contract.render_desired(
        contract.Entry(n, generation, {"registry": f"{n}.example.com", "mirrors": [{"url": "https://m.example.com"}]},
                       {}, uid=f"uid-{n}") for n in names)


class FakeApi:
    """Serves one ConfigMap and one Node through lists and watches; records every request."""

    def __init__(self, data: str | None, labels: Mapping[str, str] | None = None) -> None:
        self.calls: list[str] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.events: dict[str, queue.Queue[dict[str, Any] | None]] = {CM_PATH: queue.Queue(),
                                                                       "/api/v1/nodes": queue.Queue()}
        self.configmap = {"metadata": {"name": contract.CONFIGMAP, "resourceVersion": "1"},
                          "data": {} if data is None else {contract.CONFIGMAP_KEY: data}}
        self.node: dict[str, Any] = {"metadata": {"name": NODE, "uid": "node-uid", "resourceVersion": "1",
                                  "labels": dict(labels or {"kubernetes.io/os": "linux"})}}
        self.fail_writes = 0
        self.lock = threading.Lock()
        self.patches: list[Any] = []
        """Every JSON patch sent (to the Node), in order."""
        self.on_node_patch: Callable[[], None] | None = None
        """Runs before a JSON patch is judged: someone else changing the Node in between."""

    def _record(self, call: str) -> None:
        with self.lock:
            self.calls.append(call)

    def get(self, path: str, *, accept: str = "application/json", **params: str) -> Any:
        self._record(f"GET {path}")
        if path == CM_PATH:
            return {"metadata": {"resourceVersion": "1"}, "items": [self.configmap]}
        if path == "/api/v1/nodes":
            return {"metadata": {"resourceVersion": "1"}, "items": [self.node]}
        if path == NODE_PATH:
            return json.loads(json.dumps(self.node))
        if path in self.objects:
            return json.loads(json.dumps(self.objects[path]))
        raise ApiError(404, f"GET {path}: not found")

    def create(self, path: str, body: Any) -> Any:
        self._record(f"POST {path}")
        self._fail_maybe()
        self.objects[f"{path}/{body['metadata']['name']}"] = body
        return body

    def merge_patch(self, path: str, body: Any) -> Any:
        self._record(f"PATCH {path}")
        self._fail_maybe()
        if path not in self.objects:
            raise ApiError(404, "not found")
        self.objects[path] = body
        return body

    def json_patch(self, path: str, operations: Any) -> Any:
        """A JSON patch of the Node: its ``test`` ops checked, ``replace``/``remove`` of a top-level field's key."""
        self._record(f"PATCH {path}")
        self.patches.append(operations)
        if self.on_node_patch is not None:
            self.on_node_patch()
        for op in operations:
            _, section, key = op["path"].split("/")
            if op["op"] == "test" and self.node.get(section, {}).get(key) != op["value"]:
                raise ApiError(422, f"PATCH {path}: the server rejected our request: test failed")
        for op in operations:
            _, section, key = op["path"].split("/")
            if op["op"] == "replace":
                self.node.setdefault(section, {})[key] = op["value"]
            elif op["op"] == "remove":
                del self.node[section][key]
        self.node["metadata"]["resourceVersion"] = str(int(self.node["metadata"]["resourceVersion"]) + 1)
        return self.node

    def _fail_maybe(self) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise ApiError(503, "the apiserver is restarting")

    def watch(self, path: str, params: Mapping[str, str], timeout_seconds: int, *, read_timeout: float,
              accept: str = "application/json") -> Iterator[dict[str, Any]]:
        self._record(f"WATCH {path}")
        while True:
            event = self.events[path].get()
            if event is None:
                return
            yield event

    def push(self, path: str, kind: str, obj: dict[str, Any]) -> None:
        self.events[path].put({"type": kind, "object": obj})

    def writes(self) -> list[str]:
        with self.lock:
            return [c for c in self.calls if c.split()[0] in ("POST", "PATCH", "PUT", "DELETE")]


def instantly(_: Sequence[models.RegistryMirror]) -> engine.Outcome:
    return engine.Outcome(runtime="containerd", plan=Plan(runtime="containerd", changes=(), restart=False))


def wait_until(probe: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "not reached"
        time.sleep(0.01)


def report(api: FakeApi) -> dict[str, Any]:
    return api.objects[REPORT_PATH]


def test_a_start_reads_its_report_once_writes_once_and_then_only_watches(running: Any) -> None:
    api = FakeApi(desired("quay-io", "docker-io"))
    running(api)
    wait_until(lambda: REPORT_PATH in api.objects)
    time.sleep(0.2)
    assert sorted(api.calls) == sorted([f"GET {CM_PATH}", "GET /api/v1/nodes", f"GET {REPORT_PATH}",
                                        f"POST {contract.NODE_REPORTS_PATH}", f"WATCH {CM_PATH}",
                                        "WATCH /api/v1/nodes", f"GET {NODE_PATH}"])
    body = report(api)
    assert body["metadata"]["ownerReferences"][0]["uid"] == "node-uid"
    assert [(m["name"], m["uid"], m["state"]) for m in body["status"]["mirrors"]] == [
        ("docker-io", "uid-docker-io", "Applied"), ("quay-io", "uid-quay-io", "Applied")]


def test_one_write_per_change_and_none_for_a_change_that_does_not_touch_the_node(running: Any) -> None:
    api = FakeApi(desired("quay-io"), labels={"pool": "a"})
    running(api)
    wait_until(lambda: REPORT_PATH in api.objects)
    # Five RegistryMirrors at once: one write, not five.
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired(
        "quay-io", "a", "b", "c", "d")}})
    wait_until(lambda: len(report(api)["status"]["mirrors"]) == 5)
    time.sleep(0.1)
    assert len(api.writes()) == 2
    # A RegistryMirror for other nodes only, and a Node heartbeat: no write at all.
    other = json.loads(desired("quay-io", "a", "b", "c", "d"))
    other["mirrors"].append({"name": "gpu-only", "uid": "u", "generation": 1, "nodeSelector": {
        "matchLabels": {"pool": "gpu"}}, "spec": {"registry": "gpu.example.com", "mirrors": [{"url": "https://g.example.com"}]}})
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: json.dumps(other)}})
    api.push("/api/v1/nodes", "MODIFIED", {"metadata": {**api.node["metadata"], "resourceVersion": "9"}})
    api.push("/api/v1/nodes", "BOOKMARK", {"metadata": {"resourceVersion": "10"}})
    time.sleep(0.3)
    assert len(api.writes()) == 2
    # A label change that selects it: one write.
    api.push("/api/v1/nodes", "MODIFIED", {"metadata": {**api.node["metadata"], "labels": {"pool": "gpu"}}})
    wait_until(lambda: len(report(api)["status"]["mirrors"]) == 6)
    assert len(api.writes()) == 3


def test_a_restarted_agent_whose_report_is_current_writes_nothing(running: Any) -> None:
    api = FakeApi(desired("quay-io"))
    first = running(api)
    wait_until(lambda: REPORT_PATH in api.objects)
    first.stop.set()
    first.wake.set()
    api.calls.clear()
    running(api)
    wait_until(lambda: f"GET {REPORT_PATH}" in api.calls)
    time.sleep(0.3)
    assert api.writes() == []


def test_a_failed_report_is_retried_with_backoff_and_the_node_is_not_reapplied_in_between(running: Any) -> None:
    api = FakeApi(desired("quay-io"))
    api.fail_writes = 1
    agent = running(api)
    wait_until(lambda: REPORT_PATH in api.objects, timeout=5)
    writes = api.writes()
    assert writes[0] == f"POST {contract.NODE_REPORTS_PATH}" and len(writes) == 2
    assert agent.reconciles == 1  # the retry sent the report again; it did not apply again


def test_at_rest_the_drift_resync_asks_the_apiserver_nothing(running: Any) -> None:
    api = FakeApi(desired("quay-io"))
    agent = running(api, resync=0)  # reconcile again and again, as fast as the loop goes
    wait_until(lambda: agent.reconciles > 20)
    wait_until(lambda: REPORT_PATH in api.objects)
    # two lists, one GET of the report, one create, one GET of the Node (for the taint, which it does not carry)
    assert len([c for c in api.calls if not c.startswith("WATCH")]) == 5


def test_backoff_grows_with_jitter_and_a_429_waits_at_least_the_second_it_asks_for() -> None:
    from regmirror_agent.watching import retry_delay

    delay, backoff = retry_delay(ApiError(503, "x"), 4.0, 30.0, rand=lambda: 0.0)
    assert (delay, backoff) == (2.0, 8.0)
    delay, backoff = retry_delay(ApiError(0, "unreachable"), 20.0, 30.0, rand=lambda: 0.999)
    assert delay == pytest.approx(29.98) and backoff == 30.0
    delay, backoff = retry_delay(ApiError(429, "too many requests"), 16.0, 30.0, rand=lambda: 0.5)
    assert (delay, backoff) == (16.0, 30.0)  # a refused burst backs off like any error ...
    delay, backoff = retry_delay(ApiError(429, "too many requests"), 1.0, 30.0, rand=lambda: 0.0)
    assert (delay, backoff) == (1.0, 2.0)  # ... and waits at least the second the apiserver asks for


def test_one_registrys_unwritable_file_fails_only_that_registry(running: Any, tmp_path: Any,
                                                                 immutable: list[Any]) -> None:
    """The real engine on a node root: quay.io's hosts.toml is immutable (chattr +i, the kernel's refusal), so
    quay.io's new generation fails with the reason while docker.io's is applied, and the agent goes on."""
    from tests.unit.test_engine_faults import HOSTS_MODE, chattr_i
    from tests.unit.trees import node_root as node

    root = node(tmp_path, HOSTS_MODE)
    api = FakeApi(desired("quay.io", "docker.io"))
    settings = AgentSettings(node=NODE, engine=engine.Settings(root=str(root), restart="never"), resync=3600)
    running(api, apply_mirrors=None, settings=settings)
    wait_until(lambda: REPORT_PATH in api.objects)
    assert [m["state"] for m in report(api)["status"]["mirrors"]] == ["Applied", "Applied"]
    chattr_i(root / "etc/containerd/certs.d/quay.io.example.com/hosts.toml", immutable)
    moved = json.loads(desired("quay.io", "docker.io", generation=2))
    for item in moved["mirrors"]:
        item["spec"]["mirrors"] = [{"url": "https://moved.example.com"}]
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: json.dumps(moved)}})
    wait_until(lambda: {m["generation"] for m in report(api)["status"]["mirrors"]} == {2})
    states = {m["name"]: (m["state"], m["message"]) for m in report(api)["status"]["mirrors"]}
    assert states["docker.io"] == ("Applied", ""), states
    assert states["quay.io"][0] == "Failed" and "quay.io.example.com/hosts.toml" in states["quay.io"][1]
    assert "moved.example.com" in (root / "etc/containerd/certs.d/docker.io.example.com/hosts.toml").read_text()
    assert "moved.example.com" not in (root / "etc/containerd/certs.d/quay.io.example.com/hosts.toml").read_text()


# --- the mirrors-pending taint: workloads wait for the node's mirrors -------------------------------------------

PENDING = {"key": contract.MIRRORS_PENDING_TAINT, "effect": "NoSchedule"}
OTHER = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


def tainted(api: FakeApi, *taints: dict[str, Any]) -> FakeApi:
    api.node["spec"] = {"taints": [dict(t) for t in taints]}
    return api


def node_taints(api: FakeApi) -> list[dict[str, Any]] | None:
    return (api.node.get("spec") or {}).get("taints")


def test_a_node_is_untainted_after_a_healthy_apply_and_keeps_its_other_taints(running: Any, caplog: Any) -> None:
    api = tainted(FakeApi(desired("quay-io", "docker-io")), OTHER, PENDING)
    caplog.set_level("INFO", logger="regmirror.agent")
    running(api)
    wait_until(lambda: node_taints(api) == [OTHER])
    assert api.patches == [[{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                            {"op": "replace", "path": "/spec/taints", "value": [OTHER]}]]
    assert api.calls.count(f"GET {NODE_PATH}") == 1
    assert f"regmirror.io/mirrors-pending:NoSchedule from node {NODE}" in caplog.text


def test_no_registrymirror_selecting_the_node_counts_as_in_place(running: Any) -> None:
    only_gpu = json.loads(desired("quay-io"))
    only_gpu["mirrors"][0]["nodeSelector"] = {"matchLabels": {"pool": "gpu"}}
    api = tainted(FakeApi(json.dumps(only_gpu)), PENDING)
    running(api)
    wait_until(lambda: "taints" not in api.node["spec"])
    assert api.patches[0][1] == {"op": "remove", "path": "/spec/taints"}


def test_no_untaint_before_the_operator_has_published(running: Any) -> None:
    api = tainted(FakeApi(None), PENDING)  # the install's ConfigMap, without data: the operator has not run yet
    running(api)
    time.sleep(0.3)
    assert node_taints(api) == [PENDING] and f"GET {NODE_PATH}" not in api.calls
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired("quay-io")}})
    wait_until(lambda: "taints" not in api.node["spec"])


def test_no_untaint_while_an_entry_failed_on_the_node(running: Any) -> None:
    def refuse_broken(mirrors: Sequence[models.RegistryMirror]) -> engine.Outcome:
        if any(m.name == "broken" for m in mirrors):
            raise RegmirrorError("containerd did not come back: the CRI plugin is not ok")
        return instantly(mirrors)

    api = tainted(FakeApi(desired("quay-io", "broken")), PENDING)
    running(api, apply_mirrors=refuse_broken)
    wait_until(lambda: REPORT_PATH in api.objects)
    time.sleep(0.2)
    assert [m["state"] for m in report(api)["status"]["mirrors"]] == ["Failed", "Failed"]
    assert node_taints(api) == [PENDING] and f"GET {NODE_PATH}" not in api.calls
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired("quay-io")}})
    wait_until(lambda: "taints" not in api.node["spec"])


def test_a_node_without_the_taint_is_asked_about_it_once(running: Any) -> None:
    api = tainted(FakeApi(desired("quay-io"), labels={"pool": "a"}), OTHER)
    agent = running(api, resync=0)  # reconcile again and again, as fast as the loop goes
    wait_until(lambda: agent.reconciles > 20)
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired("quay-io", "b")}})
    api.push("/api/v1/nodes", "MODIFIED", {"metadata": {**api.node["metadata"], "labels": {"pool": "b"}}})
    wait_until(lambda: REPORT_PATH in api.objects and len(report(api)["status"]["mirrors"]) == 2)
    reconciles = agent.reconciles
    wait_until(lambda: agent.reconciles > reconciles + 20)
    assert api.calls.count(f"GET {NODE_PATH}") == 1 and api.patches == []
    assert node_taints(api) == [OTHER]


def test_a_node_changed_between_read_and_patch_is_read_again_and_nothing_is_lost(running: Any) -> None:
    api = tainted(FakeApi(desired("quay-io")), PENDING)

    def node_controller_adds_a_taint() -> None:  # between the agent's GET and its PATCH, once
        api.on_node_patch = None
        api.node["spec"]["taints"].append(OTHER)
        api.node["metadata"]["resourceVersion"] = "5"

    api.on_node_patch = node_controller_adds_a_taint
    running(api)
    wait_until(lambda: node_taints(api) == [OTHER], timeout=8)  # after the first backoff (0.5 to 1.5 s)
    assert api.calls.count(f"GET {NODE_PATH}") == 2
    assert [p[0]["value"] for p in api.patches] == ["1", "5"]


def test_a_refused_untaint_is_logged_and_tried_again_at_the_next_reconcile_not_in_a_loop(
        running: Any, caplog: Any) -> None:
    api = tainted(FakeApi(desired("quay-io")), PENDING)

    def forbidden() -> None:  # an install whose RBAC or policy lags the agent: retrying at once cannot help
        raise ApiError(403, f"PATCH {NODE_PATH}: nodes is forbidden")

    api.on_node_patch = forbidden
    running(api)
    wait_until(lambda: len(api.patches) == 1)
    time.sleep(1.6)  # longer than a first backoff
    assert len(api.patches) == 1 and node_taints(api) == [PENDING]
    assert f"cannot remove the taint regmirror.io/mirrors-pending from node {NODE}" in caplog.text
    api.on_node_patch = None
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired("quay-io", "b")}})
    wait_until(lambda: "taints" not in api.node["spec"])
