"""CRI-O's planner: regmirror's own registries.conf.d drop-in, what it says, what it refuses, what reset gives back.

``tests/integration/test_crio_real.py`` proves the same files on podman, which reads them with CRI-O's library.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from regmirror_agent import engine, ownership
from regmirror_agent.nodeviews import DictView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import crio
from regmirror_agent.settings import Settings
from regmirror_api import models
from tests.unit.trees import apply_in_memory

DROP_IN = crio.DROP_IN
STATE = "/var/lib/regmirror/state.json"
CA = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
# The node's own registries.conf: hand-written, with an entry of its own for quay.io and a comment.
NODE_CONF = ('# site policy\nunqualified-search-registries = ["registry.example.com"]\n\n'
             '[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\nblocked = false  # ticket 7\n')


def spec(name: str, **fields: Any) -> models.RegistryMirror:
    return models.parse_spec(name, fields)


def plan(files: dict[str, str], desired: list[models.RegistryMirror]) -> Plan:
    return crio.plan_crio(desired, DictView(files), ownership.parse_state(files.get(STATE), "state"))


def run(files: dict[str, str], desired: list[models.RegistryMirror]) -> dict[str, str]:
    return apply_in_memory(plan(files, desired), files)


QUAY = spec("quay", registry="quay.io", mirrors=[{"url": "http://127.0.0.1:5000"},
                                                 {"url": "https://quay.mirror.example.com"}])


def test_mirrors_become_one_registry_entry_in_regmirrors_own_drop_in() -> None:
    node = run({crio.REGISTRIES_CONF: NODE_CONF}, [QUAY])
    assert node[crio.REGISTRIES_CONF] == NODE_CONF, "the node's registries.conf is never edited"
    assert sorted(node) == [crio.REGISTRIES_CONF, DROP_IN, STATE]
    doc = tomllib.loads(node[DROP_IN])
    assert doc == {"registry": [{
        "prefix": "quay.io", "location": "quay.io",
        "mirror": [{"location": "127.0.0.1:5000", "insecure": True}, {"location": "quay.mirror.example.com"}]}]}


def test_the_drop_in_is_rendered_exactly() -> None:
    hub = spec("hub", registry="docker.io", mirrors=[{"url": "https://hub.mirror.example.com:8443"}])
    assert run({}, [QUAY, hub])[DROP_IN] == crio.HEADER + "\n" + (
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        'location = "docker.io"\n'
        "\n"
        "[[registry.mirror]]\n"
        'location = "hub.mirror.example.com:8443"\n'
        "\n"
        "[[registry]]\n"
        'prefix = "quay.io"\n'
        'location = "quay.io"\n'
        "\n"
        "[[registry.mirror]]\n"
        'location = "127.0.0.1:5000"\n'
        "insecure = true\n"
        "\n"
        "[[registry.mirror]]\n"
        'location = "quay.mirror.example.com"\n')


def test_a_change_needs_a_reload_and_applying_twice_changes_nothing() -> None:
    first = plan({}, [QUAY])
    assert first.restart and first.runtime == crio.RUNTIME
    node = apply_in_memory(first, {})
    again = plan(node, [QUAY])
    assert not again.changes and not again.restart


def test_reset_removes_the_drop_in_and_the_folders_regmirror_made() -> None:
    start = {crio.REGISTRIES_CONF: NODE_CONF}
    first = plan(start, [QUAY])
    assert crio.DROP_IN_DIR in first.mkdirs
    node = apply_in_memory(first, start)
    reset = plan(node, [])
    assert reset.restart, "CRI-O must re-read registries to drop the mirrors"
    assert crio.DROP_IN_DIR in reset.rmdirs
    assert apply_in_memory(reset, node) == start


def test_a_node_drop_in_of_the_same_name_comes_back_byte_for_byte() -> None:
    own = "# the node's own, oddly named\n[[registry]]\nlocation = \"ghcr.io\"\n"
    start = {DROP_IN: own}
    node = run(start, [QUAY])
    assert "127.0.0.1:5000" in node[DROP_IN]
    assert run(node, []) == start


def test_a_hand_edit_of_the_drop_in_is_put_back_and_reset_still_removes_it() -> None:
    node = run({}, [QUAY])
    node[DROP_IN] += '\n[[registry]]\nprefix = "ghcr.io"\nlocation = "ghcr.io"\n'
    again = plan(node, [QUAY])
    assert again.drift == (DROP_IN,)
    node = apply_in_memory(again, node)
    assert "ghcr.io" not in node[DROP_IN]
    assert run(node, []) == {}


def test_skip_verify_is_insecure_and_https_without_it_is_not() -> None:
    strict = spec("s", registry="ghcr.io", mirrors=[{"url": "https://a.example.com"},
                                                    {"url": "https://b.example.com", "skipVerify": True}])
    mirrors = tomllib.loads(run({}, [strict])[DROP_IN])["registry"][0]["mirror"]
    assert mirrors == [{"location": "a.example.com"}, {"location": "b.example.com", "insecure": True}]


def test_a_namespace_mirror_is_written_as_location_with_a_path() -> None:
    harbor = spec("h", registry="quay.io", mirrors=[{"url": "https://harbor.example.com/v2/quay-proxy",
                                                     "overridePath": True}])
    doc = tomllib.loads(run({}, [harbor])[DROP_IN])
    assert doc["registry"][0]["mirror"] == [{"location": "harbor.example.com/quay-proxy"}]


def test_upstream_never_makes_the_last_mirror_the_location() -> None:
    never = spec("n", registry="quay.io", upstream="Never",
                 mirrors=[{"url": "https://a.example.com"}, {"url": "http://b.example.com:5000"}])
    entry = tomllib.loads(run({}, [never])[DROP_IN])["registry"][0]
    assert entry == {"prefix": "quay.io", "location": "b.example.com:5000", "insecure": True,
                     "mirror": [{"location": "a.example.com"}]}
    only = spec("o", registry="quay.io", upstream="Never", mirrors=[{"url": "https://a.example.com"}])
    assert tomllib.loads(run({}, [only])[DROP_IN])["registry"][0] == {"prefix": "quay.io", "location": "a.example.com"}


def test_a_ca_bundle_goes_to_the_mirror_hosts_certs_d_folder_and_comes_back_out() -> None:
    tls = spec("t", registry="quay.io", mirrors=[{"url": "https://m.example.com:8443", "caBundle": CA}])
    first = plan({}, [tls])
    path = "/etc/containers/certs.d/m.example.com:8443/regmirror.crt"
    node = apply_in_memory(first, {})
    assert node[path] == CA
    assert "/etc/containers/certs.d/m.example.com:8443" in first.mkdirs
    assert run(node, []) == {}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"registry": "*", "mirrors": [{"url": "https://m.example.com"}]}, "no entry for every registry"),
    ({"registry": "quay.io", "mirrors": [{"url": "https://m.example.com/path"}]}, "cannot put a path before /v2"),
    ({"registry": "quay.io", "mirrors": [{"url": "https://m.example.com/path", "overridePath": True}]},
     "https://host/v2/<namespace>"),
    ({"registry": "quay.io", "mirrors": [{"url": "https://m.example.com", "capabilities": ["pull"]}]},
     "capabilities ['pull']"),
])
def test_what_registries_conf_cannot_say_is_refused_by_name(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(crio.CrioRefused, match="nothing was changed") as refused:
        plan({}, [spec("bad", **fields)])
    assert expected in str(refused.value)


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(crio.CrioRefused) as refused:
        plan({}, [spec("a", registry="*", mirrors=[{"url": "https://m.example.com"}]),
                  spec("b", registry="quay.io", mirrors=[{"url": "https://m.example.com/p"}])])
    assert "'*'" in str(refused.value) and "'b'" in str(refused.value)


def test_two_ca_bundles_for_one_mirror_host_are_refused() -> None:
    one = spec("one", registry="quay.io", mirrors=[{"url": "https://m.example.com", "caBundle": CA}])
    two = spec("two", registry="ghcr.io", mirrors=[{"url": "https://m.example.com", "caBundle": CA.replace("f", "g")}])
    with pytest.raises(crio.CrioRefused, match="one set of CAs per host"):
        plan({}, [one, two])


def test_a_later_drop_in_with_the_same_prefix_is_refused_an_earlier_one_noted() -> None:
    later = {f"{crio.DROP_IN_DIR}/99-site.conf": '[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\n'}
    with pytest.raises(crio.CrioRefused, match=r"99-site\.conf .* read after"):
        plan(later, [QUAY])
    earlier = plan({crio.REGISTRIES_CONF: NODE_CONF}, [QUAY])
    assert any("registries.conf's own [[registry]] for 'quay.io'" in note for note in earlier.notes)


def test_describe_merges_the_files_in_the_order_crio_reads_them() -> None:
    node = run({crio.REGISTRIES_CONF: NODE_CONF}, [QUAY])
    header, rows = crio.describe(DictView(node))
    assert header == f"{DROP_IN}: present"
    assert [(r.registry, r.mirrors, r.source) for r in rows] == [
        ("quay.io", ("127.0.0.1:5000", "quay.mirror.example.com"), DROP_IN)]
    header, rows = crio.describe(DictView({crio.REGISTRIES_CONF: NODE_CONF}))
    assert "absent" in header and rows == []


def test_a_node_with_crio_conf_is_crio() -> None:
    assert crio.has_crio(DictView({"/etc/crio/crio.conf": "[crio]\n"}))
    assert crio.has_crio(DictView({"/etc/crio/crio.conf.d/10-site.conf": "[crio.runtime]\n"}))
    assert not crio.has_crio(DictView({crio.REGISTRIES_CONF: NODE_CONF}))


@pytest.mark.parametrize(("how", "systemd", "argv"), [
    ("auto", True, ["systemctl", "reload", "crio"]),
    ("systemd", False, ["systemctl", "reload", "crio"]),
    ("auto", False, ["sh", "-c", "pid=$(pidof crio) && kill -HUP $pid"]),
])
def test_crio_is_reloaded_never_restarted(how: str, systemd: bool, argv: list[str]) -> None:
    assert crio.reload_argv(how, systemd) == argv


@pytest.mark.parametrize(("files", "expected"), [
    ({"/etc/crio/crio.conf": "[crio]\n"}, "crio"),
    ({"/etc/crio/crio.conf.d/10-site.conf": "[crio.runtime]\n", crio.REGISTRIES_CONF: NODE_CONF}, "crio"),
    # containerd's config.toml beside CRI-O's: as before, containerd (``--runtime crio`` says otherwise)
    ({"/etc/crio/crio.conf": "[crio]\n", "/etc/containerd/config.toml": "version = 2\n"}, "containerd"),
    ({crio.REGISTRIES_CONF: NODE_CONF}, "containerd"),
])
def test_detect_runtime_finds_crio_nodes(files: dict[str, str], expected: str) -> None:
    assert engine.detect_runtime(DictView(files), Settings(), ownership.State()) == expected
    assert engine.detect_runtime(DictView(files), Settings(runtime="crio"), ownership.State()) == "crio"


def test_a_crio_reload_never_waits_for_a_restart_slot() -> None:
    planned = plan({}, [QUAY])
    assert planned.restart and not engine.needs_restart(planned, crio.RUNTIME, Settings())


def test_a_failed_reload_puts_the_nodes_files_back(tmp_path: Path) -> None:
    (tmp_path / "etc/containers").mkdir(parents=True)
    (tmp_path / "etc/containers/registries.conf").write_text(NODE_CONF)
    settings = Settings(root=str(tmp_path), runtime="crio", restart="command:echo no crio here >&2; exit 3")
    with pytest.raises(engine.EngineError, match="no crio here") as failed:
        engine.apply([QUAY], settings)
    assert failed.value.rolled_back
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "etc/containers/registries.conf"]
    assert (tmp_path / "etc/containers/registries.conf").read_text() == NODE_CONF
