// A stand-in for clients/js/fabric.js (same names, result shapes, error
// messages and events as that client), for page.selftest.mjs: it lets the
// demo page be checked in Chromium without a node. It answers from a fixed cast (bob, two clients named twin, user t),
// records every call in window.fakeCalls, and window.fakeClient.emit(event,
// payload) plays what the node would send.

const NAMES = { 7: "UNKNOWN_CLIENT", 9: "INVALID_FIELD", 12: "RATE_LIMITED", 17: "NOT_ALLOWED", 20: "UNKNOWN_USER" };

export class FabricError extends Error {
  constructor(message, { code = null, codeName, retryAfterMs = null, closeCode = null, closeReason = null } = {}) {
    super(message);
    this.name = "FabricError";
    Object.assign(this, { code, codeName: codeName ?? NAMES[code] ?? "ERROR", retryAfterMs, closeCode, closeReason });
  }
}

/** An Error frame from the node, as the client reports it. */
const refused = (code, message, retryAfterMs = null) =>
  new FabricError(`${NAMES[code]} (${code}): ${message}`, { code, retryAfterMs });

const NODE = "0a0b0c0d-0000-4000-8000-000000000001";
const info = (name, user = null) => ({ clientId: crypto.randomUUID(), nodeId: NODE, name, user, connectedAtMs: Date.now() });
const cast = [info("bob"), info("twin"), info("twin", "t")];
window.fakeCalls = [];

export class Client {
  static async connect(options) {
    window.fakeCalls.push(["connect", options]);
    const discovery = await (await fetch(options.discovery, { cache: "no-store" })).json();
    if (!discovery.url) throw new Error("no url in the discovery document");
    if (options.name.includes(" ")) {
      throw new FabricError(`the node refused the connection: INVALID_FIELD (9): name byte ${options.name.indexOf(" ")} is a space`, { code: 9 });
    }
    const client = new Client(options.name);
    window.fakeClient = client;
    return client;
  }

  constructor(name) {
    Object.assign(this, { clientId: crypto.randomUUID(), nodeId: NODE, version: 3, serverName: "fake-node", maxFrameBytes: 1 << 20 });
    this.me = { clientId: this.clientId, nodeId: NODE, name, user: null, connectedAtMs: Date.now() };
    this.cast = cast;
    this.handlers = new Map();
    this.channels = new Set();
  }

  get subscriptions() {
    return [...this.channels];
  }

  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(fn);
  }

  off(event, fn) {
    this.handlers.get(event)?.delete(fn);
  }

  emit(event, payload) {
    for (const fn of this.handlers.get(event) ?? []) fn(payload);
  }

  async call(name, args, answer) {
    window.fakeCalls.push([name, ...args]);
    await new Promise((resolve) => setTimeout(resolve, 5));
    return answer();
  }

  broadcast(payload) {
    return this.call("broadcast", [payload], () => {
      if (payload === "too fast") throw refused(12, "rate limit exceeded", 1500);
      return { id: crypto.randomUUID() };
    });
  }

  direct(to, payload) {
    return this.call("direct", [to, payload], () => {
      if (to === this.clientId) this.emit("direct", { from: this.me, payload });
      else if (!cast.some((c) => c.clientId === to)) throw refused(7, `client ${to} is not connected`);
      return { id: crypto.randomUUID(), stored: false };
    });
  }

  sendToUser(user, payload) {
    return this.call("sendToUser", [user, payload], () => {
      if (user !== "t") throw refused(20, `user ${user} has no connection`);
      return { id: crypto.randomUUID() };
    });
  }

  subscribe(channel, options) {
    return this.call("subscribe", [channel, options], () => {
      const bad = channel.search(/[^!-)+-~]/);
      if (bad >= 0) throw refused(9, `channel byte ${bad} is 0x${channel.charCodeAt(bad).toString(16)}; channel names are printable ASCII (0x21 to 0x7E) without \`*\``);
      this.channels.add(channel);
      return { channel, subscribers: 2, position: null, recovery: "notRequested" };
    });
  }

  unsubscribe(channel) {
    return this.call("unsubscribe", [channel], () => this.channels.delete(channel));
  }

  publish(channel, payload) {
    return this.call("publish", [channel, payload], () => {
      // The node sends a publication back to its publisher when subscribed.
      if (this.channels.has(channel)) this.emit("publication", { channel, payload, from: this.me });
      return { id: crypto.randomUUID() };
    });
  }

  presence(channel) {
    return this.call("presence", [channel], () => {
      if (channel.startsWith("quiet:")) throw refused(17, `presence is off for the namespace of ${channel}`);
      return { channel, members: [this.me, cast[0]], truncated: false };
    });
  }

  list() {
    return this.call("list", [], () => ({ clients: [this.me, ...cast], truncated: false }));
  }

  ping() {
    return this.call("ping", [], () => 1.25);
  }

  close(reason = "bye") {
    window.fakeCalls.push(["close", reason]);
    this.emit("state", { state: "closed", code: 0, reason });
    this.emit("closed", { code: 0, reason });
    return Promise.resolve();
  }
}
