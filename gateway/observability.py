"""Logging setup: structlog with JSON lines (orjson) for machines, pretty output on a TTY.

Context is bound with contextvars: `session` per socket and `stream` per stream task, so every
line a stream's code writes says which socket and stream it belongs to. Prompts, answers and keys
are never passed to a logger.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, BinaryIO, Final, TextIO, cast

import orjson
import structlog

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class NeverFails:
    """A log destination whose failures are dropped, not raised.

    A log line is never worth a stream, a relay or a drain: with stderr's reader gone (a
    crashed log collector, a closed pipe) every log call would raise BrokenPipeError where it
    stands, and the SIGTERM handler's own log line would keep the gateway from draining at all.
    `dropped` counts what was lost.
    """

    __slots__ = ("__weakref__", "_file", "dropped")  # structlog keys its write locks weakly

    def __init__(self, file: Any) -> None:
        self._file = file
        self.dropped = 0

    def write(self, data: Any) -> None:
        try:
            self._file.write(data)
        except (OSError, ValueError):  # ValueError: the file was closed
            self.dropped += 1

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._file.flush()


def configure_logging(
    fmt: str = "json", level: str = "info", stream: BinaryIO | None = None
) -> None:
    """Configure structlog (and stdlib logging of our libraries) once per process.

    `stream` (JSON only) redirects the log lines, for tests that read them."""
    numeric = _LEVELS[level]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        structlog.configure(
            processors=[
                *shared,
                structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, NeverFails(sys.stderr))),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.BytesLoggerFactory(
                file=cast(BinaryIO, NeverFails(stream if stream is not None else sys.stderr.buffer))
            ),
            cache_logger_on_first_use=True,
        )
    # websockets and aiohttp log through stdlib logging; keep their warnings, drop their chatter.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
