// The gateway's Vercel AI SDK endpoint (POST /v1/ai-sdk/chat) read by the REAL `ai` package
// (pinned in package.json: the newest major whose engines include Node 20): its own chat
// transport (`DefaultChatTransport`, what `useChat` uses by default) and its own UI message
// stream reader (`readUIMessageStream`), against a real gateway process.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { DefaultChatTransport, readUIMessageStream } from "ai";

import { expectedText, startGateway, stopGateway, upstreamRecord } from "./support.js";

function httpBase(gateway) {
  return gateway.url.replace(/^ws/, "http").replace(/\/v1\/ws$/, "");
}

function userMessage(text) {
  return { id: `u-${Math.random().toString(36).slice(2)}`, role: "user", parts: [{ type: "text", text }] };
}

/** The last state of the assistant message a UI message stream builds (an error chunk, or the
 * aborted fetch, rejects). */
async function lastMessage(stream, onMessage = () => {}) {
  let message = null;
  for await (const current of readUIMessageStream({ stream, terminateOnError: true })) {
    message = current;
    onMessage(current);
  }
  return message;
}

const textOf = (message) => message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

describe("the AI SDK endpoint, Stop mode (default)", { timeout: 60_000 }, () => {
  let gateway;
  let transport;

  before(async () => {
    gateway = await startGateway();
    transport = new DefaultChatTransport({ api: `${httpBase(gateway)}/v1/ai-sdk/chat` });
  });
  after(() => stopGateway(gateway));

  test("useChat's transport streams text, reasoning and sources into one assistant message", async () => {
    const prompt = "Why is the sky blue? [[mock chunks=8 reasoning=think sources=3]]";
    const stream = await transport.sendMessages({
      chatId: "chat-1",
      messages: [userMessage(prompt)],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: undefined,
    });
    const message = await lastMessage(stream);
    assert.equal(message.role, "assistant");
    assert.equal(textOf(message), await expectedText(prompt));
    const reasoning = message.parts.filter((p) => p.type === "reasoning");
    assert.equal(reasoning.length, 1);
    assert.ok(reasoning[0].text.length > 0);
    assert.equal(reasoning[0].state, "done");
    const sources = message.parts.filter((p) => p.type === "source-url");
    assert.equal(sources.length, 3);
    assert.ok(sources.every((s) => s.url.startsWith("https://")));
    assert.ok(message.parts.findIndex((p) => p.type === "reasoning") < message.parts.findIndex((p) => p.type === "text"));
    assert.equal(message.metadata.finish_reason, "stop");
  });

  test("the whole conversation is sent: earlier turns, system text", async () => {
    const prompt = "Why do cats purr? [[mock chunks=3]]";
    const stream = await transport.sendMessages({
      chatId: "chat-2",
      messages: [
        { id: "s", role: "system", parts: [{ type: "text", text: "Be brief." }] },
        userMessage("hello"),
        { id: "a", role: "assistant", parts: [{ type: "reasoning", text: "hmm" }, { type: "text", text: "Hi!" }] },
        userMessage(prompt),
      ],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: undefined,
    });
    assert.equal(textOf(await lastMessage(stream)), await expectedText(prompt));
  });

  test("a tool loop's next turn (the call and its output, as the SDK keeps them) is accepted", async () => {
    const prompt = "Why do cats purr? [[mock chunks=3]]";
    const stream = await transport.sendMessages({
      chatId: "chat-tools",
      messages: [
        userMessage("weather?"),
        {
          id: "a1",
          role: "assistant",
          parts: [
            { type: "tool-weather", toolCallId: "c1", state: "output-available", input: { city: "Oslo" }, output: { celsius: 3 } },
          ],
        },
        userMessage(prompt),
      ],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: undefined,
    });
    assert.equal(textOf(await lastMessage(stream)), await expectedText(prompt));
  });

  test("Stop (the aborted fetch) cancels the upstream request at once", async () => {
    const controller = new AbortController();
    const stream = await transport.sendMessages({
      chatId: "chat-stop",
      messages: [userMessage("Why is the sky blue? [[mock chunks=500 delay_ms=20 tag=ai-stop]]")],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: controller.signal,
    });
    let seen = "";
    await assert.rejects(
      lastMessage(stream, (message) => {
        seen = textOf(message);
        if (seen.split(" ").length > 3) controller.abort();
      }),
      { name: "AbortError" },
    );
    assert.ok(seen.length > 0);
    assert.equal((await upstreamRecord(gateway.mockBase, "ai-stop")).outcome, "client_closed");
  });

  test("an upstream error ends the message with an error chunk the SDK raises", async () => {
    const stream = await transport.sendMessages({
      chatId: "chat-error",
      messages: [userMessage("Why is the sky blue? [[mock chunks=5 fault=error after=2]]")],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: undefined,
    });
    await assert.rejects(lastMessage(stream), /Overloaded/);
  });

  test("a request the gateway refuses is the SDK's error, with the gateway's message", async () => {
    await assert.rejects(
      transport.sendMessages({ chatId: "x", messages: [], trigger: "submit-message", messageId: undefined, abortSignal: undefined }),
      /non-empty list of UI messages/,
    );
  });
});

describe("the AI SDK endpoint, resumable mode (--ai-sdk-resume)", { timeout: 60_000 }, () => {
  let gateway;
  let api;
  let transport;

  before(async () => {
    gateway = await startGateway("--ai-sdk-resume");
    api = `${httpBase(gateway)}/v1/ai-sdk/chat`;
    transport = new DefaultChatTransport({ api });
  });
  after(() => stopGateway(gateway));

  test("an aborted response is a drop: the SDK's reconnect replays the whole message and follows", async () => {
    const prompt = "Why is the sky blue? [[mock chunks=40 delay_ms=15 tag=ai-resume]]";
    const controller = new AbortController();
    const stream = await transport.sendMessages({
      chatId: "chat-resume",
      messages: [userMessage(prompt)],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: controller.signal,
    });
    await assert.rejects(
      lastMessage(stream, (message) => {
        if (textOf(message).split(" ").length > 3) controller.abort();
      }),
      { name: "AbortError" },
    );
    const resumed = await transport.reconnectToStream({ chatId: "chat-resume" });
    assert.ok(resumed, "a stream is active for the chat");
    const message = await lastMessage(resumed);
    assert.equal(textOf(message), await expectedText(prompt));
    assert.equal((await upstreamRecord(gateway.mockBase, "ai-resume")).outcome, "completed");
    assert.equal(await transport.reconnectToStream({ chatId: "chat-resume" }), null, "204 once it ended");
    assert.equal(await transport.reconnectToStream({ chatId: "never-started" }), null);
  });

  test("DELETE on the chat's stream path stops it", async () => {
    const controller = new AbortController();
    const stream = await transport.sendMessages({
      chatId: "chat-delete",
      messages: [userMessage("Why is the sky blue? [[mock chunks=500 delay_ms=20 tag=ai-delete]]")],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: controller.signal,
    });
    await assert.rejects(
      lastMessage(stream, (message) => {
        if (textOf(message).length > 0) controller.abort();
      }),
      { name: "AbortError" },
    );
    const response = await fetch(`${api}/chat-delete/stream`, { method: "DELETE" });
    assert.equal(response.status, 204);
    assert.equal((await upstreamRecord(gateway.mockBase, "ai-delete")).outcome, "client_closed");
    assert.equal(await transport.reconnectToStream({ chatId: "chat-delete" }), null);
  });
});
