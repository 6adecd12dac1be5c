"""Mirror credentials: what a user notices. The login reaches the mirror's hosts.toml (mode 0600) and nothing else
regmirror writes or prints; a Secret that gives no login is named with what is wrong, never with its content;
runtimes that cannot carry a login refuse it by name; an agent asks for a Secret once per published version.

Proven on real containerd, the real apiserver and agents by tests/integration/test_credentials_real.py and
tests/e2e/test_credentials.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import stat
import time
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from regmirror_agent import cli, credentials, engine
from regmirror_agent.agent import Agent, AgentSettings
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.runtimes import containerd, crio, docker
from regmirror_agent.runtimes.hoststoml import Host, HostsFile, render_hosts_toml
from regmirror_api import contract, models
from regmirror_operator import planning
from tests.unit.test_agent_loop import CM_PATH, REPORT_PATH, FakeApi, instantly, wait_until

PASSWORD = "hunter2-very-secret"
USER = "robot$mirror"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
HOST = "harbor.example.com:5000"
URL = f"https://{HOST}"
B64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731


def basic_auth(user: str | None = USER, password: str | None = PASSWORD) -> dict[str, Any]:
    data = {k: B64(v) for k, v in (("username", user), ("password", password)) if v is not None}
    return {"type": credentials.BASIC_AUTH, "data": data}


def docker_secret(auths: dict[str, Any]) -> dict[str, Any]:
    return {"type": credentials.DOCKER_CONFIG_JSON, "data": {".dockerconfigjson": B64(json.dumps({"auths": auths}))}}


# --- reading a login ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [
    basic_auth(),
    docker_secret({HOST: {"auth": TOKEN}}),
    docker_secret({HOST: {"username": USER, "password": PASSWORD}}),
    docker_secret({f"https://{HOST}/v1/": {"auth": TOKEN}, "quay.io": {"auth": B64("a:b")}}),
], ids=["basic-auth", "dockerconfigjson-auth", "dockerconfigjson-username", "dockerconfigjson-url-key"])
def test_each_secret_type_gives_the_basic_header(secret: dict[str, Any]) -> None:
    login = credentials.login_from_secret(secret, HOST, "Secret regmirror-system/harbor")
    assert login.authorization() == f"Basic {TOKEN}"
    assert PASSWORD not in repr(login)


@pytest.mark.parametrize(("secret", "says"), [
    (basic_auth(password=None), 'the key "password" is missing'),
    (basic_auth(user=None), 'the key "username" is missing'),
    (basic_auth(password=""), "the password is empty"),
    ({"type": credentials.BASIC_AUTH, "data": {"username": "%%%", "password": B64(PASSWORD)}}, "not base64"),
    (docker_secret({"quay.io": {"auth": TOKEN}}), f"no \"auths\" entry for the mirror host {HOST!r}"),
    (docker_secret({HOST: {"auth": B64(PASSWORD)}}), "is not base64 of username:password"),
    ({"type": "Opaque", "data": {"password": B64(PASSWORD)}}, "has type 'Opaque'; expected kubernetes.io/basic-auth"),
])
def test_a_secret_without_a_login_is_named_with_what_is_wrong_and_nothing_of_its_content(
        secret: dict[str, Any], says: str) -> None:
    with pytest.raises(credentials.CredentialsProblem) as caught:
        credentials.login_from_secret(secret, HOST, "Secret regmirror-system/harbor")
    message = str(caught.value)
    assert message.startswith("Secret regmirror-system/harbor: ") and says in message
    assert PASSWORD not in message and TOKEN not in message and B64(PASSWORD) not in message


def test_the_model_takes_a_secret_name_and_refuses_anything_else() -> None:
    spec = {"registry": "quay.io", "mirrors": [{"url": URL, "credentials": {"secretName": "harbor"}}]}
    mirror = models.parse_spec("q", spec).mirrors[0]
    assert mirror.credentials == models.Credentials("harbor")
    assert mirror.to_spec()["credentials"] == {"secretName": "harbor"}
    bad = {"registry": "quay.io", "mirrors": [{"url": URL, "credentials": {"secretName": "Harbor_1", "password": "x"}}]}
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_spec("q", bad)
    assert any("unknown field(s) 'password'" in p for p in caught.value.problems)
    assert any("'Harbor_1' is not a Secret name" in p for p in caught.value.problems)


def test_the_operator_publishes_the_secrets_name_and_version_never_its_content() -> None:
    body = {"metadata": {"name": "quay-io", "uid": "u", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"registry": "quay.io", "mirrors": [{"url": URL, "credentials": {"secretName": "harbor"}}]}}
    missing = planning.plan({"quay-io": body}, {}, {}, now="2026-01-01T00:00:00Z", secrets={}).desired
    there = planning.plan({"quay-io": body}, {}, {}, now="2026-01-01T00:00:00Z", secrets={"harbor": "4711"}).desired
    rotated = planning.plan({"quay-io": body}, {}, {}, now="2026-01-01T00:00:00Z", secrets={"harbor": "4712"}).desired
    spec = lambda text: json.loads(text)["mirrors"][0]["spec"]["mirrors"][0]  # noqa: E731
    assert spec(missing)["credentials"] == {"secretName": "harbor"}
    assert spec(there)["credentials"] == {"secretName": "harbor", "resourceVersion": "4711"}
    assert rotated != there, "a rotation changes the document every agent watches"
    assert contract.parse_desired(there).entries[0].mirror().mirrors[0].credentials == models.Credentials("harbor",
                                                                                                         "4711")


# --- the hosts.toml -------------------------------------------------------------------------------------------


def test_the_header_is_written_in_its_hosts_table_and_redacted_in_every_view() -> None:
    spec = HostsFile(registry="quay.io", hosts=(
        Host(url=URL, authorization=f"Basic {TOKEN}", authorization_source="Secret regmirror-system/harbor"),
        Host(url="https://open.example.com")))
    text = render_hosts_toml(spec)
    parsed = tomllib.loads(text)
    assert list(parsed["host"]) == [URL, "https://open.example.com"]
    assert parsed["host"][URL]["header"] == {"Authorization": [f"Basic {TOKEN}"]}
    assert "header" not in parsed["host"]["https://open.example.com"]
    assert credentials.holds_secret(text)
    shown = credentials.redact(text)
    assert TOKEN not in shown
    assert 'Authorization = ["<redacted: Secret regmirror-system/harbor>"]' in shown
    header = tomllib.loads(shown)["host"][URL]["header"]
    assert header["Authorization"] == ["<redacted: Secret regmirror-system/harbor>"]
    own = ('[host."https://x"]\n  [host."https://x".header]\n    authorization = ["Bearer node-own"]\n'
           '[host."https://y"]\n  header = {"Authorization" = "Basic node-inline", X = ["y"]}\n'
           '[host."https://z".header]\n  Authorization = [\n    "Basic node-multi-line",\n  ]\n')
    assert credentials.holds_secret(own)
    for hidden in ("node-own", "node-inline", "node-multi-line"):
        assert hidden not in credentials.redact(own)
    assert tomllib.loads(credentials.redact(own))["host"]["https://y"]["header"] == {"Authorization": ["<redacted>"],
                                                                                     "X": ["y"]}
    config = ('[plugins."io.containerd.grpc.v1.cri".registry.configs."r".auth]\n'
              '  password = "node-pw"\n  auth = "eA=="\n')
    assert "node-pw" not in credentials.redact_for_view(config) and "eA==" not in credentials.redact_for_view(config)
    assert credentials.redact(config) == config, "records keep the node's own config.toml as it is"


def desired_with_login(password: str = PASSWORD) -> list[models.RegistryMirror]:
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    return [models.RegistryMirror("quay-io", "quay.io", (models.Mirror(URL, credentials=models.Credentials(
        "harbor", "7", f"Basic {token}", "Secret regmirror-system/harbor")),))]


@pytest.mark.parametrize(("plan", "says"), [
    (lambda d, v, s: containerd.plan_containerd(d, v, s, containerd.Options(mode="inline")),
     "which containerd in inline mode cannot use: inline mode would put them in config.toml"),
    (lambda d, v, s: docker.plan_docker([models.RegistryMirror("hub", "docker.io", d[0].mirrors)], v, s),
     "which Docker cannot use: its registry-mirrors are bare URLs"),
    (crio.plan_crio, "which CRI-O cannot use: containers-registries.conf(5) has no "
                                              "credentials field; CRI-O reads them only from its auth file"),
], ids=["containerd-inline", "docker", "crio"])
def test_runtimes_that_cannot_carry_a_login_refuse_it_by_name(tmp_path: Path, plan: Any, says: str) -> None:
    from regmirror_agent import ownership

    with pytest.raises(Exception) as caught:
        plan(desired_with_login(), NodeRoot(str(tmp_path)), ownership.State())
    assert says in str(caught.value) and "Secret regmirror-system/harbor" in str(caught.value)
    assert PASSWORD not in str(caught.value) and TOKEN not in str(caught.value)


# --- nothing kept or printed ------------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue() + err.getvalue()


def test_nothing_regmirror_writes_or_prints_holds_the_login_but_the_hosts_toml(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """apply, a rotation, dry runs, show, reset; a node that had its own hosts.toml for the registry (whose
    text a state record keeps): the password and its base64 token are in no file but the hosts.toml, in no
    output and in no log line."""
    root = tmp_path / "node"
    certs = root / "etc/containerd/certs.d/quay.io"
    certs.mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    (certs / "hosts.toml").write_text('server = "https://quay.io"\n[host."https://own.example.com"]\n')
    secrets: list[str] = []
    printed = []
    base = ["apply", "--root", str(root), "--restart", "never", "--mirror", f"quay.io={URL}"]
    caplog.set_level(logging.DEBUG)
    for password in (PASSWORD, "rotated-" + PASSWORD):
        creds = tmp_path / "config.json"
        creds.write_text(json.dumps({"auths": {HOST: {"auth": B64(f"{USER}:{password}")}}}))
        creds.chmod(0o600)
        os.utime(creds, ns=(time.time_ns(), time.time_ns()))
        secrets += [password, B64(f"{USER}:{password}")]
        for args in ([*base, "--credentials", str(creds), "--dry-run"], [*base, "--credentials", str(creds)],
                     ["show", "--root", str(root)], ["show", "--root", str(root), "-o", "json"]):
            code, output = run_cli(*args)
            assert code == 0, output
            printed.append(output)
        hosts = certs / "hosts.toml"
        assert stat.S_IMODE(hosts.stat().st_mode) == 0o600
        assert B64(f"{USER}:{password}") in hosts.read_text()
    code, output = run_cli("reset", "--root", str(root), "--restart", "never", "--dry-run")
    printed.append(output)
    assert "<redacted: credentials file" in "".join(printed)
    code, output = run_cli("reset", "--root", str(root), "--restart", "never")
    assert code == 0, output
    printed.append(output)
    assert (certs / "hosts.toml").read_text() == 'server = "https://quay.io"\n[host."https://own.example.com"]\n'
    views = {"printed": "".join(printed), "logs": caplog.text}
    views.update({str(p): p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()})
    assert [(where, s[:4]) for where, text in views.items() for s in secrets if s in text] == []


def test_a_state_record_of_a_file_with_a_login_keeps_only_a_digest_of_its_redacted_text(tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    settings = engine.Settings(root=str(root), restart="never")
    outcome = engine.apply(desired_with_login(), settings)
    assert outcome.changed
    state = (root / "var/lib/regmirror/state.json").read_text()
    assert TOKEN not in state and PASSWORD not in state
    again = engine.apply(desired_with_login("rotated"), settings)  # a new login, same version: still rewritten
    assert [c.path for c in again.plan.changes] == ["/etc/containerd/certs.d/quay.io/hosts.toml"]
    assert not again.restarted and not again.plan.restart, "a rotation is a hosts.toml change: no restart"
    hosts = root / "etc/containerd/certs.d/quay.io/hosts.toml"
    written = hosts.read_text()
    hosts.write_text(written.replace("Basic ", "Basic x"))  # a hand edit of the login alone is put back too
    engine.apply(desired_with_login("rotated"), settings)
    assert hosts.read_text() == written
    applied = (root / "var/lib/regmirror/applied.json").read_text()
    for secret in (PASSWORD, "rotated", TOKEN, base64.b64encode(f"{USER}:rotated".encode()).decode()):
        assert secret not in applied and secret not in (root / "var/lib/regmirror/state.json").read_text()


def node_with_hosts_mode(tmp_path: Path) -> tuple[Path, engine.Settings]:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    return root, engine.Settings(root=str(root), restart="never")


def bits(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_login_narrows_the_nodes_own_hosts_toml_to_root_and_reset_gives_its_own_bits_back(tmp_path: Path) -> None:
    """The node's own hosts.toml (0640 here) is 0600 while it holds regmirror's login, 0640 again once the login
    is gone (the mirror kept), and reset gives back its text and its bits."""
    root, settings = node_with_hosts_mode(tmp_path)
    hosts = root / "etc/containerd/certs.d/quay.io/hosts.toml"
    hosts.parent.mkdir(parents=True)
    own = 'server = "https://quay.io"\n[host."https://own.example.com"]\n'
    hosts.write_text(own)
    hosts.chmod(0o640)
    engine.apply(desired_with_login(), settings)
    assert bits(hosts) == 0o600 and TOKEN in hosts.read_text()
    without = [models.RegistryMirror("quay-io", "quay.io", (models.Mirror(URL),))]
    engine.apply(without, settings)
    assert bits(hosts) == 0o640 and "Authorization" not in hosts.read_text() and URL in hosts.read_text()
    engine.apply(desired_with_login("rotated"), settings)
    assert bits(hosts) == 0o600
    engine.reset(settings)
    assert (hosts.read_text(), bits(hosts)) == (own, 0o640)
    assert not (root / "var/lib/regmirror/state.json").exists()


def test_a_write_that_fails_after_a_login_was_written_gives_the_file_its_text_and_bits_back(
        tmp_path: Path, immutable: list[Path]) -> None:
    """The roll back of a failed apply (the kernel refuses a later file: chattr +i on its folder) puts the node's
    own hosts.toml back as it was, 0640 included, not the owner-only bits its login needed."""
    from tests.unit.test_engine_faults import chattr_i

    root, settings = node_with_hosts_mode(tmp_path)
    hosts = root / "etc/containerd/certs.d/quay.io/hosts.toml"
    hosts.parent.mkdir(parents=True)
    own = 'server = "https://quay.io"\n'
    hosts.write_text(own)
    hosts.chmod(0o640)
    later = root / "etc/containerd/certs.d/registry.k8s.io"  # written after quay.io's (the plan is sorted by path)
    later.mkdir()
    chattr_i(later, immutable)
    desired = [*desired_with_login(), models.RegistryMirror("k8s", "registry.k8s.io", (models.Mirror(URL),))]
    with pytest.raises(engine.EngineError, match=r"registry\.k8s\.io"):
        engine.apply(desired, settings)
    assert (hosts.read_text(), bits(hosts)) == (own, 0o640)


def test_a_hosts_toml_regmirror_made_is_0644_again_when_its_login_goes(tmp_path: Path) -> None:
    root, settings = node_with_hosts_mode(tmp_path)
    hosts = root / "etc/containerd/certs.d/quay.io/hosts.toml"
    engine.apply(desired_with_login(), settings)
    assert bits(hosts) == 0o600
    engine.apply([models.RegistryMirror("quay-io", "quay.io", (models.Mirror(URL),))], settings)
    assert bits(hosts) == 0o644 and "Authorization" not in hosts.read_text()


def test_the_inverse_of_a_plan_that_writes_a_login_gives_the_file_its_bits_back() -> None:
    """What a roll back after an unhealthy restart applies: the node's text, and its bits with it."""
    from regmirror_agent import ownership
    from regmirror_agent.nodeviews import DictView

    path = "/etc/containerd/certs.d/quay.io/hosts.toml"
    own = 'server = "https://quay.io"\n'
    view = DictView({"/etc/containerd/config.toml": 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                     '  config_path = "/etc/containerd/certs.d"\n', path: own}, modes={path: 0o640})
    plan = containerd.plan_containerd(desired_with_login(), view, ownership.State(), containerd.Options())
    [change] = [c for c in plan.changes if c.path == path]
    assert (change.mode, change.mode_before) == (None, 0o640)  # written 0600 by write_atomic, as any login
    assert '"mode": "0640"' in (plan.state_after or "")
    [back] = [c for c in plan.inverse().changes if c.path == path]
    assert (back.after, back.mode) == (own, 0o640)


def test_a_state_record_with_bits_that_are_not_octal_is_refused_by_name() -> None:
    from regmirror_agent import ownership

    text = json.dumps({"version": ownership.STATE_VERSION, "runtime": "containerd", "dirs": [], "files": {
        "/etc/x": {"original": "", "writtenSha256": "0" * 64, "mode": 420}}})
    with pytest.raises(ownership.CorruptState, match=r"files\['/etc/x'\]\.mode = 420 should be permission bits"):
        ownership.parse_state(text, "state.json")


# --- the agent asks for a Secret once per version -----------------------------------------------------------


def desired_doc(version: str) -> str:
    spec = {"registry": "quay.io", "mirrors": [{"url": URL, "credentials": {"secretName": "harbor",
                                                                         "resourceVersion": version}}]}
    return contract.render_desired([contract.Entry("quay-io", 1, spec, {}, uid="u")])


@pytest.fixture
def agent_api(running: Any) -> tuple[FakeApi, list[list[models.RegistryMirror]]]:
    api = FakeApi(desired_doc("1"))
    secret_path = f"{contract.SECRETS_PATH}/harbor"
    api.objects[secret_path] = basic_auth()
    applied: list[list[models.RegistryMirror]] = []

    def apply(mirrors: Any) -> engine.Outcome:
        applied.append(list(mirrors))
        return instantly(mirrors)

    running(api, resync=0, apply_mirrors=apply)
    return api, applied


def test_the_agent_reads_a_secret_once_per_published_version_and_applies_its_login(
        agent_api: tuple[FakeApi, list[list[models.RegistryMirror]]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api, applied = agent_api
    secret_path = f"{contract.SECRETS_PATH}/harbor"
    wait_until(lambda: len(applied) > 20)  # reconciling again and again (resync 0), as at rest
    assert api.calls.count(f"GET {secret_path}") == 1
    login = applied[-1][0].mirrors[0].credentials
    assert login is not None and login.authorization == f"Basic {TOKEN}"
    assert PASSWORD not in repr(applied[-1])
    api.objects[secret_path] = basic_auth(password="rotated")
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired_doc("2")}})
    wait_until(lambda: (c := applied[-1][0].mirrors[0].credentials) is not None
               and c.authorization == "Basic " + B64(f"{USER}:rotated"))
    time.sleep(0.2)
    assert api.calls.count(f"GET {secret_path}") == 2
    sent = json.dumps({path: obj for path, obj in api.objects.items() if path != secret_path})  # the report
    for secret in (PASSWORD, TOKEN, "rotated", B64(f"{USER}:rotated")):
        assert secret not in sent and secret not in caplog.text


def test_a_missing_secret_fails_the_entry_on_the_node_naming_it(
        agent_api: tuple[FakeApi, list[list[models.RegistryMirror]]]) -> None:
    api, applied = agent_api
    wait_until(lambda: REPORT_PATH in api.objects)
    del api.objects[f"{contract.SECRETS_PATH}/harbor"]
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired_doc("")}})

    def failed() -> bool:
        mirrors = api.objects[REPORT_PATH]["status"]["mirrors"]
        return mirrors[0]["state"] == contract.STATE_FAILED
    wait_until(failed)
    message = api.objects[REPORT_PATH]["status"]["mirrors"][0]["message"]
    assert f"Secret {contract.NAMESPACE}/harbor does not exist" in message
    assert "the node keeps what it ran for it" in message
    login = applied[-1][0].mirrors[0].credentials
    assert login is not None and login.authorization == f"Basic {TOKEN}", "the login it had stays in force"


def test_on_a_crio_node_only_the_registrymirror_with_credentials_fails_the_others_are_applied(
        running: Any, tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "etc/crio").mkdir(parents=True)
    (root / "etc/crio/crio.conf").write_text("[crio]\n")
    with_login = {"registry": "quay.io", "mirrors": [{"url": URL, "credentials": {"secretName": "harbor",
                                                                                  "resourceVersion": "1"}}]}
    plain = {"registry": "docker.io", "mirrors": [{"url": "https://hub-mirror.example.com"}]}
    api = FakeApi(contract.render_desired([contract.Entry("quay-io", 1, with_login, {}, uid="q"),
                                           contract.Entry("docker-io", 1, plain, {}, uid="d")]))
    api.objects[f"{contract.SECRETS_PATH}/harbor"] = basic_auth()
    settings = AgentSettings(node="node-a", engine=engine.Settings(root=str(root), restart="never"))
    running(api, apply_mirrors=None, settings=settings)
    wait_until(lambda: REPORT_PATH in api.objects, timeout=10)
    reports = {r["name"]: r for r in api.objects[REPORT_PATH]["status"]["mirrors"]}
    assert reports["docker-io"]["state"] == contract.STATE_APPLIED, reports
    assert reports["quay-io"]["state"] == contract.STATE_FAILED
    assert "which CRI-O cannot use: containers-registries.conf(5) has no credentials field" in \
        reports["quay-io"]["message"]
    drop_in = (root / "etc/containers/registries.conf.d/50-regmirror.conf").read_text()
    assert "hub-mirror.example.com" in drop_in and "harbor" not in drop_in
    assert f"GET {contract.SECRETS_PATH}/harbor" not in api.calls, "no Secret is read for a mirror refused here"


def test_cli_documents_naming_a_secret_take_the_login_from_the_credentials_file_by_host(tmp_path: Path) -> None:
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    doc = tmp_path / "mirrors.yaml"
    doc.write_text(json.dumps({"apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror",
                               "metadata": {"name": "quay-io"},
                               "spec": {"registry": "quay.io", "mirrors": [
                                   {"url": URL, "credentials": {"secretName": "harbor"}},
                                   {"url": "https://open.example.com"}]}}))
    base = ["apply", "--root", str(root), "--restart", "never", "-f", str(doc)]
    code, output = run_cli(*base)
    assert code == 2 and "names credentials.secretName 'harbor'" in output and "--credentials FILE" in output
    creds = tmp_path / "config.json"
    creds.write_text(json.dumps({"auths": {"other.example.com": {"auth": TOKEN}}}))
    creds.chmod(0o600)
    code, output = run_cli(*base, "--credentials", str(creds))
    assert code == 2 and f"has no \"auths\" entry for the mirror host {HOST!r}" in output
    creds.write_text(json.dumps({"auths": {HOST: {"auth": TOKEN}}}))
    code, output = run_cli(*base, "--credentials", str(creds))
    assert code == 0, output
    parsed = tomllib.loads((root / "etc/containerd/certs.d/quay.io/hosts.toml").read_text())
    assert parsed["host"][URL]["header"] == {"Authorization": [f"Basic {TOKEN}"]}
    assert "header" not in parsed["host"]["https://open.example.com"]
    assert TOKEN not in output and PASSWORD not in output


def test_an_accepted_login_is_checked_again_only_when_it_changes_a_refused_one_at_every_reconcile(
        running: Any) -> None:
    api = FakeApi(desired_doc("1"))
    secret_path = f"{contract.SECRETS_PATH}/harbor"
    api.objects[secret_path] = basic_auth()
    asked: list[str] = []

    def check(mirrors: Any, _timeout: float) -> dict[str, str]:
        login = mirrors[0].credentials.authorization
        asked.append(login)
        return {} if login == f"Basic {TOKEN}" else {mirrors[0].url: f"the mirror {URL} refused the credentials"}

    def with_check(agent: Agent) -> None:
        agent.check_logins = check

    agent = running(api, resync=0, before=with_check)
    wait_until(lambda: agent.reconciles > 20)
    assert asked == [f"Basic {TOKEN}"], "an accepted login is not asked again at every resync"
    api.objects[secret_path] = basic_auth(password="wrong")
    api.push(CM_PATH, "MODIFIED", {**api.configmap, "data": {contract.CONFIGMAP_KEY: desired_doc("2")}})
    wait_until(lambda: len(asked) > 5)  # refused: asked at every reconcile, to see it fixed at once
    wait_until(lambda: api.objects[REPORT_PATH]["status"]["mirrors"][0]["state"] == contract.STATE_FAILED)
    assert "refused the credentials" in api.objects[REPORT_PATH]["status"]["mirrors"][0]["message"]
