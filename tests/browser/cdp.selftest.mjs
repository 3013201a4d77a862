// Self-test of cdp.mjs against the real Chromium: run with
//   node tests/browser/cdp.selftest.mjs        (CHROMIUM=/path/to/chromium to choose one)
// It launches Chromium, loads pages, evaluates, waits, screenshots, closes,
// and checks that no Chromium process survives, also when the driving Node
// process is stopped by a signal or killed.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { launch, sleep } from "./cdp.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const cdpModule = path.join(here, "cdp.mjs");

/** Processes alive (not zombies) in process group pgid or naming dir on their command line. */
function processesOf(pgid, dir) {
  const found = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (fields[0] === "Z") continue;
      if (Number(fields[2]) === pgid || cmdline.includes(dir)) found.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

async function waitUntilGone(pgid, dir, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let left;
  while ((left = processesOf(pgid, dir)).length > 0 && Date.now() < deadline) await sleep(100);
  return left;
}

function pngSize(png) {
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "PNG signature");
  assert.equal(png.subarray(12, 16).toString("latin1"), "IHDR");
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

test("launch, evaluate, waitFor, console, screenshot, close with no survivors", { timeout: 90_000 }, async () => {
  const browser = await launch();
  const { pid, userDataDir } = browser;
  try {
    assert.match(browser.version.product, /Chrome|Chromium/i);
    assert.ok(processesOf(pid, userDataDir).length >= 2, "Chromium runs several processes in its group");

    const html = `<!doctype html><title>cdp self-test</title><h1>Hello</h1>
      <script>console.log("page says", 42); setTimeout(() => { window.later = "ready" }, 300);
      setTimeout(() => { throw new Error("boom from the page") }, 0);</script>`;
    const page = await browser.newPage(`data:text/html,${encodeURIComponent(html)}`);

    assert.equal(await page.evaluate("1 + 2"), 3);
    assert.equal(await page.evaluate("document.title"), "cdp self-test");
    assert.deepEqual(await page.evaluate("new Promise(r => setTimeout(() => r({a: [1, 'x']}), 50))"), { a: [1, "x"] });
    assert.equal(await page.evaluate((a, b) => a * b, { args: [6, 7] }), 42);
    await assert.rejects(page.evaluate("null.x"), /threw: TypeError: Cannot read properties of null/);
    await assert.rejects(page.evaluate("Promise.reject(new Error('nope'))"), /threw: Error: nope/);
    await assert.rejects(page.evaluate("new Promise(() => {})", { timeoutMs: 300 }), /no answer from Chromium within 300 ms/);

    assert.equal(await page.waitFor("window.later", { timeoutMs: 5_000 }), "ready");
    await assert.rejects(
      page.waitFor("document.title.length > 100 && 'long'", { timeoutMs: 400, intervalMs: 50 }),
      (err) => {
        assert.match(err.message, /waitFor timed out after 400 ms: document\.title\.length > 100/);
        assert.match(err.message, /last value: false/);
        return true;
      },
    );
    await assert.rejects(page.waitFor("undefinedVariable", { timeoutMs: 300 }), /last error: .*undefinedVariable is not defined/);

    await page.waitFor("true"); // console events arrive before this answer
    const texts = page.consoleMessages.map((m) => `${m.type}: ${m.text}`);
    assert.ok(texts.includes("log: page says 42"), JSON.stringify(texts));
    assert.ok(texts.some((t) => t.startsWith("exception:") && t.includes("boom from the page")), JSON.stringify(texts));

    const shot = path.join(os.tmpdir(), `cdp-selftest-${process.pid}.png`);
    const png = await page.screenshot(shot);
    try {
      assert.deepEqual(fs.readFileSync(shot), png);
      const size = pngSize(png);
      assert.deepEqual(size, { width: 412, height: 915 }, "the phone-sized window");
      console.log(`# screenshot ${png.length} bytes, ${size.width}x${size.height}`);
    } finally {
      fs.rmSync(shot, { force: true });
    }

    await page.setViewport({ width: 360, height: 640 });
    assert.equal(await page.evaluate("innerWidth"), 360);
    assert.deepEqual(pngSize(await page.screenshot()), { width: 360, height: 640 });

    await assert.rejects(page.goto("http://127.0.0.1:1/"), /cannot load http:\/\/127\.0\.0\.1:1\/: net::ERR_/);
    await page.close();
  } finally {
    const result = await browser.close();
    assert.deepEqual(result.survivors, []);
  }
  assert.deepEqual(processesOf(pid, userDataDir), [], "no process of the group nor naming the profile");
  assert.equal(fs.existsSync(userDataDir), false, "profile directory removed");
  await assert.rejects(browser.send("Browser.getVersion"), /Chromium is not running/);
});

test("WebTransport exists in a page served from http://127.0.0.1 (a secure context)", { timeout: 60_000 }, async () => {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>wt</title>");
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const browser = await launch();
  try {
    const page = await browser.newPage(`http://127.0.0.1:${server.address().port}/`);
    assert.equal(await page.evaluate("isSecureContext"), true);
    assert.equal(await page.evaluate("typeof WebTransport"), "function");
    // A data: URL is an opaque origin: not a secure context, no WebTransport.
    await page.goto("data:text/html,<title>opaque</title>");
    const opaque = await page.evaluate("[isSecureContext, typeof WebTransport]");
    console.log(`# data: URL page: isSecureContext=${opaque[0]}, typeof WebTransport=${opaque[1]}`);
  } finally {
    assert.deepEqual((await browser.close()).survivors, []);
    server.close();
  }
});

/** Starts a Node process that launches Chromium with cdp.mjs and reports {pid, userDataDir}. */
async function driverWithBrowser(then = "setInterval(() => {}, 1000);") {
  const code = `
    import { launch } from ${JSON.stringify(cdpModule)};
    const b = await launch();
    console.log(JSON.stringify({ pid: b.pid, userDataDir: b.userDataDir }));
    ${then}`;
  const driver = spawn(process.execPath, ["--input-type=module", "-e", code], { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  driver.stderr.on("data", (d) => {
    stderr += d;
  });
  const line = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the driver did not report its browser in 30 s")), 30_000);
    let out = "";
    driver.stdout.on("data", (d) => {
      out += d;
      if (out.includes("\n")) {
        clearTimeout(timer);
        resolve(out.split("\n")[0]);
      }
    });
    driver.once("exit", (code) => reject(new Error(`driver exited with ${code}: ${stderr}`)));
  });
  const exited = new Promise((resolve) => driver.once("exit", (code, signal) => resolve({ code, signal })));
  return { driver, exited, ...JSON.parse(line) };
}

for (const signal of ["SIGTERM", "SIGINT"]) {
  test(`a driver stopped by ${signal} kills its browser`, { timeout: 60_000 }, async () => {
    const { driver, exited, pid, userDataDir } = await driverWithBrowser();
    assert.ok(processesOf(pid, userDataDir).length >= 2);
    driver.kill(signal);
    const { code } = await exited;
    assert.equal(code, signal === "SIGTERM" ? 143 : 130);
    assert.deepEqual(await waitUntilGone(pid, userDataDir, 5_000), []);
    assert.equal(fs.existsSync(userDataDir), false, "profile directory removed");
  });
}

test("a driver that dies of an uncaught exception kills its browser", { timeout: 60_000 }, async () => {
  const { exited, pid, userDataDir } = await driverWithBrowser(
    "setTimeout(() => { throw new Error('a bug in the driver (expected by the self-test)') }, 200);",
  );
  assert.equal((await exited).code, 1);
  assert.deepEqual(await waitUntilGone(pid, userDataDir, 5_000), []);
  assert.equal(fs.existsSync(userDataDir), false, "profile directory removed");
});

test("a driver that is SIGKILLed: Chromium exits by itself once its pipe closes", { timeout: 60_000 }, async () => {
  const { driver, exited, pid, userDataDir } = await driverWithBrowser();
  driver.kill("SIGKILL");
  await exited;
  const left = await waitUntilGone(pid, userDataDir, 10_000);
  if (left.length > 0) {
    for (const p of left) {
      try {
        process.kill(p, "SIGKILL");
      } catch {
        // gone meanwhile
      }
    }
  }
  fs.rmSync(userDataDir, { recursive: true, force: true });
  assert.deepEqual(left, [], "Chromium outlived its SIGKILLed driver (cleaned up by the test)");
});
