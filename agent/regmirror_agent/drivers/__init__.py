"""The container runtimes regmirror drives, each one implementation of ``Runtime`` (see ``interface``), and the
one place that chooses among them: ``named`` for a name, ``for_node`` for what a node's files say."""

from __future__ import annotations

from regmirror_agent import ownership
from regmirror_agent.drivers.containerd import Containerd
from regmirror_agent.drivers.crio import Crio
from regmirror_agent.drivers.docker import Docker
from regmirror_agent.drivers.interface import RELOAD, RESTART, Activation, LeftOut, Runtime, UnknownRuntime
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.settings import Settings

__all__ = ["ALL", "DETECTION_ORDER", "NAMES", "RELOAD", "RESTART", "Activation", "LeftOut", "Runtime",
           "UnknownRuntime", "for_node", "named"]

CONTAINERD, DOCKER, CRIO = Containerd(), Docker(), Crio()
ALL: tuple[Runtime, ...] = (CONTAINERD, DOCKER, CRIO)
NAMES = tuple(r.name for r in ALL)
#: Who claims a node first: CRI-O (its files, and no containerd config.toml beside them), then Docker (its files,
#: and no containerd with its CRI plugin on), then containerd, which claims every node.
DETECTION_ORDER: tuple[Runtime, ...] = (CRIO, DOCKER, CONTAINERD)


def named(name: str) -> Runtime:
    for runtime in ALL:
        if runtime.name == name:
            return runtime
    raise UnknownRuntime(f"runtime {name!r} is not one regmirror drives (expected one of {', '.join(NAMES)}); "
                         f"nothing was changed")


def for_node(node: NodeView, settings: Settings, state: ownership.State) -> Runtime:
    """The runtime to drive: ``settings.runtime`` unless ``auto``, else the one regmirror's records are for, else
    the first in ``DETECTION_ORDER`` that claims the node."""
    if settings.runtime != "auto":
        return named(settings.runtime)
    if state.runtime:
        return named(state.runtime)
    return next(r for r in DETECTION_ORDER if r.claims(node, settings))
