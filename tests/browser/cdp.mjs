// Drives headless Chromium over the Chrome DevTools Protocol, with no npm
// package: Chromium is started with `--remote-debugging-pipe`, reads
// commands on its fd 3 and writes replies and events on its fd 4, each
// message one JSON text followed by "\0".
//
// Chromium runs in its own process group with a fresh user-data-dir, so
// that `close()` can kill exactly the processes it started (the group, and
// any process whose command line names that directory) and check that
// none survives. The same kill runs if this Node process exits or gets
// SIGINT/SIGTERM. Every wait has a timeout.
//
//   import { launch } from "./cdp.mjs";
//   const browser = await launch({ chromium: "chromium" });
//   const page = await browser.newPage("http://127.0.0.1:8080/");
//   await page.waitFor("window.fabricDemo?.state === 'connected'");
//   console.log(await page.evaluate("document.title"));
//   await page.screenshot("/tmp/page.png");
//   await browser.close(); // throws if a Chromium process survived

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/** Browsers not closed yet: killed when this process exits. */
const live = new Set();
let handlersInstalled = false;

function installExitHandlers() {
  if (handlersInstalled) return;
  handlersInstalled = true;
  // An uncaught exception also ends in "exit"; process.exit() from the
  // signal handlers too.
  process.on("exit", () => {
    for (const browser of live) browser.killNow({ removeProfile: true });
  });
  for (const [signal, number] of [["SIGINT", 2], ["SIGTERM", 15], ["SIGHUP", 1]]) {
    process.on(signal, () => process.exit(128 + number));
  }
}

const DEFAULT_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  // Without these two, chrome_crashpad_handler processes leave the group
  // and outlive a killed Chromium.
  "--disable-crash-reporter",
  "--disable-breakpad",
  "--no-first-run",
  "--no-default-browser-check",
];

/**
 * Starts Chromium and waits until it answers over the pipe.
 *
 * @param {object} [options]
 * @param {string} [options.chromium] executable (default: $CHROMIUM or "chromium")
 * @param {string} [options.userDataDir] profile directory; default a fresh
 *   temporary one, removed by close(). A given one is left in place.
 * @param {[number, number]} [options.windowSize] default [412, 915] (a phone)
 * @param {string[]} [options.extraArgs] more command-line flags
 * @param {number} [options.timeoutMs] how long Chromium may take to start (default 30 s)
 * @param {number} [options.commandTimeoutMs] default timeout of each CDP command (default 15 s)
 * @returns {Promise<Browser>}
 */
export async function launch(options = {}) {
  const {
    chromium = process.env.CHROMIUM || "chromium",
    windowSize = [412, 915],
    extraArgs = [],
    timeoutMs = 30_000,
    commandTimeoutMs = 15_000,
  } = options;
  const ownDir = !options.userDataDir;
  const userDataDir = options.userDataDir ?? fs.mkdtempSync(path.join(os.tmpdir(), "fabric-cdp-"));
  const args = [
    ...DEFAULT_FLAGS,
    `--user-data-dir=${userDataDir}`,
    `--window-size=${windowSize[0]},${windowSize[1]}`,
    ...extraArgs,
    "--remote-debugging-pipe",
    "about:blank",
  ];
  installExitHandlers();
  const child = spawn(chromium, args, {
    detached: true, // its own process group, whose id is child.pid
    stdio: ["ignore", "pipe", "pipe", "pipe", "pipe"],
  });
  const browser = new Browser(child, { userDataDir, ownDir, commandTimeoutMs, windowSize });
  live.add(browser);
  try {
    await browser.started(timeoutMs);
  } catch (err) {
    await browser.close({ timeoutMs: 2_000 }).catch(() => {});
    throw err;
  }
  return browser;
}

export class Browser {
  constructor(child, { userDataDir, ownDir, commandTimeoutMs, windowSize }) {
    this.child = child;
    this.windowSize = windowSize;
    this.pid = child.pid;
    this.userDataDir = userDataDir;
    this.commandTimeoutMs = commandTimeoutMs;
    this._ownDir = ownDir;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer, method}
    this._sessions = new Map(); // sessionId -> Page
    this._output = ""; // the tail of Chromium's stdout and stderr, for error messages
    this._closed = false;
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        this._failAll(new Error(`Chromium exited (code ${code}, signal ${signal})${this._tail()}`));
        resolve({ code, signal });
      });
    });
    this._spawnError = new Promise((_, reject) => {
      child.once("error", (err) => {
        this._failAll(err);
        reject(new Error(`cannot start Chromium: ${err.message}`));
      });
    });
    this._spawnError.catch(() => {});
    for (const stream of [child.stdout, child.stderr]) {
      // Drained, or Chromium blocks once the pipe buffer is full.
      stream.setEncoding("utf8");
      stream.on("data", (text) => {
        this._output = (this._output + text).slice(-8_000);
      });
    }
    let buffered = Buffer.alloc(0);
    child.stdio[4].on("data", (chunk) => {
      buffered = Buffer.concat([buffered, chunk]);
      let end;
      while ((end = buffered.indexOf(0)) !== -1) {
        const text = buffered.subarray(0, end).toString("utf8");
        buffered = buffered.subarray(end + 1);
        this._receive(text);
      }
    });
    child.stdio[3].on("error", () => {}); // EPIPE once Chromium is gone; _failAll reports it
    child.stdio[4].on("error", () => {});
  }

  /** Resolves once Chromium answers a command, rejects if it does not in time. */
  async started(timeoutMs) {
    const version = this.send("Browser.getVersion", {}, { timeoutMs });
    this.version = await Promise.race([version, this._spawnError]);
    return this.version;
  }

  /** The last lines Chromium wrote to stdout/stderr. */
  output() {
    return this._output;
  }

  _tail() {
    const tail = this._output.trim().split("\n").slice(-10).join("\n");
    return tail ? `; Chromium's last output:\n${tail}` : "";
  }

  _receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message.id !== undefined) {
      const pending = this._pending.get(message.id);
      if (!pending) return;
      this._pending.delete(message.id);
      clearTimeout(pending.timer);
      if (message.error) {
        pending.reject(new Error(`${pending.method}: ${message.error.message}${message.error.data ? ` (${message.error.data})` : ""}`));
      } else {
        pending.resolve(message.result);
      }
    } else if (message.sessionId) {
      this._sessions.get(message.sessionId)?._event(message.method, message.params);
    } else if (message.method === "Target.detachedFromTarget") {
      this._sessions.get(message.params.sessionId)?._detached();
    }
  }

  _failAll(err) {
    for (const pending of this._pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(new Error(`${pending.method}: ${err.message}`));
    }
    this._pending.clear();
  }

  /**
   * Sends one CDP command; resolves with its result, rejects with the
   * protocol's error or on timeout.
   */
  send(method, params = {}, { sessionId, timeoutMs = this.commandTimeoutMs } = {}) {
    if (this.exitCode !== undefined || this.exitSignal !== undefined) {
      return Promise.reject(new Error(`${method}: Chromium is not running${this._tail()}`));
    }
    const id = this._nextId++;
    const message = { id, method, params };
    if (sessionId) message.sessionId = sessionId;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new Error(`${method}: no answer from Chromium within ${timeoutMs} ms`));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer, method });
      this.child.stdio[3].write(JSON.stringify(message) + "\0");
    });
  }

  /**
   * Opens a tab, enables the Page, Runtime and Log domains (so console
   * messages are collected from the start), sets its viewport, then loads
   * `url`. The viewport is the launch's windowSize unless `viewport` says
   * otherwise (null: Chromium's own, which headless makes at least 500 px
   * wide and shortens by its invisible toolbars).
   */
  async newPage(url = "about:blank", { timeoutMs = this.commandTimeoutMs, viewport } = {}) {
    if (viewport === undefined) viewport = { width: this.windowSize[0], height: this.windowSize[1] };
    const { targetId } = await this.send("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await this.send("Target.attachToTarget", { targetId, flatten: true });
    const page = new Page(this, targetId, sessionId);
    this._sessions.set(sessionId, page);
    await Promise.all([
      page.send("Page.enable"),
      page.send("Runtime.enable"),
      page.send("Log.enable"),
    ]);
    if (viewport) await page.setViewport(viewport);
    if (url !== "about:blank") await page.goto(url, { timeoutMs });
    return page;
  }

  /** The processes of this browser still alive: its group, and any naming its profile. */
  survivors() {
    const found = [];
    for (const entry of fs.readdirSync("/proc")) {
      if (!/^\d+$/.test(entry)) continue;
      let stat, cmdline;
      try {
        stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
        cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ").trim();
      } catch {
        continue; // gone meanwhile
      }
      // The command name in (...) may hold spaces: fields start after the last ")".
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const state = fields[0];
      const pgrp = Number(fields[2]);
      if (state === "Z" || state === "X") continue; // dead, waiting to be reaped
      if (pgrp === this.pid || cmdline.includes(this.userDataDir)) {
        found.push({ pid: Number(entry), pgrp, state, cmdline: cmdline.slice(0, 200) });
      }
    }
    return found;
  }

  /** Kills the whole process group at once (synchronous; used on exit). */
  killNow({ removeProfile = false } = {}) {
    try {
      process.kill(-this.pid, "SIGKILL");
    } catch {
      // ESRCH: the group is gone already
    }
    if (removeProfile && this._ownDir) {
      try {
        fs.rmSync(this.userDataDir, { recursive: true, force: true, maxRetries: 3 });
      } catch {
        // best effort while exiting
      }
    }
  }

  /**
   * Closes Chromium: Browser.close, then SIGKILL to its process group, then
   * checks that no process of the group nor any naming the profile
   * directory survives (killing stragglers by pid), then removes the
   * profile directory if launch() created it. Throws if something
   * survived; resolves with {survivors: [], exitCode, exitSignal}.
   */
  async close({ timeoutMs = 5_000 } = {}) {
    if (this._closed) return { survivors: [], exitCode: this.exitCode, exitSignal: this.exitSignal };
    this._closed = true;
    if (this.exitCode === undefined && this.exitSignal === undefined && this.child.pid) {
      await this.send("Browser.close", {}, { timeoutMs }).catch(() => {});
      await within(this.exited, timeoutMs);
    }
    if (this.child.pid) this.killNow();
    live.delete(this);
    let survivors = [];
    if (this.child.pid) {
      await within(this.exited, timeoutMs);
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        survivors = this.survivors();
        if (survivors.length === 0 || Date.now() > deadline) break;
        for (const p of survivors) {
          try {
            process.kill(p.pid, "SIGKILL");
          } catch {
            // gone meanwhile
          }
        }
        await sleep(100);
      }
    }
    if (this._ownDir) {
      fs.rmSync(this.userDataDir, { recursive: true, force: true, maxRetries: 3 });
    }
    if (survivors.length > 0) {
      throw new Error(`Chromium processes survived close(): ${JSON.stringify(survivors)}`);
    }
    return { survivors, exitCode: this.exitCode, exitSignal: this.exitSignal };
  }
}

export class Page {
  constructor(browser, targetId, sessionId) {
    this.browser = browser;
    this.targetId = targetId;
    this.sessionId = sessionId;
    /** Console calls, uncaught exceptions and log entries: {type, text, url?, time}. */
    this.consoleMessages = [];
    this._listeners = new Map(); // CDP event name -> Set of functions
  }

  send(method, params = {}, { timeoutMs } = {}) {
    return this.browser.send(method, params, { sessionId: this.sessionId, timeoutMs });
  }

  /** Calls fn(params) for each CDP event `method` of this page; returns a function that stops it. */
  on(method, fn) {
    if (!this._listeners.has(method)) this._listeners.set(method, new Set());
    this._listeners.get(method).add(fn);
    return () => this._listeners.get(method)?.delete(fn);
  }

  /**
   * Resolves with the params of the next event `method`, rejects after
   * timeoutMs or when `signal` (an AbortSignal) aborts.
   */
  once(method, { timeoutMs = this.browser.commandTimeoutMs, signal } = {}) {
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        stop();
        signal?.removeEventListener("abort", aborted);
      };
      const aborted = () => {
        done();
        reject(new Error(`stopped waiting for ${method}`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no ${method} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const stop = this.on(method, (params) => {
        done();
        resolve(params);
      });
      signal?.addEventListener("abort", aborted);
    });
  }

  _event(method, params) {
    const time = new Date().toISOString();
    if (method === "Runtime.consoleAPICalled") {
      const text = params.args.map(remoteObjectText).join(" ");
      this.consoleMessages.push({ type: params.type, text, time });
    } else if (method === "Runtime.exceptionThrown") {
      const d = params.exceptionDetails;
      const text = d.exception?.description ?? d.text;
      this.consoleMessages.push({ type: "exception", text, url: d.url, time });
    } else if (method === "Log.entryAdded") {
      const e = params.entry;
      this.consoleMessages.push({ type: `log.${e.level}`, text: e.text, url: e.url, time });
    }
    for (const fn of this._listeners.get(method) ?? []) fn(params);
  }

  _detached() {
    this.detached = true;
  }

  /** Loads url and waits for its load event; throws if the navigation fails. */
  async goto(url, { timeoutMs = this.browser.commandTimeoutMs } = {}) {
    const stop = new AbortController();
    const loaded = this.once("Page.loadEventFired", { timeoutMs, signal: stop.signal });
    loaded.catch(() => {});
    try {
      const result = await this.send("Page.navigate", { url }, { timeoutMs });
      if (result.errorText) throw new Error(`cannot load ${url}: ${result.errorText}`);
      await loaded;
    } finally {
      stop.abort();
    }
  }

  /**
   * Evaluates a JavaScript expression in the page (a string, or a function
   * called with `args`), awaits it if it is a promise, and returns its
   * value as JSON. Throws the page's exception message, or on timeout.
   */
  async evaluate(expression, { timeoutMs = this.browser.commandTimeoutMs, args = [] } = {}) {
    if (typeof expression === "function") {
      expression = `(${expression})(...${JSON.stringify(args)})`;
    }
    const result = await this.send(
      "Runtime.evaluate",
      { expression, awaitPromise: true, returnByValue: true, userGesture: true },
      { timeoutMs },
    );
    if (result.exceptionDetails) {
      const d = result.exceptionDetails;
      const message = d.exception?.description ?? d.exception?.value ?? d.text;
      const err = new Error(`evaluate(${abbreviate(expression)}) threw: ${message}`);
      err.exceptionDetails = d;
      throw err;
    }
    return result.result.value;
  }

  /**
   * Evaluates `expression` every intervalMs until its value is truthy, and
   * returns that value. On timeout throws with the expression, the last
   * value and the last exception.
   */
  async waitFor(expression, { timeoutMs = 10_000, intervalMs = 100, args = [] } = {}) {
    const deadline = Date.now() + timeoutMs;
    let last, lastError;
    for (;;) {
      const left = deadline - Date.now();
      try {
        last = await this.evaluate(expression, { timeoutMs: Math.max(left, 1_000), args });
        lastError = undefined;
        if (last) return last;
      } catch (err) {
        lastError = err;
        if (this.browser.exitCode !== undefined || this.browser.exitSignal !== undefined) throw err;
      }
      if (Date.now() + intervalMs > deadline) {
        const shown = typeof expression === "function" ? expression.toString() : expression;
        throw new Error(
          `waitFor timed out after ${timeoutMs} ms: ${abbreviate(shown)}; last value: ${abbreviate(JSON.stringify(last))}` +
            (lastError ? `; last error: ${lastError.message}` : ""),
        );
      }
      await sleep(intervalMs);
    }
  }

  /** Writes a PNG of the viewport (or the full page) to file; returns the bytes. */
  async screenshot(file, { fullPage = false } = {}) {
    const params = { format: "png" };
    if (fullPage) params.captureBeyondViewport = true;
    const { data } = await this.send("Page.captureScreenshot", params);
    const png = Buffer.from(data, "base64");
    if (file) fs.writeFileSync(file, png);
    return png;
  }

  /** Emulates a device viewport (e.g. a 360 px phone). */
  async setViewport({ width, height, deviceScaleFactor = 1, mobile = false }) {
    await this.send("Emulation.setDeviceMetricsOverride", { width, height, deviceScaleFactor, mobile });
  }

  /** Closes the tab. */
  async close() {
    await this.browser.send("Target.closeTarget", { targetId: this.targetId }).catch(() => {});
    this.browser._sessions.delete(this.sessionId);
  }
}

function remoteObjectText(o) {
  if (o.type === "string") return o.value;
  if ("value" in o) return JSON.stringify(o.value);
  return o.description ?? o.unserializableValue ?? o.type;
}

function abbreviate(text, max = 300) {
  text = String(text);
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/** Waits for promise, or at most ms (without keeping the process alive afterwards). */
async function within(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
