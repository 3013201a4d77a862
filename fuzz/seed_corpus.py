#!/usr/bin/env python3
"""Builds the fuzz seed corpus from the hex examples in PROTOCOL.md.

Every `<!-- example: NAME -->` marker in PROTOCOL.md is followed by a
```text block holding one complete frame as written to a stream (4-byte
big-endian length prefix, then the payload), as a hex dump with a leading
offset column. This script writes:

  corpus/frame_decode/NAME   the payload only (what decode_frame sees)
  corpus/stream/NAME         the whole frame, prefix included
  corpus/stream/all          every example back to back, Handshake first
                             (so the stream target gets past the handshake)

Run from anywhere: python3 fuzz/seed_corpus.py. The corpus is generated,
not committed; re-run after PROTOCOL.md changes.
"""

import pathlib
import re
import sys

FUZZ = pathlib.Path(__file__).resolve().parent
DOC = FUZZ.parent / "PROTOCOL.md"
BLOCK = re.compile(r"<!-- example: (\w+) -->\s*```text\n(.*?)```", re.S)


def parse_hex(block: str) -> bytes:
    out = bytearray()
    for line in block.strip().splitlines():
        offset, _, hexpart = line.strip().partition("  ")
        if int(offset, 16) != len(out):
            raise ValueError(f"offset {offset} does not follow {len(out):04x}")
        out += bytes.fromhex(hexpart)
    return bytes(out)


def main() -> int:
    examples = []
    for name, block in BLOCK.findall(DOC.read_text(encoding="utf-8")):
        frame = parse_hex(block)
        length = int.from_bytes(frame[:4], "big")
        if length != len(frame) - 4:
            print(f"{name}: prefix says {length}, payload is {len(frame) - 4}", file=sys.stderr)
            return 1
        examples.append((name, frame))
    if not examples:
        print(f"no examples found in {DOC}", file=sys.stderr)
        return 1

    frame_dir = FUZZ / "corpus" / "frame_decode"
    stream_dir = FUZZ / "corpus" / "stream"
    frame_dir.mkdir(parents=True, exist_ok=True)
    stream_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in examples:
        (frame_dir / name).write_bytes(frame[4:])
        (stream_dir / name).write_bytes(frame)
    # Handshake first, as on a real connection.
    ordered = sorted(examples, key=lambda e: e[0] != "handshake")
    (stream_dir / "all").write_bytes(b"".join(frame for _, frame in ordered))
    print(f"wrote {len(examples)} examples to {frame_dir} and {len(examples) + 1} to {stream_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
