"""Issue 9, defects 1, 8, 10 and 11: every input the CLI cannot act on is refused with a message naming it.

Invalid input (what the caller gave: flags, environment, ``-f`` documents) exits 2; what the node holds
(config.toml, daemon.json, state.json) and cannot be worked with is a refusal, exit 1. Either way the node's
tree is byte-identical afterwards and there is no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regmirror_agent import cli
from tests.harness.product import contents
from tests.unit.trees import V2
from tests.unit.trees import node_root as node

LONG_REGISTRY = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]) + ":5000"  # 258 characters
DOC = ("apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: q%s}\n"
       "spec:\n  registry: quay.io\n  mirrors: [{url: 'https://m.example.com'}]\n%s")




def refused(root: Path, capsys: pytest.CaptureFixture[str], *args: str, code: int = 2,
            env: dict[str, str] | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    """Run the CLI, assert the exit code, no change under ``root`` and no traceback; return stderr."""
    before = contents(root) if root.exists() else None
    if env and monkeypatch:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    assert cli.main(list(args)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    if before is not None:
        assert contents(root) == before
    return err


# --- defect 1: registry names the filesystem cannot hold ---------------------------------------------------


def test_a_registry_name_too_long_for_a_directory_is_invalid_input(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never",
                  "--mirror", f"{LONG_REGISTRY}=https://m.example.com")
    assert "at most 253 characters" in err and LONG_REGISTRY[:40] in err


def test_an_unusable_state_record_does_not_block_other_registries(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A record an older regmirror left for a name no directory can hold: apply and reset still work, and the
    record gets its own error instead of wedging the node."""
    root = node(tmp_path)
    bad = f"/etc/containerd/certs.d/{LONG_REGISTRY}/hosts.toml"
    state = {"version": 1, "runtime": "containerd", "dirs": ["/etc/containerd/certs.d"],
             "files": {bad: {"original": None, "writtenSha256": "0" * 64}}}
    (root / "var/lib/regmirror").mkdir(parents=True)
    (root / "var/lib/regmirror/state.json").write_text(json.dumps(state))
    (root / "etc/containerd/certs.d").mkdir()
    assert cli.main(["apply", "--root", str(root), "--restart", "never",
                     "--mirror", "quay.io=https://m.example.com"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert (root / "etc/containerd/certs.d/quay.io/hosts.toml").is_file()
    assert f"dropped regmirror's record of '/etc/containerd/certs.d/{LONG_REGISTRY[:40]}" in out
    assert LONG_REGISTRY not in (root / "var/lib/regmirror/state.json").read_text()
    assert cli.main(["reset", "--root", str(root), "--restart", "never"]) == 0
    capsys.readouterr()
    assert (root / "etc/containerd/config.toml").read_text() == V2
    assert not (root / "etc/containerd/certs.d/quay.io").exists()
    assert not (root / "var/lib/regmirror/state.json").exists()


def test_a_record_behind_a_symlink_is_kept_and_named_while_the_rest_is_applied(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc/containerd/certs.d").mkdir()
    (root / "etc/containerd/certs.d/ghcr.io").symlink_to(outside)
    record = {"original": None, "writtenSha256": "0" * 64}
    (root / "var/lib/regmirror").mkdir(parents=True)
    (root / "var/lib/regmirror/state.json").write_text(json.dumps({"version": 1, "runtime": "containerd", "files": {
        "/etc/containerd/certs.d/ghcr.io/hosts.toml": record}}))
    assert cli.main(["apply", "--root", str(root), "--restart", "never",
                     "--mirror", "quay.io=https://m.example.com"]) == 0
    out = capsys.readouterr().out
    assert "cannot act on regmirror's record of '/etc/containerd/certs.d/ghcr.io/hosts.toml'" in out
    assert "is a symlink" in out
    assert (root / "etc/containerd/certs.d/quay.io/hosts.toml").is_file() and not any(outside.iterdir())
    assert json.loads((root / "var/lib/regmirror/state.json").read_text())["files"][
        "/etc/containerd/certs.d/ghcr.io/hosts.toml"] == record
    assert cli.main(["reset", "--root", str(root), "--restart", "never"]) == 0
    assert "cannot act on" in capsys.readouterr().out
    assert (root / "etc/containerd/config.toml").read_text() == V2
    assert not (root / "etc/containerd/certs.d/quay.io").exists()


# --- defect 8: mirror URLs containerd cannot parse -------------------------------------------------------


@pytest.mark.parametrize("url", ["https://m.example.com/%zz", "https://m%41.example.com", "https://m.example.com:0",
                                 "https://@m.example.com", "https://m.example.com:00000000080",
                                 "https://m.example.com:080", "https://m.example.com/?"])
def test_mirror_urls_containerd_cannot_parse_are_invalid_input(tmp_path: Path, url: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never",
                  "--mirror", f"quay.io=http://127.0.0.1:1,{url}")
    assert repr(url) in err


# --- defect 10: tracebacks where a clean error belongs ---------------------------------------------------


def test_a_file_that_is_not_utf8_is_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_bytes(b"\xff\xfe" + (DOC % ("", "")).encode())
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc))
    assert str(doc) in err and "UTF-8" in err


def test_a_generation_that_is_not_a_number_is_invalid_input(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % (", generation: abc", ""))
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc))
    assert "metadata.generation" in err and "'abc'" in err


def test_a_missing_root_is_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    for command in (["apply", "--mirror", "quay.io=https://m.example.com"], ["reset"], ["show"]):
        err = refused(missing, capsys, *command, "--root", str(missing), "--restart", "never")
        assert str(missing) in err and "not a directory" in err
    assert not missing.exists()


def test_a_health_timeout_that_is_not_a_number_is_invalid_input(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = node(tmp_path)
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "--mirror",
                  "quay.io=https://m.example.com", env={"REGMIRROR_HEALTH_TIMEOUT": "abc"}, monkeypatch=monkeypatch)
    assert "REGMIRROR_HEALTH_TIMEOUT" in err and "'abc'" in err


def test_a_config_toml_that_is_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, None)
    (root / "etc/containerd/config.toml").mkdir()
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "--mirror",
                  "quay.io=https://m.example.com", code=1)
    assert "/etc/containerd/config.toml" in err and "not a regular file" in err


REG = 'plugins."io.containerd.grpc.v1.cri".registry'


@pytest.mark.parametrize("config, key", [
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nregistry = 5\n', "registry"),
    (f'version = 2\n[{REG}]\nmirrors = 5\n', "mirrors"),
    (f'version = 2\n[{REG}.configs."h.example".tls]\n', None),  # an empty tls table is fine
    (f'version = 2\n[{REG}.configs."h.example"]\ntls = 5\n', "tls"),
    ("version = 2\nplugins = 5\n", "plugins"),
    (f'version = 2\n[{REG}.mirrors."docker.io"]\nendpoint = "https://m.example.com"\n', "endpoint"),
    (f'version = 2\n[{REG}.mirrors."docker.io"]\nendpoint = [5]\n', "endpoint"),
    (f'version = 2\n[{REG}]\nconfig_path = 5\n', "config_path"),
    ("version = 2\ndisabled_plugins = 5\n", "disabled_plugins"),
    ("version = 2\nimports = 5\n", "imports"),
    ("version = 2\ngrpc = 5\n", "grpc"),
])
def test_config_toml_of_the_wrong_types_is_refused_naming_the_key(tmp_path: Path, config: str, key: str | None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, config)
    if key is None:
        assert cli.main(["apply", "--root", str(root), "--restart", "never",
                         "--mirror", "quay.io=https://m.example.com"]) == 0
        return
    for command in (["apply", "--mirror", "quay.io=https://m.example.com"], ["show"]):
        err = refused(root, capsys, *command, "--root", str(root), "--restart", "never", code=1)
        assert key in err and "config.toml" in err


@pytest.mark.parametrize("record", [{"original": 5, "writtenSha256": "x"}, {"original": None, "writtenSha256": 5},
                                    "not a record", {"original": None}])
def test_a_state_file_of_the_wrong_types_is_refused(tmp_path: Path, record: object,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    (root / "var/lib/regmirror").mkdir(parents=True)
    (root / "var/lib/regmirror/state.json").write_text(json.dumps(
        {"version": 1, "runtime": "containerd", "files": {"/etc/containerd/config.toml": record}}))
    for command in (["apply", "--mirror", "quay.io=https://m.example.com"], ["reset"]):
        err = refused(root, capsys, *command, "--root", str(root), "--restart", "never", code=1)
        assert "state.json" in err


@pytest.mark.parametrize("daemon_json", ['{"registry-mirrors": 5}', '{"registry-mirrors": [5]}'])
def test_daemon_json_of_the_wrong_types_is_refused(tmp_path: Path, daemon_json: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path, None)
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text(daemon_json)
    for command in (["apply", "--mirror", "docker.io=https://m.example.com"], ["show"]):
        err = refused(root, capsys, *command, "--root", str(root), "--restart", "never", "--runtime", "docker",
                      code=1)
        assert "registry-mirrors" in err
    before = contents(root)
    assert cli.main(["reset", "--root", str(root), "--restart", "never", "--runtime", "docker"]) == 0
    assert contents(root) == before  # nothing of regmirror's to give back: the file is not even read


# --- defect 11: -f must not ignore what it does not understand ---------------------------------------------


def test_unknown_spec_fields_are_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % ("", "  mirorrs: []\n"))
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc))
    assert "unknown field" in err and "'mirorrs'" in err


def test_duplicate_yaml_keys_are_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % ("", "  registry: docker.io\n"))
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc))
    assert "duplicate key" in err and "'registry'" in err


SELECTED = "  nodeSelector: {matchLabels: {pool: gpu}}\n"


def test_a_node_selector_without_node_labels_is_invalid_input(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % ("", SELECTED))
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc))
    assert "nodeSelector" in err and "--node-labels" in err


def test_a_mirror_for_other_nodes_is_not_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    other = tmp_path / "other.yaml"
    doc.write_text(DOC % ("", SELECTED))
    other.write_text((DOC % ("2", "")).replace("quay.io", "ghcr.io"))
    assert cli.main(["apply", "--root", str(root), "--restart", "never", "-f", str(doc), "-f", str(other),
                     "--node-labels", "pool=cpu,kubernetes.io/os=linux"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "'q'" in out
    certs = root / "etc/containerd/certs.d"
    assert sorted(p.name for p in certs.iterdir()) == ["ghcr.io"]
    monkeypatch.setenv("REGMIRROR_NODE_LABELS", "pool=gpu")
    assert cli.main(["apply", "--root", str(root), "--restart", "never", "-f", str(doc), "-f", str(other)]) == 0
    assert sorted(p.name for p in certs.iterdir()) == ["ghcr.io", "quay.io"]


def test_a_selector_that_selects_nothing_here_leaves_nothing_to_apply(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % ("", SELECTED))
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc),
                  "--node-labels", "pool=cpu")
    assert "selects this node" in err or "nothing to apply" in err


@pytest.mark.parametrize("labels", ["pool", "=x", "pool=a,pool=b", "Bad Key=x"])
def test_malformed_node_labels_are_invalid_input(tmp_path: Path, labels: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "--node-labels", labels,
                  "--mirror", "quay.io=https://m.example.com")
    assert "--node-labels" in err


def test_every_refusal_is_a_regmirror_error() -> None:
    from regmirror_agent import engine, nodefiles, ownership
    from regmirror_agent.runtimes import containerd, docker
    from regmirror_api import errors, models

    # applying's Conflict and WriteFailed reach callers wrapped in EngineError (engine.execute, engine.locked).
    assert issubclass(models.InvalidSpec, errors.RegmirrorError)
    for cls in (engine.EngineError, containerd.NodeRefused, docker.DockerRefused, ownership.CorruptState,
                nodefiles.UnsafePath):
        assert issubclass(cls, errors.Refused), cls


@pytest.mark.parametrize("selector, words", [
    ("5", "must be a label selector object"),
    ("{matchLabel: {pool: gpu}}", "unknown field(s) 'matchLabel'"),
    ("{matchLabels: [pool]}", "matchLabels: must map"),
    ("{matchExpressions: [{key: pool, operator: In}]}", "operator In needs at least one value"),
    ("{matchExpressions: [{key: pool, operator: Gt, values: ['1']}]}", "'Gt' is not one of"),
    ("{matchExpressions: 5}", "matchExpressions: must be a list"),
])
def test_a_malformed_node_selector_is_invalid_input(tmp_path: Path, selector: str, words: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % ("", f"  nodeSelector: {selector}\n"))
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc),
                  "--node-labels", "pool=gpu")
    assert "spec.nodeSelector" in err and words in err


@pytest.mark.parametrize("record", ["[]", "{", '{"request": 5}', "null", '"x"', "\udcff"])
def test_a_fast_path_record_that_is_not_one_is_ignored(tmp_path: Path, record: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """applied.json only saves planning time: whatever it holds, the apply is planned and done."""
    root = node(tmp_path)
    (root / "var/lib/regmirror").mkdir(parents=True)
    (root / "var/lib/regmirror/applied.json").write_bytes(record.encode("utf-8", "surrogateescape"))
    assert cli.main(["apply", "--root", str(root), "--restart", "never",
                     "--mirror", "quay.io=https://m.example.com"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (root / "etc/containerd/certs.d/quay.io/hosts.toml").is_file()


def test_a_null_label_in_a_selector_is_dropped_as_the_apiserver_drops_it(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    doc.write_text(DOC % ("", "  nodeSelector: {matchLabels: {pool: null, zone: a}}\n"))
    assert cli.main(["apply", "--root", str(root), "--restart", "never", "-f", str(doc),
                     "--node-labels", "zone=a"]) == 0
    assert (root / "etc/containerd/certs.d/quay.io/hosts.toml").is_file()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nine levels of nine aliases: 9**9 items if expanded. Refused, quickly, with a short message."""
    root = node(tmp_path)
    doc = tmp_path / "m.yaml"
    levels = ["a: &l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 9)]
    doc.write_text("\n".join(levels) + "\napiVersion: *l8\nkind: *l8\nmetadata: {name: q}\n"
                   "spec: {registry: *l8, mirrors: *l8}\n")
    err = refused(root, capsys, "apply", "--root", str(root), "--restart", "never", "-f", str(doc))
    assert len(err) < 5000 and "expected apiVersion" in err
