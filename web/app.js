// The quic-fabric demo chat: the browser counterpart of `fabric chat`.
// Lines go to the current room (a channel, via publish) or, in no room, to
// everyone (broadcast: the lobby); `/to TARGET TEXT` sends a direct message
// by client id, name or user, as the terminal chat does, and the same slash
// commands work. The client library is ./fabric.js (served by the node);
// the node's address comes from /webtransport.json before every connect.
//
// Test hooks: window.fabricDemo = { client, state, log, errors, rooms,
// currentRoom, run(line) }, and `?name=X&autoconnect=1&room=R` in the URL.

const HELP = `TEXT             say TEXT in the current room, or to everyone while in no room
/join ROOM       join ROOM (a channel); it becomes the current room
/leave [ROOM]    leave ROOM (default: the current room)
/who [ROOM]      who is in ROOM (default: the current room)
/to TARGET TEXT  send TEXT to one client (TARGET: its id, else its name) or to a user
/list            connected clients
/ping            round trip to the node
/help            this list
/quit            leave`;

const NAME_KEY = "fabric-chat.name";
const PING_EVERY_MS = 5_000;
const LIST_EVERY_MS = 10_000;
const PRESENCE_EVERY_MS = 15_000;
const MAX_SHOWN = 500; // log entries kept in the page
const UUID = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

const $ = (id) => document.getElementById(id);
/** A new element with properties (attributes for names with a dash) and children. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key.includes("-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}
const params = new URLSearchParams(location.search);

let fabric = null; // the client module, once imported
let client = null;
let state = "idle"; // idle | connecting | connected | reconnecting | closed
let attempt = 0; // bumped by each connect or disconnect, so a stale connect gives up
let timers = [];
let lobby = { clients: [], truncated: false };
/** Joined rooms, in the order joined; `current` is where lines go (null: everyone). */
const rooms = { joined: [], current: null };
/** room -> Map(clientId -> ClientInfo), or null when the room's presence cannot be read. */
const members = new Map();
const entryItems = new WeakMap(); // log entry -> its <li>

const demo = {
  get client() { return client; },
  get state() { return state; },
  get rooms() { return [...rooms.joined]; },
  get currentRoom() { return rooms.current; },
  log: [],
  errors: [],
  run: (line) => runLine(line),
};
window.fabricDemo = demo;

// ---- showing things -------------------------------------------------------

/** Adds an entry to the log (kinds: broadcast, direct, publication, join, leave, info, error, help). */
function show(kind, { from = "", room = "", text = "", ...extra } = {}) {
  const entry = { kind, from, room, text, time: Date.now(), ...extra };
  demo.log.push(entry);
  const at = new Date(entry.time);
  const [prefix, body] = describe(entry);
  const li = el("li", { className: `entry ${kind}${entry.mine ? " mine" : ""}` },
    el("time", { dateTime: at.toISOString(), textContent: at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false }) }),
    " ", el("span", { className: "who", textContent: prefix }),
    " ", el(kind === "help" ? "pre" : "span", { className: "text", textContent: body }));
  if (entry.status) li.dataset.status = entry.status;
  entryItems.set(entry, li);
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(li);
  while (log.childElementCount > MAX_SHOWN) log.firstElementChild.remove();
  if (demo.log.length > MAX_SHOWN) demo.log.splice(0, demo.log.length - MAX_SHOWN);
  if (atBottom || entry.mine) li.scrollIntoView({ block: "end" });
  return entry;
}

/** How an entry reads, as [prefix, text]: the same shapes as `fabric chat`. */
function describe(e) {
  switch (e.kind) {
    case "broadcast": return [`[${e.from}]`, e.text];
    case "direct": return [e.mine ? `[you → ${e.to}]` : `[${e.from} → you]`, e.text];
    case "publication": return [`[${e.room}] ${e.from}:`, e.text];
    case "join": return ["*", `${e.from} joined ${e.room}`];
    case "leave": return ["*", `${e.from} left ${e.room}`];
    case "error": return ["!", e.text];
    case "help": return ["", e.text];
    default: return ["*", e.text];
  }
}

/** Marks an entry of yours "sent" or "failed" once `request` settles; returns its result. */
async function tracked(entry, request) {
  const mark = (status) => {
    entry.status = status;
    const li = entryItems.get(entry);
    if (li) li.dataset.status = status;
  };
  try {
    const result = await request;
    mark("sent");
    return result;
  } catch (err) {
    mark("failed");
    throw err;
  }
}

/** Shows a failure in the log and the alert region, and records it in fabricDemo.errors. */
function reportError(action, err, text) {
  const e = { action, code: err?.code ?? null, codeName: err?.codeName ?? null, message: String(err?.message ?? err),
    retryAfterMs: err?.retryAfterMs ?? null, time: Date.now() };
  demo.errors.push(e);
  if (demo.errors.length > MAX_SHOWN) demo.errors.shift();
  // The client's messages for node errors already name the code: "RATE_LIMITED (12): ...".
  const code = e.codeName && !e.message.includes(e.codeName) ? ` [${e.codeName}]` : "";
  const retry = e.retryAfterMs ? ` (retry in ${Math.ceil(Number(e.retryAfterMs) / 1000)} s)` : "";
  text ??= `${action}: ${e.message}${code}${retry}`;
  show("error", { text, code: e.code, codeName: e.codeName });
  announce(text);
}

/** The alert region says the latest failure or mistake. */
const announce = (text) => { $("notice").textContent = text; };

function usage(text) {
  show("error", { text });
  announce(text);
}

const nameOf = (sender) => sender?.name ?? "server";
const payloadText = (p) => (typeof p === "string" ? p : `<${p?.byteLength ?? 0} bytes>`);
const short = (id) => String(id ?? "").slice(0, 8);
const whereLinesGo = () => (rooms.current ? `lines now go to ${rooms.current}` : "lines are now broadcast to everyone");

// ---- connection state -----------------------------------------------------

function setState(next, info = {}) {
  state = next;
  const status = $("status");
  status.dataset.state = next;
  const tries = info.attempt > 1 ? ` (attempt ${info.attempt})` : "";
  let text = { idle: "not connected", connecting: `connecting…${tries}`, reconnecting: `reconnecting…${tries}` }[next];
  if (next === "connected") {
    text = `connected · node ${short(client?.nodeId)}`;
    status.title = `client ${client?.clientId} on node ${client?.nodeId} (${client?.serverName}), protocol ${client?.version}`;
  } else if (next === "closed") {
    const code = info.code != null ? ` (code ${info.code})` : "";
    text = `closed: ${info.reason || "no reason given"}${code}`;
  }
  $("status-text").textContent = text;
  const live = next === "connected" || next === "reconnecting";
  $("connect").textContent = live ? "Disconnect" : next === "connecting" ? "Cancel" : "Connect";
  $("name").disabled = next !== "idle" && next !== "closed";
  for (const id of ["message", "send", "room-input", "join"]) $(id).disabled = !live;
  if (next !== "connected") $("rtt").textContent = "RTT –";
  if (next === "closed") {
    stopTimers();
    client = null;
    lobby = { clients: [], truncated: false };
    Object.assign(rooms, { joined: [], current: null });
    members.clear();
    renderAll();
  }
}

async function connect() {
  const name = $("name").value.trim();
  if (!name) return usage("enter a name first");
  stored(() => localStorage.setItem(NAME_KEY, name));
  const mine = ++attempt;
  setState("connecting");
  try {
    fabric ??= await import("./fabric.js");
  } catch (err) {
    reportError("loading the client library ./fabric.js", err);
    setState("closed", { reason: "the client library could not be loaded" });
    return;
  }
  let c;
  try {
    const reconnect = { initialDelayMs: 250, maxDelayMs: 5000 };
    c = await fabric.Client.connect({ discovery: "/webtransport.json", name, reconnect, resume: true });
  } catch (err) {
    if (mine !== attempt) return; // cancelled meanwhile
    reportError("connect", err);
    setState("closed", { reason: err?.message ?? String(err), code: err?.closeCode });
    return;
  }
  if (mine !== attempt) {
    c.close("cancelled").catch(() => {});
    return;
  }
  client = c;
  listen(c);
  setState("connected");
  show("info", { text: `connected as ${c.clientId} on node ${c.nodeId} (${c.serverName}). Type to broadcast, /join ROOM to talk in a room, /help for commands.` });
  startTimers();
  refreshLobby();
  renderAll();
  const room = params.get("room");
  if (room) runLine(`/join ${room}`);
}

async function disconnect() {
  const c = client;
  attempt++;
  if (!c) {
    setState("closed", { reason: "cancelled" });
    return;
  }
  try {
    await c.close("bye");
  } catch (err) {
    reportError("disconnect", err);
  }
  closed(c, { code: 0, reason: "you disconnected" }); // unless the client said so first
}

/** Subscribes the page to the client's events. */
function listen(c) {
  const mineFrom = (from) => from?.clientId != null && from.clientId === c.clientId;
  const message = (kind, { from, payload, channel, user }) =>
    show(kind, { from: nameOf(from), fromId: from?.clientId, room: channel ?? "", user, text: payloadText(payload) });
  c.on("broadcast", (ev) => {
    message("broadcast", ev);
    if (ev.from && !lobby.clients.some((m) => m.clientId === ev.from.clientId)) refreshLobbySoon();
  });
  c.on("direct", (ev) => message("direct", ev));
  c.on("userDirect", (ev) => message("direct", ev));
  // Your own publications come back: shown when sent instead, as in the terminal chat.
  c.on("publication", (ev) => mineFrom(ev.from) || message("publication", ev));
  for (const kind of ["join", "leave"]) {
    c.on(kind, ({ channel, member }) => {
      show(kind, { room: channel, from: member.name, fromId: member.clientId });
      if (kind === "join") members.get(channel)?.set(member.clientId, member);
      else members.get(channel)?.delete(member.clientId);
      renderRoomMembers();
      refreshLobbySoon();
    });
  }
  c.on("unsubscribed", ({ channel, reason }) => {
    show("info", { room: channel, text: `removed from ${channel}: ${reason}` });
    if (forgetRoom(channel)) show("info", { text: whereLinesGo() });
  });
  c.on("subscriptionLost", ({ channel, reason }) =>
    show("info", { room: channel, text: `the node missed publications of ${channel} (${reason}); recovering them` }));
  // The client subscribes again by itself after a reconnect (or a SubscriptionLost).
  c.on("resubscribed", ({ channel, recovery, cause }) => {
    if (["trimmed", "epochChanged", "ahead"].includes(recovery)) {
      show("error", { room: channel, text: `messages of ${channel} sent while you were away could not be recovered (${recovery})` });
    } else show("info", { room: channel, text: cause === "subscriptionLost" ? `recovered what the node missed of ${channel}` : `rejoined ${channel}` });
    refreshMembers(channel, { quiet: true });
  });
  c.on("resubscribeFailed", ({ channel, error }) => {
    reportError(`could not rejoin ${channel}`, error);
    const before = rooms.current;
    for (const room of rooms.joined) if (!c.subscriptions.includes(room)) forgetRoom(room);
    if (rooms.current !== before) show("info", { text: whereLinesGo() });
  });
  c.on("state", (ev) => {
    if (c !== client) return;
    if (ev.state === "closed") return closed(c, ev); // it carries the close code and reason
    if (ev.state === "reconnecting" && state === "connected") {
      show("info", { text: `connection lost${ev.reason ? ` (${ev.reason})` : ""}; reconnecting` });
    }
    setState(ev.state, ev);
  });
  c.on("reconnected", ({ clientId, nodeId, session }) => {
    const resumed = /resum/i.test(String(session ?? "")) ? " (session resumed)" : "";
    show("info", { text: `reconnected as ${clientId} on node ${nodeId}${resumed}` });
    if (state !== "connected") setState("connected");
    ping(false);
    refreshLobby();
  });
  c.on("goodbye", ({ reason }) => show("info", { text: `server says goodbye: ${reason}` }));
  c.on("error", (err) => reportError("from the node", err));
  c.on("closed", (ev) => closed(c, ev));
}

/** The end of client c (once): shown in the log and the status. */
function closed(c, { code, reason }) {
  if (c !== client) return;
  show("info", { text: `disconnected: ${reason || "no reason given"}${code != null ? ` (code ${code})` : ""}` });
  setState("closed", { code, reason });
}

function startTimers() {
  stopTimers();
  ping(false);
  timers.push(setInterval(() => ping(false), PING_EVERY_MS));
  timers.push(setInterval(refreshLobby, LIST_EVERY_MS));
  timers.push(setInterval(() => rooms.current && refreshMembers(rooms.current, { quiet: true }), PRESENCE_EVERY_MS));
}

function stopTimers() {
  timers.forEach(clearInterval);
  timers = [];
}

// ---- member lists -----------------------------------------------------------

let lobbySoon = null;
function refreshLobbySoon() {
  clearTimeout(lobbySoon);
  lobbySoon = setTimeout(refreshLobby, 300);
}

async function refreshLobby() {
  if (!client || state !== "connected") return;
  try {
    const { clients, truncated } = await client.list();
    lobby = { clients, truncated };
    renderLobby();
  } catch (err) {
    reportError("list the connected clients", err);
  }
}

/** Reads a room's members (presence); quiet: a failure seen before is not shown again. */
async function refreshMembers(room, { quiet = false } = {}) {
  if (!client || state !== "connected") return;
  try {
    const { members: list } = await client.presence(room);
    if (!rooms.joined.includes(room)) return;
    members.set(room, new Map(list.map((m) => [m.clientId, m])));
  } catch (err) {
    const known = members.has(room) && members.get(room) === null;
    if (rooms.joined.includes(room)) members.set(room, null);
    if (!(quiet && known)) reportError(`members of ${room}`, err);
  }
  renderRoomMembers();
}

/** The name `/to` can use for a member: its name if no other client has it, else its id. */
function addressOf(member) {
  const others = lobby.clients.filter((c) => c.name === member.name && c.clientId !== client?.clientId);
  const byName = others.length <= 1 && !/\s/.test(member.name) && !UUID.test(member.name);
  return byName ? member.name : member.clientId;
}

/** A member as a button that starts a direct message to it. */
function memberItem(m) {
  const you = m.clientId === client?.clientId;
  const detail = [m.user && `user ${m.user}`, `node ${short(m.nodeId)}`, you && "you"].filter(Boolean).join(" · ");
  const button = el("button", {
    type: "button", className: "member", title: `${m.clientId} on node ${m.nodeId}`,
    "aria-label": `Message ${m.name}${you ? " (you)" : ""} directly`,
    onclick: () => {
      $("message").value = `/to ${addressOf(m)} `;
      $("message").focus();
    },
  }, m.name, el("span", { className: "detail", textContent: detail }));
  return el("li", {}, button);
}

function renderLobby() {
  const list = $("members");
  list.replaceChildren(...lobby.clients.map(memberItem));
  $("member-count").textContent = client ? `(${lobby.clients.length}${lobby.truncated ? "+" : ""})` : "";
}

function renderRoomMembers() {
  const room = rooms.current;
  $("room-members-heading").textContent = room ? `In ${room}` : "In the current room";
  const list = $("room-members");
  const known = room ? members.get(room) : undefined;
  if (!room || known === undefined) {
    list.replaceChildren(note(room ? "loading…" : "You are in no room: lines go to everyone."));
  } else if (known === null) {
    list.replaceChildren(note("The member list of this room is not available."));
  } else {
    list.replaceChildren(...[...known.values()].map(memberItem));
  }
}

const note = (text) => el("li", { className: "note", textContent: text });

function renderRooms() {
  const list = $("rooms");
  const item = (room, label) => {
    const select = el("button", {
      type: "button", className: "room", textContent: label, "aria-current": String(room === rooms.current),
      onclick: () => {
        // Like joining again in `fabric chat`: the room becomes the current one.
        if (room) enterRoom(room);
        else rooms.current = null;
        show("info", { text: whereLinesGo() });
        renderAll();
        if (room) refreshMembers(room, { quiet: true });
        $("message").focus();
      },
    });
    const leave = room && el("button", {
      type: "button", className: "leave", textContent: "Leave", "aria-label": `Leave ${room}`,
      onclick: () => runLine(`/leave ${room}`),
    });
    return el("li", {}, select, ...(leave ? [leave] : []));
  };
  list.replaceChildren(item(null, "Lobby (everyone)"), ...rooms.joined.map((r) => item(r, r)));
  $("target").textContent = rooms.current ? `to ${rooms.current}` : "to everyone (lobby)";
}

function renderAll() {
  renderRooms();
  renderRoomMembers();
  renderLobby();
}

// ---- rooms --------------------------------------------------------------------

function enterRoom(room) {
  rooms.joined = [...rooms.joined.filter((r) => r !== room), room];
  rooms.current = room;
  renderAll();
}

/** Forgets a room; returns whether the current room changed (it becomes the last joined one). */
function forgetRoom(room) {
  const wasCurrent = rooms.current === room;
  rooms.joined = rooms.joined.filter((r) => r !== room);
  members.delete(room);
  if (wasCurrent) rooms.current = rooms.joined.at(-1) ?? null;
  renderAll();
  return wasCurrent;
}

// ---- commands -------------------------------------------------------------------

/** Runs one input line as `fabric chat` does: a slash command, else a message. */
async function runLine(raw) {
  const line = raw.trim();
  const space = line.indexOf(" ");
  const command = space < 0 ? line : line.slice(0, space);
  const rest = space < 0 ? "" : line.slice(space + 1).trim();
  if (command === "") return;
  if (command === "/help") return void show("help", { text: HELP });
  if (command === "/quit") return disconnect();
  if (command.startsWith("/") && !COMMANDS[command]) return usage(`unknown command ${command} (/help lists them)`);
  if (!client) return usage("not connected: connect first");
  try {
    await (COMMANDS[command] ?? say)(command.startsWith("/") ? rest : line);
  } catch (err) {
    const action = command.startsWith("/") ? `${command} ${rest}`.trim() : rooms.current ? `send to ${rooms.current}` : "broadcast";
    reportError(action, err);
  }
}

const COMMANDS = {
  "/list": async () => {
    const { clients, truncated } = await client.list();
    lobby = { clients, truncated };
    renderLobby();
    show("info", { text: `${clients.length} connected:\n${memberLines(clients, truncated)}` });
  },
  "/ping": () => ping(true),
  "/join": async (room) => {
    if (!room) return usage("usage: /join ROOM");
    const ack = await client.subscribe(room, { events: true });
    enterRoom(room);
    const n = typeof ack === "object" && ack !== null ? ack.subscribers : ack;
    const here = n != null ? ` (${n} here)` : "";
    show("info", { room, text: `joined ${room}${here}; lines now go to ${room}` });
    refreshMembers(room);
  },
  "/leave": async (named) => {
    const room = named || rooms.current;
    if (!room) return usage("usage: /leave ROOM (you are in no room)");
    await client.unsubscribe(room);
    const moved = forgetRoom(room);
    show("info", { room, text: `left ${room}` });
    if (moved) show("info", { text: whereLinesGo() });
  },
  "/who": async (named) => {
    const room = named || rooms.current;
    if (!room) return usage("usage: /who ROOM (you are in no room)");
    const { members: list, truncated } = await client.presence(room);
    show("info", { room, text: `${list.length} in ${room}:\n${memberLines(list, truncated)}` });
  },
  "/to": async (rest) => {
    const space = rest.indexOf(" ");
    if (space < 0) return usage("usage: /to TARGET TEXT (TARGET: a client id, a client name or a user)");
    const target = rest.slice(0, space);
    const text = rest.slice(space + 1).trimStart();
    let recipient;
    if (UUID.test(target)) {
      recipient = { clientId: canonicalId(target) };
    } else {
      const { clients } = await client.list();
      recipient = recipientByName(target, clients, client.clientId);
      if (recipient.problem) return usage(recipient.problem);
    }
    const entry = show("direct", { from: $("name").value.trim(), to: target, text, mine: true, status: "sending" });
    try {
      const result = await tracked(entry, recipient.clientId ? client.direct(recipient.clientId, text) : client.sendToUser(recipient.user, text));
      if (result?.stored) {
        const until = new Date(Number(result.untilMs)).toLocaleString();
        show("info", { text: `${target} is not connected: the message is kept for them until ${until}` });
      }
    } catch (err) {
      if (err?.codeName === "UNKNOWN_USER" && recipient.user === target) {
        return reportError(`/to ${target}`, err, `nobody called ${target}: no client has that id or name, and no user ${target} is connected`);
      }
      throw err;
    }
  },
};

/** Clients as `fabric chat` lists them, one a line. */
function memberLines(list, truncated) {
  const line = (c) => `  ${c.clientId} ${c.name}${c.user ? ` (${c.user})` : ""} on node ${c.nodeId}${c.clientId === client.clientId ? " (you)" : ""}`;
  return list.map(line).join("\n") + (truncated ? "\n  (list truncated)" : "");
}

/** A message to the current room, or to everyone. */
async function say(text) {
  const room = rooms.current;
  const from = $("name").value.trim();
  const entry = show(room ? "publication" : "broadcast", { from, room: room ?? "", text, mine: true, status: "sending" });
  await tracked(entry, room ? client.publish(room, text) : client.broadcast(text));
}

async function ping(asked) {
  if (!client || state !== "connected") return;
  try {
    const ms = await client.ping();
    $("rtt").textContent = `RTT ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
    if (asked) show("info", { text: `pong: ${ms.toFixed(3)} ms` });
  } catch (err) {
    if (asked || state === "connected") reportError("ping", err);
  }
}

/**
 * Whom `/to TARGET` means when TARGET is not a client id (as in `fabric
 * chat`): the one other client named TARGET; the user of all the clients
 * named TARGET when they belong to one user; the user TARGET when no other
 * client has that name; else a problem asking for the id.
 */
function recipientByName(target, clients, me) {
  const named = clients.filter((c) => c.name === target && c.clientId !== me);
  if (named.length === 0) return { user: target };
  if (named.length === 1) return { clientId: named[0].clientId };
  const user = named[0].user;
  if (user != null && named.every((c) => c.user === user)) return { user };
  const ids = named.map((c) => c.clientId).join(", ");
  return { problem: `${named.length} clients are named ${target}: ${ids}; use /to ID TEXT` };
}

/** localStorage may be disabled: then names are just not remembered. */
function stored(use) {
  try { return use(); } catch { return null; }
}

function canonicalId(id) {
  const hex = id.replaceAll("-", "").toLowerCase();
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// ---- start ----------------------------------------------------------------------

function start() {
  $("name").value = params.get("name") || stored(() => localStorage.getItem(NAME_KEY)) || `guest-${String(Math.floor(Math.random() * 10000)).padStart(4, "0")}`;
  renderAll();

  const onSubmit = (form, input, use) => $(form).addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = input && $(input).value;
    if (input) $(input).value = "";
    use(value);
  });
  onSubmit("connect-form", null, () => (state === "idle" || state === "closed" ? connect() : disconnect()));
  onSubmit("composer", "message", runLine);
  onSubmit("room-form", "room-input", (room) => runLine(`/join ${room.trim()}`));
  addEventListener("pagehide", () => client?.close("page closed").catch(() => {}));

  if (typeof WebTransport === "undefined") {
    const why = isSecureContext
      ? "This browser does not support WebTransport. Use Chrome or Edge 97+, or Firefox 114+ (Safari does not support it yet)."
      : "WebTransport needs a secure context: open this page over https, or from http://localhost or http://127.0.0.1.";
    Object.assign($("unsupported"), { textContent: why, hidden: false });
    reportError("WebTransport", new Error(why), why);
    setState("closed", { reason: "WebTransport is not available" });
    $("connect").disabled = true;
    return;
  }
  show("info", { text: "Choose a name and connect. Type /help for commands." });
  if (params.get("autoconnect") === "1") connect();
}

start();
