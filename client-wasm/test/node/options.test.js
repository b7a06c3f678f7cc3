// Client options against the real relay binary: per-topic rules inherit the client's
// settings, publisher policies (requireSigned / allowSenders), the heartbeat's bounds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocket } from 'ws';
import { relayPerFile } from '../shared/fixture.js';
import { Client, Identity, TreeKey } from '../../js/index.node.js';
import { setWebSocket } from '../../js/client.js';

const fx = relayPerFile();
const connect = (opts) => fx.connect(opts);

/** The `ws` WebSocket, recording the size of every frame a client sends in `sent`. */
function recording() {
  const sent = [];
  class Recording extends WebSocket {
    send(data, ...rest) {
      sent.push(data.byteLength ?? data.length);
      return super.send(data, ...rest);
    }
  }
  return { Recording, sent };
}

test("a topic rule that does not name compression keeps the client's compression: 'none'", async () => {
  const tree = TreeKey.generate('nc');
  const zeros = new Uint8Array(1000);
  const { Recording, sent } = recording();
  setWebSocket(Recording, true);
  let c;
  try {
    // Rules naming compression, padding or suite alone inherit every other setting; a rule
    // that names it still sets it.
    c = await connect({
      keys: tree,
      compression: 'none',
      topics: { 'a/#': { suite: 'aes-gcm' }, 'b/#': { padding: false }, 'z/#': { compression: 'zstd' } },
    });
  } finally {
    setWebSocket(WebSocket, true);
  }
  const size = async (topic) => {
    const before = sent.length;
    await c.publishBytes(topic, zeros, { ack: true });
    return Math.max(...sent.slice(before));
  };
  const a = await size('a/b');
  assert.ok(a >= 1000, `compression stayed off under a rule naming only the suite: a ${a}-byte frame`);
  const b = await size('b/c');
  assert.ok(b >= 1000, `compression stayed off under a rule naming only padding: a ${b}-byte frame`);
  const z = await size('z/x');
  assert.ok(z < 500, `the rule naming zstd compresses: a ${z}-byte frame`);
});
