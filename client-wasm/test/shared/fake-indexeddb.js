// An in-memory IndexedDB for the Node tests (Node has none): what js/persist.js uses of it.

/**
 * An in-memory IndexedDB (what js/persist.js uses of it). Read-write transactions apply
 * their operations and complete once `hold()`'s gate, if any when they started, is released.
 * With `keep: false` what is added is not kept (a sink: nothing to read back).
 */
export function fakeIndexedDB({ keep = true } = {}) {
  const dbs = new Map();
  let gate = null;
  const later = (f) => setImmediate(f);
  const request = () => ({ result: undefined, error: null, onsuccess: null, onerror: null, onupgradeneeded: null });
  const names = (m) => ({
    get length() {
      return m.size;
    },
    contains: (n) => m.has(n),
  });
  const connection = (d) => ({
    get version() {
      return d.version;
    },
    objectStoreNames: names(d.stores),
    createObjectStore(n) {
      d.stores.set(n, []);
    },
    close() {},
    transaction(n, mode) {
      const ops = [];
      const tx = {
        oncomplete: null,
        onerror: null,
        onabort: null,
        error: null,
        objectStore: () => ({
          add: (v) => ops.push((rows) => keep && rows.push(v.slice())),
          clear: () => ops.push((rows) => rows.splice(0)),
          getAll() {
            const r = request();
            later(() => {
              r.result = d.stores.get(n).slice();
              r.onsuccess?.();
            });
            return r;
          },
        }),
      };
      const wait = mode === 'readwrite' ? gate : null;
      later(async () => {
        await wait;
        for (const op of ops) op(d.stores.get(n));
        if (mode === 'readwrite') fake.commits++;
        tx.oncomplete?.();
      });
      return tx;
    },
  });
  let release = () => {};
  const fake = {
    commits: 0,
    factory: {
      open(name, version) {
        const r = request();
        later(() => {
          let d = dbs.get(name);
          const fresh = !d;
          if (fresh) dbs.set(name, (d = { version, stores: new Map() }));
          r.result = connection(d);
          if (fresh) r.onupgradeneeded?.();
          r.onsuccess?.();
        });
        return r;
      },
    },
    /**
     * Transactions started from now on commit only once `release()` is called (or the
     * function returned, which lets only this hold's transactions go).
     */
    hold() {
      let open;
      const mine = new Promise((r) => (open = r));
      gate = mine;
      release = () => {
        gate = null;
        open();
      };
      return () => {
        if (gate === mine) gate = null;
        open();
      };
    },
    release: () => release(),
  };
  return fake;
}
