"""The image-rewrite webhook's plumbing: its settings, its certificate, and its MutatingWebhookConfiguration.

Off unless ``REGMIRROR_WEBHOOK=on``. When on, kopf serves the admission handlers of ``main`` over HTTPS on
``REGMIRROR_WEBHOOK_PORT`` (9443), with a self-signed certificate made at start (the key never leaves the
process's temporary folder), and the operator writes that certificate into the ``caBundle`` of the
MutatingWebhookConfiguration the install ships (``manifests/image-rewrite/``), and writes nothing else there.

Why not kopf's own managed configuration (``settings.admission.managed``): kopf writes every field of the
webhooks it manages, with ``timeoutSeconds: 30`` and no ``namespaceSelector``. A webhook on Pods must answer
within a few seconds or be skipped, and the user decides which namespaces it sees; so the install owns the
configuration (rules, selectors, ``failurePolicy: Ignore``, ``timeoutSeconds``) and the operator owns only its
``clientConfig``, by a strategic merge patch keyed on each webhook's name. That also keeps RBAC narrow: the
operator may get and patch that one object, never create one.

The apiserver reaches the operator (a hostNetwork Pod) through the Service ``REGMIRROR_WEBHOOK_SERVICE``, or at
``REGMIRROR_WEBHOOK_URL`` when that is set (tests, where the apiserver calls loopback).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import ipaddress
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from regmirror_operator import publishing

log = logging.getLogger("regmirror.operator")

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
CONFIGURATIONS_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
#: Handler id (kopf serves it at ``/<id>``) -> the webhook's name in the configuration.
WEBHOOKS = {"rewrite-images": "rewrite-images.regmirror.io",
            "rewrite-ephemeral-images": "rewrite-ephemeral-images.regmirror.io"}
CERTIFICATE_DAYS = 3650


@dataclasses.dataclass(frozen=True)
class Settings:
    """Read once from the environment (:meth:`from_environment`)."""

    enabled: bool = False
    """``REGMIRROR_WEBHOOK``: ``on`` serves the webhook; ``off`` (the default) registers no admission handler."""
    address: str = "0.0.0.0"
    """``REGMIRROR_WEBHOOK_ADDRESS``: where to listen."""
    port: int = 9443
    """``REGMIRROR_WEBHOOK_PORT``: the HTTPS port, on the node's network (the Service's targetPort)."""
    configuration: str = "regmirror-image-rewrite"
    """``REGMIRROR_WEBHOOK_CONFIGURATION``: the MutatingWebhookConfiguration whose clientConfig the operator sets."""
    service: str = "regmirror-system/regmirror-operator-webhook"
    """``REGMIRROR_WEBHOOK_SERVICE``: ``namespace/name`` of the Service (port 443) the apiserver calls."""
    url: str = ""
    """``REGMIRROR_WEBHOOK_URL``: call this base URL instead of the Service (``https://127.0.0.1:9443``)."""
    resync: float = 60.0
    """Seconds between checks that the configuration still holds this process's certificate."""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Settings:
        mode = env.get("REGMIRROR_WEBHOOK", "off").strip().lower()
        if mode not in ("on", "off", ""):
            raise ValueError(f"REGMIRROR_WEBHOOK={mode!r}: expected on or off")
        port_text = env.get("REGMIRROR_WEBHOOK_PORT", "") or str(cls.port)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"REGMIRROR_WEBHOOK_PORT={port_text!r}: expected a port 1-65535")
        service = env.get("REGMIRROR_WEBHOOK_SERVICE", "") or cls.service
        if service.count("/") != 1 or not all(service.split("/")):
            raise ValueError(f"REGMIRROR_WEBHOOK_SERVICE={service!r}: expected namespace/name")
        url = env.get("REGMIRROR_WEBHOOK_URL", "").rstrip("/")
        if url and (urlsplit(url).scheme != "https" or not urlsplit(url).hostname):
            raise ValueError(f"REGMIRROR_WEBHOOK_URL={url!r}: expected https://host[:port][/path]")
        return cls(enabled=mode == "on", address=env.get("REGMIRROR_WEBHOOK_ADDRESS", "") or cls.address,
                   port=int(port_text), configuration=env.get("REGMIRROR_WEBHOOK_CONFIGURATION", "")
                   or cls.configuration, service=service, url=url)

    def hostnames(self) -> list[str]:
        """The names the apiserver checks the certificate against: ``<service>.<namespace>.svc``, the URL's host."""
        namespace, name = self.service.split("/")
        names = [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
        host = urlsplit(self.url).hostname if self.url else None
        return [*names, host] if host else names


def build_certificate(hostnames: list[str], *, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) for ``hostnames`` and its private key (PEM): the caBundle is the
    certificate itself. IP addresses become IP SANs, the rest DNS SANs (Go's verifier reads no common name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_certificate(settings: Settings) -> tuple[Path, Path, bytes]:
    """Make the certificate and write it and its key to a fresh private folder; returns (cert, key, caBundle)."""
    cert, key = build_certificate(settings.hostnames(), now=datetime.datetime.now(datetime.UTC))
    folder = Path(tempfile.mkdtemp(prefix="regmirror-webhook-"))  # mode 0700
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key)
    cert_path.write_bytes(cert)
    return cert_path, key_path, cert


def render_configuration_patch(settings: Settings, ca_bundle: bytes) -> dict[str, Any]:
    """The strategic merge patch that points each webhook at this process. A webhook the configuration lacks
    makes the apiserver refuse the patch (it would have no rules or selectors): the install owns those."""
    ca = base64.b64encode(ca_bundle).decode()
    webhooks = []
    for handler_id, name in sorted(WEBHOOKS.items()):
        if settings.url:
            client: dict[str, Any] = {"url": f"{settings.url}/{handler_id}", "service": None}
        else:
            namespace, service = settings.service.split("/")
            client = {"service": {"namespace": namespace, "name": service, "port": 443, "path": f"/{handler_id}"},
                      "url": None}
        webhooks.append({"name": name, "clientConfig": {**client, "caBundle": ca}})
    return {"webhooks": webhooks}


def configured(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether ``current`` (the configuration as read) already holds every clientConfig of ``patch``."""
    have = {w.get("name"): w.get("clientConfig") or {} for w in current.get("webhooks") or []}
    for webhook in patch["webhooks"]:
        config = have.get(webhook["name"])
        if config is None:
            return False
        for key, value in webhook["clientConfig"].items():
            if (value is None and key in config) or (value is not None and config.get(key) != value):
                return False
    return True


async def keep_configured(publisher: publishing.Publisher, settings: Settings, ca_bundle: bytes) -> None:
    """Point the configuration at this process now, and again whenever someone changed it back (a re-apply
    of the install with client-side apply, a restore from backup). Runs until cancelled."""
    path = f"{CONFIGURATIONS_PATH}/{settings.configuration}"
    patch = render_configuration_patch(settings, ca_bundle)
    failures = 0
    while True:
        try:
            current = await asyncio.to_thread(publisher.request, "GET", path)
            if not configured(current, patch):
                await asyncio.to_thread(publisher.request, "PATCH", path, body=patch,
                                        content_type=STRATEGIC_MERGE_PATCH)
                log.info("image rewrite: pointed MutatingWebhookConfiguration %s at this operator",
                         settings.configuration)
            failures = 0
        except publishing.ApiError as exc:
            failures += 1
            hint = (" (install it: kubectl apply --server-side -k manifests/image-rewrite)"
                    if exc.status == 404 else "")
            log.error("image rewrite: could not configure MutatingWebhookConfiguration %s%s: %s",
                      settings.configuration, hint, exc)
        await asyncio.sleep(min(settings.resync, 2.0 * 2 ** min(failures, 5)) if failures else settings.resync)
