// One relay per test file (the real binary, started before the file's tests and stopped
// after them) and a `connect` that gives each client a fresh identity and closes it at the
// end. Node only (it imports the Node entry point).
import { before, after } from 'node:test';
import { startRelay } from './relay.js';
import { Client, Identity } from '../../js/index.node.js';

/** Registers the file's `before`/`after` hooks; `fx.relay` is set once `before` ran. */
export function relayPerFile(relayOptions) {
  const clients = [];
  const fx = {
    relay: undefined,
    /** Keeps `c` to close it after the file's tests; returns it. */
    track(c) {
      clients.push(c);
      return c;
    },
    /** A client on the relay with a fresh identity (and `opts`), closed after the tests. */
    async connect(opts) {
      return fx.track(await Client.connect(fx.relay.url, { identity: Identity.generate(), ...opts }));
    },
  };
  before(async () => {
    fx.relay = await startRelay(relayOptions);
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await fx.relay?.stop();
  });
  return fx;
}
