"""Node file trees for tests: load a folder as ``{node path: text}`` and apply a Plan to such a dict.

Applying in memory lets golden tests pin the planner exactly; the engine's real writes are proven on disk
in ``test_engine_on_disk.py`` and on real containerd in ``tests/integration``.
"""

from __future__ import annotations

from pathlib import Path

from regmirror_agent.plans import Plan

#: A schema-2 config.toml with the CRI registry table and nothing mirrored: the smallest node to start from.
V2 = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = ""\n'


def node_root(tmp_path: Path, config: str | None = V2, name: str = "node") -> Path:
    """A node's root folder holding ``config`` as its config.toml (none if ``None``)."""
    root = tmp_path / name
    (root / "etc/containerd").mkdir(parents=True)
    if config is not None:
        (root / "etc/containerd/config.toml").write_text(config)
    return root


def load_tree(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {"/" + p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_tree(folder: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        target = folder / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def apply_in_memory(plan: Plan, files: dict[str, str]) -> dict[str, str]:
    """The node's files after ``plan``, with the ownership state file included like on disk."""
    result = dict(files)
    for change in plan.changes:
        if result.get(change.path) != change.before:
            raise AssertionError(f"plan expected {change.path} to hold different content")
        if change.after is None:
            result.pop(change.path, None)
        else:
            result[change.path] = change.after
    if plan.state_after is None:
        result.pop(plan.state_path, None)
    else:
        result[plan.state_path] = plan.state_after
    return result


def without(files: dict[str, str], folder: str) -> dict[str, str]:
    return {p: t for p, t in files.items() if not p.startswith(folder.rstrip("/") + "/")}
