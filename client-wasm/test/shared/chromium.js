// Headless Chromium (Debian chromium + playwright-core, no browser download) with a fresh
// profile, and the static server that serves the web build to it.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { before, after } from 'node:test';
import { chromium } from 'playwright-core';
import { PKG_ROOT } from './bins.js';
import { startRelay } from './relay.js';
import { startServer } from '../../scripts/serve.mjs';
import { Client, Identity } from '../../js/index.node.js';

/**
 * One relay and one browser per test file (started before the file's tests, stopped after
 * them): `fx.relay`, `fx.browser` (as `startChromium` returns) and `fx.nodeClient(opts)`, a
 * Node client on the relay with a fresh identity, closed after the tests.
 */
export function chromiumPerFile() {
  const clients = [];
  const fx = {
    relay: undefined,
    browser: undefined,
    async nodeClient(opts) {
      const c = await Client.connect(fx.relay.url, { identity: Identity.generate(), ...opts });
      clients.push(c);
      return c;
    },
  };
  before(async () => {
    fx.relay = await startRelay();
    fx.browser = await startChromium();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await fx.browser?.close();
    await fx.relay?.stop();
  });
  return fx;
}

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
