"""A tiny Llama-architecture causal LM with a real byte-level BPE tokenizer, for tests and demos.

``build_tiny_model`` writes a complete Hugging Face model directory (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) that loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly
like a Hub model, so every runtime code path (chat templates, assistant masks, LoRA targets,
merging, generation) runs against it offline and on CPU in seconds.

The tokenizer mirrors Llama 3's conventions: ``<|begin_of_text|>`` is BOS and is added by the
tokenizer's post-processor for plain text, ``<|eot_id|>`` ends every chat turn and is the EOS
token, ``<|end_of_text|>`` ends a pre-training document, and ``<|pad|>`` is a dedicated padding
token (never EOS, so padding is never confused with the stop token). The chat template wraps each
assistant turn, including its ``<|eot_id|>``, in ``{% generation %}`` so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` works.
"""

# ruff: noqa: S105 - the *_TOKEN constants are vocabulary entries, not credentials

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

BOS_TOKEN: Final = "<|begin_of_text|>"
EOS_TOKEN: Final = "<|eot_id|>"  # end of turn; what generation stops on
END_OF_TEXT_TOKEN: Final = "<|end_of_text|>"  # end of a pre-training document
PAD_TOKEN: Final = "<|pad|>"
UNK_TOKEN: Final = "<|unk|>"
START_HEADER_TOKEN: Final = "<|start_header_id|>"
END_HEADER_TOKEN: Final = "<|end_header_id|>"
SPECIAL_TOKENS: Final = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOS_TOKEN,
)

# Llama-3 layout. The template writes BOS itself (apply_chat_template tokenizes with
# add_special_tokens=False, so BOS appears exactly once). `{% generation %}` covers the assistant
# content *and* its end-of-turn token, so the stop token is trained.
CHAT_TEMPLATE: Final = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_PRETRAIN_SEQ_LEN: Final = 128
_PRETRAIN_BATCH: Final = 16
_PRETRAIN_LR: Final = 3e-3


def train_tokenizer(texts: Sequence[str], *, vocab_size: int = 2048) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Byte-level BPE (GPT-2 / Llama 3 style) has no out-of-vocabulary bytes, so ``unk`` exists only
    for API completeness. Training is deterministic for the same texts and vocab size.

    Args:
        texts: training corpus (e.g. GSM8K questions and answers); a few hundred rows suffice.
        vocab_size: final vocabulary size, including the 256-byte alphabet and special tokens.

    Returns:
        A ``transformers`` ``PreTrainedTokenizerFast`` with bos/eos/pad/unk set and
        :data:`CHAT_TEMPLATE` attached.

    Raises:
        ValueError: ``texts`` is empty or ``vocab_size`` cannot hold the byte alphabet.
    """
    # Imported here so that importing kubetune_runtime.models stays light.
    from tokenizers import (  # noqa: PLC0415
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for the 256-byte alphabet")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Like Llama 3: plain text gets BOS from the post-processor (add_special_tokens=True), while
    # chat text gets it from the template (apply_chat_template passes add_special_tokens=False).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    fast_tokenizer: Any = PreTrainedTokenizerFast  # its __init__ is untyped
    tokenizer = fast_tokenizer(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[END_OF_TEXT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN],
        model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    pretrain_steps: int = 0,
    pretrain_texts: Iterable[str] | None = None,
) -> Path:
    """Build and save a small Llama causal LM plus its tokenizer in Hugging Face format.

    With the defaults the model has about 0.9 M parameters (untied embeddings, grouped-query
    attention with ``kv_heads`` key/value heads, SwiGLU MLP) and builds in about a second. The
    result is deterministic for the same texts, sizes and ``seed``; the caller's global torch RNG
    state is left untouched.

    Args:
        out_dir: directory to write (created if missing; existing files are overwritten).
        texts: corpus for the BPE tokenizer, e.g. GSM8K question and answer joined by a newline.
        vocab_size: tokenizer (and embedding) size; the embedding matrix matches the tokenizer.
        hidden_size: model width.
        layers: number of decoder layers.
        heads: attention heads; ``hidden_size`` must be divisible by it.
        kv_heads: key/value heads (GQA); ``heads`` must be divisible by it.
        intermediate_size: MLP width; default ``8/3 * hidden_size`` rounded up to a multiple of 32
            (the Llama ratio).
        max_position_embeddings: longest sequence, in tokens, the RoPE config advertises.
        seed: seeds weight initialisation and the pre-training batch order.
        pretrain_steps: optimizer steps of causal-LM pre-training on CPU before saving (0: keep
            the random initialisation). Each step is a batch of 16 x 128 tokens, about 0.1 s on
            two idle cores. About 400 steps on GSM8K train take the loss on GSM8K test rows from
            7.6 (uniform over 2048 tokens) to about 3.6: a base that writes GSM8K-like text.
        pretrain_texts: corpus for pre-training; defaults to ``texts``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: no texts, or inconsistent sizes.
    """
    import torch  # noqa: PLC0415 - keep `import kubetune_runtime.models` light
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    corpus = list(texts)
    if hidden_size % heads or heads % kv_heads:
        raise ValueError("hidden_size must be divisible by heads, and heads by kv_heads")
    if pretrain_steps < 0:
        raise ValueError("pretrain_steps must be >= 0")
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    if intermediate_size is None:
        intermediate_size = 32 * math.ceil(hidden_size * 8 / 3 / 32)

    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    # fork_rng: seeding must not change the caller's random stream (tests, Trainer seeding).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config)
        if pretrain_steps:
            pretrain_corpus = corpus if pretrain_texts is None else list(pretrain_texts)
            _pretrain(model, tokenizer, pretrain_corpus, steps=pretrain_steps, seed=seed)
    model.eval()
    generation_config: Any = GenerationConfig  # its __init__ is untyped
    model.generation_config = generation_config(
        bos_token_id=bos_id,
        eos_token_id=[eos_id, end_of_text_id],
        pad_token_id=pad_id,
        do_sample=False,
        max_new_tokens=256,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _pretrain(model: Any, tokenizer: Any, texts: list[str], *, steps: int, seed: int) -> None:
    """Causal-LM pre-training: AdamW on random 128-token windows of the concatenated corpus.

    Documents are ``BOS text <|end_of_text|>`` and are concatenated GPT-style (windows may span
    documents; this is a base model, the fine-tuning path packs without cross-attention). Linear
    warm-up for 10% of the steps, then cosine decay to 10% of the peak rate.
    """
    import torch  # noqa: PLC0415 - keep `import kubetune_runtime.models` light

    if not texts:
        raise ValueError("pretrain_texts is empty")
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(end_of_text_id)
    seq_len = min(_PRETRAIN_SEQ_LEN, model.config.max_position_embeddings, len(stream) - 1)
    if seq_len < 2:
        raise ValueError("pretrain_texts are too short to pre-train on")
    tokens = torch.tensor(stream, dtype=torch.long)
    starts = len(stream) - seq_len
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=_PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01
    )
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    for _ in range(steps):
        offsets = torch.randint(0, starts + 1, (_PRETRAIN_BATCH,), generator=generator).tolist()
        batch = torch.stack([tokens[o : o + seq_len] for o in offsets])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
