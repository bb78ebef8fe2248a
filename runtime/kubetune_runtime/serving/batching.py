"""The pieces of batched generation: padding, stop sequences, sampling, per-row LoRA.

One batch is several requests, each with its own adapter (or the base model), prompt,
sampling settings and limits, run as one forward pass per generated token:

* prompts are **left-padded** (:func:`left_pad`) so every row's next token is in the last
  column; position ids count real tokens only, so padding changes nothing for a row;
* each row's text grows through a :class:`TextStream`, which decodes incrementally, holds
  back text that may still turn into a stop sequence or an incomplete UTF-8 character, and
  cuts the text at the first stop sequence;
* :func:`next_tokens` picks each row's token: greedy at temperature 0, else nucleus sampling
  from the row's own seeded generator (a row's tokens do not depend on its batch mates);
* :class:`StackedLoRA` adds every row's own LoRA delta to each adapted linear layer with two
  batched matrix products, ``x @ A[row] @ B[row]`` (the per-row gather of the Punica/S-LoRA
  papers, done densely): the cost does not grow with the number of distinct adapters in the
  batch, unlike PEFT's mixed-batch forward, which loops over the adapters present.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BASE",
    "SamplingParams",
    "StackedLoRA",
    "TextStream",
    "left_pad",
    "next_tokens",
    "stackable_modules",
]

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    Attributes:
        max_tokens: most tokens to generate (the EOS token counts).
        temperature: 0 is greedy (argmax); otherwise logits are divided by it.
        top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution.
        stop: strings that end the text; the text is cut before the first one found.
        seed: seeds the row's own generator; ``None`` draws a random seed.
        ignore_eos: keep generating after an EOS token (benchmarks; vLLM's extension).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into one batch.

    Returns:
        ``(input_ids, attention_mask, position_ids)``, each ``[batch, longest]`` int64:
        pads on the left with mask 0, positions counting real tokens from 0 (pads get 0).
    """
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class TextStream:
    """Incremental detokenization with stop sequences, for one generated sequence.

    Args:
        decode: token ids -> text (special tokens skipped), e.g. a tokenizer's ``decode``.
        stop: stop sequences; the text ends before the first occurrence of any of them.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # what has been released so far
        self.stopped = False  # a stop sequence was found

    def push(self, token_id: int) -> str:
        """Add one token; return the newly released text (possibly ``""``).

        After a stop sequence is found, :attr:`stopped` is set and later pushes release
        nothing.
        """
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        full = self._decode(self.token_ids)
        if self._stop:
            # A stop sequence can only start in the unreleased tail (or straddle into it).
            start = max(0, len(self.text) - self._longest_stop + 1)
            hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(full[: min(hits)])
        end = len(full)
        while end > len(self.text) and full[end - 1] == "\ufffd":
            end -= 1  # an incomplete UTF-8 character: wait for its other bytes
        end -= self._stop_prefix_at_end(full[:end])
        return self._release(full[:end])

    def finish(self) -> str:
        """Release everything still held back (the sequence ended without a stop string)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self.token_ids))

    def _stop_prefix_at_end(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop sequence."""
        for length in range(min(self._longest_stop - 1, len(text) - len(self.text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0

    def _release(self, text: str) -> str:
        # Released text cannot be taken back: only what extends it is sent (should the
        # decoding of earlier tokens change, which byte-level BPE never does, the
        # difference is lost rather than repeated).
        if len(text) <= len(self.text):
            return ""
        delta = text[len(self.text) :]
        self.text += delta
        return delta


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick each row's next token.

    Args:
        logits: ``[batch, vocab]`` scores of the next token.
        params: each row's sampling settings.
        generators: each row's generator (``None`` for greedy rows).

    Returns:
        One token id per row: argmax for temperature 0, else a sample from the softmax of
        ``logits / temperature`` restricted to the smallest set of tokens whose probability
        reaches ``top_p``.
    """
    chosen = logits.argmax(dim=-1).tolist()
    for row, (setting, generator) in enumerate(zip(params, generators, strict=True)):
        if setting.temperature == 0:
            continue
        probs = torch.softmax(logits[row].float() / setting.temperature, dim=-1)
        if setting.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked higher
            sorted_probs[before >= setting.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return [int(token) for token in chosen]


def stackable_modules(model: Any, adapter: str) -> bool:
    """Whether every layer ``adapter`` touches is a plain LoRA linear layer.

    Plain: PEFT's ``lora.Linear`` with no variant (DoRA...), no ``lora_B`` bias, and not an
    embedding or convolution, and no whole modules of its own (``modules_to_save``,
    trainable tokens); :class:`StackedLoRA` handles exactly these. Adapters with anything
    else are run with PEFT's own mixed-batch forward.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: PLC0415
    from peft.tuners.lora.layer import LoraLayer  # noqa: PLC0415
    from peft.utils.other import AuxiliaryTrainingWrapper  # noqa: PLC0415

    touched = False
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter in _wrapped_adapters(module):
            return False
        if not isinstance(module, LoraLayer):
            continue
        in_embedding = adapter in getattr(module, "lora_embedding_A", {})
        if adapter not in module.lora_A and not in_embedding:
            continue
        touched = True
        if (
            in_embedding
            or not isinstance(module, LoraLinear)
            or adapter in module.lora_variant
            or module.lora_B[adapter].bias is not None
            or not isinstance(module.lora_A[adapter], torch.nn.Linear)
        ):
            return False
    return touched


def _wrapped_adapters(wrapper: Any) -> set[str]:
    """Adapters with state in a PEFT wrapper (``modules_to_save``, trainable tokens)."""
    names: set[str] = set()
    for attribute in ("modules_to_save", "token_adapter"):
        held = getattr(wrapper, attribute, None)
        if isinstance(held, torch.nn.ModuleDict):
            names.update(held.keys())
        elif held is not None:
            names.update(getattr(held, "trainable_tokens_delta", {}).keys())
    return names


class StackedLoRA:
    """Per-row LoRA deltas for one batch, added by forward hooks on PEFT's LoRA layers.

    For every LoRA linear layer some row's adapter adapts, the rows' matrices are stacked
    once per batch: ``A`` is ``[batch, in_features, R]`` and ``B`` is ``[batch, R, out_features]``
    with the adapter's scaling folded into ``B``, where ``R`` is the largest rank among the
    rows (smaller ranks, rows of other adapters and base rows are zero-padded, which adds
    exactly zero). The hook adds ``bmm(bmm(x, A), B)`` to the layer's output. PEFT's own LoRA
    computation must be off while the hooks are installed (``model.disable_adapter()``).

    Args:
        model: the ``PeftModel``.
        adapters: each row's adapter name, :data:`BASE` for the base model.
    """

    def __init__(self, model: Any, adapters: Sequence[str]) -> None:
        from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: PLC0415

        self._handles: list[Any] = []
        self._stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in model.modules():
            if not isinstance(layer, LoraLinear):
                continue
            module: Any = layer  # PEFT's layer attributes are not precisely typed
            used = [name for name in adapters if name in module.lora_A]
            if not used:
                continue
            weight = module.lora_A[used[0]].weight
            rank = max(module.lora_A[name].weight.shape[0] for name in used)
            a = weight.new_zeros((len(adapters), module.in_features, rank))
            b = weight.new_zeros((len(adapters), rank, module.out_features))
            for row, name in enumerate(adapters):
                if name in module.lora_A:
                    r = module.lora_A[name].weight.shape[0]
                    a[row, :, :r] = module.lora_A[name].weight.T
                    b[row, :r, :] = module.lora_B[name].weight.T * module.scaling[name]
            self._stacks[id(module)] = (a, b)
            self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        a, b = self._stacks[id(module)]
        x = args[0]
        return output + torch.bmm(torch.bmm(x.to(a.dtype), a), b).to(output.dtype)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), e.g. after some finished."""
        self._stacks = {key: (a[rows], b[rows]) for key, (a, b) in self._stacks.items()}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stacks.clear()
