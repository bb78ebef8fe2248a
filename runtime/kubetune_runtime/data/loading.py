"""Read dataset rows from local files (JSON, JSONL, gzip, Parquet) or the Hugging Face Hub.

Every row keeps where it came from (:class:`Row`: source and 1-based row number) so that the
format checks in :mod:`kubetune_runtime.data.formats` can name the file and row of a problem.
Only local paths are read here; ``s3://`` sources are downloaded first by
:mod:`kubetune_runtime.storage`, and ``hf://`` datasets go through :func:`load_hub_rows`.
``pyarrow`` and ``datasets`` are imported only by the functions that need them.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kubetune_runtime.errors import DataInvalid, StorageFailure

JSON_SUFFIXES: Final = (".json", ".json.gz")
JSONL_SUFFIXES: Final = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES: Final = (".parquet",)
SUFFIXES: Final = (*JSON_SUFFIXES, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)
_EXPECTED: Final = "expected one of " + ", ".join(SUFFIXES) + " (or a directory of such files)"


@dataclass(frozen=True, slots=True)
class Row:
    """One dataset row and where it came from.

    Attributes:
        source: the file (or URI) the row was read from, as shown in error messages.
        row: 1-based row number within ``source`` (the line number for JSONL files).
        data: the row itself, a JSON object (``dict``) as read from the file.
    """

    source: str
    row: int
    data: dict[str, Any]


def data_files(path: Path) -> list[Path]:
    """The data files ``path`` stands for: itself, or a directory's data files sorted by name.

    In a directory, files whose names start with ``.`` or ``_`` (``.gitattributes``,
    ``_SUCCESS``) and files of other types (``README.md``) are ignored; subdirectories are not
    searched, so ``train/`` and ``test/`` folders never mix.

    Raises:
        DataInvalid: ``path`` does not exist, has an unsupported suffix, or is a directory
            without any data file.
    """
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_file())
        found = [path / n for n in names if n.endswith(SUFFIXES) and not n.startswith((".", "_"))]
        if not found:
            seen = ", ".join(names[:10]) or "nothing"
            raise DataInvalid(
                f"directory has no data files ({_EXPECTED}); found {seen}", source=str(path)
            )
        return found
    if not path.exists():
        raise DataInvalid(f"no such file or directory; {_EXPECTED}", source=str(path))
    if not path.name.endswith(SUFFIXES):
        raise DataInvalid(f"unsupported file type; {_EXPECTED}", source=str(path))
    return [path]


def read_rows(path: Path, *, source: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row number, row)`` for each JSON object or Parquet row in ``path``.

    Supported: ``.jsonl`` (one object per line; the row number is the line number, blank lines
    are skipped), ``.json`` (an array of objects, or an object holding that array under its
    single key, like ``{"data": [...]}``), both optionally gzipped (``.jsonl.gz``, ``.json.gz``),
    and ``.parquet`` (read with pyarrow, in batches). A directory yields its :func:`data_files`
    one after another, each numbered from 1; use :func:`load_rows` to keep the file names.

    Args:
        path: a local file or directory.
        source: the name used in errors (e.g. the ``s3://`` URI the file was downloaded from);
            defaults to ``str(path)``. For a directory the file name is appended to it.

    Raises:
        DataInvalid: the file is missing, of an unsupported type, not valid JSON (naming the
            line), not gzip or Parquet data, or holds something other than JSON objects.
        StorageFailure: the file exists but could not be read (permissions, I/O error).
    """
    name = source or str(path)
    for file in data_files(path):
        yield from _read_file(file, f"{name.rstrip('/')}/{file.name}" if file != path else name)


def load_rows(
    path: Path, *, max_samples: int | None = None, source: str | None = None
) -> list[Row]:
    """Read the rows of a local file or directory (see :func:`read_rows`) as :class:`Row` objects.

    Args:
        path: a local file or directory of data files.
        max_samples: stop after this many rows (the first rows, in file order).
        source: the name used in errors and in ``Row.source``; defaults to ``str(path)``.

    Returns:
        The rows, each tagged with its file and 1-based row number.

    Raises:
        DataInvalid: as :func:`read_rows`, or the path holds no rows at all.
        StorageFailure: as :func:`read_rows`.
    """
    name = source or str(path)
    rows: list[Row] = []
    for file in data_files(path):
        file_name = f"{name.rstrip('/')}/{file.name}" if file != path else name
        for number, data in _read_file(file, file_name):
            if max_samples is not None and len(rows) >= max_samples:
                return rows
            rows.append(Row(file_name, number, data))
    if not rows:
        raise DataInvalid(
            "holds no rows; expected at least one JSON object or Parquet row", source=name
        )
    return rows


def load_hub_rows(
    repo: str,
    revision: str | None,
    split: str,
    subset: str | None,
    token: str | None,
    *,
    max_samples: int | None = None,
) -> list[Row]:
    """Load one split of a Hugging Face Hub dataset with ``datasets.load_dataset``.

    Args:
        repo: the dataset repository, e.g. ``openai/gsm8k``.
        revision: a branch, tag or commit; ``None`` for the default branch.
        split: the split, e.g. ``train`` (slices such as ``train[:1000]`` work too).
        subset: the configuration name (``main`` for gsm8k), or ``None``.
        token: a Hugging Face token for gated or private datasets.
        max_samples: keep only the first rows.

    Returns:
        Rows whose source reads ``hf://repo@revision (subset/split)``.

    Raises:
        DataInvalid: the dataset, subset or split does not exist or cannot be built.
        StorageFailure: the Hub could not be reached or the download failed.
    """
    datasets = importlib.import_module("datasets")
    source = (
        f"hf://{repo}{f'@{revision}' if revision else ''} ({subset + '/' if subset else ''}{split})"
    )
    try:
        dataset = datasets.load_dataset(repo, subset, split=split, revision=revision, token=token)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise DataInvalid(
            f"cannot load this dataset split ({exc}); expected an existing Hub dataset, "
            "subset and split readable by datasets.load_dataset",
            source=source,
        ) from exc
    except (OSError, ConnectionError) as exc:
        raise StorageFailure(f"{source}: download failed: {exc}") from exc
    rows: list[Row] = []
    for number, data in enumerate(dataset, start=1):
        if max_samples is not None and number > max_samples:
            break
        rows.append(Row(source, number, dict(data)))
    if not rows:
        raise DataInvalid("split holds no rows; expected at least one", source=source)
    return rows


def _read_file(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of one data file; wraps decoding and I/O errors (see :func:`read_rows`)."""
    try:
        if path.name.endswith(PARQUET_SUFFIXES):
            yield from _read_parquet(path, source)
            return
        with _open_binary(path) as data:
            if not path.name.endswith(JSONL_SUFFIXES):
                text = _decode(data.read(), source, None)
                yield from _json_document(_parse(text, source, None), source)
                return
            for number, raw in enumerate(data, start=1):
                line = _decode(raw, source, number)
                if line.strip():
                    yield number, _object(_parse(line, source, number), source, number)
    except (EOFError, gzip.BadGzipFile) as exc:
        raise DataInvalid(
            f"is not complete gzip data ({exc}); expected a gzip-compressed file for a .gz name",
            source=source,
        ) from exc
    except FileNotFoundError as exc:
        raise DataInvalid(f"no such file; {_EXPECTED}", source=source) from exc
    except OSError as exc:
        raise StorageFailure(f"{source}: cannot be read: {exc}") from exc


def _open_binary(path: Path) -> io.BufferedIOBase:
    """Open a file for reading, decompressing it when its name ends with ``.gz``."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _decode(data: bytes, source: str, row: int | None) -> str:
    """UTF-8 text (a leading byte-order mark is dropped), else DataInvalid naming the line."""
    try:
        return data.decode("utf-8-sig" if row in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        where = f"line {row}" if row is not None else f"byte {exc.start}"
        raise DataInvalid(
            f"{where} is not UTF-8 text ({exc.reason}); expected UTF-8 encoded JSON",
            source=source,
            row=row,
        ) from exc


def _parse(text: str, source: str, row: int | None) -> Any:
    """``json.loads`` that reports the line (JSONL row) or position of a syntax error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if row is None:
            message = f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            expected = "a JSON array of objects"
        else:
            message = f"line {row} is not valid JSON ({exc.msg} at column {exc.colno})"
            expected = "one JSON object per line"
        raise DataInvalid(f"{message}; expected {expected}", source=source, row=row) from exc


def _object(value: Any, source: str, row: int) -> dict[str, Any]:
    """``value`` if it is a JSON object, else DataInvalid naming the row."""
    if not isinstance(value, dict):
        raise DataInvalid(
            f"expected a JSON object, got {type(value).__name__}", source=source, row=row
        )
    return value


def _json_document(document: Any, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a ``.json`` document: an array, or an object with one key holding the array."""
    if isinstance(document, dict) and len(document) == 1:
        ((key, document),) = document.items()
        if not isinstance(document, list):
            raise DataInvalid(f"expected a list of objects under {key!r}", source=source, field=key)
    if not isinstance(document, list):
        keys = f" with keys {sorted(document)}" if isinstance(document, dict) else ""
        raise DataInvalid(
            f"expected a JSON array of objects, or an object whose single key holds one "
            f'(like {{"data": [...]}}); found {type(document).__name__}{keys}',
            source=source,
        )
    for number, value in enumerate(document, start=1):
        yield number, _object(value, source, number)


def _read_parquet(path: Path, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Parquet file, read in record batches with pyarrow."""
    pq = importlib.import_module("pyarrow.parquet")
    arrow_error = importlib.import_module("pyarrow").ArrowException
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for data in batch.to_pylist():
                number += 1
                yield number, data
    except arrow_error as exc:
        raise DataInvalid(
            f"not a readable Parquet file ({exc}); {_EXPECTED}", source=source, row=number or None
        ) from exc
