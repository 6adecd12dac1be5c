"""containerd's driver: ``runtimes.containerd`` plans config.toml and hosts.toml; containerd itself checks a new
config.toml before it is written (``containerd config dump``); a change to config.toml is put in force by a
restart (containerd has no reload), proven by ``ctr plugins ls`` showing the CRI plugin ``ok`` and by a new
process serving the socket."""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import tempfile
import tomllib
from collections.abc import Sequence

from regmirror_agent import applying, ownership
from regmirror_agent.drivers.interface import RESTART, Activation, Driver, LeftOut, check_parses
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.restarting import (
    Host,
    RestartFailed,
    containerd_version,
    restart_runtime,
    server_pid,
    wait_cri_healthy,
)
from regmirror_agent.runtimes import Effective, containerd
from regmirror_agent.settings import Settings
from regmirror_api import models

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


class Containerd(Driver):
    name = containerd.RUNTIME
    kind = RESTART
    activated = "restarted and healthy"
    verifiable = True

    def claims(self, node: NodeView, settings: Settings) -> bool:
        return True  # the default: asked last (see drivers.DETECTION_ORDER)

    def plan_checked(self, desired: Sequence[models.RegistryMirror], node: NodeView, state: ownership.State,
                     settings: Settings, host: Host, left_out: LeftOut) -> Plan:
        version = functools.cache(lambda: containerd_version(host))
        return containerd.plan_containerd(desired, node, state, containerd.Options(
            mode=settings.mode, config_file=settings.config_file, containerd_version=version,
            state_path=settings.state_path, left_out=dict(left_out)))

    def describe(self, node: NodeView, settings: Settings) -> tuple[str, list[Effective]]:
        return containerd.describe(node, settings.config_file)

    def credentials_refusal(self, settings: Settings) -> tuple[str, str] | None:
        """Inline mode by setting; inline chosen for containerd's age (before 1.5) is left to the planner."""
        if settings.mode == "inline":
            return containerd.INLINE_NO_CREDENTIALS
        return None

    def check(self, plan: Plan, settings: Settings, host: Host, node: NodeRoot) -> None:
        check_parses(plan, lambda path: path == settings.config_file or posixpath.basename(path) == "hosts.toml",
                     lambda text, _: tomllib.loads(text), containerd.NodeRefused)
        config = next((c for c in plan.changes if c.path == settings.config_file and c.after), None)
        if config is not None and config.after:
            check_config(settings, host, node, config.after)

    def activate(self, settings: Settings, host: Host, node: NodeRoot, *, must_be_new: bool = True) -> Activation:
        """containerd reads config.toml only when it starts, so a restart command that returns 0 without
        restarting it (a wrong unit, a no-op wrapper) would leave the old configuration in force while the node
        reports Applied. So the process serving the socket must be a new one (``must_be_new``)."""
        address = socket_address(settings, node)
        before = server_pid(host, address)
        try:
            command = restart_runtime(host, self.name, settings.restart)
        except RestartFailed as exc:
            return Activation(self.kind, "", str(exc))
        ok, detail = wait_cri_healthy(host, address, settings.health_timeout)
        if not ok:
            return Activation(self.kind, command, detail)
        after = server_pid(host, address)
        if must_be_new and before is not None and after == before:
            return Activation(self.kind, command, (
                f"{command!r} returned, but containerd was not restarted: the same process ({before}) still "
                f"serves {address} with the configuration it read when it started, so the change is not in force"))
        return Activation(self.kind, command)


def check_config(settings: Settings, host: Host, node: NodeRoot, text: str) -> None:
    """Let containerd itself parse the new config.toml (syntax, types, version) before anything is written.

    Relative ``imports`` resolve against the file's directory, so the check copy sits beside config.toml when
    containerd runs in the host's namespaces; run directly, a private temp folder does as well.
    """
    if not host.has("containerd"):
        return
    with tempfile.TemporaryDirectory(prefix="regmirror-check-") as tmp:
        if host.nsenter:
            # A temp name of regmirror's (see applying.clear_leftovers): a run killed mid-check leaves nothing
            # the next one does not remove.
            check_path = applying.temp_name(posixpath.join(posixpath.dirname(settings.config_file), "check.toml"))
            if not node.is_dir(posixpath.dirname(check_path)):
                return  # a brand-new minimal file of regmirror's own; tomllib already checked it
            fs_path, arg = node.fs_path(check_path), check_path
        else:
            fs_path = arg = os.path.join(tmp, "config.toml")
        with open(fs_path, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            result = host.run(["containerd", "--config", arg, "config", "dump"], timeout=30)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fs_path)
    if result.returncode != 0:
        raise containerd.NodeRefused(f"containerd rejects the planned {settings.config_file}: "
                                     f"{(result.stderr or result.stdout).strip()[-800:]}; nothing was changed")


def socket_address(settings: Settings, node: NodeRoot) -> str:
    """containerd's socket: ``settings.containerd_address``, else config.toml's ``[grpc] address``."""
    if settings.containerd_address:
        return settings.containerd_address
    try:
        doc = tomllib.loads(node.read(settings.config_file) or "")
    except tomllib.TOMLDecodeError:
        return DEFAULT_ADDRESS
    return str(doc.get("grpc", {}).get("address") or DEFAULT_ADDRESS)
