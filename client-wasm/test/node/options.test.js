// Client options against the real relay binary: per-topic rules inherit the client's
// settings, publisher policies (requireSigned / allowSenders), the heartbeat's bounds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocket } from 'ws';
import { relayPerFile } from '../shared/fixture.js';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Client, ClientCore, Identity, Keyring, TreeKey } from '../../js/index.node.js';
import { setWebSocket } from '../../js/client.js';

const fx = relayPerFile();
const connect = (opts) => fx.connect(opts);

/** The `ws` WebSocket, recording the size of every frame a client sends in `sent`. */
function recording() {
  const sent = [];
  class Recording extends WebSocket {
    send(data, ...rest) {
      sent.push(data.byteLength ?? data.length);
      return super.send(data, ...rest);
    }
  }
  return { Recording, sent };
}

test("a topic rule that does not name compression keeps the client's compression: 'none'", async () => {
  const tree = TreeKey.generate('nc');
  const zeros = new Uint8Array(1000);
  const { Recording, sent } = recording();
  setWebSocket(Recording, true);
  let c;
  try {
    // Rules naming compression, padding or suite alone inherit every other setting; a rule
    // that names it still sets it.
    c = await connect({
      keys: tree,
      compression: 'none',
      topics: { 'a/#': { suite: 'aes-gcm' }, 'b/#': { padding: false }, 'z/#': { compression: 'zstd' } },
    });
  } finally {
    setWebSocket(WebSocket, true);
  }
  const size = async (topic) => {
    const before = sent.length;
    await c.publishBytes(topic, zeros, { ack: true });
    return Math.max(...sent.slice(before));
  };
  const a = await size('a/b');
  assert.ok(a >= 1000, `compression stayed off under a rule naming only the suite: a ${a}-byte frame`);
  const b = await size('b/c');
  assert.ok(b >= 1000, `compression stayed off under a rule naming only padding: a ${b}-byte frame`);
  const z = await size('z/x');
  assert.ok(z < 500, `the rule naming zstd compresses: a ${z}-byte frame`);
});

test('a ClientCore topic rule naming no suite follows setSuite, called before or after it', () => {
  const tree = TreeKey.generate('su');
  const kr = new Keyring();
  kr.addTreeKey(tree);
  // Envelope header byte 1 is the suite: 1 XChaCha20-Poly1305, 3 AES-256-GCM.
  const suiteOf = (core, topic) => core.sealEnvelope(topic, 'application/octet-stream', new Uint8Array(8))[1];
  for (const order of ['rules first', 'suite first']) {
    const core = new ClientCore(kr, 'none', false, false);
    if (order === 'suite first') core.setSuite('aes-gcm');
    core.setTopicOptions('a/#', 'none', false); // names no suite: the client's, as finally set
    core.setTopicOptions('x/#', 'none', false, 'xchacha'); // names one: kept
    if (order === 'rules first') core.setSuite('aes-gcm');
    assert.equal(suiteOf(core, 'a/b'), 3, `${order}: a/b (rule naming no suite) seals with aes-gcm`);
    assert.equal(suiteOf(core, 'x/y'), 1, `${order}: x/y (rule naming xchacha) keeps it`);
    assert.equal(suiteOf(core, 'q'), 3, `${order}: q (no rule) has the client's suite`);
    core.setSuite('xchacha');
    assert.equal(suiteOf(core, 'a/b'), 1, `${order}: a later setSuite reaches the rule again`);
    core.free();
  }
  kr.free();
});

test('a rule naming only a publisher policy adds no sealing rule: a later rule still applies', async () => {
  const tree = TreeKey.generate('sh');
  const { Recording, sent } = recording();
  setWebSocket(Recording, true);
  let c;
  try {
    c = await connect({
      keys: tree,
      topics: { 'a/#': { requireSigned: true }, 'a/b/#': { compression: 'none' } },
    });
  } finally {
    setWebSocket(WebSocket, true);
  }
  const before = sent.length;
  await c.publishBytes('a/b/c', new Uint8Array(1000), { ack: true });
  const n = Math.max(...sent.slice(before));
  assert.ok(n >= 1000, `the second rule turned compression off: a ${n}-byte frame`);
});

/** Resolves once `cond()` holds (polled; fails after 5 s, saying `why()`). */
const until = async (cond, why = () => '') => {
  for (let i = 0; i < 500 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(cond(), why());
};

test('publisher policy: allowSenders delivers only the listed senders, requireSigned refuses unsigned', async () => {
  const tree = TreeKey.generate('pp');
  const alice = Identity.generate();
  const mallory = Identity.generate();
  const sub = await connect({
    keys: tree,
    topics: {
      'news/#': { allowSenders: [Identity.generate().senderId, alice] }, // sender ids or Identities
      'chat/#': { requireSigned: true },
    },
  });
  const got = [];
  await sub.subscribe('#', (m) => got.push([m.topic, m.value, m.sender]));
  const a = await connect({ keys: tree, identity: alice });
  const m = await connect({ keys: tree, identity: mallory });
  const anon = await connect({ keys: tree, sign: false });
  // Each publisher acked before the next publishes: the relay delivers in that order.
  await m.publish('news/x', 'from mallory', { ack: true });
  await anon.publish('news/x', 'unsigned', { ack: true });
  await anon.publish('chat/x', 'unsigned', { ack: true });
  await m.publish('chat/x', 'signed by mallory', { ack: true });
  await anon.publish('other/x', 'no rule here', { ack: true });
  await a.publish('news/x', 'from alice', { ack: true });
  await until(() => got.length >= 3);
  assert.deepEqual(got, [
    ['chat/x', 'signed by mallory', mallory.senderId],
    ['other/x', 'no rule here', null],
    ['news/x', 'from alice', alice.senderId],
  ]);
  const { refused } = sub.stats();
  assert.equal(refused.unlistedSender, 1, 'mallory on news/');
  assert.equal(refused.unsigned, 2, 'unsigned on news/ (a list implies signed) and chat/');
});

test('publisher policy options are checked', () => {
  const tree = TreeKey.generate('pc');
  for (const [rule, re] of [
    [{ requireSigned: 'yes' }, /requireSigned: expected true or false/],
    [{ allowSenders: 'wspk1' }, /allowSenders: expected an array of sender ids/],
    [{ allowSenders: ['wspk1notanid'] }, /allowSenders: not a sender id/],
    [{ allowSenders: [7] }, /allowSenders: expected an array of sender ids/],
    [{ requiresigned: true }, /unknown option "requiresigned"/],
  ])
    assert.throws(
      () => new Client('ws://127.0.0.1:1', { keys: tree, topics: { 'news/#': rule } }),
      (e) => e.code === 'INVALID_OPTION' && re.test(e.message),
      JSON.stringify(rule),
    );
});

test('heartbeatMs is refused outside 1,000 to 300,000 ms', async () => {
  const tree = TreeKey.generate('hb');
  for (const bad of [0, 999, 300_001, Infinity, 1500.5, -1, '30000'])
    await assert.rejects(
      Client.connect('ws://127.0.0.1:1', { keys: tree, heartbeatMs: bad }),
      (e) => e.code === 'INVALID_OPTION' && /heartbeatMs: expected a whole number of milliseconds from 1000 to 300000/.test(e.message),
      String(bad),
    );
  for (const ok of [1000, 300_000]) (await connect({ keys: tree, heartbeatMs: ok })).close();
});

test('stats().refused.marksEvicted counts retained high-water marks evicted at dedupCapacity', async () => {
  const tree = TreeKey.generate('me');
  const sub = await connect({ keys: tree, dedupCapacity: 2 });
  assert.equal(sub.stats().refused.marksEvicted, 0);
  const got = [];
  await sub.subscribe('r/#', (m) => got.push(m.topic));
  const pub = await connect({ keys: tree });
  for (let i = 0; i < 8; i++) await pub.publish(`r/${i}`, i, { retain: true, ack: true });
  // A window of 2 may refuse a message dated before the oldest it still holds (counted).
  const seen = () => sub.stats().delivered + sub.stats().refused.beforeWindow;
  await until(() => seen() >= 8, () => JSON.stringify([got, sub.stats()]));
  // One mark per topic a message was accepted on, at most 2 kept: the rest went.
  const { delivered, refused } = sub.stats();
  assert.ok(delivered >= 3, JSON.stringify(sub.stats()));
  assert.equal(refused.marksEvicted, delivered - 2, JSON.stringify(refused));
});

test('the client keeps none of the secrets given to connect in JS, and frees the Keyring it makes', async () => {
  // `npm test` starts node with --expose-gc; setting it at run time (a run without it)
  // can crash V8 later in the process.
  let gc = globalThis.gc;
  if (!gc) {
    v8.setFlagsFromString('--expose-gc');
    gc = runInNewContext('gc');
  }
  const tree = TreeKey.generate('sk');
  const free = Keyring.prototype.free;
  let freed = 0;
  Keyring.prototype.free = function () {
    freed++;
    return free.call(this);
  };
  let c;
  const collected = new Set();
  const registry = new FinalizationRegistry((name) => collected.add(name));
  try {
    // The keys as a key string in an array: a Keyring the client makes and must free.
    await (async () => {
      const keys = [tree.toKeyString()];
      const identity = Identity.generate();
      registry.register(keys, 'keys');
      registry.register(identity, 'identity');
      c = await connect({ keys, identity });
    })();
  } finally {
    Keyring.prototype.free = free;
  }
  assert.equal(freed, 1, 'the temporary Keyring was freed');
  for (let i = 0; i < 20 && collected.size < 2; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.ok(collected.has('keys'), 'the keys option was not kept by the client');
  assert.ok(collected.has('identity'), 'the identity object was not kept by the client');
  assert.equal(c.state, 'connected');
  assert.match(c.senderId, /^wspk1/);
  // The client still works without them: the core holds its own copies.
  const got = [];
  await c.subscribe('k/#', (m) => got.push(m.value));
  await c.publish('k/x', 1, { ack: true });
  await until(() => got.length === 1);
});
