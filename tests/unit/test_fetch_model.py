"""``kubetune-runtime fetch-model``: the serving pod's init container that fetches the base model.

s3:// runs against the embedded storage (``KUBETUNE_LOCAL_S3_ROOT``) and once against moto;
hf:// only with ``snapshot_download`` monkeypatched (the Hub cannot be reached here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.errors import ConfigInvalid, StorageFailure
from kubetune_runtime.serving import fetch_model as fm
from kubetune_runtime.serving.config import BaseModelRef, EngineConfig, ServingConfig
from kubetune_runtime.storage.backends import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
HF_TOKEN = "hf_secret_token_value"  # noqa: S105 - a fake, asserted never to be printed
MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\x00" * 64,
    "tokenizer/tokenizer.json": b"{}",
}


def _config(uri: str, tmp_path: Path, *, revision: str | None = None) -> ServingConfig:
    return ServingConfig(
        engine=EngineConfig(type="builtin", admin_url="http://127.0.0.1:8001"),
        base_model=BaseModelRef(uri=uri, revision=revision, name="base"),
        cache_dir=str(tmp_path / "cache"),
    )


def _write_config(path: Path, uri: str, *, revision: str | None = None) -> Path:
    config = _config(uri, path.parent, revision=revision)
    path.write_text(config.model_dump_json(), encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def s3_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Embedded storage holding ``s3://models/tiny-base/...`` (small fake files)."""
    root = tmp_path / "s3"
    for rel, data in MODEL_FILES.items():
        path = root / "models" / "tiny-base" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    monkeypatch.setenv("KUBETUNE_LOCAL_S3_ROOT", str(root))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return root


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "models" / "base"


def _siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != f".{dest.name}.lock")


# ------------------------------------------------------------------------------ s3://


def test_s3_is_downloaded_with_a_marker_and_nothing_left_beside(
    s3_root: Path, dest: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.json"
    _write_config(config, "s3://models/tiny-base/")
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 0
    assert _files(dest) == {**MODEL_FILES, fm.MARKER: b"s3://models/tiny-base\n"}
    assert not dest.is_symlink()
    assert _siblings(dest) == ["base"]  # no staging folder left


def test_a_second_run_does_nothing(s3_root: Path, dest: Path, tmp_path: Path) -> None:
    config = _config("s3://models/tiny-base", tmp_path)
    assert fm.fetch_model(config, dest).action == "downloaded"
    stamps = {p: p.stat().st_mtime_ns for p in [dest, *dest.rglob("*")]}
    inode = dest.stat().st_ino
    time.sleep(0.01)
    # Even when the source changed: the marker says this folder is complete for that URI.
    (s3_root / "models" / "tiny-base" / "config.json").write_text("changed")
    assert fm.fetch_model(config, dest) == fm.Fetched("present", "s3://models/tiny-base", dest)
    assert {p: p.stat().st_mtime_ns for p in [dest, *dest.rglob("*")]} == stamps
    assert dest.stat().st_ino == inode


def test_a_marker_for_another_uri_is_replaced(s3_root: Path, dest: Path, tmp_path: Path) -> None:
    dest.mkdir(parents=True)
    (dest / "old-weights.bin").write_bytes(b"old")
    (dest / fm.MARKER).write_text("s3://models/other-base\n")
    fetched = fm.fetch_model(_config("s3://models/tiny-base", tmp_path), dest)
    assert fetched.action == "downloaded"
    assert _files(dest) == {**MODEL_FILES, fm.MARKER: b"s3://models/tiny-base\n"}
    assert _siblings(dest) == ["base"]  # the old folder is gone


def test_an_empty_dest_folder_is_filled(s3_root: Path, dest: Path, tmp_path: Path) -> None:
    dest.mkdir(parents=True)
    assert fm.fetch_model(_config("s3://models/tiny-base", tmp_path), dest).action == "downloaded"
    assert (dest / "config.json").is_file()


def test_a_foreign_folder_is_never_deleted(
    s3_root: Path, dest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest.mkdir(parents=True)
    (dest / "precious.txt").write_text("mine")
    config = _write_config(tmp_path / "config.json", "s3://models/tiny-base")
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 2
    assert "not written by fetch-model" in capsys.readouterr().err
    assert _files(dest) == {"precious.txt": b"mine"}


def test_a_missing_model_is_permanent(
    s3_root: Path, dest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_config(tmp_path / "config.json", "s3://models/no-such-model")
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kubetune-runtime fetch-model: ModelUnavailable:")
    assert "s3://models/no-such-model" in err[0]
    assert "does not exist" in err[0]
    assert not dest.exists()
    assert _siblings(dest) == []


def test_an_interrupted_download_leaves_no_dest(
    s3_root: Path, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: LocalStorage, uri: str, target: Path) -> Path:
        (target / "half").mkdir(parents=True)
        (target / "half" / "written.bin").write_bytes(b"partial")
        raise StorageFailure(f"cannot download {uri}: connection reset")

    monkeypatch.setattr(LocalStorage, "download_dir", broken)
    config = _write_config(tmp_path / "config.json", "s3://models/tiny-base")
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 1
    assert not dest.exists()
    assert _siblings(dest) == []  # the staging folder was removed
    monkeypatch.undo()  # storage works again: the retry completes
    monkeypatch.setenv("KUBETUNE_LOCAL_S3_ROOT", str(s3_root))
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 0
    assert (dest / fm.MARKER).is_file()


def test_an_interrupted_replacement_keeps_the_old_model(
    s3_root: Path, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config("s3://models/tiny-base", tmp_path)
    fm.fetch_model(config, dest)
    before = _files(dest)

    def broken(self: LocalStorage, uri: str, target: Path) -> Path:
        target.mkdir(parents=True)
        (target / "config.json").write_text("half")
        raise StorageFailure("connection reset")

    monkeypatch.setattr(LocalStorage, "download_dir", broken)
    moved = _config("s3://models/tiny-base-v2", tmp_path)
    with pytest.raises(StorageFailure):
        fm.fetch_model(moved, dest)
    assert _files(dest) == before


def test_leftovers_of_a_killed_run_are_removed(s3_root: Path, dest: Path, tmp_path: Path) -> None:
    stale = dest.with_name(f"{dest.name}.partial-0123456789ab")
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "w.bin").write_bytes(b"x")
    fm.fetch_model(_config("s3://models/tiny-base", tmp_path), dest)
    assert _siblings(dest) == ["base"]


def test_a_mount_point_dest_is_refused(tmp_path: Path, s3_root: Path) -> None:
    with pytest.raises(ConfigInvalid, match="mount point"):
        fm.fetch_model(_config("s3://models/tiny-base", tmp_path), Path("/proc"))


# ------------------------------------------------------------------------------ config and usage


def test_an_unreadable_or_invalid_config_is_a_usage_error(
    tmp_path: Path, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fm.main(["--config", str(tmp_path / "missing.json"), "--dest", str(dest)]) == 2
    assert "cannot read" in capsys.readouterr().err
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"engine": {"type": "builtin"}}')
    assert fm.main(["--config", str(invalid), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not a valid ServingConfig" in err[0]
    bad_uri = _write_config(tmp_path / "bad-uri.json", "ftp://host/model")
    assert fm.main(["--config", str(bad_uri), "--dest", str(dest)]) == 2
    assert "unsupported URI scheme" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        fm.main(["--config", str(bad_uri)])  # --dest is required
    assert usage.value.code == 2
    assert not dest.exists()


# ------------------------------------------------------------------------------ pvc:// and file://


def test_file_and_pvc_models_are_linked(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pvc_root = tmp_path / "pvc"
    model = pvc_root / "models-claim" / "llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(pvc_root))

    linked = fm.fetch_model(_config("pvc://models-claim/llama", tmp_path), dest)
    assert linked == fm.Fetched("linked", "pvc://models-claim/llama", dest)
    assert dest.is_symlink()
    assert dest.resolve() == model.resolve()
    assert (dest / "config.json").read_text() == "{}"
    # Idempotent: the same link is left alone.
    assert fm.fetch_model(_config("pvc://models-claim/llama", tmp_path), dest).action == "present"

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text('{"other": true}')
    relinked = fm.fetch_model(_config(other.as_uri(), tmp_path), dest)
    assert relinked.action == "linked"
    assert dest.resolve() == other.resolve()
    assert _siblings(dest) == ["base"]


def test_a_link_and_a_fetched_folder_replace_each_other(
    s3_root: Path, tmp_path: Path, dest: Path
) -> None:
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert fm.fetch_model(_config(local.as_uri(), tmp_path), dest).action == "linked"
    assert fm.fetch_model(_config("s3://models/tiny-base", tmp_path), dest).action == "downloaded"
    assert not dest.is_symlink()
    assert (dest / fm.MARKER).is_file()
    assert (local / "config.json").read_text() == "{}"  # only the link was replaced
    assert fm.fetch_model(_config(local.as_uri(), tmp_path), dest).action == "linked"
    assert dest.is_symlink()
    assert _siblings(dest) == ["base"]


def test_a_missing_local_model_is_permanent(
    tmp_path: Path, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_config(tmp_path / "config.json", (tmp_path / "nowhere").as_uri())
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert not dest.exists()
    assert not dest.is_symlink()


def test_an_unmounted_claim_is_retried(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    config = _write_config(tmp_path / "config.json", "pvc://models-claim/llama")
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 1


# ------------------------------------------------------------------------------ hf://


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``huggingface_hub.snapshot_download`` replaced by a fake writing two files."""
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        local_dir = Path(kwargs["local_dir"])
        (local_dir / "config.json").write_text(json.dumps({"repo": repo_id}))
        (local_dir / "model.safetensors").write_bytes(b"\x00" * 8)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    return calls


def test_hub_models_are_snapshot_downloaded(
    hub: list[dict[str, Any]], tmp_path: Path, dest: Path
) -> None:
    pinned = fm.fetch_model(_config("hf://Org/Model-1B@v1.0", tmp_path, revision="main"), dest)
    assert pinned == fm.Fetched("downloaded", "hf://Org/Model-1B@v1.0", dest)
    assert hub[0]["repo_id"] == "Org/Model-1B"
    assert hub[0]["revision"] == "v1.0"  # the URI's revision wins
    assert hub[0]["token"] == HF_TOKEN
    assert Path(hub[0]["local_dir"]).parent == dest.parent  # a sibling staging folder
    assert Path(hub[0]["local_dir"]).name.startswith("base.partial-")
    assert (dest / fm.MARKER).read_text() == "hf://Org/Model-1B@v1.0\n"
    assert json.loads((dest / "config.json").read_text()) == {"repo": "Org/Model-1B"}
    assert fm.fetch_model(_config("hf://Org/Model-1B@v1.0", tmp_path), dest).action == "present"
    assert len(hub) == 1

    # base_model.revision applies when the URI pins none; a new revision fetches again.
    fetched = fm.fetch_model(_config("hf://Org/Model-1B", tmp_path, revision="abc123"), dest)
    assert fetched.source == "hf://Org/Model-1B@abc123"
    assert hub[1]["revision"] == "abc123"
    assert _siblings(dest) == ["base"]


def test_hub_failures_are_classified_without_the_token(
    hub: list[dict[str, Any]],
    tmp_path: Path,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    config = _write_config(tmp_path / "config.json", "hf://org/gone")
    request = httpx.Request("GET", "https://huggingface.co/api/models/org/gone")

    def answer(status: int, kind: type[HfHubHTTPError]) -> Any:
        def snapshot_download(repo_id: str, **kwargs: Any) -> str:
            (Path(kwargs["local_dir"]) / "partial.bin").write_bytes(b"x")
            raise kind(
                f"{status} for {HF_TOKEN}",
                response=httpx.Response(status, request=request),
            )

        return snapshot_download

    cases = [
        (answer(404, RepositoryNotFoundError), 3, "does not exist or is private"),
        (answer(403, HfHubHTTPError), 3, "answered 403"),
        (answer(503, HfHubHTTPError), 1, "answered 503"),
    ]
    for fake, code, text in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
        assert fm.main(["--config", str(config), "--dest", str(dest)]) == code
        err = capsys.readouterr().err
        assert text in err
        assert HF_TOKEN not in err
        assert not dest.exists()
        assert _siblings(dest) == []

    def offline(repo_id: str, **kwargs: Any) -> str:
        raise httpx.ConnectError("name resolution failed")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert fm.main(["--config", str(config), "--dest", str(dest)]) == 1
    assert "ConnectError: name resolution failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------ S3 (moto)


def test_real_s3_downloads_and_reports_a_missing_model(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-for-moto")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("KUBETUNE_LOCAL_S3_ROOT", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="models")
        for rel, data in MODEL_FILES.items():
            client.put_object(Bucket="models", Key=f"tiny-base/{rel}", Body=data)
        config = _config("s3://models/tiny-base", tmp_path)
        assert fm.fetch_model(config, dest).action == "downloaded"
        assert _files(dest) == {**MODEL_FILES, fm.MARKER: b"s3://models/tiny-base\n"}
        with pytest.raises(fm.ModelUnavailable, match="does not exist"):
            fm.fetch_model(_config("s3://models/nothing-here", tmp_path), tmp_path / "other")


# ------------------------------------------------------------------------------ the command


def test_the_command_runs_without_torch(s3_root: Path, dest: Path, tmp_path: Path) -> None:
    """``kubetune-runtime fetch-model`` end to end in a fresh interpreter; torch never loads."""
    config = _write_config(tmp_path / "config.json", "s3://models/tiny-base")
    code = (
        "import sys, runpy; sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module('kubetune_runtime.entrypoint', run_name='__main__')\n"
        "finally:\n"
        "    heavy = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]\n"
        "    print('heavy=' + ','.join(heavy), file=sys.stderr)\n"
    )
    env = {**os.environ, "KUBETUNE_LOCAL_S3_ROOT": str(s3_root)}
    args = ["fetch-model", "--config", str(config), "--dest", str(dest)]
    done = subprocess.run(
        [sys.executable, "-c", code, "kubetune-runtime", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "heavy=\n" in done.stderr
    assert "Fetched s3://models/tiny-base into" in done.stderr
    assert (dest / fm.MARKER).is_file()
    again = subprocess.run(
        [sys.executable, "-m", "kubetune_runtime.entrypoint", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "kubetune_runtime.entrypoint", "fetch-model", "--dest", str(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert missing.returncode == 2  # the default config path does not exist here
    assert "cannot read /etc/kubetune/serving/config.json" in missing.stderr
