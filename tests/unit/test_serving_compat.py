"""The built-in engine's pure parts: adapter checks, stop sequences, sampling, request models."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_runtime.serving.compat import (
    base_model_problems,
    check_compatibility,
    check_lora_weights,
    highest_rank,
    model_identity,
    read_adapter_dir,
)
from kubetune_runtime.serving.openai import ChatCompletionRequest, CompletionRequest

MODULES = {
    f"model.layers.{i}.{part}"
    for i in range(2)
    for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
}
SERVED = ("s3://models/tiny", "/models/tiny")


def _config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "/workspace/cache/ab12",  # a trainer's download path
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
    }
    config.update(changes)
    return config


def _problems(
    config: dict[str, Any], metadata: dict[str, Any] | None = None, **kw: Any
) -> list[str]:
    settings: dict[str, Any] = {
        "base_model": SERVED,
        "max_rank": 16,
        "module_names": MODULES,
        "allow_dora": False,
        "allow_modules_to_save": False,
        "metadata": metadata,
    }
    settings.update(kw)
    return check_compatibility(config, **settings)


@pytest.mark.parametrize(
    ("config", "metadata", "expected"),
    [
        pytest.param(_config(), None, [], id="compatible"),
        pytest.param(
            _config(), {"baseModel": "s3://models/tiny/"}, [], id="manifest-names-the-base"
        ),
        pytest.param(
            _config(base_model_name_or_path="/models/tiny"), None, [], id="peft-names-the-folder"
        ),
        pytest.param(
            _config(base_model_name_or_path="file:///models/tiny/"), None, [], id="file-uri"
        ),
        pytest.param(
            _config(),
            {"baseModel": "hf://meta-llama/Llama-3.2-1B"},
            ["trained on hf://meta-llama/llama-3.2-1b (the manifest's baseModel)"],
            id="manifest-other-base",
        ),
        pytest.param(
            _config(base_model_name_or_path="Qwen/Qwen2.5-0.5B"),
            None,
            ["trained on hf://qwen/qwen2.5-0.5b (adapter_config.json's base_model_name_or_path)"],
            id="peft-other-hub-model",
        ),
        pytest.param(_config(peft_type="IA3"), None, ["only LORA adapters"], id="not-lora"),
        pytest.param(_config(task_type="SEQ_CLS"), None, ["only CAUSAL_LM"], id="task"),
        pytest.param(_config(r=32), None, ["rank 32 exceeds max_lora_rank 16"], id="rank"),
        pytest.param(
            _config(rank_pattern={"q_proj": 64}), None, ["rank 64 exceeds"], id="rank-pattern"
        ),
        pytest.param(_config(r=0), None, ["no valid rank"], id="no-rank"),
        pytest.param(_config(use_dora=True), None, ["DoRA"], id="dora"),
        pytest.param(_config(modules_to_save=["lm_head"]), None, ["modules_to_save"], id="mts"),
        pytest.param(_config(bias="all"), None, ["bias is 'all'"], id="bias"),
        pytest.param(
            _config(layer_replication=[[0, 2]]), None, ["layer_replication"], id="replication"
        ),
        pytest.param(
            _config(target_modules=["c_attn", "q_proj"]),
            None,
            ["targets modules the base model does not have: c_attn"],
            id="missing-target",
        ),
        pytest.param(_config(target_modules="all-linear"), None, [], id="all-linear"),
        pytest.param(_config(target_modules=r".*\.q_proj"), None, [], id="regex"),
        pytest.param(
            _config(target_modules=r".*\.c_attn"), None, ["matches no layer"], id="regex-misses"
        ),
        pytest.param(_config(target_modules=None), None, ["names no target_modules"], id="none"),
    ],
)
def test_check_compatibility(
    config: dict[str, Any], metadata: dict[str, Any] | None, expected: list[str]
) -> None:
    problems = _problems(config, metadata)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem


def test_allowances_and_callers_without_the_model() -> None:
    config = _config(use_dora=True, modules_to_save=["lm_head"], target_modules=["nope"])
    assert _problems(config, allow_dora=True, allow_modules_to_save=True, module_names=None) == []


@pytest.mark.parametrize(
    ("reference", "kind", "ref", "revision"),
    [
        ("hf://Org/Name@abc", "hf", "org/name", "abc"),
        ("Org/Name", "hf", "org/name", None),
        ("s3://b/k/", "s3", "s3://b/k", None),
        ("file:///data/m/", "path", "/data/m", None),
        ("/data/./m/", "path", "/data/m", None),
    ],
)
def test_model_identity(reference: str, kind: str, ref: str, revision: str | None) -> None:
    identity = model_identity(reference)
    assert (identity.kind, identity.ref, identity.revision) == (kind, ref, revision)


def test_revisions_must_agree_when_both_are_pinned() -> None:
    config = _config(base_model_name_or_path="org/name", revision="abc1234")
    assert base_model_problems(config, base_model=["hf://org/name@abc1234def"]) == []
    assert base_model_problems(config, base_model=["hf://org/name"]) == []
    assert base_model_problems(config, base_model=["hf://org/name@ffff"])


def test_highest_rank() -> None:
    assert highest_rank({"r": 8, "rank_pattern": {"a": 4, "b": 32}}) == 32
    assert highest_rank({"r": True}) is None


def test_check_lora_weights_compares_shapes_with_the_base() -> None:
    shapes = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [8, 128],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [128, 8],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": [8, 352],
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": [256, 8],
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": [8, 128],
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": [128, 8],
    }
    module_shapes = {
        "model.layers.0.self_attn.q_proj": (128, 128),
        "model.layers.0.mlp.down_proj": (352, 128),
    }
    problems = check_lora_weights(shapes, module_shapes=module_shapes)
    assert problems == [
        "its weights adapt layers the base model does not have: model.layers.9.self_attn.q_proj",
        "its weights do not fit the base model's layers: model.layers.0.mlp.down_proj "
        "(adapter 352 -> 256, base layer 352 -> 128)",
    ]
    assert check_lora_weights({}, module_shapes=module_shapes) == [
        "adapter_model.safetensors holds no LoRA weights (no lora_A / lora_B tensors)"
    ]


def _safetensors(path: Path, tensors: dict[str, list[int]], *, cut: int = 0) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + bytes(offset)
    path.write_bytes(data[: len(data) - cut])


def test_read_adapter_dir(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(_config()))
    _safetensors(tmp_path / "adapter_model.safetensors", {"x.lora_A.weight": [8, 4]})
    files = read_adapter_dir(tmp_path)
    assert files.problems == ()
    assert files.shapes == {"x.lora_A.weight": (8, 4)}
    assert files.config["r"] == 8

    _safetensors(tmp_path / "adapter_model.safetensors", {"x.lora_A.weight": [8, 4]}, cut=3)
    assert "header describes" in read_adapter_dir(tmp_path).problems[0]
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    (tmp_path / "adapter_config.json").write_text("[1]")
    assert read_adapter_dir(tmp_path).problems == (
        "adapter_config.json is not a JSON object",
        "adapter_model.safetensors is missing (adapter_model.bin holds pickled weights, which "
        "are never loaded)",
    )


# ---------------------------------------------------------------------------- text and sampling


def _decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize(
    ("text", "stop", "released", "final", "stopped"),
    [
        pytest.param("hello world", [], list("hello world"), "hello world", False, id="no-stop"),
        pytest.param("hello world", [" wo"], [*"hello", *[""] * 6], "hello", True, id="stop"),
        pytest.param("ab abc", ["abd"], ["", "", "ab ", "", "", "abc"], "ab abc", False, id="held"),
        pytest.param("ab\ufffdc", [], ["a", "b", "", "\ufffdc"], "ab\ufffdc", False, id="utf8"),
    ],
)
def test_text_stream(
    text: str, stop: list[str], released: list[str], final: str, stopped: bool
) -> None:
    from kubetune_runtime.serving.batching import TextStream

    stream = TextStream(_decode, stop)
    pushed = [stream.push(ord(c)) for c in text]
    assert pushed == released
    assert "".join(pushed) + stream.finish() == final == stream.text
    assert stream.stopped is stopped


def test_sampling_is_greedy_at_zero_and_seeded_otherwise() -> None:
    torch = pytest.importorskip("torch")
    from kubetune_runtime.serving.batching import SamplingParams, left_pad, next_tokens

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert next_tokens(logits, [greedy, greedy], [None, None]) == [1, 0]
    sampled = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.6)

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [next_tokens(logits[:1], [sampled], [generator])[0] for _ in range(20)]

    assert draws(3) == draws(3)
    assert set(draws(3)) <= {1, 3}  # top_p keeps the two likeliest tokens

    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


# ---------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logprobs": 1}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ""}, "stop"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_unsupported_completion_parameters_are_refused(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", **body})
    assert info.value.errors()[0]["loc"][0] == field


def test_prompts_and_neutral_values() -> None:
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": [1, 2], "n": 1, "presence_penalty": 0, "unknown": True}
    )
    assert request.prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt="a", stop="x").stop_sequences() == ("x",)
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        }
    )
    assert chat.messages[0].text() == "hi"
    assert chat.token_limit() == 7
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}
        )
