// zstd dictionaries (codec 3, PROTOCOL §4.6.1) in the WebAssembly build: a dictionary added
// to a keyring (raw bytes or a wsdict1… string) compresses a topic ('zstd-dict:<id>') and
// decompresses on the receiver; a receiver without it gets nothing; the Rust CLI's
// dictionary strings import as they are.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { relayPerFile } from '../shared/fixture.js';
import { dictBytes, reading } from '../shared/dictionary.js';
import { TreeKey, Keyring, toKeyring } from '../../js/index.node.js';

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

test('the wsdict1… strings of one keys call serve that call\'s trees only (a bundle per tree)', async () => {
  const [a, b] = [TreeKey.generate('bundle-a'), TreeKey.generate('bundle-b')];
  // Two dictionaries that both compress `reading` (so a topic naming one seals codec 3).
  const bytesB = new TextEncoder().encode(
    '{"device":"th-0001","room":"kitchen","celsius":21.50,"humidity":41,"battery":98,"ok":true}'.repeat(8),
  );
  const ids = new Keyring();
  const [idA, idB] = [ids.addDictionary(dictBytes), ids.addDictionary(bytesB)];
  const [dictA, dictB] = ids.toDictionaryStrings();
  assert.notEqual(idA, idB);
  // As a key file written beside a grant (`invite open --out`): grant + its dictionary.
  const bundleA = [a.grant('#').toKeyString(), dictA];
  const bundleB = [b.grant('#').toKeyString(), dictB];
  assert.deepEqual(toKeyring(bundleA).toDictionaryEntries(), [{ dictionary: dictA, treeId: a.treeId }]);
  assert.deepEqual(toKeyring(dictA).toDictionaryEntries(), [{ dictionary: dictA }], 'dictionaries only: every tree');
  assert.deepEqual(toKeyring([dictA]).toDictionaryEntries(), [{ dictionary: dictA }]);

  // One client with both bundles: at connect, and at run time.
  const sub = await connect({ keys: bundleA });
  sub.addKeys(bundleB);
  let own;
  const ownArrived = new Promise((r) => (own = r));
  const gotA = [];
  await sub.subscribe('sensor/#', (m) => {
    gotA.push(m.topic);
    if (m.topic === 'sensor/own') own();
  }, { tree: a.treeId });
  // A member of tree A who learned B's dictionary id seals a tree-A message with it
  // (she holds B's dictionary for every tree): the client must not decode it with B's.
  const forger = new Keyring();
  forger.addTreeKey(a);
  forger.addDictionary(bytesB);
  const forged = await connect({ keys: forger, compression: `zstd-dict:${idB}` });
  await forged.publish('sensor/forged', reading, { ack: true });
  // Then a tree-A message with A's own dictionary, which opens.
  const honest = await connect({ keys: toKeyring(bundleA), compression: `zstd-dict:${idA}` });
  await honest.publish('sensor/own', reading, { ack: true });
  await ownArrived;
  assert.deepEqual(gotA, ['sensor/own'], 'the tree-A message sealed with B\'s dictionary was opened');
  assert.equal(sub.stats().missingDictionary, 1, 'refused as a missing dictionary');

  // B's bundle serves B: a tree-B message with B's dictionary opens.
  let gotB;
  const bArrived = new Promise((r) => (gotB = r));
  await sub.subscribe('sensor/#', (m) => gotB(m), { tree: b.treeId });
  const pubB = await connect({ keys: toKeyring(bundleB), compression: `zstd-dict:${idB}` });
  await pubB.publish('sensor/b', reading, { ack: true });
  assert.deepEqual((await bArrived).value, reading);
});
