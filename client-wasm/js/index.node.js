// Node.js entry point: loads the wasm module synchronously and supplies the `ws` package
// where there is no global WebSocket (Node 20).
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { initSync } from '../pkg/whispeer_wasm.js';
import { setWebSocket } from './client.js';
import { setFileStore } from './persist.js';
import { openFileStore } from './persist.node.js';

initSync({ module: readFileSync(new URL('../pkg/whispeer_wasm_bg.wasm', import.meta.url)) });
setFileStore(openFileStore);
if (typeof globalThis.WebSocket !== 'function') setWebSocket(createRequire(import.meta.url)('ws'), true);

export * from './api.js';
