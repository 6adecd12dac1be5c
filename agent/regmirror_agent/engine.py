"""The node engine: read the node, plan, check, write, restart if needed, prove health, roll back if not.

The CLI and the DaemonSet agent both call ``apply``/``reset``; everything they need to report is in the
returned ``Outcome`` or the raised ``EngineError``. Unless ``apply`` returns, every file is as it was: a refusal
writes nothing, and a write the filesystem refuses (an immutable file, a read-only mount: any ``OSError``)
puts back what was written before it is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
from collections.abc import Callable, Iterator, Sequence

from regmirror_agent import applying, drivers, observing, ownership
from regmirror_agent.drivers import LeftOut
from regmirror_agent.nodefiles import NodeRoot, UnsafePath
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.restarting import Host
from regmirror_agent.runtimes import Effective, RuntimeRefused
from regmirror_agent.settings import Settings
from regmirror_api import models
from regmirror_api.errors import Refused


class EngineError(Refused):
    """The node was refused or the change failed; the message says why and that files are as they were."""

    def __init__(self, message: str, path: str = "", *, rolled_back: bool = False) -> None:
        self.path = path
        """The node path a failed write was for, when one was (so a caller can tell which registry's file)."""
        self.rolled_back = rolled_back
        """The change was written, the runtime was not healthy on it, and the previous files were put back."""
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class Outcome:
    runtime: str
    plan: Plan
    restarted: bool = False
    notes: tuple[str, ...] = ()
    """For people: what happened that they may want to know."""
    drift: tuple[str, ...] = ()
    """Node paths of managed files someone edited since regmirror wrote them, and that this apply put back."""
    held: bool = False
    """Nothing was written: the plan needs a runtime restart and ``may_restart`` said not now."""

    @property
    def changed(self) -> bool:
        return self.plan.changed


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def detect_runtime(node: NodeView, settings: Settings, state: ownership.State) -> str:
    """The name of the runtime ``apply`` drives on this node (``drivers.for_node`` decides)."""
    return drivers.for_node(node, settings, state).name


def request_key(desired: Sequence[models.RegistryMirror], settings: Settings, left_out: LeftOut | None = None) -> str:
    specs = [{"name": m.name, "generation": m.generation, **m.to_spec()} for m in sorted(desired, key=lambda m: m.name)]
    parts: list[object] = [specs, settings.request_settings()]
    if left_out:  # absent when nothing is left out: the key of an apply without probing stays what it was
        parts.append({registry: sorted(urls) for registry, urls in sorted(left_out.items())})
    return observing.request_key(parts)


def plan(desired: Sequence[models.RegistryMirror], settings: Settings, request: str | None = None,
         left_out: LeftOut | None = None) -> tuple[Plan, str]:
    """The plan for this node, without writing anything. Raises InvalidSpec (bad input) or EngineError.

    ``request`` identifies the request for the fast path (see ``observing``); by default, the desired set."""
    node = observing.RecordingView(NodeRoot(settings.root))
    host = settings.host or Host.detect()
    try:
        recorded = ownership.parse_state(node.read(settings.state_path), settings.state_path)
        state = _without_mounted_state_dir(recorded, node.inner, settings)
        runtime = drivers.for_node(node, settings, state)
        if state.runtime and state.runtime != runtime.name and not state.empty:
            raise EngineError(f"this node's regmirror state belongs to {state.runtime}, not {runtime.name}; "
                              f"run `regmirror reset --runtime {state.runtime}` first")
        usable, aside, aside_notes = _set_aside_unusable(state, node.inner)
        planned = runtime.plan(desired, node, usable, settings, host, left_out or {})
        if usable != state:
            planned = _with_set_aside(planned, node.read(settings.state_path), aside, aside_notes)
        elif state != recorded:  # planned without the mounted folder's record: the file still holds it
            planned = dataclasses.replace(planned, state_before=node.read(settings.state_path))
        return dataclasses.replace(planned, request=request or request_key(desired, settings, left_out),
                                   observed=node.observations()), runtime.name
    except (RuntimeRefused, UnsafePath, ownership.CorruptState) as exc:
        raise EngineError(str(exc)) from exc
    except OSError as exc:
        raise EngineError(f"reading the node failed: {_os_error(exc, settings)}; nothing was changed") from exc


def _os_error(exc: OSError, settings: Settings) -> str:
    """An OSError in the node's words: its node path, not the agent's ``/host/...``."""
    where = exc.filename
    if isinstance(where, str) and where.startswith(os.path.abspath(settings.root)):
        where = NodeRoot(settings.root).node_path(where)
    return f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)


def _without_mounted_state_dir(state: ownership.State, node: NodeRoot, settings: Settings) -> ownership.State:
    """A state directory that is a mount point (the agent's hostPath) is the DaemonSet's, not regmirror's to
    remove: removing it on the host would leave the running agent writing into a deleted folder."""
    state_dir = settings.state_dir
    if not state.dirs or not _is_mount_point(node.fs_path(state_dir)):
        return state
    return dataclasses.replace(state, dirs=tuple(d for d in state.dirs
                                                 if not (d == state_dir or state_dir.startswith(d + "/"))))


def _unusable(node: NodeRoot, path: str) -> str:
    """Why regmirror cannot act on a node path ('' when it can); ``errno.ENAMETOOLONG`` when it cannot exist."""
    try:
        os.lstat(node.fs_path(path))
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except UnsafePath as exc:
        return str(exc)
    except OSError as exc:
        return errno.errorcode[errno.ENAMETOOLONG] if exc.errno == errno.ENAMETOOLONG else str(exc.strerror)
    return ""


def _set_aside_unusable(state: ownership.State, node: NodeRoot) -> tuple[ownership.State, ownership.State,
                                                                         tuple[str, ...]]:
    """``(records to plan with, records kept as they are, notes)``: one record regmirror cannot act on (left
    by an older regmirror that admitted a registry name too long for a directory, or edited by hand) must never
    block apply and reset of everything else (issue 9).

    A path the filesystem cannot hold (a name longer than it allows) cannot exist, so there is nothing to give
    back: its record is dropped. Any other (a symlink on the way, an unreadable folder) is kept untouched for
    a person to look at, and named each run."""
    notes: list[str] = []
    files: dict[str, ownership.FileRecord] = {}
    kept: dict[str, ownership.FileRecord] = {}
    for path, record in state.files.items():
        why = _unusable(node, path)
        if not why:
            files[path] = record
        elif why == errno.errorcode[errno.ENAMETOOLONG]:
            notes.append(f"dropped regmirror's record of {path!r}: no file of that name can exist on this node "
                         f"(a name longer than the filesystem allows), so there is nothing to give back")
        else:
            kept[path] = record
            notes.append(f"cannot act on regmirror's record of {path!r} ({why}); it is left as it is, everything "
                         f"else was done")
    dirs = tuple(d for d in state.dirs if not _unusable(node, d))
    kept_dirs = tuple(d for d in state.dirs if _unusable(node, d) not in ("", errno.errorcode[errno.ENAMETOOLONG]))
    return (dataclasses.replace(state, files=files, dirs=dirs),
            ownership.State(runtime=state.runtime, files=kept, dirs=kept_dirs), tuple(notes))


def _with_set_aside(planned: Plan, before: str | None, kept: ownership.State, notes: tuple[str, ...]) -> Plan:
    """The plan made without the set-aside records, with the state file as it is (every record) before and
    the plan's records plus those kept after, so dropped records go and kept ones stay as they were."""
    after = ownership.parse_state(planned.state_after, planned.state_path)
    merged = ownership.State(runtime=after.runtime or (kept.runtime if not kept.empty else ""),
                             files={**kept.files, **after.files}, dirs=tuple(sorted({*kept.dirs, *after.dirs})))
    return dataclasses.replace(planned, state_before=before,
                               state_after=ownership.render_state(merged), notes=planned.notes + notes)


def _is_mount_point(path: str) -> bool:
    """``os.path.ismount`` misses a bind mount within one filesystem; the kernel's mount table does not."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                      for line in f if len(line.split()) > 4}
    except OSError:
        return False
    return os.path.realpath(path) in points


def runtime_of(settings: Settings) -> str:
    """Which runtime this node's configuration is for (as ``apply`` decides), '' when that cannot be told."""
    node = NodeRoot(settings.root)
    try:
        state = ownership.parse_state(node.read(settings.state_path), settings.state_path)
        return detect_runtime(node, settings, state)
    except (RuntimeRefused, UnsafePath, ownership.CorruptState, OSError):
        return ""


def credentials_refusal(settings: Settings) -> tuple[str, str] | None:
    """``(runtime, why)`` when this node's runtime, as set, cannot carry mirror credentials; None when it can or
    when the runtime cannot be told (the planner then refuses, if it must)."""
    runtime = runtime_of(settings)
    return drivers.named(runtime).credentials_refusal(settings) if runtime else None


def describe(settings: Settings) -> tuple[str, str, list[Effective], ownership.State]:
    """``(runtime, config header, what it uses per registry, regmirror's records)`` for ``regmirror show``."""
    node = NodeRoot(settings.root)
    try:
        state = ownership.parse_state(node.read(settings.state_path), settings.state_path)
        runtime = drivers.for_node(node, settings, state)
        return (runtime.name, *runtime.describe(node, settings), state)
    except (RuntimeRefused, UnsafePath, ownership.CorruptState) as exc:
        raise EngineError(str(exc)) from exc
    except OSError as exc:
        raise EngineError(f"reading the node failed: {_os_error(exc, settings)}") from exc


def execute(plan_: Plan, runtime: str, settings: Settings, log: Log = _quiet) -> Outcome:
    """Write the plan; restart and health-check when it needs; roll back when the runtime does not recover."""
    try:
        return _execute(plan_, runtime, settings, log)
    except OSError as exc:  # outside apply_plan's own rollback: before the first write or after the last
        raise EngineError(f"{_os_error(exc, settings)}; every file is as it was") from exc


def _execute(plan_: Plan, name: str, settings: Settings, log: Log) -> Outcome:
    node = NodeRoot(settings.root)
    host = settings.host or Host.detect()
    notes = list(plan_.notes)
    if not plan_.changed or settings.dry_run:
        if not settings.dry_run:  # a run stopped at its very end may have left these two undone
            applying.clear_leftovers(node, plan_)
            _record_applied(plan_, node, settings)
        return Outcome(name, plan_, notes=tuple(notes), drift=plan_.drift)
    applied_record = node.fs_path(observing.applied_path(settings.state_dir))
    try:
        runtime = drivers.named(name)
        runtime.check(plan_, settings, host, node)
    except RuntimeRefused as exc:
        raise EngineError(str(exc)) from exc
    steps = runtime.steps(plan_, settings)
    # A record of the last apply must never vouch for one that is half done or rolled back.
    try:
        last_applied = node.read(observing.applied_path(settings.state_dir))
    except UnsafePath:  # not a record (not UTF-8, a directory): only a shortcut, so it is simply not kept
        last_applied = None
    applying.remove_durably(applied_record)
    restarted = False
    done: list[Plan] = []
    for step in steps:
        try:
            applying.apply_plan(step, node)
        except (applying.Conflict, applying.WriteFailed, UnsafePath) as exc:
            undone = _undo_earlier(done, node, name, settings)
            if last_applied is not None and not undone:  # the node is as that record saw it again
                with contextlib.suppress(OSError):
                    applying.write_atomic(applied_record, last_applied)
            raise EngineError(str(exc) + undone, getattr(exc, "path", "")) from exc
        done.append(step)
        for change in step.changes:
            log(f"{'removed' if change.after is None else 'wrote'} {change.path}")
        if step.restart and settings.restart == "never":
            verb = f"reloaded (systemctl reload {name})" if runtime.kind == drivers.RELOAD else "restarted"
            notes.append(f"{name} must be {verb} to read the change; --restart never left that to you")
        elif step.restart:
            log(f"{runtime.kind}ing {name} ({settings.restart})")
            activation = runtime.activate(settings, host, node)
            if not activation.healthy:
                _roll_back(step, runtime, settings, host, node, activation.problem, log)
            restarted = True
    _record_applied(plan_, node, settings)
    return Outcome(name, plan_, restarted=restarted, notes=tuple(notes), drift=plan_.drift)


def _record_applied(plan_: Plan, node: NodeRoot, settings: Settings) -> None:
    """Vouch for this apply (see ``observing``), unless the record already says exactly that. Only a shortcut
    for the next run: when it cannot be written, that run plans again."""
    if plan_.state_after is None or plan_.observed is None or not plan_.request:
        return
    path = observing.applied_path(settings.state_dir)
    with contextlib.suppress(OSError):
        text = observing.render_applied(plan_.request, node, plan_.observed)
        if node.read(path) != text:
            applying.write_atomic(node.fs_path(path), text)


def _undo_earlier(done: list[Plan], node: NodeRoot, runtime: str, settings: Settings) -> str:
    """Put back the steps already applied (Docker's bridge write) when a later one fails; say what is left."""
    try:
        for step in reversed(done):
            applying.apply_plan(step.inverse(), node)
    except (applying.Conflict, applying.WriteFailed, UnsafePath) as exc:
        return f"; putting back the earlier step failed too: {exc}"
    if done and any(step.restart for step in done) and settings.restart != "never":
        return (f" (its earlier step was put back as well; {runtime} was reloaded in between and keeps that "
                f"until its next reload)")
    return ""


def _roll_back(plan_: Plan, runtime: drivers.Runtime, settings: Settings, host: Host, node: NodeRoot, reason: str,
               log: Log) -> None:
    name = runtime.name
    log(f"{name} is not healthy after the change ({reason}); putting the previous files back")
    try:
        applying.apply_plan(plan_.inverse(), node)
    except (applying.Conflict, applying.WriteFailed, UnsafePath) as exc:
        raise EngineError(f"{name} did not come back healthy after the change: {reason}; and putting the "
                          f"previous files back failed: {exc}") from exc
    again = runtime.activate(settings, host, node, must_be_new=False)
    after = ("it is healthy again on the previous files" if again.healthy
             else f"it is still unhealthy: {again.problem}")
    raise EngineError(f"{name} did not come back healthy after the change: {reason}. regmirror put the "
                      f"previous files back and {runtime.kind}ed it; {after}", rolled_back=True)


UNCHANGED = Outcome("", Plan(runtime="", changes=(), restart=False))


#: Asked, with the plan, before a change that restarts containerd is written: may it restart now? (The agent
#: asks the cluster's restart budget; see ``agent``.)
MayRestart = Callable[[Plan], bool]


def needs_restart(plan_: Plan, runtime: str, settings: Settings) -> bool:
    """Would executing this plan restart the runtime? (A reload, as Docker's and CRI-O's, keeps every container
    running and pulling.)"""
    return drivers.named(runtime).needs_restart(plan_) and settings.restart != "never" and not settings.dry_run


def apply(desired: Sequence[models.RegistryMirror], settings: Settings, log: Log = _quiet,
          left_out: LeftOut | None = None, may_restart: MayRestart | None = None) -> Outcome:
    """Apply; answered without planning when the last successful apply was this same request and nothing
    it read has changed since (``UNCHANGED``). ``left_out``: mirrors that do not answer from this node.
    ``may_restart``: when the plan restarts containerd and this says no, nothing is written (``held``)."""
    with locked(settings):
        if not settings.dry_run and observing.already_applied(NodeRoot(settings.root), settings.state_dir,
                                                              request_key(desired, settings, left_out)):
            return UNCHANGED
        plan_, runtime = plan(desired, settings, left_out=left_out)
        if may_restart is not None and needs_restart(plan_, runtime, settings) and not may_restart(plan_):
            return Outcome(runtime, plan_, notes=plan_.notes, held=True)
        return execute(plan_, runtime, settings, log)


@contextlib.contextmanager
def locked(settings: Settings) -> Iterator[None]:
    """Hold the node's writer lock from planning to the health check (dry runs need none). The CLI and the
    agent both plan and execute inside it, so no other writer's records can change in between."""
    if settings.dry_run:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(applying.node_lock(settings.root, state_dir=settings.state_dir))
        except (applying.Conflict, UnsafePath) as exc:
            raise EngineError(str(exc)) from exc
        except OSError as exc:
            raise EngineError(f"cannot take the node's writer lock: {_os_error(exc, settings)}; nothing was "
                              f"changed") from exc
        yield


def reset(settings: Settings, log: Log = _quiet) -> Outcome:
    """Give the node back its own configuration: what ``apply`` with nothing desired does."""
    return apply([], settings, log)
