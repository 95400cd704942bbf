"""The pure core: what the gateway decides, with no I/O, no clock and no randomness of its own.

Protocol frames, the stream lifecycle and each socket's session and outbox, resume retention,
SSE parsing and the upstream dialects, retry and quota policy. Nothing here imports asyncio,
aiohttp, websockets, redis, time, random or secrets (import contracts in pyproject.toml, checked
by `make test`): the shell in `gateway.io` feeds it events and carries out what it decides.
"""
