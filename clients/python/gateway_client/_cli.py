"""`gateway-client ask "prompt"`: stream one answer to stdout.

Exit status: 0 when the answer is complete, 1 when the gateway or the connection failed (the
message names the protocol's error code), 2 for bad usage, 130 after Ctrl-C (SIGINT), which
cancels the stream at the gateway first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Final, TypeVar

from gateway_client._client import DEFAULT_URL, GatewayClient, Stream
from gateway_client._errors import GatewayError
from gateway_client._frames import Answer, dumps

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

T = TypeVar("T")


class _Interrupted(Exception):
    """SIGINT arrived while waiting."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of `gateway-client`."""
    parser = argparse.ArgumentParser(
        prog="gateway-client",
        description="Ask the LLM WebSocket gateway and stream the answer to stdout.",
        epilog="Exit status: 0 answer complete, 1 error, 2 bad usage, 130 interrupted (Ctrl-C "
        "cancels the stream at the gateway).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = commands.add_parser("ask", help="stream the answer to one prompt")
    ask.add_argument("prompt", help="the question")
    ask.add_argument(
        "--url",
        default=os.environ.get("GATEWAY_URL", DEFAULT_URL),
        help="the gateway's WebSocket URL (env GATEWAY_URL; default %(default)s)",
    )
    ask.add_argument("--model", help="the upstream model (the gateway's default when absent)")
    ask.add_argument(
        "--token-env",
        metavar="NAME",
        help="send the bearer token held by environment variable NAME",
    )
    ask.add_argument(
        "--auth",
        choices=("header", "message"),
        default="header",
        help="send the token as an Authorization header (default) or as an auth frame",
    )
    ask.add_argument(
        "--json", action="store_true", help="print the raw protocol frames, one per line"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env: environment variable {args.token_env} is not set")
    try:
        return asyncio.run(_ask(args, token))
    except KeyboardInterrupt:  # SIGINT before our handler was installed
        return EXIT_INTERRUPTED


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_frame(frame: Mapping[str, Any]) -> None:
    _out(dumps(frame) + "\n")


def _fail(message: str) -> None:
    sys.stderr.write(f"gateway-client: {message}\n")
    sys.stderr.flush()


async def _race(work: Coroutine[Any, Any, T], interrupted: asyncio.Event) -> T:
    """Await `work` unless SIGINT comes first: then cancel it and raise `_Interrupted`."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(work, name="gateway-client work")
    stop = loop.create_task(interrupted.wait(), name="gateway-client sigint")
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    await asyncio.wait({stop})
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
        raise _Interrupted
    return task.result()


async def _consume(stream: Stream, raw: bool) -> Answer:
    async for chunk in stream:
        if not raw:
            _out(chunk)
    return stream.result


def _citations(answer: Answer) -> str:
    if not answer.citations:
        return ""
    lines = [f"[{n}] {url}" for n, url in enumerate(answer.citations, 1)]
    return "\nSources:\n" + "\n".join(lines) + "\n"


async def _ask(args: argparse.Namespace, token: str | None) -> int:
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    # Signal handlers are unavailable on some platforms and event loops (NotImplementedError)
    # and off the main thread (RuntimeError); Ctrl-C then falls back to KeyboardInterrupt.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        client = GatewayClient(
            args.url, token=token, auth=args.auth, on_frame=_print_frame if args.json else None
        )
    except ValueError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    stream: Stream | None = None
    try:
        await _race(client.connect(), interrupted)
        stream = await _race(client.start(args.prompt, model=args.model), interrupted)
        answer = await _race(_consume(stream, args.json), interrupted)
    except _Interrupted:
        if stream is not None:
            await stream.cancel()
        if not args.json and stream is not None and stream.text:
            _out("\n")
        _fail("cancelled")
        return EXIT_INTERRUPTED
    except GatewayError as exc:
        if not args.json and stream is not None and stream.text:
            _out("\n")
        retry = " (retryable)" if exc.retryable else ""
        _fail(f"{exc.code}: {exc.message}{retry}")
        return EXIT_ERROR
    finally:
        await client.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    if not args.json:
        _out(("" if answer.text.endswith("\n") else "\n") + _citations(answer))
    return EXIT_OK
