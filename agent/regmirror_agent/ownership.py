"""What regmirror owns on a node and what the node had before: the records that make ``reset`` exact.

For every file regmirror wrote we keep the node's own content (``original``, ``None`` when the file did not
exist) and a hash of what regmirror last wrote (and, once a login made regmirror narrow a file of the node's to
its owner, the node's own permission bits). When the file still holds exactly that, the node's own
bytes come back untouched. When someone edited it since, the runtime module undoes only the keys regmirror
owns, so their edit survives too. A record exists only while the file differs from the node's own content.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from collections.abc import Callable, Mapping

from regmirror_agent import credentials
from regmirror_agent.nodeviews import NEW_FILE_MODE, NodeView
from regmirror_agent.plans import FileChange, Plan, sha256
from regmirror_api.errors import Refused

STATE_VERSION = 1


class CorruptState(Refused, ValueError):
    """The state file cannot be read; nothing is changed until a human looks at it."""


@dataclasses.dataclass(frozen=True)
class FileRecord:
    original: str | None
    written_sha256: str
    written: str | None = None
    """What regmirror wrote, kept for files the node had before (the ones it edits in part), so a hand edit
    made since can be carried onto the node's own bytes line for line (``merge3``)."""
    pending: tuple[str, ...] = ()
    """While an apply is under way: what the file held from the previous apply, written from the same
    ``original``. A run stopped before the file was rewritten leaves it holding that, which is no hand edit."""
    mode: int | None = None
    """The node's own permission bits of a file it had, kept from the moment regmirror first wrote a login into
    it (readable by root only) for as long as the record lives: the file gets them back with the node's text."""

    def wrote(self, text: str | None) -> bool:
        digest = written_digest(text)
        return digest == self.written_sha256 or any(digest == sha256(p) for p in self.pending)


def written_digest(text: str | None) -> str | None:
    """The digest a record keeps of what regmirror wrote: of the text with any Authorization header redacted
    (``credentials``), because a hash of a file whose only unknown is a weak password gives the password away.
    A hand edit of the header value alone is therefore no drift (the next plan writes the header again anyway)."""
    return sha256(None if text is None else credentials.redact(text))


def kept_text(text: str | None) -> str | None:
    """What a record may keep of a file's text: nothing of a file that carries credentials."""
    return None if text is None or credentials.holds_secret(text) else text


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
        mode = rec.get("mode")
        if mode is not None and not (isinstance(mode, str) and re.fullmatch(r"0[0-7]{3}", mode)):
            raise wrong(f"files[{path!r}].mode", mode, "permission bits in octal, as \"0644\"")
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
        files = {path: FileRecord(rec["original"], rec["writtenSha256"], rec.get("written"),
                                  tuple(rec.get("pending", ())),
                                  None if rec.get("mode") is None else int(rec["mode"], 8))
                 for path, rec in raw["files"].items()}
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
        "files": {p: {"original": r.original, "writtenSha256": r.written_sha256,
                      **({"written": r.written} if r.written is not None else {}),
                      **({"pending": list(r.pending)} if r.pending else {}),
                      **({"mode": f"{r.mode:04o}"} if r.mode is not None else {})}
                  for p, r in sorted(state.files.items())},
        "dirs": sorted(state.dirs),
    }, indent=2, sort_keys=True) + "\n"


def intent_state(before: str | None, after: str | None) -> str | None:
    """What to record while an apply is under way: old and new records together, so whatever point an apply
    stops at, every file's original is still known."""
    if before is None or after is None:
        return after if before is None else before
    old, new = parse_state(before, "state"), parse_state(after, "state")
    files = {**old.files, **new.files}
    for path, rec in new.files.items():
        was = old.files.get(path)
        if was is not None and was.original == rec.original and was.written_sha256 != rec.written_sha256 \
                and was.written is not None:
            files[path] = dataclasses.replace(rec, pending=(was.written,))
    return render_state(State(runtime=new.runtime or old.runtime, files=files,
                              dirs=tuple(set(old.dirs) | set(new.dirs))))


Same = Callable[[str, str, str], bool]


def same_text(_: str, a: str, b: str) -> bool:
    """Files regmirror owns whole: a hand edit of regmirror's content is not carried onto the node's own."""
    return False


def pristine(path: str, current: str | None, state: State,
             undo: Callable[[str, str | None, str | None], str | None], same: Same = same_text) -> str | None:
    """The node's own content of ``path``: what it would hold had regmirror never touched it.

    ``undo(path, current, original)`` strips regmirror's keys from a file someone edited since regmirror
    wrote it; for files regmirror owns whole it can simply return ``original``. A parser rewrites what it
    keeps (tomlkit re-indents some tables), so when what regmirror wrote is known, the hand edit is carried
    onto the node's own bytes line for line instead, and that is used when ``same(path, a, b)`` says it
    means what ``undo`` meant. A file regmirror owns whole has no ``same``: its node's own bytes come back.
    """
    record = state.files.get(path)
    if record is None:
        return current
    if record.wrote(current):
        return record.original
    undone = undo(path, current, record.original)
    if undone is None or current is None or record.original is None:
        return undone
    for base in (record.written, *record.pending):
        if base is None:
            continue
        merged = merge3(base, current, record.original)
        if merged is not None and same(path, merged, undone):
            return merged
    return undone


def merge3(base: str, ours: str, theirs: str) -> str | None:
    """The line changes from ``base`` to ``ours``, made on ``theirs``; None when a changed line is not in
    ``theirs`` (both sides changed it). No context lines are needed: a hand edit next to a table regmirror
    rewrote still lands on the node's own line."""
    import difflib

    b, o, t = (x.splitlines(keepends=True) for x in (base, ours, theirs))
    in_t: dict[int, int] = {}
    for block in difflib.SequenceMatcher(None, b, t, autojunk=False).get_matching_blocks():
        in_t.update({block.a + k: block.b + k for k in range(block.size)})
    replace: dict[int, list[str]] = {}
    insert: dict[int, list[str]] = {}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, b, o, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if i1 == i2:  # lines added: after the base line before them, else before the one after them
            if i1 == 0 or i1 - 1 in in_t:
                at = in_t[i1 - 1] + 1 if i1 else 0
            elif i1 in in_t:
                at = in_t[i1]
            else:
                return None
            insert.setdefault(at, []).extend(o[j1:j2])
            continue
        if any(k not in in_t for k in range(i1, i2)):
            return None
        targets = [in_t[k] for k in range(i1, i2)]
        if targets != list(range(targets[0], targets[0] + len(targets))):
            return None
        for k in targets:
            replace[k] = []
        replace[targets[0]] = o[j1:j2]
    out: list[str] = []
    for index, line in enumerate(t):
        out += insert.get(index, [])
        out += replace.get(index, [line])
    out += insert.get(len(t), [])
    return "".join(out)


def _own_mode(view: NodeView, path: str, current: str | None, target: str | None,
              record: FileRecord | None) -> int | None:
    """The node's own permission bits of ``path``, where regmirror narrows them: recorded before the first login
    is written into a file of the node's (``write_atomic`` makes it readable by its owner only), kept after."""
    if record is not None and record.mode is not None:
        return record.mode
    if current is not None and not credentials.holds_secret(current) and target is not None \
            and credentials.holds_secret(target):
        return view.mode(path)
    return None


def _change(view: NodeView, path: str, current: str | None, target: str | None, own: str | None,
            own_mode: int | None) -> FileChange:
    """A file's change, with the bits to write it with where a login leaves it: the node's own again (0644 for a
    file regmirror made), not the owner-only bits the login needed."""
    login_before = current is not None and credentials.holds_secret(current)
    login_after = target is not None and credentials.holds_secret(target)
    if login_before == login_after:
        return FileChange(path, current, target)
    mode = (own_mode if own is not None else NEW_FILE_MODE) if login_before and target is not None else None
    # The bits before, for the inverse (a roll back): a login going in narrows them, one going out widens them.
    return FileChange(path, current, target, mode=mode, mode_before=None if current is None else view.mode(path))


def plan_owned_files(*, runtime: str, view: NodeView, state: State, state_path: str,
                     desired: Mapping[str, str], restart_paths: frozenset[str] = frozenset(),
                     undo: Callable[[str, str | None, str | None], str | None],
                     notes: tuple[str, ...] = (), same: Same = same_text) -> Plan:
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
        own = pristine(path, current, state, undo, same)
        record = state.files.get(path)
        if record is not None and not record.wrote(current):
            drift.append(path)
        target = desired.get(path, own)
        own_mode = _own_mode(view, path, current, target, record)
        if target != current:
            changes.append(_change(view, path, current, target, own, own_mode))
        if target != own:
            # The node's own text (``original``) is kept whole, as before: it is the node's, and what reset
            # writes back. Of regmirror's own text, a file with credentials keeps only a redacted digest.
            records[path] = FileRecord(original=own, written_sha256=written_digest(target) or "",
                                       written=kept_text(target) if own is not None else None,
                                       mode=own_mode if own is not None else None)

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
    # Only a file regmirror rewrites had something of regmirror's put back: a hand edit that left regmirror's
    # keys alone (the node's own settings in a file it edits in part) is kept, and reported as nothing.
    changed = {c.path for c in changes}
    repaired = tuple(p for p in drift if p in desired and p in changed)
    drift_notes = tuple(f"{p} was edited since regmirror wrote it; regmirror's settings are put back"
                        for p in repaired)
    return Plan(runtime=runtime, changes=tuple(changes),
                restart=any(c.path in restart_paths for c in changes),
                mkdirs=tuple(sorted(mkdirs, key=lambda d: d.count("/"))), rmdirs=tuple(rmdirs),
                notes=notes + drift_notes, drift=repaired, state_path=state_path,
                state_before=render_state(state), state_after=render_state(new_state))
