"""EvalJob -> its child objects (pure)."""

from __future__ import annotations

from typing import Any

from kubetune_operator.api.common import BaseModelSpec
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.manifests.jobs import build_run_objects
from kubetune_operator.render import render_eval
from kubetune_runtime.config import AdapterRef


def build(
    job: EvalJob,
    settings: OperatorSettings,
    *,
    adapter: AdapterRef,
    base_model: BaseModelSpec,
) -> list[dict[str, Any]]:
    """ConfigMap with the RunConfig and the evaluation Job, for a resolved adapter and base."""
    config = render_eval(job, adapter=adapter, base_model=base_model)
    return build_run_objects(job, config, settings, resolved=base_model)
