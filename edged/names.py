"""DNS names: validation, normalisation, wildcard coverage and the store's directory names.

Pure functions. A name that passes `normalize_name` is lowercase ASCII (IDNA A-labels), has no
trailing dot and only LDH labels (a leading `*.` label for wildcards), so it is safe to use as a
file name, a metric label and a dictionary key.
"""

from __future__ import annotations

import re

import idna

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_NAME_LENGTH = 253


class NameError_(ValueError):
    """Raised for a string that is not a usable DNS name (message says why)."""


def normalize_name(raw: str, *, allow_wildcard: bool = True) -> str:
    """Return the canonical form of a DNS name or raise NameError_ saying what is wrong."""
    name = raw.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise NameError_("empty DNS name")
    if not name.isascii():
        star, rest = ("*.", name[2:]) if name.startswith("*.") else ("", name)
        try:
            # IDNA 2008 with UTS 46, non-transitional, as browsers and CAs: Python's own
            # "idna" codec is IDNA 2003 and maps faß.de to fass.de, another domain.
            name = star + idna.encode(rest, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise NameError_(f"{raw!r} is not a valid internationalised name: {exc}") from None
    if len(name) > MAX_NAME_LENGTH:
        raise NameError_(f"{raw!r} is longer than {MAX_NAME_LENGTH} characters")
    labels = name.split(".")
    if labels[0] == "*":
        if not allow_wildcard:
            raise NameError_(f"{raw!r}: a wildcard is not allowed here")
        if len(labels) < 3:
            raise NameError_(
                f"{raw!r}: a wildcard needs at least two labels after '*.' (e.g. *.example.com)"
            )
        labels = labels[1:]
    for label in labels:
        if not _LABEL.match(label):
            raise NameError_(
                f"{raw!r}: label {label!r} is not a valid DNS label "
                "(letters, digits and '-', 1-63 characters, no leading or trailing '-')"
            )
    return name


def is_wildcard(name: str) -> bool:
    return name.startswith("*.")


def covers(pattern: str, name: str) -> bool:
    """True when certificate name `pattern` covers host `name` (both normalised).

    A wildcard covers exactly one label: `*.a.com` covers `x.a.com`, not `a.com` or `x.y.a.com`.
    A wildcard host name (a site's `*.a.com`) is only covered by the same wildcard.
    """
    if pattern == name:
        return True
    if not is_wildcard(pattern) or is_wildcard(name):
        return False
    head, dot, rest = name.partition(".")
    return bool(dot) and bool(head) and rest == pattern[2:]


def wildcard_parent(host: str) -> str | None:
    """The one-level wildcard that would cover `host` (`x.a.com` -> `*.a.com`)."""
    _, dot, rest = host.partition(".")
    if not dot or "." not in rest:
        return None
    return "*." + rest


def name_of_store_dir(dirname: str) -> str:
    """The DNS name a store directory holds (the inverse of store_dirname)."""
    return "*." + dirname[len("_wildcard.") :] if dirname.startswith("_wildcard.") else dirname


def store_dirname(name: str) -> str:
    """Directory name for a normalised DNS name: wildcards become `_wildcard.<rest>`.

    Refuses anything that is not already a normalised name, so a raw SNI or an API path segment
    can never address a path outside the store.
    """
    if normalize_name(name) != name:
        raise NameError_(f"{name!r} is not a normalised DNS name")
    return "_wildcard." + name[2:] if is_wildcard(name) else name


def name_from_dirname(dirname: str) -> str:
    """Inverse of store_dirname; raises NameError_ for a directory that is not one of ours."""
    name = "*." + dirname[len("_wildcard.") :] if dirname.startswith("_wildcard.") else dirname
    if normalize_name(name) != name:
        raise NameError_(f"{dirname!r} is not a store directory name")
    return name
