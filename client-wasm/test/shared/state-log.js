// Writes and reads records of the npm package's saved state log (client-wasm/src/persist.rs)
// for tests that need a state no short run can produce (tens of thousands of owed messages)
// or one written by another release. A record (format version 2) is `len: u32 BE ‖ !len: u32
// BE ‖ body ‖ the first 4 bytes of BLAKE3 derive_key("whispeer js client state record",
// body)` (version 1 had no `!len`); BLAKE3 is written out here
// for bodies of one chunk (≤ 1024 bytes), which is all the tests write. The tests check it
// against the records a real client saved (`records` verifies every check it reads).

export const MAGIC = Buffer.from('wspjs\x00\x02\n', 'latin1');
export const KIND = { seenDigest: 6, owed: 8, paid: 9, owedForgotten: 10 };

const IV = Uint32Array.of(0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19);
const PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
const CHUNK_START = 1;
const CHUNK_END = 2;
const ROOT = 8;
const DERIVE_KEY_CONTEXT = 32;
const DERIVE_KEY_MATERIAL = 64;

const rotr = (x, n) => (x >>> n) | (x << (32 - n));

function compress(cv, m, blockLen, flags) {
  const s = Uint32Array.of(...cv, IV[0], IV[1], IV[2], IV[3], 0, 0, blockLen, flags);
  const g = (a, b, c, d, x, y) => {
    s[a] = s[a] + s[b] + x;
    s[d] = rotr(s[d] ^ s[a], 16);
    s[c] = s[c] + s[d];
    s[b] = rotr(s[b] ^ s[c], 12);
    s[a] = s[a] + s[b] + y;
    s[d] = rotr(s[d] ^ s[a], 8);
    s[c] = s[c] + s[d];
    s[b] = rotr(s[b] ^ s[c], 7);
  };
  let w = [...m];
  for (let r = 0; r < 7; r++) {
    g(0, 4, 8, 12, w[0], w[1]);
    g(1, 5, 9, 13, w[2], w[3]);
    g(2, 6, 10, 14, w[4], w[5]);
    g(3, 7, 11, 15, w[6], w[7]);
    g(0, 5, 10, 15, w[8], w[9]);
    g(1, 6, 11, 12, w[10], w[11]);
    g(2, 7, 8, 13, w[12], w[13]);
    g(3, 4, 9, 14, w[14], w[15]);
    w = PERM.map((i) => w[i]);
  }
  const out = new Uint32Array(8);
  for (let i = 0; i < 8; i++) out[i] = s[i] ^ s[i + 8];
  return out;
}

/** BLAKE3 of one chunk (≤ 1024 bytes) with key words `key` and mode `flags`: 8 words. */
function hashChunk(input, key, flags) {
  if (input.length > 1024) throw new Error('state-log.js hashes one chunk only');
  let cv = key;
  const blocks = Math.max(1, Math.ceil(input.length / 64));
  for (let b = 0; b < blocks; b++) {
    const block = new Uint8Array(64);
    const part = input.subarray(b * 64, b * 64 + 64);
    block.set(part);
    const m = new Uint32Array(16);
    const view = new DataView(block.buffer);
    for (let i = 0; i < 16; i++) m[i] = view.getUint32(i * 4, true);
    let f = flags;
    if (b === 0) f |= CHUNK_START;
    if (b === blocks - 1) f |= CHUNK_END | ROOT;
    cv = compress(cv, m, part.length, f);
  }
  return cv;
}

const words = (w) => {
  const out = Buffer.alloc(32);
  for (let i = 0; i < 8; i++) out.writeUInt32LE(w[i], i * 4);
  return out;
};

/** BLAKE3 (plain hash mode) of up to 1024 bytes: 32 bytes. */
export const blake3 = (input) => words(hashChunk(input, IV, 0));

const CONTEXT_KEY = hashChunk(Buffer.from('whispeer js client state record'), IV, DERIVE_KEY_CONTEXT);

/** The 4-byte check of a record body. */
export const check = (body) => words(hashChunk(body, CONTEXT_KEY, DERIVE_KEY_MATERIAL)).subarray(0, 4);

/** One record: length, its complement, body, check. */
export function record(body) {
  const len = Buffer.alloc(8);
  len.writeUInt32BE(body.length);
  len.writeUInt32BE(~body.length >>> 0, 4);
  return Buffer.concat([len, body, check(body)]);
}

const u64 = (n) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};

/** A dedup entry as a snapshot writes it: digest (16 bytes) and expiry (Unix ms). */
export const seenDigest = (digest, expiresMs) => record(Buffer.concat([Buffer.of(KIND.seenDigest), digest, u64(expiresMs)]));
/** A message (its dedup digest) owed to durable `name`. */
export const owed = (digest, name) => record(Buffer.concat([Buffer.of(KIND.owed), digest, Buffer.from(name)]));
/** Durable `name` was deleted: it is owed nothing. */
export const owedForgotten = (name) => record(Buffer.concat([Buffer.of(KIND.owedForgotten), Buffer.from(name)]));

/** The records of a log after its header (`{ kind, body }`), each check verified. */
export function records(bytes) {
  const b = Buffer.from(bytes);
  if (!b.subarray(0, 8).equals(MAGIC)) throw new Error('not a state log of format version 2');
  const out = [];
  for (let at = 8; at < b.length; ) {
    const len = b.readUInt32BE(at);
    if (b.readUInt32BE(at + 4) !== ~len >>> 0) throw new Error(`record length damaged at byte ${at}`);
    const body = b.subarray(at + 8, at + 8 + len);
    if (!check(body).equals(b.subarray(at + 8 + len, at + 12 + len))) throw new Error(`record check failed at byte ${at}`);
    out.push({ kind: body[0], body: body.subarray(1), at });
    at += 12 + len;
  }
  return out;
}

/** Durable names of the `8` owed records of a log, with how many each has. */
export function owedCounts(bytes) {
  const n = {};
  for (const r of records(bytes)) if (r.kind === KIND.owed) n[r.body.subarray(16).toString()] = (n[r.body.subarray(16).toString()] ?? 0) + 1;
  return n;
}
