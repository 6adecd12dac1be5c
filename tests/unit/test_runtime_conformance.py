"""The contract every runtime keeps, run once per registered runtime (``drivers.ALL``): pure and in memory.

A new runtime is a planner, a driver and one more ``Case`` here; a runtime without its case fails
``test_every_registered_runtime_has_a_case``. The same contract on the real runtimes is
``tests/integration/test_runtime_conformance_real.py``.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from regmirror_agent import credentials, drivers, ownership
from regmirror_agent.defaults import RUNTIMES
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.nodeviews import DictView
from regmirror_agent.plans import FileChange, Plan
from regmirror_agent.restarting import Host
from regmirror_agent.runtimes import RuntimeRefused
from regmirror_agent.settings import Settings
from regmirror_api import models
from tests.unit.trees import apply_in_memory


@dataclasses.dataclass(frozen=True)
class Case:
    """One runtime's node and requests for the shared contract."""

    node: dict[str, str]
    """A node of this runtime before regmirror, with files of its own that must come back byte for byte."""
    desired: tuple[models.RegistryMirror, ...]
    """RegistryMirrors this runtime can do (mirrors in an order describe must keep)."""
    refused: models.RegistryMirror
    """A RegistryMirror this runtime cannot do, and a word its refusal must name."""
    refused_word: str
    own_file: str
    """The node's own file that, unreadable, must be refused by name."""
    mode: str = "auto"
    """``--mode`` for the refused request (containerd's inline mode refuses what hosts mode can do)."""


def mirror(name: str, registry: str, *urls: str) -> models.RegistryMirror:
    return models.parse_spec(name, {"registry": registry, "mirrors": [{"url": u} for u in urls]})


HUB = mirror("hub", "docker.io", "https://hub-1.mirror.example.com", "http://hub-2.mirror.example.com:5000")
QUAY = mirror("quay", "quay.io", "https://quay.mirror.example.com", "http://127.0.0.1:5000")

CASES = {
    "containerd": Case(
        node={"/etc/containerd/config.toml": ("# the node's own\nversion = 2\n\n"
                                              '[plugins."io.containerd.grpc.v1.cri"]\n'
                                              '  sandbox_image = "registry.k8s.io/pause:3.9"  # pinned\n')},
        desired=(HUB, QUAY),
        refused=models.parse_spec("pull-only", {"registry": "quay.io", "mirrors": [
            {"url": "https://q.example.com", "capabilities": ["pull"]}]}),
        refused_word="capabilities",
        own_file="/etc/containerd/config.toml",
        mode="inline"),
    "docker": Case(
        node={"/etc/docker/daemon.json": '{\n  "log-driver": "journald",\n  "live-restore": true\n}\n'},
        desired=(HUB,),
        refused=QUAY,
        refused_word="'quay.io'",
        own_file="/etc/docker/daemon.json"),
    "crio": Case(
        node={"/etc/crio/crio.conf": "[crio.runtime]\n", "/etc/containers/registries.conf":
              '# site policy\nunqualified-search-registries = ["docker.io"]\n'},
        desired=(HUB, QUAY),
        refused=mirror("any", "*", "https://any.mirror.example.com"),
        refused_word="'*'",
        own_file="/etc/containers/registries.conf"),
}
RUNTIMES_UNDER_TEST = pytest.mark.parametrize("runtime", drivers.ALL, ids=lambda r: r.name)


class NoCommands(Host):
    """The node's commands, in a pure test: none is installed, and none may run."""

    def has(self, binary: str) -> bool:
        return False

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        raise AssertionError(f"a pure test ran {argv}")


HOST = NoCommands()


def settings_for(runtime: drivers.Runtime, mode: str = "auto") -> Settings:
    return Settings(runtime=runtime.name, mode=mode, host=HOST)


def plan(runtime: drivers.Runtime, files: dict[str, str], desired: Sequence[models.RegistryMirror],
         mode: str = "auto") -> Plan:
    settings = settings_for(runtime, mode)
    state = ownership.parse_state(files.get(settings.state_path), settings.state_path)
    return runtime.plan(list(desired), DictView(files), state, settings, HOST, {})


def case(runtime: drivers.Runtime) -> Case:
    return CASES[runtime.name]


def test_every_registered_runtime_has_a_case() -> None:
    assert sorted(CASES) == sorted(drivers.NAMES)


def test_the_cli_offers_every_registered_runtime() -> None:
    """The CLI reads its choices from ``defaults`` (its fast path imports no driver): the same names."""
    assert ("auto", *drivers.NAMES) == RUNTIMES


@RUNTIMES_UNDER_TEST
def test_named_and_detected_give_the_same_runtime(runtime: drivers.Runtime) -> None:
    assert drivers.named(runtime.name) is runtime
    node = case(runtime).node
    detected = drivers.for_node(DictView(node), Settings(), ownership.State())
    assert detected is runtime, f"{runtime.name}'s node was taken for {detected.name}"


def test_an_unknown_runtime_name_is_refused_naming_it() -> None:
    with pytest.raises(RuntimeRefused, match="'rkt'"):
        drivers.named("rkt")


@RUNTIMES_UNDER_TEST
def test_nothing_desired_on_a_fresh_node_writes_nothing(runtime: drivers.Runtime) -> None:
    planned = plan(runtime, case(runtime).node, [])
    assert not planned.changed, planned.diff()
    assert not runtime.needs_restart(planned)


@RUNTIMES_UNDER_TEST
def test_apply_then_reset_gives_the_nodes_files_back_byte_for_byte(runtime: drivers.Runtime) -> None:
    node = case(runtime).node
    applied = apply_in_memory(plan(runtime, node, case(runtime).desired), node)
    assert applied != node
    reset = apply_in_memory(plan(runtime, applied, []), applied)
    assert reset == node


@RUNTIMES_UNDER_TEST
def test_planning_again_over_the_result_changes_nothing(runtime: drivers.Runtime) -> None:
    node = case(runtime).node
    applied = apply_in_memory(plan(runtime, node, case(runtime).desired), node)
    again = plan(runtime, applied, case(runtime).desired)
    assert not again.changed, again.diff()
    assert not runtime.needs_restart(again)
    reset = apply_in_memory(plan(runtime, applied, []), applied)
    assert not plan(runtime, reset, []).changed


@RUNTIMES_UNDER_TEST
def test_what_the_runtime_cannot_do_is_refused_by_name(runtime: drivers.Runtime) -> None:
    with pytest.raises(RuntimeRefused) as refused:
        plan(runtime, case(runtime).node, [case(runtime).refused], mode=case(runtime).mode)
    assert case(runtime).refused_word in str(refused.value)


@pytest.mark.parametrize(("runtime", "mode"), [(r, m) for r in drivers.ALL for m in (
    ("auto", "hosts", "inline") if r.name == "containerd" else ("auto",))], ids=lambda v: getattr(v, "name", v))
def test_a_runtime_says_it_cannot_carry_credentials_exactly_when_its_planner_refuses_them(
        runtime: drivers.Runtime, mode: str) -> None:
    """The agent asks ``credentials_refusal`` first, to fail only the RegistryMirrors with credentials: it must
    agree with the planner, or a login would be refused on a node that could carry it (or the other way round)."""
    with_login = models.parse_spec("private", {"registry": "quay.io", "mirrors": [
        {"url": "https://harbor.example.com", "credentials": {"secretName": "harbor-login"}}]}).with_credentials(
        lambda _, c: dataclasses.replace(c, authorization=credentials.Login("robot", "s3cret").authorization()))
    says = runtime.credentials_refusal(settings_for(runtime, mode))
    try:
        planned = plan(runtime, case(runtime).node, [with_login], mode=mode)
    except RuntimeRefused as refused:
        assert says is not None and says[1] in str(refused), (says, str(refused))
    else:
        assert says is None
        assert any("Authorization" in (c.after or "") for c in planned.changes)


@RUNTIMES_UNDER_TEST
def test_an_unreadable_file_of_the_node_is_refused_by_name(runtime: drivers.Runtime) -> None:
    node = {**case(runtime).node, case(runtime).own_file: "{[ not a config\n"}
    with pytest.raises(RuntimeRefused) as refused:
        plan(runtime, node, case(runtime).desired)
    assert case(runtime).own_file in str(refused.value)


@RUNTIMES_UNDER_TEST
@pytest.mark.parametrize(("registry", "url"), [
    ("../../etc", "https://m.example.com"),
    ("docker.io/../../etc", "https://m.example.com"),
    ("docker.io", 'https://m.example.com"\n[evil]'),
])
def test_an_unsafe_registry_name_or_mirror_url_is_refused(runtime: drivers.Runtime, registry: str, url: str) -> None:
    """A RegistryMirror built by code, not parsed: the model's checks still stand between it and any file."""
    unsafe = models.RegistryMirror(name="unsafe", registry=registry, mirrors=(models.Mirror(url=url),))
    with pytest.raises(RuntimeRefused) as refused:
        plan(runtime, case(runtime).node, [unsafe])
    assert repr(registry if registry != "docker.io" else url) in str(refused.value)


def _hosts(entries: Sequence[str]) -> list[str]:
    """Mirror URLs or registries.conf locations, as the hosts they name."""
    return [urlsplit(e).netloc if "://" in e else e.split("/", 1)[0] for e in entries]


@RUNTIMES_UNDER_TEST
def test_describe_after_apply_lists_the_mirrors_in_order(runtime: drivers.Runtime) -> None:
    node = case(runtime).node
    applied = apply_in_memory(plan(runtime, node, case(runtime).desired), node)
    header, rows = runtime.describe(DictView(applied), settings_for(runtime))
    assert header
    described = {row.registry: row for row in rows}
    for wanted in case(runtime).desired:
        assert wanted.registry in described, f"{wanted.registry} missing from {rows}"
        assert _hosts(described[wanted.registry].mirrors) == _hosts(
            [m.url for m in wanted.mirrors])
    _, before = runtime.describe(DictView(node), settings_for(runtime))
    assert not [row for row in before if row.mirrors], "a fresh node describes no mirrors"


@RUNTIMES_UNDER_TEST
def test_needs_restart_is_a_bool_that_agrees_with_how_the_runtime_is_activated(runtime: drivers.Runtime) -> None:
    planned = plan(runtime, case(runtime).node, case(runtime).desired)
    assert runtime.kind in (drivers.RESTART, drivers.RELOAD)
    assert isinstance(runtime.needs_restart(planned), bool)
    assert runtime.needs_restart(planned) == (runtime.kind == drivers.RESTART and planned.restart)
    assert planned.restart, "a first apply puts something in force"
    assert runtime.activated


@RUNTIMES_UNDER_TEST
def test_the_pre_write_check_passes_the_plan_and_rejects_a_corrupted_rendering(runtime: drivers.Runtime,
                                                                                tmp_path: Path) -> None:
    planned = plan(runtime, case(runtime).node, case(runtime).desired)
    node = NodeRoot(str(tmp_path))
    runtime.check(planned, settings_for(runtime), HOST, node)
    corrupted = dataclasses.replace(planned, changes=tuple(
        FileChange(c.path, c.before, None if c.after is None else c.after + "\n}{ [not, closed\n")
        for c in planned.changes))
    with pytest.raises(RuntimeRefused, match="nothing was changed"):
        runtime.check(corrupted, settings_for(runtime), HOST, node)


@RUNTIMES_UNDER_TEST
def test_the_steps_of_a_plan_end_where_the_plan_does(runtime: drivers.Runtime) -> None:
    """Applied in turn, the steps (Docker's removal bridge) leave the node exactly as the plan does."""
    node = case(runtime).node
    applied = apply_in_memory(plan(runtime, node, case(runtime).desired), node)
    for files, desired in ((node, case(runtime).desired), (applied, ())):
        planned = plan(runtime, files, desired)
        stepped = dict(files)
        for step in runtime.steps(planned, settings_for(runtime)):
            stepped = apply_in_memory(step, stepped)
        assert stepped == apply_in_memory(planned, files)
