"""The kopf entry point: ``kopf run --standalone --all-namespaces -m regmirror_operator.main``.

The handlers are thin. One ``@kopf.on.event`` watcher (RegistryMirrors) and two informers (Nodes, metadata
only, and the nodes' RegistryMirrorNode reports; see ``informing`` for why those are not kopf's) feed an
in-memory cache and wake one background loop (``reconciling``), which plans everything at once (``planning``,
pure) and writes what differs (``publishing``).

**Why deleting a RegistryMirror never hangs, not even a GitOps prune with the operator down.** The operator
registers no ``on.create``/``on.update``/``on.delete``/``on.resume`` handlers, no daemons and no timers: those
are what make kopf put its finalizer on an object (and ``on.event`` handlers never do), and kopf's
"last-handled-configuration" annotation is only written for them, too. So a RegistryMirror carries no
finalizer, and ``kubectl delete`` or a prune removes it at once, whether or not the operator runs. The
configuration is removed afterwards, level-triggered: the operator hears the DELETED event (or, after a
restart or a broken watch, simply no longer finds the object when it lists), publishes a desired state
without it, and every agent removes that registry's configuration from its node. Nothing waits for nodes
either: a node that is down catches up from the ConfigMap when it returns.

Events about RegistryMirrors are posted by ``publishing`` rather than ``kopf.event``: kopf's event queue is
only reachable from inside a resource handler (its context variables are set per object), not from the
background loop that decides what is worth an Event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import kopf

from regmirror_api import models
from regmirror_operator import publishing, reconciling, rewriting, telemetry, webhooking


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    # kopf posts Events for log records only when asked to; keep its own ones to warnings and worse.
    settings.posting.level = logging.WARNING
    # Ask the apiserver to end each watch after 5 minutes and give up on a silent one a little later, so a
    # watch connection that died without a word (a NAT or load balancer dropping it) is replaced.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # kopf logs "Handler succeeded" for every watch event; at 1,000 Nodes that is a line per heartbeat.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics_port = telemetry.port_from_environment()  # a bad value stops the start, before any API call
    rollout = reconciling.settings_from_environment()  # so does a bad REGMIRROR_MAX_UNAVAILABLE, and the like
    publisher = await asyncio.to_thread(publishing.Publisher.from_environment)
    reconciler = reconciling.Reconciler(publisher, settings=rollout)
    memo.reconciler = reconciler
    memo.metrics_server = None
    if metrics_port:
        memo.metrics_server = telemetry.serve(reconciler.metrics.registry,
                                              os.environ.get("REGMIRROR_METRICS_ADDRESS", "0.0.0.0"), metrics_port)
    memo.loop_task = asyncio.create_task(reconciler.run(), name="regmirror reconciler")
    memo.informers = reconciler.informers()
    for informer in memo.informers:
        informer.start()
    logger.info("regmirror operator started")


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for informer in memo.informers:
        informer.stop.set()
    task: asyncio.Task[None] = memo.loop_task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    memo.reconciler.publisher.close()
    if memo.metrics_server is not None:
        await asyncio.to_thread(memo.metrics_server.shutdown)


@kopf.on.event(models.API_GROUP, models.API_VERSION, models.PLURAL)
async def registrymirror_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.observe_mirror(body, deleted=type == "DELETED")


@kopf.on.probe(id="reconciler")
async def reconciler_alive(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """For the liveness endpoint: fail if the loop has ended, which only a bug could cause."""
    task: asyncio.Task[None] = memo.loop_task
    if task.done():
        # Permanent: a temporary error would make kopf retry the probe instead of answering 500.
        raise kopf.PermanentError("the reconcile loop has stopped")
    reconciler: reconciling.Reconciler = memo.reconciler
    return {"passes": reconciler.passes, "failuresInARow": reconciler.failures}


# --- image rewrite: a mutating webhook on Pods, only with REGMIRROR_WEBHOOK=on (webhooking, rewriting) ----------
# Registered only when on: kopf refuses to start with admission handlers and no server. Every handler returns
# normally whatever happens (kopf turns an exception into a refusal, and this webhook must never be the reason a
# Pod cannot start); the install's configuration also says failurePolicy Ignore and a short timeout.
WEBHOOK = webhooking.Settings.from_environment()

if WEBHOOK.enabled:
    @kopf.on.startup()
    async def start_webhook(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        cert, key, ca_bundle = await asyncio.to_thread(webhooking.write_certificate, WEBHOOK)
        settings.admission.server = kopf.WebhookServer(addr=WEBHOOK.address, port=WEBHOOK.port,
                                                       certfile=str(cert), pkeyfile=str(key))
        memo.rule_book = rewriting.RuleBook()
        memo.webhook_task = asyncio.create_task(
            webhooking.keep_configured(memo.reconciler.publisher, WEBHOOK, ca_bundle), name="regmirror webhook")

    @kopf.on.cleanup()
    async def stop_webhook(memo: kopf.Memo, **_: Any) -> None:
        memo.webhook_task.cancel()

    def _mutate(patch: kopf.Patch, memo: kopf.Memo, plan: Any, *args: Any) -> None:
        try:
            ops = plan(*args, memo.rule_book.rules_for(memo.reconciler.published))
        except Exception:  # a bug here must cost a rewrite, never a Pod
            logging.getLogger("regmirror.operator").exception("image rewrite failed; the Pod is left as it is")
            return
        if ops:
            patch.fns.append(lambda raw: rewriting.apply_patch(raw, ops))

    @kopf.on.mutate("v1", "pods", id="rewrite-images", operations=["CREATE"], ignore_failures=True)
    async def rewrite_images(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        _mutate(patch, memo, rewriting.plan_pod, dict(body))

    @kopf.on.mutate("v1", "pods", id="rewrite-ephemeral-images", subresource="ephemeralcontainers",
                    operations=["UPDATE"], ignore_failures=True)
    async def rewrite_ephemeral_images(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
        old = kwargs.get("old")
        _mutate(patch, memo, rewriting.plan_ephemeral, dict(body), dict(old) if old is not None else None)
