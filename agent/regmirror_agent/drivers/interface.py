"""What a container runtime is to the node engine: one small interface, implemented once per runtime.

The planners in ``runtimes/`` are pure (the import contracts hold them to it); a driver wraps one with what puts
its plan in force on a node: the pre-write check of the rendered files, the reload or restart, and the proof that
the runtime is healthy on them. ``drivers.named`` and ``drivers.for_node`` choose one, and the engine, the CLI and
the agent ask nothing else: none of them branches on a runtime's name. A new runtime is one planner, one driver
and one more run of the same conformance suite (``tests/unit/test_runtime_conformance.py``, and on the real
runtime ``tests/integration/test_runtime_conformance_real.py``).
"""

from __future__ import annotations

import dataclasses
import glob
import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from regmirror_agent import ownership
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.restarting import Host
from regmirror_agent.runtimes import Effective, RuntimeRefused
from regmirror_agent.settings import Settings
from regmirror_api import models

#: How a runtime puts a change in force. A restart stops the runtime (containerd: its containers keep running,
#: but the node's pulls and kubelet's calls fail meanwhile), so it counts against the cluster's restart budget;
#: a reload (SIGHUP) does not.
RESTART = "restart"
RELOAD = "reload"

#: registry -> mirror URLs that do not answer from this node (``mirrorhealth``); hosts mode leaves them out.
LeftOut = Mapping[str, frozenset[str]]


class UnknownRuntime(RuntimeRefused):
    """A runtime name no driver has (in regmirror's state file, or a setting that was not checked)."""


class UnsafeRegistry(RuntimeRefused):
    """A registry name or mirror URL that could escape the runtime's files (the model admits none such)."""


@dataclasses.dataclass(frozen=True)
class Activation:
    """What ``Runtime.activate`` did: its kind (``RESTART`` or ``RELOAD``), the command it ran ('' when none
    could run) and, when the runtime is not healthy on the files in place, why not ('' when it is)."""

    kind: str
    command: str
    problem: str = ""

    @property
    def healthy(self) -> bool:
        return not self.problem


class Runtime(Protocol):
    """One container runtime on a node, as the engine drives it."""

    @property
    def name(self) -> str:
        """The runtime's name: ``--runtime``, regmirror's state file and reports say it."""

    @property
    def kind(self) -> str:
        """``RESTART`` or ``RELOAD``: what ``activate`` does to put a change in force."""

    @property
    def activated(self) -> str:
        """How a person is told that ``activate`` put a change in force ("restarted and healthy")."""

    @property
    def verifiable(self) -> bool:
        """The agent's in-use check (``verifying``) can ask this runtime what it uses."""

    def claims(self, node: NodeView, settings: Settings) -> bool:
        """This runtime is the one the node's files say (asked in ``DETECTION_ORDER``, see ``for_node``)."""

    def plan(self, desired: Sequence[models.RegistryMirror], node: NodeView, state: ownership.State,
             settings: Settings, host: Host, left_out: LeftOut) -> Plan:
        """The node's whole configuration for ``desired`` (none: the node's own back). Pure but for ``host``,
        asked only when the answer matters (containerd's version). Raises ``RuntimeRefused``."""

    def describe(self, node: NodeView, settings: Settings) -> tuple[str, list[Effective]]:
        """``(a line about the runtime's configuration, what it uses per registry)`` for ``regmirror show``."""

    def check(self, plan: Plan, settings: Settings, host: Host, node: NodeRoot) -> None:
        """Before anything is written: refuse (``RuntimeRefused``) a planned file the runtime would not read."""

    def steps(self, plan: Plan, settings: Settings) -> Sequence[Plan]:
        """The plan as the writes to make in turn, each activated when it says ``restart`` (Docker's removal
        bridge); ``(plan,)`` for most."""

    def activate(self, settings: Settings, host: Host, node: NodeRoot, *, must_be_new: bool = True) -> Activation:
        """Reload or restart the runtime on the files in place and prove it healthy on them. ``must_be_new``: a
        restart must have started a new process (not for a rollback, whose files are in force either way)."""

    def needs_restart(self, plan: Plan) -> bool:
        """Would putting this plan in force stop the runtime (a restart, which the restart budget counts)?"""

    def credentials_refusal(self, settings: Settings) -> tuple[str, str] | None:
        """``(who, why)`` when this runtime, so set, cannot carry mirror credentials; None when it can. Its planner
        refuses them too; asked first, the agent fails only the RegistryMirrors with credentials."""


class Driver:
    """What every driver shares: the model's checks of names and URLs before any planner sees them, a plan that
    is one step, and a restart budget only for a runtime activated by a restart."""

    kind = RESTART

    def plan(self, desired: Sequence[models.RegistryMirror], node: NodeView, state: ownership.State,
             settings: Settings, host: Host, left_out: LeftOut) -> Plan:
        """Refuse a registry name or mirror URL the model would not admit (a RegistryMirror built by code rather
        than parsed): each becomes a path or a value in a runtime's file, so none may escape it; then plan."""
        problems = [problem for mirror in desired for problem in (
            models.check_registry(mirror.registry, f"RegistryMirror {mirror.name!r}: registry")
            + [p for m in mirror.mirrors for p in models.check_mirror_url(m.url, f"RegistryMirror {mirror.name!r}: "
                                                                                 f"mirror")])]
        if problems:
            raise UnsafeRegistry("; ".join(problems) + "; nothing was changed")
        return self.plan_checked(desired, node, state, settings, host, left_out)

    def plan_checked(self, desired: Sequence[models.RegistryMirror], node: NodeView, state: ownership.State,
                     settings: Settings, host: Host, left_out: LeftOut) -> Plan:
        """``plan`` of checked RegistryMirrors: the runtime's planner."""
        raise NotImplementedError

    def steps(self, plan: Plan, settings: Settings) -> Sequence[Plan]:
        return (plan,)

    def needs_restart(self, plan: Plan) -> bool:
        return self.kind == RESTART and plan.changed and plan.restart

    def credentials_refusal(self, settings: Settings) -> tuple[str, str] | None:
        return None


def check_parses(plan: Plan, wanted: Callable[[str], bool], parse: Callable[[str, str], object],
                 refused: type[RuntimeRefused]) -> None:
    """Parse back every planned file that ``wanted(path)`` selects, with ``parse(text, path)``; one the runtime
    could not read (``parse`` raises ``RuntimeRefused`` or ``ValueError``) is refused before anything is written."""
    for change in plan.changes:
        if change.after is not None and wanted(change.path):
            try:
                parse(change.after, change.path)
            except (RuntimeRefused, ValueError) as exc:
                raise refused(f"regmirror produced an invalid {change.path} ({exc}); nothing was changed") from exc


def holds_files(node: NodeView, folder: str) -> bool:
    """A folder with something in it. Only that says a runtime was set up here: the agent's DaemonSet mounts
    /etc/containerd and /etc/docker with ``DirectoryOrCreate``, so both exist, empty, on every node."""
    return bool(node.glob(posixpath.join(glob.escape(folder), "*")))
