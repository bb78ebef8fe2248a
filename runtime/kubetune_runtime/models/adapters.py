"""LoRA adapter configuration: PEFT's LoraConfig from the RunConfig, checked against the model.

Reference: LoRA (Hu et al., 2021), DoRA (Liu et al., 2024), rsLoRA (Kalajdzievski, 2023);
PEFT's ``LoraConfig`` and its target-module matching (exact name or ``.``-separated suffix).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kubetune_runtime.config import LoraConfig as LoraSettings
from kubetune_runtime.errors import ConfigInvalid

# Layer types PEFT's LoRA can wrap (by class name, so quantized Linear4bit/Linear8bitLt count).
_ADAPTABLE = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D", "Conv2d", "Embedding")


def adaptable_module_names(named_modules: Iterable[tuple[str, Any]]) -> list[str]:
    """Full names of the layers LoRA can adapt, e.g. ``model.layers.0.self_attn.q_proj``."""
    return [name for name, module in named_modules if type(module).__name__ in _ADAPTABLE]


def _matches(full_name: str, target: str) -> bool:
    return full_name == target or full_name.endswith("." + target)


def check_target_modules(settings: LoraSettings, named_modules: Iterable[tuple[str, Any]]) -> None:
    """Fail before training when a target module or module to save is absent from the model.

    Args:
        settings: the LoRA settings (``target_modules`` a list of names/suffixes or
            ``"all-linear"``).
        named_modules: ``model.named_modules()`` of the loaded base model.

    Raises:
        ConfigInvalid: naming the missing modules and the adaptable suffixes the model has.
    """
    modules = list(named_modules)
    names = adaptable_module_names(modules)
    every = [name for name, _ in modules]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted: list[str] = [] if settings.target_modules == "all-linear" else settings.target_modules
    missing = [t for t in wanted if not any(_matches(n, t) for n in names)]
    # PEFT trains and saves any module in modules_to_save (norms too), not only adaptable ones.
    missing += [m for m in settings.modules_to_save or [] if not any(_matches(n, m) for n in every)]
    if missing:
        raise ConfigInvalid(
            f"target modules not found in the model: {', '.join(missing)}; the model's "
            f"adaptable modules are: {', '.join(suffixes)} (or use all-linear)"
        )
    if not names:
        raise ConfigInvalid("the model has no layers LoRA can adapt")


def build_lora_config(settings: LoraSettings) -> Any:
    """PEFT ``LoraConfig`` for causal-LM fine-tuning (pure; cf. trl's ``get_peft_config``).

    Returns:
        ``peft.LoraConfig`` with r, lora_alpha, lora_dropout, target_modules (a list, or the
        string ``"all-linear"`` which PEFT expands to every linear layer but the output head),
        use_dora, use_rslora, modules_to_save and ``task_type="CAUSAL_LM"``.
    """
    from peft import LoraConfig  # noqa: PLC0415 - keep `import kubetune_runtime` light

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        modules_to_save=settings.modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
