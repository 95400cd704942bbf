"""Security: authentication, origins, quotas, log redaction, TLS (docs/security.md)."""

from __future__ import annotations

import io
import ssl
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import structlog
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import (
    AuthError,
    Principal,
    TokenAuthenticator,
    is_loopback_host,
    origin_allowed,
    parse_tokens,
    query_has_token,
)
from gateway.config import Config
from gateway.core.quotas import Quotas
from gateway.io.server import Gateway
from gateway.observability import configure_logging
from tests.conftest import Client, FakeClock, Stack, StackFactory, check_stream

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef01"
SECRET = "hs256-test-secret-that-is-long-enough-for-sha256"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# token principal\n{ALICE} alice\n\n{BOB} bob\n")
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_jwt(sub: str = "carol", ttl: float = 60, **claims: Any) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "exp": int(now + ttl), **claims}, SECRET, algorithm="HS256")


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        await connect(url, **kwargs)
    return info.value.response.status_code


async def closed_code(client: Client) -> int | None:
    """Read until the gateway closes the socket; return its close code."""
    with pytest.raises(ConnectionClosed):
        await client.recv_until(lambda f: False, timeout=5)
    return client.ws.close_code


# ------------------------------------------------------------------ pure pieces


def test_tokens_file_format() -> None:
    """Token files take `token principal` lines; malformed lines are refused by number."""
    tokens = parse_tokens(f"# c\n{ALICE} alice\n")
    assert list(tokens.values()) == [Principal("alice")]
    for bad in ("onlyonefield0123456789", "short alice", f"{ALICE} al ice", f"{ALICE} bad|name"):
        with pytest.raises(ValueError, match="line 1"):
            parse_tokens(bad)


def test_static_and_jwt_authentication(tokens_file: Path) -> None:
    """Static tokens map to their principal; JWTs to `sub` with exp; bad ones raise."""
    auth = TokenAuthenticator(tokens_file, jwt_secret=SECRET, audience="gw", issuer="idp")
    now = time.time()
    assert auth.authenticate(ALICE, now).name == "alice"
    token = make_jwt(aud="gw", iss="idp")
    principal = auth.authenticate(token, now)
    assert principal.name == "carol"
    assert principal.expires_at is not None
    bad = [
        "nope-not-a-token-at-all",
        ALICE[:-1],
        make_jwt(ttl=-5, aud="gw", iss="idp"),  # expired
        make_jwt(aud="other", iss="idp"),  # wrong audience
        make_jwt(aud="gw", iss="evil"),  # wrong issuer
        make_jwt(aud="gw", iss="idp", nbf=int(now + 600)),  # not yet valid
        jwt.encode({"sub": "x", "aud": "gw", "iss": "idp"}, "wrong-secret" * 4, "HS256"),
        jwt.encode({"aud": "gw", "iss": "idp"}, SECRET, "HS256"),  # no sub
    ]
    for token in bad:
        with pytest.raises(AuthError):
            auth.authenticate(token, now)
    # The server's clock decides expiry too (so expiry is testable without waiting).
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(make_jwt(ttl=60, aud="gw", iss="idp"), now + 120)


def test_es256_public_key() -> None:
    """An ES256 JWT verifies against the configured public key; an HS256 one forged with the
    public key as secret does not (algorithm confusion)."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    auth = TokenAuthenticator(jwt_public_key=public)
    good = jwt.encode({"sub": "dave", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert auth.authenticate(good, time.time()).name == "dave"
    with pytest.raises(AuthError):
        auth.authenticate(jwt.encode({"sub": "eve"}, "x" * 32, algorithm="HS256"), time.time())


@pytest.mark.parametrize(
    ("origin", "allowed", "own", "ok"),
    [
        ("http://localhost:3000", ("http://localhost:*",), None, True),
        ("http://localhost", ("http://localhost:*",), None, True),
        ("http://localhost.evil.com:80", ("http://localhost:*",), None, False),
        ("http://127.0.0.1:8080", ("http://127.0.0.1:*",), None, True),
        ("https://evil.example", ("http://localhost:*",), None, False),
        ("https://app.example", ("https://app.example",), None, True),
        ("https://app.example:444", ("https://app.example",), None, False),
        ("https://x.example", ("*",), None, True),
        ("https://gw.example", (), "https://gw.example", True),
        ("null", ("http://localhost:*",), None, False),
    ],
)
def test_origin_matching(origin: str, allowed: tuple[str, ...], own: str | None, ok: bool) -> None:
    """Origins match exactly, by any port where the entry says :*, or as the gateway's own."""
    assert origin_allowed(origin, allowed, own) is ok


def test_query_tokens_and_loopback_detection() -> None:
    """Credentials in a URL are recognised; loopback binds are told from public ones."""
    assert query_has_token("/v1/ws?token=abc")
    assert query_has_token("/v1/ws?x=1&access_token=abc")
    assert not query_has_token("/v1/ws?lang=en")
    assert [is_loopback_host(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_quotas_sockets_streams_and_rate() -> None:
    """Per-principal sockets, concurrent streams and a per-minute token bucket, with memory
    released when a principal holds nothing."""
    q = Quotas(sockets_per_principal=2, streams_per_principal=2, starts_per_minute=3)
    assert q.open_socket("a") is None
    assert q.open_socket("a") is None
    assert q.open_socket("a") is not None
    assert q.open_socket("b") is None
    assert q.start_stream("a", 0) is None
    assert q.start_stream("a", 0) is None
    refused = q.start_stream("a", 0)
    assert refused is not None
    assert refused.retry_after_ms is None
    q.end_stream("a", 0)
    q.end_stream("a", 0)
    assert q.start_stream("a", 0) is None  # third start in the minute
    q.end_stream("a", 0)
    rate = q.start_stream("a", 0)
    assert rate is not None
    assert rate.retry_after_ms == 20001
    assert q.start_stream("a", 20.0) is None
    q.end_stream("a", 20.0)
    for _ in range(2):
        q.close_socket("a", 200.0)
    q.close_socket("b", 200.0)
    assert len(q) == 0


# ------------------------------------------------------------------ over real sockets


async def test_header_auth(make_stack: StackFactory, tokens_file: Path) -> None:
    """A valid Bearer header gets welcome; a bad one gets HTTP 401 before any upgrade."""
    stack = await make_stack(auth_tokens_file=str(tokens_file))
    client = await stack.client(additional_headers=bearer(ALICE))
    await client.start("s", "sky [[mock chunks=3]]")
    check_stream((await client.finish("s"))["s"])
    assert (
        await refused_status(stack.url, additional_headers=bearer("wrong-token-xxxxxxxxxx")) == 401
    )
    assert (
        await refused_status(stack.url, additional_headers={"Authorization": "Basic Zm9v"}) == 401
    )
    assert await refused_status(stack.url + "?token=" + ALICE) == 400


async def test_first_message_auth(make_stack: StackFactory, tokens_file: Path) -> None:
    """Browsers send `auth` first: welcome comes only after it; a bad token, another message
    first, or silence past --auth-timeout close the socket with 4401."""
    clock = FakeClock()
    stack = await make_stack(
        clock=clock, auth_tokens_file=str(tokens_file), auth_timeout=5, ping_interval=0
    )
    silent = Client(await connect(stack.url))
    await clock.timer_set(5)  # its deadline runs from the open
    [silent_connection] = stack.gateway.connections
    ws = await connect(stack.url)
    good = Client(ws)
    await good.send({"type": "auth", "token": BOB})
    assert (await good.recv())["type"] == "welcome"
    await good.start("s", "sky [[mock chunks=2]]")
    check_stream((await good.finish("s"))["s"])
    await ws.close()
    for first in ({"type": "auth", "token": "bad-token-bad-token-bad"}, {"type": "ping"}):
        bad = Client(await connect(stack.url))
        await bad.send(first)
        assert await closed_code(bad) == 4401
    clock.advance(4.9)
    # (The refused sockets' own deadlines may still be there: the gateway forgets them when
    # their TCP close reaches it, which can come after their close frame reached the client.)
    assert silent_connection in stack.gateway.auth_deadlines
    clock.advance(0.1)
    assert await closed_code(silent) == 4401
    assert silent.log == []  # not even a welcome


async def test_expiring_jwt_refuses_starts_then_closes(make_stack: StackFactory) -> None:
    """When a JWT expires mid-socket: the running stream finishes, new starts get
    `unauthorized`, and the socket closes with 4401 once no stream runs."""
    clock = FakeClock()
    stack = await make_stack(
        clock=clock, jwt_secret=SECRET, ping_interval=0, upstream_read_timeout=0
    )
    client = await stack.client(additional_headers=bearer(make_jwt(ttl=60)))
    await client.start("long", "sky [[mock chunks=40 delay_ms=20]]")
    await client.recv_until(lambda f: f["type"] == "text_chunk")
    [connection] = stack.gateway.connections
    clock.advance(59)
    assert connection.session.authorized
    clock.advance(2)  # past the token's expiry (a whole second: exp is an integer)
    assert not connection.session.authorized
    await client.start("late", "sky")
    refused = await client.recv_until(lambda f: f.get("id") == "late")
    assert (refused["code"], refused["retryable"]) == ("unauthorized", False)
    frames = (await client.finish("long"))["long"]
    assert frames[-1]["type"] == "done"
    assert await closed_code(client) == 4401


async def test_refreshed_jwt_keeps_the_socket(make_stack: StackFactory) -> None:
    """A fresh `auth` before expiry is acknowledged and keeps the socket usable after the old
    token's expiry; a refresh for another principal closes with 4401."""
    clock = FakeClock()
    stack = await make_stack(clock=clock, jwt_secret=SECRET, ping_interval=0)
    client = await stack.client(additional_headers=bearer(make_jwt(ttl=10)))
    await client.send({"type": "auth", "token": make_jwt(ttl=120)})
    ack = await client.recv()
    assert ack["type"] == "authenticated"
    assert ack["expires_at"] > time.time() + 60
    clock.advance(30)  # the first token's expiry passes (the subject of this test)
    await client.start("s", "sky [[mock chunks=2]]")
    assert (await client.finish("s"))["s"][-1]["type"] == "done"
    await client.send({"type": "auth", "token": make_jwt(sub="mallory")})
    assert await closed_code(client) == 4401


async def test_origin_checks(make_stack: StackFactory, tokens_file: Path) -> None:
    """Open mode admits only loopback origins; with auth, the gateway's own origin or the
    configured list; requests without Origin (apps, servers) are judged by token alone."""
    open_stack = await make_stack()
    assert await refused_status(open_stack.url, origin="https://evil.example") == 403
    ok = await open_stack.client(origin="http://localhost:5173")
    await ok.send({"type": "ping"})
    assert (await ok.recv())["type"] == "pong"
    authed = await make_stack(
        auth_tokens_file=str(tokens_file), allowed_origins=("https://app.example",)
    )
    assert (
        await refused_status(
            authed.url, origin="http://localhost:5173", additional_headers=bearer(ALICE)
        )
        == 403
    )
    await authed.client(origin="https://app.example", additional_headers=bearer(ALICE))
    await authed.client(additional_headers=bearer(ALICE))  # no Origin: a server or an app


async def test_socket_stream_and_rate_quotas(make_stack: StackFactory, tokens_file: Path) -> None:
    """Per-principal quotas: the third socket closes 4429, concurrent streams beyond the quota
    get too_many_streams, and starts beyond the rate get rate_limited with retry_after_ms."""
    stack = await make_stack(
        auth_tokens_file=str(tokens_file),
        max_sockets_per_principal=2,
        max_streams_per_principal=2,
        starts_per_minute=3,
    )
    first = await stack.client(additional_headers=bearer(ALICE))
    assert first.welcome["limits"]["max_streams_per_principal"] == 2
    assert first.welcome["limits"]["starts_per_minute"] == 3
    second = await stack.client(additional_headers=bearer(ALICE))
    third = Client(await connect(stack.url, additional_headers=bearer(ALICE)))
    assert await closed_code(third) == 4429
    await stack.client(additional_headers=bearer(BOB))  # other principals are unaffected
    await first.start("a", "sky [[mock fault=stall]]")
    await second.start("b", "sky [[mock fault=stall]]")
    await first.recv_until(lambda f: f["type"] == "started")
    await second.recv_until(lambda f: f["type"] == "started")
    await first.start("c", "sky")
    err = await first.recv_until(lambda f: f.get("id") == "c")
    assert (err["code"], err["retryable"]) == ("too_many_streams", True)
    await first.cancel("a")
    await first.finish("a")
    await first.start("d", "sky [[mock chunks=1]]")  # third start of the minute
    await first.finish("d")
    await first.start("e", "sky")
    limited = await first.recv_until(lambda f: f.get("id") == "e")
    assert limited["code"] == "rate_limited"
    assert 0 < limited["retry_after_ms"] <= 20001


async def test_open_gateway_refuses_public_bind() -> None:
    """Without auth, binding beyond loopback needs --insecure-no-auth."""
    gateway = Gateway(Config(host="0.0.0.0", port=0), "http://127.0.0.1:9/perplexity")
    with pytest.raises(SystemExit, match="--insecure-no-auth"):
        await gateway.start()
    allowed = Gateway(
        Config(host="0.0.0.0", port=0, insecure_no_auth=True), "http://127.0.0.1:9/perplexity"
    )
    await allowed.start()
    await allowed.stop()


async def test_sighup_reload(make_stack: StackFactory, tokens_file: Path) -> None:
    """Reloading the tokens file admits new tokens and drops removed ones; a broken file
    keeps the old tokens."""
    stack = await make_stack(auth_tokens_file=str(tokens_file))
    newcomer = "newcomer-token-0123456789"
    assert await refused_status(stack.url, additional_headers=bearer(newcomer)) == 401
    tokens_file.write_text(f"{newcomer} newcomer\n")
    stack.gateway.reload_tokens()
    await stack.client(additional_headers=bearer(newcomer))
    assert await refused_status(stack.url, additional_headers=bearer(ALICE)) == 401
    tokens_file.write_text("garbage\n")
    stack.gateway.reload_tokens()
    await stack.client(additional_headers=bearer(newcomer))


async def test_tls(make_stack: StackFactory, tmp_path: Path) -> None:
    """--tls-cert/--tls-key serve wss:// that a client trusting the CA can use."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    stack = await make_stack(tls_cert=str(cert_path), tls_key=str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"wss://127.0.0.1:{stack.gateway.port}/v1/ws"
    async with connect(url, ssl=context) as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "welcome"
        await client.start("s", "sky [[mock chunks=3]]")
        check_stream((await client.finish("s"))["s"])
    with pytest.raises(ssl.SSLError):
        await connect(url, ssl=ssl.create_default_context())  # untrusted CA


async def test_logs_never_contain_prompts_answers_or_keys(make_stack: StackFactory) -> None:
    """With default settings, JSON logs of a full session (stream, error, cancel) contain
    neither the planted prompt, the answer, the upstream key nor the client token; with
    --log-content the prompt is logged."""
    key = "pplx-PLANTED-upstream-key-42"
    prompt = "PLANTED-PROMPT-marmalade-7 sky"
    sink = io.BytesIO()

    async def session(stack: Stack) -> str:
        client = await stack.client()
        await client.start("a", prompt + " [[mock chunks=6]]")
        await client.start("b", prompt + " [[mock status=401 body=json]]")
        await client.start("c", prompt + " [[mock fault=stall after=1]]")
        await client.recv_until(lambda f: f.get("id") == "c" and f["type"] == "text_chunk")
        await client.cancel("c")
        result = await client.finish("a", "b", "c")
        await client.ws.close()
        await stack.assert_no_leaks()
        return check_stream(result["a"])

    configure_logging("json", "debug", stream=sink)
    try:
        answer = await session(await make_stack(api_key=key, upstream_retries=0))
        quiet = sink.getvalue().decode()
        sink.seek(0)
        sink.truncate()
        await session(await make_stack(api_key=key, log_content=True, upstream_retries=0))
        verbose = sink.getvalue().decode()
    finally:
        structlog.reset_defaults()
    lines = [orjson.loads(line) for line in quiet.splitlines()]
    assert any(line["event"] == "stream.end" for line in lines)
    for planted in (key, "PLANTED-PROMPT", answer[:30]):
        assert planted not in quiet
    assert "PLANTED-PROMPT" in verbose
    assert key not in verbose


async def test_upstream_cookies_are_never_replayed(make_stack: StackFactory) -> None:
    """A Set-Cookie from the upstream is not stored: the next request (maybe another
    principal's) carries no Cookie header. (The URL uses a host name: aiohttp's default jar
    would keep a cookie for it, not for a bare IP.)"""
    from aiohttp import web

    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Cookie"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.set_cookie("sid", "alice-session-secret")
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        stack = await make_stack(
            url=f"http://localhost:{port}/v1/chat/completions", dialect="openai"
        )
        client = await stack.client()
        for sid in ("a", "b"):
            await client.start(sid, "hello")
            assert (await client.finish(sid))[sid][-1]["type"] == "done"
        assert seen == [None, None]
    finally:
        await runner.cleanup()
