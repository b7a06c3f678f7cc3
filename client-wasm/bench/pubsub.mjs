// npm publish→deliver throughput in Node with a same-process subscriber, against the real
// relay binary (WHISPEER_RELAY_BIN or <target>/release/whispeer-relay):
//   node bench/pubsub.mjs [N=20000] [qos=0] [pipe]   (pipe: QoS ≥ 1 publishes not awaited one
//   by one; all acks awaited at the end)
// A plain `await client.publish(…)` loop; the subscriber counts what arrives and what it is
// told it lost. Prints delivered msgs/s over the time from the first publish to the last
// delivery (or loss report). BENCH_SIGN=0: unsigned messages (no Ed25519 sign/verify, so
// the driver's own cost shows). BENCH_PERSIST=1: both clients with `persistence` (a file
// each in a temp dir); BENCH_PERSIST=fsync: with `fsync: true`.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRelay } from '../test/shared/relay.js';
import { Client, Identity, TreeKey } from '../js/index.node.js';

const N = Number(process.argv[2] ?? 20_000);
const qos = Number(process.argv[3] ?? 0);
const pipe = process.argv[4] === 'pipe';
const sign = process.env.BENCH_SIGN !== '0';
const persist = process.env.BENCH_PERSIST;
const stateDir = persist ? mkdtempSync(join(tmpdir(), 'whispeer-bench-')) : null;
const id = (name) => ({
  ...(sign ? { identity: Identity.generate() } : { sign: false }),
  ...(persist ? { persistence: { path: join(stateDir, name), fsync: persist === 'fsync' } } : {}),
});
const relay = await startRelay();
try {
  const tree = TreeKey.generate('bench');
  const sub = await Client.connect(relay.url, { keys: tree, ...id('sub.wsp') });
  const pub = await Client.connect(relay.url, { keys: tree, ...id('pub.wsp') });
  let got = 0;
  let lost = 0;
  let done;
  const finished = new Promise((r) => (done = r));
  const check = () => got + lost >= N && done();
  const s = await sub.subscribe('bench/x', () => {
    got++;
    check();
  }, { ...(qos ? { qos } : {}), onLag: (n) => { lost += n; check(); } });
  const t0 = performance.now();
  const acks = [];
  for (let i = 0; i < N; i++) {
    const p = pub.publish('bench/x', { i, text: 'hello world' }, qos ? { qos } : {});
    if (pipe) acks.push(p);
    else await p;
  }
  await Promise.all(acks);
  const tPub = performance.now();
  await pub.flush();
  await Promise.race([finished, new Promise((r) => setTimeout(r, 30_000))]);
  const t1 = performance.now();
  const secs = (t1 - t0) / 1000;
  console.log(JSON.stringify({
    n: N, qos, pipe, sign, persist: persist || 'off', delivered: got, lost, unaccounted: N - got - lost,
    publishMsgsPerSec: Math.round(N / ((tPub - t0) / 1000)),
    deliveredMsgsPerSec: Math.round(got / secs), seconds: +secs.toFixed(2),
  }));
  void s;
  await sub.close();
  await pub.close();
} finally {
  await relay.stop();
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
}
