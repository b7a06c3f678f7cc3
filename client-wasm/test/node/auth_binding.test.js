// Relay-bound sign-ins (PROTOCOL §3.5.6) from the npm package: the client signs the relay
// name of the URL it dialed, so a relay with `auth.names` admits it (also with
// `requireBoundAuth`) and refuses it dialed by a name it does not list; `requireBoundAuth`
// refuses a relay without names with code AUTH_NOT_BOUND; the names the client signs are the
// ones the protocol's vectors list.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startRelay } from '../shared/relay.js';
import { relayBin } from '../shared/bins.js';
import { Client, TreeKey } from '../../js/index.node.js';
import { relayName } from '../../js/client.js';

let named;
let unnamed;
let dir;
let accountKey;
const clients = [];

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'whispeer-auth-binding-'));
  const file = join(dir, 'accounts.toml');
  const keyFile = join(dir, 'alice.key');
  execFileSync(relayBin(), ['account', 'add', 'alice', '--file', file, '--key-out', keyFile], {
    stdio: ['ignore', 'ignore', 'ignore'],
  });
  accountKey = readFileSync(keyFile, 'utf8').trim();
  const auth = ['--auth', 'required', '--accounts', file];
  named = await startRelay({ args: [...auth, '--auth-name', '127.0.0.1'] });
  unnamed = await startRelay({ args: auth });
});
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await named?.stop();
  await unnamed?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const noRetry = { reconnect: { maxAttempts: 0 }, connectTimeoutMs: 10_000 };

test('a relay with names admits the sign-in bound to the URL dialed, requireBoundAuth too', async () => {
  const tree = TreeKey.generate('home');
  const a = await Client.connect(named.url, { ...noRetry, keys: tree, auth: { key: accountKey }, requireBoundAuth: true });
  clients.push(a);
  assert.equal(a.state, 'connected');
  let deliver;
  const got = new Promise((resolve) => (deliver = resolve));
  await a.subscribe('chat/lobby', (m) => deliver(m));
  await a.publish('chat/lobby', 'bound');
  assert.equal((await got).value, 'bound');
  // Dialed by a name the relay does not list: its bound sign-in is refused.
  const other = `ws://localhost:${named.port}`;
  await assert.rejects(Client.connect(other, { ...noRetry, auth: { key: accountKey } }), (e) => {
    assert.equal(e.code, 'REJECTED');
    assert.match(e.message, /auth_failed/);
    assert.ok(e.message.includes(`localhost:${named.port}`), e.message);
    return true;
  });
});

test('requireBoundAuth refuses a relay without names (AUTH_NOT_BOUND); without it the relay is joined', async () => {
  await assert.rejects(Client.connect(unnamed.url, { ...noRetry, auth: { key: accountKey }, requireBoundAuth: true }), (e) => {
    assert.equal(e.code, 'AUTH_NOT_BOUND');
    assert.match(e.message, /auth\.names/);
    assert.ok(e.message.includes(`127.0.0.1:${unnamed.port}`), e.message);
    return true;
  });
  const c = await Client.connect(unnamed.url, { ...noRetry, auth: { key: accountKey } });
  clients.push(c);
  assert.equal(c.state, 'connected');
  assert.throws(() => new Client(unnamed.url, { requireBoundAuth: 'yes' }), (e) => e.code === 'INVALID_OPTION');
});

test('the relay names the client signs are the vectors of PROTOCOL §3.5.6', () => {
  const here = dirname(fileURLToPath(import.meta.url));
  const v = JSON.parse(readFileSync(join(here, '../../../protocol/tests/vectors/ok_relay_names.json'), 'utf8'));
  const ws = v.urls.filter((u) => /^wss?:/.test(u.url));
  assert.ok(ws.length >= 5);
  for (const { url, name } of ws) assert.equal(relayName(url), name, url);
});
