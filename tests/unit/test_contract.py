"""The operator/agent contract: deterministic documents, label selectors as Kubernetes evaluates them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from regmirror_api import contract

SPEC = {"registry": "quay.io", "mirrors": [{"url": "https://quay.tencentcloudcr.com"}]}


def test_same_entries_in_any_order_render_the_same_bytes() -> None:
    a = contract.Entry("a", 1, SPEC, {})
    b = contract.Entry("b", 3, {**SPEC, "registry": "docker.io"}, {"matchLabels": {"pool": "gpu"}})
    assert contract.render_desired([a, b]) == contract.render_desired([b, a])
    parsed = contract.parse_desired(contract.render_desired([b, a]))
    assert [e.name for e in parsed.entries] == ["a", "b"]
    assert parsed.hash.startswith("sha256:")
    assert contract.parse_desired(contract.render_desired([a])).hash != parsed.hash


@pytest.mark.parametrize("selector, labels, expected", [
    ({}, {}, True),
    ({}, {"kubernetes.io/os": "windows"}, False),
    ({"matchLabels": {"pool": "a"}}, {"pool": "a"}, True),
    ({"matchLabels": {"pool": "a"}}, {"pool": "b"}, False),
    ({"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a", "b"]}]}, {"pool": "b"}, True),
    ({"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["a"]}]}, {"pool": "a"}, False),
    ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
    ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": ""}, False),
])
def test_node_selector(selector: dict, labels: dict, expected: bool) -> None:
    assert contract.selects(selector, labels) is expected


def test_a_node_report_is_one_small_object_named_and_owned_by_its_node() -> None:
    reports = [contract.Report("quay-io", 4, contract.STATE_FAILED, "x" * 2000, True, uid="u1"),
               contract.Report("docker-io", 2, contract.STATE_APPLIED, uid="u2")]
    body = contract.render_node_report("node-a", "node-uid", reports, time="2026-11-28T00:00:00Z")
    assert body["kind"] == "RegistryMirrorNode" and body["metadata"]["name"] == "node-a"
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "node-a",
                                                    "uid": "node-uid"}]
    status = body["status"]
    assert [m["name"] for m in status["mirrors"]] == ["docker-io", "quay-io"]  # sorted: same content, same bytes
    assert len(status["mirrors"][1]["message"]) == contract.MAX_REPORT_MESSAGE
    assert status["ready"] == "1/2" and status["generations"] == "docker-io=2 quay-io=4"
    assert status["message"].startswith("quay-io: xxx") and len(status["message"]) <= contract.MAX_REPORT_MESSAGE
    assert set(contract.parse_node_report(body)) == {"docker-io", "quay-io"}
    assert len(json.dumps(body)) < 2048


def test_the_same_reports_need_no_write_whatever_their_order_or_time() -> None:
    a = contract.Report("a", 1, contract.STATE_APPLIED, uid="ua")
    b = contract.Report("b", 3, contract.STATE_APPLIED, restarted=True, uid="ub")
    written = contract.render_node_report("n", "uid-n", [a, b], time="2026-01-01T00:00:00Z")
    assert contract.same_reports(written, [b, a], "uid-n")
    assert not contract.same_reports(written, [a], "uid-n")
    assert not contract.same_reports(written, [a, dataclasses.replace(b, generation=4)], "uid-n")
    # A Node deleted and registered again under the same name has a new uid: the report must follow it.
    assert not contract.same_reports(written, [a, b], "uid-of-the-new-node")
    assert not contract.same_reports(None, [], "uid-n")


def test_oldest_object_wins_a_registry_then_name() -> None:
    winners = contract.pick_winners([("b", "quay.io", "2026-01-01T00:00:00Z"),
                                     ("a", "quay.io", "2026-01-02T00:00:00Z"),
                                     ("c", "docker.io", "2026-01-01T00:00:00Z"),
                                     ("d", "docker.io", "2026-01-01T00:00:00Z")])
    assert winners == {"quay.io": "b", "docker.io": "c"}


def test_unknown_document_version_is_refused() -> None:
    with pytest.raises(contract.InvalidDocument, match="version"):
        contract.parse_desired('{"version": 2, "mirrors": []}')
