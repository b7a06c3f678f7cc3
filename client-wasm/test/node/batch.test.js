// Batch signatures (PROTOCOL §4.14) in the npm client, against the real relay binary: the
// default signs publishes handed over in one turn of the event loop under one signature,
// each message still verifies alone and names its sender, order and acks hold; `sign:
// 'message'` signs each message alone; unknown modes are refused.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { relayPerFile } from '../shared/fixture.js';
import { Client, Identity, TreeKey } from '../../js/index.node.js';

const fx = relayPerFile();
const connect = (opts) => fx.connect(opts);

function collect(n) {
  const got = [];
  let done;
  const all = new Promise((r) => (done = r));
  return {
    all,
    cb: (m) => {
      got.push(m);
      if (got.length === n) done(got);
    },
  };
}

test('the default batch-signs a synchronous run of publishes; each message verifies alone', async () => {
  const tree = TreeKey.generate('batch');
  const pub = await connect({ keys: tree });
  const sub = await connect({ keys: tree });
  const N = 300;
  const c = collect(N);
  await sub.subscribe('b/#', c.cb);
  // Handed over in one turn (no await between them): batches of up to 64.
  const acks = [];
  for (let i = 0; i < N; i++) {
    const p = pub.publish(i % 2 ? 'b/odd' : 'b/even', i, i % 50 === 0 ? { qos: 1 } : {});
    acks.push(p);
  }
  const seqs = (await Promise.all(acks)).filter((s) => s !== undefined);
  assert.equal(seqs.length, N / 50, 'every QoS 1 publish in a batch is acknowledged');
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `acked in order: ${seqs}`);
  const got = await c.all;
  assert.deepEqual(got.map((m) => m.value), [...Array(N).keys()], 'publish order kept across batches');
  assert.ok(got.every((m) => m.sender === pub.senderId), 'each message names its sender');
  const hits = sub.stats().batchRootHits;
  assert.ok(hits >= N / 2, `most messages rode on an already verified signature (${hits} of ${N})`);
});

test("sign: 'message' signs each message alone; bad modes are refused", async () => {
  const tree = TreeKey.generate('batch');
  const pub = await connect({ keys: tree, sign: 'message' });
  const sub = await connect({ keys: tree });
  const c = collect(40);
  await sub.subscribe('m/#', c.cb);
  for (let i = 0; i < 40; i++) pub.publish('m/x', i);
  await pub.flush();
  const got = await c.all;
  assert.deepEqual(got.map((m) => m.value), [...Array(40).keys()]);
  assert.ok(got.every((m) => m.sender === pub.senderId));
  assert.equal(sub.stats().batchRootHits, 0, 'one signature per message');
  await assert.rejects(
    Client.connect(fx.relay.url, { identity: Identity.generate(), keys: tree, sign: 'sometimes' }),
    (e) => e.code === 'INVALID_OPTION' && /sign/.test(e.message),
  );
});
