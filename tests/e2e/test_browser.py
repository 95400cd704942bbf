"""The demo page (gateway/web/index.html) in a real headless Chromium against a real gateway.

The gateway and its mock upstream run in the test's event loop (`make_stack`), so the test can
check what the upstream saw; the page imports the JS client from the gateway (`/js/index.js`).
Needs the `playwright` package and Debian's /usr/bin/chromium (Playwright never downloads a
browser here); outside CI the test is skipped when either is missing, in CI it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, StackFactory
from tests.support import expected_text

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
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


@contextlib.asynccontextmanager
async def diagnosed(page: Page, name: str) -> AsyncIterator[list[str]]:
    """Collect the page's console messages and errors; on failure save a screenshot
    (test-artifacts/<name>-failure.png) and add the page's log to the error."""
    log: list[str] = []
    page.on("console", lambda msg: log.append(f"console.{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: log.append(f"pageerror: {exc}"))
    page.on("requestfailed", lambda req: log.append(f"requestfailed: {req.url} {req.failure}"))
    try:
        yield log
    except Exception as exc:
        ARTIFACTS.mkdir(exist_ok=True)
        with contextlib.suppress(Exception):
            await page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
        exc.add_note("page log:\n" + ("\n".join(log) or "(empty)"))
        raise


def card(page: Page, tag: str) -> Any:
    """The answer card of the question carrying `tag=<tag>`."""
    return page.locator("article.card", has_text=f"tag={tag}]]")


async def test_two_answers_stream_side_by_side_and_stop_cancels_one_upstream(
    make_stack: StackFactory, browser: BrowserContext
) -> None:
    """A user asks two questions in the demo page; both answers grow at the same time, Stop on
    the first makes the gateway close its upstream request, and the second completes with its
    citations as links."""
    stack = await make_stack()
    page = browser.pages[0] if browser.pages else await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with diagnosed(page, "browser") as log:
        await _ask_two_and_stop_one(stack, page)
        assert not [line for line in log if line.startswith("pageerror")], log
    await stack.assert_no_leaks()


async def _ask_two_and_stop_one(stack: Stack, page: Page) -> None:
    await page.goto(f"http://127.0.0.1:{stack.gateway.port}/")
    await page.locator('#status[data-state="open"]').wait_for()

    first = "Why is the sky blue? [[mock chunks=400 delay_ms=40 tag=a]]"
    second = "Why do cats purr? [[mock delay_ms=40 tag=b]]"
    question = page.get_by_label("Your question")
    await question.fill(first)
    await question.press("Enter")
    await question.fill(second)
    await page.get_by_role("button", name="Ask").click()

    # Both answers have text while both are still streaming: they grow side by side.
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

    await a.get_by_role("button", name="Stop the answer to: " + first).click()
    await a.locator(".outcome", has_text="Stopped").wait_for()
    assert await a.get_attribute("data-state") == "stopped"
    record = stack.mock.record("a")
    await asyncio.wait_for(record.ended.wait(), WAIT_MS / 1000)
    assert record.outcome == "client_closed"
    assert 0 < record.chunks_sent < 400

    await page.locator('article.card[data-state="done"]', has_text="tag=b]]").wait_for()
    assert stack.mock.record("b").outcome == "completed"
    assert await b.locator(".answer").text_content() == expected_text(second)
    sources = b.locator(".sources a")
    assert await sources.count() > 0
    for href in await sources.evaluate_all("links => links.map(l => l.href)"):
        assert href.startswith("https://")
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
    page = browser.pages[0] if browser.pages else await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    async with diagnosed(page, "browser-reconnect"):
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
