"""The Redis store: certificates, previous versions, renewal state, ACME accounts, HTTP-01 tokens
and per-name leases shared by every edge node of a fleet, under one key prefix.

Layout (every key starts with `<prefix>:`)::

    cert:<name>        JSON: names, source, stored_at, extra, pairs [{key_type, fullchain, privkey}]
    prev:<name>        the version before (rollback)
    names              set of names with a certificate
    state:<name>       renewal state JSON
    account:<host>     ACME account JSON with its key
    token:<token>      pending HTTP-01 answer (expires by itself)
    lease:<name>       owner token of the node ordering <name> (SET NX PX)
    changes            pub/sub channel: a name whose certificate changed

A bundle is one value, so a reader sees a whole version or the previous one; save() rotates
live→previous and publishes the change in one Lua script. Every write is mirrored into a local
FileStore: a node keeps serving from its local copy when Redis is down, also across a restart.
Synchronous, like every Store: the daemon calls it from worker threads.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import redis

from edged.errors import StoreError
from edged.names import NameError_, normalize_name
from edged.store.base import PemPair, StoredCert
from edged.store.files import FileStore, account_dirname

log = logging.getLogger(__name__)

# KEYS: cert, prev, names, channel; ARGV: value, name
_SAVE = """
local current = redis.call('GET', KEYS[1])
if current then redis.call('SET', KEYS[2], current) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[2])
return 1
"""
# KEYS: cert, prev, channel; ARGV: name
_ROLLBACK = """
local previous = redis.call('GET', KEYS[2])
if not previous then return nil end
local current = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], previous)
if current then redis.call('SET', KEYS[2], current) end
redis.call('PUBLISH', KEYS[3], ARGV[1])
return previous
"""
# Compare-and-act on a lease: only its owner may extend or release it.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _name(name: str) -> str:
    try:
        return normalize_name(name)
    except (NameError_, TypeError) as exc:
        raise StoreError(f"invalid certificate name {name!r}: {exc}") from None


def _encode(cert: StoredCert) -> str:
    return json.dumps(
        {
            "name": cert.name,
            "names": list(cert.names),
            "source": cert.source,
            "stored_at": cert.stored_at,
            "extra": dict(cert.extra),
            "pairs": [
                {
                    "key_type": p.key_type,
                    "fullchain": p.fullchain.decode("ascii"),
                    "privkey": p.privkey.decode("ascii"),
                }
                for p in cert.pairs
            ],
        }
    )


def _decode(raw: bytes, name: str, where: str) -> StoredCert:
    try:
        data = json.loads(raw)
        return StoredCert(
            name=data["name"],
            names=tuple(data["names"]),
            pairs=tuple(
                PemPair(p["key_type"], p["fullchain"].encode(), p["privkey"].encode())
                for p in data["pairs"]
            ),
            source=data["source"],
            stored_at=data["stored_at"],
            extra={str(k): str(v) for k, v in data.get("extra", {}).items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(
            f"certificate {name!r} in Redis ({where}) is corrupt ({type(exc).__name__}); "
            "re-issue or re-upload it"
        ) from None


class RedisStore:
    """Store protocol on Redis, mirrored into a local FileStore (the outage copy)."""

    def __init__(
        self,
        url: str,
        local: FileStore,
        *,
        prefix: str = "edged",
        password: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.local = local
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._save = self.client.register_script(_SAVE)
        self._rollback = self.client.register_script(_ROLLBACK)
        self._extend = self.client.register_script(_EXTEND)
        self._release = self.client.register_script(_RELEASE)
        self.available = True

    @property
    def root(self) -> Path:
        return self.local.root

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def channel(self) -> str:
        return self.key("changes")

    @property
    def state_channel(self) -> str:
        return self.key("states")

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            result = fn(*args)
        except redis.RedisError as exc:
            if self.available:
                log.error("redis unavailable url=%s action=%s error=%s", self._where(), what, exc)
            self.available = False
            raise StoreError(
                f"Redis at {self._where()} is unavailable ({type(exc).__name__}: {exc}); "
                "serving continues from the local copy, writes wait until it is back"
            ) from exc
        if not self.available:
            log.info("redis available again url=%s", self._where())
        self.available = True
        return result

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"  # no password in text

    # --- certificates -------------------------------------------------------------------

    def load(self, name: str) -> StoredCert | None:
        name = _name(name)
        try:
            raw = self._call("load", self.client.get, self.key("cert", name))
        except StoreError:
            return self.local.load(name)
        if raw is None:
            return None
        cert = _decode(raw, name, "live")
        self._mirror(cert)
        return cert

    def load_previous(self, name: str) -> StoredCert | None:
        name = _name(name)
        raw = self._call("load_previous", self.client.get, self.key("prev", name))
        return None if raw is None else _decode(raw, name, "previous")

    def save(self, cert: StoredCert) -> None:
        name = _name(cert.name)
        keys = [self.key("cert", name), self.key("prev", name), self.key("names"), self.channel]
        self._call("save", lambda: self._save(keys=keys, args=[_encode(cert), name]))
        self.local.save(cert)

    def rollback(self, name: str) -> StoredCert:
        name = _name(name)
        keys = [self.key("cert", name), self.key("prev", name), self.channel]
        raw = self._call("rollback", lambda: self._rollback(keys=keys, args=[name]))
        if raw is None:
            raise StoreError(f"no previous version of {name!r} in Redis: nothing to roll back to")
        cert = _decode(cast(bytes, raw), name, "previous")
        self.local.save(cert)
        return cert

    def delete(self, name: str) -> None:
        name = _name(name)
        pipe = self.client.pipeline()
        pipe.delete(self.key("cert", name), self.key("prev", name))
        pipe.srem(self.key("names"), name)
        pipe.publish(self.channel, name)
        self._call("delete", pipe.execute)
        self.local.delete(name)

    def names(self) -> list[str]:
        try:
            members = self._call("names", self.client.smembers, self.key("names"))
        except StoreError:
            return self.local.names()
        return sorted(m.decode() for m in members)

    def _mirror(self, cert: StoredCert) -> None:
        """Keep the local copy equal to Redis (only writes when it differs)."""
        try:
            if self.local.load(cert.name) != cert:
                self.local.save(cert)
        except StoreError as exc:
            log.warning("local copy not updated name=%s error=%s", cert.name, exc)

    # --- state and accounts -------------------------------------------------------------

    def load_state(self, name: str) -> dict[str, object] | None:
        name = _name(name)
        try:
            raw = self._call("load_state", self.client.get, self.key("state", name))
        except StoreError:
            return self.local.load_state(name)
        if raw is None:
            return None
        try:
            state = json.loads(raw)
        except ValueError:
            state = None
        if not isinstance(state, dict):
            raise StoreError(f"renewal state of {name!r} in Redis is corrupt; delete it")
        return state

    def save_state(self, name: str, state: Mapping[str, object]) -> None:
        name = _name(name)
        data = json.dumps(dict(state), sort_keys=True)
        self.local.save_state(name, state)  # first: survives a Redis outage
        pipe = self.client.pipeline()
        pipe.set(self.key("state", name), data)
        pipe.publish(self.state_channel, name)
        self._call("save_state", pipe.execute)

    def load_account(self, directory: str) -> tuple[dict[str, object], bytes] | None:
        key = self.key("account", account_dirname(directory))
        try:
            raw = self._call("load_account", self.client.get, key)
        except StoreError:
            return self.local.load_account(directory)
        if raw is None:
            return None
        data = json.loads(raw)
        key_pem = str(data.pop("key_pem")).encode()
        return data, key_pem

    def save_account(self, directory: str, account: Mapping[str, object], key_pem: bytes) -> None:
        key = self.key("account", account_dirname(directory))
        data = json.dumps({**account, "key_pem": key_pem.decode("ascii")}, sort_keys=True)
        # NX: two nodes registering at once keep the first account (one account per fleet).
        self._call("save_account", self.client.set, key, data, None, None, True)
        self.local.save_account(directory, account, key_pem)

    # --- HTTP-01 tokens shared by the fleet ------------------------------------------------

    def put_token(self, token: str, key_authorization: str, names: list[str], ttl: float) -> None:
        value = json.dumps({"key_authorization": key_authorization, "names": names})
        self._call(
            "put_token", self.client.set, self.key("token", token), value, None, int(ttl * 1000)
        )

    def get_token(self, token: str) -> tuple[str, list[str]] | None:
        raw = self._call("get_token", self.client.get, self.key("token", token))
        if raw is None:
            return None
        data = json.loads(raw)
        return str(data["key_authorization"]), [str(n) for n in data["names"]]

    def delete_token(self, token: str) -> None:
        self._call("delete_token", self.client.delete, self.key("token", token))

    # --- leases: one issuer per name across the fleet -------------------------------------

    def acquire_lease(self, name: str, ttl: float, node: str) -> str | None:
        """The owner token ("<node>/<random>") when this node now holds the lease, else None.
        The holder extends it while its order runs; a node that dies loses it after `ttl`."""
        owner = f"{node}/{secrets.token_hex(8)}"
        got = self._call(
            "acquire_lease",
            self.client.set,
            self.key("lease", _name(name)),
            owner,
            None,
            int(ttl * 1000),
            True,
        )
        return owner if got else None

    def extend_lease(self, name: str, owner: str, ttl: float) -> bool:
        keys = [self.key("lease", _name(name))]
        return bool(
            self._call(
                "extend_lease", lambda: self._extend(keys=keys, args=[owner, int(ttl * 1000)])
            )
        )

    def release_lease(self, name: str, owner: str) -> bool:
        keys = [self.key("lease", _name(name))]
        return bool(self._call("release_lease", lambda: self._release(keys=keys, args=[owner])))

    def lease_holder(self, name: str) -> str | None:
        raw = self._call("lease_holder", self.client.get, self.key("lease", _name(name)))
        return None if raw is None else cast(bytes, raw).decode()

    def close(self) -> None:
        self.client.close()
