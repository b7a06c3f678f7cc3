// The scenario suite's fault proxy (tests/scenarios/README.md, "proxy" step), the same
// semantics as the Rust runner's (client/tests/scenarios.rs): a TCP proxy on 127.0.0.1 in
// front of the relay's WebSocket port that can cut every open connection at once, stall
// either direction (stop reading it), and write every relay `Msg` frame twice toward the
// client.
import net from 'node:net';

/** The length of the complete WebSocket frame at the start of `b`, or 0 if not all there. */
export function wsFrameLen(b) {
  if (b.length < 2) return 0;
  let len = b[1] & 0x7f;
  let head = 2;
  if (len === 126) {
    if (b.length < 4) return 0;
    len = b.readUInt16BE(2);
    head = 4;
  } else if (len === 127) {
    if (b.length < 10) return 0;
    len = Number(b.readBigUInt64BE(2));
    head = 10;
  }
  if (b[1] & 0x80) head += 4;
  return b.length >= head + len ? head + len : 0;
}

/** A final, unmasked, uncompressed binary frame whose payload is a relay `Msg` (type 7). */
export function isMsgFrame(f) {
  const l = f[1] & 0x7f;
  const head = l === 126 ? 4 : l === 127 ? 10 : 2;
  return f[0] === 0x82 && (f[1] & 0x80) === 0 && f[head + 1] === 0 && f[head + 2] === 7;
}

/** Starts a proxy to 127.0.0.1:`port`: { url, cut(), stall(dir, on), duplicate(on), close() }. */
export async function startFaultProxy(port) {
  const stalled = { up: false, down: false };
  let dup = false;
  const conns = new Set(); // { client, relay }
  const server = net.createServer((client) => {
    const relay = net.connect(port, '127.0.0.1');
    const conn = { client, relay, cut: false };
    conns.add(conn);
    const end = () => {
      conns.delete(conn);
      client.destroy();
      relay.destroy();
    };
    client.on('error', end).on('close', end);
    relay.on('error', end).on('close', end);
    // Client → relay: as is.
    client.on('data', (d) => {
      if (!conn.cut && !relay.write(d)) client.pause();
    });
    relay.on('drain', () => !stalled.up && client.resume());
    // Relay → client: the HTTP upgrade answer as is, then whole WebSocket frames.
    let pending = Buffer.alloc(0);
    let upgraded = false;
    relay.on('data', (d) => {
      if (conn.cut) return;
      pending = Buffer.concat([pending, d]);
      const out = [];
      if (!upgraded) {
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) return;
        out.push(pending.subarray(0, end + 4));
        pending = pending.subarray(end + 4);
        upgraded = true;
      }
      for (let n; (n = wsFrameLen(pending)) > 0; pending = pending.subarray(n)) {
        const frame = pending.subarray(0, n);
        out.push(frame);
        if (dup && isMsgFrame(frame)) out.push(frame);
      }
      if (out.length && !client.write(Buffer.concat(out))) relay.pause();
    });
    client.on('drain', () => !stalled.down && relay.resume());
    if (stalled.up) client.pause();
    if (stalled.down) relay.pause();
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const own = server.address().port;
  return {
    url: `ws://127.0.0.1:${own}`,
    /** Drops every connection open now, both directions; nothing they hold is forwarded. */
    cut() {
      for (const c of [...conns]) {
        c.cut = true;
        c.client.destroy();
        c.relay.destroy();
      }
      conns.clear();
    },
    /** Stops (`on`) or resumes reading direction `dir`: `up` (client → relay) or `down`. */
    stall(dir, on) {
      stalled[dir] = on;
      for (const c of conns) {
        const s = dir === 'up' ? c.client : c.relay;
        if (on) s.pause();
        else s.resume();
      }
    },
    duplicate(on) {
      dup = on;
    },
    close() {
      this.cut();
      return new Promise((r) => server.close(r));
    },
  };
}
