// Type declarations for fabric.js, the quic-fabric JavaScript client.
// 64-bit protocol integers are BigInt where they may exceed 2^53 - 1 (positions,
// codec frames); times and counters the Client hands out are `U64Number`:
// a Number when it is a safe integer, else a BigInt.

/** A u64 as the Client exposes times and counters: Number when safe, else BigInt. */
export type U64Number = number | bigint;

/** Canonical lowercase uuid text, "00010203-0405-0607-0809-0a0b0c0d0e0f". */
export type Uuid = string;

/** Text payloads are strings, binary payloads Uint8Arrays. */
export type Payload = string | Uint8Array;

export type PriorityName = "low" | "normal" | "high";
/** "low" | "normal" | "high", or the wire value 0 | 1 | 2. Default "normal". */
export type PriorityLike = PriorityName | 0 | 1 | 2;

export declare const Priority: Readonly<{ Low: 0; Normal: 1; High: 2 }>;
/** Error codes of PROTOCOL.md section 8 by name, e.g. ErrorCode.RATE_LIMITED === 12. */
export declare const ErrorCode: Readonly<Record<string, number>>;
/** Close codes of PROTOCOL.md section 8 by name, e.g. CloseCode.SESSION_MOVED === 13. */
export declare const CloseCode: Readonly<Record<string, number>>;

/** A place in a channel's history (PROTOCOL.md 11.2). */
export interface Position {
  epoch: bigint;
  offset: bigint;
}

export type Recovery = "notRequested" | "recovered" | "epochChanged" | "trimmed" | "noHistory" | "ahead";
export type SessionOutcome = "new" | "resumed" | "expired" | "alreadyUsed" | "invalid" | "wrongUser" | "disabled" | "refreshed";
export type ClientState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

/** Who sent a message (stamped by the node). */
export interface Sender {
  clientId: Uuid;
  nodeId: Uuid;
  name: string;
  user: string | null;
}

/** A connected client, as listed by list() and presence(), and in join/leave. */
export interface ClientInfo extends Sender {
  connectedAtMs: U64Number;
}

/**
 * Every error the Client reports. `code`: the section 8 error code when the
 * node sent one (FRAME_TOO_LARGE, 2, is also checked locally), else null.
 * `codeName`: that code's name, or a local one: CLOSED (the connection or
 * the client closed; see closeCode), TIMEOUT, CONNECT_FAILED, UNSUPPORTED
 * (no WebTransport, or a feature the negotiated version lacks),
 * INVALID_ARGUMENT, BUFFER_FULL, PROTOCOL_ERROR (the node sent something
 * this client cannot use).
 */
export declare class FabricError extends Error {
  readonly name: "FabricError";
  readonly code: number | null;
  readonly codeName: string;
  /** With RATE_LIMITED: when a frame will be accepted again. */
  readonly retryAfterMs: number | null;
  /** With CLOSED: the close code of PROTOCOL.md section 8, when known. */
  readonly closeCode: number | null;
  readonly closeReason: string | null;
}

export interface ReconnectOptions {
  /** Wait before the second attempt (the first is immediate); doubles per failure. Default 250. */
  initialDelayMs?: number;
  /** Longest wait between attempts. Default 5000. */
  maxDelayMs?: number;
  /** Give up after this many failed attempts in a row. Default Infinity. */
  maxAttempts?: number;
}

export interface CertificateHash {
  algorithm: string;
  /** The hash bytes, or their base64 (as /webtransport.json gives them). */
  value: BufferSource | string;
}

export interface Discovery {
  url: string;
  serverCertificateHashes?: CertificateHash[];
  /** The highest protocol version the node speaks; below 3, no session is asked for. */
  version?: number;
}

/** What the `transport` option must return: the part of WebTransport the client uses. */
export interface WebTransportLike {
  readonly ready: Promise<unknown>;
  readonly closed: Promise<{ closeCode?: number; reason?: string }>;
  readonly incomingUnidirectionalStreams: ReadableStream<ReadableStream<Uint8Array>>;
  createUnidirectionalStream(options?: { sendOrder?: number }): Promise<WritableStream<Uint8Array>>;
  close(info?: { closeCode?: number; reason?: string }): void;
}

export interface ClientOptions {
  /** The node's WebTransport URL, e.g. "https://127.0.0.1:4433/fabric". Or use `discovery`. */
  url?: string;
  /** For self-signed development certificates (hash values as bytes or base64). */
  serverCertificateHashes?: CertificateHash[];
  /** URL of a discovery document (fetched with no-store before every connect), or a function giving one. */
  discovery?: string | (() => Discovery | Promise<Discovery>);
  /** The handshake name (1 to 64 bytes by default). Default "web". */
  name?: string;
  /** A JWT, or a function giving one before every connect (lets reconnects use a fresh token). */
  token?: string | null | (() => string | null | Promise<string | null>);
  /** Protocol versions offered. Defaults 1 and 3 (the highest this library speaks). */
  minVersion?: number;
  maxVersion?: number;
  /** Reconnect after losing the connection (default on), or false. */
  reconnect?: ReconnectOptions | boolean;
  /** With reconnect and version 3: resume the session (keep the client id and stored directs). Default true. */
  resume?: boolean;
  /** With reconnect and version 3: send messages as Idempotent frames and retry them after a reconnect. Default true. */
  idempotent?: boolean;
  /** How long after it was first sent an idempotent message is retried. Default 60000. */
  retryForMs?: number;
  /** Time for the session and the handshake. Default 10000. */
  connectTimeoutMs?: number;
  /** Time for a request's answer, and for a connection while reconnecting. Default 10000. */
  requestTimeoutMs?: number;
  /** Bytes that may wait for their stream before sends fail with BUFFER_FULL. Default 8 MiB. */
  maxBufferedBytes?: number;
  /** A factory replacing `new WebTransport(url, options)` (tests). */
  transport?: (url: string, options: { serverCertificateHashes?: { algorithm: string; value: BufferSource }[] }) => WebTransportLike;
}

export interface SendOptions {
  priority?: PriorityLike;
}

export interface Sent {
  /** The message id (the frame's id; recipients see the same id). */
  id: Uuid;
}

export interface DirectResult extends Sent {
  /** true: the recipient is away with a resumable session; delivered if it resumes before untilMs. */
  stored: boolean;
  untilMs?: U64Number;
}

export interface Subscription {
  channel: string;
  /** Members across the cluster, when the namespace reveals it. */
  subscribers: U64Number | null;
  /** Where the client now is in the channel (null: no history, or version 2). */
  position: Position | null;
  /** What became of the recovery (null on version 2). */
  recovery: Recovery | null;
}

/** Common fields of delivered messages. `from` is null for what an operator sent. */
export interface Delivery {
  id: Uuid;
  from: Sender | null;
  payload: Payload;
  priority: PriorityName;
  timestampMs: U64Number;
}

export interface Publication extends Delivery {
  channel: string;
  /** Null for a channel without history (a Publish frame). */
  position: Position | null;
}

export interface HistoryPage {
  channel: string;
  /** The channel's current position. */
  position: Position;
  /** Oldest first. */
  publications: Publication[];
  /** Whether older publications are kept (page back with before = the oldest offset). */
  more: boolean;
}

export interface NodeStats {
  nodeId: Uuid;
  serverName: string;
  uptimeMs: U64Number;
  clientsConnected: U64Number;
  connectionsTotal: U64Number;
  messagesIn: U64Number;
  messagesOut: U64Number;
  bytesIn: U64Number;
  bytesOut: U64Number;
  errors: U64Number;
  slowConsumerDisconnects: U64Number;
}

export interface ConnectionInfo {
  clientId: Uuid;
  nodeId: Uuid;
  version: number;
  /** The session outcome, when a session was asked for. */
  session: SessionOutcome | null;
}

export type StateEvent =
  | { state: "connecting"; attempt: number }
  | ({ state: "connected" } & ConnectionInfo)
  | { state: "reconnecting"; code: number | null; reason: string; attempt: number; delayMs: number }
  | { state: "closed"; code: number | null; reason: string };

export interface ClientEvents {
  broadcast: Delivery;
  direct: Delivery & { to: Uuid };
  userDirect: Delivery & { user: string };
  publication: Publication;
  join: { channel: string; member: ClientInfo };
  leave: { channel: string; member: ClientInfo };
  /** An operator ended a subscription; it is not renewed after reconnects. */
  unsubscribed: { channel: string; reason: string };
  /** The node lost publications of a channel; the client recovers from its position by itself ("resubscribed"). */
  subscriptionLost: { channel: string; reason: string };
  /** After a reconnect or a subscriptionLost: subscribed again, from the last position. */
  resubscribed: Subscription & { cause: "reconnect" | "subscriptionLost" };
  /** Subscribing again failed; `forgotten` when the node refused it for good (rules, limits). */
  resubscribeFailed: { channel: string; error: FabricError; forgotten: boolean; cause: "reconnect" | "subscriptionLost" };
  /** A publication came with a new epoch: the channel's history was lost, publications may be missing. */
  epochChanged: { channel: string; position: Position };
  /** The node's echo of a Text or Binary frame. */
  echo: { id: Uuid; payload: Payload };
  state: StateEvent;
  reconnected: ConnectionInfo;
  /** An error not tied to a request (Error frames without a pending request, undecodable frames). */
  error: FabricError;
  goodbye: { reason: string; reconnect: boolean };
  /** The client is closed for good; no more events follow. */
  closed: { code: number | null; reason: string };
}

export type ClientEvent = { [K in keyof ClientEvents]: { type: K; data: ClientEvents[K] } }[keyof ClientEvents];

export declare class Client implements AsyncIterable<ClientEvent> {
  constructor(options: ClientOptions);
  /** new Client(options) and connect(): the first connection must succeed. */
  static connect(options: ClientOptions): Promise<Client>;
  connect(): Promise<void>;
  /** Sends Goodbye, then closes the session with close code 0; pending requests reject. */
  close(reason?: string): Promise<void>;

  readonly state: ClientState;
  readonly clientId: Uuid | null;
  readonly nodeId: Uuid | null;
  readonly version: number | null;
  readonly serverName: string | null;
  readonly maxFrameBytes: number | null;
  /** The resume token the next reconnect presents (version 3 sessions). */
  readonly sessionToken: string | null;
  readonly sessionOutcome: SessionOutcome | null;
  /** The channels the client is subscribed to, as far as it knows. */
  readonly subscriptions: string[];
  /** The position up to which every publication of `channel` was received. */
  position(channel: string): Position | null;

  broadcast(payload: Payload, options?: SendOptions): Promise<Sent>;
  direct(to: Uuid, payload: Payload, options?: SendOptions): Promise<DirectResult>;
  sendToUser(user: string, payload: Payload, options?: SendOptions): Promise<Sent>;
  publish(channel: string, payload: Payload, options?: SendOptions): Promise<Sent>;
  /** events: Join/Leave events (default true); since: a Position or its text "epochhex:offset". */
  subscribe(channel: string, options?: { events?: boolean; since?: Position | string | null }): Promise<Subscription>;
  unsubscribe(channel: string): Promise<void>;
  presence(channel: string): Promise<{ channel: string; members: ClientInfo[]; truncated: boolean }>;
  list(): Promise<{ clients: ClientInfo[]; truncated: boolean }>;
  /** Round-trip time in milliseconds. */
  ping(): Promise<number>;
  stats(): Promise<NodeStats>;
  /** limit default 50 (at most the namespace's history_size); before: an offset. */
  history(channel: string, options?: { limit?: number; before?: bigint | number | null }): Promise<HistoryPage>;

  on<K extends keyof ClientEvents>(event: K, listener: (data: ClientEvents[K]) => void): this;
  off<K extends keyof ClientEvents>(event: K, listener: (data: ClientEvents[K]) => void): this;
  /** Every event, in order, until "closed"; throws BUFFER_FULL if more than bufferSize (1024) wait. */
  events(options?: { bufferSize?: number }): AsyncIterableIterator<ClientEvent>;
  [Symbol.asyncIterator](): AsyncIterableIterator<ClientEvent>;
}

export declare function toSafeNumber(value: bigint): number | bigint;
export declare function formatPosition(position: Position): string;
export declare function parsePosition(text: string): Position;
export declare function randomId(): Uuid;
export declare function uuidToBytes(text: Uuid): Uint8Array;
export declare function bytesToUuid(bytes: Uint8Array, offset?: number): Uuid;

// --- codec -------------------------------------------------------------------

/** A decoded frame. Bodies are {type, ...fields} with the fields of PROTOCOL.md 4.2 in camelCase. */
export interface Frame {
  id: Uuid;
  /** 0 low, 1 normal, 2 high. */
  priority: 0 | 1 | 2;
  timestampMs: bigint;
  sender: Sender | null;
  body: { type: string; [field: string]: unknown };
}

export declare class CodecError extends Error {
  readonly name: "CodecError";
  readonly reason: string;
  readonly kind: "malformed" | "unknownType" | "invalid" | "tooLarge";
  /** The field at fault, outermost first, e.g. ["body", "(clientList)", "clients", "[1]", "user"]. */
  readonly path: string[];
  /** The frame's id, when its first 16 bytes were there. */
  readonly frameId: Uuid | null;
}

export declare function encodeFrame(frame: Frame, maxPayloadBytes?: number): Uint8Array;
export declare function decodeFrame(payload: Uint8Array): Frame;
/** Frame types in wire tag order: FRAME_TYPES[tag]. */
export declare const FRAME_TYPES: readonly string[];

export declare class FrameReader {
  constructor(maxFrameBytes?: number);
  /** Bytes held of a frame not complete yet. */
  readonly buffered: number;
  push(chunk: Uint8Array): Array<{ payload: Uint8Array } | { tooLarge: number }>;
}

export declare const codec: Readonly<{
  encodeFrame: typeof encodeFrame;
  decodeFrame: typeof decodeFrame;
  FrameReader: typeof FrameReader;
  CodecError: typeof CodecError;
  FRAME_TYPES: typeof FRAME_TYPES;
  HARD_MAX_FRAME_BYTES: number;
  uuidToBytes: typeof uuidToBytes;
  bytesToUuid: typeof bytesToUuid;
  randomId: typeof randomId;
  toSafeNumber: typeof toSafeNumber;
  formatPosition: typeof formatPosition;
  parsePosition: typeof parsePosition;
}>;
