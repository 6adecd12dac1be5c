"""The engine's writes on a real filesystem: confined, atomic, exit codes, nothing changed on refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regmirror_agent import applying, cli
from tests.harness.product import contents
from tests.unit.trees import V2
from tests.unit.trees import node_root as node


def run(*args: str) -> int:
    return cli.main(list(args))


def test_symlink_in_certs_d_is_refused_and_nothing_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc/containerd/certs.d").mkdir()
    (root / "etc/containerd/certs.d/quay.io").symlink_to(outside)
    before = contents(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 1
    assert "is a symlink" in capsys.readouterr().err
    assert contents(root) == before and not any(outside.iterdir())


def test_symlinked_config_toml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, None)
    real = tmp_path / "real.toml"
    real.write_text(V2)
    (root / "etc/containerd/config.toml").symlink_to(real)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 1
    assert "config.toml is a symlink" in capsys.readouterr().err
    assert real.read_text() == V2


@pytest.mark.parametrize("flag", ["../../etc=https://m.example", "quay.io=ftp://m.example", "quay.io=",
                                  'quay.io=https://m.example/"\n[x]'])
def test_invalid_input_exits_2_and_changes_nothing(tmp_path: Path, flag: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    before = contents(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", flag) == 2
    err = capsys.readouterr().err
    assert "invalid input" in err and "nothing was changed" in err
    assert contents(root) == before


def test_malformed_config_toml_is_named_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, 'version = 2\n\n[plugins."io.containerd.grpc.v1.cri"\n')
    before = contents(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 1
    err = capsys.readouterr().err
    assert "/etc/containerd/config.toml is not valid TOML" in err and "line 3" in err
    assert contents(root) == before


def test_yaml_file_errors_list_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text("apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: a}\n"
                   "spec: {registry: '../x', mirrors: [{url: 'ftp://y'}]}\n")
    assert run("apply", "--root", str(root), "--restart", "never", "-f", str(doc)) == 2
    err = capsys.readouterr().err
    assert "a: spec.registry" in err and "a: spec.mirrors[0].url" in err


def test_reset_on_a_node_regmirror_never_touched_changes_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    before = contents(root)
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert "unchanged" in capsys.readouterr().out
    assert contents(root) == before


def test_reset_twice_is_safe(tmp_path: Path) -> None:
    root = node(tmp_path)
    before = contents(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 0
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert contents(root) == before
    assert sorted(p.name for p in (root / "etc/containerd").iterdir()) == ["config.toml"]
    assert not (root / "var").exists()


def test_show_lists_what_containerd_will_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://a.example,https://b.example")
    capsys.readouterr()
    assert run("show", "--root", str(root)) == 0
    out = capsys.readouterr().out
    assert "hosts mode" in out
    assert "quay.io" in out and "https://a.example, https://b.example" in out and "yes" in out


def test_killed_writer_leaves_old_or_new_file_never_a_mix(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a file atomically in a loop; every observed state is whole."""
    target = tmp_path / "config.toml"
    old, new = "a" * 200_000 + "\n", "b" * 200_000 + "\n"
    target.write_text(old)
    script = ("import sys; from regmirror_agent.applying import write_atomic\n"
              f"t={str(target)!r}\n"
              "for i in range(100000): write_atomic(t, ('b' if i % 2 == 0 else 'a') * 200_000 + '\\n')\n")
    for delay in (0.05, 0.11, 0.17, 0.23):
        proc = subprocess.Popen([sys.executable, "-c", script],
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert target.read_text() in (old, new)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "config.toml"]
    assert all(".regmirror-" in name and name.endswith(".tmp") for name in leftovers)


def test_conflicting_edit_between_plan_and_write_is_refused(tmp_path: Path) -> None:
    from regmirror_agent import engine
    root = node(tmp_path)
    settings = engine.Settings(root=str(root), restart="never")
    from regmirror_api import models
    plan, runtime = engine.plan([models.parse_cli_mirror("quay.io=https://m.example")], settings)
    (root / "etc/containerd/config.toml").write_text(V2 + "# edited meanwhile\n")
    with pytest.raises(engine.EngineError, match="changed while regmirror was planning"):
        engine.execute(plan, runtime, settings)
    assert not (root / "etc/containerd/certs.d").exists()


def test_stale_temp_files_of_a_killed_apply_are_cleared_by_the_next(tmp_path: Path) -> None:
    root = node(tmp_path)
    stale = root / "etc/containerd/.config.toml.regmirror-999999.tmp"
    stale.write_text("half")
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 0
    assert not stale.exists()


def test_a_second_writer_waits_for_the_node_lock(tmp_path: Path) -> None:
    root = node(tmp_path)
    with (
        applying.node_lock(str(root), timeout=1),
        pytest.raises(applying.Conflict, match="another regmirror"),
        applying.node_lock(str(root), timeout=0.3),
    ):
        pass


def test_show_on_a_docker_node_lists_docker_hubs_mirrors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "node"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text('{"registry-mirrors": ["https://own.example"]}\n')
    assert run("show", "--root", str(root)) == 0
    out = capsys.readouterr().out
    assert "runtime: docker" in out and "docker.io" in out and "https://own.example" in out and "no " in out
