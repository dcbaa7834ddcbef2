"""The `edged` command. The only module that prints for users and calls sys.exit.

Exit codes: 0 ok, 1 invalid input or check failed, 2 usage, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from edged import __version__
from edged.certs import chain_problem, check_bundle, describe_chain, parse_bundle
from edged.config import DEFAULT_CONFIG_PATH, Config, load_config
from edged.errors import CertError, CertReason, ConfigError, StoreError
from edged.names import NameError_, covers, normalize_name
from edged.sources import load_site_certs, read_pem, validate_stored
from edged.store.files import FileStore

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description="Edge TLS termination daemon.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG_PATH,
            help=f"config file (default {DEFAULT_CONFIG_PATH})",
        )

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    with_config(run)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check", help="validate the config and every certificate")
    with_config(check)

    rollback = sub.add_parser(
        "rollback", help="restore a name's previous certificate from the store (one step)"
    )
    with_config(rollback)
    rollback.add_argument("name", help="the site's first name (the store directory)")

    cert = sub.add_parser("cert", help="certificate tools")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    inspect = cert_sub.add_parser("inspect", help="show a PEM file's certificates and problems")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--key", type=Path, help="private key to check against the leaf")
    inspect.add_argument("--name", action="append", default=[], help="name it must cover")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "run":
        sys.exit(cmd_run(args.config, args.log_level))
    if args.command == "check":
        sys.exit(cmd_check(args.config))
    if args.command == "rollback":
        sys.exit(cmd_rollback(args.config, args.name))
    if args.command == "cert" and args.cert_command == "inspect":
        sys.exit(cmd_inspect(args.file, args.key, args.name))
    sys.exit(EXIT_USAGE)


def cmd_run(config_path: Path, level: str) -> int:
    import uvloop

    from edged.daemon import Daemon

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return uvloop.run(Daemon(config_path).run())


def _load_config_or_report(config_path: Path) -> Config | None:
    """The config, or None after printing each of its problems."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return None


def cmd_check(config_path: Path) -> int:
    config = _load_config_or_report(config_path)
    if config is None:
        return EXIT_INVALID
    store = None
    if config.store_path is not None and config.store_path.is_dir():
        try:
            store = FileStore(config.store_path)
        except StoreError as exc:
            print(f"{config.store_path}: edged.store: {exc}")
            return EXIT_INVALID
    certs = load_site_certs(config, store, datetime.now(UTC))
    for problem in certs.problems:
        print(problem)
    served = sum(len(b) for b in certs.bundles.values())
    status = "FAILED" if certs.errors else "ok"
    print(f"{config_path}: {status}: {len(config.sites)} sites, {served} valid certificates")
    return EXIT_INVALID if certs.errors else EXIT_OK


def cmd_rollback(config_path: Path, raw_name: str) -> int:
    """Swap live/ and previous/ for a name, after checking that the previous version is still
    valid for the site; a running daemon picks the change up from its store watch."""
    config = _load_config_or_report(config_path)
    if config is None:
        return EXIT_INVALID
    try:
        name = normalize_name(raw_name)
    except NameError_ as exc:
        print(f"{raw_name}: {exc}")
        return EXIT_INVALID
    site = config.site_for(name)
    if site is None or site.name != name:
        first = f" (its certificate is stored under {site.name!r})" if site else ""
        print(f"{name}: not the first name of any [[site]]{first}")
        return EXIT_INVALID
    if site.cert_file is not None:
        print(f"{name}: {site.key} uses cert_file {site.cert_file}: restore that file instead")
        return EXIT_INVALID
    if config.store_path is None:
        print(f"{name}: edged.store is not a directory")
        return EXIT_INVALID
    store = FileStore(config.store_path)
    try:
        previous = store.load_previous(name)
        if previous is None:
            print(f"{name}: no previous version in {config.store_path}: nothing to roll back to")
            return EXIT_INVALID
        # The same validation the daemon applies, so a rollback is never silently refused.
        _, problems = validate_stored(
            previous, site, datetime.now(UTC), config.tls.require_chain, "previous"
        )
        if problems:
            for problem in problems:
                print(f"{name}: {problem.source} certificate: {problem.message}")
            print(f"{name}: not rolled back")
            return EXIT_INVALID
        store.rollback(name)
    except StoreError as exc:
        print(f"{name}: {exc}")
        return EXIT_INVALID
    print(f"{name}: rolled back to the previous version (the running daemon reloads it)")
    return EXIT_OK


def cmd_inspect(path: Path, key_path: Path | None, names: list[str]) -> int:
    now = datetime.now(UTC)
    try:
        cert_pem = read_pem(path)
        summaries = describe_chain(cert_pem)
    except CertError as exc:
        print(f"{path}: {exc.message}")
        return EXIT_INVALID
    for s in summaries:
        role = "leaf" if s.index == 0 else ("root" if s.self_issued else "intermediate")
        print(f"[{s.index}] {role}: {s.subject}")
        print(f"    issuer:     {s.issuer}")
        if s.names:
            print(f"    names:      {', '.join(s.names)}")
        print(
            f"    valid:      {s.not_before:%Y-%m-%d %H:%M:%S} .. "
            f"{s.not_after:%Y-%m-%d %H:%M:%S} UTC"
        )
        print(f"    key:        {s.key_type}")
        print(f"    serial:     {s.serial}")
        print(f"    sha256:     {s.fingerprint}")
    problems: list[str] = []
    order_ok = True
    if key_path is None and b"PRIVATE KEY" not in cert_pem:
        # No key to match: still check order, linkage, dates and names.
        order = chain_problem(cert_pem, str(path))
        if order is not None:
            order_ok = False
            problems.append(order.message)
        leaf = summaries[0]
        if now > leaf.not_after:
            problems.append(f"expired on {leaf.not_after:%Y-%m-%d %H:%M:%S} UTC")
        elif now < leaf.not_before:
            problems.append(f"not valid before {leaf.not_before:%Y-%m-%d %H:%M:%S} UTC")
        for name in names:
            if not any(covers(n, name.lower().rstrip(".")) for n in leaf.names):
                problems.append(f"{name!r} is not covered by {', '.join(leaf.names) or 'no name'}")
        print("key:         not checked (pass --key KEY to check that it matches)")
    else:
        try:
            key_pem = read_pem(key_path) if key_path else cert_pem
            bundle = parse_bundle(
                cert_pem, key_pem, source=str(path), key_source=str(key_path or path)
            )
        except CertError as exc:
            order_ok = exc.reason not in (CertReason.CHAIN_ORDER, CertReason.CHAIN_BROKEN)
            problems.append(exc.message)
        else:
            problems.extend(e.message for e in check_bundle(bundle, now=now, names=names))
            print("key:         matches the leaf")
    if order_ok:
        print("chain order: ok (leaf first, each certificate signed by the next)")
    for problem in problems:
        print(f"{path}: problem: {problem}")
    if not problems:
        print(f"{path}: ok")
    return EXIT_INVALID if problems else EXIT_OK
