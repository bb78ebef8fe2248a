"""The manifests in examples/ are documentation: they must validate, and cover every kind."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from kubetune_operator.cli.main import main
from kubetune_operator.validation import load_documents

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))

REQUIRED_EXAMPLES = {
    "finetunejob-lora-gsm8k.yaml": "FineTuneJob",
    "finetunejob-qlora-sft.yaml": "FineTuneJob",
    "finetunejob-dpo-hh-rlhf.yaml": "FineTuneJob",
    "finetunejob-full-zero3-2x8.yaml": "FineTuneJob",
    "evaljob-gates.yaml": "EvalJob",
    "adapterdeployment-three-adapters.yaml": "AdapterDeployment",
}


def _documents(path: Path) -> list[dict[str, object]]:
    return load_documents(path.read_text(encoding="utf-8"))


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def test_required_examples_exist_with_their_kinds() -> None:
    names = {path.name for path in EXAMPLES}
    assert set(REQUIRED_EXAMPLES) <= names, sorted(set(REQUIRED_EXAMPLES) - names)
    for name, kind in REQUIRED_EXAMPLES.items():
        kinds = [doc["kind"] for doc in _documents(EXAMPLES_DIR / name)]
        assert kinds == [kind], f"{name}: {kinds}"


def test_examples_cover_every_kind() -> None:
    kinds = Counter(doc["kind"] for path in EXAMPLES for doc in _documents(path))
    assert kinds["FineTuneJob"] >= 4
    assert kinds["EvalJob"] >= 1
    assert kinds["AdapterDeployment"] >= 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_validates_through_the_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.rstrip().endswith(": valid")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_is_commented(path: Path) -> None:
    comments = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.lstrip().startswith("#")
    ]
    assert len(comments) >= 10, f"{path.name} explains too little ({len(comments)} comment lines)"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_pins_hub_revisions(path: Path) -> None:
    for doc in _documents(path):
        for value in _strings(doc.get("spec")):
            if value.startswith("hf://"):
                assert re.search(r"@[0-9a-f]{40}$", value), f"{path.name}: unpinned {value}"


def _finetunejob(name: str, learning_rate: str) -> dict[str, object]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"train": {"uri": "s3://datasets/gsm8k/train.jsonl"}},
            "training": {"learningRate": learning_rate},
            "output": {"uri": f"s3://models/{name}"},
        },
    }


def test_validate_reports_the_invalid_document_of_a_multi_document_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text(
        yaml.safe_dump_all([_finetunejob("good-lr", "2e-4"), _finetunejob("bad-lr", "2")]),
        encoding="utf-8",
    )

    assert main(["validate", str(manifest)]) == 1

    captured = capsys.readouterr()
    assert f"{manifest}[0] FineTuneJob/good-lr: valid" in captured.out
    assert f"{manifest}[1] FineTuneJob/bad-lr: spec.training.learningRate: " in captured.err
    assert "learningRate must be > 0.0 and <= 1.0" in captured.err
    assert "good-lr" not in captured.err
    assert "1 of 2 manifests invalid" in captured.err
