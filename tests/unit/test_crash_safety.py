"""Crash safety as a property: kill regmirror at every mutating filesystem step of apply and of reset.

For each node (containerd config schema 1, 2 and 3, and Docker's daemon.json) the same commands run in turn:
apply, apply of another set, reset. Each command is first run once whole (its "new" tree), then again from
the same starting tree once per mutating step, killed (``os._exit``, no cleanup of any kind) just before that
step. After each kill:

- every file is the command's old or new content, never torn (state.json, regmirror's journal, must parse);
- running the same command again exits 0 and leaves exactly the tree the uninterrupted command left;
- a final reset gives the node's original tree back byte for byte, with nothing left behind (no temp file,
  no empty folder, no state directory).

The kill is a fork of this test process with ``REGMIRROR_TEST_FAULT=crash:N`` (see ``applying._step``): the
child runs the real CLI and dies at step N. A command is exhausted when the child exits on its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from regmirror_agent import applying, cli

SEED = (Path(__file__).parent / "golden/v1-seed-inline-moved-to-hosts/before/etc/containerd/config.toml").read_text()
OWN_DOCKER_HOSTS = ('# the node\'s own Docker Hub mirror\nserver = "https://registry-1.docker.io"\n'
                    'ca = "/etc/ssl/hub.pem"\n'
                    '\n[host."https://old-mirror.corp.example"]\n  capabilities = ["pull", "resolve"]\n')
NODES: dict[str, dict[str, str]] = {
    "schema1-seed": {"etc/containerd/config.toml": SEED},
    "schema2-own-hosts": {
        "etc/containerd/config.toml": 'version = 2\n# the node\'s own\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                                      '  config_path = "/etc/containerd/certs.d"\n',
        "etc/containerd/certs.d/docker.io/hosts.toml": OWN_DOCKER_HOSTS},
    "schema3": {"etc/containerd/config.toml": 'version = 3\n\n[plugins."io.containerd.cri.v1.images".registry]\n'
                                              '  config_path = ""\n\n[plugins."io.containerd.grpc.v1.cri"]\n'
                                              '  enable_selinux = false\n'},
    # The DaemonSet's hostPath mounts made /etc/docker and the state folder before regmirror ran: they are not
    # regmirror's to remove, and the state file comes and goes inside a folder that stays.
    "schema2-daemonset-folders": {"etc/containerd/config.toml": 'version = 2\n', "etc/docker/": "",
                                  "var/lib/regmirror/": ""},
    "docker": {"etc/docker/daemon.json": '{\n  "log-driver": "json-file"\n}\n', "etc/containerd/": ""},
}
CONTAINERD_COMMANDS = [["apply", "--mirror", "quay.io=https://a.example", "--mirror", "docker.io=https://d.example"],
                       ["apply", "--mirror", "quay.io=https://b.example,https://c.example"],
                       ["reset"]]
DOCKER_COMMANDS = [["apply", "--mirror", "docker.io=https://a.example"],
                   ["apply", "--mirror", "docker.io=https://b.example,https://c.example"],
                   ["reset"]]

Tree = dict[str, "bytes | None"]


def make_node(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        target = root / path
        if path.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def tree(root: Path) -> Tree:
    """Files (bytes) and folders (None): both must come back exactly."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def settled(root: Path) -> Tree:
    """``tree``, with applied.json only present or not: its digest covers what that run read, which differs
    after a recovery (it is the next run's shortcut, checked against the node itself before it is trusted)."""
    return {p: b"(applied record)" if p.endswith("applied.json") else d for p, d in tree(root).items()}


def restore(root: Path, snapshot: Tree) -> None:
    shutil.rmtree(root)
    root.mkdir()
    for path, data in snapshot.items():
        if data is None:
            (root / path).mkdir(parents=True, exist_ok=True)
        else:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)


def run(root: Path, command: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main([command[0], "--root", str(root), "--restart", "never", *command[1:]])
    assert code in (0, 1, 2), err.getvalue()
    return code


def run_killed(root: Path, command: list[str], step: int) -> int:
    """The real CLI in a forked child that dies just before mutating step ``step``; its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.environ[applying.FAULT_ENV] = f"crash:{step}"
            applying._steps = 0
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                code = cli.main([command[0], "--root", str(root), "--restart", "never", *command[1:]])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def is_temp(path: str) -> bool:
    return ".regmirror-" in path and path.rsplit("/", 1)[-1].startswith(".")


def check_old_or_new(now: Tree, old: Tree, new: Tree, where: str) -> None:
    for path, data in now.items():
        if data is None or any(is_temp(part) for part in path.split("/")):
            continue  # folders and regmirror's own temp names: judged after recovery
        if path.endswith("var/lib/regmirror/state.json"):
            json.loads(data)  # the journal holds in-flight records: neither old nor new, but never torn
            continue
        if path.endswith("applied.json"):
            continue
        assert data in (old.get(path), new.get(path)), f"{where}: {path} is neither old nor new"
    for path in set(old) | set(new):
        if path not in now and old.get(path) is not None and new.get(path) is not None and \
                not path.endswith("applied.json"):
            raise AssertionError(f"{where}: {path} vanished, though it exists before and after")


@pytest.mark.parametrize("name", sorted(NODES))
def test_a_kill_at_any_step_leaves_old_or_new_files_and_the_next_run_recovers_exactly(
        tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "node"
    root.mkdir()
    make_node(root, NODES[name])
    original = tree(root)
    commands = DOCKER_COMMANDS if name == "docker" else CONTAINERD_COMMANDS
    kills = 0
    before = original
    for command in commands:
        assert run(root, command) == 0
        after = settled(root)
        assert not any(is_temp(p) for p in after), f"{command}: left {after}"
        step = 1
        while True:
            restore(root, before)
            code = run_killed(root, command, step)
            if code != applying.FAULT_EXIT:
                assert code == 0, f"{name} {command}: exit {code} without a kill at step {step}"
                break
            kills += 1
            where = f"{name} {' '.join(command)} killed before step {step}"
            check_old_or_new(settled(root), before, after, where)
            assert run(root, command) == 0, where
            assert settled(root) == after, where
            assert run(root, ["reset"]) == 0, where
            assert tree(root) == original, where
            step += 1
        assert step > 1, f"{command} has no mutating step"
        assert run(root, command) == 0  # the uninterrupted result again, applied.json and all
        before = tree(root)
    assert tree(root) == original  # the last command was the reset
    with capsys.disabled():
        print(f"\n{name}: {kills} kill points, every one recovered and reset byte for byte")


def run_failing(root: Path, command: list[str], step: int) -> tuple[int, str]:
    """The CLI with mutating step ``step`` failing as a refused write does (EIO); exit status and stderr."""
    os.environ[applying.FAULT_ENV] = f"fail:{step}"
    applying._steps = 0
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli.main([command[0], "--root", str(root), "--restart", "never", *command[1:]])
    finally:
        del os.environ[applying.FAULT_ENV]
    return code, err.getvalue()


@pytest.mark.parametrize("name", sorted(NODES))
def test_a_write_error_at_any_step_puts_every_file_back_and_exits_1(tmp_path: Path, name: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9 defect 2 as a property: any OSError during apply or reset is the engine's error (exit 1, no
    traceback) and the node is exactly as before, files, folders and state, or the command finished."""
    root = tmp_path / "node"
    root.mkdir()
    make_node(root, NODES[name])
    commands = DOCKER_COMMANDS if name == "docker" else CONTAINERD_COMMANDS
    before = tree(root)
    failures = 0
    for command in commands:
        assert run(root, command) == 0
        after = settled(root)
        step = 1
        while True:
            restore(root, before)
            code, err = run_failing(root, command, step)
            if applying._steps < step:  # the command has fewer steps: it ran whole
                assert code == 0 and settled(root) == after, err
                break
            where = f"{name} {' '.join(command)} failing at step {step}"
            failures += 1
            if code == 0:  # only a step after the last change failed (the apply record, removing a renamed-away
                # state folder): the node has the command's result, and the next run tidies the rest
                assert run(root, command) == 0 and settled(root) == after, where
            else:
                assert code == 1 and "every file is as it was" in err, f"{where}: {err}"
                assert tree(root) == before, where
            step += 1
        restore(root, before)
        assert run(root, command) == 0
        before = tree(root)
    with capsys.disabled():
        print(f"\n{name}: {failures} failing steps, every one exit 1 with the node as it was (or done)")
