"""The Responses dialects (`openai-responses`, `perplexity-agent`): events to text, parts and
one outcome, and the request each builds from a start (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.dialects import (
    DIALECTS,
    RequestDefaults,
    Translator,
    UpstreamFailure,
    translator_for,
)
from gateway.core.dialects.responses import (
    OpenAIResponsesDialect,
    PerplexityAgentDialect,
    PerplexityAgentTranslator,
    ResponsesTranslator,
    hosted_step,
)
from gateway.core.parts import KNOWN_PARTS, STEP_KINDS, PartLimits
from gateway.core.protocol import ErrorCode
from gateway.core.sse import SSEDecoder, SSEEvent

ALL = KNOWN_PARTS


@dataclass
class Recorder:
    """A PartSink keeping everything in arrival order."""

    log: list[tuple[str, Any]] = field(default_factory=list)

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


def ev(kind: str, **fields: Any) -> SSEEvent:
    """An event as the APIs send it: named after its `type`."""
    return SSEEvent(kind, orjson.dumps({"type": kind, **fields}).decode(), None)


def text(delta: str, item: str = "msg_1") -> SSEEvent:
    return ev(
        "response.output_text.delta", item_id=item, output_index=0, content_index=0, delta=delta
    )


USAGE = {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}


def completed(**response: Any) -> SSEEvent:
    return ev("response.completed", response={"status": "completed", "usage": USAGE, **response})


def feed(translator: Translator, events: list[SSEEvent], sink: Recorder | None = None) -> str:
    """Feed events until the end; answer text is logged in `sink` too, between the parts."""
    out = []
    for event in events:
        delta = translator.feed(event)
        if delta is not None:
            out.append(delta)
            if sink is not None:
                sink.log.append(("text", delta))
        if translator.finished:
            break
    return "".join(out)


def make(
    wants: frozenset[str] = ALL, limits: PartLimits | None = None
) -> tuple[ResponsesTranslator, Recorder]:
    sink = Recorder()
    if limits is None:
        tr = translator_for("openai-responses", wants, sink)
    else:
        tr = translator_for("openai-responses", wants, sink, limits)
    assert isinstance(tr, ResponsesTranslator)
    return tr, sink


def call_added(item_id: str, call_id: str, name: str, arguments: str = "") -> SSEEvent:
    item = {"id": item_id, "type": "function_call", "status": "in_progress"}
    item.update(arguments=arguments, call_id=call_id, name=name)
    return ev("response.output_item.added", output_index=1, item=item)


def call_done(item_id: str, call_id: str, name: str, arguments: str) -> SSEEvent:
    item = {"id": item_id, "type": "function_call", "status": "completed"}
    item.update(arguments=arguments, call_id=call_id, name=name)
    return ev("response.output_item.done", output_index=1, item=item)


def args_delta(item_id: str, delta: str) -> SSEEvent:
    return ev(
        "response.function_call_arguments.delta", item_id=item_id, output_index=1, delta=delta
    )


def args_done(item_id: str, arguments: str) -> SSEEvent:
    return ev(
        "response.function_call_arguments.done",
        item_id=item_id,
        output_index=1,
        arguments=arguments,
    )


# --------------------------------------------------------------------------------------------
# Text, the end, usage
# --------------------------------------------------------------------------------------------


def test_text_deltas_then_completed_is_a_complete_answer() -> None:
    """Text deltas are the answer; `response.completed` ends it with finish `stop` and the
    terminal response's usage as sent."""
    tr, sink = make()
    got = feed(tr, [ev("response.created", response={}), text("Hel"), text("lo"), completed()])
    assert got == "Hello"
    assert tr.finished
    assert tr.saw_text
    assert tr.meta == {"usage": USAGE, "finish_reason": "stop"}
    assert tr.finish_raw == "completed"
    assert sink.log == []
    tr.end_of_stream()  # after the end, EOF changes nothing


def test_the_json_type_not_the_event_name_decides() -> None:
    """An event is read by its JSON `type` (a stream whose `event:` lines were lost reads the
    same)."""
    tr, _ = make()
    data = orjson.dumps({"type": "response.output_text.delta", "delta": "x"}).decode()
    assert tr.feed(SSEEvent("message", data, None)) == "x"


def test_text_of_several_message_items_is_concatenated() -> None:
    """Every message item's text is the answer, in arrival order, with no separator."""
    tr, _ = make()
    assert feed(tr, [text("a", "msg_1"), text("b", "msg_2"), completed()]) == "ab"


def test_eof_before_the_terminal_event_is_interrupted() -> None:
    """A clean EOF without `response.completed` or `.incomplete` is `stream_interrupted`, even
    after text."""
    tr, _ = make()
    feed(tr, [ev("response.created", response={}), text("partial")])
    with pytest.raises(UpstreamFailure) as info:
        tr.end_of_stream()
    assert info.value.code is ErrorCode.STREAM_INTERRUPTED
    assert not tr.finished


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("max_output_tokens", "length"), ("content_filter", "content_filter"), ("other", None)],
)
def test_incomplete_ends_the_answer_with_its_reason(reason: str, finish: str | None) -> None:
    """`response.incomplete` is an end: its `incomplete_details.reason` is the finish reason
    (normalised; an unknown one is left out but kept raw)."""
    tr, _ = make()
    response = {"status": "incomplete", "incomplete_details": {"reason": reason}, "usage": USAGE}
    feed(tr, [text("cut"), ev("response.incomplete", response=response)])
    assert tr.finished
    assert tr.meta.get("finish_reason") == finish
    assert tr.finish_raw == reason
    assert tr.meta["usage"] == USAGE


def test_unknown_events_done_sentinel_and_typeless_events_are_ignored() -> None:
    """Event types the dialect does not know, a chat-style `[DONE]`, empty data and a
    non-string `type` change nothing."""
    tr, sink = make()
    events = [
        ev("response.future_thing", whatever=[1, 2]),
        ev("response.web_search_call.searching", item_id="ws_1"),
        SSEEvent("message", "[DONE]", None),
        SSEEvent("message", "", None),
        SSEEvent("message", '{"type": ["odd"]}', None),
        ev("response.output_text.delta", delta=""),
        text("ok"),
        completed(),
    ]
    assert feed(tr, events) == "ok"
    assert sink.log == []


@pytest.mark.parametrize("data", ['{"type": "response.output_text.delta", "delta":', "[1]", '"s"'])
def test_unparsable_or_non_object_event_is_protocol_error(data: str) -> None:
    """Invalid JSON or JSON that is not an object is `upstream_protocol_error`."""
    tr, _ = make()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(SSEEvent("response.output_text.delta", data, None))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_refusal_is_answer_text_flagged_in_done() -> None:
    """`response.refusal.delta` text is relayed as the answer, with `refusal: true`."""
    tr, _ = make()
    got = feed(
        tr,
        [
            ev("response.refusal.delta", delta="I can't"),
            ev("response.refusal.delta", delta=" help."),
            completed(),
        ],
    )
    assert got == "I can't help."
    assert tr.meta["refusal"] is True


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

QUOTA = {
    "type": "insufficient_quota",
    "code": "insufficient_quota",
    "message": "You exceeded your current quota, read https://platform.openai.com/docs/x.",
    "param": None,
}


def test_error_event_raises_at_once_with_the_message_made_safe() -> None:
    """An `error` event (its error nested, as recorded) is `upstream_error` with the
    upstream's message, URLs removed; a quota error is not retryable."""
    tr, _ = make()
    with pytest.raises(UpstreamFailure) as info:
        feed(tr, [ev("response.in_progress", response={}), ev("error", error=QUOTA), completed()])
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.message.startswith("You exceeded your current quota, read [url]")
    assert info.value.retryable is False


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        ({"type": "server_error", "message": "boom"}, True),
        ({"code": "server_error", "message": "boom"}, True),
        ({"code": "rate_limit_exceeded", "message": "slow down"}, True),
        ({"type": "rate_limit_error", "message": "slow down"}, True),
        ({"code": "invalid_prompt", "message": "no"}, False),
        ({"code": ["odd"], "message": "no"}, False),
    ],
)
def test_failed_response_is_upstream_error_retryable_by_kind(
    error: dict[str, Any], retryable: bool
) -> None:
    """`response.failed` (OpenAI: the error on the response) raises `upstream_error`,
    retryable for server and rate-limit types or codes only; its usage is kept."""
    tr, _ = make()
    response = {"status": "failed", "error": error, "usage": USAGE}
    with pytest.raises(UpstreamFailure) as info:
        feed(tr, [text("a"), ev("response.failed", response=response)])
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.message == error["message"]
    assert info.value.retryable is retryable
    assert tr.meta["usage"] == USAGE


def test_flat_error_event_and_perplexity_failed_event() -> None:
    """OpenAI's documented flat `error` event (`code`, `message` on the event) and
    Perplexity's `response.failed` (the error on the event, no response) both raise."""
    tr, _ = make()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev("error", code="server_error", message="The server had an error", param=None))
    assert (info.value.message, info.value.retryable) == ("The server had an error", True)
    agent = translator_for("perplexity-agent")
    error = {"message": "Model unavailable", "code": "model_error", "type": "invalid_request"}
    with pytest.raises(UpstreamFailure) as info:
        agent.feed(ev("response.failed", error=error))
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert (info.value.message, info.value.retryable) == ("Model unavailable", False)


def test_failed_without_an_error_object_still_fails() -> None:
    """A `response.failed` that carries no error is still an error, with a generic message."""
    tr, _ = make()
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(ev("response.failed", response={"status": "failed", "error": None}))
    assert info.value.code is ErrorCode.UPSTREAM_ERROR
    assert info.value.message == "upstream reported an error"


# --------------------------------------------------------------------------------------------
# Reasoning
# --------------------------------------------------------------------------------------------


def summary(delta: str, item: str = "rs_1", index: int = 0) -> SSEEvent:
    return ev(
        "response.reasoning_summary_text.delta",
        item_id=item,
        output_index=0,
        summary_index=index,
        delta=delta,
    )


def test_reasoning_summary_is_reasoning_not_text_and_comes_first() -> None:
    """Summary deltas are pushed as reasoning, in order before the text, and `done.reasoning`
    has them all."""
    tr, sink = make()
    got = feed(tr, [summary("**Plan**"), summary("\n\nAdd."), text("42"), completed()], sink)
    assert got == "42"
    assert sink.log == [("reasoning", "**Plan**"), ("reasoning", "\n\nAdd."), ("text", "42")]
    assert tr.meta["reasoning"] == "**Plan**\n\nAdd."


def test_a_new_reasoning_part_starts_with_a_blank_line() -> None:
    """Another summary part (index or item) after reasoning relayed is set off by a blank
    line; raw `reasoning_text` deltas are reasoning too."""
    tr, sink = make()
    events = [
        summary("One."),
        summary("Two.", index=1),
        summary("Three.", item="rs_2"),
        ev("response.reasoning_text.delta", item_id="rs_3", content_index=0, delta="Raw"),
        ev("response.reasoning_text.delta", item_id="rs_3", content_index=0, delta=" more"),
        completed(),
    ]
    feed(tr, events)
    assert tr.meta["reasoning"] == "One.\n\nTwo.\n\nThree.\n\nRaw more"
    assert "".join(sink.of("reasoning")) == tr.meta["reasoning"]


def test_reasoning_not_wanted_is_never_pushed_but_still_counted() -> None:
    """Without `reasoning` in wants nothing is pushed or put in `done`, yet its bytes count
    against the limit."""
    tr, sink = make(frozenset({"sources"}))
    feed(tr, [summary("thinking"), text("a"), completed()])
    assert sink.log == []
    assert "reasoning" not in tr.meta
    tr, _ = make(frozenset(), PartLimits(max_reasoning_bytes=10))
    tr.feed(summary("x" * 10))
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(summary("y"))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------------------------
# Function calls
# --------------------------------------------------------------------------------------------

RECORDED_CALL = [
    call_added("fc_1", "call_AB", "calculator"),
    args_delta("fc_1", '{"a":'),
    args_delta("fc_1", "12}"),
    args_done("fc_1", '{"a":12}'),
    call_done("fc_1", "call_AB", "calculator", '{"a":12}'),
]


def test_function_call_is_pushed_once_when_its_arguments_are_done() -> None:
    """A function_call item's arguments are assembled from their deltas; the call is pushed at
    `arguments.done` (not again at the item's done) and the answer ends with `tool_calls`."""
    tr, sink = make()
    pushed_at = None
    for i, event in enumerate([*RECORDED_CALL, completed()]):
        tr.feed(event)
        if pushed_at is None and sink.of("tool_call"):
            pushed_at = i
    assert pushed_at == 3
    call = {"call_id": "call_AB", "name": "calculator", "arguments": {"a": 12}}
    assert sink.of("tool_call") == [call]
    assert tr.meta["tool_calls"] == [call]
    assert tr.meta["finish_reason"] == "tool_calls"


def test_call_without_deltas_takes_the_items_arguments() -> None:
    """A call added and done with whole arguments and no delta (Perplexity), or seen only at
    its done, is complete with the item's arguments."""
    tr, sink = make()
    events = [
        call_added("fc_1", "call_1", "get_weather", ""),
        call_done("fc_1", "call_1", "get_weather", '{"city": "Paris"}'),
        call_done("fc_2", "call_2", "get_time", ""),
        completed(),
    ]
    feed(tr, events)
    assert sink.of("tool_call") == [
        {"call_id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        {"call_id": "call_2", "name": "get_time", "arguments": {}},
    ]


def test_deltas_for_an_item_never_added_are_named_by_its_done() -> None:
    """Argument deltas of an item whose `added` never came are kept and the item's done names
    the call."""
    tr, sink = make()
    feed(
        tr,
        [args_delta("fc_9", '{"x": 1}'), call_done("fc_9", "call_9", "f", "ignored"), completed()],
    )
    assert sink.of("tool_call") == [{"call_id": "call_9", "name": "f", "arguments": {"x": 1}}]


def test_open_call_completes_at_the_end_and_ids_are_never_empty() -> None:
    """A call still open when the response completes is pushed then; a call without call_id
    is named by its item id."""
    tr, sink = make()
    item = {"id": "fc_5", "type": "function_call", "name": "f", "arguments": ""}
    feed(tr, [ev("response.output_item.added", item=item), args_delta("fc_5", "[1]"), completed()])
    assert sink.of("tool_call") == [{"call_id": "fc_5", "name": "f", "arguments_raw": "[1]"}]


def test_arguments_continued_after_the_call_completed_are_refused() -> None:
    """A delta for a call already complete is an upstream protocol error."""
    tr, _ = make()
    feed(tr, RECORDED_CALL)
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(args_delta("fc_1", "more"))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR


def test_tool_call_arguments_are_limited() -> None:
    """Arguments over `max_tool_args_bytes` (streamed or whole) fail the stream."""
    tr, _ = make(limits=PartLimits(max_tool_args_bytes=8))
    tr.feed(call_added("fc_1", "c", "f"))
    tr.feed(args_delta("fc_1", "12345678"))
    with pytest.raises(UpstreamFailure) as info:
        tr.feed(args_delta("fc_1", "9"))
    assert info.value.code is ErrorCode.UPSTREAM_PROTOCOL_ERROR
    tr, _ = make(limits=PartLimits(max_tool_args_bytes=8))
    with pytest.raises(UpstreamFailure):
        tr.feed(call_done("fc_1", "c", "f", '{"a": "long"}'))


def test_tool_calls_not_wanted_are_never_pushed_but_finish_says_so() -> None:
    """Without `tools` no call is pushed or put in `done`; the answer still ended by calling
    tools."""
    tr, sink = make(frozenset({"reasoning", "sources", "progress"}))
    feed(tr, [*RECORDED_CALL, completed()])
    assert sink.log == []
    assert "tool_calls" not in tr.meta
    assert tr.meta["finish_reason"] == "tool_calls"
    assert tr.saw_text


@settings(max_examples=100, deadline=None)
@given(
    arguments=st.dictionaries(
        st.text(max_size=5), st.integers(-(2**53), 2**53) | st.text(max_size=8), max_size=4
    ),
    data=st.data(),
)
def test_arguments_cut_anywhere_parse_to_the_same_object(
    arguments: dict[str, Any], data: st.DataObject
) -> None:
    """However the argument JSON is cut into deltas, the call carries the same object."""
    raw = orjson.dumps(arguments).decode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    tr, sink = make()
    events = [
        call_added("fc_1", "c", "f"),
        *(args_delta("fc_1", p) for p in pieces),
        args_done("fc_1", raw),
        completed(),
    ]
    feed(tr, events)
    assert sink.of("tool_call") == [{"call_id": "c", "name": "f", "arguments": arguments}]


# --------------------------------------------------------------------------------------------
# Hosted tools: progress, never tool calls
# --------------------------------------------------------------------------------------------


def hosted(item: dict[str, Any]) -> SSEEvent:
    return ev("response.output_item.done", output_index=0, item=item)


def test_hosted_web_search_is_a_progress_step_not_a_tool_call() -> None:
    """A `web_search_call` item (OpenAI's action at its done) is a `search` step with the query
    and the pages found; it is never a tool call and finish stays `stop`."""
    tr, sink = make()
    action = {
        "type": "search",
        "query": "tech news",
        "sources": [{"type": "url", "url": "https://a.example/"}, {"type": "url", "url": ""}],
    }
    events = [
        ev("response.output_item.added", item={"id": "ws_1", "type": "web_search_call"}),
        ev("response.web_search_call.completed", item_id="ws_1"),
        hosted({"id": "ws_1", "type": "web_search_call", "status": "completed", "action": action}),
        text("news"),
        completed(),
    ]
    feed(tr, events)
    step = {"kind": "search", "queries": ["tech news"], "results": [{"url": "https://a.example/"}]}
    assert sink.log == [("progress", step)]
    assert tr.meta["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("item", "step"),
    [
        (
            {
                "type": "web_search_call",
                "action": {"type": "open_page", "url": "https://p.example/"},
            },
            {"kind": "fetch", "urls": ["https://p.example/"]},
        ),
        (
            {"type": "web_search_call", "action": {"type": "find_in_page", "pattern": "x"}},
            {"kind": "other", "type": "find_in_page"},
        ),
        (
            {"type": "web_search_call", "action": {"type": "search", "queries": ["a", "b"]}},
            {"kind": "search", "queries": ["a", "b"], "results": []},
        ),
        (  # xAI: name and JSON arguments, no action
            {
                "type": "web_search_call",
                "name": "web_search",
                "arguments": '{"query":"what is xAI"}',
            },
            {"kind": "search", "queries": ["what is xAI"], "results": []},
        ),
        (
            {"type": "web_search_call", "arguments": "not json"},
            {"kind": "search", "queries": [], "results": []},
        ),
        (
            {"type": "file_search_call", "queries": ["refund policy"]},
            {"kind": "search", "queries": ["refund policy"], "results": []},
        ),
        (
            {
                "type": "code_interpreter_call",
                "code": "print(1)",
                "outputs": [{"type": "logs", "logs": "1\n"}, {"type": "image", "url": "u"}],
            },
            {"kind": "code", "code": "print(1)", "result": "1\n"},
        ),
        ({"type": "image_generation_call"}, {"kind": "other", "type": "image_generation_call"}),
    ],
)
def test_hosted_steps_of_each_kind(item: dict[str, Any], step: dict[str, Any]) -> None:
    """Each hosted tool item becomes the progress step of its kind (a known `STEP_KINDS`)."""
    assert hosted_step(item) == step
    assert step["kind"] in STEP_KINDS
    tr, sink = make()
    tr.feed(hosted({"id": "x_1", **item}))
    assert sink.log == [("progress", step)]


def test_progress_not_wanted_is_never_pushed() -> None:
    """Without `progress` hosted tools and Perplexity's reasoning events push no step."""
    tr, sink = make(frozenset({"reasoning", "tools"}))
    feed(
        tr,
        [
            hosted({"type": "web_search_call", "action": {"type": "search", "query": "q"}}),
            ev("response.reasoning.search_queries", queries=["q"]),
            completed(),
        ],
    )
    assert sink.log == []


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def annotation(url: str, **extra: Any) -> SSEEvent:
    return ev(
        "response.output_text.annotation.added",
        item_id="msg_1",
        content_index=0,
        annotation={"type": "url_citation", "url": url, **extra},
    )


def test_url_citations_are_sources_by_first_appearance() -> None:
    """`url_citation` annotations are sources numbered 1.. by first appearance, each URL
    once, with its title (xAI's carry the URL only); other annotations are not sources."""
    tr, sink = make()
    events = [
        text("a"),
        annotation("https://a.example/", title="A", start_index=0, end_index=1),
        annotation("https://b.example/"),
        annotation("https://a.example/", title="A again"),
        ev(
            "response.output_text.annotation.added",
            annotation={"type": "file_citation", "file_id": "f"},
        ),
        completed(),
    ]
    feed(tr, events)
    assert sink.of("sources") == [
        [{"index": 1, "url": "https://a.example/", "title": "A"}],
        [{"index": 2, "url": "https://b.example/"}],
    ]


def test_message_item_annotations_add_only_new_sources() -> None:
    """A message item's annotations at its done add the sources not seen yet."""
    tr, sink = make()
    part = {
        "type": "output_text",
        "text": "t",
        "annotations": [
            {"type": "url_citation", "url": "https://a.example/"},
            {"type": "url_citation", "url": "https://c.example/", "title": "C"},
        ],
    }
    item = {"id": "msg_1", "type": "message", "content": [part]}
    feed(
        tr,
        [annotation("https://a.example/"), ev("response.output_item.done", item=item), completed()],
    )
    urls = [s["url"] for batch in sink.of("sources") for s in batch]
    assert urls == ["https://a.example/", "https://c.example/"]


def test_sources_not_wanted_and_over_the_cap() -> None:
    """Without `sources` nothing is pushed; over `max_sources` the rest are dropped and
    counted."""
    tr, sink = make(frozenset({"reasoning"}))
    feed(tr, [annotation("https://a.example/"), completed()])
    assert sink.log == []
    assert tr.sources_dropped == 0
    tr, sink = make(limits=PartLimits(max_sources=1))
    feed(tr, [annotation("https://a.example/"), annotation("https://b.example/"), completed()])
    assert [s["url"] for batch in sink.of("sources") for s in batch] == ["https://a.example/"]
    assert tr.sources_dropped == 1


# --------------------------------------------------------------------------------------------
# Perplexity's Agent API events
# --------------------------------------------------------------------------------------------


def result(rid: Any, url: str) -> dict[str, Any]:
    return {"id": rid, "url": url, "title": f"T{rid}", "snippet": "s", "date": "2025-01-01"}


def test_perplexity_research_events_are_progress_and_sources() -> None:
    """Reasoning started/stopped thoughts, search queries and results, fetched URLs are
    progress steps; search results are sources indexed by their `id` (what `[n]` cites)."""
    sink = Recorder()
    tr = translator_for("perplexity-agent", ALL, sink)
    assert isinstance(tr, PerplexityAgentTranslator)
    events = [
        ev("response.reasoning.started", thought="Planning"),
        ev("response.reasoning.search_queries", queries=["mars", 3], thought="Searching"),
        ev(
            "response.reasoning.search_results",
            results=[result(2, "https://b.example/"), result(1, "https://a.example/")],
        ),
        ev("response.reasoning.fetch_url_queries", urls=["https://a.example/"]),
        ev(
            "response.reasoning.fetch_url_results",
            contents=[{"url": "https://a.example/", "title": "A", "snippet": "x"}],
        ),
        ev("response.reasoning.stopped"),
        ev(
            "response.output_item.done",
            item={
                "type": "search_results",
                "results": [result(1, "https://a.example/"), result(3, "https://c.example/")],
            },
        ),
        text("Mars[1][2]"),
        completed(),
    ]
    feed(tr, events)
    assert sink.of("progress") == [
        {"kind": "thought", "text": "Planning"},
        {"kind": "search", "queries": ["mars"], "text": "Searching"},
        {
            "kind": "search",
            "results": [
                {"url": "https://b.example/", "title": "T2"},
                {"url": "https://a.example/", "title": "T1"},
            ],
        },
        {"kind": "fetch", "urls": ["https://a.example/"]},
        {"kind": "fetch", "urls": ["https://a.example/"]},
    ]
    sources = [s for batch in sink.of("sources") for s in batch]
    assert [(s["index"], s["url"]) for s in sources] == [
        (1, "https://a.example/"),
        (2, "https://b.example/"),
        (3, "https://c.example/"),
    ]
    assert sources[0] == {
        "index": 1,
        "url": "https://a.example/",
        "title": "T1",
        "snippet": "s",
        "date": "2025-01-01",
    }


def test_perplexity_result_ids_taken_or_missing_get_the_next_number() -> None:
    """A second search whose ids start again at 1, or results without a usable id, get the
    next free numbers (an index once sent never moves)."""
    sink = Recorder()
    tr = translator_for("perplexity-agent", frozenset({"sources"}), sink)
    tr.feed(ev("response.reasoning.search_results", results=[result(1, "https://a.example/")]))
    tr.feed(
        ev(
            "response.reasoning.search_results",
            results=[
                result(1, "https://b.example/"),
                result(True, "https://c.example/"),
                result(10**9, "https://d.example/"),
            ],
        )
    )
    sources = [(s["index"], s["url"]) for batch in sink.of("sources") for s in batch]
    assert sources == [
        (1, "https://a.example/"),
        (2, "https://b.example/"),
        (3, "https://c.example/"),
        (4, "https://d.example/"),
    ]


def test_perplexity_usage_with_cost_is_passed_through() -> None:
    """The terminal response's usage, `cost` included, is `meta["usage"]` exactly as sent."""
    usage = {
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "cost": {
            "currency": "USD",
            "input_cost": 1e-05,
            "output_cost": 5e-05,
            "cache_read_cost": 0.0,
            "tool_calls_cost": 0.005,
            "total_cost": 0.00506,
        },
    }
    tr = translator_for("perplexity-agent")
    feed(
        tr, [text("x"), ev("response.completed", response={"status": "completed", "usage": usage})]
    )
    assert tr.meta["usage"] == usage


# --------------------------------------------------------------------------------------------
# Chunking and order
# --------------------------------------------------------------------------------------------

STREAM = [
    ev("response.created", response={"status": "in_progress"}),
    summary("Think "),
    summary("é"),
    hosted({"type": "web_search_call", "action": {"type": "search", "query": "q"}}),
    text("Ré"),
    annotation("https://a.example/", title="A"),
    text("sumé"),
    *RECORDED_CALL,
    completed(),
]


def body_of(events: list[SSEEvent]) -> bytes:
    return b"".join(f"event: {e.event}\ndata: {e.data}\n\n".encode() for e in events)


def relay(pieces: list[bytes]) -> tuple[str, Recorder, dict[str, Any]]:
    tr, sink = make()
    decoder = SSEDecoder()
    out = []
    for piece in pieces:
        for event in decoder.feed(piece):
            delta = tr.feed(event)
            if delta is not None:
                out.append(delta)
                sink.log.append(("text", delta))
    tr.end_of_stream()
    return "".join(out), sink, tr.meta


def test_parts_come_in_the_order_the_upstream_revealed_them() -> None:
    """Reasoning, the search step, text, a source, text and the call arrive in wire order."""
    got, sink, meta = relay([body_of(STREAM)])
    assert got == "Résumé"
    assert [k for k, _ in sink.log] == [
        "reasoning",
        "reasoning",
        "progress",
        "text",
        "sources",
        "text",
        "tool_call",
    ]
    assert meta["finish_reason"] == "tool_calls"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_stream_cut_at_any_bytes_relays_the_same(data: st.DataObject) -> None:
    """The body cut at arbitrary byte boundaries (inside UTF-8 characters, field names) gives
    the same text, parts and metadata."""
    body = body_of(STREAM)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert relay(pieces) == relay([body])


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------

URL = "https://api.openai.com/v1/responses"
DEFAULTS = RequestDefaults()
CONVERSATION: tuple[dict[str, Any], ...] = (
    {"role": "system", "content": "Be brief."},
    {"role": "system", "content": [{"type": "text", "text": "Cite sources."}]},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": [{"type": "text", "text": "It is 21."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And this?"},
            {"type": "image_url", "image_url": {"url": "https://img.example/a.png"}},
            {
                "type": "image_url",
                "image_url": {"url": "https://img.example/b.png", "detail": "low"},
            },
            {"type": "input_audio", "input_audio": {}},
        ],
    },
)


def test_openai_request_url_headers_and_conversation() -> None:
    """The POST goes to the configured URL with a Bearer key; system messages are the
    instructions; turns, tool calls and tool results are Responses input items; it always
    streams and stores nothing."""
    req = OpenAIResponsesDialect().request(URL, "gpt-5", CONVERSATION, {}, "sk-test", DEFAULTS)
    assert req.url == URL
    assert req.headers == {"Authorization": "Bearer sk-test"}
    assert req.body == {
        "model": "gpt-5",
        "input": [
            {"type": "message", "role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "It is 21."}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "And this?"},
                    {
                        "type": "input_image",
                        "image_url": "https://img.example/a.png",
                        "detail": "auto",
                    },
                    {
                        "type": "input_image",
                        "image_url": "https://img.example/b.png",
                        "detail": "low",
                    },
                ],
            },
        ],
        "stream": True,
        "store": False,
        "instructions": "Be brief.\n\nCite sources.",
    }
    assert (
        OpenAIResponsesDialect().request(URL, "m", CONVERSATION[2:3], {}, None, DEFAULTS).headers
        == {}
    )


def test_openai_request_maps_options_and_drops_the_rest() -> None:
    """temperature, top_p, max_tokens, reasoning_effort (with streamed summaries), tools (flat),
    tool_choice, parallel_tool_calls and a json_schema response_format map to their Responses
    fields; options the API does not take are left out."""
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "d",
            "parameters": {"type": "object"},
            "strict": True,
        },
    }
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 100,
        "reasoning_effort": "low",
        "tools": [tool, {"type": "function", "function": {"name": "g"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": True},
        },
        "stop": ["x"],
        "seed": 1,
        "top_k": 5,
        "presence_penalty": 0.1,
        "search_recency_filter": "week",
        "stream_mode": "concise",
    }
    body = (
        OpenAIResponsesDialect()
        .request(URL, "o4", ({"role": "user", "content": "hi"},), options, "k", DEFAULTS)
        .body
    )
    extra = {k: v for k, v in body.items() if k not in ("model", "input", "stream", "store")}
    assert extra == {
        "temperature": 0.2,
        "top_p": 0.9,
        "parallel_tool_calls": False,
        "max_output_tokens": 100,
        "reasoning": {"effort": "low", "summary": "auto"},
        "tools": [
            {
                "type": "function",
                "name": "f",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
            {"type": "function", "name": "g"},
        ],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {
            "format": {
                "type": "json_schema",
                "name": "r",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
    }
    json_object = {"response_format": {"type": "json_object"}, "tool_choice": "required"}
    body = OpenAIResponsesDialect().request(URL, "o4", (), json_object, None, DEFAULTS).body
    assert body["text"] == {"format": {"type": "json_object"}}
    assert body["tool_choice"] == "required"
    assert (
        "text"
        not in OpenAIResponsesDialect()
        .request(URL, "o4", (), {"response_format": "x"}, None, DEFAULTS)
        .body
    )


AGENT_URL = "https://api.perplexity.ai/v1/responses"


def test_agent_request_with_a_model_searches_the_web() -> None:
    """A `provider/model` is `model`, with Perplexity's web_search tool (the start's search
    filters and web_search_options in it) after the function tools; options the Agent API
    does not document (temperature, tool_choice, store) are left out and images carry no
    `detail`."""
    options = {
        "temperature": 0.5,
        "top_p": 0.5,
        "max_tokens": 50,
        "reasoning_effort": "high",
        "language_preference": "fr",
        "search_domain_filter": ["nasa.gov"],
        "search_recency_filter": "month",
        "web_search_options": {
            "search_context_size": "high",
            "user_location": {"country": "FR"},
            "other": 1,
        },
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {}}},
        "search_mode": "academic",
    }
    req = PerplexityAgentDialect().request(
        AGENT_URL, "openai/gpt-5", CONVERSATION, options, "pplx-k", DEFAULTS
    )
    assert req.url == AGENT_URL
    assert req.headers == {"Authorization": "Bearer pplx-k"}
    body = req.body
    assert body["model"] == "openai/gpt-5"
    assert "preset" not in body
    assert body["stream"] is True
    assert "store" not in body
    assert body["instructions"] == "Be brief.\n\nCite sources."
    assert body["input"][-1]["content"][1] == {
        "type": "input_image",
        "image_url": "https://img.example/a.png",
    }
    assert body["max_output_tokens"] == 50
    assert body["reasoning"] == {"effort": "high"}
    assert body["language_preference"] == "fr"
    assert body["response_format"] == options["response_format"]
    assert body["tools"] == [
        {"type": "function", "name": "f"},
        {
            "type": "web_search",
            "filters": {"search_domain_filter": ["nasa.gov"], "search_recency_filter": "month"},
            "search_context_size": "high",
            "user_location": {"country": "FR"},
        },
    ]
    for dropped in (
        "temperature",
        "top_p",
        "tool_choice",
        "parallel_tool_calls",
        "search_mode",
        "text",
    ):
        assert dropped not in body


def test_agent_request_presets_and_disabled_search() -> None:
    """A name without a slash is a `preset`, sent without tools unless the start gives some;
    disable_search leaves web search out; a json_object format is not the Agent API's."""
    user = ({"role": "user", "content": "hi"},)
    agent = PerplexityAgentDialect()
    body = agent.request(
        AGENT_URL, "pro-search", user, {"response_format": {"type": "json_object"}}, None, DEFAULTS
    ).body
    assert body == {
        "preset": "pro-search",
        "input": [{"type": "message", "role": "user", "content": "hi"}],
        "stream": True,
    }
    body = agent.request(
        AGENT_URL, "pro-search", user, {"search_recency_filter": "day"}, None, DEFAULTS
    ).body
    assert body["tools"] == [{"type": "web_search", "filters": {"search_recency_filter": "day"}}]
    body = agent.request(
        AGENT_URL, "openai/gpt-5", user, {"disable_search": True}, None, DEFAULTS
    ).body
    assert "tools" not in body
    tools = {"tools": [{"type": "function", "function": {"name": "f"}}], "disable_search": True}
    body = agent.request(AGENT_URL, "fast-search", user, tools, None, DEFAULTS).body
    assert body["tools"] == [{"type": "function", "name": "f"}]


def test_both_dialects_are_registered() -> None:
    """`openai-responses` and `perplexity-agent` are in the dialect table with their
    translators."""
    assert isinstance(DIALECTS["openai-responses"], OpenAIResponsesDialect)
    assert isinstance(DIALECTS["perplexity-agent"], PerplexityAgentDialect)
    assert type(translator_for("openai-responses")) is ResponsesTranslator
    assert type(translator_for("perplexity-agent")) is PerplexityAgentTranslator
