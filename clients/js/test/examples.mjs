// The hex examples of PROTOCOL.md section 10 and the frames they encode: the
// JavaScript mirror of `examples()` in tests/protocol_examples.rs, so the JS
// codec is checked against the same documented bytes as the Rust one.

import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const PROTOCOL_MD = fileURLToPath(new URL("../../../PROTOCOL.md", import.meta.url));

const MARK = "<!-- example: ";

/** hex dump text ("0000  00 01 ...") -> bytes; offsets must run 0, 16, 32, ... */
export function parseHexDump(name, text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^([0-9a-f]{4})  ([0-9a-f]{2}(?: [0-9a-f]{2}){0,15})$/.exec(line);
    if (!m) throw new Error(`example ${name}: not a hex dump line: ${JSON.stringify(line)}`);
    if (parseInt(m[1], 16) !== out.length) throw new Error(`example ${name}: offset ${m[1]} out of sequence`);
    for (const h of m[2].split(" ")) out.push(parseInt(h, 16));
  }
  return Uint8Array.from(out);
}

/**
 * The (name, bytes) of every `<!-- example: NAME -->` block, split the way
 * `rewrite()` in tests/protocol_examples.rs does: the marker, then the next
 * "```text" fence, then its closing fence.
 */
export function protocolExamples(doc = readFileSync(PROTOCOL_MD, "utf8")) {
  const found = [];
  let rest = doc;
  for (let at = rest.indexOf(MARK); at >= 0; at = rest.indexOf(MARK)) {
    const after = rest.slice(at + MARK.length);
    const end = after.indexOf(" -->");
    if (end < 0) throw new Error("example marker not closed");
    const name = after.slice(0, end);
    const body = after.slice(end + 4);
    const open = body.indexOf("```text\n");
    if (open < 0) throw new Error(`example ${name}: no hex block follows the marker`);
    const close = body.indexOf("```", open + 8);
    if (close < 0) throw new Error(`example ${name}: hex block not closed`);
    found.push([name, parseHexDump(name, body.slice(open + 8, close).trimEnd())]);
    rest = body.slice(close + 3);
  }
  return found;
}

const MSG = "00010203-0405-0607-0809-0a0b0c0d0e0f";
const REQ = "a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf";
const ALICE = "11111111-1111-1111-1111-111111111111";
const BOB = "22222222-2222-2222-2222-222222222222";
const NODE = "33333333-3333-3333-3333-333333333333";
const TS = 1_700_000_000_000n;
const CHANNEL = "chat:lobby";
const FEED = "h:feed";
const LOW = 0, NORMAL = 1, HIGH = 2;

const frame = (priority, sender, body) => ({ id: MSG, priority, timestampMs: TS, sender, body });
const alice = () => ({ clientId: ALICE, nodeId: NODE, name: "al", user: null });
const aliceUser = () => ({ ...alice(), user: "alice" });
const aliceInfo = () => ({ clientId: ALICE, nodeId: NODE, name: "al", user: null, connectedAtMs: TS });
const bobInfo = () => ({ clientId: BOB, nodeId: NODE, name: "bo", user: "bob", connectedAtMs: TS });
const at = (offset) => ({ epoch: 0x0102030405060708n, offset });
const u8 = (...b) => Uint8Array.from(b);

/** name -> the frame the example encodes (decoded form of the JS codec). */
export const EXAMPLES = {
  handshake: frame(HIGH, null, { type: "handshake", minVersion: 1, maxVersion: 2, name: "al", token: null }),
  handshake_ack: frame(HIGH, null, {
    type: "handshakeAck", version: 2, clientId: ALICE, nodeId: NODE, serverName: "n1", maxFrameBytes: 1_048_576,
  }),
  text: frame(NORMAL, null, { type: "text", text: "hi" }),
  binary: frame(LOW, null, { type: "binary", data: u8(0xde, 0xad) }),
  broadcast: frame(NORMAL, null, { type: "broadcast", payload: "hi" }),
  broadcast_delivered: frame(NORMAL, alice(), { type: "broadcast", payload: "hi" }),
  broadcast_delivered_user: frame(NORMAL, aliceUser(), { type: "broadcast", payload: "hi" }),
  direct: frame(HIGH, null, { type: "direct", to: BOB, payload: u8(1, 2) }),
  ping: frame(HIGH, null, { type: "ping" }),
  pong: frame(HIGH, null, { type: "pong", of: REQ }),
  list_clients: frame(NORMAL, null, { type: "listClients" }),
  client_list: frame(NORMAL, null, { type: "clientList", of: REQ, clients: [aliceInfo()], truncated: false }),
  client_list_two: frame(NORMAL, null, { type: "clientList", of: REQ, clients: [aliceInfo(), bobInfo()], truncated: false }),
  ack: frame(NORMAL, null, { type: "ack", of: REQ }),
  error: frame(NORMAL, null, { type: "error", of: REQ, code: 7, message: "no", retryAfterMs: null }),
  error_rate_limited: frame(NORMAL, null, { type: "error", of: REQ, code: 12, message: "slow", retryAfterMs: 250 }),
  goodbye: frame(HIGH, null, { type: "goodbye", reason: "bye", reconnect: true }),
  stats_request: frame(NORMAL, null, { type: "statsRequest" }),
  stats: frame(NORMAL, null, {
    type: "stats", of: REQ,
    stats: {
      nodeId: NODE, serverName: "n1", uptimeMs: 1000n, clientsConnected: 2n, connectionsTotal: 3n,
      messagesIn: 4n, messagesOut: 5n, bytesIn: 6n, bytesOut: 7n, errors: 8n, slowConsumerDisconnects: 9n,
    },
  }),
  subscribe: frame(NORMAL, null, { type: "subscribe", channel: CHANNEL, events: true }),
  subscribe_ack: frame(NORMAL, null, { type: "subscribeAck", of: REQ, channel: CHANNEL, subscribers: 2n }),
  unsubscribe: frame(NORMAL, null, { type: "unsubscribe", channel: CHANNEL }),
  publish: frame(NORMAL, null, { type: "publish", channel: CHANNEL, payload: "hi" }),
  publish_delivered: frame(NORMAL, alice(), { type: "publish", channel: CHANNEL, payload: "hi" }),
  join: frame(NORMAL, null, { type: "join", channel: CHANNEL, member: bobInfo() }),
  leave: frame(NORMAL, null, { type: "leave", channel: CHANNEL, member: bobInfo() }),
  presence_request: frame(NORMAL, null, { type: "presenceRequest", channel: CHANNEL }),
  presence: frame(NORMAL, null, { type: "presence", of: REQ, channel: CHANNEL, members: [bobInfo()], truncated: false }),
  user_direct: frame(NORMAL, null, { type: "userDirect", user: "bob", payload: "hi" }),
  user_direct_delivered: frame(NORMAL, aliceUser(), { type: "userDirect", user: "bob", payload: "hi" }),
  user_direct_as_direct: frame(NORMAL, aliceUser(), { type: "direct", to: BOB, payload: "hi" }),
  unsubscribed: frame(HIGH, null, { type: "unsubscribed", channel: CHANNEL, reason: "spam" }),
  publication: frame(NORMAL, alice(), { type: "publication", channel: FEED, payload: "hi", position: at(42n) }),
  subscribe_since: frame(NORMAL, null, { type: "subscribeSince", channel: FEED, events: false, since: at(40n) }),
  subscribed: frame(NORMAL, null, {
    type: "subscribed", of: REQ, channel: FEED, subscribers: 3n, position: at(42n), recovery: "recovered",
  }),
  history_request: frame(NORMAL, null, { type: "historyRequest", channel: FEED, limit: 10, before: 40n }),
  history: frame(NORMAL, null, { type: "history", of: REQ, channel: FEED, position: at(42n), publications: [], more: false }),
  idempotent: frame(NORMAL, null, { type: "idempotent", message: { type: "publish", channel: FEED, payload: "hi" } }),
  subscription_lost: frame(HIGH, null, { type: "subscriptionLost", channel: FEED, reason: "trimmed" }),
  resume_handshake: frame(HIGH, null, {
    type: "resumeHandshake", handshake: { minVersion: 3, maxVersion: 3, name: "ann", token: null }, resume: "fs1.x.y",
  }),
  session: frame(HIGH, null, { type: "session", token: "fs1.x.z", windowMs: 60_000n, outcome: "resumed", stored: 2 }),
  stored: frame(NORMAL, null, { type: "stored", of: REQ, untilMs: 1_700_000_060_000n }),
};
