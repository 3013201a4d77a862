// The codec against PROTOCOL.md: every documented hex example decodes to its
// frame and the frame encodes to exactly those bytes; malformed input fails
// with an error naming the field, and never makes the decoder allocate what a
// length field merely claims.

import { test } from "node:test";
import assert from "node:assert/strict";
import { codec, FabricError } from "../fabric.js";
import { EXAMPLES, protocolExamples } from "./examples.mjs";

const { encodeFrame, decodeFrame, CodecError, FRAME_TYPES } = codec;
const documented = protocolExamples();
const payloadOf = (bytes) => bytes.subarray(4);
const hex = (b) => Buffer.from(b).toString("hex");

test("PROTOCOL.md has the examples, and every one is checked here", () => {
  assert.ok(documented.length >= 40, `only ${documented.length} examples found`);
  const names = documented.map(([n]) => n);
  assert.deepEqual([...names].sort(), Object.keys(EXAMPLES).sort());
  assert.equal(new Set(names).size, names.length, "example names are unique");
});

test("every frame type has an example", () => {
  const types = new Set(Object.values(EXAMPLES).map((f) => f.body.type));
  assert.equal(FRAME_TYPES.length, 35);
  assert.deepEqual([...types].sort(), [...FRAME_TYPES].sort());
});

for (const [name, bytes] of documented) {
  test(`example ${name}: decode(hex) is the documented frame, encode(frame) the exact bytes`, () => {
    const expected = EXAMPLES[name];
    const len = new DataView(bytes.buffer).getUint32(0, false);
    assert.equal(len, bytes.length - 4, "the length prefix counts the payload");
    assert.deepEqual(decodeFrame(payloadOf(bytes)), expected);
    assert.equal(hex(encodeFrame(expected)), hex(bytes));
  });
}

// --- malformed input -------------------------------------------------------

const bytesOf = (name) => documented.find(([n]) => n === name)[1];

function malformed(payload, pattern) {
  assert.throws(() => decodeFrame(payload), (e) => {
    assert.ok(e instanceof CodecError, `a CodecError, not ${e}`);
    assert.match(e.message, pattern);
    return true;
  });
}

test("every truncation of every example fails as truncated, never otherwise", () => {
  for (const [name, bytes] of documented) {
    const payload = payloadOf(bytes);
    for (let cut = 0; cut < payload.length; cut++) {
      assert.throws(() => decodeFrame(payload.subarray(0, cut)), (e) => {
        assert.ok(e instanceof CodecError, `${name} cut at ${cut}: ${e}`);
        assert.match(e.message, /^malformed frame: .*truncated: /, `${name} cut at ${cut}`);
        return true;
      });
    }
  }
});

test("a truncated string names the field and how many bytes are missing", () => {
  const payload = payloadOf(bytesOf("text")).slice(0, -1);
  malformed(payload, /^malformed frame: body\(text\)\.text: truncated: string of 2 bytes, but only 1 bytes are left$/);
  malformed(payloadOf(bytesOf("ping")).subarray(0, 18), /^malformed frame: priority: truncated: 2 more bytes expected$/);
});

test("huge claimed lengths fail at once, without allocating them", () => {
  const before = process.memoryUsage().arrayBuffers;
  // A Binary claiming 2^64-1 bytes.
  const binary = payloadOf(bytesOf("binary")).slice();
  new DataView(binary.buffer).setBigUint64(33, 0xffffffffffffffffn, true);
  malformed(binary, /body\(binary\)\.data: truncated: byte string of 18446744073709551615 bytes, but only 2 bytes are left/);
  // A ClientList claiming 2^40 entries.
  const list = payloadOf(bytesOf("client_list")).slice();
  new DataView(list.buffer).setBigUint64(49, 1n << 40n, true);
  malformed(list, /body\(clientList\)\.clients: truncated: a list of 1099511627776 elements needs at least/);
  // A History claiming 2^60 publications, each at least 8 bytes.
  const history = payloadOf(bytesOf("history")).slice();
  new DataView(history.buffer).setBigUint64(history.length - 9, 1n << 60n, true);
  malformed(history, /body\(history\)\.publications: truncated: a list of 1152921504606846976 elements/);
  assert.ok(process.memoryUsage().arrayBuffers - before < 1 << 20, "no large buffer was allocated");
});

test("an invalid bool byte is named", () => {
  const goodbye = payloadOf(bytesOf("goodbye")).slice();
  goodbye[goodbye.length - 1] = 5;
  malformed(goodbye, /^malformed frame: body\(goodbye\)\.reconnect: invalid bool byte 0x05 \(expected 0x00 or 0x01\)$/);
});

test("an invalid Option tag is named", () => {
  const ping = payloadOf(bytesOf("ping")).slice();
  ping[28] = 5; // sender
  malformed(ping, /^malformed frame: sender: invalid Option tag 0x05 \(expected 0x00 or 0x01\)$/);
});

test("invalid UTF-8 is named with its position, and strict (no replacement)", () => {
  const text = payloadOf(bytesOf("text")).slice();
  text[text.length - 1] = 0xff; // "h\xff"
  malformed(text, /^malformed frame: body\(text\)\.text: invalid UTF-8 in a string, at byte 1 of the string$/);
  const surrogate = encodeFrame({ ...EXAMPLES.text, body: { type: "text", text: "abc" } }).slice(4);
  surrogate.set([0xed, 0xa0, 0x80], surrogate.length - 3); // an encoded surrogate is not UTF-8
  malformed(surrogate, /invalid UTF-8 in a string, at byte 0 of the string/);
  const inName = payloadOf(bytesOf("broadcast_delivered")).slice();
  inName[70] = 0xc0; // 'l' of the sender name "al" -> overlong lead byte
  malformed(inName, /^malformed frame: sender\.name: invalid UTF-8 in a string, at byte 1 of the string$/);
});

test("a leading byte order mark is kept, not stripped", () => {
  const frame = { ...EXAMPLES.text, body: { type: "text", text: "\ufeffhi" } };
  assert.equal(decodeFrame(encodeFrame(frame).subarray(4)).body.text, "\ufeffhi");
});

test("unknown frame types are told apart from garbage", () => {
  const ping = payloadOf(bytesOf("ping")).slice();
  ping[29] = 35;
  assert.throws(() => decodeFrame(ping), (e) => {
    assert.ok(e instanceof CodecError);
    assert.equal(e.kind, "unknownType");
    assert.equal(e.message, "unknown frame type 35");
    assert.equal(e.frameId, "00010203-0405-0607-0809-0a0b0c0d0e0f");
    return true;
  });
});

test("invalid enum tags are named", () => {
  const ping = payloadOf(bytesOf("ping")).slice();
  ping[16] = 7;
  malformed(ping, /^malformed frame: priority: invalid enum tag 7 for Priority \(expected 0 to 2\)$/);
  const broadcast = payloadOf(bytesOf("broadcast")).slice();
  broadcast[33] = 9;
  malformed(broadcast, /^malformed frame: body\(broadcast\)\.payload: invalid enum tag 9 for Payload \(expected 0 to 1\)$/);
  const subscribed = payloadOf(bytesOf("subscribed")).slice();
  subscribed[subscribed.length - 4] = 6;
  malformed(subscribed, /body\(subscribed\)\.recovery: invalid enum tag 6 for Recovery \(expected 0 to 5\)/);
  const idempotent = payloadOf(bytesOf("idempotent")).slice();
  idempotent[33] = 4;
  malformed(idempotent, /body\(idempotent\)\.message: invalid enum tag 4 for Keyed \(expected 0 to 3\)/);
});

test("a nested field is named with its list index", () => {
  const two = payloadOf(bytesOf("client_list_two")).slice();
  two[two.length - 21] = 0x02; // bob's user Option tag -> invalid
  malformed(two, /^malformed frame: body\(clientList\)\.clients\[1\]\.user: invalid Option tag 0x02/);
});

test("trailing bytes are rejected", () => {
  const ping = payloadOf(bytesOf("ping"));
  malformed(Uint8Array.from([...ping, 0, 0]), /^malformed frame: 2 trailing bytes$/);
});

// --- encoding ---------------------------------------------------------------

function unencodable(frame, pattern, kind = "invalid", limit = undefined) {
  assert.throws(() => encodeFrame(frame, limit), (e) => {
    assert.ok(e instanceof CodecError, String(e));
    assert.equal(e.kind, kind);
    assert.match(e.message, pattern);
    return true;
  });
}

test("encoding refuses values of the wrong type with the field named", () => {
  const direct = EXAMPLES.direct;
  unencodable({ ...direct, body: { ...direct.body, to: "bob" } }, /^cannot encode frame: body\(direct\)\.to: not a uuid: "bob"$/);
  unencodable({ ...direct, body: { ...direct.body, payload: 42 } }, /body\(direct\)\.payload: a payload must be a string or a Uint8Array, not 42/);
  unencodable({ ...direct, priority: 3 }, /^cannot encode frame: priority: expected a Priority \(0, 1, 2\), not 3$/);
  unencodable({ ...direct, timestampMs: -1n }, /timestampMs: expected a u64/);
  unencodable({ ...direct, body: { type: "nope" } }, /body: unknown Body type "nope"/);
  unencodable({ ...EXAMPLES.handshake, body: { ...EXAMPLES.handshake.body, maxVersion: 70000 } }, /body\(handshake\)\.maxVersion: expected a u16/);
  unencodable({ ...EXAMPLES.text, body: { type: "text", text: "a\ud800b" } }, /body\(text\)\.text: string holds a lone surrogate/);
  unencodable({ ...EXAMPLES.goodbye, body: { type: "goodbye", reason: "x", reconnect: 1 } }, /reconnect: expected a boolean/);
});

test("u64 fields take BigInt or safe integer Numbers", () => {
  const ack = EXAMPLES.ack;
  assert.deepEqual(encodeFrame({ ...ack, timestampMs: 1_700_000_000_000 }), encodeFrame(ack));
  unencodable({ ...ack, timestampMs: 2 ** 60 }, /timestampMs: expected a u64/);
  const big = decodeFrame(encodeFrame({ ...ack, timestampMs: (1n << 64n) - 1n }).subarray(4));
  assert.equal(big.timestampMs, 18446744073709551615n);
  assert.equal(codec.toSafeNumber(big.timestampMs), 18446744073709551615n, "unsafe values stay BigInt");
  assert.equal(codec.toSafeNumber(2n ** 53n - 1n), Number.MAX_SAFE_INTEGER);
});

test("encoding stops at the size limit instead of buffering an oversized message", () => {
  const text = (n) => ({ ...EXAMPLES.text, body: { type: "text", text: "x".repeat(n) } });
  // 16 id + 4 priority + 8 timestamp + 1 sender + 4 tag + 8 length = 41 bytes before the text.
  assert.equal(encodeFrame(text(1024 - 41), 1024).length, 1028);
  unencodable(text(1024 - 40), /frame payload exceeds 1024 bytes/, "tooLarge", 1024);
  unencodable(text(64 * 1024 * 1024), /frame payload exceeds 1024 bytes/, "tooLarge", 1024);
  // Without a limit, the hard maximum of 16 MiB; and growing past 256 bytes works.
  unencodable(text(16 * 1024 * 1024), /frame payload exceeds 16777216 bytes/, "tooLarge");
  const big = text(100_000);
  assert.deepEqual(decodeFrame(encodeFrame(big).subarray(4)), big);
});

// --- helpers ----------------------------------------------------------------

test("uuid text and bytes", () => {
  const text = "00010203-0405-0607-0809-0a0b0c0d0e0f";
  assert.deepEqual([...codec.uuidToBytes(text)], [...Array(16).keys()]);
  assert.equal(codec.bytesToUuid(codec.uuidToBytes(text.toUpperCase())), text);
  for (const bad of ["", "0001020304050607080900a0b0c0d0e0f", "00010203-0405-0607-0809-0a0b0c0d0e0g", 42, null]) {
    assert.throws(() => codec.uuidToBytes(bad), /not a uuid/);
  }
  const id = codec.randomId();
  assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/, "a random v4 uuid");
  assert.notEqual(codec.randomId(), id);
});

test("positions as text", () => {
  const p = { epoch: 0x00abcdef01234567n, offset: 42n };
  assert.equal(codec.formatPosition(p), "00abcdef01234567:42");
  assert.deepEqual(codec.parsePosition("00abcdef01234567:42"), p);
  assert.throws(() => codec.parsePosition("abc:1"), FabricError);
});
