"""The operator's cache: watch events and lists merge by "what was heard last wins"."""

from __future__ import annotations

from typing import Any

from regmirror_operator import caches


def rm(name: str, generation: int = 1, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "generation": generation, "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"registry": "quay.io", "mirrors": [{"url": "https://m.example.com"}]}, "status": status}


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "status": {"conditions": []}}


def test_a_listing_removes_what_was_deleted_while_nobody_watched() -> None:
    cache = caches.Cache()
    cache.observe_mirror(rm("kept"), deleted=False, at=1)
    cache.observe_mirror(rm("gone"), deleted=False, at=2)
    assert cache.merge_mirrors([rm("kept")], started_at=10)
    assert sorted(cache.mirrors.items()) == ["kept"]


def test_an_object_created_while_the_list_was_in_flight_is_kept() -> None:
    cache = caches.Cache()
    cache.observe_mirror(rm("new"), deleted=False, at=11)
    assert not cache.merge_mirrors([], started_at=10)
    assert list(cache.mirrors.items()) == ["new"]


def test_a_deletion_heard_after_the_list_began_is_not_undone_by_it() -> None:
    cache = caches.Cache()
    cache.merge_mirrors([rm("x")], started_at=1)
    cache.observe_mirror(rm("x"), deleted=True, at=11)
    cache.merge_mirrors([rm("x")], started_at=10)
    assert cache.mirrors.items() == {}
    cache.merge_mirrors([], started_at=20)  # the tombstone is gone with the next listing
    assert cache.mirrors._rows == {}


def test_a_listing_newer_than_the_last_event_replaces_it() -> None:
    cache = caches.Cache()
    cache.observe_mirror(rm("x", generation=1), deleted=False, at=1)
    assert cache.merge_mirrors([rm("x", generation=2)], started_at=10)
    assert cache.mirrors.get("x")["metadata"]["generation"] == 2


def test_only_what_planning_reads_is_kept_so_a_heartbeat_wakes_nobody() -> None:
    cache = caches.Cache()
    assert cache.observe(caches.NODES, "n1", node("n1", pool="a"), at=1)
    beat = node("n1", pool="a")
    beat["status"]["conditions"] = [{"type": "Ready", "lastHeartbeatTime": "now"}]
    beat["metadata"]["resourceVersion"] = "99"
    assert not cache.observe(caches.NODES, "n1", beat, at=2)
    assert cache.observe(caches.NODES, "n1", node("n1", pool="b"), at=3)
    assert cache.mirrors.items() == {}
    assert cache.observe_mirror(rm("x"), deleted=False, at=1)
    other_version = rm("x")
    other_version["metadata"]["resourceVersion"] = "8"
    assert not cache.observe_mirror(other_version, deleted=False, at=2)
    assert cache.mirrors.get("x") == {"metadata": {"name": "x", "uid": "uid-x", "generation": 1},
                                      "spec": rm("x")["spec"], "status": {}}


def test_the_cache_is_complete_only_after_every_kind_was_listed() -> None:
    cache = caches.Cache()
    cache.observe(caches.NODES, "n1", node("n1"), at=1)
    assert not cache.complete
    cache.merge_listed(caches.NODES, {"n1": node("n1")}, started_at=2)
    cache.merge_mirrors([], started_at=2)
    assert not cache.complete  # the nodes' reports are not known yet: every node would count as pending
    cache.merge_listed(caches.REPORTS, {}, started_at=3)
    assert not cache.complete  # nor the Secrets' versions: mirror credentials would be published without one
    cache.merge_listed(caches.SECRETS, {}, started_at=3)
    assert cache.complete and cache.nodes.items() == {"n1": {}}


def test_an_informer_listing_is_a_complete_snapshot_of_reports() -> None:
    cache = caches.Cache()
    report = {"metadata": {"name": "n1", "uid": "u1", "resourceVersion": "5"},
              "status": {"time": "2026-01-01T00:00:00Z", "ready": "1/1",
                         "mirrors": [{"name": "x", "generation": 1, "state": "Applied"}]}}
    cache.merge_listed(caches.REPORTS, {"n1": report, "n2": {**report, "metadata": {"name": "n2"}}}, started_at=1)
    assert cache.reports.get("n1") == {"uid": "u1", "time": "2026-01-01T00:00:00Z",
                                       "mirrors": {"x": {"name": "x", "generation": 1, "state": "Applied"}},
                                       "restartRequest": ""}
    assert not cache.observe(caches.REPORTS, "n1", {**report, "metadata": {"name": "n1", "uid": "u1",
                                                                            "resourceVersion": "6"}}, at=2)
    assert cache.merge_listed(caches.REPORTS, {"n1": report}, started_at=3)  # n2 was deleted meanwhile
    assert set(cache.reports.items()) == {"n1"}


def test_a_status_write_is_recorded_unless_a_watch_event_came_first() -> None:
    cache = caches.Cache()
    cache.observe_mirror(rm("x"), deleted=False, at=1)
    planned = cache.mirrors.get("x")
    cache.record_mirror(rm("x", ready="1/1"), planned_from=planned, at=2)
    assert cache.mirrors.get("x")["status"] == {"ready": "1/1"}

    planned = cache.mirrors.get("x")
    cache.observe_mirror(rm("x", ready="2/2"), deleted=False, at=3)
    cache.record_mirror(rm("x", ready="1/2"), planned_from=planned, at=4)
    assert cache.mirrors.get("x")["status"]["ready"] == "2/2"
