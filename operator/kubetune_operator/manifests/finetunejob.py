"""FineTuneJob -> its child objects (pure)."""

from __future__ import annotations

from typing import Any

from kubetune_operator.api.finetunejob import FineTuneJob
from kubetune_operator.manifests.common import OperatorSettings, child_name
from kubetune_operator.manifests.jobs import PROGRESS_TOKEN_FILE, build_run_objects
from kubetune_operator.render import render_finetune


def progress_secret_name(job: FineTuneJob) -> str:
    """Name of the Secret holding the per-job progress token (the operator creates it)."""
    return child_name(job.metadata.name, "progress")


def build(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """ConfigMap with the RunConfig, (headless Service,) and the training Job, in apply order.

    With ``settings.progress_base_url`` the pod POSTs progress there, authenticated by the
    token in the Secret :func:`progress_secret_name` (mounted read-only into the pod).
    """
    namespace = job.metadata.namespace or "default"
    progress_url = (
        f"{settings.progress_base_url.rstrip('/')}/{namespace}/{job.metadata.name}"
        if settings.progress_base_url
        else None
    )
    config = render_finetune(
        job,
        progress_url=progress_url,
        progress_token_file=PROGRESS_TOKEN_FILE if progress_url else None,
    )
    return build_run_objects(
        job,
        config,
        settings,
        nodes=config.distributed.nodes,
        progress_secret=progress_secret_name(job) if progress_url else None,
    )
