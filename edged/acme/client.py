"""The `acme` library, hardened, and one session with one ACME directory as one account.

What the stock library does not do and edged needs (see DESIGN.md "Python TLS facts"):
- retry `badNonce` several times with a fresh nonce (it retries once; at 30% rejection that
  loses 4 of 20 certificates);
- keep Retry-After of a 429 / `rateLimited` answer and the whole problem document;
- keep 409 problem bodies (it turns every 409 into a bare ConflictError);
- poll quickly at first and back off, honouring Retry-After (it polls every second);
- time every request (the `edged_acme_request_seconds` histogram).

The library is synchronous (requests): a session is used by one worker thread at a time.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import b64 as jose_b64
from josepy import errors as jose_errors
from josepy import jwa, jwk

from edged import __version__
from edged.config import AcmeSettings
from edged.errors import AcmeError
from edged.renewal import parse_retry_after
from edged.store.base import Store

log = logging.getLogger(__name__)

USER_AGENT = f"edged/{__version__} acme-python"
NONCE_RETRIES = 10
REQUEST_TIMEOUT = 30
T = TypeVar("T")


def problem_of(error: messages.Error) -> dict[str, object]:
    """The CA's problem document as plain JSON (kept in state, shown by status and the API)."""
    doc: dict[str, object] = {"type": error.typ or "", "detail": error.detail or ""}
    if error.title:
        doc["title"] = error.title
    if error.identifier is not None:
        doc["identifier"] = error.identifier.value
    if error.subproblems:
        doc["subproblems"] = [problem_of(sub) for sub in error.subproblems]
    return doc


def describe_problem(error: messages.Error) -> str:
    """One line: the problem type's short name, detail, and per-identifier subproblems."""
    code = error.code or error.typ or "error"
    text = f"{code}: {error.detail or error.title or 'no detail given'}"
    for sub in error.subproblems or ():
        ident = sub.identifier.value if sub.identifier is not None else "?"
        text += f"; {ident}: {sub.code or sub.typ}: {sub.detail}"
    return text


class HardenedNetwork(acme_client.ClientNetwork):
    """ClientNetwork that retries badNonce, keeps 409 problems and times every request."""

    def __init__(
        self,
        key: jwk.JWK,
        *,
        verify: bool | str,
        observe: Callable[[float], None] | None = None,
        nonce_retries: int = NONCE_RETRIES,
    ) -> None:
        alg = jwa.ES256 if isinstance(key, jwk.JWKEC) else jwa.RS256
        # requests takes a CA bundle path where the library's signature says bool.
        super().__init__(
            key,
            alg=alg,
            verify_ssl=verify,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=REQUEST_TIMEOUT,
        )
        self._observe = observe
        self._nonce_retries = nonce_retries
        self.nonce_rejections = 0
        self.last_response: requests.Response | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        start = time.monotonic()
        try:
            response = super()._send_request(method, url, *args, **kwargs)
        finally:
            if self._observe is not None:
                self._observe(time.monotonic() - start)
        self.last_response = response
        return response

    @classmethod
    def _check_response(
        cls, response: requests.Response, content_type: str | None = None
    ) -> requests.Response:
        if response.status_code == 409:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and "type" in body:
                raise messages.Error.from_json(body)
        return super()._check_response(response, content_type=content_type)

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        attempt = 0
        while True:
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt >= self._nonce_retries:
                    raise
                attempt += 1
                self.nonce_rejections += 1
                log.debug("badNonce from the CA, retrying with a fresh nonce (%d)", attempt)


@dataclass(frozen=True)
class Poll:
    """Polling pace: start fast (Pebble and Boulder often finish in tens of ms), back off."""

    first: float = 0.05
    factor: float = 1.6
    cap: float = 2.0
    timeout: float = 120.0


def new_account_key() -> tuple[jwk.JWK, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return jwk.JWKEC(key=key), pem


def load_account_key(pem: bytes) -> jwk.JWK:
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return jwk.JWKEC(key=key)
    if isinstance(key, rsa.RSAPrivateKey):
        return jwk.JWKRSA(key=key)
    raise ValueError("the account key is neither ECDSA nor RSA")


def account_body_json(body: messages.Registration) -> dict[str, object]:
    """The account object as stored. The CA may echo the external account binding: a JWS that
    josepy decodes into a frozendict it cannot encode again; it is only needed to register."""
    data: dict[str, object] = json.loads(body.update(external_account_binding=None).json_dumps())
    return data


class AcmeSession:
    """One account at one ACME directory; every call converts failures into AcmeError."""

    def __init__(
        self,
        settings: AcmeSettings,
        store: Store,
        *,
        observe: Callable[[float], None] | None = None,
        poll: Poll = Poll(),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cancel: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.cancel = cancel if cancel is not None else threading.Event()
        self.store = store
        self.poll_pace = poll
        self.clock = clock
        self._observe = observe
        self.client: acme_client.ClientV2 | None = None
        self.net: HardenedNetwork | None = None

    def close(self) -> None:
        """Close the HTTP connections to the CA (keep-alive sockets must not linger)."""
        if self.net is not None:
            if self.net.last_response is not None:
                self.net.last_response.close()
                self.net.last_response = None
            self.net.session.close()

    # --- errors -------------------------------------------------------------------------

    @contextmanager
    def errors(self, name: str, what: str) -> Iterator[None]:
        """Turn whatever the library or the network raises into an AcmeError about `name`."""
        try:
            yield
        except AcmeError:
            raise
        except messages.Error as error:
            retry_after = None
            if self.net is not None and self.net.last_response is not None:
                retry_after = parse_retry_after(
                    self.net.last_response.headers.get("Retry-After"), self.clock()
                )
            if retry_after is None and error.code == "rateLimited":
                retry_after = self.clock() + timedelta(hours=1)
            raise AcmeError(
                name, f"{what}: {describe_problem(error)}", problem_of(error), retry_after
            ) from error
        except requests.exceptions.SSLError as exc:
            raise AcmeError(
                name,
                f"{what}: TLS to the ACME server {self.settings.directory} failed ({exc}); "
                "if it uses a private CA, point acme.ca_bundle at that CA's certificate",
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise AcmeError(
                name,
                f"{what}: cannot reach the ACME server {self.settings.directory} "
                f"({type(exc).__name__}); check acme.directory and the network",
            ) from exc
        except acme_errors.Error as exc:
            response = _response_of(exc)
            if response is None:
                raise AcmeError(name, f"{what}: {exc}") from exc
            # An error without an ACME problem document (a proxy or load balancer in front of
            # the CA, a CA down): its status, and its Retry-After when it sends one.
            status = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
            message = (
                f"{what}: the ACME server answered {status} without an ACME problem document; "
                "the CA (or a proxy in front of it) may be down or overloaded"
            )
            raise AcmeError(
                name,
                message,
                {"message": message, "status": response.status_code},
                parse_retry_after(response.headers.get("Retry-After"), self.clock()),
            ) from exc
        except (ValueError, KeyError, jose_errors.DeserializationError) as exc:
            raise AcmeError(
                name, f"{what}: the ACME server sent an answer edged cannot read ({exc})"
            ) from exc

    # --- account ------------------------------------------------------------------------

    def open(self, name: str = "") -> acme_client.ClientV2:
        """Connect and log in, creating the account once per directory (stored 0600)."""
        if self.client is not None:
            return self.client
        stored = self.store.load_account(self.settings.directory)
        if stored is not None:
            account_json, key_pem = stored
            try:
                key = load_account_key(key_pem)
            except ValueError as exc:
                raise AcmeError(
                    name,
                    f"the stored ACME account key is unusable ({exc}); delete the accounts/ "
                    "folder of this directory in the store to register a new account",
                ) from None
        else:
            account_json = {}
            key, key_pem = new_account_key()
        verify: bool | str = True
        if self.settings.ca_bundle is not None:
            verify = str(self.settings.ca_bundle)
        net = HardenedNetwork(key, verify=verify, observe=self._observe)
        self.net = net
        with self.errors(name, "reading the ACME directory"):
            directory = acme_client.ClientV2.get_directory(self.settings.directory, net)
        client = acme_client.ClientV2(directory, net)
        uri = account_json.get("uri")
        if isinstance(uri, str) and uri:
            net.account = messages.RegistrationResource(
                uri=uri, body=self._stored_registration(account_json.get("body", {}), name)
            )
        else:
            net.account = self._register(client, key, name)
            self.store.save_account(
                self.settings.directory,
                {
                    "uri": net.account.uri,
                    "body": account_body_json(net.account.body),
                    "directory": self.settings.directory,
                    "created": self.clock().isoformat(),
                },
                key_pem,
            )
            log.info("acme account registered directory=%s", self.settings.directory)
        self.client = client
        return client

    def _stored_registration(self, body: object, name: str) -> messages.Registration:
        """The stored account's registration body; AcmeError naming the fix when it is corrupt
        (parsed outside errors(): the library's exceptions would crash the attempt)."""
        try:
            registration: messages.Registration = messages.Registration.from_json(body)
        except (jose_errors.Error, TypeError, ValueError, LookupError, AttributeError) as exc:
            raise AcmeError(
                name,
                f"the stored ACME account of {self.settings.directory} is corrupt (its body: "
                f"{type(exc).__name__}: {exc}); delete the accounts/ folder of this directory "
                "in the store to register a new account",
            ) from None
        return registration

    def _register(
        self, client: acme_client.ClientV2, key: jwk.JWK, name: str
    ) -> messages.RegistrationResource:
        eab = None
        if client.external_account_required() and not self.settings.eab_kid:
            raise AcmeError(
                name,
                "this CA requires external account binding: set acme.eab_kid and "
                "acme.eab_hmac_file to the key id and HMAC key the CA gave you",
            )
        what = "registering the ACME account"
        if self.settings.eab_kid and self.settings.eab_hmac_file is not None:
            hmac_key = read_eab_hmac_key(self.settings.eab_hmac_file, name)
            what += (
                f" (external account binding with acme.eab_kid {self.settings.eab_kid!r} and "
                f"the key in {self.settings.eab_hmac_file})"
            )
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(),
                kid=self.settings.eab_kid,
                hmac_key=hmac_key,
                directory=client.directory,
            )
        registration = messages.NewRegistration.from_data(
            email=self.settings.email or None,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        with self.errors(name, what):
            try:
                return client.new_account(registration)
            except acme_errors.ConflictError as conflict:
                # The key already has an account (state lost after registering): reuse it.
                existing = messages.RegistrationResource(uri=conflict.location, body=registration)
                return client.query_registration(existing)

    # --- requests -----------------------------------------------------------------------

    def post_as_get(self, url: str) -> requests.Response:
        client = self.open()
        response: requests.Response = client._post_as_get(url)
        return response

    def poll(
        self,
        name: str,
        what: str,
        fetch: Callable[[], tuple[T, requests.Response]],
        done: Callable[[T], bool],
    ) -> T:
        """Call `fetch` until `done`; fast at first, then backing off; honours Retry-After."""
        delay = self.poll_pace.first
        deadline = time.monotonic() + self.poll_pace.timeout
        while True:
            with self.errors(name, what):
                value, response = fetch()
            if done(value):
                return value
            wait = delay
            now = self.clock()  # one reading: "Retry-After: 1" means a whole second
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
            if retry_after is not None:
                wait = max(wait, (retry_after - now).total_seconds())
            if time.monotonic() + wait > deadline:
                raise AcmeError(
                    name,
                    f"{what}: still not done after {self.poll_pace.timeout:.0f} s; the CA may "
                    "be overloaded, edged retries later",
                )
            if self.cancel.wait(wait):
                raise AcmeError(name, f"{what}: given up, edged is stopping")
            delay = min(delay * self.poll_pace.factor, self.poll_pace.cap)


def read_eab_hmac_key(path: Path, name: str = "") -> str:
    """The EAB HMAC key as the CA hands it out (base64url), checked before use. Messages name
    the file, never its content: the key is a secret."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise AcmeError(name, f"cannot read acme.eab_hmac_file {path}: {reason}") from None
    if not text:
        raise AcmeError(
            name, f"acme.eab_hmac_file {path} is empty: put the HMAC key the CA gave you in it"
        )
    try:
        valid = re.fullmatch(r"[A-Za-z0-9_\-+/]+={0,2}", text) is not None and bool(
            jose_b64.b64decode(text)
        )
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise AcmeError(
            name,
            f"acme.eab_hmac_file {path} does not hold a base64url HMAC key: copy the key "
            "exactly as the CA shows it (one line, no quotes or labels)",
        )
    return text


def _response_of(exc: acme_errors.Error) -> requests.Response | None:
    """The HTTP response the acme library put in a ClientError (alone, or with the error)."""
    for arg in exc.args:
        for item in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(item, requests.Response):
                return item
    return None
