// Browser entry point: fetches and instantiates the wasm module next to this package
// (bundlers that understand `new URL(..., import.meta.url)` copy it along).
import init from '../pkg/whispeer_wasm.js';

await init({ module_or_path: new URL('../pkg/whispeer_wasm_bg.wasm', import.meta.url) });

export * from './api.js';
