"""Image rewrite: the spec field (models), the names (rewriting), the patch a Pod gets, the webhook's plumbing."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
from typing import Any

import pytest
from cryptography import x509

from regmirror_api import contract, models
from regmirror_operator import publishing, rewriting, webhooking

TCR = "https://quay.tencentcloudcr.com"
DIGEST = "sha256:" + "ab" * 32


def mirror(registry: str, url: str, *, rewrite: bool = True, name: str = "", **extra: Any) -> models.RegistryMirror:
    spec = {"registry": registry, "mirrors": [{"url": url, **extra}], "rewriteImages": rewrite}
    return models.parse_spec(name or f"rm-{registry}", spec)


RULES = rewriting.plan_rules([
    mirror("quay.io", TCR),
    mirror("docker.io", "https://mirror.gcr.io"),
    mirror("registry.example.com:5000", "https://harbor.example.com/v2/example-proxy/", overridePath=True),
    mirror("ghcr.io", "https://ghcr.example.com", rewrite=False),
])


def pod(*containers: dict[str, Any], init: tuple[dict[str, Any], ...] = (), annotations: dict[str, str] | None = None,
        ephemeral: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "apps"}
    if annotations is not None:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {"containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    if ephemeral:
        spec["ephemeralContainers"] = list(ephemeral)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def patched(body: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    result = copy.deepcopy(body)
    rewriting.apply_patch(result, ops)
    return result


# --- the spec field -------------------------------------------------------------------------------------------


def test_rewrite_images_is_left_out_of_the_published_spec_when_off() -> None:
    spec = {"registry": "quay.io", "mirrors": [{"url": TCR}]}
    assert models.parse_spec("a", spec).to_spec() == spec
    assert models.parse_spec("a", {**spec, "rewriteImages": False}).to_spec() == spec
    on = models.parse_spec("a", {**spec, "rewriteImages": True})
    assert on.rewrite_images and on.to_spec() == {**spec, "rewriteImages": True}
    assert contract.Entry("a", 1, on.to_spec(), {}).mirror() == dataclasses.replace(on, generation=1)


@pytest.mark.parametrize(("spec", "words"), [
    ({"registry": "quay.io", "mirrors": [TCR], "rewriteImages": "yes"}, "must be true or false, got 'yes'"),
    ({"registry": "*", "mirrors": [TCR], "rewriteImages": True}, 'cannot rewrite the images of "*"'),
    ({"registry": "quay.io", "mirrors": ["https://mirror.example.com/quay"], "rewriteImages": True},
     "'https://mirror.example.com/quay' serves no image name"),
    ({"registry": "quay.io", "mirrors": [{"url": "https://h.example.com/v2/Quay", "overridePath": True}],
      "rewriteImages": True}, "serves no image name"),
])
def test_a_rewrite_no_image_name_can_express_is_refused(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(models.InvalidSpec) as caught:
        models.parse_spec("a", spec)
    assert any(words in p for p in caught.value.problems), caught.value.problems


def test_a_mirror_path_without_rewrite_stays_valid() -> None:
    models.parse_spec("a", {"registry": "quay.io", "mirrors": ["https://mirror.example.com/quay"]})


@pytest.mark.parametrize(("url", "override", "prefix"), [
    ("https://quay.tencentcloudcr.com", False, "quay.tencentcloudcr.com"),
    ("https://Mirror.Example.com:8443/", False, "mirror.example.com:8443"),
    ("http://127.0.0.1:5000", False, "127.0.0.1:5000"),
    ("https://harbor.example.com/v2/quay-proxy", True, "harbor.example.com/quay-proxy"),
    ("https://harbor.example.com/v2/team/quay-proxy/", True, "harbor.example.com/team/quay-proxy"),
    ("https://harbor.example.com/v2/quay-proxy", False, None),
    ("https://harbor.example.com/quay-proxy", True, None),
])
def test_image_prefix_is_the_name_that_reaches_the_mirror_url(url: str, override: bool, prefix: str | None) -> None:
    assert models.image_prefix(models.Mirror(url, override_path=override)) == prefix


# --- names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "new"), [
    ("quay.io/x/y:1", "quay.tencentcloudcr.com/x/y:1"),
    ("quay.io/x/y", "quay.tencentcloudcr.com/x/y"),
    (f"quay.io/x/y@{DIGEST}", f"quay.tencentcloudcr.com/x/y@{DIGEST}"),
    (f"quay.io/x/y:1@{DIGEST}", f"quay.tencentcloudcr.com/x/y:1@{DIGEST}"),
    ("quay.io/k8scsi/csi-resizer:v0.5.0", "quay.tencentcloudcr.com/k8scsi/csi-resizer:v0.5.0"),
    ("QUAY.IO/x/y:1", "quay.tencentcloudcr.com/x/y:1"),
    # Docker Hub: short names spelt out, its aliases are Docker Hub too
    ("nginx", "mirror.gcr.io/library/nginx"),
    ("nginx:1.25", "mirror.gcr.io/library/nginx:1.25"),
    (f"nginx@{DIGEST}", f"mirror.gcr.io/library/nginx@{DIGEST}"),
    ("bitnami/redis:7", "mirror.gcr.io/bitnami/redis:7"),
    ("docker.io/nginx", "mirror.gcr.io/library/nginx"),
    ("docker.io/library/nginx:1.25", "mirror.gcr.io/library/nginx:1.25"),
    ("index.docker.io/library/nginx", "mirror.gcr.io/library/nginx"),
    ("registry-1.docker.io/bitnami/redis", "mirror.gcr.io/bitnami/redis"),
    # a port in the registry's name, a mirror with a path
    ("registry.example.com:5000/team/app:2", "harbor.example.com/example-proxy/team/app:2"),
])
def test_images_of_an_opted_in_registry_get_the_mirrors_name(image: str, new: str) -> None:
    assert rewriting.rewrite_image(image, RULES) == new


@pytest.mark.parametrize("image", [
    "ghcr.io/x/y:1",                      # its RegistryMirror did not opt in
    "registry.example.com/team/app:2",    # another port is another registry
    "registry.example.com:5001/team/app",
    "quay.tencentcloudcr.com/x/y:1",      # already on a mirror
    "mirror.gcr.io/library/nginx",
    "localhost:5000/x",
    "localhost/x",
    "gcr.io/distroless/static",
    "", "Quay.io/X/Y", "quay.io/x//y", "quay.io/x/y:", "quay.io/x/y@sha256:short",  # not references
])
def test_other_images_are_left_alone(image: str) -> None:
    assert rewriting.rewrite_image(image, RULES) is None


def test_only_published_opted_in_mirrors_make_rules() -> None:
    assert [(r.registry, r.prefix) for r in RULES] == [
        ("docker.io", "mirror.gcr.io"), ("quay.io", "quay.tencentcloudcr.com"),
        ("registry.example.com:5000", "harbor.example.com/example-proxy")]
    desired = contract.render_desired([contract.Entry("q", 1, mirror("quay.io", TCR).to_spec(), {}),
                                       contract.Entry("g", 1, mirror("ghcr.io", TCR, rewrite=False).to_spec(), {})])
    book = rewriting.RuleBook()
    assert book.rules_for(None) == ()
    assert book.rules_for(desired) == (rewriting.Rule("q", "quay.io", "quay.tencentcloudcr.com"),)
    assert book.rules_for(None) == book.rules  # unknown for a moment: the last good rules stay


# --- the patch ------------------------------------------------------------------------------------------------


def test_containers_and_init_containers_are_renamed_and_the_pod_says_so() -> None:
    body = pod({"name": "app", "image": "quay.io/x/y:1"}, {"name": "sidecar", "image": "ghcr.io/a/b:2"},
               init=({"name": "setup", "image": "busybox:1.36"},))
    ops = rewriting.plan_pod(body, RULES)
    after = patched(body, ops)
    assert after["spec"]["containers"] == [{"name": "app", "image": "quay.tencentcloudcr.com/x/y:1"},
                                           {"name": "sidecar", "image": "ghcr.io/a/b:2"}]
    assert after["spec"]["initContainers"] == [{"name": "setup", "image": "mirror.gcr.io/library/busybox:1.36"}]
    assert json.loads(after["metadata"]["annotations"][rewriting.ANNOTATION]) == {
        "app": "quay.io/x/y:1 -> quay.tencentcloudcr.com/x/y:1",
        "setup": "busybox:1.36 -> mirror.gcr.io/library/busybox:1.36"}
    assert ops[:2] == [{"op": "replace", "path": "/spec/initContainers/0/image",
                        "value": "mirror.gcr.io/library/busybox:1.36"},
                       {"op": "replace", "path": "/spec/containers/0/image", "value": "quay.tencentcloudcr.com/x/y:1"}]
    assert ops[2] == {"op": "add", "path": "/metadata/annotations",
                      "value": {rewriting.ANNOTATION: after["metadata"]["annotations"][rewriting.ANNOTATION]}}


def test_existing_annotations_are_kept() -> None:
    body = pod({"name": "app", "image": "quay.io/x/y:1"}, annotations={"team": "a"})
    ops = rewriting.plan_pod(body, RULES)
    assert ops[-1]["path"] == "/metadata/annotations/regmirror.io~1rewritten-images"
    assert set(patched(body, ops)["metadata"]["annotations"]) == {"team", rewriting.ANNOTATION}


def test_ephemeral_containers_in_a_new_pod_are_renamed() -> None:
    body = pod({"name": "app", "image": "ghcr.io/a/b"}, ephemeral=({"name": "debug", "image": "quay.io/x/tools"},))
    after = patched(body, rewriting.plan_pod(body, RULES))
    assert after["spec"]["ephemeralContainers"][0]["image"] == "quay.tencentcloudcr.com/x/tools"


def test_kubectl_debug_renames_only_the_ephemeral_container_it_adds() -> None:
    old = pod({"name": "app", "image": "quay.io/x/y:1"}, ephemeral=({"name": "debug-1", "image": "quay.io/x/t"},))
    new = pod({"name": "app", "image": "quay.io/x/y:1"}, ephemeral=({"name": "debug-1", "image": "quay.io/x/t"},
                                                                    {"name": "debug-2", "image": "busybox"}))
    ops = rewriting.plan_ephemeral(new, old, RULES)
    assert ops == [{"op": "replace", "path": "/spec/ephemeralContainers/1/image",
                    "value": "mirror.gcr.io/library/busybox"}]


@pytest.mark.parametrize("body", [
    pod({"name": "app", "image": "quay.io/x/y:1", "imagePullPolicy": "Never"}),
    pod({"name": "app", "image": "quay.io/x/y:1"}, annotations={rewriting.MIRROR_POD_ANNOTATION: "abc"}),
    pod({"name": "app", "image": "quay.tencentcloudcr.com/x/y:1"}),
    pod({"name": "app"}),
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"}},
], ids=["pull-policy-never", "mirror-pod", "already-on-the-mirror", "no-image", "no-spec"])
def test_pods_that_must_not_change_get_no_patch(body: dict[str, Any]) -> None:
    assert rewriting.plan_pod(body, RULES) == []


def test_never_is_per_container() -> None:
    body = pod({"name": "local", "image": "quay.io/x/y:1", "imagePullPolicy": "Never"},
               {"name": "app", "image": "quay.io/x/y:1", "imagePullPolicy": "IfNotPresent"})
    assert [op["path"] for op in rewriting.plan_pod(body, RULES)] == [
        "/spec/containers/1/image", "/metadata/annotations"]


def test_a_rewritten_pod_is_not_rewritten_again() -> None:
    body = pod({"name": "app", "image": "quay.io/x/y:1"})
    once = patched(body, rewriting.plan_pod(body, RULES))
    assert rewriting.plan_pod(once, RULES) == []


def test_no_rules_no_patch() -> None:
    assert rewriting.plan_pod(pod({"name": "app", "image": "quay.io/x/y:1"}), ()) == []


# --- the webhook's plumbing ------------------------------------------------------------------------------------


def test_the_webhook_is_off_unless_asked_and_bad_settings_stop_the_start() -> None:
    assert webhooking.Settings.from_environment({}) == webhooking.Settings()
    assert not webhooking.Settings().enabled
    on = webhooking.Settings.from_environment({"REGMIRROR_WEBHOOK": "on", "REGMIRROR_WEBHOOK_PORT": "9555",
                                               "REGMIRROR_WEBHOOK_URL": "https://127.0.0.1:9555/"})
    assert (on.enabled, on.port, on.url) == (True, 9555, "https://127.0.0.1:9555")
    for env in ({"REGMIRROR_WEBHOOK": "yes"}, {"REGMIRROR_WEBHOOK_PORT": "0"}, {"REGMIRROR_WEBHOOK_SERVICE": "x"},
                {"REGMIRROR_WEBHOOK_URL": "http://127.0.0.1:1"}):
        with pytest.raises(ValueError, match=next(iter(env))):
            webhooking.Settings.from_environment(env)


def test_the_certificate_names_the_service_and_the_url_host() -> None:
    settings = webhooking.Settings(url="https://127.0.0.1:9443")
    cert_pem, key_pem = webhooking.build_certificate(settings.hostnames(),
                                                     now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = "regmirror-operator-webhook.regmirror-system.svc"
    assert sans.get_values_for_type(x509.DNSName) == [service, f"{service}.cluster.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in key_pem


def test_the_configuration_patch_sets_only_the_client_config() -> None:
    service = webhooking.render_configuration_patch(webhooking.Settings(), b"CA")
    assert service["webhooks"][0] == {"name": "rewrite-ephemeral-images.regmirror.io", "clientConfig": {
        "service": {"namespace": "regmirror-system", "name": "regmirror-operator-webhook", "port": 443,
                    "path": "/rewrite-ephemeral-images"}, "url": None, "caBundle": "Q0E="}}
    url = webhooking.render_configuration_patch(webhooking.Settings(url="https://127.0.0.1:9443"), b"CA")
    assert url["webhooks"][1]["clientConfig"] == {"url": "https://127.0.0.1:9443/rewrite-images", "service": None,
                                                  "caBundle": "Q0E="}
    current = {"webhooks": [{"name": w["name"], "timeoutSeconds": 3,
                             "clientConfig": {k: v for k, v in w["clientConfig"].items() if v is not None}}
                            for w in url["webhooks"]]}
    assert webhooking.configured(current, url)
    assert not webhooking.configured(current, service)
    current["webhooks"][0]["clientConfig"]["caBundle"] = "b2xk"
    assert not webhooking.configured(current, url)


class FakePublisher:
    """``publishing.Publisher.request`` answering from one stored configuration (None: it does not exist)."""

    def __init__(self, configuration: dict[str, Any] | None) -> None:
        self.configuration = configuration
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, *, body: Any = None, content_type: str = "") -> Any:
        self.calls.append((method, content_type))
        if self.configuration is None:
            raise publishing.ApiError(404, method, path, "not found")
        if method == "PATCH":
            for webhook in body["webhooks"]:
                have = next(w for w in self.configuration["webhooks"] if w["name"] == webhook["name"])
                config = {**have["clientConfig"], **webhook["clientConfig"]}
                have["clientConfig"] = {k: v for k, v in config.items() if v is not None}
        return copy.deepcopy(self.configuration)


def run_once(publisher: FakePublisher, settings: webhooking.Settings) -> None:
    """One pass of keep_configured: it then sleeps for settings.resync, and is cancelled."""
    async def once() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(webhooking.keep_configured(publisher, settings, b"CA"), timeout=0.2)
    asyncio.run(once())


def test_the_operator_patches_the_installed_configuration_once_and_then_only_reads_it() -> None:
    installed = {"webhooks": [{"name": name, "timeoutSeconds": 3, "clientConfig": {"service": {"name": "x"}}}
                              for name in webhooking.WEBHOOKS.values()]}
    publisher = FakePublisher(installed)
    settings = webhooking.Settings(url="https://127.0.0.1:9443")
    run_once(publisher, settings)
    assert publisher.calls == [("GET", ""), ("PATCH", webhooking.STRATEGIC_MERGE_PATCH)]
    assert all(w["clientConfig"] == {"url": f"https://127.0.0.1:9443/{w['name'].split('.')[0]}", "caBundle": "Q0E="}
               and w["timeoutSeconds"] == 3 for w in installed["webhooks"])
    publisher.calls.clear()
    run_once(publisher, settings)
    assert publisher.calls == [("GET", "")]


def test_a_missing_configuration_is_logged_with_how_to_install_it(caplog: pytest.LogCaptureFixture) -> None:
    run_once(FakePublisher(None), webhooking.Settings())
    assert "kubectl apply --server-side -k manifests/image-rewrite" in caplog.text
