// Invites that carry zstd dictionaries (format 3, PROTOCOL §7): an invitee holding nothing
// but an accepted invite reads a topic compressed with a dictionary (codec 3) — invites made
// in JS and opened in JS (keys at connect and `client.addKeys` at run time), made by the
// Rust SDK (the interop peer) and opened in JS, and made in JS and opened by the Rust SDK —
// while the same grant without the dictionary refuses those messages. Against the real relay.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { relayPerFile } from '../shared/fixture.js';
import { dictBytes, reading } from '../shared/dictionary.js';
import { runPeer } from '../shared/peer.js';
import { sample } from '../shared/sample.js';
import { Identity, TreeKey, Keyring, sealInvite, openInvite } from '../../js/index.node.js';

const fx = relayPerFile();
const connect = (opts) => fx.connect(opts);

/** The admin: a tree, a keyring holding its key and the dictionary, a publisher with it. */
async function admin(name) {
  const tree = TreeKey.generate(name);
  const keys = new Keyring();
  keys.addTreeKey(tree);
  const id = keys.addDictionary(dictBytes);
  const me = Identity.generate();
  const publisher = await connect({ identity: me, keys, compression: `zstd-dict:${id}` });
  return { tree, keys, id, me, publisher };
}

/** Subscribes `client` to `filter`; `first` resolves with the first message. */
async function firstMessage(client, filter) {
  let resolve;
  const first = new Promise((r) => (resolve = r));
  const got = [];
  await client.subscribe(filter, (m) => {
    got.push(m);
    resolve(m);
  });
  return { first, got };
}

/**
 * The grant alone refused the codec-3 message: the next message `lacking` delivers is a
 * marker published after it without the dictionary (the relay keeps their order).
 */
async function assertRefused(tree, lacking, lackingGot, topic) {
  const plain = await connect({ keys: tree, compression: 'zstd' });
  await plain.publish(topic, 'marker', { ack: true });
  assert.equal((await lackingGot.first).topic, topic);
  assert.equal(lacking.stats().rejected, 1);
  assert.equal(lackingGot.got.length, 1);
}

test('a JS invite carries the keyring\'s dictionaries; accepting it (at connect or at run time) reads codec 3', async () => {
  const a = await admin('invite-js');
  const [bob, carol] = [Identity.generate(), Identity.generate()];
  const grant = a.tree.grant('sensor/#');
  const forBob = sealInvite(grant, a.me, bob.publicId, { dictionaries: a.keys });
  const forCarol = sealInvite(grant, a.me, carol.publicId, { dictionaries: a.keys.toDictionaryStrings() });
  const opened = openInvite(forBob, bob);
  assert.equal(opened.inviter, a.me.senderId);
  assert.deepEqual(opened.dictionaryIds, [a.id]);
  assert.deepEqual(opened.dictionaries, a.keys.toDictionaryStrings());
  assert.equal(opened.grant.scope, 'sensor/#');
  // Without dictionaries the invite is the format-2 one, and carries none.
  assert.deepEqual(openInvite(sealInvite(grant, a.me, bob.publicId), bob).dictionaries, []);

  const atBob = await connect({ identity: bob, keys: opened });
  const atCarol = await connect({ identity: carol, keys: a.tree.grant('elsewhere/#') });
  atCarol.addKeys(openInvite(forCarol, carol));
  const lacking = await connect({ keys: opened.grant });
  const bobGot = await firstMessage(atBob, 'sensor/#');
  const carolGot = await firstMessage(atCarol, 'sensor/#');
  const lackingGot = await firstMessage(lacking, 'sensor/#');
  // The keyring path: `acceptInvite` adds the dictionary next to the grant.
  const kr = new Keyring();
  kr.acceptInvite(opened);
  assert.deepEqual(kr.toDictionaryStrings(), a.keys.toDictionaryStrings());
  assert.equal(kr.size, 1);

  await a.publisher.publish('sensor/kitchen', reading, { ack: true });
  assert.deepEqual((await bobGot.first).value, reading);
  assert.deepEqual((await carolGot.first).value, reading);
  await assertRefused(a.tree, lacking, lackingGot, 'sensor/marker');
});

test('an invite the Rust SDK sealed carries the dictionary to a JS invitee', async () => {
  const a = await admin('invite-rust-js');
  const bob = Identity.generate();
  const peer = runPeer([
    'invite-seal', '--key', a.tree.toKeyString(), '--to', bob.publicId, '--scope', 'sensor/#',
    '--dict', a.keys.toDictionaryStrings()[0],
  ]);
  const [{ invite, inviter }] = await peer.take(1);
  assert.equal(await peer.exited, 0);
  const opened = openInvite(invite, bob);
  assert.equal(opened.inviter, inviter);
  assert.deepEqual(opened.dictionaryIds, [a.id]);
  const atBob = await connect({ identity: bob, keys: opened });
  const got = await firstMessage(atBob, 'sensor/#');
  await a.publisher.publish('sensor/kitchen', reading, { ack: true });
  assert.deepEqual((await got.first).value, reading);
});

test('an invite sealed in JS carries the dictionary to a Rust SDK invitee', async () => {
  const a = await admin('invite-js-rust');
  const rust = Identity.generate();
  const grant = a.tree.grant('interop/#');
  const invite = sealInvite(grant, a.me, rust.publicId, { dictionaries: a.keys });
  const lacking = await connect({ keys: grant });
  const lackingGot = await firstMessage(lacking, 'interop/invite/#');
  const peer = runPeer([
    'sub', '--url', fx.relay.url, '--invite', invite, '--identity', rust.toSecretString(),
    '--filter', 'interop/invite/#', '--count', '1',
  ]);
  try {
    assert.deepEqual(await peer.next(), { ready: true });
    await a.publisher.publish('interop/invite/0', sample(0), { ack: true });
    const [l] = await peer.take(1);
    assert.equal(l.error, undefined, l.error);
    assert.equal(l.ok, true, `Rust decoded the sample differently: ${JSON.stringify(l.value)}`);
    assert.equal(l.sender, a.me.senderId);
    assert.equal(await peer.exited, 0);
    await assertRefused(a.tree, lacking, lackingGot, 'interop/invite/marker');
  } finally {
    peer.kill();
  }
});

test('a refused invite adds none of its dictionaries (PROTOCOL §7); an accepted one adds them', async () => {
  const fast = { memoryKiB: 65536, iterations: 3 };
  // Same tree id (same name), another admin: the client's pin refuses b's grant.
  const a = TreeKey.fromPassphrase('family-f5', 'one', fast);
  const b = TreeKey.fromPassphrase('family-f5', 'two', fast);
  assert.equal(a.treeId, b.treeId);
  const dict = new Keyring();
  const id = dict.addDictionary(dictBytes);
  const [me, inviter] = [Identity.generate(), Identity.generate()];
  // The client names the dictionary for its topics, and holds a but not the dictionary.
  const client = await connect({ identity: me, keys: a, compression: `zstd-dict:${id}` });
  const lacksDict = (e) => e.code !== undefined && /dictionary/.test(e.message);
  await assert.rejects(client.publish('sensor/x', 1, { ack: true }), lacksDict, 'no dictionary yet');

  const refused = openInvite(sealInvite(b.grant('#'), inviter, me.publicId, { dictionaries: dict }), me);
  assert.deepEqual(refused.dictionaryIds, [id]);
  assert.throws(() => client.addKeys(refused), (e) => e.code === 'KEY' && /admin/i.test(e.message));
  await assert.rejects(client.publish('sensor/x', 2, { ack: true }), lacksDict, 'the refused invite added its dictionary');

  // Control: the same dictionaries with a grant the client accepts are added.
  const accepted = openInvite(sealInvite(a.grant('sensor/#'), inviter, me.publicId, { dictionaries: dict }), me);
  client.addKeys(accepted);
  await client.publish('sensor/x', 3, { ack: true });
});

test('an invite whose grant is ignored (an epoch older than every epoch held) adds nothing and says so', async () => {
  const t0 = TreeKey.generate('ignored-invite');
  const t1 = t0.rotate();
  const t2 = t1.rotate();
  const kr = new Keyring();
  for (const t of [t0, t1, t2]) kr.addTreeKey(t); // epoch 0 is dropped by the second rotation
  const dict = new Keyring();
  const id = dict.addDictionary(dictBytes);
  const [me, inviter] = [Identity.generate(), Identity.generate()];
  const old = openInvite(sealInvite(t0.grant('#'), inviter, me.publicId, { dictionaries: dict }), me);
  const out = kr.acceptInvite(old);
  assert.equal(out.accepted, false);
  assert.match(out.ignoredReason, /older than the oldest epoch held/);
  assert.equal(out.provenance, undefined);
  assert.equal(out.epoch, 0);
  assert.equal(out.treeId, t0.treeId);
  assert.deepEqual(out.dictionariesAdded, []);
  assert.deepEqual(kr.toDictionaryStrings(), [], 'an ignored grant adds no dictionary');

  // The client's run-time path (`addKeys`) adds nothing either.
  const client = await connect({ identity: me, keys: t2, compression: `zstd-dict:${id}` });
  client.addKeys(old);
  const lacksDict = (e) => e.code !== undefined && /dictionary/.test(e.message);
  await assert.rejects(client.publish('sensor/x', 1, { ack: true }), lacksDict, 'the ignored invite added its dictionary');

  // Control: the current epoch's grant with the same dictionary is accepted, and says so.
  const cur = kr.acceptInvite(openInvite(sealInvite(t2.grant('sensor/#'), inviter, me.publicId, { dictionaries: dict }), me));
  assert.equal(cur.accepted, true);
  assert.equal(cur.ignoredReason, undefined);
  assert.deepEqual(cur.provenance, { kind: 'admin-signed' });
  assert.equal(cur.scope, 'sensor/#');
  assert.deepEqual(cur.dictionariesAdded, [id]);
  assert.deepEqual(cur.dropped, []);
});

test('acceptInvite says whether the admin key or a member enrolled you (PROTOCOL §10)', () => {
  const t0 = TreeKey.generate('enrol');
  const admin = t0.adminIdentity();
  const [mallory, newcomer] = [Identity.generate(), Identity.generate()];
  const g0 = openInvite(sealInvite(t0.grant('#'), admin, mallory.publicId), mallory);
  assert.equal(g0.inviterIsAdmin, true);
  const t1 = t0.rotate(); // Mallory removed
  // She seals her epoch-0 grant to a newcomer: accepted (not prevented), but it says so.
  const fromMallory = openInvite(sealInvite(g0.grant, mallory, newcomer.publicId), newcomer);
  assert.equal(fromMallory.inviterIsAdmin, false);
  const kr = new Keyring();
  const out = kr.acceptInvite(fromMallory);
  assert.equal(out.accepted, true);
  assert.deepEqual(out.provenance, { kind: 'admin-signed' });
  assert.equal(out.epoch, 0);
  assert.equal(out.inviter, mallory.senderId);
  assert.equal(out.inviterIsAdmin, false);
  // The admin's own invite says admin.
  const fromAdmin = kr.acceptInvite(openInvite(sealInvite(t1.grant('#'), t1.adminIdentity(), newcomer.publicId), newcomer));
  assert.equal(fromAdmin.inviterIsAdmin, true);
  assert.equal(fromAdmin.epoch, 1);
  assert.equal(fromAdmin.inviter, t0.adminIdentity().senderId);
});

test('client.addKeys refuses an invite past the 256-dictionary bound whole: its grant is not added', async () => {
  const [a, b] = [TreeKey.generate('full-a'), TreeKey.generate('full-b')];
  const full = new Keyring();
  full.addTreeKey(a);
  const enc = new TextEncoder();
  for (let i = 0; i < 256; i++) full.addDictionary(enc.encode(`{"room":"r${i}","celsius":21.5}`.repeat(3)));
  assert.throws(() => full.addDictionary(dictBytes), (e) => e.code === 'KEY', 'the keyring is full');
  const [me, inviter] = [Identity.generate(), Identity.generate()];
  const client = await connect({ identity: me, keys: full });
  const dict = new Keyring();
  dict.addDictionary(dictBytes);
  const invite = openInvite(sealInvite(b.grant('#'), inviter, me.publicId, { dictionaries: dict }), me);
  assert.throws(() => client.addKeys(invite), (e) => e.code === 'KEY' && /dictionar/i.test(e.message));
  // Nothing of it was added: no grant of tree B to seal with.
  await assert.rejects(client.publish('sensor/x', 1, { ack: true, tree: b.treeId }), /no key covers/);
  // Control: the same grant without a dictionary is accepted, and seals.
  client.addKeys(openInvite(sealInvite(b.grant('#'), inviter, me.publicId), me));
  await client.publish('sensor/x', 2, { ack: true, tree: b.treeId });
});
