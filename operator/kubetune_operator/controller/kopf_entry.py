"""Entry for ``kopf run -m kubetune_operator.controller.kopf_entry [--all-namespaces]``.

kopf's own command line imports a module that registers handlers on kopf's default
registry; this module does exactly that, with settings from ``KUBETUNE_*`` environment
variables. ``kubetune operator`` is the same operator without this import-time step.
"""

from __future__ import annotations

import os

import kopf

from kubetune_operator.controller.config import ControllerSettings
from kubetune_operator.controller.runner import install

CONTROLLER = install(kopf.get_default_registry(), ControllerSettings.from_env(os.environ))
