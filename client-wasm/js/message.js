// Opened messages: the wasm side writes each one to a scratch buffer in its memory
// (client-wasm/src/client.rs `layout`); this builds the JS message object from it with one
// UTF-8 decode and one copy of the payload, instead of a dozen property sets across the
// wasm-bindgen boundary. The object is the same: same properties, same order, same values.
import { ClientCore, wasmMemory } from '../pkg/whispeer_wasm.js';

const FLAG_RETAINED = 1;
const FLAG_SENDER = 2;
const FLAG_CBOR = 4;
const STRINGS = 68;
const utf8 = new TextDecoder('utf-8', { ignoreBOM: true }); // keeps a leading U+FEFF

let memory;
let buffer;
let view;
let u8;

/** The message at `ptr` in wasm memory; `core.takeValue()` gives its CBOR value. */
export function readMessage(ptr, core) {
  if (memory === undefined) memory = wasmMemory();
  if (memory.buffer !== buffer) {
    // First call, or the memory grew (which replaces its ArrayBuffer).
    buffer = memory.buffer;
    view = new DataView(buffer);
    u8 = new Uint8Array(buffer);
  }
  const flags = u8[ptr + 4];
  const kind = u8[ptr + 5];
  const payloadAt = ptr + view.getUint32(ptr + 32, true);
  const payloadLen = view.getUint32(ptr + 36, true);
  const s = utf8.decode(u8.subarray(ptr + STRINGS, ptr + STRINGS + view.getUint32(ptr + 40, true)));
  // Each string's end in `s` (UTF-16 units).
  const e0 = view.getUint32(ptr + 44, true);
  const e1 = e0 + view.getUint32(ptr + 48, true);
  const e2 = e1 + view.getUint32(ptr + 52, true);
  const e3 = e2 + view.getUint32(ptr + 56, true);
  const e4 = e3 + view.getUint32(ptr + 60, true);
  const e5 = e4 + view.getUint32(ptr + 64, true);
  const topic = s.substring(0, e0);
  const sender = flags & FLAG_SENDER ? s.substring(e0, e1) : null;
  const id = s.substring(e1, e2);
  const treeId = s.substring(e2, e3);
  const contentType = s.substring(e3, e4);
  const detail = s.substring(e4, e5);
  const provenance =
    kind === 0
      ? { kind: 'admin-signed' }
      : kind === 1
        ? { kind: 'derived', from: detail }
        : kind === 2
          ? { kind: 'delegated', by: detail }
          : { kind: detail };
  const msg = {
    topic,
    sender,
    id,
    timestamp: view.getFloat64(ptr + 8, true),
    seq: view.getFloat64(ptr + 16, true),
    retained: (flags & FLAG_RETAINED) !== 0,
    treeId,
    epoch: view.getFloat64(ptr + 24, true),
    provenance,
    contentType,
    payload: u8.slice(payloadAt, payloadAt + payloadLen),
  };
  if (flags & FLAG_CBOR) {
    try {
      msg.value = core.takeValue();
    } catch (e) {
      msg.error = e;
    }
  }
  return msg;
}

/** Opens an envelope (no subscription, no dedup); throws when it does not open. */
ClientCore.prototype.openEnvelope = function openEnvelope(envelope) {
  return readMessage(this.openEnvelopeAt(envelope), this);
};
