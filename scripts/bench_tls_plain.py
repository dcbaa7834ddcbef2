#!/usr/bin/env python3
"""The reference row of `scripts/bench tls`: the plainest TLS terminator Python can be (uvloop's
TLS transport, `loop.create_server(ssl=ctx)`, bytes copied to the backend with backpressure).
No ClientHello peek, no SNI routing, no metrics: what edged costs on top of this is the price of
its features. Run: bench_tls_plain.py LISTEN_PORT BACKEND_PORT CERT KEY"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop

TASKS: set[asyncio.Task[None]] = set()


class Pipe(asyncio.Protocol):
    """One side of a connection; writes what it reads to its peer, pauses on a full peer."""

    def __init__(self, peer: Pipe | None = None) -> None:
        self.peer, self.transport, self.early = peer, None, bytearray()

    def connection_made(self, transport):
        self.transport = transport
        if self.peer is None:  # client side: handshake done; connect the backend
            transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self.connect())
            TASKS.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(TASKS.discard)

    async def connect(self):
        try:
            _, self.peer = await asyncio.get_running_loop().create_connection(
                lambda: Pipe(self), "127.0.0.1", BACKEND_PORT
            )
            self.transport.resume_reading()
        except OSError:
            self.transport.close()

    def data_received(self, data):
        self.peer.transport.write(data)

    def eof_received(self):
        self.peer.transport.close()  # a TLS transport cannot half-close: close both

    def connection_lost(self, exc):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self):
        self.peer.transport.pause_reading()

    def resume_writing(self):
        self.peer.transport.resume_reading()


async def main(port: int, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.get_running_loop().create_server(
        Pipe, "127.0.0.1", port, ssl=ctx, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    BACKEND_PORT = int(sys.argv[2])
    uvloop.run(main(int(sys.argv[1]), sys.argv[3], sys.argv[4]))
