"""One module per container runtime, each a pure planner from desired mirrors to file contents, and a reader
of what the runtime will use now (``describe``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Effective:
    """What a runtime uses for one registry: its mirrors in order, and the file that says so."""

    registry: str
    mirrors: tuple[str, ...]
    source: str
