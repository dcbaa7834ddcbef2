"""edged: an edge TLS termination daemon for CDN hosts."""

__version__ = "0.1.0"
