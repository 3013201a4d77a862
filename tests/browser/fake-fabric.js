// A stand-in for clients/js/fabric.js with the API of the web contract, for
// page.selftest.mjs: it lets the demo page be checked in Chromium without a
// node. It answers from a fixed cast (bob, two clients named twin, user t),
// records every call in window.fakeCalls, and window.fakeClient.emit(event,
// payload) plays what the node would send.

export class FabricError extends Error {
  constructor(code, codeName, message, retryAfterMs) {
    super(message);
    this.name = "FabricError";
    Object.assign(this, { code, codeName, retryAfterMs });
  }
}

const NODE = "0a0b0c0d-0000-4000-8000-000000000001";
const info = (name, user = null) => ({ clientId: crypto.randomUUID(), nodeId: NODE, name, user, connectedAtMs: Date.now() });
const cast = [info("bob"), info("twin"), info("twin", "t")];
window.fakeCalls = [];

export class Client {
  static async connect(options) {
    window.fakeCalls.push(["connect", options]);
    const discovery = await (await fetch(options.discovery, { cache: "no-store" })).json();
    if (!discovery.url) throw new Error("no url in the discovery document");
    if (options.name.includes(" ")) throw new FabricError(9, "INVALID_FIELD", `name byte ${options.name.indexOf(" ")} is a space`);
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
      if (payload === "too fast") throw new FabricError(13, "RATE_LIMITED", "rate limit exceeded", 1500);
    });
  }

  direct(to, payload) {
    return this.call("direct", [to, payload], () => {
      if (to === this.clientId) this.emit("direct", { from: this.me, payload });
      else if (!cast.some((c) => c.clientId === to)) throw new FabricError(7, "UNKNOWN_CLIENT", `client ${to} is not connected`);
      return { stored: false };
    });
  }

  sendToUser(user, payload) {
    return this.call("sendToUser", [user, payload], () => {
      if (user !== "t") throw new FabricError(20, "UNKNOWN_USER", `user ${user} has no connection`);
    });
  }

  subscribe(channel, options) {
    return this.call("subscribe", [channel, options], () => {
      if (!/^[!-)+-~]+$/.test(channel)) throw new FabricError(9, "INVALID_FIELD", "channel names are printable ASCII (0x21 to 0x7E) without `*`");
      this.channels.add(channel);
      return { channel, subscribers: 2 };
    });
  }

  unsubscribe(channel) {
    return this.call("unsubscribe", [channel], () => this.channels.delete(channel));
  }

  publish(channel, payload) {
    return this.call("publish", [channel, payload], () => {
      // The node sends a publication back to its publisher when subscribed.
      if (this.channels.has(channel)) this.emit("publication", { channel, payload, from: this.me });
    });
  }

  presence(channel) {
    return this.call("presence", [channel], () => {
      if (channel.startsWith("quiet:")) throw new FabricError(17, "FORBIDDEN", `presence is off for the namespace of ${channel}`);
      return { members: [this.me, cast[0]], truncated: false };
    });
  }

  list() {
    return this.call("list", [], () => ({ clients: [this.me, ...cast], truncated: false }));
  }

  ping() {
    return this.call("ping", [], () => 1.25);
  }

  close(reason) {
    return this.call("close", [reason], () => {
      this.emit("state", { state: "closed" });
      this.emit("closed", { code: 0, reason });
    });
  }
}
