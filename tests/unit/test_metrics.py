"""Metrics: the text the shared module renders is what Prometheus' own parser reads, and the agent's and the
operator's counters move with what they did. The real processes are scraped in tests/e2e/test_metrics.py."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from regmirror_agent import engine, telemetry
from regmirror_agent.agent import Agent, AgentSettings
from regmirror_agent.plans import FileChange, Plan
from regmirror_api import metrics, models
from regmirror_operator import reconciling
from regmirror_operator import telemetry as operator_telemetry
from tests.unit.test_agent_loop import NODE, FakeApi, desired


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_rendered_text_is_read_by_prometheus_parser_with_labels_escaped() -> None:
    registry = metrics.Registry()
    counter = registry.add(metrics.Counter("demo_events_total", 'Events, "quoted"\\ and\nsplit.', ["kind"]))
    gauge = registry.add(metrics.Gauge("demo_level", "A level."))
    histogram = registry.add(metrics.Histogram("demo_duration_seconds", "Durations.", (0.1, 1.0)))
    odd = 'a "b" \\ c\nd'
    counter.inc(odd)
    counter.inc(odd, amount=2)
    gauge.set(1.5)
    for value in (0.05, 0.5, 5.0):
        histogram.observe(value)
    text = registry.render()
    assert "# TYPE demo_events_total counter\n" in text and "# TYPE demo_duration_seconds histogram\n" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["demo_events"].documentation == 'Events, "quoted"\\ and\nsplit.'
    got = samples(text)
    assert got[("demo_events_total", (("kind", odd),))] == 3
    assert got[("demo_level", ())] == 1.5
    assert got[("demo_duration_seconds_bucket", (("le", "0.1"),))] == 1
    assert got[("demo_duration_seconds_bucket", (("le", "1.0"),))] == 2
    assert got[("demo_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("demo_duration_seconds_count", ())] == 3
    assert got[("demo_duration_seconds_sum", ())] == pytest.approx(5.55)


def test_wrong_labels_and_a_falling_counter_are_refused() -> None:
    counter = metrics.Counter("demo_total", "Demo.", ["result"])
    with pytest.raises(ValueError, match="expected values for"):
        counter.inc()
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc("x", amount=-1)
    registry = metrics.Registry()
    registry.add(counter)
    with pytest.raises(ValueError, match="already registered"):
        registry.add(metrics.Counter("demo_total", "Again."))


def changed_outcome(*, restarted: bool = False, drift: tuple[str, ...] = ()) -> engine.Outcome:
    plan = Plan(runtime="containerd", changes=(FileChange("/etc/containerd/certs.d/x/hosts.toml", None, "x"),),
                restart=restarted)
    return engine.Outcome("containerd", plan, restarted=restarted, drift=drift)


def test_the_agent_counts_applies_restarts_rollbacks_drift_and_report_writes() -> None:
    outcomes: list[Any] = [changed_outcome(restarted=True),
                           engine.EngineError("containerd did not come back; put back", rolled_back=True),
                           changed_outcome(drift=("/etc/containerd/certs.d/x/hosts.toml",)),
                           engine.UNCHANGED, engine.UNCHANGED]

    def apply_mirrors(_: Sequence[models.RegistryMirror]) -> engine.Outcome:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, engine.Outcome)
        return outcome

    api = FakeApi(desired("quay-io"))
    agent = Agent(AgentSettings(node=NODE, engine=engine.Settings(root="/nonexistent")), api,  # type: ignore[arg-type]
                  apply_mirrors=apply_mirrors)
    agent._on_configmap(api.configmap)
    agent._on_node(api.node)
    m = agent.metrics
    assert m.last_success.value() == 0
    for _ in range(4):
        agent.reconcile()
    assert (m.applies.value("changed"), m.applies.value("unchanged"), m.applies.value("failed")) == (2, 1, 1)
    assert (m.restarts.value(), m.rollbacks.value(), m.drift_repairs.value()) == (1, 1, 1)
    assert m.last_success.value() > 1.7e9
    assert m.report_writes.value() == 4  # Applied, Failed, Applied with the drift note, Applied without it
    agent.reconcile()
    assert m.report_writes.value() == 4 and m.applies.value("unchanged") == 2  # nothing new: no write

    server = telemetry.serve(m.registry, "127.0.0.1", 0)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"] == metrics.CONTENT_TYPE
            got = samples(response.read().decode())
        assert got[("regmirror_agent_applies_total", (("result", "failed"),))] == 1
        assert got[("regmirror_agent_mirror_probes_total", (("result", "dead"),))] == 0
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{url}/", timeout=5)
        assert telemetry.serve(m.registry, "127.0.0.1", server.server_address[1]) is None  # taken: logged, no crash
    finally:
        server.shutdown()
        server.server_close()


def test_the_operator_gauges_count_conditions_and_failing_nodes() -> None:
    m = operator_telemetry.OperatorMetrics()

    def status(ready: str, reconciling_: str, stalled: str, failed: int) -> dict[str, Any]:
        return {"conditions": [{"type": "Ready", "status": ready}, {"type": "Reconciling", "status": reconciling_},
                               {"type": "Stalled", "status": stalled}], "nodes": {"failed": failed}}

    m.record_statuses({"a": status("True", "False", "False", 0), "b": status("False", "True", "False", 2),
                       "c": status("False", "False", "True", 0), "d": status("False", "True", "False", 1)})
    assert [m.mirrors.value(c) for c in ("Ready", "Reconciling", "Stalled")] == [1, 2, 1]
    assert m.nodes_failed.value() == 3


def test_the_operator_metrics_port_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGMIRROR_METRICS_PORT", raising=False)
    assert operator_telemetry.port_from_environment() == 0
    monkeypatch.setenv("REGMIRROR_METRICS_PORT", "9809")
    assert operator_telemetry.port_from_environment() == 9809
    monkeypatch.setenv("REGMIRROR_METRICS_PORT", "metrics")
    with pytest.raises(ValueError, match="'metrics': expected a port number"):
        operator_telemetry.port_from_environment()


def test_a_pass_is_timed_and_counted() -> None:
    class Publisher:
        def list_mirrors(self) -> list[Any]:
            raise OSError("the apiserver is away")

    reconciler = reconciling.Reconciler(Publisher(),  # type: ignore[arg-type]
                                        settings=reconciling.Settings(backoff=(0.01,), debounce=0.0))

    async def run_briefly() -> None:
        task = asyncio.create_task(reconciler.run())
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run_briefly())
    assert reconciler.metrics.passes.value("failure") >= 2
    assert reconciler.metrics.pass_duration.count == reconciler.metrics.passes.value("failure")
