"""The systemd unit: what the foundation promises, and `systemd-analyze verify` when available."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edged.service"


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    edged = Path(sys.executable).with_name("edged")
    unit = tmp_path / "edged.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edged", str(edged)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "edged.service" not in out.stderr, out.stderr
