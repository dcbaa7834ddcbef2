"""SniIndex lookup: exact, one-level wildcard, default, refusal; and DNS name rules."""

from __future__ import annotations

import pytest

from edged.config import Address, Site
from edged.names import NameError_, covers, normalize_name, store_dirname, wildcard_parent
from edged.sni import build_index


def site(index: int, *names: str) -> Site:
    return Site(index=index, names=names, backend=Address("127.0.0.1", 8000 + index))


SITES = [
    site(0, "example.com", "*.example.com"),
    site(1, "api.example.com"),
    site(2, "*.cdn.example.net"),
]


def test_exact_beats_wildcard_across_sites() -> None:
    index = build_index(SITES, {})
    route = index.lookup("api.example.com")
    assert route is not None and route.site.index == 1 and route.name == "api.example.com"
    route = index.lookup("www.example.com")
    assert route is not None and route.site.index == 0 and route.name == "*.example.com"


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("EXAMPLE.com.", "example.com"),
        ("x.cdn.example.net", "*.cdn.example.net"),
        ("x.y.cdn.example.net", None),  # a wildcard covers one label only
        ("cdn.example.net", None),
        ("*.example.com", "*.example.com"),  # a literal '*' SNI only matches the literal name
        ("unknown.org", None),
        ("", None),
        (None, None),
        ("../../etc/passwd", None),
        ("a\x00.example.com", None),
    ],
)
def test_lookup(sni: str | None, expected: str | None) -> None:
    route = build_index(SITES, {}).lookup(sni)
    assert (route.name if route else None) == expected


def test_default_answers_unknown_and_missing_sni() -> None:
    index = build_index(SITES, {}, default_name="api.example.com")
    for sni in ("unknown.org", None, "x.y.cdn.example.net"):
        route = index.lookup(sni)
        assert route is not None and route.name == "api.example.com"


def test_names_normalisation_and_rules() -> None:
    assert normalize_name("WWW.Example.COM.") == "www.example.com"
    assert normalize_name("bücher.example") == "xn--bcher-kva.example"
    for bad in ("", "a..b", "-a.com", "a-.com", "x" * 64 + ".com", "a/b.com", "*.*.a.com"):
        with pytest.raises(NameError_):
            normalize_name(bad)
    with pytest.raises(NameError_):
        normalize_name("*.a.com", allow_wildcard=False)


def test_covers_one_label_only() -> None:
    assert covers("*.a.com", "x.a.com")
    assert not covers("*.a.com", "a.com")
    assert not covers("*.a.com", "x.y.a.com")
    assert covers("*.a.com", "*.a.com")
    assert not covers("x.a.com", "*.a.com")
    assert wildcard_parent("x.y.a.com") == "*.y.a.com"
    assert wildcard_parent("a.com") is None


def test_store_dirname_never_leaves_the_store() -> None:
    assert store_dirname("*.a.com") == "_wildcard.a.com"
    for bad in ("../x.com", "A.com", "a.com/..", ".", "..", "x\x00.com"):
        with pytest.raises(NameError_):
            store_dirname(bad)
