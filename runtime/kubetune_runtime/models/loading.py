"""Load the base model and tokenizer: source resolution, precision per device, 4-bit QLoRA.

Sources: ``hf://org/name[@revision]`` goes to ``from_pretrained`` with the revision and the
token from the environment variable the RunConfig names (the Hub download is the real code
path; it cannot run offline); ``s3://`` is downloaded to a local folder by the caller's
``fetch``; ``pvc://`` and ``file://`` are local paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubetune_runtime.config import ModelConfig, QuantizationConfig
from kubetune_runtime.errors import ConfigInvalid


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a Hub id or a local folder, a revision and a token."""

    name_or_path: str
    revision: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print the token
        return f"ModelSource({self.name_or_path!r}, revision={self.revision!r})"


def resolve_model_source(
    model: ModelConfig,
    fetch: Callable[[str], Path],
    env: Mapping[str, str] = os.environ,
) -> ModelSource:
    """Turn the model URI into something ``from_pretrained`` loads.

    Args:
        model: the RunConfig's model section.
        fetch: downloads an ``s3://`` / ``pvc://`` / ``file://`` URI to (or resolves it as) a
            local folder and returns it.
        env: where ``model.token_env`` is looked up.

    Raises:
        ConfigInvalid: the token variable is named but not set.
    """
    token = None
    if model.token_env:
        token = env.get(model.token_env)
        if not token:
            raise ConfigInvalid(f"environment variable {model.token_env} (the Hub token) is empty")
    if model.uri.startswith("hf://"):
        repo, _, revision = model.uri.removeprefix("hf://").partition("@")
        return ModelSource(repo, revision or None, token)
    return ModelSource(str(fetch(model.uri)), None, token)


@dataclass(frozen=True)
class Precision:
    """Resolved training precision: the weights' dtype name and TrainingArguments' bf16/fp16."""

    dtype: Literal["float32", "bfloat16", "float16"]
    bf16: bool
    fp16: bool


def resolve_precision(
    precision: Literal["auto", "bf16", "fp16", "fp32"],
    *,
    cuda: bool,
    bf16_supported: bool,
) -> Precision:
    """Pick the precision for this device.

    ``auto`` is bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs and fp32 on
    CPU (bf16 training on CPU is not supported by this stack). Mixed precision keeps fp32
    master weights, so weights load in float32 for fp16 and in bfloat16 only for bf16.

    Raises:
        ConfigInvalid: an explicit precision the device cannot run.
    """
    if precision == "auto":
        precision = ("bf16" if bf16_supported else "fp16") if cuda else "fp32"
    if precision == "bf16":
        if not (cuda and bf16_supported):
            raise ConfigInvalid(
                "precision bf16 needs a GPU with bfloat16 support; use precision auto or fp32 "
                "on this device"
            )
        return Precision("bfloat16", bf16=True, fp16=False)
    if precision == "fp16":
        if not cuda:
            raise ConfigInvalid("precision fp16 needs a GPU; use precision auto or fp32 on CPU")
        return Precision("float32", bf16=False, fp16=True)
    return Precision("float32", bf16=False, fp16=False)


def device_precision(precision: Literal["auto", "bf16", "fp16", "fp32"]) -> Precision:
    """:func:`resolve_precision` for the device this process runs on."""
    import torch  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    return resolve_precision(
        precision,
        cuda=cuda,
        # Native bf16 only (Ampere+); pre-Ampere GPUs emulate it slowly: fp16 is the right pick.
        bf16_supported=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
    )


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool) -> Any:
    """The model's tokenizer (``AutoTokenizer``, fast when available)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(
        source.name_or_path,
        revision=source.revision,
        token=source.token,
        trust_remote_code=trust_remote_code,
    )


def _compute_dtype(setting: str, precision: Precision) -> Any:
    import torch  # noqa: PLC0415

    if setting == "auto":
        setting = {"bfloat16": "bfloat16", "float16": "float16"}.get(
            precision.dtype, "float16" if precision.fp16 else "float32"
        )
    return getattr(torch, setting)


def load_model(
    source: ModelSource,
    *,
    precision: Precision,
    quantization: QuantizationConfig | None,
    trust_remote_code: bool,
    gradient_checkpointing: bool,
    device_map: Any = None,
) -> Any:
    """Load the causal LM for training.

    Args:
        source: where the weights are.
        precision: resolved precision (weights load in ``precision.dtype``).
        quantization: 4-bit settings for QLoRA (Dettmers et al., 2023), or None. The base
            is loaded as bitsandbytes ``Linear4bit`` layers and prepared for k-bit training
            (norms in fp32, input gradients enabled); works on CPU with bitsandbytes >= 0.49.
        trust_remote_code: allow the repository's code.
        gradient_checkpointing: prepare for activation checkpointing.
        device_map: passed to ``from_pretrained``; QLoRA defaults to this process's device.

    Returns:
        A ``PreTrainedModel`` with ``attn_implementation="sdpa"`` (packed sequences are
        separated through position ids).
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: PLC0415

    kwargs: dict[str, Any] = {
        "revision": source.revision,
        "token": source.token,
        "trust_remote_code": trust_remote_code,
        "dtype": getattr(torch, precision.dtype),
        "attn_implementation": "sdpa",
    }
    if quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=_compute_dtype(quantization.bnb_4bit_compute_dtype, precision),
            bnb_4bit_quant_storage=getattr(torch, precision.dtype),
        )
        if device_map is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device_map = {"": f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    model.config.use_cache = False  # caching is for generation; it wastes memory in training
    return model
