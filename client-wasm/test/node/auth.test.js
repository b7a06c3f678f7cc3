// Relay accounts from the npm package: the Node client authenticates to a relay with
// `auth = required` using an account key written by `whispeer-relay account add --key-out`
// or a bearer token from `--token`; without one, or with a wrong one, it is refused.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startRelay } from '../shared/relay.js';
import { relayBin } from '../shared/bins.js';
import { Client, TreeKey } from '../../js/index.node.js';

let relay;
let dir;
let accountKey;
let token;
const clients = [];

function accountAdd(file, name, args) {
  return execFileSync(relayBin(), ['account', 'add', name, '--file', file, ...args], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'ignore'],
  });
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'whispeer-auth-'));
  const file = join(dir, 'accounts.toml');
  const keyFile = join(dir, 'alice.key');
  accountAdd(file, 'alice', ['--key-out', keyFile, '--group', 'home']);
  accountKey = readFileSync(keyFile, 'utf8').trim();
  token = accountAdd(file, 'svc', ['--token', '--group', 'home']).trim().split('\n').pop();
  relay = await startRelay({ args: ['--auth', 'required', '--accounts', file] });
});
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await relay?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const noRetry = { reconnect: { maxAttempts: 0 }, connectTimeoutMs: 10_000 };

test('without an account the relay refuses (auth_required)', async () => {
  await assert.rejects(Client.connect(relay.url, { ...noRetry }), (e) => {
    assert.equal(e.code, 'REJECTED');
    assert.match(e.message, /auth_required/);
    return true;
  });
});

test('a wrong account key or token is refused (auth_failed)', async () => {
  const stranger = 'wsp_acct_sk_' + '11'.repeat(32);
  await assert.rejects(Client.connect(relay.url, { ...noRetry, auth: { key: stranger } }), /auth_failed/);
  await assert.rejects(Client.connect(relay.url, { ...noRetry, auth: { token: token + 'x' } }), /auth_failed/);
  assert.throws(() => new Client(relay.url, { auth: { key: 'wsid1nope' } }), /account key/);
});

test('an account key and a token authenticate; messages flow between them', async () => {
  const tree = TreeKey.generate('home');
  const alice = await Client.connect(relay.url, { keys: tree, auth: { key: accountKey } });
  clients.push(alice);
  const svc = await Client.connect(relay.url, { keys: tree, auth: { token } });
  clients.push(svc);
  assert.equal(alice.state, 'connected');
  let deliver;
  const got = new Promise((resolve) => (deliver = resolve));
  // subscribe resolves once the relay confirmed it; then publish from the token account.
  await alice.subscribe('chat/lobby', (m) => deliver(m));
  await svc.publish('chat/lobby', 'hello');
  const m = await got;
  assert.equal(m.value, 'hello');
});
