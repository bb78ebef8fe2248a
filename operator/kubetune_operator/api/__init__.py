"""The kubetune.io/v1alpha1 API: FineTuneJob, EvalJob and AdapterDeployment as pydantic models.

These models are the single source of truth: `crds/` is generated from them and the operator
and `kubetune validate` parse resources with them. Schema modules import only pydantic and the
standard library.
"""

from kubetune_operator.api.adapterdeployment import AdapterDeployment, AdapterDeploymentSpec
from kubetune_operator.api.common import API_VERSION, CATEGORY, GROUP, VERSION, Condition
from kubetune_operator.api.evaljob import EvalJob, EvalJobSpec
from kubetune_operator.api.finetunejob import FineTuneJob, FineTuneJobSpec
from kubetune_operator.api.registry import KINDS, KindInfo

__all__ = [
    "API_VERSION",
    "CATEGORY",
    "GROUP",
    "KINDS",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "Condition",
    "EvalJob",
    "EvalJobSpec",
    "FineTuneJob",
    "FineTuneJobSpec",
    "KindInfo",
]
