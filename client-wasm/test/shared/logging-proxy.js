// A WebSocket proxy in front of a relay that records what clients send: the type byte of
// every frame (`up`, PROTOCOL §3: byte 2 of a frame whose map and type fit one byte each)
// and the frames themselves (`frames`). Used to see when Acks, Pings and Subs leave.
// `holdDown(pred)`: frames from the relay that `pred(frame, conn)` picks are held back, never
// forwarded (as if the relay had not sent them yet); `conn` counts connections from 1.
import { once } from 'node:events';
import { WebSocketServer, WebSocket } from 'ws';

/** A WebSocket proxy in front of `target` recording the type of every frame clients send. */
export async function loggingProxy(target) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const up = [];
  const frames = [];
  let last = null; // the newest connection's socket to the relay
  let hold = null; // (frame, conn) => whether to hold a relay frame back
  const held = [];
  const waiters = []; // { n, resolve }: `whenHeld(n)` calls waiting for n held frames
  let conns = 0;
  wss.on('connection', (client) => {
    const conn = ++conns;
    const relay = new WebSocket(target);
    last = relay;
    const queued = [];
    relay.on('open', () => {
      for (const d of queued.splice(0)) relay.send(d);
    });
    client.on('message', (d) => {
      up.push(d[2]);
      frames.push(Buffer.from(d));
      if (relay.readyState === WebSocket.OPEN) relay.send(d);
      else queued.push(d);
    });
    relay.on('message', (d) => {
      if (hold?.(d, conn)) {
        held.push(Buffer.from(d));
        for (const w of waiters.splice(0)) {
          if (held.length >= w.n) w.resolve();
          else waiters.push(w);
        }
      } else if (client.readyState === WebSocket.OPEN) client.send(d);
    });
    client.on('close', () => relay.close());
    relay.on('close', () => client.close());
    client.on('error', () => {});
    relay.on('error', () => {});
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}`,
    up,
    frames,
    count: (type) => up.filter((t) => t === type).length,
    /** Relay frames held back by `holdDown`. */
    held,
    /** Resolves once `n` relay frames have been held back (an event, not a poll). */
    whenHeld: (n) =>
      held.length >= n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve })),
    /** Holds back (never forwards) the relay frames `pred(frame, conn)` picks. */
    holdDown: (pred) => {
      hold = pred;
    },
    /** Sends `frame` to the relay on the newest connection, as its client would. */
    inject: (frame) => last.send(frame),
    close: () => {
      for (const c of wss.clients) c.terminate();
      return new Promise((r) => wss.close(r));
    },
  };
}

