"""Typed exceptions: every failure carries the protocol's error `code` and whether to retry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: Codes the client itself produces (they never appear on the wire).
CONNECTION_LOST: Final = "connection_lost"
UNAUTHORIZED: Final = "unauthorized"
INVALID_FRAME: Final = "invalid_frame"


class GatewayError(Exception):
    """Base class of every error the client raises about the gateway or a stream.

    `code` is the protocol's error code (docs/protocol.md, "Errors") or one of the client's own
    (`connection_lost`, `unauthorized`, `invalid_frame`); `retryable` tells whether sending the
    same request again may succeed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool,
        stream_id: str | None = None,
        seq: int | None = None,
        status: int | None = None,
        retry_after_ms: int | None = None,
        frame: Mapping[str, Any] | None = None,
        usage: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        #: The stream this error is about, if any.
        self.stream_id = stream_id
        #: The seq of the last message the stream received before it ended (terminal errors only).
        self.seq = seq
        #: The upstream's HTTP status (`upstream_error`).
        self.status = status
        #: How long to wait before trying again: the upstream's Retry-After (`upstream_error`),
        #: or when the window frees room (`rate_limited`, `budget_exceeded`).
        self.retry_after_ms = retry_after_ms
        #: The `error` frame as received, when the error came from the gateway.
        self.frame = frame
        #: What the stream used before it failed (the tokens spent are spent: docs/usage.md).
        self.usage = usage


class ProtocolError(GatewayError):
    """The request or a frame broke protocol v1 (bad_message, duplicate_id, unknown_id, ...);
    retrying the same request will not help."""


class GatewayBusy(GatewayError):
    """The gateway refused a start for now (too_many_streams, shutting_down, rate_limited);
    retry later (after `retry_after_ms` when set)."""


class BudgetExceeded(GatewayError):
    """The principal's budget for the gateway's window is used up (budget_exceeded): not
    retryable as is; `retry_after_ms` says when the window frees room."""


class UpstreamError(GatewayError):
    """The LLM upstream failed: upstream_unavailable, upstream_error (see `status`),
    upstream_timeout or upstream_protocol_error."""


class StreamInterrupted(GatewayError):
    """The stream broke off mid-answer (the chunks already received stand); retryable."""


class InternalError(GatewayError):
    """The gateway hit a bug while serving the stream; retryable."""


class ConnectionLost(GatewayError):
    """The socket is gone (or could not be opened) and the stream could not be resumed.

    `code` is `connection_lost`, or the gateway's refusal of the resume (`resume_unavailable`,
    `unknown_id`). `retryable` tells whether starting the same prompt again may succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = CONNECTION_LOST,
        retryable: bool = True,
        stream_id: str | None = None,
        close_code: int | None = None,
        frame: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, retryable=retryable, stream_id=stream_id, frame=frame)
        #: The WebSocket close code, when the gateway closed the socket.
        self.close_code = close_code


class Unauthorized(GatewayError):
    """The gateway refused or no longer accepts the credentials (close code 4401, HTTP 401/403,
    or an `unauthorized` error after the credential expired); never retried as is."""

    def __init__(
        self,
        message: str,
        *,
        close_code: int | None = None,
        stream_id: str | None = None,
        frame: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(UNAUTHORIZED, message, retryable=False, stream_id=stream_id, frame=frame)
        #: The WebSocket close code, when the gateway closed the socket.
        self.close_code = close_code


_BY_CODE: Final[dict[str, type[GatewayError]]] = {
    "bad_json": ProtocolError,
    "bad_message": ProtocolError,
    "unknown_type": ProtocolError,
    "message_too_large": ProtocolError,
    "duplicate_id": ProtocolError,
    "unknown_id": ProtocolError,
    "too_many_streams": GatewayBusy,
    "shutting_down": GatewayBusy,
    "rate_limited": GatewayBusy,
    "budget_exceeded": BudgetExceeded,
    "prompt_too_large": ProtocolError,
    "upstream_unavailable": UpstreamError,
    "upstream_error": UpstreamError,
    "upstream_timeout": UpstreamError,
    "upstream_protocol_error": UpstreamError,
    "stream_interrupted": StreamInterrupted,
    "internal": InternalError,
}


def error_class(code: str) -> type[GatewayError]:
    """The exception class for a protocol error code (`GatewayError` for codes this client
    does not know yet, so a newer gateway never breaks it)."""
    return _BY_CODE.get(code, GatewayError)


def error_from_frame(frame: Mapping[str, Any]) -> GatewayError:
    """Build the typed exception for an already validated `error` frame."""
    if frame["code"] == UNAUTHORIZED:
        return Unauthorized(frame["message"], stream_id=frame["id"], frame=frame)
    cls = error_class(frame["code"])
    return cls(
        frame["code"],
        frame["message"],
        retryable=frame["retryable"],
        stream_id=frame["id"],
        seq=frame.get("seq"),
        status=frame.get("status"),
        retry_after_ms=frame.get("retry_after_ms"),
        frame=frame,
        usage=frame.get("usage"),
    )
