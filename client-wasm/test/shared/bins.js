// Where the Rust binaries the tests run live: $WHISPEER_RELAY_BIN / $WHISPEER_INTEROP_PEER,
// else <target dir>/release/… (CARGO_TARGET_DIR, else the workspace's target dir). .ci/wasm-tests
// sets both to the debug builds `cargo test --workspace` leaves.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PKG_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

let target;
export function targetDir() {
  if (target) return target;
  target =
    process.env.CARGO_TARGET_DIR ||
    JSON.parse(
      execFileSync('cargo', ['metadata', '--format-version', '1', '--no-deps'], { cwd: PKG_ROOT, encoding: 'utf8' }),
    ).target_directory;
  return target;
}

function bin(envVar, name) {
  const p = process.env[envVar] || join(targetDir(), 'release', name);
  if (!existsSync(p))
    throw new Error(`${p} not found: build it with cargo build --release (or set ${envVar})`);
  return p;
}

export const relayBin = () => bin('WHISPEER_RELAY_BIN', 'whispeer-relay');
export const peerBin = () => bin('WHISPEER_INTEROP_PEER', 'interop_peer');
