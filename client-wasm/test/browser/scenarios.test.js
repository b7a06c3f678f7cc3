// The shared scenario suite (tests/scenarios/*.json) with the npm package in headless
// Chromium: the runner (relay, fault proxies, waits, expectations) stays in Node, the
// clients live in a page (test/scenarios/actors.js over js/index.browser.js), one fresh page
// per scenario. The same files run in Node (test/scenarios/run.test.js) and in Rust
// (client/tests/scenarios.rs).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PKG_ROOT } from '../shared/bins.js';
import { startChromium } from '../shared/chromium.js';
import { runScenario, ScenarioError } from '../scenarios/runner.js';

const DIR = join(PKG_ROOT, '..', 'tests', 'scenarios');
const files = readdirSync(DIR)
  .filter((f) => f.endsWith('.json'))
  .sort();

let browser;
before(async () => {
  browser = await startChromium();
});
after(async () => {
  await browser?.close();
});

/** The actors of a fresh page: each call runs in the page (`window.A`). */
async function pageActors() {
  const page = await browser.testPage();
  await page.evaluate(async () => {
    const { makeActors } = await import('/test/scenarios/actors.js');
    window.A = makeActors(window.W);
  });
  const call =
    (m) =>
    (...args) =>
      page.evaluate(({ m, args }) => window.A[m](...args), { m, args });
  const actors = {};
  for (const m of ['connect', 'subscribe', 'read', 'publish', 'settle', 'flush', 'close', 'has', 'snapshot'])
    actors[m] = call(m);
  // Started in the page, not awaited: the step returns at once.
  actors.publishBackground = (...args) =>
    page.evaluate((args) => {
      window.A.publish(...args);
    }, args);
  actors.closeAll = async (ms) => {
    await page.evaluate((ms) => window.A.closeAll(ms), ms).catch(() => {});
    await page.close();
  };
  return actors;
}

for (const f of files) {
  const bad = f.startsWith('fail_');
  test(`Chromium scenario ${f.replace(/\.json$/, '')}`, { timeout: 300_000 }, async () => {
    const run = runScenario(join(DIR, f), { actors: await pageActors(), pollMs: 20 });
    if (!bad) return run;
    const { fails_at: at } = JSON.parse(readFileSync(join(DIR, f), 'utf8'));
    await assert.rejects(run, (e) => {
      assert.ok(e instanceof ScenarioError, `a ScenarioError, got ${e}`);
      assert.equal(e.step, at, `failed at step ${e.step}, not ${at}: ${e.message}`);
      return true;
    });
  });
}
