"""Can this engine serve this adapter? The agent's checks before any load call.

The checks themselves are the builtin engine's (:mod:`kubetune_runtime.serving.compat`), so
every engine refuses the same adapters for the same reasons; this module maps a
ServingConfig onto them:

- the served base model's references are ``base_model.uri`` (with ``base_model.revision``
  appended to an ``hf://`` URI that pins none) and ``base_model.aliases``;
- rank, DoRA and ``modules_to_save`` limits come from ``engine``;
- the adapter directory is read without torch: ``adapter_config.json`` must be a JSON
  object and ``adapter_model.safetensors`` a well-formed safetensors file (pickled
  ``adapter_model.bin`` weights are never loaded).

Not checked here: whether ``target_modules`` exist in the base model, which needs the
model's module names. vLLM checks that when loading and its error is reported verbatim; the
builtin engine runs the full :func:`~kubetune_runtime.serving.compat.check_compatibility`.

Base-model rule (compat's): the adapter's claim is its manifest's ``baseModel`` (with
``baseRevision``); without one, ``adapter_config.json``'s ``base_model_name_or_path`` when it
is a URI or a Hub id (a trainer's local path proves nothing and is not checked). It matches
when it names the same model as a served reference (Hub ids case-insensitive, storage URIs
without trailing slashes) with revisions that agree where both pin one (a prefix, such as a
short commit sha, agrees).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetune_runtime.serving.compat import check_compatibility, read_adapter_dir
from kubetune_runtime.serving.config import BaseModelRef, EngineConfig

__all__ = ["adapter_problems", "served_references"]


def served_references(base: BaseModelRef) -> list[str]:
    """The names the served base model goes by, primary first (compat's ``base_model``).

    ``hf://org/name`` with ``revision: abc`` becomes ``hf://org/name@abc``; an ``@`` in the
    URI wins.
    """
    primary = base.uri.strip()
    if primary.lower().startswith("hf://") and "@" not in primary and base.revision:
        primary = f"{primary}@{base.revision}"
    return [primary, *base.aliases]


def adapter_problems(
    directory: Path,
    *,
    metadata: Mapping[str, Any],
    engine: EngineConfig,
    base: BaseModelRef,
) -> list[str]:
    """Every reason this engine cannot serve the verified adapter in ``directory``.

    Args:
        directory: the verified artifact (``adapter_config.json``,
            ``adapter_model.safetensors``, ...).
        metadata: its manifest's ``metadata`` (``baseModel``, ``baseRevision``).
        engine: the engine's capacity and allowances.
        base: the served base model.

    Returns:
        One sentence per problem; ``[]`` when nothing speaks against loading it.
    """
    files = read_adapter_dir(directory)
    if files.problems:
        return list(files.problems)
    return check_compatibility(
        files.config,
        base_model=served_references(base),
        max_rank=engine.max_lora_rank,
        module_names=None,  # only the engine knows the model's modules
        allow_dora=engine.allow_dora,
        allow_modules_to_save=engine.allow_modules_to_save,
        metadata=metadata,
    )
