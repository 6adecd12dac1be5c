"""Docker's driver: ``runtimes.docker`` plans ``registry-mirrors`` in daemon.json; dockerd re-reads it on
``systemctl reload docker`` (no restart, no restart budget), proven by ``docker info`` reporting the mirrors."""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Sequence

from regmirror_agent import ownership
from regmirror_agent.drivers.interface import RELOAD, Activation, Driver, LeftOut, check_parses, holds_files
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.restarting import Host, RestartFailed, restart_runtime, wait_docker_mirrors
from regmirror_agent.runtimes import Effective, containerd, docker
from regmirror_agent.settings import Settings
from regmirror_api import models


class Docker(Driver):
    name = docker.RUNTIME
    kind = RELOAD
    activated = "reloaded and confirmed"
    verifiable = False

    def claims(self, node: NodeView, settings: Settings) -> bool:
        """Its daemon.json or a non-empty /etc/docker, and no containerd config.toml with the CRI plugin on (nor
        anything in /etc/containerd when config.toml is absent): Docker's bundled containerd ships with CRI off."""
        if node.read(settings.daemon_json) is None and not holds_files(node, posixpath.dirname(settings.daemon_json)):
            return False
        text = node.read(settings.config_file)
        if text is None:
            return not holds_files(node, posixpath.dirname(settings.config_file))
        try:
            containerd.check_cri_enabled(tomllib.loads(text), settings.config_file)
        except (tomllib.TOMLDecodeError, containerd.NodeRefused):
            return True
        return False

    def plan_checked(self, desired: Sequence[models.RegistryMirror], node: NodeView, state: ownership.State,
                     settings: Settings, host: Host, left_out: LeftOut) -> Plan:
        return docker.plan_docker(desired, node, state, docker.Options(settings.daemon_json, settings.state_path))

    def credentials_refusal(self, settings: Settings) -> tuple[str, str] | None:
        return docker.NO_CREDENTIALS

    def describe(self, node: NodeView, settings: Settings) -> tuple[str, list[Effective]]:
        return docker.describe(node, settings.daemon_json)

    def check(self, plan: Plan, settings: Settings, host: Host, node: NodeRoot) -> None:
        check_parses(plan, lambda path: path == settings.daemon_json, docker.parse_daemon_json, docker.DockerRefused)

    def steps(self, plan: Plan, settings: Settings) -> Sequence[Plan]:
        if settings.restart == "never":
            return (plan,)
        return docker.removal_bridge(plan, settings.daemon_json) or (plan,)

    def activate(self, settings: Settings, host: Host, node: NodeRoot, *, must_be_new: bool = True) -> Activation:
        try:
            command = restart_runtime(host, self.name, settings.restart, verb=self.kind)
        except RestartFailed as exc:
            return Activation(self.kind, "", str(exc))
        text = node.read(settings.daemon_json)
        expected = docker.parse_daemon_json(text, settings.daemon_json).get(docker.KEY) if text else None
        if expected is None:
            return Activation(self.kind, command)  # dockerd keeps what it had; nothing to confirm (removal_bridge)
        return Activation(self.kind, command, wait_docker_mirrors(host, settings.docker_host, list(expected),
                                                                  min(settings.health_timeout, 30)))
