// Type-checked (never run) by `npm run test:types`: the declarations in js/index.d.ts say
// exactly what issue 9 added to messages, subscriptions and publish — `tsc --strict` accepts
// the right uses and each `@ts-expect-error` line proves a wrong one is refused (were a type
// `any`, or a field missing or misspelt, the directive itself would fail the check).
import {
  Client,
  Identity,
  Keyring,
  TreeKey,
  openInvite,
  sealInvite,
  type Message,
  type Provenance,
  type Subscription,
  type ClientStats,
  type ClientCore,
} from 'whispeer';

const tree = TreeKey.generate('types');
const client = await Client.connect('ws://127.0.0.1:7480', { keys: tree, identity: Identity.generate() });

// Messages: which tree and epoch opened them, and how the grant is held.
function describe(m: Message): string {
  const tree: string = m.treeId;
  const epoch: number = m.epoch;
  const p: Provenance = m.provenance;
  switch (p.kind) {
    case 'admin-signed':
      return `${tree}@${epoch}: admin-signed`;
    case 'derived':
      return `${tree}@${epoch}: derived from ${p.from}`;
    case 'delegated':
      return `${tree}@${epoch}: delegated by ${p.by}`;
    default: {
      const never: never = p; // every kind is handled
      return never;
    }
  }
}
const sub: Subscription<{ celsius: number }> = await client.subscribe<{ celsius: number }>(
  'sensor/#',
  (m) => {
    const c: number = m.value.celsius;
    console.log(describe(m), c);
  },
  { onLag: (lost: number) => console.warn(`lost ${lost}`) },
);
// At-most-once loss: counters on the subscription, an event on the client, stats.
const lost: number = sub.lost;
const dropped: number = sub.dropped;
const off: () => void = client.on('lag', (e) => {
  const n: number = e.lost;
  const s: Subscription<unknown> = e.subscription;
  console.warn(s.filter, n);
});
off();
const stats: ClientStats = client.stats();
const gaps: number = stats.relayGaps;
const refused: number = stats.refused.unlistedSender + stats.refused.retainedRollback;
declare const core: ClientCore; // the low-level core seals without a connection
const env: Uint8Array = core.sealEnvelope('sensor/x', 'application/cbor', new Uint8Array(1));
const envs: Uint8Array[] = core.sealEnvelopes('sensor/x', 'application/cbor', [new Uint8Array(1)]);
const coreStats: number = stats.unackedPublishes + stats.sealingPublishes + stats.slowSubscriberDrops + env.length;
// Invites carry the dictionaries of a keyring (or listed ones); accepting adds them.
const ring = new Keyring();
const dictId: string = ring.addDictionary(new Uint8Array(64));
const bob = Identity.generate();
const inv: string = sealInvite(tree.grant('sensor/#'), Identity.generate(), bob.publicId, { dictionaries: ring, ttlMs: 1000 });
const opened = openInvite(inv, bob);
const ids: string[] = opened.dictionaryIds;
const strings: string[] = opened.dictionaries;
new Keyring().acceptInvite(opened);
client.addKeys(opened);
console.log(dictId, ids, strings);
// @ts-expect-error dictionaries are strings, bytes or a Keyring
sealInvite(tree.grant('#'), bob, bob.publicId, { dictionaries: 42 });
// QoS 1, replay, durable.
const acked: number | undefined = await client.publish('sensor/x', 1, { qos: 1, retain: true });
const durable = await client.subscribe('sensor/#', { qos: 1, durable: 'inbox', replay: { last: 10 }, retained: false });
const replayedTo: number | undefined = durable.replayedTo;
console.log(acked, replayedTo);
// @ts-expect-error qos is 0, 1 or 2
await client.publish('sensor/x', 1, { qos: 3 });
// @ts-expect-error a replay names one start
await client.subscribe('sensor/#', { replay: { from: 1 } });
// Publish: the tree to seal with, and waiting on the socket (bufferedAmount).
const seq: number | undefined = await client.publish('sensor/x', { celsius: 1 }, { tree: tree.treeId, ack: true });
const buffered: number = client.bufferedAmount;
await client.publishBytes('sensor/raw', new Uint8Array(1), { tree: tree.treeId, contentType: 'x/y' });
console.log(lost, dropped, gaps, refused, coreStats, seq, buffered);

// Wrong uses are refused.
declare const m: Message;
// @ts-expect-error treeId is a hex string, not a number
const t1: number = m.treeId;
// @ts-expect-error epoch is a number
const e1: string = m.epoch;
// @ts-expect-error an admin-signed provenance has no `by`
if (m.provenance.kind === 'admin-signed') console.log(m.provenance.by);
// @ts-expect-error a delegated provenance names `by`, not `from`
if (m.provenance.kind === 'delegated') console.log(m.provenance.from);
// @ts-expect-error no such provenance kind
if (m.provenance.kind === 'verified') console.log(m);
// @ts-expect-error the tree is given as its hex id
await client.publish('sensor/x', 1, { tree: 7 });
// @ts-expect-error onLag receives the number lost
await client.subscribe('a', { onLag: (n: string) => n });
// @ts-expect-error the lag event carries `lost`, not `count`
client.on('lag', (e) => e.count);
// @ts-expect-error lost is read-only
sub.lost = 0;
console.log(t1, e1);

// Persistence: a file path (Node.js) or IndexedDB (browsers); nothing else.
const saved = await Client.connect('ws://127.0.0.1:7480', { keys: tree, persistence: 'state.wsp' });
await saved.persisted();
await Client.connect('ws://127.0.0.1:7480', { keys: tree, persistence: { path: 'state.wsp', fsync: true } });
await Client.connect('ws://127.0.0.1:7480', { keys: tree, persistence: { indexedDB: 'whispeer-state' } });
// @ts-expect-error a file store takes a path, not a number
await Client.connect('ws://127.0.0.1:7480', { keys: tree, persistence: { path: 7 } });
// @ts-expect-error IndexedDB has no fsync option
await Client.connect('ws://127.0.0.1:7480', { keys: tree, persistence: { indexedDB: 'x', fsync: true } });
