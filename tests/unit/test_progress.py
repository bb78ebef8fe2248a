"""Progress reporting: the update's status shape, the log line, the JSONL file and the HTTP sink.

The HTTP sink is exercised against a real ``http.server`` on 127.0.0.1 (in a thread), with an
injected clock for throttling; no training runs here.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.progress import (
    HttpSink,
    JsonlSink,
    LogSink,
    ProgressReporter,
    ProgressUpdate,
    format_update,
)

TOKEN = "kt-progress-token-0123456789abcdef"  # noqa: S105 - a fake, for header checks
PROGRESS_LOGGER = "kubetune_runtime.progress"


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Received:
    """One request the test server got."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    """A local progress endpoint: its URL, what it received, and the status it answers."""

    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; the sink must talk to 127.0.0.1 directly."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    """A ThreadingHTTPServer on a free port that records every POST."""
    state = Endpoint(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            state.requests.append(Received(self.path, dict(self.headers.items()), body))
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: no access log on stderr."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/progress/ns-a/job-a"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n", encoding="utf-8")
    return path


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def garbage_server() -> Iterator[str]:
    """A TCP server that answers every connection with a line that is not HTTP."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/progress/ns-a/job-a"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


# ------------------------------------------------------------------------------ ProgressUpdate


@pytest.mark.parametrize(
    ("step", "total", "expected"),
    [
        pytest.param(0, 40, 0, id="start"),
        pytest.param(12, 40, 30, id="thirty-percent"),
        pytest.param(1, 3, 33, id="rounded-down"),
        pytest.param(2, 3, 66, id="rounded-down-not-nearest"),
        pytest.param(40, 40, 100, id="done"),
        pytest.param(45, 40, 100, id="past-total-capped"),
        pytest.param(7, None, None, id="unknown-total"),
        pytest.param(7, 0, None, id="zero-total"),
    ],
)
def test_percent(step: int, total: int | None, expected: int | None) -> None:
    assert ProgressUpdate(step=step, total_steps=total).percent == expected


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        pytest.param(ProgressUpdate(step=3), {"step": 3}, id="minimal"),
        pytest.param(
            ProgressUpdate(
                step=12,
                total_steps=40,
                epoch=0.5,
                loss=1.25,
                eval_loss=1.5,
                learning_rate=1e-4,
                tokens_per_second=850.0,
                eta_seconds=65,
            ),
            {
                "step": 12,
                "totalSteps": 40,
                "percent": 30,
                "epoch": 0.5,
                "loss": 1.25,
                "evalLoss": 1.5,
                "tokensPerSecond": 850.0,
                "etaSeconds": 65,
            },
            id="full-camelCase-no-learning-rate",
        ),
        pytest.param(
            ProgressUpdate(step=0, total_steps=10, loss=0.0, eta_seconds=0),
            {"step": 0, "totalSteps": 10, "percent": 0, "loss": 0.0, "etaSeconds": 0},
            id="zeros-are-kept",
        ),
        pytest.param(
            ProgressUpdate(step=5, final=True),
            {"step": 5},
            id="final-flag-not-in-status",
        ),
    ],
)
def test_to_status(update: ProgressUpdate, expected: dict[str, Any]) -> None:
    assert update.to_status() == expected


@pytest.mark.parametrize(
    "value",
    [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf")],
)
def test_to_status_is_strict_json_for_non_finite_loss(value: float) -> None:
    status = ProgressUpdate(step=4, total_steps=8, loss=value, eval_loss=value).to_status()
    json.dumps(status, allow_nan=False)
    assert status == {"step": 4, "totalSteps": 8, "percent": 50}


# ------------------------------------------------------------------------------ format_update


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        pytest.param(ProgressUpdate(step=5), "step 5", id="step-only"),
        pytest.param(
            ProgressUpdate(
                step=12, total_steps=40, loss=1.23456, tokens_per_second=850.4, eta_seconds=65
            ),
            "step 12/40 (30%) loss 1.2346 tokens/s 850 eta 1m05s",
            id="full",
        ),
        pytest.param(
            ProgressUpdate(step=2, total_steps=4, loss=math.nan),
            "step 2/4 (50%)",
            id="nan-loss-omitted",
        ),
        pytest.param(
            ProgressUpdate(step=2, total_steps=4, loss=math.inf),
            "step 2/4 (50%)",
            id="inf-loss-omitted",
        ),
        pytest.param(
            ProgressUpdate(step=10, total_steps=10, eval_loss=0.5),
            "step 10/10 (100%) eval_loss 0.5000",
            id="eval-loss",
        ),
        pytest.param(ProgressUpdate(step=1, eta_seconds=0), "step 1 eta 0m00s", id="eta-zero"),
        pytest.param(
            ProgressUpdate(step=1, eta_seconds=3725), "step 1 eta 62m05s", id="eta-over-an-hour"
        ),
        pytest.param(ProgressUpdate(step=1, total_steps=0), "step 1", id="zero-total"),
    ],
)
def test_format_update(update: ProgressUpdate, expected: str) -> None:
    assert format_update(update) == expected


def test_log_sink_logs_the_formatted_line(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.progress.logsink")
    with caplog.at_level(logging.INFO, logger=logger.name):
        LogSink(logger).emit(ProgressUpdate(step=3, total_steps=6))
    assert [r.getMessage() for r in caplog.records] == ["step 3/6 (50%)"]


# ------------------------------------------------------------------------------ JsonlSink


def test_jsonl_sink_appends_one_record_per_update(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "progress.jsonl"
    sink = JsonlSink(path)  # creates the parent directories
    assert path.parent.is_dir()
    sink.emit(ProgressUpdate(step=1, total_steps=4, loss=2.0, tokens_per_second=10.0))
    sink.emit(ProgressUpdate(step=4, total_steps=4, final=True))
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2
    first, last = records
    assert first["step"] == 1
    assert first["total_steps"] == 4
    assert first["percent"] == 25
    assert first["loss"] == 2.0
    assert first["tokens_per_second"] == 10.0
    assert first["final"] is False
    assert isinstance(first["time"], float)
    assert last["percent"] == 100
    assert last["final"] is True
    assert set(first) == {
        "step",
        "total_steps",
        "epoch",
        "loss",
        "eval_loss",
        "learning_rate",
        "tokens_per_second",
        "eta_seconds",
        "final",
        "percent",
        "time",
    }


def test_jsonl_sink_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    path.write_text('{"step": 0}\n', encoding="utf-8")
    JsonlSink(path).emit(ProgressUpdate(step=1))
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1]


# ------------------------------------------------------------------------------ HttpSink


def test_http_sink_posts_status_progress_with_bearer_token(
    endpoint: Endpoint, token_file: Path
) -> None:
    sink = HttpSink(endpoint.url, token_file, clock=FakeClock())
    update = ProgressUpdate(
        step=12, total_steps=40, epoch=0.3, loss=1.5, tokens_per_second=900.0, eta_seconds=70
    )
    sink.emit(update)
    assert len(endpoint.requests) == 1
    request = endpoint.requests[0]
    assert request.path == "/progress/ns-a/job-a"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"  # stripped of its newline
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {
        "step": 12,
        "totalSteps": 40,
        "percent": 30,
        "epoch": 0.3,
        "loss": 1.5,
        "tokensPerSecond": 900.0,
        "etaSeconds": 70,
    }


def test_http_sink_rereads_the_token_after_rotation(endpoint: Endpoint, token_file: Path) -> None:
    clock = FakeClock()
    sink = HttpSink(endpoint.url, token_file, min_interval=5.0, clock=clock)
    sink.emit(ProgressUpdate(step=1))
    token_file.write_text("rotated-token\n", encoding="utf-8")
    clock.now += 5.0
    sink.emit(ProgressUpdate(step=2))
    assert [r.headers["Authorization"] for r in endpoint.requests] == [
        f"Bearer {TOKEN}",
        "Bearer rotated-token",
    ]


def test_http_sink_throttles_and_always_sends_the_final_update(
    endpoint: Endpoint, token_file: Path
) -> None:
    clock = FakeClock()
    sink = HttpSink(endpoint.url, token_file, min_interval=5.0, clock=clock)
    timeline = [
        (0.0, ProgressUpdate(step=1)),  # sent: the first update
        (1.0, ProgressUpdate(step=2)),  # dropped
        (4.999, ProgressUpdate(step=3)),  # dropped: still inside the interval
        (5.0, ProgressUpdate(step=4)),  # sent: interval elapsed
        (6.0, ProgressUpdate(step=5)),  # dropped
        (7.0, ProgressUpdate(step=6, final=True)),  # sent: final, despite the interval
        (7.5, ProgressUpdate(step=6)),  # dropped: the final one reset the interval
    ]
    start = clock.now
    for offset, update in timeline:
        clock.now = start + offset
        sink.emit(update)
    assert [r.json()["step"] for r in endpoint.requests] == [1, 4, 6]


def test_reporter_fans_out_to_every_sink(endpoint: Endpoint, token_file: Path, tmp_path: Path):
    jsonl = tmp_path / "progress.jsonl"
    reporter = ProgressReporter(
        [JsonlSink(jsonl), HttpSink(endpoint.url, token_file, clock=FakeClock())]
    )
    reporter.report(ProgressUpdate(step=1, total_steps=2))
    reporter.report(ProgressUpdate(step=2, total_steps=2, final=True))
    assert len(jsonl.read_text().splitlines()) == 2
    assert [r.json()["percent"] for r in endpoint.requests] == [50, 100]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == PROGRESS_LOGGER and r.levelno == logging.WARNING
    ]


def test_http_sink_endpoint_down_warns_once_and_never_raises(
    token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    url = f"http://127.0.0.1:{free_port()}/progress/ns-a/job-a"
    sink = HttpSink(url, token_file, min_interval=1.0, clock=clock, timeout=2.0)
    with caplog.at_level(logging.WARNING, logger=PROGRESS_LOGGER):
        for step in range(1, 5):
            clock.now += 2.0
            sink.emit(ProgressUpdate(step=step))
        sink.emit(ProgressUpdate(step=5, final=True))
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "unreachable" in warnings[0]
    assert TOKEN not in caplog.text


def test_http_sink_warns_again_after_recovery(
    endpoint: Endpoint, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning per outage: down, up (no warning), down again (a second warning)."""
    clock = FakeClock()
    down = f"http://127.0.0.1:{free_port()}/p"
    sink = HttpSink(down, token_file, min_interval=1.0, clock=clock, timeout=2.0)
    with caplog.at_level(logging.WARNING, logger=PROGRESS_LOGGER):
        for step, url in enumerate([down, down, endpoint.url, endpoint.url, down, down]):
            sink._url = url  # the same sink, the endpoint going away and coming back
            clock.now += 2.0
            sink.emit(ProgressUpdate(step=step))
    assert len(_warnings(caplog)) == 2
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(401, id="unauthorized"),
        pytest.param(404, id="not-found"),
        pytest.param(500, id="server-error"),
    ],
)
def test_http_sink_error_status_warns_without_raising_or_leaking_the_token(
    endpoint: Endpoint, token_file: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    endpoint.status = status
    clock = FakeClock()
    sink = HttpSink(endpoint.url, token_file, min_interval=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=PROGRESS_LOGGER):
        sink.emit(ProgressUpdate(step=1))
        clock.now += 2.0
        sink.emit(ProgressUpdate(step=2))
    assert len(endpoint.requests) == 2  # it keeps trying
    assert len(_warnings(caplog)) == 1
    assert TOKEN not in caplog.text


def test_http_sink_missing_token_file_warns_without_raising(
    endpoint: Endpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = HttpSink(endpoint.url, tmp_path / "no-such-token", clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger=PROGRESS_LOGGER):
        sink.emit(ProgressUpdate(step=1))
    assert endpoint.requests == []
    assert len(_warnings(caplog)) == 1


def test_http_sink_non_http_answer_never_raises(garbage_server: str, token_file: Path) -> None:
    sink = HttpSink(garbage_server, token_file, clock=FakeClock(), timeout=3.0)
    sink.emit(ProgressUpdate(step=1))


def test_http_sink_unknown_scheme_warns_without_raising(
    token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=PROGRESS_LOGGER):
        HttpSink("ftp+x://operator/progress", token_file, clock=FakeClock()).emit(
            ProgressUpdate(step=1)
        )
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("kubetune-operator.kubetune/progress/ns/name", id="no-scheme"),
        pytest.param("http://[::1/progress", id="malformed-ipv6-host"),
        pytest.param("", id="empty"),
    ],
)
def test_http_sink_malformed_url_never_raises(url: str, token_file: Path) -> None:
    HttpSink(url, token_file, clock=FakeClock()).emit(ProgressUpdate(step=1))
