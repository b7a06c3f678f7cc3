// The client side of a scenario (tests/scenarios/README.md): clients, their subscriptions
// (a reader that takes messages while reading is on) and their publish loops, over the npm
// package `W` — `js/index.node.js` in Node, `js/index.browser.js` in Chromium (the page
// imports this file too). The runner (runner.js) keeps the relay, the proxies and the
// expectations, and reads the state through `snapshot()`.

/** Payload of message `i`: `i` as 8 bytes big-endian, then zeros up to `size`. */
export function payload(i, size) {
  const b = new Uint8Array(Math.max(8, size));
  new DataView(b.buffer).setBigUint64(0, BigInt(i));
  return b;
}

export function indexOf(p) {
  if (!(p instanceof Uint8Array) || p.length < 8) return Number.MAX_SAFE_INTEGER;
  return Number(new DataView(p.buffer, p.byteOffset, p.byteLength).getBigUint64(0));
}

export function makeActors(W) {
  const clients = new Map(); // name → { client, acked: [[topic, i]], sent, failed: [], running }
  const subs = new Map(); // name → { client, received: [[topic, i]], sub, reading, wake }

  const client = (name) => {
    const c = clients.get(name);
    if (!c) throw new Error(`no client ${name}`);
    return c;
  };

  return {
    /** `keys`: a tree key string; `identity`: a secret identity string. */
    async connect(name, url, { keys, identity, capacity }) {
      const opts = {
        identity: W.Identity.fromSecretString(identity),
        keys,
        reconnect: { initialDelayMs: 20, maxDelayMs: 200 },
      };
      if (capacity !== undefined) opts.subscriptionCapacity = capacity;
      const c = await W.Client.connect(url, opts);
      c.on('error', () => {}); // counted by the expectations, not printed
      clients.set(name, { client: c, acked: [], sent: 0, failed: [], running: 0 });
    },

    async subscribe(clientName, name, filter, opts, reading) {
      const sub = await client(clientName).client.subscribe(filter, opts);
      const rec = { client: clientName, received: [], sub, reading, wake: null };
      subs.set(name, rec);
      (async () => {
        for (;;) {
          while (!rec.reading) await new Promise((r) => (rec.wake = r));
          const r = await sub.next();
          if (r.done) return;
          rec.received.push([r.value.topic, indexOf(r.value.payload)]);
        }
      })().catch((e) => rec.received.push([`error: ${e.message}`, Number.MAX_SAFE_INTEGER]));
    },

    read(name, on) {
      const s = subs.get(name);
      if (!s) throw new Error(`no subscription ${name}`);
      s.reading = on;
      if (on && s.wake) {
        s.wake();
        s.wake = null;
      }
    },

    /** Publishes `count` messages from index `first`, at most `window` unresolved at a time. */
    async publish(name, topic, first, count, qos, size, window) {
      const a = client(name);
      a.running++;
      const inflight = new Set();
      for (let i = first; i < first + count; i++) {
        while (inflight.size >= window) await Promise.race(inflight);
        // publishBytes hands the message to the engine synchronously: in order.
        const p = a.client.publishBytes(topic, payload(i, size), { qos }).then(
          () => (qos === 0 ? a.sent++ : a.acked.push([topic, i])),
          (e) => a.failed.push(`${topic}:${i}: ${e.message}`),
        );
        const tracked = p.finally(() => inflight.delete(tracked));
        inflight.add(tracked);
      }
      await Promise.all(inflight);
      a.running--;
    },

    /** Best effort: a Ping/Pong round trip, at most `ms`. */
    async settle(name, ms) {
      let timer;
      await Promise.race([
        client(name).client.flush().catch(() => {}),
        new Promise((r) => (timer = setTimeout(r, ms))),
      ]).finally(() => clearTimeout(timer));
    },

    flush(name) {
      return client(name).client.flush();
    },

    close(name) {
      return client(name).client.close();
    },

    async closeAll(ms) {
      await Promise.all(
        [...clients.values()].map(({ client: c }) => {
          let timer;
          return Promise.race([c.close(), new Promise((r) => (timer = setTimeout(r, ms)))]).finally(() =>
            clearTimeout(timer),
          );
        }),
      );
    },

    has(kind, name) {
      return (kind === 'client' ? clients : subs).has(name);
    },

    /** The state the runner waits on and checks (plain data: it crosses into Node). */
    snapshot() {
      const out = { clients: {}, subs: {} };
      for (const [n, a] of clients) {
        const s = a.client.stats();
        out.clients[n] = {
          acked: a.acked,
          sent: a.sent,
          failed: a.failed,
          running: a.running,
          state: a.client.state,
          stats: { reconnects: s.reconnects, duplicates: s.duplicates, delivered: s.delivered, heldBack: s.heldBack },
        };
      }
      for (const [n, s] of subs) out.subs[n] = { client: s.client, received: s.received, lost: s.sub.lost };
      return out;
    },
  };
}
