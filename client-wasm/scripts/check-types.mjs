// npm run test:types: `tsc --strict` over test/types/ (js/index.d.ts as `whispeer`) and over
// every ```ts block of README.md, so the documented examples compile against the types.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = join(root, 'test', 'types', 'readme');
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const readme = readFileSync(join(root, 'README.md'), 'utf8');
const blocks = [...readme.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
if (blocks.length === 0) throw new Error('README.md has no ```ts block to check');
// Each block is a module of its own (`export {}` keeps it one even without imports).
blocks.forEach((code, i) => writeFileSync(join(out, `example-${i + 1}.ts`), `${code}\nexport {};\n`));
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
try {
  execFileSync(process.execPath, [tsc, '-p', join(root, 'test', 'types')], { cwd: root, stdio: 'inherit' });
} catch {
  console.error('type check failed (README blocks are in test/types/readme/)');
  process.exit(1);
}
console.error(`types ok: test/types/*.ts and ${blocks.length} README example(s)`);
