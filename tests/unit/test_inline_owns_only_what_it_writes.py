"""Inline mode owns only what it writes: ``mirrors."<registry>"`` of the registries it configures and
``configs."<host>".tls`` of its mirror hosts. The node's own entries for other registries and hosts stay the
node's: a hand edit to them survives apply and reset byte for byte (found by
``test_reset_keeps_hand_edits.py``: a reset gave back ``insecure_skip_verify = true`` for the node's own ghcr
mirror host after a person had set it to ``false``). Hosts mode still takes every inline setting over.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any

import pytest

from regmirror_agent import ownership
from regmirror_agent.nodeviews import DictView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import containerd
from regmirror_api import models
from tests.unit.trees import apply_in_memory

CFG = containerd.CONFIG_FILE
STATE = "/var/lib/regmirror/state.json"
DESIRED = [models.parse_cli_mirror("quay.io=https://quay.tencentcloudcr.com"),
           models.parse_cli_mirror("docker.io=https://mirror.ccs.tencentyun.com")]
CRI = {1: "plugins.cri", 2: 'plugins."io.containerd.grpc.v1.cri"', 3: 'plugins."io.containerd.cri.v1.images"'}

#: The case hypothesis found, verbatim.
FOUND = "".join(line + "\n" for line in [
    "# ",
    "version = 2",
    "a = 0  # ",
    "b = 0  # ",
    "",
    '[plugins."io.containerd.grpc.v1.cri"]',
    '  [plugins."io.containerd.grpc.v1.cri".containerd]',
    "    # ",
    '    snapshotter = "overlayfs"',
    '  [plugins."io.containerd.grpc.v1.cri".registry]',
    "    # 0",
    '    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."ghcr.io"]',
    '      endpoint = ["https://ghcr.own.example"]',
    '    [plugins."io.containerd.grpc.v1.cri".registry.configs."ghcr.own.example".tls]',
    "      insecure_skip_verify = true",
])


def node_config(version: int) -> str:
    cri = CRI[version]
    return (f"version = {version}\n" if version > 1 else "") + f"""
[{cri}.registry]
  [{cri}.registry.mirrors."ghcr.io"]
    endpoint = ["https://ghcr.own.example"]
  [{cri}.registry.configs."ghcr.own.example".tls]
    insecure_skip_verify = true
  [{cri}.registry.configs."ghcr.io".auth]
    username = "bot"
"""


def plan(files: dict[str, str], desired: list[models.RegistryMirror], mode: str = "inline") -> Plan:
    state = ownership.parse_state(files.get(STATE), "state")
    return containerd.plan_containerd(desired, DictView(files), state, containerd.Options(mode=mode))


def registry_table(text: str, version: int) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(text)
    for key in containerd.registry_table_path(version):
        table = table[key]
    return table


def tls_off(text: str) -> str:
    return text.replace("insecure_skip_verify = true", "insecure_skip_verify = false")


def another_endpoint(text: str) -> str:
    return text.replace('endpoint = ["https://ghcr.own.example"]',
                        'endpoint = ["https://ghcr.own.example", "https://ghcr2.own.example"]')


def another_auth(text: str) -> str:
    return text.replace('username = "bot"', 'username = "robot"')


NODE_EDITS: dict[str, Callable[[str], str]] = {
    "tls of the node's own mirror host": tls_off,
    "mirrors of a registry regmirror does not configure": another_endpoint,
    "auth, never regmirror's": another_auth,
}


def test_the_case_hypothesis_found() -> None:
    before = {CFG: FOUND}
    applied = apply_in_memory(plan(before, DESIRED), before)
    assert "quay.tencentcloudcr.com" in applied[CFG]
    applied[CFG] = tls_off(applied[CFG])

    reset = apply_in_memory(plan(applied, []), applied)

    assert reset[CFG] == tls_off(FOUND)
    assert STATE not in reset


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("what", list(NODE_EDITS))
def test_a_hand_edit_to_the_nodes_own_entries_survives_reapply_and_reset(version: int, what: str) -> None:
    edit = NODE_EDITS[what]
    config = node_config(version)
    before = {CFG: config}
    applied = apply_in_memory(plan(before, DESIRED), before)
    assert edit(applied[CFG]) != applied[CFG]
    applied[CFG] = edit(applied[CFG])

    again = plan(applied, DESIRED)
    assert not again.changes, "apply put the node's own entry back over the hand edit"
    assert not again.drift and not any("put back" in n for n in again.notes)
    applied = apply_in_memory(again, applied)  # only the record: the edit is now the node's own setting

    reset = apply_in_memory(plan(applied, []), applied)
    assert reset[CFG] == edit(config)
    assert STATE not in reset


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_registry_added_by_hand_after_an_inline_apply_is_the_nodes(version: int) -> None:
    config = node_config(version)
    cri = CRI[version]
    added = f'\n[{cri}.registry.mirrors."registry.k8s.io"]\n  endpoint = ["https://k8s.own.example"]\n'
    before = {CFG: config}
    applied = apply_in_memory(plan(before, DESIRED), before)
    applied[CFG] += added

    reset = apply_in_memory(plan(applied, []), applied)

    assert reset[CFG] == config + added


@pytest.mark.parametrize("version", [1, 2, 3])
def test_regmirrors_own_inline_entries_still_go_back_to_the_nodes(version: int) -> None:
    """A hand edit to what regmirror wrote (its registries' mirrors, its mirror host's TLS, even a host the node
    had its own TLS for) is regmirror's: apply puts its settings back, reset gives back the node's."""
    cri = CRI[version]
    config = node_config(version) + f"""  [{cri}.registry.configs."quay.tencentcloudcr.com".tls]
    ca_file = "/etc/ssl/own-ca.pem"
"""
    desired = [models.RegistryMirror(name=registry, registry=registry,
                                     mirrors=(models.Mirror(url=url, skip_verify=True),))
               for registry, url in [("quay.io", "https://quay.tencentcloudcr.com"),
                                     ("docker.io", "https://mirror.ccs.tencentyun.com")]]
    before = {CFG: config}
    applied = apply_in_memory(plan(before, desired), before)
    written = applied[CFG]
    reg = registry_table(written, version)
    assert reg["configs"]["quay.tencentcloudcr.com"]["tls"] == {"ca_file": "/etc/ssl/own-ca.pem",
                                                                 "insecure_skip_verify": True}
    assert reg["configs"]["mirror.ccs.tencentyun.com"]["tls"] == {"insecure_skip_verify": True}
    edited = written.replace('"https://quay.tencentcloudcr.com"', '"https://quay.edited.example"')
    edited = edited.replace("/etc/ssl/own-ca.pem", "/etc/ssl/edited.pem")
    assert edited.count("edited") == 2
    applied[CFG] = edited

    again = apply_in_memory(plan(applied, desired), applied)
    assert again[CFG] == written

    applied[CFG] = edited
    reset = apply_in_memory(plan(applied, []), applied)
    assert reset[CFG] == config
    assert STATE not in reset


@pytest.mark.parametrize("version", [1, 2, 3])
def test_hosts_mode_still_takes_every_inline_setting_over(version: int) -> None:
    config = node_config(version)
    before = {CFG: config}
    applied = apply_in_memory(plan(before, DESIRED, "hosts"), before)
    reg = registry_table(applied[CFG], version)
    assert reg["config_path"] == containerd.DEFAULT_CONFIG_PATH
    assert "mirrors" not in reg and "tls" not in reg["configs"].get("ghcr.own.example", {})
    assert "/etc/containerd/certs.d/ghcr.io/hosts.toml" in applied

    reset = apply_in_memory(plan(applied, [], "hosts"), applied)
    assert reset == before
