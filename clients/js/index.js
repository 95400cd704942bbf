// Client for the LLM WebSocket gateway, protocol v1 (docs/protocol.md).
//
// One ES module, no build step, no dependencies: browsers use their native WebSocket, Node 20+
// passes one (e.g. the `ws` package) as `new GatewayClient(url, { WebSocket })`.
// Types: index.d.ts.
//
// Typed parts (docs/protocol.md, "Parts"): `gw.stream(prompt, { parts: ["reasoning", "sources"] })`
// asks for them, `stream.parts()` yields them in order with the text; every content message of a
// stream shares one seq, which is what a resume after a reconnect starts from.

export const PROTOCOL_VERSION = 1;

/**
 * Close codes after which the client reconnects by itself (with jittered backoff): going away,
 * abnormal closure, internal error, restart, try again later, slow consumer (4408) and too many
 * connections for this principal (4429).
 */
export const RECONNECT_CLOSE_CODES = Object.freeze([1001, 1006, 1011, 1012, 1013, 4408, 4429]);
/** Close code of a refused token: never reconnect. */
export const CLOSE_UNAUTHORIZED = 4401;

const DEFAULT_RECONNECT = Object.freeze({
  initialDelayMs: 250,
  maxDelayMs: 30_000,
  factor: 2,
  maxAttempts: Infinity,
});
/** A local close code for "no welcome in time" (never sent by a server). */
const CLOSE_WELCOME_TIMEOUT = 4000;
const encoder = new TextEncoder();

/** An error of the gateway or of the connection, with the protocol's `code` and `retryable`. */
export class GatewayError extends Error {
  constructor(code, message, init = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = "GatewayError";
    this.code = code;
    this.retryable = Boolean(init.retryable);
    this.id = init.id ?? null;
    this.seq = init.seq;
    this.status = init.status;
    this.retryAfterMs = init.retryAfterMs;
    this.closeCode = init.closeCode;
  }

  /** The GatewayError for a protocol `error` frame. */
  static fromFrame(frame) {
    return new GatewayError(String(frame.code), String(frame.message ?? frame.code), {
      retryable: frame.retryable,
      id: frame.id,
      seq: frame.seq,
      status: frame.status,
      retryAfterMs: frame.retry_after_ms,
    });
  }
}

/** Dispatched as "state" on a GatewayClient whenever its connection state changes. */
export class GatewayStateEvent extends Event {
  constructor(state, init = {}) {
    super("state");
    this.state = state;
    this.previous = init.previous ?? null;
    this.attempt = init.attempt ?? 0;
    this.delayMs = init.delayMs ?? null;
    this.closeCode = init.closeCode ?? null;
    this.error = init.error ?? null;
    /** "websocket" or "http": the transport of the connection this state is about. */
    this.transport = init.transport ?? "websocket";
  }
}

/** Dispatched as "error" on a GatewayClient for errors tied to no stream (`id: null`). */
export class GatewayErrorEvent extends Event {
  constructor(error) {
    super("error");
    this.error = error;
  }
}

function abortError(message = "The stream was aborted.") {
  return new DOMException(message, "AbortError");
}

function closedError(message = "The client was closed.") {
  return new GatewayError("closed", message, { retryable: false });
}

function connectionLost(closeCode) {
  return new GatewayError(
    "connection_lost",
    `The connection to the gateway was lost (close code ${closeCode}) and the stream cannot be resumed.`,
    { retryable: true, closeCode },
  );
}

/** The part kinds a start may ask for besides text (docs/protocol.md, "Parts"). */
export const PART_KINDS = Object.freeze(["reasoning", "sources", "tools", "progress"]);

/** A tool call as the client API shows it (camelCase; `argumentsRaw` when not valid JSON). */
function toolCallOf(body) {
  const call = { callId: body.call_id, name: body.name };
  if ("arguments_raw" in body) call.argumentsRaw = body.arguments_raw;
  else call.arguments = body.arguments;
  return call;
}

/** The answer of a stream that ended with `done`; what `done` lacks is taken from what streamed. */
function answerOf(frame, stream) {
  return {
    id: frame.id,
    text: frame.text,
    seq: frame.seq,
    citations: frame.citations ?? [],
    searchResults: frame.search_results ?? [],
    images: frame.images ?? [],
    relatedQuestions: frame.related_questions ?? [],
    videos: frame.videos ?? [],
    usage: frame.usage ?? null,
    finishReason: frame.finish_reason ?? null,
    reasoning: typeof frame.reasoning === "string" ? frame.reasoning : stream.reasoning,
    sources: [...stream.sources],
    toolCalls: Array.isArray(frame.tool_calls) ? frame.tool_calls.map(toolCallOf) : [...stream.toolCalls],
    refusal: frame.refusal === true,
    raw: frame,
  };
}

/**
 * The assistant message that continues a conversation after `answer`: for a tool loop, with its
 * `tool_calls` (and `content: null` when it has no text). Append a
 * `{ role: "tool", tool_call_id, content }` message per result and start the next stream.
 */
export function assistantMessage(answer) {
  const message = { role: "assistant", content: answer.text || null };
  if (answer.toolCalls?.length) {
    message.tool_calls = answer.toolCalls.map((call) => ({
      id: call.callId,
      type: "function",
      function: {
        name: call.name,
        arguments: call.argumentsRaw !== undefined ? call.argumentsRaw : JSON.stringify(call.arguments ?? null),
      },
    }));
  } else if (message.content === null) {
    message.content = "";
  }
  return message;
}

// Internal entry points of GatewayStream, called by GatewayClient only.
const kFrame = Symbol("frame");
const kFail = Symbol("fail");
const kDropped = Symbol("dropped");
const kStartFrame = Symbol("startFrame");
const kEnd = Symbol("end");
const kCancel = Symbol("cancel");

/** A reader of a stream's content: its own queue, and whether it was handed out. */
function view() {
  return { queue: [], waiter: null, iterated: false, thrown: false };
}

/**
 * One prompt stream. Iterate it (`for await`) for the text of each chunk, or `parts()` for typed
 * parts (text, reasoning, sources, tool calls, progress) in the order they came; `result`
 * resolves with the whole answer. Aborting (the `signal`, `cancel()`, or leaving a loop early)
 * sends `cancel` and rejects `result` and the iteration with the abort reason (an "AbortError"
 * DOMException).
 */
export class GatewayStream {
  #client;
  #start;
  #text = view();
  #parts = view();
  #error = null;
  #signal;
  #onAbort = null;
  #resolveResult;
  #rejectResult;
  #resolveEnded;
  #settled = false;

  constructor(client, id, start, signal) {
    this.#client = client;
    this.id = id;
    this.#start = start;
    this.#signal = signal ?? null;
    /** "queued" | "starting" | "streaming" | "resuming" | "cancelling" | "done" | "cancelled" | "error" */
    this.state = "queued";
    /** The text received so far. */
    this.text = "";
    /** The reasoning received so far (a stream that asked for "reasoning"). */
    this.reasoning = "";
    /** The sources received so far (a stream that asked for "sources"), in arrival order. */
    this.sources = [];
    /** The tool calls received so far (a stream that asked for "tools"). */
    this.toolCalls = [];
    /** The seq of the last content message received (text and parts share it). */
    this.seq = 0;
    /** Given by `started` on gateways that support resuming after a reconnect. */
    this.resumeToken = null;
    this.result = new Promise((resolve, reject) => {
      this.#resolveResult = resolve;
      this.#rejectResult = reject;
    });
    // A stream that is only iterated must not report its rejected `result` as unhandled.
    this.result.catch(() => {});
    this.ended = new Promise((resolve) => {
      this.#resolveEnded = resolve;
    });
    if (this.#signal) {
      this.#onAbort = () => this.cancel(this.#signal.reason);
      this.#signal.addEventListener("abort", this.#onAbort, { once: true });
    }
  }

  /** Stop the stream: the gateway closes its upstream request. Does nothing once it ended. */
  cancel(reason = abortError()) {
    if (this.#settled) return;
    this.#settle(null, reason);
    this.#client[kCancel](this);
  }

  [Symbol.asyncIterator]() {
    return this.#iterate(this.#text, "A GatewayStream can be iterated only once.");
  }

  /**
   * The stream as typed parts, in the order the gateway sent them: `{ kind: "text" }` (the same
   * text the stream's own iteration yields), and the "reasoning", "sources", "tool_call" and
   * "progress" parts the start asked for. Independent of the text iteration (reading one does
   * not consume the other); one `parts()` iteration per stream.
   */
  parts() {
    return this.#iterate(this.#parts, "A GatewayStream's parts() can be iterated only once.");
  }

  #iterate(reader, message) {
    if (reader.iterated) throw new TypeError(message);
    reader.iterated = true;
    return {
      next: () => this.#next(reader),
      return: async () => {
        this.cancel();
        reader.queue.length = 0;
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  async #next(reader) {
    for (;;) {
      if (reader.queue.length) return { value: reader.queue.shift(), done: false };
      if (this.#error !== null && !reader.thrown) {
        reader.thrown = true;
        throw this.#error;
      }
      if (this.#settled) return { value: undefined, done: true };
      await new Promise((resolve) => {
        reader.waiter = resolve;
      });
    }
  }

  #wake() {
    for (const reader of [this.#text, this.#parts]) {
      const waiter = reader.waiter;
      reader.waiter = null;
      waiter?.();
    }
  }

  /** A content message (text or a part): every kind takes the stream's next seq. */
  #content(frame) {
    if (typeof frame.seq === "number" && frame.seq <= this.seq) return; // replayed after a resume
    this.seq = frame.seq;
    if (this.#settled) return;
    const seq = frame.seq;
    let part;
    switch (frame.type) {
      case "text_chunk":
        this.text += frame.text;
        this.#text.queue.push(frame.text);
        part = { kind: "text", seq, text: frame.text };
        break;
      case "reasoning_chunk":
        this.reasoning += frame.text;
        part = { kind: "reasoning", seq, text: frame.text };
        break;
      case "sources": {
        const sources = Array.isArray(frame.sources) ? frame.sources : [];
        this.sources.push(...sources);
        part = { kind: "sources", seq, sources };
        break;
      }
      case "tool_call": {
        const call = toolCallOf(frame);
        this.toolCalls.push(call);
        part = { kind: "tool_call", seq, ...call };
        break;
      }
      default: // progress
        part = { kind: "progress", seq, step: frame.step };
    }
    this.#parts.queue.push(part);
    this.#wake();
  }

  /** Settle `result` once: with an answer, or with an error. */
  #settle(answer, error) {
    if (this.#settled) return;
    this.#settled = true;
    if (this.#signal && this.#onAbort) this.#signal.removeEventListener("abort", this.#onAbort);
    if (error !== null) {
      this.#error = error;
      this.#rejectResult(error);
    } else {
      this.#resolveResult(answer);
    }
    this.#wake();
  }

  /** The stream is over on the wire (or will never be on it): resolve `ended`. */
  #end(state) {
    if (!["done", "cancelled", "error"].includes(this.state)) this.state = state;
    this.#resolveEnded(this.state);
  }

  [kEnd](state) {
    this.#end(state);
  }

  get settled() {
    return this.#settled;
  }

  get signal() {
    return this.#signal;
  }

  [kStartFrame]() {
    return { ...this.#start, type: "start", id: this.id };
  }

  /** A frame of this stream's id; returns true when it was the stream's terminal frame. */
  [kFrame](frame) {
    switch (frame.type) {
      case "started":
        if (this.state === "starting") this.state = "streaming";
        if (typeof frame.resume_token === "string") this.resumeToken = frame.resume_token;
        return false;
      case "resumed":
        if (this.state === "resuming") this.state = "streaming";
        if (typeof frame.resume_token === "string") this.resumeToken = frame.resume_token;
        return false;
      case "text_chunk":
      case "reasoning_chunk":
      case "sources":
      case "tool_call":
      case "progress":
        this.#content(frame);
        return false;
      case "done":
        this.#settle(answerOf(frame, this), null);
        this.#end("done");
        return true;
      case "cancelled":
        this.#settle(null, abortError("The gateway cancelled the stream."));
        this.#end("cancelled");
        return true;
      case "error":
        // With `seq` it ends the stream. Without, it refuses our start or resume; or our cancel
        // (unknown_id: the gateway holds no such stream any more, so it is over for us too).
        if ("seq" in frame || ["starting", "resuming", "cancelling"].includes(this.state)) {
          this.#settle(null, GatewayError.fromFrame(frame));
          this.#end("error");
          return true;
        }
        return false;
      default:
        return false;
    }
  }

  /** Fail the stream locally (never started, connection gone, client closed). */
  [kFail](error) {
    this.#settle(null, error);
    this.#end(this.state === "cancelling" ? "cancelled" : "error");
  }

  /** The socket went away; returns true when the stream waits to be resumed. */
  [kDropped](closeCode) {
    if (this.state === "cancelling") {
      // Without a resume token the gateway cancelled it with the socket. With one, it may keep
      // running detached: the client resumes it on the next socket only to cancel it there.
      if (this.resumeToken) return true;
      this.#end("cancelled");
      return false;
    }
    if (this.resumeToken && !this.#settled) {
      this.state = "resuming";
      return true;
    }
    this[kFail](connectionLost(closeCode));
    return false;
  }
}


// ------------------------------------------------------------------ the HTTP transport

/** The HTTP base URL of a gateway's WebSocket URL: ws(s)://host/v1/ws -> http(s)://host. */
function httpBase(url) {
  const parsed = new URL(url);
  parsed.protocol = parsed.protocol === "wss:" ? "https:" : parsed.protocol === "ws:" ? "http:" : parsed.protocol;
  parsed.pathname = parsed.pathname.replace(/\/v1\/ws\/?$/, "") || "/";
  parsed.search = "";
  parsed.hash = "";
  return parsed.href.replace(/\/$/, "");
}

/** Server-Sent Events from a fetch response body: each event's `data` (the protocol's JSON). */
async function* sseMessages(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // `event:` repeats the JSON's type, `id:` its seq; comments keep the response alive
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * The gateway's HTTP streams (docs/protocol.md, "HTTP streams") behind the interface of a
 * WebSocket, so that `GatewayClient` runs on them unchanged: a `start` is a `POST /v1/streams`
 * read as Server-Sent Events, a `resume` a `GET` with the resume token and the last seq, a
 * `cancel` a `DELETE`. Everything a WebSocket would say arrives through `onmessage`; a stream
 * whose response breaks off closes this "socket" as a WebSocket's network loss does (1006),
 * and the client resumes every stream on the next one.
 */
class HttpSocket {
  constructor(url, { fetch: fetchImpl, expectAuth }) {
    this.url = url;
    this.readyState = 0; // CONNECTING
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this._base = httpBase(url);
    this._fetch = fetchImpl;
    this._token = null;
    this._tokens = new Map(); // stream id -> resume token
    this._requests = new Map(); // stream id -> AbortController of its open response
    this._expectAuth = expectAuth;
    queueMicrotask(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1; // OPEN
      this.onopen?.({});
      if (!expectAuth) this._welcome();
    });
  }

  send(text) {
    if (this.readyState !== 1) return;
    const frame = JSON.parse(text);
    switch (frame.type) {
      case "auth":
        this._token = frame.token;
        if (this._expectAuth) {
          this._expectAuth = false;
          this._welcome();
        } else this._deliver({ type: "authenticated", expires_at: null });
        return;
      case "ping":
        this._deliver({ type: "pong" });
        return;
      case "start": {
        const { type, ...body } = frame;
        this._stream(frame.id, "POST", `${this._base}/v1/streams`, {
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
        return;
      }
      case "resume":
        this._tokens.set(frame.id, frame.resume_token);
        this._stream(frame.id, "GET", `${this._base}/v1/streams/${encodeURIComponent(frame.id)}`, {
          headers: { "X-Resume-Token": frame.resume_token, "Last-Event-ID": String(frame.after) },
        });
        return;
      case "cancel":
        this._cancel(frame.id);
        return;
      default:
        this._deliver({ type: "error", id: null, code: "unknown_type", message: `unknown type ${frame.type}`, retryable: false });
    }
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this._shut(code, reason);
  }

  _welcome() {
    // The HTTP side has no socket limits of its own: each stream is one request.
    this._deliver({ type: "welcome", protocol: PROTOCOL_VERSION, session: "http", transport: "http", limits: {}, parts: PART_KINDS });
  }

  _headers(extra) {
    const headers = { ...extra };
    if (this._token !== null) headers.Authorization = `Bearer ${this._token}`;
    return headers;
  }

  async _stream(id, method, url, init) {
    const controller = new AbortController();
    this._requests.set(id, controller);
    let response;
    try {
      response = await this._fetch(url, { ...init, method, headers: this._headers(init.headers), signal: controller.signal });
    } catch (error) {
      this._requests.delete(id);
      if (!controller.signal.aborted) this._shut(1006, "the request failed");
      return;
    }
    if (!response.ok) {
      this._requests.delete(id);
      let error;
      try {
        error = await response.json();
      } catch {
        error = { code: response.status >= 500 ? "internal" : "bad_message", message: `HTTP ${response.status}`, retryable: response.status >= 500 };
      }
      const retryAfter = response.headers.get("Retry-After");
      if (retryAfter && error.retry_after_ms === undefined) error.retry_after_ms = Number(retryAfter) * 1000;
      this._deliver({ ...error, type: "error", id });
      return;
    }
    let ended = false;
    try {
      for await (const data of sseMessages(response.body)) {
        const message = JSON.parse(data);
        if (message.type === "started" && message.resume_token) this._tokens.set(id, message.resume_token);
        this._deliver(message);
        if (["done", "cancelled", "error"].includes(message.type)) ended = true;
      }
    } catch {
      // the response broke off (or was aborted: see below)
    }
    if (this._requests.get(id) === controller) this._requests.delete(id);
    if (!ended && !controller.signal.aborted) this._shut(1006, "a stream's response broke off");
  }

  _cancel(id) {
    const token = this._tokens.get(id);
    if (!token) return; // not started yet: its start's answer (or its absence) settles it
    // Not aborted: the open response ends with `cancelled`, which settles the stream.
    this._fetch(`${this._base}/v1/streams/${encodeURIComponent(id)}`, {
      method: "DELETE",
      headers: this._headers({ "X-Resume-Token": token }),
    }).then(
      (response) => {
        if (response.status === 404) this._deliver({ type: "error", id, code: "unknown_id", message: "no such stream", retryable: false });
      },
      () => {},
    );
  }

  _deliver(message) {
    if (this.readyState === 1) this.onmessage?.({ data: JSON.stringify(message) });
  }

  _shut(code, reason) {
    this.readyState = 3; // CLOSED
    for (const controller of this._requests.values()) controller.abort();
    this._requests.clear();
    queueMicrotask(() => this.onclose?.({ code, reason, wasClean: code === 1000 }));
  }
}

/**
 * A connection to the gateway that multiplexes many streams, authenticates with a first
 * message when given a token, and reconnects by itself. Events: "state" (GatewayStateEvent),
 * "error" (GatewayErrorEvent, for errors tied to no stream).
 */
export class GatewayClient extends EventTarget {
  #url;
  #WebSocket;
  #token;
  #reconnect;
  #welcomeTimeoutMs;
  #onstate;
  #ws = null;
  #state = "idle";
  #welcome = null;
  #attempt = 0;
  #timer = null;
  #welcomeTimer = null;
  #nextId = 0;
  #idPrefix;
  #streams = new Map(); // id -> stream, for every stream not yet ended on the wire
  #queue = []; // streams waiting for the socket or for a free slot, in order
  #pings = [];
  #connectWaiters = [];
  #fatal = null;
  #awaitAuthEcho = false;
  #authFailure = null;
  #refreshes = [];
  #transport;
  #fetch;
  #onHttp = false;

  constructor(url, options = {}) {
    super();
    this.#url = String(url);
    this.#transport = options.transport ?? "auto";
    if (!["auto", "websocket", "http"].includes(this.#transport)) {
      throw new TypeError('`transport` is "auto", "websocket" or "http".');
    }
    this.#fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    if (this.#transport !== "websocket" && typeof this.#fetch !== "function") {
      throw new TypeError("No fetch implementation for the HTTP transport: pass one as { fetch }.");
    }
    this.#onHttp = this.#transport === "http";
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function" && this.#transport !== "http") {
      throw new TypeError(
        "No WebSocket implementation: pass one, e.g. new GatewayClient(url, { WebSocket }) with `import { WebSocket } from \"ws\"`.",
      );
    }
    this.#token = options.token ?? null;
    this.#reconnect =
      options.reconnect === false ? null : { ...DEFAULT_RECONNECT, ...(options.reconnect ?? {}) };
    this.#welcomeTimeoutMs = options.welcomeTimeoutMs ?? 10_000;
    this.#onstate = options.onstate ?? null;
    this.#idPrefix = options.idPrefix ?? "s";
    if (options.connect !== false) this.#open(); // `onstate` sees this first "connecting"
  }

  /** "connecting" | "open" | "reconnecting" | "idle" | "closed" */
  get state() {
    return this.#state;
  }

  /** "websocket" or "http": what the current (or next) connection uses. */
  get transport() {
    return this.#onHttp ? "http" : "websocket";
  }

  /** The server's welcome frame of the current connection (null while not open). */
  get welcome() {
    return this.#welcome;
  }

  /** Resolves with the welcome once the connection is open (opening it if idle). */
  connect() {
    if (this.#fatal) return Promise.reject(this.#fatal);
    if (this.#state === "open") return Promise.resolve(this.#welcome);
    if (this.#state === "idle") this.#open();
    return new Promise((resolve, reject) => this.#connectWaiters.push({ resolve, reject }));
  }

  /**
   * Start a stream. `input` is a prompt string, or a list of chat messages. Returns at once;
   * the start is sent when the connection is open and a stream slot is free.
   */
  stream(input, options = {}) {
    const start = {};
    if (typeof input === "string") start.prompt = input;
    else if (Array.isArray(input)) start.messages = input;
    else if (input && typeof input === "object" && ("prompt" in input || "messages" in input)) {
      if (input.prompt !== undefined) start.prompt = input.prompt;
      if (input.messages !== undefined) start.messages = input.messages;
    } else throw new TypeError("stream() takes a prompt string or a list of messages.");
    if (options.model !== undefined) start.model = options.model;
    if (options.options !== undefined) start.options = options.options;
    const parts = options.parts ?? [];
    if (!Array.isArray(parts) || !parts.every((kind) => typeof kind === "string")) {
      throw new TypeError('`parts` is a list of kinds, e.g. ["reasoning", "sources"].');
    }
    const wanted = [...new Set(parts)];
    for (const [key, value] of [["tools", options.tools], ["tool_choice", options.toolChoice]]) {
      if (value === undefined) continue;
      if (start.options && key in start.options) throw new TypeError(`Give ${key} once: as an option of stream() or in options, not both.`);
      start.options = { ...start.options, [key]: value };
    }
    // Declared tools imply the "tools" part: a call the model makes is the client's to run.
    if (start.options?.tools?.length && !wanted.includes("tools")) wanted.push("tools");
    if (wanted.length) start.parts = wanted;
    const id = options.id ?? `${this.#idPrefix}${++this.#nextId}`;
    if (this.#streams.has(id)) throw new GatewayError("duplicate_id", `Stream id ${id} is active.`);
    const stream = new GatewayStream(this, id, start, options.signal);
    if (this.#fatal) {
      stream[kFail](this.#fatal);
      return stream;
    }
    if (options.signal?.aborted) {
      stream.cancel(options.signal.reason);
      return stream;
    }
    this.#streams.set(id, stream);
    this.#queue.push(stream);
    if (this.#state === "idle") this.#open();
    else this.#pump();
    return stream;
  }

  /** Round trip of an application-level ping, in milliseconds. */
  ping() {
    if (this.#state !== "open") {
      return Promise.reject(new GatewayError("not_connected", "The client is not connected.", { retryable: true }));
    }
    return new Promise((resolve, reject) => {
      this.#pings.push({ resolve, reject, sent: performance.now() });
      this.#send({ type: "ping" });
    });
  }

  /**
   * Send a fresh token on the open connection (before the old one expires), and use it for
   * later reconnects too. Resolves with the credential's expiry (seconds since the epoch, or
   * null) from the gateway's `authenticated` answer.
   */
  authenticate(token) {
    if (token !== undefined) this.#token = token;
    if (this.#token === null) return Promise.reject(new TypeError("authenticate() needs a token."));
    if (this.#state !== "open") {
      return Promise.reject(new GatewayError("not_connected", "The client is not connected.", { retryable: true }));
    }
    const ws = this.#ws;
    return new Promise((resolve, reject) => {
      this.#refreshes.push({ resolve, reject });
      Promise.resolve(typeof this.#token === "function" ? this.#token() : this.#token).then(
        (value) => {
          if (ws === this.#ws) this.#send({ type: "auth", token: value });
        },
        (error) => {
          this.#refreshes.pop();
          reject(error);
        },
      );
    });
  }

  /** Close the connection for good; every unfinished stream fails with code "closed". */
  close() {
    if (this.#state === "closed") return;
    // Cancel explicitly: a gateway that keeps streams for resuming would otherwise let their
    // upstreams run on after the socket closes.
    if (this.#state === "open") {
      for (const stream of this.#streams.values()) {
        if (stream.state === "starting" || stream.state === "streaming") {
          this.#send({ type: "cancel", id: stream.id });
        }
      }
    }
    this.#shutdown(closedError());
  }

  // ------------------------------------------------------------------ connection

  #setState(state, init = {}) {
    const previous = this.#state;
    if (previous === state && state !== "reconnecting") return;
    this.#state = state;
    const event = new GatewayStateEvent(state, { ...init, previous, transport: this.transport });
    this.dispatchEvent(event);
    this.#onstate?.(event);
  }

  #open() {
    clearTimeout(this.#timer);
    this.#timer = null;
    if (this.#state !== "reconnecting") this.#setState("connecting");
    this.#welcome = null;
    let ws;
    try {
      ws = this.#onHttp
        ? new HttpSocket(this.#url, { fetch: this.#fetch, expectAuth: this.#token !== null })
        : new this.#WebSocket(this.#url);
    } catch (error) {
      this.#shutdown(new GatewayError("bad_url", String(error?.message ?? error), { cause: error }));
      return;
    }
    this.#ws = ws;
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      if (this.#token !== null) this.#authenticate(ws);
    };
    ws.onmessage = (event) => {
      if (ws === this.#ws) this.#receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#closed(event.code, event.reason);
    };
    ws.onerror = () => {}; // a close event follows and carries what we need
    this.#welcomeTimer = setTimeout(() => {
      if (ws === this.#ws && !this.#welcome) this.#closed(CLOSE_WELCOME_TIMEOUT, "no welcome");
    }, this.#welcomeTimeoutMs);
  }

  async #authenticate(ws) {
    let token;
    try {
      token = typeof this.#token === "function" ? await this.#token() : this.#token;
    } catch (error) {
      this.#shutdown(new GatewayError("unauthorized", "Getting the token failed.", { cause: error }));
      return;
    }
    if (ws !== this.#ws) return;
    // A gateway without first-message auth answers `auth` with an unknown_type error.
    this.#awaitAuthEcho = true;
    ws.send(JSON.stringify({ type: "auth", token }));
  }

  #receive(data) {
    if (typeof data !== "string") return; // the protocol has text frames only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        this.#welcomed(frame);
        return;
      case "authenticated":
        if (this.#awaitAuthEcho) this.#awaitAuthEcho = false;
        else this.#refreshes.shift()?.resolve(frame.expires_at ?? null);
        return;
      case "pong": {
        const ping = this.#pings.shift();
        ping?.resolve(performance.now() - ping.sent);
        return;
      }
      case "error":
        if (frame.id === null || frame.id === undefined) {
          this.#connectionError(frame);
          return;
        }
        break;
      default:
        break;
    }
    const stream = this.#streams.get(frame.id);
    if (stream && stream[kFrame](frame)) {
      this.#streams.delete(stream.id);
      this.#pump();
    }
  }

  #connectionError(frame) {
    if (this.#awaitAuthEcho && frame.code === "unknown_type") {
      this.#awaitAuthEcho = false; // a gateway without first-message auth: harmless
      return;
    }
    const error = GatewayError.fromFrame(frame);
    if (["unauthorized", "auth_failed", "forbidden"].includes(error.code)) this.#authFailure = error;
    this.dispatchEvent(new GatewayErrorEvent(error));
  }

  #welcomed(frame) {
    clearTimeout(this.#welcomeTimer);
    this.#welcome = frame;
    this.#attempt = 0;
    if (this.#awaitAuthEcho) {
      // Our first-message auth was answered by this welcome (auth on), or will be answered by
      // `authenticated` / `unknown_type` (auth off, or an older gateway). Frames are answered in
      // order, so whatever answer comes before this ping's pong is that echo, not a refresh's.
      this.#pings.push({ resolve: () => (this.#awaitAuthEcho = false), reject() {}, sent: 0 });
      this.#send({ type: "ping" });
    }
    this.#setState("open");
    for (const waiter of this.#connectWaiters.splice(0)) waiter.resolve(frame);
    // Resume the streams that lost their socket, then send the waiting starts.
    for (const stream of this.#streams.values()) {
      if (stream.state === "resuming" || (stream.state === "cancelling" && stream.resumeToken)) {
        this.#send({ type: "resume", id: stream.id, resume_token: stream.resumeToken, after: stream.seq });
        if (stream.state === "cancelling") this.#send({ type: "cancel", id: stream.id });
      }
    }
    this.#pump();
  }

  /** The number of streams the gateway holds for this socket. */
  #inflight() {
    let n = 0;
    for (const stream of this.#streams.values()) if (stream.state !== "queued") n += 1;
    return n;
  }

  #pump() {
    if (this.#state !== "open" || !this.#welcome) return;
    const limits = this.#welcome.limits ?? {};
    const maxStreams = limits.max_streams ?? Infinity;
    const maxBytes = limits.max_message_bytes ?? Infinity;
    let inflight = this.#inflight();
    while (this.#queue.length && inflight < maxStreams) {
      const stream = this.#queue.shift();
      const text = JSON.stringify(stream[kStartFrame]());
      const bytes = encoder.encode(text).length;
      if (bytes > maxBytes) {
        this.#streams.delete(stream.id);
        stream[kFail](
          new GatewayError(
            "message_too_large",
            `The start frame is ${bytes} bytes; the gateway accepts at most ${maxBytes}.`,
            { id: stream.id },
          ),
        );
        continue;
      }
      stream.state = "starting";
      this.#ws.send(text);
      inflight += 1;
    }
  }

  #send(frame) {
    this.#ws.send(JSON.stringify(frame));
  }

  /** Called by GatewayStream.cancel(), after it settled `result` with the abort reason. */
  [kCancel](stream) {
    if (stream.state === "resuming") {
      // Detached on the gateway: resume it on the next socket only to cancel it there.
      stream.state = "cancelling";
      return;
    }
    if (stream.state === "queued") {
      const index = this.#queue.indexOf(stream);
      if (index >= 0) this.#queue.splice(index, 1);
      if (this.#streams.get(stream.id) === stream) this.#streams.delete(stream.id);
      stream[kEnd]("cancelled");
      this.#pump();
      return;
    }
    if (stream.state === "starting" || stream.state === "streaming") {
      stream.state = "cancelling";
      if (this.#state === "open") this.#send({ type: "cancel", id: stream.id });
    }
  }

  #closed(code, reason) {
    clearTimeout(this.#welcomeTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState !== 3 /* CLOSED */) {
      ws.onclose = null;
      try {
        ws.close();
      } catch {
        // already closing
      }
    }
    const wasOpen = this.#welcome !== null;
    this.#welcome = null;
    this.#awaitAuthEcho = false;
    for (const ping of this.#pings.splice(0)) ping.reject(connectionLost(code));
    for (const refresh of this.#refreshes.splice(0)) refresh.reject(connectionLost(code));
    if (this.#state === "closed") return;
    if (code === CLOSE_UNAUTHORIZED || this.#authFailure) {
      const error =
        this.#authFailure ??
        new GatewayError("unauthorized", reason || "The gateway refused the token.", { closeCode: code });
      error.closeCode = code;
      this.#shutdown(error, code);
      return;
    }
    // Streams that were on the socket: resume them later, or fail them now.
    for (const stream of [...this.#streams.values()]) {
      if (stream.state === "queued") continue;
      if (!stream[kDropped](code)) this.#streams.delete(stream.id);
    }
    if (code === 1000 && wasOpen) {
      // A normal close by the gateway (idle timeout): reconnect when there is work.
      if (this.#queue.length || this.#streams.size) this.#scheduleReconnect(code);
      else this.#setState("idle", { closeCode: code });
      return;
    }
    if (!wasOpen && this.#transport === "auto" && !this.#onHttp) {
      // The upgrade failed or no welcome came (a proxy that blocks WebSocket): the same
      // streams over HTTP, at once.
      this.#onHttp = true;
      this.#setState("reconnecting", { attempt: this.#attempt, delayMs: 0, closeCode: code });
      this.#open();
      return;
    }
    const retry = RECONNECT_CLOSE_CODES.includes(code) || code === CLOSE_WELCOME_TIMEOUT || !wasOpen;
    if (retry && this.#reconnect) {
      this.#scheduleReconnect(code);
      return;
    }
    this.#shutdown(
      new GatewayError("connection_closed", `The gateway closed the connection (${code}${reason ? `: ${reason}` : ""}).`, {
        retryable: retry,
        closeCode: code,
      }),
      code,
    );
  }

  #scheduleReconnect(closeCode) {
    const { initialDelayMs, maxDelayMs, factor, maxAttempts } = this.#reconnect ?? DEFAULT_RECONNECT;
    if (this.#attempt >= maxAttempts) {
      this.#shutdown(connectionLost(closeCode), closeCode);
      return;
    }
    // "Full jitter": uniformly random up to the exponential ceiling, so that the clients a
    // restarting gateway dropped all at once do not come back all at once.
    const ceiling = Math.min(maxDelayMs, initialDelayMs * factor ** this.#attempt);
    const delayMs = Math.round(Math.random() * ceiling);
    this.#attempt += 1;
    this.#setState("reconnecting", { attempt: this.#attempt, delayMs, closeCode });
    this.#timer = setTimeout(() => this.#open(), delayMs);
  }

  /** Enter the final "closed" state: fail everything still waiting. */
  #shutdown(error, closeCode = null) {
    if (this.#state === "closed") return;
    this.#fatal = error;
    clearTimeout(this.#timer);
    clearTimeout(this.#welcomeTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      try {
        ws.close(1000);
      } catch {
        // not open yet, or closing
      }
    }
    this.#queue.length = 0;
    for (const stream of this.#streams.values()) stream[kFail](error);
    this.#streams.clear();
    for (const ping of this.#pings.splice(0)) ping.reject(error);
    for (const refresh of this.#refreshes.splice(0)) refresh.reject(error);
    for (const waiter of this.#connectWaiters.splice(0)) waiter.reject(error);
    this.#setState("closed", { closeCode, error: error.code === "closed" ? null : error });
  }
}
