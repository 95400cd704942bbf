"""The mock's Gemini format (gateway/mock/formats/gemini.py): its streams, read back through the
gateway's own `gemini` translator, carry the text and parts the mock meant; its routes, request
reading, key and error bodies are the API's."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.core.dialects import RequestDefaults, UpstreamFailure, parse_error_body
from gateway.core.dialects.gemini import GeminiDialect, GeminiTranslator
from gateway.core.parts import KNOWN_PARTS
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder
from gateway.mock.answers import choose_answer, text_chunks
from gateway.mock.formats import Emit, StreamSpec, plan_stream
from gateway.mock.formats.base import BadRequest
from gateway.mock.formats.gemini import _GeminiFormatter
from gateway.mock.knobs import parse_directive
from gateway.mock.script import build_parts, reasoning_text, source_list, tool_calls
from gateway.mock.server import MockUpstream
from tests.mock.conftest import CRLF, datas, url

SKY = "Why is the sky blue?"
SKY_ANSWER = choose_answer(SKY)
MODEL = "gemini-2.5-pro"
KEY = {"x-goog-api-key": "AIza-test"}


class Sink:
    """A PartSink that keeps everything in arrival order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def push_reasoning(self, text: str) -> None:
        self.log.append(("reasoning", text))

    def push_sources(self, sources: list[dict[str, Any]]) -> None:
        self.log.append(("sources", sources))

    def push_tool_call(self, call: dict[str, Any]) -> None:
        self.log.append(("tool_call", call))

    def push_progress(self, step: dict[str, Any]) -> None:
        self.log.append(("progress", step))

    def of(self, kind: str) -> list[Any]:
        return [value for k, value in self.log if k == kind]


def read_back(raw: bytes) -> tuple[str, GeminiTranslator, Sink]:
    """What the gateway's translator makes of a body (every part asked for), EOF included."""
    sink = Sink()
    translator = GeminiTranslator(KNOWN_PARTS, sink)
    out: list[str] = []
    for event in SSEDecoder().feed(raw):
        piece = translator.feed(event)
        if piece is not None:
            out.append(piece)
            sink.log.append(("text", piece))
    translator.end_of_stream()
    return "".join(out), translator, sink


def feed_all(raw: bytes, texts: list[str]) -> None:
    """Feed a body to a fresh translator, collecting its text, until it raises."""
    translator = GeminiTranslator(KNOWN_PARTS, Sink())
    for event in SSEDecoder().feed(raw):
        piece = translator.feed(event)
        if piece:
            texts.append(piece)


def responses(raw: bytes) -> list[dict[str, Any]]:
    """The JSON of every event of a complete CRLF body."""
    return [orjson.loads(d) for d in datas(raw, CRLF)]


def gemini_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def stream_path(model: str = MODEL) -> str:
    return f"/gemini/models/{model}:streamGenerateContent?alt=sse"


async def fetch(
    session: aiohttp.ClientSession,
    mock: MockUpstream,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, bytes]:
    async with session.post(
        url(mock, path),
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **(headers or KEY)},
    ) as resp:
        return resp.status, resp.headers, await resp.read()


async def stream(
    session: aiohttp.ClientSession, mock: MockUpstream, knobs: str, path: str | None = None
) -> tuple[bytes, str]:
    """A streamed answer's body and its request id (the scripted calls' seed)."""
    status, headers, raw = await fetch(
        session, mock, path or stream_path(), gemini_body(f"{SKY} [[mock {knobs}]]")
    )
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    return raw, headers["X-Request-Id"]


# --------------------------------------------------------------------------------------------
# Plain text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (stream_path(), MODEL),
        (f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", MODEL),
        (
            f"/v1/projects/p/locations/us-central1/publishers/google/models/{MODEL}"
            ":streamGenerateContent?alt=sse",
            MODEL,
        ),
        ("/gemini", "gemini-2.5-flash"),
    ],
)
async def test_plain_stream_has_the_real_wire_shape(
    mock: MockUpstream, session: aiohttp.ClientSession, path: str, model: str
) -> None:
    """CRLF data events without names or [DONE], each a whole response with the path's model,
    one responseId and the running usage; the last has an empty signed text part and
    finishReason STOP; the translator reads back the answer, the usage and `stop`."""
    raw, request_id = await stream(session, mock, "chunks=3", path)
    assert b"\n\n" not in raw
    assert b"[DONE]" not in raw
    assert b"event:" not in raw
    got = responses(raw)
    pieces = text_chunks(SKY_ANSWER.text, 3)
    assert len(got) == 4
    for i, event in enumerate(got):
        assert event["modelVersion"] == model
        assert event["responseId"] == request_id
        (candidate,) = event["candidates"]
        assert candidate["index"] == 0
        assert candidate["content"]["role"] == "model"
        usage = event["usageMetadata"]
        assert usage["candidatesTokenCount"] == min(i + 1, 3)
        assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert [e["candidates"][0]["content"]["parts"] for e in got[:3]] == [
        [{"text": p}] for p in pieces
    ]
    last = got[-1]["candidates"][0]
    assert last["finishReason"] == "STOP"
    assert last["content"]["parts"][0]["text"] == ""
    assert last["content"]["parts"][0]["thoughtSignature"]
    assert all("finishReason" not in e["candidates"][0] for e in got[:3])
    text, translator, sink = read_back(raw)
    assert text == "".join(pieces)
    assert sink.log == [("text", p) for p in pieces]
    assert translator.meta == {"usage": got[-1]["usageMetadata"], "finish_reason": "stop"}
    rec = mock.records[-1]
    assert (rec.status, rec.chunks_sent, rec.outcome) == (200, 3, "completed")


async def test_finish_length_is_max_tokens_and_finish_zero_is_cut_off(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """finish=length ends with MAX_TOKENS (`length`); finish=0 sends no finishReason, which the
    gateway takes for a stream cut off."""
    raw, _ = await stream(session, mock, "chunks=2 finish=length")
    assert responses(raw)[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert read_back(raw)[1].meta["finish_reason"] == "length"
    raw, _ = await stream(session, mock, "chunks=2 finish=0")
    assert all("finishReason" not in e["candidates"][0] for e in responses(raw))
    with pytest.raises(UpstreamFailure) as info:
        read_back(raw)
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


# --------------------------------------------------------------------------------------------
# Typed parts
# --------------------------------------------------------------------------------------------


async def test_reasoning_is_thought_parts_before_the_text(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """reasoning=thought: `thought: true` text parts first, counted in thoughtsTokenCount; the
    gateway relays them as reasoning, apart from the answer."""
    raw, _ = await stream(session, mock, "chunks=2 reasoning=thought")
    got = responses(raw)
    thoughts = [e for e in got if e["candidates"][0]["content"]["parts"][0].get("thought")]
    assert thoughts == got[: len(thoughts)]
    assert got[-1]["usageMetadata"]["thoughtsTokenCount"] == len(thoughts)
    text, translator, sink = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 2))
    assert translator.meta["reasoning"] == reasoning_text(SKY_ANSWER)
    kinds = [k for k, _ in sink.log]
    assert kinds == ["reasoning"] * len(thoughts) + ["text", "text"]


@pytest.mark.parametrize("kind", ["1", "2", "no_index"])
async def test_tools_are_whole_function_calls(
    mock: MockUpstream, session: aiohttp.ClientSession, kind: str
) -> None:
    """tools=N: each call whole in a functionCall part (args an object, a signature on the
    first), no text, STOP; no_index sends them together in one event; the gateway relays them
    as tool calls numbered call_<n>, ending with `tool_calls`."""
    raw, request_id = await stream(session, mock, f"tools={kind}")
    _, knobs = parse_directive(f"[[mock tools={kind}]]")
    expected = tool_calls(knobs, request_id)
    got = responses(raw)
    call_events = [e for e in got if "functionCall" in e["candidates"][0]["content"]["parts"][0]]
    assert len(call_events) == (1 if kind == "no_index" else len(expected))
    parts = [p for e in call_events for p in e["candidates"][0]["content"]["parts"]]
    assert [p["functionCall"] for p in parts] == [
        {"name": c.name, "args": orjson.loads(c.arguments)} for c in expected
    ]
    assert ["thoughtSignature" in p for p in parts] == [i == 0 for i in range(len(parts))]
    assert got[-1]["candidates"][0]["finishReason"] == "STOP"
    text, translator, sink = read_back(raw)
    assert text == ""
    assert sink.of("tool_call") == [
        {"call_id": f"call_{i}", "name": c.name, "arguments": orjson.loads(c.arguments)}
        for i, c in enumerate(expected)
    ]
    assert translator.meta["finish_reason"] == "tool_calls"


async def test_bad_json_tool_arguments_come_as_a_string(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """tools=bad_json: the broken arguments are sent as a string `args` (a malformed upstream),
    which the gateway relays as `arguments_raw`."""
    raw, request_id = await stream(session, mock, "tools=bad_json")
    (call,) = tool_calls(parse_directive("[[mock tools=bad_json]]")[1], request_id)
    _, _, sink = read_back(raw)
    assert sink.of("tool_call") == [
        {"call_id": "call_0", "name": call.name, "arguments_raw": call.arguments}
    ]


async def test_sources_are_grounding_metadata_on_the_last_event(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """sources=N: the last event carries the search's groundingMetadata with N web chunks, each
    cited; the gateway relays a search step and the N sources in order."""
    raw, _ = await stream(session, mock, "chunks=2 sources=3")
    got = responses(raw)
    assert all("groundingMetadata" not in e["candidates"][0] for e in got[:-1])
    grounding = got[-1]["candidates"][0]["groundingMetadata"]
    urls = [s.url for s in source_list(SKY_ANSWER, 3)]
    assert [c["web"]["uri"] for c in grounding["groundingChunks"]] == urls
    assert sorted(
        i for s in grounding["groundingSupports"] for i in s["groundingChunkIndices"]
    ) == [
        0,
        1,
        2,
    ]
    assert grounding["webSearchQueries"]
    _, _, sink = read_back(raw)
    (step,) = sink.of("progress")
    assert step["kind"] == "search"
    assert step["queries"] == grounding["webSearchQueries"]
    sources = [s for batch in sink.of("sources") for s in batch]
    assert [(s["index"], s["url"]) for s in sources] == list(enumerate(urls, 1))


async def test_grown_sources_come_one_more_per_text_event(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """sources=grow:N: each text event carries the grounding so far, one chunk more each time;
    the gateway relays each source once, as it appears."""
    raw, _ = await stream(session, mock, "chunks=3 sources=grow:2")
    got = responses(raw)
    counts = [len(e["candidates"][0]["groundingMetadata"]["groundingChunks"]) for e in got]
    assert counts == [1, 2, 2, 2]
    _, _, sink = read_back(raw)
    assert [len(batch) for batch in sink.of("sources")] == [1, 1]


async def test_parts_the_api_has_not_are_refused_in_googles_shape(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """A knob for a part Gemini cannot carry is a 400 in Google's error shape naming the knob."""
    for knobs in ("reasoning=think", "refusal=1", "choices=2", "concise=1"):
        status, headers, raw = await fetch(
            session, mock, stream_path(), gemini_body(f"hi [[mock {knobs}]]")
        )
        assert status == 400
        error = orjson.loads(raw)["error"]
        assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
        assert "applies to" in error["message"]
        field = error["details"][0]["fieldViolations"][0]["field"]
        assert field == knobs.partition("=")[0]
        assert parse_error_body(400, headers["Content-Type"], raw).endswith(error["message"])


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


async def test_fault_error_is_an_overloaded_error_event(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=error: after K pieces a data event `{"error": {code 503, UNAVAILABLE}}`, then the
    end: a retryable upstream_error after the text already read."""
    raw, _ = await stream(session, mock, "chunks=3 fault=error after=1")
    error = responses(raw)[-1]["error"]
    assert (error["code"], error["status"]) == (503, "UNAVAILABLE")
    texts: list[str] = []
    with pytest.raises(UpstreamFailure) as info:
        feed_all(raw, texts)
    assert texts == text_chunks(SKY_ANSWER.text, 3)[:1]
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.retryable is True
    assert info.value.message.startswith("The model is overloaded")


async def test_fault_malformed_is_a_protocol_error(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=malformed: a response whose JSON is cut short."""
    raw, _ = await stream(session, mock, "chunks=3 fault=malformed after=1")
    with pytest.raises(UpstreamFailure) as info:
        read_back(raw)
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


async def test_fault_giant_is_one_valid_event_of_the_asked_size(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """fault=giant: one valid response whose data is the asked size; the answer is unchanged."""
    raw, _ = await stream(session, mock, "chunks=2 fault=giant after=1 size=100000")
    (giant,) = [d for d in datas(raw, CRLF) if len(d) > 1000]
    assert len(giant) == 100_000
    assert orjson.loads(giant)["candidates"][0]["content"]["parts"] == [{"text": ""}]
    text, translator, _ = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 2))
    assert translator.finished


# --------------------------------------------------------------------------------------------
# The request side: reading it, the key, error bodies
# --------------------------------------------------------------------------------------------


def test_read_request_reads_contents_system_instruction_and_the_path_model() -> None:
    """systemInstruction is the first turn, `model` turns are the assistant's, function calls
    and responses carry no text; the model is the path's (without `models/`) and the route
    always streams."""
    body = {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}, {"text": "there"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]},
            {"parts": [{"text": "Again"}]},
        ],
    }
    request = _GeminiFormatter.read_request(body, "models/gemini-2.5-pro")
    assert request.turns == (
        ("system", "Be brief."),
        ("user", "Hi there"),
        ("assistant", ""),
        ("user", ""),
        ("user", "Again"),
    )
    assert (request.model, request.stream) == ("gemini-2.5-pro", True)
    assert _GeminiFormatter.read_request(gemini_body("x"), None).model is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "contents"),
        ({"contents": []}, "contents"),
        ({"contents": "hi"}, "contents"),
        ({"contents": ["hi"]}, "contents"),
        ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "contents.role"),
    ],
)
def test_read_request_refuses_what_the_api_refuses(body: dict[str, Any], param: str) -> None:
    """contents must be a non-empty list of Content objects with the roles user or model."""
    with pytest.raises(BadRequest) as info:
        _GeminiFormatter.read_request(body, MODEL)
    assert info.value.param == param


def test_api_key_is_read_from_x_goog_api_key() -> None:
    """The key is the `x-goog-api-key` header (any case); a Bearer token is not Gemini's."""
    assert _GeminiFormatter.api_key(CIMultiDict({"X-Goog-Api-Key": "AIza1"})) == "AIza1"
    assert _GeminiFormatter.api_key({"x-goog-api-key": "AIza2"}) == "AIza2"
    assert _GeminiFormatter.api_key(CIMultiDict({"Authorization": "Bearer AIza1"})) is None


@pytest.mark.parametrize(
    ("status", "google_status"),
    [
        (400, "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
    ],
)
async def test_status_knob_answers_googles_error_body(
    mock: MockUpstream, session: aiohttp.ClientSession, status: int, google_status: str
) -> None:
    """status=N answers `{"error": {"code", "message", "status"}}` with Google's status for N,
    which the gateway describes by its message."""
    got, headers, raw = await fetch(
        session, mock, stream_path(), gemini_body(f"hi [[mock status={status}]]")
    )
    assert got == status
    error = orjson.loads(raw)["error"]
    assert (error["code"], error["status"]) == (status, google_status)
    assert parse_error_body(status, headers["Content-Type"], raw) == (
        f"upstream answered HTTP {status}: {error['message']}"
    )


async def test_require_key_checks_x_goog_api_key(session: aiohttp.ClientSession) -> None:
    """With require_key, the Gemini routes check `x-goog-api-key`."""
    async with MockUpstream(default_delay_ms=0, require_key="AIza-test") as guarded:
        bearer = {"Authorization": "Bearer AIza-test"}
        status, _, _ = await fetch(session, guarded, stream_path(), gemini_body("hi"), bearer)
        assert status == 401
        status, _, _ = await fetch(session, guarded, stream_path(), gemini_body("hi"), KEY)
        assert status == 200


async def test_the_gateways_own_request_is_served(
    mock: MockUpstream, session: aiohttp.ClientSession
) -> None:
    """The `gemini` dialect's request against the offline base (`<mock>/gemini`): its URL,
    key header and body are what the mock serves, and the answer reads back."""
    request = GeminiDialect().request(
        url(mock, "/gemini"),
        MODEL,
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"{SKY} [[mock chunks=4 reasoning=thought]]"},
        ),
        {"reasoning_effort": "low", "temperature": 1, "max_tokens": 100},
        "AIza-test",
        RequestDefaults(),
    )
    async with session.post(
        request.url, data=orjson.dumps(request.body), headers=dict(request.headers)
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    text, translator, _ = read_back(raw)
    assert text == "".join(text_chunks(SKY_ANSWER.text, 4))
    assert translator.meta["reasoning"] == reasoning_text(SKY_ANSWER)
    assert responses(raw)[0]["modelVersion"] == MODEL
    rec = mock.records[-1]
    assert rec.body == request.body
    assert rec.path == f"/gemini/models/{MODEL}:streamGenerateContent"


# --------------------------------------------------------------------------------------------
# Pure: plans
# --------------------------------------------------------------------------------------------


def test_argument_fragments_render_nothing_after_the_whole_call() -> None:
    """A scripted call's argument fragments write no bytes: Gemini sent the call whole at its
    start (the plan still has a step per fragment, so after=K counts them)."""
    _, knobs = parse_directive("[[mock tools=1]]")
    spec = StreamSpec(
        dialect="gemini",
        model=MODEL,
        answer=SKY_ANSWER,
        pieces=(),
        prompt_tokens=5,
        knobs=knobs,
        request_id="rid",
        parts=build_parts(SKY_ANSWER, knobs, (), "rid"),
    )
    steps = [s for s in plan_stream(spec) if isinstance(s, Emit)]
    assert steps[0].data.startswith(b'data: {"candidates":[{"content":{"parts":[{"functionCall"')
    assert all(s.data == b"" for s in steps[1:-1])
    assert b"STOP" in steps[-1].data
