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
    gone:<name>        when <name> was deleted (so no node's local copy brings it back)
    rev                a counter: every certificate and state write takes its next value
    revs:cert          sorted set: name -> the rev of its last certificate write (or delete)
    revs:state         sorted set: name -> the rev of its last renewal state write
    epoch              a random id set once: another one means Redis lost its data
    changes            pub/sub channel: a name whose certificate changed
    states             pub/sub channel: a name whose renewal state changed

A bundle is one value, so a reader sees a whole version or the previous one; save() rotates
live→previous and publishes the change in one Lua script. Every write is mirrored into a local
FileStore: a node keeps serving from its local copy when Redis is down, also across a restart.
When Redis comes back without its data (restarted without persistence, flushed, restored from
an old dump), the local copies go back: stale_in_redis() finds what Redis lacks or holds in an
older version (by `stored_at`, the time a version became live), restore() writes it with a
compare-in-Lua so only a node whose copy is still newer writes, and accounts with SET NX.
Every write of a certificate or a state records its name under the next `rev` in the same
script, so a node's periodic resync asks for the names written since its last one
(changes_since) instead of reading every certificate: at 100k names that is one script call a
minute instead of 100k GETs per node.
Synchronous, like every Store: the daemon calls it from worker threads.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis

from edged.errors import StoreError
from edged.names import NameError_, normalize_name
from edged.store.base import PemPair, StateRead, StoredCert
from edged.store.files import FileStore, account_dirname

log = logging.getLogger(__name__)

STALE_BATCH = 500  # names per stale_in_redis script call
# Names changes_since lists per kind: more changed than this (a node away for long in a busy
# fleet) and reading every certificate is as cheap as reading those names one by one.
CHANGES_MAX = 10_000
# Renewal states per MGET in load_states: one round trip each; ~0.3 KiB a state, so a batch
# is ~300 KiB and holds Redis for well under a millisecond.
STATES_BATCH = 1000
# Certificates per MGET in load_many: a few KiB each, so ~1 MiB a batch.
CERTS_BATCH = 256
_R = TypeVar("_R")
# OpenSSL's verify codes for a certificate naming other hosts (X509_V_ERR_HOSTNAME_MISMATCH,
# X509_V_ERR_IP_ADDRESS_MISMATCH)
NAME_MISMATCH_CODES = (62, 64)

# Records a write of `name` under the next rev (see changes_since). In every script that writes
# a certificate or a state, so a reader never sees the one without the other.
_BUMP = """
local function bump(rev, revs, name)
  redis.call('ZADD', revs, redis.call('INCR', rev), name)
end
"""
# The live value `current` becomes previous, `value` live, and the write is recorded and
# announced. KEYS: cert, prev, names, channel, gone, rev, revs:cert.
_WRITE_LIVE = (
    _BUMP
    + """
local function write_live(current, value, name)
  if current then redis.call('SET', KEYS[2], current) end
  redis.call('SET', KEYS[1], value)
  redis.call('SADD', KEYS[3], name)
  redis.call('DEL', KEYS[5])
  bump(KEYS[6], KEYS[7], name)
  redis.call('PUBLISH', KEYS[4], name)
end
"""
)
# KEYS: as _WRITE_LIVE; ARGV: value, name
_SAVE = (
    _WRITE_LIVE
    + """
write_live(redis.call('GET', KEYS[1]), ARGV[1], ARGV[2])
return 1
"""
)
# _SAVE unless the live entry is an upload (another node's `edged upload`): then nothing is
# written and {0, that entry} is answered. A value that is not JSON is no upload (the new
# version repairs it); with none (or such a value) in Redis, ARGV[3] is the stored_at of this
# node's local copy when that is an upload ("" otherwise): Redis lost it, and it stays
# unless it was deleted since (as in RedisStore.load); then {0, ""}.
# KEYS: as _WRITE_LIVE; ARGV: value, name, the local upload's stored_at
_SAVE_UNLESS_UPLOAD = (
    _WRITE_LIVE
    + """
local current = redis.call('GET', KEYS[1])
local ok, entry = false, nil
if current then ok, entry = pcall(cjson.decode, current) end
if ok and type(entry) == 'table' then
  if entry.source == 'upload' then return {0, current} end
elseif ARGV[3] ~= '' then
  local gone = redis.call('GET', KEYS[5])
  if not gone or (tonumber(gone) and tonumber(gone) < tonumber(ARGV[3])) then return {0, ''} end
end
write_live(current, ARGV[1], ARGV[2])
return {1, ''}
"""
)
# Swap only if previous is still the version read (else another node changed it meanwhile).
# KEYS: cert, prev, channel, rev, revs:cert; ARGV: previous as read, the new live value, name
_ROLLBACK = (
    _BUMP
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local current = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2])
if current then redis.call('SET', KEYS[2], current) else redis.call('DEL', KEYS[2]) end
bump(KEYS[4], KEYS[5], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""
)
# KEYS: cert, prev, names, gone, channel, rev, revs:cert; ARGV: name, when (the gone stamp)
_DELETE = (
    _BUMP
    + """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2])
bump(KEYS[6], KEYS[7], ARGV[1])
redis.call('PUBLISH', KEYS[5], ARGV[1])
return 1
"""
)
# KEYS: state, channel, rev, revs:state; ARGV: state JSON, name
_SAVE_STATE = (
    _BUMP
    + """
redis.call('SET', KEYS[1], ARGV[1])
bump(KEYS[3], KEYS[4], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""
)
# What changed since a cursor (epoch, rev): [epoch, rev, 1, cert names, state names], or
# [epoch, rev, 0] when the cursor does not apply (another epoch: Redis lost its data; a lower
# rev: restored from an older dump or the counter lost; an index without its marker, the
# member "" this script adds: evicted or deleted alone, the names it held lost). An epoch is
# made when there is none. The epoch answered ends with the server's run_id: a restart (or a
# failover) may come back without the last writes (an RDB or AOF behind, async replication)
# and take their revs again for other writes, which a cursor past them would never list.
# Redis may refuse those two writes (a read-only replica, out of memory under noeviction): the
# answer is then [epoch, rev, 0, the error], the caller reads everything, as it would without
# an index, instead of failing the resync and reconnecting until Redis takes writes again.
# KEYS: epoch, rev, revs:cert, revs:state; ARGV: a new epoch, the cursor's epoch and rev, the
# most names to list per kind (more: the caller reads everything instead).
_CHANGES = """
local refused = nil
local function write(...)
  local answer = redis.pcall(...)
  if type(answer) == 'table' and answer.err then refused = refused or answer.err end
end
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  write('SET', KEYS[1], epoch)
end
local info = redis.pcall('INFO', 'server')  -- an ACL without INFO: as before, no run_id
if type(info) == 'string' then
  epoch = epoch .. ':' .. (string.match(info, 'run_id:(%x+)') or '')
end
local rev = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[3])
local intact = true
for i = 3, 4 do
  if not redis.call('ZSCORE', KEYS[i], '') then
    write('ZADD', KEYS[i], 0, '')
    intact = false
  end
end
if refused then return {epoch, rev, 0, refused} end
if epoch ~= ARGV[2] or rev < since or not intact then return {epoch, rev, 0} end
local limit = tonumber(ARGV[4])
local certs = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. since, rev, 'LIMIT', 0, limit)
local states = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. since, rev, 'LIMIT', 0, limit)
return {epoch, rev, 1, certs, states}
"""
# stored_at comes from the clocks of different nodes: a version counts as older only when it
# is older by more than this (an old dump is minutes to days behind; two saves seconds apart on
# nodes whose clocks disagree must not be swapped back).
OLDER_MARGIN = 60.0  # seconds
# Whether a local copy stored at `at` should go back into Redis: the key is missing or holds
# an older version, and the name was not deleted after that copy was stored. stored_at is read
# with a pattern, not cjson: the value is a few KiB of PEM and this runs for every name.
_NEEDS_RESTORE = f"""
local function needs_restore(current, gone, at)
  if gone and tonumber(gone) and tonumber(gone) >= at then return false end
  if not current then return 'missing' end
  local theirs = tonumber(string.match(current, '"stored_at": ([-0-9.eE+]+)'))
  if theirs == nil or theirs < at - {OLDER_MARGIN!r} then return 'older' end
  return false
end
"""
# KEYS: cert_1..cert_n, gone_1..gone_n; ARGV: stored_at_1..n. Returns [index, reason, ...]
# (1-based indexes, reason "missing" or "older").
_STALE = (
    _NEEDS_RESTORE
    + """
local n, out = #ARGV, {}
for i = 1, n do
  local why = needs_restore(redis.call('GET', KEYS[i]), redis.call('GET', KEYS[n + i]),
                            tonumber(ARGV[i]))
  if why then
    out[#out + 1] = i
    out[#out + 1] = why
  end
end
return out
"""
)
# KEYS: cert, prev, names, channel, gone, rev, revs:cert; ARGV: value, name, stored_at, the
# local previous version ("" = none; it becomes previous when Redis had no version). 1 when
# written.
_RESTORE = (
    _NEEDS_RESTORE
    + _BUMP
    + """
local current = redis.call('GET', KEYS[1])
if not needs_restore(current, redis.call('GET', KEYS[5]), tonumber(ARGV[3])) then return 0 end
if current then
  redis.call('SET', KEYS[2], current)
elseif ARGV[4] ~= '' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[4])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
bump(KEYS[6], KEYS[7], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[2])
return 1
"""
)
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
    # RecursionError: json raises it for deeply nested arrays (a value no writer of edged's
    # makes, but a corrupt one must not take a node down).
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise StoreError(
            f"certificate {name!r} in Redis ({where}) is corrupt ({type(exc).__name__}); "
            "re-issue or re-upload it"
        ) from None


@dataclass(frozen=True)
class RedisTls:
    """TLS settings of a rediss:// store (edged.redis_ca_file, redis_cert_file, redis_key_file)."""

    ca_file: Path | None = None  # None: the system CAs
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Stale:
    """What a node's local copy holds that Redis lacks or holds in an older version."""

    names: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()  # accounts/<folder> names
    reasons: dict[str, str] = field(default_factory=dict)  # name → "missing" | "older"

    def __bool__(self) -> bool:
        return bool(self.names or self.accounts)


@dataclass(frozen=True)
class Cursor:
    """Where a node's view of the fleet's writes stands: Redis's epoch and the rev read, and
    how many of this client's calls had failed then (see changes_since)."""

    epoch: str
    rev: int
    failures: int = 0


@dataclass(frozen=True)
class Changes:
    """The answer of changes_since: the names written since the cursor given, or `full`, why
    they cannot be told (then every certificate and state must be read again)."""

    cursor: Cursor  # the next call's
    full: str = ""
    certs: tuple[str, ...] = ()
    states: tuple[str, ...] = ()


def _decode_state(name: str, raw: bytes | None) -> dict[str, object] | None:
    if raw is None:
        return None
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise StoreError(f"renewal state of {name!r} in Redis is corrupt; delete it")
    return state


def _decode_account(raw: bytes, folder: str) -> tuple[dict[str, object], bytes]:
    try:
        data = json.loads(raw)
        key_pem = str(data.pop("key_pem")).encode()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise StoreError(
            f"the ACME account of {folder} in Redis is corrupt; delete the key to register anew"
        ) from None
    if not isinstance(data, dict):
        raise StoreError(f"the ACME account of {folder} in Redis is not a JSON object")
    return data, key_pem


class RedisStore:
    """Store protocol on Redis, mirrored into a local FileStore (the outage copy)."""

    def __init__(
        self,
        url: str,
        local: FileStore,
        *,
        prefix: str = "edged",
        password: str | None = None,
        tls: RedisTls | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.local = local
        self.prefix = prefix
        self.tls = tls
        # Shared with the pub/sub follower's asyncio client (edged.fleet): one place that says
        # how to reach this Redis.
        self.connection_kwargs: dict[str, Any] = {"password": password}
        if tls is not None and url.startswith("rediss://"):
            self.connection_kwargs.update(
                ssl_ca_certs=str(tls.ca_file) if tls.ca_file else None,
                ssl_certfile=str(tls.cert_file) if tls.cert_file else None,
                ssl_keyfile=str(tls.key_file) if tls.key_file else None,
            )
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **self.connection_kwargs,
        )
        self._save = self.client.register_script(_SAVE)
        self._save_unless_upload = self.client.register_script(_SAVE_UNLESS_UPLOAD)
        self._rollback = self.client.register_script(_ROLLBACK)
        self._extend = self.client.register_script(_EXTEND)
        self._release = self.client.register_script(_RELEASE)
        self._stale = self.client.register_script(_STALE)
        self._restore = self.client.register_script(_RESTORE)
        self._delete = self.client.register_script(_DELETE)
        self._save_state = self.client.register_script(_SAVE_STATE)
        self._changes = self.client.register_script(_CHANGES)
        self.available = True
        # Calls that failed so far: a read that fell back to the local copy meanwhile may
        # have missed a version the change index will not list again (see edged.fleet).
        self.failures = 0
        self._warned_no_info = False  # see changes_since

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
            self.failures += 1
            message = self.describe_error(exc)
            if self.available:
                log.error("redis unavailable action=%s error=%s", what, message)
            self.available = False
            raise StoreError(
                f"{message}; serving continues from the local copy, writes wait until it is back"
            ) from exc
        if not self.available:
            log.info("redis available again url=%s", self._where())
        self.available = True
        return result

    def describe_error(self, exc: BaseException) -> str:
        """What went wrong reaching Redis, naming the URL, and for TLS the file to fix."""
        where = self._where()
        cause: BaseException | None = exc
        for _ in range(8):  # the chain is short; bounded in case it loops
            if cause is None or isinstance(cause, ssl.SSLError):
                break
            cause = cause.__cause__ or cause.__context__
        if not isinstance(cause, ssl.SSLError):
            cause = None
        text = f"{exc} {cause or ''}"
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            reason = getattr(cause, "verify_message", "") or "certificate verify failed"
            if getattr(cause, "verify_code", 0) in NAME_MISMATCH_CODES:
                fix = (
                    f"the server's certificate does not name {urlsplit(self.url).hostname}: "
                    "use a host name it has in edged.store"
                )
            elif self.tls is not None and self.tls.ca_file is not None:
                fix = (
                    "the server's certificate is not signed by a CA in edged.redis_ca_file "
                    f"{self.tls.ca_file}: set it to the CA that signed Redis's tls-cert-file"
                )
            else:
                fix = (
                    "the server's certificate is not trusted by the system CAs: set "
                    "edged.redis_ca_file to the CA that signed Redis's tls-cert-file"
                )
            return f"Redis at {where}: TLS certificate verification failed ({reason}): {fix}"
        if cause is not None:
            client = self.tls.cert_file if self.tls else None
            hint = (
                f"check edged.redis_cert_file {client} and redis_key_file"
                if client
                else "if Redis requires client certificates, set edged.redis_cert_file and "
                "redis_key_file"
            )
            return f"Redis at {where}: TLS handshake failed ({cause}): {hint}"
        return f"Redis at {where} is unavailable ({type(exc).__name__}: {exc})"

    def _where(self) -> str:
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return f"unix://{parts.path}"
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"  # no password in text

    # --- certificates -------------------------------------------------------------------

    def load(self, name: str) -> StoredCert | None:
        name = _name(name)
        try:
            raw = self._call("load", self.client.get, self.key("cert", name))
        except StoreError:
            return self.local.load(name)
        return self._loaded(name, raw)

    def load_many(self, names: Sequence[str]) -> dict[str, StoredCert | StoreError | None]:
        """load() of each name, one MGET per CERTS_BATCH names: a full reload of 100k names
        made 100k round trips. Redis unreachable: as _read_batched."""
        return self._read_batched(names, "cert", CERTS_BATCH, self._loaded, self.local.load)

    def _read_batched(
        self,
        names: Sequence[str],
        kind: str,
        size: int,
        from_redis: Callable[[str, bytes | None], _R],
        from_local: Callable[[str], _R],
    ) -> dict[str, _R | StoreError]:
        """Each name's `kind` key, one MGET per `size` names, made into its answer (a name's
        StoreError for that name alone). Redis unreachable: the batch that failed and the
        rest come from the local copy, as a read of one name would (without waiting for a
        timeout per batch)."""
        found: dict[str, _R | StoreError] = {}
        keyed: list[tuple[str, str]] = []  # (as given, normalised)
        for name in names:
            try:
                keyed.append((name, _name(name)))
            except StoreError as exc:
                found[name] = exc
        down = False
        for start in range(0, len(keyed), size):
            batch = keyed[start : start + size]
            values: list[bytes | None] | None = None
            if not down:
                keys = [self.key(kind, normal) for _, normal in batch]
                try:
                    values = self._call(f"load_{kind}s", self.client.mget, keys)
                except StoreError:
                    down = True
            for i, (given, normal) in enumerate(batch):
                try:
                    if values is None:
                        found[given] = from_local(normal)
                    else:
                        found[given] = from_redis(normal, values[i])
                except StoreError as exc:
                    found[given] = exc
        return found

    def _loaded(self, name: str, raw: bytes | None) -> StoredCert | None:
        """What load() gives for `name` once Redis answered `raw` for it."""
        if raw is None:
            return self._lost_by_redis(name)
        try:
            cert = _decode(raw, name, "live")
        except StoreError as exc:
            # The last good version is this node's copy: served until a writer replaces the
            # value (a renewal or an upload), and said at every read meanwhile.
            local = self.local.load(name)
            if local is None:
                raise
            log.error("%s; serving this node's local copy meanwhile", exc)
            return local
        return self._mirror(cert)

    def _lost_by_redis(self, name: str) -> StoredCert | None:
        """Redis lacks `name`: the local copy when it has one that was not deleted since (Redis
        lost it: a node restarted after a flush must serve it, not order anew). Not written
        back here: every node reads at once after a change, restore() writes with jitter."""
        try:
            local = self.local.load(name)
        except StoreError:
            return None
        if local is None:
            return None
        try:
            gone = self._call("load", self.client.get, self.key("gone", name))
        except StoreError:
            return local  # Redis went away meanwhile: the outage rule, the local copy
        try:
            deleted = gone is not None and float(gone) >= local.stored_at
        except ValueError:
            deleted = True
        return None if deleted else local

    def load_previous(self, name: str) -> StoredCert | None:
        name = _name(name)
        raw = self._call("load_previous", self.client.get, self.key("prev", name))
        return None if raw is None else _decode(raw, name, "previous")

    def save(self, cert: StoredCert) -> None:
        name = _name(cert.name)
        keys = [*self._cert_keys(name), self.key("gone", name), *self._revs("cert")]
        self._call("save", lambda: self._save(keys=keys, args=[_encode(cert), name]))
        self.local.save(cert)

    def save_unless_upload(self, cert: StoredCert) -> StoredCert | None:
        """save(), unless the live entry is an upload: then nothing is written and the upload
        is returned. The check is in the script that writes (another node's upload comes
        before or after it, never between), and also finds an upload Redis lost that this
        node's local copy still holds (see load)."""
        name = _name(cert.name)
        try:
            local = self.local.load(name)
        except StoreError:
            local = None
        local_upload = repr(local.stored_at) if local and local.source == "upload" else ""
        keys = [*self._cert_keys(name), self.key("gone", name), *self._revs("cert")]
        args = [_encode(cert), name, local_upload]
        written, found = cast(
            list[Any],
            self._call("save", lambda: self._save_unless_upload(keys=keys, args=args)),
        )
        if written:
            self.local.save(cert)
            return None
        if not found:
            return local
        return self._mirror(_decode(bytes(found), name, "live"))

    def _cert_keys(self, name: str) -> list[str]:
        """cert, prev, names, channel (then a script's own keys, then _revs("cert"))."""
        return [self.key("cert", name), self.key("prev", name), self.key("names"), self.channel]

    def _revs(self, kind: str) -> list[str]:
        """The keys a write bumps (see _BUMP): the counter and the kind's sorted set."""
        return [self.key("rev"), self.key("revs", kind)]

    def rollback(self, name: str, *, mirror: bool = True) -> StoredCert:
        """Swap the live and previous versions in Redis (every node follows the change).
        `mirror`: also write this node's local copy; `edged rollback` leaves that to the node's
        daemon, which mirrors what Redis publishes (two processes never write one directory)."""
        name = _name(name)
        raw = self._call("rollback", self.client.get, self.key("prev", name))
        if raw is None:
            raise StoreError(f"no previous version of {name!r} in Redis: nothing to roll back to")
        # Live from now on: newer than any node's local copy of the version rolled away from,
        # so restoring local copies (restore()) never undoes the rollback.
        cert = replace(_decode(cast(bytes, raw), name, "previous"), stored_at=time.time())
        keys = [self.key("cert", name), self.key("prev", name), self.channel, *self._revs("cert")]
        args = [raw, _encode(cert), name]
        if not self._call("rollback", lambda: self._rollback(keys=keys, args=args)):
            raise StoreError(f"{name!r} changed in Redis during the rollback: try again")
        if mirror:
            self.local.save(cert)
        return cert

    def delete(self, name: str) -> None:
        name = _name(name)
        keys = [
            self.key("cert", name),
            self.key("prev", name),
            self.key("names"),
            # Remembered, so a node that was away does not write its local copy back.
            self.key("gone", name),
            self.channel,
            *self._revs("cert"),
        ]
        args = [name, repr(time.time())]
        self._call("delete", lambda: self._delete(keys=keys, args=args))
        self.local.delete(name)

    def names(self) -> list[str]:
        try:
            members = self._call("names", self.client.smembers, self.key("names"))
        except StoreError:
            return self.local.names()
        return sorted(m.decode() for m in members)

    def _mirror(self, cert: StoredCert) -> StoredCert:
        """Keep the local copy equal to Redis (only writes when it differs) and return it;
        unless the local copy is newer: Redis was restored from an old dump, the local copy
        stays (and serves) until restore() puts it back."""
        try:
            local = self.local.load(cert.name)
            if local is not None and local.stored_at > cert.stored_at + OLDER_MARGIN:
                return local
            if local != cert:
                self.local.save(cert)
        except StoreError as exc:
            log.warning("local copy not updated name=%s error=%s", cert.name, exc)
        return cert

    # --- state and accounts -------------------------------------------------------------

    def load_state(self, name: str) -> dict[str, object] | None:
        name = _name(name)
        try:
            raw = self._call("load_state", self.client.get, self.key("state", name))
        except StoreError:
            return self.local.load_state(name)
        return _decode_state(name, raw)

    def load_states(self, names: Sequence[str]) -> dict[str, StateRead]:
        """load_state of each name, one MGET per STATES_BATCH names (one round trip each, not
        one per name). Redis unreachable: as _read_batched."""
        return self._read_batched(
            names, "state", STATES_BATCH, _decode_state, self.local.load_state
        )

    def mirror_states(self, states: Mapping[str, Mapping[str, object]]) -> None:
        """Keep the local copy of these states, read from Redis and not written again, equal
        to them: only those that differ are written (a node new to the fleet, or one whose
        copy fell behind). A copy that cannot be written is logged and left."""
        for name, state in states.items():
            try:
                if self.local.load_state(name) != state:
                    self.local.save_state(name, state)
            except StoreError as exc:
                log.warning(
                    "local copy of the renewal state not updated name=%s error=%s", name, exc
                )

    def save_state(self, name: str, state: Mapping[str, object]) -> None:
        name = _name(name)
        data = json.dumps(dict(state), sort_keys=True)
        self.local.save_state(name, state)  # first: survives a Redis outage
        keys = [self.key("state", name), self.state_channel, *self._revs("state")]
        self._call("save_state", lambda: self._save_state(keys=keys, args=[data, name]))

    def load_account(self, directory: str) -> tuple[dict[str, object], bytes] | None:
        folder = account_dirname(directory)
        try:
            raw = self._call("load_account", self.client.get, self.key("account", folder))
        except StoreError:
            return self.local.load_account(directory)
        if raw is None:
            # Redis lost it (flushed, restarted empty): the fleet's account is still in this
            # node's copy. Put it back rather than let the caller register a new account.
            local = self.local.load_account(directory)
            if local is None or not self._set_account_nx(folder, *local):
                return local
            raw = self._call("load_account", self.client.get, self.key("account", folder))
            if raw is None:
                return local
        account, key_pem = _decode_account(raw, folder)
        self._mirror_account(directory, account, key_pem)
        return account, key_pem

    def save_account(self, directory: str, account: Mapping[str, object], key_pem: bytes) -> None:
        folder = account_dirname(directory)
        # NX: two nodes registering at once keep the first account (one account per fleet).
        if self._set_account_nx(folder, account, key_pem):
            self.local.save_account(directory, account, key_pem)
            return
        # Another node's registration won: the local copy mirrors the fleet's account.
        raw = self._call("load_account", self.client.get, self.key("account", folder))
        if raw is not None:
            self._mirror_account(directory, *_decode_account(raw, folder))

    def _set_account_nx(self, folder: str, account: Mapping[str, object], key_pem: bytes) -> bool:
        """SET NX the account: True when this call wrote it."""
        data = json.dumps({**account, "key_pem": key_pem.decode("ascii")}, sort_keys=True)
        key = self.key("account", folder)
        return bool(self._call("save_account", self.client.set, key, data, None, None, True))

    def _mirror_account(self, directory: str, account: dict[str, object], key_pem: bytes) -> None:
        try:
            if self.local.load_account(directory) != (account, key_pem):
                self.local.save_account(directory, account, key_pem)
        except StoreError as exc:
            log.warning("local copy of the account not updated error=%s", exc)

    # --- putting local copies back when Redis lost its data -------------------------------

    def stale_in_redis(self) -> Stale:
        """Read-only and cheap (one script call for all certificates): what restore() would
        write. Local copies that cannot be read are skipped (logged)."""
        # Each copy's stamp from its meta.json alone: restore() reads the copies it writes in
        # full, and Redis checks the stamp again then.
        local: list[tuple[str, float]] = []
        for name in self.local.names():
            try:
                stored_at = self.local.stored_at(name)
            except StoreError as exc:
                log.warning("local copy unreadable, not restored name=%s error=%s", name, exc)
                continue
            if stored_at is not None:
                local.append((name, stored_at))
        reasons: dict[str, str] = {}
        # In batches: one script call blocks Redis while it runs.
        for start in range(0, len(local), STALE_BATCH):
            batch = local[start : start + STALE_BATCH]
            keys = [self.key("cert", name) for name, _ in batch]
            keys += [self.key("gone", name) for name, _ in batch]
            args = [repr(stored_at) for _, stored_at in batch]
            found = cast(
                list[Any],
                self._call("stale_in_redis", lambda k=keys, a=args: self._stale(keys=k, args=a)),
            )
            for i, why in zip(found[::2], found[1::2], strict=True):
                reasons[batch[int(i) - 1][0]] = bytes(why).decode()
        folders = self.local.account_folders()
        missing_accounts: list[str] = []
        if folders:
            pipe = self.client.pipeline()
            for folder in folders:
                pipe.exists(self.key("account", folder))
            exists = self._call("stale_in_redis", pipe.execute)
            missing_accounts = [f for f, e in zip(folders, exists, strict=True) if not e]
        return Stale(tuple(reasons), tuple(missing_accounts), reasons)

    def restore(self, stale: Stale) -> Stale:
        """Write back what `stale` names, each only if Redis still lacks it or holds an older
        version (checked again inside Redis), and publish each change. Returns what this node
        wrote; a node that lost the race to another writes nothing."""
        names: list[str] = []
        for name in stale.names:
            try:
                cert = self.local.load(name)
            except StoreError as exc:
                log.warning("local copy unreadable, not restored name=%s error=%s", name, exc)
                continue
            if cert is None:
                continue
            try:
                previous = self.local.load_previous(name)
            except StoreError:
                previous = None  # the live version matters; rollback waits for the next one
            keys = [*self._cert_keys(name), self.key("gone", name), *self._revs("cert")]
            old = _encode(previous) if previous else ""
            args = [_encode(cert), name, repr(cert.stored_at), old]
            if self._call("restore", lambda k=keys, a=args: self._restore(keys=k, args=a)):
                names.append(name)
                log.warning(
                    "certificate restored to redis from the local copy name=%s reason=%s",
                    name,
                    stale.reasons.get(name, "missing"),
                )
        accounts: list[str] = []
        for folder in stale.accounts:
            try:
                found = self.local.load_account_folder(folder)
            except StoreError as exc:
                log.warning("local account unreadable, not restored host=%s error=%s", folder, exc)
                continue
            if found is not None and self._set_account_nx(folder, *found):
                accounts.append(folder)
                log.warning("acme account restored to redis from the local copy host=%s", folder)
        return Stale(tuple(names), tuple(accounts), {n: stale.reasons.get(n, "") for n in names})

    # --- what changed since a node last looked ------------------------------------------

    def changes_since(self, cursor: Cursor | None) -> Changes:
        """The certificate and state names written since `cursor` (None: none known yet, so
        everything counts as changed), from one script call however many names there are."""
        keys = [
            self.key("epoch"),
            self.key("rev"),
            self.key("revs", "cert"),
            self.key("revs", "state"),
        ]
        args: list[str | int] = [
            secrets.token_hex(8),
            cursor.epoch if cursor else "",
            cursor.rev if cursor else 0,
            CHANGES_MAX,
        ]
        failures = self.failures  # before the call: one failing meanwhile counts next time
        found = cast(
            list[Any], self._call("changes_since", lambda: self._changes(keys=keys, args=args))
        )
        now = Cursor(bytes(found[0]).decode(), int(found[1]), failures)
        if ":" not in now.epoch and not self._warned_no_info:
            self._warned_no_info = True
            log.warning(
                "redis refuses INFO to edged's scripts (an ACL): a restart or failover that "
                "loses the last writes is not noticed, and a node may miss writes made after "
                "it until a change lists them again; allow it for edged's user (+info)"
            )
        if cursor is None:
            return Changes(now, "first resync")
        if not found[2] and len(found) > 3:
            refused = bytes(found[3]).decode(errors="replace")
            return Changes(
                now,
                f"redis refused to write its change index ({refused}): a read-only replica "
                "or out of memory; every certificate is read at each resync until it takes "
                "writes again",
            )
        if not found[2]:
            if now.epoch.partition(":")[0] != cursor.epoch.partition(":")[0]:
                why = "redis lost its data (flushed, or restarted without persistence)"
            elif now.epoch != cursor.epoch:
                why = "redis restarted or failed over (the last writes may be lost)"
            elif now.rev < cursor.rev:
                why = f"redis holds older data (rev {now.rev} < {cursor.rev}: an older dump)"
            else:
                why = "redis lost the change index (evicted or deleted)"
            return Changes(now, why)
        if failures != cursor.failures:
            # A read since the cursor may have served the local copy instead (Redis failed
            # it), and the index will not list that name again: everything is read.
            return Changes(now, "redis calls failed since the last resync")
        certs = tuple(bytes(n).decode() for n in found[3])
        states = tuple(bytes(n).decode() for n in found[4])
        if max(len(certs), len(states)) >= CHANGES_MAX:
            return Changes(now, f"{CHANGES_MAX} or more names changed")
        return Changes(now, "", certs, states)

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
        try:
            data = json.loads(raw)
            return str(data["key_authorization"]), [str(n) for n in data["names"]]
        except (ValueError, KeyError, TypeError, RecursionError):
            # Refused like an absent one (the CA's validation fails and the order is retried):
            # the writer's next put_token replaces it.
            raise StoreError(f"challenge token {token!r} in Redis is corrupt") from None

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
