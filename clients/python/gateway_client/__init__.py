"""Python client for the LLM WebSocket gateway (protocol v1).

    from gateway_client import GatewayClient

    async with GatewayClient("ws://127.0.0.1:8080/v1/ws") as gw:
        stream = await gw.start("Why is the sky blue?", model="sonar")
        async for chunk in stream:
            print(chunk, end="")
        answer = stream.result

Many streams run concurrently on one socket; errors are typed `GatewayError`s carrying the
protocol's `code` and `retryable`; dropped sockets are reconnected with jittered backoff.
`start(..., parts=["reasoning", "sources"])` asks for typed parts besides the text, which
`stream.parts()` yields in order (`TextPart`, `ReasoningPart`, `SourcesPart`, `ToolCallPart`,
`ProgressPart`).
"""

from gateway_client._backoff import Backoff
from gateway_client._client import DEFAULT_URL, GatewayClient, Stream
from gateway_client._errors import (
    BudgetExceeded,
    ConnectionLost,
    GatewayBusy,
    GatewayError,
    InternalError,
    ProtocolError,
    StreamInterrupted,
    Unauthorized,
    UpstreamError,
)
from gateway_client._frames import (
    Answer,
    Part,
    ProgressPart,
    ReasoningPart,
    Source,
    SourcesPart,
    TextPart,
    ToolCall,
    ToolCallPart,
    Welcome,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "Answer",
    "Backoff",
    "BudgetExceeded",
    "ConnectionLost",
    "GatewayBusy",
    "GatewayClient",
    "GatewayError",
    "InternalError",
    "Part",
    "ProgressPart",
    "ProtocolError",
    "ReasoningPart",
    "Source",
    "SourcesPart",
    "Stream",
    "StreamInterrupted",
    "TextPart",
    "ToolCall",
    "ToolCallPart",
    "Unauthorized",
    "UpstreamError",
    "Welcome",
]
