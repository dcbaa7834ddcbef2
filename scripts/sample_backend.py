#!/usr/bin/env python3
"""A tiny HTTP/1.1 backend for the demo: answers every request with what it learned about the
client, including the PROXY protocol v1/v2 header edged sends when a site asks for one."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


async def read_proxy_header(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    """Parse a PROXY header if there is one; return its fields and any bytes read past it."""
    head = await reader.readexactly(5)
    if head == b"PROXY":
        line = head + await reader.readuntil(b"\r\n")
        parts = line.decode().split()
        return ({"proxy": "v1", "client": f"{parts[2]}:{parts[4]}"} if len(parts) >= 6 else {}), b""
    if head == V2_SIGNATURE[:5]:
        rest = await reader.readexactly(11)
        fam, length = rest[8], struct.unpack("!H", rest[9:11])[0]
        body = await reader.readexactly(length)
        info = {"proxy": "v2"}
        alen = {0x11: 12, 0x21: 36}.get(fam, 0)
        if alen:
            n = 4 if fam == 0x11 else 16
            src = ipaddress.ip_address(body[:n])
            port = struct.unpack("!H", body[2 * n : 2 * n + 2])[0]
            info["client"] = f"{src}:{port}"
        tlvs = body[alen:]
        while len(tlvs) >= 3:
            kind, size = tlvs[0], struct.unpack("!H", tlvs[1:3])[0]
            value = tlvs[3 : 3 + size]
            if kind == 0x01:
                info["alpn"] = value.decode()
            elif kind == 0x02:
                info["sni"] = value.decode()
            tlvs = tlvs[3 + size :]
        return info, b""
    return {}, head


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    try:
        info, pending = await read_proxy_header(reader)
        while True:
            request = pending + await reader.readuntil(b"\r\n\r\n")
            pending = b""
            lines = request.decode("latin-1").split("\r\n")
            host = next(
                (h.split(":", 1)[1].strip() for h in lines if h.lower().startswith("host:")), ""
            )
            body = f"hello from {name}\nrequest: {lines[0]}\nhost: {host}\n"
            body += "".join(f"{k}: {v}\n" for k, v in info.items())
            head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
            writer.write(f"{head}\r\n\r\n{body}".encode())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="the sample backend")
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.name), "127.0.0.1", args.port
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
