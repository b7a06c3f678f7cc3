// A TCP proxy in front of the relay whose two directions can be paused separately: a paused
// direction stops reading, so the kernel buffers fill and the sender's socket backs up (the
// client's send buffer for `up`, the relay's outbound queue for `down`).
import net from 'node:net';

/**
 * Listens on 127.0.0.1 (a free port) and forwards every connection to `port`.
 * Returns { url, port, pause(dir), resume(dir), close() } with dir `up` (client → relay)
 * or `down` (relay → client).
 */
export async function startProxy(port) {
  const paused = { up: false, down: false };
  // Per direction, the sockets whose reads carry that direction.
  const readers = { up: new Set(), down: new Set() };
  const server = net.createServer((client) => {
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
    close() {
      for (const s of [...readers.up, ...readers.down]) s.destroy();
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
 * Publishes `{ i, pad }` (32 KiB of padding) on `topic` with `pub` in rounds of 16, each
 * round flushed (the relay has routed it), until the relay reports dropped messages.
 * Returns how many were published.
 */
export async function publishUntilDropped(relay, pub, topic) {
  const pad = new Uint8Array(32 * 1024);
  let sent = 0;
  while ((await relayMetric(relay, 'whispeer_relay_dropped_messages_total')) === 0) {
    for (let k = 0; k < 16; k++) await pub.publish(topic, { i: sent++, pad });
    await pub.flush();
  }
  return sent;
}
