// A TCP proxy in front of the relay whose two directions can be paused separately: a paused
// direction stops reading, so the kernel buffers fill and the sender's socket backs up (the
// client's send buffer for `up`, the relay's outbound queue for `down`).
import net from 'node:net';

/**
 * Listens on 127.0.0.1 (a free port) and forwards every connection to `port`.
 * Returns { url, port, pause(dir), resume(dir), connections, opened(n), idle(), drop(),
 * close() } with dir `up` (client → relay) or `down` (relay → client).
 */
export async function startProxy(port) {
  const paused = { up: false, down: false };
  // Per direction, the sockets whose reads carry that direction.
  const readers = { up: new Set(), down: new Set() };
  let accepted = 0;
  const waits = []; // { done: () => boolean, resolve }
  const settle = () => {
    for (const w of waits.filter((w) => w.done())) {
      waits.splice(waits.indexOf(w), 1);
      w.resolve();
    }
  };
  const when = (done) => new Promise((resolve) => (done() ? resolve() : waits.push({ done, resolve })));
  const server = net.createServer((client) => {
    accepted++;
    client.on('close', () => queueMicrotask(settle));
    const relay = net.connect(port, '127.0.0.1');
    const forward = (dir, from, to) => {
      readers[dir].add(from);
      from.on('data', (d) => {
        if (!to.write(d)) from.pause();
      });
      to.on('drain', () => !paused[dir] && from.resume());
      from.on('close', () => {
        readers[dir].delete(from);
        to.destroy();
      });
      from.on('error', () => to.destroy());
      if (paused[dir]) from.pause();
    };
    forward('up', client, relay);
    forward('down', relay, client);
    settle();
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const own = server.address().port;
  return {
    port: own,
    url: `ws://127.0.0.1:${own}`,
    pause(dir) {
      paused[dir] = true;
      for (const s of readers[dir]) s.pause();
    },
    resume(dir) {
      paused[dir] = false;
      for (const s of readers[dir]) s.resume();
    },
    /** Client connections open now. */
    get connections() {
      return readers.up.size;
    },
    /** Resolves once `n` client connections have been accepted in all. */
    opened(n) {
      return when(() => accepted >= n);
    },
    /** Resolves once no client connection is open. */
    idle() {
      return when(() => readers.up.size === 0);
    },
    /** Cuts every open connection (both sides see it close). */
    drop() {
      for (const s of [...readers.up, ...readers.down]) s.destroy();
    },
    close() {
      this.drop();
      return new Promise((r) => server.close(r));
    },
  };
}

/** The relay's Prometheus counter `name` (from its admin address). */
export async function relayMetric(relay, name) {
  const text = await (await fetch(`http://${relay.admin}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`metric ${name} not found`);
  return Number(line.split(' ')[1]);
}

/**
 * Makes the relay drop messages for a slow subscriber and owe it a `Gap`: `proxy` (between
 * the relay and the subscriber) stops passing what the relay sends; `pub` publishes `{ i,
 * pad }` (i = 0, 1, …; 32 KiB of padding) on `topic` in flushed rounds of 16 until the
 * relay's dropped-messages counter moves; then the proxy passes again and one last message
 * `{ i: n }` follows. The relay sends every `Gap` before the batch after it, so once
 * `lastArrived(n)` resolves every loss has reached the subscriber. Returns { published,
 * dropped } (dropped: the relay's count after the last message, which may still push out
 * an older one while the queue drains).
 */
export async function forceRelayGap({ relay, proxy, pub, topic, lastArrived }) {
  const dropped = () => relayMetric(relay, 'whispeer_relay_dropped_messages_total');
  const pad = new Uint8Array(32 * 1024);
  let n = 0;
  proxy.pause('down');
  while ((await dropped()) === 0) {
    if (n >= 4096) throw new Error(`the relay dropped nothing of ${n} messages (128 MiB)`);
    for (let k = 0; k < 16; k++) await pub.publish(topic, { i: n++, pad });
    await pub.flush();
  }
  proxy.resume('down');
  await pub.publish(topic, { i: n });
  await lastArrived(n);
  return { published: n + 1, dropped: await dropped() };
}
