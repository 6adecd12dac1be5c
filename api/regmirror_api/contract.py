"""The operator <-> agent contract: one ConfigMap with the desired state, one status key per node.

The operator renders every valid, winning RegistryMirror into ``desired.json`` of the ConfigMap
``regmirror-system/regmirror-desired``. Rendering is deterministic (sorted, canonical JSON, a content hash), so
the same objects always give the same bytes and nothing is rewritten without a change.

Each agent reports its node's result for each RegistryMirror under ``status.nodeReports.<node>`` with a JSON
merge patch on the status subresource that names only its own key and carries no resourceVersion: 1,000
agents never conflict, and each writes once per change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from regmirror_api import models

NAMESPACE = "regmirror-system"
CONFIGMAP = "regmirror-desired"
CONFIGMAP_KEY = "desired.json"
DOCUMENT_VERSION = 1
STATE_APPLIED = "Applied"
STATE_FAILED = "Failed"
MAX_REPORT_MESSAGE = 512


class InvalidDocument(ValueError):
    """The ConfigMap does not hold a desired-state document this agent understands."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One published RegistryMirror: what every selected node must apply."""

    name: str
    generation: int
    spec: Mapping[str, Any]
    node_selector: Mapping[str, Any]

    def mirror(self) -> models.RegistryMirror:
        return models.parse_spec(self.name, self.spec, self.generation)


@dataclasses.dataclass(frozen=True)
class Desired:
    entries: tuple[Entry, ...]
    hash: str


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def render_desired(entries: Iterable[Entry]) -> str:
    """The ConfigMap value: same entries, same bytes."""
    items = [{"name": e.name, "generation": e.generation, "spec": dict(e.spec),
              "nodeSelector": dict(e.node_selector)} for e in sorted(entries, key=lambda e: e.name)]
    digest = hashlib.sha256(_canonical(items).encode()).hexdigest()
    return json.dumps({"version": DOCUMENT_VERSION, "hash": f"sha256:{digest}", "mirrors": items},
                      sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def parse_desired(text: str) -> Desired:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidDocument(f"{CONFIGMAP_KEY} is not JSON: {exc}") from exc
    if not isinstance(raw, Mapping) or raw.get("version") != DOCUMENT_VERSION:
        raise InvalidDocument(f"{CONFIGMAP_KEY}: version {raw.get('version') if isinstance(raw, Mapping) else raw!r}"
                              f" is not {DOCUMENT_VERSION}; is the agent older than the operator?")
    try:
        entries = tuple(Entry(str(m["name"]), int(m.get("generation", 0)), m["spec"], m.get("nodeSelector") or {})
                        for m in raw.get("mirrors", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidDocument(f"{CONFIGMAP_KEY}: malformed entry ({exc})") from exc
    return Desired(entries=entries, hash=str(raw.get("hash", "")))


# --- label selectors (metav1.LabelSelector) -----------------------------------------------------------

LINUX_LABEL = "kubernetes.io/os"


def check_selector(selector: object, where: str = "spec.nodeSelector") -> list[str]:
    """Problems with a label selector, in the words kubectl users know."""
    if selector in (None, {}):
        return []
    if not isinstance(selector, Mapping):
        return [f"{where}: must be a label selector object"]
    problems = []
    for i, expr in enumerate(selector.get("matchExpressions") or []):
        op = expr.get("operator") if isinstance(expr, Mapping) else None
        values = expr.get("values") or [] if isinstance(expr, Mapping) else []
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            problems.append(f"{where}.matchExpressions[{i}].operator: {op!r} is not In, NotIn, Exists or DoesNotExist")
        elif op in ("In", "NotIn") and not values:
            problems.append(f"{where}.matchExpressions[{i}].values: {op} needs at least one value")
        elif op in ("Exists", "DoesNotExist") and values:
            problems.append(f"{where}.matchExpressions[{i}].values: must be empty for {op}")
    return problems


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Does the RegistryMirror's nodeSelector pick a node with these labels? Empty selects every Linux node."""
    if labels.get(LINUX_LABEL, "linux") != "linux":
        return False
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def mirrors_for_node(desired: Desired, labels: Mapping[str, str]) -> list[Entry]:
    return [e for e in desired.entries if selects(e.node_selector, labels)]


# --- node reports ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
    generation: int
    state: str
    message: str = ""
    restarted: bool = False

    def body(self, time: str) -> dict[str, Any]:
        return {"generation": self.generation, "state": self.state,
                "message": self.message[:MAX_REPORT_MESSAGE], "restarted": self.restarted, "time": time}


def report_patch(node: str, report: Report | None, time: str) -> dict[str, Any]:
    """A JSON merge patch for ``status`` touching only this node's key (``None`` removes it)."""
    return {"status": {"nodeReports": {node: None if report is None else report.body(time)}}}


def same_report(current: Mapping[str, Any] | None, report: Report) -> bool:
    """Is this already what the object says for the node? Then the agent writes nothing."""
    if not current:
        return False
    return (current.get("generation") == report.generation and current.get("state") == report.state
            and current.get("message", "") == report.message[:MAX_REPORT_MESSAGE]
            and bool(current.get("restarted", False)) == report.restarted)


def pick_winners(objects: Sequence[tuple[str, str, str]]) -> dict[str, str]:
    """For ``(name, registry, creationTimestamp)`` triples: the winner's name per registry (oldest, then
    name), so two RegistryMirrors for one registry resolve the same way on every run."""
    winners: dict[str, tuple[str, str]] = {}
    for name, registry, created in objects:
        if registry not in winners or (created, name) < winners[registry]:
            winners[registry] = (created, name)
    return {registry: name for registry, (_, name) in winners.items()}
