// The README's quickstart, run as written against the real relay: only the relay URL
// (the relay's default port in the README) and the package name (this checkout) change.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { startRelay } from '../shared/relay.js';

const here = dirname(fileURLToPath(import.meta.url));

test('the README quickstart runs to the end against a relay', { timeout: 30_000 }, async () => {
  const readme = readFileSync(join(here, '../../README.md'), 'utf8');
  const block = readme.match(/```js\n([\s\S]*?)```/);
  assert.ok(block, 'the README has a js quickstart');
  assert.ok(block[1].includes("'ws://127.0.0.1:7480'"), "the quickstart uses the relay's default port");
  const relay = await startRelay();
  const dir = mkdtempSync(join(tmpdir(), 'whispeer-readme-'));
  try {
    const api = pathToFileURL(join(here, '../../js/index.node.js')).href;
    const code = block[1]
      .replace("'ws://127.0.0.1:7480'", `'${relay.url}'`)
      .replace("from 'whispeer'", `from '${api}'`);
    const file = join(dir, 'quickstart.mjs');
    writeFileSync(file, code);
    const lines = [];
    const log = console.log;
    console.log = (...a) => lines.push(a.join(' '));
    try {
      await import(pathToFileURL(file).href);
    } finally {
      console.log = log;
    }
    assert.ok(lines.some((l) => l.startsWith('sensor/kitchen/temp')), `saw the sensor reading: ${lines}`);
    assert.ok(lines.includes('alerts/door front door open'), `saw the alert: ${lines}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
    await relay.stop();
  }
});
