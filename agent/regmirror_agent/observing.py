"""What a plan was computed from, so an identical apply can be recognised without planning again.

Planning is a deterministic function of the desired set, the settings and what it read from the node. The
engine records every read (file contents, directory checks, globs) while planning; after a successful apply
it re-observes the same things and keeps their digest in ``applied.json`` beside the state. An apply with the
same desired set whose observations hash the same has nothing to do, and is answered by this standard-library
module alone: no TOML parser is imported, no file is written.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from regmirror_agent import credentials
from regmirror_agent.nodefiles import NodeRoot, UnsafePath
from regmirror_api import fingerprints

APPLIED_FILE = "applied.json"


class RecordingView:
    """A NodeView that remembers what it was asked."""

    def __init__(self, inner: NodeRoot) -> None:
        self.inner = inner
        self.reads: set[str] = set()
        self.dirs: set[str] = set()
        self.globs: set[str] = set()
        self.modes: set[str] = set()

    def read(self, path: str) -> str | None:
        self.reads.add(path)
        return self.inner.read(path)

    def is_dir(self, path: str) -> bool:
        self.dirs.add(path)
        return self.inner.is_dir(path)

    def glob(self, pattern: str) -> list[str]:
        self.globs.add(pattern)
        return self.inner.glob(pattern)

    def mode(self, path: str) -> int | None:
        self.modes.add(path)
        return self.inner.mode(path)

    def observations(self) -> dict[str, list[str]]:
        seen = {"reads": sorted(self.reads), "dirs": sorted(self.dirs), "globs": sorted(self.globs)}
        return seen | ({"modes": sorted(self.modes)} if self.modes else {})


def digest(node: NodeRoot, observations: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for path in observations["reads"]:
        text = node.read(path)
        # A file with a login gets a keyed digest: applied.json is no place for a plain hash that gives away a weak
        # password (``fingerprints``), and a hand edit of the login is still noticed.
        seen = ("-" if text is None else fingerprints.fingerprint(text) if credentials.holds_secret(text)
                else hashlib.sha256(text.encode()).hexdigest())
        h.update(f"r\0{path}\0{seen}\n".encode())
    for path in observations["dirs"]:
        h.update(f"d\0{path}\0{node.is_dir(path)}\n".encode())
    for pattern in observations["globs"]:
        h.update(f"g\0{pattern}\0{json.dumps(node.glob(pattern))}\n".encode())
    for path in observations.get("modes", []):  # only plans that changed a file's bits looked at them
        h.update(f"m\0{path}\0{node.mode(path)}\n".encode())
    return h.hexdigest()


def request_key(request: object) -> str:
    """Identifies what was asked (any JSON-able description of it): the same key and the same node observations
    mean the same plan. A key is only ever recorded for a request that was valid, so a caller may look it up
    before validating: a match proves the same input was valid before."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def request_settings(runtime: str, mode: str, config_file: str, daemon_json: str, state_dir: str) -> dict[str, str]:
    """The settings that shape a plan (not how to restart): part of what identifies a request."""
    return {"runtime": runtime, "mode": mode, "config": config_file, "daemonJson": daemon_json, "stateDir": state_dir}


def applied_path(state_dir: str) -> str:
    return posixpath.join(state_dir, APPLIED_FILE)


def render_applied(key: str, node: NodeRoot, observations: dict[str, list[str]]) -> str:
    return json.dumps({"request": key, "observed": observations, "digest": digest(node, observations)},
                      indent=1, sort_keys=True) + "\n"


def already_applied(node: NodeRoot, state_dir: str, key: str) -> bool:
    """True when the last successful apply was this same request and nothing it read has changed since."""
    try:
        text = node.read(applied_path(state_dir))
        if text is None:
            return False
        record = json.loads(text)
        return bool(record.get("request") == key and record["digest"] == digest(node, record["observed"]))
    except (UnsafePath, OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # only a shortcut: a record that is not one (or no longer readable) means "plan again"
