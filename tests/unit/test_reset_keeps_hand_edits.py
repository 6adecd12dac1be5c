"""Property (issue 9, defect 5): after apply, a hand edit anywhere outside regmirror's keys, then reset, gives
the node's own config.toml back byte for byte with exactly that edit in it: nothing re-indented or reordered.

tomlkit does not round-trip every file (``dumps(parse(x)) != x`` for the seed's schema-1 config, whose
``configs."harbor.corp:8443".auth`` header it re-indents), so this holds only because reset carries the edit
onto the node's own bytes instead of re-rendering the file.
"""

from __future__ import annotations

import tomllib

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from regmirror_agent import ownership
from regmirror_agent.nodeviews import DictView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import containerd
from regmirror_api import models
from tests.unit.test_crash_safety import SEED
from tests.unit.test_property_preserves_node_config import node_configs
from tests.unit.trees import apply_in_memory

CFG = containerd.CONFIG_FILE
STATE = "/var/lib/regmirror/state.json"
SETS = [[models.parse_cli_mirror("quay.io=https://quay.tencentcloudcr.com"),
         models.parse_cli_mirror("docker.io=https://mirror.ccs.tencentyun.com")],
        [models.parse_cli_mirror("quay.io=https://a.example,https://b.example")]]


def plan(files: dict[str, str], desired: list[models.RegistryMirror], mode: str) -> Plan:
    state = ownership.parse_state(files.get(STATE), "state")
    return containerd.plan_containerd(desired, DictView(files), state, containerd.Options(mode=mode))


def edit(text: str, line_no: int, kind: int) -> str:
    lines = text.splitlines(keepends=True)
    line = lines[line_no]
    body = line.rstrip("\n")
    if kind == 0:
        lines[line_no] = body + "  # hand edit\n"
    elif kind == 1:
        lines.insert(line_no + 1, "# a line added by hand\n")
    else:  # another value of the same type: what a person tuning a setting does
        indent = body[:len(body) - len(body.lstrip())]
        key = body.strip().split("=", 1)[0].strip()
        lines[line_no] = f"{indent}{key} = {other_value(body)}\n"
    return "".join(lines)


def other_value(line: str) -> str | None:
    try:
        value = next(iter(tomllib.loads(line.strip()).values()))
    except (tomllib.TOMLDecodeError, StopIteration):
        return None
    if isinstance(value, bool):
        return "false" if value else "true"
    if isinstance(value, int):
        return str(value + 4242)
    if isinstance(value, str):
        return '"' + value.replace("\\", "").replace('"', "") + '-edited"'
    return None


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.just(SEED), node_configs()), st.sampled_from([0, 1]), st.sampled_from(["hosts", "inline"]),
       st.data())
def test_a_hand_edit_outside_regmirrors_keys_survives_reset_byte_for_byte(config: str, which: int, mode: str,
                                                                          data: st.DataObject) -> None:
    before = {CFG: config}
    applied = apply_in_memory(plan(before, SETS[which], mode), before)
    new = applied[CFG]
    # A line the apply left alone, found once in each file, is one a person can edit in both the same way.
    same = [i for i, line in enumerate(new.splitlines()) if line.strip() and new.splitlines().count(line) == 1
            and config.splitlines().count(line) == 1]
    assume(same)
    i = data.draw(st.sampled_from(same), label="line")
    line = new.splitlines()[i]
    kinds = [0, 1] + ([2] if "=" in line and not line.strip().startswith(("#", "[")) and "registry" not in line
                      and "endpoint" not in line and line.strip().split("=")[0].strip() != "version"
                      and other_value(line) is not None else [])
    kind = data.draw(st.sampled_from(kinds), label="edit")
    assume(not (kind == 0 and "#" in line))  # a second comment on a commented line is still one comment
    j = config.splitlines().index(line)
    applied[CFG] = edit(new, i, kind)
    expected = edit(config, j, kind)

    reset = apply_in_memory(plan(applied, [], mode), applied)
    assert reset[CFG] == expected
    assert STATE not in reset
