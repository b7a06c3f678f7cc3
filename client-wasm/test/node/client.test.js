// The Node.js client against the real relay binary.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { relayPerFile } from '../shared/fixture.js';
import { startRelay } from '../shared/relay.js';
import { startProxy } from '../shared/proxy.js';
import { sample } from '../shared/sample.js';
import { diff } from '../shared/equal.js';
import {
  Client,
  Identity,
  TreeKey,
  Grant,
  Keyring,
  sealInvite,
  openInvite,
  encodeValue,
  decodeValue,
  float,
  ClientCore,
  WhispeerError,
} from '../../js/index.node.js';
import { PKG_ROOT } from '../shared/bins.js';

const fx = relayPerFile();
const connect = (opts) => fx.connect(opts);

/** Collects messages delivered to a callback; `all` resolves with the first `n`,
 * `count(k)` once `k` have arrived. */
function collector(n) {
  const got = [];
  const waits = [];
  const count = (k) =>
    got.length >= k ? Promise.resolve(got) : new Promise((resolve) => waits.push({ k, resolve }));
  return {
    got,
    count,
    all: count(n),
    cb: (m) => {
      got.push(m);
      for (const w of waits.filter((w) => got.length >= w.k)) {
        waits.splice(waits.indexOf(w), 1);
        w.resolve(got);
      }
    },
  };
}

test('connect, publish and subscribe with + and # wildcards, typed values', async () => {
  const tree = TreeKey.generate('home');
  const a = await connect({ keys: tree });
  const b = await connect({ keys: tree.toKeyString() });
  assert.equal(a.state, 'connected');

  const plus = collector(2);
  const hash = collector(3);
  await b.subscribe('sensor/+/temp', plus.cb);
  await b.subscribe('sensor/#', hash.cb);

  await a.publish('sensor/kitchen/temp', 21.5);
  await a.publish('sensor/kitchen/humidity', { pct: 40, at: 1700000000000 });
  await a.publish('sensor/hall/temp', sample(4));
  await a.publish('other/x', 'not for b');

  const [p1, p2] = await plus.all;
  assert.equal(p1.topic, 'sensor/kitchen/temp');
  assert.equal(p1.value, 21.5);
  assert.equal(p1.sender, a.senderId);
  assert.equal(p2.topic, 'sensor/hall/temp');
  assert.equal(diff(p2.value, sample(4)), null);
  const h = await hash.all;
  assert.deepEqual(
    h.map((m) => m.topic),
    ['sensor/kitchen/temp', 'sensor/kitchen/humidity', 'sensor/hall/temp'],
  );
  assert.deepEqual(h[1].value, { pct: 40, at: 1700000000000 });
  assert.equal(h[1].contentType, 'application/cbor');
  await b.flush();
  assert.equal(hash.got.length, 3, 'other/x did not reach sensor/#');
});

test('async iterator form, unsubscribe, acked and retained publishes, bytes', async () => {
  const tree = TreeKey.generate('iter');
  const a = await connect({ keys: tree });
  const sub = await a.subscribe('chat/#');
  const seq = await a.publish('chat/room', { text: 'hello' }, { ack: true });
  assert.equal(typeof seq, 'number');
  await a.publishBytes('chat/raw', new Uint8Array([1, 2, 3]), { contentType: 'application/x-test' });
  const got = [];
  for await (const m of sub) {
    got.push(m);
    if (got.length === 2) break; // `break` unsubscribes
  }
  assert.deepEqual(got[0].value, { text: 'hello' });
  assert.equal(got[1].contentType, 'application/x-test');
  assert.deepEqual([...got[1].payload], [1, 2, 3]);
  assert.equal(got[1].value, undefined);
  assert.deepEqual(await sub.next(), { value: undefined, done: true });

  // Retained: a later subscriber gets the last value, flagged.
  await a.publish('state/door', 'open', { retain: true, ack: true });
  const b = await connect({ keys: tree });
  const r = collector(1);
  await b.subscribe('state/+', r.cb);
  const [m] = await r.all;
  assert.equal(m.value, 'open');
  assert.equal(m.retained, true);

  // Cleared: b (live) is not handed the clear, a later subscriber gets no retained value.
  const seqClear = await a.clearRetained('state/door');
  assert.equal(typeof seqClear, 'number');
  const after = collector(1);
  await b.subscribe('state/marker', after.cb);
  const c = await connect({ keys: tree });
  const fresh = collector(1);
  await c.subscribe('state/+', fresh.cb);
  await a.publish('state/marker', 'after');
  const [[mk], [f]] = await Promise.all([after.all, fresh.all]);
  assert.equal(mk.value, 'after');
  assert.deepEqual([f.topic, f.value, f.retained], ['state/marker', 'after', false]);
  assert.equal(c.stats().delivered, 1, 'the clear was not delivered to the later subscriber');
  // b got the retained value and the marker, not the clear. (Not `stats().delivered`: it
  // counts deliveries, and the marker is one delivery to both of b's subscriptions, or two
  // when it reaches b while `state/marker` still waits for its retained values — the relay
  // then sends that subscription its own copy after ReplayDone, PROTOCOL §3.5.5.)
  assert.deepEqual(r.got.map((m) => m.value), ['open', 'after'], 'b: the value and the marker, not the clear');
  assert.deepEqual(after.got.map((m) => m.value), ['after']);
  await assert.rejects(a.clearRetained('state/door', { retain: false }), (e) => e.code === 'INVALID_OPTION');
});

test('maxPayload refuses a received message over it from its declared size', async () => {
  const tree = TreeKey.generate('payload');
  const pub = await connect({ keys: tree });
  const small = await connect({ keys: tree, maxPayload: 1024 });
  await assert.rejects(connect({ keys: tree, maxPayload: -1 }), { code: 'INVALID_OPTION' });
  const got = collector(1);
  await small.subscribe('p/#', got.cb);
  // 64 KiB of zeros compresses to a few bytes: refused by its declared size, not its
  // wire size; the small one after it is delivered.
  await pub.publish('p/big', new Uint8Array(64 * 1024));
  await pub.publish('p/small', new Uint8Array([1, 2, 3]));
  const [m] = await got.all;
  assert.equal(m.topic, 'p/small');
  assert.equal(small.stats().rejected, 1);
  assert.equal(small.stats().delivered, 1);
});

test('wrong or missing keys are rejected', async () => {
  const tree = TreeKey.generate('keys');
  const onlyA = tree.grant('a/#');
  const full = await connect({ keys: tree });
  const partial = await connect({ keys: onlyA });

  // No key for the filter / topic: typed errors, nothing sent.
  await assert.rejects(partial.subscribe('b/#', () => {}), { name: 'WhispeerError', code: 'NO_KEY' });
  await assert.rejects(partial.publish('b/x', 1), { code: 'NO_KEY' });
  await assert.rejects(partial.publish('a/+', 1), { code: 'INVALID_TOPIC' });
  const nokeys = await connect({});
  await assert.rejects(nokeys.publish('a/x', 1), { code: 'NO_KEY' });

  // A '#' subscriber with only a/# gets b/x routed (same tree) but cannot open it.
  const got = collector(1);
  await partial.subscribe('#', got.cb);
  await full.publish('b/secret', 'hidden');
  await full.publish('a/open', 'visible');
  const [m] = await got.all;
  assert.equal(m.topic, 'a/open');
  assert.equal(m.value, 'visible');
  assert.equal(partial.stats().rejected, 1);
  assert.equal(partial.stats().delivered, 1);

  // A different passphrase derives a different key: its messages never open here.
  const right = TreeKey.fromPassphrase('room', 'right horse battery', { memoryKiB: 65536, iterations: 3 });
  const wrong = TreeKey.fromPassphrase('room', 'wrong horse battery', { memoryKiB: 65536, iterations: 3 });
  assert.equal(right.treeId, wrong.treeId);
  // Only the spec's Argon2id settings (PROTOCOL §5.9): cheaper ones make guessing cheaper,
  // costlier ones from input exhaust memory; neither derives the tree anyone else does.
  for (const weak of [{ memoryKiB: 1024, iterations: 1 }, { memoryKiB: 1e12 }, { iterations: -1 }, { memoryKiB: NaN }]) {
    assert.throws(() => TreeKey.fromPassphrase('room', 'right horse battery', weak), /argon2|parameter|integer|PROTOCOL/i, JSON.stringify(weak));
  }
  const r = await connect({ keys: right });
  const w = await connect({ keys: wrong });
  const rx = collector(1);
  await r.subscribe('#', rx.cb);
  await w.publish('chat', 'from the wrong key');
  await r.publish('chat', 'from the right key');
  const [only] = await rx.all;
  assert.equal(only.value, 'from the right key');
});

test('reconnects after a relay restart and resubscribes', async () => {
  const local = await startRelay();
  try {
    const tree = TreeKey.generate('restart');
    const opts = { keys: tree, identity: Identity.generate(), reconnect: { initialDelayMs: 20, maxDelayMs: 200 } };
    const sub = await Client.connect(local.url, opts);
    const pub = await Client.connect(local.url, { ...opts, identity: Identity.generate() });
    const got = collector(2);
    await sub.subscribe('t/+', got.cb);
    await pub.publish('t/before', 1);
    await got.count(1);

    const states = [];
    sub.on('state', (s) => states.push(s));
    // Both clients must notice the drop before we wait for them to be back.
    const lost = Promise.all([sub.waitForState('reconnecting'), pub.waitForState('reconnecting')]);
    const restarted = await local.restart();
    Object.assign(local, restarted);
    await lost;
    await Promise.all([sub.waitForState('connected'), pub.waitForState('connected')]);
    await sub.flush(); // the relay has processed the resubscription
    await pub.publish('t/after', 2);
    const [, m] = await got.all;
    assert.equal(m.topic, 't/after');
    assert.equal(m.value, 2);
    assert.ok(states.includes('reconnecting') && states.at(-1) === 'connected', states.join(','));
    assert.equal(sub.stats().reconnects, 1);
    await sub.close();
    await pub.close();
    assert.equal(sub.state, 'closed');
  } finally {
    await local.stop();
  }
});

test('a second close() resolves only once the client has closed; waitForState rejects once closed', { timeout: 60_000 }, async () => {
  const local = await startRelay();
  const proxy = await startProxy(local.port);
  try {
    const c = await Client.connect(proxy.url, { keys: TreeKey.generate('twice') });
    const disconnected = (e) => e instanceof WhispeerError && e.code === 'DISCONNECTED';
    const never = assert.rejects(c.waitForState('reconnecting'), disconnected, 'a wait pending at close');
    const first = c.close();
    await c.close();
    assert.equal(c.state, 'closed', 'the second close() returned before the client closed');
    await first;
    await never;
    await assert.rejects(c.waitForState('connected'), disconnected, 'a wait after close');
    await proxy.idle();
    assert.equal(proxy.connections, 0);
  } finally {
    await proxy.close();
    await local.stop();
  }
});

test('close() during a reconnect attempt leaves no connection behind', { timeout: 60_000 }, async () => {
  // Heartbeats and the idle timeout far beyond the test's timeout: nothing but the client
  // itself would close a connection it forgot.
  const slow = ['--heartbeat-ms', '600000', '--idle-ms', '1800000'];
  const local = await startRelay({ args: slow });
  const proxy = await startProxy(local.port);
  try {
    const c = await Client.connect(proxy.url, {
      keys: TreeKey.generate('closing'),
      reconnect: { initialDelayMs: 1, maxDelayMs: 1, jitter: 0 },
    });
    // The relay's answers stop reaching the client, the connection is cut, and the client
    // opens its next one: that attempt is now waiting for the handshake.
    proxy.pause('down');
    const reconnecting = c.waitForState('reconnecting');
    proxy.drop();
    await reconnecting;
    await proxy.opened(2);
    await c.close();
    assert.equal(c.state, 'closed');
    // The handshake completes after close(): the client must hang up, not keep the socket.
    proxy.resume('down');
    await proxy.idle();
    assert.equal(proxy.connections, 0);
  } finally {
    await proxy.close();
    await local.stop();
  }
});

test('keys: generate, strings, passphrase, invites', () => {
  const me = Identity.generate();
  const again = Identity.fromSecretString(me.toSecretString());
  assert.equal(again.senderId, me.senderId);
  assert.match(me.publicId, /^wsid1/);

  const tree = TreeKey.generate('house');
  const copy = TreeKey.fromKeyString(tree.toKeyString());
  assert.equal(copy.treeId, tree.treeId);
  const g = tree.grant('rooms/#');
  assert.equal(g.scope, 'rooms/#');
  assert.equal(Grant.fromKeyString(g.toKeyString()).scope, 'rooms/#');
  assert.equal(g.narrow('rooms/kitchen', me).scope, 'rooms/kitchen');
  assert.throws(() => g.narrow('garden/#', me), { code: 'KEY' });
  // '#' is the whole tree: out of a subtree grant's scope (PROTOCOL §5.6), as in the CLI.
  assert.throws(() => g.narrow('#', me), { code: 'KEY' });
  assert.equal(tree.grant('#').narrow('#', me).scope, '#');
  assert.throws(() => Grant.fromKeyString('wskey1garbage'), { code: 'KEY' });

  const p1 = TreeKey.fromPassphrase('demo', 'correct horse battery staple', { memoryKiB: 65536, iterations: 3 });
  const p2 = TreeKey.fromPassphrase('demo', 'correct horse battery staple', { memoryKiB: 65536, iterations: 3 });
  assert.equal(p1.toKeyString(), p2.toKeyString());

  const friend = Identity.generate();
  const invite = sealInvite(g, me, friend.publicId, { ttlMs: 60_000 });
  assert.match(invite, /^wsinv1/);
  const opened = openInvite(invite, friend);
  assert.equal(opened.inviter, me.senderId);
  assert.equal(opened.grant.scope, 'rooms/#');
  assert.throws(() => openInvite(invite, Identity.generate()), { code: 'INVITE' });

  const kr = new Keyring();
  kr.addGrant(g);
  kr.addKeyString(tree.toKeyString());
  assert.equal(kr.size, 2);
  // A grant for the same tree id signed by another admin is refused.
  const impostor = TreeKey.fromPassphrase('demo', 'other', { memoryKiB: 65536, iterations: 3 });
  const k2 = new Keyring();
  k2.addTreeKey(p1);
  assert.throws(() => k2.addTreeKey(impostor), { code: 'KEY' });
});

test('CBOR mapping matches serde: bigint, bytes, maps, floats', () => {
  const hex = (v) => Buffer.from(encodeValue(v)).toString('hex');
  assert.equal(hex(1), '01');
  assert.equal(hex(-1), '20');
  assert.equal(hex(1.5), 'f93e00'); // shortest float, as ciborium writes f64 1.5
  assert.equal(hex(float(2)), 'f94000'); // a float even when whole
  assert.equal(hex(2n ** 64n - 1n), '1bffffffffffffffff');
  assert.equal(hex(2n ** 64n), 'c249010000000000000000'); // bignum, as ciborium writes u128
  assert.equal(hex(-(2n ** 64n) - 1n), 'c349010000000000000000');
  assert.equal(hex(new Uint8Array([1, 2])), '420102');
  assert.equal(hex({ a: 1, skip: undefined }), 'a1616101');
  assert.equal(hex(new Map([[1, 'x']])), 'a1016178');
  assert.equal(hex(null), 'f6');
  assert.throws(() => encodeValue(() => 1), { code: 'ENCODE' });
  assert.throws(() => encodeValue(Symbol('s')), { code: 'ENCODE' });
  const big = { n: 2n ** 53n, m: 2 ** 53 - 1, b: new Uint8Array([9]) };
  assert.deepEqual(decodeValue(encodeValue(big)), big);
  const proto = decodeValue(encodeValue(JSON.parse('{"__proto__": {"polluted": 1}}')));
  assert.equal(Object.getPrototypeOf(proto), Object.prototype);
  assert.equal({}.polluted, undefined);
  assert.throws(() => decodeValue(new Uint8Array([0xff])), { code: 'DECODE' });
});

test('CBOR: a Date is an epoch-time tag; Sets and other typed arrays are refused, never {}', () => {
  const hex = (v) => Buffer.from(encodeValue(v)).toString('hex');
  assert.equal(hex(new Date(1_700_000_000_000)), 'c11a6553f100'); // tag 1, integer seconds
  assert.equal(hex(new Date(1_700_000_000_500)), 'c1fb41d954fc40200000'); // float seconds
  const back = decodeValue(encodeValue({ at: new Date(1_700_000_000_500) }));
  assert.ok(back.at instanceof Date);
  assert.equal(back.at.getTime(), 1_700_000_000_500);
  for (const [v, name] of [
    [new Set([1]), /Set.*use an Array/],
    [new Float32Array([1]), /Float32Array.*Uint8Array/],
    [new Uint16Array([1]), /Uint16Array/],
    [new Date(NaN), /invalid Date/],
    [new WeakMap(), /WeakMap/],
    [/re/, /RegExp/],
    [{ nested: [new Set()] }, /Set/],
  ]) {
    assert.throws(() => encodeValue(v), (e) => e.code === 'ENCODE' && name.test(e.message), String(v));
  }
});

test('zstd compression shrinks and opens (wasm seals, wasm opens)', () => {
  const tree = TreeKey.generate('z');
  const kr = new Keyring();
  kr.addTreeKey(tree);
  const value = encodeValue({ text: 'all work and no play '.repeat(200) });
  const zstd = new ClientCore(kr, 3, false, true);
  const none = new ClientCore(kr, 0, false, true);
  const small = zstd.sealEnvelope('a', 'application/cbor', value);
  const large = none.sealEnvelope('a', 'application/cbor', value);
  assert.ok(small.length * 10 < large.length, `${small.length} vs ${large.length}`);
  assert.deepEqual(none.openEnvelope(small).payload, value);
  assert.deepEqual(zstd.openEnvelope(large).payload, value);
  assert.throws(() => zstd.openEnvelope(small.map((b, i) => (i === small.length - 1 ? b ^ 1 : b))), {
    code: 'OPEN',
  });
});

test('LZ4 and AES-256-GCM: wasm seals, wasm opens every codec x suite; bad options refused', () => {
  const tree = TreeKey.generate('l');
  const kr = new Keyring();
  kr.addTreeKey(tree);
  const value = encodeValue({ text: 'all work and no play '.repeat(200) });
  const cores = {};
  for (const compression of [0, 3, 'lz4']) {
    for (const suite of ['xchacha', 'aes-gcm']) {
      const core = new ClientCore(kr, compression, false, true);
      core.setSuite(suite);
      cores[`${compression}/${suite}`] = core;
    }
  }
  const plain = cores['0/xchacha'].sealEnvelope('a', 'application/cbor', value);
  for (const [name, core] of Object.entries(cores)) {
    const env = core.sealEnvelope('a', 'application/cbor', value);
    assert.equal(env[1], name.endsWith('aes-gcm') ? 3 : 1, `${name}: suite byte`);
    if (name.startsWith('lz4')) assert.ok(env.length * 5 < plain.length, `${name}: ${env.length} vs ${plain.length}`);
    for (const other of Object.values(cores)) assert.deepEqual(other.openEnvelope(env).payload, value, name);
    assert.throws(() => core.openEnvelope(env.map((b, i) => (i === env.length - 1 ? b ^ 1 : b))), { code: 'OPEN' });
  }
  // A per-topic rule picks codec and suite for its topics only.
  const mixed = new ClientCore(kr, 3, false, true);
  mixed.setTopicOptions('fast/#', 'lz4', false, 'aes-gcm');
  assert.equal(mixed.sealEnvelope('fast/x', 'application/cbor', value)[1], 3);
  assert.equal(mixed.sealEnvelope('slow/x', 'application/cbor', value)[1], 1);
  assert.throws(() => mixed.setSuite('des'), { code: 'INVALID_OPTION' });
  assert.throws(() => new ClientCore(kr, 'lz5', false, true), { code: 'INVALID_OPTION' });
});

test('the package loads by name with import and require', () => {
  const esm = execFileSync(
    process.execPath,
    ['--input-type=module', '-e', "import { Identity } from 'whispeer'; console.log(Identity.generate().senderId.slice(0, 5))"],
    { cwd: PKG_ROOT, encoding: 'utf8' },
  );
  assert.equal(esm.trim(), 'wspk1');
  const cjs = execFileSync(
    process.execPath,
    ['-e', "const { Identity } = require('whispeer'); console.log(Identity.generate().senderId.slice(0, 5))"],
    { cwd: PKG_ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] },
  );
  assert.equal(cjs.trim(), 'wspk1');
});

test('two trees covering a topic: a plain publish or subscribe names both, `tree` picks one', async () => {
  const alpha = TreeKey.generate('alpha');
  const beta = TreeKey.generate('beta');
  const pub = await connect({ keys: [alpha, beta] });
  const sub = await connect({ keys: [alpha, beta] });
  const namesBoth = (e) => {
    assert.equal(e.code, 'KEY');
    assert.ok(e.message.includes(alpha.treeId) && e.message.includes(beta.treeId), e.message);
    return true;
  };
  // A subscription is bound to one tree, as a publish is (PROTOCOL §4.11).
  await assert.rejects(sub.subscribe('shared/#', () => {}), namesBoth);
  const inAlpha = collector(1);
  const inBeta = collector(1);
  await sub.subscribe('shared/#', inAlpha.cb, { tree: alpha.treeId });
  await sub.subscribe('shared/#', inBeta.cb, { tree: beta.treeId });
  await assert.rejects(pub.publish('shared/x', 1, { ack: true }), namesBoth);
  await pub.publish('shared/x', 2, { ack: true, tree: beta.treeId });
  await pub.publish('shared/x', 3, { ack: true, tree: alpha.treeId });
  const [b] = await inBeta.all;
  const [a] = await inAlpha.all;
  assert.deepEqual([b.value, b.treeId], [2, beta.treeId]);
  assert.deepEqual([a.value, a.treeId], [3, alpha.treeId]);
  assert.deepEqual(b.provenance, { kind: 'admin-signed' });
  await assert.rejects(pub.publish('shared/x', 4, { tree: 'zz' }), (e) => e.code === 'INVALID_TREE');
  await assert.rejects(sub.subscribe('shared/#', () => {}, { tree: 'zz' }), (e) => e.code === 'INVALID_TREE');
});

test("a subscription bound to a tree never gets another tree's messages", async () => {
  // The victim holds tree "work" (alerts/#) and accepted Mallory's tree (#).
  const work = TreeKey.generate('work');
  const mallory = TreeKey.generate('mallory');
  const victim = await connect({ keys: [work.grant('alerts/#'), mallory] });
  const attacker = await connect({ keys: mallory, identity: Identity.generate() });
  const colleague = await connect({ keys: work });
  const got = collector(3);
  await victim.subscribe('alerts/#', got.cb, { tree: work.treeId });
  for (const [c, v] of [[attacker, 1], [colleague, 2], [attacker, 3], [colleague, 4], [colleague, 6]]) {
    await c.publish('alerts/fire', v, { ack: true });
  }
  const seen = await got.all;
  assert.deepEqual(
    seen.map((m) => [m.value, m.treeId]).sort((x, y) => x[0] - y[0]),
    [
      [2, work.treeId],
      [4, work.treeId],
      [6, work.treeId],
    ],
  );
});

test('messages carry the provenance; a delegated grant seals only after allowSealing', async () => {
  const tree = TreeKey.generate('org');
  const bob = Identity.generate();
  const delegated = tree.grant().narrow('org/news/#', bob);
  const admin = await connect({ keys: tree });
  const member = await connect({ keys: delegated });
  const atMember = collector(1);
  const atAdmin = collector(1);
  await member.subscribe('org/news/#', atMember.cb);
  await admin.subscribe('org/#', atAdmin.cb);
  await admin.publish('org/news/x', 1, { ack: true });
  const [m] = await atMember.all;
  assert.equal(m.value, 1);
  assert.deepEqual(m.provenance, { kind: 'delegated', by: bob.senderId });
  assert.equal(m.treeId, tree.treeId);
  await assert.rejects(member.publish('org/news/y', 2, { ack: true }), (e) => e.code === 'KEY');
  assert.throws(() => member.allowSealing(tree.treeId, 'org/news'), (e) => e.code === 'KEY');
  member.allowSealing(tree.treeId, 'org/news/#');
  await member.publish('org/news/y', 2, { ack: true });
  const [first] = await atAdmin.all;
  assert.equal(first.value, 1);
  assert.deepEqual(first.provenance, { kind: 'admin-signed' });
  await atAdmin.count(2);
  assert.equal(atAdmin.got[1].value, 2);
});

// A member's forged grant (test/node/fixtures/forged-grant.json: sensor/kitchen/# with a
// key she chose, narrowed and signed by her; checked by client-wasm/src/keys.rs tests).
const FORGED = JSON.parse(readFileSync(new URL('./fixtures/forged-grant.json', import.meta.url), 'utf8'));

test('a Keyring drops a forged grant once the admin-signed one arrives, and addKeys of a rotation is not stopped by a superseded grant', async () => {
  const tree = TreeKey.fromKeyString(FORGED.tree);
  const forged = Grant.fromKeyString(FORGED.forged);
  // The keyring path: the forgery arrives first, the admin's grant later drops it.
  const kr = new Keyring();
  kr.addGrant(forged);
  kr.addGrant(tree.grant('sensor/#'));
  assert.equal(kr.size, 1);
  assert.ok(!kr.toKeyStrings().includes(forged.toKeyString()), 'the forgery is not exported');

  const client = await connect({ keys: kr });
  client.addKeys(tree); // the whole tree, admin-signed
  const rotated = tree.rotate();
  const got = collector(1);
  await client.subscribe('sensor/#', got.cb);
  // The app's usual pattern after a rotation: add to its keyring, hand the keyring over.
  kr.addTreeKey(rotated);
  client.addKeys(kr);
  // A keyring that still holds the forgery (rebuilt from strings an older version
  // exported, without the admin's grant) and the rotation: the forgery is superseded
  // by what the client holds, and the rotation is still added.
  const old = new Keyring();
  old.addGrant(forged);
  old.addTreeKey(rotated);
  assert.equal(old.size, 2);
  const other = await connect({ keys: tree });
  other.addKeys(old);
  const got2 = collector(1);
  await other.subscribe('sensor/#', got2.cb);
  // Both read the new epoch: a publisher holding only it reaches them.
  const pub = await connect({ keys: rotated });
  await pub.publish('sensor/kitchen', 'epoch 1', { ack: true });
  assert.equal((await got.all)[0].value, 'epoch 1');
  assert.equal((await got2.all)[0].value, 'epoch 1');
  // A forged grant handed over on its own is still refused.
  assert.throws(() => other.addKeys(forged), (e) => e.code === 'KEY' && e.reason === 'contradicts');
});

test('connect gives up when its signal aborts: retries stop, nothing keeps the process alive', { timeout: 60_000 }, async () => {
  // A port nobody listens on: with retryFirstConnect the client would retry forever.
  const { createServer } = await import('node:net');
  const srv = createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const port = srv.address().port;
  await new Promise((r) => srv.close(r));
  // In a process of its own, which must end by itself once connect rejected: a timer or a
  // socket of the aborted client left behind would keep it alive (execFileSync times out).
  const entry = new URL('../../js/index.node.js', import.meta.url).href;
  const script = `
    import { Client, TreeKey } from ${JSON.stringify(entry)};
    try {
      await Client.connect('ws://127.0.0.1:${port}', {
        keys: TreeKey.generate('abort'),
        retryFirstConnect: true,
        reconnect: { initialDelayMs: 10, maxDelayMs: 20 },
        signal: AbortSignal.timeout(300),
      });
      console.log('connected?');
    } catch (e) {
      console.log(e.code + ' ' + e.message);
    }`;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20_000 });
  assert.match(out.trim(), /^ABORTED connect aborted: The operation was aborted due to timeout$/);
  // Already aborted: refused at once; a signal that is not one: INVALID_OPTION.
  const ctl = new AbortController();
  ctl.abort();
  await assert.rejects(
    Client.connect(`ws://127.0.0.1:${port}`, { keys: TreeKey.generate('abort'), signal: ctl.signal }),
    (e) => e.code === 'ABORTED',
  );
  await assert.rejects(
    Client.connect(`ws://127.0.0.1:${port}`, { keys: TreeKey.generate('abort'), signal: 5 }),
    (e) => e.code === 'INVALID_OPTION',
  );
});
