"""The demo page (gateway/web/) in a real headless Chromium against a real gateway.

The gateway and its mock upstream run in the test's event loop (`make_stack`), so the test can
check what the upstream saw; the page imports the JS client from the gateway (`/js/index.js`)
and renders answers as Markdown with the vendored marked and DOMPurify (gateway/web/vendor/).
One test builds the wheel, installs it in a venv of its own and loads the page from that.
Every page is checked for console errors, failed or refused requests, and requests to anywhere
but the gateway. Needs the `playwright` package and Debian's /usr/bin/chromium (Playwright
never downloads a browser here); outside CI the test is skipped when either is missing, in CI
it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.io.server import STATIC_FILES
from gateway.mock import choose_answer, text_chunks
from gateway.mock.answers import MARKDOWN_ANSWERS
from gateway.mock.script import reasoning_text
from tests.conftest import Stack, StackFactory
from tests.support import expected_text

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "gateway" / "web"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Longest wait for anything on the page, ms.
WAIT_MS = 15_000
MARKDOWN_QUESTION = "Show me some Markdown formatting"
HOSTILE_QUESTION = "What is XSS?"


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(f"{reason}; install it to run the browser test")


try:
    from playwright.async_api import BrowserContext, Page, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """A fresh headless Chromium (the system one, with its own empty profile)."""
    if async_playwright is None:
        _missing("the playwright package is not installed")
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context
        finally:
            await context.close()


async def open_page(browser: BrowserContext) -> Page:
    page = browser.pages[0] if browser.pages else await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    return page


@contextlib.asynccontextmanager
async def diagnosed(page: Page, name: str, port: int) -> AsyncIterator[list[str]]:
    """Collect the page's console messages, errors and requests; on leaving, fail on any console
    error (favicon and CSP reports included), page error, failed or refused request, or request
    to another origin than the gateway's. On failure save a screenshot
    (test-artifacts/<name>-failure.png) and add the page's log to the error."""
    log: list[str] = []
    origin = f"http://127.0.0.1:{port}/"
    page.on("console", lambda msg: log.append(f"console.{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: log.append(f"pageerror: {exc}"))
    page.on("requestfailed", lambda req: log.append(f"requestfailed: {req.url} {req.failure}"))
    page.on("request", lambda req: log.append(f"request: {req.url}"))
    page.on(
        "response",
        lambda resp: (
            log.append(f"badresponse: {resp.status} {resp.url}") if resp.status >= 400 else None
        ),
    )
    try:
        yield log
        problems = [
            line
            for line in log
            if line.startswith(("console.error", "pageerror", "requestfailed", "badresponse"))
            or (line.startswith("request: ") and not line.startswith(f"request: {origin}"))
        ]
        assert not problems, problems
    except Exception as exc:
        ARTIFACTS.mkdir(exist_ok=True)
        with contextlib.suppress(Exception):
            await page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
        exc.add_note("page log:\n" + ("\n".join(log) or "(empty)"))
        raise


def card(page: Page, tag: str) -> Any:
    """The answer card of the question carrying `tag=<tag>`."""
    return page.locator("article.card", has_text=f"tag={tag}]]")


async def ask(page: Page, question: str) -> None:
    box = page.get_by_label("Your question")
    await box.fill(question)
    await box.press("Enter")


# ------------------------------------------------------------------ streaming, stop, reconnect


async def test_two_answers_stream_side_by_side_and_stop_cancels_one_upstream(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """A user asks two questions in the demo page; both answers grow at the same time side by
    side, Stop on the first makes the gateway close its upstream request and leaves its citation
    markers rendered, linked to the sources that had arrived while it streamed, and the second
    completes with its citations as links."""
    stack = await make_stack()
    page = await open_page(browser)
    async with diagnosed(page, "browser", stack.gateway.port):
        await _ask_two_and_stop_one(stack, page)
    await stack.assert_no_leaks()


async def test_page_falls_back_to_http_streams_when_websocket_is_blocked(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """With every WebSocket refused (as a proxy that breaks upgrades does: Playwright's
    WebSocket routing closes each one before it reaches the gateway), the page's client moves
    to the HTTP streams by itself: two answers stream side by side, and Stop cancels one
    upstream request (a DELETE), exactly as over WebSocket."""
    stack = await make_stack()
    page = await open_page(browser)
    refused: list[str] = []

    async def refuse(ws: Any) -> None:
        refused.append(ws.url)
        await ws.close(code=1011, reason="blocked by the test's proxy")

    await page.route_web_socket(re.compile(".*"), refuse)
    async with diagnosed(page, "browser-http", stack.gateway.port):
        await _ask_two_and_stop_one(stack, page)
    assert refused
    metrics = stack.gateway.metrics.registry
    assert (
        metrics.get_sample_value(
            "gateway_http_requests_total", {"route": "streams", "status": "200"}
        )
        or 0
    ) >= 2
    assert (
        metrics.get_sample_value(
            "gateway_http_requests_total", {"route": "stream", "status": "204"}
        )
        or 0
    ) == 1
    await stack.assert_no_leaks()


async def _ask_two_and_stop_one(stack: Stack, page: Page) -> None:
    await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
    await page.locator('#status[data-state="open"]').wait_for()

    first = "Why is the sky blue? [[mock chunks=400 delay_ms=40 tag=a]]"
    second = "Why do cats purr? [[mock delay_ms=40 tag=b]]"
    await ask(page, first)
    question = page.get_by_label("Your question")
    await question.fill(second)
    await page.get_by_role("button", name="Ask").click()

    # Both answers have text while both are still streaming: they grow side by side, in one
    # row (the second was asked while the first streamed).
    await page.wait_for_function(
        """() => {
            const cards = [...document.querySelectorAll('article.card')];
            return cards.length === 2 && cards.every(
                (c) => c.dataset.state === 'streaming'
                    && c.querySelector('.answer').textContent.trim().split(/\\s+/).length >= 3);
        }""",
        timeout=WAIT_MS,
    )
    a, b = card(page, "a"), card(page, "b")
    assert await a.locator(".answer").get_attribute("aria-live") == "polite"
    assert await page.locator(".turn").count() == 1
    box_a, box_b = await a.bounding_box(), await b.bounding_box()
    assert box_a is not None
    assert box_b is not None
    assert box_a["y"] == box_b["y"]
    assert box_a["x"] + box_a["width"] <= box_b["x"]

    # Stop the first once it shows a citation marker.
    await a.locator(".answer sup.cite").first.wait_for()
    await a.get_by_role("button", name="Stop the answer to: " + first).click()
    await a.locator(".outcome", has_text="Stopped").wait_for()
    assert await a.get_attribute("data-state") == "stopped"
    record = stack.mock.record("a")
    await asyncio.wait_for(record.ended.wait(), WAIT_MS / 1000)
    assert record.outcome == "client_closed"
    assert 0 < record.chunks_sent < 400
    # Its markers are rendered as markers, none left raw in the text.
    raw_markers = await a.locator(".answer").evaluate(
        """(answer) => {
            const walker = document.createTreeWalker(answer, NodeFilter.SHOW_TEXT);
            const raw = [];
            while (walker.nextNode()) {
                const node = walker.currentNode;
                if (!node.parentElement.closest('sup.cite') && /\\[\\d+\\]/.test(node.data))
                    raw.push(node.data);
            }
            return raw;
        }"""
    )
    assert raw_markers == []
    # The sources stream with the answer (the page asks for them), so the stopped answer's
    # markers link to those that had arrived, and its list shows them.
    citations_a = choose_answer("Why is the sky blue?").citations
    linked = await a.locator(".answer sup.cite a").evaluate_all("ls => ls.map(l => l.href)")
    assert linked
    assert set(linked) <= set(citations_a)
    assert await a.locator(".sources a").count() > 0

    await page.locator('article.card[data-state="done"]', has_text="tag=b]]").wait_for()
    assert stack.mock.record("b").outcome == "completed"
    assert await b.locator(".answer").text_content() == expected_text(second)
    sources = b.locator(".sources a")
    assert await sources.count() > 0
    for href in await sources.evaluate_all("links => links.map(l => l.href)"):
        assert href.startswith("https://")
    citations = choose_answer("Why do cats purr?").citations
    cited = await b.locator(".answer sup.cite a").evaluate_all("ls => ls.map(l => l.href)")
    assert cited
    assert set(cited) <= set(citations)
    assert await b.locator(".outcome").text_content() != ""
    assert await b.get_by_role("button", name="Stop the answer to: " + second).is_hidden()
    assert await page.locator("#status").text_content() == "Connected"

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)


async def test_page_reconnects_by_itself_after_the_gateway_goes_away(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """When the gateway closes the page's socket with 1001 (a deploy), the page shows that it is
    reconnecting, is connected again without any user action, and answers the next question."""
    stack = await make_stack()
    page = await open_page(browser)
    async with diagnosed(page, "browser-reconnect", stack.gateway.port):
        await _reconnect(stack, page)
    await stack.assert_no_leaks()


async def _reconnect(stack: Stack, page: Page) -> None:
    await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
    status = page.locator("#status")
    await page.locator('#status[data-state="open"]').wait_for()
    # Record every state the status pill shows, so that a fast reconnect is not missed.
    await page.evaluate(
        """() => {
            window.seenStates = [];
            new MutationObserver(() => window.seenStates.push(
                document.getElementById('status').dataset.state))
              .observe(document.getElementById('status'), { attributes: true });
        }"""
    )
    for connection in list(stack.gateway.connections):
        connection.request_close(1001, "going away")
    await page.wait_for_function(
        "() => window.seenStates.includes('reconnecting')"
        " && document.getElementById('status').dataset.state === 'open'"
    )
    assert await status.text_content() == "Connected"

    prompt = "Why is the sky blue? [[mock chunks=6 tag=after]]"
    await page.get_by_label("Your question").fill(prompt)
    await page.get_by_role("button", name="Ask").click()
    done = page.locator('article.card[data-state="done"]', has_text="tag=after]]")
    await done.wait_for()
    assert await done.locator(".answer").text_content() == expected_text(prompt)


# ------------------------------------------------------------------ Markdown, safely


async def test_markdown_answer_renders_as_it_streams_with_the_newest_at_the_bottom(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """A Markdown answer is rendered while it streams (its heading shows before it ends) and in
    the end has its heading, list, monospaced code block, table and citation links; it comes
    below the earlier answer and the page follows it down, but not once the reader scrolled up.
    The page says that the answers are simulated (the mock upstream answers)."""
    stack = await make_stack()
    page = await open_page(browser)
    await page.set_viewport_size({"width": 900, "height": 500})
    async with diagnosed(page, "browser-markdown", stack.gateway.port):
        await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
        await page.locator('#status[data-state="open"]').wait_for()
        assert await page.locator("#simulated").is_visible()
        assert "Simulated answers" in (await page.locator("#simulated").text_content() or "")

        await ask(page, "Why is the sky blue? [[mock delay_ms=0 tag=first]]")
        await page.locator('article.card[data-state="done"]', has_text="tag=first]]").wait_for()

        await ask(page, f"{MARKDOWN_QUESTION} [[mock delay_ms=15 tag=md]]")
        md = card(page, "md")
        # Rendered while streaming: the heading is there before the answer ends.
        await md.locator(".answer h2").wait_for()
        assert await md.get_attribute("data-state") == "streaming"
        await page.locator('article.card[data-state="done"]', has_text="tag=md]]").wait_for()
        await _check_markdown(md)

        # Newest at the bottom, in a row of its own, and the page followed it down.
        first_box, md_box = await card(page, "first").bounding_box(), await md.bounding_box()
        assert first_box is not None
        assert md_box is not None
        assert md_box["y"] >= first_box["y"] + first_box["height"]
        assert await page.locator(".turn").count() == 2
        bottom = "document.documentElement.scrollHeight - 2"
        assert await page.evaluate(f"() => scrollY > 0 && innerHeight + scrollY >= {bottom}")

        # A reader who scrolls up to read stays there while the next answer streams.
        await ask(page, "Why do cats purr? [[mock delay_ms=25 tag=third]]")
        await page.wait_for_function(
            """() => [...document.querySelectorAll('article.card')].at(-1)
                .querySelector('.answer').textContent.trim().split(/\\s+/).length >= 3"""
        )
        await page.evaluate("() => scrollTo({ top: 0, behavior: 'instant' })")
        await page.locator('article.card[data-state="done"]', has_text="tag=third]]").wait_for()
        assert await page.evaluate("() => scrollY") == 0

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-markdown.png"), full_page=True)
    await stack.assert_no_leaks()


async def _check_markdown(md: Any) -> None:
    answer = md.locator(".answer")
    assert await answer.locator("h2").text_content() == "Streaming answers over one WebSocket"
    assert await answer.locator("ul > li").count() == 3
    assert await answer.locator("strong").text_content() == "while it is still being written"
    code = await answer.locator("pre > code").text_content()
    assert code is not None
    assert code.startswith("async with GatewayClient(")
    assert "\n    async for chunk in stream:\n        print(" in code  # indentation kept
    font = await answer.locator("pre").evaluate("pre => getComputedStyle(pre).fontFamily")
    assert "mono" in font.lower(), font
    table = answer.locator("table")
    assert await table.locator("thead th").all_text_contents() == [
        "Frame",
        "Direction",
        "Meaning",
    ]
    assert await table.locator("tbody tr").count() == 3
    assert await table.locator("tbody td code").first.text_content() == "start"
    citations = choose_answer(MARKDOWN_QUESTION).citations
    links = await answer.locator("sup.cite a").evaluate_all("ls => ls.map(l => l.href)")
    assert set(links) == set(citations)
    assert await md.locator(".sources a").count() == len(citations)


async def test_hostile_answer_is_shown_as_text_and_nothing_of_it_runs_or_loads(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """An answer carrying an <img onerror>, a <script>, a javascript: link and a remote image
    is rendered inert: neither handler nor script ran (a global and the title untouched, no
    Content-Security-Policy report), no script, img or event-handler attribute was ever inserted
    into the page, the link has no URL and the image is a link that nothing loaded."""
    stack = await make_stack()
    page = await open_page(browser)
    async with diagnosed(page, "browser-hostile", stack.gateway.port) as log:
        await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
        await page.locator('#status[data-state="open"]').wait_for()
        title = await page.title()
        # Watch the whole document from now on, partial renders while streaming included.
        await page.evaluate(
            """() => {
                window.inserted = [];
                const suspicious = (el) => ['SCRIPT', 'IMG', 'IFRAME', 'OBJECT', 'EMBED', 'svg']
                    .includes(el.tagName) || [...el.attributes].some((a) => /^on/i.test(a.name));
                new MutationObserver((records) => {
                    for (const record of records) for (const node of record.addedNodes) {
                        if (node.nodeType !== 1) continue;
                        for (const el of [node, ...node.querySelectorAll('*')])
                            if (suspicious(el)) window.inserted.push(el.outerHTML);
                    }
                }).observe(document.documentElement, { childList: true, subtree: true });
            }"""
        )
        scripts = await page.locator("script").count()

        await ask(page, f"{HOSTILE_QUESTION} [[mock delay_ms=5 tag=xss]]")
        hostile = page.locator('article.card[data-state="done"]', has_text="tag=xss]]")
        await hostile.wait_for()
        answer = hostile.locator(".answer")
        text = await answer.text_content() or ""
        assert "<img src=x onerror=" in text
        assert "<script>window.answerScriptRan" in text
        link = answer.locator("a", has_text="harmless-looking link")
        assert await link.get_attribute("href") is None
        await link.click()
        pixel = answer.locator("a", has_text="a pixel")
        assert await pixel.get_attribute("href") == "https://tracker.example/pixel.png?read=1"

        assert await page.evaluate("() => window.answerScriptRan") is None
        assert await page.title() == title
        assert await page.evaluate("() => window.inserted") == []
        assert await page.locator("script").count() == scripts
        assert await page.locator('a[href^="javascript:" i]').count() == 0
        assert not [line for line in log if "tracker.example" in line and "request" in line]
    await stack.assert_no_leaks()


async def test_page_says_simulated_only_when_the_mock_upstream_answers(
    make_stack: StackFactory,
) -> None:
    """The page is served marked "simulated" when no upstream is configured (the built-in mock
    answers) and "live" when one is."""

    async def page_of(stack: Stack) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), WAIT_MS / 1000)
        writer.close()
        await writer.wait_closed()
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        return response

    simulated = await page_of(await make_stack())
    assert b'<meta name="gateway-upstream" content="simulated">' in simulated
    live = await page_of(await make_stack(upstream_url="http://127.0.0.1:9/perplexity"))
    assert b'<meta name="gateway-upstream" content="live">' in live
    assert b'content="simulated">' not in live


# ------------------------------------------------------------------ thinking, progress, sources

#: Records, at every change inside #answers, what the last card shows (a film of the card).
WATCH_LAST_CARD = """() => {
    window.film = [];
    const shot = () => {
        const card = [...document.querySelectorAll('article.card')].at(-1);
        if (!card) return;
        const thinking = card.querySelector('details.thinking');
        window.film.push({
            state: card.dataset.state,
            thinkingShown: !thinking.hidden,
            thinkingOpen: thinking.open,
            reasoning: card.querySelector('.reasoning').textContent.length,
            answer: card.querySelector('.answer').textContent.trim().length,
            sources: card.querySelectorAll('.sources li').length,
            linked: card.querySelectorAll('.answer sup.cite a').length,
            progress: card.querySelector('.progress').hidden
                ? null : card.querySelector('.progress').textContent,
        });
    };
    new MutationObserver(shot).observe(document.getElementById('answers'), {
        subtree: true, childList: true, attributes: true, characterData: true,
    });
}"""


async def test_thinking_streams_before_the_answer_and_folds_away(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """For a reasoning model (a leading `<think>` block), the card shows an open "Thinking"
    section that streams the reasoning as plain text before the answer and folds away once the
    answer starts (the reader can open it again); the sources are listed and the `[n]` markers
    linked while the answer still streams."""
    stack = await make_stack()
    page = await open_page(browser)
    async with diagnosed(page, "browser-thinking", stack.gateway.port):
        await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
        await page.locator('#status[data-state="open"]').wait_for()
        await page.evaluate(WATCH_LAST_CARD)
        question = "Why is the sky blue?"
        prompt = f"{question} [[mock reasoning=think sources=4 delay_ms=20 tag=think]]"
        await ask(page, prompt)
        thinking_card = card(page, "think")
        await thinking_card.locator("details.thinking > summary", has_text="Thinking").wait_for()
        await page.locator('article.card[data-state="done"]', has_text="tag=think]]").wait_for()
        film = await page.evaluate("() => window.film")

        streaming = [shot for shot in film if shot["state"] == "streaming"]
        # The reasoning streamed in the open section before any answer text...
        assert any(s["thinkingOpen"] and s["reasoning"] and not s["answer"] for s in streaming)
        # ...and the section folded away once the answer came.
        assert await thinking_card.locator("details.thinking").get_attribute("open") is None
        summary = await thinking_card.locator("details.thinking > summary").text_content()
        assert summary is not None
        assert re.fullmatch(r"Thinking · \d+\.\d s", summary), summary
        # Sources listed and markers linked before the end.
        assert any(s["sources"] and s["linked"] for s in streaming)

        reasoning = thinking_card.locator(".reasoning")
        assert (await reasoning.text_content() or "").strip() == reasoning_text(
            choose_answer(question)
        )
        assert await reasoning.locator("*").count() == 0  # plain text, never HTML
        answer = await thinking_card.locator(".answer").text_content()
        assert answer is not None
        assert "<think>" not in answer
        assert "The user asks about" not in answer
        items = thinking_card.locator(".sources li")
        assert await items.evaluate_all("lis => lis.map(li => li.value)") == [1, 2, 3, 4]
        for href in await items.locator("a").evaluate_all("ls => ls.map(l => l.href)"):
            assert href.startswith("https://")
        assert await thinking_card.locator(".progress").is_hidden()

        await thinking_card.locator("details.thinking > summary").click()  # the reader opens it
        assert await thinking_card.locator("details.thinking").get_attribute("open") == ""
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-thinking.png"), full_page=True)
    await stack.assert_no_leaks()


async def test_sources_list_grows_while_the_answer_streams(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """Sources that the upstream reveals one chunk after another (Perplexity repeats its
    growing citations list on every chunk) are added to the card's list as they come, numbered
    as the answer's markers number them."""
    stack = await make_stack()
    page = await open_page(browser)
    async with diagnosed(page, "browser-sources", stack.gateway.port):
        await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
        await page.locator('#status[data-state="open"]').wait_for()
        await page.evaluate(WATCH_LAST_CARD)
        await ask(page, "Why is the sky blue? [[mock sources=grow:3 delay_ms=40 tag=grow]]")
        grown = page.locator('article.card[data-state="done"]', has_text="tag=grow]]")
        await grown.wait_for()
        film = await page.evaluate("() => window.film")
        counts = [s["sources"] for s in film if s["state"] == "streaming" and s["answer"]]
        # It grew while the text did: several sizes seen, never shrinking, up to all three.
        assert len(set(counts)) >= 2, counts
        assert counts == sorted(counts), counts
        assert counts[-1] == 3, counts
        items = grown.locator(".sources li")
        assert await items.evaluate_all("lis => lis.map(li => li.value)") == [1, 2, 3]
        links = await items.locator("a").evaluate_all("ls => ls.map(l => l.href)")
        assert links == choose_answer("Why is the sky blue?").citations
    await stack.assert_no_leaks()


async def test_progress_line_says_what_the_upstream_does(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """Perplexity's concise mode streams its reasoning steps: the card's progress line says
    "Searching: ..." and then "Reading: ..." before the answer, and goes away when it ends."""
    stack = await make_stack()
    page = await open_page(browser)
    async with diagnosed(page, "browser-progress", stack.gateway.port):
        await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
        await page.locator('#status[data-state="open"]').wait_for()
        await page.evaluate(WATCH_LAST_CARD)
        await ask(page, "Why is the sky blue? [[mock concise=1 delay_ms=30 tag=steps]]")
        steps = card(page, "steps")
        await page.locator('article.card[data-state="done"]', has_text="tag=steps]]").wait_for()
        film = await page.evaluate("() => window.film")
        lines = [s["progress"] for s in film if s["progress"]]
        said = list(dict.fromkeys(lines))  # each line once, in order
        searching = [n for n, line in enumerate(said) if line.startswith("Searching: ")]
        reading = [n for n, line in enumerate(said) if line.startswith("Reading: ")]
        assert searching, said
        assert reading, said
        assert searching[0] < reading[0], said
        assert await steps.locator(".progress").is_hidden()
        assert (await steps.locator(".answer").text_content() or "").strip()
    await stack.assert_no_leaks()


#: A Perplexity-shaped answer whose reasoning, source titles and one source URL are hostile.
HOSTILE_REASONING = '<img src=x onerror="window.pwned=1"> and <script>window.pwned=2</script>'
HOSTILE_SOURCES = [
    {"title": "<b onmouseover=window.pwned=3>Bad</b>", "url": "javascript:window.pwned=4"},
    {"title": "<img src=x onerror=window.pwned=5>Good", "url": "https://good.example/page"},
]


def hostile_events() -> list[dict[str, Any]]:
    """Perplexity chat.completion chunks: a `<think>` block, then the answer with two markers;
    citations and search_results on every chunk (as the 2026 API sends them)."""
    pieces = [f"<think>\n{HOSTILE_REASONING}\n</think>\n\n", "Bad source[1], ", "good one[2].", ""]
    events = []
    for n, piece in enumerate(pieces):
        final = n == len(pieces) - 1
        events.append(
            {
                "id": "hostile",
                "model": "sonar-reasoning",
                "created": 1767225600,
                "object": "chat.completion",
                "citations": [s["url"] for s in HOSTILE_SOURCES],
                "search_results": HOSTILE_SOURCES,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop" if final else None,
                        "message": {"role": "assistant", "content": "".join(pieces[: n + 1])},
                        "delta": {"role": "assistant", "content": piece},
                    }
                ],
            }
        )
    return events


@contextlib.asynccontextmanager
async def sse_upstream(events: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A small upstream that answers every POST with `events` as SSE (CRLF, clean EOF, as
    Perplexity does); yields its chat-completions URL."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(b"data: " + orjson.dumps(event) + b"\r\n\r\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/chat/completions"
    finally:
        await runner.cleanup()


async def test_hostile_reasoning_and_sources_are_inert(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """Reasoning and source titles full of markup are shown as the text they are, a source
    whose URL is not http(s) is neither listed nor linked (its marker stays a bare number), and
    nothing of them ran or was inserted as an element."""
    async with sse_upstream(hostile_events()) as url:
        stack = await make_stack(url=url)
        page = await open_page(browser)
        async with diagnosed(page, "browser-hostile-parts", stack.gateway.port):
            await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
            await page.locator('#status[data-state="open"]').wait_for()
            await page.evaluate(
                """() => {
                    window.inserted = [];
                    const bad = (el) => ['SCRIPT', 'IMG', 'B'].includes(el.tagName)
                        || [...el.attributes].some((a) => /^on/i.test(a.name));
                    new MutationObserver((records) => {
                        for (const record of records) for (const node of record.addedNodes) {
                            if (node.nodeType !== 1) continue;
                            for (const el of [node, ...node.querySelectorAll('*')])
                                if (bad(el)) window.inserted.push(el.outerHTML);
                        }
                    }).observe(document.documentElement, { childList: true, subtree: true });
                }"""
            )
            await ask(page, "Which sources back this?")
            done = page.locator('article.card[data-state="done"]')
            await done.wait_for()
            reasoning = await done.locator(".reasoning").text_content()
            assert reasoning is not None
            assert HOSTILE_REASONING in reasoning
            assert await done.locator(".answer").text_content() == "Bad source[1], good one[2]."
            items = done.locator(".sources li")
            assert await items.count() == 1
            assert await items.evaluate_all("lis => lis.map(li => li.value)") == [2]
            link = items.locator("a")
            assert await link.get_attribute("href") == "https://good.example/page"
            assert await link.text_content() == HOSTILE_SOURCES[1]["title"]
            markers = done.locator(".answer sup.cite")
            assert await markers.all_text_contents() == ["[1]", "[2]"]
            assert await markers.nth(0).locator("a").count() == 0
            assert await markers.nth(1).locator("a").get_attribute("href") == (
                "https://good.example/page"
            )
            assert await page.evaluate("() => window.pwned") is None
            assert await page.evaluate("() => window.inserted") == []
            assert await page.locator('a[href^="javascript:" i]').count() == 0
        await stack.assert_no_leaks()


# ------------------------------------------------------------------ what the package ships


def test_served_js_client_is_a_copy_of_clients_js() -> None:
    """gateway/web/js/ (package data, served as /js/) is byte for byte clients/js; after editing
    the client, copy it: cp clients/js/index.js clients/js/index.d.ts gateway/web/js/"""
    for name in ("index.js", "index.d.ts"):
        served = (WEB / "js" / name).read_bytes()
        source = (ROOT / "clients" / "js" / name).read_bytes()
        assert served == source, f"gateway/web/js/{name} differs from clients/js/{name}"


def test_vendored_libraries_are_the_files_their_notice_records() -> None:
    """Every file under gateway/web/vendor/ has the SHA-256 its README records, and the README
    records no file that is missing (an update must go through the README's recipe)."""
    vendor = WEB / "vendor"
    recorded = dict(
        (path, digest)
        for digest, path in re.findall(
            r"^([0-9a-f]{64})  (\S+)$", (vendor / "README.md").read_text(), re.M
        )
    )
    present = {
        str(p.relative_to(vendor)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in vendor.rglob("*")
        if p.is_file() and p.name != "README.md"
    }
    assert present == recorded


def test_every_static_file_is_in_the_package() -> None:
    """Everything the gateway serves lives in gateway/web/ (package data), none in clients/."""
    for path, (file, _) in STATIC_FILES.items():
        assert file.is_file(), path
        assert file.is_relative_to(WEB), path


def test_markdown_answers_stream_with_their_layout() -> None:
    """The mock's Markdown answers keep their line breaks and indentation through chunking, in
    any chunk size, so that a page receives real Markdown."""
    for answer in MARKDOWN_ANSWERS:
        assert "\n" in answer.text
        for words in (1, 3, 1000):
            assert "".join(text_chunks(answer.text, words=words)) == answer.text
    assert choose_answer(MARKDOWN_QUESTION) is MARKDOWN_ANSWERS[0]
    assert choose_answer(HOSTILE_QUESTION) is MARKDOWN_ANSWERS[1]


@pytest.fixture
def installed_gateway(tmp_path: Path) -> Path:
    """A venv of its own with the gateway installed from a freshly built wheel; yields its
    python. The wheel is built from a copy of what a Docker build copies (pyproject.toml,
    README.md, gateway/), so nothing of the checkout can stand in for missing package data."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "gateway", src / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    started = time.monotonic()
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("llm_ws_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file, _ in STATIC_FILES.values():
        assert f"gateway/web/{file.relative_to(WEB)}" in names, file
    for notice in ("README.md", "marked/LICENSE.md", "dompurify/LICENSE"):
        assert f"gateway/web/vendor/{notice}" in names, notice
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", str(wheel)], check=True)
    print(f"wheel built and installed in {time.monotonic() - started:.1f} s")
    return python


@pytest.mark.timeout(180)  # a cold pip cache downloads the dependencies
async def test_installed_wheel_serves_a_working_page(
    installed_gateway: Path, browser: BrowserContext, tmp_path: Path
) -> None:
    """`python -m gateway` from a venv where only the wheel is installed, run outside the
    repository, serves the page and everything it loads: it connects, says its answers are
    simulated and renders a Markdown answer."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "PYTHON", "VIRTUAL_ENV")) and k != "PERPLEXITY_API_KEY"
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = await asyncio.create_subprocess_exec(
        str(installed_gateway),
        "-m",
        "gateway",
        "serve",
        "--port",
        "0",
        "--log-format",
        "json",
        cwd=run_dir,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[bytes] = []
    try:
        async with asyncio.timeout(WAIT_MS / 1000):
            while True:
                raw = await proc.stderr.readline()
                assert raw, b"".join(lines).decode()
                lines.append(raw)
                with contextlib.suppress(orjson.JSONDecodeError):
                    event = orjson.loads(raw)
                    if event.get("event") == "gateway.listening":
                        break
        port = int(event["url"].rsplit(":", 1)[1].split("/", 1)[0])
        page = await open_page(browser)
        async with diagnosed(page, "browser-wheel", port):
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.locator('#status[data-state="open"]').wait_for()
            assert await page.locator("#simulated").is_visible()
            await ask(page, f"{MARKDOWN_QUESTION} [[mock delay_ms=2 tag=wheel]]")
            done = page.locator('article.card[data-state="done"]', has_text="tag=wheel]]")
            await done.wait_for()
            await _check_markdown(done)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(proc.stderr.read(), WAIT_MS / 1000)
            lines.append(rest)
            await asyncio.wait_for(proc.wait(), WAIT_MS / 1000)
    installed = b"".join(lines)
    assert b"Traceback" not in installed, installed.decode()
    assert proc.returncode == 0, installed.decode()
