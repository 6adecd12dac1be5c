"""The taint that holds workloads off a new node until its mirrors are in place: when to remove it, and how.

A node pool registers its nodes with ``regmirror.io/mirrors-pending:NoSchedule`` (``contract.MIRRORS_PENDING_TAINT``);
the agent on the node removes it from its own Node once the operator has published a desired state and every
RegistryMirror selecting the node is applied and healthy there. These functions only decide; the agent does the
one GET and the one PATCH.

The patch is a JSON patch guarded by a ``test`` of the Node's resourceVersion: ``spec.taints`` is a list that the
kubelet, the node lifecycle controller (``node.kubernetes.io/not-ready``) and people edit too, and any patch of
it replaces it whole, so writing back a stale read could drop a taint someone else just added. With the test, a
stale write is refused (409 or 422) and the agent reads the Node again. The admission policy
``regmirror-agent-untaints-its-own-node`` (manifests/agent-policy.yaml) holds the agent to exactly this change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from regmirror_api import contract


def mirrors_in_place(reports: Iterable[contract.Report]) -> bool:
    """Is every RegistryMirror selecting the node applied and healthy there? (None selecting it: yes.)

    Only for reports of a desired state the operator actually published: no document, no decision."""
    return all(r.state == contract.STATE_APPLIED for r in reports)


def pending_taints(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The node's taints with the mirrors-pending key, whatever their effect."""
    taints = (node.get("spec") or {}).get("taints") or []
    return [t for t in taints if t.get("key") == contract.MIRRORS_PENDING_TAINT]


def plan_untaint(node: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The JSON patch that removes the mirrors-pending taint(s) from ``node`` (the whole Node as read), keeping
    every other taint in its place; None when the node does not carry it."""
    taints = (node.get("spec") or {}).get("taints") or []
    kept = [dict(t) for t in taints if t.get("key") != contract.MIRRORS_PENDING_TAINT]
    if len(kept) == len(taints):
        return None
    version = str((node.get("metadata") or {}).get("resourceVersion") or "")
    change: dict[str, Any] = ({"op": "replace", "path": "/spec/taints", "value": kept} if kept
                              else {"op": "remove", "path": "/spec/taints"})
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, change]
