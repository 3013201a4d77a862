// Checks the demo page (web/) in headless Chromium with a stand-in client
// (fake-fabric.js) instead of a node: commands, rendering, errors, test
// hooks, layout at 360 px, and the message when WebTransport is missing.
// The page against a real node is the lead's browser test.
//   node tests/browser/page.selftest.mjs      (SCREENSHOTS=DIR keeps PNGs)

import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { launch } from "./cdp.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const webDir = path.join(here, "../../web");
const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

/** Serves web/, the stand-in as /fabric.js, and a discovery document. */
function serve() {
  const server = http.createServer((req, res) => {
    let name = new URL(req.url, "http://x").pathname;
    if (name === "/webtransport.json") {
      res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
      res.end(JSON.stringify({ url: "https://127.0.0.1:4433/fabric", serverCertificateHashes: [], version: 3 }));
      return;
    }
    if (name === "/") name = "/index.html";
    const file = name === "/fabric.js" ? path.join(here, "fake-fabric.js") : path.join(webDir, path.basename(name));
    fs.readFile(file, (err, data) => {
      if (err) {
        res.writeHead(404);
        res.end();
        return;
      }
      res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
      res.end(data);
    });
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

let server, browser, base;
before(async () => {
  server = await serve();
  base = `http://127.0.0.1:${server.address().port}`;
  // fabric.test resolves to the same server but is not a secure context.
  browser = await launch({ extraArgs: ["--host-resolver-rules=MAP fabric.test 127.0.0.1"] });
});
after(async () => {
  const closed = await browser?.close();
  assert.deepEqual(closed?.survivors, []);
  server?.close();
});

async function shot(page, name) {
  if (process.env.SCREENSHOTS) await page.screenshot(path.join(process.env.SCREENSHOTS, `${name}.png`));
}

const texts = (page, kind) => page.evaluate(`fabricDemo.log.filter(e => e.kind === ${JSON.stringify(kind)}).map(e => e.text)`);
const calls = (page, name) => page.evaluate(`fakeCalls.filter(c => c[0] === ${JSON.stringify(name)}).map(c => c.slice(1))`);

test("the chat: lobby, rooms, directs, commands, errors", { timeout: 60_000 }, async () => {
  const page = await browser.newPage(`${base}/?name=alice&autoconnect=1`);
  await page.waitFor("fabricDemo.state === 'connected'", { timeoutMs: 5_000 });
  assert.match(await page.evaluate("document.getElementById('status').innerText"), /connected · node 0a0b0c0d/);
  await page.waitFor("/RTT 1\\.3 ms/.test(document.getElementById('rtt').textContent)");
  assert.equal(await page.evaluate("document.getElementById('name').value"), "alice");
  const [options] = (await calls(page, "connect"))[0];
  assert.equal(options.discovery, "/webtransport.json");
  assert.equal(options.name, "alice");

  // Typed into #message and sent with #send: no room yet, so a broadcast.
  const type = (text) => page.evaluate(`(() => {
    document.getElementById("message").value = ${JSON.stringify(text)};
    document.getElementById("send").click();
  })()`);
  await type("hello everyone");
  await page.waitFor("fabricDemo.log.some(e => e.text === 'hello everyone' && e.status === 'sent')");
  assert.deepEqual(await calls(page, "broadcast"), [["hello everyone"]]);

  // A refusal is shown in the log and the alert region, and recorded.
  await type("too fast");
  await page.waitFor("fabricDemo.errors.length === 1");
  assert.deepEqual(await page.evaluate("fabricDemo.errors.map(e => [e.code, e.codeName, e.retryAfterMs])"), [[12, "RATE_LIMITED", 1500]]);
  assert.equal(await page.evaluate("document.getElementById('notice').textContent"), "broadcast: RATE_LIMITED (12): rate limit exceeded (retry in 2 s)");
  assert.equal(await page.evaluate("fabricDemo.log.find(e => e.text === 'too fast').status"), "failed");

  // Joining with #room-input and #join makes the room current; lines are published there.
  await page.evaluate(`(() => {
    document.getElementById("room-input").value = "general";
    document.getElementById("join").click();
  })()`);
  await page.waitFor("fabricDemo.currentRoom === 'general'");
  assert.deepEqual(await calls(page, "subscribe"), [["general", { events: true }]]);
  assert.ok((await texts(page, "info")).includes("joined general (2 here); lines now go to general"));
  await page.waitFor("document.getElementById('room-members').innerText.includes('bob')");
  await type("hi room");
  await page.waitFor("fabricDemo.log.some(e => e.text === 'hi room' && e.status === 'sent')");
  assert.deepEqual(await calls(page, "publish"), [["general", "hi room"]]);
  assert.deepEqual(await texts(page, "publication"), ["hi room"], "the echo of your own publication is not shown twice");

  // Directs: by name, ambiguous name, unknown name, user.
  const run = (line) => page.evaluate(`fabricDemo.run(${JSON.stringify(line)})`);
  const bob = await page.evaluate("fakeClient.cast[0].clientId");
  await run("/to bob psst");
  assert.deepEqual((await calls(page, "direct")).at(-1), [bob, "psst"]);
  await run(`/to ${bob.toUpperCase()} by id`);
  assert.deepEqual((await calls(page, "direct")).at(-1), [bob, "by id"]);
  await run("/to twin hello");
  assert.match((await texts(page, "error")).at(-1), /^2 clients are named twin: .*; use \/to ID TEXT$/);
  await run("/to t to the user");
  assert.deepEqual((await calls(page, "sendToUser")).at(-1), ["t", "to the user"]);
  await run("/to nobody hello");
  assert.equal((await texts(page, "error")).at(-1), "nobody called nobody: no client has that id or name, and no user nobody is connected");
  await run("/to bob");
  assert.match((await texts(page, "error")).at(-1), /^usage: \/to TARGET TEXT/);

  // What the node sends.
  await page.evaluate(`(() => {
    const [bob, twin] = fakeClient.cast;
    fakeClient.emit("broadcast", { from: bob, payload: "hey all" });
    fakeClient.emit("broadcast", { from: null, payload: "maintenance at noon" });
    fakeClient.emit("direct", { from: bob, payload: "a secret" });
    fakeClient.emit("join", { channel: "general", member: twin });
    fakeClient.emit("publication", { channel: "general", from: twin, payload: new Uint8Array(5) });
    fakeClient.emit("leave", { channel: "general", member: twin });
  })()`);
  const lines = await page.evaluate("[...document.querySelectorAll('#log li')].slice(-6).map(li => li.innerText.replace(/^\\d\\d:\\d\\d /, ''))");
  assert.deepEqual(lines, [
    "[bob] hey all",
    "[server] maintenance at noon",
    "[bob → you] a secret",
    "* twin joined general",
    "[general] twin: <5 bytes>",
    "* twin left general",
  ]);
  assert.deepEqual(await page.evaluate("fabricDemo.log.at(-3)"), {
    kind: "join", from: "twin", room: "general", text: "", time: await page.evaluate("fabricDemo.log.at(-3).time"),
    fromId: await page.evaluate("fakeClient.cast[1].clientId"),
  });

  // Members: the lobby list, and a click starts a direct message.
  await page.waitFor("document.querySelectorAll('#members button').length === 4");
  await page.evaluate("[...document.querySelectorAll('#members button')].find(b => b.textContent.startsWith('bob')).click()");
  assert.equal(await page.evaluate("document.getElementById('message').value"), "/to bob ");
  assert.equal(await page.evaluate("document.activeElement.id"), "message");
  await page.evaluate("[...document.querySelectorAll('#members button')].filter(b => b.textContent.startsWith('twin'))[0].click()");
  assert.match(await page.evaluate("document.getElementById('message').value"), /^\/to [0-9a-f-]{36} $/, "an ambiguous name is addressed by id");

  // A room without presence, then leaving it.
  await run("/join quiet:room");
  await page.waitFor("fabricDemo.errors.some(e => e.codeName === 'NOT_ALLOWED')");
  await page.waitFor("document.getElementById('room-members').innerText.includes('not available')");
  await run("/leave");
  assert.deepEqual(await page.evaluate("[fabricDemo.currentRoom, fabricDemo.rooms]"), ["general", ["general"]]);
  assert.deepEqual((await texts(page, "info")).slice(-2), ["left quiet:room", "lines now go to general"]);
  await run("/join a*b");
  assert.equal(await page.evaluate("fabricDemo.errors.at(-1).codeName"), "INVALID_FIELD");

  await run("/who");
  assert.match((await texts(page, "info")).at(-1), /^2 in general:\n {2}\S+ alice on node \S+ \(you\)\n {2}\S+ bob on node/);
  await run("/ping");
  assert.equal((await texts(page, "info")).at(-1), "pong: 1.250 ms");
  await run("/nope");
  assert.equal((await texts(page, "error")).at(-1), "unknown command /nope (/help lists them)");
  await run("/help");
  assert.match((await texts(page, "help")).at(-1), /\/join ROOM/);

  // A reconnect (events as the client sends them), then a removal by an operator.
  await page.evaluate("fakeClient.emit('state', { state: 'reconnecting', code: null, reason: 'network lost', attempt: 1, delayMs: 0 })");
  await page.evaluate("fakeClient.emit('state', { state: 'reconnecting', code: null, reason: 'network lost', attempt: 2, delayMs: 250 })");
  assert.equal(await page.evaluate("document.getElementById('status').dataset.state"), "reconnecting");
  assert.equal(await page.evaluate("document.getElementById('status').innerText.trim()"), "reconnecting… (attempt 2)");
  assert.equal(await page.evaluate("document.getElementById('send').disabled"), false, "you may type while it reconnects");
  await page.evaluate(`(() => {
    const info = { clientId: fakeClient.clientId, nodeId: fakeClient.nodeId, version: 3, session: "resumed" };
    fakeClient.emit("state", { state: "connected", ...info });
    fakeClient.emit("reconnected", info);
    fakeClient.emit("resubscribed", { channel: "general", subscribers: 2, position: null, recovery: "recovered", cause: "reconnect" });
  })()`);
  assert.equal(await page.evaluate("fabricDemo.state"), "connected");
  const me = await page.evaluate("fakeClient.clientId");
  assert.deepEqual((await texts(page, "info")).slice(-3), [
    "connection lost (network lost); reconnecting",
    `reconnected as ${me} on node 0a0b0c0d-0000-4000-8000-000000000001 (session resumed)`,
    "rejoined general",
  ]);
  await run("/join other");
  await run("/join general");
  await page.evaluate(`(() => {
    fakeClient.channels.delete("other");
    const error = Object.assign(new Error("NOT_ALLOWED (17): other is closed"), { code: 17, codeName: "NOT_ALLOWED" });
    fakeClient.emit("resubscribeFailed", { channel: "other", error, forgotten: true, cause: "reconnect" });
  })()`);
  assert.deepEqual(await page.evaluate("[fabricDemo.rooms, fabricDemo.currentRoom]"), [["general"], "general"]);
  assert.equal((await texts(page, "error")).at(-1), "could not rejoin other: NOT_ALLOWED (17): other is closed");
  await page.evaluate("fakeClient.emit('unsubscribed', { channel: 'general', reason: 'kicked by an operator' })");
  assert.deepEqual((await texts(page, "info")).slice(-2), ["removed from general: kicked by an operator", "lines are now broadcast to everyone"]);
  assert.equal(await page.evaluate("fabricDemo.currentRoom"), null);

  // A phone 360 px wide: nothing wider than the screen.
  await page.setViewport({ width: 360, height: 740 });
  assert.equal(await page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), true);
  await shot(page, "page-360");

  await run("/quit");
  await page.waitFor("fabricDemo.state === 'closed'");
  assert.equal(await page.evaluate("document.getElementById('status').innerText.trim()"), "closed: bye (code 0)");
  assert.equal(await page.evaluate("document.getElementById('connect').textContent"), "Connect");
  assert.deepEqual(page.consoleMessages.filter((m) => m.type === "exception" || m.type === "error"), []);
});

test("the name is remembered, and a refused connect is shown", { timeout: 30_000 }, async () => {
  const page = await browser.newPage(`${base}/`);
  const name = await page.evaluate("document.getElementById('name').value");
  assert.ok(["alice", "bob"].includes(name) || /^guest-\d{4}$/.test(name), name);
  await page.evaluate(`(() => {
    document.getElementById("name").value = "two words";
    document.getElementById("connect").click();
  })()`);
  await page.waitFor("fabricDemo.state === 'closed'");
  assert.equal(await page.evaluate("document.getElementById('status').innerText.trim()"),
    "closed: the node refused the connection: INVALID_FIELD (9): name byte 3 is a space");
  assert.equal(await page.evaluate("fabricDemo.errors[0].codeName"), "INVALID_FIELD");
  const reloaded = await browser.newPage(`${base}/`);
  assert.equal(await reloaded.evaluate("document.getElementById('name').value"), "two words");
});

test("without WebTransport (not a secure context) the page says why", { timeout: 30_000 }, async () => {
  const page = await browser.newPage(`http://fabric.test:${server.address().port}/?autoconnect=1`);
  await page.waitFor("window.fabricDemo");
  assert.equal(await page.evaluate("typeof WebTransport"), "undefined");
  assert.match(await page.evaluate("document.getElementById('unsupported').innerText"), /WebTransport needs a secure context/);
  assert.equal(await page.evaluate("document.getElementById('unsupported').hidden"), false);
  assert.equal(await page.evaluate("document.getElementById('connect').disabled"), true);
  assert.equal(await page.evaluate("fabricDemo.state"), "closed");
  await shot(page, "page-unsupported");
});
