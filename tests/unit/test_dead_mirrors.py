"""Dead mirrors kept out of the way (issue 10, item 3): the pure pieces.

The hysteresis (``mirrorhealth``), the hosts.toml a node gets with mirrors left out and with ``upstream: Never``,
the refusals where Never cannot be done, the report's ``out`` list, the operator's per-mirror counts and the
Events at their edges. The real thing (probes, containerd pulls, the operator) is tests/e2e/test_dead_mirrors.py.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from regmirror_agent import engine, mirrorhealth, ownership
from regmirror_agent.agent import Agent, AgentSettings
from regmirror_agent.nodeviews import DictView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import containerd, docker
from regmirror_api import contract, models
from regmirror_operator import planning
from tests.unit.trees import V2, apply_in_memory

CFG = containerd.CONFIG_FILE
QUAY_HOSTS = "/etc/containerd/certs.d/quay.io/hosts.toml"
DEAD, HANG, GOOD = "http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:5000"
QUAY = models.parse_spec("quay", {"registry": "quay.io", "mirrors": [DEAD, HANG, GOOD]}, 1)
QUAY_NEVER = models.parse_spec("quay", {"registry": "quay.io", "mirrors": [DEAD, GOOD], "upstream": "Never"}, 1)


# --- the hysteresis ------------------------------------------------------------------------------------------


def run_probes(results: list[bool], *, first: bool = False, step: float = 30.0) -> list[bool]:
    """The out/in standing after each probe of one mirror, probed every ``step`` seconds."""
    health, standing = mirrorhealth.Health(), []
    for i, alive in enumerate(results):
        health = mirrorhealth.observe(health, alive, now=i * step, first=first and i == 0)
        standing.append(health.out)
    return standing


def test_a_mirror_goes_out_after_two_failed_probes_in_a_row() -> None:
    assert run_probes([True, False, True, False, False]) == [False, False, False, False, True]


def test_a_mirror_failing_its_probe_before_its_first_apply_is_out_at_once() -> None:
    assert run_probes([False], first=True) == [True]
    assert run_probes([False], first=False) == [False]


def test_a_mirror_comes_back_after_two_successes_and_not_before_the_minimum_time() -> None:
    # Out at t=30; answers at t=40 and t=50 (two successes) but only 20 s after: stays out until t=90.
    health = mirrorhealth.Health()
    for now, alive in [(0, False), (30, False), (40, True), (50, True)]:
        health = mirrorhealth.observe(health, alive, now=now)
    assert health.out
    health = mirrorhealth.observe(health, True, now=90)
    assert not health.out and health == mirrorhealth.Health()


def test_a_mirror_answering_every_other_probe_does_not_flap() -> None:
    standing = run_probes([False, False] + [True, False] * 10)
    assert standing[1:] == [True] * 21


def test_the_board_says_when_the_set_of_out_mirrors_changes() -> None:
    board = mirrorhealth.Board(mirrorhealth.Rules(min_out_seconds=0))
    assert board.record({DEAD: False, GOOD: True}, now=0, first=[DEAD, GOOD])
    assert board.out() == {DEAD}
    assert not board.record({DEAD: False, GOOD: True}, now=1)
    assert not board.record({DEAD: True}, now=2)
    assert board.record({DEAD: True}, now=3)
    assert board.out() == frozenset()
    board.forget_except([GOOD])
    assert not board.known(DEAD)


# --- the node's files ------------------------------------------------------------------------------------------


def plan(desired: list[models.RegistryMirror], files: dict[str, str] | None = None,
         left_out: dict[str, frozenset[str]] | None = None, **options: Any) -> Plan:
    files = {CFG: V2} if files is None else files
    return containerd.plan_containerd(desired, DictView(files), ownership.parse_state(None, "state"),
                                      containerd.Options(left_out=left_out or {}, **options))


def hosts_of(desired: list[models.RegistryMirror], left_out: dict[str, frozenset[str]]) -> dict[str, Any]:
    files = apply_in_memory(plan(desired, left_out=left_out), {CFG: V2})
    return tomllib.loads(files[QUAY_HOSTS])


def test_out_mirrors_are_omitted_and_the_rest_keep_their_order() -> None:
    parsed = hosts_of([QUAY], {"quay.io": frozenset({DEAD, HANG})})
    assert list(parsed["host"]) == [GOOD]
    assert parsed["server"] == "https://quay.io"
    parsed = hosts_of([QUAY], {"quay.io": frozenset({HANG})})
    assert list(parsed["host"]) == [DEAD, GOOD]


def test_leaving_a_mirror_out_later_rewrites_only_hosts_toml_and_restarts_nothing() -> None:
    node = apply_in_memory(plan([QUAY]), {CFG: V2})
    later = plan([QUAY], node, {"quay.io": frozenset({DEAD})})
    assert not later.restart
    assert [c.path for c in later.changes] == [QUAY_HOSTS]


def test_when_every_mirror_is_out_the_upstream_serves_as_an_explicit_host() -> None:
    # A hosts.toml without any [host] table is refused by containerd 1.6 and 1.7 before 1.7.32 (#10027).
    parsed = hosts_of([QUAY], {"quay.io": frozenset({DEAD, HANG, GOOD})})
    assert list(parsed["host"]) == ["https://quay.io"] and parsed["server"] == "https://quay.io"


def test_for_any_registry_every_mirror_out_keeps_them_all() -> None:
    star = models.parse_spec("any", {"registry": "*", "mirrors": [DEAD]})
    files = apply_in_memory(plan([star], left_out={"*": frozenset({DEAD})}), {CFG: V2})
    assert list(tomllib.loads(files["/etc/containerd/certs.d/_default/hosts.toml"])["host"]) == [DEAD]


def test_never_makes_the_last_mirror_the_server_so_the_upstream_is_never_contacted() -> None:
    parsed = hosts_of([QUAY_NEVER], {})
    assert parsed["server"] == GOOD and list(parsed["host"]) == [DEAD, GOOD]
    assert parsed["capabilities"] == ["pull", "resolve"]
    assert "quay.io\"" not in str(parsed)


def test_never_leaves_a_dead_mirror_out_while_another_answers_but_never_leaves_none() -> None:
    parsed = hosts_of([QUAY_NEVER], {"quay.io": frozenset({DEAD})})
    assert parsed["server"] == GOOD and list(parsed["host"]) == [GOOD]
    parsed = hosts_of([QUAY_NEVER], {"quay.io": frozenset({DEAD, GOOD})})
    assert parsed["server"] == GOOD and list(parsed["host"]) == [DEAD, GOOD]


def test_inline_mode_only_reports_and_refuses_never() -> None:
    with_out = plan([QUAY], left_out={"quay.io": frozenset({DEAD})}, mode="inline")
    assert with_out.changes == plan([QUAY], mode="inline").changes
    with pytest.raises(containerd.NodeRefused, match="upstream: Never needs hosts mode"):
        plan([QUAY_NEVER], mode="inline")


def test_docker_refuses_never_by_name() -> None:
    hub = models.parse_spec("hub", {"registry": "docker.io", "mirrors": ["https://m.example"], "upstream": "Never"})
    with pytest.raises(docker.DockerRefused, match="'hub': upstream: Never cannot be done by Docker"):
        docker.check_docker_mirrors([hub])


def test_the_model_reads_upstream_and_publishes_the_default_as_before() -> None:
    assert QUAY_NEVER.to_spec()["upstream"] == "Never"
    assert "upstream" not in models.parse_spec("q", {"registry": "quay.io", "mirrors": [GOOD],
                                                     "upstream": "Fallback"}).to_spec()
    with pytest.raises(models.InvalidSpec, match="upstream: 'Sometimes' is not one of Fallback, Never"):
        models.parse_spec("q", {"registry": "quay.io", "mirrors": [GOOD], "upstream": "Sometimes"})


def test_the_request_key_changes_with_what_is_left_out_only_when_something_is() -> None:
    settings = engine.Settings(root="/nonexistent")
    plain = engine.request_key([QUAY], settings)
    assert engine.request_key([QUAY], settings, {}) == plain
    assert engine.request_key([QUAY], settings, {"quay.io": frozenset({DEAD})}) != plain


# --- the report -------------------------------------------------------------------------------------------------


def test_the_report_names_out_mirrors_and_old_reports_read_the_same() -> None:
    with_out = contract.Report("quay", 1, contract.STATE_APPLIED, uid="u", out=(DEAD,))
    body = contract.render_node_report("n", "", [with_out], time="t")
    entry = contract.parse_node_report(body)["quay"]
    assert entry["out"] == [DEAD] and contract.out_mirrors(entry) == {DEAD}
    plain = contract.Report("quay", 1, contract.STATE_APPLIED, uid="u")
    old = {"status": {"mirrors": [{"name": "quay", "uid": "u", "generation": 1, "state": "Applied",
                                   "message": "", "restarted": False}]}}
    assert contract.same_reports(old, [plain]) and not contract.same_reports(old, [with_out])
    assert contract.out_mirrors(contract.parse_node_report(old)["quay"]) == frozenset()


class _Api:
    def __init__(self) -> None:
        self.writes: list[dict[str, Any]] = []

    def get(self, path: str) -> Any:
        from regmirror_agent.kubeapi import ApiError
        raise ApiError(404, f"GET {path}: not found")

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(body)
        return body

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(body)
        return body


def test_the_agent_probes_new_mirrors_before_applying_and_writes_only_when_the_out_set_changes() -> None:
    answers = {DEAD: False, HANG: False, GOOD: True}
    probed: list[list[str]] = []
    handed: list[dict[str, frozenset[str]]] = []

    def probe(mirrors: Any, timeout: float) -> dict[str, bool]:
        probed.append([m.url for m in mirrors])
        return {m.url: answers[m.url] for m in mirrors}

    api = _Api()
    clock = [0.0]
    agent = Agent(AgentSettings(node="n", engine=engine.Settings(root="/nonexistent"), probe_seconds=30),
                  api, probe_mirrors=probe, clock=lambda: clock[0])  # type: ignore[arg-type]
    agent.apply_mirrors = lambda mirrors: (handed.append(dict(agent._left_out)),  # type: ignore[method-assign]
                                           engine.UNCHANGED)[1]
    entry = contract.Entry("quay", 1, QUAY.to_spec(), {}, uid="u")
    agent.data, agent.labels, agent._seen_configmap = contract.render_desired([entry]), {}, True
    agent.reconcile()
    assert probed == [[DEAD, HANG, GOOD]]
    assert handed == [{"quay.io": frozenset({DEAD, HANG})}]
    assert api.writes[-1]["status"]["mirrors"][0]["out"] == [DEAD, HANG]
    agent.reconcile()  # a resync: known mirrors are not probed again, nothing new to write
    assert len(probed) == 1 and len(api.writes) == 1
    assert not agent.probe_round()  # still dead: no change, so the loop neither applies nor writes
    answers[DEAD] = answers[HANG] = True
    clock[0] = 61.0
    assert not agent.probe_round()  # one success is not enough
    assert agent.probe_round()
    agent.reconcile()
    assert handed[-1] == {} and "out" not in api.writes[-1]["status"]["mirrors"][0]


# --- the operator --------------------------------------------------------------------------------------------


def rm_body(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "quay", "uid": "u", "generation": 1},
            "spec": {"registry": "quay.io", "mirrors": [{"url": DEAD}, {"url": GOOD}]}, "status": status or {}}


def node_reports(out_by_node: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    return {node: {"uid": f"r-{node}", "time": "2026-01-01T00:00:00Z", "mirrors": {"quay": {
        "name": "quay", "uid": "u", "generation": 1, "state": "Applied", "message": "", "restarted": False,
        **({"out": out} if out else {})}}} for node, out in out_by_node.items()}


def status_and_notices(before: dict[str, Any] | None, out_by_node: dict[str, list[str]],
                       nodes: int = 3) -> tuple[dict[str, Any], list[planning.Notice]]:
    labels = {f"n{i}": {} for i in range(nodes)}
    body = rm_body(before)
    status = planning.plan_status(body, planning.Verdict(), labels, node_reports(out_by_node), now="now")
    return status, planning.plan_notices(body, status)


def test_the_status_counts_per_mirror_how_many_nodes_reach_it() -> None:
    status, _ = status_and_notices(None, {"n0": [DEAD], "n1": [DEAD], "n2": []})
    assert status["mirrors"] == [{"url": DEAD, "reachable": 1, "unreachable": 2},
                                 {"url": GOOD, "reachable": 3, "unreachable": 0}]


def test_one_event_when_a_mirror_goes_out_on_its_first_node_and_one_when_it_is_back_on_all() -> None:
    healthy, _ = status_and_notices(None, {"n0": [], "n1": [], "n2": []})
    one_out, notices = status_and_notices(healthy, {"n0": [DEAD], "n1": [], "n2": []})
    assert [(n.type, n.reason) for n in notices if n.reason.startswith("Mirror")] == [
        ("Warning", planning.REASON_MIRROR_UNREACHABLE)]
    two_out, notices = status_and_notices(one_out, {"n0": [DEAD], "n1": [DEAD], "n2": []})
    assert not [n for n in notices if n.reason.startswith("Mirror")]
    one_back, notices = status_and_notices(two_out, {"n0": [DEAD], "n1": [], "n2": []})
    assert not [n for n in notices if n.reason.startswith("Mirror")]
    _, notices = status_and_notices(one_back, {"n0": [], "n1": [], "n2": []})
    assert [(n.type, n.reason) for n in notices if n.reason.startswith("Mirror")] == [
        ("Normal", planning.REASON_MIRROR_REACHABLE)]


def test_the_status_stays_small_at_five_thousand_nodes() -> None:
    out = {f"n{i}": [DEAD] if i % 2 else [] for i in range(5000)}
    status, _ = status_and_notices(None, out, nodes=5000)
    assert status["mirrors"][0] == {"url": DEAD, "reachable": 2500, "unreachable": 2500}
    assert len(str(status["mirrors"])) < 200
