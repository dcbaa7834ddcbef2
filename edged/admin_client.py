"""A small synchronous client of the admin API, for the CLI (no event loop to manage).

`AdminClient(config.listen.admin, token=...).status()` returns the parsed JSON answer, or raises
AdminUnreachable when nothing answers (the CLI exits 3) or AdminRequestError(code, message,
status) when the API refused (the CLI exits 1).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote

from edged.config import Address
from edged.errors import EdgedError

DEFAULT_TIMEOUT = 120.0  # a forced renewal may wait for the CA


class AdminUnreachable(EdgedError):
    """Nothing answers at the admin address (daemon stopped, wrong socket, timeout)."""

    def __init__(
        self, address: Address, why: str, hint: str = "is edged running? (systemctl status edged)"
    ) -> None:
        self.address = address
        self.why = why
        super().__init__(f"cannot reach the admin API at {address}: {why}: {hint}")


class AdminRequestError(EdgedError):
    """The admin API answered with an error."""

    def __init__(self, code: str, message: str, status: int, reason: str = "") -> None:
        self.code = code
        self.message = message
        self.status = status
        self.reason = reason
        super().__init__(f"{code}: {message}")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(
        self, address: Address, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.is_unix:
            return _UnixConnection(self.address.path, self.timeout)
        return http.client.HTTPConnection(
            self.address.host, self.address.port, timeout=self.timeout
        )

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request: (status, headers, body bytes); AdminUnreachable when nothing answers."""
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token is not None:
            all_headers.setdefault("Authorization", f"Bearer {self.token}")
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        conn = self._connection()
        try:
            try:
                conn.connect()
            except FileNotFoundError:
                raise AdminUnreachable(self.address, "no such socket") from None
            except ConnectionRefusedError:
                raise AdminUnreachable(self.address, "connection refused") from None
            except PermissionError:
                # edged runs; its socket (mode 0600) is its user's.
                raise AdminUnreachable(
                    self.address,
                    "permission denied",
                    "the socket belongs to edged's user: run this as that user or as root (sudo)",
                ) from None
            except TimeoutError:
                raise AdminUnreachable(self.address, "connection timed out") from None
            except OSError as exc:
                raise AdminUnreachable(self.address, exc.strerror or str(exc)) from None
            try:
                conn.request(method, path, body=body, headers=all_headers)
                response = conn.getresponse()
                data = response.read()
            except TimeoutError:
                raise AdminUnreachable(
                    self.address, f"no answer within {self.timeout:g} s"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise AdminUnreachable(self.address, f"connection failed: {why}") from None
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """Parsed JSON of a 2xx answer; AdminRequestError for an error answer."""
        payload = None if body is None else json.dumps(body).encode()
        status, _, data = self.raw(method, path, payload)
        try:
            value = json.loads(data) if data else None
        except ValueError:
            raise AdminRequestError(
                "bad_response",
                f"{self.address} answered {status} with something that is not JSON: "
                "is listen.admin pointing at edged?",
                status,
            ) from None
        if not 200 <= status < 300:
            if isinstance(value, dict) and "error" in value:
                raise AdminRequestError(
                    str(value["error"]),
                    str(value.get("message", "")),
                    status,
                    str(value.get("reason", "")),
                )
            raise AdminRequestError(f"http_{status}", f"{method} {path} failed", status)
        return value

    @staticmethod
    def _cert_path(name: str, suffix: str = "") -> str:
        return "/certs/" + quote(name, safe="") + suffix

    def status(self) -> dict[str, Any]:
        return self._object(self.request("GET", "/status"))

    def certs(self) -> list[dict[str, Any]]:
        value = self._object(self.request("GET", "/certs")).get("certs")
        if not isinstance(value, list):
            raise AdminRequestError("bad_response", "GET /certs: no 'certs' list", 200)
        return [c for c in value if isinstance(c, dict)]

    def cert(self, name: str) -> dict[str, Any]:
        return self._object(self.request("GET", self._cert_path(name)))

    def renew(self, name: str) -> dict[str, Any]:
        return self._object(self.request("POST", self._cert_path(name, "/renew")))

    def upload(self, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
        body = {
            "cert": cert_pem.decode("utf-8", "replace"),
            "key": key_pem.decode("utf-8", "replace"),
        }
        return self._object(self.request("PUT", self._cert_path(name), body))

    def remove_upload(self, name: str) -> dict[str, Any]:
        return self._object(self.request("DELETE", self._cert_path(name)))

    def revoke(
        self, name: str, reason: str = "unspecified", replace: bool = True
    ) -> dict[str, Any]:
        body = {"reason": reason, "replace": replace}
        return self._object(self.request("POST", self._cert_path(name, "/revoke"), body))

    def reload(self) -> dict[str, Any]:
        return self._object(self.request("POST", "/reload"))

    @staticmethod
    def _object(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise AdminRequestError("bad_response", "expected a JSON object", 200)
        return value
