// Seal/open throughput for 1 KiB messages in Node.js and in headless Chromium (the same
// WebAssembly module) beside the native Rust build on the same machine, plus the .wasm size.
//   node bench/seal_open.mjs [--size 1024] [--rounds 5] [--ms 500] [--no-native] [--no-browser]
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
function measureAll({ size, ms }) {
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
    // Warm up, then run batches for `ms` milliseconds.
    for (let i = 0; i < 200; i++) fn(i);
    let n = 0;
    const t0 = performance.now();
    while (performance.now() - t0 < ms) {
      for (let i = 0; i < 100; i++) fn(n++);
    }
    return n / ((performance.now() - t0) / 1000);
  };
  const rows = [];
  // Batch signing (the default): 64 messages per call, one signature each run of 64.
  const BATCH = 64;
  const batchPayloads = Array.from({ length: BATCH }, () => data);
  for (const [mode, level, sign] of [
    ['plain', 0, false],
    ['signed', 0, true],
    ['batch-signed', 0, 'batch'],
    ['zstd3+signed', 3, true],
  ]) {
    const core = new W.ClientCore(keys, level, true, sign !== false);
    core.setIdentity(me);
    const envs = [];
    let seal;
    if (sign === 'batch') {
      core.setSigning('batch');
      seal = BATCH * rate(() => {
        for (const e of core.sealEnvelopes(topic, 'application/octet-stream', batchPayloads)) {
          if (envs.length < 10_048) envs.push(e);
        }
      });
    } else {
      seal = rate(() => {
        const e = core.sealEnvelope(topic, 'application/octet-stream', data);
        if (envs.length < 10_000) envs.push(e);
      });
    }
    const open = rate((i) => core.openEnvelope(envs[i % envs.length]));
    rows.push({ mode, seal_per_s: Math.round(seal), open_per_s: Math.round(open) });
  }
  return rows;
}

globalThis.W = W;
// The machine's speed drifts (a shared 2-core VM: ±30 % within minutes), so runtimes are
// measured in alternating rounds — native, Node, Chromium, then again — and each ratio is
// taken within its round; the table shows medians and each ratio's range.
const roundsAt = args.indexOf('--rounds');
const rounds = Math.max(1, (roundsAt >= 0 && Number(args[roundsAt + 1])) || 5);
// Short slices, many rounds: a round's native and wasm figures are seconds apart, not tens.
const msAt = args.indexOf('--ms');
const ms = Math.max(50, (msAt >= 0 && Number(args[msAt + 1])) || 500);
const runs = { native: [], node: [], chromium: [] };

function nativeRows() {
  const out = execFileSync(
    'cargo',
    ['run', '--quiet', '--release', '-p', 'whispeer-tests', '--example', 'seal_open_native', '--', String(size), String(ms)],
    { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] },
  );
  return out.trim().split('\n').map((l) => JSON.parse(l));
}

let browser = null;
let page = null;
if (!args.includes('--no-browser')) {
  try {
    const { startChromium } = await import('../test/shared/chromium.js');
    browser = await startChromium();
    page = await browser.testPage();
  } catch (e) {
    console.error(`Chromium start failed: ${e.message}`);
  }
}
try {
  for (let r = 0; r < rounds; r++) {
    if (!args.includes('--no-native')) {
      try {
        runs.native.push(nativeRows());
      } catch (e) {
        console.error(`native run failed: ${e.message}`);
      }
    }
    runs.node.push(measureAll({ size, ms }));
    if (page) runs.chromium.push(await page.evaluate(measureAll, { size, ms }));
  }
} finally {
  if (browser) await browser.close();
}

const median = (xs) => {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return undefined;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};
const value = (rt, i, mode, k) => runs[rt][i]?.find((x) => x.mode === mode)?.[k];
/** Median of `rt` and of its per-round ratio to native, with the ratios' range. */
function cell(rt, mode, k) {
  const vals = runs[rt].map((_, i) => value(rt, i, mode, k));
  const ratios = runs[rt].map((_, i) => value(rt, i, mode, k) / value('native', i, mode, k));
  const med = median(vals);
  const rm = median(ratios);
  const fin = ratios.filter((x) => Number.isFinite(x));
  const pct = (x) => `${Math.round(100 * x)}%`;
  const range = fin.length > 1 ? ` (${pct(Math.min(...fin))}–${pct(Math.max(...fin))})` : '';
  return [med === undefined ? '–' : Math.round(med), rm === undefined ? '–' : pct(rm) + range];
}

const wasm = readFileSync(join(root, 'pkg', 'whispeer_wasm_bg.wasm'));
console.log(`whispeer_wasm_bg.wasm: ${wasm.length} bytes raw, ${gzipSync(wasm, { level: 9 }).length} bytes gzip -9`);
console.log(`Node ${process.version}, ${size}-byte payload, Padmé padding; messages per second\n`);
console.log(`${rounds} alternating round(s); medians, and each ratio's median (range) over the rounds\n`);
console.log('| mode | op | native | Node (wasm) | Node/native | Chromium (wasm) | Chromium/native |');
console.log('| --- | --- | ---: | ---: | ---: | ---: | ---: |');
for (const r of runs.node[0]) {
  for (const op of ['seal', 'open']) {
    const k = `${op}_per_s`;
    const n = median(runs.native.map((_, i) => value('native', i, r.mode, k)));
    const [nodeV, nodePct] = cell('node', r.mode, k);
    const [chrV, chrPct] = cell('chromium', r.mode, k);
    console.log(
      `| ${r.mode} | ${op} | ${n === undefined ? '–' : Math.round(n)} | ${nodeV} | ${nodePct} | ${chrV} | ${chrPct} |`,
    );
  }
}
