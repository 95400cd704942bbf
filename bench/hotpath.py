"""Instructions per relayed chunk on the gateway's own per-chunk path, in-process.

One upstream body piece (one SSE event of a realistic Perplexity or OpenAI chunk) goes through
exactly what the relay runs for it: `_BodyFeed.data` (SSE decoding, the dialect's translator,
the stream, the socket's outbox, the backpressure check), then the writer's
`Outbox.take_frames` and `text_frames`. No sockets and no event loop turns, so under callgrind
the count repeats to within a few instructions: run it with N and 2N chunks and the difference
over the extra chunks is the per-chunk cost (`--measure` does that). It complements the
`instructions` scenario of `make bench`, which counts a whole paced relay (loop turns,
syscalls' user-space side) but varies with how chunks batch on a busy machine.

    python bench/hotpath.py --measure               # both dialects, callgrind, N=20000
    python bench/hotpath.py --dialect openai --chunks 1000   # just run the path

`--parts` asks the stream for every part kind (reasoning, sources, tools, progress), which a
text-only upstream never produces: what asking costs a text stream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: One typical SSE event per dialect, as the real APIs send them (upstream-formats.md 1a, 1b).
PERPLEXITY = (
    b'data: {"id":"0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b","model":"sonar","created":1767225600,'
    b'"usage":{"prompt_tokens":8,"completion_tokens":42,"total_tokens":50,'
    b'"search_context_size":"low"},"citations":["https://en.wikipedia.org/wiki/Rayleigh_scattering",'
    b'"https://www.britannica.com/science/Rayleigh-scattering"],"search_results":[{"title":'
    b'"Rayleigh scattering","url":"https://en.wikipedia.org/wiki/Rayleigh_scattering",'
    b'"date":"2025-01-20"},{"title":"Rayleigh scattering | Britannica","url":'
    b'"https://www.britannica.com/science/Rayleigh-scattering","date":"2024-11-02"}],'
    b'"object":"chat.completion.chunk","choices":[{"index":0,"finish_reason":null,"message":'
    b'{"role":"assistant","content":"Sunlight looks white but "},"delta":{"role":"assistant",'
    b'"content":"scattering "}}]}\r\n\r\n'
)
OPENAI = (
    b'data: {"id":"chatcmpl-AB12cd34EF56gh78IJ90kl","object":"chat.completion.chunk",'
    b'"created":1767225600,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1",'
    b'"choices":[{"index":0,"delta":{"content":" scattering"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null,"obfuscation":"aB3d"}\n\n'
)
#: The other dialects' text deltas (issue 19), shaped as in ../shared/reference/transcripts/.
ANTHROPIC = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":" scattering"}}\n\n'
)
RESPONSES = (
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":5,"item_id":'
    b'"msg_01830d662ab3856501693c32183a488190a612c410a0a39823","output_index":0,'
    b'"content_index":0,"delta":" scattering","logprobs":[],"obfuscation":"XVAoDXXbkE"}\n\n'
)
GEMINI = (
    b'data: {"candidates":[{"content":{"parts":[{"text":" scattering"}],"role":"model"},'
    b'"index":0}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":23,'
    b'"totalTokenCount":32},"modelVersion":"gemini-2.5-flash","responseId":'
    b'"bH6LaZW8Fp_3nsEPqtaSwQ4"}\r\n\r\n'
)
EVENTS = {
    "perplexity": PERPLEXITY,
    "openai": OPENAI,
    "anthropic": ANTHROPIC,
    "openai-responses": RESPONSES,
    "gemini": GEMINI,
}
#: What `--measure` counts by default: the dialects every change is held to (the 3% gate).
GATED = ("openai", "perplexity")


class _Metric:
    def observe(self, value: float) -> None:
        return None


class _Content:
    """What `_BodyFeed` keeps of aiohttp's response body (never read here)."""


class _Response:
    content = _Content()


def _upstream(dialect: str) -> Any:
    """The `Upstream` a feed reports to, without its aiohttp session (nothing is sent)."""
    from gateway.config import Config
    from gateway.io.upstream import Upstream

    return Upstream(Config(dialect=dialect), f"http://127.0.0.1:9/{dialect}")


async def relay(dialect: str, chunks: int, parts: bool) -> int:
    """Relay `chunks` events of `dialect` through the per-chunk path; returns bytes framed."""
    from gateway.core.dialects import translator_for
    from gateway.core.protocol import Start
    from gateway.core.session import Outbox, Stream
    from gateway.io.upstream import _BodyFeed
    from gateway.io.websocket import text_frames

    kinds = frozenset({"reasoning", "sources", "tools", "progress"}) if parts else frozenset()
    outbox = Outbox()
    try:
        request = Start("s1", ({"role": "user", "content": "p"},), None, {}, kinds)
    except TypeError:  # before typed parts (issue 18)
        request = Start("s1", ({"role": "user", "content": "p"},), None, {})
    stream = Stream(request, outbox)
    try:
        translator = translator_for(dialect, kinds, stream)  # type: ignore[call-arg]
    except TypeError:
        translator = translator_for(dialect)
    upstream = _upstream(dialect)
    try:  # since issue 19 a feed knows its route (an upstream of the routes table)
        route = upstream.routes["default"]
        feed = _BodyFeed(
            upstream, stream, translator, lambda _s: None, 0.0, _Response(), route, 0.0
        )
    except (AttributeError, TypeError):
        upstream._ttfc = _Metric()
        feed = _BodyFeed(upstream, stream, translator, lambda _s: None, 0.0, _Response())
    event = EVENTS[dialect]
    data = feed.data
    take = getattr(outbox, "take_frames", None) or outbox.drain  # type: ignore[attr-defined]
    framed = 0
    for _ in range(chunks):
        data(event)
        framed += len(text_frames(take()))
    return framed


def run(dialect: str, chunks: int, parts: bool) -> None:
    import gc

    gc.disable()  # a collection's cost lands on whichever chunk triggers it: not the path's
    framed = asyncio.run(relay(dialect, chunks, parts))
    assert framed > chunks * 20, framed


def callgrind_total(dialect: str, chunks: int, parts: bool) -> int:
    """User-space instructions of a whole run under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--dialect",
            dialect,
            "--chunks",
            str(chunks),
            *(["--parts"] if parts else []),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"hotpath under callgrind failed:\n{done.stderr[-2000:]}")
        totals = re.findall(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
        return int(totals[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialect", choices=sorted(EVENTS), default="perplexity")
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--parts", action="store_true", help="ask for every part kind")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="instructions per chunk under callgrind (N and 2N chunks), for the gated dialects "
        "(or --dialect, or --all)",
    )
    parser.add_argument("--all", action="store_true", help="with --measure: every dialect")
    args = parser.parse_args()
    if not args.measure:
        run(args.dialect, args.chunks, args.parts)
        return
    n = 20000
    if args.all:
        dialects: tuple[str, ...] = tuple(EVENTS)
    elif "--dialect" in sys.argv:
        dialects = (args.dialect,)
    else:
        dialects = GATED
    for dialect in dialects:
        one = callgrind_total(dialect, n, args.parts)
        two = callgrind_total(dialect, 2 * n, args.parts)
        print(f"{dialect}: {(two - one) / n:,.0f} instructions per chunk")


if __name__ == "__main__":
    main()
