"""The cluster's restart budget: which nodes may restart containerd for regmirror now. Pure.

A change that needs a containerd restart (the first move into hosts mode, any inline-mode change) must not take
every node's runtime down at once. So an agent whose change needs a restart writes nothing: it asks for a restart
slot in its own report (``restartRequest``, a token for that very change) and waits. The operator grants at most
``maxUnavailable`` slots at a time, each by an annotation on the node's own Node (``contract.
RESTART_SLOT_ANNOTATION``, which the agent already watches), and takes a slot back once the node's report no longer
asks for it: the node restarted, checked containerd's health and reported the outcome. Changes that need no
restart (hosts.toml edits, most changes once a node is in hosts mode) never ask, and are never held back.

Why annotations on Nodes and not shared Lease objects: every write here goes into one node's own object and only
while that node restarts, so a cluster at rest costs nothing, and no waiting agent polls or watches anything new.

**A stale holder.** A grant carries an expiry (``ttl`` after it was given). A node whose agent died with the slot
(or never came back) loses it then, and its token is marked expired on the annotation so it is never granted again;
a restarted agent asks with a new token. A Node that is deleted frees its slot at once.

**Stop on failure.** A node that restarted for a generation, found containerd unhealthy and rolled back says so
in its report (``rolledBack``, the number of tries). That generation is then *halted*: no other node gets a slot
for it; only the node that failed may try again (first in line), up to the install's ``restartAttempts``.
When it gives up, the RegistryMirror is Stalled (``planning``), and only a new generation moves again.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from collections.abc import Mapping
from typing import Any

from regmirror_api import contract

#: How long a node may hold a slot before it is taken back: longer than a try that fails in the slowest way
#: the agent allows (systemctl restart, up to 120 s; the health check, 60 s by default; then the same again for
#: the rollback: 360 s).
DEFAULT_SLOT_SECONDS = 600.0


class BadBudget(ValueError):
    """A maxUnavailable that is neither a whole number of at least 1 nor a percentage above 0."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """``maxUnavailable``: a number of nodes, or a percentage of the cluster's Linux nodes (rounded up, as a
    DaemonSet's is), never less than one."""

    count: int = 1
    percent: float | None = None

    def slots(self, nodes: int) -> int:
        if self.percent is None:
            return self.count
        return max(1, math.ceil(nodes * self.percent / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def parse_budget(text: str) -> Budget:
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if match:
        percent = float(match.group(1))
        if 0 < percent <= 100:
            return Budget(percent=percent)
    elif re.fullmatch(r"\d+", value) and int(value) >= 1:
        return Budget(count=int(value))
    raise BadBudget(f"maxUnavailable {text!r}: expected a whole number of at least 1 (nodes) or a percentage "
                    f"above 0 and at most 100 of the cluster's nodes, for example 1 or 10%")


Key = tuple[str, str, int]
"""A generation of one RegistryMirror: (name, uid, generation)."""


def _key(entry: Mapping[str, Any]) -> Key:
    return (str(entry.get("name") or ""), str(entry.get("uid") or ""), int(entry.get("generation") or 0))


def _tries(entry: Mapping[str, Any]) -> int:
    value = entry.get("rolledBack")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def halted(reports: Mapping[str, Mapping[str, Any]]) -> dict[Key, dict[str, Mapping[str, Any]]]:
    """Generations some node rolled back and does not run: key -> {node: its entry}."""
    found: dict[Key, dict[str, Mapping[str, Any]]] = {}
    for node, report in reports.items():
        for entry in (report.get("mirrors") or {}).values():
            if _tries(entry) and entry.get("state") != contract.STATE_APPLIED:
                found.setdefault(_key(entry), {})[node] = entry
    return found


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    writes: Mapping[str, str | None]
    """Node name -> the new value of its slot annotation (None: remove it). Grants and releases alike."""
    holders: tuple[str, ...]
    """Nodes that hold a slot after these writes."""
    waiting: tuple[str, ...]
    """Nodes that ask for a slot and do not get one now, in the order they will."""
    blocked: tuple[str, ...]
    """Nodes that ask for a slot for a generation another node rolled back: they wait until it succeeds there."""
    next_expiry: datetime.datetime | None = None
    """When the first slot held now runs out: the operator looks again then, not only at its next resync."""


def _time(text: str) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_slots(nodes: Mapping[str, Mapping[str, str]], slots: Mapping[str, str],
               reports: Mapping[str, Mapping[str, Any]], *, budget: Budget, now: datetime.datetime,
               ttl: float = DEFAULT_SLOT_SECONDS) -> SlotPlan:
    """Who holds a slot, who gets one, whose slot is taken back.

    ``nodes``: Node name -> labels (only Linux nodes count for a percentage). ``slots``: Node name -> its slot
    annotation, for the Nodes that have one. ``reports``: node name -> ``caches.report_essence``.
    """
    writes: dict[str, str | None] = {}
    holders: list[str] = []
    deadlines: list[datetime.datetime] = []
    for node, value in sorted(slots.items()):
        if node not in nodes:
            continue  # the Node is gone, and its slot with it
        token, expires = contract.parse_slot(value)
        asks = str((reports.get(node) or {}).get("restartRequest") or "")
        if not token or asks != token:
            writes[node] = None  # done (or asking for another change): the slot goes back
        elif expires == contract.SLOT_EXPIRED:
            pass  # its agent died holding it: the same token never gets a slot again
        elif (deadline := _time(expires)) is None or now >= deadline:
            writes[node] = contract.render_slot(token, contract.SLOT_EXPIRED)
        else:
            holders.append(node)
            deadlines.append(deadline)

    stopped = halted(reports)
    linux = sum(1 for labels in nodes.values() if labels.get(contract.LINUX_LABEL, "linux") == "linux")
    free = budget.slots(linux) - len(holders)
    candidates: list[tuple[int, str, str]] = []
    blocked: list[str] = []
    for node, report in sorted(reports.items()):
        token = str(report.get("restartRequest") or "")
        if not token or node not in nodes or node in holders:
            continue
        if contract.parse_slot(slots.get(node))[0] == token:
            continue  # expired with this very token
        entries = [e for e in (report.get("mirrors") or {}).values() if e.get("state") == contract.STATE_WAITING]
        if any(set(stopped.get(_key(e), {})) - {node} for e in entries):
            blocked.append(node)
            continue
        retrying = any(_tries(e) for e in entries)
        candidates.append((0 if retrying else 1, node, token))
    candidates.sort()
    until = now + datetime.timedelta(seconds=ttl)
    expiry = _rfc3339(until)
    granted = candidates[:max(0, free)]
    if granted:
        deadlines.append(until)
    for _, node, token in granted:
        writes[node] = contract.render_slot(token, expiry)
        holders.append(node)
    return SlotPlan(writes=writes, holders=tuple(sorted(holders)),
                    waiting=tuple(node for _, node, _ in candidates[max(0, free):]), blocked=tuple(blocked),
                    next_expiry=min(deadlines, default=None))
