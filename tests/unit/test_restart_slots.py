"""The restart budget, pure: who gets a restart slot, who waits, whose slot is taken back, and when a rollout
stops. The same claims run end to end on the real apiserver and real containerds in tests/e2e/test_rollout.py."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from regmirror_api import contract
from regmirror_operator import planning, slots
from regmirror_operator.slots import BadBudget, Budget, SlotPlan, halted, parse_budget

NOW = datetime.datetime(2026, 12, 2, 22, 0, tzinfo=datetime.UTC)
LINUX = {"kubernetes.io/os": "linux"}


def plan_slots(*args: Any, **kwargs: Any) -> SlotPlan:
    """Slots granted for 300 s, as the examples below read."""
    return slots.plan_slots(*args, ttl=300, **kwargs)


def nodes(*names: str) -> dict[str, dict[str, str]]:
    return {n: dict(LINUX) for n in names}


def asking(token: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"uid": "r", "time": "2026-12-02T21:59:00Z", "restartRequest": token,
            "mirrors": {e["name"]: e for e in entries}}


def entry(state: str, generation: int = 2, rolled_back: int = 0, name: str = "quay") -> dict[str, Any]:
    found: dict[str, Any] = {"name": name, "uid": "u", "generation": generation, "state": state,
                             "message": "containerd did not come back healthy" if rolled_back else ""}
    if rolled_back:
        found["rolledBack"] = rolled_back
    return found


def test_one_slot_goes_to_one_waiting_node_and_the_rest_wait_in_order() -> None:
    reports = {n: asking(f"t-{n}", entry("Waiting")) for n in ("c", "a", "b")}
    plan = plan_slots(nodes("a", "b", "c"), {}, reports, budget=Budget(), now=NOW)
    assert plan.writes == {"a": "t-a 2026-12-02T22:05:00Z"}
    assert plan.holders == ("a",) and plan.waiting == ("b", "c")


def test_a_node_that_is_done_gives_its_slot_to_the_next_in_the_same_pass() -> None:
    reports = {"a": asking("", entry("Applied")), "b": asking("t-b", entry("Waiting"))}
    plan = plan_slots(nodes("a", "b"), {"a": "t-a 2026-12-02T22:05:00Z"}, reports, budget=Budget(), now=NOW)
    assert plan.writes == {"a": None, "b": "t-b 2026-12-02T22:05:00Z"}


def test_a_held_slot_is_kept_and_nothing_is_written_while_the_node_restarts() -> None:
    reports = {"a": asking("t-a", entry("Waiting")), "b": asking("t-b", entry("Waiting"))}
    plan = plan_slots(nodes("a", "b"), {"a": "t-a 2026-12-02T22:05:00Z"}, reports, budget=Budget(), now=NOW)
    assert plan.writes == {} and plan.holders == ("a",) and plan.waiting == ("b",)


def test_a_slot_held_past_its_deadline_is_taken_back_and_that_token_never_granted_again() -> None:
    reports = {"a": asking("t-a", entry("Waiting")), "b": asking("t-b", entry("Waiting"))}
    plan = plan_slots(nodes("a", "b"), {"a": "t-a 2026-12-02T21:59:59Z"}, reports, budget=Budget(), now=NOW)
    assert plan.writes == {"a": "t-a expired", "b": "t-b 2026-12-02T22:05:00Z"}
    # Next pass: a's agent is still dead (same token): never again. Its restarted agent asks anew: granted.
    again = plan_slots(nodes("a", "b"), {"a": "t-a expired"}, {"a": reports["a"]}, budget=Budget(), now=NOW)
    assert again.writes == {}
    fresh = plan_slots(nodes("a"), {"a": "t-a expired"}, {"a": asking("t-a2", entry("Waiting"))},
                       budget=Budget(), now=NOW)
    assert fresh.writes == {"a": "t-a2 2026-12-02T22:05:00Z"}


def test_a_deleted_node_frees_its_slot_at_once() -> None:
    reports = {"gone": asking("t-g", entry("Waiting")), "b": asking("t-b", entry("Waiting"))}
    plan = plan_slots(nodes("b"), {"gone": "t-g 2026-12-02T22:05:00Z"}, reports, budget=Budget(), now=NOW)
    assert plan.writes == {"b": "t-b 2026-12-02T22:05:00Z"}


def test_a_percentage_counts_linux_nodes_and_rounds_up() -> None:
    names = [f"n{i:02}" for i in range(25)]
    reports = {n: asking(f"t-{n}", entry("Waiting")) for n in names}
    windows = {"win": {"kubernetes.io/os": "windows"}}
    plan = plan_slots({**nodes(*names), **windows}, {}, reports, budget=parse_budget("10%"), now=NOW)
    assert len(plan.holders) == 3  # 10% of 25 Linux nodes is 2.5: 3, as a DaemonSet's maxUnavailable rounds


def test_a_rolled_back_generation_is_halted_for_every_other_node_and_its_node_retries_first() -> None:
    reports = {"a": asking("t-a", entry("Waiting")),
               "z": asking("t-z", entry("Waiting", rolled_back=1)),  # z tries again
               "other": asking("t-o", entry("Waiting", name="docker"))}
    plan = plan_slots(nodes("a", "z", "other"), {}, reports, budget=Budget(count=2), now=NOW)
    assert set(plan.writes) == {"z", "other"} and plan.blocked == ("a",)
    assert list(halted(reports)) == [("quay", "u", 2)]


def test_a_new_generation_is_not_halted_by_the_old_one() -> None:
    reports = {"z": asking("", entry("Failed", generation=2, rolled_back=3)),
               "a": asking("t-a", entry("Waiting", generation=3))}
    assert plan_slots(nodes("a", "z"), {}, reports, budget=Budget(), now=NOW).writes == {
        "a": "t-a 2026-12-02T22:05:00Z"}


@pytest.mark.parametrize("text", ["0", "-1", "0%", "101%", "one", "", "1.5"])
def test_a_bad_budget_is_refused_with_its_value(text: str) -> None:
    with pytest.raises(BadBudget, match=f"maxUnavailable {text!r}"):
        parse_budget(text)


def mirror(generation: int = 2) -> dict[str, Any]:
    return {"metadata": {"name": "quay", "uid": "u", "generation": generation},
            "spec": {"registry": "quay.io", "mirrors": ["https://m.example.com"]}, "status": {}}


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_rollback_halts_the_rollout_and_names_the_node() -> None:
    reports = {"a": asking("t-a", entry("Waiting")), "z": asking("", entry("Failed", rolled_back=1))}
    status = planning.plan_status(mirror(), planning.Verdict(), nodes("a", "z"), reports, now="t")
    assert conditions(status) == {"Ready": ("False", "RolloutHalted"), "Reconciling": ("True", "RolloutHalted"),
                                  "Stalled": ("False", "RolloutHalted")}
    assert "on node z (containerd did not come back healthy)" in status["message"]
    assert status["nodes"] == {"selected": 2, "applied": 0, "failed": 1, "waiting": 1, "inUse": 0}


def test_a_node_that_gave_up_makes_the_object_stalled_and_a_new_generation_resumes() -> None:
    reports = {"a": asking("t-a", entry("Waiting")), "z": asking("", entry("Failed", rolled_back=3))}
    status = planning.plan_status(mirror(), planning.Verdict(), nodes("a", "z"), reports, now="t",
                                  restart_attempts=3)
    assert conditions(status)["Stalled"] == ("True", "RolloutFailed")
    assert conditions(status)["Reconciling"][0] == "False"
    assert "broke containerd on node z" in status["message"]
    fixed = planning.plan_status(mirror(generation=3), planning.Verdict(), nodes("a", "z"),
                                 {"a": asking("t-a", entry("Waiting", generation=3))}, now="t")
    assert conditions(fixed)["Stalled"][0] == "False" and conditions(fixed)["Reconciling"][0] == "True"
    assert fixed["message"] == "0/2 nodes applied generation 3, 1 waiting for a restart slot"


def test_the_published_document_carries_restart_attempts_only_when_not_the_default() -> None:
    assert "restartAttempts" not in contract.render_desired([])
    assert contract.parse_desired(contract.render_desired([], 5)).restart_attempts == 5
    with pytest.raises(contract.InvalidDocument, match="restartAttempts 0"):
        contract.parse_desired('{"version": 1, "mirrors": [], "restartAttempts": 0}')


def test_the_operator_looks_again_when_the_first_held_slot_runs_out() -> None:
    reports = {"a": asking("t-a", entry("Waiting")), "b": asking("t-b", entry("Waiting"))}
    held = plan_slots(nodes("a", "b"), {"a": "t-a 2026-12-02T22:03:00Z"}, reports, budget=Budget(count=2), now=NOW)
    assert held.writes == {"b": "t-b 2026-12-02T22:05:00Z"}
    assert held.next_expiry == datetime.datetime(2026, 12, 2, 22, 3, tzinfo=datetime.UTC)
    assert plan_slots(nodes("a"), {}, {}, budget=Budget(), now=NOW).next_expiry is None
