// The `tls` connect option (Node.js only), against real relays serving wss:// with a
// certificate from `whispeer-relay tls generate`: `pin` (the fingerprint that command
// prints) and `ca` (extra roots) with the Rust client's semantics (TlsPin, TlsRoot):
// a pin names the exact certificate and replaces chain and host-name checks; `ca` adds roots
// and keeps both checks. Browsers refuse the option (UNSUPPORTED).
//
// Without the feature every test here fails by construction: js/tls.node.js does not exist
// (the file does not load), and `tls` is an unknown connect option (INVALID_OPTION), which
// no test below accepts — each one expects a connection to come up, a message naming the
// pin or the option field, or the code UNSUPPORTED.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, rootCertificates } from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startRelay } from '../shared/relay.js';
import { relayBin } from '../shared/bins.js';
import { Client, TreeKey, WhispeerError } from '../../js/index.node.js';
import { tlsDialOptions } from '../../js/tls.node.js';

let dir;
let local; // a certificate for localhost, 127.0.0.1, ::1: { cert, key, pin, relay, url }
let other; // one for other.example only (served on 127.0.0.1: the host name does not match)
const WRONG = 'sha256:' + 'ab'.repeat(32);
const once = { reconnect: { maxAttempts: 0 }, connectTimeoutMs: 10_000 };

/** `whispeer-relay tls generate`: the files and the pin it prints (`sha256:<64 hex>`). */
function generate(name, names = []) {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  const out = execFileSync(
    relayBin(),
    ['tls', 'generate', '--cert', cert, '--key', key, ...names.flatMap((n) => ['--name', n])],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] },
  );
  return { cert, key, pin: out.trim() };
}

async function serve(c) {
  const relay = await startRelay({ args: ['--wss', '127.0.0.1:0', '--tls-cert', c.cert, '--tls-key', c.key] });
  return { ...c, relay, url: `wss://${relay.wss}` };
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'whispeer-tls-'));
  local = await serve(generate('local'));
  other = await serve(generate('other', ['other.example']));
});
after(async () => {
  await local?.relay.stop();
  await other?.relay.stop();
  rmSync(dir, { recursive: true, force: true });
});

test('the pin tls generate prints connects to a self-signed relay, and messages flow over it', async () => {
  assert.match(local.pin, /^sha256:[0-9a-f]{64}$/); // as printed, used as is
  const tree = TreeKey.generate('home');
  const a = await Client.connect(local.url, { ...once, keys: tree, tls: { pin: local.pin } });
  const b = await Client.connect(local.url, { ...once, keys: tree, tls: { pin: local.pin } });
  try {
    assert.equal(a.state, 'connected');
    let deliver;
    const got = new Promise((r) => (deliver = r));
    await a.subscribe('chat/tls', (m) => deliver(m));
    await b.publish('chat/tls', 'over wss', { qos: 1 });
    assert.equal((await got).value, 'over wss');
  } finally {
    await a.close();
    await b.close();
  }
});

test('a pin is read as the Rust client reads it: prefix, case, colons, spaces; any of several', async () => {
  const hex = local.pin.slice('sha256:'.length);
  const forms = [
    hex, // bare
    'SHA256:' + hex.toUpperCase(),
    hex.toUpperCase().match(/../g).join(':'), // openssl x509 -fingerprint -sha256
    `  sha256: ${hex.slice(0, 32)} ${hex.slice(32)}\n`,
    [WRONG, local.pin], // a rotation: the next certificate's pin and the current one
  ];
  for (const pin of forms) {
    const c = await Client.connect(local.url, { ...once, tls: { pin } });
    assert.equal(c.state, 'connected', JSON.stringify(pin));
    await c.close();
  }
});

test('a wrong pin fails the connection, naming the fingerprint the relay presented', async () => {
  await assert.rejects(Client.connect(local.url, { ...once, tls: { pin: WRONG } }), (e) => {
    assert.ok(e instanceof WhispeerError);
    assert.equal(e.code, 'CONNECT');
    assert.match(e.message, /not the pinned one/);
    assert.ok(e.message.includes(local.pin), e.message);
    return true;
  });
  // Another relay's pin is just as wrong.
  await assert.rejects(Client.connect(local.url, { ...once, tls: { pin: other.pin } }), /not the pinned one/);
});

test('a wrong pin sends the relay nothing: the upgrade request never leaves', async () => {
  // A plain TLS server with the certificate, reporting per connection the application bytes
  // it received (a handshake the client broke off reports none).
  const server = createServer({ cert: readFileSync(local.cert), key: readFileSync(local.key) });
  const outcomes = [];
  let notify = null;
  const report = (o) => (notify ? (notify(o), (notify = null)) : outcomes.push(o));
  const next = () => new Promise((r) => (outcomes.length ? r(outcomes.shift()) : (notify = r)));
  server.on('secureConnection', (s) => {
    let bytes = '';
    s.on('error', () => {});
    s.on('data', (d) => {
      bytes += d.toString('latin1');
      s.destroy(); // enough: no WebSocket here
    });
    s.once('close', () => report({ bytes }));
  });
  server.on('tlsClientError', () => report({ bytes: '' }));
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `wss://127.0.0.1:${server.address().port}`;
  try {
    await assert.rejects(Client.connect(url, { ...once, tls: { pin: WRONG } }), /not the pinned one/);
    assert.equal((await next()).bytes, '', 'the relay received bytes from a connection that failed its pin');
    // The control: with the right pin the same server does receive the upgrade request.
    await assert.rejects(Client.connect(url, { ...once, tls: { pin: local.pin } }));
    assert.match((await next()).bytes, /^GET \/ HTTP\/1\.1\r\n/);
  } finally {
    server.close();
  }
});

test('without tls a self-signed relay is refused; tls.ca with its certificate is trusted', async () => {
  await assert.rejects(Client.connect(local.url, { ...once }), (e) => {
    assert.equal(e.code, 'CONNECT');
    assert.match(e.message, /self-signed certificate/);
    return true;
  });
  for (const ca of [readFileSync(local.cert, 'utf8'), readFileSync(local.cert), [rootCertificates[0], readFileSync(local.cert)]]) {
    const c = await Client.connect(local.url, { ...once, tls: { ca } });
    assert.equal(c.state, 'connected');
    await c.close();
  }
});

test('tls.ca keeps the host-name check; a pin does not make one (as in Rust)', async () => {
  // `other` is served on 127.0.0.1 with a certificate for other.example only.
  await assert.rejects(Client.connect(other.url, { ...once, tls: { ca: readFileSync(other.cert) } }), (e) => {
    assert.equal(e.code, 'CONNECT');
    assert.match(e.message, /altnames|does not match/i);
    return true;
  });
  // A pin names the exact certificate: chain and name are not consulted (Rust's PinVerifier).
  const c = await Client.connect(other.url, { ...once, tls: { pin: other.pin } });
  assert.equal(c.state, 'connected');
  await c.close();
  // With a pin, `ca` is not consulted (Rust: pins set, roots unused): a wrong pin still fails.
  await assert.rejects(
    Client.connect(local.url, { ...once, tls: { pin: WRONG, ca: readFileSync(local.cert) } }),
    /not the pinned one/,
  );
});

test('tls.ca adds to the default roots instead of replacing them', () => {
  const o = tlsDialOptions({ ca: [readFileSync(local.cert)] });
  assert.equal(o.ca.length, rootCertificates.length + 1);
  assert.ok(rootCertificates.every((r) => o.ca.includes(r)));
  assert.equal(o.rejectUnauthorized, undefined);
  // A pin sets no process- or request-wide `rejectUnauthorized: false`, only its own dial.
  const p = tlsDialOptions({ pins: ['ab'.repeat(32)] });
  assert.deepEqual(Object.keys(p), ['createConnection']);
});

test('tls options apply to wss:// only (as the Rust client): a ws:// relay ignores a pin', async () => {
  const c = await Client.connect(local.relay.url, { ...once, tls: { pin: WRONG } });
  assert.equal(c.state, 'connected');
  await c.close();
});

test('bad tls options are INVALID_OPTION, naming the field', async () => {
  const bad = [
    [{ pin: 'sha256:abc' }, /tls\.pin: a SHA-256 fingerprint has 64 hex digits, "sha256:abc" has 3/],
    [{ pin: 'sha256:' + 'zz'.repeat(32) }, /tls\.pin: .* is not hexadecimal/],
    [{ pin: 'sha1:' + 'ab'.repeat(32) }, /tls\.pin: a SHA-256 fingerprint has 64 hex digits/],
    [{ pin: 'Sha256:' + 'ab'.repeat(32) }, /tls\.pin: a SHA-256 fingerprint has 64 hex digits/], // as Rust
    [{ pin: [local.pin, 'nope'] }, /tls\.pin\[1\]: a SHA-256 fingerprint/],
    [{ pin: [] }, /tls\.pin: expected at least one fingerprint/],
    [{ pin: 42 }, /tls\.pin: expected a 'sha256:…' string/],
    [{ ca: 'not a certificate' }, /tls\.ca: no PEM certificate/],
    [{ ca: '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----' }, /tls\.ca: not a certificate/],
    [{ ca: [] }, /tls\.ca: expected at least one PEM certificate/],
    [{ ca: 7 }, /tls\.ca: expected PEM text/],
    [{ pin: local.pin, ca: 'junk' }, /tls\.ca: no PEM certificate/],
    [{ pins: local.pin }, /tls: unknown option "pins"/],
    // Two `tls generate` certificates share their subject: OpenSSL would only try the first.
    [{ ca: [readFileSync(other.cert), readFileSync(local.cert)] }, /tls\.ca\[1\]: a second self-signed .* pin both/],
    [{}, /tls: expected \{ pin/],
    ['sha256:00', /tls: expected \{ pin/],
  ];
  for (const [tls, re] of bad)
    await assert.rejects(Client.connect(local.url, { ...once, tls }), (e) => {
      assert.equal(e.code, 'INVALID_OPTION', `${JSON.stringify(tls)}: ${e.message}`);
      assert.match(e.message, re);
      return true;
    });
});

test('browsers refuse the tls option with UNSUPPORTED', () => {
  // The browser entry point (js/index.browser.js) is the wasm init plus js/api.js, with the
  // page's WebSocket: the same here, in a child process (modules are per process), with a
  // stand-in WebSocket class.
  const pkg = new URL('../../pkg/whispeer_wasm.js', import.meta.url).href;
  const wasm = fileURLToPath(new URL('../../pkg/whispeer_wasm_bg.wasm', import.meta.url));
  const api = new URL('../../js/api.js', import.meta.url).href;
  const script = `
    import { readFileSync } from 'node:fs';
    const { initSync } = await import(${JSON.stringify(pkg)});
    initSync({ module: readFileSync(${JSON.stringify(wasm)}) });
    globalThis.WebSocket = class { constructor() { throw new Error('dialed'); } };
    const { Client } = await import(${JSON.stringify(api)});
    const out = [];
    for (const tls of [{ pin: ${JSON.stringify(local.pin)} }, { ca: 'PEM' }]) {
      try { new Client('wss://relay.example', { tls }); out.push('accepted'); }
      catch (e) { out.push({ name: e.name, code: e.code, message: e.message }); }
    }
    new Client('wss://relay.example', {}).close(); // and without it the client is made
    console.log(JSON.stringify(out));
  `;
  const out = JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' }));
  assert.equal(out.length, 2);
  for (const e of out) {
    assert.equal(e.name, 'WhispeerError');
    assert.equal(e.code, 'UNSUPPORTED');
    assert.match(e.message, /only in Node\.js/);
  }
});
