"""Many simulated nodes in one process, each running the real agent: ``regmirror_agent.agent.Agent`` with its two
watches, its reporter and its own Node-bound token, exactly as on a node. Only the node engine is replaced, by
a stand-in that applies instantly: on a 2-core machine, 3,000 real engines would measure this machine's CPU, not
the apiserver's, and on a real cluster every node brings its own CPU for its engine.

    python -m bench.simnodes SPEC.json      # SPEC: {"host", "port", "ca", "nodes": [[name, token], ...]}

Prints ``started N`` once every agent runs; stops on SIGTERM or when its standard input closes.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Sequence

from regmirror_agent import engine
from regmirror_agent.agent import Agent, AgentSettings
from regmirror_agent.kubeapi import Client, Config
from regmirror_agent.plans import Plan
from regmirror_api import models


def applied_at_once(_: Sequence[models.RegistryMirror]) -> engine.Outcome:
    """The engine's answer for a node already configured: nothing to change, no restart."""
    return engine.Outcome(runtime="containerd", plan=Plan(runtime="containerd", changes=(), restart=False))


def main(argv: Sequence[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    # Thousands of threads: a small stack each (the agent's call depth is shallow).
    threading.stack_size(256 * 1024)
    stop = threading.Event()
    agents = []
    for name, token in spec["nodes"]:
        client = Client(Config(host=spec["host"], port=int(spec["port"]), token=token, ca_file=spec["ca"]))
        settings = AgentSettings(node=name, engine=engine.Settings(root="/nonexistent", restart="never"))
        agent = Agent(settings, client, stop, apply_mirrors=applied_at_once)
        threading.Thread(target=agent.run, name=f"agent {name}", daemon=True).start()
        agents.append(agent)
    print(f"started {len(agents)}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    for agent in agents:
        agent.wake.set()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
