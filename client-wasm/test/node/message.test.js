// openEnvelope builds the message object in JS from the buffer the wasm side writes
// (js/message.js); it must equal the object built property by property in Rust
// (`openEnvelopeObject`, the reference), for every kind of field.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ClientCore, Identity, Keyring, TreeKey, encodeValue } from '../../js/index.node.js';

test('openEnvelope equals the Rust-built message object', () => {
  const tree = TreeKey.generate('msg');
  const keys = new Keyring();
  keys.addTreeKey(tree);
  const me = Identity.generate();
  const cases = [
    ['sensor/kitchen/temp', 'application/octet-stream', new Uint8Array([1, 2, 3])],
    ['sensor/kitchen/temp', 'application/octet-stream', new Uint8Array(0)],
    ['\ufeffké/ü😀/x', 'application/cbor', encodeValue({ a: 1, b: 'x', big: 2n ** 70n, d: new Date(5000) })],
    ['a/b', 'application/cbor; type="t.T/v1"', encodeValue([1, 2.5, null, new Uint8Array([9])])],
    ['a/b', 'application/cbor', new Uint8Array([0xff, 0xff])], // undecodable: `error`
    ['a/b', 'text/plain; charset=ü', new Uint8Array(70_000).fill(7)],
  ];
  for (const sign of [false, true]) {
    const core = new ClientCore(keys, 3, true, sign);
    core.setIdentity(me);
    for (const [topic, ct, payload] of cases) {
      const env = core.sealEnvelope(topic, ct, payload);
      const a = core.openEnvelope(env);
      const b = core.openEnvelopeObject(env);
      assert.deepStrictEqual(Object.keys(a), Object.keys(b));
      assert.deepStrictEqual(Object.keys(a.provenance), Object.keys(b.provenance));
      if (b.error) {
        assert.equal(a.error.code, b.error.code);
        assert.equal(a.error.message, b.error.message);
        delete a.error;
        delete b.error;
      }
      assert.deepStrictEqual(a, b);
      assert.equal(a.topic, topic);
      assert.equal(a.sender, sign ? me.senderId : null);
      // The payload is its own buffer, as before.
      assert.equal(a.payload.byteOffset, 0);
      assert.equal(a.payload.buffer.byteLength, payload.length);
    }
    assert.throws(() => core.openEnvelope(new Uint8Array([1, 2, 3])), { code: 'DECODE' });
  }
});

test('sealEnvelopes signs as publishes are: batch runs verify message by message', () => {
  const tree = TreeKey.generate('batch-envs');
  const keys = new Keyring();
  keys.addTreeKey(tree);
  const me = Identity.generate();
  const payloads = Array.from({ length: 150 }, (_, i) => new Uint8Array([i, i >> 8, 7]));
  const lengths = {};
  for (const [mode, sender] of [['batch', me.senderId], ['message', me.senderId], ['off', null]]) {
    const core = new ClientCore(keys, 0, true, true);
    core.setIdentity(me);
    core.setSigning(mode);
    const envs = core.sealEnvelopes('s/x', 'application/octet-stream', payloads);
    assert.equal(envs.length, payloads.length, mode);
    const reader = new ClientCore(keys, 0, true, false);
    envs.forEach((env, i) => {
      const m = reader.openEnvelope(env);
      assert.deepStrictEqual([...m.payload], [...payloads[i]], `${mode} ${i}`);
      assert.equal(m.sender, sender, `${mode} ${i}`);
    });
    // Without padding the proof shows in the length: a batch proof carries salt (32), count
    // and index (8), path length (1) and its path beside the key and signature a
    // per-message signature has; unsigned carries neither.
    const unpadded = new ClientCore(keys, 0, false, true);
    unpadded.setIdentity(me);
    unpadded.setSigning(mode);
    const len = unpadded.sealEnvelopes('s/x', 'application/octet-stream', [payloads[0]])[0].length;
    lengths[mode] = len;
    // One damaged envelope of a run fails alone; its neighbours (same signature) still open.
    const bad = envs[70].slice();
    bad[bad.length - 20] ^= 1;
    assert.throws(() => reader.openEnvelope(bad));
    assert.equal(reader.openEnvelope(envs[71]).sender, sender);
  }
  // A run of one has an empty path: exactly 41 bytes more than a per-message signature.
  assert.equal(lengths.batch - lengths.message, 41, JSON.stringify(lengths));
  assert.ok(lengths.message > lengths.off, JSON.stringify(lengths));
});

test('each message names its own sender when many senders alternate', () => {
  const tree = TreeKey.generate('senders');
  const keys = new Keyring();
  keys.addTreeKey(tree);
  // More senders than the opener keeps text forms of (8), in a changing order.
  const ids = Array.from({ length: 11 }, () => Identity.generate());
  const cores = ids.map((id) => {
    const c = new ClientCore(keys, 0, true, true);
    c.setIdentity(id);
    return c;
  });
  const reader = new ClientCore(keys, 0, true, false);
  for (let i = 0; i < 200; i++) {
    const k = (i * 7 + (i >> 3)) % ids.length;
    const m = reader.openEnvelope(cores[k].sealEnvelope('s/x', 'application/octet-stream', new Uint8Array([i])));
    assert.equal(m.sender, ids[k].senderId, `message ${i} from sender ${k}`);
  }
});
