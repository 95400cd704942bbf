// Types for the LLM WebSocket gateway client and every frame of protocol v1 (docs/protocol.md).

// ------------------------------------------------------------------------------------------------
// Protocol v1 frames
// ------------------------------------------------------------------------------------------------

export declare const PROTOCOL_VERSION: 1;

/** A stream id: 1 to 64 characters of [A-Za-z0-9._:-], unique among the socket's active streams. */
export type StreamId = string;

export interface Limits {
  /** Concurrent streams allowed on this socket. */
  max_streams: number;
  /** Largest client frame, in UTF-8 bytes. */
  max_message_bytes: number;
  /** When configured: longest prompt, in characters (over it: prompt_too_large). */
  max_prompt_chars?: number;
  /** When configured: concurrent streams of this principal across its sockets. */
  max_streams_per_principal?: number;
  /** When configured: starts accepted per minute (over it: rate_limited). */
  starts_per_minute?: number;
  /** When configured: the models a start may name. */
  allowed_models?: string[];
  [key: string]: unknown;
}

export type Role = "system" | "user" | "assistant";

export interface TextPart {
  type: "text";
  text: string;
  [key: string]: unknown;
}

export type ContentPart = TextPart | { type: string; [key: string]: unknown };

export interface ChatMessage {
  role: Role;
  content: string | ContentPart[];
}

/** Options copied into the upstream request body; any other key is refused with bad_message. */
export interface StartOptions {
  temperature?: number;
  max_tokens?: number;
  top_p?: number;
  top_k?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  stop?: string | string[];
  seed?: number;
  response_format?: Record<string, unknown>;
  reasoning_effort?: "low" | "medium" | "high" | (string & {});
  language_preference?: string;
  search_domain_filter?: string[];
  search_recency_filter?: "hour" | "day" | "week" | "month" | "year" | (string & {});
  search_after_date_filter?: string;
  search_before_date_filter?: string;
  last_updated_after_filter?: string;
  last_updated_before_filter?: string;
  search_mode?: "web" | "academic" | "sec" | (string & {});
  search_language_filter?: string[];
  return_images?: boolean;
  image_domain_filter?: string[];
  image_format_filter?: string[];
  return_related_questions?: boolean;
  web_search_options?: Record<string, unknown>;
  disable_search?: boolean;
  enable_search_classifier?: boolean;
}

// --- client to server ---------------------------------------------------------------------------

interface StartBase {
  type: "start";
  id: StreamId;
  /** 1 to 128 characters; the gateway's default model when absent. */
  model?: string;
  options?: StartOptions;
}
export interface StartPromptFrame extends StartBase {
  prompt: string;
  messages?: never;
}
export interface StartMessagesFrame extends StartBase {
  messages: ChatMessage[];
  prompt?: never;
}
export type StartFrame = StartPromptFrame | StartMessagesFrame;

export interface CancelFrame {
  type: "cancel";
  id: StreamId;
}

export interface PingFrame {
  type: "ping";
}

/** First-message authentication (sent before anything else when the client has a token). */
export interface AuthFrame {
  type: "auth";
  token: string;
}

/** Resume a stream on a new socket after a reconnect: the gateway replays the frames after `after`. */
export interface ResumeFrame {
  type: "resume";
  id: StreamId;
  resume_token: string;
  /** The seq of the last text_chunk the client received. */
  after: number;
}

export type ClientFrame = StartFrame | CancelFrame | PingFrame | AuthFrame | ResumeFrame;

// --- server to client ---------------------------------------------------------------------------

export interface WelcomeFrame {
  type: "welcome";
  protocol: number;
  /** Opaque id for support and logs. */
  session: string;
  limits: Limits;
}

/** Answers an `auth` sent on an open socket (a token refresh, or any `auth` when auth is off). */
export interface AuthenticatedFrame {
  type: "authenticated";
  /** When the credential expires, seconds since the epoch (null: never). */
  expires_at: number | null;
}

export interface PongFrame {
  type: "pong";
}

export interface StartedFrame {
  type: "started";
  id: StreamId;
  /** Given by gateways that can resume this stream after a reconnect. */
  resume_token?: string;
}

export interface ResumedFrame {
  type: "resumed";
  id: StreamId;
  /** The frames with a higher seq follow. */
  after: number;
}

export interface TextChunkFrame {
  type: "text_chunk";
  id: StreamId;
  /** Counts this stream's text_chunk frames from 1 without gaps. */
  seq: number;
  text: string;
}

export interface SearchResult {
  title: string;
  url: string;
  date?: string;
  [key: string]: unknown;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  [key: string]: unknown;
}

export interface DoneFrame {
  type: "done";
  id: StreamId;
  /** The last chunk's seq (0 if there was none). */
  seq: number;
  /** Exactly the concatenation of the stream's text_chunk texts. */
  text: string;
  citations?: string[];
  search_results?: SearchResult[];
  images?: unknown[];
  related_questions?: string[];
  videos?: unknown[];
  usage?: Usage;
  finish_reason?: string;
}

export interface CancelledFrame {
  type: "cancelled";
  id: StreamId;
  /** The last text_chunk sent. */
  seq: number;
}

export type ProtocolErrorCode =
  | "bad_json"
  | "bad_message"
  | "unknown_type"
  | "message_too_large"
  | "duplicate_id"
  | "unknown_id"
  | "too_many_streams"
  | "shutting_down"
  | "unauthorized"
  | "rate_limited"
  | "prompt_too_large"
  | "resume_unavailable"
  | "upstream_unavailable"
  | "upstream_error"
  | "upstream_timeout"
  | "upstream_protocol_error"
  | "stream_interrupted"
  | "internal";

export interface ErrorFrame {
  type: "error";
  /** null: about a frame that could not be tied to a stream. */
  id: StreamId | null;
  code: ProtocolErrorCode | (string & {});
  message: string;
  retryable: boolean;
  /** Present when the error ends a started stream (the chunks already sent stand). */
  seq?: number;
  /** The upstream's HTTP status (upstream_error). */
  status?: number;
  /** From the upstream's Retry-After. */
  retry_after_ms?: number;
}

export type ServerFrame =
  | WelcomeFrame
  | AuthenticatedFrame
  | PongFrame
  | StartedFrame
  | ResumedFrame
  | TextChunkFrame
  | DoneFrame
  | CancelledFrame
  | ErrorFrame;

/** A frame that ends a stream: done, cancelled, or an error carrying `seq`. */
export type TerminalFrame = DoneFrame | CancelledFrame | (ErrorFrame & { id: StreamId; seq: number });

// ------------------------------------------------------------------------------------------------
// Client API
// ------------------------------------------------------------------------------------------------

/** Close codes after which the client reconnects: 1001, 1006, 1011, 1012, 1013, 4408, 4429. */
export declare const RECONNECT_CLOSE_CODES: readonly number[];
/** The gateway refused the token: the client never reconnects. */
export declare const CLOSE_UNAUTHORIZED: 4401;

/** Codes the client itself produces, besides the protocol's. */
export type ClientErrorCode =
  /** The socket dropped and the stream had no resume_token (retryable). */
  | "connection_lost"
  /** gw.close() was called (not retryable). */
  | "closed"
  /** The gateway closed the socket with a code the client does not reconnect after. */
  | "connection_closed"
  /** Close code 4401, or the gateway refused the token. */
  | "unauthorized"
  /** The URL could not be opened at all. */
  | "bad_url"
  /** ping() while not connected. */
  | "not_connected";

export type GatewayErrorCode = ProtocolErrorCode | ClientErrorCode | (string & {});

export declare class GatewayError extends Error {
  constructor(
    code: GatewayErrorCode,
    message: string,
    init?: {
      retryable?: boolean;
      id?: StreamId | null;
      seq?: number;
      status?: number;
      retryAfterMs?: number;
      closeCode?: number;
      cause?: unknown;
    },
  );
  readonly name: "GatewayError";
  code: GatewayErrorCode;
  /** Whether sending the same start again may succeed. */
  retryable: boolean;
  /** The stream the error is about (null for connection-level errors). */
  id: StreamId | null;
  /** The last chunk's seq when the error ended a started stream. */
  seq?: number;
  /** The upstream's HTTP status (upstream_error). */
  status?: number;
  retryAfterMs?: number;
  /** The WebSocket close code behind connection_lost / connection_closed / unauthorized. */
  closeCode?: number;
  static fromFrame(frame: ErrorFrame): GatewayError;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "idle" | "closed";

export declare class GatewayStateEvent extends Event {
  readonly type: "state";
  readonly state: ConnectionState;
  readonly previous: ConnectionState | null;
  /** Reconnect attempt number (1, 2, ...) for "reconnecting", else 0. */
  readonly attempt: number;
  /** Delay before the next attempt, for "reconnecting". */
  readonly delayMs: number | null;
  /** The close code that caused this state, if any. */
  readonly closeCode: number | null;
  /** Why the client closed for good (null after gw.close()). */
  readonly error: GatewayError | null;
}

export declare class GatewayErrorEvent extends Event {
  readonly type: "error";
  readonly error: GatewayError;
}

/** The whole answer of a stream that ended with `done`. */
export interface Answer {
  id: StreamId;
  text: string;
  seq: number;
  citations: string[];
  searchResults: SearchResult[];
  images: unknown[];
  relatedQuestions: string[];
  videos: unknown[];
  usage: Usage | null;
  finishReason: string | null;
  /** The done frame as received. */
  raw: DoneFrame;
}

export type StreamState =
  | "queued"
  | "starting"
  | "streaming"
  | "resuming"
  | "cancelling"
  | "done"
  | "cancelled"
  | "error";

export interface StreamOptions {
  /** Aborting it sends `cancel`; `result` and the iteration then reject with `signal.reason`. */
  signal?: AbortSignal;
  model?: string;
  options?: StartOptions;
  /** Your own id; generated ("s1", "s2", ...) when absent. */
  id?: StreamId;
}

export declare class GatewayStream implements AsyncIterable<string> {
  private constructor();
  readonly id: StreamId;
  readonly state: StreamState;
  /** The text received so far. */
  readonly text: string;
  /** The seq of the last chunk received. */
  readonly seq: number;
  readonly resumeToken: string | null;
  readonly signal: AbortSignal | null;
  /** Whether `result` has settled. */
  readonly settled: boolean;
  /**
   * The answer once the gateway sends `done`. Rejects with a GatewayError on errors, and with the
   * abort reason (an "AbortError" DOMException unless the signal gave another) when aborted.
   */
  readonly result: Promise<Answer>;
  /** How the stream ended on the wire (never rejects): after an abort, "cancelled" once the gateway confirms. */
  readonly ended: Promise<"done" | "cancelled" | "error">;
  /** Abort the stream (sends `cancel`); no-op once it ended. */
  cancel(reason?: unknown): void;
  /** Each chunk's text. Leaving the loop early cancels the stream. One iteration per stream. */
  [Symbol.asyncIterator](): AsyncIterator<string, undefined>;
}

export interface ReconnectOptions {
  /** Ceiling of the first delay, ms (default 250). */
  initialDelayMs?: number;
  /** Largest ceiling, ms (default 30000). */
  maxDelayMs?: number;
  /** Growth of the ceiling per attempt (default 2). */
  factor?: number;
  /** Attempts in a row before giving up with connection_lost (default Infinity). */
  maxAttempts?: number;
}

/** The parts of the WHATWG WebSocket the client uses (native, or the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
}

export interface GatewayClientOptions {
  /** Sent as the first frame ({"type":"auth"}) on every connection; never put in the URL. */
  token?: string | (() => string | Promise<string>);
  /** A WebSocket class; defaults to globalThis.WebSocket (browsers, Node 22+). */
  WebSocket?: new (url: string) => WebSocketLike;
  /** false disables reconnecting. */
  reconnect?: ReconnectOptions | false;
  /** Give up on a connection that sends no welcome within this many ms, and retry (default 10000). */
  welcomeTimeoutMs?: number;
  /** Called on every state change, like a "state" event listener. */
  onstate?: (event: GatewayStateEvent) => void;
  /** Prefix of generated stream ids (default "s"). */
  idPrefix?: string;
  /** false: stay "idle" until connect() or the first stream (default: connect at once). */
  connect?: boolean;
}

export interface GatewayClientEventMap {
  state: GatewayStateEvent;
  error: GatewayErrorEvent;
}

export declare class GatewayClient extends EventTarget {
  constructor(url: string | URL, options?: GatewayClientOptions);
  readonly state: ConnectionState;
  /** The current connection's welcome (null while not open). */
  readonly welcome: WelcomeFrame | null;
  /** Resolves with the welcome once open (opening the connection when idle). */
  connect(): Promise<WelcomeFrame>;
  /**
   * Start a stream; returns at once. The start is sent when the connection is open and one of
   * the socket's `max_streams` slots is free.
   */
  stream(input: string | ChatMessage[] | { prompt: string } | { messages: ChatMessage[] }, options?: StreamOptions): GatewayStream;
  /**
   * Send a fresh token on the open connection (and keep it for reconnects). Resolves with the
   * credential's expiry from the gateway's `authenticated` answer (seconds since the epoch, or null).
   */
  authenticate(token?: string | (() => string | Promise<string>)): Promise<number | null>;
  /** Round-trip time of an application-level ping, ms. */
  ping(): Promise<number>;
  /** Close for good; unfinished streams fail with code "closed". */
  close(): void;

  addEventListener<K extends keyof GatewayClientEventMap>(
    type: K,
    listener: (event: GatewayClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof GatewayClientEventMap>(
    type: K,
    listener: (event: GatewayClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}
