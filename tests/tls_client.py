"""A blocking TLS client on memory BIOs, shared by the data-path tests: it can half-close
(close_notify + FIN) and keep reading, keeps its exact ClientHello (`hello`) and can send it one
byte per TCP segment. Run its methods with asyncio.to_thread."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path


class MemoryTlsClient:
    def __init__(self, port: int, cafile: Path, sni: str, *, byte_by_byte: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, local_port = self.sock.getsockname()[:2]
        self.local = (str(host), int(local_port))
        ctx = ssl.create_default_context(cafile=str(cafile))
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=sni)
        try:
            with contextlib.suppress(ssl.SSLWantReadError):
                self.obj.do_handshake()
            self.hello = self.out.read()
            if byte_by_byte:
                for i in range(len(self.hello)):
                    self.sock.send(self.hello[i : i + 1])
                    time.sleep(0.0005)
            else:
                self.sock.sendall(self.hello)
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                if not self._recv():
                    raise ConnectionResetError("closed during handshake") from None
        self._send_pending()

    def _send_pending(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _recv(self, size: int = 65536) -> bool:
        data = self.sock.recv(size)
        if data:
            self.inc.write(data)
        else:
            self.inc.write_eof()
        return bool(data)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._send_pending()

    def close_write(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        self._send_pending()
        self.sock.shutdown(socket.SHUT_WR)

    def read_all(self, limit: int = 1 << 30) -> tuple[bytes, bool]:
        """Read until close_notify/EOF or `limit` bytes; returns (data, got_close_notify)."""
        buf = bytearray()
        while len(buf) < limit:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                if not self._recv():
                    return bytes(buf), False
                continue
            except ssl.SSLZeroReturnError:
                return bytes(buf), True
            except ssl.SSLEOFError:
                return bytes(buf), False
            if not chunk:
                return bytes(buf), True
            buf += chunk
        return bytes(buf), False

    def read_until(self, until: bytes = b"") -> bytes:
        """Read until `until` is in the data (or close_notify/EOF when `until` is empty)."""
        buf = b""
        while not until or until not in buf:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                if not self._recv():
                    return buf
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return buf
            if not chunk:
                return buf
            buf += chunk
        return buf

    def peer_cn(self) -> str:
        cert = self.obj.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return ""

    def close(self) -> None:
        self.sock.close()
