// Review finding (retained value unread at a crash): a QoS 1 subscriber with persistence got
// m0 then m (both set with `retain`, live) and took m0 only; killed (SIGKILL) with m still
// queued, its saved state held the topic's high-water mark as m's — the mark in memory,
// which the held m had moved — without m's dedup entry, and restarted on the same file it
// refused the relay's retained m as a rollback: the topic's current value was never shown.
// Now the saved mark is m0's (what was taken) and m comes as the retained value. Real relay,
// real state file, a child process killed with SIGKILL.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { startRelay } from '../shared/relay.js';
import { Client, Identity, TreeKey } from '../../js/index.node.js';

const INDEX = new URL('../../js/index.node.js', import.meta.url).href;

// The child: subscribes (QoS 1, retained) to `topic`, says `subscribed`; once two messages
// are delivered (held in its queue) takes the first, waits until the state file has it and
// says `took <value>`; then waits to be killed.
const CHILD = `
import { Client, TreeKey } from ${JSON.stringify(INDEX)};
const [url, key, file, topic] = process.argv.slice(1);
const c = await Client.connect(url, { keys: TreeKey.fromKeyString(key), persistence: file });
const sub = await c.subscribe(topic, { qos: 1, retained: true });
console.log('subscribed');
while (c.stats().delivered < 2) await new Promise((r) => setTimeout(r, 5));
const m0 = await sub.next();
await c.persisted();
console.log('took ' + m0.value.value.v + (m0.value.retained ? ' retained' : ''));
setInterval(() => {}, 1 << 30);
`;

let relay;
let dir;
const killed = new Set();
before(async () => {
  relay = await startRelay();
  dir = mkdtempSync(join(tmpdir(), 'whispeer-retained-held-'));
});
after(async () => {
  for (const p of killed) p.kill('SIGKILL');
  await relay?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test('a retained value held unread when the process is killed is shown after the restart, not refused as a rollback', async () => {
  const topic = 'cfg/mode';
  const key = TreeKey.generate('home').toKeyString();
  const file = join(dir, 'state');
  const child = spawn(process.execPath, ['--input-type=module', '-e', CHILD, relay.url, key, file, topic], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  killed.add(child);
  const exited = new Promise((r) => child.once('exit', r));
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const line = async () => {
    const { value, done } = await lines.next();
    assert.ok(!done, 'the child ended early');
    return value;
  };
  assert.equal(await line(), 'subscribed');

  const pub = await Client.connect(relay.url, { keys: TreeKey.fromKeyString(key), identity: Identity.generate() });
  await pub.publish(topic, { v: 1 }, { qos: 1, retain: true });
  await pub.publish(topic, { v: 2 }, { qos: 1, retain: true });
  assert.equal(await line(), 'took 1', 'm0, live');
  child.kill('SIGKILL'); // m was never taken
  await exited;
  killed.delete(child);

  const c = await Client.connect(relay.url, { keys: TreeKey.fromKeyString(key), persistence: file });
  try {
    const sub = await c.subscribe(topic, { qos: 1, retained: true });
    await pub.publish(topic, { v: 3 }, { qos: 1 });
    const first = await sub.next();
    assert.deepEqual(
      [first.value.value.v, first.value.retained],
      [2, true],
      "the topic's current value, unread when the process died, comes first",
    );
    const next = await sub.next();
    assert.equal(next.value.value.v, 3);
    assert.equal(c.stats().refused.retainedRollback, 0);
  } finally {
    await c.close();
    await pub.close();
  }
});
