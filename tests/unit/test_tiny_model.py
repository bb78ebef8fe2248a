"""The tiny test model: a real BPE tokenizer on GSM8K, a Llama model, an HF directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kubetune_runtime.models import tiny  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _texts(rows: list[dict[str, str]]) -> list[str]:
    return [row["question"] + "\n" + row["answer"] for row in rows]


def _mean_loss(model: Any, tokenizer: Any, texts: list[str]) -> float:
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            losses.append(model(input_ids=ids, labels=ids, use_cache=False).loss.item())
    return sum(losses) / len(losses)


def test_directory_is_a_complete_hugging_face_model(tiny_model_dir: Path, tokenizer: Any) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == len(tokenizer) == 2048
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


def test_tokenizer_is_a_real_bpe_that_round_trips_text(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    texts = _texts(gsm8k_rows[:50])
    texts.append("Unseen: naïve café, 12,345.67 \u00d7 2 = ?\n\ttabs and émojis 🙂")
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    corpus = "".join(texts[:50])
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts[:50])
    assert n_tokens < len(corpus.encode()) / 3  # merges learned: well under one token per byte


def test_special_tokens_are_distinct_and_pad_is_not_eos(
    tokenizer: Any, tiny_model_dir: Path
) -> None:
    assert tokenizer.bos_token == tiny.BOS_TOKEN
    assert tokenizer.eos_token == tiny.EOS_TOKEN
    assert tokenizer.pad_token == tiny.PAD_TOKEN
    assert tokenizer.unk_token == tiny.UNK_TOKEN
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert len(set(ids)) == 3
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert generation["pad_token_id"] == tokenizer.pad_token_id


def test_chat_template_writes_bos_once_and_marks_assistant_turns(
    tokenizer: Any, gsm8k_rows: list[dict[str, str]]
) -> None:
    row = gsm8k_rows[0]
    messages = [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": row["answer"]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith(tiny.BOS_TOKEN)
    assert text.count(tiny.BOS_TOKEN) == 1
    encoded = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert ids.count(tokenizer.bos_token_id) == 1
    masked = [i for i, bit in zip(ids, mask, strict=True) if bit]
    assert tokenizer.decode(masked) == row["answer"] + tiny.EOS_TOKEN
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)


def test_forward_and_generate(model: Any, tokenizer: Any) -> None:
    ids = torch.tensor([tokenizer("Natalia sold 48 clips.")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    # Random initialisation predicts roughly uniformly: loss close to ln(vocab).
    assert abs(out.loss.item() - math.log(len(tokenizer))) < 0.5
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] <= ids.shape[1] + 4
    assert model.num_parameters() < 2_000_000


def test_build_is_deterministic_for_a_seed(
    tmp_path: Path, tiny_model_dir: Path, gsm8k_rows: list[dict[str, str]]
) -> None:
    from safetensors.torch import load_file

    texts = _texts(gsm8k_rows)
    state = torch.get_rng_state()
    same = tiny.build_tiny_model(tmp_path / "same", texts)
    other = tiny.build_tiny_model(tmp_path / "other", texts, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    reference = load_file(tiny_model_dir / "model.safetensors")
    rebuilt = load_file(same / "model.safetensors")
    assert all(torch.equal(reference[k], rebuilt[k]) for k in reference)
    assert (same / "tokenizer.json").read_bytes() == (
        tiny_model_dir / "tokenizer.json"
    ).read_bytes()
    different = load_file(other / "model.safetensors")
    assert not torch.equal(reference["lm_head.weight"], different["lm_head.weight"])


def test_pretraining_lowers_the_loss(
    tmp_path: Path, tiny_model_dir: Path, gsm8k_rows: list[dict[str, str]]
) -> None:
    texts = _texts(gsm8k_rows)
    held_out = _texts(gsm8k_rows[-8:])
    # The fixture's tokenizer corpus (so the same tokenizer); held-out rows are not pre-trained on.
    pretrained_dir = tiny.build_tiny_model(
        tmp_path / "pretrained", texts, pretrain_steps=8, pretrain_texts=texts[:-8]
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(pretrained_dir).eval()
    before = _mean_loss(base, tokenizer, held_out)
    after = _mean_loss(pretrained, tokenizer, held_out)
    assert after < before - 0.5, (before, after)  # about 7.7 -> 6.7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"heads": 3}, "divisible", id="heads"),
        pytest.param({"kv_heads": 3}, "divisible", id="kv-heads"),
        pytest.param({"vocab_size": 100}, "too small", id="vocab"),
        pytest.param({"pretrain_steps": -1}, "pretrain_steps", id="steps"),
    ],
)
def test_invalid_sizes_are_rejected(tmp_path: Path, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny.build_tiny_model(tmp_path, ["some text", "more text"], **kwargs)


def test_empty_corpus_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one text"):
        tiny.build_tiny_model(tmp_path, [])
