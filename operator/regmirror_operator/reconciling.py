"""The one reconcile loop: whenever something changed (and at least every ``resync`` seconds), plan everything
from the cache and write what differs.

Watch events only update the cache and set a flag; the loop waits ``debounce`` seconds after a wake-up to take
a burst of agent reports in one pass, then plans the whole cluster at once (pure and fast: a pass over 1,000
nodes takes milliseconds) and writes the ConfigMap and the status patches that differ. Status writes draw from
a token bucket (``status_writes_per_second``, ``status_burst``): however many nodes report at once, the
RegistryMirrors' statuses are written at a bounded rate, and a patch that finds no token waits for the next
pass, planned afresh. Each resync lists RegistryMirrors (a number that does not grow with the cluster), which
catches deletions a restarted kopf watch never reports, and re-reads the ConfigMap; Nodes and
RegistryMirrorNodes come from informers (``informing``), which need no periodic listing.

Nothing is published before the first complete listing of every kind: a document rendered from a cache that
has not seen every RegistryMirror yet would tell every agent to remove the mirrors it misses.

Errors never end the loop: API failures and bugs alike are logged and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from regmirror_api import contract
from regmirror_operator import caches, informing, planning, publishing, slots, telemetry

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
    status_writes_per_second: float = 5.0
    """The rate at which RegistryMirror statuses (and deletions of departed nodes' reports) are written."""
    status_burst: int = 10
    """Writes allowed at once after a quiet spell."""
    max_unavailable: slots.Budget = dataclasses.field(default_factory=slots.Budget)
    """How many nodes may restart containerd for regmirror at once (``REGMIRROR_MAX_UNAVAILABLE``)."""
    restart_attempts: int = contract.DEFAULT_RESTART_ATTEMPTS
    """Tries of a change containerd does not survive, per node, before Stalled (``REGMIRROR_RESTART_ATTEMPTS``)."""
    slot_seconds: float = slots.DEFAULT_SLOT_SECONDS
    """How long a node may hold a restart slot before it is taken back (``REGMIRROR_RESTART_SLOT_SECONDS``)."""


def settings_from_environment(environ: Mapping[str, str] = os.environ) -> Settings:
    """The rollout settings from the operator's environment; a bad value is refused with a ValueError that
    names it, before the operator makes any API call."""
    budget = slots.parse_budget(environ.get("REGMIRROR_MAX_UNAVAILABLE") or "1")
    attempts_text = environ.get("REGMIRROR_RESTART_ATTEMPTS") or str(contract.DEFAULT_RESTART_ATTEMPTS)
    seconds_text = environ.get("REGMIRROR_RESTART_SLOT_SECONDS") or str(slots.DEFAULT_SLOT_SECONDS)
    if not attempts_text.isdigit() or int(attempts_text) < 1:
        raise ValueError(f"REGMIRROR_RESTART_ATTEMPTS={attempts_text!r}: expected a whole number of at least 1")
    try:
        seconds = float(seconds_text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"REGMIRROR_RESTART_SLOT_SECONDS={seconds_text!r}: expected a number of seconds above 0")
    return Settings(max_unavailable=budget, restart_attempts=int(attempts_text), slot_seconds=seconds)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; pure but for the clock it is given."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate)


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
        self.bucket = TokenBucket(settings.status_writes_per_second, settings.status_burst, clock)
        #: When the next pass must run to write what the bucket held back (None: nothing held back).
        self.held_back_until: float | None = None
        #: When the first restart slot held now runs out, so that a dead holder's slot comes back on time.
        self.slot_deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The desired.json text the ConfigMap is known to hold (None: unknown, read it before writing).
        self.published: str | None = None
        self.failures = 0
        self.passes = 0
        self.last_success: float | None = None
        self.metrics = telemetry.OperatorMetrics()
        self._posted: dict[tuple[str, str, str, str], float] = {}

    # --- fed by the watch handlers ------------------------------------------------------------------------

    def observe_mirror(self, body: Mapping[str, Any], *, deleted: bool) -> None:
        if self.cache.observe_mirror(body, deleted=deleted, at=self.clock()):
            self.changed.set()

    # --- fed by the informers, from their threads (the informing.Sink protocol) ------------------------------

    def listed(self, kind: str, objects: Mapping[str, Mapping[str, Any]]) -> None:
        self._call_in_loop(self._merge_listed, kind, objects)

    def event(self, kind: str, name: str, obj: Mapping[str, Any] | None) -> None:
        self._call_in_loop(self._observe, kind, name, obj)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _merge_listed(self, kind: str, objects: Mapping[str, Mapping[str, Any]]) -> None:
        if self.cache.merge_listed(kind, objects, started_at=self.clock()) or self.cache.complete:
            self.changed.set()

    def _observe(self, kind: str, name: str, obj: Mapping[str, Any] | None) -> None:
        if self.cache.observe(kind, name, obj, at=self.clock()):
            self.changed.set()

    def informers(self) -> list[informing.Informer]:
        """The informers that feed this reconciler: Nodes and Secrets of the install's namespace (metadata only) and
        RegistryMirrorNodes. Call it from the
        event loop the reconciler runs in: their threads hand what they hear to it."""
        self._loop = asyncio.get_running_loop()
        return [informing.Informer(self.publisher, caches.NODES, "/api/v1/nodes", self,
                                   list_accept=publishing.METADATA_ONLY, watch_accept=publishing.METADATA_ONLY_WATCH),
                informing.Informer(self.publisher, caches.REPORTS, contract.NODE_REPORTS_PATH, self),
                # Mirror credentials: only each Secret's resourceVersion, which goes into desired.json so that a
                # rotated Secret reaches every agent through the one document they watch (metadata only: the
                # operator never reads a password).
                informing.Informer(self.publisher, caches.SECRETS, contract.SECRETS_PATH, self,
                                   list_accept=publishing.METADATA_ONLY, watch_accept=publishing.METADATA_ONLY_WATCH)]

    # --- the loop --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        next_resync = self.clock()
        retry_at: float | None = None
        while True:
            if retry_at is not None:
                # After a failure, wait out the backoff whatever happens meanwhile, then try again: a stream of
                # events while the apiserver fails must not turn the retries into a busy loop.
                await asyncio.sleep(max(0.0, retry_at - self.clock()))
            else:
                due = min(d for d in (next_resync, self.held_back_until, self.slot_deadline) if d is not None)
                if not self.changed.is_set() and due > self.clock():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), timeout=due - self.clock())
            if self.changed.is_set():
                await asyncio.sleep(self.settings.debounce)
            self.changed.clear()
            resync = self.clock() >= next_resync or not self.cache.complete
            started = time.perf_counter()
            try:
                if resync:
                    await self.resync()
                    next_resync = self.clock() + self.settings.resync
                await self.reconcile(reread=resync)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failure, bugs included
                self._count_pass(started, telemetry.FAILURE)
                delay = self.settings.backoff[min(self.failures, len(self.settings.backoff) - 1)]
                self.failures += 1
                retry_at = self.clock() + delay
                log.error("reconcile failed (%d in a row), retrying in %.1f s: %s", self.failures, delay, exc,
                          exc_info=not isinstance(exc, (publishing.ApiError, OSError)))
            else:
                self._count_pass(started, telemetry.SUCCESS)
                if self.failures:
                    log.info("reconcile succeeded again after %d failures", self.failures)
                self.failures = 0
                retry_at = None
                self.last_success = self.clock()

    def _count_pass(self, started: float, result: str) -> None:
        self.metrics.pass_duration.observe(time.perf_counter() - started)
        self.metrics.passes.inc(result)

    async def resync(self) -> None:
        started = self.clock()
        mirrors = await asyncio.to_thread(self.publisher.list_mirrors)
        self.cache.merge_mirrors(mirrors, started_at=started)
        if self.published is None:  # what the nodes run now: kept if a change would not fit (planning)
            self.published = await asyncio.to_thread(self.publisher.read_desired)

    async def reconcile(self, *, reread: bool = False) -> None:
        """One pass: plan from the cache, then write the ConfigMap and the status patches that differ."""
        if not self.cache.complete:
            return
        mirrors = self.cache.mirrors.items()
        if not self.passes:
            log.info("listed %d RegistryMirrors, %d Nodes and %d RegistryMirrorNodes", len(mirrors),
                     len(self.cache.nodes.items()), len(self.cache.reports.items()))
        plan = planning.plan(mirrors, self.cache.nodes.items(), self.cache.reports.items(), now=utc_now(),
                             published=self.published, restart_attempts=self.settings.restart_attempts,
                             secrets=self.cache.secrets.items())
        self.held_back_until = None
        self.passes += 1
        self.metrics.record_statuses(plan.statuses)
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
            if not self.bucket.take():
                self.held_back_until = self.clock() + self.bucket.wait_time()
                break
            try:
                result = await asyncio.to_thread(self.publisher.patch_status, name, patch)
            except publishing.ApiError as exc:
                if exc.status != 404:  # 404: deleted meanwhile; its DELETED event is on its way
                    problems.append(exc)
                continue
            self.metrics.status_writes.inc()
            self.cache.record_mirror(result, planned_from=mirrors[name], at=self.clock())
            log.info("status of %s: %s", name, plan.statuses[name]["message"])
            for notice in notices.get(name, []):
                await self.post(notice)
        await self.hand_out_slots(problems)
        for name, uid in plan.prunes:
            if not self.bucket.take():
                self.held_back_until = self.clock() + self.bucket.wait_time()
                break
            try:
                await asyncio.to_thread(self.publisher.delete_node_report, name, uid)
                log.info("deleted the report of node %s, which is gone", name)
            except publishing.ApiError as exc:
                problems.append(exc)
        if problems:
            raise problems[0]

    async def hand_out_slots(self, problems: list[Exception]) -> None:
        """Give restart slots to waiting nodes and take back those that are done (``slots``); each is one
        patch of one Node, and nothing at all when no node waits."""
        now = datetime.datetime.now(datetime.UTC)
        plan = slots.plan_slots(self.cache.nodes.items(), self.cache.slots.items(), self.cache.reports.items(),
                                budget=self.settings.max_unavailable, now=now, ttl=self.settings.slot_seconds)
        self.slot_deadline = None if plan.next_expiry is None else (
            self.clock() + max(0.0, (plan.next_expiry - now).total_seconds()) + 1.0)
        for node, value in plan.writes.items():
            try:
                await asyncio.to_thread(self.publisher.set_restart_slot, node, value)
            except publishing.ApiError as exc:
                problems.append(exc)
                continue
            if value is None:
                log.info("node %s is done: its restart slot is free again", node)
            elif value.endswith(contract.SLOT_EXPIRED):
                log.warning("node %s held its restart slot past its deadline (its agent died?): taken back", node)
            else:
                log.info("node %s may restart containerd now (restart slots: %s held of %s; %d waiting, %d held "
                         "back by a halted rollout)", node, len(plan.holders), self.settings.max_unavailable,
                         len(plan.waiting), len(plan.blocked))
            # What the Node's annotation will say once its watch event arrives, so the next pass (which may
            # come before it) neither grants twice nor exceeds the budget.
            self.cache.slots.observe(node, value, at=self.clock())

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
