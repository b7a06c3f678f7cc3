// Headless Chromium (Debian chromium + playwright-core, no browser download) with a fresh
// profile, and the static server that serves the web build to it.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { PKG_ROOT } from './bins.js';
import { startServer } from '../../scripts/serve.mjs';

/** Starts the server and the browser: { context, server, testPage(), close() }. */
export async function startChromium() {
  const server = await startServer({ root: PKG_ROOT });
  const profile = mkdtempSync(join(tmpdir(), 'whispeer-chromium-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
      headless: true,
      args: [
        '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
      viewport: { width: 560, height: 640 },
    });
  } catch (e) {
    await server.close();
    rmSync(profile, { recursive: true, force: true });
    throw e;
  }
  return {
    context,
    server,
    /** A new tab on test/browser/page.html, once the package has loaded (`window.W`). */
    async testPage() {
      const page = await context.newPage();
      page.on('pageerror', (e) => console.error('page error:', e));
      await page.goto(`${server.url}/test/browser/page.html`);
      await page.waitForFunction(() => window.pageReady === true);
      return page;
    },
    async close() {
      await context.close();
      await server.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}
