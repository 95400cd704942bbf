// Connection handling against a scripted WebSocket server (the `ws` package): first-message auth,
// reconnect on close codes, resume after a reconnect, and typed answer parts (reasoning, sources,
// tool calls, progress) with exactly the frames a test wants. Each server step is awaited, never
// slept on.

import assert from "node:assert/strict";
import { once } from "node:events";
import { after, describe, test } from "node:test";
import { WebSocket, WebSocketServer } from "ws";

import { GatewayClient, GatewayError, assistantMessage } from "../index.js";

const WELCOME = { type: "welcome", protocol: 1, session: "scripted", limits: { max_streams: 16, max_message_bytes: 65536 } };
const FAST = { initialDelayMs: 5, maxDelayMs: 20 };

/** A server whose sockets are handed to the test in order, with a queue of received frames each. */
async function scriptedServer() {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await once(wss, "listening");
  const pending = [];
  const waiting = [];
  const urls = [];
  wss.on("connection", (socket, request) => {
    urls.push(request.url);
    const peer = wrap(socket);
    const waiter = waiting.shift();
    if (waiter) waiter(peer);
    else pending.push(peer);
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}/v1/ws`,
    urls,
    /** The next accepted socket. */
    accept: () => (pending.length ? Promise.resolve(pending.shift()) : new Promise((r) => waiting.push(r))),
    close: () => new Promise((resolve) => {
      for (const client of wss.clients) client.terminate();
      wss.close(resolve);
    }),
  };
}

function wrap(socket) {
  const frames = [];
  const waiting = [];
  socket.on("message", (data) => {
    const frame = JSON.parse(String(data));
    const waiter = waiting.shift();
    if (waiter) waiter(frame);
    else frames.push(frame);
  });
  return {
    socket,
    send: (frame) => socket.send(JSON.stringify(frame)),
    /** The next frame the client sent. */
    recv: () => (frames.length ? Promise.resolve(frames.shift()) : new Promise((r) => waiting.push(r))),
  };
}

/** Resolve when the client reaches `state`. */
function reaches(gw, state) {
  if (gw.state === state) return Promise.resolve();
  return new Promise((resolve) => {
    gw.addEventListener("state", function listener(event) {
      if (event.state === state) {
        gw.removeEventListener("state", listener);
        resolve(event);
      }
    });
  });
}

const servers = [];
async function server() {
  const s = await scriptedServer();
  servers.push(s);
  return s;
}
after(async () => {
  for (const s of servers) await s.close();
});

describe("GatewayClient connection handling (scripted server)", { timeout: 30_000 }, () => {
  test("with a token, the client sends auth first and waits for welcome; the token is not in the URL", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, token: "t0ken" });
    const peer = await srv.accept();
    const stream = gw.stream("hi");
    assert.deepEqual(await peer.recv(), { type: "auth", token: "t0ken" });
    assert.equal(gw.state, "connecting");
    peer.send(WELCOME);
    assert.deepEqual(await peer.recv(), { type: "ping" }, "a barrier that tells the auth's answer from a refresh's");
    peer.send({ type: "pong" });
    const start = await peer.recv();
    assert.deepEqual(start, { type: "start", id: stream.id, prompt: "hi" });
    peer.send({ type: "started", id: stream.id });
    peer.send({ type: "text_chunk", id: stream.id, seq: 1, text: "Hello" });
    peer.send({ type: "done", id: stream.id, seq: 1, text: "Hello", finish_reason: "stop" });
    assert.equal((await stream.result).text, "Hello");
    assert.equal(srv.urls[0], "/v1/ws");
    gw.close();
  });

  for (const echo of [
    { type: "authenticated", expires_at: null },
    { type: "error", id: null, code: "unknown_type", message: "unknown message type 'auth'", retryable: false },
  ]) {
    test(`a gateway that welcomes at once and answers auth with ${echo.type} is fine, and a later refresh resolves with its own expiry`, async () => {
      const srv = await server();
      const gw = new GatewayClient(srv.url, { WebSocket, token: "t0ken" });
      const errors = [];
      gw.addEventListener("error", (event) => errors.push(event.error));
      const peer = await srv.accept();
      peer.send(WELCOME);
      assert.deepEqual(await peer.recv(), { type: "auth", token: "t0ken" });
      assert.deepEqual(await peer.recv(), { type: "ping" });
      peer.send(echo);
      peer.send({ type: "pong" });
      const refreshed = gw.authenticate("n3w");
      assert.deepEqual(await peer.recv(), { type: "auth", token: "n3w" });
      peer.send({ type: "authenticated", expires_at: 1234 });
      assert.equal(await refreshed, 1234);
      assert.deepEqual(errors, []);
      gw.close();
    });
  }

  test("close code 4401 ends the client for good: streams fail with unauthorized and nothing reconnects", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, token: "bad", reconnect: FAST });
    const peer = await srv.accept();
    const stream = gw.stream("hi");
    await peer.recv();
    const closed = reaches(gw, "closed");
    peer.socket.close(4401, "bad token");
    const event = await closed;
    assert.equal(event.closeCode, 4401);
    await assert.rejects(stream.result, (error) => error instanceof GatewayError && error.code === "unauthorized" && !error.retryable);
    await assert.rejects(gw.connect(), { code: "unauthorized" });
    assert.equal(srv.urls.length, 1);
  });

  for (const code of [1001, 1011, 4408, 1006]) {
    test(`close code ${code} reconnects with backoff; a stream without resume_token fails with retryable connection_lost and new streams work`, async () => {
      const srv = await server();
      const states = [];
      const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST, onstate: (e) => states.push(e.state) });
      const first = await srv.accept();
      first.send(WELCOME);
      const stream = gw.stream("hi");
      await first.recv();
      first.send({ type: "started", id: stream.id });
      if (code === 1006) first.socket.terminate();
      else first.socket.close(code, "bye");
      await assert.rejects(stream.result, { code: "connection_lost", retryable: true });
      const second = await srv.accept();
      second.send(WELCOME);
      await reaches(gw, "open");
      assert.deepEqual(states, ["connecting", "open", "reconnecting", "open"]);
      const next = gw.stream("again");
      assert.equal((await second.recv()).id, next.id);
      gw.close();
    });
  }

  test("after a reconnect a stream with a resume_token resumes after its last seq and yields no chunk twice", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST });
    const first = await srv.accept();
    first.send(WELCOME);
    const stream = gw.stream("hi");
    const { id } = await first.recv();
    first.send({ type: "started", id, resume_token: "rt-1" });
    first.send({ type: "text_chunk", id, seq: 1, text: "One " });
    first.send({ type: "text_chunk", id, seq: 2, text: "two " });
    const iterator = stream[Symbol.asyncIterator]();
    assert.deepEqual(await iterator.next(), { value: "One ", done: false });
    assert.deepEqual(await iterator.next(), { value: "two ", done: false });
    first.socket.terminate();
    const second = await srv.accept();
    second.send(WELCOME);
    assert.deepEqual(await second.recv(), { type: "resume", id, resume_token: "rt-1", after: 2 });
    second.send({ type: "resumed", id });
    second.send({ type: "text_chunk", id, seq: 2, text: "two " }); // a replay the client skips
    second.send({ type: "text_chunk", id, seq: 3, text: "three" });
    second.send({ type: "done", id, seq: 3, text: "One two three" });
    assert.deepEqual(await iterator.next(), { value: "three", done: false });
    assert.deepEqual(await iterator.next(), { value: undefined, done: true });
    assert.equal((await stream.result).text, "One two three");
    assert.equal(stream.text, "One two three");
    gw.close();
  });

  test("a resumable stream aborted while disconnected is resumed on the next socket only to be cancelled there", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST });
    const first = await srv.accept();
    first.send(WELCOME);
    const controller = new AbortController();
    const stream = gw.stream("hi", { signal: controller.signal });
    const { id } = await first.recv();
    first.send({ type: "started", id, resume_token: "rt-9" });
    first.send({ type: "text_chunk", id, seq: 1, text: "One " });
    for await (const _ of stream) break; // the first chunk arrived; leaving the loop cancels...
    assert.deepEqual(await first.recv(), { type: "cancel", id });
    first.socket.terminate(); // ...but the socket dies before the gateway answers
    await assert.rejects(stream.result, { name: "AbortError" });
    const second = await srv.accept();
    second.send(WELCOME);
    assert.deepEqual(await second.recv(), { type: "resume", id, resume_token: "rt-9", after: 1 });
    assert.deepEqual(await second.recv(), { type: "cancel", id });
    second.send({ type: "resumed", id, after: 1 });
    second.send({ type: "text_chunk", id, seq: 2, text: "two" });
    second.send({ type: "cancelled", id, seq: 2 });
    assert.equal(await stream.ended, "cancelled");
    assert.equal(stream.text, "One ", "nothing is added after the abort");
    gw.close();
  });

  test("close() cancels the running streams before closing the socket", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket });
    const peer = await srv.accept();
    peer.send(WELCOME);
    const stream = gw.stream("hi");
    const { id } = await peer.recv();
    peer.send({ type: "started", id, resume_token: "rt-2" });
    peer.send({ type: "text_chunk", id, seq: 1, text: "One" });
    assert.deepEqual(await stream[Symbol.asyncIterator]().next(), { value: "One", done: false });
    const closed = once(peer.socket, "close");
    gw.close();
    assert.deepEqual(await peer.recv(), { type: "cancel", id });
    const [code] = await closed;
    assert.equal(code, 1000);
    await assert.rejects(stream.result, { code: "closed" });
  });

  test("a refused resume fails the stream with the gateway's error", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST });
    const first = await srv.accept();
    first.send(WELCOME);
    const stream = gw.stream("hi");
    const { id } = await first.recv();
    first.send({ type: "started", id, resume_token: "rt-1" });
    first.socket.terminate();
    const second = await srv.accept();
    second.send(WELCOME);
    assert.equal((await second.recv()).type, "resume");
    second.send({ type: "error", id, code: "resume_expired", message: "too late", retryable: true });
    await assert.rejects(stream.result, { code: "resume_expired", retryable: true });
    gw.close();
  });

  test("streams started while reconnecting wait and are sent once the connection is open", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST });
    const first = await srv.accept();
    first.send(WELCOME);
    await reaches(gw, "open");
    first.socket.close(1001, "going away");
    await reaches(gw, "reconnecting");
    const stream = gw.stream("while down");
    const second = await srv.accept();
    second.send(WELCOME);
    assert.deepEqual(await second.recv(), { type: "start", id: stream.id, prompt: "while down" });
    gw.close();
    await assert.rejects(stream.result, { code: "closed" });
  });

  test("a gateway's normal close (idle timeout) leaves the client idle until the next stream", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST });
    const first = await srv.accept();
    first.send(WELCOME);
    await reaches(gw, "open");
    first.socket.close(1000, "idle timeout");
    await reaches(gw, "idle");
    assert.equal(srv.urls.length, 1);
    const stream = gw.stream("wake up");
    const second = await srv.accept();
    second.send(WELCOME);
    assert.equal((await second.recv()).id, stream.id);
    gw.close();
  });

  test("a start frame over the welcome's max_message_bytes fails locally with message_too_large", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket });
    const peer = await srv.accept();
    peer.send({ ...WELCOME, limits: { max_streams: 2, max_message_bytes: 100 } });
    const stream = gw.stream("x".repeat(200));
    await assert.rejects(stream.result, { code: "message_too_large", retryable: false });
    const small = gw.stream("ok");
    assert.equal((await peer.recv()).id, small.id, "the big start was never sent");
    gw.close();
  });
});

const WEATHER_TOOL = {
  type: "function",
  function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } },
};
const SKY = "https://en.wikipedia.org/wiki/Rayleigh_scattering";
const SKY_SOURCE = { index: 1, url: SKY, title: "Rayleigh scattering", date: "2025-01-20" };

/** One content message of every kind, seq 1 to 7, then `done`. */
function partFrames(id) {
  return [
    { type: "reasoning_chunk", id, seq: 1, text: "The user asks " },
    { type: "reasoning_chunk", id, seq: 2, text: "about light." },
    { type: "progress", id, seq: 3, step: { kind: "search", queries: ["sky"] } },
    { type: "sources", id, seq: 4, sources: [SKY_SOURCE] },
    { type: "text_chunk", id, seq: 5, text: "Blue light scatters more[1]. " },
    { type: "tool_call", id, seq: 6, call_id: "call_1", name: "get_weather", arguments: { city: "Paris" } },
    { type: "tool_call", id, seq: 7, call_id: "call_2", name: "get_weather", arguments_raw: '{"city": Par' },
    {
      type: "done",
      id,
      seq: 7,
      text: "Blue light scatters more[1]. ",
      citations: [SKY],
      reasoning: "The user asks about light.",
      tool_calls: [
        { call_id: "call_1", name: "get_weather", arguments: { city: "Paris" } },
        { call_id: "call_2", name: "get_weather", arguments_raw: '{"city": Par' },
      ],
      finish_reason: "tool_calls",
    },
  ];
}

describe("typed answer parts (scripted server)", { timeout: 30_000 }, () => {
  test("parts() yields every kind in order, text included, while the stream's own iteration yields only text; result has reasoning, sources and tool calls", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket });
    const peer = await srv.accept();
    peer.send({ ...WELCOME, parts: ["reasoning", "sources", "tools", "progress"] });
    const stream = gw.stream("Why is the sky blue?", {
      parts: ["reasoning", "sources", "progress"],
      tools: [WEATHER_TOOL],
      toolChoice: "auto",
      options: { temperature: 0.2 },
    });
    const start = await peer.recv();
    assert.deepEqual(start, {
      type: "start",
      id: stream.id,
      prompt: "Why is the sky blue?",
      options: { temperature: 0.2, tools: [WEATHER_TOOL], tool_choice: "auto" },
      parts: ["reasoning", "sources", "progress", "tools"],
    });
    peer.send({ type: "started", id: stream.id });
    for (const frame of partFrames(stream.id)) peer.send(frame);
    const [parts, chunks] = await Promise.all([
      (async () => {
        const seen = [];
        for await (const part of stream.parts()) seen.push(part);
        return seen;
      })(),
      (async () => {
        const seen = [];
        for await (const chunk of stream) seen.push(chunk);
        return seen;
      })(),
    ]);
    assert.deepEqual(parts, [
      { kind: "reasoning", seq: 1, text: "The user asks " },
      { kind: "reasoning", seq: 2, text: "about light." },
      { kind: "progress", seq: 3, step: { kind: "search", queries: ["sky"] } },
      { kind: "sources", seq: 4, sources: [SKY_SOURCE] },
      { kind: "text", seq: 5, text: "Blue light scatters more[1]. " },
      { kind: "tool_call", seq: 6, callId: "call_1", name: "get_weather", arguments: { city: "Paris" } },
      { kind: "tool_call", seq: 7, callId: "call_2", name: "get_weather", argumentsRaw: '{"city": Par' },
    ]);
    assert.deepEqual(chunks, ["Blue light scatters more[1]. "]);
    const answer = await stream.result;
    assert.equal(answer.reasoning, "The user asks about light.");
    assert.equal(stream.reasoning, answer.reasoning);
    assert.deepEqual(answer.sources, [SKY_SOURCE]);
    assert.deepEqual(answer.toolCalls, [
      { callId: "call_1", name: "get_weather", arguments: { city: "Paris" } },
      { callId: "call_2", name: "get_weather", argumentsRaw: '{"city": Par' },
    ]);
    assert.equal(answer.finishReason, "tool_calls");
    assert.equal(answer.refusal, false);
    assert.deepEqual(assistantMessage(answer), {
      role: "assistant",
      content: "Blue light scatters more[1]. ",
      tool_calls: [
        { id: "call_1", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } },
        { id: "call_2", type: "function", function: { name: "get_weather", arguments: '{"city": Par' } },
      ],
    });
    assert.throws(() => stream.parts(), TypeError, "one parts() iteration per stream");
    gw.close();
  });

  test("a stream that asks for nothing new sends protocol 1's start, and a refusal is flagged", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket });
    const peer = await srv.accept();
    peer.send(WELCOME);
    const stream = gw.stream("Do something bad");
    assert.deepEqual(await peer.recv(), { type: "start", id: stream.id, prompt: "Do something bad" });
    peer.send({ type: "started", id: stream.id });
    peer.send({ type: "text_chunk", id: stream.id, seq: 1, text: "I can't." });
    peer.send({ type: "done", id: stream.id, seq: 1, text: "I can't.", refusal: true });
    const answer = await stream.result;
    assert.equal(answer.refusal, true);
    assert.deepEqual([answer.reasoning, answer.sources, answer.toolCalls], ["", [], []]);
    assert.deepEqual(assistantMessage(answer), { role: "assistant", content: "I can't." });
    gw.close();
  });

  test("tools given twice, or parts that are not a list, are refused at once", () => {
    const gw = new GatewayClient("ws://127.0.0.1:9/v1/ws", { WebSocket, connect: false });
    assert.throws(() => gw.stream("x", { tools: [WEATHER_TOOL], options: { tools: [WEATHER_TOOL] } }), TypeError);
    assert.throws(() => gw.stream("x", { parts: "reasoning" }), TypeError);
    gw.close();
  });

  test("a tool loop's messages (an assistant message with tool_calls and content null, tool results) are sent as given", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket });
    const peer = await srv.accept();
    peer.send(WELCOME);
    const messages = [
      { role: "user", content: "Weather in Paris?" },
      assistantMessage({ text: "", toolCalls: [{ callId: "call_1", name: "get_weather", arguments: { city: "Paris" } }] }),
      { role: "tool", tool_call_id: "call_1", content: '{"celsius": 21}' },
    ];
    assert.equal(messages[1].content, null);
    const stream = gw.stream(messages, { tools: [WEATHER_TOOL] });
    assert.deepEqual(await peer.recv(), {
      type: "start",
      id: stream.id,
      messages,
      options: { tools: [WEATHER_TOOL] },
      parts: ["tools"],
    });
    gw.close();
  });

  test("after a drop in the middle of the parts, the resume starts after the last seq of any kind and nothing arrives twice", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket, reconnect: FAST });
    const first = await srv.accept();
    first.send(WELCOME);
    const stream = gw.stream("hi", { parts: ["reasoning", "sources", "progress", "tools"] });
    const { id } = await first.recv();
    first.send({ type: "started", id, resume_token: "rt-parts" });
    for (const frame of partFrames(id).slice(0, 4)) first.send(frame);
    const parts = stream.parts();
    const seen = [];
    for (let i = 0; i < 4; i += 1) seen.push((await parts.next()).value);
    first.socket.terminate();
    const second = await srv.accept();
    second.send(WELCOME);
    assert.deepEqual(await second.recv(), { type: "resume", id, resume_token: "rt-parts", after: 4 });
    second.send({ type: "resumed", id, after: 4 });
    for (const frame of partFrames(id).slice(2)) second.send(frame); // seq 3 and 4 again: skipped
    for (;;) {
      const { value, done } = await parts.next();
      if (done) break;
      seen.push(value);
    }
    assert.deepEqual(seen.map((p) => p.seq), [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(stream.sources, [SKY_SOURCE]);
    assert.equal((await stream.result).text, "Blue light scatters more[1]. ");
    gw.close();
  });

  test("leaving a parts() loop early cancels the stream", async () => {
    const srv = await server();
    const gw = new GatewayClient(srv.url, { WebSocket });
    const peer = await srv.accept();
    peer.send(WELCOME);
    const stream = gw.stream("hi", { parts: ["reasoning"] });
    const { id } = await peer.recv();
    peer.send({ type: "started", id });
    peer.send(partFrames(id)[0]);
    for await (const part of stream.parts()) {
      assert.equal(part.kind, "reasoning");
      break;
    }
    assert.deepEqual(await peer.recv(), { type: "cancel", id });
    peer.send({ type: "cancelled", id, seq: 1, usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 } });
    await assert.rejects(stream.result, { name: "AbortError" });
    assert.equal(await stream.ended, "cancelled");
    gw.close();
  });
});
