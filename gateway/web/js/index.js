// Client for the LLM WebSocket gateway, protocol v1 (docs/protocol.md).
//
// One ES module, no build step, no dependencies: browsers use their native WebSocket, Node 20+
// passes one (e.g. the `ws` package) as `new GatewayClient(url, { WebSocket })`.
// Types: index.d.ts.

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

function answerOf(frame) {
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
    raw: frame,
  };
}

// Internal entry points of GatewayStream, called by GatewayClient only.
const kFrame = Symbol("frame");
const kFail = Symbol("fail");
const kDropped = Symbol("dropped");
const kStartFrame = Symbol("startFrame");
const kEnd = Symbol("end");
const kCancel = Symbol("cancel");

/**
 * One prompt stream. Iterate it (`for await`) for the text of each chunk; `result` resolves with
 * the whole answer. Aborting (the `signal`, `cancel()`, or leaving the loop early) sends `cancel`
 * and rejects `result` and the iteration with the abort reason (an "AbortError" DOMException).
 */
export class GatewayStream {
  #client;
  #start;
  #chunks = [];
  #waiter = null;
  #failure = null;
  #iterated = false;
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
    /** The seq of the last chunk received. */
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
    if (this.#iterated) throw new TypeError("A GatewayStream can be iterated only once.");
    this.#iterated = true;
    return {
      next: () => this.#next(),
      return: async () => {
        this.cancel();
        this.#chunks.length = 0;
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  async #next() {
    if (this.#chunks.length) return { value: this.#chunks.shift(), done: false };
    if (this.#failure) {
      const failure = this.#failure;
      this.#failure = null;
      this.#iterated = "failed";
      throw failure.error;
    }
    if (this.#settled || this.#iterated === "failed") return { value: undefined, done: true };
    await new Promise((resolve) => {
      this.#waiter = resolve;
    });
    return this.#next();
  }

  #wake() {
    const waiter = this.#waiter;
    this.#waiter = null;
    waiter?.();
  }

  /** Settle `result` once: with an answer, or with an error. */
  #settle(answer, error) {
    if (this.#settled) return;
    this.#settled = true;
    if (this.#signal && this.#onAbort) this.#signal.removeEventListener("abort", this.#onAbort);
    if (error !== null) {
      this.#failure = { error };
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
        if (typeof frame.seq === "number" && frame.seq <= this.seq) return false; // replayed
        this.seq = frame.seq;
        if (this.#settled) return false;
        this.text += frame.text;
        this.#chunks.push(frame.text);
        this.#wake();
        return false;
      case "done":
        this.#settle(answerOf(frame), null);
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

  constructor(url, options = {}) {
    super();
    this.#url = String(url);
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
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
    const event = new GatewayStateEvent(state, { ...init, previous });
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
      ws = new this.#WebSocket(this.#url);
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
