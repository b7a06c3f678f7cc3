// What a passphrase tree costs where it is derived: Argon2id (TreeKey.fromPassphrase) in
// Node.js and in headless Chromium, both running the same WebAssembly, for the two
// (memory, iterations) sets PROTOCOL §5.9 allows (version 1's and the default; the other
// rows of its table were measured before the settings were fixed — the library now refuses
// any other set). The default is as much memory-hard work as a browser tab tolerates on a
// 2-core machine.
//   node bench/argon2.mjs [--no-browser] [--runs 3]
// Needs the built package (npm run build) and, for the browser column, /usr/bin/chromium.
import { TreeKey } from '../js/index.node.js';

const args = process.argv.slice(2);
const runs = Number(args[args.indexOf('--runs') + 1] || 3) || 3;
const browser = !args.includes('--no-browser');

// [memory KiB, iterations]
const choices = [
  [64 * 1024, 3],
  [256 * 1024, 2],
];

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

function measure(Tree, memoryKiB, iterations) {
  const ms = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    Tree.fromPassphrase('bench', 'correct horse battery staple ' + i, { memoryKiB, iterations, lanes: 1 });
    ms.push(performance.now() - t0);
  }
  return median(ms);
}

const rows = choices.map(([m, t]) => ({ m, t, node: measure(TreeKey, m, t), chromium: null }));

if (browser) {
  const { startChromium } = await import('../test/shared/chromium.js');
  const browser = await startChromium();
  try {
    const page = await browser.testPage();
    for (const r of rows) {
      r.chromium = await page.evaluate(({ m, t, runs }) => {
        const ms = [];
        for (let i = 0; i < runs; i++) {
          const t0 = performance.now();
          window.W.TreeKey.fromPassphrase('bench', 'correct horse battery staple ' + i, { memoryKiB: m, iterations: t, lanes: 1 });
          ms.push(performance.now() - t0);
        }
        ms.sort((a, b) => a - b);
        return ms[Math.floor(ms.length / 2)];
      }, { m: r.m, t: r.t, runs });
    }
  } finally {
    await browser.close();
  }
}

console.log(`Argon2id (lanes 1), median of ${runs} derivations, WebAssembly build`);
console.log('| memory | iterations | Node.js ms | Chromium ms |');
console.log('| ---: | ---: | ---: | ---: |');
for (const r of rows) {
  const c = r.chromium === null ? '—' : r.chromium.toFixed(0);
  console.log(`| ${r.m / 1024} MiB | ${r.t} | ${r.node.toFixed(0)} | ${c} |`);
}
