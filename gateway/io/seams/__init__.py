"""The shortcuts into dependencies' internals, each behind one small interface with a public-API
fallback beside it, and the startup self-tests that pick between them.

Twice a release of a dependency changed its private internals under the hot path. So every
shortcut here has a mode that uses only the public API, a self-test that runs the shortcut for
real at startup, and a flag that forces either mode:

- **upstream body** (`--upstream-body auto|push|pull`): `push` turns aiohttp's body reader
  inside out, so each piece of body its HTTP parser decodes goes straight into the relay in the
  same callback (`PushReader`: a class swap that relies on the reader's slot layout, on
  `feed_data`, `feed_eof`, `set_exception` and `total_bytes`, and on pausing the connection's
  protocol); `pull` reads `resp.content.iter_any()` in the relay's task, and a relay whose
  socket is behind simply stops reading (aiohttp's own buffer limit then pauses the socket).
- **client frames** (`--client-frames auto|fast|standard`): `fast` parses whole, unfragmented
  client frames in the gateway itself when websockets' parser is at a frame boundary, which it
  learns by walking the parser's generators (`at_frame_boundary`); `standard` gives every byte
  to websockets' `receive_data`.

`auto` runs the self-test and takes the fast mode only when it passes; otherwise it logs why and
takes the fallback. The modes in force are logged (`gateway.seams`) and exported
(`gateway_seam_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.io.seams.client_frames import (
    at_frame_boundary,
    forget_parser_error,
    frames_self_test,
)
from gateway.io.seams.upstream_body import (
    FEEDS,
    BodySink,
    PushReader,
    attach_push,
    detach_push,
    pool_idle,
    push_self_test,
    set_reading,
)

__all__ = [
    "FEEDS",
    "BodySink",
    "Modes",
    "PushReader",
    "at_frame_boundary",
    "attach_push",
    "choose",
    "detach_push",
    "forget_parser_error",
    "frames_self_test",
    "pool_idle",
    "push_self_test",
    "set_reading",
]


# ------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class Modes:
    """The mode of each seam in force, and why `auto` fell back where it did."""

    upstream_body: str
    client_frames: str
    fallbacks: dict[str, str] = field(default_factory=dict)


async def choose(upstream_body: str, client_frames: str) -> Modes:
    """Resolve `auto` by running the self-tests; forced modes are taken as they are."""
    fallbacks: dict[str, str] = {}
    if upstream_body == "auto":
        problem = await push_self_test()
        upstream_body = "push" if problem is None else "pull"
        if problem is not None:
            fallbacks["upstream_body"] = problem
    if client_frames == "auto":
        problem = frames_self_test()
        client_frames = "fast" if problem is None else "standard"
        if problem is not None:
            fallbacks["client_frames"] = problem
    return Modes(upstream_body, client_frames, fallbacks)
