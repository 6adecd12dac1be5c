"""Issue 9, defects 1 and 8, as properties: whatever the model admits, the node and containerd can hold.

A registry name becomes a directory (``certs.d/<host:port>``, and containerd also looks for
``certs.d/<host_port_>``); a mirror URL becomes a ``[host."<url>"]`` key that containerd parses with Go's
url.Parse, and one it cannot parse makes it ignore the whole hosts.toml. The CRD repeats the same definition;
``tests/e2e/test_api.py`` holds the two to it against a real apiserver.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regmirror_agent.runtimes import hoststoml
from regmirror_api import models

LABEL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"


@st.composite
def registry_names(draw: st.DrawFn) -> str:
    """Host names of up to six labels of up to 63 characters, with a port or not: long ones are the point."""
    labels = draw(st.lists(st.one_of(st.integers(1, 63), st.sampled_from([61, 62, 63])), min_size=1, max_size=6))
    host = ".".join(draw(st.text(LABEL_CHARS, min_size=n, max_size=n)) for n in labels)
    port = draw(st.sampled_from(["", "", ":5000", ":1", ":65535", ":443"]))
    return host + port


def namespace_dirs(registry: str) -> list[str]:
    """Every directory name containerd looks up for a registry (RUNTIME-NOTES: host_port_, then host:port)."""
    name = hoststoml.registry_dir(registry)
    host, sep, port = name.rpartition(":")
    return [name] + ([f"{host}_{port}_"] if sep else [])


@settings(max_examples=200, deadline=None, database=None)
@given(registry_names())
def test_every_registry_the_model_admits_fits_a_directory_on_this_filesystem(registry: str) -> None:
    if models.check_registry(registry):
        return
    assert len(registry) <= models.MAX_REGISTRY_LENGTH
    with tempfile.TemporaryDirectory() as tmp:
        for name in namespace_dirs(registry):
            assert len(name.encode()) <= 255
            os.mkdir(os.path.join(tmp, name))  # the real filesystem agrees


@settings(max_examples=200, deadline=None, database=None)
@given(registry_names())
def test_a_registry_is_refused_only_for_a_reason_it_names(registry: str) -> None:
    problems = models.check_registry(registry)
    host = registry.split(":", maxsplit=1)[0]
    label_ok = all(re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", p) for p in host.split("."))
    if len(registry) > models.MAX_REGISTRY_LENGTH:
        assert problems and f"at most {models.MAX_REGISTRY_LENGTH} characters" in problems[0]
    elif label_ok:
        assert problems == []
    else:
        assert problems and "not a registry host" in problems[0]


VALID_PIECES = ["a", "z", "0", "-", ".", "_", "/", "~", "%2F", "%7e", ":", "@", "!", "$", "&", "(", ")", "*", "+",
                ",", ";", "="]
ODD_PIECES = ["%zz", "%4", "%", "%41", "'", '"', " ", "\t", "[", "]", "{", "|", "^", "`", "\\", "<", "?", "#",
              "\u00e9", "\u2028", "\x00", "\x7f"]


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["https://", "http://", "HTTPS://", "hTTp://", "ftp://", "", "https:/"]))
    userinfo = draw(st.sampled_from(["", "", "", "@", "u@", "u:p@"]))
    host = "".join(draw(st.lists(st.sampled_from(["m", "example", ".", "com", "-", "_", "10", "xn--bcher-kva",
                                                  *ODD_PIECES[:5]]), min_size=0, max_size=5)))
    port = draw(st.sampled_from(["", "", ":5000", ":0", ":080", ":65535", ":65536", ":", ":00000000080", ":x"]))
    path = "".join(draw(st.lists(st.sampled_from(VALID_PIECES * 3 + ODD_PIECES), max_size=8)))
    return scheme + userinfo + host + port + (("/" + path) if path and draw(st.booleans()) else path)


@st.composite
def near_valid_urls(draw: st.DrawFn) -> str:
    """URLs built from pieces the definition allows, so most are admitted: the region where a mistake in the
    definition would let through something containerd cannot parse."""
    label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,6}[A-Za-z0-9])?", fullmatch=True)
    host = ".".join(draw(st.lists(label, min_size=1, max_size=4)))
    port = draw(st.sampled_from(["", ":1", ":5000", ":65535", ":9", ":10000"]))
    path = "".join(draw(st.lists(st.sampled_from([*VALID_PIECES, "%00", "%ff", "%7F", "v2"]), max_size=10)))
    return draw(st.sampled_from(["https://", "http://", "HTTP://"])) + host + port + ("/" + path if path else "")


@settings(max_examples=500, deadline=None, database=None)
@given(urls())
def test_the_model_admits_exactly_the_urls_of_the_one_definition(url: str) -> None:
    admitted = models.check_mirror_url(url) == []
    assert admitted == bool(re.match(models.MIRROR_URL_PATTERN, url)), url


@settings(max_examples=500, deadline=None, database=None)
@given(urls())
def test_every_url_the_model_admits_is_one_containerd_can_parse(url: str) -> None:
    """What Go's url.Parse refuses (containerd then drops the whole hosts.toml), spelled out."""
    if models.check_mirror_url(url):
        return
    scheme, _, rest = url.partition("://")
    authority, _, path = rest.partition("/")
    assert scheme.lower() in ("http", "https")
    assert "%" not in authority and "@" not in authority
    host, _, port = authority.partition(":")
    assert host and (not port or (port[0] != "0" and 1 <= int(port) <= 65535))
    assert all(re.fullmatch(r"[0-9A-Fa-f]{2}", path[i + 1:i + 3]) for i, c in enumerate(path) if c == "%")
    assert url.isascii() and url.isprintable() and not any(c in url for c in " \"'\\`<>{}|^[]?#")
    rendered = hoststoml.render_hosts_toml(hoststoml.HostsFile(
        registry="quay.io", hosts=(hoststoml.Host(url=url),), server_tls=hoststoml.TLS(), origin="test"))
    assert f'[host."{url}"]' in rendered


GO_PARSE = """package main

import (
	"bufio"
	"fmt"
	"net/url"
	"os"
)

// One URL per line on stdin; for each, "ok" or why containerd's parser (Go's net/url) refuses it.
func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		u, err := url.Parse(in.Text())
		switch {
		case err != nil:
			fmt.Println(err)
		case u.Host == "" || u.Hostname() == "":
			fmt.Println("no host")
		default:
			fmt.Println("ok")
		}
	}
}
"""


def test_go_url_parse_accepts_every_url_the_model_admits(tmp_path: Path) -> None:
    """The claim above checked by the parser containerd runs (Go's net/url), on a batch of generated URLs."""
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.path.exists(p)), None)
    if go is None:
        pytest.skip("Go is not installed here (hack/install-deps.sh installs it)")
    admitted: list[str] = []

    @settings(max_examples=500, deadline=None, database=None)
    @given(st.one_of(urls(), near_valid_urls()))
    def collect(url: str) -> None:
        if models.check_mirror_url(url) == []:
            admitted.append(url)

    collect()
    assert len(admitted) >= 50, "too few admitted URLs generated to prove anything"
    (tmp_path / "main.go").write_text(GO_PARSE)
    done = subprocess.run([go, "run", "main.go"], cwd=tmp_path, input="\n".join(admitted) + "\n", text=True,
                          capture_output=True, timeout=300, env={**os.environ, "GO111MODULE": "off"}, check=False)
    assert done.returncode == 0, done.stderr
    verdicts = done.stdout.splitlines()
    assert len(verdicts) == len(admitted)
    assert [(u, v) for u, v in zip(admitted, verdicts, strict=True) if v != "ok"] == []
