// The HTTP transport (docs/protocol.md, "HTTP streams") against a REAL gateway: the same
// client API over POST/GET/DELETE /v1/streams, chosen with `transport: "http"` or fallen back to
// by `transport: "auto"` when WebSocket fails.

import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { WebSocket } from "ws";

import { GatewayClient } from "../index.js";
import { expectedText, startGateway, stopGateway, upstreamRecord } from "./support.js";

let gateway;
const clients = [];

before(async () => {
  gateway = await startGateway();
});

after(async () => {
  for (const gw of clients) gw.close();
  await stopGateway(gateway);
});

function client(options) {
  const gw = new GatewayClient(gateway.url, options);
  clients.push(gw);
  return gw;
}

/** A WebSocket that never connects: what a proxy that blocks upgrades looks like to a page. */
class BlockedWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: "", wasClean: false });
    }, 5);
  }
  send() {
    throw new Error("not open");
  }
  close() {}
}

/** A WebSocket that opens but never says anything: a proxy that accepts the upgrade and then
 * passes nothing through. */
class SilentWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.({});
    }, 5);
  }
  send() {}
  close() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: 1006, reason: "", wasClean: false }), 0);
  }
}

/** A fetch whose first streamed response breaks off after `bytes` bytes of body (a dropped
 * mobile connection); every other request goes through. */
function cuttingFetch(bytes) {
  let cut = false;
  return async (url, init) => {
    const response = await fetch(url, init);
    if (cut || init.method !== "POST" || !response.ok) return response;
    cut = true;
    const reader = response.body.getReader();
    let seen = 0;
    const body = new ReadableStream({
      async pull(controller) {
        const { value, done } = await reader.read();
        if (done) return controller.close();
        seen += value.length;
        if (seen > bytes) {
          controller.enqueue(value.subarray(0, value.length - (seen - bytes)));
          reader.cancel();
          controller.error(new TypeError("network error"));
          return;
        }
        controller.enqueue(value);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

describe("the HTTP transport against a real gateway", { timeout: 60_000 }, () => {
  test('transport "http" streams every chunk in order, with parts, and the same result', async () => {
    const gw = client({ transport: "http" });
    assert.equal(gw.transport, "http");
    const prompt = "Why is the sky blue? [[mock chunks=10]]";
    const stream = gw.stream(prompt, { parts: ["sources"] });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    const answer = await stream.result;
    assert.equal(chunks.join(""), await expectedText(prompt));
    assert.equal(answer.text, chunks.join(""));
    assert.equal(answer.finishReason, "stop");
    assert.ok(answer.citations.length > 0);
    assert.ok(stream.resumeToken, "started carried the resume token");
    assert.equal(gw.welcome.transport, "http");
  });

  test("concurrent HTTP streams each get their own answer", async () => {
    const gw = client({ transport: "http" });
    const prompts = ["Why is the sky blue? [[mock chunks=20 delay_ms=5]]", "Why do cats purr? [[mock chunks=20 delay_ms=5]]"];
    const answers = await Promise.all(prompts.map((p) => gw.stream(p).result));
    for (const [i, prompt] of prompts.entries()) assert.equal(answers[i].text, await expectedText(prompt));
  });

  test("aborting a stream sends DELETE: the upstream request is closed and the stream ends cancelled", async () => {
    const gw = client({ transport: "http" });
    const controller = new AbortController();
    const stream = gw.stream("Why is the sky blue? [[mock chunks=500 delay_ms=20 tag=js-http-abort]]", {
      signal: controller.signal,
    });
    let seen = 0;
    await assert.rejects(
      (async () => {
        for await (const _ of stream) if (++seen === 3) controller.abort();
      })(),
      { name: "AbortError" },
    );
    assert.equal(await stream.ended, "cancelled");
    assert.equal((await upstreamRecord(gateway.mockBase, "js-http-abort")).outcome, "client_closed");
  });

  test("a refusal before the stream starts is a typed error (HTTP 400 bad_message)", async () => {
    const gw = client({ transport: "http" });
    const stream = gw.stream("hi", { options: { stream: false } });
    await assert.rejects(stream.result, { code: "bad_message", retryable: false });
  });

  test("a response that breaks off is resumed with GET after its last seq: no gap, no repeat", async () => {
    const gw = client({ transport: "http", fetch: cuttingFetch(600) });
    const prompt = "Why is the sky blue? [[mock chunks=30 delay_ms=10]]";
    const stream = gw.stream(prompt);
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    assert.equal(chunks.join(""), await expectedText(prompt));
    assert.equal((await stream.result).text, chunks.join(""));
  });

  test('transport "auto" falls back to HTTP when the WebSocket upgrade fails, and stays there', async () => {
    const states = [];
    const gw = client({ WebSocket: BlockedWebSocket, onstate: (e) => states.push([e.state, e.transport]) });
    assert.equal(gw.transport, "websocket");
    const prompt = "Why is the sky blue? [[mock chunks=6]]";
    const answer = await gw.stream(prompt).result;
    assert.equal(answer.text, await expectedText(prompt));
    assert.equal(gw.transport, "http");
    assert.deepEqual(states.slice(0, 3), [
      ["connecting", "websocket"],
      ["reconnecting", "http"],
      ["open", "http"],
    ]);
  });

  test('transport "auto" falls back to HTTP when the socket opens but no welcome comes in time', async () => {
    const gw = client({ WebSocket: SilentWebSocket, welcomeTimeoutMs: 200 });
    const prompt = "Why do cats purr? [[mock chunks=4]]";
    assert.equal((await gw.stream(prompt).result).text, await expectedText(prompt));
    assert.equal(gw.transport, "http");
  });

  test('transport "auto" uses the WebSocket when it works', async () => {
    const gw = client({ WebSocket });
    await gw.stream("Why is the sky blue? [[mock chunks=3]]").result;
    assert.equal(gw.transport, "websocket");
    assert.equal(gw.welcome.transport, undefined);
  });
});

describe("the HTTP transport with token auth", { timeout: 60_000 }, () => {
  const TOKEN = "js-http-test-token-0123456789";
  let secured;
  let dir;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "gw-js-http-"));
    const file = join(dir, "tokens");
    await writeFile(file, `${TOKEN} js-http\n`);
    secured = await startGateway("--auth-tokens-file", file);
  });

  after(async () => {
    await stopGateway(secured);
    await rm(dir, { recursive: true, force: true });
  });

  test("the token goes in the Authorization header of every request", async () => {
    const gw = new GatewayClient(secured.url, { transport: "http", token: TOKEN });
    clients.push(gw);
    assert.equal((await gw.stream("Why is the sky blue? [[mock chunks=3]]").result).finishReason, "stop");
    gw.close();
  });

  test("a wrong token fails the stream as unauthorized", async () => {
    const gw = new GatewayClient(secured.url, { transport: "http", token: "wrong-token-wrong-token" });
    clients.push(gw);
    await assert.rejects(gw.stream("Why is the sky blue?").result, { code: "unauthorized", retryable: false });
    gw.close();
  });
});
