// A relay that misbehaves after its Welcome cannot make the npm client hold memory without
// bound or keep close() from ending. The relay is real up to its Welcome (a WebSocket
// proxy passes the handshake to the relay binary), then the proxy plays the hostile relay.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { WebSocketServer, WebSocket } from 'ws';
import { startRelay } from '../shared/relay.js';
import { Client, Identity, TreeKey, decodeValue, encodeValue } from '../../js/index.node.js';
import { setWebSocket } from '../../js/client.js';
import { wasmMemory } from '../../pkg/whispeer_wasm.js';

let relay;
before(async () => {
  relay = await startRelay();
});
after(async () => {
  await relay?.stop();
});

/** A relay `Ping` frame (PROTOCOL §3: map {0: type 11, 1: nonce}), nonce < 24. */
const ping = (n) => Uint8Array.of(0xa2, 0x00, 0x0b, 0x01, n % 24);

/**
 * A WebSocket server in front of the relay: the client's first frame (Hello) goes to the
 * relay and the relay's first frame (Welcome) back; the relay is then out of the loop, and
 * `hostile(client)` runs at the client's next frame (the test's `flush()`: its listeners
 * are in place by then).
 */
async function hostileRelay(hostile) {
  const wss = new WebSocketServer({ port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const sockets = [];
  wss.on('connection', (client) => {
    sockets.push(client);
    const up = new WebSocket(relay.url);
    sockets.push(up);
    let greeted = false;
    client.on('message', (d) => {
      if (!greeted) up.readyState === WebSocket.OPEN ? up.send(d) : up.once('open', () => up.send(d));
    });
    up.on('message', (d) => {
      if (greeted) return;
      greeted = true;
      client.send(d);
      up.close();
      client.once('message', (first) => hostile(client, new Uint8Array(first)));
    });
    client.on('error', () => {});
    up.on('error', () => {});
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}`,
    close: () => {
      for (const s of sockets) s.terminate();
      return new Promise((r) => wss.close(r));
    },
  };
}

/** A client of `fake` with `options`; it never redials within a test (60 s backoff). */
const connectTo = (fake, name, options = {}) =>
  Client.connect(fake.url, {
    identity: Identity.generate(),
    keys: TreeKey.generate(name),
    reconnect: { initialDelayMs: 60_000, maxDelayMs: 60_000 },
    ...options,
  });

/** Resolves with the reason of the client's first `reconnecting` state. */
const dropped = (c) =>
  new Promise((resolve) => {
    const off = c.on('state', (s, d) => {
      if (s === 'reconnecting') {
        off?.();
        resolve(d?.reason ?? '');
      }
    });
  });

test('a relay that stops reading while it makes the client answer is hung up on', { timeout: 120_000 }, async () => {
  let stop = false;
  const fake = await hostileRelay((client) => {
    client.pause(); // reads nothing more: the client's Pongs pile up
    const flood = () => {
      if (stop || client.readyState !== WebSocket.OPEN) return;
      for (let i = 0; i < 2000; i++) client.send(ping(i));
      setImmediate(flood);
    };
    flood();
  });
  const small = 64 * 1024;
  const c = await connectTo(fake, 'hostile', {
    keptBytes: small,
    reconnectBuffer: small,
    sendHighWaterMark: small,
    maxFrame: 4096,
  });
  try {
    const gone = dropped(c);
    c.flush().catch(() => {});
    const reason = await gone;
    assert.match(reason, /the relay is not reading: \d+ bytes unsent \(limit 212992\)/);
  } finally {
    stop = true;
    await c.close();
    await fake.close();
  }
});

/**
 * A relay that stops reading once the client's first frame after Welcome came and sends
 * a Ping every 500 ms (so the client's heartbeat never runs out), never a Pong.
 */
const pausedRelay = () => {
  const timers = [];
  return hostileRelay((client) => {
    client.pause(); // the socket is read no more: the kernel buffers fill, then the client's
    let n = 0;
    timers.push(setInterval(() => client.readyState === WebSocket.OPEN && client.send(ping(n++)), 500));
  }).then((fake) => ({
    ...fake,
    close: () => {
      for (const t of timers) clearInterval(t);
      return fake.close();
    },
  }));
};

/** `p`, or a rejection naming `what` after `ms` (so a test fails rather than hangs). */
function within(p, ms, what) {
  let timer;
  return Promise.race([
    p,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// Review finding (A): a relay that stops reading after Welcome but sends a Ping now and then
// kept the client for good: under the send limit nothing ended the connection, publishes
// waited over sendHighWaterMark, a QoS 1 publish never settled, and with several relay URLs
// the client never failed over.
test('a relay that stops reading but keeps the heartbeat alive is left for the next relay', { timeout: 300_000 }, async () => {
  const fake = await pausedRelay();
  const c = await Client.connect([fake.url, relay.url], {
    identity: Identity.generate(),
    keys: TreeKey.generate('stalled'),
    compression: 'none',
    connectTimeoutMs: 2000,
    reconnect: { initialDelayMs: 60_000, maxDelayMs: 60_000 },
  });
  try {
    assert.equal(c.url, fake.url);
    const gone = dropped(c);
    // 64 MiB of random (incompressible) chunks, more than the kernel's socket buffers can
    // take (some 5 MiB here; 36 MiB at most with Linux's default limits): the socket's send
    // buffer then stays over the high-water mark, and the rest wait in publish order.
    const chunk = randomBytes(256 * 1024);
    for (let i = 0; i < 256; i++) c.publishBytes('big/x', chunk).catch(() => {});
    const seq = c.publish('after/x', 'kept', { qos: 1 });
    seq.catch(() => {});
    const reason = await within(gone, 120_000, 'the drop');
    assert.match(reason, /the relay is not reading: \d+ bytes unsent, none taken for 2000 ms \(connectTimeoutMs\)/);
    assert.ok((await within(seq, 120_000, 'the QoS 1 publish')) > 0, 'the next relay stored it');
    assert.equal(c.url, relay.url);
    assert.equal(c.state, 'connected');
  } finally {
    await within(c.close(), 120_000, 'close()');
    await fake.close();
  }
});

test('close() waits at most connectTimeoutMs for a relay that reads nothing to answer its Close', { timeout: 120_000 }, async () => {
  const fake = await pausedRelay();
  const c = await connectTo(fake, 'close', { connectTimeoutMs: 1000 });
  // Its first frame after Welcome stops the relay reading: the flush's Ping.
  c.flush().catch(() => {});
  const start = performance.now();
  try {
    // The flush waits up to connectTimeoutMs, the Close as long: `ws` alone waited 30 s for
    // the close handshake, keeping Node alive.
    await within(c.close(), 60_000, 'close()');
    const ms = performance.now() - start;
    assert.ok(ms < 20_000, `close() took ${Math.round(ms)} ms (ws's own close timeout is 30 s)`);
    assert.equal(c.state, 'closed');
  } finally {
    await fake.close();
  }
});

for (const [how, options] of [
  ['refused by the ws package before it is buffered', true],
  ['refused before it is copied into wasm memory', false],
]) {
  test(`a frame over maxFrame is ${how}`, { timeout: 60_000 }, async () => {
    setWebSocket(WebSocket, options);
    const fake = await hostileRelay((client) => client.send(new Uint8Array(4097)));
    const c = await connectTo(fake, 'big', { maxFrame: 4096 });
    try {
      const gone = dropped(c);
      c.flush().catch(() => {});
      const reason = await gone;
      if (options) assert.match(reason, /1009|Max payload size exceeded/, reason);
      else assert.match(reason, /the relay sent a 4097-byte frame, over maxFrame \(4096\)/);
    } finally {
      setWebSocket(WebSocket, true);
      await c.close();
      await fake.close();
    }
  });
}

test('close() ends though the relay never answers its flush', { timeout: 60_000 }, async () => {
  let pinged = false;
  const fake = await hostileRelay((client) => {
    pinged = true; // close()'s flush Ping started this
    // Answers every frame of the client's with a Ping of its own — the client's Pong to it
    // comes back, so the relay never goes quiet — and never a Pong.
    let n = 0;
    client.send(ping(n++));
    client.on('message', () => client.readyState === WebSocket.OPEN && client.send(ping(n++)));
  });
  const c = await connectTo(fake, 'quiet', { connectTimeoutMs: 300 });
  try {
    await c.close();
    assert.ok(pinged, 'the client sent its flush Ping, which went unanswered');
  } finally {
    await fake.close();
  }
});

test('error frames a relay sends without end are logged a few a minute, escapes shown as ?', { timeout: 60_000 }, async () => {
  const text = new TextEncoder().encode('\x1b[2J\x1b[31mpwned\nfake log line');
  // Err {0: 10, 1: code 17 (unknown_subscription), 2: text}, not fatal.
  const err = Uint8Array.of(0xa3, 0x00, 0x0a, 0x01, 0x11, 0x02, 0x78, text.length, ...text);
  const fake = await hostileRelay((client, ping) => {
    for (let i = 0; i < 50; i++) client.send(err);
    // Then the answer to the flush that started this (a Pong with the Ping's nonce):
    // the client has handled every Err when its flush resolves.
    const pong = ping.slice();
    pong[2] = 0x0c;
    client.send(pong);
  });
  const c = await connectTo(fake, 'noisy', { connectTimeoutMs: 300 }); // close()'s flush goes unanswered
  const logged = [];
  const original = console.error;
  console.error = (...args) => logged.push(args.map(String).join(' '));
  try {
    await c.flush();
  } finally {
    console.error = original;
    await c.close();
    await fake.close();
  }
  assert.equal(logged.length, 10, 'ten a minute, the rest counted');
  for (const l of logged) {
    assert.ok(!/[\u0000-\u001f]/.test(l), JSON.stringify(l));
    assert.match(l, /relay error: \?\[2J\?\[31mpwned\?fake log line/);
  }
});

test("a relay's refusal of a confirmed subscription is logged with its escapes shown as ?", { timeout: 60_000 }, async () => {
  const text = new TextEncoder().encode('\x1b]0;x\x07\nFAKE');
  const fake = await hostileRelay((client, sub) => {
    // The client's Sub {0: 3, 1: sub_id, …} (canonical CBOR: keys in order).
    assert.deepEqual([...sub.slice(1, 4)], [0x00, 0x03, 0x01]);
    const id = sub[4];
    assert.ok(id < 24, 'a one-byte sub_id');
    // SubOk {0: 5, 1: sub_id, 2: seq 0}: the subscription is confirmed …
    client.send(Uint8Array.of(0xa3, 0x00, 0x05, 0x01, id, 0x02, 0x00));
    // … then Err {0: 10, 1: 9 (not_allowed), 2: text, 3: false, 4: sub_id}: a confirmed
    // durable refused so ends, and nobody waits for it: the client's `error` event.
    client.send(Uint8Array.of(0xa5, 0x00, 0x0a, 0x01, 0x09, 0x02, 0x60 + text.length, ...text, 0x03, 0xf4, 0x04, id));
  });
  const c = await connectTo(fake, 'subrefused', { connectTimeoutMs: 300 });
  const logged = [];
  const original = console.error;
  console.error = (...args) => logged.push(args.map((a) => (a instanceof Error ? a.stack : String(a))).join(' '));
  try {
    const s = await c.subscribe('x/#', () => {}, { qos: 1, durable: 'd' });
    await new Promise((resolve) => {
      const t = setInterval(() => logged.length && (clearInterval(t), resolve()), 10);
    });
    assert.equal(s.qos, 1);
  } finally {
    console.error = original;
    await c.close();
    await fake.close();
  }
  assert.equal(logged.length, 1, JSON.stringify(logged));
  assert.ok(!/[\u0000-\u001f]/.test(logged[0].split('\n    at ')[0]), JSON.stringify(logged[0]));
  assert.match(logged[0], /\?\]0;x\?\?FAKE/);
});

test('in Node the ws package is used even where there is a global WebSocket (Node 22+)', { timeout: 60_000 }, () => {
  // A global WebSocket that says so when used, defined before the package loads.
  const preload = `data:text/javascript,globalThis.WebSocket = class { constructor() { throw new Error('the global WebSocket'); } };`;
  const script = `
    import { Client, TreeKey } from ${JSON.stringify(new URL('../../js/index.node.js', import.meta.url).href)};
    try {
      await Client.connect('ws://127.0.0.1:1', { keys: TreeKey.generate('g'), connectTimeoutMs: 2000 });
    } catch (e) {
      console.log(e.message);
    }`;
  const out = execFileSync(process.execPath, ['--import', preload, '--input-type=module', '-e', script], {
    encoding: 'utf8',
  });
  assert.doesNotMatch(out, /the global WebSocket/, out);
  assert.match(out, /ECONNREFUSED|cannot reach relay/, out);
});

/** `9f` + `80` × (n − 2) + `ff`: an array of n − 2 empty arrays, one CBOR data item a byte. */
function arrayOfEmptyArrays(n) {
  const b = new Uint8Array(n).fill(0x80);
  b[0] = 0x9f;
  b[n - 1] = 0xff;
  return b;
}

test('a CBOR bomb from a member arrives with a DECODE error, its value never built', { timeout: 120_000 }, async () => {
  const tree = TreeKey.generate('bomb');
  const c = await Client.connect(relay.url, { identity: Identity.generate(), keys: tree });
  const got = [];
  let arrived;
  const both = new Promise((r) => (arrived = r));
  try {
    await c.subscribe('bomb/x', (m) => {
      got.push(m);
      if (got.length === 2) arrived();
    });
    const before = wasmMemory().buffer.byteLength;
    // The member publishes from its own process, so this one's wasm memory is the
    // receiver's alone: 16 MiB of `80` (zstd: a few hundred bytes on the wire, within the
    // default maxPayload), then an ordinary value on the same topic.
    const script = `
      import { Client, Identity, TreeKey } from ${JSON.stringify(new URL('../../js/index.node.js', import.meta.url).href)};
      const n = 16 * 1024 * 1024;
      const bomb = new Uint8Array(n).fill(0x80);
      bomb[0] = 0x9f;
      bomb[n - 1] = 0xff;
      const c = await Client.connect(process.env.RELAY, { identity: Identity.generate(), keys: TreeKey.fromKeyString(process.env.KEY) });
      await c.publishBytes('bomb/x', bomb, { contentType: 'application/cbor', qos: 1 });
      await c.publish('bomb/x', { after: [1, 'two', 3.5] }, { qos: 1 });
      await c.close();`;
    const member = spawn(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, RELAY: relay.url, KEY: tree.toKeyString() },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    const [code] = await new Promise((r) => member.once('exit', (...a) => r(a)));
    assert.equal(code, 0, 'the member published both');
    await both;
    const grown = (wasmMemory().buffer.byteLength - before) / 2 ** 20;
    const [bomb, after] = got;
    assert.equal(bomb.contentType, 'application/cbor');
    assert.equal(bomb.payload.length, 16 * 1024 * 1024, 'the bytes are delivered');
    assert.equal(bomb.value, undefined);
    assert.equal(bomb.error?.code, 'DECODE');
    assert.match(bomb.error.message, /CBOR value too large to decode: more than 262144 CBOR data items/);
    // The ordinary value after it decodes as always.
    assert.deepEqual(after.value, { after: [1, 'two', 3.5] });
    assert.equal(after.error, undefined);
    // The 16 MiB payload itself is decompressed in wasm memory and copied out for JS (some
    // 32 MiB); decoding the bomb would have added some 64 bytes an item: over 1 GiB.
    assert.ok(grown < 64, `wasm memory grew by ${grown} MiB`);
  } finally {
    await c.close();
  }
});

test('decodeValue takes 2^18 CBOR data items and refuses one more', () => {
  const max = 2 ** 18;
  // An array and its max − 1 elements: max items.
  assert.equal(decodeValue(arrayOfEmptyArrays(max + 1)).length, max - 1);
  assert.throws(() => decodeValue(arrayOfEmptyArrays(max + 2)), {
    code: 'DECODE',
    message: `CBOR value too large to decode: more than ${max} CBOR data items`,
  });
  // 128 levels of nesting decode, 129 are refused.
  const nested = (levels) => Uint8Array.from({ length: levels }, (_, i) => (i === levels - 1 ? 0x80 : 0x81));
  assert.equal(decodeValue(nested(128)).flat(Infinity).length, 0);
  assert.throws(() => decodeValue(nested(129)), { code: 'DECODE', message: 'CBOR value too large to decode: nested deeper than 128' });
  // Malformed input is refused as before (truncated: no break, the end never reached).
  assert.throws(() => decodeValue(arrayOfEmptyArrays(max + 2).subarray(0, 100)), { code: 'DECODE', message: /^invalid CBOR/ });
});

// Review of ed2b215 (F4): the decoder's depth rule is the encoder's (and ciborium's):
// arrays, maps and tags are levels, at most 128 of them around a value. ed2b215 counted
// leaves too and refused a number in 128 arrays, or a Date in 127, which encodeValue wrote.
test('decodeValue reads every value encodeValue writes at the depth limit; one level more is refused both ways', () => {
  const nest = (n, v) => {
    for (let i = 0; i < n; i++) v = [v];
    return v;
  };
  const big = 2n ** 100n; // a bignum: tag 2
  for (const [what, value] of [
    ['a number in 128 arrays', nest(128, 1)],
    ['a Date in 127 arrays', nest(127, new Date(0))],
    ['a bignum in 127 arrays', nest(127, big)],
    ['a map in 127 arrays', nest(127, { a: 1 })],
  ]) {
    assert.deepEqual(decodeValue(encodeValue(value)), value, what);
  }
  const deeper = { code: 'ENCODE', message: /nested deeper than 128/ };
  for (const [what, value] of [
    ['a number in 129 arrays', nest(129, 1)],
    ['a Date in 128 arrays', nest(128, new Date(0))],
    ['a bignum in 128 arrays', nest(128, big)],
    ['an empty array in 128 arrays', nest(128, [])],
    ['a map in 128 arrays', nest(128, new Map())],
  ]) {
    assert.throws(() => encodeValue(value), deeper, what);
  }
  // The same values as bytes (what another writer could send): refused reading.
  const arrays = (n, tail) => Uint8Array.from([...Array(n).fill(0x81), ...tail]);
  const tooDeep = { code: 'DECODE', message: 'CBOR value too large to decode: nested deeper than 128' };
  assert.deepEqual(decodeValue(arrays(128, [0x01])), nest(128, 1));
  assert.deepEqual(decodeValue(arrays(127, [0xc1, 0x00])), nest(127, new Date(0)));
  for (const [what, tail] of [
    ['a number in 129 arrays', [0x81, 0x01]],
    ['a Date in 128 arrays', [0xc1, 0x00]],
    ['an empty array in 128 arrays', [0x80]],
    ['an empty map in 128 arrays', [0xa0]],
  ]) {
    assert.throws(() => decodeValue(arrays(128, tail)), tooDeep, what);
  }
});

// Review of the npm glue, finding 6: the relay's text in a `Close` (and a fatal `Err`)
// reached the `state` event's reason — and connect() rejections, the "gave up" error —
// as it came: an app logging it got the relay's terminal escapes, a fake log line, or
// bidi controls that reorder what is shown. Now shown as `?`, as `error` frames are.
test("a relay's Close reason reaches the state event printable", { timeout: 60_000 }, async () => {
  const text = new TextEncoder().encode('\x1b]0;x\x07\n[INFO] fake\u202eevil\u2028line\u0085');
  const fake = await hostileRelay((client) => {
    // Close {0: 14, 1: 11 (shutting_down), 2: text}.
    client.send(Uint8Array.of(0xa3, 0x00, 0x0e, 0x01, 0x0b, 0x02, 0x78, text.length, ...text));
  });
  const c = await connectTo(fake, 'closetext', { connectTimeoutMs: 300 });
  try {
    const gone = dropped(c);
    c.flush().catch(() => {});
    const reason = await gone;
    assert.match(reason, /\?\]0;x\?\?\[INFO\] fake\?evil\?line\?/, JSON.stringify(reason));
    assert.doesNotMatch(reason, /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/);
  } finally {
    await c.close();
    await fake.close();
  }
});
