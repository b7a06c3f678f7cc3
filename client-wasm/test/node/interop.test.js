// Rust ↔ Node through one relay: the Rust interop peer (tokio client, typed serde values)
// and this package exchange `Sample` values (structs, maps, bytes, bigints, enums) over
// wildcard subscriptions, with zstd on and off, and with LZ4 + AES-256-GCM (codec 2,
// suite 3) sealed on either side.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRelay } from '../shared/relay.js';
import { runPeer } from '../shared/peer.js';
import { sample } from '../shared/sample.js';
import { diff } from '../shared/equal.js';
import { Client, Identity, TreeKey } from '../../js/index.node.js';

const N = 6;
let relay;
let tree;
before(async () => {
  relay = await startRelay();
  tree = TreeKey.generate('interop');
});
after(async () => {
  await relay?.stop();
});

// 'lz4-aes-gcm': LZ4 compression and the AES-256-GCM suite on the publishing side.
const sealing = (mode) =>
  mode === 'lz4-aes-gcm' ? { compression: 'lz4', suite: 'aes-gcm' } : { compression: mode };
for (const compression of ['zstd', 'none', 'lz4-aes-gcm']) {
  const seal = sealing(compression);
  test(`Rust publishes, Node receives (${compression})`, async () => {
    const node = await Client.connect(relay.url, { keys: tree, identity: Identity.generate() });
    const got = [];
    let done;
    const all = new Promise((r) => (done = r));
    await node.subscribe(`interop/rust-${compression}/+`, (m) => {
      got.push(m);
      if (got.length === N) done();
    });
    const peer = runPeer([
      'pub', '--url', relay.url, '--key', tree.toKeyString(), '--prefix', `interop/rust-${compression}`,
      '--count', String(N), '--compression', seal.compression,
      ...(seal.suite ? ['--suite', seal.suite] : []),
    ]);
    const [{ published, sender }] = await peer.take(1);
    assert.equal(published, N);
    await all;
    assert.equal(await peer.exited, 0);
    for (const m of got) {
      const i = Number(m.topic.split('/').pop());
      assert.equal(diff(m.value, sample(i)), null, `message ${i}`);
      assert.equal(m.sender, sender);
    }
    await node.close();
  });

  test(`Node publishes, Rust receives typed values (${compression})`, async () => {
    const peer = runPeer(['sub', '--url', relay.url, '--key', tree.toKeyString(), '--filter', `interop/node-${compression}/#`, '--count', String(N)]);
    try {
      assert.deepEqual(await peer.next(), { ready: true });
      const node = await Client.connect(relay.url, {
        keys: tree.grant(`interop/node-${compression}/#`),
        identity: Identity.generate(),
        ...seal,
      });
      await node.publish('interop/elsewhere/0', sample(0)).catch(() => {}); // no key: NO_KEY
      for (let i = 0; i < N; i++) await node.publish(`interop/node-${compression}/${i % 2 ? 'odd' : 'even'}/${i}`, sample(i));
      const lines = await peer.take(N);
      for (const l of lines) {
        assert.equal(l.error, undefined, l.error);
        assert.equal(l.ok, true, `Rust decoded sample ${l.i} differently: ${JSON.stringify(l.value)}`);
        assert.equal(l.sender, node.senderId);
      }
      assert.deepEqual(lines.map((l) => l.i).sort(), [...Array(N).keys()]);
      assert.equal(await peer.exited, 0);
      await node.close();
    } finally {
      peer.kill();
    }
  });
}
