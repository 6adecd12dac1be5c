"""Property: whatever else a node's config.toml holds, apply keeps it and reset gives back the same bytes."""

from __future__ import annotations

import copy
import json
import tomllib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror_agent import ownership
from regmirror_agent.nodeviews import DictView
from regmirror_agent.runtimes import containerd
from regmirror_api import models
from tests.unit.trees import apply_in_memory

CFG = containerd.CONFIG_FILE
DESIRED = [models.parse_cli_mirror("quay.io=https://quay.tencentcloudcr.com"),
           models.parse_cli_mirror("docker.io=https://mirror.ccs.tencentyun.com,https://second.example")]
CRI = {1: "plugins.cri", 2: 'plugins."io.containerd.grpc.v1.cri"'}

names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda n: n not in {"version", "plugins", "registry", "imports", "disabled_plugins"})
values = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                   st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12))
comments = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30).map(
    lambda t: "# " + t)


def toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return str(v).lower() if isinstance(v, bool) else str(v)


@st.composite
def node_configs(draw: st.DrawFn) -> str:
    version = draw(st.sampled_from([1, 2]))
    cri = CRI[version]
    lines = [draw(comments)] + (["version = 2"] if version == 2 else [])
    for key, value in draw(st.dictionaries(names, values, max_size=4)).items():
        lines.append(f"{key} = {toml_value(value)}  {draw(comments)}")
    for table in draw(st.lists(names, max_size=3, unique=True)):
        lines += ["", f'[plugins."io.example.{table}"]', draw(comments)]
        lines += [f"  {k} = {toml_value(v)}" for k, v in draw(st.dictionaries(names, values, max_size=3)).items()]
    lines += ["", f"[{cri}]"]
    lines += [f"  {k} = {toml_value(v)}" for k, v in draw(st.dictionaries(names, values, max_size=3)).items()]
    lines += [f"  [{cri}.containerd]", "    " + draw(comments), '    snapshotter = "overlayfs"']
    if draw(st.booleans()):
        lines += [f"  [{cri}.registry]", "    " + draw(comments)]
        if draw(st.booleans()):
            lines += [f'    [{cri}.registry.mirrors."ghcr.io"]', '      endpoint = ["https://ghcr.own.example"]']
        if draw(st.booleans()):
            lines += [f'    [{cri}.registry.configs."ghcr.own.example".tls]', "      insecure_skip_verify = true"]
        if draw(st.booleans()):
            lines += [f'    [{cri}.registry.configs."ghcr.io".auth]', '      username = "bot"']
    return "\n".join(lines) + "\n"


def without_owned(doc: dict[str, Any], version: int) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    reg = doc.get("plugins", {}).get(containerd.CRI_TABLES[version][1], {}).get("registry", {})
    reg.pop("config_path", None)
    reg.pop("mirrors", None)
    for cfg in reg.get("configs", {}).values():
        cfg.pop("tls", None)
    reg["configs"] = {h: c for h, c in reg.get("configs", {}).items() if c}
    if not reg["configs"]:
        reg.pop("configs")
    cri = doc.get("plugins", {}).get(containerd.CRI_TABLES[version][1], {})
    if "registry" in cri and not cri["registry"]:
        cri.pop("registry")
    return doc


def plan(files: dict[str, str], desired: list[models.RegistryMirror]):
    state = ownership.parse_state(files.get("/var/lib/regmirror/state.json"), "state")
    return containerd.plan_containerd(desired, DictView(files), state)


@settings(max_examples=150, deadline=None)
@given(node_configs())
def test_unrelated_settings_and_comments_survive_apply_and_reset(config: str) -> None:
    before = {CFG: config}
    version = 2 if "version = 2" in config else 1
    applied = apply_in_memory(plan(before, DESIRED), before)
    new = applied[CFG]

    assert without_owned(tomllib.loads(new), version) == without_owned(tomllib.loads(config), version)
    owned_lines = [line for line in config.splitlines() if "registry." in line or "endpoint" in line
                   or "insecure_skip_verify" in line]
    for line in config.splitlines():
        if line.strip().startswith("#") or (line not in owned_lines and "=" in line):
            assert line.strip() in new, f"lost line {line!r}"

    assert not plan(applied, DESIRED).changed
    assert apply_in_memory(plan(applied, []), applied) == before


@settings(max_examples=60, deadline=None)
@given(node_configs(), names, values)
def test_a_hand_edit_after_apply_survives_reset(config: str, key: str, value: Any) -> None:
    before = {CFG: config}
    applied = apply_in_memory(plan(before, DESIRED), before)
    line = f"regmirror_test_{key} = {toml_value(value)}"
    applied[CFG] = applied[CFG].replace("\n", f"\n{line}\n", 1) if "version = 2" not in applied[CFG] \
        else applied[CFG].replace("version = 2\n", f"version = 2\n{line}\n", 1)
    reset = apply_in_memory(plan(applied, []), applied)[CFG]
    version = 2 if "version = 2" in config else 1
    expected = tomllib.loads(config)
    expected[f"regmirror_test_{key}"] = value
    assert tomllib.loads(reset) == expected
    assert without_owned(tomllib.loads(reset), version) == without_owned(expected, version)
