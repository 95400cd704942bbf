"""The `gemini` dialect (pure): Google Gemini's `POST .../models/{model}:streamGenerateContent
?alt=sse`, and Vertex AI's stream of the same shape (docs/upstreams.md, "gemini").

Every event's data is a whole `GenerateContentResponse`; there are no event names and no
`[DONE]`. Only candidate 0 (`index` 0 or absent) is relayed. Its `content.parts[]`:

- `text` is answer text; `text` with `thought: true` is reasoning; `thoughtSignature` is
  ignored (it is opaque, and the protocol has nowhere to keep it);
- `functionCall` `{name, args, id?}` is a complete tool call at once. Vertex may stream the
  arguments instead (`streamFunctionCallArguments`): `{name, willContinue: true}`, then
  `{partialArgs: [{jsonPath, stringValue | numberValue | boolValue | nullValue,
  willContinue?}], willContinue: true}` fragments (a string value continues while its piece says
  `willContinue`), closed by a functionCall without `willContinue` (an empty `{}`), by the next
  call or by the finish;
- `executableCode` / `codeExecutionResult` (the hosted code-execution tool) are `code`
  progress steps; other parts (`inlineData`, `fileData`, ...) are not relayed.

The candidate's `groundingMetadata` (the hosted Google Search tool) gives a `search` progress
step for new `webSearchQueries`, and sources from `groundingChunks[].web` `{uri, title}`: only
the chunks its `groundingSupports` cite when it has supports, else all of them, in chunk order.
`finishReason` is normalised (STOP after function calls is `tool_calls`); a prompt refused with
`promptFeedback.blockReason` (no candidates) ends the answer with `content_filter`.
`usageMetadata` is kept as sent, the last one. An `{"error": {code, message, status}}` event
fails the stream. A clean EOF completes the answer only after a `finishReason` (or a
`blockReason`); before one it is `stream_interrupted`.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Final
from urllib.parse import quote, unquote_to_bytes

import orjson

from gateway.core.dialects.base import (
    DEFAULT_LIMITS,
    Dialect,
    PartsTranslator,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    UpstreamRequest,
    byte_len,
    error_message,
    error_retryable,
    loads_event,
    normalise_finish,
    parsed_call,
    protocol_error,
)
from gateway.core.parts import NULL_SINK, PartLimits, PartSink
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEEvent
from gateway.core.usage import Usage, count

#: Google's error codes and statuses that may succeed later (overloaded, rate-limited, server
#: trouble; google.rpc.Code and Google's retry guidance for 429/500/503/504).
_RETRY_CODES: Final = frozenset({429, 500, 503, 504})
_RETRY_STATUSES: Final = frozenset(
    {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"}
)
#: Gemini finish reasons that `normalise_finish` does not know (FinishReason enum).
_FINISH: Final[Mapping[str, str]] = {
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
}
#: The largest array index a streamed argument path may name (a bound on what it allocates).
_MAX_INDEX: Final = 4096
#: The sentinel Google documents for a replayed functionCall whose thoughtSignature the client
#: does not have (Gemini 3 refuses such a call with a 400 otherwise; "Thought signatures").
SKIP_SIGNATURE: Final = "skip_thought_signature_validator"


def _retryable(error: Any) -> bool:
    if not isinstance(error, dict):
        return False
    return (
        error.get("code") in _RETRY_CODES
        or error.get("status") in _RETRY_STATUSES
        or error_retryable(error)
    )


def _candidate_zero(candidates: Any) -> dict[str, Any] | None:
    """The candidate with index 0 (or none given) among an event's candidates."""
    if not isinstance(candidates, list):
        return None
    for candidate in candidates:
        if not isinstance(candidate, dict):
            raise protocol_error("upstream candidate is not a JSON object")
        if not candidate.get("index"):  # 0, or absent (Vertex omits it)
            return candidate
    return None


def _path(path: str) -> list[str | int]:
    """The steps of a `partialArgs` jsonPath (`$.a.b[0]['c']`)."""
    if not path.startswith("$"):
        raise protocol_error("upstream sent a function argument without a valid jsonPath")
    steps: list[str | int] = []
    i, size = 1, len(path)
    while i < size:
        char = path[i]
        if char == ".":
            j = i + 1
            while j < size and path[j] not in ".[":
                j += 1
            if j == i + 1:
                break
            steps.append(path[i + 1 : j])
            i = j
            continue
        if char == "[":
            end = path.find("]", i)
            inner = path[i + 1 : end] if end > 0 else ""
            if inner.isdigit() and len(inner) <= 4 and int(inner) < _MAX_INDEX:
                steps.append(int(inner))
            elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                steps.append(inner[1:-1])
            else:
                break
            i = end + 1
            continue
        break
    else:
        if steps:
            return steps
    raise protocol_error("upstream sent a function argument without a valid jsonPath")


def _set(root: dict[str, Any], steps: list[str | int], value: Any, append: bool) -> None:
    """Put `value` at `steps` in `root` (creating objects and arrays on the way); `append`
    continues the string already there."""
    node: Any = root
    for step, following in zip(steps, [*steps[1:], None], strict=True):
        fresh: Any = {} if isinstance(following, str) else []
        if isinstance(step, str):
            if not isinstance(node, dict):
                raise protocol_error("upstream function arguments do not fit their paths")
            if following is None:
                old = node.get(step)
                node[step] = old + value if append and isinstance(old, str) else value
                return
            node = node.setdefault(step, fresh)
        else:
            if not isinstance(node, list):
                raise protocol_error("upstream function arguments do not fit their paths")
            node.extend([None] * (step + 1 - len(node)))
            if following is None:
                old = node[step]
                node[step] = old + value if append and isinstance(old, str) else value
                return
            if node[step] is None:
                node[step] = fresh
            node = node[step]


class _StreamedCall:
    """A Vertex function call whose arguments arrive as `partialArgs`."""

    __slots__ = ("args", "call_id", "continuing", "name", "size")

    def __init__(self, name: str, call_id: Any, args: Any) -> None:
        self.name = name
        self.call_id = call_id
        self.args: dict[str, Any] = args if isinstance(args, dict) else {}
        #: jsonPaths whose string value goes on in the next piece.
        self.continuing: set[str] = set()
        self.size = 0


class GeminiTranslator(PartsTranslator):
    """Gemini `GenerateContentResponse` events; the end is EOF after a `finishReason`."""

    name = "gemini"
    __slots__ = (
        "_closed",
        "_code",
        "_count",
        "_open",
        "_queries",
        "_saw_finish",
    )

    def __init__(
        self,
        wants: Collection[str] = frozenset(),
        sink: PartSink = NULL_SINK,
        limits: PartLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(wants, sink, limits)
        #: Every call seen, wanted or not (a STOP after calls is `tool_calls`).
        self._count = 0
        self._open: _StreamedCall | None = None
        #: Search queries already shown as progress.
        self._queries: set[str] = set()
        #: The code of an `executableCode` part waiting for its result.
        self._code: str | None = None
        self._saw_finish = False
        self._closed = False

    def feed(self, event: SSEEvent) -> str | None:
        data = event.data
        if not data:
            return None
        obj = loads_event(data)
        if not isinstance(obj, dict):
            raise protocol_error("upstream event is not a JSON object")
        # The fast path: candidate 0 with one plain text part, no finish, no grounding. Indexing
        # and unpacking straight away, with anything else (another shape, a wrong type) sent to
        # the slow path by the exception, costs a third of checking each step's type first.
        try:
            candidate = obj["candidates"][0]
            (part,) = candidate["content"]["parts"]
            text = part["text"]
        except (KeyError, IndexError, TypeError, ValueError):
            text = None  # (`part` and `candidate` are read only when `text` is)
        if (
            type(text) is str
            and text
            and len(part) == 1
            and "finishReason" not in candidate
            and "groundingMetadata" not in candidate
            and not candidate.get("index")
            and self._open is None
        ):
            usage = obj.get("usageMetadata")
            if usage is not None:
                self.meta["usage"] = usage
            self.saw_text = True
            return text
        return self._slow(obj)

    def usage(self) -> Usage | None:
        """`usageMetadata`: `candidatesTokenCount` leaves the thoughts out
        (`thoughtsTokenCount` beside it), `promptTokenCount` includes the cached content; tool
        results the API fetched itself (`toolUsePromptTokenCount`) are input too."""
        raw = self.meta.get("usage")
        prompt = count(raw, "promptTokenCount")
        answer = count(raw, "candidatesTokenCount")
        thoughts = count(raw, "thoughtsTokenCount")
        if prompt is None and answer is None and thoughts is None:
            return None
        prompt = (prompt or 0) + (count(raw, "toolUsePromptTokenCount") or 0)
        cached = count(raw, "cachedContentTokenCount")
        return Usage(prompt, (answer or 0) + (thoughts or 0), thoughts, cached)

    def end_of_stream(self) -> None:
        if self.finished:
            return
        # No end marker: EOF after a finishReason is the end; before one the answer was cut
        # off (a clean EOF looks like success to the SDKs; upstream-formats.md, 0.7).
        if not self._saw_finish:
            raise UpstreamFailure(
                ErrorCode.STREAM_INTERRUPTED,
                "upstream ended the stream before the answer was complete",
            )
        self.finished = True
        self._close()

    # -- the slow path: anything but a plain text part

    def _slow(self, obj: dict[str, Any]) -> str | None:
        if "error" in obj:
            error = obj["error"]
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_ERROR, error_message(error), retryable=_retryable(error)
            )
        usage = obj.get("usageMetadata")
        if usage is not None:
            self.meta["usage"] = usage
        out: list[str] = []
        candidate = _candidate_zero(obj.get("candidates"))
        if candidate is not None:
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, dict):
                        self._part(part, out)
            grounding = candidate.get("groundingMetadata")
            if isinstance(grounding, dict):
                self._grounding(grounding)
            finish = candidate.get("finishReason")
            if finish is not None:
                self._finish(finish)
        if "promptFeedback" in obj:
            feedback = obj["promptFeedback"]
            if isinstance(feedback, dict) and feedback.get("blockReason") is not None:
                # The prompt itself was refused: a complete, empty answer (decided: a finish,
                # not an error, as Gemini answers it 200 with a reason the client can show).
                self._finish_as(feedback["blockReason"], "content_filter")
        text = "".join(out)
        return text or None

    def _part(self, part: dict[str, Any], out: list[str]) -> None:
        if "functionCall" in part:
            self._function_call(part["functionCall"])
            return
        if self._open is not None:  # anything else ends Vertex's streamed call
            self._complete_open()
        text = part.get("text")
        if isinstance(text, str):
            if text:
                if part.get("thought") is True:
                    self._reason(text)
                else:
                    self.saw_text = True
                    out.append(text)
            return
        code = part.get("executableCode")
        if isinstance(code, dict):
            self._executable_code(code)
            return
        result = part.get("codeExecutionResult")
        if isinstance(result, dict):
            self._code_result(result)

    # -- tool calls

    def _function_call(self, call: Any) -> None:
        """A `functionCall` part: a whole call, or the start, a fragment or the end of a call
        whose arguments Vertex streams."""
        if not isinstance(call, dict):
            raise protocol_error("upstream functionCall is not a JSON object")
        self.saw_text = True
        name = call.get("name")
        streamed = self._open
        if isinstance(name, str) and name:
            if streamed is not None:
                self._complete_open()
            if call.get("willContinue") is not True and "partialArgs" not in call:
                self._complete(name, call.get("id"), call.get("args"))
                return
            streamed = self._open = _StreamedCall(name, call.get("id"), call.get("args"))
        elif streamed is None:
            if call:
                raise protocol_error("upstream sent function arguments outside a function call")
            return  # an empty functionCall with no call open: nothing to end
        partial = call.get("partialArgs")
        if partial is not None and self._want_tools:  # else nothing is kept, or bounded
            self._partial_args(streamed, partial)
        if call.get("willContinue") is not True:
            self._complete_open()

    def _partial_args(self, call: _StreamedCall, partial: Any) -> None:
        if not isinstance(partial, list):
            raise protocol_error("upstream partialArgs is not a list")
        for arg in partial:
            if not isinstance(arg, dict):
                raise protocol_error("upstream partial argument is not a JSON object")
            path = arg.get("jsonPath")
            if not isinstance(path, str):
                raise protocol_error("upstream sent a function argument without a jsonPath")
            steps = _path(path)
            append = path in call.continuing
            if "stringValue" in arg:
                value = arg["stringValue"]
                if not isinstance(value, str):
                    raise protocol_error("upstream stringValue is not a string")
                if arg.get("willContinue") is True:
                    call.continuing.add(path)
                else:
                    call.continuing.discard(path)
                call.size += byte_len(value) + len(path)
            else:
                call.continuing.discard(path)
                value = (
                    arg.get("numberValue")
                    if "numberValue" in arg
                    else arg.get("boolValue")
                    if "boolValue" in arg
                    else None
                )
                append = False
                call.size += len(path) + 8
            if call.size > self._limits.max_tool_args_bytes:
                raise self._too_large()
            _set(call.args, steps, value, append)

    def _complete_open(self) -> None:
        call = self._open
        assert call is not None
        self._open = None
        self._complete(call.name, call.call_id, call.args)

    def _complete(self, name: str, call_id: Any, args: Any) -> None:
        """Push one complete call: `args` as sent (an object; `{}` when there are none),
        anything else as `arguments_raw`."""
        number = self._count
        self._count += 1
        if not self._want_tools:
            return
        if not (isinstance(call_id, str) and call_id):
            call_id = f"call_{number}"
        done: dict[str, Any]
        if args is None:
            done = {"call_id": call_id, "name": name, "arguments": {}}
        elif isinstance(args, dict):
            if len(orjson.dumps(args)) > self._limits.max_tool_args_bytes:
                raise self._too_large()
            done = {"call_id": call_id, "name": name, "arguments": args}
        else:
            raw = args if isinstance(args, str) else orjson.dumps(args).decode()
            if byte_len(raw) > self._limits.max_tool_args_bytes:
                raise self._too_large()
            done = parsed_call(call_id, name, raw)
        self._calls.append(done)
        self._sink.push_tool_call(done)

    def _too_large(self) -> UpstreamFailure:
        return protocol_error(
            f"upstream tool call arguments exceeded {self._limits.max_tool_args_bytes} bytes"
        )

    # -- hosted tools: code execution and Google Search grounding

    def _executable_code(self, code: dict[str, Any]) -> None:
        self.saw_text = True
        self._flush_code()
        text = code.get("code")
        self._code = text if isinstance(text, str) else ""

    def _code_result(self, result: dict[str, Any]) -> None:
        self.saw_text = True
        if not self._want_progress:
            self._code = None
            return
        step: dict[str, Any] = {"kind": "code"}
        if self._code is not None:
            step["code"] = self._code
            self._code = None
        output = result.get("output")
        step["result"] = output if isinstance(output, str) else ""
        self._sink.push_progress(step)

    def _flush_code(self) -> None:
        """Code whose result never came is a step of its own."""
        if self._code is not None:
            if self._want_progress:
                self._sink.push_progress({"kind": "code", "code": self._code})
            self._code = None

    def _grounding(self, grounding: dict[str, Any]) -> None:
        if self._sources is None and not self._want_progress:
            return
        chunks = grounding.get("groundingChunks")
        webs = (
            [c.get("web") if isinstance(c, dict) else None for c in chunks]
            if isinstance(chunks, list)
            else []
        )
        if self._want_progress:
            queries = grounding.get("webSearchQueries")
            new = (
                [q for q in dict.fromkeys(queries) if isinstance(q, str) and q]
                if isinstance(queries, list)
                else []
            )
            new = [q for q in new if q not in self._queries]
            if new:
                self._queries.update(new)
                results = []
                for web in webs:
                    if isinstance(web, dict) and isinstance(web.get("uri"), str) and web["uri"]:
                        title = web.get("title")
                        page = {"url": web["uri"]}
                        if isinstance(title, str) and title:
                            page["title"] = title
                        results.append(page)
                self._sink.push_progress({"kind": "search", "queries": new, "results": results})
        if self._sources is None or not webs:
            return
        cited: set[int] | None = None
        supports = grounding.get("groundingSupports")
        if isinstance(supports, list) and supports:
            cited = set()
            for support in supports:
                indices = (
                    support.get("groundingChunkIndices") if isinstance(support, dict) else None
                )
                if isinstance(indices, list):
                    cited.update(i for i in indices if isinstance(i, int))
        found = []
        for i, web in enumerate(webs):
            if isinstance(web, dict) and (cited is None or i in cited):
                source = self._sources.reveal(web.get("uri"), web)
                if source is not None:
                    found.append(source)
        if found:
            self._sink.push_sources(found)

    # -- the end

    def _finish(self, finish: Any) -> None:
        normal = None
        if isinstance(finish, str):
            normal = _FINISH.get(finish) or normalise_finish(finish)
        self._finish_as(finish, normal)

    def _finish_as(self, raw: Any, normal: str | None) -> None:
        """The answer is over: an open call is complete, code waiting for a result is a step."""
        self._saw_finish = True
        if self._open is not None:
            self._complete_open()
        self._flush_code()
        if isinstance(raw, str):
            self.finish_raw = raw
        if normal == "stop" and self._count:
            normal = "tool_calls"  # Gemini says STOP when it asks for function calls
        if normal is not None:
            self.meta["finish_reason"] = normal

    def _close(self) -> None:
        """`done`'s `reasoning` and `tool_calls` for a client that asked for them (left out
        when there is none)."""
        if self._closed:
            return
        self._closed = True
        self._record_parts()


# --------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------

#: OpenAI-style `reasoning_effort` -> Gemini `thinkingBudget` (tokens), as Google's own
#: OpenAI-compatible endpoint maps it (none 0, low 1K, medium 8K, high 24K; minimal is ours).
THINKING_BUDGETS: Final[Mapping[str, int]] = {
    "none": 0,
    "minimal": 512,
    "low": 1024,
    "medium": 8192,
    "high": 24576,
}
#: Options copied into `generationConfig` under Gemini's name.
_CONFIG_FIELDS: Final = (
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("top_k", "topK"),
    ("max_tokens", "maxOutputTokens"),
    ("seed", "seed"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
)
_TOOL_MODES: Final[Mapping[str, str]] = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
#: File extensions -> MIME type for a `fileData` part (the upstream fetches the file).
_MIME_TYPES: Final[Mapping[str, str]] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "heic": "image/heic",
    "heif": "image/heif",
    "pdf": "application/pdf",
}


def _image_part(url: Any) -> dict[str, Any] | None:
    """An `image_url` as `inlineData` (a data: URL) or `fileData` (any other URL)."""
    if not isinstance(url, str) or not url:
        return None
    if url[:5].lower() == "data:":
        head, comma, payload = url[5:].partition(",")
        if not comma:
            return None
        mime, _, params = head.partition(";")
        if params.lower().endswith("base64"):
            data = payload
        else:
            data = base64.b64encode(unquote_to_bytes(payload)).decode()
        return {"inlineData": {"mimeType": mime or "application/octet-stream", "data": data}}
    file: dict[str, Any] = {"fileUri": url}
    extension = url.split("?", 1)[0].rsplit(".", 1)[-1].lower()
    if extension in _MIME_TYPES:
        file["mimeType"] = _MIME_TYPES[extension]
    return {"fileData": file}


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as Gemini parts: text (empty text left out: Gemini refuses it) and
    images; other part types are dropped."""
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    if isinstance(content, list):
        for item in content:
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "text":
                text = item.get("text")
                if isinstance(text, str) and text:
                    parts.append({"text": text})
            elif kind == "image_url":
                image = item.get("image_url")
                part = _image_part(image.get("url") if isinstance(image, dict) else image)
                if part is not None:
                    parts.append(part)
    return parts


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _call_args(raw: Any) -> dict[str, Any]:
    """A replayed call's arguments (a JSON string) as the object Gemini wants; a string that is
    not an object is kept under `arguments`."""
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": raw}


def _tool_response(content: Any) -> dict[str, Any]:
    """A tool result as `functionResponse.response`: the content when it is a JSON object,
    else `{"result": content}`."""
    text = _text_of(content)
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"result": text}


def _add_turn(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    """Append a turn, merged into the previous one when it has the same role (Gemini wants
    user and model turns to alternate); a turn without parts is left out."""
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def gemini_contents(
    messages: tuple[dict[str, Any], ...],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(`contents`, `systemInstruction` parts) of a conversation in the protocol's chat shapes."""
    contents: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> the function's name
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            text = _text_of(content)
            if text:
                system.append({"text": text})
        elif role == "assistant":
            parts = _content_parts(content)
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                name = function.get("name", "")
                names[call.get("id", "")] = name
                parts.append(
                    {
                        "functionCall": {
                            "name": name,
                            "args": _call_args(function.get("arguments")),
                        },
                        # The protocol does not carry Gemini's signatures: use the documented
                        # sentinel, without which Gemini 3 refuses the replayed call.
                        "thoughtSignature": SKIP_SIGNATURE,
                    }
                )
            _add_turn(contents, "model", parts)
        elif role == "tool":
            call_id = message.get("tool_call_id", "")
            # Gemini matches a response to its call by name; an id no earlier call made is the
            # best name left.
            name = names.get(call_id, call_id)
            response = {"name": name, "response": _tool_response(content)}
            _add_turn(contents, "user", [{"functionResponse": response}])
        else:
            _add_turn(contents, "user", _content_parts(content))
    return contents, system


def _tools(options: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    declared = options.get("tools")
    if isinstance(declared, list) and declared:
        functions = []
        for tool in declared:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict):
                continue
            entry: dict[str, Any] = {"name": function.get("name")}
            if function.get("description"):
                entry["description"] = function["description"]
            if function.get("parameters"):
                # JSON Schema as OpenAI takes it; `parameters` would want Gemini's OpenAPI
                # subset, which refuses e.g. additionalProperties.
                entry["parametersJsonSchema"] = function["parameters"]
            functions.append(entry)
        if functions:
            tools.append({"functionDeclarations": functions})
    if isinstance(options.get("web_search_options"), dict):
        tools.append({"googleSearch": {}})
    return tools


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"functionCallingConfig": {"mode": _TOOL_MODES[choice]}}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        config = {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
        return {"functionCallingConfig": config}
    return None


def generation_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """`generationConfig` from the start's options (docs/upstreams.md, "gemini")."""
    config: dict[str, Any] = {}
    for option, field in _CONFIG_FIELDS:
        value = options.get(option)
        if value is not None:
            config[field] = value
    stop = options.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = stop
    response_format = options.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if kind == "json_schema" and isinstance(spec, dict) else None
        if isinstance(schema, dict):
            # JSON Schema as given (`responseSchema` takes only Gemini's OpenAPI subset).
            config["responseJsonSchema"] = schema
    effort = options.get("reasoning_effort")
    if isinstance(effort, str) and effort in THINKING_BUDGETS:
        budget = THINKING_BUDGETS[effort]
        # Thoughts are asked for only with an effort: the request cannot know whether the
        # client wants reasoning parts (Dialect.request has no `wants`).
        config["thinkingConfig"] = {"includeThoughts": budget > 0, "thinkingBudget": budget}
    return config


def gemini_url(url: str, model: str) -> str:
    """The stream URL for `model` under the configured base (`.../v1beta`). The model is the
    client's: quoted whole, so it can never change the path; a leading `models/` (the API's
    resource name) is taken off."""
    name = model.removeprefix("models/")
    return f"{url.rstrip('/')}/models/{quote(name, safe='')}:streamGenerateContent?alt=sse"


class GeminiDialect(Dialect):
    """Google Gemini (`generativelanguage.googleapis.com/v1beta`) and Vertex AI (base up to
    `.../publishers/google`), streamed as SSE."""

    name: ClassVar[str] = "gemini"
    translator: ClassVar[type[Translator]] = GeminiTranslator

    def request(
        self,
        url: str,
        model: str,
        messages: tuple[dict[str, Any], ...],
        options: Mapping[str, Any],
        api_key: str | None,
        defaults: RequestDefaults,
    ) -> UpstreamRequest:
        contents, system = gemini_contents(messages)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        config = generation_config(options)
        if config:
            body["generationConfig"] = config
        tools = _tools(options)
        if tools:
            body["tools"] = tools
        tool_config = _tool_config(options.get("tool_choice"))
        if tool_config is not None:
            body["toolConfig"] = tool_config
        headers = {"x-goog-api-key": api_key} if api_key else {}
        return UpstreamRequest(gemini_url(url, model), headers, body)
