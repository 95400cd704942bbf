"""Logging setup: structlog with JSON lines (orjson) for machines, pretty output on a TTY.

Context is bound with contextvars: `session` per socket and `stream` per stream task, so every
line a stream's code writes says which socket and stream it belongs to. Prompts, answers and keys
are never passed to a logger.
"""

from __future__ import annotations

import logging
import sys
from typing import BinaryIO, Final

import orjson
import structlog

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
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
                file=stream if stream is not None else sys.stderr.buffer
            ),
            cache_logger_on_first_use=True,
        )
    # websockets and aiohttp log through stdlib logging; keep their warnings, drop their chatter.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
