"""Can this base model serve this LoRA adapter? Pure checks, run before anything is attached.

The built-in engine (``serving.engine``) runs every check here before it attaches an adapter,
and answers a load request with all problems found (HTTP 400); the functions take plain data
(parsed JSON, module names, tensor shapes), so an agent can run the same checks without a model.

Base-model rule (:func:`base_model_problems`), the same one the adapter agent applies:

1. The adapter's *claim* is its manifest's ``baseModel`` (with ``baseRevision``), written by
   kubetune's trainer. Without a manifest claim, PEFT's ``base_model_name_or_path`` (with its
   ``revision``) is the claim when it is a URI or a Hub id (``org/name``), or a local path equal
   to one of the served model's references (e.g. the ``--model`` directory).
2. Any other local path in ``base_model_name_or_path`` is where some trainer had the model on
   its disk (a pod's download cache): it proves nothing, so no base-model claim is checked;
   the target-module and weight-shape checks still refuse an adapter made for a model of
   another shape.
3. A claim matches when it names the same model as one of the served references: the same
   ``org/name`` for Hub models (case-insensitive, ``hf://`` optional), the same URI for
   storage (trailing slashes ignored; ``file:///p`` and ``/p`` are the same), and revisions
   that agree when both sides pin one (one may be a prefix of the other, as a short commit
   sha is).

Other checks (:func:`check_compatibility`): PEFT type ``LORA`` and task ``CAUSAL_LM``; rank
``r`` and every ``rank_pattern`` value at most the engine's maximum; DoRA and
``modules_to_save`` / ``trainable_token_indices`` only where allowed; ``bias="none"`` (a bias
trained by an adapter would change the base layers that every adapter shares); no
``layer_replication``, ``target_parameters`` or activated-LoRA invocation tokens (these change
the base model or are not per-request); every listed target module present in the base.
:func:`check_lora_weights` compares the shapes in ``adapter_model.safetensors`` with the
base's layers, and :func:`read_adapter_dir` reads the files without torch.
"""

from __future__ import annotations

import json
import posixpath
import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlparse

__all__ = [
    "ADAPTER_CONFIG",
    "WEIGHTS_FILE",
    "AdapterFiles",
    "ModelIdentity",
    "base_model_problems",
    "check_compatibility",
    "check_lora_weights",
    "highest_rank",
    "model_identity",
    "read_adapter_dir",
]

ADAPTER_CONFIG: Final = "adapter_config.json"
WEIGHTS_FILE: Final = "adapter_model.safetensors"
PICKLED_WEIGHTS: Final = "adapter_model.bin"
_PEFT_PREFIX: Final = "base_model.model."
_HUB_ID_RE: Final = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SCHEME_RE: Final = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LORA_KEY_RE: Final = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_MAX_HEADER_BYTES: Final = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_MAX_LISTED: Final = 5


@dataclass(frozen=True)
class ModelIdentity:
    """A model reference in a comparable form.

    Attributes:
        kind: ``hf`` (a Hub repository), a storage scheme (``s3``, ``pvc``, ``gs``...),
            ``path`` (a local path; ``file://`` URIs become paths).
        ref: ``org/name`` in lower case for ``hf``; the URI or normalised absolute path
            without trailing slashes otherwise.
        revision: the pinned revision, if any.
    """

    kind: str
    ref: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf://{self.ref}" + (f"@{self.revision}" if self.revision else "")
        return self.ref


def model_identity(reference: str, revision: str | None = None) -> ModelIdentity:
    """Normalise a model URI, Hub id or local path.

    ``hf://Org/Name@rev`` and ``Org/Name`` with ``revision="rev"`` are the same identity;
    ``s3://b/k/`` and ``s3://b/k`` too; ``file:///data/m/`` and ``/data/m`` are both the path
    ``/data/m``. ``revision`` applies when the reference pins none.
    """
    text = reference.strip()
    match = _SCHEME_RE.match(text)
    if match is not None:
        scheme = match.group(1).lower()
        if scheme == "hf":
            repo, _, pinned = text[match.end() :].partition("@")
            return ModelIdentity("hf", repo.strip("/").lower(), pinned or revision or None)
        if scheme == "file":
            return ModelIdentity("path", _normal_path(unquote(urlparse(text).path)))
        return ModelIdentity(scheme, text.rstrip("/") or text)
    if _HUB_ID_RE.match(text) and not text.startswith((".", "~")):
        return ModelIdentity("hf", text.lower(), revision or None)
    return ModelIdentity("path", _normal_path(text))


def _normal_path(path: str) -> str:
    return posixpath.normpath(path) if path else path


def _revisions_agree(first: str | None, second: str | None) -> bool:
    if first is None or second is None:
        return True
    a, b = first.lower(), second.lower()
    return a.startswith(b) or b.startswith(a)


def _same_model(claim: ModelIdentity, served: ModelIdentity) -> bool:
    return (
        claim.kind == served.kind
        and claim.ref == served.ref
        and _revisions_agree(claim.revision, served.revision)
    )


def base_model_problems(
    adapter_config: Mapping[str, Any],
    *,
    base_model: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Problems with the base model the adapter names (the rule is in the module docstring).

    Args:
        adapter_config: the parsed ``adapter_config.json``.
        base_model: references naming the served base model, the primary one first: its
            URI (``hf://org/name[@rev]``, ``s3://...``), aliases, and its local directory.
        metadata: the adapter manifest's ``metadata`` object, if it has a manifest.

    Returns:
        ``[]`` when the claim matches or cannot be checked, else one sentence.
    """
    served = [model_identity(reference) for reference in base_model if reference.strip()]
    claim: ModelIdentity | None = None
    source = ""
    base = (metadata or {}).get("baseModel")
    if isinstance(base, str) and base.strip():
        revision = (metadata or {}).get("baseRevision")
        claim = model_identity(base, revision if isinstance(revision, str) else None)
        source = "the manifest's baseModel"
    else:
        name = adapter_config.get("base_model_name_or_path")
        if isinstance(name, str) and name.strip():
            revision = adapter_config.get("revision")
            claim = model_identity(name, revision if isinstance(revision, str) else None)
            source = "adapter_config.json's base_model_name_or_path"
            if claim.kind == "path" and not any(_same_model(claim, s) for s in served):
                claim = None  # a trainer's local download path proves nothing (rule 2)
    if claim is None or not served or any(_same_model(claim, s) for s in served):
        return []
    return [
        f"it was trained on {claim} ({source}), but this server serves {served[0]}; name that "
        "URI as an alias of the base model if they are the same weights"
    ]


def highest_rank(adapter_config: Mapping[str, Any]) -> int | None:
    """The highest LoRA rank in the adapter: ``r`` and every ``rank_pattern`` value.

    Returns:
        The rank, or ``None`` when ``r`` is missing or not a positive integer.
    """
    rank = adapter_config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return None
    pattern = adapter_config.get("rank_pattern") or {}
    ranks = [rank]
    if isinstance(pattern, Mapping):
        ranks += [v for v in pattern.values() if isinstance(v, int) and not isinstance(v, bool)]
    return max(ranks)


def _module_matches(full_name: str, target: str) -> bool:
    """PEFT's rule for a listed target: the full name, or a ``.``-separated suffix of it."""
    return full_name == target or full_name.endswith("." + target)


def _target_problems(targets: object, module_names: Collection[str]) -> list[str]:
    if isinstance(targets, str):
        if targets == "all-linear":
            return [] if module_names else ["the base model has no layers LoRA can adapt"]
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            return [f"target_modules {targets!r} is not a valid regular expression ({exc})"]
        if any(pattern.fullmatch(name) for name in module_names):
            return []
        return [f"target_modules {targets!r} matches no layer of the base model"]
    if isinstance(targets, list | tuple) and targets and all(isinstance(t, str) for t in targets):
        missing = sorted(t for t in targets if not any(_module_matches(n, t) for n in module_names))
        if not missing:
            return []
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in module_names})
        return [
            f"it targets modules the base model does not have: {_listed(missing)} (the base "
            f"model's adaptable modules are {_listed(suffixes)})"
        ]
    return ["adapter_config.json names no target_modules"]


def check_compatibility(
    adapter_config: Mapping[str, Any],
    *,
    base_model: Sequence[str],
    max_rank: int,
    module_names: Collection[str] | None,
    allow_dora: bool,
    allow_modules_to_save: bool,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Every reason the served base model cannot serve this adapter, one sentence each.

    Args:
        adapter_config: the parsed ``adapter_config.json`` (PEFT's ``LoraConfig`` as a dict).
        base_model: references naming the served base model, primary first (see
            :func:`base_model_problems`).
        max_rank: the highest rank accepted (``--max-lora-rank``).
        module_names: full names of the base model's layers LoRA can adapt (e.g.
            ``model.layers.0.self_attn.q_proj``); ``None`` skips the target-module check
            (a caller without the model, such as the adapter agent).
        allow_dora: whether DoRA adapters (``use_dora``) are served.
        allow_modules_to_save: whether adapters that carry whole modules
            (``modules_to_save``, ``trainable_token_indices``) are served.
        metadata: the adapter manifest's ``metadata`` (``baseModel``, ``baseRevision``).

    Returns:
        ``[]`` when nothing speaks against attaching it.
    """
    peft_type = adapter_config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        return [f"peft_type is {peft_type!r}; only LORA adapters are served"]
    problems: list[str] = []
    task_type = adapter_config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        problems.append(f"task_type is {task_type!r}; only CAUSAL_LM adapters are served")
    rank = highest_rank(adapter_config)
    if rank is None:
        problems.append("adapter_config.json has no valid rank r (a positive integer)")
    elif rank > max_rank:
        problems.append(
            f"its rank {rank} exceeds max_lora_rank {max_rank}; raise the engine's maximum "
            "rank or retrain with a lower r"
        )
    if adapter_config.get("use_dora") and not allow_dora:
        problems.append("it is a DoRA adapter (use_dora), which this engine does not serve")
    for key in ("modules_to_save", "trainable_token_indices"):
        if adapter_config.get(key) and not allow_modules_to_save:
            problems.append(
                f"it carries whole modules ({key}: {adapter_config.get(key)}), which this "
                "engine does not serve"
            )
    bias = adapter_config.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(
            f"bias is {bias!r}: it trained the base layers' biases, which every adapter "
            "shares; only bias 'none' is served"
        )
    for key, what in (
        ("layer_replication", "it replicates base layers (layer_replication)"),
        ("target_parameters", "it adapts parameters directly (target_parameters)"),
        ("alora_invocation_tokens", "it is an activated LoRA (alora_invocation_tokens)"),
    ):
        if adapter_config.get(key):
            problems.append(f"{what}, which is not served")
    if module_names is not None:
        problems += _target_problems(adapter_config.get("target_modules"), module_names)
    problems += base_model_problems(adapter_config, base_model=base_model, metadata=metadata)
    return problems


def check_lora_weights(
    shapes: Mapping[str, Sequence[int]],
    *,
    module_shapes: Mapping[str, tuple[int, int]],
) -> list[str]:
    """Compare the LoRA matrices' shapes with the base model's linear layers.

    Keys follow PEFT's saved layout, ``base_model.model.<module>.lora_A.weight`` with shape
    ``[r, in_features]`` and ``...lora_B.weight`` with shape ``[out_features, r]``. Keys of
    other kinds (DoRA magnitudes, embeddings, ``modules_to_save``) are left to PEFT.

    Args:
        shapes: tensor name -> shape, from ``adapter_model.safetensors``.
        module_shapes: full module name -> ``(in_features, out_features)`` of the base
            model's linear layers.

    Returns:
        One sentence per kind of problem (listing up to five modules each); ``[]`` if the
        weights fit.
    """
    pairs: dict[str, dict[str, Sequence[int]]] = {}
    for key, shape in shapes.items():
        match = _LORA_KEY_RE.match(key.removeprefix(_PEFT_PREFIX))
        if match is not None:
            pairs.setdefault(match["module"], {})[match["part"]] = shape
    if not pairs:
        return [f"{WEIGHTS_FILE} holds no LoRA weights (no lora_A / lora_B tensors)"]
    unknown: list[str] = []
    misfit: list[str] = []
    for module, parts in sorted(pairs.items()):
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            misfit.append(f"{module} (lora_A {_shape(a)}, lora_B {_shape(b)})")
            continue
        if module not in module_shapes:
            if not module.endswith(("embed_tokens", "wte", "word_embeddings")):
                unknown.append(module)
            continue
        in_features, out_features = module_shapes[module]
        if a[1] != in_features or b[0] != out_features:
            misfit.append(
                f"{module} (adapter {a[1]} -> {b[0]}, base layer {in_features} -> {out_features})"
            )
    problems = []
    if unknown:
        problems.append(
            f"its weights adapt layers the base model does not have: {_listed(unknown)}"
        )
    if misfit:
        problems.append(f"its weights do not fit the base model's layers: {_listed(misfit)}")
    return problems


def _shape(shape: Sequence[int] | None) -> str:
    return "missing" if shape is None else "x".join(str(n) for n in shape)


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


@dataclass(frozen=True)
class AdapterFiles:
    """What :func:`read_adapter_dir` found in an adapter directory.

    Attributes:
        config: the parsed ``adapter_config.json`` (``{}`` when unreadable).
        shapes: tensor name -> shape from ``adapter_model.safetensors``'s header.
        size_bytes: size of the weights file.
        problems: one sentence per problem; loading must not be tried when not empty.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    size_bytes: int = 0
    problems: tuple[str, ...] = ()


def read_adapter_dir(directory: Path) -> AdapterFiles:
    """Read an adapter's config and its weights' tensor shapes (no torch, no tensor data).

    Args:
        directory: a PEFT adapter folder.

    Returns:
        The config, the shapes and the problems found: ``adapter_config.json`` missing or not
        a JSON object; no ``adapter_model.safetensors`` (pickled ``adapter_model.bin`` weights
        are never loaded); a weights file whose header is not valid safetensors or whose
        size disagrees with the header (truncated or padded).
    """
    problems: list[str] = []
    config: dict[str, Any] = {}
    try:
        parsed = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{ADAPTER_CONFIG} is missing")
    except (OSError, ValueError) as exc:
        problems.append(f"{ADAPTER_CONFIG} is not readable JSON ({exc})")
    else:
        if isinstance(parsed, dict):
            config = parsed
        else:
            problems.append(f"{ADAPTER_CONFIG} is not a JSON object")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (directory / PICKLED_WEIGHTS).is_file()
        problems.append(
            f"{WEIGHTS_FILE} is missing"
            + (
                f" ({PICKLED_WEIGHTS} holds pickled weights, which are never loaded)"
                if pickled
                else ""
            )
        )
        return AdapterFiles(config=config, problems=tuple(problems))
    try:
        shapes, size = _safetensors_shapes(weights)
    except (OSError, ValueError) as exc:
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})")
        return AdapterFiles(config=config, problems=tuple(problems))
    return AdapterFiles(config=config, shapes=shapes, size_bytes=size, problems=tuple(problems))


def _safetensors_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Tensor shapes from a safetensors header; checks the data section's size.

    Layout: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}}`` (plus ``__metadata__``), then the data.
    """
    size = path.stat().st_size
    with path.open("rb") as reader:
        prefix = reader.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header length {length} exceeds the file")
        header = json.loads(reader.read(length).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
        ):
            raise ValueError(f"tensor {name!r} has no valid shape and data_offsets")
        shapes[name] = tuple(shape)
        end = max(end, int(offsets[1]))
    if 8 + length + end != size:
        raise ValueError(f"the file has {size} bytes but its header describes {8 + length + end}")
    return shapes, size
