"""When the agent removes the mirrors-pending taint, and the patch it sends (regmirror_agent.taints)."""

from __future__ import annotations

from typing import Any

import pytest

from regmirror_agent import taints
from regmirror_api import contract

PENDING = {"key": "regmirror.io/mirrors-pending", "effect": "NoSchedule"}
PENDING_NO_EXECUTE = {"key": "regmirror.io/mirrors-pending", "value": "", "effect": "NoExecute"}
NOT_READY = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
GPU = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
ALMOST = {"key": "regmirror.io/mirrors-pending-other", "effect": "NoSchedule"}


def node(*node_taints: dict[str, Any], version: str = "42") -> dict[str, Any]:
    spec: dict[str, Any] = {"podCIDR": "10.0.0.0/24"}
    if node_taints:
        spec["taints"] = [dict(t) for t in node_taints]
    return {"metadata": {"name": "node-a", "resourceVersion": version}, "spec": spec}


def test_the_key_is_the_contracts() -> None:
    assert contract.MIRRORS_PENDING_TAINT == "regmirror.io/mirrors-pending"


@pytest.mark.parametrize(("states", "in_place"), [
    ([], True),  # no RegistryMirror selects the node: nothing to wait for
    ([contract.STATE_APPLIED], True),
    ([contract.STATE_APPLIED, contract.STATE_APPLIED], True),
    ([contract.STATE_APPLIED, contract.STATE_FAILED], False),
    ([contract.STATE_FAILED], False),
], ids=["none-selects-it", "one-applied", "all-applied", "one-failed", "all-failed"])
def test_mirrors_are_in_place_only_when_every_entry_is_applied(states: list[str], in_place: bool) -> None:
    reports = [contract.Report(f"m{i}", 1, state) for i, state in enumerate(states)]
    assert taints.mirrors_in_place(reports) is in_place


@pytest.mark.parametrize(("before", "change"), [
    (node(PENDING), {"op": "remove", "path": "/spec/taints"}),
    (node(PENDING, PENDING_NO_EXECUTE), {"op": "remove", "path": "/spec/taints"}),
    (node(NOT_READY, PENDING, GPU), {"op": "replace", "path": "/spec/taints", "value": [NOT_READY, GPU]}),
    (node(PENDING_NO_EXECUTE, ALMOST), {"op": "replace", "path": "/spec/taints", "value": [ALMOST]}),
], ids=["only-ours", "ours-with-every-effect", "others-kept-in-order", "a-lookalike-key-is-not-ours"])
def test_the_patch_removes_exactly_our_taint_and_only_from_the_node_as_read(
        before: dict[str, Any], change: dict[str, Any]) -> None:
    assert taints.plan_untaint(before) == [{"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                                           change]


@pytest.mark.parametrize("without", [node(), node(NOT_READY, ALMOST), {"metadata": {"name": "node-a"}}],
                         ids=["no-taints", "other-taints-only", "no-spec"])
def test_a_node_without_our_taint_needs_no_patch(without: dict[str, Any]) -> None:
    assert taints.plan_untaint(without) is None
    assert taints.pending_taints(without) == []


def test_pending_taints_lists_ours_whatever_the_effect() -> None:
    assert taints.pending_taints(node(GPU, PENDING, PENDING_NO_EXECUTE)) == [PENDING, PENDING_NO_EXECUTE]
