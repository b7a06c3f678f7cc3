// A client in a child process, for the persistence tests (a parent kills it with SIGKILL).
// argv: relay URL, tree key string, persistence file ('' for none), identity secret
// string ('' for none; the same identity resumes its durable subscriptions). Reads commands as
// JSON lines on stdin and reports on stdout, one JSON line each:
//   {op:'pub', topic, i, qos} → {ev:'called', i} once `publish` returned (its promise not
//                               awaited), later {ev:'acked', i, seq} or {ev:'failed', i}
//   {op:'sub', topic, durable, replay} → {ev:'subscribed'}, then {ev:'got', i} per message,
//                               printed by the callback (the app has it), QoS 1
//   {op:'stats'}              → {ev:'stats', stats}
//   {op:'persisted'}          → {ev:'persisted'} once `client.persisted()` resolved (what the
//                               app took so far is in the state file)
//   {op:'pubdie', topic, is, qos} → publishes each of `is` in one turn of the event loop,
//                               then SIGKILLs itself before any other task or microtask
//                               can run (nothing is printed)
// First line: {ev:'ready'} once connected (connect retries until the relay is there).
import { createInterface } from 'node:readline';
import { Client, Identity, TreeKey } from '../../js/index.node.js';

const [url, key, file, identity] = process.argv.slice(2);
const say = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const client = await Client.connect(url, {
  keys: TreeKey.fromKeyString(key),
  retryFirstConnect: true,
  reconnect: { initialDelayMs: 20, maxDelayMs: 200 },
  ...(file ? { persistence: file } : {}),
  ...(identity ? { identity: Identity.fromSecretString(identity) } : {}),
});
client.on('error', (e) => say({ ev: 'error', message: String(e?.message ?? e) }));
say({ ev: 'ready' });
for await (const line of createInterface({ input: process.stdin })) {
  const c = JSON.parse(line);
  if (c.op === 'pub') {
    const p = client.publish(c.topic, { i: c.i }, { qos: c.qos });
    say({ ev: 'called', i: c.i });
    p.then(
      (seq) => say({ ev: 'acked', i: c.i, seq }),
      (e) => say({ ev: 'failed', i: c.i, message: e.message }),
    );
  } else if (c.op === 'pubdie') {
    for (const i of c.is) client.publish(c.topic, { i }, { qos: c.qos }).catch(() => {});
    process.kill(process.pid, 'SIGKILL');
  } else if (c.op === 'sub') {
    await client.subscribe(c.topic, (m) => say({ ev: 'got', i: m.value.i }), {
      qos: 1,
      durable: c.durable,
      replay: c.replay,
    });
    say({ ev: 'subscribed' });
  } else if (c.op === 'stats') {
    say({ ev: 'stats', stats: client.stats() });
  } else if (c.op === 'persisted') {
    await client.persisted();
    say({ ev: 'persisted' });
  }
}
