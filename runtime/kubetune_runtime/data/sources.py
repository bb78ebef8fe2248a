"""Read a RunConfig data source into rows, wherever it lives (Hub, S3, PVC, local files)."""

from __future__ import annotations

import os
from pathlib import Path

from kubetune_runtime.config import SourceConfig, StorageConfig
from kubetune_runtime.data.loading import Row, load_hub_rows, load_rows
from kubetune_runtime.errors import ConfigInvalid
from kubetune_runtime.storage.fetch import fetch


def load_source(source: SourceConfig, storage: StorageConfig, cache_dir: Path) -> list[Row]:
    """Rows of ``source`` (at most ``max_samples``), each tagged with its file and row number.

    ``hf://org/name[@revision]`` is a Hub dataset loaded with ``datasets`` (split default
    ``train``; token from the environment variable ``source.token_env``); anything else is
    fetched to a local file or folder of .json / .jsonl(.gz) / .parquet files.

    Raises:
        DataInvalid: unreadable or empty data, naming the file and row.
        ConfigInvalid: the token variable is named but empty.
    """
    if source.uri.startswith("hf://"):
        token = None
        if source.token_env:
            token = os.environ.get(source.token_env)
            if not token:
                raise ConfigInvalid(f"environment variable {source.token_env} is empty")
        repo, _, revision = source.uri.removeprefix("hf://").partition("@")
        return load_hub_rows(
            repo,
            revision or None,
            source.split or "train",
            source.subset,
            token,
            max_samples=source.max_samples,
        )
    path = fetch(source.uri, storage, cache_dir)
    return load_rows(path, max_samples=source.max_samples, source=source.uri)
