"""Progress tokens: derived from one operator key, so checking one never reads a Secret.

The operator holds one random key (``KEY_BYTES``, kept in the Secret
``ControllerSettings.progress_key_secret`` of its own namespace). A job's token is
HMAC-SHA256(key, ``<namespace>/<name>/<uid>``): the operator writes it into the job's
``<name>-progress`` Secret (which the pod mounts) and recomputes it to check a report, so it
needs no read access to any Secret outside its own namespace. The uid makes a recreated
resource of the same name get a new token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh random operator key (256 bits)."""
    return secrets.token_bytes(KEY_BYTES)


def progress_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The progress token of the resource ``namespace/name`` with ``uid`` (64 hex digits).

    Deterministic: the same key and resource always give the same token, so re-creating the
    job's Secret (409 AlreadyExists) or restarting the operator with the same key changes
    nothing. Without the key, a token cannot be derived from another job's.
    """
    message = f"{namespace}/{name}/{uid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


__all__ = ["KEY_BYTES", "new_key", "progress_token"]
