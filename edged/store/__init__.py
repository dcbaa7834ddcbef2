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
    from edged.store.redis import RedisStore

    if isinstance(current, RedisStore) and (current.url, current.prefix, current.root) == (
        url,
        config.edged.redis_prefix,
        local,
    ):
        return current
    password = None
    if config.edged.redis_password_file is not None:
        try:
            password = config.edged.redis_password_file.read_text().strip()
        except OSError as exc:
            raise StoreError(
                f"{config.edged.redis_password_file}: edged.redis_password_file: cannot read: "
                f"{exc.strerror}"
            ) from None
    return RedisStore(url, FileStore(local), prefix=config.edged.redis_prefix, password=password)


__all__ = ["FileStore", "PemPair", "Store", "StoredCert", "open_store"]
