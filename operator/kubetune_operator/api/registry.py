"""The three kinds of the kubetune.io API, with their names as the API server knows them.

Schema module: pydantic and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_operator.api.adapterdeployment import AdapterDeployment
from kubetune_operator.api.common import ApiModel
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.api.finetunejob import FineTuneJob


@dataclass(frozen=True)
class KindInfo:
    """Names of one kind: ``plural`` is the URL segment, ``short_names`` what kubectl accepts."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    model: type[ApiModel]
    summary_condition: str


KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo("FineTuneJob", "finetunejobs", "finetunejob", ("ftj",), FineTuneJob, "Succeeded"),
        KindInfo("EvalJob", "evaljobs", "evaljob", ("evj",), EvalJob, "Succeeded"),
        KindInfo(
            "AdapterDeployment",
            "adapterdeployments",
            "adapterdeployment",
            ("adep",),
            AdapterDeployment,
            "Ready",
        ),
    )
}
