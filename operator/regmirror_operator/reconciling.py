"""The one reconcile loop: whenever something changed (and at least every ``resync`` seconds), plan everything
from the cache and write what differs.

Watch events only update the cache and set a flag; the loop waits ``debounce`` seconds after a wake-up to take
a burst of agent reports in one pass, then plans the whole cluster at once (pure and fast: a pass over 1,000
nodes takes milliseconds) and writes the ConfigMap and the status patches that differ. Each resync also lists
RegistryMirrors and Nodes, which catches deletions a restarted watch never reports, and re-reads the ConfigMap.

Nothing is published before the first complete listing of both kinds: a document rendered from a cache that
has not seen every RegistryMirror yet would tell every agent to remove the mirrors it misses.

Errors never end the loop: API failures and bugs alike are logged and retried with backoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from regmirror_api import contract
from regmirror_operator import caches, planning, publishing

log = logging.getLogger("regmirror.operator")


@dataclasses.dataclass(frozen=True)
class Settings:
    debounce: float = 0.3
    """Seconds to wait after a change before planning, so a burst of reports costs one pass."""
    resync: float = 60.0
    """Seconds between full passes that also list both kinds and re-read the ConfigMap."""
    backoff: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    """Seconds before retrying after a failed pass: the n-th failure in a row waits the n-th value."""
    event_memory: float = 30.0
    """Seconds during which the same event about the same object is not posted again."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, publisher: publishing.Publisher, *, settings: Settings = Settings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        self.cache = caches.Cache()
        self.changed = asyncio.Event()
        #: The desired.json text the ConfigMap is known to hold (None: unknown, read it before writing).
        self.published: str | None = None
        self.failures = 0
        self.passes = 0
        self.last_success: float | None = None
        self._posted: dict[tuple[str, str, str, str], float] = {}

    # --- fed by the watch handlers ------------------------------------------------------------------------

    def observe_mirror(self, body: Mapping[str, Any], *, deleted: bool) -> None:
        if self.cache.observe_mirror(body, deleted=deleted, at=self.clock()):
            self.changed.set()

    def observe_node(self, body: Mapping[str, Any], *, deleted: bool) -> None:
        if self.cache.observe_node(body, deleted=deleted, at=self.clock()):
            self.changed.set()

    # --- the loop --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        next_resync = self.clock()
        retry_at: float | None = None
        while True:
            due = min(next_resync, retry_at) if retry_at is not None else next_resync
            if not self.changed.is_set() and due > self.clock():
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=due - self.clock())
                except TimeoutError:
                    pass
            if self.changed.is_set():
                await asyncio.sleep(self.settings.debounce)
            self.changed.clear()
            resync = self.clock() >= next_resync or not self.cache.complete
            try:
                if resync:
                    await self.resync()
                    next_resync = self.clock() + self.settings.resync
                await self.reconcile(reread=resync)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failure, bugs included
                delay = self.settings.backoff[min(self.failures, len(self.settings.backoff) - 1)]
                self.failures += 1
                retry_at = self.clock() + delay
                log.error("reconcile failed (%d in a row), retrying in %.1f s: %s", self.failures, delay, exc,
                          exc_info=not isinstance(exc, (publishing.ApiError, OSError)))
            else:
                if self.failures:
                    log.info("reconcile succeeded again after %d failures", self.failures)
                self.failures = 0
                retry_at = None
                self.last_success = self.clock()

    async def resync(self) -> None:
        started = self.clock()
        mirrors = await asyncio.to_thread(self.publisher.list_mirrors)
        nodes = await asyncio.to_thread(self.publisher.list_nodes)
        first = not self.cache.complete
        self.cache.merge_listings(mirrors, nodes, started_at=started)
        if first:
            log.info("listed %d RegistryMirrors and %d Nodes", len(mirrors), len(nodes))

    async def reconcile(self, *, reread: bool = False) -> None:
        """One pass: plan from the cache, then write the ConfigMap and the status patches that differ."""
        if not self.cache.complete:
            return
        mirrors = self.cache.mirrors.items()
        plan = planning.plan(mirrors, self.cache.nodes.items(), now=utc_now())
        self.passes += 1
        problems: list[Exception] = []

        if reread or plan.desired != self.published:
            try:
                if await asyncio.to_thread(self.publisher.publish_desired, plan.desired):
                    log.info("published %s/%s: %s", contract.NAMESPACE, contract.CONFIGMAP,
                             ", ".join(plan.published) or "no mirrors")
                self.published = plan.desired
            except publishing.ApiError as exc:
                self.published = None
                if exc.status == 404:
                    log.error("ConfigMap %s/%s does not exist; the operator never creates it: re-apply the "
                              "install manifests (kubectl apply --server-side -k manifests/)",
                              contract.NAMESPACE, contract.CONFIGMAP)
                problems.append(exc)

        notices: dict[str, list[planning.Notice]] = {}
        for notice in plan.notices:
            notices.setdefault(notice.name, []).append(notice)
        for name, patch in plan.patches.items():
            try:
                result = await asyncio.to_thread(self.publisher.patch_status, name, patch)
            except publishing.ApiError as exc:
                if exc.status != 404:  # 404: deleted meanwhile; its DELETED event is on its way
                    problems.append(exc)
                continue
            self.cache.record_mirror(result, planned_from=mirrors[name], at=self.clock())
            log.info("status of %s: %s", name, plan.statuses[name]["message"])
            for notice in notices.get(name, []):
                await self.post(notice)
        if problems:
            raise problems[0]

    async def post(self, notice: planning.Notice) -> None:
        """Post an Event unless the very same one was posted a moment ago; failures are only logged."""
        now = self.clock()
        self._posted = {k: t for k, t in self._posted.items() if now - t < self.settings.event_memory}
        key = (notice.uid, notice.type, notice.reason, notice.message)
        if key in self._posted:
            return
        self._posted[key] = now
        try:
            await asyncio.to_thread(self.publisher.post_event, name=notice.name, uid=notice.uid,
                                    type=notice.type, reason=notice.reason, message=notice.message)
        except Exception as exc:  # events are helpful, never essential
            log.warning("could not post event %s %s for %s: %s", notice.type, notice.reason, notice.name, exc)
