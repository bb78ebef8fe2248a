"""The built-in engine end to end: real LoRA adapters trained by the runtime, served together.

Three adapters are trained once per session on the tiny model with `kubetune-runtime train`
(different seeds, data slices and learning rates, a few steps each, in parallel). Every
output is compared with plain PEFT (`PeftModel.from_pretrained(base, adapter)` alone,
greedy `generate`) token by token, for both per-row LoRA kernels.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from kubetune_runtime.serving.engine import (
    BASE,
    EngineError,
    EngineSettings,
    Finished,
    SamplingParams,
    ServingEngine,
)
from kubetune_runtime.serving.server import ADMIN_HOST, Listeners, create_admin_app, create_app
from kubetune_runtime.storage.artifacts import write_manifest
from tests.integration.runtime_support import GSM8K_TRAIN
from tests.integration.serving_support import MAX_TOKENS, PROMPTS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data is missing"),
    # PEFT reads this deprecated transformers property when it wraps a model.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

BASE_NAME = "tiny"
ADMIN_KEY = "s3cret-admin-key"
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


# ---------------------------------------------------------------------------- fixtures


def _engine(model_dir: Path, **overrides: Any) -> ServingEngine:
    settings: dict[str, Any] = {
        "model_dir": model_dir,
        "served_model_name": BASE_NAME,
        "max_batch_delay_ms": 150.0,  # long enough that concurrent requests share a batch
        "max_loras": 4,
        "max_lora_rank": 16,
    }
    settings.update(overrides)
    return ServingEngine.load(EngineSettings(**settings))


@pytest.fixture(scope="module", params=["stacked", "peft"])
def engine(
    request: pytest.FixtureRequest, tiny_model_dir: Path, adapters: dict[str, Path]
) -> Iterator[ServingEngine]:
    """The engine serving A, B and C, once per LoRA kernel."""
    served = _engine(tiny_model_dir, lora_kernel=request.param)
    for name, path in adapters.items():
        served.load_adapter_blocking(name, str(path))
    yield served
    served.close()


def _model(name: str) -> str:
    return BASE_NAME if name == BASE else name


def _generate_together(
    engine: ServingEngine, jobs: list[tuple[str, list[int], SamplingParams]]
) -> list[Finished]:
    """Submit every job at once (one event loop) and wait for all of them."""

    async def run() -> list[Finished]:
        requests = [engine.stream(model, ids, params) for model, ids, params in jobs]
        return list(await asyncio.gather(*(r.result() for r in requests)))

    return asyncio.run(run())


# ---------------------------------------------------------------------------- routing


def test_each_request_gets_its_adapter_and_matches_peft_alone(
    engine: ServingEngine, reference: dict[tuple[str, int], list[int]]
) -> None:
    client = TestClient(create_app(engine), base_url="http://test")
    outputs = {}
    for name in (BASE, "a", "b", "c"):
        ids = engine.encode_text(PROMPTS[0])
        result = engine.generate(_model(name), ids, GREEDY, timeout=60)
        assert list(result.token_ids) == reference[name, 0], name
        outputs[name] = tuple(result.token_ids)
        # The same through HTTP: the text of exactly those tokens.
        response = client.post(
            "/v1/completions",
            json={
                "model": _model(name),
                "prompt": PROMPTS[0],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == engine.decode(reference[name, 0])
        assert body["usage"]["completion_tokens"] == len(reference[name, 0])
        assert body["model"] == _model(name)
    assert len(set(outputs.values())) == 4, outputs  # A, B, C and the base all differ


def test_a_mixed_batch_is_one_batch_and_equals_sequential_requests(
    engine: ServingEngine, reference: dict[tuple[str, int], list[int]]
) -> None:
    names = [BASE, "a", "b", "c"]
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=7)
    # Different prompt lengths (left padding) and one sampled row with its own seed.
    jobs = [(_model(name), engine.encode_text(PROMPTS[i]), GREEDY) for i, name in enumerate(names)]
    jobs.append(("b", engine.encode_text(PROMPTS[1]), sampled))
    alone = [engine.generate(model, ids, params, timeout=60) for model, ids, params in jobs]
    before = engine.stats.batches
    together = _generate_together(engine, jobs)

    assert engine.stats.batches == before + 1  # all five rows ran as one batch
    assert sorted(engine.stats.recent_batches[-1]) == sorted([*names, "b"])
    for (model, _, _), one, batched in zip(jobs, alone, together, strict=True):
        assert batched.token_ids == one.token_ids, model
        assert batched.text == one.text
    for i, name in enumerate(names):
        assert list(together[i].token_ids) == reference[name, i], name


# ---------------------------------------------------------------------------- adapters


@pytest.fixture
def admin(engine: ServingEngine) -> TestClient:
    app = create_admin_app(engine, admin_key=ADMIN_KEY)
    return TestClient(
        app, base_url="http://admin", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )


@pytest.fixture
def api(engine: ServingEngine) -> TestClient:
    return TestClient(create_app(engine), base_url="http://api")


def _model_ids(api: TestClient) -> dict[str, Any]:
    return {card["id"]: card for card in api.get("/v1/models").json()["data"]}


def test_adapters_are_added_and_removed_without_restarting(
    *,
    engine: ServingEngine,
    admin: TestClient,
    api: TestClient,
    adapters: dict[str, Path],
    tmp_path: Path,
    reference: dict[tuple[str, int], list[int]],
) -> None:
    extra = shutil.copytree(adapters["a"], tmp_path / "d")
    completion = {"model": "d", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    assert api.post("/v1/completions", json=completion).status_code == 404

    loaded = admin.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": str(extra)})
    assert loaded.status_code == 200, loaded.text
    assert loaded.text == "Success: LoRA adapter 'd' added successfully."
    card = _model_ids(api)["d"]
    assert card["root"] == str(extra)
    assert card["parent"] == BASE_NAME
    served = api.post("/v1/completions", json=completion)
    assert served.status_code == 200
    assert served.json()["choices"][0]["text"] == engine.decode(reference["a", 0])

    again = admin.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": str(extra)})
    assert again.status_code == 400
    assert "has already been loaded" in again.json()["error"]["message"]
    full = admin.post("/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": str(extra)})
    assert full.status_code == 400  # max_loras is 4: A, B, C and D
    assert "capacity" in full.json()["error"]["message"]

    removed = admin.post("/v1/unload_lora_adapter", json={"lora_name": "d"})
    assert removed.status_code == 200
    assert removed.text == "Success: LoRA adapter 'd' removed successfully."
    assert "d" not in _model_ids(api)
    gone = api.post("/v1/completions", json=completion)
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"
    unknown = admin.post("/v1/unload_lora_adapter", json={"lora_name": "d"})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "The lora adapter 'd' cannot be found.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    # The others were untouched.
    assert {BASE_NAME, "a", "b", "c"} == set(_model_ids(api))


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _wrong_base(directory: Path) -> None:
    _edit_config(
        directory, base_model_name_or_path="meta-llama/Llama-3.2-1B", target_modules=["c_attn"]
    )
    write_manifest(directory, metadata={"baseModel": "hf://meta-llama/Llama-3.2-1B"})


def _wrong_base_plain(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    _edit_config(directory, base_model_name_or_path="openai-community/gpt2")


def _rank_too_high(directory: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = json.loads((directory / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    shutil.rmtree(directory)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(str(directory))


def _weights_missing(directory: Path) -> None:
    (directory / "adapter_model.safetensors").unlink()


def _weights_tampered(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _weights_truncated_no_manifest(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _config_missing_no_manifest(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    (directory / "adapter_config.json").unlink()


def _dora(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    _edit_config(directory, use_dora=True)


def _modules_to_save(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    _edit_config(directory, modules_to_save=["lm_head"])


def _not_lora(directory: Path) -> None:
    (directory / "manifest.json").unlink()
    _edit_config(directory, peft_type="IA3")


@pytest.mark.parametrize(
    ("damage", "status", "fragments"),
    [
        pytest.param(
            _wrong_base,
            400,
            ["trained on hf://meta-llama/llama-3.2-1b", "serves", "c_attn"],
            id="wrong-base",
        ),
        pytest.param(
            _wrong_base_plain, 400, ["trained on hf://openai-community/gpt2"], id="wrong-base-peft"
        ),
        pytest.param(_rank_too_high, 400, ["rank 32 exceeds max_lora_rank 16"], id="rank"),
        pytest.param(
            _weights_missing, 400, ["adapter_model.safetensors: missing"], id="missing-weights"
        ),
        pytest.param(_weights_tampered, 400, ["differs from the manifest"], id="tampered"),
        pytest.param(
            _weights_truncated_no_manifest, 400, ["not a valid safetensors file"], id="truncated"
        ),
        pytest.param(
            _config_missing_no_manifest, 400, ["adapter_config.json is missing"], id="no-config"
        ),
        pytest.param(_not_lora, 400, ["only LORA adapters are served"], id="not-lora"),
        pytest.param(_dora, 400, ["DoRA adapter"], id="dora"),
        pytest.param(_modules_to_save, 400, ["modules_to_save"], id="modules-to-save"),
    ],
)
def test_incompatible_or_damaged_adapters_are_refused_with_the_reason(
    *,
    engine: ServingEngine,
    admin: TestClient,
    api: TestClient,
    adapters: dict[str, Path],
    tmp_path: Path,
    damage: Any,
    status: int,
    fragments: list[str],
) -> None:
    directory = shutil.copytree(adapters["a"], tmp_path / "bad")
    damage(directory)
    before = set(_model_ids(api))
    response = admin.post(
        "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(directory)}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    assert set(_model_ids(api)) == before


def test_a_missing_folder_is_not_found(admin: TestClient, tmp_path: Path) -> None:
    response = admin.post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "NotFoundError"


# ---------------------------------------------------------------------------- listeners


@pytest.fixture
def listeners(engine: ServingEngine) -> Iterator[Listeners]:
    """Both listeners on ephemeral ports, the inference one on every interface."""
    served = Listeners(engine, host="0.0.0.0", port=0, admin_port=0, admin_key=ADMIN_KEY)  # noqa: S104
    thread = threading.Thread(target=asyncio.run, args=(served.run(),), daemon=True)
    thread.start()
    for _ in range(200):
        if served.started:
            break
        threading.Event().wait(0.05)
    assert served.started
    yield served
    served.stop()
    thread.join(15)


def test_admin_routes_exist_only_on_the_loopback_admin_listener(
    listeners: Listeners, engine: ServingEngine
) -> None:
    bound = listeners.addresses()
    assert bound["admin"][0] == ADMIN_HOST == "127.0.0.1"
    assert bound["inference"][0] == "0.0.0.0"  # noqa: S104
    inference = f"http://127.0.0.1:{bound['inference'][1]}"
    admin = f"http://127.0.0.1:{bound['admin'][1]}"
    key = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"lora_name": "x", "lora_path": "/nowhere"}
    with httpx.Client(timeout=30) as client:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            response = client.post(inference + path, json=body, headers=key)
            assert response.status_code in (404, 405)
            assert "error" in response.json()
        assert client.get(inference + "/health").status_code == 200
        assert client.get(admin + "/health").status_code == 200
        unauthorized = client.post(admin + "/v1/load_lora_adapter", json=body)
        assert unauthorized.status_code == 401
        wrong = client.post(
            admin + "/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert (
            client.post(admin + "/v1/load_lora_adapter", json=body, headers=key).status_code == 404
        )
        assert client.get(admin + "/v1/models", headers=key).status_code == 200
        # Streaming over a real socket: chunks, then [DONE].
        with client.stream(
            "POST",
            inference + "/v1/completions",
            json={
                "model": "a",
                "prompt": PROMPTS[1],
                "max_tokens": 4,
                "temperature": 0,
                "stream": True,
            },
        ) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        # A client that goes away stops its generation.
        generated = engine.stats.generated_tokens
        with client.stream(
            "POST",
            inference + "/v1/completions",
            json={
                "model": "a",
                "prompt": "x",
                "max_tokens": 900,
                "ignore_eos": True,
                "stream": True,
            },
        ) as stream:
            next(line for line in stream.iter_lines() if line)
        for _ in range(100):
            if engine.in_flight == 0:
                break
            threading.Event().wait(0.05)
        assert engine.in_flight == 0
        assert engine.stats.generated_tokens - generated < 900


def test_the_admin_listener_binds_the_loopback_address_it_is_given(engine: ServingEngine) -> None:
    """A test harness gives each emulated pod its own 127.0.0.N: both listeners bind there."""
    served = Listeners(engine, host="127.0.0.5", port=0, admin_host="127.0.0.5", admin_port=0)
    thread = threading.Thread(target=asyncio.run, args=(served.run(),), daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if served.started:
                break
            threading.Event().wait(0.05)
        assert served.started
        bound = served.addresses()
        assert bound["admin"][0] == bound["inference"][0] == "127.0.0.5"
        with httpx.Client(timeout=30) as client:
            assert client.get(f"http://127.0.0.5:{bound['admin'][1]}/health").status_code == 200
            with pytest.raises(httpx.ConnectError):  # nothing on the default loopback address
                client.get(f"http://127.0.0.1:{bound['admin'][1]}/health")
    finally:
        served.stop()
        thread.join(15)
    for address in ("0.0.0.0", "10.0.0.1", "::", "localhost"):  # noqa: S104
        with pytest.raises(ValueError, match="never reachable from outside the pod"):
            Listeners(engine, port=0, admin_host=address, admin_port=0)


# ---------------------------------------------------------------------------- OpenAI API


def _events(response: Any) -> list[Any]:
    lines = [line for line in response.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streamed_completions_and_chat_equal_the_whole_answers(api: TestClient) -> None:
    request = {"model": "b", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = api.post("/v1/completions", json=request).json()
    streamed = api.post(
        "/v1/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = _events(streamed)
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]

    chat = {
        "model": "c",
        "messages": [{"role": "user", "content": PROMPTS[3]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    answer = api.post("/v1/chat/completions", json=chat).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    chat_chunks = _events(api.post("/v1/chat/completions", json={**chat, "stream": True}))
    assert chat_chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chat_chunks)
    assert content == answer["choices"][0]["message"]["content"]
    assert chat_chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]


def test_stop_sequences_cut_the_text(
    api: TestClient, engine: ServingEngine, reference: dict[tuple[str, int], list[int]]
) -> None:
    full = engine.decode(reference["a", 0])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    request = {
        "model": "a",
        "prompt": PROMPTS[0],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stop": [stop],
    }
    choice = api.post("/v1/completions", json=request).json()["choices"][0]
    assert choice == {
        "index": 0,
        "text": full[: full.index(stop)],
        "logprobs": None,
        "finish_reason": "stop",
    }
    chunks = _events(api.post("/v1/completions", json={**request, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        pytest.param(
            "/v1/completions",
            {"model": "zz", "prompt": "x"},
            404,
            "model",
            "model_not_found",
            id="unknown-model",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"model": "zz", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model",
            "model_not_found",
            id="unknown-model-chat",
        ),
        pytest.param(
            "/v1/completions", {"model": "a", "prompt": "x", "n": 2}, 400, "n", None, id="n"
        ),
        pytest.param(
            "/v1/completions",
            {"model": "a", "prompt": "x", "temperature": 5},
            400,
            "temperature",
            None,
            id="temperature",
        ),
        pytest.param("/v1/completions", {"model": "a"}, 400, "prompt", None, id="no-prompt"),
        pytest.param(
            "/v1/completions",
            {"model": "a", "prompt": "x", "stop": ["1", "2", "3", "4", "5"]},
            400,
            "stop",
            None,
            id="stops",
        ),
        pytest.param(
            "/v1/completions",
            {"model": "a", "prompt": "x", "max_tokens": 5000},
            400,
            "max_tokens",
            "context_length_exceeded",
            id="too-long",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"model": "a", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            400,
            "logprobs",
            None,
            id="logprobs",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"model": "a", "messages": []},
            400,
            "messages",
            None,
            id="no-messages",
        ),
    ],
)
def test_errors_have_openais_shape(
    *, api: TestClient, path: str, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    response = api.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code


def test_malformed_oversized_and_unknown_requests(engine: ServingEngine) -> None:
    client = TestClient(create_app(engine, max_request_bytes=2048), base_url="http://api")
    malformed = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    oversized = client.post("/v1/completions", json={"model": "a", "prompt": "x" * 5000})
    assert oversized.status_code == 413
    assert "exceeds 2048 bytes" in oversized.json()["error"]["message"]
    unknown = client.get("/v1/nothing")
    assert unknown.status_code == 404
    assert "error" in unknown.json()


def test_requests_beyond_the_queue_limit_get_429(tiny_model_dir: Path) -> None:
    small = _engine(tiny_model_dir, max_queued_requests=1, max_batch_delay_ms=2000.0)
    try:
        waiting = small.submit(BASE_NAME, small.encode_text("x"), GREEDY, lambda _: None)
        client = TestClient(create_app(small), base_url="http://api")
        response = client.post("/v1/completions", json={"model": BASE_NAME, "prompt": "y"})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        waiting.cancel()
        with pytest.raises(EngineError, match="model `zz` does not exist"):
            small.submit("zz", [1], GREEDY, lambda _: None)
    finally:
        small.close()


# ---------------------------------------------------------------------------- command line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_command_preloads_adapters_and_stops_on_sigterm(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text(ADMIN_KEY + "\n")
    port, admin_port = _free_port(), _free_port()
    command = [
        sys.executable,
        "-c",
        "import sys; from kubetune_runtime.serving.server import main; "
        "sys.exit(main(sys.argv[1:]))",
        *("--model", str(tiny_model_dir), "--served-model-name", BASE_NAME),
        *("--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port)),
        *("--admin-key-file", str(key_file), "--lora", f"a={adapters['a']}"),
    ]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(timeout=5) as client:
            for _ in range(600):
                try:
                    if client.get(f"http://127.0.0.1:{admin_port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, server.communicate()[1][-3000:]
                threading.Event().wait(0.1)
            models = client.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
            assert [card["id"] for card in models] == [BASE_NAME, "a"]
            assert client.get(f"http://127.0.0.1:{admin_port}/v1/models").status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr[-3000:]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.5", "127.255.255.254", "::1"])
def test_serve_accepts_loopback_admin_hosts(address: str) -> None:
    from kubetune_runtime.serving.server import build_parser

    args = build_parser().parse_args(["--model", "m", "--admin-host", address])
    assert args.admin_host == address
    assert build_parser().parse_args(["--model", "m"]).admin_host == ADMIN_HOST == "127.0.0.1"


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0",  # noqa: S104
        "10.0.0.1",
        "192.168.1.5",
        "::",
        "::ffff:127.0.0.1",
        "fe80::1",
        "128.0.0.1",
        "localhost",
        "",
    ],
)
def test_serve_refuses_admin_hosts_outside_loopback(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune_runtime.serving.server import build_parser, main

    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["--model", "m", "--admin-host", address])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "--admin-host" in err
    assert "never reachable from outside the pod" in err
    with pytest.raises(SystemExit) as usage:  # refused before the model is loaded
        main(["--model", "/nonexistent", "--admin-host", address])
    assert usage.value.code == 2


def test_serve_command_refuses_bad_arguments(tmp_path: Path) -> None:
    from kubetune_runtime.serving.server import main

    assert main(["--model", str(tmp_path / "missing"), "--port", "0", "--admin-port", "0"]) == 3
    with pytest.raises(SystemExit) as usage:
        main(["--model", str(tmp_path), "--lora", "no-equals-sign"])
    assert usage.value.code == 2
