"""The local admin API: JSON over a unix socket (mode 0600) or a loopback TCP port.

The daemon implements `Operations`; this module owns HTTP: routing, name validation, body
limits, the bearer token, refusing browsers (a body must be declared JSON, the Host must be
this machine, no Origin: CSRF and DNS rebinding against a loopback port) and the error
format. Every error is `{"error": code, "message": text}` (plus `"reason"` for a rejected
certificate) with a 4xx/5xx status; an unexpected exception is logged and answered with a
generic 500, so neither tracebacks nor uploaded PEM reach a client.

Routes:
    GET    /status                  Operations.status()
    GET    /certs                   Operations.certs()  -> {"certs": [...]}
    GET    /certs/{name}            Operations.cert(name)
    POST   /certs/{name}/renew      Operations.renew(name)
    PUT    /certs/{name}            Operations.upload(name, cert_pem, key_pem)  body {"cert", "key"}
    DELETE /certs/{name}            Operations.unmanage_upload(name)  (back to ACME management)
    POST   /certs/{name}/revoke     Operations.revoke(name, reason, replace)
                                    body optional {"reason": "...", "replace": true}
    POST   /reload                  Operations.reload()

`{name}` is a DNS name (a wildcard as `*.a.com`, URL-encoded or not); it is normalised with
`normalize_name` before any operation sees it, so a path segment never reaches the store raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import fields, is_dataclass
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from edged.config import Address
from edged.errors import CertError, EdgedError
from edged.logs import Throttled
from edged.names import NameError_, normalize_name

log = logging.getLogger("edged.admin")

MAX_BODY = 1024 * 1024  # an upload is a chain and a key: a few KiB; 1 MiB is generous
REVOKE_REASONS = (
    "unspecified",
    "keyCompromise",
    "superseded",
    "cessationOfOperation",
    "affiliationChanged",
)
_OPS: web.AppKey[Operations] = web.AppKey("ops")


class AdminError(EdgedError):
    """An operation refused a request; answered as `{"error": code, "message": message}`.

    Codes in use (status): bad_request (400), bad_name (400), unauthorized (401),
    cross_origin (403), unknown_name (404), not_found (404), method_not_allowed (405),
    managed_by_files, not_acme, not_uploaded, passthrough, no_store (409), too_large (413),
    unsupported_media_type (415), bad_host (421), invalid_cert (422, with `reason` = a
    CertReason), reload_failed (422), internal, store_failed (500), renewal_failed,
    revoke_failed, not_served (502), busy (503).
    """

    def __init__(self, code: str, message: str, status: int = 400, *, reason: str = "") -> None:
        self.code = code
        self.message = message
        self.status = status
        self.reason = reason
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_cert_error(cls, exc: CertError) -> AdminError:
        """422 invalid_cert carrying the CertError's stable reason code and its message."""
        return cls("invalid_cert", exc.message, 422, reason=str(exc.reason))

    def body(self) -> dict[str, object]:
        out: dict[str, object] = {"error": self.code, "message": self.message}
        if self.reason:
            out["reason"] = self.reason
        return out


class AdminStartupError(EdgedError):
    """The admin API cannot start (address not loopback, socket in use, bad token file)."""


class Operations(Protocol):
    """What the admin API can ask of the daemon. Every result must be JSON-serialisable
    (datetimes are sent as ISO 8601, Paths as text, sets as sorted lists).

    Raise AdminError for a refused request (a CertError raised by `upload` is answered as
    422 invalid_cert too). Shapes the CLI reads (missing keys are shown as "-"):

    status():  {"node": str, "version": str, "uptime_seconds": float, "allocator": str,
                "listeners": [str],
                "certs": {state: count}, "connections_active": int, ...}
    certs():   [summary, ...]; a summary is {"name": str, "names": [str], "state": str
                ("active" | "processing" | "failed" | "fallback" | "missing"), "source": str
                ("acme" | "upload" | "files"), "not_after": ISO str | None, "key_types": [str],
                "issuer": str, "attempts": int, "next_try": ISO str | None,
                "last_error": str | None}
    cert(name): a summary with any detail (not_before, fingerprints, serials...); raises
                AdminError("unknown_name", ..., 404) for a name no site has.
    renew/upload/unmanage_upload/revoke/reload: {"name": ..., "message": str (one line the
                CLI prints), ...}
    """

    async def status(self) -> dict[str, object]: ...

    async def certs(self) -> list[dict[str, object]]: ...

    def cert(self, name: str) -> dict[str, object]: ...

    async def renew(self, name: str) -> dict[str, object]: ...

    async def upload(self, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, object]: ...

    async def unmanage_upload(self, name: str) -> dict[str, object]: ...

    async def revoke(self, name: str, reason: str, replace: bool) -> dict[str, object]: ...

    async def reload(self) -> dict[str, object]: ...


# --- HTTP -------------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if is_dataclass(value) and not isinstance(value, type):
        # Fields, not vars(): slotted dataclasses have no __dict__.
        return {f.name: getattr(value, f.name) for f in fields(value) if not f.name.startswith("_")}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: object) -> str:
    return json.dumps(value, default=_json_default)


def _reply(value: object, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=_dumps)


def _error(exc: AdminError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def _from_http(exc: web.HTTPException, request: web.Request) -> web.Response:
    code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
    headers: dict[str, str] = {}
    if exc.status == 404:
        message = f"no such endpoint: {request.method} {request.path}"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path}: use {allowed}"
        headers["Allow"] = exc.headers["Allow"]
    elif exc.status == 413:
        message = f"request body larger than {MAX_BODY} bytes"
    else:
        message = exc.reason
    return _error(AdminError(code, message, exc.status), headers)


def host_is_local(header: str) -> bool:
    """Whether a Host header names this machine: `localhost` or a loopback IP, with or
    without a port. Pure. A browser page whose name was rebound to 127.0.0.1 sends its own
    name, so this refuses it (DNS rebinding)."""
    host = header.strip().lower()
    if host.startswith("["):  # [v6]:port
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = host.partition(":")
        if colon and not port.isdigit():
            return False
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _refusal(request: web.Request) -> AdminError | None:
    """Why a request must not reach the API whatever its token: it comes from a browser page
    (another site's page may send requests to loopback: CSRF, DNS rebinding), or its body is
    not declared as JSON (a cross-origin page can send text/plain without a preflight)."""
    host = request.headers.get("Host")
    if host is not None and not host_is_local(host):
        return AdminError(
            "bad_host",
            f"Host {host[:100]!r} is not this machine: the admin API answers only requests "
            "for localhost or a loopback address (e.g. Host: 127.0.0.1:9465) or over its "
            "unix socket",
            421,
        )
    origin = request.headers.get("Origin")
    if origin is not None:
        return AdminError(
            "cross_origin",
            f"requests from web pages (Origin {origin[:100]!r}) are refused: use the edged "
            "CLI or an HTTP client that sends no Origin header",
            403,
        )
    has_body = request.method in ("POST", "PUT", "DELETE") and request.body_exists
    if has_body and request.content_type != "application/json":
        return AdminError(
            "unsupported_media_type",
            f"the body is {request.content_type}: send it as JSON with "
            "'Content-Type: application/json'",
            415,
        )
    return None


class BearerToken:
    """The admin API's bearer token (None: none required). A reload replaces it: the token
    file is read again, so a rotated token works without a restart."""

    __slots__ = ("expected",)

    def __init__(self, token: str | None) -> None:
        self.expected = token.encode() if token else None

    def replace(self, token: str | None) -> bool:
        """Use `token` from now on; whether it differs from the one before."""
        new = token.encode() if token else None
        changed = new != self.expected
        self.expected = new
        return changed


_TOKEN = web.AppKey("token", BearerToken)


def _middleware(token: BearerToken) -> Callable[..., Awaitable[web.StreamResponse]]:
    refusals = Throttled(log)

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        refused = _refusal(request)
        if refused is not None:
            # A page in a browser can send these at will: one line per kind per 10 s.
            refusals.warning(
                refused.code,
                "admin: %s %s: refused: %s",
                request.method,
                request.raw_path[:200],
                refused.message,
            )
            return _error(refused)
        expected = token.expected
        if expected is not None:
            header = request.headers.get("Authorization", "")
            scheme, _, credentials = header.strip().partition(" ")
            given = credentials.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
                what = "wrong" if header else "missing"
                log.warning("admin: %s %s: %s bearer token", request.method, request.raw_path, what)
                return _error(
                    AdminError(
                        "unauthorized",
                        f"{what} bearer token: send 'Authorization: Bearer <token>' with the "
                        "token from listen.admin_token_file",
                        401,
                    ),
                    {"WWW-Authenticate": 'Bearer realm="edged"'},
                )
        try:
            response = await handler(request)
        except AdminError as exc:
            response = _error(exc)
        except CertError as exc:
            response = _error(AdminError.from_cert_error(exc))
        except web.HTTPException as exc:
            response = _from_http(exc, request)
        except Exception:
            # Not the exception text: it may carry input (PEM) or internals; the log has it.
            log.exception("admin: %s %s failed", request.method, request.raw_path)
            response = _error(
                AdminError(
                    "internal", "internal error: see the edged log (journalctl -u edged)", 500
                )
            )
        level = logging.DEBUG if request.method in ("GET", "HEAD") else logging.INFO
        log.log(level, "admin: %s %s -> %d", request.method, request.raw_path, response.status)
        return response

    return middleware


def _ops(request: web.Request) -> Operations:
    return request.app[_OPS]


def _name(request: web.Request) -> str:
    raw = request.match_info["name"]
    try:
        return normalize_name(raw)
    except NameError_ as exc:
        raise AdminError("bad_name", str(exc), 400) from None


async def _body(request: web.Request, *, required: bool) -> dict[str, Any]:
    """The JSON object in the body ({} for an empty optional body)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise AdminError("too_large", f"request body larger than {MAX_BODY} bytes", 413)
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip():
        if required:
            raise AdminError("bad_request", "this request needs a JSON object body", 400)
        return {}
    encoding = json.detect_encoding(raw)  # as json.loads(bytes) does: UTF-8, -16 or -32
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise AdminError(
            "bad_request", f"the body is not valid JSON (not {encoding.upper()} text: send UTF-8)"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # The position, never the text: the body may be a private key.
        raise AdminError(
            "bad_request", f"the body is not valid JSON (line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError:  # only int() refuses valid JSON: past sys.get_int_max_str_digits()
        raise AdminError(
            "bad_request",
            "the body has a number with thousands of digits: no field of this API takes one",
        ) from None
    except RecursionError:  # arrays/objects nested thousands deep: no real request does that
        raise AdminError("bad_request", "the body is nested too deeply to be a request") from None
    if not isinstance(value, dict):
        raise AdminError("bad_request", "the body must be a JSON object", 400)
    return value


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise AdminError(
            "bad_request",
            f"unknown field {', '.join(map(repr, extra))}: allowed are {', '.join(allowed)}",
            400,
        )


async def _get_status(request: web.Request) -> web.Response:
    return _reply(await _ops(request).status())


async def _get_certs(request: web.Request) -> web.Response:
    certs = await _ops(request).certs()
    # The JSON of 100k summaries takes a while too: not on the event loop.
    body = await asyncio.to_thread(_dumps, {"certs": certs})
    return web.Response(text=body, content_type="application/json")


async def _get_cert(request: web.Request) -> web.Response:
    return _reply(_ops(request).cert(_name(request)))


async def _renew(request: web.Request) -> web.Response:
    name = _name(request)
    return _reply(await _ops(request).renew(name))


async def _upload(request: web.Request) -> web.Response:
    name = _name(request)
    body = await _body(request, required=True)
    _only(body, ("cert", "key"))
    pems: list[bytes] = []
    for field in ("cert", "key"):
        value = body.get(field)
        if not isinstance(value, str) or not value.strip():
            what = "the certificate chain" if field == "cert" else "the private key"
            raise AdminError("bad_request", f"field {field!r} must be {what} as PEM text", 400)
        pems.append(value.encode("utf-8", "replace"))
    return _reply(await _ops(request).upload(name, pems[0], pems[1]))


async def _unmanage(request: web.Request) -> web.Response:
    name = _name(request)
    return _reply(await _ops(request).unmanage_upload(name))


async def _revoke(request: web.Request) -> web.Response:
    name = _name(request)
    body = await _body(request, required=False)
    _only(body, ("reason", "replace"))
    reason = body.get("reason", "unspecified")
    if reason not in REVOKE_REASONS:
        raise AdminError("bad_request", f"reason must be one of {', '.join(REVOKE_REASONS)}", 400)
    replace = body.get("replace", True)
    if not isinstance(replace, bool):
        raise AdminError("bad_request", "replace must be true or false", 400)
    return _reply(await _ops(request).revoke(name, reason, replace))


async def _reload(request: web.Request) -> web.Response:
    return _reply(await _ops(request).reload())


def build_admin_app(ops: Operations, *, token: str | None) -> web.Application:
    """The admin API as an aiohttp Application (serve it with `start_admin_server`)."""
    bearer = BearerToken(token)
    app = web.Application(middlewares=[_middleware(bearer)], client_max_size=MAX_BODY)
    app[_OPS] = ops
    app[_TOKEN] = bearer
    app.router.add_get("/status", _get_status, allow_head=False)
    app.router.add_get("/certs", _get_certs, allow_head=False)
    app.router.add_get("/certs/{name}", _get_cert, allow_head=False)
    app.router.add_put("/certs/{name}", _upload)
    app.router.add_delete("/certs/{name}", _unmanage)
    app.router.add_post("/certs/{name}/renew", _renew)
    app.router.add_post("/certs/{name}/revoke", _revoke)
    app.router.add_post("/reload", _reload)
    return app


# --- serving ----------------------------------------------------------------------------------


def replace_token(runner: web.AppRunner, token: str | None) -> bool:
    """The admin API served by `runner` requires `token` from now on (None: none); whether it
    changed."""
    return runner.app[_TOKEN].replace(token)


def warn_no_token(address: Address) -> None:
    log.warning(
        "admin: %s has no token: every local user can use the admin API "
        "(set listen.admin_token_file or use a unix socket)",
        address,
    )


def read_token_file(path: Path) -> str:
    """The bearer token in `path` (whitespace stripped); the file must not be world-readable."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminStartupError(
            f"{path}: listen.admin_token_file: cannot read: {exc.strerror}: check the path "
            "and its permissions"
        ) from None
    except UnicodeDecodeError:
        raise AdminStartupError(
            f"{path}: listen.admin_token_file: not UTF-8 text: write the token as one line"
        ) from None
    if st.st_mode & stat.S_IROTH:
        raise AdminStartupError(
            f"{path}: listen.admin_token_file is readable by every user: chmod 600 {path}"
        )
    token = text.strip()
    if not token:
        raise AdminStartupError(
            f"{path}: listen.admin_token_file is empty: write a token, e.g. "
            f"openssl rand -hex 32 > {path}"
        )
    return token


def check_admin_address(address: Address) -> None:
    """Refuse anything but a unix socket or a loopback IP (before binding)."""
    if address.is_unix:
        return
    try:
        loopback = ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AdminStartupError(
            f"listen.admin: {address} is not a loopback address: the admin API controls "
            "certificates and must not be reachable from the network; use "
            "'unix:/run/edged/admin.sock' or '127.0.0.1:PORT'"
        )


def _bind_unix(path: str) -> tuple[socket.socket, int]:
    """A listening unix socket at `path`, mode 0600; replaces a stale socket file.

    The mode is set between bind() and listen(): no client can connect before listen(), so
    there is no window in which the socket is open to other users, whatever the umask.
    Returns the socket and its inode (to remove only our own file on shutdown).
    """
    where = f"listen.admin: unix:{path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AdminStartupError(f"{where}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise AdminStartupError(
                f"{where}: the path exists and is not a socket: remove it or choose another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise AdminStartupError(
                    f"{where}: cannot tell whether the existing socket is in use "
                    f"({exc.strerror}): stop the other process or remove the file"
                ) from None
        else:
            raise AdminStartupError(
                f"{where}: another process is listening there (another edged?): stop it "
                "or set a different listen.admin"
            )
        finally:
            probe.close()
        log.info("admin: removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
        return sock, os.stat(path).st_ino
    except OSError as exc:
        sock.close()
        hint = "create the directory (systemd: RuntimeDirectory=edged)"
        if exc.errno != errno.ENOENT:
            hint = "check the directory's permissions"
        raise AdminStartupError(f"{where}: cannot listen: {exc.strerror}: {hint}") from None


async def start_admin_server(
    address: Address, ops: Operations, *, token_file: Path | None
) -> web.AppRunner:
    """Serve the admin API on `address`; stop it with `await runner.cleanup()`.

    Raises AdminStartupError (naming listen.admin and the fix) for a non-loopback address, a
    socket path another process listens on, or an unusable token file.
    """
    check_admin_address(address)
    token = read_token_file(token_file) if token_file is not None else None
    if token is None and not address.is_unix:
        warn_no_token(address)
    app = build_admin_app(ops, token=token)
    site_sock: socket.socket | None = None
    if address.is_unix:
        site_sock, inode = _bind_unix(address.path)
        path = address.path

        async def remove_socket(_: web.Application) -> None:
            # Only our own file: a newer edged may already have replaced it.
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)

        app.on_cleanup.append(remove_socket)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site: web.BaseSite
        if site_sock is not None:
            site = web.SockSite(runner, site_sock)
        else:
            site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
        await site.start()
    except OSError as exc:
        if site_sock is not None:
            site_sock.close()
        await runner.cleanup()
        raise AdminStartupError(
            f"listen.admin: cannot listen on {address}: {exc.strerror}: is another process "
            "using it? choose another port"
        ) from None
    except BaseException:
        if site_sock is not None:
            site_sock.close()
        await runner.cleanup()
        raise
    log.info("admin API listening on %s%s", address, " (token required)" if token else "")
    return runner
