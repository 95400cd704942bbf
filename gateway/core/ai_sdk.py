"""The Vercel AI SDK's UI message stream (pure): what `useChat` sends, and what it reads.

`chat_start` turns the body `useChat`'s default transport POSTs (`{id, messages: UIMessage[],
trigger, messageId, ...}`, plus whatever the app adds with the transport's `body` option:
`model`, `options`, `parts`) into the protocol's `start`. `UiStream` turns one stream's protocol
messages into the UI message stream chunks (the AI SDK's "stream protocol", v1 of the
`x-vercel-ai-ui-message-stream` header; majors 5 and 6 of the `ai` package read it): a message
start, text and reasoning as start/delta/end blocks, sources as `source-url`, tool calls as
tool input, progress steps as transient `data-progress` parts, and the end (`finish`, an
`abort`, or an `error`), after which the response ends with `data: [DONE]`
(docs/protocol.md, "Vercel AI SDK").
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.core.protocol import ErrorCode, ProtocolViolation

#: The part kinds an AI SDK stream asks the gateway for: what its UI message stream can carry.
AI_SDK_PARTS: Final = ("reasoning", "sources", "tools", "progress")
#: What the body may carry for the start besides the chat (the transport's `body` option).
_START_FIELDS: Final = ("model", "options")
_FINISH: Final = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
}


def chat_start(body: Any, stream_id: str) -> dict[str, Any]:
    """The protocol `start` for a `useChat` request body; ProtocolViolation (bad_message) says
    what is wrong with one that cannot be used."""
    if not isinstance(body, dict):
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "the body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, "'messages' must be a non-empty list of UI messages"
        )
    messages = [m for i, message in enumerate(raw) for m in _messages(i, message)]
    if not messages:
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, "the messages carry no text")
    start: dict[str, Any] = {"type": "start", "id": stream_id, "messages": messages}
    for key in _START_FIELDS:
        if key in body:
            start[key] = body[key]
    start["parts"] = list(AI_SDK_PARTS)
    return start


def _messages(i: int, message: Any) -> list[dict[str, Any]]:
    """One UI message (`{id, role, parts: [...]}`) as chat messages: its text parts joined, its
    image files as `image_url` parts, and for an assistant the tool calls it made (`tool-<name>`
    and `dynamic-tool` parts) with, after it, a `tool` message per result the app added.
    Reasoning, sources and data parts are the answer's own and are not sent back."""
    if not isinstance(message, dict):
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, f"messages[{i}] must be an object")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise ProtocolViolation(
            ErrorCode.BAD_MESSAGE, f"messages[{i}].role must be system, user or assistant"
        )
    parts = message.get("parts")
    if not isinstance(parts, list):
        # AI SDK 4's messages have `content`; 5 and later, `parts`.
        legacy = message.get("content")
        if isinstance(legacy, str) and legacy:
            return [{"role": role, "content": legacy}]
        raise ProtocolViolation(ErrorCode.BAD_MESSAGE, f"messages[{i}].parts must be a list")
    texts: list[str] = []
    files: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif (
            kind == "file"
            and role == "user"
            and isinstance(part.get("url"), str)
            and str(part.get("mediaType", "")).startswith("image/")
        ):
            files.append({"type": "image_url", "image_url": {"url": part["url"]}})
        elif role == "assistant" and isinstance(kind, str) and _is_tool(part):
            name = kind[len("tool-") :] if kind.startswith("tool-") else part.get("toolName")
            call_id = part.get("toolCallId")
            if not isinstance(name, str) or not isinstance(call_id, str):
                continue
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": _json(part.get("input", {}))},
                }
            )
            if part.get("state") == "output-available":
                results.append(
                    {"role": "tool", "tool_call_id": call_id, "content": _json(part.get("output"))}
                )
            elif part.get("state") == "output-error":
                error = part.get("errorText")
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": call_id,
                        "content": f"error: {error}" if isinstance(error, str) else "error",
                    }
                )
    text = "".join(texts)
    if files:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        return [{"role": role, "content": [*content, *files]}]
    out: list[dict[str, Any]] = []
    if calls:
        out.append({"role": "assistant", "content": text or None, "tool_calls": calls})
        out.extend(results)
    elif text:
        out.append({"role": role, "content": text})
    return out


def _is_tool(part: dict[str, Any]) -> bool:
    kind = part.get("type")
    return kind == "dynamic-tool" or (isinstance(kind, str) and kind.startswith("tool-"))


def _json(value: Any) -> str:
    """A tool's input or output as the JSON text the chat APIs take."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


class UiStream:
    """One stream's protocol messages -> UI message stream chunks (dicts, in order)."""

    __slots__ = ("_block", "_blocks", "message_id")

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        #: The open text or reasoning block: (kind, id), or None.
        self._block: tuple[str, str] | None = None
        self._blocks = 0

    def chunks(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        kind = message.get("type")
        if kind in ("started", "resumed"):
            return [{"type": "start", "messageId": self.message_id}, {"type": "start-step"}]
        if kind == "text_chunk":
            return [
                *self._open("text"),
                {"type": "text-delta", "id": self._id(), "delta": message["text"]},
            ]
        if kind == "reasoning_chunk":
            return [
                *self._open("reasoning"),
                {"type": "reasoning-delta", "id": self._id(), "delta": message["text"]},
            ]
        if kind == "sources":
            out = []
            for source in message.get("sources", []):
                chunk = {
                    "type": "source-url",
                    "sourceId": f"source-{source.get('index')}",
                    "url": source.get("url", ""),
                }
                if isinstance(source.get("title"), str):
                    chunk["title"] = source["title"]
                out.append(chunk)
            return out
        if kind == "tool_call":
            call_id, name = message.get("call_id", ""), message.get("name", "")
            tool_input = message.get("arguments", message.get("arguments_raw"))
            return [
                *self._close(),
                {"type": "tool-input-start", "toolCallId": call_id, "toolName": name},
                {
                    "type": "tool-input-available",
                    "toolCallId": call_id,
                    "toolName": name,
                    "input": tool_input,
                },
            ]
        if kind == "progress":
            return [{"type": "data-progress", "data": message.get("step"), "transient": True}]
        if kind == "done":
            metadata = {
                key: message[key]
                for key in ("usage", "citations", "finish_reason", "refusal")
                if key in message
            }
            finish: dict[str, Any] = {"type": "finish"}
            reason = _FINISH.get(str(message.get("finish_reason")))
            if reason is not None:
                finish["finishReason"] = reason
            if metadata:
                finish["messageMetadata"] = metadata
            return [*self._close(), {"type": "finish-step"}, finish]
        if kind == "cancelled":
            return [*self._close(), {"type": "abort", "reason": "cancelled"}]
        if kind == "error":
            return [*self._close(), {"type": "error", "errorText": str(message.get("message", ""))}]
        return []

    def _id(self) -> str:
        assert self._block is not None
        return self._block[1]

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if self._block is not None and self._block[0] == kind:
            return []
        out = self._close()
        self._blocks += 1
        self._block = (kind, f"{kind}-{self._blocks}")
        return [*out, {"type": f"{kind}-start", "id": self._block[1]}]

    def _close(self) -> list[dict[str, Any]]:
        block, self._block = self._block, None
        if block is None:
            return []
        return [{"type": f"{block[0]}-end", "id": block[1]}]
