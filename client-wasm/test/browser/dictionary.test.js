// zstd dictionaries (codec 3, PROTOCOL §4.6.1) in headless Chromium, the browser
// counterpart of test/node/dictionary.test.js: the web build seals and opens codec 3 in the
// page (C zstd compiled to wasm), a page client without the dictionary refuses those
// messages, Node reads what the page compressed and the page reads what Node compressed,
// and an invite sealed in Node carries the dictionary to a page that accepts it (§7).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chromiumPerFile } from '../shared/chromium.js';
import { dictBytes, reading } from '../shared/dictionary.js';
import { Identity, Keyring, TreeKey, sealInvite } from '../../js/index.node.js';

const fx = chromiumPerFile();
const nodeClient = (opts) => fx.nodeClient(opts);

/** In the page: client `name` with `keys` (key strings and/or the page's dictionary). */
function pageClient(page, name, { keys, withDict = false, filter, options = {} }) {
  return page.evaluate(
    async ({ name, url, keys, withDict, filter, options }) => {
      window.clients ??= {};
      window.inbox ??= {};
      const kr = new W.Keyring();
      for (const k of keys) kr.addKeyString(k);
      if (withDict) window.dictId = kr.addDictionary(window.telemetry.dictBytes);
      const compression = options.compression === 'dict' ? `zstd-dict:${window.dictId}` : options.compression;
      const c = await W.Client.connect(url, { keys: kr, identity: W.Identity.generate(), ...options, compression });
      window.clients[name] = c;
      window.inbox[name] = [];
      if (filter) await c.subscribe(filter, (m) => window.inbox[name].push({ topic: m.topic, value: m.value }));
      return window.dictId;
    },
    { name, url: fx.relay.url, keys, withDict, filter, options },
  );
}

/** Resolves with the page's `inbox[name]` once it holds `n` messages. */
async function inbox(page, name, n) {
  await page.waitForFunction(({ name, n }) => window.inbox[name].length >= n, { name, n });
  return page.evaluate((name) => window.inbox[name], name);
}

test('Chromium: codec 3 seals and opens in the page, against Node both ways, and travels in an invite', async () => {
  const page = await fx.browser.testPage();
  const tree = TreeKey.generate('dict-browser');
  const key = tree.toKeyString();
  try {
    // In the page: a publisher and a reader holding the dictionary, one without it.
    const id = await pageClient(page, 'pub', { keys: [key], withDict: true, options: { compression: 'dict' } });
    const nodeKeys = new Keyring();
    nodeKeys.addTreeKey(tree);
    assert.equal(nodeKeys.addDictionary(dictBytes), id, 'the same bytes give the same id in Chromium and Node');
    await pageClient(page, 'reader', { keys: [key], withDict: true, filter: 'sensor/#' });
    await pageClient(page, 'lacking', { keys: [key], filter: 'sensor/#' });
    const atNode = [];
    await (await nodeClient({ keys: nodeKeys })).subscribe('sensor/#', (m) => atNode.push(m));

    await page.evaluate((v) => window.clients.pub.publish('sensor/page', v, { ack: true }), reading);
    assert.deepEqual((await inbox(page, 'reader', 1))[0], { topic: 'sensor/page', value: reading });
    // Node (with the dictionary) reads what Chromium compressed.
    const nodePub = await nodeClient({ keys: nodeKeys, compression: `zstd-dict:${id}` });
    // Chromium reads what Node compressed.
    await nodePub.publish('sensor/node', reading, { ack: true });
    const read = await inbox(page, 'reader', 2);
    assert.deepEqual(read[1], { topic: 'sensor/node', value: reading });
    assert.deepEqual(atNode.map((m) => [m.topic, m.value]), [['sensor/page', reading], ['sensor/node', reading]]);
    // The page client without the dictionary refused both: the first message it delivers is
    // a marker published after them without the dictionary.
    const plain = await nodeClient({ keys: tree, compression: 'zstd' });
    await plain.publish('sensor/marker', 1, { ack: true });
    assert.deepEqual(await inbox(page, 'lacking', 1), [{ topic: 'sensor/marker', value: 1 }]);
    assert.equal(await page.evaluate(() => window.clients.lacking.stats().rejected), 2);

    // An invite sealed in Node carries the dictionary; the page accepts it and reads codec 3.
    const publicId = await page.evaluate(() => {
      window.me = W.Identity.generate();
      return window.me.publicId;
    });
    const invite = sealInvite(tree.grant('sensor/#'), Identity.generate(), publicId, { dictionaries: nodeKeys });
    const ids = await page.evaluate(
      async ({ url, invite }) => {
        const opened = W.openInvite(invite, window.me);
        const c = await W.Client.connect(url, { keys: opened, identity: window.me });
        window.clients.invited = c;
        window.inbox.invited = [];
        await c.subscribe('sensor/#', (m) => window.inbox.invited.push({ topic: m.topic, value: m.value }));
        return opened.dictionaryIds;
      },
      { url: fx.relay.url, invite },
    );
    assert.deepEqual(ids, [id]);
    await nodePub.publish('sensor/invited', reading, { ack: true });
    assert.deepEqual(await inbox(page, 'invited', 1), [{ topic: 'sensor/invited', value: reading }]);
  } finally {
    await page.evaluate(() => Promise.all(Object.values(window.clients ?? {}).map((c) => c.close())));
    await page.close();
  }
});
