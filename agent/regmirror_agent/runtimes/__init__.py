"""One module per container runtime, each a pure planner from desired mirrors to file contents, and a reader
of what the runtime will use now (``describe``). What puts a plan in force on a node (the runtime's check of the
files, its reload or restart, its health) is each runtime's driver, in ``regmirror_agent.drivers``."""

from __future__ import annotations

import dataclasses

from regmirror_api.errors import Refused


@dataclasses.dataclass(frozen=True)
class Effective:
    """What a runtime uses for one registry: its mirrors in order, and the file that says so."""

    registry: str
    mirrors: tuple[str, ...]
    source: str


class RuntimeRefused(Refused):
    """A runtime cannot do what was asked, or its files cannot be worked with; nothing is changed. Each runtime
    refuses with its own subclass (``containerd.NodeRefused``, ``docker.DockerRefused``, ``crio.CrioRefused``);
    callers catch this one."""
