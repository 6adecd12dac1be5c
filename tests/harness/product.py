"""Running the product under test the way a user does, and reading what it left on a node.

``regmirror`` runs the installed command in a subprocess (its exit code and output are part of what is
tested); ``snapshot`` and ``contents`` are what "writes nothing" and "gives the node back exactly" are
checked against.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from regmirror_agent.plans import FileChange, Plan

CONFIG_TOML = "/etc/containerd/config.toml"


def regmirror(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regmirror_agent.cli", *args], capture_output=True, text=True,
                          timeout=180, check=False, env=None if env is None else dict(env))


def snapshot(folder: Path, keep: Callable[[Path], bool] = lambda _: True) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (that ``keep`` accepts) with its bytes and mtime in ns.

    A file or folder removed while the snapshot is taken (an agent resetting the node as a test polls it) is
    simply not in it: a poll then sees the node as it is a moment later, never an error of its own."""
    found: dict[str, tuple[bytes, int]] = {}
    for top, _, names in os.walk(folder):  # os.walk skips a folder that is gone before it is listed
        for path in (Path(top) / name for name in names):
            try:
                if not path.is_file() or not keep(path):
                    continue
                with path.open("rb") as f:
                    found[str(path.relative_to(folder))] = (f.read(), os.fstat(f.fileno()).st_mtime_ns)
            except FileNotFoundError:
                continue
    return dict(sorted(found.items()))


def contents(folder: Path, keep: Callable[[Path], bool] = lambda _: True) -> dict[str, bytes]:
    """Every file under ``folder`` (that ``keep`` accepts) with its bytes."""
    return {name: data for name, (data, _) in snapshot(folder, keep).items()}


def with_broken_config(plan: Plan, extra_toml: str) -> Plan:
    """``plan`` with ``extra_toml`` appended to its new config.toml: a file the planner would never write (for
    example inline mirrors beside config_path), so a test can prove the engine's health check and rollback."""
    config = next(c for c in plan.changes if c.path == CONFIG_TOML)
    assert config.after is not None
    broken = FileChange(config.path, config.before, config.after + extra_toml)
    return Plan(**{**plan.__dict__, "changes": tuple(broken if c is config else c for c in plan.changes)})


__all__ = ["contents", "regmirror", "snapshot", "with_broken_config"]
