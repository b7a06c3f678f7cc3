// The shared scenario suite (issue 13, "one scenario suite, two drivers") run with the npm
// package: every tests/scenarios/*.json against the real relay binary, clients connected
// directly or through the fault proxy. The Rust runner (client/tests/scenarios.rs) runs the
// same files; the format is specified in tests/scenarios/README.md.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PKG_ROOT } from '../shared/bins.js';
import { runScenario, ScenarioError } from './runner.js';
import { wsFrameLen, isMsgFrame } from './fault-proxy.js';

const DIR = join(PKG_ROOT, '..', 'tests', 'scenarios');
const files = readdirSync(DIR)
  .filter((f) => f.endsWith('.json'))
  .sort();
const good = files.filter((f) => !f.startsWith('fail_'));
const bad = files.filter((f) => f.startsWith('fail_'));

test('the suite holds the six scenarios of issue 13 and runner self-tests', () => {
  for (const f of [
    'reconnect_mid_publish.json',
    'relay_restart.json',
    'duplicate_delivery.json',
    'replay_handover.json',
    'qos2_dedup.json',
    'slow_consumer.json',
  ])
    assert.ok(good.includes(f), f);
  assert.ok(bad.length > 0, 'fail_*.json files exist');
});

for (const f of good) {
  test(`scenario ${f.replace(/\.json$/, '')}`, { timeout: 300_000 }, async () => {
    await runScenario(join(DIR, f));
  });
}

// Each fail_*.json holds a wrong expectation at step `fails_at`: the runner must report a
// failure exactly there — so it can fail at all, and not for another reason.
for (const f of bad) {
  test(`wrong expectation reported: ${f}`, { timeout: 300_000 }, async () => {
    const { fails_at: at } = JSON.parse(readFileSync(join(DIR, f), 'utf8'));
    assert.ok(Number.isInteger(at), `${f} names "fails_at"`);
    await assert.rejects(runScenario(join(DIR, f)), (e) => {
      assert.ok(e instanceof ScenarioError, `a ScenarioError, got ${e}`);
      assert.equal(e.step, at, `failed at step ${e.step}, not ${at}: ${e.message}`);
      return true;
    });
  });
}

test('the proxy parses WebSocket frames and recognises only Msg frames', () => {
  const msg = Buffer.from([0x82, 0x0a, 0xa3, 0x00, 0x07, 0x01, 0x01, 0x02, 0x41, 0x00, 0x03, 0x00]);
  assert.equal(wsFrameLen(msg.subarray(0, 11)), 0, 'one byte short');
  assert.equal(wsFrameLen(msg), 12);
  assert.ok(isMsgFrame(msg));
  const pong = Buffer.from([0x82, 0x06, 0xa2, 0x00, 0x0c, 0x01, 0x18, 0x2a]);
  assert.equal(wsFrameLen(pong), 8);
  assert.ok(!isMsgFrame(pong));
  const long = Buffer.concat([Buffer.from([0x82, 126, 0x01, 0x00]), Buffer.alloc(256)]);
  assert.equal(wsFrameLen(long), 260);
});
