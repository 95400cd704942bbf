"""Upstream dialects: SSE events to text deltas and outcomes (pure), with recorded shapes."""

from __future__ import annotations

from itertools import combinations, pairwise
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.dialects import (
    DIALECTS,
    EventsTranslator,
    OpenAITranslator,
    PerplexityTranslator,
    RequestDefaults,
    ThinkSplitter,
    Translator,
    UpstreamFailure,
    parse_error_body,
    progress_step,
    status_retryable,
    translator_for,
)
from gateway.core.parts import FINISH_REASONS, KNOWN_PARTS, PART_KINDS, STEP_KINDS, PartLimits
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder, SSEEvent


def ev(data: Any, event: str = "message") -> SSEEvent:
    return SSEEvent(event, data if isinstance(data, str) else orjson.dumps(data).decode(), None)


def run(translator: Translator, events: list[SSEEvent]) -> list[str]:
    out = []
    for e in events:
        text = translator.feed(e)
        if text is not None:
            out.append(text)
        if translator.finished:
            break
    return out


def pplx_chunk(content: str, so_far: str, tokens: int, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "8c1596dd",
        "model": "sonar",
        "created": 1741689451,
        "usage": {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens},
        "citations": ["https://a.example/1", "https://b.example/2"],
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": so_far},
                "delta": {"role": "assistant", "content": content},
            }
        ],
    }


def test_perplexity_recorded_shape_crlf_no_done() -> None:
    """A captured-shape Perplexity stream (CRLF, fat chunks, no [DONE]) relays deltas, ends at EOF
    and keeps the last cumulative usage and citations."""
    words = ["Why", " did", " the", " sky"]
    body = b""
    so_far = ""
    for i, w in enumerate(words):
        so_far += w
        body += b"data: " + orjson.dumps(pplx_chunk(w, so_far, 2 * i + 1)) + b"\r\n\r\n"
    final = pplx_chunk("", so_far, 9, "stop")
    final["search_results"] = [{"title": "A", "url": "https://a.example/1"}]
    body += b"data: " + orjson.dumps(final) + b"\r\n\r\n"
    decoder, tr = SSEDecoder(), PerplexityTranslator()
    texts: list[str] = []
    for i in range(0, len(body), 7):  # arbitrary network chunking
        texts += run(tr, decoder.feed(body[i : i + 7]))
    assert not tr.finished
    tr.end_of_stream()
    assert tr.finished
    assert "".join(texts) == "Why did the sky"
    assert tr.meta["usage"]["completion_tokens"] == 9
    assert tr.meta["citations"] == ["https://a.example/1", "https://b.example/2"]
    assert tr.meta["search_results"][0]["title"] == "A"
    assert tr.meta["finish_reason"] == "stop"


def test_perplexity_eof_without_finish_reason_is_done() -> None:
    """Perplexity's clean EOF is its end marker even when no finish_reason was sent."""
    tr = PerplexityTranslator()
    assert run(tr, [ev(pplx_chunk("Hi", "Hi", 1))]) == ["Hi"]
    tr.end_of_stream()
    assert tr.finished
    assert "finish_reason" not in tr.meta


def test_perplexity_done_marker_is_accepted() -> None:
    """sonar-deep-research's `[DONE]` ends the stream too."""
    tr = PerplexityTranslator()
    run(tr, [ev(pplx_chunk("a", "a", 1)), ev("[DONE]")])
    assert tr.finished


def test_perplexity_empty_stream_is_protocol_error() -> None:
    """A 200 that carried no event at all is not an answer."""
    with pytest.raises(UpstreamFailure) as info:
        PerplexityTranslator().end_of_stream()
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def openai_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_openai_stream_with_usage_chunk_and_done() -> None:
    """OpenAI: role chunk, content deltas, finish chunk, usage chunk with no choices, [DONE]."""
    tr = OpenAITranslator()
    events = [
        ev(openai_chunk({"role": "assistant", "content": ""})),
        ev(openai_chunk({"content": "Hello"})),
        ev(openai_chunk({"content": " there"})),
        ev(openai_chunk({}, "stop")),
        ev({"id": "x", "choices": [], "usage": {"total_tokens": 12}}),
        ev("[DONE]"),
    ]
    assert run(tr, events) == ["Hello", " there"]
    assert tr.finished
    assert tr.meta == {"finish_reason": "stop", "usage": {"total_tokens": 12}}


def test_openai_eof_after_finish_reason_is_done_without_is_interrupted() -> None:
    """A clean EOF is complete only after a finish_reason (upstream-formats.md 0.7)."""
    tr = OpenAITranslator()
    run(tr, [ev(openai_chunk({"content": "a"}, "length"))])
    tr.end_of_stream()
    assert tr.meta["finish_reason"] == "length"
    cut = OpenAITranslator()
    run(cut, [ev(openai_chunk({"content": "a"}))])
    with pytest.raises(UpstreamFailure) as info:
        cut.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


def test_openai_error_event_is_upstream_error() -> None:
    """A `data: {"error": ...}` event mid-stream ends the stream with its message."""
    tr = OpenAITranslator()
    with pytest.raises(UpstreamFailure) as info:
        run(tr, [ev({"error": {"message": "The server had an error", "type": "server_error"}})])
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.message == "The server had an error"
    assert info.value.retryable is True


@pytest.mark.parametrize("data", ['{"choices": [', "[1]", '{"choices": [5]}'])
def test_unparsable_event_is_protocol_error(data: str) -> None:
    """Events that are not the documented JSON end the stream with upstream_protocol_error."""
    with pytest.raises(UpstreamFailure) as info:
        run(OpenAITranslator(), [ev(data)])
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_openai_body_asks_for_usage_perplexity_body_does_not() -> None:
    """The request body carries model, messages, stream and options; only OpenAI gets
    stream_options. The key goes as a Bearer header to the configured URL."""
    msgs = ({"role": "user", "content": "hi"},)
    defaults = RequestDefaults()
    req = DIALECTS["openai"].request("http://u/v1", "m", msgs, {"temperature": 0.1}, "k", defaults)
    assert req.url == "http://u/v1"
    assert req.headers == {"Authorization": "Bearer k"}
    assert req.body == {
        "temperature": 0.1,
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pplx = DIALECTS["perplexity"].request("http://u", "m", msgs, {}, None, defaults)
    assert "stream_options" not in pplx.body
    assert pplx.headers == {}
    events = DIALECTS["events"].request("http://u", "m", msgs, {"stream": False}, None, defaults)
    assert events.body["stream"] is True


def test_events_dialect_named_and_typed_events() -> None:
    """The seed format: type from `event:` or from `type` in the data; done ends the stream."""
    tr = EventsTranslator()
    events = [
        ev({"type": "text_chunk", "text": "Hel"}, "text_chunk"),
        ev({"type": "text_chunk", "text": "lo"}),  # unnamed: type from the data
        ev({"type": "progress"}, "progress"),  # unknown: ignored
        ev({"type": "done", "answer": "Hello", "citations": ["u"], "usage": {"n": 1}}, "done"),
    ]
    assert run(tr, events) == ["Hel", "lo"]
    assert tr.finished
    assert tr.final_text == "Hello"
    assert tr.meta == {"citations": ["u"], "usage": {"n": 1}}


def test_events_dialect_without_done_is_interrupted() -> None:
    """An events stream that ends without `done` is stream_interrupted."""
    tr = EventsTranslator()
    run(tr, [ev({"type": "text_chunk", "text": "a"}, "text_chunk")])
    with pytest.raises(UpstreamFailure) as info:
        tr.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED


def test_events_text_chunk_without_text_is_protocol_error() -> None:
    """A text_chunk whose text is not a string is refused."""
    with pytest.raises(UpstreamFailure) as info:
        run(EventsTranslator(), [ev({"type": "text_chunk"}, "text_chunk")])
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("status", "ctype", "body", "expected"),
    [
        (
            400,
            "application/json",
            b'{"error":{"message":"Invalid model","type":"invalid_model","code":400}}',
            "upstream answered HTTP 400: Invalid model",
        ),
        (
            401,
            "text/html",
            b"<html><title>401 Authorization Required</title>openresty/1.27.4</html>",
            "upstream answered HTTP 401",
        ),
        (
            422,
            "application/json",
            b'{"detail":[{"loc":["body"],"msg":"field required","type":"missing"}]}',
            "upstream answered HTTP 422: field required",
        ),
        (503, "application/json", b"{broken", "upstream answered HTTP 503"),
    ],
)
def test_error_bodies_are_read_defensively(
    status: int, ctype: str, body: bytes, expected: str
) -> None:
    """JSON, FastAPI and HTML error bodies become a short message; HTML is never relayed."""
    assert parse_error_body(status, ctype, body) == expected


def test_retryable_statuses() -> None:
    """429 and 5xx are retryable; 4xx client errors are not."""
    assert [
        s for s in (400, 401, 403, 404, 408, 422, 429, 500, 502, 503) if status_retryable(s)
    ] == [
        408,
        429,
        500,
        502,
        503,
    ]


# -- typed parts (issue 18): the chat-completions dialects' answer text, reasoning, sources, tool
# calls and progress


class Recorder:
    """A PartSink that keeps what it is given, in order, with the answer text interleaved."""

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

    def kinds(self) -> list[str]:
        return [k for k, _ in self.log]


ALL = KNOWN_PARTS


def chat(
    dialect: str = "openai",
    wants: frozenset[str] = ALL,
    limits: PartLimits | None = None,
) -> tuple[OpenAITranslator, Recorder]:
    sink = Recorder()
    tr = translator_for(dialect, wants, sink, limits or PartLimits())
    assert isinstance(tr, OpenAITranslator)
    return tr, sink


def relay(tr: Translator, sink: Recorder, events: list[SSEEvent], eof: bool = True) -> str:
    """Feed events as the upstream feed does (text logged between parts), then a clean EOF;
    the answer text as the client sees it, `done`'s included."""
    text = []
    for e in events:
        delta = tr.feed(e)
        if delta is not None:
            text.append(delta)
            sink.log.append(("text", delta))
        if tr.finished:
            break
    if eof and not tr.finished:
        tr.end_of_stream()
    if tr.final_text is not None:
        text.append(tr.final_text)
    return "".join(text)


def content_events(pieces: list[str], finish: str | None = "stop") -> list[SSEEvent]:
    events = [ev(openai_chunk({"content": p})) for p in pieces]
    if finish is not None:
        events.append(ev(openai_chunk({}, finish)))
    return events


THINK = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4. <think> stays."
THINK_REASONING = "\nThe user wants 2+2. That is 4.\n"
THINK_ANSWER = "The answer is 4. <think> stays."


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in pairwise(bounds) if b > a]


@pytest.mark.parametrize("cut", range(1, len(THINK)))
def test_think_block_split_at_every_boundary(cut: int) -> None:
    """A leading `<think>` block is reasoning wherever the deltas split it (`<th` + `ink>`,
    `</thi` + `nk>`); the answer after it is text, whitespace between them dropped."""
    tr, sink = chat()
    text = relay(tr, sink, content_events([THINK[:cut], THINK[cut:]]))
    assert text == THINK_ANSWER
    assert "".join(sink.of("reasoning")) == THINK_REASONING
    assert tr.meta["reasoning"] == THINK_REASONING


def test_think_block_one_character_per_event() -> None:
    """One character per event: the same split, and no text before the block is over."""
    tr, sink = chat("perplexity")
    text = relay(tr, sink, content_events(list(THINK)))
    assert text == THINK_ANSWER
    assert "".join(sink.of("reasoning")) == THINK_REASONING
    kinds = sink.kinds()
    assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "reasoning")


@settings(max_examples=300, deadline=None)
@given(
    lead=st.sampled_from(["", " ", "\n\n", " \r\n\t"]),
    inner=st.text(st.sampled_from("ab<>/thinkTHINK \n"), max_size=30).filter(
        lambda s: "</think>" not in s
    ),
    answer=st.text(st.sampled_from("xy<>/think \n"), max_size=30),
    data=st.data(),
)
def test_think_split_is_independent_of_chunking(
    lead: str, inner: str, answer: str, data: st.DataObject
) -> None:
    """Any answer `<ws><think>R</think><ws>A` split anywhere gives reasoning R and text A with
    its leading whitespace dropped (hypothesis)."""
    full = f"{lead}<think>{inner}</think>\n{answer}"
    cuts = data.draw(st.lists(st.integers(1, max(1, len(full) - 1)), max_size=12))
    tr, sink = chat()
    text = relay(tr, sink, content_events(split_at(full, cuts)))
    assert text == answer.lstrip()
    assert "".join(sink.of("reasoning")) == inner


@settings(max_examples=200, deadline=None)
@given(
    answer=st.text(st.sampled_from("ab<>/think \n"), min_size=1, max_size=40).filter(
        lambda s: not s.lstrip().startswith("<think>")
    ),
    data=st.data(),
)
def test_answer_without_a_block_is_unchanged(answer: str, data: st.DataObject) -> None:
    """An answer that does not open with `<think>` is relayed exactly as sent, whitespace, a
    lone `<`, a partial `<thi` and later `<think>` tags included, however it is chunked."""
    cuts = data.draw(st.lists(st.integers(1, max(1, len(answer) - 1)), max_size=12))
    for finish in ("stop", None):  # ended by a finish_reason, or by Perplexity's EOF
        tr, sink = chat("perplexity")
        assert relay(tr, sink, content_events(split_at(answer, cuts), finish)) == answer
        assert sink.of("reasoning") == []


def test_unclosed_think_block_is_all_reasoning() -> None:
    """A block never closed is all reasoning (even a held `</thi`): the answer text is empty and
    the stream ends as the upstream said."""
    tr, sink = chat()
    text = relay(tr, sink, content_events(["<think>I keep thinking", " and </thi"], "length"))
    assert text == ""
    assert "".join(sink.of("reasoning")) == "I keep thinking and </thi"
    assert tr.finished
    assert tr.meta["finish_reason"] == "length"


def test_unclosed_think_block_at_perplexity_eof() -> None:
    """Perplexity ending with a clean EOF inside the block: all reasoning, a complete stream."""
    tr, sink = chat("perplexity")
    assert relay(tr, sink, [ev(pplx_chunk("<think>hmm", "<think>hmm", 1))]) == ""
    assert tr.finished
    assert sink.of("reasoning") == ["hmm"]


def test_think_block_dropped_when_reasoning_not_wanted() -> None:
    """Without "reasoning" the block is still removed from the text, and nothing is pushed."""
    tr, sink = chat("perplexity", frozenset())
    assert relay(tr, sink, content_events(list(THINK))) == THINK_ANSWER
    assert sink.kinds() == ["text"] * sink.kinds().count("text")
    assert "reasoning" not in tr.meta


def test_literal_think_later_in_the_answer_is_text() -> None:
    """Only a leading block is reasoning: once the answer has begun, `<think>` is text."""
    tr, sink = chat()
    answer = "Use the <think>...</think> tags like this."
    assert relay(tr, sink, content_events(["Use the <th", "ink>...</think> tags like this."]))
    assert sink.of("reasoning") == []
    tr, sink = chat()
    assert relay(tr, sink, content_events(split_at(answer, [5, 9, 10]))) == answer


def test_think_splitter_state_machine() -> None:
    """The splitter's states: LEAD holds whitespace and a partial tag, OPEN holds a partial
    close tag, PASS returns its input as it is (the translator then drops the splitter)."""
    s = ThinkSplitter()
    assert s.feed("  ") == ("", "")
    assert s.feed("<thi") == ("", "")
    assert s.state == ThinkSplitter.LEAD
    assert s.feed("nk>a</") == ("", "a")
    assert s.state == ThinkSplitter.OPEN
    assert s.feed("think> \n") == ("", "")
    assert s.state == ThinkSplitter.AFTER
    assert s.feed("B") == ("B", "")
    assert s.state == ThinkSplitter.PASS
    assert s.feed(" <think>") == (" <think>", "")
    plain = ThinkSplitter()
    assert plain.feed("\nHi") == ("\nHi", "")
    assert plain.state == ThinkSplitter.PASS
    held = ThinkSplitter()
    assert held.feed(" <t") == ("", "")
    assert held.finish() == (" <t", "")
    tr, _ = chat()
    tr.feed(ev(openai_chunk({"content": "Hi"})))
    assert tr._think is None  # past the decision: the fast path needs no splitter


def test_long_leading_whitespace_gives_up_waiting_for_a_block() -> None:
    """Past 4 KiB of leading whitespace the answer is taken to have no block: the whitespace is
    relayed as it came (a stream of blanks is not held, nor re-scanned, for ever)."""
    tr, sink = chat()
    blanks = [" "] * 5000
    assert relay(tr, sink, content_events([*blanks, "<think>x</think>"])) == " " * 5000 + (
        "<think>x</think>"
    )
    assert sink.of("reasoning") == []


def test_a_delta_with_text_and_parts_gives_both() -> None:
    """A text delta that also carries another key leaves the fast path and loses nothing: text
    with a null reasoning field (DeepSeek's every chunk), text with a tool call."""
    tr, sink = chat()
    events = [
        ev(openai_chunk({"content": "A", "reasoning_content": None})),
        ev(openai_chunk({"role": "assistant", "content": "B", "tool_calls": []})),
        ev(openai_chunk({"content": "C", **tool_delta(0, id="t", name="f")})),
        ev(openai_chunk({"content": None, "reasoning": "R"}, "tool_calls")),
    ]
    assert relay(tr, sink, events) == "ABC"
    assert sink.of("reasoning") == ["R"]
    assert [c["call_id"] for c in sink.of("tool_call")] == ["t"]


def test_reasoning_bytes_are_limited_whether_or_not_wanted() -> None:
    """Reasoning over max_reasoning_bytes (UTF-8 bytes, <think> included) fails the stream
    with upstream_protocol_error, also for a client that did not ask for reasoning."""
    for wants in (ALL, frozenset()):
        tr, _ = chat(wants=wants, limits=PartLimits(max_reasoning_bytes=10))
        tr.feed(ev(openai_chunk({"reasoning_content": "ééééé"})))  # 10 bytes: at the limit
        with pytest.raises(UpstreamFailure) as info:
            tr.feed(ev(openai_chunk({"reasoning_content": "x"})))
        assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR
        tr, _ = chat(wants=wants, limits=PartLimits(max_reasoning_bytes=10))
        with pytest.raises(UpstreamFailure):
            relay(tr, Recorder(), content_events(["<think>0123456789", "a</think>x"]))


@pytest.mark.parametrize(
    "delta",
    [
        {"content": None, "reasoning_content": "We count."},  # DeepSeek, xAI
        {"reasoning": "We count."},  # Groq, vLLM, OpenRouter
        {"reasoning_details": [{"type": "reasoning.text", "text": "We count.", "format": "x"}]},
        {"reasoning_details": [{"type": "reasoning.summary", "summary": "We count."}]},
        {
            "reasoning": "We count.",  # OpenRouter sends both: counted once
            "reasoning_details": [{"type": "reasoning.text", "text": "We count."}],
        },
        {"reasoning_content": "We count.", "reasoning": "We count."},  # vLLM's old + new name
        {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "We count."}]}]},
    ],
)
def test_reasoning_fields_of_each_shape(delta: dict[str, Any]) -> None:
    """Every upstream's reasoning field becomes reasoning, never answer text."""
    tr, sink = chat()
    events = [ev(openai_chunk(delta)), *content_events(["Three."])]
    assert relay(tr, sink, events) == "Three."
    assert sink.of("reasoning") == ["We count."]
    assert tr.meta["reasoning"] == "We count."
    assert sink.kinds() == ["reasoning", "text"]


def test_encrypted_reasoning_details_are_not_text() -> None:
    """OpenRouter's encrypted reasoning has no readable text: nothing is pushed."""
    tr, sink = chat()
    details = [{"type": "reasoning.encrypted", "data": "gAAAA"}]
    assert relay(tr, sink, [ev(openai_chunk({"reasoning_details": details}))], eof=False) == ""
    assert sink.log == []


def test_mistral_content_arrays() -> None:
    """Mistral's content arrays: `text` parts are answer text, `thinking` parts reasoning; a
    plain string content still works in the same stream."""
    tr, sink = chat()
    parts = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "Basic."}]},
        {"type": "text", "text": "2 + 2"},
        {"type": "image_url", "image_url": "ignored"},
    ]
    events = [ev(openai_chunk({"content": parts})), *content_events([" = 4"])]
    assert relay(tr, sink, events) == "2 + 2 = 4"
    assert sink.of("reasoning") == ["Basic."]


def test_reasoning_not_wanted_is_never_pushed_nor_in_done() -> None:
    """Without "reasoning": no push, no `done.reasoning`, and the text is the same."""
    tr, sink = chat(wants=frozenset({"sources", "tools", "progress"}))
    events = [ev(openai_chunk({"reasoning_content": "hmm"})), *content_events(["A"])]
    assert relay(tr, sink, events) == "A"
    assert sink.kinds() == ["text"]
    assert "reasoning" not in tr.meta


def tool_delta(index: int | None, **fields: Any) -> dict[str, Any]:
    call: dict[str, Any] = {} if index is None else {"index": index}
    function = {k: fields.pop(k) for k in ("name", "arguments") if k in fields}
    call.update(fields)
    if function:
        call["function"] = function
    return {"tool_calls": [call]}


def test_parallel_tool_calls_complete_when_the_next_starts() -> None:
    """Arguments in fragments, accumulated by index; call 0 is pushed when call 1 starts, the
    last at the finish; `done.tool_calls` lists both; content may be null."""
    tr, sink = chat()
    events = [
        ev(openai_chunk({"role": "assistant", "content": None})),
        ev(openai_chunk(tool_delta(0, id="call_a", type="function", name="weather"))),
        ev(openai_chunk(tool_delta(0, arguments='{"city": '))),
        ev(openai_chunk(tool_delta(0, arguments='"Paris"}'))),
        ev(openai_chunk(tool_delta(1, id="call_b", type="function", name="stock", arguments=""))),
    ]
    relay(tr, sink, events, eof=False)
    assert sink.of("tool_call") == [
        {"call_id": "call_a", "name": "weather", "arguments": {"city": "Paris"}}
    ]
    relay(tr, sink, [ev(openai_chunk(tool_delta(1, arguments='{"t": "AAPL"}')))], eof=False)
    relay(tr, sink, [ev(openai_chunk({}, "tool_calls")), ev("[DONE]")])
    calls = sink.of("tool_call")
    assert calls[1] == {"call_id": "call_b", "name": "stock", "arguments": {"t": "AAPL"}}
    assert tr.meta["tool_calls"] == calls
    assert tr.meta["finish_reason"] == "tool_calls"


def test_tool_calls_without_index_are_keyed_by_id() -> None:
    """Mistral sends no `index`: a new id is a new call; a fragment without id continues."""
    tr, sink = chat()
    events = [
        ev(openai_chunk(tool_delta(None, id="A", name="f", arguments='{"x"'))),
        ev(openai_chunk(tool_delta(None, arguments=": 1}"))),
        ev(openai_chunk(tool_delta(None, id="B", name="g", arguments="{}"), "tool_calls")),
    ]
    relay(tr, sink, events)
    assert sink.of("tool_call") == [
        {"call_id": "A", "name": "f", "arguments": {"x": 1}},
        {"call_id": "B", "name": "g", "arguments": {}},
    ]


def test_same_index_with_a_new_id_is_a_new_call() -> None:
    """Some OpenAI-compatible servers number every call 0: a different id starts a new one."""
    tr, sink = chat()
    events = [
        ev(openai_chunk(tool_delta(0, id="A", name="f", arguments="{}"))),
        ev(openai_chunk(tool_delta(0, id="B", name="g", arguments="{}"), "tool_calls")),
    ]
    relay(tr, sink, events)
    assert [c["call_id"] for c in sink.of("tool_call")] == ["A", "B"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ("", {"arguments": {}}),  # a tool without parameters
        ("  ", {"arguments": {}}),
        ("{}", {"arguments": {}}),
        ('{"a": [1, 2]}', {"arguments": {"a": [1, 2]}}),
        ('{"filename": "taxes.txt", "lines": ["# TAX', {"arguments_raw": '{"filename": '}),
        ("[1, 2]", {"arguments_raw": "[1, 2]"}),  # JSON, but not an object
        ("null", {"arguments_raw": "null"}),
    ],
)
def test_tool_call_arguments(arguments: str, expected: dict[str, Any]) -> None:
    """Arguments that are a JSON object are parsed; empty ones are `{}`; anything else arrives
    as `arguments_raw`, the string as sent, never dropped."""
    tr, sink = chat()
    delta = tool_delta(0, id="c", name="f", arguments=arguments)
    relay(tr, sink, [ev(openai_chunk(delta, "tool_calls"))])
    (call,) = sink.of("tool_call")
    if "arguments_raw" in expected:
        assert call["arguments_raw"] == arguments
        assert "arguments" not in call
    else:
        assert call["arguments"] == expected["arguments"]


def test_tool_call_completes_at_done_or_eof_without_a_finish() -> None:
    """A call still open when `[DONE]` or a clean Perplexity EOF comes is complete then."""
    tr, sink = chat()
    relay(tr, sink, [ev(openai_chunk(tool_delta(0, id="c", name="f"))), ev("[DONE]")])
    assert sink.of("tool_call") == [{"call_id": "c", "name": "f", "arguments": {}}]
    tr, sink = chat("perplexity")
    relay(tr, sink, [ev(openai_chunk(tool_delta(0, id="c", name="f", arguments='{"q":1}')))])
    assert sink.of("tool_call") == [{"call_id": "c", "name": "f", "arguments": {"q": 1}}]


def test_tool_call_without_id_gets_one_and_legacy_function_call() -> None:
    """A call the upstream sent without an id gets `call_<n>` (its position in the stream), so
    the client can answer it; OpenAI's deprecated `function_call` delta is a call too."""
    tr, sink = chat()
    events = [
        ev(openai_chunk({"function_call": {"name": "f", "arguments": '{"a"'}})),
        ev(openai_chunk({"function_call": {"arguments": ": 2}"}}, "function_call")),
    ]
    relay(tr, sink, events)
    assert sink.of("tool_call") == [{"call_id": "call_0", "name": "f", "arguments": {"a": 2}}]
    assert tr.meta["finish_reason"] == "tool_calls"


def test_tool_call_arguments_are_limited() -> None:
    """One call's arguments over max_tool_args_bytes (UTF-8 bytes) fail the stream with
    upstream_protocol_error; the limit is per call."""
    tr, _ = chat(limits=PartLimits(max_tool_args_bytes=10))
    tr.feed(ev(openai_chunk(tool_delta(0, id="a", name="f", arguments='{"a":"é"}'))))  # 10 B
    tr.feed(ev(openai_chunk(tool_delta(1, id="b", name="g", arguments='{"b":"é"}'))))
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(openai_chunk(tool_delta(1, arguments=" "))))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_tool_call_continued_after_the_next_began_is_refused() -> None:
    """Fragments of call 0 after call 1 began cannot be relayed as one call: refused."""
    tr, _ = chat()
    tr.feed(ev(openai_chunk(tool_delta(0, id="a", name="f", arguments="{"))))
    tr.feed(ev(openai_chunk(tool_delta(1, id="b", name="g", arguments="{}"))))
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev(openai_chunk(tool_delta(0, arguments="}"))))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_tool_calls_not_wanted_are_never_pushed() -> None:
    """Without "tools": no call is kept or pushed, `done` has no tool_calls, the finish
    reason is still relayed."""
    tr, sink = chat(wants=frozenset({"reasoning", "sources", "progress"}))
    events = [ev(openai_chunk(tool_delta(0, id="c", name="f", arguments="{}"), "tool_calls"))]
    assert relay(tr, sink, events) == ""
    assert sink.log == []
    assert tr.meta == {"finish_reason": "tool_calls"}


def pplx(content: str = "", **top: Any) -> dict[str, Any]:
    chunk = {"id": "p", "model": "sonar", "object": "chat.completion.chunk"}
    chunk.update(top)
    chunk["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": content}}]
    return chunk


def test_perplexity_sources_each_url_once_with_citation_indexes() -> None:
    """Cumulative citations repeated on every chunk give each URL once, as soon as revealed,
    numbered by position in `citations`, with search_results fields merged in by URL; URLs only
    in search_results come after the citations; `done`'s metadata is last value wins."""
    results = [
        {"title": "B", "url": "https://b", "date": "2025-01-02", "snippet": "bb", "source": "web"},
        {"title": "X", "url": "https://x"},
        {"title": "A", "url": "https://a", "last_updated": "2025"},
    ]
    tr, sink = chat("perplexity")
    events = [
        ev(pplx("One", citations=["https://a", "https://b"])),
        ev(pplx(" two", citations=["https://a", "https://b"])),
        ev(pplx("[1]", citations=["https://a", "https://b"], search_results=results)),
        ev(pplx("", citations=["https://a", "https://b"], search_results=results)),
    ]
    assert relay(tr, sink, events) == "One two[1]"
    assert sink.of("sources") == [
        [{"index": 1, "url": "https://a"}, {"index": 2, "url": "https://b"}],
        [{"index": 3, "url": "https://x", "title": "X"}],
    ]
    assert tr.meta["citations"] == ["https://a", "https://b"]
    assert tr.meta["search_results"] == results
    tr, sink = chat("perplexity")
    relay(tr, sink, [ev(pplx("x", citations=["https://a", "https://b"], search_results=results))])
    assert sink.of("sources") == [
        [
            {"index": 1, "url": "https://a", "title": "A"},
            {"index": 2, "url": "https://b", "title": "B", "snippet": "bb", "date": "2025-01-02"},
            {"index": 3, "url": "https://x", "title": "X"},
        ]
    ]


def test_citations_that_grow_keep_every_index_stable() -> None:
    """A new citation takes its position unless a URL sent earlier holds that number (then the
    number after every index and citation position seen): no index is ever reused or moved."""
    tr, sink = chat("perplexity")
    events = [
        ev(pplx("a", citations=["https://a"], search_results=[{"url": "https://s"}])),
        ev(pplx("b", citations=["https://a", "https://b", "https://c"])),
        ev(pplx("c", citations=["https://a", "https://b", "https://c", "https://s"])),
    ]
    relay(tr, sink, events)
    sent = [s for batch in sink.of("sources") for s in batch]
    assert [(s["index"], s["url"]) for s in sent] == [
        (1, "https://a"),
        (2, "https://s"),  # only in search_results: after the one citation then known
        (4, "https://b"),  # its position, 2, was taken: after the 3 citations now known
        (3, "https://c"),
    ]
    assert len({s["index"] for s in sent}) == len(sent)


def test_sources_over_the_cap_are_dropped_and_counted_once() -> None:
    """Past max_sources further URLs are dropped, each counted once however often the
    cumulative list repeats it (`sources_dropped`, a metric)."""
    tr, sink = chat("perplexity", limits=PartLimits(max_sources=2))
    cites = ["https://1", "https://2", "https://3"]
    relay(tr, sink, [ev(pplx("a", citations=cites)), ev(pplx("b", citations=[*cites, "u"]))])
    assert [s["url"] for batch in sink.of("sources") for s in batch] == cites[:2]
    assert tr.sources_dropped == 2
    assert tr.meta["citations"] == [*cites, "u"]  # done's metadata is not capped here


def test_url_citation_annotations_are_sources_by_first_appearance() -> None:
    """OpenAI search models' `url_citation` annotations are sources, numbered in order of first
    appearance, each URL once."""
    tr, sink = chat()

    def note(url: str, title: str = "") -> dict[str, Any]:
        return {"type": "url_citation", "url_citation": {"url": url, "title": title}}

    events = [
        ev(openai_chunk({"content": "See", "annotations": [note("https://a", "A")]})),
        ev(openai_chunk({"annotations": [note("https://a"), note("https://b")]})),
        ev(openai_chunk({"annotations": [{"type": "url_citation", "url": "https://c"}]})),
        ev(openai_chunk({"annotations": [{"type": "file_citation", "file_id": "f"}]}, "stop")),
    ]
    assert relay(tr, sink, events) == "See"
    assert sink.of("sources") == [
        [{"index": 1, "url": "https://a", "title": "A"}],
        [{"index": 2, "url": "https://b"}],
        [{"index": 3, "url": "https://c"}],
    ]
    assert sink.kinds()[:2] == ["sources", "text"]  # revealed by the event: before its text


SEARCH_STEP = {
    "thought": "Searching the web for Seattle's weather...",
    "type": "web_search",
    "web_search": {
        "search_keywords": ["Seattle weather", "Seattle forecast"],
        "search_results": [
            {"title": "NWS", "url": "https://nws", "date": "2025-05-26", "snippet": "61F"},
            {"title": "Weather.com", "url": "https://wc"},
        ],
    },
}
FETCH_STEP = {
    "thought": "Reading the forecast page",
    "type": "fetch_url_content",
    "fetch_url_content": {"contents": [{"title": "NWS", "url": "https://nws", "snippet": "x"}]},
}
CODE_STEP = {
    "thought": "Converting",
    "type": "execute_python",
    "execute_python": {"code": "print(61 - 32)", "result": "29"},
}
THOUGHT_STEP = {"thought": "The user wants today's weather.", "type": None}
OTHER_STEP = {"thought": "", "type": "browse_maps"}


def concise(
    kind: str, delta: dict[str, Any], finish: str | None = None, **top: Any
) -> dict[str, Any]:
    """A chunk of Perplexity's `stream_mode: "concise"` (docs: stream-mode guide)."""
    chunk: dict[str, Any] = {"id": "c", "model": "sonar-pro", "object": kind, **top}
    chunk["choices"] = [{"index": 0, "finish_reason": finish, "delta": delta}]
    return chunk


def test_progress_steps_of_each_kind() -> None:
    """Perplexity concise mode's reasoning steps map to progress steps: search (queries,
    results), fetch (urls), code (code, result), thought (text), other (type)."""
    assert progress_step(SEARCH_STEP) == {
        "kind": "search",
        "queries": ["Seattle weather", "Seattle forecast"],
        "results": [
            {"url": "https://nws", "title": "NWS"},
            {"url": "https://wc", "title": "Weather.com"},
        ],
        "text": "Searching the web for Seattle's weather...",
    }
    assert progress_step(FETCH_STEP) == {
        "kind": "fetch",
        "urls": ["https://nws"],
        "text": "Reading the forecast page",
    }
    assert progress_step(CODE_STEP) == {
        "kind": "code",
        "code": "print(61 - 32)",
        "result": "29",
        "text": "Converting",
    }
    assert progress_step(THOUGHT_STEP) == {"kind": "thought", "text": THOUGHT_STEP["thought"]}
    assert progress_step(OTHER_STEP) == {"kind": "other", "type": "browse_maps"}
    assert {progress_step(s)["kind"] for s in (SEARCH_STEP, FETCH_STEP, CODE_STEP)} <= STEP_KINDS


def test_perplexity_concise_stream() -> None:
    """A concise stream: `chat.reasoning` steps as progress (their search results as sources),
    `chat.reasoning.done` repeating the steps in its `message` adds nothing, the answer, then
    `chat.completion.done` ends it with the final citations, search results and usage. The
    citations list the search results in the order the steps found them, so the sources sent
    early carry the numbers the answer's markers use."""
    results = SEARCH_STEP["web_search"]["search_results"]  # type: ignore[index]
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    reasoning_done = concise("chat.reasoning.done", {"content": ""}, search_results=results)
    reasoning_done["usage"] = usage
    reasoning_done["choices"][0]["message"] = {
        "role": "assistant",
        "content": "",
        "reasoning_steps": [SEARCH_STEP, FETCH_STEP, THOUGHT_STEP],
    }
    citations = ["https://nws", "https://wc", "https://new"]
    tr, sink = chat("perplexity")
    events = [
        ev(concise("chat.reasoning", {"content": "", "reasoning_steps": [SEARCH_STEP]})),
        ev(concise("chat.reasoning", {"content": "", "reasoning_steps": [FETCH_STEP]})),
        ev(concise("chat.reasoning", {"content": "", "reasoning_steps": [THOUGHT_STEP]})),
        ev(reasoning_done),
        ev(concise("chat.completion.chunk", {"content": "Mild, 61F[1]"})),
        ev(
            concise(
                "chat.completion.done",
                {"content": ""},
                finish="stop",
                citations=citations,
                search_results=results,
                usage=usage,
            )
        ),
    ]
    assert relay(tr, sink, events) == "Mild, 61F[1]"
    assert [s["kind"] for s in sink.of("progress")] == ["search", "fetch", "thought"]
    sent = [s for batch in sink.of("sources") for s in batch]
    assert [(s["index"], s["url"]) for s in sent] == [
        (1, citations[0]),
        (2, citations[1]),
        (3, citations[2]),
    ]
    assert sent[0] == {
        "index": 1,
        "url": "https://nws",
        "title": "NWS",
        "snippet": "61F",
        "date": "2025-05-26",
    }
    assert sink.kinds() == ["progress", "sources", "progress", "progress", "text", "sources"]
    assert tr.meta["finish_reason"] == "stop"
    assert tr.meta["usage"] == usage
    assert tr.meta["citations"] == citations
    assert tr.meta["search_results"] == results


def test_perplexity_completion_done_ends_the_answer() -> None:
    """`chat.completion.done` ends the answer like a finish_reason: a partial `<th` held at
    the start is relayed as the answer's text then."""
    tr, _ = chat("perplexity")
    events = [
        ev(concise("chat.completion.chunk", {"content": "<th"})),
        ev(concise("chat.completion.done", {"content": ""}, usage={"total_tokens": 3})),
    ]
    texts = [tr.feed(e) for e in events]
    assert texts == [None, "<th"]


def test_refusal_is_answer_text_flagged_in_done() -> None:
    """`delta.refusal` is the answer's text, with `refusal: true` for `done`."""
    tr, sink = chat(wants=frozenset())
    events = [
        ev(openai_chunk({"role": "assistant", "content": None, "refusal": ""})),
        ev(openai_chunk({"refusal": "I'm sorry"})),
        ev(openai_chunk({"refusal": ", I can't."})),
        ev(openai_chunk({}, "stop")),
        ev("[DONE]"),
    ]
    assert relay(tr, sink, events) == "I'm sorry, I can't."
    assert tr.meta == {"finish_reason": "stop", "refusal": True}


def test_only_choice_zero_is_relayed() -> None:
    """An upstream streaming several choices (n > 1) relays choice 0 only: its text and its
    finish_reason, whatever order the choices' chunks come in."""
    tr, sink = chat()

    def choice(index: int, delta: dict[str, Any], finish: str | None = None) -> SSEEvent:
        return ev(
            {"id": "m", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
        )

    events = [
        choice(1, {"content": "B1"}),
        choice(0, {"content": "A1"}),
        choice(2, {"reasoning_content": "other"}),
        choice(1, {"content": "B2"}),
        choice(0, {"content": "A2"}),
        choice(1, {}, "length"),
        choice(0, {}, "stop"),
        ev(
            {
                "id": "m",
                "choices": [
                    {"index": 1, "delta": {"content": "B3"}},
                    {"index": 0, "delta": {"content": "A3"}},
                ],
            }
        ),
        ev("[DONE]"),
    ]
    assert relay(tr, sink, events) == "A1A2A3"
    assert sink.of("reasoning") == []
    assert tr.meta["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("stop", "stop"),
        ("end_turn", "stop"),
        ("eos", "stop"),
        ("STOP", "stop"),
        ("length", "length"),
        ("max_tokens", "length"),
        ("model_length", "length"),
        ("MAX_TOKENS", "length"),
        ("tool_calls", "tool_calls"),
        ("function_call", "tool_calls"),
        ("tool_use", "tool_calls"),
        ("content_filter", "content_filter"),
        ("SAFETY", "content_filter"),
        ("something_new", None),
    ],
)
def test_finish_reason_is_normalised(raw: str, normal: str | None) -> None:
    """finish_reason is one of stop, length, tool_calls, content_filter; an unknown value is
    left out of `done` (the raw value stays in `finish_raw`) but still ends the answer."""
    tr, sink = chat()
    relay(tr, sink, content_events(["a"], raw))
    assert tr.finished
    assert tr.meta.get("finish_reason") == normal
    assert tr.finish_raw == raw
    assert normal is None or normal in FINISH_REASONS


def test_finish_reason_omitted_when_the_upstream_said_nothing() -> None:
    """No finish_reason at all: none in `done` (Perplexity may end so)."""
    tr, sink = chat("perplexity")
    relay(tr, sink, [ev(pplx("a"))])
    assert "finish_reason" not in tr.meta


def everything() -> list[SSEEvent]:
    """One stream with every kind of part."""
    return [
        ev(concise("chat.reasoning", {"content": "", "reasoning_steps": [SEARCH_STEP]})),
        ev(openai_chunk({"reasoning_content": "Think."})),
        ev(pplx("<think>more</think>Answer", citations=["https://a"])),
        ev(openai_chunk({"annotations": [{"type": "url_citation", "url": "https://b"}]})),
        ev(openai_chunk(tool_delta(0, id="c", name="f", arguments="{}"), "tool_calls")),
        ev("[DONE]"),
    ]


@pytest.mark.parametrize(
    "wants",
    [frozenset(c) for n in range(len(PART_KINDS) + 1) for c in combinations(PART_KINDS, n)],
)
def test_a_kind_not_wanted_is_never_pushed(wants: frozenset[str]) -> None:
    """For every subset of kinds asked for: exactly those kinds reach the sink, and the answer
    text is the same."""
    tr, sink = chat("perplexity", wants)
    assert relay(tr, sink, everything()) == "Answer"
    pushed = {k for k in sink.kinds() if k != "text"}
    names = {"reasoning": "reasoning", "sources": "sources", "tool_call": "tools"}
    names["progress"] = "progress"
    assert {names[k] for k in pushed} == wants
    assert ("reasoning" in tr.meta) == ("reasoning" in wants)
    assert ("tool_calls" in tr.meta) == ("tools" in wants)


def test_translator_for_keeps_its_old_call() -> None:
    """`translator_for(dialect)` still works (no parts), and every dialect takes the parts
    arguments, the events dialect ignoring them."""
    assert translator_for("openai").sources_dropped == 0
    tr = translator_for("events", ALL, Recorder(), PartLimits())
    assert isinstance(tr, EventsTranslator)
    assert tr.sources_dropped == 0
    assert isinstance(translator_for("perplexity", ALL), PerplexityTranslator)


def test_text_only_stream_meta_is_unchanged() -> None:
    """A client that asked for nothing gets today's metadata, key for key and in order."""
    tr, sink = chat("perplexity", frozenset())
    final = pplx_chunk("", "Hi", 2, "stop")
    final["search_results"] = [{"title": "A", "url": "https://a.example/1"}]
    relay(tr, sink, [ev(pplx_chunk("Hi", "Hi", 1)), ev(final)])
    assert list(tr.meta) == ["citations", "usage", "search_results", "finish_reason"]
    assert sink.kinds() == ["text"]
