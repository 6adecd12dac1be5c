"""The DaemonSet agent: follow the desired state and the node's labels, apply what selects this node, report.

What the agent asks of the apiserver, and nothing more (so 5,000 agents cost the apiserver little, and nothing
at rest but their watches):

- two single-object watches (``watching``): the ConfigMap ``regmirror-system/regmirror-desired`` and its own
  Node, metadata only (labels and uid, not the Node's status), each listed once at start;
- one GET of its own ``RegistryMirrorNode`` at start, and one write of it per change of what the node did
  (``reporting``), never a write when nothing changed;
- one GET of its own whole Node the first time its mirrors are in place, for the taint
  ``regmirror.io/mirrors-pending`` (``taints``), and one JSON patch removing it if it is there. A node without
  the taint, or once it is removed, costs no request for it again.

Every ``probe_seconds`` (jittered) the agent probes the mirrors its node uses, from the node, with no request
to the apiserver (``probing``, ``mirrorhealth``): a mirror that stops answering is left out of the node's
configuration, and put back when it answers again, each change applied and reported like any other. New mirrors
are probed right before their first apply, so a dead one is left out from the start.

Every ``resync`` seconds the agent reconciles again without asking the apiserver anything: that puts back
managed files someone edited by hand (drift). No ConfigMap, or no ``desired.json`` in it: nothing has been
published yet, so the node stays as it is. The apiserver going away changes nothing on the node; the watches
and a failed report retry with jittered exponential backoff.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from regmirror_agent import (
    credentials,
    engine,
    logs,
    mirrorhealth,
    nodeevents,
    probing,
    secretreading,
    taints,
    telemetry,
    verifying,
)
from regmirror_agent.defaults import MODES, RUNTIMES
from regmirror_agent.kubeapi import METADATA_ONLY, METADATA_ONLY_LIST, ApiError, Client, load_config
from regmirror_agent.reporting import Reporter
from regmirror_agent.runtimes import hoststoml
from regmirror_agent.watching import ObjectWatch, retry_delay
from regmirror_api import contract, fingerprints, models
from regmirror_api.errors import RegmirrorError

log = logging.getLogger("regmirror.agent")
CONFIGMAPS = f"/api/v1/namespaces/{contract.NAMESPACE}/configmaps"
NODES = "/api/v1/nodes"
SLOT_SOURCES = ("operator", "none")

#: Applies the RegistryMirrors that select this node; the engine on the host, or a stand-in in benchmarks.
ApplyMirrors = Callable[[Sequence[models.RegistryMirror]], engine.Outcome]
#: Probes mirrors from this node: url -> alive (``probing.probe_all``, or a stand-in in tests).
ProbeMirrors = Callable[[Sequence[models.Mirror], float], Mapping[str, bool]]
#: Which mirrors refuse the credentials they are given (``probing.check_logins``, or a stand-in): url -> why.
CheckLogins = Callable[[Sequence[models.Mirror], float], Mapping[str, str]]
#: Does the node's runtime use these RegistryMirrors' mirrors (``verifying.verify``, or a stand-in)? name -> result.
VerifyMirrors = Callable[[Sequence[models.RegistryMirror], str], Mapping[str, verifying.Verification]]


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    node: str
    engine: engine.Settings
    resync: int = 300
    """Seconds between reconciles without any change (drift repair); costs the apiserver nothing."""
    watch_seconds: int = 3600
    """The server-side timeout asked for each watch (jittered down to half): how often a watch is renewed."""
    read_timeout: float = 3700.0
    """Seconds without a byte after which a watch is given up: only for a server that never ends it (TCP
    keepalive finds a dead connection within about two minutes)."""
    max_backoff: float = 30.0
    probe_seconds: float = 0.0
    """Seconds between probes of the node's mirrors (jittered by 20%); 0 turns probing off. The command sets
    it from ``REGMIRROR_PROBE_SECONDS`` (default 30)."""
    probe_timeout: float = 3.0
    """Seconds a probe waits to connect, then for an answer."""
    probe_rules: mirrorhealth.Rules = dataclasses.field(default_factory=mirrorhealth.Rules)
    metrics_port: int = 0
    """The port of ``GET /metrics``; 0 (the default) serves no metrics. ``REGMIRROR_METRICS_PORT``."""
    metrics_address: str = "0.0.0.0"
    """The address the metrics port is bound to. ``REGMIRROR_METRICS_ADDRESS``."""
    restart_slots: bool = True
    """Restart containerd only in a restart slot the operator grants (the cluster's ``maxUnavailable``).
    ``REGMIRROR_RESTART_SLOTS=none`` restarts at once, for an agent run without the operator."""
    login_check_seconds: float = 3600.0
    """How often a mirror's unchanged, accepted login is checked again (a changed or refused one: every reconcile)."""
    retry_seconds: float = 30.0
    """After a change was rolled back, wait this long times the tries so far before asking to try again."""


class Agent:
    def __init__(self, settings: AgentSettings, client: Client, stop: threading.Event | None = None,
                 apply_mirrors: ApplyMirrors | None = None, probe_mirrors: ProbeMirrors | None = None,
                 clock: Callable[[], float] = time.monotonic, verify_mirrors: VerifyMirrors | None = None) -> None:
        self.settings = settings
        self.client = client
        self.reporter = Reporter(client, settings.node)
        self.stop = stop or threading.Event()
        self._real_engine = apply_mirrors is None
        self.apply_mirrors = apply_mirrors or self._apply_on_node
        self.events = nodeevents.Tracker(nodeevents.Poster(client, settings.node))
        self.apply_mirrors = self.events.observing(self.apply_mirrors)  # Events on the Node for failed applies
        self.probe_mirrors = probe_mirrors or probing.probe_all
        self.verify_mirrors = verify_mirrors or (self._verify_on_node if apply_mirrors is None else None)
        """None: not checked (a stand-in engine in tests and benchmarks has no runtime to ask)."""
        self.secrets = secretreading.SecretReader(client)
        """Mirror credentials: each Secret read once per resourceVersion the operator publishes."""
        self.check_logins: CheckLogins | None = probing.check_logins if self._real_engine else None
        self._logins: dict[str, tuple[str, float, str]] = {}
        """mirror url -> (the login's fingerprint, when it was checked, why it was refused or '')."""
        self.clock = clock
        self.board = mirrorhealth.Board(settings.probe_rules)
        """Which mirrors answer from this node (only the agent's loop thread touches it)."""
        self._left_out: dict[str, frozenset[str]] = {}
        """What the current apply leaves out, per registry (read by ``_apply_on_node``)."""
        self.probes = 0
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self.data: str | None = None
        self.labels: dict[str, str] | None = None
        self.node_uid = ""
        self._seen_configmap = False
        self._applied: dict[str, models.RegistryMirror] = {}
        """What the node runs per RegistryMirror after the last successful apply (kept when a change fails)."""
        self._unsent: tuple[list[contract.Report], str, str] | None = None
        """A report the apiserver did not take yet; a retry sends it again without applying again."""
        self._in_place = False
        """The last reconcile applied a published desired state, and every entry selecting the node is healthy."""
        self._tainted: bool | None = None
        """Does the Node carry the mirrors-pending taint? None: not looked yet. False is final: nobody but a
        node pool's registration puts it there, so the agent never asks again (a restarted agent looks once)."""
        self.instance = secrets.token_hex(4)
        """This agent process: a slot granted to an earlier one (dead with it) is never taken for its own."""
        self.slot = ""
        """The token of the restart slot the operator grants this node (its Node's annotation), '' for none."""
        self._asked: tuple[tuple[str, ...], str] | None = None
        """(the changed generations, the engine's request key) of the last apply that needed a restart."""
        self._tries: tuple[tuple[str, ...], int, str] = ((), 0, "")
        """(changed generations, tries rolled back, the last reason) of the change this node keeps failing."""
        self._retry_after: float | None = None
        """monotonic time before which the node does not ask to try a rolled-back change again."""
        self._seed_tries = 0
        self._changing: tuple[str, ...] = ()
        """The generations this reconcile changes on the node (``name/uid/generation``)."""
        self.reconciles = 0
        self.metrics = telemetry.AgentMetrics()
        """Counted whether served or not (a few numbers); served by ``run`` when ``metrics_port`` is set."""
        self.watches = [
            ObjectWatch(client, CONFIGMAPS, contract.CONFIGMAP, self._on_configmap, stop=self.stop,
                        watch_seconds=settings.watch_seconds, read_timeout=settings.read_timeout,
                        max_backoff=settings.max_backoff),
            ObjectWatch(client, NODES, settings.node, self._on_node, stop=self.stop,
                        list_accept=METADATA_ONLY_LIST, watch_accept=METADATA_ONLY,
                        watch_seconds=settings.watch_seconds, read_timeout=settings.read_timeout,
                        max_backoff=settings.max_backoff),
        ]

    def _apply_on_node(self, mirrors: Sequence[models.RegistryMirror]) -> engine.Outcome:
        return engine.apply(mirrors, self.settings.engine, log.info, left_out=self._left_out,
                            may_restart=self.may_restart)

    def _verify_on_node(self, mirrors: Sequence[models.RegistryMirror], runtime: str
                        ) -> Mapping[str, verifying.Verification]:
        return verifying.verify(self.settings.engine, mirrors, runtime=runtime or engine.runtime_of(
            self.settings.engine), left_out=self._left_out)

    def _check_in_use(self, mirrors: Sequence[models.RegistryMirror], runtime: str,
                      reports: dict[str, contract.Report]) -> None:
        """Configured is not used: after each apply, ask the runtime itself whether it uses what was written (and
        resolve ``spec.verify.image`` through it). A RegistryMirror its runtime does not use is Failed, with why."""
        if self.verify_mirrors is None or not mirrors:
            return
        found = self.verify_mirrors(mirrors, runtime)
        for m in mirrors:
            seen = found.get(m.name)
            if seen is None or m.name not in reports:
                continue
            report = reports[m.name]
            status = "Unknown" if seen.in_use is None else str(seen.in_use)
            if seen.in_use is False:
                log.error("%s is configured on this node, but containerd does not use it: %s", m.name, seen.message)
                report = dataclasses.replace(report, state=contract.STATE_FAILED,
                                             message=f"configured, but containerd does not use it: {seen.message}")
            reports[m.name] = dataclasses.replace(report, in_use=(status, seen.reason, seen.message))

    # --- mirror credentials ------------------------------------------------------------------------------

    def _with_credentials(self, mirrors: list[tuple[contract.Entry, models.RegistryMirror]],
                          reports: dict[str, contract.Report]
                          ) -> tuple[list[tuple[contract.Entry, models.RegistryMirror]], set[str]]:
        """Resolve each mirror's credentials from its Secret before planning (``secretreading``). A RegistryMirror
        whose Secret is missing or gives no login fails on this node, naming the Secret and what is wrong; the node
        keeps what it ran for it (the previous login), or does not get it at all. Returns the pairs to apply and
        the names that failed."""
        names = credentials.secret_names([m for _, m in mirrors])
        self.secrets.forget_except(names)
        refusal = self._cannot_carry_credentials() if names else None
        result: list[tuple[contract.Entry, models.RegistryMirror]] = []
        failed: set[str] = set()
        for entry, m in mirrors:
            if not any(x.credentials for x in m.mirrors):
                result.append((entry, m))
                continue
            try:
                if refusal:  # refused here, for this entry alone: the node's other mirrors are still applied
                    credentials.refuse([m], refusal, credentials.CredentialsProblem)
                result.append((entry, self.secrets.resolve(m)))
                continue
            except credentials.CredentialsProblem as exc:
                kept = self._applied.get(m.name)
                message = f"credentials: {exc}; " + ("the node keeps what it ran for it" if kept is not None
                                                     else "not applied on this node")
            log.error("%s: %s", m.name, message)
            reports[m.name] = contract.Report(m.name, m.generation, contract.STATE_FAILED, message, uid=entry.uid)
            failed.add(m.name)
            if kept is not None:
                result.append((entry, kept))
        return result, failed

    def _cannot_carry_credentials(self) -> tuple[str, str] | None:
        """``(runtime, why)`` when this node's runtime cannot carry mirror credentials (Docker, CRI-O, containerd in
        inline mode by setting); None when it can, or when a stand-in engine applies. The engine refuses them as
        well; asked here first, the refusal fails only the RegistryMirrors with credentials, not every one on the
        node. containerd chosen inline for its age (before 1.5) is left to the engine's refusal."""
        if not self._real_engine:
            return None
        return engine.credentials_refusal(self.settings.engine)

    def _check_logins(self, mirrors: Sequence[models.RegistryMirror], reports: dict[str, contract.Report]) -> None:
        """A mirror that answers but refuses its credentials (HTTP 401/403 with them) fails its RegistryMirror on
        this node with why; it stays in the configuration (it is alive, and a rotation may be on its way)."""
        out = self.board.out()
        now = self.clock()
        # Asked again only when the login changed, after a refusal, or once in ``login_check_seconds`` (so a login
        # not asked now was accepted): at 5,000 nodes a check each resync would be a steady load on a mirror that
        # may count requests.
        logins = {x.url: (x, fingerprints.fingerprint(x.credentials.authorization)) for rm in mirrors
                  for x in rm.mirrors if x.credentials is not None and x.url not in out}
        due = {url: login for url, (_, login) in logins.items()
               if (seen := self._logins.get(url)) is None or seen[0] != login or seen[2]
               or now - seen[1] >= self.settings.login_check_seconds}
        if self.check_logins is None or not due:
            return
        refused = self.check_logins([logins[url][0] for url in due], self.settings.probe_timeout)
        for url, login in due.items():
            self._logins[url] = (login, now, refused.get(url, ""))
        for rm in mirrors:
            problems = [refused[x.url] for x in rm.mirrors if x.url in refused]
            if problems and rm.name in reports:
                log.error("%s: %s", rm.name, "; ".join(problems))
                reports[rm.name] = dataclasses.replace(reports[rm.name], state=contract.STATE_FAILED,
                                                       message="; ".join(problems))

    # --- the cluster's restart budget ----------------------------------------------------------------------

    def may_restart(self, plan: Any) -> bool:
        """Asked by the engine before writing a change that restarts containerd: only in the restart slot the
        operator granted for this very change (see ``contract.RESTART_SLOT_ANNOTATION``), or on a node still
        tainted mirrors-pending, which runs no workload to disturb."""
        self._asked = (self._changing, str(plan.request))
        if not self.settings.restart_slots:
            return True
        self._look_for_taint()
        if self._tainted:
            return True
        return bool(self.slot) and self.slot == self._token()

    def _token(self) -> str:
        assert self._asked is not None
        return contract.restart_token(self._asked[1], self._tries_of(self._asked[0]), self.instance)

    def _tries_of(self, changing: tuple[str, ...]) -> int:
        """Tries of this change already rolled back on this node (remembered in the report across restarts)."""
        if self._tries[0] != changing:
            self._tries = (changing, self._seed_tries, "")
        return self._tries[1]

    def _look_for_taint(self) -> None:
        """Once per agent: does the Node still carry the mirrors-pending taint? (Then no slot is needed.)"""
        if self._tainted is None:
            self._tainted = bool(taints.pending_taints(self.client.get(f"{NODES}/{self.settings.node}")))

    # --- probing (no apiserver request) ------------------------------------------------------------------

    def _probe(self, mirrors: Sequence[models.RegistryMirror], *, first: bool) -> bool:
        """Probe the mirrors of ``mirrors`` (those not known yet when ``first``); True if the out set changed."""
        targets = [m for rm in mirrors for m in rm.mirrors if not (first and self.board.known(m.url))]
        if not targets:
            return False
        results = self.probe_mirrors(targets, self.settings.probe_timeout)
        self.probes += 1
        for alive in results.values():
            self.metrics.probes.inc(telemetry.ALIVE if alive else telemetry.DEAD)
        before = self.board.out()
        changed = self.board.record(results, now=self.clock(), first=results if first else ())
        after = self.board.out()
        self.metrics.mirrors_out.set(len(after))
        self.events.mirrors_moved(before, after, self.node_uid)
        for url in sorted(after - before):
            log.warning("mirror %s does not answer from this node: left out until it answers again", url)
        for url in sorted(before - after):
            log.info("mirror %s answers again from this node: back in", url)
        return changed

    def probe_round(self) -> bool:
        """One periodic probe of every mirror the node runs; True if the out set changed (then reconcile)."""
        applied = list(self._applied.values())
        self.board.forget_except(mirrorhealth.mirror_urls(applied))
        return self._probe(applied, first=False)

    # --- fed by the watches (their threads) ---------------------------------------------------------------

    def _on_configmap(self, obj: Mapping[str, Any] | None) -> None:
        data = None if obj is None else (obj.get("data") or {}).get(contract.CONFIGMAP_KEY)
        if obj is None and self._seen_configmap:
            log.warning("the ConfigMap was deleted: leaving the node as it is until it is back")
        with self._lock:
            changed = data != self.data or not self._seen_configmap
            self.data, self._seen_configmap = data, True
        if changed:
            self.wake.set()

    def _on_node(self, obj: Mapping[str, Any] | None) -> None:
        meta = (obj or {}).get("metadata") or {}
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        uid = str(meta.get("uid") or "")
        token, expires = contract.parse_slot((meta.get("annotations") or {}).get(contract.RESTART_SLOT_ANNOTATION))
        slot = token if expires != contract.SLOT_EXPIRED else ""
        if obj is None:
            log.warning("Node %s not found: waiting for it", self.settings.node)
        with self._lock:
            changed = obj is not None and (labels != self.labels or uid != self.node_uid or slot != self.slot)
            if obj is not None:
                self.labels, self.node_uid, self.slot = labels, uid, slot
        if changed:  # a heartbeat changes the Node's resourceVersion, not its labels: no reconcile for it
            self.wake.set()

    # --- one reconcile ---------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Bring the node to what the ConfigMap asks of it, then report what it did."""
        with self._lock:
            data, labels, node_uid = self.data, dict(self.labels or {}), self.node_uid
        self.reconciles += 1
        self._in_place = False
        if data is None:
            log.info("nothing published yet (no %s/%s %s): leaving the node as it is",
                     contract.NAMESPACE, contract.CONFIGMAP, contract.CONFIGMAP_KEY)
            return
        try:
            desired = contract.parse_desired(data)
        except contract.InvalidDocument as exc:
            log.error("cannot read the desired state, leaving the node as it is: %s", exc)
            return
        entries = contract.mirrors_for_node(desired, labels)
        mirrors: list[tuple[contract.Entry, models.RegistryMirror]] = []
        reports: dict[str, contract.Report] = {}
        for entry in entries:
            try:
                mirrors.append((entry, entry.mirror()))
            except models.InvalidSpec as exc:
                reports[entry.name] = contract.Report(entry.name, entry.generation, contract.STATE_FAILED,
                                                      str(exc), uid=entry.uid)
        mirrors, no_login = self._with_credentials(mirrors, reports)
        previous = self.reporter.previous()
        wanted = [m for _, m in mirrors]
        if self.settings.probe_seconds > 0:
            self._probe(wanted, first=True)  # before a new mirror's first apply: a dead one is out from the start
            self.board.forget_except(mirrorhealth.mirror_urls(wanted))
        out = self.board.out()
        self._left_out = mirrorhealth.out_by_registry(wanted, out)
        # What changes on this node: a restart slot is asked for it, and a rolled-back try counts against it.
        runs = {m.name for entry, m in mirrors if _runs(previous.get(m.name), entry)}
        self._changing = tuple(sorted(f"{e.name}/{e.uid}/{e.generation}" for e, m in mirrors if m.name not in runs))
        earlier = [previous[e.name] for e, m in mirrors if m.name not in runs and _same_generation(previous, e)]
        self._seed_tries = max((int(r.get("rolledBack") or 0) for r in earlier), default=0)
        self._asked = None
        request = ""
        held: set[str] = set(no_login)  # their reports say why; the node keeps what it ran for them, if anything
        while True:
            try:
                outcome = self.apply_mirrors([m for _, m in mirrors])
            except RegmirrorError as exc:  # refused or failed: the engine left every file as it was
                self.metrics.applies.inc(telemetry.FAILED)
                rolled_back = bool(getattr(exc, "rolled_back", False))
                if rolled_back:
                    self.metrics.rollbacks.inc()
                    tries = self._count_try(str(exc), earlier)
                culprit = _culprit(exc, mirrors) if len(mirrors) > 1 else None
                if culprit is None:
                    log.error("applying failed, node unchanged: %s", exc)
                    self._still_here(previous, reports, contract.STATE_FAILED, f"removing it failed: {exc}")
                    for entry, m in mirrors:
                        if rolled_back and m.name in runs and self._changing:  # still runs it, as before
                            reports[m.name] = self._applied_report(entry, m, previous, out)
                        elif rolled_back:
                            reports[m.name] = contract.Report(
                                m.name, m.generation, contract.STATE_FAILED,
                                _tried(tries, desired.restart_attempts, str(exc)), uid=entry.uid,
                                out=mirrorhealth.left_out(m, out), attempts=tries)
                        else:
                            reports[m.name] = contract.Report(m.name, m.generation, contract.STATE_FAILED, str(exc),
                                                              uid=entry.uid, out=mirrorhealth.left_out(m, out))
                    break
                # One registry's own file cannot be written (an immutable hosts.toml, say): that one fails, with
                # the reason, and the rest are applied while it keeps what the node runs for it (or, if the node
                # never ran it, without it).
                entry, m = culprit
                log.error("applying %s failed, applying the others without its change: %s", m.name, exc)
                reports[m.name] = contract.Report(m.name, m.generation, contract.STATE_FAILED, str(exc), uid=entry.uid,
                                                  out=mirrorhealth.left_out(m, out))
                kept = self._applied.get(m.name)
                mirrors = [(entry, kept) if pair is culprit and kept not in (None, m) else pair
                           for pair in mirrors if pair is not culprit or kept not in (None, m)]
                held.add(m.name)
                continue
            if outcome.held:  # it needs a restart the budget does not allow yet: nothing was written
                request = self._waiting(mirrors, runs, previous, out, reports, desired.restart_attempts)
                if request:
                    self._still_here(previous, reports, contract.STATE_WAITING,
                                     "waiting for a restart slot to remove it from this node")
                break
            self._applied = {m.name: m for _, m in mirrors}
            self._count_success(outcome)
            if self._changing == self._tries[0]:
                self._tries, self._retry_after = ((), 0, ""), None
            drift = [f"put back {path}, edited since regmirror wrote it" for path in outcome.drift]
            for entry, m in mirrors:
                if m.name in held:  # it kept an earlier generation: its report says why the new one failed
                    continue
                reports[m.name] = self._applied_report(entry, m, previous, out, "; ".join(drift), outcome.restarted)
            self._check_in_use([m for _, m in mirrors if m.name not in held], outcome.runtime, reports)
            self._check_logins([m for _, m in mirrors if m.name not in held], reports)
            if outcome.changed:
                log.info("node now has %d mirror set(s)%s", len(mirrors),
                         ", runtime restarted" if outcome.restarted else "")
            for note in outcome.notes:
                log.warning("%s", note)
            break
        self._unsent = (list(reports.values()), node_uid, request)
        self._in_place = taints.mirrors_in_place(reports.values())
        self.send_report()
        self.events.reconciled(node_uid)

    @staticmethod
    def _still_here(previous: Mapping[str, Mapping[str, Any]], reports: dict[str, contract.Report], state: str,
                    message: str) -> None:
        """RegistryMirrors no longer desired that the node still runs, because their removal waits for a restart
        slot or failed: reported as such, so the node never says "0/0" (nothing of regmirror's left, which the
        uninstall waits for) while their configuration is still in force."""
        for name, before in previous.items():
            runs = before.get("state") == contract.STATE_APPLIED or str(before.get("message", "")).startswith(
                ("waiting for a restart slot to remove", "removing it failed"))
            if name not in reports and runs:
                reports[name] = contract.Report(name, int(before.get("generation") or 0), state, message,
                                                uid=str(before.get("uid") or ""))

    @staticmethod
    def _applied_report(entry: contract.Entry, m: models.RegistryMirror, previous: Mapping[str, Mapping[str, Any]],
                        out: frozenset[str], message: str = "", restarted: bool = False) -> contract.Report:
        # "restarted" answers: did applying this generation restart the runtime? A later apply of the same
        # generation (another RegistryMirror changed) must not turn that into a no.
        before = previous.get(m.name) or {}
        restarted = restarted or bool(_runs(before, entry) and before.get("restarted"))
        return contract.Report(m.name, m.generation, contract.STATE_APPLIED, message, restarted, uid=entry.uid,
                               out=mirrorhealth.left_out(m, out))

    def _count_try(self, reason: str, earlier: Sequence[Mapping[str, Any]]) -> int:
        """A try of the changing generations was rolled back: count it, and pause before the next one."""
        changing = self._asked[0] if self._asked else self._changing
        tries = self._tries_of(changing) + 1
        self._tries = (changing, tries, reason)
        self._retry_after = self.clock() + self.settings.retry_seconds * tries
        return tries

    def _waiting(self, mirrors: Sequence[tuple[contract.Entry, models.RegistryMirror]], runs: set[str],
                 previous: Mapping[str, Mapping[str, Any]], out: frozenset[str],
                 reports: dict[str, contract.Report], most: int) -> str:
        """Reports for a change held for a restart slot; returns the token of the slot to ask for ('' for none:
        the node gave up on this change, or pauses after a rolled-back try)."""
        assert self._asked is not None
        tries = self._tries_of(self._asked[0])
        reason = self._tries[2] or next((str(previous[e.name].get("message") or "") for e, m in mirrors
                                         if m.name not in runs and e.name in previous), "")
        gave_up = tries >= most
        pausing = bool(tries) and self._retry_after is not None and self.clock() < self._retry_after
        for entry, m in mirrors:
            if m.name in runs:
                reports[m.name] = self._applied_report(entry, m, previous, out)
                continue
            state = contract.STATE_FAILED if gave_up or pausing else contract.STATE_WAITING
            if gave_up or pausing:
                message = _tried(tries, most, _reason(reason))
            elif tries:
                message = (f"waiting for a restart slot to try again ({tries + 1} of {most}); try {tries} rolled "
                           f"back: {_reason(reason)}")
            else:
                message = "waiting for a restart slot: only maxUnavailable nodes restart containerd at once"
            reports[m.name] = contract.Report(m.name, m.generation, state, message, uid=entry.uid,
                                              out=mirrorhealth.left_out(m, out), attempts=tries)
        if gave_up or pausing:
            return ""
        log.info("the change needs a containerd restart: waiting for a restart slot (%s)", self._token())
        return self._token()

    def _count_success(self, outcome: engine.Outcome) -> None:
        self.metrics.applies.inc(telemetry.CHANGED if outcome.changed else telemetry.UNCHANGED)
        if outcome.restarted:
            self.metrics.restarts.inc()
        if outcome.drift:
            self.metrics.drift_repairs.inc(amount=len(outcome.drift))
        self.metrics.last_success.set(time.time())
        self.metrics.mirrors_out.set(len(self.board.out()))

    def send_report(self) -> None:
        """Send the report not yet taken, if any (raises ApiError and keeps it when the apiserver refuses)."""
        if self._unsent is not None:
            if self.reporter.send(*self._unsent):
                self.metrics.report_writes.inc()
            self._unsent = None

    def untaint(self) -> None:
        """Once the node's mirrors are in place, remove the mirrors-pending taint from this node, and only that.

        Raises ApiError for a retry with backoff (409/422: the Node changed since it was read; it is read again
        then). A 403 (RBAC or the admission policy, so a retry would only be refused again) is logged and tried
        again at the next reconcile, not in a loop."""
        if not self._in_place or self._tainted is False:
            return
        path = f"{NODES}/{self.settings.node}"
        try:
            node = self.client.get(path)
            patch = taints.plan_untaint(node)
            self._tainted = patch is not None
            if patch is None:
                return
            self.client.json_patch(path, patch)
        except ApiError as exc:
            if exc.status != 403:
                raise
            log.error("cannot remove the taint %s from node %s, workloads stay off it: %s (the agent needs get "
                      "and patch on nodes, manifests/agent-rbac.yaml, and the policy in agent-policy.yaml)",
                      contract.MIRRORS_PENDING_TAINT, self.settings.node, exc)
            return
        self._tainted = False
        effects = ",".join(sorted({str(t.get("effect", "")) for t in taints.pending_taints(node)}))
        log.info("removed the taint %s:%s from node %s: its mirrors are in place", contract.MIRRORS_PENDING_TAINT,
                 effects, self.settings.node)

    # --- the loop --------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Both watches have answered: the desired state (or its absence) and this node's labels are known."""
        with self._lock:
            return self._seen_configmap and self.labels is not None

    def run(self) -> None:
        if self.settings.metrics_port:
            telemetry.serve(self.metrics.registry, self.settings.metrics_address, self.settings.metrics_port)
        for watch in self.watches:
            watch.start()
        resync_at = time.monotonic() + self.settings.resync
        probe_at = time.monotonic() + self._probe_interval() if self.settings.probe_seconds > 0 else None
        retry_at: float | None = None
        backoff = 1.0
        while not self.stop.is_set():
            due = min(t for t in (resync_at, retry_at, probe_at, self._retry_after) if t is not None)
            woke = self.wake.wait(timeout=max(0.0, due - time.monotonic()))
            if woke:
                self.wake.clear()
            if self._retry_after is not None and time.monotonic() >= self._retry_after:
                self._retry_after = None  # the pause after a rolled-back try is over: ask to try again
                woke = True
            if self.stop.is_set():
                return
            if not self.ready():
                resync_at = time.monotonic() + self.settings.resync
                continue
            probed = False
            if probe_at is not None and time.monotonic() >= probe_at:
                probed = self.probe_round()
                probe_at = time.monotonic() + self._probe_interval()
                if not probed and not woke and retry_at is None and time.monotonic() < resync_at:
                    continue  # every mirror as it was: nothing to apply, nothing to report
            try:
                # Only the retry timer: the node is as applied, the apiserver still owes us the report or the
                # untaint. (A failed first read of the report needs the whole reconcile again.)
                if (retry_at is not None and not woke and not probed and time.monotonic() < resync_at
                        and self.reporter.read):
                    self.send_report()
                else:
                    self.reconcile()
                self.untaint()
                retry_at, backoff = None, 1.0
            except ApiError as exc:
                delay, backoff = retry_delay(exc, backoff, self.settings.max_backoff)
                log.warning("apiserver: %s; node as applied, trying again in %.1fs", exc, delay)
                retry_at = time.monotonic() + delay
            # The next look without a change comes a full period after this one ended: an apply that fails
            # slowly (a runtime that does not come back) is not retried back to back.
            resync_at = time.monotonic() + self.settings.resync

    def _probe_interval(self) -> float:
        return self.settings.probe_seconds * random.uniform(0.8, 1.2)


def _runs(report: Mapping[str, Any] | None, entry: contract.Entry) -> bool:
    """Does the node's report say it runs this very generation of this very object?"""
    return report is not None and report.get("state") == contract.STATE_APPLIED and _same(report, entry)


def _same(report: Mapping[str, Any] | None, entry: contract.Entry) -> bool:
    return report is not None and report.get("generation") == entry.generation and report.get("uid", "") == entry.uid


def _same_generation(previous: Mapping[str, Mapping[str, Any]], entry: contract.Entry) -> bool:
    return _same(previous.get(entry.name), entry)


_GAVE_UP, _PAUSE = "; a new generation is tried again", "; trying again after a pause"


def _tried(tries: int, most: int, reason: str) -> str:
    """What a node says about a change it tried ``tries`` times, each rolled back."""
    if tries >= most:
        return f"gave up after {tries} tries, each rolled back: {reason}{_GAVE_UP}"
    return f"try {tries} of {most} rolled back: {reason}{_PAUSE}"


def _reason(text: str) -> str:
    """A rolled-back try's reason, without what ``_waiting`` put around it in an earlier report (a restarted
    agent knows the reason only from there)."""
    if text.startswith(("try ", "waiting for a restart slot to try again", "gave up after ")) and ": " in text:
        text = text.split(": ", 1)[1]
    for suffix in (_GAVE_UP, _PAUSE):
        text = text.removesuffix(suffix)
    return text or "the runtime was not healthy on the change"


def _culprit(exc: RegmirrorError, mirrors: Sequence[tuple[contract.Entry, models.RegistryMirror]]
             ) -> tuple[contract.Entry, models.RegistryMirror] | None:
    """The RegistryMirror whose own registry folder (``certs.d/<registry>/``) held the file that failed, if any."""
    path = getattr(exc, "path", "")
    for pair in mirrors:
        if path and f"/{hoststoml.registry_dir(pair[1].registry)}/" in path:
            return pair
    return None


def main(argv: Sequence[str] | None = None, *, install_signals: bool = True,
         make_client: Callable[[], Client] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="regmirror agent",
                                     description="watch the desired state and keep this node's runtime on it")
    parser.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name ($NODE_NAME)")
    parser.add_argument("--root", default=os.environ.get("REGMIRROR_ROOT", "/"))
    parser.add_argument("--restart", default=os.environ.get("REGMIRROR_RESTART", "auto"))
    parser.add_argument("--runtime", choices=RUNTIMES, default=os.environ.get("REGMIRROR_RUNTIME", "auto"),
                        help="auto (what the node's files say), or one runtime by name ($REGMIRROR_RUNTIME)")
    parser.add_argument("--resync", type=int, default=os.environ.get("REGMIRROR_RESYNC_SECONDS", "300"))
    parser.add_argument("--health-timeout", type=float,
                        default=os.environ.get("REGMIRROR_HEALTH_TIMEOUT", "60"))
    parser.add_argument("--probe-seconds", type=float,
                        default=os.environ.get("REGMIRROR_PROBE_SECONDS", "30"),
                        help="seconds between probes of the node's mirrors, 0 for none ($REGMIRROR_PROBE_SECONDS)")
    parser.add_argument("--probe-timeout", type=float,
                        default=os.environ.get("REGMIRROR_PROBE_TIMEOUT", "3"),
                        help="seconds a mirror has to answer a probe ($REGMIRROR_PROBE_TIMEOUT)")
    parser.add_argument("--probe-min-out", type=float,
                        default=os.environ.get("REGMIRROR_PROBE_MIN_OUT_SECONDS", "60"),
                        help="seconds a mirror that stopped answering stays out at least "
                             "($REGMIRROR_PROBE_MIN_OUT_SECONDS)")
    parser.add_argument("--mode", choices=MODES, default=os.environ.get("REGMIRROR_MODE", "auto"),
                        help="containerd: auto (hosts.toml where containerd can), hosts, or inline ($REGMIRROR_MODE)")
    parser.add_argument("--retry-seconds", type=float, default=os.environ.get("REGMIRROR_RETRY_SECONDS", "30"),
                        help="after a change was rolled back, pause this many seconds times the tries so far "
                             "before trying it again ($REGMIRROR_RETRY_SECONDS)")
    parser.add_argument("--login-check-seconds", type=float,
                        default=os.environ.get("REGMIRROR_LOGIN_CHECK_SECONDS", "3600"),
                        help="how often a mirror's unchanged, accepted login (mirror credentials) is checked again; "
                             "a changed or refused one is checked at every reconcile ($REGMIRROR_LOGIN_CHECK_SECONDS)")
    parser.add_argument("--restart-slots", choices=SLOT_SOURCES,
                        default=os.environ.get("REGMIRROR_RESTART_SLOTS", "operator"),
                        help="operator: restart containerd only in a slot the operator grants (its maxUnavailable); "
                             "none: restart at once, for an agent run without the operator ($REGMIRROR_RESTART_SLOTS)")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get("REGMIRROR_LOG_FORMAT", "text"),
                        help="text, or one JSON object a line ($REGMIRROR_LOG_FORMAT)")
    parser.add_argument("--metrics-port", type=int, default=os.environ.get("REGMIRROR_METRICS_PORT") or "0",
                        help="serve Prometheus metrics on this port, 0 for none, the default "
                             "($REGMIRROR_METRICS_PORT)")
    parser.add_argument("--metrics-address", default=os.environ.get("REGMIRROR_METRICS_ADDRESS", "0.0.0.0"),
                        help="the address the metrics port is bound to ($REGMIRROR_METRICS_ADDRESS)")
    args = parser.parse_args(argv)
    if not args.node:
        parser.error("the node name is required: --node or $NODE_NAME (downward API spec.nodeName)")
    if args.log_format not in logs.FORMATS:  # from the environment, which argparse's choices do not check
        parser.error(f"REGMIRROR_LOG_FORMAT={args.log_format!r}: expected one of {', '.join(logs.FORMATS)}")
    if args.runtime not in RUNTIMES:
        parser.error(f"REGMIRROR_RUNTIME={args.runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if args.mode not in MODES:
        parser.error(f"REGMIRROR_MODE={args.mode!r}: expected one of {', '.join(MODES)}")
    if args.restart_slots not in SLOT_SOURCES:
        parser.error(f"REGMIRROR_RESTART_SLOTS={args.restart_slots!r}: expected one of {', '.join(SLOT_SOURCES)}")
    logs.configure(args.node, args.log_format, os.environ.get("REGMIRROR_LOG_LEVEL", "INFO"))
    settings = AgentSettings(node=args.node, resync=args.resync, engine=engine.Settings(
        root=args.root, restart=args.restart, runtime=args.runtime, health_timeout=args.health_timeout,
        mode=args.mode),
        probe_seconds=args.probe_seconds, probe_timeout=args.probe_timeout,
        probe_rules=mirrorhealth.Rules(min_out_seconds=args.probe_min_out),
        metrics_port=args.metrics_port, metrics_address=args.metrics_address,
        restart_slots=args.restart_slots == "operator", retry_seconds=args.retry_seconds,
        login_check_seconds=args.login_check_seconds)
    stop = threading.Event()
    client = make_client() if make_client else Client(load_config())
    agent = Agent(settings, client, stop)
    if install_signals:
        def on_signal(*_: object) -> None:
            # The loop ends at once when idle; mid-apply, it finishes the apply (and its report) first.
            stop.set()
            agent.wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    log.info("regmirror agent for node %s, root %s, resync %ss", args.node, args.root, args.resync)
    agent.run()
    return 0
