"""CRI-O's driver: ``runtimes.crio`` plans regmirror's registries.conf.d drop-in; CRI-O re-reads it on SIGHUP
(``systemctl reload crio``; no restart, no restart budget). CRI-O does not tell whether it took the files (an
invalid one is kept out, said only in its log), which is why every planned file is parsed back first."""

from __future__ import annotations

from collections.abc import Sequence

from regmirror_agent import ownership
from regmirror_agent.drivers.interface import RELOAD, Activation, Driver, LeftOut, check_parses
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.restarting import Host, RestartFailed, restart_runtime
from regmirror_agent.runtimes import Effective, crio
from regmirror_agent.settings import Settings
from regmirror_api import models


class Crio(Driver):
    name = crio.RUNTIME
    kind = RELOAD
    activated = "reloaded"
    verifiable = False

    def claims(self, node: NodeView, settings: Settings) -> bool:
        return crio.has_crio(node) and node.read(settings.config_file) is None  # and no containerd beside it

    def plan_checked(self, desired: Sequence[models.RegistryMirror], node: NodeView, state: ownership.State,
                     settings: Settings, host: Host, left_out: LeftOut) -> Plan:
        return crio.plan_crio(desired, node, state, crio.Options(state_path=settings.state_path))

    def credentials_refusal(self, settings: Settings) -> tuple[str, str] | None:
        return crio.NO_CREDENTIALS

    def describe(self, node: NodeView, settings: Settings) -> tuple[str, list[Effective]]:
        return crio.describe(node)

    def check(self, plan: Plan, settings: Settings, host: Host, node: NodeRoot) -> None:
        check_parses(plan, lambda path: path == crio.DROP_IN, crio.parse_entries, crio.CrioRefused)

    def activate(self, settings: Settings, host: Host, node: NodeRoot, *, must_be_new: bool = True) -> Activation:
        """SIGHUP CRI-O (it re-reads registries.conf and its drop-ins); healthy once that was sent."""
        if settings.restart.startswith("command:"):
            try:
                command = restart_runtime(host, self.name, settings.restart)
            except RestartFailed as exc:
                return Activation(self.kind, "", str(exc))
            return Activation(self.kind, command)
        argv = crio.reload_argv(settings.restart, host.has("systemctl"))
        result = host.run(argv, timeout=60)
        return Activation(self.kind, " ".join(argv), "" if result.returncode == 0 else (
            f"{' '.join(argv)} exited {result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}"))
