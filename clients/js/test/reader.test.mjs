// FrameReader: frames split over chunks, several frames per chunk, odd
// chunkings, oversized frames skipped without buffering them.

import { test } from "node:test";
import assert from "node:assert/strict";
import { codec } from "../fabric.js";
import { protocolExamples } from "./examples.mjs";

const { FrameReader, decodeFrame } = codec;
const examples = protocolExamples().map(([, bytes]) => bytes);
const stream = concat(examples);

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** Feeds `bytes` to a reader in chunks of the sizes `sizes()` gives; returns what came out. */
function feed(bytes, sizes, reader = new FrameReader()) {
  const out = [];
  for (let at = 0; at < bytes.length;) {
    const n = Math.max(1, sizes());
    out.push(...reader.push(bytes.subarray(at, at + n)));
    at += n;
  }
  return { out, reader };
}

const payloads = (items) => items.map((i) => Buffer.from(i.payload).toString("hex"));
const expected = payloads(examples.map((e) => ({ payload: e.subarray(4) })));

test("one chunk holding every example gives every frame, in order", () => {
  const { out, reader } = feed(stream, () => stream.length);
  assert.deepEqual(payloads(out), expected);
  assert.equal(reader.buffered, 0);
  for (const item of out) decodeFrame(item.payload);
});

for (const size of [1, 2, 3, 4, 5, 7, 16, 33, 100, 1000]) {
  test(`chunks of ${size} bytes`, () => {
    assert.deepEqual(payloads(feed(stream, () => size).out), expected);
  });
}

test("random chunkings", () => {
  let seed = 42;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (let round = 0; round < 50; round++) {
    assert.deepEqual(payloads(feed(stream, () => Math.floor(random() * 300)).out), expected);
  }
});

test("a frame split inside its length prefix waits for the rest", () => {
  const reader = new FrameReader();
  assert.deepEqual(reader.push(stream.subarray(0, 2)), []);
  assert.equal(reader.buffered, 2);
  assert.deepEqual(reader.push(stream.subarray(2, 4)), []);
  const first = examples[0];
  assert.deepEqual(reader.push(stream.subarray(4, first.length - 1)), []);
  assert.equal(reader.buffered, first.length - 5);
  assert.equal(reader.push(stream.subarray(first.length - 1, first.length)).length, 1);
  assert.equal(reader.buffered, 0);
});

test("an empty payload is a frame (that then fails to decode)", () => {
  const out = new FrameReader().push(Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0]));
  assert.equal(out.length, 2);
  assert.equal(out[0].payload.length, 0);
  assert.throws(() => decodeFrame(out[0].payload), /truncated/);
});

test("an oversized frame is reported and skipped as it arrives, never buffered", () => {
  const max = 64;
  const big = new Uint8Array(4 + 10_000);
  new DataView(big.buffer).setUint32(0, 10_000, false);
  const bytes = concat([examples[0], big, examples[1]]);
  for (const size of [1, 5, 64, 4096, bytes.length]) {
    const reader = new FrameReader(max);
    const out = [];
    for (let at = 0; at < bytes.length; at += size) {
      out.push(...reader.push(bytes.subarray(at, at + size)));
      assert.ok(reader.buffered <= max + 4 + size, "never holds more than a frame and a chunk");
    }
    assert.deepEqual(out.map((i) => i.tooLarge ?? i.payload.length), [examples[0].length - 4, 10_000, examples[1].length - 4]);
  }
});

test("a length prefix claiming 4 GiB holds only what arrived", () => {
  const reader = new FrameReader(); // the 16 MiB default
  const out = reader.push(Uint8Array.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
  assert.deepEqual(out, [{ tooLarge: 0xffffffff }]);
  assert.equal(reader.buffered, 0);
  const claimed = new FrameReader(1 << 24);
  assert.deepEqual(claimed.push(Uint8Array.from([0x01, 0x00, 0x00, 0x00, 7])), []); // exactly 16 MiB: allowed
  assert.equal(claimed.buffered, 1, "nothing reserved for the claimed length");
});
