"""Running the product under test the way a user does, and reading what it left on a node.

``regmirror`` runs the installed command in a subprocess (its exit code and output are part of what is
tested); ``snapshot`` and ``contents`` are what "writes nothing" and "gives the node back exactly" are
checked against.
"""

from __future__ import annotations

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
    """Every file under ``folder`` (that ``keep`` accepts) with its bytes and mtime in ns."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and keep(p)}


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
