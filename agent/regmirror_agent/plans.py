"""What an apply would change: whole-file before/after pairs, so a plan can be shown, applied and undone."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib

from regmirror_agent import credentials


def sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class FileChange:
    """One file's content before and after; ``None`` means the file does not exist."""

    path: str
    before: str | None
    after: str | None
    mode: int | None = None
    """The permission bits to write ``after`` with; ``None`` keeps the file's own (a new file gets 0644). Either
    way, a text with a login in it is written readable by its owner only (``applying.write_atomic``)."""
    mode_before: int | None = None
    """The file's bits as planning saw them, where that matters for putting ``before`` back (``inverse``)."""

    def diff(self) -> str:
        """A unified diff, with every login redacted (``credentials.redact_for_view``): a rotated secret shows as
        no line change, which is all anyone reading a diff may see."""
        before = [] if self.before is None else credentials.redact_for_view(self.before).splitlines(keepends=True)
        after = [] if self.after is None else credentials.redact_for_view(self.after).splitlines(keepends=True)
        lines = difflib.unified_diff(before, after,
                                     "/dev/null" if self.before is None else f"a{self.path}",
                                     "/dev/null" if self.after is None else f"b{self.path}")
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)

    def inverse(self) -> FileChange:
        return FileChange(self.path, self.after, self.before, mode=self.mode_before, mode_before=self.mode)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything one apply does to a node. Applying it twice changes nothing the second time.

    ``state_before``/``state_after`` are the serialized ownership records (see ``ownership``); they are
    written around the file changes so an interrupted apply never loses what the node had.
    """

    runtime: str
    changes: tuple[FileChange, ...]
    restart: bool
    mkdirs: tuple[str, ...] = ()
    rmdirs: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    drift: tuple[str, ...] = ()
    """Managed files someone edited since regmirror wrote them, which this plan puts back (see ``notes``)."""
    state_path: str = ""
    state_before: str | None = None
    state_after: str | None = None
    request: str = ""
    """Identifies the request (desired set and settings) this plan answers; see ``observing``."""
    observed: dict[str, list[str]] | None = None
    """Everything planning read from the node; re-observed after a successful apply."""

    @property
    def changed(self) -> bool:
        return bool(self.changes or self.mkdirs or self.rmdirs or self.state_before != self.state_after)

    def diff(self) -> str:
        return "".join(c.diff() for c in self.changes)

    def inverse(self) -> Plan:
        """The plan that puts every file back as it was before this one (used to roll back)."""
        return dataclasses.replace(self, changes=tuple(c.inverse() for c in self.changes),
                                   mkdirs=tuple(reversed(self.rmdirs)), rmdirs=tuple(reversed(self.mkdirs)),
                                   state_before=self.state_after, state_after=self.state_before, notes=(), drift=(),
                                   observed=None)
