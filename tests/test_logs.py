"""Log output (`edged run --log-format text|json`) and the per-connection log."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edged.config import parse_config
from edged.errors import ConfigError
from edged.logs import JsonFormatter, TextFormatter, Throttled, setup_logging
from tests.conftest import free_port, run_backend, run_edged, spawn_edged
from tests.test_systemd import (
    NAME,
    Edged,
    Notify,
    client_context,
    site,
    start_edged,
    tls_request,
)

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ \S.*$"
)


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("edged.test", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_text_format_is_one_line_with_escaped_control_characters() -> None:
    line = TextFormatter().format(record("bad sni %s", "evil\r\nINFO forged\x1b[31m"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert TEXT_LINE.match(line), line
    assert line.endswith("WARNING edged.test bad sni evil\\r\\nINFO forged\\x1b[31m")


def test_json_format_has_fields_and_extras() -> None:
    obj = json.loads(JsonFormatter().format(record("conn in=%d", 5, client="1.2.3.4:5", n=3)))
    assert obj["level"] == "WARNING" and obj["logger"] == "edged.test"
    assert obj["msg"] == "conn in=5"
    assert (obj["client"], obj["n"]) == ("1.2.3.4:5", 3)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", obj["ts"])


def test_exceptions_keep_their_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord(
            "edged.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exc"]
    text = TextFormatter().format(rec)
    assert text.splitlines()[0].endswith("ERROR edged.test failed")
    assert all(line.startswith("    ") for line in text.splitlines()[1:])


def test_setup_logging_replaces_handlers() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    try:
        setup_logging("info", "json", out)
        logging.getLogger("edged.x").info("hello %s", "there")
        logging.getLogger("edged.x").debug("hidden")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["hello there"]


def test_throttled_logs_once_per_interval_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edged.test")
    now = [0.0]  # a fresh clock: the first line is logged whatever the clock says
    throttle = Throttled(logging.getLogger("edged.test"), interval=10, clock=lambda: now[0])
    for _ in range(5):
        throttle.info("refused", "refused host=%s", "a.test")
    throttle.warning("failed", "lookup failed")  # another key has its own interval
    now[0] = 10.0
    throttle.info("refused", "refused host=%s", "b.test")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "refused host=a.test"),
        ("WARNING", "lookup failed"),
        ("INFO", "refused host=b.test (4 more like this suppressed)"),
    ]


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_daemon_logs_format_and_no_key_material(
    tmp_path: Path, pki: dict[str, Path], fmt: str
) -> None:
    """A run with a certificate, a connection (connection log on) and a stop: every stderr
    line is in the chosen format and none carries private key material."""
    port = free_port()
    async with run_backend() as backend:
        config = tmp_path / "edged.toml"
        config.write_text(
            f"""
[edged]
store = "store"
connection_log = true
[listen]
https = ["127.0.0.1:{port}"]
http = []
metrics = ""
admin = ""
"""
            + site(pki, backend.address)
        )
        notify = Notify(tmp_path / "notify.sock")
        env = {"NOTIFY_SOCKET": str(notify.path)}
        args = ("--log-format", fmt, "--log-level", "debug")
        try:
            async with start_edged(config, env, args=args) as edged:
                await notify.until("READY=1")
                assert b"backend=b1" in await tls_request(port, client_context(pki))
                await notify_conn_closed(edged)
                edged.proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(edged.proc.wait(), 20) == 0
        finally:
            notify.close()
    log = edged.log
    assert "PRIVATE KEY" not in log and "BEGIN" not in log
    assert pki["one_key"].read_text().splitlines()[1] not in log
    lines = log.splitlines()
    assert lines
    if fmt == "json":
        objs = [json.loads(line) for line in lines]
        assert all({"ts", "level", "logger", "msg"} <= obj.keys() for obj in objs)
        conn = [o for o in objs if o["logger"] == "edged.conn"]
        assert len(conn) == 1
        c = conn[0]
        assert c["sni"] == NAME and c["site"] == NAME and c["reason"] == "done"
        assert c["client"].startswith("127.0.0.1:")
        assert c["tls_version"] == "TLSv1.3" and c["cipher"].startswith("TLS_")
        assert c["alpn"] == "-"  # the test client offers none
        assert c["bytes_in"] > 0 and c["bytes_out"] > 0 and c["duration"] >= 0
        assert any(o["msg"].startswith("edged ready") for o in objs)
    else:
        assert all(TEXT_LINE.match(line) for line in lines), lines
        conn = [line for line in lines if " INFO edged.conn " in line]
        assert len(conn) == 1
        assert re.search(
            rf"conn client=127\.0\.0\.1:\d+ sni={re.escape(NAME)} site={re.escape(NAME)} "
            r"tls=TLSv1\.3 cipher=TLS_\w+ alpn=- in=[1-9]\d* out=[1-9]\d* secs=\d+\.\d{3} "
            r"reason=done$",
            conn[0],
        ), conn[0]


async def eventually(predicate: Callable[[], bool], limit: float = 20) -> None:
    """Wait for a condition the daemon (another process, or its logging) offers no event for."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def notify_conn_closed(edged: Edged) -> None:
    """Wait until the connection log line is out (the daemon logs it when the close is seen)."""
    await eventually(lambda: "edged.conn" in edged.log)


async def test_connection_log_hides_unknown_sni_and_samples(
    tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """An SNI the sites do not serve (answered by default_cert) is logged as "-"; with
    connection_log_sample = 0 nothing is logged."""
    ctx = client_context(pki)
    ctx.check_hostname = False
    caplog.set_level(logging.INFO, logger="edged.conn")
    body = f'[tls]\ndefault_cert = "{NAME}"\n' + site(pki, "127.0.0.1:1")
    async with run_edged(tmp_path, body) as e:
        text = e.config_path.read_text().replace(
            "drain_timeout = 2", "drain_timeout = 2\nconnection_log = true"
        )
        e.config_path.write_text(text)
        assert await e.daemon.reload("test")
        for sni in ("unknown.example.test", NAME):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", e.port, ssl=ctx, server_hostname=sni
            )
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        await eventually(lambda: len([r for r in caplog.records if r.name == "edged.conn"]) == 2)
        recs = [r for r in caplog.records if r.name == "edged.conn"]
        assert sorted(r.__dict__["sni"] for r in recs) == ["-", NAME]
        assert all(r.__dict__["site"] == NAME for r in recs)
        sampled = "connection_log = true\nconnection_log_sample = 0"
        e.config_path.write_text(text.replace("connection_log = true", sampled))
        assert await e.daemon.reload("test")
        caplog.clear()
        _, writer = await asyncio.open_connection(
            "127.0.0.1", e.port, ssl=ctx, server_hostname=NAME
        )
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        await eventually(lambda: e.daemon.connections_active() == 0)
        assert not [r for r in caplog.records if r.name == "edged.conn"]


def test_connection_log_config() -> None:
    base = '[[site]]\nnames = ["a.example.test"]\nbackend = "127.0.0.1:1"\n'
    config = parse_config("[edged]\n" + base, Path("t.toml"))
    assert (config.edged.connection_log, config.edged.connection_log_sample) == (False, 1.0)
    config = parse_config(
        "[edged]\nconnection_log = true\nconnection_log_sample = 0.25\n" + base, Path("t.toml")
    )
    assert (config.edged.connection_log, config.edged.connection_log_sample) == (True, 0.25)
    with pytest.raises(ConfigError, match="connection_log_sample: must be a fraction"):
        parse_config("[edged]\nconnection_log_sample = 1.5\n" + base, Path("t.toml"))
    with pytest.raises(ConfigError, match="connection_log: must be true or false"):
        parse_config('[edged]\nconnection_log = "yes"\n' + base, Path("t.toml"))


def test_run_rejects_unknown_log_format() -> None:
    from edged.cli import _parser

    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        _parser().parse_args(["run", "--log-format", "xml"])
    assert exc.value.code == 2


async def test_log_written_into_the_watched_directory_does_not_feed_itself(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """stderr into a file beside the config (a directory edged watches): each line written is
    a change there, and a watcher that logged what it saw would feed itself forever. edged logs
    only the changes it acts on (and does not even wake for writes: edged.inotify)."""
    port = free_port()
    async with run_backend() as backend:
        config = tmp_path / "edged.toml"
        config.write_text(
            f'[edged]\nstore = "store"\n[listen]\nhttps = ["127.0.0.1:{port}"]\nhttp = []\n'
            f'metrics = ""\nadmin = ""\n' + site(pki, backend.address)
        )
        log = tmp_path / "edged.log"
        proc = await spawn_edged(config, log)
        try:
            deadline = time.monotonic() + 20
            while b"edged ready" not in log.read_bytes():
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # the watcher is up: a reload's log line starts it off
            proc.send_signal(signal.SIGHUP)
            while b"reloaded" not in log.read_bytes():
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            settled = len(log.read_bytes())
            await asyncio.sleep(2.0)
            text = log.read_text()
            assert len(text) == settled, text[-2000:]  # nothing more was written
            assert "change detected" not in text
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
