"""Storage URIs: parsing (good and bad), canonical form, join / parent / basename."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetune_runtime.storage.uris import ParsedURI, basename, join, parent, parse_uri

GOOD = [
    # uri, parsed, canonical str
    (
        "hf://Qwen/Qwen2.5-0.5B-Instruct",
        ParsedURI(scheme="hf", repo="Qwen/Qwen2.5-0.5B-Instruct"),
        "hf://Qwen/Qwen2.5-0.5B-Instruct",
    ),
    (
        "hf://Qwen/Qwen2.5-0.5B-Instruct@main",
        ParsedURI(scheme="hf", repo="Qwen/Qwen2.5-0.5B-Instruct", revision="main"),
        "hf://Qwen/Qwen2.5-0.5B-Instruct@main",
    ),
    (
        "hf://org/name@refs/pr/1",
        ParsedURI(scheme="hf", repo="org/name", revision="refs/pr/1"),
        "hf://org/name@refs/pr/1",
    ),
    ("s3://models", ParsedURI(scheme="s3", bucket="models", key=""), "s3://models"),
    ("s3://models/", ParsedURI(scheme="s3", bucket="models", key=""), "s3://models"),
    (
        "s3://models/team-a/gsm8k/",
        ParsedURI(scheme="s3", bucket="models", key="team-a/gsm8k"),
        "s3://models/team-a/gsm8k",
    ),
    (
        "S3://my.bucket-1/a/b.jsonl",
        ParsedURI(scheme="s3", bucket="my.bucket-1", key="a/b.jsonl"),
        "s3://my.bucket-1/a/b.jsonl",
    ),
    ("pvc://data", ParsedURI(scheme="pvc", claim="data", path=""), "pvc://data"),
    (
        "pvc://data-1/sets/train.jsonl",
        ParsedURI(scheme="pvc", claim="data-1", path="sets/train.jsonl"),
        "pvc://data-1/sets/train.jsonl",
    ),
    ("file:///abs/path/", ParsedURI(scheme="file", path="/abs/path"), "file:///abs/path"),
    ("file:///", ParsedURI(scheme="file", path="/"), "file:///"),
    (
        "file:///my%20dir/a%40b",
        ParsedURI(scheme="file", path="/my dir/a@b"),
        "file:///my%20dir/a%40b",
    ),
    ("/abs/path", ParsedURI(scheme="file", path="/abs/path"), "file:///abs/path"),
    ("data/train.jsonl", ParsedURI(scheme="file", path="data/train.jsonl"), "data/train.jsonl"),
    ("./out/", ParsedURI(scheme="file", path="./out"), "./out"),
    ("my dir/file.txt", ParsedURI(scheme="file", path="my dir/file.txt"), "my dir/file.txt"),
]


@pytest.mark.parametrize(("uri", "parsed", "canonical"), GOOD, ids=[g[0] for g in GOOD])
def test_parse_good(uri: str, parsed: ParsedURI, canonical: str) -> None:
    assert parse_uri(uri) == parsed
    assert str(parse_uri(uri)) == canonical
    assert parse_uri(canonical) == parse_uri(uri)


BAD = [
    # uri, fragment of the message (what was expected)
    ("", "empty storage URI"),
    ("   ", "empty storage URI"),
    ("gs://bucket/x", "unsupported URI scheme 'gs://'"),
    ("https://example.com/x", "expected hf://org/name[@revision], s3://bucket/prefix"),
    ("hf://gpt2", "expected hf://org/name[@revision]"),
    ("hf://org/", "expected hf://org/name[@revision]"),
    ("hf://org/name/extra", "expected hf://org/name[@revision]"),
    ("hf://org/name@", "revision '' is not valid"),
    ("hf://org/name@bad rev", "revision 'bad rev' is not valid"),
    ("s3://", "missing the bucket; expected s3://bucket/path"),
    ("s3:///key", "missing the bucket"),
    ("s3://Models/x", "bucket 'Models' is not a valid S3 bucket name"),
    ("s3://ab/x", "bucket 'ab' is not a valid S3 bucket name"),
    ("s3://bucket/a//b", "empty, '.' or '..' path segments are not allowed"),
    ("s3://bucket/a/../b", "empty, '.' or '..' path segments are not allowed"),
    ("pvc://", "missing the claim; expected pvc://claim/path"),
    ("pvc://Data/x", "claim 'Data' is not a valid PersistentVolumeClaim name"),
    ("pvc://data/../other", "'..' path segments are not allowed"),
    ("file://host/path", "expected file:///absolute/path"),
    ("file://relative", "expected file:///absolute/path"),
    ("data/\x00x", "control characters"),
    ("file:///a%00b", "control characters"),
]


@pytest.mark.parametrize(("uri", "message"), BAD, ids=[repr(b[0]) for b in BAD])
def test_parse_bad(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_uri(uri)


@pytest.mark.parametrize(
    "uri", ["s3://AKIAEXAMPLE:s3cr3tvalue@bucket/x", "pvc://user:s3cr3tvalue@claim/x"]
)
def test_credentials_in_uri_are_refused_without_echo(uri: str) -> None:
    with pytest.raises(ValueError, match="credentials never belong in URIs") as excinfo:
        parse_uri(uri)
    assert "s3cr3tvalue" not in str(excinfo.value)
    assert "AKIAEXAMPLE" not in str(excinfo.value)


JOINS = [
    (
        ("s3://bk0/models", "run-1", "adapter/config.json"),
        "s3://bk0/models/run-1/adapter/config.json",
    ),
    (("s3://bk0", "x"), "s3://bk0/x"),
    (("s3://bk0/models/", "x/"), "s3://bk0/models/x"),
    (("s3://bk0/m", "file with space@2.txt"), "s3://bk0/m/file with space@2.txt"),
    (("pvc://claim", "a", "b"), "pvc://claim/a/b"),
    (("file:///out", "adapter"), "file:///out/adapter"),
    (("file:///", "adapter"), "file:///adapter"),
    (("file:///my%20dir", "a b"), "file:///my%20dir/a%20b"),
    (("/out", "adapter"), "/out/adapter"),
    (("out", "adapter/x"), "out/adapter/x"),
    (("s3://bk0/m",), "s3://bk0/m"),
    (("out/",), "out"),
]


@pytest.mark.parametrize(("args", "expected"), JOINS, ids=[j[1] for j in JOINS])
def test_join(args: tuple[str, ...], expected: str) -> None:
    assert join(*args) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hf://org/name", "x"), "cannot be joined"),
        (("s3://bk0/m", "/abs"), "absolute path"),
        (("s3://bk0/m", "../x"), "'..' segments are not allowed"),
        (("s3://bk0/m", "a//b"), "empty, '.' or '..' segments"),
        (("s3://bk0/m", ""), "empty, '.' or '..' segments"),
        (("file:///out", "."), "empty, '.' or '..' segments"),
        (("gs://b/x", "y"), "unsupported URI scheme"),
    ],
)
def test_join_bad(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        join(*args)


@pytest.mark.parametrize(
    ("uri", "up", "name"),
    [
        ("s3://bk0/a/adapter", "s3://bk0/a", "adapter"),
        ("s3://bk0/adapter/", "s3://bk0", "adapter"),
        ("pvc://claim/a/b", "pvc://claim/a", "b"),
        ("pvc://claim/a", "pvc://claim", "a"),
        ("file:///out/adapter", "file:///out", "adapter"),
        ("file:///out", "file:///", "out"),
        ("/out/adapter", "/out", "adapter"),
        ("file:///my%20dir/x%20y", "file:///my%20dir", "x y"),
        ("adapter", ".", "adapter"),
    ],
)
def test_parent_and_basename(uri: str, up: str, name: str) -> None:
    assert parent(uri) == up
    assert basename(uri) == name


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bk0", "bucket root"),
        ("pvc://claim", "claim root"),
        ("file:///", "file system root"),
        ("hf://org/name", "have no parent"),
    ],
)
def test_parent_of_a_root_is_an_error(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parent(uri)


def test_basename_of_roots_and_hf() -> None:
    assert basename("s3://bk0") == ""
    assert basename("pvc://claim") == ""
    with pytest.raises(ValueError, match="not a path"):
        basename("hf://org/name")


def test_path_as_uri_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "my dir" / "a+b@c"
    assert parse_uri(path.as_uri()).path == str(path)
    assert str(parse_uri(str(path))) == path.as_uri()
