// fabric.d.ts cannot be type-checked here (no TypeScript compiler without an
// npm registry); this keeps it from drifting: every export and every public
// Client member is declared, and nothing declared is missing.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as fabric from "../fabric.js";

const dts = readFileSync(new URL("../fabric.d.ts", import.meta.url), "utf8");

test("fabric.d.ts declares exactly the module's exports", () => {
  const declared = [...dts.matchAll(/^export declare (?:const|class|function) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual([...declared].sort(), Object.keys(fabric).sort());
  const codecKeys = /export declare const codec: Readonly<\{([^}]*)\}>/.exec(dts)[1];
  assert.deepEqual([...codecKeys.matchAll(/^\s*(\w+):/gm)].map((m) => m[1]).sort(), Object.keys(fabric.codec).sort());
});

test("fabric.d.ts declares every public Client member", () => {
  const block = dts.slice(dts.indexOf("export declare class Client"), dts.indexOf("export declare function toSafeNumber"));
  const declared = new Set([...block.matchAll(/^ {2}(?:static |readonly )?(\w+)[(<:?]/gm)].map((m) => m[1]));
  const actual = Object.getOwnPropertyNames(fabric.Client.prototype).filter((n) => n !== "constructor");
  for (const name of [...actual, "connect"]) assert.ok(declared.has(name), `Client.${name} is declared`);
  for (const name of declared) assert.ok(actual.includes(name) || name === "constructor" || name in fabric.Client, `Client.${name} exists`);
});
