"""Kubernetes Events on the agent's own Node, for what a person looking at the node should notice.

``kubectl describe node <name>`` lists them beside the kubelet's own (and ``kubectl get events -n default
--field-selector involvedObject.kind=Node,involvedObject.name=<name>``):

- ``MirrorApplyFailed`` (Warning): applying the node's RegistryMirrors was refused or failed; the node kept its
  files. ``RuntimeRolledBack`` (Warning): containerd did not come back healthy on the change, which was put back.
- ``MirrorOut`` (Warning): a mirror stopped answering from this node and is left out of its configuration;
  ``MirrorBack`` (Normal): it answers again and is back in.

The RegistryMirrorNode report stays the record of what the node did; an Event only points a person at a change.
So an Event is posted when something changes, never per resync: a failure the node keeps failing with is posted
once, and after it is gone, the same failure again (same reason, same RegistryMirrors or mirror) within
``dedupe_seconds`` is not posted again. Never more than ``burst`` Events a minute. Posting never stops the agent: a
refused or failed post is logged and forgotten (the agent needs ``create`` on events in ``default``, a Role of
manifests/agent-rbac.yaml).

The planning is pure (``plan_failure_events``, ``plan_mirror_events``, ``render_event``); ``Poster`` does the one
request, and ``Tracker`` remembers what the node failed with, between the agent's reconciles.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from regmirror_agent.kubeapi import ApiError
from regmirror_api import models
from regmirror_api.errors import RegmirrorError

log = logging.getLogger("regmirror.agent")

#: Where the kubelet posts a Node's events (a Node has no namespace), and where ``kubectl describe node`` looks.
NAMESPACE = "default"
EVENTS_PATH = f"/api/v1/namespaces/{NAMESPACE}/events"
COMPONENT = "regmirror-agent"

APPLY_FAILED, ROLLED_BACK = "MirrorApplyFailed", "RuntimeRolledBack"
MIRROR_OUT, MIRROR_BACK = "MirrorOut", "MirrorBack"
WARNING, NORMAL = "Warning", "Normal"

#: The apiserver keeps a longer message, but an Event is a pointer: the report holds the whole story.
MESSAGE_LIMIT = 1024


@dataclasses.dataclass(frozen=True)
class NodeEvent:
    reason: str
    type: str
    subject: str
    """What it is about (the RegistryMirrors applied, or a mirror's URL): with ``reason``, what makes two Events
    the same one (the message may differ in details such as containerd's own words)."""
    message: str

    @property
    def key(self) -> tuple[str, str]:
        return self.reason, self.subject


@dataclasses.dataclass(frozen=True)
class ApplyFailure:
    """One apply of the node's RegistryMirrors that was refused or failed."""

    mirrors: tuple[str, ...]
    """The RegistryMirrors applied, sorted."""
    message: str
    rolled_back: bool = False

    @property
    def key(self) -> tuple[bool, tuple[str, ...]]:
        return self.rolled_back, self.mirrors


def plan_failure_events(before: Collection[ApplyFailure], after: Iterable[ApplyFailure]) -> list[NodeEvent]:
    """The Events for the failures of a reconcile (``after``) the node did not already fail with (``before``)."""
    known = {f.key for f in before}
    events: list[NodeEvent] = []
    for failure in after:
        if failure.key in known:
            continue
        known.add(failure.key)
        names = ", ".join(failure.mirrors) or "none"
        if failure.rolled_back:
            events.append(NodeEvent(ROLLED_BACK, WARNING, names, f"RegistryMirrors {names}: {failure.message}"))
        else:
            message = f"RegistryMirrors {names} not applied, the node keeps its files: {failure.message}"
            events.append(NodeEvent(APPLY_FAILED, WARNING, names, message))
    return events


def plan_mirror_events(before: Collection[str], after: Collection[str]) -> list[NodeEvent]:
    """The Events for mirrors (URLs) that went out of the node's configuration (``after`` but not ``before``) or
    came back into it."""
    events = [NodeEvent(MIRROR_OUT, WARNING, url, f"mirror {url} does not answer from this node: left out of its "
                                                  f"configuration until it answers again")
              for url in sorted(set(after) - set(before))]
    events += [NodeEvent(MIRROR_BACK, NORMAL, url, f"mirror {url} answers again from this node: back in its "
                                                   f"configuration")
               for url in sorted(set(before) - set(after))]
    return events


def render_event(event: NodeEvent, node: str, node_uid: str, now: datetime.datetime) -> dict[str, Any]:
    """The core/v1 Event, as the kubelet writes one for its Node (no eventTime: the older form, which
    ``kubectl describe node`` and every events tool read, and which needs no ``action``)."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    message = event.message if len(event.message) <= MESSAGE_LIMIT else event.message[:MESSAGE_LIMIT - 3] + "..."
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{node}.{int(now.timestamp() * 1e9):x}", "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid},
        "reason": event.reason, "message": message, "type": event.type,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT, "reportingInstance": node,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


class Creator(Protocol):
    def create(self, path: str, body: Any) -> Any: ...


class Poster:
    """Posts Events on one Node: each the first time in ``dedupe_seconds``, at most ``burst`` a minute."""

    def __init__(self, client: Creator, node: str, *, dedupe_seconds: float = 600.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        self.client = client
        self.node = node
        self.dedupe_seconds = dedupe_seconds
        self.burst = burst
        self.clock = clock
        self.wall = wall
        self._posted: dict[tuple[str, str], float] = {}
        """When each Event (by key) was last posted."""
        self._recent: list[float] = []
        """When the Events of the last minute were posted."""

    def post(self, events: Iterable[NodeEvent], node_uid: str) -> int:
        """Post what is due; return how many were posted. Never raises for the apiserver."""
        posted = 0
        for event in events:
            now = self.clock()
            if not node_uid:  # the Node not seen yet: an Event must point at it
                continue
            last = self._posted.get(event.key)
            if last is not None and now - last < self.dedupe_seconds:
                log.info("event %s on node %s (%s) posted %.0fs ago: not again", event.reason, self.node,
                         event.subject, now - last)
                continue
            self._recent = [t for t in self._recent if now - t < 60.0]
            if len(self._recent) >= self.burst:
                log.info("event %s on node %s not posted: %d events in the last minute already", event.reason,
                         self.node, len(self._recent))
                continue
            try:
                self.client.create(EVENTS_PATH, render_event(event, self.node, node_uid, self.wall()))
            except (ApiError, OSError) as exc:
                log.warning("could not post event %s on node %s (it is only a notice): %s", event.reason,
                            self.node, exc)
                continue
            self._posted = {k: t for k, t in self._posted.items() if now - t < self.dedupe_seconds}
            self._posted[event.key] = now
            self._recent.append(now)
            posted += 1
        return posted


Outcome = TypeVar("Outcome")


class Tracker:
    """What the node failed with at its last reconcile that applied anything, and the Events of a change of it.

    ``observing`` wraps the agent's apply to see each try of a reconcile (several when one RegistryMirror's file
    is the culprit and the others are applied without it); ``reconciled`` ends the reconcile."""

    def __init__(self, poster: Poster) -> None:
        self.poster = poster
        self._failing: tuple[ApplyFailure, ...] = ()
        self._tries: list[ApplyFailure | None] = []

    def observing(self, apply: Callable[[Sequence[models.RegistryMirror]], Outcome]
                  ) -> Callable[[Sequence[models.RegistryMirror]], Outcome]:
        def observed(mirrors: Sequence[models.RegistryMirror]) -> Outcome:
            try:
                outcome = apply(mirrors)
            except RegmirrorError as exc:
                self._tries.append(ApplyFailure(tuple(sorted(m.name for m in mirrors)), str(exc),
                                                bool(getattr(exc, "rolled_back", False))))
                raise
            if not getattr(outcome, "held", False):  # held for a restart slot: nothing tried yet
                self._tries.append(None)
            return outcome

        return observed

    def reconciled(self, node_uid: str) -> None:
        tries, self._tries = self._tries, []
        if not tries:  # nothing tried (nothing published, or held): what failed still fails
            return
        failures = tuple(f for f in tries if f is not None)
        events = plan_failure_events(self._failing, failures)
        self._failing = failures
        self.poster.post(events, node_uid)

    def mirrors_moved(self, before: Collection[str], after: Collection[str], node_uid: str) -> None:
        self.poster.post(plan_mirror_events(before, after), node_uid)
