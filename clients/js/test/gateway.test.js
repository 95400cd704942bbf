// The client against a REAL gateway: `python -m gateway serve` with its built-in mock upstream,
// started once for this file. Prompts steer the mock with `[[mock ...]]` directives
// (gateway/mock/knobs.py); its `/_mock/stats` endpoint shows what the upstream saw.

import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { WebSocket } from "ws";

import { GatewayClient, GatewayError } from "../index.js";
import { expectedText, startGateway, stopGateway, upstreamRecord as upstreamRecordOf } from "./support.js";

let gateway; // { proc, url, mockBase }

const upstreamRecord = (tag, timeoutMs) => upstreamRecordOf(gateway.mockBase, tag, timeoutMs);

function client({ url = gateway.url, ...options } = {}) {
  const gw = new GatewayClient(url, { WebSocket, ...options });
  clients.push(gw);
  return gw;
}
const clients = [];

before(async () => {
  gateway = await startGateway();
});


after(async () => {
  for (const gw of clients) gw.close();
  await stopGateway(gateway);
});

describe("GatewayClient against a real gateway", { timeout: 60_000 }, () => {
  test("one stream yields every chunk in order and its result holds the exact text, citations and usage", async () => {
    const gw = client();
    const prompt = "Why is the sky blue? [[mock chunks=12]]";
    const stream = gw.stream(prompt);
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    const answer = await stream.result;
    const expected = await expectedText(prompt);
    assert.equal(chunks.join(""), expected);
    assert.equal(answer.text, expected);
    assert.ok(chunks.length > 1);
    assert.ok(answer.citations.length > 0 && answer.citations.every((c) => c.startsWith("https://")));
    assert.ok(answer.searchResults[0].url.startsWith("https://"));
    assert.ok(answer.usage.completion_tokens > 0);
    assert.equal(answer.finishReason, "stop");
    assert.equal(await stream.ended, "done");
    assert.equal(gw.state, "open");
    assert.equal(gw.welcome.protocol, 1);
  });

  test("two concurrent streams on one socket interleave and each gets its own answer", async () => {
    const gw = client();
    const prompts = ["Why is the sky blue? [[mock chunks=30 delay_ms=5]]", "Why do cats purr? [[mock chunks=30 delay_ms=5]]"];
    const streams = prompts.map((p) => gw.stream(p));
    assert.notEqual(streams[0].id, streams[1].id);
    const order = [];
    const texts = await Promise.all(
      streams.map(async (stream, i) => {
        let text = "";
        for await (const chunk of stream) {
          order.push(i);
          text += chunk;
        }
        return text;
      }),
    );
    for (const [i, prompt] of prompts.entries()) {
      assert.equal(texts[i], await expectedText(prompt));
      assert.equal((await streams[i].result).text, texts[i]);
    }
    // Both were streaming at once: a chunk of each arrived before the other stream ended.
    assert.ok(order.indexOf(1) < order.lastIndexOf(0) && order.indexOf(0) < order.lastIndexOf(1), order.join(""));
  });

  test("aborting the signal cancels the stream at the gateway, rejects result with an AbortError and spares the other stream", async () => {
    const gw = client();
    const controller = new AbortController();
    const victim = gw.stream("Why is the sky blue? [[mock chunks=500 delay_ms=20 tag=js-abort]]", {
      signal: controller.signal,
    });
    const other = gw.stream("Why do cats purr? [[mock chunks=20 delay_ms=5]]");
    const seen = [];
    await assert.rejects(
      (async () => {
        for await (const chunk of victim) {
          seen.push(chunk);
          if (seen.length === 3) controller.abort();
        }
      })(),
      { name: "AbortError" },
    );
    assert.equal(seen.length, 3, "no chunk is yielded after the abort");
    await assert.rejects(victim.result, { name: "AbortError" });
    assert.equal(await victim.ended, "cancelled", "the gateway answered `cancelled`");
    assert.equal((await upstreamRecord("js-abort")).outcome, "client_closed");
    assert.equal((await other.result).finishReason, "stop");
  });

  test("leaving a for-await loop early cancels the stream", async () => {
    const gw = client();
    const stream = gw.stream("Why is the sky blue? [[mock chunks=500 delay_ms=20 tag=js-break]]");
    for await (const chunk of stream) {
      assert.equal(typeof chunk, "string");
      break;
    }
    await assert.rejects(stream.result, { name: "AbortError" });
    assert.equal(await stream.ended, "cancelled");
    assert.equal((await upstreamRecord("js-break")).outcome, "client_closed");
  });

  test("an upstream HTTP 400 rejects result and the iteration with a typed, non-retryable GatewayError", async () => {
    const gw = client();
    const stream = gw.stream("hello [[mock status=400]]");
    const check = (error) => {
      assert.ok(error instanceof GatewayError);
      assert.equal(error.code, "upstream_error");
      assert.equal(error.retryable, false);
      assert.equal(error.status, 400);
      assert.equal(error.id, stream.id);
      assert.match(error.message, /400/);
      return true;
    };
    await assert.rejects(async () => {
      for await (const _ of stream);
    }, check);
    await assert.rejects(stream.result, check);
    assert.equal(await stream.ended, "error");
  });

  test("a retryable upstream 503 is reported retryable", async () => {
    const gw = client();
    await assert.rejects(gw.stream("hello [[mock status=503]]").result, { code: "upstream_error", retryable: true, status: 503 });
  });

  test("a refused start (an option the gateway does not allow) fails only that stream", async () => {
    const gw = client();
    const bad = gw.stream("hello", { options: { stream: false } });
    await assert.rejects(bad.result, { code: "bad_message", retryable: false });
    assert.equal((await gw.stream("Why is the sky blue? [[mock chunks=3]]").result).text.length > 0, true);
  });

  test("messages and model are sent as the start frame's fields", async () => {
    const gw = client();
    const stream = gw.stream(
      [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Tell me about tides [[mock chunks=4 tag=js-messages]]" },
      ],
      { model: "sonar-pro", options: { temperature: 0.2 } },
    );
    await stream.result;
    const record = await upstreamRecord("js-messages");
    assert.equal(record.body.model, "sonar-pro");
    assert.equal(record.body.temperature, 0.2);
    assert.equal(record.body.messages[0].content, "Be brief.");
  });

  test("streams beyond the socket's max_streams wait in the client instead of being refused", async () => {
    const gw = client();
    const welcome = await gw.connect();
    const n = welcome.limits.max_streams + 4;
    const streams = Array.from({ length: n }, (_, i) => gw.stream(`Why ${i}? [[mock chunks=5 delay_ms=2]]`));
    const answers = await Promise.all(streams.map((s) => s.result));
    assert.equal(answers.length, n);
    assert.ok(answers.every((a) => a.finishReason === "stop"));
  });

  test("an already aborted signal never sends the start", async () => {
    const gw = client();
    const stream = gw.stream("Why is the sky blue? [[mock tag=js-never]]", { signal: AbortSignal.abort() });
    await assert.rejects(stream.result, { name: "AbortError" });
    assert.equal(await stream.ended, "cancelled");
    await gw.stream("Why? [[mock chunks=2]]").result; // the socket is fine and in order
    const stats = await (await fetch(`${gateway.mockBase}/_mock/stats?tag=js-never`)).json();
    assert.equal(stats.records.length, 0);
  });

  test("ping answers with a round-trip time, and state changes reach both onstate and state listeners", async () => {
    const states = [];
    const gw = client({ onstate: (event) => states.push(event.state) });
    const fromListener = [];
    gw.addEventListener("state", (event) => fromListener.push(event.state));
    await gw.connect();
    assert.ok((await gw.ping()) >= 0);
    gw.close();
    assert.deepEqual(states, ["connecting", "open", "closed"]);
    assert.deepEqual(fromListener, ["open", "closed"], "a listener added after the constructor misses connecting");
    assert.equal(gw.state, "closed");
  });

  test("close() fails the streams still running with code closed and rejects later streams", async () => {
    const gw = client();
    const stream = gw.stream("Why is the sky blue? [[mock chunks=500 delay_ms=20 tag=js-close]]");
    for await (const _ of stream) break;
    const running = gw.stream("Why do cats purr? [[mock chunks=500 delay_ms=20 tag=js-close2]]");
    await assert.rejects(async () => {
      for await (const _ of running) gw.close();
    }, { code: "closed" });
    await assert.rejects(running.result, { code: "closed", retryable: false });
    await assert.rejects(gw.stream("late").result, { code: "closed" });
    assert.equal((await upstreamRecord("js-close2")).outcome, "client_closed");
  });

  test("parts() streams the reasoning and sources of a <think> answer before its text, one seq across kinds", async () => {
    const gw = client();
    const welcome = await gw.connect();
    assert.deepEqual(welcome.parts, ["reasoning", "sources", "tools", "progress"]);
    const prompt = "Why is the sky blue? [[mock reasoning=think sources=3 chunks=8]]";
    const stream = gw.stream(prompt, { parts: ["reasoning", "sources"] });
    const parts = [];
    for await (const part of stream.parts()) parts.push(part);
    const answer = await stream.result;
    assert.deepEqual(parts.map((p) => p.seq), parts.map((_, i) => i + 1));
    const kinds = parts.map((p) => p.kind);
    assert.deepEqual(new Set(kinds), new Set(["reasoning", "sources", "text"]));
    assert.ok(kinds.indexOf("reasoning") < kinds.indexOf("text"), kinds.join());
    const text = parts.filter((p) => p.kind === "text").map((p) => p.text).join("");
    assert.equal(text, answer.text);
    assert.ok(!text.includes("<think>"));
    assert.equal(answer.text.trim(), (await expectedText(prompt)).trim());
    assert.ok(answer.reasoning.length > 0);
    assert.equal(answer.reasoning, stream.reasoning);
    assert.deepEqual(answer.sources.map((s) => s.index), [1, 2, 3]);
    assert.deepEqual(answer.sources.map((s) => s.url), answer.citations);
  });

  test("with a token, a gateway whose auth is off answers the auth frame and serves streams without an error event", async () => {
    const gw = client({ token: "secret-token" });
    const errors = [];
    gw.addEventListener("error", (event) => errors.push(event.error));
    const stream = gw.stream("Why is the sky blue? [[mock chunks=3]]");
    assert.equal((await stream.result).finishReason, "stop");
    assert.deepEqual(errors, []);
  });
});

describe("GatewayClient against a gateway with token auth", { timeout: 60_000 }, () => {
  const TOKEN = "js-client-test-token-0123456789";
  let secured;
  let dir;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "gw-js-"));
    const file = join(dir, "tokens");
    await writeFile(file, `${TOKEN} js-tests\n`);
    secured = await startGateway("--auth-tokens-file", file);
  });

  after(async () => {
    await stopGateway(secured);
    await rm(dir, { recursive: true, force: true });
  });

  test("a valid token is accepted through first-message auth and streams run", async () => {
    const gw = new GatewayClient(secured.url, { WebSocket, token: TOKEN });
    clients.push(gw);
    const stream = gw.stream("Why is the sky blue? [[mock chunks=4]]");
    assert.equal((await stream.result).finishReason, "stop");
    assert.equal(await gw.authenticate(), null, "a refresh is answered by `authenticated`");
    gw.close();
  });

  test("a wrong token closes the client for good with a non-retryable unauthorized error", async () => {
    const states = [];
    const gw = new GatewayClient(secured.url, { WebSocket, token: "wrong-token-wrong-token", onstate: (e) => states.push(e.state) });
    clients.push(gw);
    const stream = gw.stream("Why is the sky blue?");
    await assert.rejects(stream.result, { code: "unauthorized", retryable: false, closeCode: 4401 });
    assert.equal(gw.state, "closed");
    assert.deepEqual(states, ["connecting", "closed"], "no reconnect after 4401");
  });
});

/** A TCP relay in front of the gateway whose connections the test can cut (a network drop). */
async function cuttableProxy(target) {
  const { hostname, port } = new URL(target);
  const pairs = new Set();
  const server = createServer((client) => {
    const upstream = createConnection({ host: hostname, port: Number(port) });
    const pair = [client, upstream];
    pairs.add(pair);
    client.pipe(upstream).pipe(client);
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    url: `ws://127.0.0.1:${server.address().port}${new URL(target).pathname}`,
    /** Reset every relayed connection, both ways. */
    cut: () => {
      for (const [client, upstream] of pairs) {
        client.resetAndDestroy();
        upstream.resetAndDestroy();
      }
    },
    close: () =>
      new Promise((resolve) => {
        server.close(resolve);
        for (const [client, upstream] of pairs) {
          client.destroy();
          upstream.destroy();
        }
      }),
  };
}

describe("resuming through a real network drop", { timeout: 60_000 }, () => {
  test("a stream goes on after the connection drops: the client reconnects, resumes after its last seq, and the text has no gap and no repeat", async (t) => {
    const proxy = await cuttableProxy(gateway.url);
    t.after(() => proxy.close()); // runs after the test's own gw.close()
    const states = [];
    const gw = client({ url: proxy.url, reconnect: { initialDelayMs: 20, maxDelayMs: 100 }, onstate: (e) => states.push(e.state) });
    const prompt = "Why is the sky blue? [[mock chunks=60 delay_ms=15 tag=js-resume]]";
    const stream = gw.stream(prompt);
    const chunks = [];
    for await (const chunk of stream) {
      chunks.push(chunk);
      if (chunks.length === 3) {
        if (!stream.resumeToken) {
          t.skip("this gateway gives no resume_token (resume disabled)");
          gw.close();
          return;
        }
        proxy.cut();
      }
    }
    const expected = await expectedText(prompt);
    assert.equal(chunks.join(""), expected);
    assert.equal((await stream.result).text, expected);
    assert.ok(states.includes("reconnecting"), states.join());
    assert.equal((await upstreamRecord("js-resume")).outcome, "completed", "the upstream never noticed");
    gw.close();
  });

  test("a stream with parts resumes after the last seq of any kind: every part and chunk arrives once", async (t) => {
    const proxy = await cuttableProxy(gateway.url);
    t.after(() => proxy.close());
    const gw = client({ url: proxy.url, reconnect: { initialDelayMs: 20, maxDelayMs: 100 } });
    const prompt = "Why is the sky blue? [[mock reasoning=think sources=grow:4 chunks=40 delay_ms=15 tag=js-resume-parts]]";
    const stream = gw.stream(prompt, { parts: ["reasoning", "sources"] });
    const parts = [];
    for await (const part of stream.parts()) {
      parts.push(part);
      if (parts.length === 2) proxy.cut();
    }
    const answer = await stream.result;
    assert.deepEqual(parts.map((p) => p.seq), parts.map((_, i) => i + 1));
    assert.equal(parts.filter((p) => p.kind === "text").map((p) => p.text).join(""), answer.text);
    assert.deepEqual(answer.sources.map((s) => s.index), [1, 2, 3, 4]);
    assert.equal((await upstreamRecord("js-resume-parts")).outcome, "completed");
    gw.close();
  });
});
