"""Issue 9: no write error, second writer, kill or odd node may leave a node worse than it was.

Each test runs the real engine on a temp node root; where the fault is the filesystem's own (an immutable file,
a bind-mounted state directory), the real thing is used, not a mock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from regmirror_agent import cli, engine
from regmirror_api import models
from tests.harness.product import contents
from tests.unit.trees import V2
from tests.unit.trees import node_root as node

SEED = (Path(__file__).parent / "golden/v1-seed-inline-moved-to-hosts/before/etc/containerd/config.toml").read_text()
CFG = "etc/containerd/config.toml"
HOSTS_MODE = V2.replace('config_path = ""', 'config_path = "/etc/containerd/certs.d"')




def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and every directory (None) under root: "exactly as it was" includes folders."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() and not p.is_symlink() else p.read_bytes()
    return out


def run(*args: str) -> int:
    return cli.main(list(args))


def chattr_i(path: Path, paths: list[Path]) -> None:
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
    paths.append(path)


# --- defect 2: a write error rolls back everything and is the engine's error ------------------------------


@pytest.mark.parametrize("config", [SEED, V2], ids=["schema1-seed", "schema2"])
def test_immutable_config_toml_rolls_back_every_write_and_exits_1(
        tmp_path: Path, config: str, immutable: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, config)
    chattr_i(root / CFG, immutable)
    before = tree(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example",
               "--mirror", "docker.io=https://d.example") == 1
    err = capsys.readouterr().err
    assert "/etc/containerd/config.toml" in err and "every file is as it was" in err, err
    assert tree(root) == before


def test_immutable_hosts_toml_fails_reset_cleanly_and_a_later_reset_completes(
        tmp_path: Path, immutable: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, SEED)
    original = tree(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 0
    applied = tree(root)
    chattr_i(root / "etc/containerd/certs.d/quay.io/hosts.toml", immutable)
    assert run("reset", "--root", str(root), "--restart", "never") == 1
    assert "every file is as it was" in capsys.readouterr().err
    assert tree(root) == applied
    subprocess.run(["chattr", "-i", str(immutable.pop())], check=True)
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert tree(root) == original


def test_read_only_config_dir_is_a_failed_apply_not_a_traceback(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's case: config_path on a folder its mounts do not cover (EROFS). A read-only bind mount of
    the certs.d parent is the real thing."""
    root = node(tmp_path, V2.replace('config_path = ""', 'config_path = "/opt/certs.d"'))
    (root / "opt").mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(root / "opt"), str(root / "opt")],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("no bind mounts here")
    try:
        before = tree(root)
        assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 1
        err = capsys.readouterr().err
        assert "Read-only file system" in err and "every file is as it was" in err, err
        assert tree(root) == before
    finally:
        subprocess.run(["umount", str(root / "opt")], check=False)


# --- defect 3: one writer per node, the agent's pod and a person's CLI included ----------------------------

AGENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from regmirror_agent import engine
    from regmirror_api import models
    root, ready, go = sys.argv[1:4]
    settings = engine.Settings(root=root, restart="never")
    with engine.locked(settings):
        plan, runtime = engine.plan([models.parse_cli_mirror("docker.io=https://d.example")], settings)
        Path(ready).write_text("planned")
        while not Path(go).exists():
            time.sleep(0.02)
        engine.execute(plan, runtime, settings)
    print("agent done")
""")


def holds_open(pid: int, folder: Path) -> bool:
    """Has process ``pid`` opened ``folder`` (as regmirror does to flock it)?"""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == str(folder) for fd in fds.iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_agent_in_a_pod_and_cli_on_the_node_share_one_lock(tmp_path: Path) -> None:
    """The agent sees the host through /host with the state folder bind-mounted (the DaemonSet's hostPath);
    the person runs regmirror on the host. Agent plans, the CLI applies quay.io, the agent executes: the CLI
    must wait, and nothing either wrote may be lost."""
    host = node(tmp_path, V2, "host")
    (host / "var/lib/regmirror").mkdir(parents=True)  # the DaemonSet's DirectoryOrCreate made it
    pod = tmp_path / "pod"
    for folder in ("etc/containerd", "var/lib/regmirror"):
        (pod / folder).mkdir(parents=True)
        if subprocess.run(["mount", "--bind", str(host / folder), str(pod / folder)],
                          capture_output=True, check=False).returncode != 0:
            pytest.skip("no bind mounts here")
    try:
        original = contents(host)
        ready, go = tmp_path / "ready", tmp_path / "go"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        agent = subprocess.Popen([sys.executable, "-c", AGENT, str(pod), str(ready), str(go)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        while not ready.exists():
            assert agent.poll() is None, "the agent process died"
            time.sleep(0.02)
        person = subprocess.Popen([sys.executable, "-m", "regmirror_agent.cli", "apply", "--root", str(host),
                                   "--restart", "never", "--mirror", "quay.io=https://q.example"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not holds_open(person.pid, host / "var/lib/regmirror"):  # it is at the lock, trying
            assert person.poll() is None, f"the CLI did not wait for the agent's lock: {person.communicate()}"
            assert time.monotonic() < deadline, "the CLI never reached the lock"
            time.sleep(0.02)
        time.sleep(0.5)  # time enough for a lock that does not hold to let it write
        assert person.poll() is None, f"the CLI did not wait for the agent's lock: {person.communicate()}"
        assert contents(host) == original
        go.write_text("go")
        assert agent.wait(30) == 0
        _, err = person.communicate(timeout=30)
        assert person.returncode == 0, err
        # The CLI ran last with its own whole desired set: quay.io only, every record kept, so reset is exact.
        assert (host / "etc/containerd/certs.d/quay.io/hosts.toml").exists()
        assert not (host / "etc/containerd/certs.d/docker.io").exists()
        assert run("reset", "--root", str(host), "--restart", "never") == 0
        assert contents(host) == original
    finally:
        for folder in ("etc/containerd", "var/lib/regmirror"):
            subprocess.run(["umount", str(pod / folder)], check=False)


def test_a_plan_made_before_another_writer_changed_the_state_is_refused(tmp_path: Path) -> None:
    """Without any lock (a caller that plans and executes apart), the state file itself is checked too: here
    neither writer touches config.toml, so only the state file tells that quay.io's record would be lost."""
    root = node(tmp_path, HOSTS_MODE)
    settings = engine.Settings(root=str(root), restart="never")
    plan, runtime = engine.plan([models.parse_cli_mirror("docker.io=https://d.example")], settings)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://q.example") == 0
    with pytest.raises(engine.EngineError, match="changed while regmirror was planning"):
        engine.execute(plan, runtime, settings)
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert contents(root) == {CFG: HOSTS_MODE.encode()}


# --- defect 5: reset is byte-exact on the seed's schema-1 file ------------------------------------------


def test_reset_after_a_hand_edit_on_the_seed_keeps_every_other_byte(tmp_path: Path) -> None:
    root = node(tmp_path, SEED)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example") == 0
    cfg = root / CFG
    cfg.write_text(cfg.read_text().replace("oom_score = -999", "oom_score = -500  # hand edit"))
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert cfg.read_text() == SEED.replace("oom_score = -999", "oom_score = -500  # hand edit")
    assert tree(root) == {"etc": None, "etc/containerd": None, "etc/containerd/config.toml": cfg.read_bytes()}


def test_reset_after_a_second_apply_interrupted_before_config_toml_is_exact(tmp_path: Path) -> None:
    """The intent state of an apply that changes config.toml again: the file still holds the first apply's
    bytes when the run stops."""
    root = node(tmp_path, SEED)
    assert run("apply", "--root", str(root), "--restart", "never", "--mode", "inline",
               "--mirror", "quay.io=https://m.example") == 0
    settings = engine.Settings(root=str(root), restart="never", mode="inline")
    plan, _ = engine.plan([models.parse_cli_mirror("quay.io=https://other.example")], settings)
    from regmirror_agent import ownership
    state = root / "var/lib/regmirror/state.json"
    state.write_text(ownership.intent_state(plan.state_before, plan.state_after) or "")
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert (root / CFG).read_text() == SEED


# --- drift as data --------------------------------------------------------------------------------------


def test_drift_is_a_field_of_the_outcome(tmp_path: Path) -> None:
    root = node(tmp_path)
    settings = engine.Settings(root=str(root), restart="never")
    desired = [models.parse_cli_mirror("quay.io=https://q.example")]
    assert engine.apply(desired, settings).drift == ()
    hosts = root / "etc/containerd/certs.d/quay.io/hosts.toml"
    hosts.write_text(hosts.read_text() + "# hand edit\n")
    outcome = engine.apply(desired, settings)
    assert outcome.drift == ("/etc/containerd/certs.d/quay.io/hosts.toml",)
    assert "# hand edit" not in hosts.read_text()
    assert engine.apply(desired, settings).drift == ()


# --- defect 7: runtime detection does not depend on empty folders ----------------------------------------


def test_docker_node_with_an_empty_containerd_folder_stays_docker(tmp_path: Path) -> None:
    """The DaemonSet's DirectoryOrCreate mounts create /etc/containerd (and /etc/docker) on every node."""
    root = tmp_path / "node"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text('{"log-driver": "json-file"}\n')
    (root / "etc/containerd").mkdir()
    settings = engine.Settings(root=str(root), restart="never")
    plan, runtime = engine.plan([models.parse_cli_mirror("docker.io=https://d.example")], settings)
    assert runtime == "docker" and [c.path for c in plan.changes] == ["/etc/docker/daemon.json"]


def test_containerd_node_with_an_empty_docker_folder_stays_containerd(tmp_path: Path) -> None:
    root = node(tmp_path, None)
    (root / "etc/docker").mkdir()
    _, runtime = engine.plan([models.parse_cli_mirror("docker.io=https://d.example")],
                             engine.Settings(root=str(root), restart="never"))
    assert runtime == "containerd"


# --- defect 9: a kill leaves nothing a later run does not remove -----------------------------------------


def test_leftovers_of_a_killed_run_in_the_state_dir_are_removed(tmp_path: Path) -> None:
    """What a run killed mid-write leaves: temp copies of state.json (a full copy of the node's config) and
    applied.json, and a state directory made half way (created under a temp name, then renamed)."""
    root = node(tmp_path)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://q.example") == 0
    state_dir = root / "var/lib/regmirror"
    (state_dir / ".state.json.regmirror-999999.tmp").write_text("a full copy of the node's config")
    (state_dir / ".applied.json.regmirror-999999.tmp").write_text("{}")
    (root / ".var.regmirror-999998.tmp/lib/regmirror").mkdir(parents=True)
    (root / "var/lib/.regmirror.regmirror-999997.tmp").mkdir()
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert tree(root) == {"etc": None, "etc/containerd": None, CFG: V2.encode()}


def test_a_state_dir_someone_else_made_is_left_to_them(tmp_path: Path) -> None:
    """The DaemonSet's hostPath (DirectoryOrCreate) makes /var/lib/regmirror before regmirror runs: reset
    leaves it, since removing it on the host would cut the running agent off from its state."""
    root = node(tmp_path)
    (root / "var/lib/regmirror").mkdir(parents=True)
    original = tree(root)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://q.example") == 0
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert tree(root) == original


def test_reset_leaves_no_empty_certs_d_folder(tmp_path: Path) -> None:
    root = node(tmp_path)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://q.example",
               "--mirror", "*=https://any.example") == 0
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert tree(root) == {"etc": None, "etc/containerd": None, CFG: V2.encode()}


# --- defect 6: the node's own hosts.toml TLS settings survive a takeover ---------------------------------

OWN_HOSTS = """server = "https://harbor.corp:8443"
ca = "/etc/ssl/corp-ca.pem"
client = [["/etc/ssl/node.crt", "/etc/ssl/node.key"]]

[host."https://cache.corp:5000"]
  capabilities = ["pull", "resolve"]
  ca = "cache-ca.crt"
  client = "/etc/ssl/cache-client.pem"
"""


def test_own_hosts_toml_tls_is_carried_into_regmirrors_file_and_given_back(tmp_path: Path) -> None:
    import tomllib
    root = node(tmp_path, V2.replace('config_path = ""', 'config_path = "/etc/containerd/certs.d"'))
    own = root / "etc/containerd/certs.d/harbor.corp:8443/hosts.toml"
    own.parent.mkdir(parents=True)
    own.write_text(OWN_HOSTS)
    original = tree(root)
    assert run("apply", "--root", str(root), "--restart", "never",
               "--mirror", "harbor.corp:8443=https://cache.corp:5000,https://new.example") == 0
    written = tomllib.loads(own.read_text())
    assert written["server"] == "https://harbor.corp:8443"
    assert written["ca"] == "/etc/ssl/corp-ca.pem"
    assert written["client"] == [["/etc/ssl/node.crt", "/etc/ssl/node.key"]]
    assert list(written["host"]) == ["https://cache.corp:5000", "https://new.example"]
    cache = written["host"]["https://cache.corp:5000"]
    assert cache["ca"] == "cache-ca.crt" and cache["client"] == [["/etc/ssl/cache-client.pem", ""]]
    assert set(written["host"]["https://new.example"]) == {"capabilities"}
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert tree(root) == original


@pytest.mark.parametrize(("own", "server", "host"), [
    # every form containerd reads (remotes/docker/config/hosts.go): ca a path or a list; client a path, a list
    # of paths, or a list of [cert, key] pairs; skip_verify; TLS on a [host] entry for the upstream itself
    ('server = "https://harbor.corp:8443"\nca = ["a.pem", "b.pem"]\nskip_verify = true\n',
     {"ca": ["a.pem", "b.pem"], "skip_verify": True}, {}),
    ('server = "https://harbor.corp:8443"\nclient = ["c1.pem", ["c2.crt", "c2.key"]]\n',
     {"client": [["c1.pem", ""], ["c2.crt", "c2.key"]]}, {}),
    ('server = "https://harbor.corp:8443"\n[host."https://harbor.corp:8443"]\n  ca = "up.pem"\n',
     {"ca": "up.pem"}, {}),
    ('[host."https://cache.corp:5000/v2/x"]\n  skip_verify = true\n  client = [["k.crt", "k.key"]]\n',
     {}, {"skip_verify": True, "client": [["k.crt", "k.key"]]}),
])
def test_every_form_of_own_hosts_toml_tls_is_kept(own: str, server: dict[str, object],
                                                  host: dict[str, object]) -> None:
    import tomllib

    from regmirror_agent import ownership
    from regmirror_agent.nodeviews import DictView
    from regmirror_agent.runtimes import containerd
    path = "/etc/containerd/certs.d/harbor.corp:8443/hosts.toml"
    files = {"/etc/containerd/config.toml": HOSTS_MODE, path: own}
    desired = [models.parse_cli_mirror("harbor.corp:8443=https://cache.corp:5000")]
    plan = containerd.plan_containerd(desired, DictView(files), ownership.State())
    written = tomllib.loads(next(c.after for c in plan.changes if c.path == path) or "")
    assert {k: v for k, v in written.items() if k not in ("server", "host")} == server
    assert {k: v for k, v in written["host"]["https://cache.corp:5000"].items() if k != "capabilities"} == host


@pytest.mark.parametrize("command", ["show", "apply", "reset"])
def test_an_os_error_while_reading_the_node_is_a_clean_refusal(tmp_path: Path, command: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """ENAMETOOLONG here (a --config no filesystem can hold); any OSError takes the same way out."""
    root = node(tmp_path)
    before = tree(root)
    config = "/etc/containerd/" + "c" * 300 + ".toml"
    extra = ["--mirror", "quay.io=https://q.example", "--restart", "never"] if command == "apply" else \
        ["--restart", "never"] if command == "reset" else []
    assert run(command, "--root", str(root), "--config", config, *extra) == 1
    assert "File name too long" in capsys.readouterr().err
    assert tree(root) == before


def test_a_state_file_written_by_another_version_is_no_conflict(tmp_path: Path) -> None:
    """The conflict check compares records, not bytes: a state file rendered another way (an older regmirror,
    or a person who pretty-printed it) must not refuse every run."""
    import json
    root = node(tmp_path)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://q.example") == 0
    state = root / "var/lib/regmirror/state.json"
    state.write_text(json.dumps(json.loads(state.read_text())))  # one line, no indent
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://other.example") == 0
    assert run("reset", "--root", str(root), "--restart", "never") == 0
    assert tree(root) == {"etc": None, "etc/containerd": None, CFG: V2.encode()}


def test_a_state_folder_that_is_a_mount_point_is_never_removed(tmp_path: Path) -> None:
    """regmirror made the state folder (so its record says it may remove it), then the DaemonSet mounted it
    into the agent's pod: from then on it is the mount's, and reset leaves it (rmdir on the host would cut the
    agent off from its state)."""
    root = node(tmp_path)
    assert run("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://q.example") == 0
    folder = root / "var/lib/regmirror"
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, check=False).returncode:
        pytest.skip("no bind mounts here")
    try:
        assert run("reset", "--root", str(root), "--restart", "never") == 0
        assert tree(root) == {"etc": None, "etc/containerd": None, CFG: V2.encode(), "var": None,
                              "var/lib": None, "var/lib/regmirror": None}
    finally:
        subprocess.run(["umount", str(folder)], check=False)
