"""Certificate store: PEM bundles, their previous versions and renewal state.

`Store` is the interface (edged.store.base); `FileStore` keeps it in a directory tree.
"""

from edged.store.base import PemPair, Store, StoredCert
from edged.store.files import FileStore

__all__ = ["FileStore", "PemPair", "Store", "StoredCert"]
