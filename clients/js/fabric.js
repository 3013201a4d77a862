// quic-fabric JavaScript client: one dependency-free ES module.
//
// * The codec: every frame of PROTOCOL.md (section 3 envelope, section 4
//   bincode-legacy encoding), strict on input: lengths are checked against
//   the bytes left before anything is allocated, and bad bools, Option tags,
//   enum tags, UTF-8 and trailing bytes are errors naming the field.
// * FrameReader: reassembles length-prefixed frames from stream chunks.
// * Client: a connection to a node over WebTransport (see the web contract
//   in README.md): handshake with version negotiation, one lazily opened uni
//   stream per priority, requests answered as Promises (matched by `of`),
//   events, reconnect with backoff, session resume (version 3), and
//   resubscription from the last received channel positions.
//
// 64-bit integers (u64) are BigInt in decoded frames; the Client exposes
// times and counters as Number when they are safe integers (see toSafeNumber)
// and positions as {epoch: BigInt, offset: BigInt}.

// ---------------------------------------------------------------------------
// Protocol constants

/** Largest frame payload a node ever sends, and the hard cap of any frame. */
const HARD_MAX_FRAME_BYTES = 16 * 1024 * 1024;
const MAX_VERSION = 3;
const CHANNELS_VERSION = 2;
const RECOVERY_VERSION = 3;
const MAX_U64 = (1n << 64n) - 1n;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** Wire values of Priority; also the WebTransport `sendOrder` of each stream. */
export const Priority = Object.freeze({ Low: 0, Normal: 1, High: 2 });
const PRIORITY_NAMES = ["low", "normal", "high"];

const ERROR_NAMES = [undefined, "MALFORMED_FRAME", "FRAME_TOO_LARGE", "UNKNOWN_FRAME_TYPE",
  "UNSUPPORTED_VERSION", "HANDSHAKE_REQUIRED", "ALREADY_HANDSHAKEN", "UNKNOWN_CLIENT",
  "SERVER_FULL", "INVALID_FIELD", "UNEXPECTED_FRAME", "CLUSTER_UNAVAILABLE", "RATE_LIMITED",
  "AUTH_FAILED", "INTERNAL", "RECIPIENT_SLOW", "SERVER_BUSY", "NOT_ALLOWED",
  "TOO_MANY_SUBSCRIPTIONS", "UNKNOWN_NAMESPACE", "UNKNOWN_USER", "DUPLICATE", "INBOX_FULL"];
const CLOSE_NAMES = ["NORMAL", "SHUTDOWN", "PROTOCOL_VIOLATION", "UNSUPPORTED_VERSION",
  "SERVER_FULL", "SLOW_CONSUMER", "HANDSHAKE_TIMEOUT", "AUTH_FAILED", "BAD_HANDSHAKE",
  "INTERNAL", "RATE_LIMITED", "TOKEN_EXPIRED", "KICKED", "SESSION_MOVED"];
/** Error codes of PROTOCOL.md section 8, by name. */
export const ErrorCode = Object.freeze(Object.fromEntries(
  ERROR_NAMES.flatMap((name, code) => (name ? [[name, code]] : []))));
/** Close codes of PROTOCOL.md section 8, by name. */
export const CloseCode = Object.freeze(Object.fromEntries(CLOSE_NAMES.map((n, i) => [n, i])));

// ---------------------------------------------------------------------------
// Errors

/**
 * Every error the Client reports. `code` is the section 8 error code when the
 * node sent one (or for FRAME_TOO_LARGE, checked locally with the same
 * meaning), else null; `codeName` is its name or one of the local names
 * CLOSED, TIMEOUT, CONNECT_FAILED, UNSUPPORTED, INVALID_ARGUMENT,
 * BUFFER_FULL, PROTOCOL_ERROR.
 */
export class FabricError extends Error {
  constructor(message, { code = null, codeName, retryAfterMs = null, closeCode = null,
    closeReason = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "FabricError";
    this.code = code;
    this.codeName = codeName ?? (code === null ? "ERROR" : ERROR_NAMES[code] ?? `ERROR_${code}`);
    this.retryAfterMs = retryAfterMs;
    this.closeCode = closeCode;
    this.closeReason = closeReason;
  }
}

/** The Error frame `b` as a FabricError. */
function errorFromFrame(b, prefix = "") {
  const name = ERROR_NAMES[b.code] ?? `ERROR_${b.code}`;
  return new FabricError(`${prefix}${name} (${b.code}): ${b.message}`,
    { code: b.code, codeName: name, retryAfterMs: b.retryAfterMs });
}

function describeClose({ code, reason }) {
  const how = code === null || code === undefined ? ""
    : ` (close code ${code}${CLOSE_NAMES[code] ? " " + CLOSE_NAMES[code] : ""})`;
  return `connection closed${how}${reason ? ": " + reason : ""}`;
}

function closedError(info, suffix = "") {
  return new FabricError(describeClose(info) + suffix,
    { codeName: "CLOSED", closeCode: info.code ?? null, closeReason: info.reason ?? null });
}

const invalid = (message, cause) => new FabricError(message, { codeName: "INVALID_ARGUMENT", cause });
const protocolError = (message, cause) => new FabricError(message, { codeName: "PROTOCOL_ERROR", cause });

// ---------------------------------------------------------------------------
// Small helpers

const noop = () => {};

/** `v` (a BigInt) as a Number when it is a safe integer, else `v` unchanged. */
export function toSafeNumber(v) {
  return typeof v === "bigint" && v <= MAX_SAFE && v >= -MAX_SAFE ? Number(v) : v;
}

function describe(v) {
  if (typeof v === "string") return JSON.stringify(v.length > 40 ? v.slice(0, 40) + "…" : v);
  if (typeof v === "bigint") return `${v}n`;
  if (v instanceof Uint8Array) return `Uint8Array(${v.length})`;
  return v === null || typeof v !== "object" ? String(v) : Array.isArray(v) ? "an array" : "an object";
}

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => { d.resolve = resolve; d.reject = reject; });
  d.promise.catch(noop); // whoever awaits it sees the rejection; nobody else must
  return d;
}

/** Rethrows an error from a listener outside the library's own call stack. */
function reportLater(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => { throw err; });
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** 16 bytes (RFC 9562 order) at `offset` of `bytes` as lowercase uuid text. */
export function bytesToUuid(bytes, offset = 0) {
  let s = "";
  for (let i = 0; i < 16; i++) {
    if (i === 4 || i === 6 || i === 8 || i === 10) s += "-";
    s += HEX[bytes[offset + i]];
  }
  return s;
}

/** Uuid text (canonical 8-4-4-4-12 form, any case) as 16 bytes. */
export function uuidToBytes(text) {
  if (typeof text !== "string" || !UUID_RE.test(text)) throw new CodecError(`not a uuid: ${describe(text)}`);
  const hex = text.replace(/-/g, "");
  const out = new Uint8Array(16);
  for (let i = 0; i < 16; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

/** A fresh random (version 4) uuid: frame ids must be fresh and random (PROTOCOL.md 5, 11.7). */
export function randomId() {
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return bytesToUuid(b);
}

function base64ToBytes(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

/** A Position as text: 16 lowercase hex digits of the epoch, `:`, the offset. */
export function formatPosition({ epoch, offset }) {
  return `${BigInt(epoch).toString(16).padStart(16, "0")}:${BigInt(offset)}`;
}

/** Parses the text form of formatPosition. */
export function parsePosition(text) {
  const m = /^([0-9a-fA-F]{16}):([0-9]{1,20})$/.exec(text);
  if (!m) throw invalid(`not a position (expected 16 hex digits, ':', an offset): ${describe(text)}`);
  return { epoch: BigInt("0x" + m[1]), offset: toU64(BigInt(m[2])) };
}

// ---------------------------------------------------------------------------
// Codec: bincode legacy (little-endian fixed-width integers, u64 lengths,
// u32 enum tags) inside a u32 big-endian length prefix.

/**
 * Why bytes are not a frame, or a value cannot be encoded. `kind` is
 * "malformed", "unknownType" (a body tag this library does not know),
 * "invalid" (encoding: a value of the wrong type) or "tooLarge" (encoding:
 * over the size limit). `path` names the field, `frameId` the frame when its
 * first 16 bytes could be read.
 */
export class CodecError extends Error {
  constructor(reason, kind = "malformed") {
    super(reason);
    this.name = "CodecError";
    this.reason = reason;
    this.kind = kind;
    this.path = [];
    this.frameId = null;
  }
}

function at(err, segment) {
  if (err instanceof CodecError) err.path.unshift(segment);
  return err;
}

function where(path) {
  const s = path.reduce((acc, seg) => (/^[[(]/.test(seg) || !acc ? acc + seg : `${acc}.${seg}`), "");
  return s ? `${s}: ` : "";
}

const DECODER = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }); // keep a leading U+FEFF
const ENCODER = new TextEncoder();

/** Index of the first byte of `b` that is not part of valid UTF-8 (for error messages). */
function utf8ValidUpTo(b) {
  let i = 0;
  while (i < b.length) {
    const c = b[i];
    if (c < 0x80) { i++; continue; }
    const n = c >= 0xc2 && c <= 0xdf ? 1 : c >= 0xe0 && c <= 0xef ? 2 : c >= 0xf0 && c <= 0xf4 ? 3 : 0;
    if (n === 0) return i;
    const lo = c === 0xe0 ? 0xa0 : c === 0xf0 ? 0x90 : 0x80;
    const hi = c === 0xed ? 0x9f : c === 0xf4 ? 0x8f : 0xbf;
    if (!(b[i + 1] >= lo && b[i + 1] <= hi)) return i;
    for (let k = 2; k <= n; k++) if ((b[i + k] & 0xc0) !== 0x80) return i;
    i += n + 1;
  }
  return i;
}

function decodeUtf8(bytes) {
  try {
    return DECODER.decode(bytes);
  } catch {
    throw new CodecError(`invalid UTF-8 in a string, at byte ${utf8ValidUpTo(bytes)} of the string`);
  }
}

function isWellFormed(s) {
  return typeof s.isWellFormed === "function" ? s.isWellFormed() : !/\p{Cs}/u.test(s);
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }
  get left() { return this.bytes.length - this.pos; }
  /** Claims `n` bytes and returns their offset. */
  take(n) {
    if (n > this.left) throw new CodecError(`truncated: ${n - this.left} more bytes expected`);
    const p = this.pos;
    this.pos += n;
    return p;
  }
  u8() { return this.bytes[this.take(1)]; }
  u16() { return this.view.getUint16(this.take(2), true); }
  u32() { return this.view.getUint32(this.take(4), true); }
  u64() { return this.view.getBigUint64(this.take(8), true); }
  /** A u64 byte length, checked against what is left before anything is read or allocated. */
  length(what) {
    const n = this.u64();
    if (n > BigInt(this.left)) {
      throw new CodecError(`truncated: ${what} of ${n} bytes, but only ${this.left} bytes are left`);
    }
    return Number(n);
  }
  flag(what) {
    const b = this.u8();
    if (b > 1) throw new CodecError(`invalid ${what} 0x${HEX[b]} (expected 0x00 or 0x01)`);
    return b === 1;
  }
  raw(n) {
    const p = this.take(n);
    return this.bytes.subarray(p, p + n);
  }
}

class Writer {
  constructor(maxPayload) {
    this.limit = maxPayload + 4;
    this.bytes = new Uint8Array(256);
    this.view = new DataView(this.bytes.buffer);
    this.pos = 4; // room for the length prefix
  }
  /** Claims `n` bytes (growing the buffer, never past the limit) and returns their offset. */
  room(n) {
    const end = this.pos + n;
    if (end > this.limit) throw new CodecError(`frame payload exceeds ${this.limit - 4} bytes`, "tooLarge");
    if (end > this.bytes.length) {
      const grown = new Uint8Array(Math.min(this.limit, Math.max(end, this.bytes.length * 2)));
      grown.set(this.bytes.subarray(0, this.pos));
      this.bytes = grown;
      this.view = new DataView(grown.buffer);
    }
    const p = this.pos;
    this.pos = end;
    return p;
  }
  // (room() may replace the buffer: call it before reading this.bytes / this.view.)
  u8(v) { const p = this.room(1); this.bytes[p] = v; }
  u16(v) { const p = this.room(2); this.view.setUint16(p, v, true); }
  u32(v) { const p = this.room(4); this.view.setUint32(p, v, true); }
  u64(v) { const p = this.room(8); this.view.setBigUint64(p, v, true); }
  raw(b) { const p = this.room(b.length); this.bytes.set(b, p); }
  string(v) {
    if (typeof v !== "string") throw new CodecError(`expected a string, not ${describe(v)}`, "invalid");
    if (!isWellFormed(v)) throw new CodecError("string holds a lone surrogate (not encodable as UTF-8)", "invalid");
    // UTF-8 takes at least one byte per UTF-16 unit: refuse before encoding a huge string.
    if (this.pos + 8 + v.length > this.limit) this.room(8 + v.length);
    const b = ENCODER.encode(v);
    this.u64(BigInt(b.length));
    this.raw(b);
  }
}

function checkUint(v, max, what) {
  if (!Number.isInteger(v) || v < 0 || v > max) throw new CodecError(`expected ${what}, not ${describe(v)}`, "invalid");
  return v;
}

function toU64(v) {
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === "bigint" && v >= 0n && v <= MAX_U64) return v;
  throw new CodecError(`expected a u64 (BigInt, or a safe integer Number, from 0), not ${describe(v)}`, "invalid");
}

// Type descriptors: dec(reader) -> value, enc(writer, value), min = fewest bytes a value takes.
const u16 = { min: 2, dec: (r) => r.u16(), enc: (w, v) => w.u16(checkUint(v, 0xffff, "a u16")) };
const u32 = { min: 4, dec: (r) => r.u32(), enc: (w, v) => w.u32(checkUint(v, 0xffffffff, "a u32")) };
const u64 = { min: 8, dec: (r) => r.u64(), enc: (w, v) => w.u64(toU64(v)) };
const bool = {
  min: 1,
  dec: (r) => r.flag("bool byte"),
  enc: (w, v) => {
    if (typeof v !== "boolean") throw new CodecError(`expected a boolean, not ${describe(v)}`, "invalid");
    w.u8(v ? 1 : 0);
  },
};
const string = { min: 8, dec: (r) => decodeUtf8(r.raw(r.length("string"))), enc: (w, v) => w.string(v) };
const bytes = {
  min: 8,
  dec: (r) => r.raw(r.length("byte string")).slice(), // a copy: never pins the stream's chunk
  enc: (w, v) => {
    if (!(v instanceof Uint8Array)) throw new CodecError(`expected a Uint8Array, not ${describe(v)}`, "invalid");
    w.u64(BigInt(v.length));
    w.raw(v);
  },
};
const uuid = {
  min: 16,
  dec: (r) => bytesToUuid(r.bytes, r.take(16)),
  enc: (w, v) => {
    try { w.raw(uuidToBytes(v)); } catch (e) { e.kind = "invalid"; throw e; }
  },
};
const option = (t) => ({
  min: 1,
  dec: (r) => (r.flag("Option tag") ? t.dec(r) : null),
  enc: (w, v) => {
    if (v === null || v === undefined) return w.u8(0);
    w.u8(1);
    t.enc(w, v);
  },
});
const list = (t) => ({
  min: 8,
  dec: (r) => {
    const n = r.u64();
    // Every element takes at least t.min bytes: a huge count fails here, before any work.
    if (n * BigInt(t.min) > BigInt(r.left)) {
      throw new CodecError(`truncated: a list of ${n} elements needs at least ${n * BigInt(t.min)} bytes, but only ${r.left} are left`);
    }
    const out = [];
    for (let i = 0; i < Number(n); i++) {
      try { out.push(t.dec(r)); } catch (e) { throw at(e, `[${i}]`); }
    }
    return out;
  },
  enc: (w, v) => {
    if (!Array.isArray(v)) throw new CodecError(`expected an array, not ${describe(v)}`, "invalid");
    w.u64(BigInt(v.length));
    v.forEach((x, i) => { try { t.enc(w, x); } catch (e) { throw at(e, `[${i}]`); } });
  },
});
const struct = (fields) => ({
  min: fields.reduce((sum, [, t]) => sum + t.min, 0),
  dec: (r) => {
    const o = {};
    for (const [k, t] of fields) {
      try { o[k] = t.dec(r); } catch (e) { throw at(e, k); }
    }
    return o;
  },
  enc: (w, v) => {
    if (v === null || typeof v !== "object") throw new CodecError(`expected an object, not ${describe(v)}`, "invalid");
    for (const [k, t] of fields) {
      try { t.enc(w, v[k]); } catch (e) { throw at(e, k); }
    }
  },
});
/** A field-less enum whose variants are the strings of `names`. */
const named = (typeName, names) => ({
  min: 4,
  dec: (r) => {
    const tag = r.u32();
    if (tag >= names.length) throw new CodecError(`invalid enum tag ${tag} for ${typeName} (expected 0 to ${names.length - 1})`);
    return names[tag];
  },
  enc: (w, v) => {
    const tag = names.indexOf(v);
    if (tag < 0) throw new CodecError(`expected a ${typeName} (${names.join(", ")}), not ${describe(v)}`, "invalid");
    w.u32(tag);
  },
});
/** An enum with fields: values are {type, ...fields}. */
const union = (typeName, variants) => {
  const types = variants.map(([type, fields]) => [type, struct(fields)]);
  const index = new Map(types.map(([type], i) => [type, i]));
  return {
    min: 4,
    names: types.map(([type]) => type),
    dec: (r) => {
      const tag = r.u32();
      const variant = types[tag];
      if (!variant) {
        if (typeName === "Body") throw new CodecError(`unknown frame type ${tag}`, "unknownType");
        throw new CodecError(`invalid enum tag ${tag} for ${typeName} (expected 0 to ${types.length - 1})`);
      }
      try { return { type: variant[0], ...variant[1].dec(r) }; } catch (e) { throw at(e, `(${variant[0]})`); }
    },
    enc: (w, v) => {
      const tag = index.get(v?.type);
      if (tag === undefined) throw new CodecError(`unknown ${typeName} type ${describe(v?.type)}`, "invalid");
      w.u32(tag);
      try { types[tag][1].enc(w, v); } catch (e) { throw at(e, `(${v.type})`); }
    },
  };
};

/** Priority keeps its wire value: 0 low, 1 normal, 2 high. */
const priority = named("Priority", [0, 1, 2]);
/** Payload: Text is a JS string, Binary a Uint8Array. */
const payload = {
  min: 12,
  dec: (r) => {
    const tag = r.u32();
    if (tag === 0) return string.dec(r);
    if (tag === 1) return bytes.dec(r);
    throw new CodecError(`invalid enum tag ${tag} for Payload (expected 0 to 1)`);
  },
  enc: (w, v) => {
    if (typeof v === "string") { w.u32(0); w.string(v); return; }
    if (v instanceof Uint8Array) { w.u32(1); bytes.enc(w, v); return; }
    throw new CodecError(`a payload must be a string or a Uint8Array, not ${describe(v)}`, "invalid");
  },
};
const sender = struct([["clientId", uuid], ["nodeId", uuid], ["name", string], ["user", option(string)]]);
const clientInfo = struct([["clientId", uuid], ["nodeId", uuid], ["name", string],
  ["user", option(string)], ["connectedAtMs", u64]]);
const position = struct([["epoch", u64], ["offset", u64]]);
const RECOVERY = ["notRequested", "recovered", "epochChanged", "trimmed", "noHistory", "ahead"];
const SESSION_OUTCOMES = ["new", "resumed", "expired", "alreadyUsed", "invalid", "wrongUser", "disabled", "refreshed"];
const handshakeFields = [["minVersion", u16], ["maxVersion", u16], ["name", string], ["token", option(string)]];
const nodeStats = struct([["nodeId", uuid], ["serverName", string], ["uptimeMs", u64],
  ["clientsConnected", u64], ["connectionsTotal", u64], ["messagesIn", u64], ["messagesOut", u64],
  ["bytesIn", u64], ["bytesOut", u64], ["errors", u64], ["slowConsumerDisconnects", u64]]);
const keyed = union("Keyed", [
  ["broadcast", [["payload", payload]]],
  ["direct", [["to", uuid], ["payload", payload]]],
  ["publish", [["channel", string], ["payload", payload]]],
  ["userDirect", [["user", string], ["payload", payload]]],
]);

/** PROTOCOL.md 4.2, in tag order. */
const body = union("Body", [
  ["handshake", handshakeFields],
  ["handshakeAck", [["version", u16], ["clientId", uuid], ["nodeId", uuid], ["serverName", string], ["maxFrameBytes", u32]]],
  ["text", [["text", string]]],
  ["binary", [["data", bytes]]],
  ["broadcast", [["payload", payload]]],
  ["direct", [["to", uuid], ["payload", payload]]],
  ["ping", []],
  ["pong", [["of", uuid]]],
  ["listClients", []],
  ["clientList", [["of", uuid], ["clients", list(clientInfo)], ["truncated", bool]]],
  ["ack", [["of", uuid]]],
  ["error", [["of", option(uuid)], ["code", u16], ["message", string], ["retryAfterMs", option(u32)]]],
  ["goodbye", [["reason", string], ["reconnect", bool]]],
  ["statsRequest", []],
  ["stats", [["of", uuid], ["stats", nodeStats]]],
  ["subscribe", [["channel", string], ["events", bool]]],
  ["subscribeAck", [["of", uuid], ["channel", string], ["subscribers", option(u64)]]],
  ["unsubscribe", [["channel", string]]],
  ["publish", [["channel", string], ["payload", payload]]],
  ["join", [["channel", string], ["member", clientInfo]]],
  ["leave", [["channel", string], ["member", clientInfo]]],
  ["presenceRequest", [["channel", string]]],
  ["presence", [["of", uuid], ["channel", string], ["members", list(clientInfo)], ["truncated", bool]]],
  ["userDirect", [["user", string], ["payload", payload]]],
  ["unsubscribed", [["channel", string], ["reason", string]]],
  ["publication", [["channel", string], ["payload", payload], ["position", position]]],
  ["subscribeSince", [["channel", string], ["events", bool], ["since", option(position)]]],
  ["subscribed", [["of", uuid], ["channel", string], ["subscribers", option(u64)],
    ["position", option(position)], ["recovery", named("Recovery", RECOVERY)]]],
  ["historyRequest", [["channel", string], ["limit", u32], ["before", option(u64)]]],
  ["history", [["of", uuid], ["channel", string], ["position", position], ["publications", list(bytes)], ["more", bool]]],
  ["subscriptionLost", [["channel", string], ["reason", string]]],
  ["idempotent", [["message", keyed]]],
  ["resumeHandshake", [["handshake", struct(handshakeFields)], ["resume", option(string)]]],
  ["session", [["token", string], ["windowMs", u64], ["outcome", named("SessionOutcome", SESSION_OUTCOMES)], ["stored", u32]]],
  ["stored", [["of", uuid], ["untilMs", u64]]],
]);
const frameType = struct([["id", uuid], ["priority", priority], ["timestampMs", u64],
  ["sender", option(sender)], ["body", body]]);

/** The frame types, in wire tag order (index = tag). */
export const FRAME_TYPES = Object.freeze(body.names);

/**
 * Encodes `frame` ({id, priority, timestampMs, sender, body: {type, ...}})
 * with its length prefix. Throws CodecError: kind "invalid" for a value of
 * the wrong type, "tooLarge" when the payload would exceed `maxPayloadBytes`
 * (checked as it grows, so an oversized message is never fully buffered).
 */
export function encodeFrame(frame, maxPayloadBytes = HARD_MAX_FRAME_BYTES) {
  const w = new Writer(Math.min(maxPayloadBytes, HARD_MAX_FRAME_BYTES));
  try {
    frameType.enc(w, frame);
  } catch (e) {
    if (e instanceof CodecError) e.message = `cannot encode frame: ${where(e.path)}${e.reason}`;
    throw e;
  }
  const out = w.bytes.subarray(0, w.pos);
  new DataView(out.buffer, out.byteOffset, 4).setUint32(0, w.pos - 4, false);
  return out;
}

/** Decodes one frame payload (the bytes after the length prefix); every byte must be used. */
export function decodeFrame(payloadBytes) {
  const r = new Reader(payloadBytes);
  try {
    const frame = frameType.dec(r);
    if (r.left) throw new CodecError(`${r.left} trailing bytes`);
    return frame;
  } catch (e) {
    if (!(e instanceof CodecError)) throw e;
    if (payloadBytes.length >= 16) e.frameId = bytesToUuid(payloadBytes);
    e.message = e.kind === "unknownType" ? e.reason : `malformed frame: ${where(e.path)}${e.reason}`;
    throw e;
  }
}

/** The request id a reply frame answers, or null. */
function replyTo(b) {
  return b.type === "error" ? b.of : typeof b.of === "string" ? b.of : null;
}

/**
 * Reassembles frames from the chunks of one stream: u32 big-endian length,
 * then the payload. push(chunk) returns what completed: {payload} for each
 * frame, or {tooLarge: length} for a frame over the maximum, whose bytes are
 * then skipped as they arrive (never buffered). Memory held: at most one
 * frame (up to the maximum) plus the last chunk.
 */
export class FrameReader {
  #max;
  #chunks = [];
  #buffered = 0;
  #length = -1; // payload length of the frame being read, once its prefix is in
  #skip = 0; // bytes of an oversized frame still to throw away

  constructor(maxFrameBytes = HARD_MAX_FRAME_BYTES) {
    this.#max = maxFrameBytes;
  }

  /** Bytes held of a frame not complete yet. */
  get buffered() { return this.#buffered; }

  push(chunk) {
    const out = [];
    if (this.#skip > 0) {
      const n = Math.min(this.#skip, chunk.length);
      this.#skip -= n;
      chunk = chunk.subarray(n);
    }
    if (chunk.length) {
      this.#chunks.push(chunk);
      this.#buffered += chunk.length;
    }
    for (;;) {
      if (this.#length < 0) {
        if (this.#buffered < 4) break;
        const h = this.#take(4);
        const len = ((h[0] << 24) >>> 0) + (h[1] << 16) + (h[2] << 8) + h[3];
        if (len > this.#max) {
          out.push({ tooLarge: len });
          const n = Math.min(len, this.#buffered);
          this.#drop(n);
          this.#skip = len - n;
          continue;
        }
        this.#length = len;
      }
      if (this.#buffered < this.#length) break;
      out.push({ payload: this.#take(this.#length) });
      this.#length = -1;
    }
    return out;
  }

  #take(n) {
    this.#buffered -= n;
    const first = this.#chunks[0];
    if (n === 0) return new Uint8Array(0);
    if (first.length >= n) { // the usual case: no copy
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = new Uint8Array(n);
    for (let filled = 0; filled < n;) {
      const c = this.#chunks[0];
      const k = Math.min(c.length, n - filled);
      out.set(c.subarray(0, k), filled);
      filled += k;
      if (k === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
    return out;
  }

  #drop(n) {
    this.#buffered -= n;
    while (n > 0) {
      const c = this.#chunks[0];
      const k = Math.min(c.length, n);
      n -= k;
      if (k === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
  }
}

/** The codec, for tests and tools. */
export const codec = Object.freeze({
  encodeFrame, decodeFrame, FrameReader, CodecError, FRAME_TYPES, HARD_MAX_FRAME_BYTES,
  uuidToBytes, bytesToUuid, randomId, toSafeNumber, formatPosition, parsePosition,
});

// ---------------------------------------------------------------------------
// Channel positions: which publications of a channel's history the client
// has, so that a recovery after a reconnect neither misses nor repeats one
// (a port of the reference client's Track, PROTOCOL.md 11.2).

/** Most offsets remembered above the watermark; past it the watermark moves up. */
const MAX_ABOVE = 4096;

class Track {
  constructor(epoch, watermark) {
    this.epoch = epoch;
    this.watermark = watermark; // every offset up to here was received
    this.above = new Set(); // offsets received above the watermark (other priorities overtook)
  }
  static at(p) { return new Track(p.epoch, p.offset); }
  position() { return { epoch: this.epoch, offset: this.watermark }; }
  clone() {
    const t = new Track(this.epoch, this.watermark);
    t.above = new Set(this.above);
    return t;
  }
  settle() {
    for (const o of this.above) if (o <= this.watermark) this.above.delete(o);
    while (this.above.delete(this.watermark + 1n)) this.watermark++;
  }
  /** Whether the publication at `p` is new ("new", "newEpoch") or already had ("duplicate"). */
  static take(sub, p) {
    let taken = "new";
    // Without a known base (before the Subscribed, or in a new epoch) nothing
    // below `p` counts as had: a lower offset may still come on another stream.
    if (!sub.track) sub.track = new Track(p.epoch, 0n);
    else if (sub.track.epoch !== p.epoch) {
      sub.track = new Track(p.epoch, 0n);
      taken = "newEpoch";
    }
    const t = sub.track;
    if (p.offset <= t.watermark || t.above.has(p.offset)) return "duplicate";
    t.above.add(p.offset);
    t.settle();
    if (t.above.size > MAX_ABOVE) {
      t.watermark = [...t.above].reduce((a, b) => (b < a ? b : a)) - 1n;
      t.settle();
    }
    return taken;
  }
  /** A Subscribed says where the client is; only Ahead takes a position back. */
  static reached(sub, p, recovery) {
    const t = sub.track;
    if (t && t.epoch === p.epoch && recovery !== "ahead") {
      if (p.offset > t.watermark) t.watermark = p.offset;
      t.settle();
    } else sub.track = Track.at(p);
  }
}

// ---------------------------------------------------------------------------
// Link: one WebTransport session and its streams.

/** Frames held while the handshake completes (frames of other streams may overtake the HandshakeAck). */
const MAX_EARLY_FRAMES = 10000;

class Link {
  #drained = null;

  constructor(wt, onPayload, onLost) {
    this.wt = wt;
    this.onPayload = onPayload;
    this.onLost = onLost;
    this.writers = [null, null, null]; // Promise<WritableStreamDefaultWriter> per priority
    this.tails = [Promise.resolve(), Promise.resolve(), Promise.resolve()]; // write order per priority
    this.queued = 0; // bytes waiting for their stream
    this.pending = new Map(); // request id -> request, sent and not answered
    this.phase = "handshake"; // -> "session" (awaiting the Session frame) -> "ready" -> "open"
    this.handshake = deferred();
    this.wantSession = false;
    this.early = [];
    this.ack = null;
    this.session = null;
    this.lost = null; // {code, reason} once the session ended
    this.leaving = null; // the reason of a Goodbye that asked us to reconnect
    this.onIdle = null;
    this.retryHint = 0; // longest retry_after_ms seen (close code 10 backoff)
    this.readers = 0;
    Promise.resolve(wt.ready).catch(noop);
    Promise.resolve(wt.closed).then(
      (info) => this.#lose({ code: info?.closeCode ?? null, reason: info?.reason ?? "" }),
      (err) => this.#lose({ code: null, reason: err?.message || String(err) }),
    ).catch(reportLater);
  }

  start() {
    this.#accept().catch(noop);
  }

  /** Writes `bytes` on the stream of `priority`, opened on first use; resolves once written. */
  write(p, bytes) {
    this.queued += bytes.length;
    const step = this.tails[p].then(async () => {
      try {
        if (this.lost) throw closedError(this.lost);
        const opening = (this.writers[p] ??= this.wt.createUnidirectionalStream({ sendOrder: p })
          .then((stream) => stream.getWriter()));
        let w;
        try {
          w = await opening;
          await w.ready; // backpressure: do not pile chunks into a stalled stream
        } catch (e) {
          if (this.writers[p] === opening) this.writers[p] = null; // a later write opens a new stream
          throw e;
        }
        // Wrapped in an array: the chain must not wait for the write itself.
        return [w.write(bytes).catch((e) => {
          if (this.writers[p] === opening) this.writers[p] = null;
          throw e;
        })];
      } finally {
        this.queued -= bytes.length;
      }
    });
    this.tails[p] = step.then(noop, noop);
    return step.then(([done]) => done);
  }

  close(code, reason) {
    try {
      this.wt.close({ closeCode: code, reason: String(reason).slice(0, 256) });
    } catch { /* already closed */ }
  }

  /** Reads every stream the node opens, concurrently. */
  async #accept() {
    const streams = this.wt.incomingUnidirectionalStreams.getReader();
    for (;;) {
      const next = await streams.read();
      if (next.done) return;
      this.#read(next.value).catch(reportLater);
    }
  }

  async #read(stream) {
    this.readers++;
    const frames = new FrameReader(HARD_MAX_FRAME_BYTES);
    try {
      // Never cancel a node stream: the node closes with PROTOCOL_VIOLATION.
      const reader = stream.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const item of frames.push(value)) {
          try { this.onPayload(this, item); } catch (e) { reportLater(e); }
        }
      }
      if (frames.buffered && !this.lost) this.onPayload(this, { truncated: frames.buffered });
    } catch {
      // The stream or the session ended; the `closed` handler reports it.
    } finally {
      this.readers--;
      if (this.readers === 0) this.#drained?.();
    }
  }

  #lose(info) {
    if (this.lost) return;
    this.lost = info;
    // Let the readers hand over what they already read (a refusal's Error
    // frame, replies), then report, within a second.
    let timer;
    const done = () => {
      clearTimeout(timer);
      this.#drained = null;
      this.onLost(this, info);
    };
    if (this.readers === 0) return done();
    timer = setTimeout(done, 1000);
    this.#drained = done;
  }
}

// ---------------------------------------------------------------------------
// Client

const DEFAULT_RECONNECT = { initialDelayMs: 250, maxDelayMs: 5000, maxAttempts: Infinity };
/** Close codes after which reconnecting would fail the same way or do harm. */
const FINAL_CLOSE_CODES = new Set([3, 7, 8, 11, 12, 13]);
/** Handshake refusals that another attempt would get again. */
const FINAL_REFUSALS = new Set([4, 9, 13]);
/** Subscribe errors that will not pass: the channel is forgotten. */
const LASTING_SUBSCRIBE_ERRORS = new Set([3, 9, 17, 18, 19]);
const RESUBSCRIBE_ATTEMPTS = 5;
const GOODBYE_SETTLE_MS = 2000;
/** A connection lost sooner than this after its handshake counts as short-lived. */
const SHORT_LIVED_MS = 5000;
const MAX_WAITING = 4096;
const now = () => (globalThis.performance ?? Date).now();

function toPriority(p = "normal") {
  const i = typeof p === "string" ? PRIORITY_NAMES.indexOf(p.toLowerCase()) : p;
  if (!(i === 0 || i === 1 || i === 2)) throw invalid(`priority must be "low", "normal", "high" or 0 to 2, not ${describe(p)}`);
  return i;
}

function toPayload(v) {
  if (typeof v === "string") return v;
  if (v instanceof Uint8Array) return v;
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  throw invalid(`a payload must be a string or a Uint8Array, not ${describe(v)}`);
}

function checkText(v, what) {
  if (typeof v !== "string") throw invalid(`${what} must be a string, not ${describe(v)}`);
  return v;
}

function toPosition(p) {
  if (typeof p === "string") return parsePosition(p);
  try {
    return { epoch: toU64(p?.epoch), offset: toU64(p?.offset) };
  } catch (e) {
    throw invalid(`not a position {epoch, offset}: ${e.message}`);
  }
}

const clientInfo2 = (m) => ({ ...m, connectedAtMs: toSafeNumber(m.connectedAtMs) });

function unsupported() {
  const why = globalThis.isSecureContext === false
    ? "WebTransport is not available on this page: it needs a secure context (https, or http://localhost)."
    : "WebTransport is not supported by this browser, or this page is not a secure context (it needs https, or http://localhost).";
  return new FabricError(`${why} WebTransport works in Chrome and Edge 97+ and Firefox 114+; Safari does not support it yet.`,
    { codeName: "UNSUPPORTED" });
}

function normalize(o) {
  const n = {
    url: o.url, serverCertificateHashes: o.serverCertificateHashes, discovery: o.discovery,
    name: o.name ?? "web", token: o.token ?? null,
    minVersion: o.minVersion ?? 1, maxVersion: Math.min(o.maxVersion ?? MAX_VERSION, MAX_VERSION),
    reconnect: o.reconnect === false || o.reconnect === null ? null
      : { ...DEFAULT_RECONNECT, ...(typeof o.reconnect === "object" ? o.reconnect : {}) },
    resume: o.resume ?? true, idempotent: o.idempotent ?? true, retryForMs: o.retryForMs ?? 60_000,
    connectTimeoutMs: o.connectTimeoutMs ?? 10_000, requestTimeoutMs: o.requestTimeoutMs ?? 10_000,
    maxBufferedBytes: o.maxBufferedBytes ?? 8 * 1024 * 1024, transport: o.transport ?? null,
  };
  if (!n.url && !n.discovery) throw invalid("Client needs `url` or `discovery`");
  if (!Number.isInteger(n.minVersion) || n.minVersion < 1 || !Number.isInteger(n.maxVersion) || n.minVersion > n.maxVersion) {
    throw invalid(`versions must satisfy 1 <= minVersion <= maxVersion <= ${MAX_VERSION}`);
  }
  return n;
}

/**
 * A connection to a quic-fabric node over WebTransport that survives
 * reconnects. See README.md and fabric.d.ts for the API.
 */
export class Client {
  #o;
  #state = "idle";
  #link = null; // the installed (open) link
  #attempt = null; // the link being connected
  #listeners = new Map();
  #iterators = new Set();
  #waiting = []; // requests waiting for a connection
  #subs = new Map(); // channel -> {events, track}
  #left = new Map(); // channel -> how often it was left (an answer to an older subscribe must not re-add it)
  #seq = 0;
  #sleeps = new Set();
  #ack = null;
  #session = null;
  #wantSession = false;
  #rateBackoff = 0;
  #shortLived = 0; // connections in a row lost soon after their handshake
  #lastTarget = null; // the last discovery document fetched, for when the next fetch fails

  constructor(options = {}) {
    this.#o = normalize(options);
  }

  /** Creates a client and connects it (the first connection must succeed). */
  static async connect(options) {
    const client = new Client(options);
    await client.connect();
    return client;
  }

  get state() { return this.#state; }
  get clientId() { return this.#ack?.clientId ?? null; }
  get nodeId() { return this.#ack?.nodeId ?? null; }
  get version() { return this.#ack?.version ?? null; }
  get serverName() { return this.#ack?.serverName ?? null; }
  get maxFrameBytes() { return this.#ack?.maxFrameBytes ?? null; }
  get sessionToken() { return this.#session?.token || null; }
  get sessionOutcome() { return this.#session?.outcome ?? null; }
  get subscriptions() { return [...this.#subs.keys()]; }
  /** The last position up to which every publication of `channel` was received, or null. */
  position(channel) { return this.#subs.get(channel)?.track?.position() ?? null; }

  on(event, fn) {
    if (typeof fn !== "function") throw invalid("a listener must be a function");
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return this;
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
    return this;
  }

  /**
   * Every event as {type, data}, in order, until "closed". At most
   * `bufferSize` events wait for the consumer; one more makes the iterator
   * throw a BUFFER_FULL FabricError (nothing is dropped silently).
   */
  events({ bufferSize = 1024 } = {}) {
    const queue = [];
    let wake = null;
    let failure = null;
    let done = this.#state === "closed";
    const sink = {
      push: (type, data) => {
        if (done || failure) return;
        if (queue.length >= bufferSize) failure = new FabricError(`event iterator fell ${bufferSize} events behind`, { codeName: "BUFFER_FULL" });
        else queue.push({ type, data });
        if (type === "closed") done = true;
        wake?.();
      },
    };
    this.#iterators.add(sink);
    const stop = () => { done = true; queue.length = 0; this.#iterators.delete(sink); };
    return {
      [Symbol.asyncIterator]() { return this; },
      next: async () => {
        for (;;) {
          if (queue.length) return { value: queue.shift(), done: false };
          if (failure) { stop(); throw failure; }
          if (done) { stop(); return { value: undefined, done: true }; }
          await new Promise((resolve) => { wake = resolve; });
          wake = null;
        }
      },
      return: async () => { stop(); wake?.(); return { value: undefined, done: true }; },
    };
  }

  [Symbol.asyncIterator]() { return this.events(); }

  /** Connects (once per client). Without reconnect, or for the first connection, a failure rejects. */
  async connect() {
    if (this.#state !== "idle") throw new FabricError("connect() was called already", { codeName: "INVALID_ARGUMENT" });
    if (!this.#o.transport && typeof globalThis.WebTransport === "undefined") throw unsupported();
    this.#setState("connecting", { attempt: 1 });
    this.#wantSession = this.#o.resume && !!this.#o.reconnect && this.#o.maxVersion >= RECOVERY_VERSION;
    let link;
    try {
      try {
        link = await this.#connectOnce(this.#wantSession ? null : undefined);
      } catch (err) {
        // A node without version 3 refuses a ResumeHandshake: once more without it.
        if (!(this.#wantSession && err.code === ErrorCode.UNSUPPORTED_VERSION && this.#o.minVersion < RECOVERY_VERSION)) throw err;
        this.#wantSession = false;
        link = await this.#connectOnce(undefined);
      }
    } catch (err) {
      this.#finish({ code: err.closeCode ?? null, reason: err.message });
      throw err;
    }
    if (this.#state === "closed") {
      link.close(0, "client closed");
      throw new FabricError("the client was closed while connecting", { codeName: "CLOSED" });
    }
    this.#install(link, false);
  }

  /** Sends Goodbye, closes the session (close code 0) and rejects what is pending. */
  async close(reason = "bye") {
    if (this.#state === "closed") return;
    const link = this.#link;
    this.#link = null;
    this.#attempt?.close(0, reason);
    this.#finish({ code: 0, reason });
    if (!link) return;
    const err = new FabricError(`the client was closed: ${reason}`, { codeName: "CLOSED", closeCode: 0, closeReason: reason });
    for (const req of link.pending.values()) this.#settle(req, err);
    link.pending.clear();
    const bye = encodeFrame(this.#frame(Priority.High, { type: "goodbye", reason: String(reason), reconnect: false }));
    let timer;
    await Promise.race([link.write(Priority.High, bye), new Promise((r) => { timer = setTimeout(r, 1000); })]).catch(noop);
    clearTimeout(timer);
    link.close(0, reason);
  }

  // --- requests -----------------------------------------------------------

  /** Delivers `payload` to every other client; resolves {id} on Ack. */
  async broadcast(payload, { priority } = {}) {
    return this.#acked({ type: "broadcast", payload: toPayload(payload) }, priority);
  }

  /** Delivers `payload` to client `to`: {id, stored: false} on Ack, {id, stored: true, untilMs} on Stored. */
  async direct(to, payload, { priority } = {}) {
    try { uuidToBytes(to); } catch (e) { throw invalid(`direct: ${e.message}`); }
    const p = toPayload(payload);
    return this.#request(() => ({ type: "direct", to, payload: p }), {
      priority: toPriority(priority), expect: ["ack", "stored"], retryable: true,
      map: (f, req) => (f.body.type === "stored"
        ? { id: req.id, stored: true, untilMs: toSafeNumber(f.body.untilMs) }
        : { id: req.id, stored: false }),
    });
  }

  /** Delivers `payload` to every connection of `user`; resolves {id} on Ack. */
  async sendToUser(user, payload, { priority } = {}) {
    return this.#acked({ type: "userDirect", user: checkText(user, "user"), payload: toPayload(payload) }, priority);
  }

  /** Publishes `payload` to `channel`; resolves {id} on Ack. */
  async publish(channel, payload, { priority } = {}) {
    return this.#acked({ type: "publish", channel: checkText(channel, "channel"), payload: toPayload(payload) }, priority);
  }

  /**
   * Subscribes to `channel` (with Join/Leave events unless `events` is
   * false), from `since` (a Position: recover what was published after it)
   * or from now. Resolves {channel, subscribers, position, recovery}. The
   * client subscribes again by itself after reconnects, from its position.
   */
  async subscribe(channel, { events = true, since = null } = {}) {
    checkText(channel, "channel");
    if (since === null || since === undefined) return this.#subscribeOn(channel, !!events, null, null);
    const from = toPosition(since);
    const before = this.#subs.get(channel);
    const saved = before && { events: before.events, track: before.track?.clone() ?? null };
    this.#subs.set(channel, { events: !!events, track: Track.at(from) });
    try {
      return await this.#subscribeOn(channel, !!events, from, null);
    } catch (e) {
      if (saved) this.#subs.set(channel, saved);
      else this.#subs.delete(channel);
      throw e;
    }
  }

  /** Leaves `channel` (and forgets its position); resolves on Ack. */
  async unsubscribe(channel) {
    checkText(channel, "channel");
    this.#forget(channel);
    return this.#request(() => ({ type: "unsubscribe", channel }), { expect: ["ack"], map: () => undefined });
  }

  /** The members of `channel`: {channel, members: ClientInfo[], truncated}. */
  async presence(channel) {
    checkText(channel, "channel");
    return this.#request(() => ({ type: "presenceRequest", channel }), {
      expect: ["presence"],
      map: (f) => ({ channel: f.body.channel, members: f.body.members.map(clientInfo2), truncated: f.body.truncated }),
    });
  }

  /** The clients the node knows: {clients: ClientInfo[], truncated}. */
  async list() {
    return this.#request(() => ({ type: "listClients" }), {
      expect: ["clientList"],
      map: (f) => ({ clients: f.body.clients.map(clientInfo2), truncated: f.body.truncated }),
    });
  }

  /** Application round trip (Ping to Pong, priority High) in milliseconds. */
  async ping() {
    return this.#request(() => ({ type: "ping" }),
      { priority: Priority.High, expect: ["pong"], map: (f, req) => now() - req.sentAt });
  }

  /** The node's counters (Numbers, or BigInt past 2^53). */
  async stats() {
    return this.#request(() => ({ type: "statsRequest" }), {
      expect: ["stats"],
      map: (f) => Object.fromEntries(Object.entries(f.body.stats).map(([k, v]) => [k, toSafeNumber(v)])),
    });
  }

  /**
   * The latest `limit` publications of `channel` older than offset `before`
   * (null: the newest), oldest first: {channel, position, publications, more}.
   * `limit` must not exceed the namespace's history_size (Error 9).
   */
  async history(channel, { limit = 50, before = null } = {}) {
    checkText(channel, "channel");
    const beforeU64 = before === null || before === undefined ? null : toU64(before);
    return this.#request(() => ({ type: "historyRequest", channel, limit, before: beforeU64 }), {
      expect: ["history"],
      map: (f) => ({
        channel: f.body.channel,
        position: f.body.position,
        more: f.body.more,
        publications: f.body.publications.map((bytes) => {
          const len = bytes.length >= 4 ? new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, false) : -1;
          if (len !== bytes.length - 4) throw protocolError("a History publication's length prefix does not match its size");
          const pub = decodeFrame(bytes.subarray(4));
          if (pub.body.type !== "publication") throw protocolError(`a History entry is a ${pub.body.type} frame`);
          return this.#message(pub, { channel: pub.body.channel, payload: pub.body.payload, position: pub.body.position });
        }),
      }),
    });
  }

  /** A message answered by Ack, retried across reconnects when it can be (Idempotent). */
  #acked(b, priority) {
    return this.#request(() => b, { priority: toPriority(priority), expect: ["ack"], retryable: true, map: (f, req) => ({ id: req.id }) });
  }

  /**
   * Sends a request: `make(version)` gives its body once a connection is
   * there. Sent at once when connected, else kept until the next connection
   * (up to requestTimeoutMs).
   */
  #request(make, { priority = Priority.Normal, expect, retryable = false, link = null, map }) {
    return new Promise((resolve, reject) => {
      const req = {
        id: randomId(), make, priority, expect, retryable, bytes: null, timer: null,
        seq: ++this.#seq, createdAt: now(), sentAt: 0, reject,
        resolve: (frame) => {
          try {
            resolve(map(frame, req));
          } catch (e) {
            reject(e instanceof FabricError ? e : protocolError(`undecodable answer: ${e.message}`, e));
          }
        },
      };
      if (this.#state === "idle" || this.#state === "closed") {
        reject(new FabricError(this.#state === "idle" ? "not connected: call connect() first" : "the client is closed", { codeName: "CLOSED" }));
      } else if (link) {
        if (link === this.#link) this.#dispatch(req, link);
        else reject(closedError(link.lost ?? { code: null, reason: "superseded" }));
      } else if (this.#link && this.#link.leaving === null) {
        this.#dispatch(req, this.#link);
      } else {
        this.#wait(req);
      }
    });
  }

  #dispatch(req, link) {
    if (!req.bytes) {
      try {
        let b = req.make(link.ack.version);
        // Retried after a lost connection only when the cluster handles it once (11.7).
        req.retryable = req.retryable && !!this.#o.reconnect && this.#o.idempotent && link.ack.version >= RECOVERY_VERSION;
        if (req.retryable) b = { type: "idempotent", message: b };
        req.bytes = encodeFrame(this.#frame(req.priority, b, req.id), link.ack.maxFrameBytes);
      } catch (e) {
        if (e instanceof CodecError && e.kind === "tooLarge") return req.reject(this.#tooLarge(link));
        return req.reject(e instanceof FabricError ? e : invalid(e.message, e));
      }
    } else if (req.bytes.length - 4 > link.ack.maxFrameBytes) {
      return req.reject(this.#tooLarge(link));
    }
    if (link.queued > 0 && link.queued + req.bytes.length > this.#o.maxBufferedBytes) {
      return req.reject(new FabricError(`send buffer full: ${link.queued} bytes wait for their stream; await earlier sends`, { codeName: "BUFFER_FULL" }));
    }
    link.pending.set(req.id, req);
    req.sentAt = now();
    this.#arm(req, `no answer from the node within ${this.#o.requestTimeoutMs} ms; it may or may not have handled the request`,
      () => { link.pending.delete(req.id); this.#idle(link); });
    link.write(req.priority, req.bytes).catch((err) => {
      if (link.pending.get(req.id) !== req || link.lost || req.retryable) return; // settled, or the loss handler will
      link.pending.delete(req.id);
      this.#idle(link);
      this.#settle(req, new FabricError(`could not send: ${err?.message ?? err}`, { codeName: "CLOSED", cause: err }));
    });
  }

  #tooLarge(link) {
    return new FabricError(`message too large: the node accepts frames of at most ${link.ack.maxFrameBytes} bytes`,
      { code: ErrorCode.FRAME_TOO_LARGE });
  }

  #wait(req) {
    if (this.#waiting.length >= MAX_WAITING) {
      return req.reject(new FabricError(`${MAX_WAITING} requests already wait for a connection`, { codeName: "BUFFER_FULL" }));
    }
    this.#waiting.push(req);
    this.#arm(req, `no connection to the node within ${this.#o.requestTimeoutMs} ms`, () => {
      const i = this.#waiting.indexOf(req);
      if (i >= 0) this.#waiting.splice(i, 1);
    });
  }

  #arm(req, message, cleanup) {
    clearTimeout(req.timer);
    req.timer = setTimeout(() => {
      cleanup();
      req.reject(new FabricError(message, { codeName: "TIMEOUT" }));
    }, this.#o.requestTimeoutMs);
  }

  #settle(req, errOrFrame) {
    clearTimeout(req.timer);
    if (errOrFrame instanceof Error) return req.reject(errOrFrame);
    const b = errOrFrame.body;
    if (b.type === "error") req.reject(errorFromFrame(b));
    else if (!req.expect.includes(b.type)) req.reject(protocolError(`expected ${req.expect.join(" or ")} from the node, got ${b.type}`));
    else req.resolve(errOrFrame);
  }

  #idle(link) {
    if (link.onIdle && link.pending.size === 0) link.onIdle();
  }

  #frame(p, b, id = randomId()) {
    return { id, priority: p, timestampMs: BigInt(Date.now()), sender: null, body: b };
  }

  #forget(channel) {
    this.#subs.delete(channel);
    this.#left.set(channel, (this.#left.get(channel) ?? 0) + 1);
  }

  #subscribeOn(channel, events, since, link) {
    const left = this.#left.get(channel);
    return this.#request((version) => {
      if (version < CHANNELS_VERSION) {
        throw new FabricError(`channels need protocol version 2; this connection speaks version ${version}`, { codeName: "UNSUPPORTED" });
      }
      return version >= RECOVERY_VERSION
        ? { type: "subscribeSince", channel, events, since } // positions are tracked from a known base
        : { type: "subscribe", channel, events };
    }, {
      expect: ["subscribed", "subscribeAck"], link,
      map: (f) => {
        const b = f.body;
        let sub = this.#subs.get(channel);
        if (this.#left.get(channel) !== left) sub = { events, track: null }; // left meanwhile: not kept
        else if (!sub) this.#subs.set(channel, (sub = { events, track: null }));
        sub.events = events;
        if (b.type === "subscribed") {
          if (b.position) Track.reached(sub, b.position, b.recovery);
          else sub.track = null;
        }
        return {
          channel,
          subscribers: b.subscribers === null ? null : toSafeNumber(b.subscribers),
          position: sub.track?.position() ?? null,
          recovery: b.type === "subscribed" ? b.recovery : null,
        };
      },
    });
  }

  /** Subscribes `link` to `channel` again (after a reconnect or a SubscriptionLost). Never rejects. */
  async #subscribeAgain(link, channel, cause) {
    let backoff = 200;
    for (let attempt = 1; ; attempt++) {
      const sub = this.#subs.get(channel);
      if (!sub || link !== this.#link) return; // unsubscribed meanwhile, or the next connection does it
      try {
        const result = await this.#subscribeOn(channel, sub.events, sub.track?.position() ?? null, link);
        this.#emit("resubscribed", { ...result, cause });
        return;
      } catch (error) {
        if (link !== this.#link) return;
        const lasting = LASTING_SUBSCRIBE_ERRORS.has(error.code) || error.codeName === "UNSUPPORTED";
        if (lasting) this.#subs.delete(channel);
        if (lasting || attempt >= RESUBSCRIBE_ATTEMPTS || !(error.code !== null || error.codeName === "TIMEOUT")) {
          this.#emit("resubscribeFailed", { channel, error, forgotten: lasting, cause });
          return;
        }
      }
      await this.#sleep(backoff);
      backoff = Math.min(backoff * 2, 3000);
    }
  }

  // --- connections --------------------------------------------------------

  async #target() {
    const o = this.#o;
    let d = { url: o.url, serverCertificateHashes: o.serverCertificateHashes };
    if (typeof o.discovery === "function") d = await o.discovery();
    else if (o.discovery) {
      let res;
      try {
        res = await fetch(o.discovery, { cache: "no-store", headers: { accept: "application/json" } });
        if (!res.ok) throw new FabricError(`${o.discovery} answered HTTP ${res.status}`, { codeName: "CONNECT_FAILED" });
        d = await res.json();
      } catch (e) {
        // The server of the document may be the node that just went away
        // (a page served by a node): reconnect with the last document.
        if (!this.#lastTarget) {
          throw e instanceof FabricError ? e : new FabricError(`cannot fetch ${o.discovery}: ${e?.message ?? e}`, { codeName: "CONNECT_FAILED", cause: e });
        }
        d = this.#lastTarget;
      }
    }
    if (typeof d?.url !== "string") throw invalid("no WebTransport url (from `url` or the discovery document)");
    const hashes = (d.serverCertificateHashes ?? []).map((h) => ({
      algorithm: h.algorithm ?? "sha-256",
      value: typeof h.value === "string" ? base64ToBytes(h.value) : h.value,
    }));
    if (o.discovery) this.#lastTarget = d;
    return { url: d.url, options: hashes.length ? { serverCertificateHashes: hashes } : {}, version: d.version };
  }

  /**
   * One connection attempt: session, then Handshake (resume undefined) or
   * ResumeHandshake (resume: a token, or null for a new session), then the
   * HandshakeAck (and Session). Resolves with the link, not installed yet.
   */
  async #connectOnce(resume) {
    const o = this.#o;
    let target;
    let link;
    let timer;
    // One deadline for discovery, token, session and handshake.
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new FabricError(`no connection to ${target?.url ?? o.url ?? o.discovery} within ${o.connectTimeoutMs} ms`, { codeName: "TIMEOUT" })), o.connectTimeoutMs);
    });
    timeout.catch(noop);
    try {
      target = await Promise.race([this.#target(), timeout]);
      const token = await Promise.race([typeof o.token === "function" ? o.token() : o.token, timeout]);
      if (this.#state === "closed") throw new FabricError("the client was closed", { codeName: "CLOSED" });
      if (resume !== undefined && target.version !== undefined && target.version < RECOVERY_VERSION) resume = undefined;
      const wt = o.transport ? o.transport(target.url, target.options) : new globalThis.WebTransport(target.url, target.options);
      link = new Link(wt, (l, item) => this.#onPayload(l, item), (l, info) => this.#onLost(l, info));
      link.wantSession = resume !== undefined;
      this.#attempt = link;
      const failed = link.handshake.promise;
      await Promise.race([wt.ready, timeout, failed]);
      link.start();
      const hello = { minVersion: o.minVersion, maxVersion: o.maxVersion, name: o.name, token: token ?? null };
      const b = resume === undefined ? { type: "handshake", ...hello } : { type: "resumeHandshake", handshake: hello, resume };
      let bytes;
      try { bytes = encodeFrame(this.#frame(Priority.High, b)); } catch (e) { throw invalid(`handshake: ${e.message}`, e); }
      // The first stream opened carries the Handshake as its first frame.
      await Promise.race([link.write(Priority.High, bytes), timeout, failed]);
      await Promise.race([failed, timeout]);
      return link;
    } catch (err) {
      link?.close(0, "connection attempt failed");
      if (err instanceof FabricError) throw err;
      throw new FabricError(`cannot connect to ${target?.url ?? "the node"}: ${err?.message ?? err}`, { codeName: "CONNECT_FAILED", cause: err });
    } finally {
      clearTimeout(timer);
      if (this.#attempt === link) this.#attempt = null;
    }
  }

  #install(link, reconnected) {
    this.#link = link;
    link.phase = "open";
    link.installedAt = now();
    this.#ack = link.ack;
    this.#session = link.session;
    const info = { clientId: link.ack.clientId, nodeId: link.ack.nodeId, version: link.ack.version, session: link.session?.outcome ?? null };
    this.#setState("connected", info);
    if (reconnected) this.#emit("reconnected", info);
    // Frames that overtook the handshake (stored directs of a resumed session...).
    for (const frame of link.early.splice(0)) if (this.#link === link) this.#onFrame(link, frame);
    if (link.lost) return this.#onLost(link, link.lost);
    const waiting = this.#waiting.splice(0).sort((a, b) => a.seq - b.seq);
    for (const req of waiting) {
      if (req.bytes && req.retryable && link.ack.version < RECOVERY_VERSION) {
        this.#settle(req, closedError({ code: null, reason: "the new connection cannot retry it (protocol version < 3)" }));
      } else this.#dispatch(req, link);
    }
    if (reconnected) for (const channel of [...this.#subs.keys()]) this.#subscribeAgain(link, channel, "reconnect").catch(reportLater);
  }

  #onLost(link, info) {
    if (link !== this.#link) { // an attempt, or a link already replaced or closed
      link.handshake.reject(closedError(info));
      return;
    }
    this.#link = null;
    const final = FINAL_CLOSE_CODES.has(info.code) && !(typeof this.#o.token === "function" && (info.code === 7 || info.code === 11));
    const reconnect = this.#state !== "closed" && !!this.#o.reconnect && (link.leaving !== null || !final);
    const err = closedError(info, "; the node may or may not have handled the request");
    for (const req of link.pending.values()) {
      clearTimeout(req.timer);
      if (reconnect && req.retryable && now() - req.createdAt < this.#o.retryForMs) this.#wait(req);
      else req.reject(err);
    }
    link.pending.clear();
    if (this.#state === "closed") return;
    if (!reconnect) return this.#finish(info);
    this.#shortLived = now() - link.installedAt < SHORT_LIVED_MS ? this.#shortLived + 1 : 0;
    const reason = link.leaving !== null ? `left at the node's request: ${link.leaving}` : info.reason;
    this.#reconnect({ code: info.code, reason }, link.retryHint).catch((e) => this.#finish({ code: null, reason: e.message }));
  }

  async #reconnect(info, retryHint) {
    const policy = this.#o.reconnect;
    // Closed for rate-limit abuse: wait at least 1 s (or retry_after_ms), doubling per close 10 in a row.
    this.#rateBackoff = info.code !== CloseCode.RATE_LIMITED ? 0
      : this.#rateBackoff ? Math.min(this.#rateBackoff * 2, Math.max(policy.maxDelayMs, 1000))
        : Math.max(1000, retryHint, policy.initialDelayMs);
    // The first attempt is immediate, unless connections keep dying young (no reconnect storm).
    let delay = this.#rateBackoff
      || (this.#shortLived > 1 ? Math.min(policy.initialDelayMs * 2 ** (this.#shortLived - 2), policy.maxDelayMs) : 0);
    let jitter = this.#rateBackoff ? 1 : 0.5; // rate-limit waits are minimums: jitter only adds
    for (let attempt = 1; ; attempt++) {
      this.#setState("reconnecting", { code: info.code, reason: info.reason, attempt, delayMs: delay });
      if (delay > 0) await this.#sleep(delay * (jitter + Math.random() * 0.5));
      if (this.#state === "closed") return;
      let link;
      try {
        link = await this.#connectOnce(this.#wantSession ? this.#session?.token || null : undefined);
      } catch (err) {
        if (this.#state === "closed") return;
        const final = FINAL_REFUSALS.has(err.code) && !(err.code === 13 && typeof this.#o.token === "function");
        if (final || err.codeName === "INVALID_ARGUMENT" || attempt >= policy.maxAttempts) {
          return this.#finish({ code: err.closeCode ?? null, reason: `gave up reconnecting after ${attempt} attempt(s): ${err.message}` });
        }
        delay = delay ? Math.min(delay * 2, policy.maxDelayMs) : policy.initialDelayMs;
        jitter = 0.5;
        continue;
      }
      if (this.#state === "closed") return link.close(0, "client closed");
      return this.#install(link, true);
    }
  }

  /** Ends the client for good: rejects what waits, tells listeners. */
  #finish(info) {
    if (this.#state === "closed") return;
    this.#state = "closed";
    for (const s of this.#sleeps) { clearTimeout(s.timer); s.resolve(); }
    this.#sleeps.clear();
    const err = closedError(info);
    for (const req of this.#waiting.splice(0)) this.#settle(req, err);
    const data = { code: info.code ?? null, reason: info.reason ?? "" };
    this.#emit("state", { state: "closed", ...data });
    this.#emit("closed", data);
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      const s = { resolve, timer: 0 };
      s.timer = setTimeout(() => { this.#sleeps.delete(s); resolve(); }, ms);
      this.#sleeps.add(s);
    });
  }

  #setState(state, data) {
    this.#state = state;
    this.#emit("state", { state, ...data });
  }

  #emit(type, data) {
    const set = this.#listeners.get(type);
    if (set) {
      for (const fn of [...set]) {
        try { fn(data); } catch (e) { reportLater(e); }
      }
    }
    for (const sink of this.#iterators) sink.push(type, data);
  }

  // --- incoming frames ----------------------------------------------------

  #onPayload(link, item) {
    let frame;
    if (item.tooLarge !== undefined || item.truncated !== undefined) {
      const err = protocolError(item.tooLarge !== undefined
        ? `the node sent a frame of ${item.tooLarge} bytes, above the ${HARD_MAX_FRAME_BYTES}-byte limit; skipped`
        : `a node stream ended inside a frame (${item.truncated} bytes)`);
      return link.phase === "open" || link.phase === "ready" ? this.#emit("error", err) : link.handshake.reject(err);
    }
    try {
      frame = decodeFrame(item.payload);
    } catch (e) {
      const err = protocolError(`undecodable frame from the node: ${e.message}`, e);
      return link.phase === "open" || link.phase === "ready" ? this.#emit("error", err) : link.handshake.reject(err);
    }
    if (link.phase === "open") return this.#onFrame(link, frame);
    const b = frame.body;
    if (link.phase === "handshake" && b.type === "handshakeAck") {
      link.ack = b;
      link.phase = link.wantSession ? "session" : "ready";
    } else if (link.phase === "session" && b.type === "session") {
      link.session = { token: b.token, outcome: b.outcome, windowMs: toSafeNumber(b.windowMs), stored: b.stored };
      link.phase = "ready";
    } else if (link.phase !== "ready" && b.type === "error") {
      return link.handshake.reject(errorFromFrame(b, "the node refused the connection: "));
    } else if (link.early.length >= MAX_EARLY_FRAMES) {
      return link.handshake.reject(protocolError("too many frames before the HandshakeAck"));
    } else link.early.push(frame);
    if (link.phase === "ready") link.handshake.resolve();
  }

  #message(frame, fields) {
    return { id: frame.id, from: frame.sender, ...fields, priority: PRIORITY_NAMES[frame.priority], timestampMs: toSafeNumber(frame.timestampMs) };
  }

  #onFrame(link, frame) {
    const b = frame.body;
    if (b.type === "error" && b.code === ErrorCode.RATE_LIMITED && b.retryAfterMs) link.retryHint = Math.max(link.retryHint, b.retryAfterMs);
    const of = replyTo(b);
    const req = of === null ? undefined : link.pending.get(of);
    if (req) {
      link.pending.delete(of);
      this.#settle(req, frame);
      return this.#idle(link);
    }
    switch (b.type) {
      case "broadcast":
        return this.#emit("broadcast", this.#message(frame, { payload: b.payload }));
      case "direct":
        return this.#emit("direct", this.#message(frame, { to: b.to, payload: b.payload }));
      case "userDirect":
        return this.#emit("userDirect", this.#message(frame, { user: b.user, payload: b.payload }));
      case "publish":
        return this.#emit("publication", this.#message(frame, { channel: b.channel, payload: b.payload, position: null }));
      case "publication": {
        // Exactly once: a recovered publication may also have come live.
        const sub = this.#subs.get(b.channel);
        const taken = sub ? Track.take(sub, b.position) : "new";
        if (taken === "duplicate") return;
        if (taken === "newEpoch") this.#emit("epochChanged", { channel: b.channel, position: b.position });
        return this.#emit("publication", this.#message(frame, { channel: b.channel, payload: b.payload, position: b.position }));
      }
      case "join":
      case "leave":
        return this.#emit(b.type, { channel: b.channel, member: clientInfo2(b.member) });
      case "unsubscribed": // an operator ended it: not subscribed again
        this.#forget(b.channel);
        return this.#emit("unsubscribed", { channel: b.channel, reason: b.reason });
      case "subscriptionLost":
        this.#emit("subscriptionLost", { channel: b.channel, reason: b.reason });
        if (this.#subs.has(b.channel)) this.#subscribeAgain(link, b.channel, "subscriptionLost").catch(reportLater);
        return;
      case "session": // a Refreshed token: the one the next resume presents
        if (this.#session && b.token) this.#session = { ...this.#session, token: b.token };
        return;
      case "ping":
        link.write(frame.priority, encodeFrame(this.#frame(frame.priority, { type: "pong", of: frame.id }))).catch(noop);
        return;
      case "text":
      case "binary":
        return this.#emit("echo", { id: frame.id, payload: b.type === "text" ? b.text : b.data });
      case "goodbye":
        this.#emit("goodbye", { reason: b.reason, reconnect: b.reconnect });
        if (b.reconnect && this.#o.reconnect && link.leaving === null) this.#leave(link, b.reason);
        return;
      case "error":
        return this.#emit("error", errorFromFrame(b));
      default:
        if (of !== null) return; // a late answer to a request that timed out
        return this.#emit("error", protocolError(`unexpected ${b.type} frame from the node`));
    }
  }

  /** The node is draining: let requests in flight be answered (up to 2 s), then reconnect. */
  #leave(link, reason) {
    link.leaving = reason;
    let timer;
    const go = () => {
      clearTimeout(timer);
      link.onIdle = null;
      link.close(0, "reconnecting: the node asked");
    };
    if (link.pending.size === 0) return go();
    timer = setTimeout(go, GOODBYE_SETTLE_MS);
    link.onIdle = go;
  }
}
