"""How the node engine runs on this node."""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

from regmirror_agent import observing
from regmirror_agent.defaults import CONFIG_FILE, DAEMON_JSON, DEFAULT_STATE_DIR, STATE_FILE


@dataclasses.dataclass(frozen=True)
class Settings:
    root: str = "/"
    """The node's filesystem root: ``/`` on the node, the host mount inside the agent's pod."""
    runtime: str = "auto"
    restart: str = "auto"
    """never | auto | systemd | command:CMD (a shell command run as given, for nodes without systemd)."""
    mode: str = "auto"
    """containerd only: auto | hosts | inline."""
    dry_run: bool = False
    state_dir: str = DEFAULT_STATE_DIR
    config_file: str = CONFIG_FILE
    daemon_json: str = DAEMON_JSON
    containerd_address: str | None = None
    """containerd's socket for the health check; default: config.toml's ``[grpc] address``."""
    docker_host: str | None = None
    """dockerd's address for confirming a reload (``docker --host``); default: ``$DOCKER_HOST`` or docker's own."""
    health_timeout: float = 60.0
    host: Any = None
    """A ``restarting.Host``: how host commands run; detected (direct or nsenter into PID 1) when not given."""

    @property
    def state_path(self) -> str:
        return posixpath.join(self.state_dir, STATE_FILE)

    def request_settings(self) -> dict[str, Any]:
        return observing.request_settings(self.runtime, self.mode, self.config_file, self.daemon_json, self.state_dir)
