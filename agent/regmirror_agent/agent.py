"""The DaemonSet agent: watch the one ConfigMap, apply what selects this node, report, repeat.

- One single-object watch (``fieldSelector=metadata.name=regmirror-desired``); no polling. The watch ends
  every ``resync`` seconds by the server's ``timeoutSeconds``; the agent then reconciles again, which puts
  back managed files someone edited by hand (drift), and watches on from where it was.
- The node's labels are read from its Node object at each reconcile (RBAC lets the agent get nodes).
- No ConfigMap, or no ``desired.json`` in it: nothing has been published yet, so the node stays as it is.
- The apiserver going away changes nothing on the node: the agent retries with capped exponential backoff and
  catches up (a fresh list) when it returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence

from regmirror_agent import engine
from regmirror_agent.kubeapi import ApiError, Client, load_config
from regmirror_agent.reporting import Reporter
from regmirror_api import contract, models

log = logging.getLogger("regmirror.agent")
CONFIGMAPS = f"/api/v1/namespaces/{contract.NAMESPACE}/configmaps"
SELECTOR = {"fieldSelector": f"metadata.name={contract.CONFIGMAP}"}


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    node: str
    engine: engine.Settings
    resync: int = 300
    """Seconds between reconciles without any change (drift repair); the watch's server-side timeout."""
    max_backoff: float = 30.0


class Agent:
    def __init__(self, settings: AgentSettings, client: Client, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.client = client
        self.reporter = Reporter(client, settings.node)
        self.stop = stop or threading.Event()
        self.data: str | None = None
        self.busy = False

    # --- one reconcile ---------------------------------------------------------------------------------

    def node_labels(self) -> dict[str, str]:
        node = self.client.get(f"/api/v1/nodes/{self.settings.node}")
        return dict((node.get("metadata") or {}).get("labels") or {})

    def reconcile(self) -> None:
        """Bring the node to what the ConfigMap asks of it, then report per RegistryMirror."""
        self.busy = True
        try:
            self._reconcile()
        finally:
            self.busy = False

    def _reconcile(self) -> None:
        if self.data is None:
            log.info("nothing published yet (no %s/%s %s): leaving the node as it is",
                     contract.NAMESPACE, contract.CONFIGMAP, contract.CONFIGMAP_KEY)
            return
        try:
            desired = contract.parse_desired(self.data)
        except contract.InvalidDocument as exc:
            log.error("cannot read the desired state, leaving the node as it is: %s", exc)
            return
        labels = self.node_labels()
        entries = contract.mirrors_for_node(desired, labels)
        mirrors: list[models.RegistryMirror] = []
        reports: dict[str, contract.Report] = {}
        for entry in entries:
            try:
                mirrors.append(entry.mirror())
            except models.InvalidSpec as exc:
                reports[entry.name] = contract.Report(entry.generation, contract.STATE_FAILED, str(exc))
        try:
            outcome = engine.apply(mirrors, self.settings.engine, log.info)
            drift = [n for n in outcome.notes if "edited since regmirror wrote it" in n]
            for m in mirrors:
                # "restarted" answers: did applying this generation restart the runtime? A later apply of the
                # same generation (another RegistryMirror changed) must not turn that into a no.
                before = self.reporter.sent.get(m.name)
                restarted = outcome.restarted or bool(
                    before and before.generation == m.generation and before.state == contract.STATE_APPLIED
                    and before.restarted)
                reports[m.name] = contract.Report(m.generation, contract.STATE_APPLIED, "; ".join(drift), restarted)
            if outcome.changed:
                log.info("node now has %d mirror set(s)%s", len(mirrors),
                         ", containerd restarted" if outcome.restarted else "")
            for note in outcome.notes:
                log.warning("%s", note)
        except (engine.EngineError, models.InvalidSpec) as exc:
            log.error("applying failed, node unchanged: %s", exc)
            for m in mirrors:
                reports[m.name] = contract.Report(m.generation, contract.STATE_FAILED, str(exc))
        for name, report in sorted(reports.items()):
            self.reporter.report(name, report)
        self.reporter.forget_others(set(reports))

    # --- the watch loop --------------------------------------------------------------------------------

    def _list(self) -> str:
        """List the one ConfigMap; remember its data; return the resourceVersion to watch from."""
        result = self.client.get(CONFIGMAPS, **SELECTOR)
        items = result.get("items") or []
        self.data = ((items[0].get("data") or {}).get(contract.CONFIGMAP_KEY)) if items else None
        return str(result["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str | None:
        """Follow the ConfigMap; return the version to resume from, or None when a fresh list is needed."""
        for event in self.client.watch(CONFIGMAPS, {**SELECTOR, "resourceVersion": version}, self.settings.resync):
            if self.stop.is_set():
                return version
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                log.info("watch expired (%s): listing again", obj.get("message"))
                return None
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            data = None if kind == "DELETED" else (obj.get("data") or {}).get(contract.CONFIGMAP_KEY)
            if kind == "DELETED":
                log.warning("the ConfigMap was deleted: leaving the node as it is until it is back")
            if data != self.data:
                self.data = data
                self.reconcile()
        self.reconcile()  # the periodic resync: repairs drift on the node
        return version

    def run(self) -> None:
        backoff = 1.0
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self._list()
                    self.reconcile()
                version = self._watch(version)
                backoff = 1.0
            except ApiError as exc:
                log.warning("apiserver: %s; node left as it is, retrying in %.0fs", exc, backoff)
                version = None
                self.stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.max_backoff)


def main(argv: Sequence[str] | None = None, *, install_signals: bool = True,
         make_client: Callable[[], Client] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="regmirror agent",
                                     description="watch the desired state and keep this node's runtime on it")
    parser.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name ($NODE_NAME)")
    parser.add_argument("--root", default=os.environ.get("REGMIRROR_ROOT", "/"))
    parser.add_argument("--restart", default=os.environ.get("REGMIRROR_RESTART", "auto"))
    parser.add_argument("--runtime", default=os.environ.get("REGMIRROR_RUNTIME", "auto"))
    parser.add_argument("--resync", type=int, default=int(os.environ.get("REGMIRROR_RESYNC_SECONDS", "300")))
    parser.add_argument("--health-timeout", type=float,
                        default=float(os.environ.get("REGMIRROR_HEALTH_TIMEOUT", "60")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("REGMIRROR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(message)s")
    if not args.node:
        parser.error("the node name is required: --node or $NODE_NAME (downward API spec.nodeName)")
    settings = AgentSettings(node=args.node, resync=args.resync, engine=engine.Settings(
        root=args.root, restart=args.restart, runtime=args.runtime, health_timeout=args.health_timeout))
    stop = threading.Event()
    client = make_client() if make_client else Client(load_config())
    agent = Agent(settings, client, stop)
    if install_signals:
        def on_signal(*_: object) -> None:
            stop.set()
            if not agent.busy:  # idle in a watch: leave now; mid-apply: finish it first
                raise SystemExit(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    log.info("regmirror agent for node %s, root %s, resync %ss", args.node, args.root, args.resync)
    agent.run()
    return 0
