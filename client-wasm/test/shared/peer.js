// Runs the Rust interop peer (tests/src/bin/interop_peer.rs) and reads its JSON lines.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { peerBin } from './bins.js';

/** Spawns the peer; `lines` is an async queue of parsed JSON lines. */
export function runPeer(args) {
  const child = spawn(peerBin(), args, { stdio: ['ignore', 'pipe', 'inherit'] });
  const queue = [];
  const waiters = [];
  let ended = false;
  const rl = createInterface({ input: child.stdout });
  rl.on('line', (l) => {
    let v;
    try {
      v = JSON.parse(l);
    } catch {
      return;
    }
    const w = waiters.shift();
    w ? w.resolve(v) : queue.push(v);
  });
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  exited.then(() => {
    ended = true;
    for (const w of waiters.splice(0)) w.reject(new Error(`interop_peer exited (${args[0]}) before printing enough`));
  });
  return {
    child,
    exited,
    next() {
      if (queue.length) return Promise.resolve(queue.shift());
      if (ended) return Promise.reject(new Error('interop_peer exited'));
      return new Promise((resolve, reject) => waiters.push({ resolve, reject }));
    },
    async take(n) {
      const out = [];
      for (let i = 0; i < n; i++) out.push(await this.next());
      return out;
    },
    kill() {
      if (child.exitCode === null) child.kill('SIGKILL');
    },
  };
}
