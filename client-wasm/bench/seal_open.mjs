// Seal/open throughput for 1 KiB messages in Node.js (wasm) beside the native Rust build
// on the same machine, plus the .wasm size.
//   node bench/seal_open.mjs [--size 1024] [--no-native]
// Native numbers come from `cargo run --release -p whispeer-tests --example seal_open_native`
// (same payload, same modes, same Padmé padding).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ClientCore, Identity, Keyring, TreeKey } from '../js/index.node.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const size = Number(args[args.indexOf('--size') + 1] || 1024) || 1024;

// CBOR-like records, as tests/src/lib.rs `bench_payload` and the protocol's criterion bench.
function payload(size) {
  const out = [];
  const f32 = new DataView(new ArrayBuffer(4));
  for (let n = 0; out.length < size; n++) {
    out.push(0xa3, 0x62, 0x69, 0x64, 0x1a, (n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
    out.push(0x67, ...Buffer.from('celsius'), 0xfa);
    f32.setFloat32(0, Math.fround(21.0 + Math.fround((n % 10) / 10)));
    out.push(...new Uint8Array(f32.buffer));
    out.push(0x64, ...Buffer.from('room'), 0x67, ...Buffer.from('kitchen'));
  }
  return new Uint8Array(out.slice(0, size));
}

const tree = TreeKey.generate('bench');
const keys = new Keyring();
keys.addTreeKey(tree);
const me = Identity.generate();
const data = payload(size);
const topic = 'sensor/kitchen/temp';
const modes = [
  ['plain', 0, false],
  ['signed', 0, true],
  ['zstd3+signed', 3, true],
];

function rate(fn) {
  // Warm up, then run batches for about a second.
  for (let i = 0; i < 200; i++) fn(i);
  let n = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < 1000) {
    for (let i = 0; i < 100; i++) fn(n++);
  }
  return n / ((performance.now() - t0) / 1000);
}

const results = [];
for (const [mode, level, sign] of modes) {
  const core = new ClientCore(keys, level, true, sign);
  core.setIdentity(me);
  const envs = [];
  const seal = rate((i) => {
    const e = core.sealEnvelope(topic, 'application/octet-stream', data);
    if (envs.length < 10_000) envs.push(e);
  });
  const open = rate((i) => core.openEnvelope(envs[i % envs.length]));
  results.push({ runtime: 'node-wasm', mode, size, seal_per_s: Math.round(seal), open_per_s: Math.round(open) });
}

let native = [];
if (!args.includes('--no-native')) {
  try {
    const out = execFileSync(
      'cargo',
      ['run', '--quiet', '--release', '-p', 'whispeer-tests', '--example', 'seal_open_native', '--', String(size)],
      { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
    );
    native = out.trim().split('\n').map((l) => JSON.parse(l));
  } catch (e) {
    console.error(`native run failed: ${e.message}`);
  }
}

const wasm = readFileSync(join(root, 'pkg', 'whispeer_wasm_bg.wasm'));
console.log(`whispeer_wasm_bg.wasm: ${wasm.length} bytes raw, ${gzipSync(wasm, { level: 9 }).length} bytes gzip -9`);
console.log(`Node ${process.version}, ${size}-byte payload, Padmé padding\n`);
console.log('| mode | seal/s wasm | seal/s native | wasm/native | open/s wasm | open/s native | wasm/native |');
console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
for (const r of results) {
  const n = native.find((x) => x.mode === r.mode);
  const pct = (a, b) => (b ? `${Math.round((100 * a) / b)}%` : '–');
  console.log(
    `| ${r.mode} | ${r.seal_per_s} | ${n?.seal_per_s ?? '–'} | ${pct(r.seal_per_s, n?.seal_per_s)} | ` +
      `${r.open_per_s} | ${n?.open_per_s ?? '–'} | ${pct(r.open_per_s, n?.open_per_s)} |`,
  );
}
