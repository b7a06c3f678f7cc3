// Seal/open rates of two builds of the package in one Node process, alternating 50 ms
// slices per operation, so both see the same machine load (the figures of
// bench/seal_open.mjs swing from run to run on a busy machine; the ratio here does not).
//   node bench/compare_builds.mjs OTHER_PACKAGE_DIR [rounds]
// OTHER_PACKAGE_DIR: a copy of client-wasm/ (js/ and pkg/) built from another commit.
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
const other = process.argv[2];
if (!other) throw new Error('usage: node bench/compare_builds.mjs OTHER_PACKAGE_DIR [rounds]');
const B = await import(pathToFileURL(resolve(other, 'js/index.node.js')).href);
const N = await import('../js/index.node.js');
const size = 1024; const enc = new TextEncoder(); const out = []; const f32 = new DataView(new ArrayBuffer(4));
for (let n = 0; out.length < size; n++) {
  out.push(0xa3, 0x62, 0x69, 0x64, 0x1a, (n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255);
  out.push(0x67, ...enc.encode('celsius'), 0xfa);
  f32.setFloat32(0, Math.fround(21.0 + Math.fround((n % 10) / 10)));
  out.push(...new Uint8Array(f32.buffer));
  out.push(0x64, ...enc.encode('room'), 0x67, ...enc.encode('kitchen'));
}
const data = new Uint8Array(out.slice(0, size));
const topic = 'sensor/kitchen/temp';
// 'batch' signs runs of 64 through `sealEnvelopes` (one call seals 64: `per` messages per call).
const run64 = Array.from({ length: 64 }, () => data);
const setup = (W, level, sign) => {
  const tree = W.TreeKey.generate('bench'); const keys = new W.Keyring(); keys.addTreeKey(tree);
  const core = new W.ClientCore(keys, level, true, sign !== false); core.setIdentity(W.Identity.generate());
  if (sign === 'batch') {
    core.setSigning('batch');
    const envs = []; for (let i = 0; i < 8; i++) envs.push(...core.sealEnvelopes(topic, 'application/octet-stream', run64));
    return { per: { seal: 64, open: 1 }, seal: () => core.sealEnvelopes(topic, 'application/octet-stream', run64), open: (i) => core.openEnvelope(envs[i % envs.length]) };
  }
  const envs = []; for (let i = 0; i < 500; i++) envs.push(core.sealEnvelope(topic, 'application/octet-stream', data));
  return { per: { seal: 1, open: 1 }, seal: () => core.sealEnvelope(topic, 'application/octet-stream', data), open: (i) => core.openEnvelope(envs[i % 500]) };
};
const rounds = Number(process.argv[3] || 10);
for (const [mode, level, sign] of [['plain', 0, false], ['signed', 0, true], ['batch-signed', 0, 'batch'], ['zstd3+signed', 3, true]]) {
  const b = setup(B, level, sign), n = setup(N, level, sign);
  for (const op of ['seal', 'open']) {
    const tot = { b: [0, 0], n: [0, 0] };
    for (let r = 0; r < rounds + 2; r++) for (const [k, f] of [['b', b[op]], ['n', n[op]]]) {
      let c = 0; const t0 = performance.now();
      while (performance.now() - t0 < 50) for (let i = 0; i < 10; i++) f(c++);
      if (r >= 2) { tot[k][0] += c * (k === 'b' ? b : n).per[op]; tot[k][1] += performance.now() - t0; }
    }
    const rb = tot.b[0] / tot.b[1] * 1000, rn = tot.n[0] / tot.n[1] * 1000;
    console.log(`${mode} ${op}: other ${Math.round(rb)}/s, this ${Math.round(rn)}/s, ${(rn / rb).toFixed(2)}x`);
  }
}
