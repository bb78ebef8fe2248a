"""The architecture is enforced, not just described (STYLE.md habit 6)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_MODULES = [
    *sorted((ROOT / "operator/kubetune_operator/api").glob("*.py")),
    ROOT / "runtime/kubetune_runtime/config.py",
    ROOT / "runtime/kubetune_runtime/result.py",  # the termination message the operator reads
]


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", SCHEMA_MODULES, ids=lambda p: p.name)
def test_schema_modules_import_only_pydantic_and_the_standard_library(path: Path) -> None:
    own = {"kubetune_operator"} if "kubetune_operator" in path.parts else set()
    allowed = set(sys.stdlib_module_names) | {"pydantic", "pydantic_core"} | own
    assert _imported_roots(path) - allowed == set()
    if own:  # within the operator, schema modules import only other schema modules
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kubetune_"):
                assert (node.module or "").startswith("kubetune_operator.api"), node.module


def test_top_level_has_no_package_named_operator() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "runtime" / "__init__.py").exists()


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("kubetune_runtime", ["torch", "transformers", "kopf", "kubernetes"]),
        ("kubetune_runtime.config", ["torch", "transformers", "kopf", "kubernetes"]),
        ("kubetune_operator.cli.main", ["torch", "transformers", "peft", "trl", "kopf"]),
        ("kubetune_operator.render", ["torch", "transformers", "kopf", "kubernetes"]),
        ("kubetune_operator.controller.runner", ["torch", "transformers", "peft", "datasets"]),
    ],
)
def test_importing_does_no_heavy_work(module: str, forbidden: list[str]) -> None:
    """Nothing heavy is imported (or run) at import time; the CLI starts fast."""
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
