"""A DNS-01 order's solver for tests/test_dnsjournal.py, run as a subprocess and killed with
SIGKILL while its TXT values are in DNS: an edged process that died mid-order.

python -m tests.dns01_solver JOURNAL_DIR NODE SETTINGS.json NAME...
    presents a dns-01 challenge for each NAME with the real Dns01Solver (a DnsUpdater writing
    to DnsJournal(JOURNAL_DIR, NODE), settings from SETTINGS.json as written by
    write_settings), prints one JSON line {"pid", "records": [[fqdn, value], ...]} and then
    sleeps, like an order waiting for its values to propagate, until it is killed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from acme import challenges, messages
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwk

from edged.acme.solvers import Dns01Solver
from edged.config import Address, DnsSettings
from edged.dns import DnsUpdater, load_tsig_key
from edged.dnsjournal import DnsJournal


def write_settings(path: Path, settings: DnsSettings) -> None:
    assert settings.resolver is not None and settings.tsig_secret_file is not None
    path.write_text(
        json.dumps(
            {
                "server": [settings.server.host, settings.server.port],
                "resolver": [settings.resolver.host, settings.resolver.port],
                "tsig_key_name": settings.tsig_key_name,
                "tsig_secret_file": str(settings.tsig_secret_file),
                "nameserver_port": settings.nameserver_port,
            }
        )
    )


def read_settings(path: Path) -> DnsSettings:
    raw = json.loads(path.read_text())
    return DnsSettings(
        server=Address(*raw["server"]),
        resolver=Address(*raw["resolver"]),
        tsig_key_name=raw["tsig_key_name"],
        tsig_secret_file=Path(raw["tsig_secret_file"]),
        nameserver_port=raw["nameserver_port"],
        propagation_timeout=3600.0,
    )


def main(argv: list[str]) -> None:
    directory, node, settings_file, *names = argv
    settings = read_settings(Path(settings_file))
    journal = DnsJournal(Path(directory), node)
    updater = DnsUpdater(settings, load_tsig_key(settings), journal=journal, timeout=2.0)
    solver = Dns01Solver(updater)
    key = jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    for index, name in enumerate(names):
        challb = messages.ChallengeBody(
            chall=challenges.DNS01(token=os.urandom(32)),
            uri=f"https://ca.test/chall/{index}",
            status=messages.STATUS_PENDING,
        )
        solver.present(name, challb, key)
    records = [[fqdn, value] for fqdn, value in solver._records]
    print(json.dumps({"pid": os.getpid(), "records": records}), flush=True)
    while True:  # an order waiting for propagation, until SIGKILL
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1:])
