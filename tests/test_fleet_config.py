"""The fleet's config keys: lease_ttl and the TLS files of a rediss:// store."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.config import check_files, parse_config
from edged.errors import ConfigError
from edged.store import open_store
from edged.store.redis import RedisStore, RedisTls

SRC = Path("/etc/edged/edged.toml")
REST = """
[listen]
https = ["127.0.0.1:8443"]
[[site]]
names = ["shop.test"]
backend = "127.0.0.1:8080"
"""


def edged(keys: str) -> str:
    return "[edged]\n" + keys + "\n" + REST


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    return [str(p) for p in info.value.problems]


def test_lease_ttl_default_durations_and_range() -> None:
    assert parse_config(edged('store = "redis://r:6379/0"'), SRC).edged.lease_ttl == 60.0
    assert parse_config(edged('lease_ttl = "5s"'), SRC).edged.lease_ttl == 5.0
    assert parse_config(edged('lease_ttl = "2m"'), SRC).edged.lease_ttl == 120.0
    assert parse_config(edged("lease_ttl = 30"), SRC).edged.lease_ttl == 30.0
    assert problems(edged('lease_ttl = "soon"')) == [
        f"{SRC}: edged.lease_ttl: must be a duration like '15m', '30s', '1h' or seconds, got 'soon'"
    ]
    (short,) = problems(edged('lease_ttl = "500ms"'))
    assert short.startswith(f"{SRC}: edged.lease_ttl: 0.5s is out of range: use 3s to 60m")
    (long,) = problems(edged('lease_ttl = "2h"'))
    assert "7200s is out of range" in long and "blocks a name" in long


def test_redis_tls_keys_resolve_and_are_checked(tmp_path: Path) -> None:
    source = tmp_path / "edged.toml"
    text = edged(
        'store = "rediss://redis.internal:6380/0"\nredis_ca_file = "redis-ca.pem"\n'
        'redis_cert_file = "/etc/edged/node.crt"\nredis_key_file = "node.key"'
    )
    config = parse_config(text, source)
    assert config.edged.redis_ca_file == tmp_path / "redis-ca.pem"
    assert config.edged.redis_cert_file == Path("/etc/edged/node.crt")
    assert config.edged.redis_key_file == tmp_path / "node.key"
    # Missing files are named with their key, like every file the config refers to.
    missing = [str(p) for p in check_files(config)]
    assert f"{source}: edged.redis_ca_file: {tmp_path / 'redis-ca.pem'}: no such file" in (
        "\n".join(missing)
    )
    assert len(missing) == 3
    store = open_store(config)
    assert isinstance(store, RedisStore)
    assert store.tls == RedisTls(
        tmp_path / "redis-ca.pem", Path("/etc/edged/node.crt"), tmp_path / "node.key"
    )
    assert store.connection_kwargs["ssl_ca_certs"] == str(tmp_path / "redis-ca.pem")
    store.close()


def test_redis_tls_key_problems() -> None:
    assert problems(edged('store = "redis://r:6379/0"\nredis_ca_file = "ca.pem"')) == [
        f"{SRC}: edged.redis_ca_file: only applies to a TLS store (rediss://…), not "
        "'redis://r:6379/0'"
    ]
    assert problems(edged('store = "rediss://r:6380/0"\nredis_cert_file = "node.crt"')) == [
        f"{SRC}: edged.redis_key_file: set redis_cert_file and redis_key_file together "
        "(a client certificate)"
    ]
