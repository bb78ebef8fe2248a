"""Adapters trained by the runtime for the serving tests, and plain-PEFT reference outputs.

Three LoRA adapters are trained once per session on the tiny model with
``kubetune-runtime train`` (different seeds, data slices and learning rates, a few steps
each, in parallel); ``reference_outputs`` gives the greedy tokens of plain transformers /
PEFT with each adapter *alone*, which any serving path must reproduce. The session fixtures
``adapters`` and ``reference`` (``tests/integration/conftest.py``) wrap them.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.runtime_support import GSM8K_TRAIN, run_config, run_runtime

BASE = "__base__"  # the base model's key in reference outputs (the engine's BASE)
MAX_TOKENS = 12
PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many",
    "Weng earns $12 an hour for babysitting.",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money",
    "James writes",
)
RECIPES: dict[str, dict[str, Any]] = {
    "a": {"seed": 1, "learning_rate": 3e-2, "max_samples": 32},
    "b": {"seed": 2, "learning_rate": 5e-2, "max_samples": 48},
    "c": {"seed": 3, "learning_rate": 2e-2, "max_samples": 64, "r": 16},  # mixed ranks
}


def train_adapters(mktemp: Callable[[str], Path], tiny_model_dir: Path) -> dict[str, Path]:
    """Train A, B (rank 8) and C (rank 16); returns name -> published adapter folder.

    Each folder is a verified artifact (``manifest.json`` beside the weights).
    """

    def train(name: str) -> Path:
        recipe = RECIPES[name]
        tmp = mktemp(f"adapter-{name}")
        config = run_config(
            tmp,
            tiny_model_dir,
            data={
                "train": {
                    "uri": GSM8K_TRAIN.as_uri(),
                    "format": "promptCompletion",
                    "columns": {"prompt": "question", "completion": "answer"},
                    "max_samples": recipe["max_samples"],
                },
                "max_seq_length": 128,
            },
            lora={"r": recipe.get("r", 8), "lora_alpha": 2 * recipe.get("r", 8)},
            training={
                "max_steps": 4,
                "learning_rate": recipe["learning_rate"],
                "per_device_train_batch_size": 2,
                "logging_steps": 1,
                "seed": recipe["seed"],
            },
        )
        code, _, stderr = run_runtime(tmp, config)
        assert code == 0, stderr[-3000:]
        return tmp / "out" / "adapter"

    with concurrent.futures.ThreadPoolExecutor(len(RECIPES)) as pool:
        return dict(zip(RECIPES, pool.map(train, RECIPES), strict=True))


def reference_outputs(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> dict[tuple[str, int], list[int]]:
    """Greedy tokens from plain transformers / PEFT, per (model, prompt index), alone.

    The model key is the adapter name, or :data:`BASE` for the base model.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    outputs: dict[tuple[str, int], list[int]] = {}
    for name in (BASE, *adapters):
        model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if name != BASE:
            model = PeftModel.from_pretrained(model, adapters[name])
        model.eval()
        for index, prompt in enumerate(PROMPTS):
            encoded = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                generated = model.generate(**encoded, max_new_tokens=MAX_TOKENS, do_sample=False)
            outputs[name, index] = generated[0, encoded["input_ids"].shape[1] :].tolist()
    return outputs
