"""The one module that talks to the Kubernetes API server (besides kopf's own watching).

Requests go through the official ``kubernetes`` client's ``ApiClient`` (authentication, TLS,
in-cluster or kubeconfig configuration), with plain dicts as bodies so child objects are
written exactly as the pure builders made them. Every call is blocking; the handlers run
them in worker threads.

Conventions: create answers 409 AlreadyExists when the object exists (deterministic names
make creation idempotent); status is written with JSON merge patches on the ``status``
subresource (never ``spec``), retried on 409 Conflict; deletions propagate in the
background so a Job's pods go with it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from kubetune_operator.api import API_VERSION, GROUP, VERSION
from kubetune_operator.controller.observe import format_time
from kubetune_operator.controller.reconcile import EventSpec
from kubetune_operator.controller.tokens import KEY_BYTES, new_key

log = logging.getLogger(__name__)

PLURALS = {
    "FineTuneJob": "finetunejobs",
    "EvalJob": "evaljobs",
    "AdapterDeployment": "adapterdeployments",
}
CORE = {"ConfigMap": "configmaps", "Secret": "secrets", "Service": "services", "Event": "events"}
MERGE_PATCH = "application/merge-patch+json"
CONFLICT_RETRIES = 5


class KubeError(Exception):
    """A failed API request: HTTP status, the Status reason token and its message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def configuration(server: str | None) -> k8s.Configuration:
    """Client configuration: ``server`` (no credentials), else in-cluster, else kubeconfig."""
    if server:
        conf = k8s.Configuration(host=server)
    else:
        conf = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=conf)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=conf)
    conf.connection_pool_maxsize = 32
    return conf


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    """``/api/v1/namespaces/<ns>/<plural>`` or ``/apis/<group>/<version>/...`` for a resource."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"


def _plural(kind: str) -> str:
    if kind in PLURALS:
        return PLURALS[kind]
    if kind in CORE:
        return CORE[kind]
    if kind == "Job":
        return "jobs"
    if kind == "Deployment":
        return "deployments"
    raise ValueError(f"unknown kind {kind}")


def _key_of(secret: dict[str, Any], namespace: str, name: str) -> bytes:
    """The ``key`` entry of a Secret as bytes (``data`` is base64; ``stringData`` is text)."""
    encoded = (secret.get("data") or {}).get("key")
    if encoded is not None:
        key = base64.b64decode(encoded)
    else:
        key = str((secret.get("stringData") or {}).get("key") or "").encode()
    if len(key) < KEY_BYTES:
        raise KubeError(
            422,
            "Invalid",
            f"Secret {namespace}/{name} needs a key 'key' of at least {KEY_BYTES} bytes",
        )
    return key


@dataclass
class Kube:
    """Blocking API operations the reconciler needs, and nothing more."""

    api: k8s.ApiClient
    field_manager: str

    @classmethod
    def connect(cls, server: str | None, field_manager: str) -> Kube:
        """A client for ``server`` (or the in-cluster / kubeconfig cluster)."""
        return cls(k8s.ApiClient(configuration(server)), field_manager)

    def close(self) -> None:
        """Release the connection pool."""
        self.api.close()

    # ---------------------------------------------------------------------- plumbing

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One request; the decoded JSON answer. Raises :class:`KubeError` on non-2xx."""
        params = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(*params, _request_timeout=30)
            response.read()
        except k8s.ApiException as exc:  # the REST layer raises on some transport errors
            raise KubeError(exc.status or 0, exc.reason or "Error", str(exc.body or "")) from exc
        data = response.data or b"{}"
        decoded: dict[str, Any] = json.loads(data) if data else {}
        if not 200 <= response.status < 300:
            raise KubeError(
                response.status,
                str(decoded.get("reason") or response.reason or "Error"),
                str(decoded.get("message") or ""),
            )
        return decoded

    # ---------------------------------------------------------------------- children

    def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when it already exists (409 AlreadyExists)."""
        meta = obj["metadata"]
        path = collection_path(obj["apiVersion"], _plural(obj["kind"]), meta.get("namespace"))
        try:
            self.request("POST", path, query={"fieldManager": self.field_manager}, body=obj)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def replace(self, obj: dict[str, Any]) -> None:
        """Replace ``obj`` (PUT, unconditional: no resourceVersion) with what was rendered.

        Fields the API server defaults (and allocates: a Service's clusterIP and node ports)
        are filled in again by it; the operator owns these children entirely.
        """
        meta = obj["metadata"]
        path = collection_path(obj["apiVersion"], _plural(obj["kind"]), meta.get("namespace"))
        self.request(
            "PUT", f"{path}/{meta['name']}", query={"fieldManager": self.field_manager}, body=obj
        )

    def ensure_progress_secret(
        self,
        namespace: str,
        name: str,
        token: str,
        labels: dict[str, str],
        owner: dict[str, Any],
    ) -> None:
        """Create the per-job progress token Secret (key ``token``) unless it exists.

        ``token`` is deterministic (:func:`tokens.progress_token`), so an existing Secret
        (409 AlreadyExists) already holds the same value; it is never read.
        """
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [owner],
            },
            "stringData": {"token": token},
        }
        self.create(secret)

    def progress_key(self, namespace: str, name: str, labels: dict[str, str]) -> bytes:
        """The operator's progress key: Secret ``namespace/name`` (key ``key``), made if absent.

        The only Secret the operator ever reads, in its own namespace. A missing Secret is
        created with a fresh random key; when another operator created it meanwhile (409),
        that one is read back.

        Raises:
            KubeError: the API refused, or the Secret exists without a usable ``key`` (at
                least :data:`tokens.KEY_BYTES` bytes).
        """
        path = f"{collection_path('v1', 'secrets', namespace)}/{name}"
        for _ in range(2):
            try:
                found = self.request("GET", path)
            except KubeError as exc:
                if exc.status != 404:
                    raise
            else:
                return _key_of(found, namespace, name)
            key = new_key()
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "data": {"key": base64.b64encode(key).decode()},
            }
            if self.create(secret):
                log.info("created the progress key Secret %s/%s", namespace, name)
                return key
        raise KubeError(409, "Conflict", f"Secret {namespace}/{name} keeps vanishing")

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The batch Job, or None when it does not exist."""
        try:
            return self.request("GET", f"{collection_path('batch/v1', 'jobs', namespace)}/{name}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def get_resource(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One of our resources as stored now (not a cache), or None when it is gone."""
        path = f"{collection_path(API_VERSION, PLURALS[kind], namespace)}/{name}"
        try:
            return self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The pods of a Job, read from the API server (not a cache)."""
        listing = self.request(
            "GET",
            collection_path("v1", "pods", namespace),
            query={"labelSelector": f"batch.kubernetes.io/job-name={job_name}"},
        )
        items: list[dict[str, Any]] = listing.get("items") or []
        return items

    def delete(self, api_version: str, plural: str, namespace: str, name: str) -> None:
        """Delete one object (background propagation); absent objects are fine."""
        path = f"{collection_path(api_version, plural, namespace)}/{name}"
        try:
            self.request(
                "DELETE",
                path,
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
            )
        except KubeError as exc:
            if exc.status != 404:
                raise

    def delete_run(self, namespace: str, job_name: str) -> None:
        """Delete a run's Job (its pods follow) and its RunConfig ConfigMap."""
        self.delete("batch/v1", "jobs", namespace, job_name)
        self.delete("v1", "configmaps", namespace, job_name)

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        """Suspend or resume a Job (``spec.suspend``)."""
        self.request(
            "PATCH",
            f"{collection_path('batch/v1', 'jobs', namespace)}/{name}",
            query={"fieldManager": self.field_manager},
            body={"spec": {"suspend": suspend}},
            content_type=MERGE_PATCH,
        )

    def cleanup(self, namespace: str, kind: str, name: str, uid: str) -> int:
        """Delete the run's children (Jobs last); returns how many were deleted.

        ConfigMaps, Services and Jobs are found by label. Secrets are left alone: listing
        them would return every Secret's data (RBAC would have to let the operator read them
        all), and the progress token Secret is owned by the resource, so garbage collection
        deletes it with the resource.
        """
        deleted = 0
        selector = f"{GROUP}/{kind.lower()}={name}"
        for api_version, plural in (
            ("v1", "configmaps"),
            ("v1", "services"),
            ("batch/v1", "jobs"),
        ):
            listing = self.request(
                "GET",
                collection_path(api_version, plural, namespace),
                query={"labelSelector": selector},
            )
            for item in listing.get("items") or []:
                owners = item.get("metadata", {}).get("ownerReferences") or []
                if any(o.get("uid") == uid for o in owners):
                    self.delete(api_version, plural, namespace, item["metadata"]["name"])
                    deleted += 1
        return deleted

    # ---------------------------------------------------------------------- the resource

    def patch_status(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch ``status`` (the status subresource); retried on 409 Conflict.

        Returns the object as stored after the patch. A 404 (the resource is gone) raises.
        """
        path = f"{collection_path(API_VERSION, PLURALS[kind], namespace)}/{name}/status"
        for attempt in range(CONFLICT_RETRIES):
            try:
                return self.request(
                    "PATCH",
                    path,
                    query={"fieldManager": self.field_manager},
                    body={"status": patch},
                    content_type=MERGE_PATCH,
                )
            except KubeError as exc:
                if exc.status != 409 or attempt == CONFLICT_RETRIES - 1:
                    raise
                log.info("status of %s %s/%s conflicted; retrying", kind, namespace, name)
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def post_event(self, owner: dict[str, Any], event: EventSpec, component: str) -> None:
        """Post a core/v1 Event about ``owner`` (a resource body); failures are only logged."""
        meta = owner["metadata"]
        now = format_time(datetime.now(UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": owner["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", collection_path("v1", "events", meta["namespace"]), body=body)
        except KubeError as exc:
            log.warning(
                "could not post event %s for %s/%s: %s",
                event.reason,
                meta["namespace"],
                meta["name"],
                exc,
            )


__all__ = ["GROUP", "VERSION", "Kube", "KubeError", "collection_path", "configuration"]
