"""The one place that writes to a node: atomic, durable, and checked against what was planned.

Each file is written to a temporary file in its own directory, fsynced, renamed over the old one and the
directory fsynced, so a process killed at any moment leaves the old file or the new one, never a mix. The
ownership state is written before the files (with every record old and new) and again after, so an
interrupted apply never loses what the node had before regmirror.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import stat
import time
from collections.abc import Iterator

from regmirror_agent import ownership
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.plans import FileChange, Plan

NEW_FILE_MODE = 0o644
STATE_FILE_MODE = 0o600


class Conflict(Exception):
    """A file changed between planning and writing; nothing of this apply was written."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: str, text: str, default_mode: int = NEW_FILE_MODE) -> None:
    """Replace ``target`` with ``text``, keeping an existing file's mode and owner."""
    directory, name = os.path.split(target)
    try:
        st = os.lstat(target)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except FileNotFoundError:
        mode, uid, gid = default_mode, -1, -1
    tmp = os.path.join(directory, f".{name}.regmirror-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fchmod(f.fileno(), mode)
            if uid != -1:
                os.fchown(f.fileno(), uid, gid)
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def remove_durably(target: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
        _fsync_dir(os.path.dirname(target))


def _write_state(node: NodeRoot, plan: Plan, text: str | None) -> None:
    target = node.fs_path(plan.state_path)
    if text is None:
        remove_durably(target)
        return
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    write_atomic(target, text, STATE_FILE_MODE)


def check_unchanged(node: NodeRoot, changes: tuple[FileChange, ...]) -> None:
    for change in changes:
        if node.read(change.path) != change.before:
            raise Conflict(f"{change.path} changed while regmirror was planning; nothing was written, run again")


@contextlib.contextmanager
def node_lock(root: str, timeout: float = 120.0) -> Iterator[None]:
    """One writer per node (the agent and a person's CLI may meet): an flock on the node root directory,
    which needs no lock file left behind and dies with the process."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Conflict(f"another regmirror is changing {root}; gave up after {timeout:.0f}s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _clear_stale_temp_files(directory: str) -> None:
    """Temp files of an apply that was killed mid-write; safe to remove under the node lock."""
    for stale in glob.glob(os.path.join(glob.escape(directory), ".*.regmirror-*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)


def apply_plan(plan: Plan, node: NodeRoot) -> None:
    """Make the node match ``plan``. Raises before writing anything if a planned-over file has changed."""
    check_unchanged(node, plan.changes)
    paths = {c.path: node.fs_path(c.path) for c in plan.changes}  # refuses symlinks before any write
    intent = ownership.intent_state(plan.state_before, plan.state_after)
    if intent != plan.state_before:
        _write_state(node, plan, intent)
    for directory in plan.mkdirs:
        with contextlib.suppress(FileExistsError):
            os.mkdir(node.fs_path(directory), 0o755)
    for directory in sorted({os.path.dirname(p) for p in paths.values()}):
        _clear_stale_temp_files(directory)
    for change in plan.changes:
        if change.after is None:
            remove_durably(paths[change.path])
        else:
            write_atomic(paths[change.path], change.after)
    if plan.state_after != intent:
        _write_state(node, plan, plan.state_after)
    for directory in plan.rmdirs:
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(node.fs_path(directory))  # only when empty: a file someone else put there keeps it
