"""What the operator should publish and write, computed from what it has seen: pure functions on plain dicts.

``plan(mirrors, nodes, reports, now=...)`` takes the RegistryMirror objects (as the API returns them), each
Node's labels and each node's report (a ``RegistryMirrorNode``, as ``caches.report_essence`` keeps it), and
returns a :class:`Plan`:

- ``desired``: the ``desired.json`` text of the ConfigMap, rendered by ``contract.render_desired`` from the
  valid RegistryMirrors that win their registry. The same objects give the same bytes in any order.
- ``patches``: per RegistryMirror, the smallest JSON merge patch that makes its ``status`` say the truth, or
  nothing at all when it already does; the operator's own writes therefore never loop back through its watch.
- ``prunes``: reports of nodes that are gone, to delete (the garbage collector does it where it runs).
- ``notices``: what an admin should hear about as a Kubernetes Event (a conflict, an invalid object, a node
  that failed, becoming Ready), derived from the change of status, so a restart does not repeat them.

The status follows the kstatus conventions that Flux reads (Argo CD through argocd/'s health check):
``Stalled`` when the operator refuses the object (``Invalid`` or ``Conflict``), otherwise ``Reconciling`` until
every selected node reports the current generation applied, and ``Ready`` only then. A brand-new object is
``Reconciling`` at once (its nodes have not reported yet), so no tool mistakes it for a healthy one.

Nothing here reads a clock, the environment or the API: the caller passes ``now``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from regmirror_api import contract, models

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
CONDITION_TYPES = (READY, RECONCILING, STALLED)

REASON_APPLIED = "Applied"
REASON_PROGRESSING = "Progressing"
REASON_NODES_FAILED = "NodesFailed"
REASON_INVALID = "Invalid"
REASON_CONFLICT = "Conflict"
REASON_TOO_LARGE = "DocumentTooLarge"
REASON_MIRROR_UNREACHABLE = "MirrorUnreachable"
REASON_MIRROR_REACHABLE = "MirrorReachable"
REASON_ROLLOUT_HALTED = "RolloutHalted"
REASON_ROLLOUT_FAILED = "RolloutFailed"

#: The most ``desired.json`` may hold. A ConfigMap holds at most 1 MiB (data and metadata together, and the
#: apiserver refuses more); the rest is room for its metadata and managedFields.
MAX_DOCUMENT_BYTES = 900 * 1024

MAX_MESSAGE = 1024
MAX_FAILING_NODES = 10
MAX_FAILING_REASON = 512
#: A report of a node the operator does not know is left alone this long: the agent may have seen its Node
#: before the operator's watch did, and an agent writes a report once per change, so removing it by mistake
#: would hide that node's result until it changes again.
PRUNE_GRACE_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class Notice:
    """A Kubernetes Event to post about one RegistryMirror."""

    name: str
    uid: str
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a RegistryMirror is published, and if not, why."""

    reason: str | None = None  # None: published; REASON_INVALID or REASON_CONFLICT: Stalled
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    desired: str
    """The ConfigMap's ``desired.json``."""
    published: tuple[str, ...]
    """Names of the RegistryMirrors in ``desired``, sorted."""
    verdicts: Mapping[str, Verdict]
    patches: Mapping[str, dict[str, Any]]
    """RegistryMirror name -> merge patch body (``{"status": {...}}``); absent when nothing changes."""
    statuses: Mapping[str, dict[str, Any]]
    """RegistryMirror name -> the full status the operator wants."""
    prunes: tuple[tuple[str, str], ...]
    """(name, uid) of RegistryMirrorNodes whose Node is gone."""
    notices: tuple[Notice, ...]
    """Events for each name; post them once its patch (if any) is written."""


# --- validation and conflicts -------------------------------------------------------------------------------


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def _generation(body: Mapping[str, Any]) -> int:
    return int(_meta(body).get("generation") or 0)


def check_mirror(body: Mapping[str, Any], secrets: Mapping[str, str] | None = None
                 ) -> tuple[contract.Entry | None, list[str]]:
    """The published entry of one RegistryMirror object, or every problem with it. ``secrets``: name ->
    resourceVersion of the Secrets in the install's namespace; a mirror's credentials are published as the
    Secret's name and resourceVersion (empty while it does not exist), never its content, so a rotated Secret
    changes the document and each agent fetches it once."""
    name = str(_meta(body).get("name", ""))
    spec = body.get("spec")
    problems: list[str] = []
    mirror: models.RegistryMirror | None = None
    try:
        mirror = models.parse_spec(name, spec, _generation(body))
    except models.InvalidSpec as exc:
        problems += exc.problems
    selector = spec.get("nodeSelector") if isinstance(spec, Mapping) else None
    if problems or mirror is None:
        return None, problems
    mirror = with_secret_versions(mirror, secrets or {})
    # The canonical spec (defaults dropped), so apiserver defaulting never changes the published bytes.
    return contract.Entry(name=name, generation=mirror.generation, spec=mirror.to_spec(),
                          node_selector=dict(selector or {}), uid=str(_meta(body).get("uid") or "")), []


def with_secret_versions(mirror: models.RegistryMirror, secrets: Mapping[str, str]) -> models.RegistryMirror:
    """``mirror`` with each mirror's credentials carrying its Secret's resourceVersion ('' when there is none)."""
    return mirror.with_credentials(lambda _, c: models.Credentials(c.secret_name, secrets.get(c.secret_name, "")))


def plan_verdicts(mirrors: Iterable[Mapping[str, Any]], secrets: Mapping[str, str] | None = None
                  ) -> tuple[list[contract.Entry], dict[str, Verdict]]:
    """Entries to publish, and a verdict for every RegistryMirror (the oldest one wins its registry)."""
    entries: dict[str, contract.Entry] = {}
    verdicts: dict[str, Verdict] = {}
    created: dict[str, str] = {}
    for body in mirrors:
        name = str(_meta(body).get("name", ""))
        entry, problems = check_mirror(body, secrets)
        if entry is None:
            verdicts[name] = Verdict(REASON_INVALID, _clip("invalid spec: " + "; ".join(problems)))
        else:
            entries[name] = entry
            created[name] = str(_meta(body).get("creationTimestamp") or "")
    winners = contract.pick_winners([(n, str(e.spec["registry"]), created[n]) for n, e in entries.items()])
    published = []
    for name, entry in sorted(entries.items()):
        registry = str(entry.spec["registry"])
        winner = winners[registry]
        if winner == name:
            verdicts[name] = Verdict()
            published.append(entry)
        else:
            verdicts[name] = Verdict(REASON_CONFLICT, _clip(
                f"registry {registry!r} is already mirrored by RegistryMirror {winner!r} (created "
                f"{created[winner] or 'earlier'}; the oldest one wins, then the first name); this one is not "
                f"applied until {winner!r} is deleted or mirrors another registry"))
    return published, verdicts


def fit_document(entries: list[contract.Entry], previous: Mapping[str, contract.Entry],
                 newest_first: list[str]) -> tuple[list[contract.Entry], dict[str, Verdict]]:
    """Entries whose document fits in a ConfigMap, and a Stalled verdict for each one left out.

    Two valid RegistryMirrors can together exceed what a ConfigMap holds (ten 64 KB caBundles each). Then the
    newest changes give way first: each is replaced by the generation the nodes already have (from the
    document published before) or, if it never was published, left out, until the document fits. Nothing the
    nodes run is ever withdrawn because something newer is too large.
    """
    chosen = {e.name: e for e in entries}
    verdicts: dict[str, Verdict] = {}

    def size() -> int:
        return len(contract.render_desired(chosen.values()).encode())

    total = size()
    for name in newest_first:
        if total <= MAX_DOCUMENT_BYTES:
            break
        if name not in chosen or (name in previous and previous[name] == chosen[name]):
            continue
        kept = previous.get(name)
        if kept is not None and str(kept.spec.get("registry")) == str(chosen[name].spec.get("registry")):
            chosen[name] = kept
            keeps = f"nodes keep generation {kept.generation}"
        else:
            del chosen[name]
            keeps = "nothing of it is applied"
        verdicts[name] = Verdict(REASON_TOO_LARGE, _clip(
            f"generation {next(e.generation for e in entries if e.name == name)} is not published: the desired "
            f"state of all RegistryMirrors would take {total:,} bytes, more than the {MAX_DOCUMENT_BYTES:,} a "
            f"ConfigMap can hold; {keeps}. Shrink its caBundles, or those of other RegistryMirrors"))
        total = size()
    return sorted(chosen.values(), key=lambda e: e.name), verdicts


# --- status --------------------------------------------------------------------------------------------------


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _parse_time(value: object) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _report_of(node_report: Mapping[str, Any] | None, name: str, uid: str) -> Mapping[str, Any] | None:
    """One node's report on one RegistryMirror, if it is about this very object (not an earlier one that had
    the same name)."""
    report = ((node_report or {}).get("mirrors") or {}).get(name)
    if not isinstance(report, Mapping) or (uid and report.get("uid") and report.get("uid") != uid):
        return None
    return report


def plan_status(body: Mapping[str, Any], verdict: Verdict, nodes: Mapping[str, Mapping[str, str]],
                reports: Mapping[str, Mapping[str, Any]], *, now: str,
                restart_attempts: int = contract.DEFAULT_RESTART_ATTEMPTS) -> dict[str, Any]:
    """The status this RegistryMirror should have: counts and a sample of failures, never per-node entries, so
    it stays the same small size on any cluster.

    A node that restarted containerd for the current generation and rolled it back halts the rollout (no other
    node gets a restart slot for it, ``slots``): Reconciling, reason RolloutHalted, naming the node and why.
    Once that node gave up (``restart_attempts`` tries), the object is Stalled (RolloutFailed), which Flux
    reports as failed at once; a new generation starts again."""
    meta = _meta(body)
    name, uid = str(meta.get("name", "")), str(meta.get("uid") or "")
    generation = _generation(body)
    raw_spec = body.get("spec")
    spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    current = body.get("status") or {}
    selector = spec.get("nodeSelector")
    selector_ok = not models.check_node_selector(selector)
    selected = sorted(n for n, labels in nodes.items() if selector_ok and contract.selects(selector, labels))
    applied, waiting, in_use, failing = 0, 0, 0, []
    rolled: list[tuple[str, int, str, str]] = []  # node, tries, state, message: nodes that rolled it back
    urls = _spec_urls(spec)
    unreachable = dict.fromkeys(urls, 0)
    reporting = 0
    for node in selected:
        report = _report_of(reports.get(node), name, uid)
        if report is None:
            continue
        reporting += 1
        for url in contract.out_mirrors(report) & unreachable.keys():
            unreachable[url] += 1
        if report.get("generation") != generation:
            continue
        state, tries = report.get("state"), report.get("rolledBack")
        if isinstance(tries, int) and tries > 0 and state != contract.STATE_APPLIED:
            rolled.append((node, tries, str(state), str(report.get("message") or "")))
        if state == contract.STATE_APPLIED:
            applied += 1
            seen = report.get("inUse")
            in_use += isinstance(seen, Mapping) and seen.get("status") == "True"
        elif state == contract.STATE_FAILED:
            failing.append((node, str(report.get("message") or "")))
        elif state == contract.STATE_WAITING:
            waiting += 1
    gave_up = [r for r in rolled if r[2] == contract.STATE_FAILED and r[1] >= restart_attempts]

    if verdict.reason is not None:
        reason, message = verdict.reason, verdict.message
        truth = {READY: "False", RECONCILING: "False", STALLED: "True"}
    elif applied == len(selected):
        reason = REASON_APPLIED
        message = (f"{applied}/{_nodes(len(selected))} {'runs' if applied == 1 else 'run'} generation {generation}"
                   if selected else "no node matches nodeSelector")
        truth = {READY: "True", RECONCILING: "False", STALLED: "False"}
    elif gave_up:
        reason = REASON_ROLLOUT_FAILED
        node, tries, _, why = gave_up[0]
        message = _clip(f"generation {generation} broke containerd on node {node} ({why}); no other node was "
                        f"restarted for it. Fix the spec: a new generation starts the rollout again ({applied}/"
                        f"{_nodes(len(selected))} applied)")
        truth = {READY: "False", RECONCILING: "False", STALLED: "True"}
    elif rolled:
        reason = REASON_ROLLOUT_HALTED
        node, tries, _, why = rolled[0]
        message = _clip(f"rollout of generation {generation} halted: containerd was not healthy with it on node "
                        f"{node} ({why}); no other node starts it unless it succeeds there ({applied}/"
                        f"{_nodes(len(selected))} applied, {waiting} waiting)")
        truth = {READY: "False", RECONCILING: "True", STALLED: "False"}
    elif failing:
        reason = REASON_NODES_FAILED
        sample = "; ".join(f"{n}: {why or 'no reason given'}" for n, why in failing[:MAX_FAILING_NODES])
        message = _clip(f"{len(failing)} of {_nodes(len(selected))} failed generation {generation} "
                        f"({applied} applied): {sample}")
        truth = {READY: "False", RECONCILING: "True", STALLED: "False"}
    else:
        reason = REASON_PROGRESSING
        message = f"{applied}/{_nodes(len(selected))} applied generation {generation}" + (
            f", {waiting} waiting for a restart slot" if waiting else "")
        truth = {READY: "False", RECONCILING: "True", STALLED: "False"}

    old_conditions = {c.get("type"): c for c in current.get("conditions") or [] if isinstance(c, Mapping)}
    conditions = []
    for kind in CONDITION_TYPES:
        old = old_conditions.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == truth[kind] else None
        conditions.append({"type": kind, "status": truth[kind], "observedGeneration": generation,
                           "lastTransitionTime": since or now, "reason": reason, "message": message})
    return {
        "observedGeneration": generation,
        "conditions": conditions,
        "ready": f"{applied}/{len(selected)}",
        "message": message,
        "nodes": {"selected": len(selected), "applied": applied, "failed": len(failing), "waiting": waiting,
                  "inUse": in_use},
        "failingNodes": [{"name": n, "reason": _clip(why, MAX_FAILING_REASON)}
                         for n, why in failing[:MAX_FAILING_NODES]],
        "mirrors": [{"url": u, "reachable": reporting - unreachable[u], "unreachable": unreachable[u]} for u in urls],
    }


def _spec_urls(spec: Mapping[str, Any]) -> list[str]:
    """The mirror URLs of a spec, in order (a shorthand string counts; anything malformed is skipped)."""
    raw = spec.get("mirrors")
    urls = [m if isinstance(m, str) else m.get("url") if isinstance(m, Mapping) else None
            for m in (raw if isinstance(raw, list) else [])[:models.MAX_MIRRORS]]
    return list(dict.fromkeys(u for u in urls if isinstance(u, str)))


def plan_status_patch(current: Mapping[str, Any] | None, status: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch holding only the fields that differ (``None`` when there are none)."""
    current = current or {}
    changed: dict[str, Any] = {}
    for key, value in status.items():
        old = current.get(key, [] if key in ("failingNodes", "mirrors") else None)
        if old != value:
            changed[key] = value
    return {"status": changed} if changed else None


def plan_prunes(nodes: Mapping[str, Any], reports: Mapping[str, Mapping[str, Any]], *,
                now: str) -> list[tuple[str, str]]:
    """(name, uid) of reports whose Node the operator does not know, written at least PRUNE_GRACE_SECONDS ago."""
    now_time = _parse_time(now)
    prunes = []
    for name, report in sorted(reports.items()):
        if name in nodes:
            continue
        written = _parse_time(report.get("time"))
        if written is None or now_time is None or (now_time - written).total_seconds() >= PRUNE_GRACE_SECONDS:
            prunes.append((name, str(report.get("uid") or "")))
    return prunes


def plan_notices(body: Mapping[str, Any], status: Mapping[str, Any]) -> list[Notice]:
    """Events for what changed between the object's current status and ``status``."""
    meta = _meta(body)
    name, uid = str(meta.get("name", "")), str(meta.get("uid", ""))
    old = body.get("status") or {}
    old_conditions = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, Mapping)}
    new_conditions = {c["type"]: c for c in status["conditions"]}
    same_generation = old.get("observedGeneration") == status["observedGeneration"]
    notices = []

    stalled, was_stalled = new_conditions[STALLED], old_conditions.get(STALLED) or {}
    if stalled["status"] == "True" and (was_stalled.get("status") != "True"
                                        or was_stalled.get("message") != stalled["message"]):
        notices.append(Notice(name, uid, "Warning", stalled["reason"], stalled["message"]))

    known = {f.get("name") for f in old.get("failingNodes") or []} if same_generation else set()
    fresh = [f for f in status["failingNodes"] if f["name"] not in known]
    if fresh:
        failed = status["nodes"]["failed"]
        sample = "; ".join(f"{f['name']}: {f['reason'] or 'no reason given'}" for f in fresh)
        notices.append(Notice(name, uid, "Warning", REASON_NODES_FAILED, _clip(
            f"{_nodes(failed)} failed generation {status['observedGeneration']}; newly failing: {sample}")))

    # A mirror that stops answering from its first node, and one that answers again from every node: one Event
    # for the whole cluster at each edge, never one per node.
    was_unreachable = {m.get("url"): m.get("unreachable") or 0 for m in old.get("mirrors") or []
                       if isinstance(m, Mapping)}
    for mirror in status.get("mirrors") or []:
        before, now_out = was_unreachable.get(mirror["url"], 0), mirror["unreachable"]
        total = mirror["reachable"] + now_out
        if now_out and not before:
            notices.append(Notice(name, uid, "Warning", REASON_MIRROR_UNREACHABLE, _clip(
                f"mirror {mirror['url']} does not answer from {now_out} of {_nodes(total)}; those nodes leave it "
                f"out until it answers again")))
        elif before and not now_out and mirror["url"] in was_unreachable:
            notices.append(Notice(name, uid, "Normal", REASON_MIRROR_REACHABLE, _clip(
                f"mirror {mirror['url']} answers again from every node ({total}); it is back in use")))

    reconciling, was_reconciling = new_conditions[RECONCILING], old_conditions.get(RECONCILING) or {}
    if reconciling["reason"] == REASON_ROLLOUT_HALTED and (was_reconciling.get("reason") != REASON_ROLLOUT_HALTED
                                                           or not same_generation):
        notices.append(Notice(name, uid, "Warning", REASON_ROLLOUT_HALTED, reconciling["message"]))

    ready, was_ready = new_conditions[READY], old_conditions.get(READY) or {}
    if ready["status"] == "True" and (was_ready.get("status") != "True" or not same_generation):
        notices.append(Notice(name, uid, "Normal", READY, ready["message"]))
    return notices


# --- everything at once ---------------------------------------------------------------------------------------


def plan(mirrors: Mapping[str, Mapping[str, Any]], nodes: Mapping[str, Mapping[str, str]],
         reports: Mapping[str, Mapping[str, Any]], *, now: str, published: str | None = None,
         restart_attempts: int = contract.DEFAULT_RESTART_ATTEMPTS, secrets: Mapping[str, str] | None = None) -> Plan:
    """The ConfigMap text, status patches, prunes and events for every RegistryMirror.

    ``mirrors``: name -> object (metadata, spec, status); objects being deleted are left out of the document
    and get no status. ``nodes``: name -> labels. ``reports``: node name -> ``caches.report_essence``.
    ``now``: RFC 3339 UTC time for new transition times. ``published``: the document the ConfigMap holds now,
    if known (what nodes keep when a change would not fit). ``restart_attempts``: how many rolled-back tries a
    node makes of a change before its RegistryMirror goes Stalled (published for the agents). ``secrets``: name
    -> resourceVersion of the install namespace's Secrets (mirror credentials; see ``check_mirror``).
    """
    live = {n: b for n, b in mirrors.items() if not _meta(b).get("deletionTimestamp")}
    entries, verdicts = plan_verdicts((live[n] for n in sorted(live)), secrets)
    try:
        previous = {e.name: e for e in contract.parse_desired(published).entries} if published else {}
    except contract.InvalidDocument:
        previous = {}
    newest_first = sorted(live, key=lambda n: (str(_meta(live[n]).get("creationTimestamp") or ""), n), reverse=True)
    entries, too_large = fit_document(entries, previous, newest_first)
    verdicts.update(too_large)
    desired = contract.render_desired(entries, restart_attempts)
    patches: dict[str, dict[str, Any]] = {}
    statuses: dict[str, dict[str, Any]] = {}
    notices: list[Notice] = []
    for name in sorted(live):
        body = live[name]
        status = plan_status(body, verdicts[name], nodes, reports, now=now, restart_attempts=restart_attempts)
        statuses[name] = status
        patch = plan_status_patch(body.get("status"), status)
        if patch is not None:
            patches[name] = patch
            notices += plan_notices(body, status)
    return Plan(desired=desired, published=tuple(sorted(e.name for e in entries)), verdicts=verdicts,
                patches=patches, statuses=statuses, prunes=tuple(plan_prunes(nodes, reports, now=now)),
                notices=tuple(notices))
