"""What regmirror owns on a node and what the node had before: the records that make ``reset`` exact.

For every file regmirror wrote we keep the node's own content (``original``, ``None`` when the file did not
exist) and a hash of what regmirror last wrote. When the file still holds exactly that, the node's own
bytes come back untouched. When someone edited it since, the runtime module undoes only the keys regmirror
owns, so their edit survives too. A record exists only while the file differs from the node's own content.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Callable, Mapping

from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import FileChange, Plan, sha256
from regmirror_api.errors import Refused

STATE_VERSION = 1


class CorruptState(Refused, ValueError):
    """The state file cannot be read; nothing is changed until a human looks at it."""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    original: str | None
    written_sha256: str


@dataclasses.dataclass(frozen=True)
class State:
    runtime: str = ""
    files: Mapping[str, FileRecord] = dataclasses.field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    """Directories regmirror created, removed again once it no longer writes into them."""

    @property
    def empty(self) -> bool:
        return not self.files and not self.dirs


def check_state_types(raw: object, where: str) -> None:
    """Refuse a state file of the wrong shape before any of it is used (a hand edit, another tool, a bug): a
    record regmirror cannot read must stop the run with its name, never halfway through a plan."""
    def wrong(what: str, value: object, expected: str) -> CorruptState:
        return CorruptState(f"{where}: {what} = {json.dumps(value)[:120]} should be {expected}; not a state file "
                            f"this regmirror wrote. Move it aside only if you are sure the node's files hold "
                            f"their own configuration")

    if not isinstance(raw, dict):
        raise wrong("the file", raw, "a JSON object")
    if not isinstance(raw.get("runtime", ""), str):
        raise wrong("runtime", raw["runtime"], "a string")
    dirs = raw.get("dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        raise wrong("dirs", dirs, "a list of paths")
    files = raw.get("files")
    if not isinstance(files, dict):
        raise wrong("files", files, "an object of records by path")
    for path, rec in files.items():
        if not isinstance(rec, dict):
            raise wrong(f"files[{path!r}]", rec, "a record object")
        if "original" not in rec or not isinstance(rec["original"], (str, type(None))):
            raise wrong(f"files[{path!r}].original", rec.get("original"), "the node's own text or null")
        if not isinstance(rec.get("writtenSha256"), str):
            raise wrong(f"files[{path!r}].writtenSha256", rec.get("writtenSha256"), "a SHA-256 digest")
        pending = rec.get("pendingSha256", [])
        if not isinstance(pending, list) or not all(isinstance(d, str) for d in pending):
            raise wrong(f"files[{path!r}].pendingSha256", pending, "a list of SHA-256 digests")


def parse_state(text: str | None, where: str) -> State:
    if text is None:
        return State()
    try:
        raw = json.loads(text)
        if raw.get("version") != STATE_VERSION:
            raise CorruptState(f"{where}: state version {raw.get('version')!r}, this regmirror reads {STATE_VERSION}")
        check_state_types(raw, where)
        files = {path: FileRecord(rec["original"], rec["writtenSha256"]) for path, rec in raw["files"].items()}
        return State(runtime=raw.get("runtime", ""), files=files, dirs=tuple(raw.get("dirs", [])))
    except CorruptState:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptState(f"{where}: not a regmirror state file ({exc}); move it aside only if you are sure "
                           f"the node's files hold their own configuration") from exc


def render_state(state: State) -> str | None:
    """Deterministic JSON, or ``None`` when there is nothing to remember (the file is then removed)."""
    if state.empty:
        return None
    return json.dumps({
        "version": STATE_VERSION,
        "runtime": state.runtime,
        "files": {p: {"original": r.original, "writtenSha256": r.written_sha256}
                  for p, r in sorted(state.files.items())},
        "dirs": sorted(state.dirs),
    }, indent=2, sort_keys=True) + "\n"


def intent_state(before: str | None, after: str | None) -> str | None:
    """What to record while an apply is under way: old and new records together, so whatever point an apply
    stops at, every file's original is still known."""
    if before is None or after is None:
        return after if before is None else before
    old, new = parse_state(before, "state"), parse_state(after, "state")
    return render_state(State(runtime=new.runtime or old.runtime, files={**old.files, **new.files},
                              dirs=tuple(set(old.dirs) | set(new.dirs))))


def pristine(path: str, current: str | None, state: State,
             undo: Callable[[str, str | None, str | None], str | None]) -> str | None:
    """The node's own content of ``path``: what it would hold had regmirror never touched it.

    ``undo(path, current, original)`` strips regmirror's keys from a file someone edited since regmirror
    wrote it; for files regmirror owns whole it can simply return ``original``.
    """
    record = state.files.get(path)
    if record is None:
        return current
    if sha256(current) == record.written_sha256:
        return record.original
    return undo(path, current, record.original)


def plan_owned_files(*, runtime: str, view: NodeView, state: State, state_path: str,
                     desired: Mapping[str, str], restart_paths: frozenset[str] = frozenset(),
                     undo: Callable[[str, str | None, str | None], str | None],
                     notes: tuple[str, ...] = ()) -> Plan:
    """Turn the desired content of every file regmirror wants to own into a Plan.

    Files regmirror owned before and no longer wants get their node's own content back; a record is kept
    only while a file differs from that content. ``restart_paths`` are the files whose change needs the
    runtime restarted.
    """
    changes: list[FileChange] = []
    records: dict[str, FileRecord] = {}
    drift: list[str] = []
    for path in sorted(set(state.files) | set(desired)):
        current = view.read(path)
        own = pristine(path, current, state, undo)
        record = state.files.get(path)
        if record is not None and sha256(current) != record.written_sha256:
            drift.append(path)
        target = desired.get(path, own)
        if target != current:
            changes.append(FileChange(path, current, target))
        if target != own:
            records[path] = FileRecord(original=own, written_sha256=sha256(target) or "")

    # Directories: create what the new files need, remove what regmirror created and no longer needs.
    needed: set[str] = set()
    mkdirs: list[str] = []
    written = [p for p in desired if p in records] + ([state_path] if records else [])
    for path in written:
        parent = posixpath.dirname(path)
        while parent != "/" and (parent in state.dirs or not view.is_dir(parent)):
            needed.add(parent)
            if not view.is_dir(parent) and parent not in mkdirs:
                mkdirs.append(parent)
            parent = posixpath.dirname(parent)
    rmdirs = sorted((d for d in state.dirs if d not in needed), key=lambda d: -d.count("/"))
    dirs = tuple(sorted(needed))
    new_state = State(runtime=runtime if records or dirs else "", files=records, dirs=dirs)
    drift_notes = tuple(f"{p} was edited since regmirror wrote it; regmirror's settings are put back"
                        for p in drift if p in desired)
    return Plan(runtime=runtime, changes=tuple(changes),
                restart=any(c.path in restart_paths for c in changes),
                mkdirs=tuple(sorted(mkdirs, key=lambda d: d.count("/"))), rmdirs=tuple(rmdirs),
                notes=notes + drift_notes, state_path=state_path,
                state_before=render_state(state), state_after=render_state(new_state))
