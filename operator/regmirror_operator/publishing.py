"""Every API call the operator makes itself (kopf only watches): plain dicts in and out, blocking, one client.

The kubernetes client is used at its lowest level (``param_serialize`` + ``call_api``) so that bodies stay
plain JSON and the content type of each PATCH is chosen here, explicitly: the client's generated
``patch_namespaced_config_map`` would send ``application/json-patch+json`` by default, which a dict body does
not fit. Callers run these methods in a thread (``asyncio.to_thread``).

What the operator writes, and how:

- ConfigMap ``regmirror-system/regmirror-desired``: a JSON merge patch of ``data["desired.json"]`` only, and
  only when the bytes differ. It is never created: the install owns it (RBAC allows no ``create``); a
  missing one is an error to log and retry.
- ``registrymirrors/status``: JSON merge patches without a resourceVersion, naming only the fields that change.
- ``registrymirrornodes``: deleted (with a uid precondition) when their Node is gone, a fallback for clusters
  whose garbage collector does not run; nothing else. The agents write them.
- Events: ``core/v1`` Events in ``default`` with ``involvedObject.namespace`` empty, the convention for
  cluster-scoped objects (Node events look the same), so ``kubectl describe registrymirror`` lists them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.watch.watch import iter_resp_lines

from regmirror_api import contract, models

log = logging.getLogger("regmirror.operator")

MERGE_PATCH = "application/merge-patch+json"
#: Labels are metadata, so a metadata-only list of Nodes carries all the operator needs at a fraction of the
#: bytes of full Node objects (which hold images, conditions and addresses).
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
#: The same for watch events: each event's object is a PartialObjectMetadata.
METADATA_ONLY_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
MIRRORS_PATH = f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}"
CONFIGMAP_PATH = f"/api/v1/namespaces/{contract.NAMESPACE}/configmaps/{contract.CONFIGMAP}"
#: Events about cluster-scoped objects live in "default" (the apiserver refuses other namespaces for them).
EVENT_NAMESPACE = "default"
COMPONENT = "regmirror-operator"
LIST_CHUNK = 500


class ApiError(Exception):
    """A non-2xx answer from the apiserver; ``status`` is the HTTP code, 0 when it could not be reached."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account first, then ``$KUBECONFIG`` / ``~/.kube/config``: the order kopf logs in."""
    config = kubernetes.client.Configuration()
    config.keep_alive = True  # TCP keepalive finds a watch connection that died silently (see informing)
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    return config


class Publisher:
    """The operator's own API calls. ``timeout`` bounds each request, in seconds."""

    def __init__(self, api: kubernetes.client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api = api
        self.api.user_agent = COMPONENT
        self.timeout = timeout
        self.instance = os.environ.get("HOSTNAME") or socket.gethostname()

    @classmethod
    def from_environment(cls) -> Publisher:
        return cls(kubernetes.client.ApiClient(load_configuration()))

    def close(self) -> None:
        self.api.close()

    # --- plumbing ---------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                body: Any = None, content_type: str = "application/json",
                accept: str = "application/json") -> Any:
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        if body is not None and method != "DELETE":
            # The name managedFields show for what the operator owns (data["desired.json"], its status fields).
            query = [*(query or []), ("fieldManager", COMPONENT)]
        serialized = self.api.param_serialize(method=method, resource_path=path, query_params=query or [],
                                              header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(*serialized, _request_timeout=self.timeout)
            raw = response.read()
        except urllib3.exceptions.HTTPError as exc:  # unreachable, reset, timed out: an outage, not a bug
            raise ApiError(0, method, path, f"apiserver unreachable: {exc}") from exc
        if not 200 <= response.status < 300:
            try:
                message = json.loads(raw).get("message", "")
            except (ValueError, AttributeError):
                message = raw[:300].decode(errors="replace")
            raise ApiError(response.status, method, path, message)
        return json.loads(raw) if raw else None

    def list_all(self, path: str, *, accept: str = "application/json") -> tuple[list[dict[str, Any]], str]:
        """Every object, in pages of LIST_CHUNK, and the resourceVersion to watch from."""
        token = ""
        items: list[dict[str, Any]] = []
        while True:
            query = [("limit", str(LIST_CHUNK))] + ([("continue", token)] if token else [])
            page = self.request("GET", path, query=query, accept=accept)
            items += page.get("items") or []
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(self, path: str, version: str, *, timeout_seconds: int, read_timeout: float,
              accept: str = "application/json") -> Iterator[dict[str, Any]]:
        """Watch events from ``version`` with bookmarks, until the server ends the watch or it breaks."""
        query = [("watch", "true"), ("resourceVersion", version), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(timeout_seconds))]
        serialized = self.api.param_serialize(method="GET", resource_path=path, query_params=query,
                                              header_params={"Accept": accept}, auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(*serialized, _request_timeout=(10.0, read_timeout))
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, "WATCH", path, f"apiserver unreachable: {exc}") from exc
        raw = response.response
        try:
            if not 200 <= response.status < 300:
                data = raw.read()
                try:
                    message = json.loads(data).get("message", "")
                except (ValueError, AttributeError):
                    message = data[:300].decode(errors="replace")
                raise ApiError(response.status, "WATCH", path, message)
            for line in iter_resp_lines(raw):
                yield json.loads(line)
        finally:
            raw.release_conn()

    # --- reads ------------------------------------------------------------------------------------------

    def list_mirrors(self) -> list[dict[str, Any]]:
        return self.list_all(MIRRORS_PATH)[0]

    # --- writes -----------------------------------------------------------------------------------------

    def read_desired(self) -> str | None:
        """What ``data["desired.json"]`` holds now (None: nothing, or no ConfigMap)."""
        try:
            current = self.request("GET", CONFIGMAP_PATH)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        text = (current.get("data") or {}).get(contract.CONFIGMAP_KEY)
        return str(text) if text is not None else None

    def publish_desired(self, text: str) -> bool:
        """Make ``data["desired.json"]`` hold ``text``; True if it was written (False: already so).

        Raises ApiError 404 when the ConfigMap is missing: the operator never creates it.
        """
        current = self.request("GET", CONFIGMAP_PATH)
        if (current.get("data") or {}).get(contract.CONFIGMAP_KEY) == text:
            return False
        self.request("PATCH", CONFIGMAP_PATH, body={"data": {contract.CONFIGMAP_KEY: text}},
                     content_type=MERGE_PATCH)
        return True

    def patch_status(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a status merge patch; returns the object as the apiserver now has it."""
        result: dict[str, Any] = self.request("PATCH", f"{MIRRORS_PATH}/{name}/status", body=dict(patch),
                                              content_type=MERGE_PATCH)
        return result

    def set_restart_slot(self, node: str, value: str | None) -> str | None:
        """Give a node a restart slot, or take it back (``None``): the annotation
        ``contract.RESTART_SLOT_ANNOTATION`` on its Node, by merge patch, and nothing else on the Node (an admission
        policy holds the operator to that, manifests/operator-policy.yaml). A Node that is gone needs nothing.

        Returns the annotation as the apiserver stored it, from the patch's own answer: a later read may already
        see the next pass's change."""
        body = {"metadata": {"annotations": {contract.RESTART_SLOT_ANNOTATION: value}}}
        try:
            stored = self.request("PATCH", f"/api/v1/nodes/{node}", body=body, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status != 404:
                raise
            return None
        annotations = (stored.get("metadata") or {}).get("annotations") or {}
        return annotations.get(contract.RESTART_SLOT_ANNOTATION)

    def delete_node_report(self, name: str, uid: str) -> None:
        """Delete a RegistryMirrorNode, but only the one that was seen (a node that came back has a new one)."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        try:
            self.request("DELETE", f"{contract.NODE_REPORTS_PATH}/{name}", body=body)
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone already, or replaced by a new one: nothing to do
                raise

    def post_event(self, *, name: str, uid: str, type: str, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": EVENT_NAMESPACE},
            "involvedObject": {"apiVersion": f"{models.API_GROUP}/{models.API_VERSION}", "kind": models.KIND,
                               "name": name, "uid": uid},
            "type": type, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": self.instance[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        self.request("POST", f"/api/v1/namespaces/{EVENT_NAMESPACE}/events", body=event)
