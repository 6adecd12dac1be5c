"""Planner behaviours a node owner would notice, beyond the golden trees."""

from __future__ import annotations

import tomllib

import pytest

from regmirror_agent import ownership
from regmirror_agent.nodeviews import DictView
from regmirror_agent.runtimes import containerd, docker
from regmirror_api import models
from tests.unit.trees import V2, apply_in_memory

CFG = containerd.CONFIG_FILE
QUAY = models.parse_cli_mirror("quay.io=https://quay.tencentcloudcr.com")
HUB = models.parse_cli_mirror("docker.io=https://mirror.ccs.tencentyun.com")


def plan(files: dict[str, str], desired: list[models.RegistryMirror], **options: object):
    state_text = files.get("/var/lib/regmirror/state.json")
    return containerd.plan_containerd(desired, DictView(files), ownership.parse_state(state_text, "state"),
                                      containerd.Options(**options))  # type: ignore[arg-type]


def run(files: dict[str, str], desired: list[models.RegistryMirror], **options: object) -> dict[str, str]:
    return apply_in_memory(plan(files, desired, **options), files)


def test_hosts_toml_changes_need_no_restart_but_config_toml_does() -> None:
    first = plan({CFG: V2}, [QUAY])
    assert first.restart
    node = apply_in_memory(first, {CFG: V2})
    second = plan(node, [QUAY, HUB])
    assert second.changes and not second.restart
    assert [c.path for c in second.changes] == ["/etc/containerd/certs.d/docker.io/hosts.toml"]


def test_dropping_a_registry_gives_back_the_nodes_own_file() -> None:
    own = 'server = "https://quay.io"\n[host."https://own.mirror"]\n  capabilities = ["pull"]\n'
    start = {CFG: V2.replace('""', '"/etc/containerd/certs.d"'), "/etc/containerd/certs.d/quay.io/hosts.toml": own}
    node = run(start, [QUAY, HUB])
    assert "quay.tencentcloudcr.com" in node["/etc/containerd/certs.d/quay.io/hosts.toml"]
    node = run(node, [HUB])
    assert node["/etc/containerd/certs.d/quay.io/hosts.toml"] == own
    assert "docker.io" in "".join(node)


def test_hand_edit_of_unowned_setting_survives_reset() -> None:
    node = run({CFG: V2}, [QUAY])
    edited = node[CFG].replace("version = 2\n", "version = 2\noom_score = -999  # ops ticket 42\n")
    node[CFG] = edited
    again = plan(node, [QUAY])
    assert not again.changes, "an unrelated edit is not drift"
    node = apply_in_memory(again, node)
    node = run(node, [])
    assert node[CFG] == V2.replace("version = 2\n", "version = 2\noom_score = -999  # ops ticket 42\n")
    assert "/var/lib/regmirror/state.json" not in node


def test_hand_edit_of_managed_hosts_toml_is_put_back_and_reported() -> None:
    node = run({CFG: V2}, [QUAY])
    path = "/etc/containerd/certs.d/quay.io/hosts.toml"
    good = node[path]
    node[path] = good.replace("tencentcloudcr", "evil")
    fix = plan(node, [QUAY])
    assert [c.after for c in fix.changes] == [good]
    assert any("edited since regmirror wrote it" in n for n in fix.notes)


def test_inline_mirrors_and_tls_move_to_hosts_and_come_back_on_reset() -> None:
    v1 = ('[plugins.cri.registry.mirrors."docker.io"]\n  endpoint = ["https://own.mirror", "https://registry-1.docker.io"]\n'
          '[plugins.cri.registry.configs."own.mirror".tls]\n  insecure_skip_verify = true\n')
    node = run({CFG: v1}, [QUAY])
    parsed = tomllib.loads(node[CFG])["plugins"]["cri"]["registry"]
    assert parsed["config_path"] == "/etc/containerd/certs.d"
    assert not parsed.get("mirrors") and not parsed.get("configs")
    hub = tomllib.loads(node["/etc/containerd/certs.d/docker.io/hosts.toml"])
    assert hub["server"] == "https://registry-1.docker.io"
    assert hub["host"] == {"https://own.mirror": {"capabilities": ["pull", "resolve"], "skip_verify": True}}
    assert run(node, [])[CFG] == v1


def test_multi_directory_config_path_writes_first_and_warns() -> None:
    p = plan({CFG: V2.replace('""', '"/etc/containerd/certs.d:/etc/docker/certs.d"')}, [QUAY])
    assert [c.path for c in p.changes] == ["/etc/containerd/certs.d/quay.io/hosts.toml"]
    assert any("#12415" in n for n in p.notes)


def test_inline_mode_is_refused_beside_config_path() -> None:
    with pytest.raises(containerd.NodeRefused, match="config_path"):
        plan({CFG: V2.replace('""', '"/etc/containerd/certs.d"')}, [QUAY], mode="inline")


def test_old_containerd_gets_inline_mirrors_in_auto_mode() -> None:
    node = run({CFG: V2}, [QUAY], containerd_version=(1, 4, 13))
    assert tomllib.loads(node[CFG])["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"] == {
        "quay.io": {"endpoint": ["https://quay.tencentcloudcr.com"]}}
    with pytest.raises(containerd.NodeRefused, match=r"1\.5 or later"):
        plan({CFG: V2}, [QUAY], mode="hosts", containerd_version=(1, 4, 13))


def test_new_config_on_containerd_2_uses_schema_3() -> None:
    node = run({}, [QUAY], containerd_version=(2, 1, 4))
    parsed = tomllib.loads(node[CFG])
    assert parsed["version"] == 3
    assert parsed["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] == "/etc/containerd/certs.d"


@pytest.mark.parametrize("text, expected", [
    ('version = 2\ndisabled_plugins = ["cri"]\n', "turns off containerd's CRI plugin"),
    ('version = 2\n[plugins\n', "line 2"),
    ("version = 7\n", "version = 7"),
])
def test_refused_nodes_name_the_problem(text: str, expected: str) -> None:
    with pytest.raises(containerd.NodeRefused, match=expected):
        plan({CFG: text}, [QUAY])


def test_dropin_defining_the_cri_section_is_refused() -> None:
    files = {CFG: 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n',
             "/etc/containerd/conf.d/10-cri.toml": 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'}
    with pytest.raises(containerd.NodeRefused, match=r"10-cri\.toml"):
        plan(files, [QUAY])


def test_no_desired_and_no_state_plans_nothing() -> None:
    assert not plan({CFG: "garbage that is not toml ["}, []).changed


def test_docker_refuses_other_registries_naming_them() -> None:
    with pytest.raises(docker.DockerRefused, match=r"'quay\.io'"):
        docker.plan_docker([QUAY], DictView({}), ownership.State())


def test_docker_keeps_every_other_key() -> None:
    own = '{"live-restore": true, "registry-mirrors": ["https://old"], "log-driver": "journald"}\n'
    p = docker.plan_docker([HUB], DictView({docker.DAEMON_JSON: own}), ownership.State())
    node = apply_in_memory(p, {docker.DAEMON_JSON: own})
    import json
    assert json.loads(node[docker.DAEMON_JSON]) == {"live-restore": True, "log-driver": "journald",
                                                    "registry-mirrors": ["https://mirror.ccs.tencentyun.com"]}
    state = ownership.parse_state(node["/var/lib/regmirror/state.json"], "s")
    back = docker.plan_docker([], DictView(node), state)
    assert apply_in_memory(back, node) == {docker.DAEMON_JSON: own}


def test_a_hand_edit_of_only_regmirrors_key_still_resets_to_the_exact_bytes() -> None:
    own = ('root = "/var/lib/containerd"\n\n[plugins]\n  [plugins.cri]\n    [plugins.cri.containerd]\n'
           '      snapshotter = "native"\n')
    node = run({CFG: own}, [QUAY])
    node[CFG] = node[CFG].replace('config_path = "/etc/containerd/certs.d"', 'config_path = ""')
    node = run(node, [QUAY])  # drift repaired
    assert run(node, [])[CFG] == own


@pytest.mark.parametrize("out, expected", [
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n", (1, 6, 20)),
    ("containerd github.com/containerd/containerd/v2 v2.3.7 0123abc\n", (2, 3, 7)),
    ("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da\n", (1, 7, 27)),
    ("", None),
])
def test_containerd_version_is_read_from_its_own_words(out: str, expected: tuple[int, ...] | None) -> None:
    from regmirror_agent.restarting import parse_containerd_version
    assert parse_containerd_version(out) == expected


def test_config_path_list_becomes_one_directory_on_containerd_2_1_and_comes_back_on_reset() -> None:
    listed = V2.replace('""', '"/etc/containerd/certs.d:/etc/docker/certs.d"')
    p = plan({CFG: listed}, [QUAY], containerd_version=(2, 3, 7))
    node = apply_in_memory(p, {CFG: listed})
    registry = tomllib.loads(node[CFG])["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    assert registry["config_path"] == "/etc/containerd/certs.d"
    assert p.restart and any("ignores for CRI pulls" in n for n in p.notes)
    assert run(node, [])[CFG] == listed


def test_state_during_an_apply_keeps_old_and_new_records() -> None:
    node = run({CFG: V2}, [QUAY])
    hub = plan(node, [HUB])  # drops quay.io (its records go) and adds docker.io
    intent = ownership.parse_state(ownership.intent_state(hub.state_before, hub.state_after), "intent")
    after = ownership.parse_state(hub.state_after, "after")
    assert "/etc/containerd/certs.d/quay.io/hosts.toml" in intent.files
    assert "/etc/containerd/certs.d/quay.io/hosts.toml" not in after.files
    assert "/etc/containerd/certs.d/docker.io/hosts.toml" in intent.files
