"""Messages between edged's own processes: length-prefixed pickles over a socketpair.

Only processes of one edged instance hold these sockets (made by the main process and handed
down by fork or SCM_RIGHTS, never bound to a path), so pickle is safe here: nothing from outside
can write to them.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct

_HEADER = struct.Struct("!I")
# In a worker's first state, in place of the config: the one the zygote was forked with, which
# the worker holds already (its pages shared with the zygote) and need not unpickle again.
FORKED_CONFIG = "forked-config"
MAX_MESSAGE = 1 << 30  # a full state with 100k certificates is ~200 MB; anything larger is a bug


class IpcError(Exception):
    """The peer sent something that is not a message (a bug, or the process is dying)."""


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_MESSAGE:
        raise IpcError(f"message of {len(body)} bytes is larger than {MAX_MESSAGE}")
    return _HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> object | None:
    """The next message, or None when the peer has closed the channel (or died)."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_MESSAGE:
            raise IpcError(f"message header says {size} bytes")
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    try:
        message: object = pickle.loads(body)
    except Exception as exc:  # whatever unpickling raises, the channel is broken
        raise IpcError(f"unreadable message: {exc!r}") from None
    return message


async def writable(sock: socket.socket) -> None:
    """Wait until a non-blocking socket can take more (never block the event loop)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock, wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock)
