// With IndexedDB persistence (asynchronous commits) an Ack leaves only once the dedup
// entry it covers is committed: the engine records the entry as the app takes a message
// and queues its Ack at once, while the transaction saving the entry commits later. Sent
// before the commit, a tab closed or crashed in between left the relay holding the Ack and
// the saved window without the message — accepted again after a restart (review, finding
// B). Node has no IndexedDB: a minimal in-memory one whose commits the test holds, a real
// relay, and a WebSocket proxy that logs the frames the client sends. Waits are on events.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { WebSocketServer, WebSocket } from 'ws';
import { startRelay } from '../shared/relay.js';
import { until } from '../shared/until.js';
import { Client, TreeKey } from '../../js/index.node.js';

/** Frame types (PROTOCOL §3), at byte 2 of a frame whose map and type fit one byte each. */
const ACK = 8;
const PING = 11;

/**
 * An in-memory IndexedDB (what js/persist.js uses of it). Read-write transactions apply
 * their operations and complete once `hold()`'s gate, if any when they started, is released.
 */
function fakeIndexedDB() {
  const dbs = new Map();
  let gate = null;
  const later = (f) => setImmediate(f);
  const request = () => ({ result: undefined, error: null, onsuccess: null, onerror: null, onupgradeneeded: null });
  const names = (m) => ({
    get length() {
      return m.size;
    },
    contains: (n) => m.has(n),
  });
  const connection = (d) => ({
    get version() {
      return d.version;
    },
    objectStoreNames: names(d.stores),
    createObjectStore(n) {
      d.stores.set(n, []);
    },
    close() {},
    transaction(n, mode) {
      const ops = [];
      const tx = {
        oncomplete: null,
        onerror: null,
        onabort: null,
        error: null,
        objectStore: () => ({
          add: (v) => ops.push((rows) => rows.push(v.slice())),
          clear: () => ops.push((rows) => rows.splice(0)),
          getAll() {
            const r = request();
            later(() => {
              r.result = d.stores.get(n).slice();
              r.onsuccess?.();
            });
            return r;
          },
        }),
      };
      const wait = mode === 'readwrite' ? gate : null;
      later(async () => {
        await wait;
        for (const op of ops) op(d.stores.get(n));
        if (mode === 'readwrite') fake.commits++;
        tx.oncomplete?.();
      });
      return tx;
    },
  });
  let release = () => {};
  const fake = {
    commits: 0,
    factory: {
      open(name, version) {
        const r = request();
        later(() => {
          let d = dbs.get(name);
          const fresh = !d;
          if (fresh) dbs.set(name, (d = { version, stores: new Map() }));
          r.result = connection(d);
          if (fresh) r.onupgradeneeded?.();
          r.onsuccess?.();
        });
        return r;
      },
    },
    /** Transactions started from now on commit only once `release()` is called. */
    hold() {
      let open;
      gate = new Promise((r) => (open = r));
      release = () => {
        gate = null;
        open();
      };
    },
    release: () => release(),
  };
  return fake;
}

/** A WebSocket proxy in front of `target` recording the type of every frame clients send. */
async function loggingProxy(target) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const up = [];
  wss.on('connection', (client) => {
    const relay = new WebSocket(target);
    const queued = [];
    relay.on('open', () => {
      for (const d of queued.splice(0)) relay.send(d);
    });
    client.on('message', (d) => {
      up.push(d[2]);
      if (relay.readyState === WebSocket.OPEN) relay.send(d);
      else queued.push(d);
    });
    relay.on('message', (d) => client.readyState === WebSocket.OPEN && client.send(d));
    client.on('close', () => relay.close());
    relay.on('close', () => client.close());
    client.on('error', () => {});
    relay.on('error', () => {});
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}`,
    up,
    count: (type) => up.filter((t) => t === type).length,
    close: () => {
      for (const c of wss.clients) c.terminate();
      return new Promise((r) => wss.close(r));
    },
  };
}

let relay;
let proxy;
const idb = fakeIndexedDB();
before(async () => {
  globalThis.indexedDB = idb.factory;
  relay = await startRelay();
  proxy = await loggingProxy(relay.url);
});
after(async () => {
  delete globalThis.indexedDB;
  await proxy?.close();
  await relay?.stop();
});

test('an Ack leaves only once the IndexedDB write of the dedup entry it covers committed', async () => {
  const tree = TreeKey.generate('acks');
  const pub = await Client.connect(relay.url, { keys: tree });
  const sub = await Client.connect(proxy.url, { keys: tree, persistence: { indexedDB: 'acks' } });
  let taken;
  const got = new Promise((r) => (taken = r));
  // The commits of the writes the take starts (its dedup entry) are held.
  await sub.subscribe(
    'job/x',
    (m) => {
      idb.hold();
      taken(m);
    },
    { qos: 1 },
  );
  await pub.publish('job/x', 7, { qos: 1 });
  assert.equal((await got).value, 7);
  const commits = idb.commits;
  // A flush after the take: its Ping passes the proxy after anything the take queued.
  const pings = proxy.count(PING);
  const flushed = sub.flush();
  await until(() => proxy.count(PING) > pings, 10_000);
  assert.equal(proxy.count(ACK), 0, 'no Ack reached the relay before the commit');
  assert.equal(idb.commits, commits, 'nothing committed meanwhile');

  idb.release();
  await until(() => proxy.count(ACK) === 1, 10_000);
  assert.ok(idb.commits > commits, 'the Ack followed the commit');
  await flushed;
  await sub.close();
  await pub.close();
});
