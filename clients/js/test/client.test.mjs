// The Client's state machine over an in-memory WebTransport (fake-transport.mjs):
// handshake, requests and their answers, events, limits, reconnect and
// session resume, resubscription from positions. The end-to-end test with
// Chromium and a real node lives elsewhere.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, FabricError, codec } from "../fabric.js";
import { ALICE, BOB, NODE, HIGH, NORMAL, LOW, FakeNode, nodeFrame, once, record } from "./fake-transport.mjs";

const URL = "https://127.0.0.1:4433/fabric";
const EPOCH = 0x0102030405060708n;
const alice = { clientId: ALICE, nodeId: NODE, name: "al", user: null };
/** Lets the client read what the fake node wrote (its streams are read concurrently). */
const tick = (ms = 10) => new Promise((r) => setTimeout(r, ms));

/** A node and a client connected to it; `options` go to Client.connect. */
async function connected(options = {}, acceptOptions = {}) {
  const node = new FakeNode();
  const connecting = Client.connect({ url: URL, name: "ann", transport: node.transport, reconnect: { initialDelayMs: 5, maxDelayMs: 20 }, ...options });
  const { session, hello, sendOrder } = await node.accept(acceptOptions);
  const client = await connecting;
  return { node, client, session, hello, sendOrder };
}

function rejectsWith(promise, check) {
  return assert.rejects(promise, (e) => {
    assert.ok(e instanceof FabricError, `a FabricError, not ${e}`);
    for (const [k, v] of Object.entries(check)) {
      if (v instanceof RegExp) assert.match(e[k], v, k);
      else assert.equal(e[k], v, k);
    }
    return true;
  });
}

test("the Handshake is the first frame, on the first stream, opened with sendOrder 2", async () => {
  const { client, hello, sendOrder, session } = await connected({ reconnect: false, token: "jwt" }, { version: 2 });
  assert.equal(sendOrder, 2);
  assert.equal(session.clientStreams.length, 1);
  assert.deepEqual(hello.body, { type: "handshake", minVersion: 1, maxVersion: 3, name: "ann", token: "jwt" });
  assert.equal(hello.priority, HIGH);
  assert.equal(session.url, URL);
  assert.deepEqual(session.options, {});
  assert.equal(client.state, "connected");
  assert.equal(client.clientId, ALICE);
  assert.equal(client.nodeId, NODE);
  assert.equal(client.version, 2);
  assert.equal(client.serverName, "n1");
  assert.equal(client.maxFrameBytes, 1_048_576);
  assert.equal(client.sessionToken, null);
  assert.equal(client.sessionOutcome, null);
  await client.close();
});

test("with reconnect on, it asks for a resumable session (ResumeHandshake, no token yet)", async () => {
  const { client, hello } = await connected({ minVersion: 2 });
  assert.deepEqual(hello.body, {
    type: "resumeHandshake", handshake: { minVersion: 2, maxVersion: 3, name: "ann", token: null }, resume: null,
  });
  assert.equal(client.sessionToken, "fs1.a");
  assert.equal(client.sessionOutcome, "new");
  await client.close();
});

test("requests resolve on their answers, matched by `of`; one stream per priority, lazily, by sendOrder", async () => {
  const { client, session } = await connected();
  const b = client.broadcast("hi");
  const { frame: sent, sendOrder } = await session.next();
  assert.equal(sendOrder, 1);
  // v3 with reconnect: sent as an Idempotent frame keyed by its id.
  assert.deepEqual(sent.body, { type: "idempotent", message: { type: "broadcast", payload: "hi" } });
  const low = client.publish("chat:x", new Uint8Array([1, 2]), { priority: "low" });
  const ping = client.ping();
  // Different streams: no order between the two.
  const two = [await session.next(), await session.next()].sort((a, b) => a.sendOrder - b.sendOrder);
  const [{ frame: pub, sendOrder: lowOrder }, { frame: pinged, sendOrder: highOrder }] = two;
  assert.deepEqual([lowOrder, highOrder], [0, 2]);
  assert.deepEqual(pub.body.message, { type: "publish", channel: "chat:x", payload: new Uint8Array([1, 2]) });
  assert.equal(pinged.body.type, "ping");
  // Answered out of order.
  session.reply(pinged, { type: "pong" });
  session.reply(pub, { type: "ack" });
  session.reply(sent, { type: "ack" });
  assert.equal(typeof (await ping), "number");
  assert.deepEqual(await low, { id: pub.id });
  assert.deepEqual(await b, { id: sent.id });
  // No more streams for more frames.
  const again = client.broadcast("again", { priority: LOW });
  session.reply((await session.next()).frame, { type: "ack" });
  await again;
  assert.deepEqual(session.clientStreams.map((s) => s.sendOrder), [2, 1, 0]);
  await client.close();
});

test("without reconnect, or on version 2, messages are sent as themselves", async () => {
  for (const [options, accept] of [[{ reconnect: false }, {}], [{}, { version: 2 }]]) {
    const { client, session } = await connected(options, accept);
    const d = client.direct(BOB, "yo", { priority: "high" });
    const { frame } = await session.next();
    assert.deepEqual(frame.body, { type: "direct", to: BOB, payload: "yo" });
    assert.equal(frame.priority, HIGH);
    session.reply(frame, { type: "ack" });
    assert.deepEqual(await d, { id: frame.id, stored: false });
    await client.close();
  }
});

test("an Error answer rejects with a FabricError; an Error about nothing pending is an event", async () => {
  const { client, session } = await connected();
  const p = client.sendToUser("bob", "hi");
  const { frame } = await session.next();
  session.reply(frame, { type: "error", code: 12, message: "slow down", retryAfterMs: 250 });
  await rejectsWith(p, { code: 12, codeName: "RATE_LIMITED", retryAfterMs: 250, message: /slow down/ });
  const event = once(client, "error");
  session.send(nodeFrame(NORMAL, { type: "error", of: null, code: 12, message: "stream refused", retryAfterMs: 10 }));
  const err = await event;
  assert.ok(err instanceof FabricError);
  assert.equal(err.code, 12);
  await client.close();
});

test("a direct to an away client resolves as stored", async () => {
  const { client, session } = await connected();
  const p = client.direct(BOB, "later");
  const { frame } = await session.next();
  session.reply(frame, { type: "stored", untilMs: 1_700_000_060_000n });
  assert.deepEqual(await p, { id: frame.id, stored: true, untilMs: 1_700_000_060_000 });
  await client.close();
});

test("bad arguments and oversized messages fail locally, sending nothing", async () => {
  const { client, session } = await connected({}, { maxFrameBytes: 100 });
  await rejectsWith(client.broadcast("x".repeat(200)), { code: 2, codeName: "FRAME_TOO_LARGE", message: /at most 100 bytes/ });
  await rejectsWith(client.direct("bob", "x"), { codeName: "INVALID_ARGUMENT", message: /not a uuid/ });
  await rejectsWith(client.broadcast(42), { codeName: "INVALID_ARGUMENT" });
  await rejectsWith(client.publish("c", "x", { priority: "urgent" }), { codeName: "INVALID_ARGUMENT" });
  await rejectsWith(client.broadcast("a\ud800"), { codeName: "INVALID_ARGUMENT", message: /lone surrogate/ });
  assert.equal(session.frames.size, 0);
  await client.close();
});

test("a request without an answer times out; a late answer is ignored", async () => {
  const { client, session } = await connected({ requestTimeoutMs: 30 });
  const errors = record(client, ["error"]);
  const p = client.list();
  const { frame } = await session.next();
  await rejectsWith(p, { codeName: "TIMEOUT" });
  session.reply(frame, { type: "clientList", clients: [], truncated: false });
  await tick();
  assert.deepEqual(errors, []);
  await client.close();
});

test("events: deliveries, channel events, echoes; payload types and camelCase fields", async () => {
  const { client, session } = await connected();
  const log = record(client, ["broadcast", "direct", "userDirect", "publication", "join", "leave", "unsubscribed", "echo"]);
  const bob = { clientId: BOB, nodeId: NODE, name: "bo", user: "bob", connectedAtMs: 1_700_000_000_000n };
  session.send(nodeFrame(NORMAL, { type: "broadcast", payload: "hi" }, alice));
  session.send(nodeFrame(HIGH, { type: "direct", to: ALICE, payload: new Uint8Array([7]) }, alice));
  session.send(nodeFrame(NORMAL, { type: "userDirect", user: "ann", payload: "u" }, alice));
  session.send(nodeFrame(NORMAL, { type: "publish", channel: "chat:x", payload: "p" }, null));
  session.send(nodeFrame(NORMAL, { type: "join", channel: "chat:x", member: bob }));
  session.send(nodeFrame(NORMAL, { type: "leave", channel: "chat:x", member: bob }));
  session.send(nodeFrame(HIGH, { type: "unsubscribed", channel: "chat:x", reason: "spam" }));
  session.send(nodeFrame(NORMAL, { type: "text", text: "echo" }, alice));
  await once(client, "echo");
  await tick(); // the high stream is read concurrently
  const byType = Object.fromEntries(log.map(([t, d]) => [t, d]));
  assert.deepEqual(byType.broadcast.from, alice);
  assert.equal(byType.broadcast.payload, "hi");
  assert.equal(byType.broadcast.priority, "normal");
  assert.equal(typeof byType.broadcast.timestampMs, "number");
  assert.deepEqual(byType.direct.payload, new Uint8Array([7]));
  assert.equal(byType.direct.to, ALICE);
  assert.equal(byType.userDirect.user, "ann");
  assert.deepEqual({ ...byType.publication, id: 0, timestampMs: 0 },
    { id: 0, from: null, channel: "chat:x", payload: "p", position: null, priority: "normal", timestampMs: 0 });
  assert.deepEqual(byType.join, { channel: "chat:x", member: { ...bob, connectedAtMs: 1_700_000_000_000 } });
  assert.equal(byType.leave.member.name, "bo");
  assert.deepEqual(byType.unsubscribed, { channel: "chat:x", reason: "spam" });
  assert.equal(byType.echo.payload, "echo");
  await client.close();
});

test("frames from the node split over 1-byte chunks, and many in one chunk", async () => {
  const { client, session } = await connected();
  const got = record(client, ["broadcast"]);
  const frames = Array.from({ length: 5 }, (_, i) => codec.encodeFrame(nodeFrame(NORMAL, { type: "broadcast", payload: `m${i}` }, alice)));
  const stream = session.openStream();
  for (const b of frames[0]) stream.sendBytes(Uint8Array.of(b));
  const rest = new Uint8Array(frames.slice(1).reduce((n, f) => n + f.length, 0));
  let at = 0;
  for (const f of frames.slice(1)) { rest.set(f, at); at += f.length; }
  stream.sendBytes(rest);
  const done = once(client, "broadcast");
  while (got.length < 5) await new Promise((r) => setTimeout(r, 1));
  await done;
  assert.deepEqual(got.map(([, d]) => d.payload), ["m0", "m1", "m2", "m3", "m4"]);
  await client.close();
});

test("an undecodable frame from the node is reported; the stream goes on", async () => {
  const { client, session } = await connected();
  const errors = record(client, ["error"]);
  const stream = session.openStream();
  stream.sendBytes(Uint8Array.of(0, 0, 0, 3, 1, 2, 3));
  stream.send(nodeFrame(NORMAL, { type: "broadcast", payload: "after" }, alice));
  const b = await once(client, "broadcast");
  assert.equal(b.payload, "after");
  assert.equal(errors.length, 1);
  assert.equal(errors[0][1].codeName, "PROTOCOL_ERROR");
  assert.match(errors[0][1].message, /undecodable frame from the node: malformed frame: id: truncated/);
  await client.close();
});

test("subscribe: SubscribeSince on version 3; positions tracked, duplicate publications dropped", async () => {
  const { client, session } = await connected();
  const sub = client.subscribe("h:feed");
  const { frame } = await session.next();
  assert.deepEqual(frame.body, { type: "subscribeSince", channel: "h:feed", events: true, since: null });
  session.reply(frame, { type: "subscribed", channel: "h:feed", subscribers: 3n, position: { epoch: EPOCH, offset: 4n }, recovery: "notRequested" });
  assert.deepEqual(await sub, { channel: "h:feed", subscribers: 3, position: { epoch: EPOCH, offset: 4n }, recovery: "notRequested" });
  const pubs = record(client, ["publication", "epochChanged"]);
  const publish = (offset, epoch = EPOCH) => session.send(nodeFrame(NORMAL, { type: "publication", channel: "h:feed", payload: `#${offset}`, position: { epoch, offset } }, alice));
  for (const o of [5n, 7n, 6n, 7n, 4n]) publish(o);
  await tick();
  assert.deepEqual(pubs.map(([, d]) => d.payload), ["#5", "#7", "#6"]);
  assert.deepEqual(client.position("h:feed"), { epoch: EPOCH, offset: 7n });
  publish(1n, 99n);
  await tick();
  assert.deepEqual(pubs.slice(3).map(([t]) => t), ["epochChanged", "publication"]);
  assert.deepEqual(client.subscriptions, ["h:feed"]);
  await client.close();
}, { timeout: 5000 });

test("a subscribe from a position recovers from there; version 1 cannot subscribe", async () => {
  {
    const { client, session } = await connected();
    const sub = client.subscribe("h:feed", { events: false, since: "0102030405060708:40" });
    const { frame } = await session.next();
    assert.deepEqual(frame.body.since, { epoch: EPOCH, offset: 40n });
    assert.equal(frame.body.events, false);
    session.reply(frame, { type: "subscribed", channel: "h:feed", subscribers: null, position: { epoch: EPOCH, offset: 42n }, recovery: "recovered" });
    assert.equal((await sub).recovery, "recovered");
    assert.deepEqual(client.position("h:feed"), { epoch: EPOCH, offset: 42n });
    await client.close();
  }
  {
    const { client, session } = await connected({ reconnect: false }, { version: 1 });
    await rejectsWith(client.subscribe("chat:x"), { codeName: "UNSUPPORTED", message: /version 1/ });
    assert.equal(session.frames.size, 0);
    await client.close();
  }
});

test("history decodes the embedded Publication frames", async () => {
  const { client, session } = await connected();
  const h = client.history("h:feed", { limit: 10, before: 40 });
  const { frame } = await session.next();
  assert.deepEqual(frame.body, { type: "historyRequest", channel: "h:feed", limit: 10, before: 40n });
  const pub = codec.encodeFrame(nodeFrame(NORMAL, { type: "publication", channel: "h:feed", payload: "old", position: { epoch: EPOCH, offset: 39n } }, alice));
  session.reply(frame, { type: "history", channel: "h:feed", position: { epoch: EPOCH, offset: 42n }, publications: [pub], more: true });
  const got = await h;
  assert.equal(got.more, true);
  assert.equal(got.publications.length, 1);
  assert.equal(got.publications[0].payload, "old");
  assert.deepEqual(got.publications[0].position, { epoch: EPOCH, offset: 39n });
  assert.deepEqual(got.publications[0].from, alice);
  await client.close();
});

test("reconnect and resume: ResumeHandshake with the token, idempotent retry with the same id, resubscribe from the position", async () => {
  const { node, client, session } = await connected();
  const states = record(client, ["state", "reconnected", "resubscribed", "direct"]);
  // Subscribed, with publications up to offset 7.
  const sub = client.subscribe("h:feed", { events: false });
  const { frame: since } = await session.next();
  session.reply(since, { type: "subscribed", channel: "h:feed", subscribers: 1n, position: { epoch: EPOCH, offset: 5n }, recovery: "notRequested" });
  await sub;
  for (const offset of [6n, 7n]) session.send(nodeFrame(NORMAL, { type: "publication", channel: "h:feed", payload: "p", position: { epoch: EPOCH, offset } }));
  // Requests in flight when the node goes.
  const ping = client.ping();
  const broadcast = client.broadcast("again");
  const { frame: pinged } = await session.nextOf("ping");
  const { frame: first } = await session.nextOf("idempotent");
  assert.deepEqual(client.position("h:feed"), { epoch: EPOCH, offset: 7n });
  session.kill(1, "draining");
  await rejectsWith(ping, { codeName: "CLOSED", closeCode: 1, message: /close code 1 SHUTDOWN.*may or may not have handled/ });
  assert.ok(pinged);

  const next = await node.nextSession();
  const { frame: hello } = await next.next();
  assert.equal(hello.body.type, "resumeHandshake");
  assert.equal(hello.body.resume, "fs1.a");
  next.send(nodeFrame(HIGH, { type: "handshakeAck", version: 3, clientId: ALICE, nodeId: NODE, serverName: "n2", maxFrameBytes: 1 << 20 }));
  next.send(nodeFrame(HIGH, { type: "session", token: "fs1.b", windowMs: 60_000n, outcome: "resumed", stored: 1 }));
  next.send(nodeFrame(HIGH, { type: "direct", to: ALICE, payload: "stored while away" }, alice));
  const skipped = [];
  const { frame: retried } = await next.nextOf("idempotent", skipped);
  assert.equal(retried.id, first.id, "the same frame, with the same id");
  next.reply(retried, { type: "ack" });
  assert.deepEqual(await broadcast, { id: first.id });
  const again = skipped.find((f) => f.frame.body.type === "subscribeSince") ?? (await next.nextOf("subscribeSince"));
  assert.deepEqual(again.frame.body, { type: "subscribeSince", channel: "h:feed", events: false, since: { epoch: EPOCH, offset: 7n } });
  next.reply(again.frame, { type: "subscribed", channel: "h:feed", subscribers: 1n, position: { epoch: EPOCH, offset: 9n }, recovery: "recovered" });
  await once(client, "resubscribed");
  assert.equal(client.sessionToken, "fs1.b");
  assert.equal(client.sessionOutcome, "resumed");
  assert.equal(client.serverName, "n2");
  const kinds = states.map(([t, d]) => (t === "state" ? d.state : t));
  assert.deepEqual(kinds, ["reconnecting", "connected", "reconnected", "direct", "resubscribed"]);
  assert.deepEqual(states[2][1], { clientId: ALICE, nodeId: NODE, version: 3, session: "resumed" });
  assert.deepEqual(states[4][1], { channel: "h:feed", subscribers: 1, position: { epoch: EPOCH, offset: 9n }, recovery: "recovered", cause: "reconnect" });
  assert.equal(states[0][1].code, 1);
  await client.close();
});

test("requests made while reconnecting wait for the new connection", async () => {
  const { node, client, session } = await connected({ reconnect: { initialDelayMs: 30 } });
  node.failNext(1);
  session.drop();
  await once(client, "state");
  assert.equal(client.state, "reconnecting");
  const p = client.publish("chat:x", "queued");
  const { session: next } = await node.accept();
  const { frame } = await next.nextOf("idempotent");
  assert.equal(frame.body.message.payload, "queued");
  next.reply(frame, { type: "ack" });
  await p;
  assert.equal(node.sessions.length, 3, "one failed attempt in between");
  await client.close();
});

test("a Goodbye asking to reconnect lets the pending request be answered, then reconnects", async () => {
  const { node, client, session } = await connected();
  const goodbye = once(client, "goodbye");
  const states = record(client, ["state"]);
  const p = client.list();
  const { frame } = await session.next();
  session.send(nodeFrame(HIGH, { type: "goodbye", reason: "restarting", reconnect: true }));
  assert.deepEqual(await goodbye, { reason: "restarting", reconnect: true });
  assert.equal(session.clientClose, null, "not before the answer");
  session.reply(frame, { type: "clientList", clients: [], truncated: false });
  assert.deepEqual(await p, { clients: [], truncated: false });
  const reconnected = once(client, "reconnected");
  await node.accept();
  assert.deepEqual(session.clientClose, { closeCode: 0, reason: "reconnecting: the node asked" });
  await reconnected;
  assert.deepEqual(states[0][1], { state: "reconnecting", code: 0, reason: "left at the node's request: restarting", attempt: 1, delayMs: 0 });
  await client.close();
});

test("a refused handshake rejects connect with the node's error", async () => {
  const node = new FakeNode();
  const connecting = Client.connect({ url: URL, transport: node.transport });
  const session = await node.nextSession();
  const { frame: hello } = await session.next();
  session.reply(hello, { type: "error", code: 13, message: "invalid token: expired", retryAfterMs: null }, HIGH);
  session.kill(7, "auth failed");
  await rejectsWith(connecting, { code: 13, codeName: "AUTH_FAILED", message: /refused the connection: AUTH_FAILED \(13\): invalid token: expired/ });
});

test("a node without version 3 refusing the ResumeHandshake gets a plain Handshake", async () => {
  const node = new FakeNode();
  const connecting = Client.connect({ url: URL, transport: node.transport });
  const first = await node.nextSession();
  const { frame: hello } = await first.next();
  assert.equal(hello.body.type, "resumeHandshake");
  first.reply(hello, { type: "error", code: 4, message: "unsupported protocol version", retryAfterMs: null }, HIGH);
  first.kill(3);
  const { hello: plain } = await node.accept({ version: 2 });
  assert.equal(plain.body.type, "handshake");
  const client = await connecting;
  assert.equal(client.version, 2);
  await client.close();
});

test("without WebTransport, connect fails clearly", async () => {
  assert.equal(typeof globalThis.WebTransport, "undefined");
  await rejectsWith(Client.connect({ url: URL }), {
    codeName: "UNSUPPORTED",
    message: /WebTransport is not supported by this browser.*secure context.*Chrome and Edge 97\+ and Firefox 114\+; Safari/,
  });
});

test("close(): Goodbye on the high stream, close code 0, pending requests rejected, closed event", async () => {
  const { client, session } = await connected();
  const closed = once(client, "closed");
  const p = client.list();
  await session.next();
  await client.close("done here");
  await rejectsWith(p, { codeName: "CLOSED", message: /closed: done here/ });
  const { frame, sendOrder } = await session.next();
  assert.deepEqual(frame.body, { type: "goodbye", reason: "done here", reconnect: false });
  assert.equal(sendOrder, 2);
  assert.deepEqual(session.clientClose, { closeCode: 0, reason: "done here" });
  assert.deepEqual(await closed, { code: 0, reason: "done here" });
  assert.equal(client.state, "closed");
  await rejectsWith(client.ping(), { codeName: "CLOSED" });
});

test("gives up after maxAttempts; waiting requests reject", async () => {
  const { node, client, session } = await connected({ reconnect: { initialDelayMs: 1, maxAttempts: 2 } });
  node.failNext(2);
  const closed = once(client, "closed");
  session.drop("gone");
  await once(client, "state");
  const p = client.broadcast("lost");
  const info = await closed;
  assert.match(info.reason, /gave up reconnecting after 2 attempt\(s\): cannot connect to .*Opening handshake failed/);
  await rejectsWith(p, { codeName: "CLOSED" });
  assert.equal(client.state, "closed");
});

test("no reconnect after SESSION_MOVED or KICKED; a request in flight rejects", async () => {
  for (const code of [13, 12]) {
    const { node, client, session } = await connected();
    const closed = once(client, "closed");
    const p = client.broadcast("x");
    await session.next();
    session.kill(code, "bye");
    assert.deepEqual(await closed, { code, reason: "bye" });
    await rejectsWith(p, { codeName: "CLOSED", closeCode: code });
    assert.equal(node.sessions.length, 1);
  }
});

test("a Refreshed Session frame replaces the token the next resume presents", async () => {
  const { client, session } = await connected();
  session.send(nodeFrame(HIGH, { type: "session", token: "fs1.fresh", windowMs: 60_000n, outcome: "refreshed", stored: 0 }));
  const p = client.ping();
  session.reply((await session.next()).frame, { type: "pong" });
  await p;
  assert.equal(client.sessionToken, "fs1.fresh");
  assert.equal(client.sessionOutcome, "new");
  await client.close();
});

test("a SubscriptionLost is answered with a SubscribeSince from the position", async () => {
  const { client, session } = await connected();
  const sub = client.subscribe("h:feed", { since: { epoch: EPOCH, offset: 10n } });
  const { frame } = await session.next();
  session.reply(frame, { type: "subscribed", channel: "h:feed", subscribers: null, position: { epoch: EPOCH, offset: 12n }, recovery: "recovered" });
  await sub;
  const lost = once(client, "subscriptionLost");
  session.send(nodeFrame(HIGH, { type: "subscriptionLost", channel: "h:feed", reason: "trimmed" }));
  assert.deepEqual(await lost, { channel: "h:feed", reason: "trimmed" });
  const { frame: again } = await session.nextOf("subscribeSince");
  assert.deepEqual(again.body.since, { epoch: EPOCH, offset: 12n });
  session.reply(again, { type: "subscribed", channel: "h:feed", subscribers: null, position: { epoch: EPOCH, offset: 20n }, recovery: "trimmed" });
  const r = await once(client, "resubscribed");
  assert.equal(r.recovery, "trimmed");
  assert.equal(r.cause, "subscriptionLost");
  await client.close();
});

test("discovery is asked before every connect; certificate hashes are decoded from base64", async () => {
  const node = new FakeNode();
  let asked = 0;
  const discovery = async () => {
    asked++;
    return { url: `https://node${asked}:4433/fabric`, serverCertificateHashes: [{ algorithm: "sha-256", value: "AAECAw==" }], version: 3 };
  };
  const connecting = Client.connect({ discovery, transport: node.transport, reconnect: { initialDelayMs: 1 } });
  const { session } = await node.accept();
  const client = await connecting;
  assert.equal(session.url, "https://node1:4433/fabric");
  assert.deepEqual(session.options, { serverCertificateHashes: [{ algorithm: "sha-256", value: Uint8Array.of(0, 1, 2, 3) }] });
  session.drop();
  const { session: next } = await node.accept();
  assert.equal(next.url, "https://node2:4433/fabric");
  await client.close();
});

test("the async iterator yields events in order and ends after closed", async () => {
  const { client, session } = await connected();
  const seen = [];
  const reading = (async () => {
    for await (const { type, data } of client) seen.push(type === "broadcast" ? data.payload : type);
  })();
  session.send(nodeFrame(NORMAL, { type: "broadcast", payload: "one" }, alice));
  session.send(nodeFrame(NORMAL, { type: "broadcast", payload: "two" }, alice));
  await once(client, "broadcast");
  await tick();
  await client.close();
  await reading;
  assert.deepEqual(seen, ["one", "two", "state", "closed"]);
});

test("an event iterator that falls behind throws instead of dropping events", async () => {
  const { client, session } = await connected();
  const events = client.events({ bufferSize: 2 });
  for (const p of ["a", "b", "c"]) session.send(nodeFrame(NORMAL, { type: "broadcast", payload: p }, alice));
  await tick();
  assert.equal((await events.next()).value.data.payload, "a");
  assert.equal((await events.next()).value.data.payload, "b");
  await assert.rejects(events.next(), (e) => e instanceof FabricError && e.codeName === "BUFFER_FULL");
  await client.close();
});

test("a subscribe answered after an unsubscribe of the channel does not bring it back", async () => {
  const { client, session } = await connected();
  const sub = client.subscribe("chat:x");
  const unsub = client.unsubscribe("chat:x");
  const { frame: s } = await session.nextOf("subscribeSince");
  const { frame: u } = await session.nextOf("unsubscribe");
  session.reply(s, { type: "subscribed", channel: "chat:x", subscribers: 1n, position: null, recovery: "noHistory" });
  session.reply(u, { type: "ack" });
  await sub;
  await unsub;
  assert.deepEqual(client.subscriptions, []);
  await client.close();
});

test("the connect timeout also covers a discovery that never answers", async () => {
  const started = Date.now();
  await rejectsWith(Client.connect({ discovery: () => new Promise(() => {}), transport: () => assert.fail("no session"), connectTimeoutMs: 30 }), {
    codeName: "TIMEOUT", message: /within 30 ms/,
  });
  assert.ok(Date.now() - started < 1000);
});

test("close() during a reconnect backoff stops at once, leaving no timer behind", async () => {
  const { node, client, session } = await connected({ reconnect: { initialDelayMs: 60_000 } });
  node.failNext(1);
  const states = record(client, ["state"]);
  session.drop();
  while (states.length < 2) await tick(1); // the immediate attempt failed, the 60 s wait began
  assert.equal(states[1][1].delayMs, 60_000);
  const started = Date.now();
  await client.close();
  assert.ok(Date.now() - started < 1000);
  assert.equal(client.state, "closed");
  await tick();
  assert.equal(node.sessions.length, 2, "no attempt after close");
});

test("requests before connect() are refused clearly", async () => {
  const client = new Client({ url: URL, transport: new FakeNode().transport });
  assert.equal(client.state, "idle");
  await rejectsWith(client.ping(), { codeName: "CLOSED", message: /call connect\(\) first/ });
});

test("connections that keep dying young are redialled with backoff, not at once", async () => {
  const { node, client, session } = await connected({ reconnect: { initialDelayMs: 5, maxDelayMs: 50 } });
  const states = record(client, ["state"]);
  session.kill(2, "protocol violation");
  const { session: second } = await node.accept();
  await once(client, "reconnected");
  second.kill(2, "protocol violation");
  const { session: third } = await node.accept();
  await once(client, "reconnected");
  third.kill(2, "protocol violation");
  await node.accept();
  await once(client, "reconnected");
  const delays = states.filter(([, d]) => d.state === "reconnecting").map(([, d]) => d.delayMs);
  assert.deepEqual(delays, [0, 5, 10]);
  await client.close();
});
