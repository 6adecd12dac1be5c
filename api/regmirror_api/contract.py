"""The operator <-> agent contract: one ConfigMap with the desired state, one report object per node.

The operator renders every valid, winning RegistryMirror into ``desired.json`` of the ConfigMap
``regmirror-system/regmirror-desired``. Rendering is deterministic (sorted, canonical JSON, a content hash), so
the same objects always give the same bytes and nothing is rewritten without a change.

Each agent reports its node's results in an object of its own, the cluster-scoped ``RegistryMirrorNode`` named
after the node (one per node, whatever the number of RegistryMirrors): one small write per node per change, into
an object no other node writes, so the cost of a rollout grows linearly with the cluster and no write ever
conflicts with another. The object is owned by its Node (``ownerReferences``), so the garbage collector removes it
with the node; the operator reads all of them with one watch and aggregates counts into each RegistryMirror's
status at a bounded rate. Why not keys in the RegistryMirror's own status: every node then rewrites one object
that grows with the cluster, and 1,000 nodes saturate the apiserver (issue 7 measured it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from regmirror_api import models
from regmirror_api.errors import RegmirrorError

NAMESPACE = "regmirror-system"
CONFIGMAP = "regmirror-desired"
CONFIGMAP_KEY = "desired.json"
#: Where mirror credentials live: Secrets in the install's namespace, so the agents' read access stays narrow (a
#: Role there: get; the operator: list and watch, metadata only).
SECRETS_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets"
DOCUMENT_VERSION = 1
STATE_APPLIED = "Applied"
STATE_FAILED = "Failed"
STATE_WAITING = "Waiting"
"""The node must restart its runtime for this generation and waits for the operator's restart slot."""
MAX_REPORT_MESSAGE = 512


class InvalidDocument(RegmirrorError, ValueError):
    """The ConfigMap does not hold a desired-state document this agent understands."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One published RegistryMirror: what every selected node must apply."""

    name: str
    generation: int
    spec: Mapping[str, Any]
    node_selector: Mapping[str, Any]
    uid: str = ""
    """The RegistryMirror's uid: reports name it, so an object deleted and created again under the same name
    (generation 1 again) is never taken for one its nodes already applied."""

    def mirror(self) -> models.RegistryMirror:
        return models.parse_spec(self.name, self.spec, self.generation)


#: How many times a node tries a change its runtime does not survive (rolled back each time) before it gives up
#: on that change and the RegistryMirror goes Stalled; a new generation starts again (operator setting).
DEFAULT_RESTART_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Desired:
    entries: tuple[Entry, ...]
    hash: str
    restart_attempts: int = DEFAULT_RESTART_ATTEMPTS


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def render_desired(entries: Iterable[Entry], restart_attempts: int = DEFAULT_RESTART_ATTEMPTS) -> str:
    """The ConfigMap value: same entries, same bytes. ``restartAttempts`` is written only when it is not the
    default, so a document from before it existed reads (and hashes) the same."""
    items = [{"name": e.name, "uid": e.uid, "generation": e.generation, "spec": dict(e.spec),
              "nodeSelector": dict(e.node_selector)} for e in sorted(entries, key=lambda e: e.name)]
    digest = hashlib.sha256(_canonical(items).encode()).hexdigest()
    document: dict[str, Any] = {"version": DOCUMENT_VERSION, "hash": f"sha256:{digest}", "mirrors": items}
    if restart_attempts != DEFAULT_RESTART_ATTEMPTS:
        document["restartAttempts"] = restart_attempts
    return json.dumps(document, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def parse_desired(text: str) -> Desired:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidDocument(f"{CONFIGMAP_KEY} is not JSON: {exc}") from exc
    if not isinstance(raw, Mapping) or raw.get("version") != DOCUMENT_VERSION:
        raise InvalidDocument(f"{CONFIGMAP_KEY}: version {raw.get('version') if isinstance(raw, Mapping) else raw!r}"
                              f" is not {DOCUMENT_VERSION}; is the agent older than the operator?")
    try:
        entries = tuple(Entry(str(m["name"]), int(m.get("generation", 0)), m["spec"], m.get("nodeSelector") or {},
                              str(m.get("uid") or "")) for m in raw.get("mirrors", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidDocument(f"{CONFIGMAP_KEY}: malformed entry ({exc})") from exc
    attempts = raw.get("restartAttempts", DEFAULT_RESTART_ATTEMPTS)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise InvalidDocument(f"{CONFIGMAP_KEY}: restartAttempts {attempts!r} is not a whole number of at least 1")
    return Desired(entries=entries, hash=str(raw.get("hash", "")), restart_attempts=attempts)


# --- label selectors (metav1.LabelSelector) -----------------------------------------------------------

LINUX_LABEL = "kubernetes.io/os"


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


# --- node reports: one RegistryMirrorNode per node ------------------------------------------------------

NODE_KIND = "RegistryMirrorNode"
NODE_PLURAL = "registrymirrornodes"
NODE_REPORTS_PATH = f"/apis/{models.API_GROUP}/{models.API_VERSION}/{NODE_PLURAL}"

#: The taint a node pool registers its nodes with (kubelet ``--register-with-taints``) so that workloads wait for
#: the node's mirrors: the node's own agent removes it once every RegistryMirror selecting the node is applied
#: and healthy there (any effect; the agent removes every taint with this key, and nothing else).
MIRRORS_PENDING_TAINT = f"{models.API_GROUP}/mirrors-pending"


@dataclasses.dataclass(frozen=True)
class Report:
    """What one node's agent did for one RegistryMirror."""

    name: str
    generation: int
    state: str
    message: str = ""
    restarted: bool = False
    uid: str = ""
    out: tuple[str, ...] = ()
    """Mirror URLs that do not answer from this node, in spec order (the agent's ``mirrorhealth``): left out of
    the node's configuration in containerd's hosts mode, only reported elsewhere. Absent from the body when
    empty, so a report written before this field existed reads the same and causes no write."""
    attempts: int = 0
    """How many times this node tried this generation, restarted its runtime, found it unhealthy and put the
    previous files back (``rolledBack`` in the body, absent when 0). Non-zero halts the rollout of this
    generation on every other node: the operator grants no restart slot for it elsewhere."""

    in_use: tuple[str, ...] = ()
    """``(status, reason, message)``: does the node's runtime really use these mirrors, by its own view of its
    configuration (and ``spec.verify.image`` resolved through it)? status True, False or Unknown; the node's
    condition ``inUse`` in the body, absent when not checked (Docker nodes, a failed apply)."""

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "uid": self.uid, "generation": self.generation,
                                "state": self.state, "message": self.message[:MAX_REPORT_MESSAGE],
                                "restarted": self.restarted}
        if self.out:
            body["out"] = list(self.out[:models.MAX_MIRRORS])
        if self.attempts:
            body["rolledBack"] = self.attempts
        if self.in_use:
            status, reason, message = self.in_use
            body["inUse"] = {"status": status, "reason": reason, "message": message[:MAX_REPORT_MESSAGE]}
        return body


# --- the restart budget: a node asks in its report, the operator grants on the Node ---------------------------

#: The Node annotation by which the operator gives a node one of the cluster's restart slots (at most
#: ``maxUnavailable`` nodes hold one at a time). Its value is ``"<token> <expiry, RFC 3339>"``: the token the
#: node's agent asked for in its report (``restartRequest``), so a slot is only ever used for the very change
#: it was granted for, and the time after which the operator takes the slot back from an agent that died with
#: it. A slot taken back is left as ``"<token> expired"``, so that token is not granted again.
RESTART_SLOT_ANNOTATION = f"{models.API_GROUP}/restart-slot"
SLOT_EXPIRED = "expired"


def restart_token(request: str, attempt: int, instance: str) -> str:
    """What an agent asks a slot for: one change (``request``, the engine's request key), one try of it, one
    agent process (so an agent that restarts never takes a dead one's slot for its own)."""
    return hashlib.sha256(f"{request}\0{attempt}\0{instance}".encode()).hexdigest()[:16]


def render_slot(token: str, expires: str) -> str:
    return f"{token} {expires}"


def parse_slot(value: object) -> tuple[str, str]:
    """``(token, expiry or SLOT_EXPIRED)`` of a slot annotation; ``("", "")`` for none or a malformed one."""
    token, _, expires = value.partition(" ") if isinstance(value, str) else ("", "", "")
    return (token, expires) if token and expires else ("", "")


def restart_request(obj: Mapping[str, Any] | None) -> str:
    """The token a node's report asks a restart slot for ('' when it waits for none)."""
    status = (obj or {}).get("status")
    value = status.get("restartRequest") if isinstance(status, Mapping) else None
    return value if isinstance(value, str) else ""


def report_content(reports: Iterable[Report]) -> list[dict[str, Any]]:
    """The part of a node's report that matters (sorted, messages clipped): equal content, no write."""
    return [r.body() for r in sorted(reports, key=lambda r: r.name)]


def _summary(content: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The printer-column fields: ``kubectl get registrymirrornodes`` shows which node runs which generation and
    why one failed without opening the object."""
    applied = sum(1 for r in content if r["state"] == STATE_APPLIED)
    failures = [f"{r['name']}: {r['message'] or 'failed'}" for r in content if r["state"] == STATE_FAILED]
    waiting = [r["name"] for r in content if r["state"] == STATE_WAITING]
    if waiting:
        failures.append(f"waiting for a restart slot: {', '.join(waiting)}")
    return {"ready": f"{applied}/{len(content)}",
            "generations": " ".join(f"{r['name']}={r['generation']}" for r in content)[:MAX_REPORT_MESSAGE],
            "message": "; ".join(failures)[:MAX_REPORT_MESSAGE]}


def render_node_report(node: str, node_uid: str, reports: Iterable[Report], *, time: str,
                       request: str = "") -> dict[str, Any]:
    """The whole ``RegistryMirrorNode`` for ``node``: the body of its create, and of every later merge patch
    (lists are replaced whole by a merge patch, so the same body serves both). It holds only what this node
    did, never which document it read: a change that does not touch the node must not make it write.
    ``request``: the token of the restart slot the node waits for; ``null`` in the body when none,
    so a merge patch removes an earlier one."""
    content = report_content(reports)
    metadata: dict[str, Any] = {"name": node, "labels": {"app.kubernetes.io/part-of": "regmirror"}}
    if node_uid:
        # The garbage collector deletes the report with its Node. No blockOwnerDeletion: that needs the right
        # to set finalizers on Nodes, which an agent must not have.
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}]
    return {"apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": NODE_KIND, "metadata": metadata,
            "status": {**_summary(content), "time": time, "mirrors": content,
                       "restartRequest": request or None}}


def parse_node_report(obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """RegistryMirror name -> that node's report on it, from a ``RegistryMirrorNode`` (malformed entries are
    skipped: a report is evidence for the operator, never a reason to fail)."""
    status = obj.get("status") if isinstance(obj, Mapping) else None
    mirrors = status.get("mirrors") if isinstance(status, Mapping) else None
    found: dict[str, dict[str, Any]] = {}
    for item in mirrors if isinstance(mirrors, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            found[item["name"]] = dict(item)
    return found


def out_mirrors(report: Mapping[str, Any] | None) -> frozenset[str]:
    """The mirror URLs one node's report on one RegistryMirror names as out (none in a report from before)."""
    out = (report or {}).get("out")
    return frozenset(u for u in out if isinstance(u, str)) if isinstance(out, list) else frozenset()


def same_reports(obj: Mapping[str, Any] | None, reports: Iterable[Report], node_uid: str = "",
                 request: str = "") -> bool:
    """Does the node's object already say exactly this (its time aside)? Then the agent writes nothing."""
    if not obj:
        return False
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    if node_uid and not any(o.get("uid") == node_uid for o in owners):
        return False
    status = obj.get("status") or {}
    return bool(status.get("mirrors") == report_content(reports)) and restart_request(obj) == request


def pick_winners(objects: Sequence[tuple[str, str, str]]) -> dict[str, str]:
    """For ``(name, registry, creationTimestamp)`` triples: the winner's name per registry (oldest, then
    name), so two RegistryMirrors for one registry resolve the same way on every run."""
    winners: dict[str, tuple[str, str]] = {}
    for name, registry, created in objects:
        if registry not in winners or (created, name) < winners[registry]:
            winners[registry] = (created, name)
    return {registry: name for registry, (_, name) in winners.items()}
