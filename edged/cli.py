"""The `edged` command. The only module that prints for users and calls sys.exit.

Exit codes: 0 ok, 1 invalid input or check failed, 2 usage, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edged import __version__, heap, systemd
from edged.certs import chain_problem, check_bundle, describe_chain, parse_bundle
from edged.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    Site,
    load_admin_settings,
    load_config,
    load_config_digest,
    redact_url,
)
from edged.errors import CertError, CertReason, ConfigError, StoreError
from edged.heap import AllocatorError
from edged.names import NameError_, covers, normalize_name
from edged.sources import load_site_certs, read_pem, validate_stored
from edged.store import open_store
from edged.store.files import FileStore
from edged.systemd import Inherited

if TYPE_CHECKING:
    from edged.admin_client import AdminClient
    from edged.zygote import Zygote

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
    run.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="stderr log lines: 'ts level logger message' (default) or one JSON object each",
    )

    check = sub.add_parser("check", help="validate the config and every certificate")
    with_config(check)
    check.add_argument(
        "--preflight",
        action="store_true",
        help="also check CAA, that names point here and the ACME challenge for every "
        "ACME-managed name (queries DNS, the CA's directory and, for dns-01, updates DNS)",
    )

    rollback = sub.add_parser(
        "rollback", help="restore a name's previous certificate from the store (one step)"
    )
    with_config(rollback)
    rollback.add_argument("name", help="the site's first name (the store directory)")

    issue = sub.add_parser(
        "issue", help="obtain certificates over ACME now, into the store (one-shot)"
    )
    with_config(issue)
    issue.add_argument("names", nargs="+", metavar="NAME", help="a name of a [[site]]")

    cert = sub.add_parser("cert", help="certificate tools")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    inspect = cert_sub.add_parser("inspect", help="show a PEM file's certificates and problems")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--key", type=Path, help="private key to check against the leaf")
    inspect.add_argument("--name", action="append", default=[], help="name it must cover")
    _add_admin_commands(sub, with_config)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "run":
        sys.exit(cmd_run(args.config, args.log_level, args.log_format))
    try:
        code = _command(args)
        sys.stdout.flush()  # here, not at exit, where a failure is a message on stderr
    except BrokenPipeError:
        # Whoever read the output stopped (`edged status | head`): no traceback. What is still
        # buffered goes nowhere, so the interpreter's last flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_INVALID)
    sys.exit(code)


def _command(args: argparse.Namespace) -> int:
    """Every command but `run`; its exit code."""
    if args.command == "check":
        return cmd_check(args.config, preflight=args.preflight)
    if args.command == "rollback":
        return cmd_rollback(args.config, args.name)
    if args.command == "issue":
        return cmd_issue(args.config, args.names)
    if args.command == "cert" and args.cert_command == "inspect":
        return cmd_inspect(args.file, args.key, args.name)
    if args.command in ADMIN_COMMANDS:
        return cmd_admin(args)
    return EXIT_USAGE


def cmd_run(config_path: Path, level: str, log_format: str = "text") -> int:
    import uvloop

    from edged.daemon import Daemon
    from edged.logs import setup_logging

    # Until the daemon is ready it builds what lives as long as it does (the config, the
    # certificates): no collector pass over that, it is frozen then (edged.heap).
    gc.disable()
    setup_logging(level, log_format, sys.stderr)
    config: Config | None = None
    digest: bytes | None = None
    with contextlib.suppress(ConfigError):  # the daemon loads it again and reports each problem
        config, digest = load_config_digest(config_path)
    try:
        _choose_allocator(config)
    except AllocatorError as exc:
        logging.getLogger("edged").error("%s", exc)
        return EXIT_INVALID
    # Socket activation: the passed fds are taken now, before edged creates any fd of its own
    # (one could take a number LISTEN_FDS names but did not pass) and before the zygote is
    # forked (it must not keep the ones edged closes as unused: they would go on accepting).
    inherited = systemd.listen_fds()
    zygote = _start_zygote(config, inherited) if config is not None else None
    return uvloop.run(Daemon(config_path, zygote, config, digest, inherited).run())


def _choose_allocator(config: Config | None) -> None:
    """Make the allocator the config asks for the one that runs (edged.heap), re-executing
    when it is not; returns when this process keeps the one it has. Before any thread,
    socket or child exists."""
    wanted = config.edged.allocator if config is not None else "auto"
    running = heap.current_allocator()
    decision = heap.plan(wanted, running, heap.find_jemalloc(), os.environ)
    if decision.env is not None:
        failed = heap.reexec(decision.env)
        if running == "system" and wanted == "jemalloc":
            raise AllocatorError(
                f'[edged] allocator = "jemalloc": re-executing {sys.executable} with it '
                f'preloaded failed: {failed}; set allocator = "system"'
            )
        logging.getLogger("edged").warning(
            "memory allocator: %s (re-executing %s %s failed: %s)",
            "jemalloc" if running == "jemalloc" else "the C library's malloc",
            sys.executable,
            "without jemalloc" if running == "jemalloc" else "with jemalloc preloaded",
            failed,
        )
    else:
        logging.getLogger("edged").info("%s", decision.note)
    heap.restore_environment()


def _start_zygote(config: Config, inherited: Sequence[Inherited]) -> Zygote | None:
    """With `[edged] workers` other than 1, the zygote that forks the worker processes; it must
    be forked now, before the event loop and any thread exist."""
    from edged.daemon import worker_count
    from edged.tls import server_context
    from edged.worker import run_worker
    from edged.zygote import start_zygote

    if worker_count(config) == 1:
        return None
    # The workers take their first config from the zygote's memory (edged.ipc.FORKED_CONFIG).
    return start_zygote(
        config.tls.min_version,
        server_context,
        run_worker,
        config,
        parent_only=[i.sock for i in inherited],  # the ones it serves come by SCM_RIGHTS
    )


def _load_config_or_report(config_path: Path) -> Config | None:
    """The config, or None after printing each of its problems."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return None


def cmd_check(config_path: Path, *, preflight: bool = False) -> int:
    config = _load_config_or_report(config_path)
    if config is None:
        return EXIT_INVALID
    local = config.local_store_path  # with Redis, the copy this node serves from
    if config.redis_url is not None:
        print(_redis_note(config_path, config.redis_url, local))
    store = None
    if local.is_dir():
        try:
            store = FileStore(local)
        except StoreError as exc:
            print(f"{local}: edged.store: {exc}")
            return EXIT_INVALID
    certs = load_site_certs(config, store, datetime.now(UTC))
    for problem in certs.problems:
        print(problem)
    served = sum(len(b) for b in certs.bundles.values())
    status = "FAILED" if certs.errors else "ok"
    print(f"{config_path}: {status}: {len(config.sites)} sites, {served} valid certificates")
    failed = bool(certs.errors)
    if preflight:
        failed = _preflight(config_path, config, store) or failed
    return EXIT_INVALID if failed else EXIT_OK


def _redis_note(config_path: Path, url: str, local: Path) -> str:
    """Says what `check` read for a Redis store: the node's local copy, not Redis (which may
    hold newer certificates: this node copies them when it runs)."""
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"  # no password
    if parts.scheme == "unix":
        where = f"unix://{parts.path}"
    copy = "" if local.is_dir() else " (it does not exist: no certificate copied yet)"
    return (
        f"{config_path}: edged.store: note: a Redis store ({where}): the certificates checked "
        f"are this node's local copy in {local}{copy} (edged.store_local); Redis itself was "
        "not read"
    )


def _preflight(config_path: Path, config: Config, store: FileStore | None) -> bool:
    """Print one line per preflight check (`name: check: ok|FAIL: message`); True if any failed."""
    import asyncio

    from edged.preflight import any_failed, preflight_sites, run_preflight

    if config.acme is None:
        print(f"{config_path}: preflight: no [acme] table: nothing to check")
        return False
    sites = preflight_sites(config, store)
    if not sites:
        print(f"{config_path}: preflight: no ACME-managed sites: nothing to check")
        return False
    # The store too: this node's ACME account is what a CAA record's accounturi must name.
    results = asyncio.run(run_preflight(config, sites=sites, store=store))
    for result in results:
        print(result.line())
    bad = sum(not r.ok for r in results)
    print(
        f"{config_path}: preflight {'FAILED' if bad else 'ok'}: {len(results)} checks, {bad} failed"
    )
    return any_failed(results)


def cmd_issue(config_path: Path, raw_names: list[str]) -> int:
    """Order certificates for the sites of the given names and store them; a running daemon
    picks them up from its store watch."""
    import asyncio

    from edged.acme.issue import Issued
    from edged.listen import StartupError
    from edged.renewer import issue_now

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = _load_config_or_report(config_path)
    if config is None:
        return EXIT_INVALID
    if config.acme is None:
        print(f"{config_path}: acme: no [acme] table: add one (directory, email) to issue")
        return EXIT_INVALID
    if config.store_path is None:
        print(
            f"{config_path}: edged.store: `edged issue` needs a directory store; with Redis the "
            f"fleet's daemons order: run `edged renew NAME --config {config_path}` on a node"
        )
        return EXIT_INVALID
    sites: list[Site] = []
    for raw in raw_names:
        try:
            name = normalize_name(raw)
        except NameError_ as exc:
            print(f"{raw}: {exc}")
            return EXIT_INVALID
        site = config.site_for(name)
        if site is None:
            print(f"{name}: not a name of any [[site]] in {config_path}: add it to a site first")
            return EXIT_INVALID
        if site.cert_file is not None:
            print(f"{name}: {site.key} uses cert_file {site.cert_file}: edged does not order it")
            return EXIT_INVALID
        if site not in sites:
            sites.append(site)
    store = FileStore(config.store_path)
    try:
        results = asyncio.run(issue_now(config, store, sites))
    except StartupError as exc:
        print(
            f"{exc}\nIf edged is running it answers the challenges itself: use "
            f"`edged renew NAME --config {config_path}` instead."
        )
        return EXIT_INVALID
    failed = 0
    for site, result in results:
        if isinstance(result, Issued):
            cert = result.cert
            pair = cert.pairs[0]
            bundle = parse_bundle(pair.fullchain, pair.privkey)
            print(
                f"{site.name}: issued for {', '.join(cert.names)}; key types "
                f"{', '.join(cert.key_types)}; valid until {bundle.not_after:%Y-%m-%d %H:%M} UTC; "
                f"issuer {bundle.issuer}; {result.seconds:.2f} s"
            )
        else:
            failed += 1
            print(f"{site.name}: not issued: {result}")
    return EXIT_INVALID if failed else EXIT_OK


def cmd_rollback(config_path: Path, raw_name: str) -> int:
    """Swap live/ and previous/ for a name, after checking that the previous version is still
    valid for the site; a running daemon picks the change up from its store watch (with a
    Redis store: from the change published in Redis, on every node of the fleet)."""
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
    # With a Redis store the fleet's copy is rolled back (every node follows it), not this
    # node's local copy.
    url = config.redis_url
    where = redact_url(url) if url else str(config.store_path)
    try:
        store = open_store(config)
    except StoreError as exc:
        print(f"{name}: {exc}")
        return EXIT_INVALID
    try:
        previous = store.load_previous(name)
        if previous is None:
            print(f"{name}: no previous version in {where}: nothing to roll back to")
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
        if url is None:
            store.rollback(name)
        else:
            from edged.store.redis import RedisStore

            assert isinstance(store, RedisStore)
            # Redis only: this node's daemon mirrors the change into its local copy itself.
            store.rollback(name, mirror=False)
    except StoreError as exc:
        print(f"{name}: {exc}")
        return EXIT_INVALID
    finally:
        close = getattr(store, "close", None)  # a Redis store's connections
        if close is not None:
            close()
    who = "every node of the fleet reloads it" if url else "the running daemon reloads it"
    print(f"{name}: rolled back to the previous version ({who})")
    return EXIT_OK


def cmd_inspect(path: Path, key_path: Path | None, raw_names: list[str]) -> int:
    now = datetime.now(UTC)
    try:  # the way sites name them: IDNA, lower case, no trailing dot
        names = [normalize_name(raw) for raw in raw_names]
    except NameError_ as exc:
        print(f"--name: {exc}")
        return EXIT_INVALID
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
            if not any(covers(n, name) for n in leaf.names):
                problems.append(f"{name!r} is not covered by {', '.join(leaf.names) or 'no name'}")
        key_problem = _leaf_key_problem(leaf.key_type)
        if key_problem is not None:
            problems.append(key_problem)
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


def _leaf_key_problem(key_type: str) -> str | None:
    """The problem with the leaf's key as describe_chain described it (CertSummary.key_type:
    a supported type, or "<type> (unsupported: <why>)", or "unreadable (<why>)"); None if
    it is supported. With --key, parse_bundle refuses such a key itself."""
    described, unsupported, why = key_type.partition(" (unsupported: ")
    if unsupported:
        return why.removesuffix(")").replace("the key", f"the leaf's key ({described})", 1)
    if key_type.startswith("unreadable ("):
        return f"the leaf's key is {key_type}: reissue the certificate"
    return None


# --- admin API commands: status, renew, upload, revoke, reload ----------------------------------

ADMIN_COMMANDS = ("status", "renew", "upload", "revoke", "reload")
_REVOKE_REASONS = (
    "unspecified",
    "keyCompromise",
    "superseded",
    "cessationOfOperation",
    "affiliationChanged",
)


def _add_admin_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The subcommands that talk to a running edged over its admin API (listen.admin).

    Exit codes: 0 ok, 1 the API refused (printed as `edged: <code>: <message>`), 2 usage,
    3 the daemon is unreachable.
    """
    epilog = "talks to the running daemon at listen.admin; exit 3 when it is unreachable"

    def admin_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        with_config(p)
        p.add_argument("--json", action="store_true", help="print the API's JSON answer")
        return p

    status = admin_parser("status", "show the daemon and every certificate (or one, by NAME)")
    status.add_argument("name", nargs="?", help="show this certificate in detail")
    renew = admin_parser("renew", "renew a certificate now (also retries a failed renewal)")
    renew.add_argument("name", help="the site's first name, e.g. example.com or '*.example.com'")
    upload = admin_parser(
        "upload",
        "serve your own certificate for NAME instead of ACME (--remove: back to ACME)",
    )
    upload.add_argument("name", help="the site's first name")
    source = upload.add_mutually_exclusive_group(required=True)
    source.add_argument("--cert", type=Path, help="PEM chain file, leaf first (needs --key)")
    source.add_argument(
        "--remove",
        action="store_true",
        help="hand NAME back to ACME (the upload serves until ACME has issued a new certificate)",
    )
    upload.add_argument("--key", type=Path, help="PEM private key file (unencrypted)")
    revoke = admin_parser(
        "revoke", "revoke NAME's certificate at the CA and issue a new one (unless --no-replace)"
    )
    revoke.add_argument("name", help="the site's first name")
    revoke.add_argument(
        "--reason", choices=_REVOKE_REASONS, default="unspecified", help="default unspecified"
    )
    revoke.add_argument(
        "--no-replace",
        dest="replace",
        action="store_false",
        help="do not order a replacement: the revoked certificate keeps serving until "
        "`edged renew NAME` or an upload replaces it",
    )
    admin_parser("reload", "reload the config and every certificate (like SIGHUP), report result")


def _admin_client(config_path: Path) -> AdminClient | int:
    """A client for the config's listen.admin, or an exit code after printing why not."""
    from edged.admin_client import AdminClient

    try:
        # Only listen.admin and its token: the daemon keeps serving through a config it
        # rejected or a key being replaced, and these commands must reach it then.
        listen = load_admin_settings(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    if listen.admin is None:
        print(
            f"edged: {config_path}: listen.admin is '' (the admin API is off): set it, e.g. "
            'admin = "unix:/run/edged/admin.sock", and restart edged',
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    token = None
    token_file = listen.admin_token_file
    if token_file is not None:
        from edged.admin import AdminStartupError, read_token_file

        try:
            token = read_token_file(Path(token_file))
        except AdminStartupError as exc:
            print(f"edged: {exc}", file=sys.stderr)
            return EXIT_INVALID
    return AdminClient(listen.admin, token=token)


def cmd_admin(args: argparse.Namespace) -> int:
    from edged.admin_client import AdminRequestError, AdminUnreachable

    if args.command == "upload" and args.cert is not None and args.key is None:
        print("edged upload: --cert needs --key KEY_FILE", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "upload" and args.remove and args.key is not None:
        print("edged upload: --remove takes no --key", file=sys.stderr)
        return EXIT_USAGE
    pems: tuple[bytes, bytes] | None = None
    if args.command == "upload" and args.cert is not None:
        try:
            pems = (read_pem(args.cert), read_pem(args.key))
        except CertError as exc:
            print(f"edged: {exc}", file=sys.stderr)
            return EXIT_INVALID
        try:
            # Here too, not only by the daemon: its answer cannot name the operator's files
            # ("the file is empty": which of the two?).
            parse_bundle(*pems, source=str(args.cert), key_source=str(args.key))
        except CertError as exc:
            print(f"edged: invalid_cert: {exc} ({exc.reason})", file=sys.stderr)
            return EXIT_INVALID
    client = _admin_client(args.config)
    if isinstance(client, int):
        return client
    try:
        if args.command == "status":
            return _print_status(client, args.name, args.json)
        if args.command == "renew":
            answer = client.renew(args.name)
        elif args.command == "upload":
            if pems is None:
                answer = client.remove_upload(args.name)
            else:
                answer = client.upload(args.name, *pems)
        elif args.command == "revoke":
            answer = client.revoke(args.name, args.reason, args.replace)
        else:
            answer = client.reload()
    except AdminUnreachable as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AdminRequestError as exc:
        reason = f" ({exc.reason})" if exc.reason else ""
        print(f"edged: {exc.code}: {exc.message}{reason}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        done = {"renew": "renewal started", "upload": "done", "revoke": "revoked", "reload": ""}
        target = f"{args.name}: " if args.command != "reload" else ""
        print(f"{target}{answer.get('message') or done[args.command] or 'reloaded'}")
    return EXIT_OK


def _print_status(client: AdminClient, name: str | None, as_json: bool) -> int:
    if name is not None:
        detail = client.cert(name)
        if as_json:
            print(json.dumps(detail, indent=2, sort_keys=True))
            return EXIT_OK
        width = max((len(k) for k in detail), default=0) + 1
        for key, value in detail.items():
            if value is None or value == "" or value == []:
                shown = "-"
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                shown = ", ".join(value)
            else:
                shown = value if isinstance(value, str) else json.dumps(value)
            print(f"{key + ':':<{width}} {shown}")
        return EXIT_OK
    status = client.status()
    certs = client.certs()
    if as_json:
        print(json.dumps({"status": status, "certs": certs}, indent=2, sort_keys=True))
        return EXIT_OK
    print(_status_line(status))
    counts = status.get("certs")
    if isinstance(counts, dict) and counts:
        print("certs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    print()
    if not certs:
        print("no certificates: add a [[site]] to the config")
        return EXIT_OK
    now = datetime.now(UTC)
    header = ["NAME", "STATE", "NOT_AFTER", "DAYS LEFT", "KEY TYPES", "ISSUER", "ATTEMPTS"]
    header += ["NEXT", "ISSUED BY", "LEASE", "LAST ERROR"]
    rows = [header] + [_cert_row(c, now) for c in sorted(certs, key=lambda c: str(c.get("name")))]
    print(_table(rows))
    return EXIT_OK


def _status_line(status: dict[str, Any]) -> str:
    parts = [f"edged {status.get('version', '?')}"]
    if status.get("node"):
        parts[0] += f" on {status['node']}"
    uptime = status.get("uptime_seconds")
    if isinstance(uptime, int | float):
        parts.append(f"up {_duration(float(uptime))}")
    listeners = status.get("listeners")
    if isinstance(listeners, list):
        parts.append(f"listening on {', '.join(map(str, listeners)) or 'nothing'}")
    conns = status.get("connections_active")
    if isinstance(conns, int):
        parts.append(f"{conns} connections")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    minutes, hours, days = int(seconds // 60) % 60, int(seconds // 3600) % 24, int(seconds // 86400)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {int(seconds) % 60}s"


def _when(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _cert_row(cert: dict[str, Any], now: datetime) -> list[str]:
    def text(value: object) -> str:
        if value is None or value == "" or value == []:
            return "-"
        if isinstance(value, list):
            return ",".join(map(str, value))
        return " ".join(str(value).split())  # one line

    not_after = _when(cert.get("not_after"))
    days = "-"
    if not_after is not None:
        left = (not_after - now).total_seconds() / 86400
        days = "expired" if left < 0 else str(int(left))
    next_try = _when(cert.get("next_try"))
    issuer = text(cert.get("issuer"))
    cn = [p[3:] for p in issuer.split(",") if p.startswith("CN=")]
    error = text(cert.get("last_error"))
    return [
        text(cert.get("name")),
        text(cert.get("state")),
        f"{not_after:%Y-%m-%d %H:%M}" if not_after else "-",
        days,
        text(cert.get("key_types")),
        _short(cn[0] if cn else issuer, 30),
        text(cert.get("attempts")),
        f"{next_try:%Y-%m-%d %H:%M}" if next_try else "-",
        text(cert.get("issued_by")),
        text(str(cert.get("lease") or "").split("/")[0]),  # the node, not the lease token
        _short(error, 60),
    ]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
