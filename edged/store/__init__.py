"""Certificate store: PEM bundles, their previous versions and renewal state.

`Store` is the interface (edged.store.base); `FileStore` keeps it in a directory tree,
`RedisStore` in Redis shared by a fleet, mirrored into a local FileStore.
"""

from __future__ import annotations

from edged.config import Config
from edged.errors import StoreError
from edged.store.base import PemPair, Store, StoredCert
from edged.store.files import FileStore


def open_store(config: Config, current: Store | None = None) -> Store:
    """The store the config names; `current` is reused when it is the same one."""
    local = config.local_store_path
    url = config.redis_url
    if url is None:
        if isinstance(current, FileStore) and current.root == local:
            return current
        return FileStore(local)
    from edged.store.redis import RedisStore, RedisTls

    e = config.edged
    tls = RedisTls(e.redis_ca_file, e.redis_cert_file, e.redis_key_file)
    password = None
    if e.redis_password_file is not None:
        try:
            password = e.redis_password_file.read_text().strip()
        except OSError as exc:
            raise StoreError(
                f"{e.redis_password_file}: edged.redis_password_file: cannot read: {exc.strerror}"
            ) from None
    # The password too: a rotated one (the file is watched) must reach the next connection.
    if isinstance(current, RedisStore) and (
        current.url,
        current.prefix,
        current.root,
        current.tls,
        current.connection_kwargs.get("password"),
    ) == (url, e.redis_prefix, local, tls, password):
        return current
    try:
        return RedisStore(url, FileStore(local), prefix=e.redis_prefix, password=password, tls=tls)
    except (ValueError, TypeError) as exc:  # redis-py's own checks of the URL and options
        raise StoreError(f"edged.store: not a usable Redis URL: {exc}") from None


__all__ = ["FileStore", "PemPair", "Store", "StoredCert", "open_store"]
