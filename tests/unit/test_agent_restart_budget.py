"""The agent's side of the restart budget, with a fake API and a stand-in engine that needs a restart: it asks
for a slot in its report and writes nothing until the operator grants that very change; a rolled-back try is
counted, paused on, and given up after the published number of tries. On real components:
tests/e2e/test_rollout.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from regmirror_agent import engine
from regmirror_agent.agent import Agent, AgentSettings
from regmirror_agent.plans import FileChange, Plan
from regmirror_api import contract, models
from tests.unit.test_agent_loop import REPORT_PATH, FakeApi, desired

NEEDS_RESTART = Plan(runtime="containerd", restart=True, request="request-1",
                     changes=(FileChange("/etc/containerd/config.toml", "old", "new"),))


class Engine:
    """Asks the agent, as engine.apply does, then succeeds or raises what it is told to."""

    def __init__(self) -> None:
        self.agent: Agent | None = None
        self.results: list[Exception | None] = []
        self.restarts = 0

    def __call__(self, mirrors: Sequence[models.RegistryMirror]) -> engine.Outcome:
        assert self.agent is not None
        # The engine's request key names what is desired, generations included: a new change, a new request.
        plan = dataclasses.replace(NEEDS_RESTART, request=repr(sorted((m.name, m.generation) for m in mirrors)))
        if not self.agent.may_restart(plan):
            return engine.Outcome("containerd", plan, held=True)
        self.restarts += 1
        result = self.results.pop(0) if self.results else None
        if result is not None:
            raise result
        return engine.Outcome("containerd", NEEDS_RESTART, restarted=True)


def start(document: str, *, tainted: bool = False) -> tuple[Agent, FakeApi, Engine, list[float]]:
    api = FakeApi(document)
    if tainted:
        api.node["spec"] = {"taints": [{"key": contract.MIRRORS_PENDING_TAINT, "effect": "NoSchedule"}]}
    fake = Engine()
    clock = [1000.0]
    agent = Agent(AgentSettings(node="node-a", engine=engine.Settings(root="/nonexistent")), api,  # type: ignore[arg-type]
                  apply_mirrors=fake, clock=lambda: clock[0])
    fake.agent = agent
    agent._on_configmap(api.configmap)
    agent._on_node(api.node)
    return agent, api, fake, clock


def grant(agent: Agent, api: FakeApi, token: str) -> None:
    api.node["metadata"]["annotations"] = {contract.RESTART_SLOT_ANNOTATION: contract.render_slot(token, "x")}
    agent._on_node(api.node)


def status(api: FakeApi) -> dict[str, Any]:
    body: dict[str, Any] = api.objects[REPORT_PATH]["status"]
    return body


def test_a_change_that_restarts_waits_for_its_slot_then_applies_and_stops_asking() -> None:
    agent, api, fake, _ = start(desired("quay-io"))
    agent.reconcile()
    token = status(api)["restartRequest"]
    assert token and fake.restarts == 0
    assert status(api)["mirrors"][0]["state"] == "Waiting" and status(api)["ready"] == "0/1"
    assert "waiting for a restart slot" in status(api)["message"]
    grant(agent, api, "someone-elses")  # a slot for another change (or an agent that died) is not this one
    agent.reconcile()
    assert fake.restarts == 0
    grant(agent, api, token)
    agent.reconcile()
    assert fake.restarts == 1 and status(api)["mirrors"][0]["state"] == "Applied"
    assert status(api).get("restartRequest") is None


def test_a_node_still_tainted_mirrors_pending_restarts_without_a_slot() -> None:
    agent, api, fake, _ = start(desired("quay-io"), tainted=True)
    agent.reconcile()
    assert fake.restarts == 1 and status(api)["mirrors"][0]["state"] == "Applied"


def test_a_rolled_back_try_is_reported_paused_on_retried_in_a_new_slot_and_given_up_after_the_budget() -> None:
    agent, api, fake, clock = start(desired("quay-io"))
    broken = engine.EngineError("containerd did not come back healthy after the change: CRI plugin error",
                                rolled_back=True)
    fake.results = [broken, broken]
    agent.reconcile()
    grant(agent, api, status(api)["restartRequest"])
    agent.reconcile()  # try 1: rolled back
    first = status(api)["mirrors"][0]
    assert (first["state"], first["rolledBack"]) == ("Failed", 1)
    assert first["message"].startswith("try 1 of 3 rolled back: containerd did not come back healthy")
    agent.reconcile()  # still pausing: no slot asked, no restart
    assert fake.restarts == 1 and status(api).get("restartRequest") is None
    clock[0] += 31
    agent.reconcile()  # the pause is over: asks again, with a new token (the old slot is not reused)
    second_token = status(api)["restartRequest"]
    assert second_token and status(api)["mirrors"][0]["state"] == "Waiting"
    assert status(api)["mirrors"][0]["message"].startswith("waiting for a restart slot to try again (2 of 3)")
    agent.reconcile()
    assert fake.restarts == 1  # the old grant still on the Node is for try 1
    grant(agent, api, second_token)
    agent.reconcile()  # try 2: rolled back
    clock[0] += 61
    agent.reconcile()
    grant(agent, api, status(api)["restartRequest"])
    fake.results = [broken]
    agent.reconcile()  # try 3: rolled back, and that was the last
    last = status(api)["mirrors"][0]
    assert (last["state"], last["rolledBack"], fake.restarts) == ("Failed", 3, 3)
    assert last["message"].startswith("gave up after 3 tries, each rolled back: containerd did not come back")
    clock[0] += 1000
    agent.reconcile()
    assert fake.restarts == 3 and status(api).get("restartRequest") is None


def test_a_restarted_agent_remembers_the_tries_from_its_report() -> None:
    agent, api, fake, clock = start(desired("quay-io"))
    fake.results = [engine.EngineError("CRI plugin error", rolled_back=True)]
    agent.reconcile()
    grant(agent, api, status(api)["restartRequest"])
    agent.reconcile()
    again = Agent(AgentSettings(node="node-a", engine=engine.Settings(root="/nonexistent")), api,  # type: ignore[arg-type]
                  apply_mirrors=fake, clock=lambda: clock[0])
    fake.agent = again
    again._on_configmap(api.configmap)
    again._on_node(api.node)
    again.reconcile()
    entry = status(api)["mirrors"][0]
    assert (entry["state"], entry["rolledBack"]) == ("Waiting", 1)
    assert "try 1 rolled back: CRI plugin error" in entry["message"]


def test_without_restart_slots_the_agent_restarts_at_once() -> None:
    api = FakeApi(desired("quay-io"))
    fake = Engine()
    agent = Agent(AgentSettings(node="node-a", engine=engine.Settings(root="/nonexistent"), restart_slots=False),
                  api, apply_mirrors=fake)  # type: ignore[arg-type]
    fake.agent = agent
    agent._on_configmap(api.configmap)
    agent._on_node(api.node)
    agent.reconcile()
    assert fake.restarts == 1 and contract.restart_request(api.objects[REPORT_PATH]) == ""


def test_a_removal_that_waits_for_its_slot_keeps_the_node_from_saying_0_of_0() -> None:
    agent, api, fake, _ = start(desired("quay-io"))
    agent.reconcile()
    grant(agent, api, status(api)["restartRequest"])
    agent.reconcile()
    assert status(api)["ready"] == "1/1"
    api.configmap["data"][contract.CONFIGMAP_KEY] = desired()  # every RegistryMirror deleted (an uninstall)
    agent._on_configmap(api.configmap)
    agent.reconcile()
    waiting = status(api)
    assert waiting["ready"] == "0/1" and waiting["restartRequest"], "not 0/0: quay-io's configuration is still here"
    assert waiting["mirrors"][0]["message"] == "waiting for a restart slot to remove it from this node"
    grant(agent, api, waiting["restartRequest"])
    agent.reconcile()
    assert status(api)["ready"] == "0/0" and status(api).get("restartRequest") is None
    assert fake.restarts == 2
