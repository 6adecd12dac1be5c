"""The runtime's effective view (``effective``, ``crigrpc``'s decoder) on real CRI answers captured from
containerd 1.6.20 (Debian) and 2.3.7 (built from its Go module): ``tests/unit/golden_effective`` holds each
``Status(verbose)`` answer as containerd sent it (``.pb``), decoded (``.json``), and the config.toml it ran with.

Captured with a node of ``tests/harness/containerd.py`` per case: ``hosts`` (config_path = certs.d), ``inline``
(``mirrors."quay.io"``), ``default`` (2.x, config_path = '').
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from regmirror_agent import crigrpc, effective
from regmirror_agent.nodeviews import DictView
from regmirror_api import models

GOLDEN = Path(__file__).parent / "golden_effective"
CERTS = "/etc/containerd/certs.d"
MIRROR = "http://127.0.0.1:5999"
QUAY = models.parse_spec("quay", {"registry": "quay.io", "mirrors": [MIRROR],
                                  "verify": {"image": "quay.io/regmirror-test/sleeper:1"}})
HOSTS_TOML = f'server = "https://quay.io"\n\n[host."{MIRROR}"]\n  capabilities = ["pull", "resolve"]\n'


def golden(name: str) -> tuple[dict[str, str], list[tuple[str, bool, str]], str, str]:
    """``(info, conditions, runtime version, config.toml)`` of one captured answer."""
    doc = json.loads((GOLDEN / f"{name}.json").read_text())
    conditions = [(c[0], c[1], c[3]) for c in doc["conditions"]]
    return doc["info"], conditions, doc["runtime_version"], (GOLDEN / f"{name}.config.toml").read_text()


def view_of(name: str, config: str | None = None, stale: str = "") -> tuple[effective.RuntimeView,
                                                                           effective.FileSettings]:
    """The runtime view of a captured answer, with config.toml as captured or as ``config`` says now."""
    info, conditions, version, captured = golden(name)
    on_disk = effective.file_settings(captured if config is None else config, "/etc/containerd/config.toml")
    return effective.runtime_view(version, info, conditions, on_disk, stale), on_disk


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.pb")))
def test_the_decoder_reads_each_real_status_answer(name: str) -> None:
    info, conditions = crigrpc.parse_status_response((GOLDEN / f"{name}.pb").read_bytes())
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    assert info == expected["info"]
    assert [[c.type, c.status, c.reason, c.message] for c in conditions] == expected["conditions"]


def test_containerd_1_6_reports_its_registry_settings_and_2_x_does_not() -> None:
    hosts = effective.status_registry(golden("status-1.6.20-hosts")[0])
    inline = effective.status_registry(golden("status-1.6.20-inline")[0])
    assert hosts == effective.RegistrySettings(config_path=CERTS)
    assert inline == effective.RegistrySettings(mirrors={"quay.io": (MIRROR,)})
    for name in ("status-2.3.7-hosts", "status-2.3.7-inline", "status-2.3.7-default"):
        assert effective.status_registry(golden(name)[0]) is None, "2.x moved the registry out of Status"


def test_containerd_2_x_names_inline_mirrors_only_in_its_deprecation_condition() -> None:
    assert effective.DEPRECATED_MIRRORS in (effective.deprecations(golden("status-2.3.7-inline")[1]) or ())
    assert effective.DEPRECATED_MIRRORS not in (effective.deprecations(golden("status-2.3.7-hosts")[1]) or {"x"})
    assert effective.deprecations(golden("status-1.6.20-hosts")[1]) is None


def node_with(files: dict[str, str]) -> DictView:
    return DictView(files)


QUAY_HOSTS = {f"{CERTS}/quay.io/hosts.toml": HOSTS_TOML}


def test_1_6_in_hosts_mode_with_the_mirror_listed_is_in_use() -> None:
    view, on_disk = view_of("status-1.6.20-hosts")
    verdict = effective.judge(view, "", on_disk, QUAY, node_with(QUAY_HOSTS))
    assert verdict == effective.Verdict(True, effective.IN_USE, f"containerd 1.6.20~ds1 tries {MIRROR} for "
                                                                f"quay.io (from {CERTS}/quay.io/hosts.toml)")


def test_1_6_still_running_inline_mirrors_after_a_move_to_hosts_mode_is_not_restarted() -> None:
    _, _, _, hosts_config = golden("status-1.6.20-hosts")
    view, on_disk = view_of("status-1.6.20-inline", config=hosts_config)
    verdict = effective.judge(view, "", on_disk, QUAY, node_with(QUAY_HOSTS))
    assert verdict.in_use is False and verdict.reason == effective.NOT_RESTARTED
    assert verdict.message == ("containerd still runs with config_path = '', while config.toml now says "
                               "'/etc/containerd/certs.d': it reads config.toml only when it starts, so restart "
                               "containerd")


def test_1_6_inline_change_written_but_not_restarted() -> None:
    _, _, _, config = golden("status-1.6.20-inline")
    changed = config.replace(MIRROR, "http://127.0.0.1:6000/v2")
    view, on_disk = view_of("status-1.6.20-inline", config=changed)
    mirror = models.parse_spec("quay", {"registry": "quay.io", "mirrors": ["http://127.0.0.1:6000"]})
    verdict = effective.judge(view, "", on_disk, mirror, node_with({}))
    assert verdict.reason == effective.NOT_RESTARTED
    assert "registry.mirrors ['http://127.0.0.1:5999'] for quay.io from before" in verdict.message
    assert "restart containerd" in verdict.message


def test_1_6_inline_mode_in_force_is_in_use() -> None:
    view, on_disk = view_of("status-1.6.20-inline")
    assert effective.judge(view, "", on_disk, QUAY, node_with({})).in_use is True


def test_2_x_with_a_config_path_list_set_by_hand_ignores_certs_d() -> None:
    _, _, _, config = golden("status-2.3.7-hosts")
    listed = config.replace(f"config_path = '{CERTS}'", f"config_path = '{CERTS}:/etc/docker/certs.d'")
    view, on_disk = view_of("status-2.3.7-hosts", config=listed)
    assert view.transfer_service and view.source == "config.toml"
    verdict = effective.judge(view, "", on_disk, QUAY, node_with(QUAY_HOSTS))
    assert verdict.in_use is False and verdict.reason == effective.CONFIG_PATH_LIST
    assert verdict.message.startswith("containerd v2.3.7 ignores config_path = '/etc/containerd/certs.d:/etc/docker/"
                                      "certs.d' for CRI pulls: from 2.1 they go through the transfer service")
    assert "#12415" in verdict.message


def test_2_x_default_config_path_is_its_builtin_list_and_ignored_too() -> None:
    view, on_disk = view_of("status-2.3.7-default")
    assert view.builtin_config_path and view.registry.config_path == effective.BUILTIN_CONFIG_PATH_2X
    verdict = effective.judge(view, "", on_disk, QUAY, node_with(QUAY_HOSTS))
    assert verdict.reason == effective.CONFIG_PATH_LIST
    assert "ignores its built-in config_path for CRI pulls" in verdict.message


def test_2_x_with_a_list_and_local_pulls_searches_each_directory() -> None:
    _, _, _, config = golden("status-2.3.7-hosts")
    listed = config.replace(f"config_path = '{CERTS}'",
                            f"config_path = '/etc/docker/certs.d:{CERTS}'").replace(
        "    snapshotter = 'native'\n", "    snapshotter = 'native'\n    use_local_image_pull = true\n")
    view, on_disk = view_of("status-2.3.7-hosts", config=listed)
    assert not view.transfer_service
    assert view.hosts_dirs() == ("/etc/docker/certs.d", CERTS)
    assert effective.judge(view, "", on_disk, QUAY, node_with(QUAY_HOSTS)).in_use is True


def test_2_x_single_directory_is_in_use_and_a_changed_file_since_start_is_not_restarted() -> None:
    view, on_disk = view_of("status-2.3.7-hosts")
    assert effective.judge(view, "", on_disk, QUAY, node_with(QUAY_HOSTS)).in_use is True
    stale, _ = view_of("status-2.3.7-hosts", stale="config.toml changed at T2, after containerd started at T1")
    verdict = effective.judge(stale, "", on_disk, QUAY, node_with(QUAY_HOSTS))
    assert verdict.reason == effective.NOT_RESTARTED and "T2" in verdict.message


def test_2_x_running_without_the_inline_mirrors_the_file_now_has_is_not_restarted() -> None:
    _, _, _, inline_config = golden("status-2.3.7-inline")
    view, on_disk = view_of("status-2.3.7-hosts", config=inline_config)  # the process reports no deprecated mirrors
    verdict = effective.judge(view, "", on_disk, QUAY, node_with({}))
    assert verdict.reason == effective.NOT_RESTARTED
    assert "has no inline mirrors" in verdict.message


def test_hosts_file_listing_other_mirrors_is_named() -> None:
    view, on_disk = view_of("status-2.3.7-hosts")
    other = {f"{CERTS}/quay.io/hosts.toml": HOSTS_TOML.replace(MIRROR, "https://other.example")}
    verdict = effective.judge(view, "", on_disk, QUAY, node_with(other))
    assert verdict == effective.Verdict(False, effective.OTHER_HOSTS, "containerd tries https://other.example for "
                                        f"quay.io (from {CERTS}/quay.io/hosts.toml), not {MIRROR}")


def test_no_answer_from_the_runtime_cannot_tell() -> None:
    verdict = effective.judge(None, "cannot reach containerd", effective.FileSettings(effective.RegistrySettings()),
                              QUAY, node_with({}))
    assert verdict.in_use is None and verdict.reason == effective.CANNOT_TELL


def test_host_directory_lookup_order() -> None:
    assert effective.candidate_dirs("reg.example:5000") == ("reg.example_5000_", "reg.example:5000", "_default")
    assert effective.candidate_dirs("quay.io") == ("quay.io", "_default")
    assert effective.candidate_dirs("*") == ("_default",)
    view, _ = view_of("status-2.3.7-hosts")
    node = node_with({f"{CERTS}/_default/hosts.toml": HOSTS_TOML, f"{CERTS}/quay.io/ca.crt": "x"})
    hosts = effective.find_hosts(view, "quay.io", node)  # a directory holding only a CA blocks _default
    assert hosts.problem == f"containerd uses {CERTS}/quay.io for quay.io, which holds no hosts.toml"


def test_resolution_follows_hosts_toml_order_capabilities_and_paths() -> None:
    text = ('server = "https://quay.io"\n\n[host."http://push-only:1"]\n  capabilities = ["push"]\n\n'
            '[host."http://pull-only:2"]\n  capabilities = ["pull"]\n\n'
            '[host."https://harbor/v2/proxy"]\n  capabilities = ["pull", "resolve"]\n  override_path = true\n')
    hosts = effective.parse_hosts("quay.io", text, "f")
    tag = effective.parse_image("quay.io/regmirror-test/sleeper:1", "quay.io")
    assert [a.url for a in effective.plan_resolve(tag, hosts)] == [
        "https://harbor/v2/proxy/regmirror-test/sleeper/manifests/1?ns=quay.io",
        "https://quay.io/v2/regmirror-test/sleeper/manifests/1"]
    digest = effective.parse_image("quay.io/x/y@sha256:" + "a" * 64, "quay.io")
    assert [a.host for a in effective.plan_resolve(digest, hosts)] == [
        "http://pull-only:2", "https://harbor/v2/proxy", "https://quay.io"]
    hub = effective.parse_image("docker.io/busybox:1.36", "docker.io")
    assert (hub.repository, hub.reference) == ("library/busybox", "1.36")
    assert effective.parse_image("reg.example:5000/a/b", "*") == effective.ImageRef("reg.example:5000", "a/b",
                                                                                    "latest")


def test_answers_mean_in_use_bypassed_or_refused() -> None:
    mirror = effective.Attempt("http://m/v2/x/manifests/1?ns=quay.io", "http://m", mirror=True)
    upstream = effective.Attempt("https://quay.io/v2/x/manifests/1", "https://quay.io", mirror=False)
    image = "quay.io/x:1"
    assert effective.judge_answers(image, [(mirror, 200, "")]).reason == effective.IN_USE
    bypassed = effective.judge_answers(image, [(mirror, None, "ConnectionRefusedError: refused"), (upstream, 200, "")])
    assert bypassed == effective.Verdict(False, effective.BYPASSED, "quay.io/x:1 resolves from the upstream "
                                         "https://quay.io (HTTP 200), past the mirrors: the mirror http://m failed "
                                         "(ConnectionRefusedError: refused)")
    missing = effective.judge_answers(image, [(mirror, 404, ""), (upstream, None, "no route")])
    assert missing.in_use is False and missing.reason == effective.NOT_SERVED
    assert "the mirror http://m answered HTTP 404" in missing.message
    assert effective.judge_answers(image, [(mirror, 401, "")]).in_use is None


def test_verify_image_is_validated_and_kept_canonical() -> None:
    assert QUAY.verify_image == "quay.io/regmirror-test/sleeper:1"
    assert QUAY.to_spec()["verify"] == {"image": "quay.io/regmirror-test/sleeper:1"}
    plain = dataclasses.replace(QUAY, verify_image=None)
    assert "verify" not in plain.to_spec()
    assert models.parse_spec("quay", QUAY.to_spec()) == QUAY
    for bad, says in [({"image": "ghcr.io/x/y:1"}, "is in registry 'ghcr.io', not 'quay.io'"),
                      ({"image": "quay.io"}, "is not a full image reference"),
                      ({"image": "quay.io/x/y:1", "extra": 1}, "must be an object with only \"image\"")]:
        with pytest.raises(models.InvalidSpec, match=says):
            models.parse_spec("quay", {"registry": "quay.io", "mirrors": [MIRROR], "verify": bad})


def test_a_process_start_time_is_read_from_proc() -> None:
    import os
    import time

    from regmirror_agent import verifying

    started = verifying.process_started(os.getpid())
    assert started is not None and started <= time.time() + 1
    assert verifying.process_started(2**22 + 12345) is None


def test_a_deprecation_the_process_was_told_to_ignore_proves_nothing() -> None:
    info, conditions, version, _ = golden("status-2.3.7-hosts")
    _, _, _, inline_config = golden("status-2.3.7-inline")
    config = json.loads(info["config"])
    config["ignoreDeprecationWarnings"] = [effective.DEPRECATED_MIRRORS]
    on_disk = effective.file_settings(inline_config, "/etc/containerd/config.toml")
    view = effective.runtime_view(version, {**info, "config": json.dumps(config)}, conditions, on_disk)
    assert view.stale == "" and effective.judge(view, "", on_disk, QUAY, node_with({})).in_use is True
