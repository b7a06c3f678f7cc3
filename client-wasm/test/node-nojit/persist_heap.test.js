// The IndexedDB heap test, in a directory of its own that `npm test` runs with V8's
// optimizing compiler off (`--no-opt`): its 160,000 publishes through the module's JS glue
// sometimes killed Node 20 with a fatal error in V8's deoptimizer ("unreachable code" in
// Deoptimizer::DoComputeBuiltinContinuation: wave 2 sessions 53 and 55, about one full
// run in three) — a V8 bug, not the client's; without optimized code there is nothing to
// deoptimize. What it measures (the heap) does not depend on the compiler.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRelay } from '../shared/relay.js';
import { fakeIndexedDB } from '../shared/fake-indexeddb.js';
import { Client, TreeKey } from '../../js/index.node.js';

let relay;
before(async () => {
  relay = await startRelay();
});
after(async () => {
  delete globalThis.indexedDB;
  await relay?.stop();
});

/** Closes `c` once the test ends, also when it failed. */
function closeAfter(t, c) {
  t.after(async () => {
    try {
      await c.close();
    } catch {}
  });
}

// Review: each asynchronous write chained the client's write gate with
// `Promise.all([gate, write])`, whose value is [the previous gate's value, …]: every gate
// held its predecessor's array, one more for every IndexedDB write for the life of the
// client (~60 bytes a write: hundreds of MB a day in a busy tab). Kept QoS 1 publishes are
// saved one write each (and their PubAcks after): 150,000 more of them after a warm-up
// leave the heap as it was (−0.5 to +0.2 MB measured; bound 8 MB) — 18.8 MB larger with the
// chain. The database is a sink that keeps nothing (the rows a real one holds until its
// next compaction swung the heap by ±2 MB), and the count is large because a loaded
// machine's heap varied by up to 3 MB at 50,000. (A bound on memory, not on time.)
test('IndexedDB writes leave nothing behind on the heap', { timeout: 300_000 }, async (t) => {
  // `npm test` starts node with --expose-gc. Setting the flag at run time instead (the
  // fallback, for a run without it) can crash V8 later in the process (a fatal error in its
  // deoptimizer, seen about one run in six).
  let gc = globalThis.gc;
  if (!gc) {
    const v8 = await import('node:v8');
    const vm = await import('node:vm');
    v8.setFlagsFromString('--expose-gc');
    gc = vm.runInNewContext('gc');
  }
  const heap = () => {
    gc();
    gc();
    return process.memoryUsage().heapUsed;
  };
  const tree = TreeKey.generate('heap');
  const sink = fakeIndexedDB({ keep: false });
  globalThis.indexedDB = sink.factory; // read at open only
  const c = await Client.connect(relay.url, { keys: tree, persistence: { indexedDB: 'heap' } }).finally(
    () => delete globalThis.indexedDB,
  );
  closeAfter(t, c);
  const publish = async (n) => {
    for (let i = 0; i < n; i += 1000) {
      // A plain loop, not Array.from with a callback: V8 (Node 20) sometimes died with a
      // fatal error deoptimizing the builtin's continuation around this callback
      // ("unreachable code" in Deoptimizer::DoComputeBuiltinContinuation).
      const sent = [];
      for (let j = 0; j < 1000; j++) sent.push(c.publish('heap/x', i + j, { qos: 1 }));
      await Promise.all(sent);
    }
    await c.persisted();
  };
  await publish(10_000);
  const commits = sink.commits;
  const before = heap();
  await publish(150_000);
  const grown = heap() - before;
  assert.ok(sink.commits - commits >= 150_000, `one write a publish at least: ${sink.commits - commits}`);
  console.log(`# heap grew ${grown} bytes over ${sink.commits - commits} writes`);
  assert.ok(grown < 8e6, `the heap grew ${grown} bytes over ${sink.commits - commits} writes`);
});
