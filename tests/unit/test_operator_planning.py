"""The operator's planning: what it publishes, and the status it writes, from objects, node labels and the nodes'
RegistryMirrorNode reports alone."""

from __future__ import annotations

import copy
import itertools
import json
import time
from typing import Any

import pytest

from regmirror_api import contract
from regmirror_operator import planning

NOW = "2026-06-01T12:00:00Z"
LONG_AGO = "2026-06-01T11:00:00Z"  # older than planning.PRUNE_GRACE_SECONDS
JUST_NOW = "2026-06-01T11:59:30Z"  # within it


def mirror(name: str, registry: str = "quay.io", *, generation: int = 1, created: str = "2026-01-01T00:00:00Z",
           selector: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
           url: str = "https://mirror.example.com") -> dict[str, Any]:
    spec: dict[str, Any] = {"registry": registry, "mirrors": [{"url": url}]}
    if selector is not None:
        spec["nodeSelector"] = selector
    return {"metadata": {"name": name, "uid": f"uid-{name}", "generation": generation, "creationTimestamp": created},
            "spec": spec, "status": dict(status or {})}


def applied(generation: int) -> dict[str, Any]:
    return {"generation": generation, "state": "Applied", "message": "", "restarted": False}


def failed(generation: int, message: str) -> dict[str, Any]:
    return {"generation": generation, "state": "Failed", "message": message, "restarted": True}


Reports = dict[str, dict[str, Any]]


def report(reports: Reports, name: str, by_node: dict[str, dict[str, Any]], time: str = LONG_AGO) -> Reports:
    """Add each node's report on RegistryMirror ``name`` to ``reports`` (node -> RegistryMirrorNode essence, as
    ``caches.report_essence`` keeps it); returns ``reports``."""
    for node, entry in by_node.items():
        essence = reports.setdefault(node, {"uid": f"rmn-{node}", "time": time, "mirrors": {}})
        essence["time"] = time
        essence["mirrors"][name] = {"name": name, "uid": f"uid-{name}", **entry}
    return reports


def reports_of(name: str, by_node: dict[str, dict[str, Any]], time: str = LONG_AGO) -> Reports:
    return report({}, name, by_node, time)


THREE_NODES = {"node-a": {"pool": "a"}, "node-b": {"pool": "b"}, "node-c": {"pool": "c"}}


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the apiserver applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def settle(mirrors: dict[str, dict[str, Any]], nodes: dict[str, dict[str, str]], reports: Reports | None = None,
           now: str = NOW) -> planning.Plan:
    """Plan, then apply every patch to the objects the way the apiserver would; returns the first plan."""
    first = planning.plan(mirrors, nodes, reports or {}, now=now)
    for name, patch in first.patches.items():
        mirrors[name] = merge(mirrors[name], patch)
    return first


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


# --- the published document ------------------------------------------------------------------------------


def test_desired_bytes_are_the_same_in_any_order() -> None:
    objects = [mirror("quay-io"), mirror("docker-io", "docker.io", generation=3),
               mirror("ghcr", "ghcr.io", selector={"matchLabels": {"pool": "a"}})]
    texts = {planning.plan({o["metadata"]["name"]: o for o in order}, THREE_NODES, {}, now=NOW).desired
             for order in itertools.permutations(objects)}
    assert len(texts) == 1
    desired = contract.parse_desired(texts.pop())
    assert [(e.name, e.generation) for e in desired.entries] == [("docker-io", 3), ("ghcr", 1), ("quay-io", 1)]
    assert desired.entries[1].node_selector == {"matchLabels": {"pool": "a"}}


def test_apiserver_defaults_status_and_reports_do_not_change_the_published_bytes() -> None:
    plain = mirror("quay-io")
    defaulted = mirror("quay-io", status={"ready": "1/1"})
    defaulted["spec"]["mirrors"][0]["capabilities"] = ["pull", "resolve"]
    assert (planning.plan({"quay-io": plain}, {}, {}, now=NOW).desired
            == planning.plan({"quay-io": defaulted}, {}, reports_of("quay-io", {"node-a": applied(1)}),
                             now=LONG_AGO).desired)


def test_published_entries_carry_the_objects_uid() -> None:
    desired = contract.parse_desired(planning.plan({"quay-io": mirror("quay-io")}, {}, {}, now=NOW).desired)
    assert [e.uid for e in desired.entries] == ["uid-quay-io"]


def test_nothing_published_is_an_explicit_empty_list() -> None:
    assert contract.parse_desired(planning.plan({}, THREE_NODES, {}, now=NOW).desired).entries == ()


def test_an_object_being_deleted_is_neither_published_nor_written() -> None:
    going = mirror("quay-io")
    going["metadata"]["deletionTimestamp"] = NOW
    result = planning.plan({"quay-io": going}, THREE_NODES, {}, now=NOW)
    assert result.published == () and result.patches == {}


# --- conflicts and invalid objects --------------------------------------------------------------------------


def test_the_oldest_registrymirror_wins_and_the_other_is_stalled_naming_it() -> None:
    mirrors = {"newer": mirror("newer", created="2026-02-01T00:00:00Z"),
               "older": mirror("older", created="2026-01-01T00:00:00Z", url="https://other.example.com")}
    result = settle(mirrors, THREE_NODES)
    assert result.published == ("older",)
    assert "https://other.example.com" in result.desired
    loser = mirrors["newer"]["status"]
    assert conditions(loser) == {"Ready": ("False", "Conflict"), "Reconciling": ("False", "Conflict"),
                                 "Stalled": ("True", "Conflict")}
    assert "already mirrored by RegistryMirror 'older'" in loser["message"]
    assert [(n.name, n.type, n.reason) for n in result.notices if n.name == "newer"] == [
        ("newer", "Warning", "Conflict")]
    assert "'older'" in next(n for n in result.notices if n.name == "newer").message
    assert conditions(mirrors["older"]["status"])["Reconciling"] == ("True", "Progressing")


def test_a_tie_in_age_goes_to_the_first_name() -> None:
    same = "2026-01-01T00:00:00Z"
    result = planning.plan({"b": mirror("b", created=same), "a": mirror("a", created=same)}, {}, {}, now=NOW)
    assert result.published == ("a",) and result.verdicts["b"].reason == "Conflict"


def test_when_the_winner_goes_the_other_one_is_published() -> None:
    mirrors = {"newer": mirror("newer", created="2026-02-01T00:00:00Z"), "older": mirror("older")}
    settle(mirrors, THREE_NODES)
    del mirrors["older"]
    result = settle(mirrors, THREE_NODES)
    assert result.published == ("newer",)
    assert conditions(mirrors["newer"]["status"]) == {"Ready": ("False", "Progressing"),
                                                      "Reconciling": ("True", "Progressing"),
                                                      "Stalled": ("False", "Progressing")}


def test_an_invalid_object_is_stalled_with_every_problem_and_never_published() -> None:
    bad = mirror("bad", "Quay.IO", url="ftp://mirror.example.com",
                 selector={"matchExpressions": [{"key": "pool", "operator": "Gt", "values": ["1"]}]})
    mirrors = {"bad": bad}
    result = settle(mirrors, THREE_NODES)
    assert result.published == ()
    status = mirrors["bad"]["status"]
    assert conditions(status)["Stalled"] == ("True", "Invalid")
    assert conditions(status)["Ready"] == ("False", "Invalid")
    for words in ("lower case", "not an absolute http", "'Gt' is not one of In"):
        assert words in status["message"], status["message"]
    assert status["ready"] == "0/0"
    assert [(n.type, n.reason) for n in result.notices] == [("Warning", "Invalid")]


def test_an_invalid_object_does_not_block_a_valid_one_for_the_same_registry() -> None:
    result = planning.plan({"a-bad": mirror("a-bad", url="ftp://x.example.com", created="2025-01-01T00:00:00Z"),
                            "b-good": mirror("b-good")}, {}, {}, now=NOW)
    assert result.published == ("b-good",)


# --- status from node reports ---------------------------------------------------------------------------------

STATES = [
    # (id, reports, ready, nodes, Ready, Reconciling, reason, words in the message)
    ("first-seen", {}, "0/3", (3, 0, 0), "False", "True", "Progressing", "0/3 nodes applied generation 4"),
    ("all-applied", {n: applied(4) for n in THREE_NODES}, "3/3", (3, 3, 0), "True", "False", "Applied",
     "3/3 nodes run generation 4"),
    ("one-behind", {"node-a": applied(4), "node-b": applied(4), "node-c": applied(3)}, "2/3", (3, 2, 0),
     "False", "True", "Progressing", "2/3 nodes applied generation 4"),
    ("one-failed", {"node-a": applied(4), "node-b": failed(4, "containerd did not come back"),
                    "node-c": applied(4)}, "2/3", (3, 2, 1), "False", "True", "NodesFailed",
     "1 of 3 nodes failed generation 4 (2 applied): node-b: containerd did not come back"),
    ("failed-an-older-generation", {"node-a": applied(4), "node-b": failed(3, "old"), "node-c": applied(4)},
     "2/3", (3, 2, 0), "False", "True", "Progressing", "2/3 nodes applied"),
    ("two-failed-one-pending", {"node-a": failed(4, "x"), "node-c": failed(4, "y")}, "0/3", (3, 0, 2),
     "False", "True", "NodesFailed", "2 of 3 nodes failed generation 4 (0 applied): node-a: x; node-c: y"),
]


@pytest.mark.parametrize(("reports", "ready", "nodes", "is_ready", "reconciling", "reason", "words"),
                         [s[1:] for s in STATES], ids=[s[0] for s in STATES])
def test_three_nodes(reports: dict[str, Any], ready: str, nodes: tuple[int, int, int], is_ready: str,
                     reconciling: str, reason: str, words: str) -> None:
    mirrors = {"quay-io": mirror("quay-io", generation=4)}
    settle(mirrors, THREE_NODES, reports_of("quay-io", reports))
    status = mirrors["quay-io"]["status"]
    assert status["observedGeneration"] == 4
    assert status["ready"] == ready
    assert (status["nodes"]["selected"], status["nodes"]["applied"], status["nodes"]["failed"]) == nodes
    assert conditions(status) == {"Ready": (is_ready, reason), "Reconciling": (reconciling, reason),
                                  "Stalled": ("False", reason)}
    assert words in status["message"]
    ready_condition = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready_condition["message"] == status["message"] and ready_condition["observedGeneration"] == 4
    assert [f["name"] for f in status.get("failingNodes", [])] == [
        n for n, r in sorted(reports.items()) if r["state"] == "Failed" and r["generation"] == 4]
    assert "nodeReports" not in status  # the status holds counts and a sample, never one entry per node


def test_a_selector_matching_one_node_counts_one() -> None:
    mirrors = {"quay-io": mirror("quay-io", selector={"matchLabels": {"pool": "b"}})}
    settle(mirrors, THREE_NODES, reports_of("quay-io", {"node-a": failed(1, "not selected"), "node-b": applied(1)}))
    status = mirrors["quay-io"]["status"]
    assert status["ready"] == "1/1"
    assert status["nodes"] == {"selected": 1, "applied": 1, "failed": 0, "waiting": 0, "inUse": 0}
    assert status["message"] == "1/1 node runs generation 1"
    assert conditions(status)["Ready"] == ("True", "Applied")


def test_no_node_selected_is_ready_and_says_so() -> None:
    mirrors = {"quay-io": mirror("quay-io", selector={"matchLabels": {"pool": "none"}})}
    settle(mirrors, THREE_NODES)
    status = mirrors["quay-io"]["status"]
    assert status["ready"] == "0/0" and status["message"] == "no node matches nodeSelector"
    assert conditions(status)["Ready"] == ("True", "Applied")


def test_only_linux_nodes_are_selected_by_default() -> None:
    nodes = {**THREE_NODES, "win": {"kubernetes.io/os": "windows"}}
    mirrors = {"quay-io": mirror("quay-io")}
    settle(mirrors, nodes)
    assert mirrors["quay-io"]["status"]["ready"] == "0/3"


def test_a_new_generation_is_not_ready_until_nodes_report_it() -> None:
    mirrors = {"quay-io": mirror("quay-io", generation=1)}
    reports = reports_of("quay-io", {n: applied(1) for n in THREE_NODES})
    settle(mirrors, THREE_NODES, reports)
    assert conditions(mirrors["quay-io"]["status"])["Ready"] == ("True", "Applied")
    mirrors["quay-io"]["metadata"]["generation"] = 2
    settle(mirrors, THREE_NODES, reports, now="2026-06-01T12:05:00Z")
    status = mirrors["quay-io"]["status"]
    assert status["observedGeneration"] == 2 and status["ready"] == "0/3"
    assert conditions(status)["Ready"] == ("False", "Progressing")


def test_a_report_about_an_earlier_object_of_the_same_name_does_not_count() -> None:
    # quay-io was deleted and created again (generation 1 again, a new uid): the nodes' reports on the old one
    # must not make the new one Ready before they applied it.
    mirrors = {"quay-io": mirror("quay-io")}
    reports = reports_of("quay-io", {n: applied(1) for n in THREE_NODES})
    for essence in reports.values():
        essence["mirrors"]["quay-io"]["uid"] = "uid-of-the-deleted-one"
    settle(mirrors, THREE_NODES, reports)
    assert mirrors["quay-io"]["status"]["ready"] == "0/3"


# --- pruning the reports of departed nodes -------------------------------------------------------------------


def test_reports_of_removed_nodes_are_pruned_by_uid() -> None:
    reports = reports_of("quay-io", {"node-a": applied(1), "node-gone": applied(1)})
    result = planning.plan({"quay-io": mirror("quay-io")}, THREE_NODES, reports, now=NOW)
    assert result.prunes == (("node-gone", "rmn-node-gone"),)


def test_a_fresh_report_of_a_node_not_yet_seen_is_kept_for_a_while() -> None:
    # The agent may see its Node before the operator's watch does; it reports once per change, so deleting that
    # report would hide the node's result.
    reports = reports_of("quay-io", {"node-new": applied(1)}, time=JUST_NOW)
    assert planning.plan({}, THREE_NODES, reports, now=NOW).prunes == ()
    assert planning.plan({}, THREE_NODES, reports, now="2026-06-01T12:10:00Z").prunes == (("node-new", "rmn-node-new"),)


def test_reports_without_a_readable_time_are_pruned_when_their_node_is_gone() -> None:
    reports = reports_of("quay-io", {"node-gone": applied(1)}, time="yesterday")
    assert planning.plan({}, THREE_NODES, reports, now=NOW).prunes == (("node-gone", "rmn-node-gone"),)


# --- no writes without a change ------------------------------------------------------------------------------


@pytest.mark.parametrize("reports", [s[1] for s in STATES], ids=[s[0] for s in STATES])
def test_a_correct_status_is_not_written_again(reports: dict[str, Any]) -> None:
    mirrors = {"quay-io": mirror("quay-io", generation=4),
               "other": mirror("other", created="2026-03-01T00:00:00Z")}
    node_reports = reports_of("quay-io", reports)
    assert settle(mirrors, THREE_NODES, node_reports).patches
    again = planning.plan(mirrors, THREE_NODES, node_reports, now="2026-06-01T13:00:00Z")
    assert again.patches == {} and again.notices == ()


def test_transition_times_move_only_when_a_condition_flips() -> None:
    mirrors = {"quay-io": mirror("quay-io")}
    reports = reports_of("quay-io", {"node-a": applied(1)})
    settle(mirrors, THREE_NODES, reports, now="2026-06-01T12:00:00Z")
    report(reports, "quay-io", {"node-b": applied(1)})
    patch = settle(mirrors, THREE_NODES, reports, now="2026-06-01T12:01:00Z").patches["quay-io"]["status"]
    assert patch["ready"] == "2/3"
    assert {c["lastTransitionTime"] for c in patch["conditions"]} == {"2026-06-01T12:00:00Z"}
    report(reports, "quay-io", {"node-c": applied(1)})
    settle(mirrors, THREE_NODES, reports, now="2026-06-01T12:02:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in mirrors["quay-io"]["status"]["conditions"]}
    assert times == {"Ready": "2026-06-01T12:02:00Z", "Reconciling": "2026-06-01T12:02:00Z",
                     "Stalled": "2026-06-01T12:00:00Z"}


def test_a_patch_names_only_what_changed() -> None:
    mirrors = {"quay-io": mirror("quay-io")}
    reports = reports_of("quay-io", {"node-a": applied(1)})
    settle(mirrors, THREE_NODES, reports)
    report(reports, "quay-io", {"node-b": applied(1)})
    patch = planning.plan(mirrors, THREE_NODES, reports, now=NOW).patches["quay-io"]["status"]
    # "mirrors": node-b now reports too, so one more node reaches the mirror.
    assert sorted(patch) == ["conditions", "message", "mirrors", "nodes", "ready"]


# --- events ----------------------------------------------------------------------------------------------------


def test_events_tell_about_a_failing_node_and_then_about_ready() -> None:
    mirrors = {"quay-io": mirror("quay-io")}
    reports = reports_of("quay-io", {"node-a": applied(1), "node-b": failed(1, "boom")})
    first = settle(mirrors, THREE_NODES, reports)
    assert [(n.type, n.reason) for n in first.notices] == [("Warning", "NodesFailed")]
    assert "node-b: boom" in first.notices[0].message
    report(reports, "quay-io", {"node-c": failed(1, "bang")})
    second = settle(mirrors, THREE_NODES, reports)
    assert [n.message for n in second.notices] == ["2 nodes failed generation 1; newly failing: node-c: bang"]
    report(reports, "quay-io", {n: applied(1) for n in THREE_NODES})
    third = settle(mirrors, THREE_NODES, reports)
    assert [(n.type, n.reason, n.message, n.uid) for n in third.notices] == [
        ("Normal", "Ready", "3/3 nodes run generation 1", "uid-quay-io")]


# --- scale -------------------------------------------------------------------------------------------------------


def test_a_thousand_nodes_plan_quickly_into_a_small_status() -> None:
    nodes = {f"node-{i:04d}": {"pool": "a" if i % 2 else "b"} for i in range(1000)}
    long_reason = "containerd did not come back after the restart: " + "x" * 600
    reports: Reports = {}
    for j in range(5):
        report(reports, f"m{j}", {name: (failed(1, long_reason[:512]) if i % 100 == 0 else applied(1))
                                  for i, name in enumerate(nodes)})
    mirrors = {f"m{j}": mirror(f"m{j}", f"r{j}.example.com") for j in range(5)}
    t0 = time.perf_counter()
    result = settle(mirrors, nodes, reports)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"planning 5 RegistryMirrors on 1,000 nodes took {elapsed:.2f} s"
    # The whole status: ten failing nodes of the 1,000 (a capped sample, 512 characters each), conditions and
    # counts (per mirror too). It is the same size at 5,000 nodes: nothing in it grows with the cluster.
    size = len(json.dumps(mirrors["m0"]["status"]))
    assert size < 10.5 * 1024, size
    status = mirrors["m0"]["status"]
    assert status["ready"] == "990/1000" and status["nodes"]["failed"] == 10
    assert len(status["failingNodes"]) == 10 and len(status["message"]) <= planning.MAX_MESSAGE
    assert all(len(c["message"]) <= 1024 for c in status["conditions"])
    assert result.prunes == ()

    for j in range(5):
        report(reports, f"m{j}", {n: applied(1) for n in nodes})
    t0 = time.perf_counter()
    healed = settle(mirrors, nodes, reports)
    assert time.perf_counter() - t0 < 1.0
    assert len(json.dumps(healed.patches["m0"])) < 2048
    assert planning.plan(mirrors, nodes, reports, now=NOW).patches == {}


# --- the published document must fit in a ConfigMap -------------------------------------------------------------


def big_mirror(name: str, registry: str, created: str, generation: int = 1, fill: str = "A") -> dict[str, Any]:
    """Ten mirrors with a 64 KB caBundle each: valid, and about 660 KB of document on its own."""
    pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join([fill * 64] * 1000) + "\n-----END CERTIFICATE-----\n"
    body = mirror(name, registry, generation=generation, created=created)
    body["spec"]["mirrors"] = [{"url": f"https://m{i}.example.com", "caBundle": pem[:65536]} for i in range(10)]
    return body


def test_a_document_too_large_for_a_configmap_stalls_the_newest_and_keeps_what_nodes_run() -> None:
    mirrors = {"old": big_mirror("old", "quay.io", "2026-01-01T00:00:00Z"),
               "new": big_mirror("new", "ghcr.io", "2026-02-01T00:00:00Z")}
    result = settle(mirrors, THREE_NODES)
    assert result.published == ("old",)
    assert len(result.desired.encode()) <= planning.MAX_DOCUMENT_BYTES
    status = mirrors["new"]["status"]
    assert conditions(status)["Stalled"] == ("True", "DocumentTooLarge")
    assert "more than the 921,600 a ConfigMap can hold; nothing of it is applied" in status["message"]
    assert conditions(mirrors["old"]["status"])["Stalled"] == ("False", "Progressing")

    # Both published small, then both grow: the newer one's change gives way, and its nodes keep what they run.
    small = {"old": mirror("old", "quay.io", created="2026-01-01T00:00:00Z"),
             "new": mirror("new", "ghcr.io", created="2026-02-01T00:00:00Z")}
    before = planning.plan(small, THREE_NODES, {}, now=NOW).desired
    grown = {"old": big_mirror("old", "quay.io", "2026-01-01T00:00:00Z", generation=2),
             "new": big_mirror("new", "ghcr.io", "2026-02-01T00:00:00Z", generation=2, fill="B")}
    after = planning.plan(grown, THREE_NODES, {}, now=NOW, published=before)
    published = {e.name: e.generation for e in contract.parse_desired(after.desired).entries}
    assert published == {"old": 2, "new": 1}  # the newer one's growth gave way; its nodes keep generation 1
    assert "nodes keep generation 1" in after.statuses["new"]["message"]
    assert after.verdicts["new"].reason == "DocumentTooLarge" and after.verdicts["old"].reason is None
