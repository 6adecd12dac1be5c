"""The operator/agent contract: deterministic documents, label selectors as Kubernetes evaluates them."""

from __future__ import annotations

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


def test_report_patch_touches_only_this_nodes_key() -> None:
    report = contract.Report(4, contract.STATE_FAILED, "x" * 2000, True)
    patch = contract.report_patch("node-a", report, "2026-11-28T00:00:00Z")
    assert list(patch["status"]["nodeReports"]) == ["node-a"]
    assert len(patch["status"]["nodeReports"]["node-a"]["message"]) == contract.MAX_REPORT_MESSAGE
    assert contract.same_report(patch["status"]["nodeReports"]["node-a"], report)
    assert contract.report_patch("node-a", None, "t") == {"status": {"nodeReports": {"node-a": None}}}


def test_oldest_object_wins_a_registry_then_name() -> None:
    winners = contract.pick_winners([("b", "quay.io", "2026-01-01T00:00:00Z"), ("a", "quay.io", "2026-01-02T00:00:00Z"),
                                     ("c", "docker.io", "2026-01-01T00:00:00Z"), ("d", "docker.io", "2026-01-01T00:00:00Z")])
    assert winners == {"quay.io": "b", "docker.io": "c"}


def test_unknown_document_version_is_refused() -> None:
    with pytest.raises(contract.InvalidDocument, match="version"):
        contract.parse_desired('{"version": 2, "mirrors": []}')
