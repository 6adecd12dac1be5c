"""The one place that writes to a node: atomic, durable, undone on error, and checked against what was planned.

Each file is written to a temporary file in its own directory, fsynced, renamed over the old one and the
directory fsynced, so a process killed at any moment leaves the old file or the new one, never a mix. The
ownership state is written before the files (with every record old and new) and again after, so an
interrupted apply never loses what the node had before regmirror.

A write that fails (an immutable file, a read-only mount, a full disk) puts back everything this apply had
already done, newest first (files, directories, the state), and raises ``WriteFailed``: the node is as it was.

Whatever a killed run leaves is regmirror's own and named so (``.<name>.regmirror-<pid>.tmp``); the next run
removes it under the lock. The state directory appears and disappears in one rename, so a kill never leaves
an empty one that would later look like the node's own folder.

One writer per node: see ``node_lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator

from regmirror_agent import credentials, ownership
from regmirror_agent.defaults import DEFAULT_STATE_DIR
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.nodeviews import NEW_FILE_MODE
from regmirror_agent.plans import FileChange, Plan
from regmirror_api.errors import Refused

STATE_FILE_MODE = 0o600
#: A file with credentials in it (a hosts.toml with an Authorization header): its owner, root, alone reads it.
SECRET_FILE_MODE = 0o600
DIR_MODE = 0o755
#: Tests only: ``crash:N`` ends the process (exit FAULT_EXIT) just before the N-th mutating filesystem step,
#: ``fail:N`` makes that step fail with EIO. Unset, it costs one dictionary lookup per step.
FAULT_ENV = "REGMIRROR_TEST_FAULT"
FAULT_EXIT = 86
_steps = 0


class Conflict(Refused):
    """A file changed between planning and writing, or another writer holds the node; nothing was written."""


class WriteFailed(Refused):
    """The filesystem refused a write; everything this apply had written was put back (see ``problems``)."""

    def __init__(self, message: str, problems: list[str], path: str = "") -> None:
        self.problems = problems
        self.path = path
        """The node path whose write failed: lets a caller tell which registry's file it was."""
        super().__init__(message)


def _step(what: str) -> None:
    """Every mutating filesystem call passes here first: the seam the crash-safety test kills the process at."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    global _steps  # noqa: PLW0603 - the fault seam counts every mutating step of the process
    _steps += 1
    kind, _, n = spec.partition(":")
    if _steps == int(n):
        if kind == "crash":
            os._exit(FAULT_EXIT)
        raise OSError(errno.EIO, f"injected fault at step {n}", what)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """Where a write of ``path`` is prepared (and where a killed run's leftover is found again)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.regmirror-{os.getpid()}.tmp")


def _is_temp_of(name: str, target: str) -> bool:
    return re.fullmatch(rf"\.{re.escape(target)}\.regmirror-\d+\.tmp", name) is not None


def write_atomic(target: str, text: str, default_mode: int = NEW_FILE_MODE, mode: int | None = None) -> None:
    """Replace ``target`` with ``text``, keeping an existing file's mode (unless ``mode`` is given: a file a login
    leaves gets its own bits back) and owner; a text that carries credentials (an Authorization header,
    ``credentials.holds_secret``) is written readable by its owner only, from the temp file's creation on, so no
    reader ever finds it open to others, not even for a moment."""
    directory = os.path.dirname(target)
    try:
        st = os.lstat(target)
        kept, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except FileNotFoundError:
        kept, uid, gid = default_mode, -1, -1
    mode = kept if mode is None else mode
    if credentials.holds_secret(text):
        mode &= SECRET_FILE_MODE
    tmp = temp_name(target)
    _step(f"create {tmp}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fchmod(f.fileno(), mode)
            if uid != -1:
                os.fchown(f.fileno(), uid, gid)
            os.fsync(f.fileno())
        _step(f"rename {tmp}")
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def remove_durably(target: str) -> None:
    if not os.path.lexists(target):
        return
    _step(f"unlink {target}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
        _fsync_dir(os.path.dirname(target))


def _put(path: str, text: str | None, default_mode: int = NEW_FILE_MODE, mode: int | None = None) -> None:
    if text is None:
        remove_durably(path)
    else:
        write_atomic(path, text, default_mode, mode)


# --- one writer per node --------------------------------------------------------------------------------


class _Held:
    """The locks this process holds on the node (open directory descriptors with an flock each)."""

    def __init__(self) -> None:
        self.fds: list[int] = []


_held: _Held | None = None


def _nearest_existing_parent(path: str, root: str) -> str:
    parent = os.path.dirname(path)
    while parent != root and len(parent) > len(root) and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def _same_dir(path: str, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _flock(fd: int, deadline: float, timeout: float, where: str) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Conflict(f"another regmirror is changing this node (it holds the lock on {where}); "
                               f"gave up after {timeout:.0f}s, nothing was written") from None
            time.sleep(0.05)


@contextlib.contextmanager
def node_lock(root: str, timeout: float = 120.0, state_dir: str = DEFAULT_STATE_DIR) -> Iterator[None]:
    """One writer per node, wherever it runs: the state directory is the one folder the agent's pod (a hostPath
    mount) and a person's ``regmirror`` on the node both see, so the lock is an flock on it.

    While the state directory does not exist, its nearest existing parent is locked instead (every process on
    the node sees that one), and a writer creates the state directory already locked (``_create_state_dir``).
    A lock is only good if what it locks is still what a newcomer would lock; else it is taken again. No
    lock file is left behind, and a lock dies with its process.
    """
    global _held  # noqa: PLW0603 - one lock per process; _create_state_dir adds the folder it creates to it
    node = NodeRoot(root)
    target = node.fs_path(state_dir)  # refuses a symlink on the way
    deadline = time.monotonic() + timeout
    held = _Held()
    try:
        while True:
            parent = _nearest_existing_parent(target, node.root)
            held.fds.append(os.open(parent, os.O_RDONLY | os.O_DIRECTORY))
            if os.path.isdir(target):
                held.fds.append(os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW))
            for fd in held.fds:
                _flock(fd, deadline, timeout, node.node_path(target))
            if (_nearest_existing_parent(target, node.root) == parent and _same_dir(parent, held.fds[0])
                    and os.path.isdir(target) == (len(held.fds) == 2)
                    and (len(held.fds) == 1 or _same_dir(target, held.fds[1]))):
                break
            for fd in held.fds:  # the state directory appeared or went while we waited: lock again
                os.close(fd)
            held.fds.clear()
        _held = held
        yield
    finally:
        _held = None
        for fd in held.fds:
            os.close(fd)


# --- applying a plan ------------------------------------------------------------------------------------


class _Journal:
    """What to do, newest first, to put back what this apply has done so far."""

    def __init__(self, node: NodeRoot) -> None:
        self.node = node
        self.undo: list[tuple[str, Callable[[], None]]] = []

    def did(self, what: str, undo: Callable[[], None]) -> None:
        self.undo.append((what, undo))

    def roll_back(self) -> list[str]:
        """Undo newest first. Stop at the first failure: the in-flight state written first still records
        every original, so an undo that cannot finish never loses one."""
        while self.undo:
            what, undo = self.undo.pop()
            try:
                undo()
            except OSError as exc:
                return [f"putting back {what}: {exc.strerror or exc}"]
        return []


def check_unchanged(node: NodeRoot, plan: Plan) -> None:
    """Every file the plan overwrites, and the state file, must still hold what planning read."""
    for change in plan.changes:
        if node.read(change.path) != change.before:
            raise Conflict(f"{change.path} changed while regmirror was planning; nothing was written, run again")
    if plan.state_path and not _same_state(node.read(plan.state_path), plan.state_before, plan.state_path):
        raise Conflict(f"{plan.state_path} changed while regmirror was planning (another regmirror wrote it); "
                       f"nothing was written, run again")


def _same_state(text: str | None, planned: str | None, where: str) -> bool:
    """The records are what planning read (a state file written by another version may render differently)."""
    if text == planned:
        return True
    try:
        return ownership.parse_state(text, where) == ownership.parse_state(planned, where)
    except ownership.CorruptState:
        return False


def clear_leftovers(node: NodeRoot, plan: Plan) -> None:
    """Leftovers of a killed run (regmirror's temp names only); safe to remove under the node lock. Every
    locked run does this, the ones with nothing to change too."""
    folders = {os.path.dirname(node.fs_path(c.path)) for c in plan.changes}
    if plan.state_path:
        state_dir = node.fs_path(os.path.dirname(plan.state_path))
        folders.add(state_dir)
        child = state_dir
        while len(child) > len(node.root):  # a state directory created or removed half way
            parent = os.path.dirname(child)
            if os.path.isdir(parent):
                for name in os.listdir(parent):
                    if _is_temp_of(name, os.path.basename(child)):
                        _step(f"remove {name}")
                        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            child = parent
    for folder in sorted(folders):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if re.fullmatch(r"\..+\.regmirror-\d+\.tmp", name) and os.path.isfile(os.path.join(folder, name)):
                _step(f"remove {name}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))


def _create_state_dir(node: NodeRoot, state_file: str, text: str) -> Callable[[], None]:
    """Make the state directory (and any missing parent) with the state file already in it, in one rename,
    and lock it for this process before anyone can see it. Returns the undo."""
    state_dir = os.path.dirname(state_file)
    top = state_dir
    while not os.path.isdir(os.path.dirname(top)):
        top = os.path.dirname(top)
    tmp = temp_name(top)
    _step(f"mkdir {tmp}")
    os.mkdir(tmp, DIR_MODE)
    try:
        inner = os.path.join(tmp, os.path.relpath(state_dir, top))
        os.makedirs(inner, DIR_MODE, exist_ok=True)
        fd = os.open(os.path.join(inner, os.path.basename(state_file)), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     STATE_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            os.fsync(f.fileno())
        if _held is not None:
            lock_fd = os.open(inner, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can know this folder yet
            _held.fds.append(lock_fd)
        _fsync_dir(inner)
        _step(f"rename {tmp}")
        os.rename(tmp, top)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(os.path.dirname(top))

    def undo() -> None:
        _remove_tree_atomically(top)

    return undo


def _remove_tree_atomically(top: str) -> None:
    """Take a folder of regmirror's out of sight in one rename, then delete it (a kill leaves a temp name)."""
    tmp = temp_name(top)
    _step(f"rename {top}")
    os.rename(top, tmp)
    _fsync_dir(os.path.dirname(top))
    with contextlib.suppress(OSError):  # out of sight already: what is left, the next run removes
        _step(f"remove {tmp}")
        shutil.rmtree(tmp)


def _write_state(node: NodeRoot, plan: Plan, text: str | None, journal: _Journal, previous: str | None) -> None:
    target = node.fs_path(plan.state_path)
    if text is not None and not os.path.isdir(os.path.dirname(target)):
        journal.did(plan.state_path, _create_state_dir(node, target, text))
        return
    _put(target, text, STATE_FILE_MODE)
    journal.did(plan.state_path, lambda: _put(target, previous, STATE_FILE_MODE))


def _state_chain(plan: Plan) -> list[str]:
    """The planned removals that are the state directory or a parent of it, shallowest first."""
    state_dir = os.path.dirname(plan.state_path) if plan.state_path else ""
    return sorted((d for d in plan.rmdirs if state_dir == d or state_dir.startswith(d + "/")), key=len)


def _removable_state_dir(node: NodeRoot, plan: Plan) -> str | None:
    """When this plan forgets everything: the shallowest folder regmirror made for its state that holds nothing
    but the way down to the state file (and regmirror's leftovers). It then goes in one rename, state file and
    all, so a kill never leaves an empty state folder behind that the next run would take for the node's own.
    A folder someone else put a file in stays."""
    chain = _state_chain(plan)
    if not chain or plan.state_after is not None:
        return None
    state_file = node.fs_path(plan.state_path)
    state_dir = os.path.dirname(state_file)
    for top in chain:
        path, only_chain = node.fs_path(top), True
        for folder, dirs, files in os.walk(path):
            for inside in (os.path.join(folder, n) for n in dirs + files):
                if folder == state_dir:
                    only_chain = only_chain and (inside == state_file or
                                                 re.fullmatch(r"\..+\.regmirror-\d+\.tmp", os.path.basename(inside))
                                                 is not None)
                else:
                    only_chain = only_chain and (state_dir == inside or state_dir.startswith(inside + "/"))
        if only_chain:
            return path
    return None


def apply_plan(plan: Plan, node: NodeRoot) -> None:
    """Make the node match ``plan``. Raises ``Conflict`` before writing anything if a planned-over file has
    changed; ``WriteFailed`` after putting everything back if the filesystem refuses a write."""
    check_unchanged(node, plan)
    paths = {c.path: node.fs_path(c.path) for c in plan.changes}  # refuses symlinks before any write
    # The state file's own bytes (``state_before`` is the same records as rendered): a roll back puts these back.
    state_on_disk = node.read(plan.state_path) if plan.state_path else None
    journal = _Journal(node)
    doing, target = "cleaning up after an earlier run", plan.state_path
    try:
        clear_leftovers(node, plan)
        intent = ownership.intent_state(plan.state_before, plan.state_after)
        if intent != plan.state_before:
            doing, target = f"writing {plan.state_path}", plan.state_path
            _write_state(node, plan, intent, journal, state_on_disk)
        for directory in plan.mkdirs:
            fs = node.fs_path(directory)
            if not os.path.isdir(fs):
                doing, target = f"creating {directory}", directory
                _step(f"mkdir {fs}")
                os.mkdir(fs, DIR_MODE)
                journal.did(directory, functools.partial(_rmdir, fs))
        for change in plan.changes:
            doing, target = f"{'removing' if change.after is None else 'writing'} {change.path}", change.path
            _put(paths[change.path], change.after, mode=change.mode)
            back = change.inverse()  # its text and, where a login came or went, its bits
            journal.did(change.path, functools.partial(_put, paths[change.path], back.after, mode=back.mode))
        chain = set(_state_chain(plan)) if plan.state_after is None else set()
        for directory in plan.rmdirs:
            if directory not in chain:
                _rmdir_if_empty(node, directory, journal)
        if plan.state_after != intent:
            doing = f"{'removing' if plan.state_after is None else 'writing'} {plan.state_path}"
            target = plan.state_path
            folder = _removable_state_dir(node, plan)
            if folder is not None:
                _remove_tree_atomically(folder)  # the last step: nothing after it can fail and need it back
            else:
                _write_state(node, plan, plan.state_after, journal, intent)
    except OSError as exc:
        problems = journal.roll_back()
        cause = exc.strerror or str(exc)
        if not problems:
            raise WriteFailed(f"{doing} failed: {cause}; regmirror put back what it had written, so every file is "
                              f"as it was", [], target) from exc
        raise WriteFailed(f"{doing} failed: {cause}; then {problems[0]}. {plan.state_path} still records every "
                          f"file's own content: once the cause is fixed, run `regmirror reset` or apply again",
                          problems, target) from exc


def _rmdir(fs: str) -> None:
    _step(f"rmdir {fs}")
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(fs)


def _rmdir_if_empty(node: NodeRoot, directory: str, journal: _Journal) -> None:
    fs = node.fs_path(directory)
    if not os.path.isdir(fs) or os.listdir(fs):
        return  # only when empty: a file someone else put there keeps it
    _step(f"rmdir {fs}")
    try:
        os.rmdir(fs)
    except OSError:
        return
    journal.did(directory, lambda: os.mkdir(fs, DIR_MODE))


__all__ = ["Conflict", "FileChange", "WriteFailed", "apply_plan", "node_lock", "remove_durably", "write_atomic"]
