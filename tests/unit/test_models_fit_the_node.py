"""Issue 9, defects 1 and 8, as properties: whatever the model admits, the node and containerd can hold.

A registry name becomes a directory (``certs.d/<host:port>``, and containerd also looks for
``certs.d/<host_port_>``); a mirror URL becomes a ``[host."<url>"]`` key that containerd parses with Go's
url.Parse, and one it cannot parse makes it ignore the whole hosts.toml. The CRD repeats the same definition;
``tests/e2e/test_api.py`` holds the two to it against a real apiserver.
"""

from __future__ import annotations

import os
import re
import tempfile

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
    label_ok = all(re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", p) for p in registry.split(":")[0].split("."))
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
    host = "".join(draw(st.lists(st.sampled_from(["m", "example", ".", "com", "-", "_", "10", "xn--bcher-kva"]
                                                 + ODD_PIECES[:5]), min_size=0, max_size=5)))
    port = draw(st.sampled_from(["", "", ":5000", ":0", ":080", ":65535", ":65536", ":", ":00000000080", ":x"]))
    path = "".join(draw(st.lists(st.sampled_from(VALID_PIECES * 3 + ODD_PIECES), max_size=8)))
    return scheme + userinfo + host + port + (("/" + path) if path and draw(st.booleans()) else path)


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
