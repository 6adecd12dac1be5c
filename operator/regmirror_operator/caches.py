"""The operator's memory of the cluster: RegistryMirrors, Node labels and each node's report, fed by watch
events and by lists.

RegistryMirrors come from kopf's watch, which restarts after "410 Gone" with a new list and never reports the
objects deleted in between; so each resync also lists them (their number does not grow with the cluster), and
the two sources are merged by one rule: **what the operator heard last wins**. A listing counts as heard when it
started; an event counts when it arrived. A listing may therefore remove an object only if nothing was heard about it
since the listing began (a RegistryMirror created while the list was in flight is kept), and a deletion heard
after a listing began is not undone by that listing (a tombstone remembers it until the next listing).

Nodes and RegistryMirrorNodes come from informers (``informing``): each listing is a complete snapshot, merged
by the same rule, and events follow it in order.

Each ``observe``/``merge`` says whether anything that matters changed, so a Node's heartbeat (which does not
touch its labels) never wakes the reconciler. Pure: callers pass the time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from regmirror_api import contract

T = TypeVar("T")

#: The parts of a RegistryMirror the operator uses; resourceVersion and managedFields change on every write
#: and would only cause useless reconciles.
MIRROR_METADATA = ("name", "uid", "generation", "creationTimestamp", "deletionTimestamp")


def mirror_essence(body: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-dict subset of a RegistryMirror object that planning reads."""
    meta = body.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in MIRROR_METADATA if meta.get(k) is not None},
            "spec": _plain(body.get("spec") or {}),
            "status": _plain(body.get("status") or {})}


def node_labels(body: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in ((body.get("metadata") or {}).get("labels") or {}).items()}


def node_slot(body: Mapping[str, Any]) -> str | None:
    """The Node's restart-slot annotation (``slots``), None when it has none."""
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(contract.RESTART_SLOT_ANNOTATION)
    return str(value) if value is not None else None


def report_essence(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the operator uses of a RegistryMirrorNode: its uid and time (for pruning), the reports, and the
    restart slot it asks for."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return {"uid": str(meta.get("uid") or ""), "time": status.get("time"),
            "mirrors": _plain(contract.parse_node_report(body)), "restartRequest": contract.restart_request(body)}


def _plain(value: Any) -> Any:
    """kopf hands out read-only mapping views; keep plain dicts and lists so later comparisons are cheap."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass
class _Heard(Generic[T]):
    value: T | None  # None: deleted (a tombstone)
    at: float


class Table(Generic[T]):
    """Objects of one kind by name, with the time each was last heard of."""

    def __init__(self) -> None:
        self._rows: dict[str, _Heard[T]] = {}

    def observe(self, name: str, value: T | None, *, at: float) -> bool:
        """A watch event: ``value`` is the new state, ``None`` a deletion. True if the live set changed."""
        row = self._rows.get(name)
        before = row.value if row else None
        self._rows[name] = _Heard(value, at)
        return before != value

    def merge_listing(self, listing: Mapping[str, T], *, started_at: float) -> bool:
        """A complete list taken at ``started_at``; True if the live set changed."""
        changed = False
        for name, value in listing.items():
            row = self._rows.get(name)
            if row is None or row.at <= started_at:
                changed |= (row.value if row else None) != value
                self._rows[name] = _Heard(value, started_at)
        for name in [n for n, row in self._rows.items() if n not in listing and row.at <= started_at]:
            changed |= self._rows.pop(name).value is not None
        return changed

    def items(self) -> dict[str, T]:
        return {name: row.value for name, row in self._rows.items() if row.value is not None}

    def get(self, name: str) -> T | None:
        row = self._rows.get(name)
        return row.value if row else None


NODES = "nodes"
REPORTS = "registrymirrornodes"
SECRETS = "secrets"
"""Secrets of the install's namespace, metadata only: name -> resourceVersion, never their data (``planning``)."""


def secret_version(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion") or "")


class Cache:
    """RegistryMirrors (essence dicts), Node labels and node reports (essence dicts), all by name."""

    def __init__(self) -> None:
        self.mirrors: Table[dict[str, Any]] = Table()
        self.nodes: Table[dict[str, str]] = Table()
        self.slots: Table[str] = Table()
        """Node name -> its restart-slot annotation, for the Nodes that have one (``slots``)."""
        self.reports: Table[dict[str, Any]] = Table()
        self.secrets: Table[str] = Table()
        """Secret name -> resourceVersion, in the install's namespace (mirror credentials; ``planning``)."""
        self._listed: set[str] = set()

    @property
    def complete(self) -> bool:
        """Every kind was listed at least once: before that, publishing could drop mirrors nobody has seen yet,
        and statuses would count nodes that are merely not heard of yet."""
        return {"mirrors", NODES, REPORTS, SECRETS} <= self._listed

    def observe_mirror(self, body: Mapping[str, Any], *, deleted: bool, at: float) -> bool:
        name = str((body.get("metadata") or {}).get("name", ""))
        return self.mirrors.observe(name, None if deleted else mirror_essence(body), at=at)

    def observe(self, kind: str, name: str, body: Mapping[str, Any] | None, *, at: float) -> bool:
        """An informer's event about a Node, a RegistryMirrorNode or a Secret (``None``: deleted)."""
        if kind == NODES:
            slot = self.slots.observe(name, None if body is None else node_slot(body), at=at)
            return self.nodes.observe(name, None if body is None else node_labels(body), at=at) or slot
        if kind == SECRETS:
            return self.secrets.observe(name, None if body is None else secret_version(body), at=at)
        return self.reports.observe(name, None if body is None else report_essence(body), at=at)

    def merge_listed(self, kind: str, objects: Mapping[str, Mapping[str, Any]], *, started_at: float) -> bool:
        """An informer's complete listing of Nodes or RegistryMirrorNodes."""
        self._listed.add(kind)
        if kind == NODES:
            slots = {n: s for n, b in objects.items() if (s := node_slot(b)) is not None}
            slot = self.slots.merge_listing(slots, started_at=started_at)
            return self.nodes.merge_listing({n: node_labels(b) for n, b in objects.items()},
                                            started_at=started_at) or slot
        if kind == SECRETS:
            return self.secrets.merge_listing({n: secret_version(b) for n, b in objects.items()},
                                              started_at=started_at)
        return self.reports.merge_listing({n: report_essence(b) for n, b in objects.items()},
                                          started_at=started_at)

    def merge_mirrors(self, mirrors: Iterable[Mapping[str, Any]], *, started_at: float) -> bool:
        self._listed.add("mirrors")
        return self.mirrors.merge_listing({str(b["metadata"]["name"]): mirror_essence(b) for b in mirrors},
                                          started_at=started_at)

    def record_mirror(self, body: Mapping[str, Any], *, planned_from: Any, at: float) -> None:
        """What a status patch returned, unless a watch event replaced ``planned_from`` in the meantime (that
        event may be newer than the patch's answer; the patch's own event follows it anyway)."""
        name = str((body.get("metadata") or {}).get("name", ""))
        if planned_from is not None and self.mirrors.get(name) is planned_from:
            self.mirrors.observe(name, mirror_essence(body), at=at)
