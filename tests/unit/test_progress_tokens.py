"""Progress tokens (controller/tokens.py) and the operator key behind them (Kube.progress_key)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_operator.controller.config import ControllerSettings
from kubetune_operator.controller.kube import Kube, KubeError
from kubetune_operator.controller.tokens import KEY_BYTES, new_key, progress_token
from tests.support.kube_api import KubeApi

KEY = bytes(range(32))
NS, NAME = "kubetune-system", "kubetune-progress-key"
LABELS = {"app.kubernetes.io/managed-by": "kubetune-operator"}


# ------------------------------------------------------------------------------------ tokens
def test_token_is_the_hmac_of_namespace_name_and_uid() -> None:
    token = progress_token(KEY, "team-a", "chatty", "uid-1")
    expected = hmac.new(KEY, b"team-a/chatty/uid-1", hashlib.sha256).hexdigest()
    assert token == expected
    assert len(token) == 64
    assert token == progress_token(KEY, "team-a", "chatty", "uid-1")  # deterministic


@pytest.mark.parametrize(
    ("key", "namespace", "name", "uid"),
    [
        pytest.param(bytes(32), "team-a", "chatty", "uid-1", id="key"),
        pytest.param(KEY, "team-b", "chatty", "uid-1", id="namespace"),
        pytest.param(KEY, "team-a", "quiet", "uid-1", id="name"),
        pytest.param(KEY, "team-a", "chatty", "uid-2", id="uid (recreated resource)"),
        pytest.param(KEY, "team-a/chatty", "", "uid-1", id="no ambiguity across fields"),
    ],
)
def test_token_differs_when_anything_differs(
    key: bytes, namespace: str, name: str, uid: str
) -> None:
    assert progress_token(key, namespace, name, uid) != progress_token(
        KEY, "team-a", "chatty", "uid-1"
    )


def test_new_keys_are_random_256_bit() -> None:
    assert len(new_key()) == KEY_BYTES == 32
    assert new_key() != new_key()


def test_settings_read_the_operator_namespace_from_the_environment() -> None:
    settings = ControllerSettings.from_env(
        {
            "KUBETUNE_OPERATOR_NAMESPACE": NS,
            "KUBETUNE_PROGRESS_KEY_SECRET": "my-key",
        }
    )
    assert (settings.operator_namespace, settings.progress_key_secret) == (NS, "my-key")
    unset = ControllerSettings.from_env({"KUBETUNE_OPERATOR_NAMESPACE": ""})
    assert (unset.operator_namespace, unset.progress_key_secret) == (None, NAME)


# ------------------------------------------------------------------------------------ the key
@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server
        assert server.unexpected_errors == []


@pytest.fixture
def kube(api: KubeApi) -> Iterator[Kube]:
    client = Kube.connect(api.url, "kubetune-operator")
    yield client
    client.close()


def stored_key(api: KubeApi) -> bytes:
    secret = api.get("v1/secrets", NS, NAME)
    assert secret is not None
    return base64.b64decode(secret["data"]["key"])


def test_the_key_is_created_once_then_read_back(api: KubeApi, kube: Kube) -> None:
    key = kube.progress_key(NS, NAME, LABELS)
    assert len(key) == KEY_BYTES
    assert stored_key(api) == key
    secret = api.get("v1/secrets", NS, NAME)
    assert secret is not None
    assert secret["metadata"]["labels"] == LABELS
    assert not secret["metadata"].get("ownerReferences")  # it outlives every job
    assert kube.progress_key(NS, NAME, LABELS) == key  # a restart reads the same key
    assert api.request_counts()[("POST", "v1/secrets", None)] == 1


def test_a_concurrent_create_wins_and_its_key_is_used(
    api: KubeApi, kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between our GET (404) and our create, another operator creates the Secret: 409."""
    theirs = new_key()
    create = kube.create

    def racing(obj: dict[str, Any]) -> bool:
        api.create(
            "v1/secrets",
            {"metadata": {"name": NAME}, "data": {"key": base64.b64encode(theirs).decode()}},
            NS,
        )
        return create(obj)

    monkeypatch.setattr(kube, "create", racing)
    assert kube.progress_key(NS, NAME, LABELS) == theirs
    assert stored_key(api) == theirs


def test_a_key_too_short_is_refused(api: KubeApi, kube: Kube) -> None:
    short = {"metadata": {"name": NAME}, "data": {"key": base64.b64encode(b"short").decode()}}
    api.create("v1/secrets", short, NS)
    with pytest.raises(KubeError, match="at least 32 bytes"):
        kube.progress_key(NS, NAME, LABELS)
