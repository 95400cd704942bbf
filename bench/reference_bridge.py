"""The yardstick of issue 4: a straightforward websockets + aiohttp bridge (not the gateway).

The issue states its targets against "a straightforward websockets + aiohttp bridge" measured on
the machine it was written on. Machines differ (and a VM's speed drifts with its neighbours), so
`make bench` runs this bridge beside the gateway, on the same core, with the same load, and
reports the gateway's numbers as ratios to it as well as absolute ones.

It is what one writes first: websockets' asyncio server with a handler task per socket, a task
per stream, `async for line in resp.content` over the upstream body, one `send` per chunk. It
uses the gateway's event loop (uvloop when installed) and JSON library (orjson), so the ratio
measures the design, not the libraries. It speaks just enough of the gateway's protocol for
bench/loadgen.js: `welcome`; `start` -> `started`, `text_chunk` (seq), `done` (seq, text);
`cancel` -> `cancelled`. No auth, limits, resume or error handling beyond a terminal `error`.

    python bench/reference_bridge.py --port 9000 --upstream-url http://127.0.0.1:8081/openai
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import signal
from typing import Any

import aiohttp
import orjson
from websockets.asyncio.server import Request, Response, ServerConnection, serve


async def relay(
    ws: ServerConnection, http_session: aiohttp.ClientSession, url: str, sid: str, prompt: str
) -> None:
    """One stream: POST the prompt, relay each SSE delta as a `text_chunk`, then `done`."""
    seq = 0
    parts: list[str] = []
    body = {"model": "sonar", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    try:
        await ws.send(orjson.dumps({"type": "started", "id": sid}), text=True)
        async with http_session.post(url, json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                choices = orjson.loads(data).get("choices") or [{}]
                text = choices[0].get("delta", {}).get("content")
                if text:
                    seq += 1
                    parts.append(text)
                    msg = {"type": "text_chunk", "id": sid, "seq": seq, "text": text}
                    await ws.send(orjson.dumps(msg), text=True)
        done = {"type": "done", "id": sid, "seq": seq, "text": "".join(parts)}
        await ws.send(orjson.dumps(done), text=True)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await ws.send(orjson.dumps({"type": "cancelled", "id": sid}), text=True)
        raise
    except Exception as exc:
        with contextlib.suppress(Exception):
            error = {"type": "error", "id": sid, "code": "upstream_error", "message": str(exc)}
            await ws.send(orjson.dumps(error), text=True)


async def handler(ws: ServerConnection, http_session: aiohttp.ClientSession, url: str) -> None:
    """One socket: a task per stream, keyed by the client's id."""
    tasks: dict[str, asyncio.Task[None]] = {}
    await ws.send(orjson.dumps({"type": "welcome"}), text=True)
    try:
        async for message in ws:
            msg: dict[str, Any] = orjson.loads(message)
            sid = msg.get("id", "")
            if msg.get("type") == "start":
                coro = relay(ws, http_session, url, sid, msg["prompt"])
                task = asyncio.get_running_loop().create_task(coro, name=f"relay {sid}")
                tasks[sid] = task
                task.add_done_callback(lambda t, sid=sid: tasks.pop(sid, None))
            elif msg.get("type") == "cancel" and sid in tasks:
                tasks[sid].cancel()
    finally:
        for task in tasks.values():
            task.cancel()


def healthz(connection: ServerConnection, request: Request) -> Response | None:
    """bench/run.py waits for GET /healthz before it starts the load."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "ok\n")
    return None


async def main(port: int, url: str) -> None:
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    connector = aiohttp.TCPConnector(limit=0)  # no pool cap: 1,000 streams at once
    async with (
        aiohttp.ClientSession(connector=connector) as http_session,
        serve(
            lambda ws: handler(ws, http_session, url), "127.0.0.1", port, process_request=healthz
        ),
    ):
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(args.port, args.upstream_url))
    else:
        uvloop.run(main(args.port, args.upstream_url))
