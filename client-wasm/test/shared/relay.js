// Starts the real relay binary on free ports and waits for its ready file (an event, not a
// sleep): { ws, tcp, admin, url, stop(), restart() }. `storePath`: a SQLite store file that
// survives `restart()` (a kill -9), instead of the in-memory store.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, watch, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { relayBin } from './bins.js';

function waitReady(dir, file, child) {
  return new Promise((resolve, reject) => {
    let done = false;
    const finish = (err, v) => {
      if (done) return;
      done = true;
      watcher.close();
      child.off('exit', onExit);
      err ? reject(err) : resolve(v);
    };
    const check = () => {
      try {
        finish(null, JSON.parse(readFileSync(file, 'utf8')));
      } catch {} // not there yet, or half-written: the next change event retries
    };
    const onExit = (code) => finish(new Error(`relay exited with ${code} before it was ready`));
    const watcher = watch(dir, check);
    child.on('exit', onExit);
    check();
  });
}

export async function startRelay({ wsPort = 0, args = [], storePath, store = 'memory' } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'whispeer-relay-'));
  const file = join(dir, 'ready.json');
  const child = spawn(
    relayBin(),
    ['serve', ...(storePath ? ['--store', 'sqlite', '--store-path', storePath] : ['--store', store]), '--ws', `127.0.0.1:${wsPort}`, '--tcp', '127.0.0.1:0', '--admin', '127.0.0.1:0', '--ready-file', file, ...args],
    { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, WHISPEER_LOG: process.env.WHISPEER_LOG ?? 'warn' } },
  );
  const ready = await waitReady(dir, file, child);
  const port = Number(String(ready.ws).split(':').pop());
  const relay = {
    ...ready,
    port,
    url: `ws://127.0.0.1:${port}`,
    child,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
    /** Kills this relay (SIGKILL) and starts a fresh one on the same WebSocket port (and store). */
    async restart() {
      await relay.stop();
      return startRelay({ wsPort: port, args, storePath });
    },
  };
  return relay;
}
