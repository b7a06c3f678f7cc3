// Issue 9 (trust on the client) in headless Chromium against the real relay binary: what
// a message says about the key that opened it, two trees on one topic, at-most-once loss
// that is never silent (client buffer and relay Gap), and publish waiting on the socket.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRelay } from '../shared/relay.js';
import { startChromium } from '../shared/chromium.js';
import { startProxy, forceRelayGap } from '../shared/proxy.js';
import { Client, Identity, TreeKey, sealInvite } from '../../js/index.node.js';

let relay, browser;
const nodeClients = [];
before(async () => {
  relay = await startRelay();
  browser = await startChromium();
});
after(async () => {
  await Promise.all(nodeClients.map((c) => c.close()));
  await browser?.close();
  await relay?.stop();
});

async function nodeClient(url, opts) {
  const c = await Client.connect(url, { identity: Identity.generate(), ...opts });
  nodeClients.push(c);
  return c;
}

/**
 * In the page: connects a client `name` (keys as key strings) and, with `filter`, subscribes
 * with a callback that records each message's topic, value, treeId, epoch and provenance
 * in `window.inbox[name]`.
 */
function pageClient(page, name, { url = relay.url, keys, filter, options = {} }) {
  return page.evaluate(
    async ({ name, url, keys, filter, options }) => {
      window.clients ??= {};
      window.inbox ??= {};
      const c = await W.Client.connect(url, { keys, identity: W.Identity.generate(), ...options });
      window.clients[name] = c;
      window.inbox[name] = [];
      if (filter)
        await c.subscribe(filter, (m) => {
          const { topic, value, treeId, epoch, provenance } = m;
          window.inbox[name].push({ topic, value, treeId, epoch, provenance });
        });
      return c.senderId;
    },
    { name, url, keys, filter, options },
  );
}

/** Closes the page's clients, then the page. */
async function closePage(page) {
  await page.evaluate(() => Promise.all(Object.values(window.clients ?? {}).map((c) => c.close())));
  await page.close();
}

/** Resolves with the page's `inbox[name]` once it holds `n` messages. */
async function inbox(page, name, n) {
  await page.waitForFunction(({ name, n }) => window.inbox[name].length >= n, { name, n });
  return page.evaluate((name) => window.inbox[name], name);
}

test('Chromium: messages carry treeId, epoch and provenance (an invite, a subtree grant, a delegated grant)', async () => {
  const page = await browser.testPage();
  const admin = Identity.generate();
  const tree = TreeKey.generate('org').rotate(); // epoch 1: the epoch is reported, not assumed
  const bob = Identity.generate();
  try {
    // An admin-signed grant reaches the browser in an invite sealed to its identity.
    const publicId = await page.evaluate(() => {
      window.me = W.Identity.generate();
      return window.me.publicId;
    });
    const invite = sealInvite(tree.grant('org/#'), admin, publicId);
    const opened = await page.evaluate(
      async ({ url, invite }) => {
        const o = W.openInvite(invite, window.me);
        const c = await W.Client.connect(url, { keys: o.grant, identity: window.me });
        window.clients = { invited: c };
        window.inbox = { invited: [] };
        await c.subscribe('org/#', (m) => {
          const { topic, value, treeId, epoch, provenance } = m;
          window.inbox.invited.push({ topic, value, treeId, epoch, provenance });
        });
        return { inviter: o.inviter, scope: o.grant.scope, epoch: o.grant.epoch };
      },
      { url: relay.url, invite },
    );
    assert.deepEqual(opened, { inviter: admin.senderId, scope: 'org/#', epoch: tree.epoch });
    // A subtree grant as `whispeer key derive` writes it (admin-signed), and a grant
    // narrowed by bob (delegated: nothing the browser holds can confirm it).
    await pageClient(page, 'subtree', { keys: tree.grant('org/team/#').toKeyString(), filter: 'org/team/#' });
    await pageClient(page, 'delegated', {
      keys: tree.grant('org/#').narrow('org/news', bob).toKeyString(),
      filter: 'org/news',
    });

    const pub = await nodeClient(relay.url, { keys: tree });
    await pub.publish('org/team/plan', 'plan', { ack: true });
    await pub.publish('org/news', 'news', { ack: true });

    const invited = await inbox(page, 'invited', 2);
    const admitted = { kind: 'admin-signed' };
    assert.deepEqual(invited, [
      { topic: 'org/team/plan', value: 'plan', treeId: tree.treeId, epoch: tree.epoch, provenance: admitted },
      { topic: 'org/news', value: 'news', treeId: tree.treeId, epoch: tree.epoch, provenance: admitted },
    ]);
    assert.deepEqual(await inbox(page, 'subtree', 1), [
      { topic: 'org/team/plan', value: 'plan', treeId: tree.treeId, epoch: tree.epoch, provenance: admitted },
    ]);
    assert.deepEqual(await inbox(page, 'delegated', 1), [
      {
        topic: 'org/news',
        value: 'news',
        treeId: tree.treeId,
        epoch: tree.epoch,
        provenance: { kind: 'delegated', by: bob.senderId },
      },
    ]);
    assert.ok(tree.epoch >= 1);
  } finally {
    await closePage(page);
  }
});

test('Chromium: two trees on one topic — a plain publish or subscribe names both, `tree` picks one', async () => {
  const page = await browser.testPage();
  const alpha = TreeKey.generate('alpha');
  const beta = TreeKey.generate('beta');
  const keys = [alpha.toKeyString(), beta.toKeyString()];
  try {
    await pageClient(page, 'sub', { keys });
    // A subscription is bound to one tree, as a publish is (PROTOCOL §4.11): without
    // `tree` the filter is ambiguous; one subscription per tree receives both.
    const ambiguous = await page.evaluate(() =>
      window.clients.sub.subscribe('shared/#', () => {}).then(
        () => null,
        (e) => ({ code: e.code, message: e.message }),
      ),
    );
    assert.equal(ambiguous?.code, 'KEY', JSON.stringify(ambiguous));
    assert.ok(ambiguous.message.includes(alpha.treeId) && ambiguous.message.includes(beta.treeId), ambiguous.message);
    await page.evaluate(
      async ({ a, b }) => {
        for (const tree of [a, b]) {
          await window.clients.sub.subscribe(
            'shared/#',
            (m) => {
              const { topic, value, treeId, epoch, provenance } = m;
              window.inbox.sub.push({ topic, value, treeId, epoch, provenance });
            },
            { tree },
          );
        }
      },
      { a: alpha.treeId, b: beta.treeId },
    );
    await pageClient(page, 'pub', { keys });
    const plain = await page.evaluate(() =>
      window.clients.pub.publish('shared/x', 1, { ack: true }).then(
        () => null,
        (e) => ({ name: e.name, code: e.code, message: e.message }),
      ),
    );
    assert.equal(plain?.name, 'WhispeerError', JSON.stringify(plain));
    assert.equal(plain.code, 'KEY');
    assert.ok(plain.message.includes(alpha.treeId) && plain.message.includes(beta.treeId), plain.message);

    await page.evaluate(
      async ({ a, b }) => {
        await window.clients.pub.publish('shared/x', 2, { ack: true, tree: b });
        await window.clients.pub.publish('shared/x', 3, { ack: true, tree: a });
      },
      { a: alpha.treeId, b: beta.treeId },
    );
    // One per subscription: their order across the two subscriptions is not one the
    // relay keeps (each subscription's own order is) — while a subscription's retained
    // hand-over runs its live messages wait, so 3 may come before 2.
    const got = (await inbox(page, 'sub', 2)).sort((x, y) => x.value - y.value);
    assert.deepEqual(
      got.map((m) => [m.value, m.treeId]),
      [
        [2, beta.treeId],
        [3, alpha.treeId],
      ],
    );
    // The refused publish sent nothing.
    await page.evaluate(() => window.clients.sub.flush());
    assert.equal(await page.evaluate(() => window.inbox.sub.length), 2);
    const bad = await page.evaluate(() =>
      window.clients.pub.publish('shared/x', 4, { tree: 'zz' }).then(
        () => null,
        (e) => e.code,
      ),
    );
    assert.equal(bad, 'INVALID_TREE');
  } finally {
    await closePage(page);
  }
});

test('Chromium: a subscriber that falls behind gets onLag, the lag event and sub.lost', async () => {
  const page = await browser.testPage();
  const tree = TreeKey.generate('lag');
  try {
    // An async iterator nobody reads, with room for 4 messages.
    await pageClient(page, 'slow', { keys: tree.toKeyString(), options: { subscriptionCapacity: 4 } });
    await page.evaluate(async () => {
      const c = window.clients.slow;
      window.lag = { onLag: [], event: [] };
      c.on('lag', (e) => window.lag.event.push([e.subscription === window.it, e.lost]));
      window.it = await c.subscribe('q', { onLag: (n) => window.lag.onLag.push(n) });
    });
    const pub = await nodeClient(relay.url, { keys: tree });
    for (let i = 0; i < 40; i++) await pub.publish('q', i);
    await pub.flush();
    await page.waitForFunction(() => window.it.dropped === 36); // 40 sent, room for 4
    const lag = await page.evaluate(() => ({
      ...window.lag,
      lost: window.it.lost,
      dropped: window.it.dropped,
      relayGaps: window.clients.slow.stats().relayGaps,
    }));
    const sum = (xs) => xs.reduce((a, b) => a + b, 0);
    assert.equal(sum(lag.onLag), 36);
    assert.equal(sum(lag.event.map(([, n]) => n)), 36);
    assert.ok(lag.event.every(([same]) => same), 'the event names the subscription');
    assert.equal(lag.dropped, 36);
    assert.equal(lag.relayGaps, 0, 'dropped by the client, not the relay');
    const kept = await page.evaluate(async () => {
      const out = [];
      for (let i = 0; i < 4; i++) out.push((await window.it.next()).value.value);
      return out;
    });
    assert.deepEqual(kept, [0, 1, 2, 3]);
    await pub.publish('q', 40);
    assert.equal(await page.evaluate(async () => (await window.it.next()).value.value), 40, 'it goes on');
  } finally {
    await closePage(page);
  }
});

test('Chromium: a relay Gap (slow-consumer drop) is the lag event and relayGaps', { timeout: 120_000 }, async () => {
  const local = await startRelay({ args: ['--queue-capacity', '4', '--slow-consumer', 'drop'] });
  const proxy = await startProxy(local.port);
  const page = await browser.testPage();
  try {
    const tree = TreeKey.generate('gap');
    await pageClient(page, 'slow', { url: proxy.url, keys: tree.toKeyString() });
    await page.evaluate(async () => {
      const c = window.clients.slow;
      window.lag = { onLag: [], event: [] };
      window.seen = [];
      c.on('lag', (e) => window.lag.event.push(e.lost));
      window.sub = await c.subscribe('gap/x', (m) => window.seen.push(m.value.i), {
        onLag: (n) => window.lag.onLag.push(n),
      });
      await c.flush();
    });
    const pub = await nodeClient(local.url, { keys: tree, compression: 'none', padding: false });
    const { published, dropped } = await forceRelayGap({
      relay: local,
      proxy,
      pub,
      topic: 'gap/x',
      lastArrived: (i) => page.waitForFunction((i) => window.seen.at(-1) === i, i),
    });
    assert.ok(dropped > 0 && dropped < published, `${dropped} of ${published}`);
    const r = await page.evaluate(() => ({
      seen: window.seen,
      lost: window.sub.lost,
      dropped: window.sub.dropped,
      relayGaps: window.clients.slow.stats().relayGaps,
      ...window.lag,
    }));
    const sum = (xs) => xs.reduce((a, b) => a + b, 0);
    assert.equal(r.seen.length + r.lost, published, 'every message delivered or counted as lost');
    assert.equal(r.lost, dropped);
    assert.equal(r.dropped, 0);
    assert.equal(r.relayGaps, dropped);
    assert.equal(sum(r.onLag), dropped);
    assert.equal(sum(r.event), dropped);
    for (let k = 1; k < r.seen.length; k++) assert.ok(r.seen[k] > r.seen[k - 1], 'in order');
    await pub.close();
  } finally {
    await closePage(page);
    await proxy.close();
    await local.stop();
  }
});

test('Chromium: publish waits while the WebSocket send buffer is over the high-water mark', { timeout: 120_000 }, async () => {
  const proxy = await startProxy(relay.port);
  const page = await browser.testPage();
  const tree = TreeKey.generate('hwm');
  const hwm = 64 * 1024;
  const N = 300;
  try {
    const sub = await nodeClient(relay.url, { keys: tree });
    const got = [];
    let allArrived;
    const arrived = new Promise((r) => (allArrived = r));
    await sub.subscribe('big', (m) => {
      got.push(m.value[0] | (m.value[1] << 8));
      if (got.length === N) allArrived();
    });
    await pageClient(page, 'pub', {
      url: proxy.url,
      keys: tree.toKeyString(),
      options: { sendHighWaterMark: hwm, compression: 'none', padding: false },
    });
    await page.evaluate(() => window.clients.pub.flush());
    proxy.pause('up');
    // Every publish at once; each records when it settled and the buffer at that moment.
    await page.evaluate((N) => {
      const c = window.clients.pub;
      window.hw = { done: 0, maxBuffered: 0, failed: [] };
      window.all = Promise.all(
        Array.from({ length: N }, (_, i) => {
          const b = new Uint8Array(64 * 1024);
          b[0] = i & 255;
          b[1] = i >> 8;
          return c.publish('big', b).then(
            () => {
              window.hw.done++;
              window.hw.maxBuffered = Math.max(window.hw.maxBuffered, c.bufferedAmount);
            },
            (e) => window.hw.failed.push(e.message),
          );
        }),
      );
    }, N);
    // The socket backs up past the mark; publishes then wait.
    await page.waitForFunction((hwm) => window.clients.pub.bufferedAmount > hwm, hwm);
    const paused = await page.evaluate(
      () => new Promise((r) => setTimeout(() => r({ ...window.hw }), 0)), // settled ones settled
    );
    assert.ok(paused.done < N, `publishes waited (${paused.done} of ${N} handed over)`);
    assert.ok(paused.maxBuffered <= hwm + 2 * 66 * 1024, `buffer stayed near the mark: ${paused.maxBuffered}`);

    proxy.resume('up');
    await page.evaluate(() => window.all);
    assert.deepEqual(await page.evaluate(() => window.hw.failed), []);
    await page.evaluate(() => window.clients.pub.flush());
    await arrived;
    assert.deepEqual(got, Array.from({ length: N }, (_, i) => i), 'every publish, in order');
  } finally {
    await closePage(page);
    await proxy.close();
  }
});
