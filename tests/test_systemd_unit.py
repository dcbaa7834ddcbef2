"""The systemd units: what they promise, and `systemd-analyze verify` when available."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edged.service"
SOCKET = UNIT.with_name("edged.socket")


def directives(unit: Path = UNIT) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_promises() -> None:
    d = directives()
    assert d["Type"] == ["notify"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert any("/etc/edged/certs" in v for v in d["ReadWritePaths"])
    assert int(d["LimitNOFILE"][0]) >= 65536
    assert d["ExecStart"][0].endswith("edged run --config /etc/edged/edged.toml")
    assert d["WatchdogSec"] == ["30s"]
    # The service works without the socket unit: no hard dependency on it.
    assert not any("edged.socket" in v for v in d.get("Requires", []) + d.get("BindsTo", []))


def test_socket_unit_promises() -> None:
    d = directives(SOCKET)
    assert d["ListenStream"] == ["0.0.0.0:443", "[::]:443", "0.0.0.0:80"]
    assert d["BindIPv6Only"] == ["ipv6-only"]  # [::]:443 and 0.0.0.0:443 are separate sockets
    assert d["Service"] == ["edged.service"]
    assert d["WantedBy"] == ["sockets.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    edged = Path(sys.executable).with_name("edged")
    unit = tmp_path / "edged.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edged", str(edged)))
    socket_unit = tmp_path / "edged.socket"
    socket_unit.write_text(SOCKET.read_text())
    for units in ([unit], [socket_unit, unit]):
        out = subprocess.run(
            ["systemd-analyze", "verify", *map(str, units)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "edged.service" not in out.stderr, out.stderr
        assert "edged.socket" not in out.stderr, out.stderr
