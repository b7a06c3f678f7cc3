// Typed topics (`client.topic(name, { type })`) against the real relay binary: one type per
// topic, named by a tag carried in the sealed content type `application/cbor; type="<tag>"`.
// Node ↔ Node, then across processes with the Rust client (tests/src/bin/interop_peer.rs,
// `client.topic::<Point>` / `client.topic::<Note>`).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRelay } from '../shared/relay.js';
import { runPeer } from '../shared/peer.js';
import { Client, Identity, TreeKey, WhispeerError, TypedTopic, encodeValue } from '../../js/index.node.js';

const TAG = 'myapp.MyData/v1';
const CT = `application/cbor; type="${TAG}"`;
// The Rust interop peer's two types.
const POINT = 'interop.Point/v1';
const NOTE = 'interop.Note/v1';
// Each test waits on events; a behaviour that breaks fails it by this deadline, not a hang.
const T = { timeout: Number(process.env.WHISPEER_TYPED_TIMEOUT_MS ?? 30_000) };
const point = (i) => ({ i, x: -(i * 1000) - 7, label: `point-${i}` });

let relay;
let tree;
const clients = [];
before(async () => {
  relay = await startRelay();
  tree = TreeKey.generate('typed');
});
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await relay?.stop();
});

async function connect(opts) {
  const c = await Client.connect(relay.url, { identity: Identity.generate(), keys: tree, ...opts });
  clients.push(c);
  return c;
}

/** Collects what `cb` is called with; `count(k)` resolves once `k` arrived. */
function collector() {
  const got = [];
  const waits = [];
  return {
    got,
    count: (k) => (got.length >= k ? Promise.resolve(got) : new Promise((resolve) => waits.push({ k, resolve }))),
    cb: (x) => {
      got.push(x);
      for (const w of waits.filter((w) => got.length >= w.k)) {
        waits.splice(waits.indexOf(w), 1);
        w.resolve(got);
      }
    },
  };
}

function assertMismatch(e, { topic, expected, found }) {
  assert.ok(e instanceof WhispeerError, `a WhispeerError: ${e}`);
  assert.equal(e.code, 'TYPE_MISMATCH', e.message);
  if (topic !== undefined) assert.equal(e.topic, topic);
  assert.equal(e.expected, expected);
  assert.equal(e.found, found);
  return true;
}

test('typed publish and subscribe round trip: the tag is the content type, untyped subscribers still decode', T, async () => {
  const pub = await connect();
  const sub = await connect();
  const typed = pub.topic('typed/rt', { type: TAG });
  assert.ok(typed instanceof TypedTopic);
  assert.equal(typed.name, 'typed/rt');
  assert.equal(typed.type, TAG);
  assert.equal(typed.contentType, CT);
  const got = collector();
  const s = await sub.topic('typed/rt', { type: TAG }).subscribe(got.cb, { onError: (e) => assert.fail(`no mismatch expected: ${e}`) });
  assert.equal(s.type, TAG);
  const plain = collector();
  await sub.subscribe('typed/rt', plain.cb);
  const values = [{ name: 'a', id: 1 }, { name: 'b', id: 2, nested: { ok: true } }];
  for (const v of values) await typed.publish(v);
  await got.count(2);
  assert.deepEqual(got.got.map((m) => m.value), values);
  for (const m of got.got) {
    assert.equal(m.contentType, CT);
    assert.equal(m.sender, pub.senderId);
  }
  // An untyped subscription sees the tag and still gets the CBOR value.
  await plain.count(2);
  assert.deepEqual(plain.got.map((m) => [m.contentType, m.value]), values.map((v) => [CT, v]));
  assert.equal(sub.stats().typeMismatches, 0);
  assert.equal(s.typeMismatches, 0);
});

test('a typed subscriber refuses other types: TYPE_MISMATCH, counted, never delivered, later messages still arrive', T, async () => {
  const topic = 'typed/mismatch';
  const pub = await connect();
  const other = await connect(); // publishes another type on the same topic
  const sub = await connect();
  const iterClient = await connect();
  const good = pub.topic(topic, { type: TAG });
  const bad = other.topic(topic, { type: 'myapp.Other/v1' });

  // A callback subscription with onError, and an iterator without (the client's error event).
  const got = collector();
  const errors = collector();
  const s = await sub.topic(topic, { type: TAG }).subscribe(got.cb, { onError: errors.cb });
  const events = collector();
  iterClient.on('error', events.cb);
  const it = await iterClient.topic(topic, { type: TAG }).subscribe({ qos: 1 });

  const plainPub = await connect(); // nothing registered: its untyped publishes go out
  await good.publish({ name: 'first', id: 1 });
  await pub.flush();
  await bad.publish({ other: true });
  await other.flush();
  await plainPub.publish(topic, { name: 'untagged', id: 9 }); // untagged CBOR: another type
  await plainPub.flush();
  await plainPub.publishBytes(topic, new TextEncoder().encode('hi'), { contentType: 'text/plain' });
  await plainPub.flush();
  await plainPub.publishBytes(topic, new Uint8Array([0xa0]), { contentType: `application/cbor; type="${TAG}" ` }); // not the exact bytes
  await plainPub.flush();
  await good.publish({ name: 'second', id: 2 });

  await got.count(2);
  await errors.count(4);
  assert.deepEqual(got.got.map((m) => m.value), [{ name: 'first', id: 1 }, { name: 'second', id: 2 }]);
  const found = ['application/cbor; type="myapp.Other/v1"', 'application/cbor', 'text/plain', `application/cbor; type="${TAG}" `];
  assert.equal(errors.got.length, 4);
  errors.got.forEach((e, i) => assertMismatch(e, { topic, expected: TAG, found: found[i] }));
  assert.equal(errors.got[0].sender, other.senderId);
  assert.equal(s.typeMismatches, 4);
  assert.equal(sub.stats().typeMismatches, 4);

  // The iterator yields only the two MyData values, in order, and is not ended by the rest.
  const seen = [];
  for await (const m of it) {
    seen.push(m.value);
    if (seen.length === 2) break;
  }
  assert.deepEqual(seen, [{ name: 'first', id: 1 }, { name: 'second', id: 2 }]);
  await events.count(4);
  events.got.forEach((e, i) => assertMismatch(e, { topic, expected: TAG, found: found[i] }));
  assert.equal(iterClient.stats().typeMismatches, 4);
});

test('a registered topic refuses untyped publishes of another type; tags and topics are checked like Rust', T, async () => {
  const topic = 'typed/registered';
  const c = await connect();
  const watcher = await connect();
  const seen = collector();
  await watcher.subscribe('typed/registered/#', seen.cb);
  const typed = c.topic(topic, { type: TAG });

  await assert.rejects(c.publish(topic, { name: 'x', id: 1 }), (e) =>
    assertMismatch(e, { topic, expected: TAG, found: 'application/cbor' }),
  );
  await assert.rejects(c.publishBytes(topic, new Uint8Array([1]), { contentType: 'application/cbor; type="myapp.Other/v1"' }), (e) =>
    assertMismatch(e, { topic, expected: TAG, found: 'application/cbor; type="myapp.Other/v1"' }),
  );
  await assert.rejects(c.publishBytes(topic, new Uint8Array([1])), (e) =>
    assertMismatch(e, { topic, expected: TAG, found: 'application/octet-stream' }),
  );
  // Registration is per exact topic (not a filter): a topic below it is untyped.
  await c.publish(`${topic}/below`, 'untyped');
  // The topic's own content type passes through the untyped API too.
  await c.publishBytes(topic, encodeValue({ name: 'raw', id: 3 }), { contentType: CT });
  await typed.publish({ name: 'typed', id: 4 });
  await seen.count(3);
  assert.deepEqual(
    seen.got.map((m) => [m.topic, m.contentType, m.value]),
    [
      [`${topic}/below`, 'application/cbor', 'untyped'],
      [topic, CT, { name: 'raw', id: 3 }],
      [topic, CT, { name: 'typed', id: 4 }],
    ],
  );

  // One type per topic: the same tag again is fine, another is refused.
  assert.equal(c.topic(topic, { type: TAG }).contentType, CT);
  assert.throws(() => c.topic(topic, { type: 'myapp.Other/v1' }), (e) =>
    assertMismatch(e, { topic, expected: TAG, found: 'myapp.Other/v1' }),
  );
  // Tags Rust refuses (whispeer::tag::check_tag), refused with INVALID_OPTION.
  for (const bad of ['', 'a b', 'a"b', 'a\\b', 'tab\there', 'é', 'x'.repeat(129), undefined, 7]) {
    assert.throws(() => c.topic('typed/tags', { type: bad }), (e) => e instanceof WhispeerError && e.code === 'INVALID_OPTION', `tag ${JSON.stringify(bad)}`);
  }
  await c.publish('typed/tags', 'not registered by the refused tags');
  assert.equal(c.topic('typed/tags', { type: 'x'.repeat(128) }).type, 'x'.repeat(128));
  assert.equal(c.topic('typed/tags2', { type: '!#$%&\'()*+,-./09:;<=>?@AZ[]^_`az{|}~' }).contentType, 'application/cbor; type="!#$%&\'()*+,-./09:;<=>?@AZ[]^_`az{|}~"');
  assert.throws(() => c.topic('typed/+', { type: TAG }), (e) => e instanceof WhispeerError && e.code === 'INVALID_TOPIC');
  assert.throws(() => c.topic('typed/x', { type: TAG, compression: 'none' }), (e) => e instanceof WhispeerError && e.code === 'INVALID_OPTION');
  assert.throws(() => c.topic('typed/tags3', { type: 'a b' }), (e) => e instanceof WhispeerError && e.code === 'INVALID_OPTION');
  assert.throws(() => c.topic('typed/x'), (e) => e instanceof WhispeerError && e.code === 'INVALID_OPTION');
  // Refused registrations registered nothing.
  await c.publish('typed/x', 'fine');
  await c.publish('typed/tags3', 'fine');
});

test('Rust publishes tags A and B on one topic; a Node typed subscriber for A gets the A values and counts B', T, async () => {
  const topic = 'typed/rust-to-node';
  const node = await connect();
  const got = collector();
  const errors = collector();
  const s = await node.topic(topic, { type: POINT }).subscribe(got.cb, { onError: errors.cb });
  const peer = runPeer(['typed-pub', '--url', relay.url, '--key', tree.toKeyString(), '--topic', topic, '--order', 'ABA']);
  try {
    const [done] = await peer.take(1);
    assert.equal(done.published, 'ABA');
    await got.count(2);
    await errors.count(1);
    assert.deepEqual(got.got.map((m) => m.value), [point(0), point(1)]);
    for (const m of got.got) {
      assert.equal(m.contentType, `application/cbor; type="${POINT}"`);
      assert.equal(m.sender, done.sender);
    }
    assertMismatch(errors.got[0], { topic, expected: POINT, found: `application/cbor; type="${NOTE}"` });
    assert.equal(errors.got[0].sender, done.otherSender);
    assert.equal(s.typeMismatches, 1);
    assert.equal(node.stats().typeMismatches, 1);
    assert.equal(await peer.exited, 0);
  } finally {
    peer.kill();
  }
});

test('Node publishes tag A; a Rust typed subscriber for B reports TypeMismatch, one for A decodes the value', T, async () => {
  const topic = 'typed/node-to-rust';
  const args = ['typed-sub', '--url', relay.url, '--key', tree.toKeyString(), '--topic', topic, '--count', '1'];
  const subB = runPeer([...args, '--type', 'B']);
  const subA = runPeer([...args, '--type', 'A']);
  try {
    assert.deepEqual(await subB.next(), { ready: true, tag: NOTE });
    assert.deepEqual(await subA.next(), { ready: true, tag: POINT });
    const node = await connect();
    await node.topic(topic, { type: POINT }).publish(point(3));
    const [a, aStats] = await subA.take(2);
    assert.equal(a.error, undefined, a.error);
    assert.equal(a.mismatch, undefined, JSON.stringify(a.mismatch));
    assert.deepEqual(a.value, point(3));
    assert.equal(a.contentType, `application/cbor; type="${POINT}"`);
    assert.equal(a.sender, node.senderId);
    assert.deepEqual(aStats, { typeMismatches: 0 });
    const [b, bStats] = await subB.take(2);
    assert.equal(b.value, undefined, `Rust decoded a Point as a Note: ${JSON.stringify(b.value)}`);
    assert.deepEqual(b.mismatch, { topic, expected: NOTE, found: `application/cbor; type="${POINT}"` });
    assert.deepEqual(bStats, { typeMismatches: 1 });
    assert.equal(await subA.exited, 0);
    assert.equal(await subB.exited, 0);
  } finally {
    subA.kill();
    subB.kill();
  }
});
