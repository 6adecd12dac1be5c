"""Fixtures shared by the unit tests."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files made immutable with chattr +i (the real kernel refusal); always made mutable again."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        subprocess.run(["chattr", "-i", str(p)], check=False)


@pytest.fixture
def running() -> Iterator[Any]:
    """Start agents on a fake API (``tests.unit.test_agent_loop.FakeApi``): ``running(api, ...)`` returns an agent
    whose loop runs in a thread; every one is stopped after the test, and waited for (a loop still running would
    log into the next test's captured output, or into a closed one)."""
    from regmirror_agent import engine
    from regmirror_agent.agent import Agent, AgentSettings
    from tests.unit.test_agent_loop import NODE, FakeApi, instantly

    started: list[tuple[Agent, FakeApi, threading.Thread]] = []

    def start(api: FakeApi, resync: int = 3600, apply_mirrors: Any = instantly, *,
              settings: AgentSettings | None = None, before: Callable[[Agent], None] | None = None) -> Agent:
        """``apply_mirrors=None``: the real engine on ``settings.engine.root``; ``before``: set the agent up before
        its loop starts."""
        settings = settings or AgentSettings(node=NODE, engine=engine.Settings(root="/nonexistent"), resync=resync)
        agent = Agent(settings, api, apply_mirrors=apply_mirrors)  # type: ignore[arg-type]
        if before is not None:
            before(agent)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        started.append((agent, api, thread))
        return agent

    yield start
    for agent, api, _ in started:
        agent.stop.set()
        agent.wake.set()
        for q in api.events.values():
            q.put(None)
    for _, _, thread in started:
        thread.join(timeout=10)
