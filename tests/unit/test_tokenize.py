"""Tokenization, loss masks, packing and collators, on real GSM8K text and the tiny model."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kubetune_runtime.data.tokenize import (  # noqa: E402
    IGNORE_INDEX,
    PackedRowsCollator,
    PaddedCollator,
    PaddingFreeCollator,
    TokenizationSummary,
    pack_examples,
    prepare_tokenizer,
    tokenize_conversation,
    tokenize_dataset,
)
from kubetune_runtime.errors import ConfigInvalid, DataInvalid  # noqa: E402
from kubetune_runtime.models.tiny import EOS_TOKEN, PAD_TOKEN  # noqa: E402

# ChatML (Qwen 2.5's layout without tools), written here: no {% generation %} markers, no BOS,
# and "<|im_end|>\n" after every turn, so strategy (b) must locate turns and trim the newline.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_GENERATION_MARKERS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    """A fresh tokenizer per test: prepare_tokenizer and template overrides mutate it."""
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def chatml_tokenizer(tokenizer: Any) -> Any:
    """The tiny tokenizer with ChatML control tokens and the marker-free ChatML template.

    Tokens are added to the tokenizer only: no model is involved in the tests that use it.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa"
    ).eval()


def _single_turn(row: dict[str, str]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": row["answer"]},
    ]


def _multi_turn(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Solve the problem step by step."}]
    for row in rows:
        messages += _single_turn(row)
    return messages


def _masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = 0
    for token, bit in zip(ids, mask, strict=True):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return runs


# ------------------------------------------------------------------------------ prepare_tokenizer


def test_prepare_tokenizer_requires_a_chat_template(tokenizer: Any) -> None:
    tokenizer.chat_template = None
    with pytest.raises(ConfigInvalid, match="no chat template"):
        prepare_tokenizer(tokenizer, chat_template=None)
    assert prepare_tokenizer(tokenizer, chat_template=None, require_chat_template=False)


def test_prepare_tokenizer_installs_the_override(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|begin_of_text|>hi"
    )


def test_prepare_tokenizer_rejects_a_broken_template(tokenizer: Any) -> None:
    with pytest.raises(ConfigInvalid, match="does not render"):
        prepare_tokenizer(tokenizer, chat_template="{{ messages[0]['content'] | nosuchfilter }}")


def test_prepare_tokenizer_keeps_a_distinct_pad(tokenizer: Any) -> None:
    prepare_tokenizer(tokenizer, chat_template=None)
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def _word_level_tokenizer(tokens: list[str], **special: str) -> Any:
    """A minimal fast tokenizer whose vocabulary is exactly ``tokens`` (no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    # The backend maps unknown words to "hi" (tokens[0]); the transformers-level unk is separate.
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast: Any = transformers.PreTrainedTokenizerFast
    return fast(tokenizer_object=backend, **special)


@pytest.mark.parametrize(
    ("vocab", "special", "expected_pad"),
    [
        pytest.param(
            ["hi", "<|eot_id|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"],
            {"eos_token": "<|eot_id|>"},
            "<|finetune_right_pad_id|>",
            id="llama-3.1",
        ),
        pytest.param(
            ["hi", "<|im_end|>", "<|endoftext|>"],
            {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
            "<|endoftext|>",
            id="qwen-pad-equals-eos",
        ),
        pytest.param(
            ["hi", "</s>", "<unk>", "<pad>"],
            {"eos_token": "</s>", "unk_token": "<unk>"},
            "<pad>",
            id="pad-in-vocab",
        ),
        pytest.param(
            ["hi", "</s>", "<unk>"],
            {"eos_token": "</s>", "unk_token": "<unk>"},
            "<unk>",
            id="unk",
        ),
        pytest.param(
            ["hi", "<|endoftext|>"],
            {"eos_token": "<|endoftext|>"},
            "<|endoftext|>",
            id="gpt2-falls-back-to-eos",
        ),
    ],
)
def test_pad_token_policy(vocab: list[str], special: dict[str, str], expected_pad: str) -> None:
    tokenizer = _word_level_tokenizer(vocab, **special)
    size = len(tokenizer)
    prepare_tokenizer(tokenizer, chat_template=None, require_chat_template=False)
    assert tokenizer.pad_token == expected_pad
    assert len(tokenizer) == size  # nothing added: embeddings never need resizing
    _, summary = tokenize_dataset(tokenizer, [{"text": "hi hi"}], max_seq_length=16)
    falls_back = expected_pad == special["eos_token"]
    assert bool(summary.notes) == falls_back
    if falls_back:
        assert "EOS" in summary.notes[0]


# ------------------------------------------------------------------------------ conversations


def test_strategy_a_masks_exactly_the_answer_and_end_of_turn(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    for row in gsm8k_rows[:20]:
        ids, mask = tokenize_conversation(tokenizer, _single_turn(row))
        assert len(ids) == len(mask)
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1
        masked = [t for t, bit in zip(ids, mask, strict=True) if bit]
        assert tokenizer.decode(masked) == row["answer"] + EOS_TOKEN
        assert masked[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("strategy", ["generation-markers", "incremental"])
def test_every_assistant_turn_trains_its_end_of_turn_token(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]], strategy: str
) -> None:
    if strategy == "incremental":
        tokenizer.chat_template = _GENERATION_MARKERS.sub("", tokenizer.chat_template)
    rows = gsm8k_rows[:3]
    ids, mask = tokenize_conversation(tokenizer, _multi_turn(rows))
    runs = _masked_runs(ids, mask)
    assert len(runs) == len(rows)
    for run, row in zip(runs, rows, strict=True):
        assert run[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(run) == row["answer"] + EOS_TOKEN
    assert ids.count(tokenizer.bos_token_id) == 1


def test_both_strategies_agree_token_for_token(
    tokenizer: Any, tiny_model_dir: Path, gsm8k_rows: list[dict[str, str]]
) -> None:
    incremental = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    incremental.chat_template = _GENERATION_MARKERS.sub("", tokenizer.chat_template)
    assert not _GENERATION_MARKERS.search(incremental.chat_template)
    conversations = [_multi_turn(gsm8k_rows[i : i + 2]) for i in range(0, 40, 2)]
    for messages in conversations:
        assert tokenize_conversation(tokenizer, messages) == tokenize_conversation(
            incremental, messages
        )


def test_strategy_b_on_chatml_trims_the_newline_and_adds_bos(
    chatml_tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    tokenizer = chatml_tokenizer
    rows = gsm8k_rows[:2]
    ids, mask = tokenize_conversation(tokenizer, _multi_turn(rows))
    # The template writes no BOS, but this tokenizer adds one to plain text: exactly one.
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    runs = _masked_runs(ids, mask)
    assert [tokenizer.decode(run) for run in runs] == [r["answer"] + "<|im_end|>" for r in rows]
    assert all(run[-1] == im_end for run in runs)
    # The newline after each <|im_end|> is not trained.
    for index, token in enumerate(ids):
        if token == im_end and index + 1 < len(ids):
            assert mask[index + 1] == 0


def test_template_that_is_not_prefix_stable_is_rejected(
    chatml_tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    # The final assistant message is rendered differently from earlier ones (Qwen3-style).
    chatml_tokenizer.chat_template = CHATML.replace(
        "message['content'] + '<|im_end|>'",
        "('[final] ' if loop.last else '') + message['content'] + '<|im_end|>'",
    )
    with pytest.raises(ConfigInvalid, match="not prefix-stable"):
        tokenize_conversation(chatml_tokenizer, _multi_turn(gsm8k_rows[:2]))


def test_generation_prompt_that_differs_from_the_turn_header_is_rejected(
    chatml_tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    chatml_tokenizer.chat_template = CHATML.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n\\n'"
    )
    with pytest.raises(ConfigInvalid, match="not prefix-stable"):
        tokenize_conversation(chatml_tokenizer, _single_turn(gsm8k_rows[0]))


@pytest.mark.parametrize("markers", [False, True], ids=["incremental", "generation-markers"])
def test_template_without_end_of_turn_token_is_rejected(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]], markers: bool
) -> None:
    content = "message['content']"
    if markers:
        content = "message['content'] + '\\n'"
        body = "{%- generation %}{{- " + content + " }}{%- endgeneration %}"
    else:
        body = "{{- " + content + " + '\\n' }}"
    tokenizer.chat_template = (
        "{{- bos_token }}{%- for message in messages %}{{- message['role'] + ': ' }}"
        "{%- if message['role'] == 'assistant' %}" + body + "{%- else %}"
        "{{- message['content'] + '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    with pytest.raises(ConfigInvalid, match="never learn to stop"):
        tokenize_conversation(tokenizer, _single_turn(gsm8k_rows[0]))


def test_generation_span_is_extended_to_a_closing_token_left_outside(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{- message['content'] + '<|eot_id|>' }}{%- endgeneration %}",
        "{{- message['content'] }}{%- endgeneration %}{{- '<|eot_id|>' }}",
    )
    ids, mask = tokenize_conversation(tokenizer, _single_turn(gsm8k_rows[0]))
    masked = [t for t, bit in zip(ids, mask, strict=True) if bit]
    assert tokenizer.decode(masked) == gsm8k_rows[0]["answer"] + EOS_TOKEN


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        pytest.param([], "messages", id="empty"),
        pytest.param([{"role": "bot", "content": "x"}], "messages[0].role", id="role"),
        pytest.param([{"role": "user", "content": 3}], "messages[0].content", id="content"),
        pytest.param(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b <|eot_id|>"}],
            "messages[1].content",
            id="control-token",
        ),
    ],
)
def test_malformed_conversations_raise_data_invalid(
    tokenizer: Any, messages: list[dict[str, Any]], field: str
) -> None:
    with pytest.raises(DataInvalid) as error:
        tokenize_conversation(tokenizer, messages)
    assert error.value.field == field


# ------------------------------------------------------------------------------ datasets


def test_dataset_summary_counts(tokenizer: Any, gsm8k_rows: list[dict[str, str]]) -> None:
    samples: list[Any] = [_single_turn(row) for row in gsm8k_rows[:40]]
    samples += [{"messages": _single_turn(row)} for row in gsm8k_rows[40:45]]
    samples += [{"text": row["question"]} for row in gsm8k_rows[45:50]]
    examples, summary = tokenize_dataset(tokenizer, samples, max_seq_length=1024)
    assert isinstance(summary, TokenizationSummary)
    lengths = [len(e["input_ids"]) for e in examples]
    assert summary.samples == summary.examples == len(examples) == 50
    assert summary.tokens == sum(lengths)
    assert summary.max_length == max(lengths)
    assert summary.mean_length == pytest.approx(sum(lengths) / 50)
    assert summary.trained_tokens == sum(
        sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples
    )
    assert (summary.truncated, summary.dropped, summary.notes) == (0, {}, [])
    assert json.loads(json.dumps(summary.to_dict())) == summary.to_dict()
    # Conversations: labels are the assistant tokens only; text: every token but the first.
    for example, row in zip(examples[:40], gsm8k_rows, strict=False):
        trained = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == row["answer"] + EOS_TOKEN
    for example in examples[45:]:
        assert example["input_ids"][0] == tokenizer.bos_token_id
        assert example["input_ids"][-1] == tokenizer.eos_token_id
        assert example["labels"] == [IGNORE_INDEX, *example["input_ids"][1:]]


def test_text_with_control_token_strings_is_encoded_as_text(tokenizer: Any) -> None:
    examples, _ = tokenize_dataset(tokenizer, [{"text": "a <|eot_id|> b"}], max_seq_length=64)
    ids = examples[0]["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 1  # only the appended one
    assert tokenizer.decode(ids[1:-1]) == "a <|eot_id|> b"


def test_completion_only_loss_off_trains_every_token(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    (example,), summary = tokenize_dataset(
        tokenizer, [_single_turn(gsm8k_rows[0])], max_seq_length=1024, completion_only_loss=False
    )
    assert example["labels"] == [IGNORE_INDEX, *example["input_ids"][1:]]
    assert summary.trained_tokens == len(example["input_ids"]) - 1


def test_overlength_truncate(tokenizer: Any, gsm8k_rows: list[dict[str, str]]) -> None:
    limit = 150
    samples = [_single_turn(row) for row in gsm8k_rows[:30]]
    samples.append(
        [
            {"role": "user", "content": " ".join(row["question"] for row in gsm8k_rows[:5])},
            {"role": "assistant", "content": "42"},
        ]
    )
    expected_truncated = expected_gone = 0
    for sample in samples:
        ids, mask = tokenize_conversation(tokenizer, sample)
        if len(ids) > limit:
            if 1 in mask[:limit]:
                expected_truncated += 1
            else:
                expected_gone += 1
    assert expected_truncated > 0
    assert expected_gone >= 1  # at least the long prompt: its answer is truncated away
    examples, summary = tokenize_dataset(tokenizer, samples, max_seq_length=limit)
    assert all(len(e["input_ids"]) <= limit for e in examples)
    assert summary.truncated == expected_truncated
    assert summary.dropped == {"truncated_away": expected_gone}
    assert summary.examples == len(samples) - expected_gone
    assert summary.max_length == limit


def test_overlength_drop(tokenizer: Any, gsm8k_rows: list[dict[str, str]]) -> None:
    samples = [_single_turn(row) for row in gsm8k_rows[:30]]
    lengths = [len(tokenize_conversation(tokenizer, s)[0]) for s in samples]
    examples, summary = tokenize_dataset(tokenizer, samples, max_seq_length=150, overlength="drop")
    too_long = sum(length > 150 for length in lengths)
    assert 0 < too_long < 30
    assert summary.dropped == {"overlength": too_long}
    assert summary.examples == len(examples) == 30 - too_long
    assert summary.truncated == 0


def test_overlength_error_names_the_row_and_length(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    samples = [_single_turn(row) for row in gsm8k_rows[:3]]
    lengths = [len(tokenize_conversation(tokenizer, s)[0]) for s in samples]
    limit = min(lengths) + 1
    first_long = next(i for i, n in enumerate(lengths) if n > limit)
    sources = [("gsm8k/train.jsonl", 101 + i) for i in range(3)]
    with pytest.raises(DataInvalid) as error:
        tokenize_dataset(
            tokenizer, samples, max_seq_length=limit, overlength="error", sources=sources
        )
    assert error.value.source == "gsm8k/train.jsonl"
    assert error.value.row == 101 + first_long
    assert f"{lengths[first_long]} tokens" in str(error.value)
    assert f"max_seq_length {limit}" in str(error.value)


def test_samples_without_trained_tokens_are_dropped_and_counted(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    no_answer = [{"role": "user", "content": gsm8k_rows[0]["question"]}]
    injected = _single_turn(gsm8k_rows[1])
    injected[1] = {"role": "assistant", "content": "<|eot_id|>"}
    samples = [_single_turn(gsm8k_rows[2]), no_answer, injected]
    examples, summary = tokenize_dataset(tokenizer, samples, max_seq_length=1024)
    assert len(examples) == 1
    assert summary.dropped == {"no_trained_tokens": 1, "special_token_in_content": 1}
    with pytest.raises(DataInvalid, match="all 2 samples were dropped"):
        tokenize_dataset(tokenizer, [no_answer, injected], max_seq_length=1024)


def test_malformed_sample_raises_with_source_row_and_field(tokenizer: Any) -> None:
    samples = [[{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]]
    with pytest.raises(DataInvalid) as error:
        tokenize_dataset(tokenizer, samples, max_seq_length=64, sources=[("chat.jsonl", 7)])
    assert (error.value.source, error.value.row, error.value.field) == (
        "chat.jsonl",
        7,
        "messages[1].role",
    )
    assert str(error.value).startswith("chat.jsonl, row 7, field messages[1].role: ")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"max_seq_length": 1}, "max_seq_length", id="length"),
        pytest.param({"max_seq_length": 64, "overlength": "wrap"}, "overlength", id="policy"),
    ],
)
def test_bad_arguments_raise_config_invalid(
    tokenizer: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigInvalid, match=match):
        tokenize_dataset(tokenizer, [{"text": "hello"}], **kwargs)


# ------------------------------------------------------------------------------ packing


@pytest.fixture
def examples(tokenizer: Any, gsm8k_rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    samples: list[Any] = [_single_turn(row) for row in gsm8k_rows[:60]]
    return tokenize_dataset(tokenizer, samples, max_seq_length=256)[0]


def _split_packed(packed: dict[str, list[int]]) -> list[tuple[int, ...]]:
    starts = [i for i, p in enumerate(packed["position_ids"]) if p == 0]
    bounds = [*starts, len(packed["input_ids"])]
    return [tuple(packed["input_ids"][a:b]) for a, b in itertools.pairwise(bounds)]


def test_pack_examples_best_fit_decreasing(examples: list[dict[str, list[int]]]) -> None:
    packed = pack_examples(examples, 512)
    assert pack_examples(examples, 512) == packed  # deterministic
    total = sum(len(e["input_ids"]) for e in examples)
    assert len(packed) <= -(-total // 512) + 1  # close to the lower bound
    samples = sorted(s for p in packed for s in _split_packed(p))
    assert samples == sorted(tuple(e["input_ids"]) for e in examples)  # each exactly once, whole
    for p in packed:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) <= 512
        for a, b in itertools.pairwise(p["position_ids"]):
            assert b in (0, a + 1)
        assert all(
            label == IGNORE_INDEX
            for label, pos in zip(p["labels"], p["position_ids"], strict=True)
            if pos == 0
        )
    trained = sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples)
    assert sum(sum(t != IGNORE_INDEX for t in p["labels"]) for p in packed) == trained


def test_pack_examples_never_splits_a_sample(examples: list[dict[str, list[int]]]) -> None:
    longest = max(len(e["input_ids"]) for e in examples)
    with pytest.raises(ValueError, match="packing needs"):
        pack_examples(examples, longest - 1)


def test_padding_free_collator_sets_sample_boundaries(tokenizer: Any) -> None:
    samples = [{"text": "one two three"}, {"text": "four five"}, {"text": "six"}]
    examples, _ = tokenize_dataset(tokenizer, samples, max_seq_length=64)
    packed = pack_examples(examples, 64)
    assert len(packed) == 1
    for batch_input in (examples, packed):
        batch = PaddingFreeCollator()(batch_input)
        assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
        assert batch["use_cache"] is False
        total = sum(len(e["input_ids"]) for e in examples)
        assert batch["input_ids"].shape == batch["labels"].shape == (1, total)
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert len(starts) == 3
        # Every token is trained (plain text) except the first of each sample: the last token of
        # one sample is never trained to predict the first token of the next.
        assert (batch["labels"][0] == IGNORE_INDEX).nonzero().flatten().tolist() == starts
    assert "use_cache" not in PaddingFreeCollator(disable_cache=False)(examples)


def test_padded_collator(tokenizer: Any, examples: list[dict[str, list[int]]]) -> None:
    collate = PaddedCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    batch = collate(examples[:4])
    lengths = [len(e["input_ids"]) for e in examples[:4]]
    width = -(-max(lengths) // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="PaddingFreeCollator"):
        collate(pack_examples(examples[:4], 1024))


# ------------------------------------------------------------------------------ no cross-talk


@pytest.fixture
def three_samples(tokenizer: Any, gsm8k_rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    samples = [
        _single_turn(gsm8k_rows[0]),
        _multi_turn(gsm8k_rows[1:3]),
        _single_turn(gsm8k_rows[3]),
    ]
    return tokenize_dataset(tokenizer, samples, max_seq_length=1024)[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_per_sample_logits(
    tiny_model_dir: Path, three_samples: list[dict[str, list[int]]], attention: str
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=attention
    ).eval()
    (packed,) = pack_examples(three_samples, 1024)
    batch = PaddingFreeCollator()([packed])
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        offset = 0
        for sample in _split_packed(packed):
            alone = model(input_ids=torch.tensor([sample])).logits[0]
            torch.testing.assert_close(
                logits[offset : offset + len(sample)], alone, atol=1e-5, rtol=1e-5
            )
            offset += len(sample)


def test_packing_needs_use_cache_false(
    model: Any, three_samples: list[dict[str, list[int]]]
) -> None:
    """Why the collator adds use_cache=False: with a cache, transformers skips packed detection."""
    batch = PaddingFreeCollator()(three_samples)
    with torch.no_grad():
        isolated = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        leaking = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits
    first = len(three_samples[0]["input_ids"])
    torch.testing.assert_close(isolated[:, :first], leaking[:, :first])
    assert (isolated[:, first:] - leaking[:, first:]).abs().max() > 1e-2


def test_packed_loss_is_the_token_weighted_mean_of_sample_losses(
    model: Any, three_samples: list[dict[str, list[int]]]
) -> None:
    batch = PaddingFreeCollator()(pack_examples(three_samples, 1024))
    with torch.no_grad():
        packed_loss = model(**batch).loss
        total, count = 0.0, 0
        for sample in three_samples:
            labels = torch.tensor([sample["labels"]])
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=torch.tensor([sample["input_ids"]]), labels=labels).loss
            total += loss.item() * n
            count += n
    torch.testing.assert_close(packed_loss.item(), total / count, atol=1e-5, rtol=1e-5)


def test_packed_batch_trains_exactly_the_assistant_tokens(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    conversations = [_single_turn(gsm8k_rows[0]), _multi_turn(gsm8k_rows[1:4])]
    masks = [tokenize_conversation(tokenizer, c)[1] for c in conversations]
    examples, summary = tokenize_dataset(tokenizer, conversations, max_seq_length=2048)
    batch = PaddingFreeCollator()(pack_examples(examples, 2048))
    trained = int((batch["labels"] != IGNORE_INDEX).sum())
    assert trained == sum(sum(mask) for mask in masks) == summary.trained_tokens
    # ... and they are the assistant answers plus one end-of-turn token per assistant turn.
    labels = batch["labels"][0]
    assert int((labels == tokenizer.eos_token_id).sum()) == 1 + 3


def test_packed_rows_give_the_same_logits_and_loss_as_one_concatenated_row(
    tiny_model_dir: Path, tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    """The training collator (one row per packed sequence, right-padded) is exact."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa"
    ).eval()
    samples = [_single_turn(row) for row in gsm8k_rows[:6]]
    examples = tokenize_dataset(tokenizer, samples, max_seq_length=1024)[0]
    packed = pack_examples(examples, 400)
    assert len(packed) >= 2
    assert len({len(p["input_ids"]) for p in packed}) > 1  # rows of different lengths: padding
    rows = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)(packed)
    single = PaddingFreeCollator()(packed)
    assert rows["input_ids"].shape[0] == len(packed)
    with torch.no_grad():
        row_logits = model(**{k: v for k, v in rows.items() if k != "labels"}).logits
        flat_logits = model(**{k: v for k, v in single.items() if k != "labels"}).logits[0]
        offset = 0
        for index, example in enumerate(packed):
            n = len(example["input_ids"])
            torch.testing.assert_close(
                row_logits[index, :n], flat_logits[offset : offset + n], atol=1e-5, rtol=1e-5
            )
            offset += n
        assert int((rows["labels"] != IGNORE_INDEX).sum()) == int(
            (single["labels"] != IGNORE_INDEX).sum()
        )
        torch.testing.assert_close(model(**rows).loss, model(**single).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lean_training_loss_equals_the_models_own_loss(
    tiny_model_dir: Path, tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    """training/loss.py: cross-entropy on trained positions only == ForCausalLMLoss."""
    from peft import LoraConfig, get_peft_model

    from kubetune_runtime.training.loss import lean_loss_applies, trained_positions_loss

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    samples = [_single_turn(row) for row in gsm8k_rows[:6]]
    examples = tokenize_dataset(tokenizer, samples, max_seq_length=1024)[0]
    batch = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)(pack_examples(examples, 400))
    assert lean_loss_applies(model)
    reference = model(**batch).loss
    lean = trained_positions_loss(model, batch)
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)
    lean.backward()  # gradients flow into the LoRA weights
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
