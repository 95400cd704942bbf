"""The client-frames seam: whether websockets' parser is at a frame boundary, learnt by walking
its generators, so the gateway may parse whole frames itself (gateway/io/websocket.py); with
its self-test. The fallback is websockets' own `receive_data` for every byte."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader as WsStreamReader

#: Where websockets' frame parser waits when it is at a frame boundary with nothing buffered.
_AT_EOF: Final = WsStreamReader.at_eof.__code__


def at_frame_boundary(protocol: ServerProtocol) -> bool:
    """Whether websockets' parser waits for the first byte of a frame, with nothing buffered:
    its innermost generator is then `StreamReader.at_eof()`, at the top of its frame loop.
    If websockets' internals change, this is never true and every frame goes its way."""
    gen: Any = protocol.parser
    while True:
        inner = getattr(gen, "gi_yieldfrom", None)
        if inner is None:
            return getattr(gen, "gi_code", None) is _AT_EOF
        gen = inner


def forget_parser_error(protocol: ServerProtocol) -> None:
    """The socket is gone: drop the traceback of the exception that ended websockets' parser
    (bad framing, a frame over the limit, the EOF), which it keeps as `parser_exc`. Its frames
    hold the parser, which holds the protocol: a reference cycle per hostile socket, freed only
    by a full collection. The exceptions it was raised from (`__cause__`, `__context__`: an
    invalid opcode is a ValueError underneath) carry frames of the same parser, so the whole
    chain is cleared. Without that attribute there is nothing to do."""
    exc = getattr(protocol, "parser_exc", None)
    seen: set[int] = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


_UPGRADE: Final = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frames_self_test(boundary: Callable[[ServerProtocol], bool] = at_frame_boundary) -> str | None:
    """Drive a websockets server protocol through a handshake and a frame cut in two: the
    boundary check must say yes when idle, no in the middle of a frame, yes after it. None
    when it does, else what it said."""
    try:
        protocol = ServerProtocol()
        protocol.receive_data(_UPGRADE)
        [request] = protocol.events_received()
        assert isinstance(request, Request)
        protocol.send_response(protocol.accept(request))
        if protocol.state is not State.OPEN:
            return "the self-test's handshake failed"
        if not boundary(protocol):
            return "the parser is not seen at a frame boundary when idle"
        frame = b"\x81\x82k3y!" + bytes(a ^ b for a, b in zip(b"{}", b"k3", strict=True))
        protocol.receive_data(frame[:3])
        if boundary(protocol):
            return "the parser is seen at a frame boundary in the middle of a frame"
        protocol.receive_data(frame[3:])
        events = protocol.events_received()
        if not (len(events) == 1 and isinstance(events[0], Frame) and events[0].data == b"{}"):
            return f"the frame was parsed as {events!r}"
        if not boundary(protocol):
            return "the parser is not seen at a frame boundary after a frame"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
