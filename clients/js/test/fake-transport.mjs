// An in-memory stand-in for a browser's WebTransport session and the node
// behind it, for the Client's unit tests (the `transport` option). It has
// what the Client uses: ready, closed, createUnidirectionalStream({sendOrder}),
// incomingUnidirectionalStreams and close({closeCode, reason}); the test
// plays the node: it reads the client's frames and writes frames back.

import { codec } from "../fabric.js";

const { FrameReader, decodeFrame, encodeFrame, randomId } = codec;

export const ALICE = "11111111-1111-1111-1111-111111111111";
export const BOB = "22222222-2222-2222-2222-222222222222";
export const NODE = "33333333-3333-3333-3333-333333333333";
export const HIGH = 2, NORMAL = 1, LOW = 0;

/** A frame as a node would send it. */
export const nodeFrame = (priority, body, sender = null) =>
  ({ id: randomId(), priority, timestampMs: BigInt(Date.now()), sender, body });

/** Resolves with the next item of a queue; fails the test instead of hanging. */
class Queue {
  #items = [];
  #waiters = [];
  push(item) {
    const w = this.#waiters.shift();
    if (w) w(item);
    else this.#items.push(item);
  }
  next(what, timeoutMs = 2000) {
    if (this.#items.length) return Promise.resolve(this.#items.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(done), 1);
        reject(new Error(`timed out waiting for ${what}`));
      }, timeoutMs);
      const done = (item) => { clearTimeout(timer); resolve(item); };
      this.#waiters.push(done);
    });
  }
  get size() { return this.#items.length; }
}

export class FakeSession {
  constructor(url, options, { fail = null } = {}) {
    this.url = url;
    this.options = options;
    this.clientStreams = []; // {sendOrder, frames}
    this.clientClose = null;
    this.isClosed = false;
    this.frames = new Queue(); // {frame, sendOrder} from the client, in arrival order
    this.closed = new Promise((resolve, reject) => { this._closed = { resolve, reject }; });
    this.incomingUnidirectionalStreams = new ReadableStream({ start: (c) => { this._incoming = c; } });
    this._streams = [];
    this._byPriority = [];
    if (fail) {
      this.ready = Promise.reject(new Error(fail));
      this._end(null, new Error(fail));
    } else this.ready = Promise.resolve();
  }

  async createUnidirectionalStream({ sendOrder } = {}) {
    if (this.isClosed) throw new Error("session is closed");
    const reader = new FrameReader();
    const info = { sendOrder, frames: [] };
    this.clientStreams.push(info);
    return new WritableStream({
      write: (chunk) => {
        if (this.isClosed) throw new Error("session is closed");
        for (const item of reader.push(chunk)) {
          const frame = decodeFrame(item.payload);
          info.frames.push(frame);
          this.frames.push({ frame, sendOrder });
        }
      },
    });
  }

  close(info = {}) {
    this.clientClose = { closeCode: info.closeCode ?? 0, reason: info.reason ?? "" };
    this._end(this.clientClose);
  }

  // --- the node's side -----------------------------------------------------

  /** The next frame the client sent: {frame, sendOrder}. */
  next(what = "a frame from the client") {
    return this.frames.next(what);
  }

  /** The next frame of type `type`, skipping (and returning in `skipped`) others. */
  async nextOf(type, skipped = []) {
    for (;;) {
      const got = await this.next(`a ${type} frame`);
      if (got.frame.body.type === type) return got;
      skipped.push(got);
    }
  }

  openStream() {
    let ctrl;
    const stream = new ReadableStream({ start: (c) => { ctrl = c; } });
    this._incoming.enqueue(stream);
    const s = { send: (frame) => ctrl.enqueue(encodeFrame(frame)), sendBytes: (b) => ctrl.enqueue(b), ctrl };
    this._streams.push(s);
    return s;
  }

  /** Sends `frame` on the node's stream of its priority (opened on first use). */
  send(frame) {
    this._byPriority[frame.priority] ??= this.openStream();
    this._byPriority[frame.priority].send(frame);
  }

  reply(request, body, priority = request.priority) {
    this.send(nodeFrame(priority, { ...body, of: request.id }));
  }

  /** The node closes the session (its streams are finished first, as a node does). */
  kill(closeCode, reason = "") {
    this._end({ closeCode, reason });
  }

  /** The network goes: `closed` rejects, streams error. */
  drop(message = "network lost") {
    this._end(null, new Error(message));
  }

  _end(info, error) {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const s of this._streams) {
      try { error ? s.ctrl.error(error) : s.ctrl.close(); } catch { /* already ended */ }
    }
    try { error ? this._incoming.error(error) : this._incoming.close(); } catch { /* already ended */ }
    if (error) this._closed.reject(error);
    else this._closed.resolve(info);
  }
}

/** Hands out FakeSessions as the Client's `transport` factory and lets the test take them in turn. */
export class FakeNode {
  sessions = [];
  #queue = new Queue();
  #failures = [];

  /** The next `n` sessions fail to connect (their `ready` rejects). */
  failNext(n, message = "Opening handshake failed.") {
    for (let i = 0; i < n; i++) this.#failures.push(message);
  }

  transport = (url, options) => {
    const session = new FakeSession(url, options, { fail: this.#failures.shift() ?? null });
    this.sessions.push(session);
    if (!session.isClosed) this.#queue.push(session);
    return session;
  };

  nextSession() {
    return this.#queue.next("a new session");
  }

  /**
   * Takes the next session and answers its handshake: HandshakeAck, plus a
   * Session frame when it was a ResumeHandshake. Returns {session, hello}.
   */
  async accept({ version = 3, clientId = ALICE, serverName = "n1", maxFrameBytes = 1_048_576, outcome = "new", token = "fs1.a" } = {}) {
    const session = await this.nextSession();
    const { frame: hello, sendOrder } = await session.next("the handshake");
    session.send(nodeFrame(HIGH, { type: "handshakeAck", version, clientId, nodeId: NODE, serverName, maxFrameBytes }));
    if (hello.body.type === "resumeHandshake") {
      session.send(nodeFrame(HIGH, { type: "session", token, windowMs: 60_000n, outcome, stored: 0 }));
    }
    return { session, hello, sendOrder };
  }
}

/** Resolves with the next `event` the client emits. */
export function once(client, event, timeoutMs = 2000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { client.off(event, on); reject(new Error(`no ${event} event`)); }, timeoutMs);
    const on = (data) => { clearTimeout(timer); client.off(event, on); resolve(data); };
    client.on(event, on);
  });
}

/** Records every event of the given types, in order, as [type, data]. */
export function record(client, types) {
  const log = [];
  for (const t of types) client.on(t, (data) => log.push([t, data]));
  return log;
}
