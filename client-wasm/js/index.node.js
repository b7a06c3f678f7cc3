// Node.js entry point: loads the wasm module synchronously and supplies the `ws` package,
// also where Node has a global WebSocket (22 and later): `ws` refuses a message over the
// client's `maxFrame` before buffering it (its `maxPayload`), the global one only once the
// whole message is in memory.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { initSync } from '../pkg/whispeer_wasm.js';
import { setWebSocket, setTlsDialer } from './client.js';
import { tlsDialOptions } from './tls.node.js';
import { setFileStore } from './persist.js';
import { openFileStore } from './persist.node.js';

initSync({ module: readFileSync(new URL('../pkg/whispeer_wasm_bg.wasm', import.meta.url)) });
setFileStore(openFileStore);
let ws;
try {
  ws = createRequire(import.meta.url)('ws');
} catch {
  // Bundled without its dependency: the global WebSocket (Node 22+), checked after buffering.
}
if (ws) {
  setWebSocket(ws, true);
  // The `tls` option (pins, extra roots) rides on `ws`'s TLS options; the global WebSocket
  // takes none, so without `ws` it is refused (UNSUPPORTED) as in browsers.
  setTlsDialer(tlsDialOptions);
}

export * from './api.js';
