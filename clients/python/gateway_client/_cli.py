"""`gateway-client ask "prompt"`: stream one answer to stdout, like a Unix filter.

Exit status:

- 0: the answer is complete (and all of it was written);
- 1: the gateway or the connection failed (the message names the protocol's error code), or
  stdout failed for another reason than its reader going away (a full disk);
- 2: bad usage (one line on stderr);
- 130: Ctrl-C (SIGINT), which cancels the stream at the gateway first;
- 141 (128 + SIGPIPE, what a shell reports for `yes | head -1`'s `yes`): stdout's reader went
  away (`gateway-client ask ... | head -3`). The stream is cancelled at the gateway, so the
  upstream stops generating, and nothing is printed: the reader chose to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Final, NoReturn, TypeVar

from gateway_client._client import DEFAULT_URL, GatewayClient, Stream
from gateway_client._errors import GatewayError, Unauthorized
from gateway_client._frames import Answer, Part, dumps

PROG: Final = "gateway-client"
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
#: 128 + SIGPIPE (13 on every Unix; spelled out because Windows has no signal.SIGPIPE).
EXIT_BROKEN_PIPE: Final = 141
#: The environment variable holding the token when `--token-env` does not name another.
TOKEN_ENV: Final = "GATEWAY_TOKEN"
#: How long to wait for the gateway to confirm a cancel before closing the socket anyway (the
#: close cancels the stream too, docs/protocol.md "Resume": a closed socket's streams end).
CANCEL_TIMEOUT: Final = 5.0
#: Protocol v1, "start": a model name is 1 to 128 characters.
MAX_MODEL_CHARS: Final = 128

T = TypeVar("T")


class _Interrupted(Exception):
    """SIGINT arrived while waiting."""


class _OutputGone(Exception):
    """stdout can no longer be written (its reader went away, or it failed)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit 2 (argparse prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        _usage_exit(message, self.prog)


def _usage_exit(message: str, prog: str = f"{PROG} ask") -> NoReturn:
    _usage(message, prog)
    sys.exit(EXIT_USAGE)


def _usage(message: str, prog: str = f"{PROG} ask") -> int:
    _fail(f"{message} (see '{prog} --help')")
    return EXIT_USAGE


def _prompt(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the prompt is empty")
    return value


def _model(value: str) -> str:
    if not 0 < len(value) <= MAX_MODEL_CHARS or not value.isprintable():
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_MODEL_CHARS} printable characters")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of `gateway-client`."""
    parser = _Parser(
        prog=PROG,
        description="Ask the LLM WebSocket gateway and stream the answer to stdout.",
        epilog="Exit status: 0 answer complete, 1 error, 2 bad usage, 130 interrupted (Ctrl-C "
        "cancels the stream at the gateway), 141 stdout closed (the stream is cancelled).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = commands.add_parser("ask", help="stream the answer to one prompt")
    ask.add_argument("prompt", type=_prompt, help="the question (not empty)")
    ask.add_argument(
        "--url",
        default=os.environ.get("GATEWAY_URL", DEFAULT_URL),
        help="the gateway's WebSocket URL (env GATEWAY_URL; default %(default)s)",
    )
    ask.add_argument(
        "--model", type=_model, help="the upstream model (the gateway's default when absent)"
    )
    ask.add_argument(
        "--token-env",
        metavar="NAME",
        help=f"send the bearer token held by environment variable NAME (default: {TOKEN_ENV}, "
        "when set; tokens are never taken on the command line, where `ps` shows them)",
    )
    ask.add_argument(
        "--auth",
        choices=("header", "message"),
        default="header",
        help="send the token as an Authorization header (default) or as an auth frame",
    )
    ask.add_argument(
        "--reasoning",
        action="store_true",
        help="ask for the model's reasoning and print it before the answer (dimmed on a "
        "terminal), separated from it by a blank line",
    )
    ask.add_argument(
        "--sources",
        action="store_true",
        help="ask for sources and print each to stderr as it arrives ('[n] url - title'), "
        "instead of the citation list after the answer",
    )
    ask.add_argument(
        "--json", action="store_true", help="print the raw protocol frames, one per line"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            _usage_exit(f"--token-env: environment variable {args.token_env} is not set")
    else:
        token = os.environ.get(TOKEN_ENV) or None
    stdout = _Stdout()
    try:
        return asyncio.run(_ask(args, token, stdout))
    except KeyboardInterrupt:  # SIGINT where our handler could not be installed
        stdout.end_line()
        _fail("cancelled")
        return EXIT_INTERRUPTED


class _Stdout:
    """stdout, written and flushed piece by piece.

    A write that fails is not retried: `gone` is set and later writes are dropped. The reader
    going away (EPIPE) is the normal end of a pipeline (`| head`), not an error.
    """

    def __init__(self) -> None:
        self.gone = False
        #: Why stdout failed; None while it works (and after EPIPE, which is no failure).
        self.error: OSError | None = None
        #: Whether the output so far is empty or ends with a newline.
        self.at_line_start = True
        self._event: asyncio.Event | None = None

    def event(self) -> asyncio.Event:
        """Set once stdout is gone (created in the running loop)."""
        if self._event is None:
            self._event = asyncio.Event()
            if self.gone:
                self._event.set()
        return self._event

    def write(self, text: str) -> None:
        if self._put(text):
            self.at_line_start = text.endswith("\n")

    def style(self, code: str) -> None:
        """Write a terminal control sequence (it does not move the cursor to a new line)."""
        self._put(code)

    def _put(self, text: str) -> bool:
        if self.gone or not text:
            return False
        try:
            out = sys.stdout
            if out is None:  # started with fd 1 closed (`gateway-client ... >&-`)
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            out.write(text)
            out.flush()
        except OSError as exc:
            self._lost(exc)
            return False
        return True

    def end_line(self) -> None:
        """Make sure what follows (on stdout, or on stderr when both are the terminal) starts
        on a line of its own."""
        if not self.at_line_start:
            self.write("\n")

    def _lost(self, exc: OSError) -> None:
        self.gone = True
        if not isinstance(exc, BrokenPipeError):
            self.error = exc
        if self._event is not None:
            self._event.set()
        # What is still buffered would be flushed again at interpreter exit and fail there
        # ("Exception ignored ... BrokenPipeError"): point fd 1 at /dev/null so it goes nowhere.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = sys.stdout.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)


def _fail(message: str) -> None:
    with contextlib.suppress(OSError, AttributeError):  # stderr closed too: nothing to do
        sys.stderr.write(f"{PROG}: {message}\n")
        sys.stderr.flush()


async def _race(work: Coroutine[Any, Any, T], interrupted: asyncio.Event, gone: asyncio.Event) -> T:
    """Await `work` unless SIGINT comes first or stdout goes: then cancel it and raise
    `_Interrupted` or `_OutputGone`."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(work, name="gateway-client work")
    stops = {
        loop.create_task(interrupted.wait(), name="gateway-client sigint"),
        loop.create_task(gone.wait(), name="gateway-client stdout gone"),
    }
    try:
        await asyncio.wait({task, *stops}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # a timeout around us
        task.cancel()
        raise
    finally:
        for stop in stops:
            stop.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    raise _Interrupted if interrupted.is_set() else _OutputGone


#: ECMA-48 "faint" and "normal intensity": reasoning is dimmed on a terminal.
DIM: Final = "\x1b[2m"
UNDIM: Final = "\x1b[22m"


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _shares_stdout() -> bool:
    """Whether stderr is the same file as stdout (a terminal, or `2>&1`): then what goes to
    stderr must wait for stdout to reach the start of a line."""
    try:
        return os.path.sameopenfile(sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False


class _Render:
    """Writes a stream's parts as `ask` shows them: the answer's text on stdout; with
    `--reasoning` the reasoning there too, dimmed when stdout is a terminal (and NO_COLOR is not
    set), a blank line between it and the answer; with `--sources` each source on stderr as it
    arrives, held back while stdout is mid-line when both go to the same file, so that a source
    never splits a line of the answer."""

    def __init__(self, stdout: _Stdout, *, kinds: Sequence[str], dim: bool, share: bool) -> None:
        self.stdout = stdout
        #: The parts asked for ("reasoning", "sources"): only those are shown.
        self.kinds = frozenset(kinds)
        self.dim = dim
        self.share = share
        self.mode: str | None = None  # "text" or "reasoning": what was written last
        self.dimmed = False
        #: Newlines that would only add blank lines: at the start of the reasoning, and of
        #: the answer after it (a blank line already separates them).
        self.skip_newlines = False
        self.held: list[str] = []
        self.sources_shown = 0

    def part(self, part: Part) -> None:
        if part.kind == "text" or (part.kind == "reasoning" and "reasoning" in self.kinds):
            self._text(part.kind, part.text)
        elif part.kind == "sources" and "sources" in self.kinds:
            for source in part.sources:
                title = f" - {source.title}" if source.title else ""
                self.held.append(f"[{source.index}] {source.url}{title}\n")
                self.sources_shown += 1
            self._flush_sources()

    def _text(self, mode: str, text: str) -> None:
        if mode != self.mode:
            if self.mode is not None:
                self._undim()
                self.stdout.end_line()
                self.stdout.write("\n")
            self.skip_newlines = self.mode is not None or mode == "reasoning"
            self.mode = mode
        if self.skip_newlines:
            text = text.lstrip("\n")
            if not text:
                return
            self.skip_newlines = False
        if mode == "reasoning" and self.dim and not self.dimmed:
            self.stdout.style(DIM)
            self.dimmed = True
        if not (self.held and self.share):
            self.stdout.write(text)
            return
        head, newline, tail = text.rpartition("\n")
        if newline:  # let the held sources out at the end of a line
            self.stdout.write(head + newline)
            self._flush_sources()
        self.stdout.write(tail)

    def _undim(self) -> None:
        if self.dimmed:
            self.stdout.style(UNDIM)
            self.dimmed = False

    def _flush_sources(self) -> None:
        if not self.held or (self.share and not self.stdout.at_line_start):
            return
        dimmed = self.dimmed
        if self.share:
            self._undim()
        lines, self.held = "".join(self.held), []
        with contextlib.suppress(OSError, AttributeError):
            sys.stderr.write(lines)
            sys.stderr.flush()
        if dimmed and not self.dimmed:
            self.stdout.style(DIM)
            self.dimmed = True

    def close(self) -> None:
        """The stream is over (or being left): normal intensity again, held sources out."""
        self._undim()
        if self.held:
            self.stdout.end_line()
            self._flush_sources()


async def _consume(stream: Stream, render: _Render | None) -> Answer:
    try:
        async for part in stream.parts():
            if render is not None:
                render.part(part)
    finally:
        if render is not None:
            render.close()
    return stream.result


async def _cancel(stream: Stream, interrupted: asyncio.Event) -> None:
    """Cancel the stream and wait (a while) for the gateway to confirm. A second Ctrl-C stops
    waiting; the socket's close then cancels the stream at the gateway anyway."""
    interrupted.clear()
    with contextlib.suppress(_Interrupted, _OutputGone, TimeoutError, GatewayError):
        async with asyncio.timeout(CANCEL_TIMEOUT):
            await _race(stream.cancel(), interrupted, asyncio.Event())


def _citations(answer: Answer) -> str:
    if not answer.citations:
        return ""
    lines = [f"[{n}] {url}" for n, url in enumerate(answer.citations, 1)]
    return "\nSources:\n" + "\n".join(lines) + "\n"


def _explain(exc: GatewayError, args: argparse.Namespace, token: str | None) -> str:
    if isinstance(exc, Unauthorized):
        if token is None:
            return (
                f"{exc.code}: the gateway requires a token: set {TOKEN_ENV}, or name the "
                "environment variable that holds it with --token-env NAME"
            )
        source = args.token_env or TOKEN_ENV
        return f"{exc.code}: {exc.message} (the token from ${source})"
    retry = " (retryable)" if exc.retryable else ""
    return f"{exc.code}: {exc.message}{retry}"


async def _ask(args: argparse.Namespace, token: str | None, stdout: _Stdout) -> int:
    def print_frame(frame: Mapping[str, Any]) -> None:
        stdout.write(dumps(frame) + "\n")

    try:
        client = GatewayClient(
            args.url, token=token, auth=args.auth, on_frame=print_frame if args.json else None
        )
    except ValueError as exc:  # a URL that is not ws:// or wss://, a malformed token
        return _usage(str(exc))
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    gone = stdout.event()
    # Signal handlers are unavailable on some platforms and event loops (NotImplementedError)
    # and off the main thread (RuntimeError); Ctrl-C then falls back to KeyboardInterrupt.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    stream: Stream | None = None
    status = EXIT_OK
    parts = [
        kind for kind, flag in (("reasoning", args.reasoning), ("sources", args.sources)) if flag
    ]
    render = None
    if not args.json:
        dim = _is_terminal(sys.stdout) and not os.environ.get("NO_COLOR")
        dim = dim and os.environ.get("TERM") != "dumb"
        render = _Render(stdout, kinds=parts, dim=dim, share=_shares_stdout())
    try:
        await _race(client.connect(), interrupted, gone)
        stream = await _race(
            client.start(args.prompt, model=args.model, parts=parts), interrupted, gone
        )
        answer = await _race(_consume(stream, render), interrupted, gone)
        if render is not None:
            stdout.end_line()
            if not render.sources_shown:  # with --sources they were shown as they came
                stdout.write(_citations(answer))
    except _Interrupted:
        if stream is not None:
            await _cancel(stream, interrupted)
        stdout.end_line()
        _fail("cancelled")
        status = EXIT_INTERRUPTED
    except _OutputGone:
        if stream is not None:
            await _cancel(stream, interrupted)
    except GatewayError as exc:
        stdout.end_line()
        _fail(_explain(exc, args, token))
        status = EXIT_ERROR
    finally:
        await client.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    if stdout.error is not None:
        _fail(f"cannot write to stdout: {stdout.error.strerror or stdout.error}")
        return EXIT_ERROR
    if stdout.gone and status == EXIT_OK:
        return EXIT_BROKEN_PIPE
    return status
