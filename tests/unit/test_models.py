"""The RegistryMirror model refuses what could hurt a node, and says which field and why."""

from __future__ import annotations

import pytest

from regmirror_api import models


@pytest.mark.parametrize("registry", ["quay.io", "docker.io", "*", "registry.example.com:5000", "10.0.0.1:443",
                                      "localhost:5000", "ghcr.io"])
def test_valid_registries_are_accepted(registry: str) -> None:
    assert models.check_registry(registry) == []


@pytest.mark.parametrize("registry, expected", [
    ("../../etc", "not a registry host"),
    ("quay.io/../../etc", "not a registry host"),
    ("quay io", "not a registry host"),
    ('quay"io', "not a registry host"),
    ("quay.io\n[plugins]", "not a registry host"),
    ("Quay.IO", "lower case"),
    ("", "must be a registry host"),
    ("registry-1.docker.io", "write 'docker.io'"),
    ("quay.io:99999", "port outside"),
])
def test_hostile_registries_are_refused_with_the_value_quoted(registry: str, expected: str) -> None:
    problems = models.check_registry(registry)
    assert problems and expected in problems[0]


@pytest.mark.parametrize("url, expected", [
    ("ftp://mirror.example", "not an absolute http"),
    ("mirror.example", "not an absolute http"),
    ('https://mirror.example/"]\n[plugins]', "character no mirror URL may hold"),
    ("https://mirror.example/a b", "character no mirror URL may hold"),
    ("https://mirror.example/\x00", "character no mirror URL may hold"),
    ("https://user:pw@mirror.example", "carries credentials"),
    ("https://mirror.example/?x=1", "query or fragment"),
    ("https://mirror.example:99999", "not a valid URL"),
])
def test_bad_mirror_urls_are_refused(url: str, expected: str) -> None:
    problems = models.check_mirror_url(url)
    assert problems and expected in problems[0]


def test_every_problem_in_a_spec_is_reported_at_once() -> None:
    with pytest.raises(models.InvalidSpec) as exc:
        models.parse_spec("x", {"registry": "../x", "mirrors": [
            {"url": "ftp://a"}, {"url": "https://b", "capabilities": ["fly"]}, {"url": "https://b"}]})
    text = str(exc.value)
    assert "spec.registry" in text and "spec.mirrors[0].url" in text and "spec.mirrors[1].capabilities" in text


def test_duplicate_and_too_many_mirrors_are_refused() -> None:
    with pytest.raises(models.InvalidSpec, match="listed more than once"):
        models.parse_spec("x", {"registry": "quay.io", "mirrors": ["https://a", "https://a"]})
    with pytest.raises(models.InvalidSpec, match="at most 10"):
        models.parse_spec("x", {"registry": "quay.io", "mirrors": [f"https://m{i}" for i in range(11)]})
    with pytest.raises(models.InvalidSpec, match="at least one mirror"):
        models.parse_spec("x", {"registry": "quay.io", "mirrors": []})


def test_cli_flag_keeps_mirror_order_and_defaults() -> None:
    m = models.parse_cli_mirror("quay.io=https://a.example,https://b.example")
    assert m.registry == "quay.io"
    assert [x.url for x in m.mirrors] == ["https://a.example", "https://b.example"]
    assert m.mirrors[0].capabilities == ("pull", "resolve")


def test_two_mirror_sets_for_one_registry_are_refused() -> None:
    a = models.parse_cli_mirror("quay.io=https://a.example")
    b = models.parse_spec("other", {"registry": "quay.io", "mirrors": ["https://b.example"]})
    with pytest.raises(models.InvalidSpec, match="mirrored twice"):
        models.check_unique_registries([a, b])


def test_document_round_trips_through_its_spec() -> None:
    doc = {"apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": "q"},
           "spec": {"registry": "quay.io", "mirrors": [{"url": "https://a", "skipVerify": True,
                                                        "capabilities": ["resolve", "pull"]}]}}
    m = models.parse_document(doc)
    assert m.to_spec() == {"registry": "quay.io", "mirrors": [{"url": "https://a", "skipVerify": True}]}


def test_non_ascii_mirror_url_asks_for_punycode() -> None:
    problems = models.check_mirror_url("https://镜像.example")
    assert problems and "punycode" in problems[0]
