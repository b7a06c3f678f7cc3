// Seal/open throughput for 1 KiB messages in Node.js and in headless Chromium (the same
// WebAssembly module) beside the native Rust build on the same machine, plus the .wasm size.
//   node bench/seal_open.mjs [--size 1024] [--no-native] [--no-browser]
// Native numbers come from `cargo run --release -p whispeer-tests --example seal_open_native`
// (same payload, same modes, same Padmé padding). Chromium is /usr/bin/chromium
// (CHROMIUM_PATH) driven by playwright-core, as in the browser tests.
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as W from '../js/index.node.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const size = Number(args[args.indexOf('--size') + 1] || 1024) || 1024;

/**
 * Self-contained (it is also sent to the browser page): seals and opens `size`-byte
 * CBOR-like records (as tests/src/lib.rs `bench_payload` and the protocol's criterion
 * bench) for about a second per mode with the module `W`; returns one row per mode.
 */
function measureAll({ size }) {
  const W = globalThis.W;
  const enc = new TextEncoder();
  const out = [];
  const f32 = new DataView(new ArrayBuffer(4));
  for (let n = 0; out.length < size; n++) {
    out.push(0xa3, 0x62, 0x69, 0x64, 0x1a, (n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
    out.push(0x67, ...enc.encode('celsius'), 0xfa);
    f32.setFloat32(0, Math.fround(21.0 + Math.fround((n % 10) / 10)));
    out.push(...new Uint8Array(f32.buffer));
    out.push(0x64, ...enc.encode('room'), 0x67, ...enc.encode('kitchen'));
  }
  const data = new Uint8Array(out.slice(0, size));
  const tree = W.TreeKey.generate('bench');
  const keys = new W.Keyring();
  keys.addTreeKey(tree);
  const me = W.Identity.generate();
  const topic = 'sensor/kitchen/temp';
  const rate = (fn) => {
    // Warm up, then run batches for about a second.
    for (let i = 0; i < 200; i++) fn(i);
    let n = 0;
    const t0 = performance.now();
    while (performance.now() - t0 < 1000) {
      for (let i = 0; i < 100; i++) fn(n++);
    }
    return n / ((performance.now() - t0) / 1000);
  };
  const rows = [];
  for (const [mode, level, sign] of [
    ['plain', 0, false],
    ['signed', 0, true],
    ['zstd3+signed', 3, true],
  ]) {
    const core = new W.ClientCore(keys, level, true, sign);
    core.setIdentity(me);
    const envs = [];
    const seal = rate(() => {
      const e = core.sealEnvelope(topic, 'application/octet-stream', data);
      if (envs.length < 10_000) envs.push(e);
    });
    const open = rate((i) => core.openEnvelope(envs[i % envs.length]));
    rows.push({ mode, seal_per_s: Math.round(seal), open_per_s: Math.round(open) });
  }
  return rows;
}

globalThis.W = W;
const node = measureAll({ size });

let chromium = [];
if (!args.includes('--no-browser')) {
  try {
    const { startChromium } = await import('../test/shared/chromium.js');
    const browser = await startChromium();
    try {
      const page = await browser.testPage();
      chromium = await page.evaluate(measureAll, { size });
    } finally {
      await browser.close();
    }
  } catch (e) {
    console.error(`Chromium run failed: ${e.message}`);
  }
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
console.log(`Node ${process.version}, ${size}-byte payload, Padmé padding; messages per second\n`);
console.log('| mode | op | native | Node (wasm) | Node/native | Chromium (wasm) | Chromium/native |');
console.log('| --- | --- | ---: | ---: | ---: | ---: | ---: |');
const pct = (a, b) => (a && b ? `${Math.round((100 * a) / b)}%` : '–');
for (const r of node) {
  const n = native.find((x) => x.mode === r.mode);
  const c = chromium.find((x) => x.mode === r.mode);
  for (const op of ['seal', 'open']) {
    const k = `${op}_per_s`;
    console.log(
      `| ${r.mode} | ${op} | ${n?.[k] ?? '–'} | ${r[k]} | ${pct(r[k], n?.[k])} | ` +
        `${c?.[k] ?? '–'} | ${pct(c?.[k], n?.[k])} |`,
    );
  }
}
