"""Golden cases: ``before/`` + ``desired.yaml`` (+ ``case.yaml``) must give exactly ``after/``.

Whole trees are compared, so a missing file and an extra file both fail. Each case also proves that a
second apply changes nothing and that ``reset`` gives back ``before/`` byte for byte.
Regenerate after an intended change with ``REGMIRROR_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py``
and read the diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from regmirror_agent import ownership
from regmirror_agent.defaults import DEFAULT_STATE_DIR, STATE_FILE
from regmirror_agent.nodeviews import DictView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import containerd, docker
from regmirror_api import models
from tests.unit.trees import apply_in_memory, load_tree, without, write_tree

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
STATE_DIR = DEFAULT_STATE_DIR
STATE_PATH = f"{STATE_DIR}/{STATE_FILE}"


def plan_case(case: Path, files: dict[str, str], desired: list[models.RegistryMirror]) -> Plan:
    options = yaml.safe_load((case / "case.yaml").read_text()) if (case / "case.yaml").exists() else {}
    view = DictView(files)
    state = ownership.parse_state(files.get(STATE_PATH), STATE_PATH)
    if options.get("runtime") == "docker":
        return docker.plan_docker(desired, view, state)
    return containerd.plan_containerd(desired, view, state, containerd.Options(
        mode=options.get("mode", "auto"), containerd_version=tuple(options.get("containerd_version", ())) or None))


@pytest.mark.parametrize("name", CASES)
def test_golden_case(name: str) -> None:
    case = GOLDEN / name
    before = load_tree(case / "before")
    documents = yaml.safe_load_all((case / "desired.yaml").read_text())
    desired = [models.parse_document(d, i) for i, d in enumerate(documents)]

    applied = apply_in_memory(plan_case(case, before, desired), before)
    if os.environ.get("REGMIRROR_UPDATE_GOLDEN"):
        write_tree(case / "after", without(applied, STATE_DIR))
    assert without(applied, STATE_DIR) == load_tree(case / "after")
    assert STATE_PATH in applied, "an apply that changed files must remember what the node had"

    again = plan_case(case, applied, desired)
    assert not again.changed, f"second apply would change: {[c.path for c in again.changes]}"

    reset = apply_in_memory(plan_case(case, applied, []), applied)
    assert reset == before, "reset must give the node back exactly its own files"
