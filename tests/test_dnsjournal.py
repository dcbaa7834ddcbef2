"""The DNS-01 journal against a real BIND9: TXT values an edged process added and could not
delete because it was killed (SIGKILL of a real solver process, tests/dns01_solver.py) are
deleted by the next sweep of the same node, and only those."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from acme import challenges, messages
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import jwk

from edged.acme.solvers import Dns01Solver
from edged.config import Address, DnsSettings
from edged.dns import DnsError, DnsUpdater, load_tsig_key
from edged.dnsjournal import DnsJournal, SweepResult
from tests.bind import Bind, bind_fixture
from tests.dns01_solver import write_settings
from tests.ports import free_port
from tests.test_dns01 import slow_dns_proxy

NODE = "edge1"
RETRY = "in 900s (acme.retry_interval, a minute at least) and at the next start"

bind = bind_fixture(
    {
        "j.test": "",
        "locked.test": '_acme-challenge.static TXT "value-in-a-locked-zone"',
    },
    read_only=("locked.test",),
)


@pytest.fixture(autouse=True)
def _journal_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edged.dns01")


def updater(settings: DnsSettings, journal: DnsJournal | None = None) -> DnsUpdater:
    return DnsUpdater(settings, load_tsig_key(settings), timeout=1.0, journal=journal)


def sweep(journal: DnsJournal, settings: DnsSettings) -> SweepResult:
    return journal.sweep(lambda: updater(settings, journal), retry=RETRY)


@dataclass
class Solver:
    """A solver process that presented challenges and waits, its TXT values in DNS."""

    process: subprocess.Popen[str]
    pid: int
    records: list[tuple[str, str]]

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def solvers(tmp_path: Path) -> Iterator[list[Solver]]:
    started: list[Solver] = []
    yield started
    for solver in started:
        if solver.process.poll() is None:
            solver.kill()


def start_solver(
    started: list[Solver], directory: Path, node: str, settings: DnsSettings, *names: str
) -> Solver:
    directory.parent.mkdir(parents=True, exist_ok=True)
    settings_file = directory.parent / f"settings-{len(started)}.json"
    write_settings(settings_file, settings)
    args = [str(directory), node, str(settings_file), *names]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.dns01_solver", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        process.stdout.close()
        raise RuntimeError(f"the solver process ended: exit {process.wait(10)}")
    raw = json.loads(line)
    solver = Solver(process, raw["pid"], [(f, v) for f, v in raw["records"]])
    started.append(solver)
    return solver


def journal_files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def listed(path: Path) -> set[tuple[str, str]]:
    data = json.loads(path.read_text())
    return {(v["fqdn"], v["value"]) for v in data["values"]}


def test_a_killed_order_leaves_values_the_next_sweep_removes(
    bind: Bind, tmp_path: Path, solvers: list[Solver], caplog: pytest.LogCaptureFixture
) -> None:
    settings = bind.settings()
    directory = tmp_path / "store" / "dns01"
    solver = start_solver(solvers, directory, NODE, settings, "kill.j.test", "*.kill.j.test")
    fqdn = "_acme-challenge.kill.j.test"
    values = {v for _, v in solver.records}
    assert [f for f, _ in solver.records] == [fqdn, fqdn] and len(values) == 2
    assert bind.txt(fqdn) == values
    (journal_file,) = [n for n in journal_files(directory) if n.endswith(".json")]
    assert journal_file.startswith(f"{NODE}.")
    assert listed(directory / journal_file) == {(fqdn, v) for v in values}

    journal = DnsJournal(directory, NODE)
    # While the process lives its values are challenges in flight: left alone.
    assert sweep(journal, settings) == SweepResult()
    assert bind.txt(fqdn) == values

    solver.kill()  # in the middle of the order: its cleanup never runs
    assert bind.txt(fqdn) == values
    result = sweep(journal, settings)
    assert result == SweepResult(removed=2, failed=0)
    assert bind.txt(fqdn) == set()
    for value in values:
        line = (
            f'removed leftover DNS-01 TXT value "{value}" at {fqdn} (zone j.test) from DNS '
            f"server 127.0.0.1:{bind.port}, left by an interrupted order (edged pid "
            f"{solver.pid}, added "
        )
        assert sum(line in r.getMessage() for r in caplog.records) == 1, caplog.text
    assert journal.leftover_count() == 0
    journal.close()
    assert journal_files(directory) == []  # its journal and lock, and ours, are gone
    assert sweep(DnsJournal(directory, NODE), settings) == SweepResult()


def test_a_leftover_whose_delete_fails_stays_and_is_retried(
    bind: Bind, tmp_path: Path, solvers: list[Solver], caplog: pytest.LogCaptureFixture
) -> None:
    settings = bind.settings()
    directory = tmp_path / "dns01"
    solver = start_solver(solvers, directory, NODE, settings, "down.j.test")
    ((fqdn, value),) = solver.records
    (added,) = [
        v["added"] for v in json.loads(next(directory.glob("*.json")).read_text())["values"]
    ]
    solver.kill()
    journal = DnsJournal(directory, NODE)
    down = bind.settings(server=Address("127.0.0.1", free_port()))
    assert sweep(journal, down) == SweepResult(removed=0, failed=1)
    assert bind.txt(fqdn) == {value}
    assert journal.leftover_count() == 1
    assert listed(journal.path) == {(fqdn, value)}  # taken over, durably
    assert [n for n in journal_files(directory) if n.endswith(".json")] == [journal.path.name]
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f'cannot remove leftover DNS-01 TXT value "{value}" at {fqdn} (zone j.test)' in error
    # Deleted through the server configured now; the one that added it is named too.
    assert f"added {datetime.fromtimestamp(added, UTC):%Y-%m-%dT%H:%M:%SZ} via DNS server " in error
    assert f"{settings.server}) from DNS server {down.server}: " in error
    assert "check acme.dns.server is the primary of zone j.test and reachable" in error
    assert f"it stays in {journal.path} and is tried again {RETRY}" in error
    assert f'`update delete {fqdn}. TXT "{value}"`' in error

    # The server is back: the next sweep removes it.
    caplog.clear()
    assert sweep(journal, settings) == SweepResult(removed=1, failed=0)
    assert bind.txt(fqdn) == set()
    assert journal.leftover_count() == 0
    assert not journal.path.exists()
    assert "removed leftover DNS-01 TXT value" in caplog.text


def test_a_refused_delete_names_the_update_policy_and_is_kept(
    bind: Bind, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal left by a process that is gone (written as edged writes it) lists a value
    in a zone that now refuses updates: the delete is REFUSED, the value stays listed."""
    settings = bind.settings()
    directory = tmp_path / "dns01"
    directory.mkdir()
    fqdn, value = "_acme-challenge.static.locked.test", "value-in-a-locked-zone"
    entry = {
        "fqdn": fqdn,
        "value": value,
        "zone": "locked.test",
        "server": str(settings.server),
        "added": 1_700_000_000.0,
        "pid": 4242,
    }
    journal_json = {"version": 1, "node": NODE, "pid": 4242, "values": [entry]}
    (directory / f"{NODE}.0123456789ab.json").write_text(json.dumps(journal_json))
    journal = DnsJournal(directory, NODE)
    assert sweep(journal, settings) == SweepResult(removed=0, failed=1)
    assert bind.txt(fqdn) == {value}
    assert listed(journal.path) == {(fqdn, value)}
    assert not (directory / f"{NODE}.0123456789ab.json").exists()
    error = caplog.text
    assert f'"{value}" at {fqdn} (zone locked.test)' in error
    assert "(edged pid 4242, added 2023-11-14T22:13:20Z) from DNS server" in error
    assert "answered REFUSED" in error
    assert "update-policy { grant edged zonesub TXT; };" in error
    assert sweep(journal, settings) == SweepResult(removed=0, failed=1)  # tried again


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 1, "node": "edge1", "values": [{"fqdn": 5}]}', b"\xff\x00"],
)
def test_a_corrupt_journal_is_moved_aside_and_dns01_goes_on(
    bind: Bind, tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    settings = bind.settings()
    directory = tmp_path / "dns01"
    directory.mkdir()
    corrupt = directory / f"{NODE}.00000000000a.json"
    corrupt.write_bytes(content)
    journal = DnsJournal(directory, NODE)
    assert sweep(journal, settings) == SweepResult()
    aside = directory / f"{NODE}.00000000000a.json.corrupt"
    assert aside.read_bytes() == content and not corrupt.exists()
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith(f"DNS-01 journal {corrupt} is corrupt (")
    assert f"moved to {aside} and not used" in error
    assert "dig TXT _acme-challenge.NAME" in error and f"and then {aside}" in error
    assert "Serving and issuing go on" in error
    # DNS-01 works as before: a value is written down, added, deleted and crossed out.
    u = updater(settings, journal)
    u.add_txt("_acme-challenge.after.j.test", "after-corrupt")
    assert listed(journal.path) == {("_acme-challenge.after.j.test", "after-corrupt")}
    assert bind.txt("_acme-challenge.after.j.test") == {"after-corrupt"}
    u.delete_txt("_acme-challenge.after.j.test", "after-corrupt")
    assert bind.txt("_acme-challenge.after.j.test") == set()
    assert not journal.path.exists()
    caplog.clear()
    assert sweep(journal, settings) == SweepResult()
    assert caplog.text == ""  # the file moved aside is not read again


def test_another_nodes_values_are_left_alone(
    bind: Bind, tmp_path: Path, solvers: list[Solver], caplog: pytest.LogCaptureFixture
) -> None:
    """A journal of node edge2 in this node's directory (copied with the store, or a store
    directory shared by mistake): its process is gone, but edge1 never deletes its values
    (they may be challenges edge2 still has in flight: the same value elsewhere is not)."""
    settings = bind.settings()
    directory = tmp_path / "dns01"
    other = start_solver(solvers, directory, "edge2", settings, "other.j.test")
    ((fqdn, value),) = other.records
    other.kill()
    own = start_solver(solvers, directory, NODE, settings, "own.j.test")
    ((own_fqdn, _),) = own.records
    own.kill()
    journal = DnsJournal(directory, NODE)
    assert sweep(journal, settings) == SweepResult(removed=1, failed=0)
    assert bind.txt(own_fqdn) == set()
    assert bind.txt(fqdn) == {value}  # edge2's stays
    (theirs,) = [n for n in journal_files(directory) if n.startswith("edge2.") and "json" in n]
    assert listed(directory / theirs) == {(fqdn, value)}
    warning = f"DNS-01 journal {directory / theirs} belongs to node edge2, not this node (edge1)"
    assert caplog.text.count(warning) == 1
    assert "left alone" in caplog.text and "delete the values it lists by hand" in caplog.text
    assert sweep(journal, settings) == SweepResult()
    assert caplog.text.count(warning) == 1  # said once
    assert bind.txt(fqdn) == {value}
    updater(settings).delete_txt(fqdn, value)


def challenge() -> tuple[messages.ChallengeBody, jwk.JWK]:
    challb = messages.ChallengeBody(
        chall=challenges.DNS01(token=os.urandom(32)),
        uri="https://ca.test/chall/1",
        status=messages.STATUS_PENDING,
    )
    return challb, jwk.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def test_values_are_written_down_before_the_update_and_crossed_out_after(
    bind: Bind, tmp_path: Path
) -> None:
    settings = bind.settings()
    journal = DnsJournal(tmp_path / "dns01", NODE)
    solver = Dns01Solver(updater(settings, journal))
    solver.present("order.j.test", *challenge())
    ((fqdn, value),) = solver._records
    assert listed(journal.path) == {(fqdn, value)}
    assert journal.leftover_count() == 0  # in flight: no sweep touches it
    assert sweep(journal, settings) == SweepResult()
    assert bind.txt(fqdn) == {value}
    solver.cleanup()
    assert bind.txt(fqdn) == set()
    assert not journal.path.exists()
    # A refused add changed nothing: nothing stays listed.
    with pytest.raises(DnsError, match="REFUSED"):
        updater(settings, journal).add_txt("_acme-challenge.x.locked.test", "refused")
    assert not journal.path.exists()


def test_an_unwritable_journal_stops_the_add(bind: Bind, tmp_path: Path) -> None:
    """A value that cannot be written down is not added: a crash could leave it for good."""
    (tmp_path / "dns01").write_text("a file where the journal directory goes\n")
    journal = DnsJournal(tmp_path / "dns01", NODE)
    fqdn = "_acme-challenge.unwritable.j.test"
    with pytest.raises(DnsError) as err:
        updater(bind.settings(), journal).add_txt(fqdn, "never-added")
    assert err.value.name == str(journal.path)
    assert f"cannot write down the TXT value for {fqdn} before adding it" in err.value.message
    assert "so it was not added" in err.value.message
    assert f"check free space and permissions of {tmp_path / 'dns01'}" in err.value.message
    assert bind.txt(fqdn) == set()


def test_an_add_without_an_answer_stays_until_a_delete_succeeds(
    bind: Bind, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An update whose answer did not come may have been applied (named did): it stays
    listed; the cleanup's delete times out too, so it becomes a leftover that the next sweep
    deletes."""
    journal = DnsJournal(tmp_path / "dns01", NODE)
    with slow_dns_proxy(bind.port, delay=1.5) as port:
        slow = bind.settings(server=Address("127.0.0.1", port))
        solver = Dns01Solver(DnsUpdater(slow, load_tsig_key(slow), timeout=0.5, journal=journal))
        with pytest.raises(DnsError, match="no answer from DNS server"):
            solver.present("slow.j.test", *challenge())
        ((fqdn, value),) = solver._records
        assert bind.txt(fqdn) == {value}
        assert listed(journal.path) == {(fqdn, value)}
        assert journal.leftover_count() == 0
        solver.cleanup()
    assert "kept in the DNS-01 journal: deleted again at its next sweep" in caplog.text
    assert journal.leftover_count() == 1
    assert sweep(journal, bind.settings()) == SweepResult(removed=1, failed=0)
    assert bind.txt(fqdn) == set()
    assert not journal.path.exists()


def test_leftovers_that_cannot_be_deleted_without_acme_dns_are_listed_once(
    bind: Bind, tmp_path: Path, solvers: list[Solver], caplog: pytest.LogCaptureFixture
) -> None:
    """The challenge is no longer dns-01 ([acme.dns] gone): the leftovers of a killed order
    are taken over and listed in one error (not one per sweep), and stay until they can go."""
    settings = bind.settings()
    directory = tmp_path / "dns01"
    solver = start_solver(solvers, directory, NODE, settings, "noconf.j.test")
    ((fqdn, value),) = solver.records
    solver.kill()
    journal = DnsJournal(directory, NODE)

    def unconfigured() -> DnsUpdater:
        raise DnsError("acme.dns", "is not configured, so they cannot be deleted: add it")

    for _ in range(2):
        assert journal.sweep(unconfigured, retry=RETRY) == SweepResult(removed=0, failed=1)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith(
        f'cannot remove 1 leftover DNS-01 TXT value(s) left by interrupted orders ("{value}" '
        f"at {fqdn} (zone j.test)): acme.dns: is not configured"
    )
    assert f"they stay in {journal.path} and are tried again {RETRY}" in error
    assert journal.leftover_count() == 1 and bind.txt(fqdn) == {value}
    assert sweep(journal, settings) == SweepResult(removed=1, failed=0)
    assert bind.txt(fqdn) == set()


def test_the_lock_and_temp_files_of_a_dead_process_go(bind: Bind, tmp_path: Path) -> None:
    """A process that died with nothing listed (or mid-write) left its lock file and maybe a
    temp file: the next sweep removes them; another process's files stay."""
    directory = tmp_path / "dns01"
    directory.mkdir()
    dead = [f"{NODE}.0000000000aa.lock", f".tmp-{NODE}.0000000000aa.json-0123456789ab"]
    kept = ["edge2.0000000000bb.lock", "notes.txt"]
    for name in dead + kept:
        (directory / name).write_text("")
    journal = DnsJournal(directory, NODE)
    assert sweep(journal, bind.settings()) == SweepResult()
    assert journal_files(directory) == sorted(kept)


def test_a_sweep_racing_a_new_journal_never_takes_it_over(bind: Bind, tmp_path: Path) -> None:
    """The moment between a process creating its lock file and locking it: a sweep that
    locks it first finds no journal and removes the file. The process then locks a new lock
    file before writing its journal, so its value in flight is never taken for a leftover."""
    settings = bind.settings()
    directory = tmp_path / "dns01"
    directory.mkdir()
    live = DnsJournal(directory, NODE)
    lock_path = directory / f"{NODE}.{live.token}.lock"
    # The sweep's side, done by hand: lock the (just created) file and hold it.
    sweeper_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(sweeper_fd, fcntl.LOCK_EX)
    fqdn = "_acme-challenge.race.j.test"
    adding = threading.Thread(target=updater(settings, live).add_txt, args=(fqdn, "in-flight"))
    adding.start()
    adding.join(0.3)
    assert adding.is_alive()  # waits for the lock, writes nothing down, adds nothing yet
    assert not live.path.exists() and bind.txt(fqdn) == set()
    os.unlink(lock_path)  # the sweep found no journal: it removes the file and lets go
    os.close(sweeper_fd)
    adding.join(10)
    assert listed(live.path) == {(fqdn, "in-flight")}
    assert bind.txt(fqdn) == {"in-flight"}
    assert lock_path.exists()  # a new lock file, held
    assert sweep(DnsJournal(directory, NODE), settings) == SweepResult()
    assert bind.txt(fqdn) == {"in-flight"}
    updater(settings, live).delete_txt(fqdn, "in-flight")
    live.close()
    assert journal_files(directory) == []
