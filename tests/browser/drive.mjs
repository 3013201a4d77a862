// A JSON-lines bridge between a Rust test (tests/browser.rs) and headless
// Chromium: the test writes one command per line on stdin, this script runs
// it through cdp.mjs and writes one answer per line on stdout.
//
//   node tests/browser/drive.mjs CHROMIUM
//
// Commands (each answered {"ok": true, "value": ...} or {"ok": false,
// "error": "...", "console": [...]}, in order):
//   {"do": "open", "url": U}                 open the page (one page per run)
//   {"do": "eval", "expr": E, "timeoutMs": T}  evaluate E (awaited) in the page
//   {"do": "waitFor", "expr": E, "timeoutMs": T}  poll E until truthy
//   {"do": "screenshot", "path": P}
//   {"do": "console"}                        the page's console so far
//   {"do": "close"}                          close Chromium, check nothing is left
// stdin closing also closes Chromium. stderr carries diagnostics only.

import { createInterface } from "node:readline";
import { launch } from "./cdp.mjs";

const chromium = process.argv[2] || process.env.CHROMIUM || "chromium";
// Generous bounds: on a loaded machine (the compose e2e runs beside three
// nodes, Redis and nginx) Chromium has taken more than 15 s to answer.
const browser = await launch({
  chromium,
  windowSize: [412, 915],
  timeoutMs: 60_000,
  commandTimeoutMs: 60_000,
});
// A CDP call that fails outside the command being run must not end the
// driver silently: it is reported on stderr and the driver goes on.
process.on("unhandledRejection", (err) => {
  process.stderr.write(`drive.mjs: unhandled: ${err?.stack ?? err}\n`);
});
let page = null;
let closed = false;

const reply = (answer) => process.stdout.write(JSON.stringify(answer) + "\n");

async function closeBrowser() {
  if (closed) return [];
  closed = true;
  await browser.close();
  return browser.survivors();
}

async function run(cmd) {
  switch (cmd.do) {
    case "open":
      page = await browser.newPage(cmd.url, { viewport: { width: 412, height: 915 } });
      return null;
    case "eval":
      return await page.evaluate(cmd.expr, { timeoutMs: cmd.timeoutMs ?? 10_000 });
    case "waitFor":
      return await page.waitFor(cmd.expr, { timeoutMs: cmd.timeoutMs ?? 10_000 });
    case "screenshot":
      await page.screenshot(cmd.path);
      return cmd.path;
    case "console":
      return page ? page.consoleMessages : [];
    case "close":
      return await closeBrowser();
    default:
      throw new Error(`unknown command ${JSON.stringify(cmd.do)}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
    reply({ ok: true, value: (await run(cmd)) ?? null });
  } catch (err) {
    reply({
      ok: false,
      error: String(err?.message ?? err),
      console: page ? page.consoleMessages.slice(-30) : [],
    });
  }
  if (cmd?.do === "close") break;
}
await closeBrowser().catch((err) => process.stderr.write(`close: ${err.message}\n`));
process.exit(0);
