// zstd dictionaries (codec 3, PROTOCOL §4.6.1) in the WebAssembly build: a dictionary added
// to a keyring (raw bytes or a wsdict1… string) compresses a topic ('zstd-dict:<id>') and
// decompresses on the receiver; a receiver without it gets nothing; the Rust CLI's
// dictionary strings import as they are.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { relayPerFile } from '../shared/fixture.js';
import { dictBytes, reading } from '../shared/dictionary.js';
import { TreeKey, Keyring } from '../../js/index.node.js';

const fx = relayPerFile();
const connect = (opts) => fx.connect(opts);

test('a dictionary topic round-trips; the id is stable; strings carry it', async () => {
  const tree = TreeKey.generate('dict');
  const withDict = new Keyring();
  withDict.addTreeKey(tree);
  const id = withDict.addDictionary(dictBytes);
  assert.match(id, /^[0-9a-f]{32}$/);
  const [s] = withDict.toDictionaryStrings();
  assert.ok(s.startsWith('wsdict1'));
  // The string form gives the same id, in another keyring.
  const viaString = new Keyring();
  assert.equal(viaString.addDictionary(s), id);
  // Too large (112 KiB + 1) is refused.
  assert.throws(() => new Keyring().addDictionary(new Uint8Array(112 * 1024 + 1)), /exceeds the limit/);

  const pub = await connect({ keys: withDict, compression: `zstd-dict:${id}` });
  const sub = await connect({ keys: [tree.toKeyString(), s] });
  const lacking = await connect({ keys: tree });
  const got = [];
  const lackingGot = [];
  let resolve;
  const arrived = new Promise((r) => (resolve = r));
  await sub.subscribe('sensor/#', (m) => {
    got.push(m);
    resolve();
  });
  await lacking.subscribe('sensor/#', (m) => lackingGot.push(m));
  const value = reading;
  await pub.publish('sensor/kitchen', value, { ack: true });
  await arrived;
  assert.deepEqual(got[0].value, value);
  // A message after it, without the dictionary, reaches both: so the first one was refused
  // by `lacking`, not merely late.
  const plain = await connect({ keys: tree, compression: 'zstd' });
  let both;
  const second = new Promise((r) => (both = r));
  await lacking.subscribe('sensor/plain', () => both());
  await plain.publish('sensor/plain', 1, { ack: true });
  await second;
  assert.equal(lackingGot.filter((m) => m.topic === 'sensor/kitchen').length, 0);
  assert.equal(lacking.stats().missingDictionary, 1, 'counted as a missing dictionary');
  // An unknown dictionary id is refused when publishing.
  const none = await connect({ keys: tree, compression: `zstd-dict:${'0'.repeat(32)}` });
  await assert.rejects(none.publish('sensor/x', 1, { ack: true }), /dictionary/);
});

test('a dictionary added for one tree seals and opens that tree only (PROTOCOL §4.6.1)', async () => {
  const [a, b] = [TreeKey.generate('dict-a'), TreeKey.generate('dict-b')];
  const kr = new Keyring();
  kr.addTreeKey(a);
  kr.addTreeKey(b);
  const id = kr.addDictionary(dictBytes, b.treeId);
  assert.deepEqual(kr.toDictionaryEntries(), [{ dictionary: kr.toDictionaryStrings()[0], treeId: b.treeId }]);
  const lacksDict = (e) => e.code !== undefined && /dictionary/.test(e.message);
  for (const keys of [kr, [kr]]) {
    // A keyring given as is, or copied (`keys: [kr]`), keeps the tree of each dictionary.
    const client = await connect({ keys, compression: `zstd-dict:${id}` });
    await assert.rejects(client.publish('sensor/x', reading, { ack: true, tree: a.treeId }), lacksDict);
    await client.publish('sensor/x', reading, { ack: true, tree: b.treeId });
  }
  // Without a tree it serves every tree.
  const every = new Keyring();
  every.addTreeKey(a);
  every.addDictionary(dictBytes);
  const client = await connect({ keys: every, compression: `zstd-dict:${id}` });
  await client.publish('sensor/x', reading, { ack: true });
});
