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

export type Role = "system" | "user" | "assistant" | "tool";

/** A text piece of a multimodal message's content (not to be confused with a stream's parts). */
export interface TextPart {
  type: "text";
  text: string;
  [key: string]: unknown;
}

export type ContentPart = TextPart | { type: string; [key: string]: unknown };

/** A tool call as an assistant message carries it back to the gateway (OpenAI's chat shape). */
export interface ToolCallRequest {
  id: string;
  type?: "function";
  function: {
    /** 1 to 128 characters of [A-Za-z0-9_.-]. */
    name: string;
    /** The arguments as a JSON string. */
    arguments?: string;
  };
}

export interface SystemMessage {
  role: "system";
  content: string | ContentPart[];
}

export interface UserMessage {
  role: "user";
  content: string | ContentPart[];
}

export interface AssistantMessage {
  role: "assistant";
  /** null when the message only calls tools. */
  content: string | ContentPart[] | null;
  /** The calls the assistant made (1 to 128), for a tool loop. */
  tool_calls?: ToolCallRequest[];
}

/** A tool's result: answers the call whose call_id is `tool_call_id`. */
export interface ToolMessage {
  role: "tool";
  tool_call_id: string;
  content: string | ContentPart[];
}

export type ChatMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage;

/** A function the model may call (OpenAI's chat `tools`); the client runs it. */
export interface ToolDeclaration {
  type: "function";
  function: {
    /** 1 to 128 characters of [A-Za-z0-9_.-]. */
    name: string;
    description?: string;
    /** A JSON schema of the arguments. */
    parameters?: Record<string, unknown>;
    strict?: boolean;
  };
}

export type ToolChoice = "auto" | "none" | "required" | { type: "function"; function: { name: string } };

/** The kinds of content a start may ask for besides text (docs/protocol.md, "Parts"). */
export type PartKind = "reasoning" | "sources" | "tools" | "progress";
export declare const PART_KINDS: readonly PartKind[];

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
  /** Up to 128 function declarations (OpenAI-compatible upstreams). */
  tools?: ToolDeclaration[];
  tool_choice?: ToolChoice;
  parallel_tool_calls?: boolean;
  /** Perplexity's: "concise" streams its reasoning steps (as progress parts). */
  stream_mode?: "full" | "concise";
}

// --- client to server ---------------------------------------------------------------------------

interface StartBase {
  type: "start";
  id: StreamId;
  /** 1 to 128 characters; the gateway's default model when absent. */
  model?: string;
  options?: StartOptions;
  /** The kinds of content wanted besides text; without it the stream is protocol 1's. */
  parts?: PartKind[];
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
  /** The seq of the last content message (of any kind) the client received. */
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
  /** The part kinds a start may ask for (absent: an older gateway, text only). */
  parts?: PartKind[];
  /** "http" on the HTTP transport, whose welcome the client makes itself (no socket limits). */
  transport?: "http";
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
  /** Counts this stream's content messages (text and parts) from 1 without gaps. */
  seq: number;
  text: string;
}

/** The model's reasoning text (a start that asked for "reasoning"); never part of the answer. */
export interface ReasoningChunkFrame {
  type: "reasoning_chunk";
  id: StreamId;
  /** The stream's shared content seq. */
  seq: number;
  text: string;
}

/** A source the answer rests on. */
export interface Source {
  /** The number the answer's [n] markers use for this source (from 1). */
  index: number;
  url: string;
  title?: string;
  snippet?: string;
  date?: string;
  [key: string]: unknown;
}

/** Sources not sent before in this stream, as soon as the upstream reveals them. */
export interface SourcesFrame {
  type: "sources";
  id: StreamId;
  seq: number;
  /** At least one. */
  sources: Source[];
}

interface ToolCallBodyBase {
  call_id: string;
  name: string;
}
/** A call whose arguments are valid JSON. */
export interface ToolCallWithArguments extends ToolCallBodyBase {
  /** The parsed JSON arguments. */
  arguments: unknown;
  arguments_raw?: never;
}
/** A call whose arguments are not valid JSON: the string as the model wrote it. */
export interface ToolCallWithRawArguments extends ToolCallBodyBase {
  arguments_raw: string;
  arguments?: never;
}
/** One tool call, as `tool_call` and `done.tool_calls` carry it. */
export type ToolCallBody = ToolCallWithArguments | ToolCallWithRawArguments;

interface ToolCallFrameHead {
  type: "tool_call";
  id: StreamId;
  seq: number;
}
/** One complete call of a tool the client declared (a start that asked for "tools"). */
export type ToolCallFrame = ToolCallFrameHead & ToolCallBody;

export type ProgressStepKind = "search" | "fetch" | "code" | "thought" | "other";

/** What the upstream is doing; fields by kind (all optional). */
export interface ProgressStep {
  kind: ProgressStepKind;
  /** search: the queries. */
  queries?: string[];
  /** search: what it found. */
  results?: unknown[];
  /** fetch: the URLs read. */
  urls?: string[];
  /** code: the code run, and its result. */
  code?: string;
  result?: string;
  /** thought: its text. */
  text?: string;
  [key: string]: unknown;
}

/** A step of the upstream's own work (a start that asked for "progress"). */
export interface ProgressFrame {
  type: "progress";
  id: StreamId;
  seq: number;
  step: ProgressStep;
}

export interface SearchResult {
  title: string;
  url: string;
  date?: string;
  [key: string]: unknown;
}

/** Token counts as the upstream reported them (a count it did not send is absent). */
/** What a stream used, normalised across upstreams (docs/usage.md): on every done, cancelled
 * and stream error after started. */
export interface Usage {
  /** All input, cached input included. */
  prompt_tokens: number;
  /** The part of prompt_tokens read from the upstream's cache, when known. */
  cached_tokens?: number;
  /** The part of prompt_tokens written to the upstream's cache (Anthropic), when known. */
  cache_write_tokens?: number;
  /** All output, reasoning included. */
  completion_tokens: number;
  /** The part of completion_tokens spent reasoning, when known. */
  reasoning_tokens?: number;
  /** prompt_tokens + completion_tokens. */
  total_tokens: number;
  /** USD (the upstream's figure or the gateway's price table); absent when unknown. */
  cost?: number;
  /** The upstream did not report the final figures: estimated from what was relayed. */
  estimated?: true;
}

export interface DoneFrame {
  type: "done";
  id: StreamId;
  /** The last content message's seq (0 if there was none). */
  seq: number;
  /** Exactly the concatenation of the stream's text_chunk texts. */
  text: string;
  citations?: string[];
  search_results?: SearchResult[];
  images?: unknown[];
  related_questions?: string[];
  videos?: unknown[];
  usage?: Usage;
  /** stop, length, tool_calls or content_filter (normalised); absent when the upstream said nothing. */
  finish_reason?: "stop" | "length" | "tool_calls" | "content_filter" | (string & {});
  /** Present (true) when the answer is the model's refusal. */
  refusal?: true;
  /** All the reasoning text (a start that asked for "reasoning"). */
  reasoning?: string;
  /** Every tool call (a start that asked for "tools"). */
  tool_calls?: ToolCallBody[];
}

export interface CancelledFrame {
  type: "cancelled";
  id: StreamId;
  /** The last content message sent. */
  seq: number;
  /** The tokens the upstream reported before the cancel (the tokens spent are spent). */
  usage?: Usage;
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
  | "budget_exceeded"
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
  /** The tokens the upstream reported before the stream failed. */
  usage?: Usage;
}

export type ServerFrame =
  | WelcomeFrame
  | AuthenticatedFrame
  | PongFrame
  | StartedFrame
  | ResumedFrame
  | TextChunkFrame
  | ReasoningChunkFrame
  | SourcesFrame
  | ToolCallFrame
  | ProgressFrame
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
  /** The transport of the connection this state is about. */
  readonly transport: Transport;
}

export declare class GatewayErrorEvent extends Event {
  readonly type: "error";
  readonly error: GatewayError;
}

/** A tool call as the client API shows it: `arguments` parsed, or `argumentsRaw` when not valid JSON. */
export type ToolCall =
  | { callId: string; name: string; arguments: unknown; argumentsRaw?: never }
  | { callId: string; name: string; argumentsRaw: string; arguments?: never };

/** What `stream.parts()` yields, told apart by `kind`; `seq` is the message's place in the stream. */
export interface TextChunkPart {
  kind: "text";
  seq: number;
  text: string;
}
export interface ReasoningPart {
  kind: "reasoning";
  seq: number;
  text: string;
}
export interface SourcesPart {
  kind: "sources";
  seq: number;
  sources: Source[];
}
export type ToolCallPart = { kind: "tool_call"; seq: number } & ToolCall;
export interface ProgressPart {
  kind: "progress";
  seq: number;
  step: ProgressStep;
}
export type StreamPart = TextChunkPart | ReasoningPart | SourcesPart | ToolCallPart | ProgressPart;

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
  /** stop, length, tool_calls or content_filter; null when the upstream said nothing. */
  finishReason: DoneFrame["finish_reason"] | null;
  /** The reasoning ("" unless the stream asked for "reasoning"). */
  reasoning: string;
  /** The sources streamed as `sources` messages (a stream that asked for "sources"). */
  sources: Source[];
  /** The tool calls (a stream that asked for "tools"). */
  toolCalls: ToolCall[];
  /** Whether the answer is the model's refusal. */
  refusal: boolean;
  /** The done frame as received. */
  raw: DoneFrame;
}

/**
 * The assistant message that continues the conversation after `answer` (for a tool loop: with
 * its `tool_calls`, `content: null` when it has no text).
 */
export declare function assistantMessage(answer: Pick<Answer, "text" | "toolCalls">): AssistantMessage;

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
  /** What to stream besides text (`stream.parts()` yields it); see `welcome.parts`. */
  parts?: PartKind[];
  /** Functions the model may call; goes into `options.tools` and implies the "tools" part. */
  tools?: ToolDeclaration[];
  /** Goes into `options.tool_choice`. */
  toolChoice?: ToolChoice;
  /** Your own id; generated ("s1", "s2", ...) when absent. */
  id?: StreamId;
}

export declare class GatewayStream implements AsyncIterable<string> {
  private constructor();
  readonly id: StreamId;
  readonly state: StreamState;
  /** The text received so far. */
  readonly text: string;
  /** The reasoning received so far. */
  readonly reasoning: string;
  /** The sources received so far, in arrival order. */
  readonly sources: readonly Source[];
  /** The tool calls received so far. */
  readonly toolCalls: readonly ToolCall[];
  /** The seq of the last content message received (text and parts share it). */
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
  /**
   * Typed parts in the order they came, text included: one ordered stream for a UI. Independent
   * of the text iteration. Leaving the loop early cancels the stream. One iteration per stream.
   */
  parts(): AsyncIterableIterator<StreamPart>;
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

/** How the client reaches the gateway: a WebSocket, or the same streams over HTTP (SSE). */
export type Transport = "websocket" | "http";

export interface GatewayClientOptions {
  /**
   * Sent as the first frame ({"type":"auth"}) on every WebSocket connection, and as
   * `Authorization: Bearer` on every HTTP request; never put in the URL.
   */
  token?: string | (() => string | Promise<string>);
  /**
   * "auto" (default): a WebSocket, switching to HTTP for good when the upgrade fails or no
   * welcome arrives in time (a proxy that blocks WebSocket); "websocket" or "http": only that.
   */
  transport?: "auto" | Transport;
  /** A fetch for the HTTP transport; defaults to globalThis.fetch (browsers, Node 18+). */
  fetch?: typeof globalThis.fetch;
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
  /** The transport of the current (or next) connection. */
  readonly transport: Transport;
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
