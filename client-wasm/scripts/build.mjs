// npm run build: cargo (wasm32, profile `wasm`: opt-level 3, fat LTO) → wasm-bindgen (pinned CLI)
// → wasm-opt -O3. Chosen by measurement (README "Size and speed"): 3× faster sealing than the
// size build for ~15 % more gzip. Size build: CARGO_PROFILE_WASM_OPT_LEVEL=s WASM_OPT_LEVEL=-Oz.
// Output: pkg/whispeer_wasm.js + pkg/whispeer_wasm_bg.wasm (gitignored, in the npm package).
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, statSync, rmSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const WASM_BINDGEN_VERSION = '0.2.129'; // = the `wasm-bindgen` crate pin in Cargo.toml
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pkg = join(root, 'pkg');
const run = (cmd, args, opts = {}) => {
  console.error(`$ ${cmd} ${args.join(' ')}`);
  return execFileSync(cmd, args, { cwd: root, stdio: ['ignore', 'inherit', 'inherit'], ...opts });
};

// 1. Check the CLI before spending minutes compiling.
let version = '';
try {
  version = execFileSync('wasm-bindgen', ['--version'], { encoding: 'utf8' }).trim();
} catch {}
if (version !== `wasm-bindgen ${WASM_BINDGEN_VERSION}`) {
  console.error(
    `need wasm-bindgen ${WASM_BINDGEN_VERSION} (found: ${version || 'none'}); install it with\n` +
      `  cargo install wasm-bindgen-cli --version ${WASM_BINDGEN_VERSION} --locked --bin wasm-bindgen`,
  );
  process.exit(1);
}

// 2. Compile. The target dir is CARGO_TARGET_DIR if set, else the workspace's.
const targetDir =
  process.env.CARGO_TARGET_DIR ||
  JSON.parse(
    execFileSync('cargo', ['metadata', '--format-version', '1', '--no-deps'], { cwd: root, encoding: 'utf8' }),
  ).target_directory;
const locked = process.env.WHISPEER_UNLOCKED ? [] : ['--locked'];
// wasm SIMD (simd128): in Node 20 and every current browser engine.
const simd = process.env.WHISPEER_WASM_SIMD === '0' ? '' : '-C target-feature=+simd128';
run('cargo', ['build', '-p', 'whispeer-wasm', '--target', 'wasm32-unknown-unknown', '--profile', 'wasm', ...locked], {
  env: { ...process.env, CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS: simd },
});
const input = join(targetDir, 'wasm32-unknown-unknown', 'wasm', 'whispeer_wasm.wasm');
if (!existsSync(input)) throw new Error(`cargo did not produce ${input}`);

// 3. Bindings (the `web` target; the Node entry point calls initSync with the bytes).
rmSync(pkg, { recursive: true, force: true });
run('wasm-bindgen', ['--target', 'web', '--weak-refs', '--out-dir', pkg, '--out-name', 'whispeer_wasm', input]);

// 4. Shrink with binaryen from npm (Debian's wasm-opt 108 produces modules that fail to load).
const wasm = join(pkg, 'whispeer_wasm_bg.wasm');
const before = statSync(wasm).size;
const wasmOpt = join(root, 'node_modules', '.bin', 'wasm-opt');
if (!existsSync(wasmOpt)) throw new Error('node_modules/.bin/wasm-opt missing: run `npm ci` first');
const features = [
  '--enable-bulk-memory',
  '--enable-nontrapping-float-to-int',
  '--enable-sign-ext',
  '--enable-mutable-globals',
  '--enable-reference-types',
  '--enable-multivalue',
];
run(wasmOpt, [...(process.env.WASM_OPT_LEVEL ? [process.env.WASM_OPT_LEVEL] : ['-O3']), ...features, '--strip-debug', '--strip-producers', wasm, '-o', wasm]);

const bytes = readFileSync(wasm);
console.error(
  `pkg/whispeer_wasm_bg.wasm: ${bytes.length} bytes (${before} before wasm-opt), ` +
    `${gzipSync(bytes, { level: 9 }).length} bytes gzipped`,
);
