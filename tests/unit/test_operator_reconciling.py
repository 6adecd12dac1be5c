"""The reconcile loop with a fake API: it waits for a full listing, never creates the ConfigMap, survives errors,
and writes statuses at a bounded rate."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from regmirror_api import contract
from regmirror_operator import caches, publishing, reconciling

FAST = reconciling.Settings(debounce=0.01, resync=3600, backoff=(0.05,), event_memory=30)


def rm(name: str, registry: str = "quay.io") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"registry": registry, "mirrors": [{"url": "https://m.example.com"}]}}


class FakeApi:
    def __init__(self, mirrors: list[dict[str, Any]], nodes: list[str]) -> None:
        self.mirrors = {m["metadata"]["name"]: m for m in mirrors}
        self.nodes = nodes
        self.configmap: dict[str, Any] | None = {"metadata": {"name": contract.CONFIGMAP}}
        self.calls: list[str] = []
        self.fail_lists = 0
        self.events: list[dict[str, Any]] = []

    def list_mirrors(self) -> list[dict[str, Any]]:
        self.calls.append("list_mirrors")
        if self.fail_lists:
            self.fail_lists -= 1
            raise publishing.ApiError(503, "GET", "/apis", "unavailable")
        return list(self.mirrors.values())

    def informers_listed(self, reconciler: reconciling.Reconciler) -> None:
        """What the Node, RegistryMirrorNode and Secret informers deliver first: complete listings."""
        self.calls.append("informers listed")
        reconciler.listed(caches.NODES, {n: {"metadata": {"name": n, "labels": {}}} for n in self.nodes})
        reconciler.listed(caches.REPORTS, {})
        reconciler.listed(caches.SECRETS, {})

    def read_desired(self) -> str | None:
        self.calls.append("read_desired")
        return ((self.configmap or {}).get("data") or {}).get(contract.CONFIGMAP_KEY)

    def publish_desired(self, text: str) -> bool:
        self.calls.append("publish_desired")
        if self.configmap is None:
            raise publishing.ApiError(404, "GET", "/api/v1/.../configmaps/regmirror-desired", "not found")
        if (self.configmap.get("data") or {}).get(contract.CONFIGMAP_KEY) == text:
            return False
        self.configmap["data"] = {contract.CONFIGMAP_KEY: text}
        return True

    def patch_status(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"patch_status {name}")
        body = self.mirrors[name]
        body["status"] = {**body.get("status", {}), **{k: v for k, v in patch["status"].items()
                                                      if k != "nodeReports"}}
        return json.loads(json.dumps(body))

    def post_event(self, **event: Any) -> None:
        self.events.append(event)

    def published(self) -> list[str]:
        text = (self.configmap or {}).get("data", {}).get(contract.CONFIGMAP_KEY)
        return [e.name for e in contract.parse_desired(text).entries] if text else []


async def run_until(reconciler: reconciling.Reconciler, done: Any, timeout: float = 5.0) -> None:
    task = asyncio.create_task(reconciler.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_nothing_is_published_before_every_kind_was_listed() -> None:
    api = FakeApi([rm("quay-io"), rm("docker-io", "docker.io")], ["n1"])
    api.fail_lists = 2
    reconciler = reconciling.Reconciler(api, settings=FAST)  # type: ignore[arg-type]
    # A watch event alone must not publish a document that lacks docker-io.
    reconciler.observe_mirror(rm("quay-io"), deleted=False)

    async def scenario() -> None:
        task = asyncio.create_task(reconciler.run())
        try:
            while api.calls.count("list_mirrors") < 3:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert "publish_desired" not in api.calls  # RegistryMirrors listed, Nodes and reports not yet
            api.informers_listed(reconciler)
            while not api.published():
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert [c for c in api.calls if c != "read_desired"][:5] == [
        "list_mirrors", "list_mirrors", "list_mirrors", "informers listed", "publish_desired"]
    assert api.published() == ["docker-io", "quay-io"]
    assert reconciler.failures == 0


def test_a_missing_configmap_is_never_created_and_statuses_still_tell_the_truth() -> None:
    api = FakeApi([rm("quay-io")], ["n1"])
    api.configmap = None
    reconciler = reconciling.Reconciler(api, settings=FAST)  # type: ignore[arg-type]
    api.informers_listed(reconciler)

    async def scenario() -> None:
        task = asyncio.create_task(reconciler.run())
        try:
            while api.calls.count("publish_desired") < 3:
                await asyncio.sleep(0.01)
            assert api.configmap is None
            assert api.mirrors["quay-io"]["status"]["ready"] == "0/1"
            assert reconciler.failures >= 2
            api.configmap = {"metadata": {}}  # someone re-applied the install
            while api.published() != ["quay-io"]:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_deletion_is_published_and_writes_happen_only_on_change() -> None:
    api = FakeApi([rm("quay-io"), rm("docker-io", "docker.io")], ["n1"])
    reconciler = reconciling.Reconciler(api, settings=FAST)  # type: ignore[arg-type]
    api.informers_listed(reconciler)

    async def scenario() -> None:
        task = asyncio.create_task(reconciler.run())
        try:
            while len(api.published()) < 2 or not all("status" in m for m in api.mirrors.values()):
                await asyncio.sleep(0.01)
            for body in api.mirrors.values():  # the watch echoes the operator's own status writes
                reconciler.observe_mirror(body, deleted=False)
            await asyncio.sleep(0.1)
            writes = [c for c in api.calls if c.startswith("patch_status")]
            assert writes == ["patch_status docker-io", "patch_status quay-io"]
            gone = api.mirrors.pop("docker-io")
            reconciler.observe_mirror(gone, deleted=True)
            while api.published() != ["quay-io"]:
                await asyncio.sleep(0.01)
            assert [c for c in api.calls if c.startswith("patch_status")] == writes
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_the_token_bucket_allows_a_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = reconciling.TokenBucket(5.0, 3, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == pytest.approx(0.2)
    now[0] = 0.2
    assert bucket.take() and not bucket.take()
    now[0] = 100.0
    assert sum(bucket.take() for _ in range(10)) == 3  # never more saved up than the burst


def test_statuses_are_written_at_a_bounded_rate_however_many_change_at_once() -> None:
    api = FakeApi([rm(f"m{i:02d}", f"r{i}.example.com") for i in range(12)], ["n1"])
    settings = reconciling.Settings(debounce=0.01, resync=3600, backoff=(0.05,), status_writes_per_second=20.0,
                                    status_burst=2)
    reconciler = reconciling.Reconciler(api, settings=settings)  # type: ignore[arg-type]
    api.informers_listed(reconciler)
    started = [0.0]
    times: list[float] = []
    original = api.patch_status

    def timed(name: str, patch: dict[str, Any]) -> dict[str, Any]:
        times.append(time.monotonic() - started[0])
        return original(name, patch)

    api.patch_status = timed  # type: ignore[method-assign]

    async def scenario() -> None:
        started[0] = time.monotonic()
        await run_until(reconciler, lambda: len(times) == 12)

    asyncio.run(scenario())
    # Two at once, then one every 50 ms: the twelfth no sooner than half a second in.
    assert times[-1] >= 0.45, times
    assert all("status" in m for m in api.mirrors.values())


def test_failures_are_retried_after_the_backoff_not_in_a_busy_loop() -> None:
    api = FakeApi([rm("quay-io")], ["n1"])
    api.fail_lists = 10_000
    settings = reconciling.Settings(debounce=0.01, resync=0.0, backoff=(0.1,), event_memory=30)
    reconciler = reconciling.Reconciler(api, settings=settings)  # type: ignore[arg-type]
    api.informers_listed(reconciler)

    async def scenario() -> None:
        task = asyncio.create_task(reconciler.run())
        for _ in range(50):  # events keep coming while the apiserver fails
            reconciler.observe_mirror(rm("quay-io"), deleted=False)
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert 3 <= api.calls.count("list_mirrors") <= 7, api.calls.count("list_mirrors")
