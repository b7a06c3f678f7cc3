// Failover in the browser (issue 12): a Chromium tab's client given two relay URLs moves to
// the second when its relay dies (SIGKILL), resubscribes, and gets every message once; the
// QoS 1 publishes the tab had in flight are acknowledged by the second relay. Real relay
// processes on 127.0.0.1, Node publisher, headless Chromium; every wait is on an event.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRelay } from '../shared/relay.js';
import { startChromium } from '../shared/chromium.js';
import { Client, Identity, TreeKey } from '../../js/index.node.js';

let browser;
const relays = [];
const clients = [];

before(async () => {
  browser = await startChromium();
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await browser?.close();
  await Promise.all(relays.map((r) => r.stop()));
});

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

test('Chromium: SIGKILL of the relay, the tab moves to the next one, every message once', async () => {
  const a = await startRelay();
  const b = await startRelay();
  relays.push(a, b);
  const tree = TreeKey.generate('browser-failover');
  const page = await browser.testPage();
  // In the tab: a client on [A, B] that subscribes (QoS 1, all history) and records what
  // arrives and which relay it is on.
  await page.evaluate(
    async ({ urls, key }) => {
      const c = await W.Client.connect(urls, {
        keys: key,
        identity: W.Identity.generate(),
        reconnect: { initialDelayMs: 20, maxDelayMs: 200 },
      });
      window.client = c;
      window.seen = new Map();
      window.relayUrls = [];
      c.on('state', (s, d) => {
        if (s === 'connected') window.relayUrls.push(d?.url);
      });
      await c.subscribe('feed/+', (m) => window.seen.set(m.value, (window.seen.get(m.value) ?? 0) + 1), {
        qos: 1,
        replay: { fromSeq: 1 },
      });
    },
    { urls: [a.url, b.url], key: tree.toKeyString() },
  );
  assert.equal(await page.evaluate(() => window.client.url), a.url);
  const pub = await Client.connect([a.url, b.url], {
    keys: tree,
    identity: Identity.generate(),
    reconnect: { initialDelayMs: 20, maxDelayMs: 200 },
  });
  clients.push(pub);
  const hasAll = (values) =>
    page.waitForFunction((vs) => vs.every((v) => window.seen.has(v)), values, { timeout: 60_000 });

  for (const v of range(1, 10)) await pub.publish('feed/node', v, { qos: 1 });
  await hasAll(range(1, 10));

  // A dies; the tab publishes QoS 1 while it moves (kept until B acknowledges them).
  await a.stop(); // SIGKILL
  const tabSeqs = page.evaluate(() =>
    Promise.all([101, 102, 103].map((v) => window.client.publish('feed/tab', v, { qos: 1 }))),
  );
  await page.waitForFunction((url) => window.client.state === 'connected' && window.client.url === url, b.url, {
    timeout: 60_000,
  });
  const seqs = await tabSeqs;
  assert.ok(seqs.every((s) => typeof s === 'number' && s > 0), `${seqs}`);
  for (const v of range(11, 20)) await pub.publish('feed/node', v, { qos: 1 });
  await hasAll([...range(1, 20), 101, 102, 103]);

  const { twice, urls, unacked } = await page.evaluate(() => ({
    twice: [...window.seen].filter(([, n]) => n > 1),
    urls: window.relayUrls,
    unacked: window.client.stats().unackedPublishes,
  }));
  assert.deepEqual(twice, [], 'delivered more than once');
  assert.equal(urls.at(-1), b.url, `connected to ${urls}`);
  assert.equal(unacked, 0);
  await page.evaluate(() => window.client.close());
  await page.close();
});
