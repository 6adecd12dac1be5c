"""Events on the agent's Node: which are planned for a change, and that the poster posts each once in a while."""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import pytest

from regmirror_agent import nodeevents
from regmirror_agent.engine import EngineError
from regmirror_agent.kubeapi import ApiError
from regmirror_api import models
from regmirror_api.errors import Refused

NODE, UID = "worker-a", "node-uid"
NOW = datetime.datetime(2026, 12, 2, 22, 0, 0, tzinfo=datetime.UTC)
REFUSED = nodeevents.ApplyFailure(("docker-io", "quay-io"), "cannot write certs.d/quay.io/hosts.toml")
ROLLED_BACK = nodeevents.ApplyFailure(("quay-io",), "containerd did not come back healthy", rolled_back=True)


class Api:
    def __init__(self, fail: int = 0) -> None:
        self.posted: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def create(self, path: str, body: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise ApiError(403, 'events is forbidden: cannot create resource "events" in namespace "default"')
        self.posted.append((path, body))
        return body


def poster(api: Api, clock: list[float], **kw: Any) -> nodeevents.Poster:
    return nodeevents.Poster(api, NODE, clock=lambda: clock[0], wall=lambda: NOW, **kw)


@pytest.mark.parametrize(("before", "after", "expected"), [
    pytest.param((), (REFUSED,), [("MirrorApplyFailed", "docker-io, quay-io")], id="a-new-refusal"),
    pytest.param((), (ROLLED_BACK,), [("RuntimeRolledBack", "quay-io")], id="a-rollback"),
    pytest.param((REFUSED,), (REFUSED,), [], id="the-same-failure-again-is-no-change"),
    pytest.param((REFUSED,), (nodeevents.ApplyFailure(REFUSED.mirrors, "other words"),), [],
                 id="the-same-failure-in-other-words-is-no-change"),
    pytest.param((REFUSED,), (), [], id="a-failure-gone-posts-nothing"),
    pytest.param((REFUSED,), (ROLLED_BACK,), [("RuntimeRolledBack", "quay-io")], id="another-failure"),
    pytest.param((), (ROLLED_BACK, ROLLED_BACK), [("RuntimeRolledBack", "quay-io")], id="one-event-per-failure"),
])
def test_failure_events_are_planned_only_for_a_change(before: tuple[nodeevents.ApplyFailure, ...],
                                                      after: tuple[nodeevents.ApplyFailure, ...],
                                                      expected: list[tuple[str, str]]) -> None:
    events = nodeevents.plan_failure_events(before, after)
    assert [(e.reason, e.subject) for e in events] == expected
    assert all(e.type == "Warning" for e in events)


def test_mirrors_out_and_back_are_one_event_each() -> None:
    events = nodeevents.plan_mirror_events({"https://a", "https://b"}, {"https://b", "https://c"})
    assert [(e.reason, e.type, e.subject) for e in events] == [("MirrorOut", "Warning", "https://c"),
                                                              ("MirrorBack", "Normal", "https://a")]
    assert nodeevents.plan_mirror_events({"https://b"}, {"https://b"}) == []


def test_the_event_points_at_the_node_as_the_kubelet_does() -> None:
    (event,) = nodeevents.plan_failure_events((), (ROLLED_BACK,))
    body = nodeevents.render_event(event, NODE, UID, NOW)
    assert body["metadata"] == {"name": f"{NODE}.{int(NOW.timestamp() * 1e9):x}", "namespace": "default"}
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": UID}
    assert body["source"] == {"component": "regmirror-agent", "host": NODE}
    assert (body["reportingComponent"], body["reportingInstance"]) == ("regmirror-agent", NODE)
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-12-02T22:00:00Z" and body["count"] == 1
    assert body["reason"] == "RuntimeRolledBack" and "quay-io" in body["message"]
    long = nodeevents.render_event(nodeevents.NodeEvent("R", "Warning", "s", "x" * 5000), NODE, UID, NOW)
    assert len(long["message"]) == nodeevents.MESSAGE_LIMIT


def test_an_identical_event_is_posted_once_within_the_dedupe_window() -> None:
    api, clock = Api(), [0.0]
    post = poster(api, clock, dedupe_seconds=600)
    events = nodeevents.plan_failure_events((), (REFUSED,))
    assert post.post(events, UID) == 1
    clock[0] = 599.0
    assert post.post(events, UID) == 0
    clock[0] = 601.0
    assert post.post(events, UID) == 1
    assert [path for path, _ in api.posted] == ["/api/v1/namespaces/default/events"] * 2


def test_no_more_than_burst_events_a_minute() -> None:
    api, clock = Api(), [0.0]
    post = poster(api, clock, burst=3)
    urls = [f"https://m{i}.example" for i in range(5)]
    assert post.post(nodeevents.plan_mirror_events((), urls), UID) == 3
    clock[0] = 61.0
    assert post.post(nodeevents.plan_mirror_events(urls, ()), UID) == 3


def test_a_refused_post_is_only_logged_and_not_taken_for_posted(caplog: pytest.LogCaptureFixture) -> None:
    api, clock = Api(fail=1), [0.0]
    post = poster(api, clock)
    events = nodeevents.plan_failure_events((), (ROLLED_BACK,))
    assert post.post(events, UID) == 0
    assert "could not post event RuntimeRolledBack on node worker-a" in caplog.text
    assert post.post(events, UID) == 1


def test_no_event_before_the_node_is_known() -> None:
    api = Api()
    assert poster(api, [0.0]).post(nodeevents.plan_mirror_events((), ("https://a",)), "") == 0
    assert api.posted == []


def _mirror(name: str) -> models.RegistryMirror:
    return models.parse_spec(name, {"registry": f"{name}.example.com", "mirrors": ["https://m.example.com"]}, 1)


def test_the_tracker_posts_a_failure_the_node_keeps_once_and_again_only_after_the_window() -> None:
    api, clock = Api(), [0.0]
    tracker = nodeevents.Tracker(poster(api, clock, dedupe_seconds=600))
    broken = [True]

    def apply(mirrors: Any) -> str:
        if broken[0]:
            raise EngineError("containerd did not come back healthy after the change", rolled_back=True)
        return "ok"

    apply_observed = tracker.observing(apply)
    mirrors = [_mirror("quay-io")]

    def reconcile() -> None:
        with contextlib.suppress(Refused):
            apply_observed(mirrors)
        tracker.reconciled(UID)

    for _ in range(3):  # resyncs while it keeps failing
        reconcile()
    assert [b["reason"] for _, b in api.posted] == ["RuntimeRolledBack"]
    broken[0] = False
    reconcile()
    broken[0] = True
    clock[0] = 300.0
    reconcile()  # the same failure again, within the window
    assert len(api.posted) == 1
    broken[0] = False
    reconcile()
    broken[0] = True
    clock[0] = 700.0
    reconcile()
    assert len(api.posted) == 2
    tracker.reconciled(UID)  # a reconcile that applied nothing changes nothing
    reconcile()
    assert len(api.posted) == 2


def test_the_tracker_sees_every_try_of_a_reconcile() -> None:
    """One RegistryMirror's file is the culprit: the others are applied without it, and it stays failing."""
    api = Api()
    tracker = nodeevents.Tracker(poster(api, [0.0]))

    def apply(mirrors: Any) -> str:
        if any(m.name == "quay-io" for m in mirrors):
            raise EngineError("cannot write certs.d/quay.io/hosts.toml", path="/etc/containerd/certs.d/quay.io/x")
        return "ok"

    apply_observed = tracker.observing(apply)
    for _ in range(2):
        with pytest.raises(Refused):
            apply_observed([_mirror("docker-io"), _mirror("quay-io")])
        assert apply_observed([_mirror("docker-io")]) == "ok"
        tracker.reconciled(UID)
    ((_, body),) = api.posted
    assert body["reason"] == "MirrorApplyFailed" and "docker-io, quay-io" in body["message"]
