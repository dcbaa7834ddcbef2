"""An in-test HTTPS server on localhost with its own CA, standing in front of Pebble for what
Pebble 2.4 lacks (ARI renewalInfo, 429 rate limits): `trust` trusts it and Pebble's listener,
so edged's acme.ca_bundle can point at it."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.pebble import Pebble
from tests.pki import make_ca, make_leaf
from tests.ports import free_port


@web.middleware
async def close_after(request: web.Request, handler: Handler) -> web.StreamResponse:
    # No keep-alive: a pooled client connection left behind would make uvloop's loop.close()
    # wait for a TLS shutdown that never comes.
    response = await handler(request)
    response.force_close()
    return response


class HttpsFront:
    def __init__(self, tmp_path: Path, pebble: Pebble, name: str) -> None:
        ca = make_ca(f"{name} CA")
        leaf = make_leaf(ca, ["localhost"])
        self.cert = tmp_path / f"{name}.pem"
        self.key = tmp_path / f"{name}.key"
        self.cert.write_bytes(leaf.cert_pem)
        self.key.write_bytes(leaf.key_pem)
        self.trust = tmp_path / f"{name}-trust.pem"
        self.trust.write_bytes(ca.cert_pem + pebble.listener_ca.read_bytes())
        self.port = free_port()
        self.base = f"https://localhost:{self.port}"

    @asynccontextmanager
    async def serve(self, routes: Iterable[web.RouteDef]) -> AsyncIterator[None]:
        app = web.Application(middlewares=[close_after])
        app.add_routes(list(routes))
        runner = web.AppRunner(app)
        await runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        await web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx).start()
        try:
            yield
        finally:
            await runner.cleanup()
