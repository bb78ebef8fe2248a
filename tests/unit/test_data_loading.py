"""Reading rows from local JSON, JSONL, gzip and Parquet files, directories, and the Hub."""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.data.loading import Row, data_files, load_hub_rows, load_rows, read_rows
from kubetune_runtime.errors import DataInvalid, StorageFailure

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"

ROWS = [
    {"prompt": "one", "completion": "1"},
    {"prompt": "two", "completion": "2", "extra": {"nested": [1, 2]}},
    {"prompt": "three", "completion": "3"},
]


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("d.jsonl", _jsonl(ROWS), id="jsonl"),
        pytest.param("d.jsonl.gz", _jsonl(ROWS), id="jsonl-gzip"),
        pytest.param("d.json", json.dumps(ROWS), id="json-array"),
        pytest.param("d.json.gz", json.dumps(ROWS), id="json-gzip"),
        pytest.param("d.json", json.dumps({"data": ROWS}), id="json-object-single-key"),
        pytest.param("d.jsonl", "\ufeff" + _jsonl(ROWS), id="jsonl-with-bom"),
    ],
)
def test_round_trip(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path / name, text)
    assert list(read_rows(path)) == list(enumerate(ROWS, start=1))
    assert load_rows(path) == [Row(str(path), i, row) for i, row in enumerate(ROWS, start=1)]


def test_parquet_round_trip_keeps_nested_columns_and_nulls(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    rows = [{**row, "system": None if i else "be brief"} for i, row in enumerate(rows)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1)
    assert list(read_rows(path, source="s3://b/train.parquet")) == [(1, rows[0]), (2, rows[1])]
    assert [r.source for r in load_rows(path, source="s3://b/train.parquet")] == [
        "s3://b/train.parquet"
    ] * 2


def test_jsonl_row_numbers_are_line_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]))
    assert [number for number, _ in read_rows(path)] == [1, 4]


@pytest.mark.parametrize(
    ("name", "text", "row", "expected"),
    [
        pytest.param(
            "d.jsonl", '{"a": 1}\n{"a": 2\n', 2, "line 2 is not valid JSON", id="jsonl-bad-line"
        ),
        pytest.param(
            "d.jsonl.gz", '{"a": 1}\n\n{oops}\n', 3, "line 3 is not valid JSON", id="gzip-bad-line"
        ),
        pytest.param("d.jsonl", '{"a": 1}\n[1, 2]\n', 2, "expected a JSON object", id="jsonl-list"),
        pytest.param("d.json", '[{"a": 1}, "x"]', 2, "expected a JSON object", id="json-element"),
        pytest.param("d.json", '[{"a": 1},\n{"a": }]', None, "line 2 column", id="json-syntax"),
        pytest.param(
            "d.json", '{"a": [], "b": []}', None, "object whose single key", id="json-two-keys"
        ),
        pytest.param("d.json", '{"data": {"a": 1}}', None, "list of objects", id="json-no-list"),
        pytest.param("d.json", '"text"', None, "found str", id="json-scalar"),
    ],
)
def test_malformed_files_name_file_and_row(
    tmp_path: Path, name: str, text: str, row: int | None, expected: str
) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataInvalid, match=expected) as caught:
        list(read_rows(path))
    assert caught.value.source == str(path)
    assert caught.value.row == row
    assert str(path) in str(caught.value)


def test_not_gzip_and_not_utf8_and_not_parquet(tmp_path: Path) -> None:
    fake_gz = tmp_path / "d.jsonl.gz"
    fake_gz.write_text("{}\n", encoding="utf-8")  # named .gz, but not gzip data
    with pytest.raises(DataInvalid, match="not complete gzip data"):
        list(read_rows(fake_gz))
    latin1 = tmp_path / "l.jsonl"
    latin1.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataInvalid, match="UTF-8") as caught:
        list(read_rows(latin1))
    assert caught.value.row == 2
    bogus = _write(tmp_path / "d.parquet", "not parquet")
    with pytest.raises(DataInvalid, match="not a readable Parquet file"):
        list(read_rows(bogus))


def test_directory_reads_data_files_sorted_and_names_each_file(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    _write(folder / "b.jsonl", _jsonl(ROWS[1:]))
    _write(folder / "a.json", json.dumps(ROWS[:1]))
    for ignored in ("README.md", "_SUCCESS", ".hidden.jsonl"):
        _write(folder / ignored, "not data")
    (folder / "nested").mkdir()
    _write(folder / "nested" / "c.jsonl", _jsonl(ROWS))
    assert [p.name for p in data_files(folder)] == ["a.json", "b.jsonl"]
    assert [number for number, _ in read_rows(folder)] == [1, 1, 2]
    rows = load_rows(folder, source="s3://bucket/train/")
    assert [(r.source, r.row) for r in rows] == [
        ("s3://bucket/train/a.json", 1),
        ("s3://bucket/train/b.jsonl", 1),
        ("s3://bucket/train/b.jsonl", 2),
    ]
    assert [r.data for r in rows] == ROWS
    assert len(load_rows(folder, max_samples=2)) == 2
    _write(folder / "c.jsonl", "{broken\n")
    with pytest.raises(DataInvalid, match="line 1 is not valid JSON") as caught:
        load_rows(folder)
    assert caught.value.source == str(folder / "c.jsonl")


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param(lambda p: p / "missing.jsonl", "no such file", id="missing"),
        pytest.param(lambda p: _write(p / "d.csv", "a,b\n"), "unsupported file type", id="csv"),
        pytest.param(lambda p: p, "directory has no data files", id="empty-directory"),
        pytest.param(lambda p: _write(p / "d.jsonl", "\n"), "holds no rows", id="no-rows"),
    ],
)
def test_unusable_paths(tmp_path: Path, setup: Any, expected: str) -> None:
    with pytest.raises(DataInvalid, match=expected):
        load_rows(setup(tmp_path))


def test_rows_are_frozen_and_max_samples_stops_early(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl(ROWS))
    rows = load_rows(path, max_samples=2)
    assert [r.row for r in rows] == [1, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].row = 5  # type: ignore[misc]


def test_unreadable_file_is_a_storage_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl(ROWS))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("denied")

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(StorageFailure, match="denied"):
        load_rows(path)


class _FakeSplit:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __iter__(self) -> Any:
        return iter(self.rows)


def test_load_hub_rows_calls_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[inspect.BoundArguments] = []
    signature = inspect.signature(datasets.load_dataset)

    def fake(*args: Any, **kwargs: Any) -> _FakeSplit:
        calls.append(signature.bind(*args, **kwargs))  # the real function accepts these
        return _FakeSplit([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_hub_rows("openai/gsm8k", "main", "train", "main", "hf_x", max_samples=1)
    assert rows == [
        Row("hf://openai/gsm8k@main (main/train)", 1, {"question": "q1", "answer": "a1"})
    ]
    assert calls[0].arguments == {
        "path": "openai/gsm8k",
        "name": "main",
        "split": "train",
        "revision": "main",
        "token": "hf_x",
    }


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        pytest.param(FileNotFoundError("no repo"), DataInvalid, id="not-found"),
        pytest.param(ValueError("Unknown split"), DataInvalid, id="bad-split"),
        pytest.param(ConnectionError("offline"), StorageFailure, id="offline"),
    ],
)
def test_load_hub_rows_maps_errors(
    monkeypatch: pytest.MonkeyPatch, raised: Exception, expected: type[Exception]
) -> None:
    datasets = pytest.importorskip("datasets")

    def fake(*args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(expected, match="hf://org/set"):
        load_hub_rows("org/set", None, "train", None, None)


@pytest.mark.parametrize(
    ("relative", "rows", "keys"),
    [
        pytest.param("gsm8k/train.jsonl", 7473, {"question", "answer"}, id="gsm8k-train"),
        pytest.param("gsm8k/test.jsonl", 1319, {"question", "answer"}, id="gsm8k-test"),
        pytest.param(
            "hh-rlhf/harmless-base/test.jsonl.gz", 2312, {"chosen", "rejected"}, id="hh-rlhf-gzip"
        ),
        pytest.param(
            "fastchat-dummy-conversation/dummy_conversation.json",
            500,
            {"id", "conversations"},
            id="fastchat-json-array",
        ),
        pytest.param(
            "oasst-en100/en_100_tree.jsonl",
            100,
            {"message_tree_id", "tree_state", "prompt"},
            id="oasst-trees",
        ),
    ],
)
def test_shared_data_loads(relative: str, rows: int, keys: set[str]) -> None:
    loaded = load_rows(_need(DATA / relative))
    assert len(loaded) == rows
    assert [r.row for r in loaded] == list(range(1, rows + 1))
    assert all(set(r.data) == keys for r in loaded)


def test_shared_gsm8k_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [r.data for r in load_rows(_need(DATA / "gsm8k/test.jsonl"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    assert [r.data for r in load_rows(tmp_path / "test.parquet")] == rows
