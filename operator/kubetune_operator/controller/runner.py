"""Starting the operator: kopf settings, the HTTP server, and ``kopf.operator``.

Two ways in, same behaviour:

* ``kubetune operator`` calls :func:`run` (what the Helm chart's Deployment runs);
* ``kopf run -m kubetune_operator.controller.kopf_entry`` registers the same handlers on
  kopf's default registry, configured from ``KUBETUNE_*`` environment variables.

kopf's bookkeeping goes under our own prefix: handler progress and the last handled spec
are annotations ``kubetune.io/...`` (not ``kopf.zalando.org/...``); kopf's own Events are
off because the operator posts Events on condition transitions only. The operator runs
``standalone`` (no kopf peering objects, no heartbeat writes): run one replica with the
``Recreate`` strategy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import kopf
from aiohttp import web

from kubetune_operator.controller.config import ANNOTATION_PREFIX, ControllerSettings
from kubetune_operator.controller.handlers import Controller
from kubetune_operator.controller.http import serve

log = logging.getLogger(__name__)


def configure(kopf_settings: kopf.OperatorSettings, settings: ControllerSettings) -> None:
    """Apply our settings to kopf's (storage prefixes, timeouts, server-side selectors)."""
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    kopf_settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    kopf_settings.posting.enabled = False
    kopf_settings.peering.standalone = True
    kopf_settings.watching.server_timeout = settings.watch_server_timeout_seconds
    kopf_settings.watching.client_timeout = settings.watch_client_timeout_seconds
    kopf_settings.watching.connect_timeout = settings.watch_connect_timeout_seconds
    kopf_settings.watching.inactivity_timeout = settings.watch_inactivity_timeout_seconds
    managed = "app.kubernetes.io/managed-by=kubetune-operator"
    kopf_settings.watching.label_selectors["batch", "v1", "jobs"] = managed
    kopf_settings.watching.label_selectors["v1", "pods"] = managed
    serving = f"{managed},app.kubernetes.io/component=serving"
    kopf_settings.watching.label_selectors["apps", "v1", "deployments"] = serving
    kopf_settings.watching.label_selectors["v1", "configmaps"] = serving
    kopf_settings.watching.label_selectors["v1", "services"] = serving
    kopf_settings.execution.max_workers = settings.workers
    kopf_settings.networking.request_timeout = 60


def install(registry: kopf.OperatorRegistry, settings: ControllerSettings) -> Controller:
    """Register every handler, kopf's configuration and the HTTP server on ``registry``."""
    controller = Controller(settings)
    controller.register(registry)
    state: dict[str, Any] = {}

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, controller.settings)
        runner, port = await serve(
            controller, controller.settings.http_host, controller.settings.http_port
        )
        state["runner"] = runner
        state["port"] = port
        controller.http_port = port

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        runner: web.AppRunner | None = state.pop("runner", None)
        if runner is not None:
            await runner.cleanup()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if controller.settings.server:  # development and tests: a plain URL, no credentials
            return kopf.ConnectionInfo(server=controller.settings.server, insecure=True)
        # In-cluster service account or kubeconfig, as the official client resolves them.
        return kopf.login_via_client(**kwargs)

    log.info("kubetune operator settings: %s", settings.describe())
    return controller


async def run(
    settings: ControllerSettings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    controller_out: list[Controller] | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or a signal stops kopf)."""
    registry = kopf.OperatorRegistry()
    controller = install(registry, settings)
    if controller_out is not None:
        controller_out.append(controller)
    liveness = (
        f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None
    )
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
